"""The paper's studies as experiments. Importing this package registers them."""

from untrainable.recipes import mnist1d  # noqa: F401  (registration)
