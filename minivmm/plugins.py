"""The VMM's own plug-in points: ``minivmm.commands`` and ``minivmm.bench_suites``.

The CLI loads its ``migrate`` and ``tui`` commands through entry points at every
start, before the VMM measures itself.  Any distribution on ``sys.path`` can
declare entry points in those groups, so a planted ``*.dist-info`` naming a
module of its own ran unmeasured code inside a measured VMM (hostile review).
Only entry points whose module belongs to the measured packages are loaded
(``minivmm_boot.MEASURED``: their files are in PCR 8, and the launcher compiles
them from source); the others are named on stderr and skipped.  Each is loaded
once, however many distributions declare it.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

from minivmm_boot import MEASURED


def own_entry_points(group: str) -> list:
    """The entry points of ``group`` that load measured code, sorted by name."""
    seen: dict[tuple[str, str], object] = {}
    for ep in entry_points(group=group):
        if ep.module.partition(".")[0] not in MEASURED:
            print(f"minivmm: ignoring entry point {ep.name} = {ep.value} in {group}: its module is not "
                  f"one of the VMM's measured packages", file=sys.stderr)
            continue
        seen.setdefault((ep.name, ep.value), ep)
    return sorted(seen.values(), key=lambda e: e.name)
