"""`python -m lcmserve`: the lcmserve command."""

import sys

from .cli import main

sys.exit(main())
