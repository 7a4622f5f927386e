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
    # What this side's verification of the peer's quote established (secure mode),
    # as text pairs (see attestation_fields); empty in plain mode or with the
    # attestation defence off.  Emitted only once the quote verified.
    attestation: tuple[tuple[str, str], ...] = ()


def attestation_fields(result) -> tuple[tuple[str, str], ...]:
    """A verified quote's result (``tpm.AttestationResult``, or None) as
    immutable text for an event: nothing of the engine's objects leaks out."""
    if result is None:
        return ()
    return (("host", str(result.host)),
            ("AK", result.ak_name.hex()[:16] + "..."),
            ("PCRs matching the policy", ", ".join(str(i) for i in sorted(result.pcr_values))),
            ("approved boot events", str(len(result.events))),
            ("nonce (bound to the key exchange)", result.nonce.hex()[:16] + "..."))


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
