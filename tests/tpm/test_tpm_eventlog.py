"""Event log: marshalling round trip, replay, bounded parsing."""

import hashlib
import struct

import pytest

from tpm.errors import EventLogReplayError, FormatError
from tpm.eventlog import MAX_EVENTS, Event, EventLog, EventType


def _log() -> EventLog:
    data = b'{"a":1}'
    return EventLog(
        [
            Event(9, EventType.VMM_CONFIG, hashlib.sha256(data).digest(), data),
            Event(8, EventType.MANUAL, hashlib.sha256(b"x").digest(), b"by hand"),
            Event(8, EventType.MANUAL, bytes(32), b""),
        ]
    )


def test_round_trip():
    log = _log()
    raw = log.to_bytes()
    assert EventLog.from_bytes(raw) == log
    assert EventLog.from_bytes(raw).to_bytes() == raw  # one encoding


#: The Spec ID event, byte for byte (TCG PC Client PFP, TCG_PCClientPCREvent +
#: TCG_EfiSpecIDEvent), written out by hand from the specification's field list.
SPEC_ID_EVENT = (
    b"\x00\x00\x00\x00" + b"\x03\x00\x00\x00" + bytes(20) + b"\x21\x00\x00\x00"
    + b"Spec ID Event03\x00"
    + b"\x00\x00\x00\x00"  # platformClass 0 (client)
    + b"\x00\x02\x00\x02"  # specVersionMinor 0, Major 2, errata 0, uintnSize 2 (64-bit)
    + b"\x01\x00\x00\x00"  # numberOfAlgorithms 1
    + b"\x0b\x00\x20\x00"  # SHA-256 (0x000B), 32 bytes
    + b"\x00"  # vendorInfoSize 0
)


def test_known_answer_bytes_of_a_one_event_log():
    e = Event(8, EventType.MANUAL, bytes(range(32)), b"hi")
    raw = EventLog([e]).to_bytes()
    assert len(SPEC_ID_EVENT) == 65
    assert raw == SPEC_ID_EVENT + (
        b"\x08\x00\x00\x00"  # pcrIndex 8
        + b"\x10\x00\x56\x4d"  # eventType 0x4D560010 (manual), little-endian
        + b"\x01\x00\x00\x00" + b"\x0b\x00"  # TPML_DIGEST_VALUES: count 1, SHA-256
        + bytes(range(32))
        + b"\x02\x00\x00\x00" + b"hi"  # eventSize 2, event
    )
    assert EventLog([]).to_bytes() == SPEC_ID_EVENT


def test_replay_equals_extending_in_order():
    log = _log()
    bank = log.replay()
    pcr8 = hashlib.sha256(bytes(32) + hashlib.sha256(b"x").digest()).digest()
    pcr8 = hashlib.sha256(pcr8 + bytes(32)).digest()
    assert bank.read(8) == pcr8
    assert bank.read(9) == hashlib.sha256(bytes(32) + hashlib.sha256(b'{"a":1}').digest()).digest()


def test_binding_of_self_describing_events():
    Event(10, EventType.VMM_POLICY, hashlib.sha256(b"{}").digest(), b"{}").check_binding()
    Event(8, EventType.MANUAL, bytes(32), b"anything").check_binding()  # free text
    with pytest.raises(EventLogReplayError):
        Event(10, EventType.VMM_POLICY, bytes(32), b"{}").check_binding()


E1 = 65  # offset of the first TCG_PCR_EVENT2


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda raw: raw[:-1], "truncated"),
        (lambda raw: raw[:E1 + 10], "truncated"),  # cut inside an event
        (lambda raw: raw[:30], "truncated"),  # cut inside the Spec ID event
        (lambda raw: b"", "truncated"),
        (lambda raw: raw + b"\x00", "truncated"),  # trailing byte: a truncated next event
        (lambda raw: raw[:4] + struct.pack("<I", 1) + raw[8:], "EV_NO_ACTION"),
        (lambda raw: raw[:8] + b"\x01" + raw[9:], "digest is not zero"),
        (lambda raw: raw[:32] + b"Spec ID Event02\x00" + raw[48:], "Spec ID Event03"),
        (lambda raw: raw[:53] + b"\x01" + raw[54:], "specVersionMajor"),
        (lambda raw: raw[:56] + struct.pack("<I", 2) + raw[60:], "numberOfAlgorithms"),
        (lambda raw: raw[:60] + struct.pack("<H", 4) + raw[62:], "algorithmId"),
        (lambda raw: raw[:E1] + struct.pack("<I", 24) + raw[E1 + 4:], "pcrIndex 24 out of range"),
        (lambda raw: raw[:E1 + 4] + struct.pack("<I", 7) + raw[E1 + 8:], "unknown eventType"),
        (lambda raw: raw[:E1 + 4] + struct.pack("<I", 3) + raw[E1 + 8:], "unknown eventType"),  # 2nd EV_NO_ACTION
        (lambda raw: raw[:E1 + 8] + struct.pack("<I", 2) + raw[E1 + 12:], "digests.count"),
        (lambda raw: raw[:E1 + 12] + struct.pack("<H", 4) + raw[E1 + 14:], "hashAlg"),
        (lambda raw: raw[:E1 + 8].replace(b"\x09\x00\x00\x00", b"\x00\x00\x00\x09", 1)
         + raw[E1 + 8:], "out of range"),  # big-endian pcrIndex
    ],
)
def test_malformed_logs_raise_format_error(mutate, message):
    raw = _log().to_bytes()
    assert raw[E1:E1 + 4] == b"\x09\x00\x00\x00"  # the first event is in PCR 9
    with pytest.raises(FormatError, match=message):
        EventLog.from_bytes(mutate(raw))


def test_oversized_event_data_rejected_before_reading():
    raw = bytearray(EventLog([Event(8, EventType.MANUAL, bytes(32), b"")]).to_bytes())
    raw[-4:] = struct.pack("<I", 0xFFFFFFFF)
    with pytest.raises(FormatError, match="exceeds"):
        EventLog.from_bytes(bytes(raw))


def test_log_is_bounded():
    log = EventLog()
    for _ in range(MAX_EVENTS):
        log.append(Event(0, EventType.MANUAL, bytes(32), b""))
    with pytest.raises(ValueError):
        log.append(Event(0, EventType.MANUAL, bytes(32), b""))


def test_parser_refuses_more_events_than_its_bound():
    one = EventLog([Event(0, EventType.MANUAL, bytes(32), b"")]).to_bytes()[65:]
    raw = SPEC_ID_EVENT + one * MAX_EVENTS
    assert len(EventLog.from_bytes(raw)) == MAX_EVENTS
    with pytest.raises(FormatError, match=f"more than {MAX_EVENTS} events"):
        EventLog.from_bytes(raw + one)
