"""Host clock facts for the downtime measurement.

``time.monotonic()`` is CLOCK_MONOTONIC on Linux: one clock for every process
on a host.  Two VMMs that report the same boot id are on one host, so the
source's pause time and the destination's resume time can be subtracted
directly; across hosts only an upper bound (pause to RESUMED received) is
honest.
"""

from __future__ import annotations

import socket
import time
import uuid

_BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str:
    try:
        with open(_BOOT_ID_FILE) as f:
            return f.read().strip() + "@" + socket.gethostname()
    except OSError:                         # not Linux: never matches another host
        return f"unknown-{uuid.uuid4()}"


now = time.monotonic
