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


def test_layout_is_tcg_pcr_event2_order_big_endian():
    e = Event(8, EventType.MANUAL, bytes(range(32)), b"hi")
    raw = EventLog([e]).to_bytes()
    header, body = raw[:10], raw[10:]
    assert header == b"MVEL" + b"\x00\x01" + b"\x00\x00\x00\x01"
    assert body == (
        struct.pack(">II", 8, 0x4D560010)
        + struct.pack(">IH", 1, 0x000B)
        + bytes(range(32))
        + struct.pack(">I", 2)
        + b"hi"
    )


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


@pytest.mark.parametrize(
    "mutate",
    [
        lambda raw: raw[:-1],  # truncated
        lambda raw: raw + b"\x00",  # trailing
        lambda raw: b"XXXX" + raw[4:],  # magic
        lambda raw: raw[:4] + b"\x00\x02" + raw[6:],  # version
        lambda raw: raw[:6] + struct.pack(">I", MAX_EVENTS + 1) + raw[10:],  # count bound
        lambda raw: raw[:6] + struct.pack(">I", 4) + raw[10:],  # count > present
        lambda raw: raw[:10] + struct.pack(">I", 24) + raw[14:],  # pcr index
        lambda raw: raw[:14] + struct.pack(">I", 7) + raw[18:],  # event type
    ],
)
def test_malformed_logs_raise_format_error(mutate):
    with pytest.raises(FormatError):
        EventLog.from_bytes(mutate(_log().to_bytes()))


def test_oversized_event_data_rejected_before_reading():
    raw = bytearray(EventLog([Event(8, EventType.MANUAL, bytes(32), b"")]).to_bytes())
    raw[-4:] = struct.pack(">I", 0xFFFFFFFF)
    with pytest.raises(FormatError, match="exceeds"):
        EventLog.from_bytes(bytes(raw))


def test_log_is_bounded():
    log = EventLog()
    for _ in range(MAX_EVENTS):
        log.append(Event(0, EventType.MANUAL, bytes(32), b""))
    with pytest.raises(ValueError):
        log.append(Event(0, EventType.MANUAL, bytes(32), b""))
