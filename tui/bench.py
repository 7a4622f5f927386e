"""Benchmark (not a test): how responsive the TUI stays while a migration runs.

``python -m tui.bench [--ram MIB] [--plain] [--repeat N]`` runs the real app
headless (Textual's test driver, 120x40) on a live migration run to the end,
and measures on the app's own event loop:

* the longest time the loop was blocked: a task sleeps 5 ms again and again
  and records how late it woke up;
* what the longest event-loop callback spent its time on: the UI thread's
  own CPU, waiting for a core (run queue, from /proc/thread-self/schedstat
  on Linux), and the rest (waiting for the GIL held by an engine thread);
* the refresh rate: how many times per second the panels were re-rendered
  while frames arrived (at most 20: the app renders on a 20 Hz timer).

Goals (issue 15): never blocked longer than 50 ms; at least 10 refreshes
per second at 256 MiB.  Numbers depend on the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import asyncio.events
import threading
import time
from pathlib import Path

from tui.app import MigrationApp
from tui.live import Scenario

SCHEDSTAT = Path("/proc/thread-self/schedstat")


def _queued() -> float:
    """Seconds this thread has waited for a core so far (0 where unknown)."""
    try:
        return int(SCHEDSTAT.read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class _Callbacks:
    """Times every callback the UI thread's event loop runs: wall, CPU, run queue."""

    def __init__(self):
        self.longest = (0.0, 0.0, 0.0)       # wall, cpu, queued of the longest callback
        self.on = False
        self._ui = threading.get_ident()
        self._orig = asyncio.events.Handle._run

    def __enter__(self):
        orig, me = self._orig, self

        def timed(handle):
            if not me.on or threading.get_ident() != me._ui:
                return orig(handle)
            t0, c0, q0 = time.perf_counter(), time.thread_time(), _queued()
            try:
                return orig(handle)
            finally:
                wall = time.perf_counter() - t0
                if wall > me.longest[0]:
                    me.longest = (wall, time.thread_time() - c0, _queued() - q0)
        asyncio.events.Handle._run = timed
        return self

    def __exit__(self, *exc):
        asyncio.events.Handle._run = self._orig


async def _measure(app: MigrationApp, out: dict) -> None:
    async with app.run_test(size=(120, 40)) as pilot:
        lags = []
        stop = False

        async def probe():
            while not stop:
                t0 = time.perf_counter()
                await asyncio.sleep(0.005)
                lags.append(time.perf_counter() - t0 - 0.005)
        task = asyncio.get_running_loop().create_task(probe())
        with _Callbacks() as calls:
            # Plain sleeps, not pilot.pause(): the Pilot's pause forces a screen
            # update each time; in a terminal the app updates on its own timers only.
            while not app.frames or app.frames[-1].message is None:
                await asyncio.sleep(0.01)
            lags.clear()
            calls.on = True
            r0, t0 = app.renders, time.perf_counter()
            while app.frames[-1].phase not in ("done", "aborted"):
                await asyncio.sleep(0.01)
            t1 = time.perf_counter()
            calls.on = False
        out.update(seconds=t1 - t0, renders=app.renders - r0, frames=len(app.frames),
                   max_lag_ms=max(lags) * 1000 if lags else 0.0,
                   p99_lag_ms=sorted(lags)[int(len(lags) * 0.99)] * 1000 if lags else 0.0,
                   longest=tuple(x * 1000 for x in calls.longest))
        stop = True
        await task
        await pilot.press("q")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tui.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--ram", type=int, default=256, help="guest RAM in MiB (default 256)")
    p.add_argument("--plain", action="store_true", help="plain mode (default secure)")
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args(argv)
    for _ in range(args.repeat):
        out: dict = {}
        # paused=False: run to the end at once, as the 'e' key does.
        app = MigrationApp(scenario=Scenario(ram_mib=args.ram, plain=args.plain, run_on=50), paused=False)
        asyncio.run(_measure(app, out))
        rate = out["renders"] / out["seconds"] if out["seconds"] > 0 else 0.0
        wall, cpu, queued = out["longest"]
        print(f"{args.ram} MiB {'plain' if args.plain else 'secure'}: migration under the TUI "
              f"{out['seconds']:.2f} s, {out['frames']} frames; event loop longest block "
              f"{out['max_lag_ms']:.1f} ms (p99 {out['p99_lag_ms']:.1f} ms); "
              f"{out['renders']} refreshes = {rate:.1f}/s; longest callback {wall:.1f} ms = "
              f"UI CPU {cpu:.1f} + waiting for a core {queued:.1f} + other {wall - cpu - queued:.1f}")
    return 0


if __name__ == "__main__":
    # Its scenarios measure VMMs in this process: through the launcher (minivmm_boot.py).
    import minivmm_boot
    minivmm_boot.relaunch("tui.bench")
    raise SystemExit(main())
