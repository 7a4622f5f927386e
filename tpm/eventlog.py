"""The measurement event log.

A PCR value alone says *that* something changed, not *what*.  The event log records
every extend (PCR index, event type, digest, event data) so that a verifier can
*replay* it — recompute every PCR from zero — and compare the result with the PCR
digest the TPM signed.  The log itself is not trusted: it is only believed after it
replays to a signed quote (TCG PC Client Platform Firmware Profile, "Event Log").

Each entry has the field order of TCG_PCR_EVENT2 (pcrIndex, eventType,
TPML_DIGEST_VALUES with one SHA-256 digest, eventSize, event), marshalled
big-endian like every other structure here (real firmware logs are little-endian).

For the VMM event types the digest *is* SHA-256(event data) — the event data is the
canonical code manifest / config JSON / protection-policy JSON — so a verifier can
check that the log does not lie about what was measured (:meth:`Event.check_binding`).
A ``MANUAL`` event (an extend by hand) carries a free-text description only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import IntEnum

from .errors import EventLogReplayError, FormatError
from .marshal import Reader, Writer
from .pcr import DIGEST_SIZE, NUM_PCRS, TPM_ALG_SHA256, PcrBank, check_index

#: Bounds used by the parser before it allocates anything.
MAX_EVENTS = 256
MAX_EVENT_DATA = 16 * 1024
#: "MVEL" — minivmm event log.
EVENTLOG_MAGIC = 0x4D56454C
EVENTLOG_VERSION = 1
MAX_EVENTLOG_BYTES = 12 + MAX_EVENTS * (4 + 4 + 4 + 2 + DIGEST_SIZE + 4 + MAX_EVENT_DATA)


class EventType(IntEnum):
    """Event types.  TCG assigns small values to firmware events; these live in a
    vendor-looking range ("MV" = 0x4D56) so they can never be confused with them."""

    VMM_CODE = 0x4D560001  #: data = code manifest; digest = SHA-256(data)
    VMM_CONFIG = 0x4D560002  #: data = canonical config JSON; digest = SHA-256(data)
    VMM_POLICY = 0x4D560003  #: data = canonical protection-policy JSON; digest = SHA-256(data)
    MANUAL = 0x4D560010  #: an extend by hand; data = description, digest unrelated

    @property
    def label(self) -> str:
        return _LABELS[self]

    @classmethod
    def from_label(cls, label: str) -> "EventType":
        for t, name in _LABELS.items():
            if name == label:
                return t
        raise ValueError(f"unknown event type {label!r}")

    @property
    def digest_is_data_hash(self) -> bool:
        return self in (EventType.VMM_CODE, EventType.VMM_CONFIG, EventType.VMM_POLICY)


_LABELS = {
    EventType.VMM_CODE: "vmm-code",
    EventType.VMM_CONFIG: "vmm-config",
    EventType.VMM_POLICY: "vmm-policy",
    EventType.MANUAL: "manual",
}


@dataclass(frozen=True)
class Event:
    pcr: int
    type: EventType
    digest: bytes
    data: bytes

    def __post_init__(self) -> None:
        check_index(self.pcr)
        if len(self.digest) != DIGEST_SIZE:
            raise ValueError("event digest must be 32 bytes")
        if len(self.data) > MAX_EVENT_DATA:
            raise ValueError(f"event data exceeds {MAX_EVENT_DATA} bytes")
        object.__setattr__(self, "type", EventType(self.type))

    def check_binding(self) -> None:
        """For self-describing types, the digest must be SHA-256 of the data."""
        if self.type.digest_is_data_hash and hashlib.sha256(self.data).digest() != self.digest:
            raise EventLogReplayError(
                f"event for PCR {self.pcr} ({self.type.label}): digest is not SHA-256 of its data"
            )

    def marshal(self, w: Writer) -> None:
        w.u32(self.pcr).u32(int(self.type))
        w.u32(1).u16(TPM_ALG_SHA256).raw(self.digest)  # TPML_DIGEST_VALUES, one bank
        w.u32(len(self.data)).raw(self.data)

    @classmethod
    def unmarshal(cls, r: Reader) -> "Event":
        pcr = r.u32("event.pcrIndex")
        if pcr >= NUM_PCRS:
            raise FormatError(f"event log: pcrIndex {pcr} out of range")
        etype = r.u32("event.eventType")
        try:
            etype = EventType(etype)
        except ValueError:
            raise FormatError(f"event log: unknown eventType 0x{etype:08X}") from None
        r.expect(1, r.u32("event.digests.count"), "event.digests.count")
        r.expect(TPM_ALG_SHA256, r.u16("event.digests.hashAlg"), "event.digests.hashAlg")
        digest = r.raw(DIGEST_SIZE, "event.digest")
        data = r.blob32(MAX_EVENT_DATA, "event.event")
        return cls(pcr, etype, digest, data)

    def describe(self) -> str:
        """Human-readable event data (text events are shown as text)."""
        try:
            text = self.data.decode("utf-8")
        except UnicodeDecodeError:
            return self.data.hex()
        return text

    def to_json(self) -> dict:
        return {
            "pcr": self.pcr,
            "type": self.type.label,
            "digest": self.digest.hex(),
            "data": self.describe(),
        }


class EventLog:
    """An ordered list of events; ``replay()`` recomputes the PCR bank from zero."""

    def __init__(self, events: list[Event] | None = None) -> None:
        self._events: list[Event] = list(events or [])
        if len(self._events) > MAX_EVENTS:
            raise ValueError(f"event log exceeds {MAX_EVENTS} events")

    def __iter__(self):
        return iter(self._events)

    def __len__(self) -> int:
        return len(self._events)

    def __getitem__(self, i: int) -> Event:
        return self._events[i]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EventLog) and other._events == self._events

    def append(self, event: Event) -> None:
        if len(self._events) >= MAX_EVENTS:
            raise ValueError(f"event log is full ({MAX_EVENTS} events)")
        self._events.append(event)

    def events(self) -> tuple[Event, ...]:
        return tuple(self._events)

    def replay(self) -> PcrBank:
        """Recompute every PCR by extending from zero in log order."""
        bank = PcrBank()
        for e in self._events:
            bank.extend(e.pcr, e.digest)
        return bank

    # -- versioned, bounded marshalling ------------------------------------
    def to_bytes(self) -> bytes:
        w = Writer().u32(EVENTLOG_MAGIC).u16(EVENTLOG_VERSION).u32(len(self._events))
        for e in self._events:
            e.marshal(w)
        return w.bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> "EventLog":
        """Parse a log; raises FormatError on anything malformed."""
        if len(data) > MAX_EVENTLOG_BYTES:
            raise FormatError(f"event log of {len(data)} bytes exceeds {MAX_EVENTLOG_BYTES}")
        r = Reader(data, "event log")
        r.expect(EVENTLOG_MAGIC, r.u32("magic"), "magic")
        r.expect(EVENTLOG_VERSION, r.u16("version"), "version")
        count = r.u32("count")
        if count > MAX_EVENTS:
            raise FormatError(f"event log: {count} events exceeds bound {MAX_EVENTS}")
        events = [Event.unmarshal(r) for _ in range(count)]
        r.end()
        return cls(events)
