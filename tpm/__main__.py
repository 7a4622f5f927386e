"""``python -m tpm`` runs the minivmm-tpm command line."""

import sys

from .cli import main

sys.exit(main())
