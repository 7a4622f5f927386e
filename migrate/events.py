"""Typed migration events, for the TUI and transcript writers (DESIGN §7).

Frozen dataclasses on :class:`minivmm.events.EventBus`, like the VMM's own
events: ``seq`` strictly increasing per engine, ``vtime`` the guest's virtual
clock when known (0 before the destination holds a machine), ``role``
``"source"`` or ``"destination"``, ``t`` seconds since the migration began
on this side's monotonic clock.  Subscribers run synchronously on the
engine's thread and must not call back into it.
"""

from __future__ import annotations

from dataclasses import dataclass

from minivmm.events import Event, EventBus  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class MigrationEvent(Event):
    role: str
    t: float


@dataclass(frozen=True)
class Connected(MigrationEvent):
    peer: str


@dataclass(frozen=True)
class Handshake(MigrationEvent):
    peer: str
    ram_size: int
    info: dict


@dataclass(frozen=True)
class RoundStarted(MigrationEvent):
    round: int
    pages: int


@dataclass(frozen=True)
class RoundFinished(MigrationEvent):
    round: int
    pages: int
    data_pages: int
    zero_pages: int
    bytes: int
    seconds: float
    dirtied: int        # pages the guest dirtied meanwhile (source only)
    dirty_rate: float   # dirtied / seconds (pages per second)


@dataclass(frozen=True)
class StopAndCopy(MigrationEvent):
    reason: str
    remaining: int


@dataclass(frozen=True)
class StateSent(MigrationEvent):
    state_bytes: int
    digest: str


@dataclass(frozen=True)
class Prepared(MigrationEvent):
    pass


@dataclass(frozen=True)
class Committed(MigrationEvent):
    pass


@dataclass(frozen=True)
class Resumed(MigrationEvent):
    vclock: int


@dataclass(frozen=True)
class Aborted(MigrationEvent):
    reason: str


@dataclass(frozen=True)
class Completed(MigrationEvent):
    report: dict        # MigrationReport.to_dict(): a snapshot, safe to hand to another thread
