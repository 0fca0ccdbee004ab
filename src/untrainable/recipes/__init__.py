"""The paper's studies as experiments. Importing this package registers them."""

from untrainable.recipes import (
    mnist1d,  # noqa: F401  (registration)
    rescue,  # noqa: F401  (registration)
    rescue_distances,  # noqa: F401  (registration)
    rescue_probes,  # noqa: F401  (registration)
    rescue_short,  # noqa: F401  (registration)
    sequence,  # noqa: F401  (registration)
    vision,  # noqa: F401  (registration)
)
