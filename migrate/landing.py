"""Where an incoming PAGES record's pages land: straight in guest RAM.

The destination hands the channel a :class:`Landing` (``Channel.recv(sink=)``).
The channel reads a PAGES record's head (count, frame numbers) first; the
landing checks it (``decode_pages_head``: count, length, frames increasing
and inside RAM; then the destination's own rule, that the round carries no
more pages than it announced) and names the runs of guest RAM those frames
occupy; the channel reads -- or, sealed, decrypts -- the page bytes directly
into them.  No buffer per record, no copy after the socket's, no per-page
Python work: a record of contiguous frames is one buffer, and ``recvmsg_into``
fills up to 1024 runs per call.

Why this is safe although the bytes land before the record is done: every
frame was checked to be inside RAM before a byte of it was read, the pages
count as stored (``written``, the digest, ``seen``) only once the whole record
arrived (sealed: authenticated), and any failure ends the session and
discards this RAM -- nothing is resumed from it (``migrate/destination.py``).
"""

from __future__ import annotations

import numpy as np

from migrate.messages import decode_pages_head
from migrate.wire import PAGE_SIZE


def runs(pfns: np.ndarray) -> list[tuple[int, int]]:
    """Strictly increasing frame numbers as [first, end) runs of contiguous frames."""
    first, last = int(pfns[0]), int(pfns[-1])
    if last - first + 1 == len(pfns):
        return [(first, last + 1)]
    breaks = np.flatnonzero(np.diff(pfns) != 1) + 1
    starts = pfns[np.concatenate(([0], breaks))]
    ends = pfns[np.concatenate((breaks - 1, [len(pfns) - 1]))] + 1
    return list(zip(starts.tolist(), ends.tolist()))


class Landing:
    """The sink for one destination's guest RAM.  ``check(pfns)`` is called
    with a record's frames before any of its page bytes are read (it raises
    to refuse them); ``pfns`` is the last record's frames."""

    def __init__(self, ram: np.ndarray, npages: int, check):
        self.mem = memoryview(ram).cast("B")
        self.npages = npages
        self.check = check
        self.pfns = np.zeros(0, dtype=np.int64)

    def __call__(self, head, length: int) -> list[memoryview]:
        pfns = decode_pages_head(head, length, self.npages)
        self.check(pfns)
        self.pfns = pfns
        return [self.mem[a * PAGE_SIZE:b * PAGE_SIZE] for a, b in runs(pfns)]
