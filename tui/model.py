"""Immutable snapshots: what the engine threads hand to the UI thread.

Widgets only ever see these frozen dataclasses (tuples and strings inside,
never a Machine, a numpy array or a dict the engine still writes), so a
snapshot can cross threads and be written to a transcript as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Memory-map cell codes: content (what the frames hold) ...
FREE, KERNEL, USER, PLAIN, CLOAKED = "f", "k", "u", "p", "c"
CONTENT_ORDER = (FREE, KERNEL, USER, PLAIN, CLOAKED)          # aggregation: the highest wins
CONTENT_NAMES = {FREE: "free (zero)", KERNEL: "kernel (and any other non-zero frame)",
                 USER: "user (mapped user-accessible by a live process, or its page tables)",
                 PLAIN: "protected, plaintext", CLOAKED: "protected, cloaked"}
# ... and transfer (what the migration did with them).
NOT_SENT, PARTIAL, SENT, DIRTY = "-", "~", "s", "d"
TRANSFER_ORDER = (NOT_SENT, PARTIAL, SENT, DIRTY)


_RANK = np.zeros(256, np.uint8)                 # a cell character -> its rank in its order
for _order in (CONTENT_ORDER, TRANSFER_ORDER):
    for _i, _c in enumerate(_order):
        _RANK[ord(_c)] = _i
_CONTENT_CH = np.frombuffer("".join(CONTENT_ORDER).encode(), np.uint8)
_TRANSFER_CH = np.frombuffer("".join(TRANSFER_ORDER).encode(), np.uint8)


@dataclass(frozen=True)
class MemoryMap:
    """``cells``: two characters per cell, content then transfer; each cell
    covers ``per_cell`` consecutive frames (the last may cover fewer).
    Captured at one page per cell (``per_cell == 1``): the screen merges
    cells to fit, and zooms into any window down to single pages."""
    npages: int
    per_cell: int
    cells: str

    @property
    def ncells(self) -> int:
        return len(self.cells) // 2

    def cell(self, i: int) -> tuple[str, str]:
        return self.cells[2 * i], self.cells[2 * i + 1]

    def regroup(self, max_cells: int) -> "MemoryMap":
        """The whole map with at most ``max_cells`` cells (k cells merged into one)."""
        if self.ncells <= max_cells or max_cells <= 0:
            return self
        return self.window(0, self.npages, self.per_cell * -(-self.ncells // max_cells))[1]

    def window(self, lo: int, hi: int, per: int) -> tuple[int, "MemoryMap"]:
        """Frames [lo, hi) at ``per`` frames a cell (rounded up to a multiple of
        this map's own ``per_cell``; ``lo`` rounded down to a cell boundary).
        Returns (the first frame shown, a map of just that window).  Vectorised:
        at 256 MiB a whole map is 65536 cells, merged on every refresh."""
        p = self.per_cell
        per = max(p, -(-per // p) * p)
        a = max(0, lo) // p
        b = min(self.ncells, -(-min(hi, self.npages) // p))
        k = per // p
        raw = np.frombuffer(self.cells.encode("ascii"), np.uint8).reshape(-1, 2)[a:b]
        if k == 1 or len(raw) == 0:
            return a * p, MemoryMap(self.npages, per, raw.tobytes().decode("ascii"))
        cont, trans = _RANK[raw[:, 0]], _RANK[raw[:, 1]]
        starts = np.arange(0, len(raw), k)
        c = np.maximum.reduceat(cont, starts)
        dirty = np.maximum.reduceat(trans == 3, starts)
        all_sent = np.minimum.reduceat(trans == 2, starts)
        some = np.maximum.reduceat((trans == 1) | (trans == 2), starts)
        t = np.where(dirty, 3, np.where(all_sent, 2, np.where(some, 1, 0)))
        out = np.empty((len(starts), 2), np.uint8)
        out[:, 0], out[:, 1] = _CONTENT_CH[c], _TRANSFER_CH[t]
        return a * p, MemoryMap(self.npages, per, out.tobytes().decode("ascii"))

    def count(self, code: str) -> int:
        return sum(1 for i in range(self.ncells) if code in self.cell(i))


def merge_cells(group) -> str:
    """One cell for several (the rule :meth:`MemoryMap.window` applies to arrays):
    the highest content wins; dirty if any is, sent if all are, part if some are."""
    content = max((c for c, _ in group), key=CONTENT_ORDER.index)
    ts = [t for _, t in group]
    if DIRTY in ts:
        t = DIRTY
    elif all(x == SENT for x in ts):
        t = SENT
    elif any(x in (SENT, PARTIAL) for x in ts):
        t = PARTIAL
    else:
        t = NOT_SENT
    return content + t


@dataclass(frozen=True)
class Proc:
    pid: int
    name: str
    state: str           # the guest kernel's view (running, ready, blocked, zombie, ...)
    protection: str      # "-", "protected (n pages: p plaintext, c cloaked)", "stopped: ..."


@dataclass(frozen=True)
class HostView:
    role: str                       # "source" / "destination"
    status: str                     # one line: running, held, receiving, resumed, migrated away, ...
    vclock: int = 0
    memory: MemoryMap | None = None
    registers: tuple[tuple[str, int], ...] = ()
    disasm: tuple[str, ...] = ()    # lines; the first is at EIP
    processes: tuple[Proc, ...] = ()
    console: tuple[str, ...] = ()   # the last lines


@dataclass(frozen=True)
class Message:
    """One protocol step: a record this side sent, or received (and, in the
    secure channel, authenticated); or a rejection that ended the session."""
    n: int                  # 1-based over the whole session, both sides
    side: str               # "source" / "destination"
    direction: str          # "send", "recv", or "reject"
    rtype: str
    length: int
    seq: int
    verdict: str            # "sent", "verified" (sealed), "accepted" (plain), "rejected: ..."
    # What the body says, as the engine's typed events report it (migrate/events.py):
    # (name, value) pairs, e.g. ("round", "1"), ("pages", "230").  Empty when no
    # event describes this record (or not yet: a received record's event comes
    # after its step, so a later frame's ``updated`` carries the filled copy).
    body: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class RoundPoint:
    round: int
    sent: int
    dirtied: int


@dataclass(frozen=True)
class Stats:
    round: int | None = None
    pages_sent: int = 0
    data_pages: int = 0
    zero_pages: int = 0
    bytes: int = 0
    dirty_rate: float = 0.0
    downtime_ms: float | None = None
    rounds: tuple[RoundPoint, ...] = ()


@dataclass(frozen=True)
class Frame:
    """The whole screen at one step."""
    index: int                      # 0-based position in the session's frames
    phase: str                      # a key of phases.PHASES
    round: int | None               # the pre-copy round, when in one
    mode: str                       # "plain" / "secure" / "secure, INSECURE: ..."
    note: str                       # one line: what just happened
    message: Message | None
    source: HostView
    destination: HostView
    stats: Stats = field(default_factory=Stats)
    # Earlier messages whose body an engine event filled in since the previous
    # frame (same ``n``, the fuller copy): the log shows the latest copy.
    updated: tuple[Message, ...] = ()
