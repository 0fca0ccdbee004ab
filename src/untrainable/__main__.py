"""`python -m untrainable` (also under torchrun): the command line."""

import sys

from untrainable.cli import main

sys.exit(main())
