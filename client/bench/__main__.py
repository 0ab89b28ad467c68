"""`python -m lcmserve.bench ARGS`: the same as `lcmserve bench ARGS`."""

import sys

from .cli import main

sys.exit(main())
