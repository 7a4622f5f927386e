"""Immutable snapshots: what the engine threads hand to the UI thread.

Widgets only ever see these frozen dataclasses (tuples and strings inside,
never a Machine, a numpy array or a dict the engine still writes), so a
snapshot can cross threads and be written to a transcript as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Memory-map cell codes: content (what the frames hold) ...
FREE, KERNEL, USER, PLAIN, CLOAKED = "f", "k", "u", "p", "c"
CONTENT_ORDER = (FREE, KERNEL, USER, PLAIN, CLOAKED)          # aggregation: the highest wins
CONTENT_NAMES = {FREE: "free (zero)", KERNEL: "kernel", USER: "in use (user, page tables)",
                 PLAIN: "protected, plaintext", CLOAKED: "protected, cloaked"}
# ... and transfer (what the migration did with them).
NOT_SENT, PARTIAL, SENT, DIRTY = "-", "~", "s", "d"
TRANSFER_ORDER = (NOT_SENT, PARTIAL, SENT, DIRTY)


@dataclass(frozen=True)
class MemoryMap:
    """``cells``: two characters per cell, content then transfer; each cell
    covers ``per_cell`` consecutive frames (the last may cover fewer)."""
    npages: int
    per_cell: int
    cells: str

    @property
    def ncells(self) -> int:
        return len(self.cells) // 2

    def cell(self, i: int) -> tuple[str, str]:
        return self.cells[2 * i], self.cells[2 * i + 1]

    def regroup(self, max_cells: int) -> "MemoryMap":
        """The same map with at most ``max_cells`` cells (k cells merged into one)."""
        if self.ncells <= max_cells or max_cells <= 0:
            return self
        k = -(-self.ncells // max_cells)
        out = []
        for i in range(0, self.ncells, k):
            group = [self.cell(j) for j in range(i, min(i + k, self.ncells))]
            out.append(merge_cells(group))
        return MemoryMap(self.npages, self.per_cell * k, "".join(out))

    def count(self, code: str) -> int:
        return sum(1 for i in range(self.ncells) if code in self.cell(i))


def merge_cells(group) -> str:
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
