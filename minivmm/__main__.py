"""``python -m minivmm``: the same as the ``minivmm`` command.

``python -m`` puts the current directory first on ``sys.path``.  The project's
other top-level packages have generic names (``tpm``, ``migrate``, ``guests``),
so a user's folder or module of that name in the current directory would be
imported instead of ours (an ImportError at best).  Drop that entry before
anything else is imported, unless it is the directory this package itself
came from (running from a checkout without installing).  The ``minivmm``
console script never had the entry: a script's directory is ``bin/``.
"""

import os
import sys
from pathlib import Path


def _drop_current_directory() -> None:
    home = Path(__file__).resolve().parent.parent
    if sys.path and Path(sys.path[0] or os.curdir).resolve() == Path.cwd().resolve() != home:
        del sys.path[0]


_drop_current_directory()

from minivmm.cli import main  # noqa: E402  (after the sys.path fix, on purpose)

sys.exit(main())
