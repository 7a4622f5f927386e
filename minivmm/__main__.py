import sys

from minivmm.cli import main

sys.exit(main())
