"""The measurement event log.

A PCR value alone says *that* something changed, not *what*.  The event log records
every extend (PCR index, event type, digest, event data) so that a verifier can
*replay* it — recompute every PCR from zero — and compare the result with the PCR
digest the TPM signed.  The log itself is not trusted: it is only believed after it
replays to a signed quote (TCG PC Client Platform Firmware Profile, "Event Log").

The bytes are a TCG PC Client *crypto-agile* event log (TCG PC Client Platform
Firmware Profile, "Event Logging"), so ``tpm2_eventlog`` prints and replays it.
Little-endian throughout (the log is written by the platform, not the TPM)::

    TCG_PCClientPCREvent  (SHA-1 format header: the Spec ID event, not extended)
        u32  pcrIndex       0
        u32  eventType      EV_NO_ACTION (3)
        20   digest         zero
        u32  eventSize      33
        TCG_EfiSpecIDEvent
            16  signature          "Spec ID Event03\0"
            u32 platformClass      0 (client)
            u8  specVersionMinor   0
            u8  specVersionMajor   2
            u8  specErrata         0
            u8  uintnSize          2 (UINTN is 64-bit)
            u32 numberOfAlgorithms 1
            u16 algorithmId 0x000B (SHA-256) | u16 digestSize 32
            u8  vendorInfoSize     0
    then, until the end of the bytes, TCG_PCR_EVENT2 records:
        u32  pcrIndex       < 24
        u32  eventType      one of EventType below
        TPML_DIGEST_VALUES  u32 count = 1 | u16 hashAlg 0x000B | 32 digest
        u32  eventSize      <= 16384
        eventSize bytes     event data

The event types are minivmm's own, in a vendor-looking range ("MV" = 0x4D56)
that the TCG registry does not use (documented in docs/tpm.md);
``tpm2_eventlog`` prints them as "Unknown event type" and replays them like any
other.  The parser refuses every other type, including a second EV_NO_ACTION.

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
# TCG PC Client PFP constants.
EV_NO_ACTION = 0x00000003
SPEC_ID_SIGNATURE = b"Spec ID Event03\0"
SHA1_DIGEST_SIZE = 20
SPEC_ID_EVENT_SIZE = 16 + 4 + 4 + 4 + 4 + 1  # with one algorithm, no vendor info: 33
SPEC_ID_HEADER_SIZE = 4 + 4 + SHA1_DIGEST_SIZE + 4 + SPEC_ID_EVENT_SIZE  # 65
EVENT2_OVERHEAD = 4 + 4 + 4 + 2 + DIGEST_SIZE + 4  # 50 bytes before the event data
MAX_EVENTLOG_BYTES = SPEC_ID_HEADER_SIZE + MAX_EVENTS * (EVENT2_OVERHEAD + MAX_EVENT_DATA)


class EventType(IntEnum):
    """Event types.  TCG assigns small values to firmware events; these live in a
    vendor-looking range ("MV" = 0x4D56) so they can never be confused with them."""

    VMM_CODE = 0x4D560001  #: data = code manifest; digest = SHA-256(data)
    VMM_CONFIG = 0x4D560002  #: data = canonical config JSON; digest = SHA-256(data)
    VMM_POLICY = 0x4D560003  #: data = canonical protection-policy JSON; digest = SHA-256(data)
    VMM_TRUST = 0x4D560004  #: data = canonical JSON of the VMM's trust settings; digest = SHA-256(data)
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
        return self in (EventType.VMM_CODE, EventType.VMM_CONFIG, EventType.VMM_POLICY, EventType.VMM_TRUST)


_LABELS = {
    EventType.VMM_CODE: "vmm-code",
    EventType.VMM_CONFIG: "vmm-config",
    EventType.VMM_POLICY: "vmm-policy",
    EventType.VMM_TRUST: "vmm-trust",
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
        """TCG_PCR_EVENT2 (``w`` must be a little-endian Writer)."""
        w.u32(self.pcr).u32(int(self.type))
        w.u32(1).u16(TPM_ALG_SHA256).raw(self.digest)  # TPML_DIGEST_VALUES, one bank
        w.blob32(self.data, MAX_EVENT_DATA)

    @classmethod
    def unmarshal(cls, r: Reader) -> "Event":
        """Parse one TCG_PCR_EVENT2 (``r`` must be a little-endian Reader)."""
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

    # -- TCG crypto-agile log, bounded marshalling --------------------------
    def to_bytes(self) -> bytes:
        """The TCG PC Client crypto-agile log: Spec ID event, then TCG_PCR_EVENT2s."""
        w = Writer(little_endian=True)
        _spec_id_event(w)
        for e in self._events:
            e.marshal(w)
        return w.bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> "EventLog":
        """Parse a log; raises FormatError on anything malformed."""
        if not isinstance(data, (bytes, bytearray)):
            raise FormatError("event log must be bytes")
        if len(data) > MAX_EVENTLOG_BYTES:
            raise FormatError(f"event log of {len(data)} bytes exceeds {MAX_EVENTLOG_BYTES}")
        r = Reader(data, "event log", little_endian=True)
        _check_spec_id_event(r)
        events = []
        while r.remaining:
            if len(events) == MAX_EVENTS:
                raise FormatError(f"event log: more than {MAX_EVENTS} events")
            events.append(Event.unmarshal(r))
        return cls(events)


def _spec_id_event(w: Writer) -> None:
    """The first entry: a TCG_PCClientPCREvent (SHA-1 log format) of type EV_NO_ACTION
    whose data is the TCG_EfiSpecIDEvent announcing a crypto-agile, SHA-256-only log."""
    w.u32(0).u32(EV_NO_ACTION).raw(bytes(SHA1_DIGEST_SIZE)).u32(SPEC_ID_EVENT_SIZE)
    w.raw(SPEC_ID_SIGNATURE).u32(0)  # platformClass: client
    w.u8(0).u8(2).u8(0).u8(2)  # specVersionMinor, specVersionMajor, specErrata, uintnSize
    w.u32(1).u16(TPM_ALG_SHA256).u16(DIGEST_SIZE)  # numberOfAlgorithms, digestSizes[0]
    w.u8(0)  # vendorInfoSize


def _check_spec_id_event(r: Reader) -> None:
    r.expect(0, r.u32("specId.pcrIndex"), "specId.pcrIndex")
    r.expect(EV_NO_ACTION, r.u32("specId.eventType"), "specId.eventType (EV_NO_ACTION)")
    if r.raw(SHA1_DIGEST_SIZE, "specId.digest") != bytes(SHA1_DIGEST_SIZE):
        raise FormatError("event log: Spec ID event digest is not zero")
    r.expect(SPEC_ID_EVENT_SIZE, r.u32("specId.eventSize"), "specId.eventSize")
    if r.raw(16, "specId.signature") != SPEC_ID_SIGNATURE:
        raise FormatError("event log: not a crypto-agile log (no 'Spec ID Event03' first)")
    r.expect(0, r.u32("specId.platformClass"), "specId.platformClass")
    r.expect(0, r.u8("specId.specVersionMinor"), "specId.specVersionMinor")
    r.expect(2, r.u8("specId.specVersionMajor"), "specId.specVersionMajor")
    r.expect(0, r.u8("specId.specErrata"), "specId.specErrata")
    r.expect(2, r.u8("specId.uintnSize"), "specId.uintnSize")
    r.expect(1, r.u32("specId.numberOfAlgorithms"), "specId.numberOfAlgorithms (SHA-256 only)")
    r.expect(TPM_ALG_SHA256, r.u16("specId.algorithmId"), "specId.algorithmId")
    r.expect(DIGEST_SIZE, r.u16("specId.digestSize"), "specId.digestSize")
    r.expect(0, r.u8("specId.vendorInfoSize"), "specId.vendorInfoSize")
