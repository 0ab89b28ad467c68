"""`python -m lcmserve.dataset`: the same as `lcmserve dataset`."""

import sys

from .cli import main

sys.exit(main())
