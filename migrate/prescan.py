"""Round 0's zero test, made while the source connects and attests.

Round 0 sends every page.  On a guest whose RAM is mostly empty, most of its
cost is finding the zero pages: asking the kernel which pages were never
backed (``residency.untouched``) and reading the others, 16 MiB at a time.
None of that needs the peer, so the source starts it on a thread before the
handshake; the handshake (a secure one: key exchange, two quotes, two
verifications, ~10 ms) and the scan then overlap instead of adding up.

It is exact for the same reason the in-round test is: the dirty log starts
*before* the scan (``Source.migrate``), so a page found zero here and written
afterwards is dirty, and goes again in the next round -- the rule a page found
zero during the round itself already follows.  Protected frames are never
sent as zero whatever the scan says (``Source._send_pages`` marks them).
Only the contiguous spans that ``Source._chunks`` tests in place are scanned;
the round copies and tests everything else as before.
"""

from __future__ import annotations

import threading

import numpy as np

from migrate.residency import nonzero_run, untouched


class Prescan:
    """The zero test of round 0's contiguous spans, on its own thread.

    ``pages``: guest RAM as an (npages, 4096) uint8 array; ``span``: pages per
    span (``source.ZERO_SCAN``); ``min_span``: spans of at most this many pages
    are not tested in place (``wire.MAX_BATCH``), so not here either."""

    def __init__(self, pages: np.ndarray, host_address: int, *, span: int, min_span: int):
        self._pages = pages
        self._host = host_address
        self.span, self._min = span, min_span
        self.fresh: np.ndarray | None = None
        self.masks: dict[int, np.ndarray] = {}     # first frame of a span -> nonzero mask
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="migrate-prescan", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        npages = len(self._pages)
        try:
            self.fresh = fresh = untouched(self._host, npages)
            for first in range(0, npages, self.span):
                n = min(self.span, npages - first)
                if self._stop.is_set() or n <= self._min:
                    return
                self.masks[first] = nonzero_run(self._pages, first, n, fresh)
        except Exception:           # noqa: BLE001 - an optimisation: the round tests what is missing itself
            self.masks.clear()

    def result(self) -> tuple[np.ndarray | None, dict[int, np.ndarray]]:
        """Wait for the scan: (pages never backed or None, masks by span)."""
        self._thread.join()
        return self.fresh, self.masks

    def cancel(self) -> None:
        """Stop after the current span (the migration ended before round 0)."""
        self._stop.set()
