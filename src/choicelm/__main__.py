"""`python -m choicelm ...` (and `torchrun -m choicelm pretrain ...`) run the CLI."""

import sys

from .cli import main

sys.exit(main())
