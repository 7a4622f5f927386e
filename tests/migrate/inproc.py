"""Helpers for migrations inside one test process (a destination on a thread)."""

import threading

from migrate.destination import Destination
from migrate.errors import MigrationError
from migrate.precopy import PrecopyPolicy

# Lockstep pre-copy (migrate/precopy.py) for tests whose short guest must migrate:
# its progress during the migration is 3 ticks a round, 3 rounds at most, on any
# machine.  A free-running guest could finish, or its keeper (30 rounds, one a
# tick) exit with its key, during a slow secure handshake on a loaded machine
# (seen: forge-commit "never acted", "no keys after the abort").
BOUNDED = PrecopyPolicy(round_ticks=3, max_rounds=3)


def receive_in_thread(server, result, *, timeout=5.0, run_ticks=100_000, mode_factory=None):
    """Take the next migration from ``server`` on a thread: ``result["incoming"]``
    once it resumed (then run up to ``run_ticks`` ticks; None: not at all), or
    ``result["error"]``.  ``mode_factory``: a migration mode per session (kept
    in ``result["mode"]``; None: plain).  Returns the started thread."""
    def body():
        ch = None
        try:
            ch, peer = server.next_connection("busy: test")
            mode = result["mode"] = mode_factory() if mode_factory else None
            inc = Destination(timeout=timeout, mode=mode).receive(ch, peer)
            result["incoming"] = inc
            if run_ticks:
                inc.machine.run(max_ticks=run_ticks)
        except (MigrationError, OSError) as exc:
            result["error"] = exc
        finally:
            if ch is not None:
                ch.close()
    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t
