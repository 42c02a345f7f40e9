"""``python -m vsink`` (and ``torchrun -m vsink``): the ``vsink`` command line."""

import sys

from .cli import main

sys.exit(main())
