"""The end-to-end helpers live in the package now: ``minivmm.vmmproc`` (a VMM
as an OS process) and ``migrate.proxy`` (a recording man in the middle).
This name stays for the tests that import it."""

from migrate.proxy import Proxy  # noqa: F401
from minivmm.vmmproc import Vmm, command, reference_run, serve  # noqa: F401

# The same for a source VMM process (docs/testing.md): the counter guest runs ~200
# ticks; lockstep pre-copy bounds its progress during each migration to 4 ticks a
# round, 4 rounds at most, so it never finishes on the source during a slow
# (secure) handshake or pre-copy on a loaded machine (seen in CI-like runs).
BOUNDED = ("--round-ticks", "4", "--max-rounds", "4")
