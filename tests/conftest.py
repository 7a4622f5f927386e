"""Suite-wide fixtures."""

# First, before any of the VMM's packages is imported: the launcher's source-only
# import, as the minivmm command installs it, so that tests can measure a VMM in
# this process (migrate/codeguard.py refuses one whose modules came from elsewhere).
import minivmm_boot

minivmm_boot.install()

import pytest  # noqa: E402

from minivmm.vmmproc import kill_all, running  # noqa: E402


@pytest.fixture(autouse=True)
def _no_vmm_left_running():
    """A test that fails between starting a VMM process and killing it must
    not leave the process running (a stray ``serve`` holds a port and a core
    for the rest of the suite).  Processes of wider-scoped fixtures, already
    running when the test starts, are theirs to stop."""
    before = set(running())
    yield
    kill_all(keep=before)
