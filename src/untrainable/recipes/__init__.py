"""The paper's studies as experiments. Importing this package registers them."""

from untrainable.recipes import mnist1d  # noqa: F401  (registration)
from untrainable.recipes import rescue  # noqa: F401  (registration)
from untrainable.recipes import sequence  # noqa: F401  (registration)
from untrainable.recipes import vision  # noqa: F401  (registration)
