"""``python -m minivmm``: the same as the ``minivmm`` command.

It starts the VMM again through its launcher (``python -m minivmm_boot``, in
this same process: ``exec``), because by the time this file runs, Python has
already imported the ``minivmm`` package the usual way -- from a pyc, if one
was there -- and a VMM that measures itself must have compiled every module of
its packages from the source it measures (minivmm_boot.py, migrate/codeguard.py).
The launcher also drops the current directory that ``python -m`` put first on
``sys.path``: a user's ``tpm/`` or ``argparse.py`` there would be imported
instead of ours or the standard library's.
"""

import os
import sys

os.execv(sys.executable, [sys.executable, "-m", "minivmm_boot", *sys.argv[1:]])
