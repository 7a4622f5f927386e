"""The record layer and message bodies: bounds before reads, sequence, types, timeouts."""

import socket
import struct
import threading
import time

import numpy as np
import pytest

from migrate.errors import ConnectionLost, PeerTimeout, ProtocolError
from migrate.messages import (Digest, Hello, Resumed, RoundMark, Welcome, decode_pages, decode_zero_pages,
                              encode_pages, encode_zero_pages)
from migrate.wire import (FLAG_OPTIONAL, HEADER, MAGIC, MAX_BODY, VERSION, Channel, RecordType, parse_address)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    ca, cb = Channel(a, timeout=2.0), Channel(b, timeout=2.0)
    yield ca, cb
    ca.close()
    cb.close()


def raw(rtype, body=b"", seq=0, flags=0, length=None):
    return HEADER.pack(rtype, flags, len(body) if length is None else length, seq) + body


def test_round_trip_and_sequence(pair):
    a, b = pair
    a.send(RecordType.ROUND_BEGIN, RoundMark(3, 7).encode())
    a.send(RecordType.COMMIT)
    r1, r2 = b.recv(), b.recv()
    assert (r1.type, r1.seq, RoundMark.decode(r1.body, "x")) == (RecordType.ROUND_BEGIN, 0, RoundMark(3, 7))
    assert (r2.type, r2.seq, r2.body) == (RecordType.COMMIT, 1, b"")
    assert a.bytes_sent == b.bytes_received == 2 * HEADER.size + 8


@pytest.mark.parametrize("data, match", [
    (raw(0), "INVALID"),
    (raw(RecordType.COMMIT, flags=0x8), "unknown flags"),
    (raw(RecordType.COMMIT, seq=5), "out of order"),
    (raw(99), "unknown mandatory record type 99"),
    (raw(RecordType.DIGEST, length=41), "exceeds its bound"),
    (raw(RecordType.PAGES, length=MAX_BODY[RecordType.PAGES] + 1), "exceeds its bound"),
    (raw(RecordType.STATE, length=0xFFFFFFFF), "exceeds its bound"),
])
def test_bad_headers_are_rejected_before_the_body_is_read(pair, data, match):
    a, b = pair
    a.sock.sendall(data)             # no body follows: a bound check must not wait for it
    t0 = time.monotonic()
    with pytest.raises(ProtocolError, match=match):
        b.recv()
    assert time.monotonic() - t0 < 1.0


def test_unknown_optional_record_is_skipped(pair):
    a, b = pair
    a.sock.sendall(raw(77, b"hello", seq=0, flags=FLAG_OPTIONAL) + raw(RecordType.COMMIT, seq=1))
    rec = b.recv()
    assert rec.type is RecordType.COMMIT and b.skipped == 1


def test_silent_peer_times_out_in_bounded_time():
    a, b = socket.socketpair()
    ch = Channel(b, timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(PeerTimeout, match="0 of 16 bytes"):
        ch.recv()
    assert time.monotonic() - t0 < 2.0
    a.close()


def test_trickling_peer_cannot_stretch_a_record_past_the_deadline():
    a, b = socket.socketpair()
    ch = Channel(b, timeout=0.5)
    stop = threading.Event()

    def trickle():
        data = raw(RecordType.STATE, b"x" * 1000)
        for byte in data:
            if stop.is_set():
                return
            a.send(bytes([byte]))
            time.sleep(0.05)
    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    t0 = time.monotonic()
    with pytest.raises(PeerTimeout):
        ch.recv()
    assert time.monotonic() - t0 < 2.0
    stop.set()
    t.join()
    a.close()


def test_closed_peer_is_connection_lost(pair):
    a, b = pair
    a.sock.sendall(raw(RecordType.STATE, b"abc")[:-1])
    a.sock.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionLost, match="closed"):
        b.recv()


def test_send_refuses_invalid_or_oversized(pair):
    a, _ = pair
    with pytest.raises(ValueError):
        a.send(RecordType.INVALID)
    with pytest.raises(ValueError):
        a.send(RecordType.DIGEST, bytes(41))


# ------------------------------------------------------------------ messages
def test_hello_and_welcome():
    h = Hello(64 << 20, {"vm": "demo"})
    assert Hello.decode(h.encode()) == h
    body = h.encode()
    with pytest.raises(ProtocolError, match="magic"):
        Hello.decode(b"XXXXXXXX" + body[8:])
    # 1: digest v1; 2: digest v2 with a GMAC for sealed PAGES too (migrate/digest.py)
    for other in (1, 2, VERSION + 1):
        with pytest.raises(ProtocolError, match=f"version {other}"):
            Hello.decode(MAGIC + struct.pack("<HHI", other, 0, 16 << 20) + b"{}")
    for ram in (0, 8 << 20, (16 << 20) + 1, 512 << 20):
        with pytest.raises(ProtocolError, match="guest RAM"):
            Hello.decode(MAGIC + struct.pack("<HHI", VERSION, 0, ram) + b"{}")
    with pytest.raises(ProtocolError, match="JSON"):
        Hello.decode(body[:16] + b"[1]")
    with pytest.raises(ProtocolError, match="too short"):
        Hello.decode(body[:10])
    w = Welcome(1, "busy: try later")
    assert Welcome.decode(w.encode()) == w
    with pytest.raises(ProtocolError, match="status 9"):
        Welcome.decode(MAGIC + struct.pack("<HH", VERSION, 9))


def test_pages_bodies():
    pfns = np.array([1, 5, 9])
    data = np.arange(3 * 4096, dtype=np.uint32).astype(np.uint8).reshape(3, 4096)
    got_pfns, got = decode_pages(b"".join(encode_pages(pfns, data)), 16)
    assert list(got_pfns) == [1, 5, 9] and np.array_equal(got, data)
    with pytest.raises(ProtocolError, match="outside RAM"):
        decode_pages(b"".join(encode_pages(pfns, data)), 9)
    with pytest.raises(ProtocolError, match="strictly increasing"):
        decode_pages(b"".join(encode_pages(np.array([5, 1, 9]), data)), 16)
    with pytest.raises(ProtocolError, match="need"):
        decode_pages(b"".join(encode_pages(pfns, data))[:-1], 16)
    with pytest.raises(ProtocolError, match="count 0"):
        decode_pages(struct.pack("<I", 0), 16)
    assert list(decode_zero_pages(encode_zero_pages(np.array([0, 2, 3])), 4)) == [0, 2, 3]
    with pytest.raises(ProtocolError, match="strictly increasing"):
        decode_zero_pages(encode_zero_pages(np.array([2, 2])), 4)
    with pytest.raises(ProtocolError, match="count 100000"):
        decode_zero_pages(struct.pack("<I", 100000), 4)


def test_small_records():
    assert Digest.decode(Digest(12, bytes(range(32))).encode()) == Digest(12, bytes(range(32)))
    with pytest.raises(ProtocolError):
        Digest.decode(bytes(39))
    r = Resumed(123, 4.5, "boot")
    assert Resumed.decode(r.encode()) == r
    with pytest.raises(ProtocolError, match="bad field"):
        Resumed.decode(b'{"vclock": "x", "clock": 1, "boot_id": "b"}')
    with pytest.raises(ProtocolError):
        RoundMark.decode(bytes(7), "ROUND_END")


def test_parse_address():
    assert parse_address("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_address("[::1]:8000") == ("::1", 8000)
    for bad in ("nohost", ":80", "h:x", "h:70000"):
        with pytest.raises(ValueError):
            parse_address(bad)
