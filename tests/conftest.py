"""Suite-wide fixtures."""

import pytest

from minivmm.vmmproc import kill_all, running


@pytest.fixture(autouse=True)
def _no_vmm_left_running():
    """A test that fails between starting a VMM process and killing it must
    not leave the process running (a stray ``serve`` holds a port and a core
    for the rest of the suite).  Processes of wider-scoped fixtures, already
    running when the test starts, are theirs to stop."""
    before = set(running())
    yield
    kill_all(keep=before)
