"""The end-to-end helpers live in the package now: ``minivmm.vmmproc`` (a VMM
as an OS process) and ``migrate.proxy`` (a recording man in the middle).
This name stays for the tests that import it."""

from migrate.proxy import Proxy  # noqa: F401
from minivmm.vmmproc import Vmm, command, reference_run, serve  # noqa: F401
