"""PAGES records received straight into guest RAM (migrate/landing.py), plain and sealed.

A real Channel / SealedChannel pair over a socketpair: the sender lays a
record out the way the source does (``pages_body``), the receiver hands the
channel a Landing over a RAM buffer.  What must hold: the pages land where
their frame numbers say, byte for byte; a head that names frames outside RAM
(or more than the round announced) is refused before a page byte is read; a
sealed record is decrypted into RAM but counts only if it authenticates, and a
refused head is blamed on its content only if the record is authentic."""

import os
import socket
import threading

import numpy as np
import pytest

from migrate.digest import StreamDigest
from migrate.errors import ProtocolError
from migrate.landing import Landing, runs
from migrate.messages import encode_pages, pages_body
from migrate.secure.channel import TAG, SealedChannel
from migrate.secure.errors import RecordRejected
from migrate.wire import HEADER, MAX_BODY, Channel, RecordType

from tests.migrate.test_secure_channel import session

NPAGES = 64


def pages(pfns, seed=1):
    return np.random.default_rng(seed).integers(0, 256, size=(len(pfns), 4096), dtype=np.uint8)


def body_for(pfns, data):
    buf = bytearray(MAX_BODY[RecordType.PAGES])
    body, d = pages_body(buf, np.asarray(pfns))
    d[:] = data
    return bytes(body)


def pair(sealed):
    a, b = socket.socketpair()
    if not sealed:
        return Channel(a, timeout=2), Channel(b, timeout=2)
    ks, kd = session()
    tx, rx = SealedChannel(a, role="source", timeout=2), SealedChannel(b, role="destination", timeout=2)
    tx.seal(ks)
    rx.seal(kd)
    return tx, rx


def landing(check=lambda pfns: None):
    ram = np.zeros(NPAGES * 4096, dtype=np.uint8)
    return ram, Landing(ram, NPAGES, check)


def test_a_laid_out_body_is_the_encoded_one_and_runs_cover_the_frames():
    pfns = np.array([0, 1, 2, 7, 9, 10])
    data = pages(pfns)
    assert body_for(pfns, data) == b"".join(bytes(memoryview(p).cast("B")) for p in encode_pages(pfns, data))
    assert runs(pfns) == [(0, 3), (7, 8), (9, 11)]
    assert runs(np.arange(5, 9)) == [(5, 9)]


def test_the_digest_over_ram_runs_equals_the_digest_over_the_record():
    pfns = np.array([3, 4, 8])
    data = pages(pfns)
    a, b = StreamDigest(NPAGES), StreamDigest(NPAGES)
    a.update(pfns, data)
    b.update_views(pfns, [memoryview(data[:2]).cast("B"), memoryview(data[2:]).cast("B")])
    assert a.final(b"doc") == b.final(b"doc")


@pytest.mark.parametrize("sealed", [False, True])
def test_pages_land_in_their_frames_and_the_rest_of_ram_is_untouched(sealed):
    tx, rx = pair(sealed)
    ram, sink = landing()
    pfns = np.array([2, 3, 4, 10, 63])
    data = pages(pfns)
    tx.send(RecordType.PAGES, body_for(pfns, data))
    tx.send(RecordType.ROUND_END, b"\0" * 8)
    rec = rx.recv(sink=sink)
    assert rec.type is RecordType.PAGES and rec.placed and list(sink.pfns) == list(pfns)
    got = ram.reshape(-1, 4096)
    assert (got[pfns] == data).all()
    others = np.setdiff1d(np.arange(NPAGES), pfns)
    assert not got[others].any()
    assert rx.recv(sink=sink).type is RecordType.ROUND_END     # the framing holds after it
    assert rx.bytes_received == tx.bytes_sent


@pytest.mark.parametrize("sealed", [False, True])
def test_a_frame_outside_ram_is_refused_before_a_page_byte_lands(sealed):
    tx, rx = pair(sealed)
    ram, sink = landing()
    small = Landing(ram, 8, lambda pfns: None)                  # RAM of 8 frames: 9 is outside
    tx.send(RecordType.PAGES, body_for([1, 9], pages([1, 9])))
    with pytest.raises(ProtocolError, match="outside RAM"):
        rx.recv(sink=small)
    assert not ram.any()


@pytest.mark.parametrize("sealed", [False, True])
def test_the_check_refuses_a_round_overflow_before_the_pages_are_read(sealed):
    tx, rx = pair(sealed)

    def room(pfns):
        raise ProtocolError("round 0 carries more than the 1 pages it announced")
    ram, sink = landing(room)
    tx.send(RecordType.PAGES, body_for([5, 6], pages([5, 6])))
    with pytest.raises(ProtocolError, match="more than"):
        rx.recv(sink=sink)
    assert not ram.any()


def sealed_wire(pfns, data):
    """The bytes a sealed channel puts on the wire for one PAGES record, and the receiver."""
    tx, rx = pair(True)
    tx.send(RecordType.PAGES, body_for(pfns, data))
    raw = bytearray()
    while len(raw) < HEADER.size or len(raw) < HEADER.size + HEADER.unpack(raw[:HEADER.size])[2]:
        raw += rx.sock.recv(1 << 22)
    return raw, rx


@pytest.mark.parametrize("where", ["head", "page", "tag"])
def test_a_modified_sealed_record_is_rejected_and_counts_for_nothing(where):
    pfns = np.array([1, 2, 3])
    raw, rx = sealed_wire(pfns, pages(pfns))
    at = {"head": HEADER.size + 2, "page": HEADER.size + 4 + 12 + 5000, "tag": len(raw) - 1}[where]
    raw[at] ^= 0x40
    a, b = socket.socketpair()
    rx.sock = b
    a.sendall(raw)
    ram, sink = landing()
    with pytest.raises((RecordRejected, ProtocolError)) as err:
        rx.recv(sink=sink)
    # A flipped head may name other frames; whatever it names, the record is a forgery.
    assert isinstance(err.value, RecordRejected), err.value


def test_an_authentic_head_naming_frames_outside_ram_is_a_protocol_error_not_a_forgery():
    raw, rx = sealed_wire(np.array([1, 9]), pages([1, 9]))
    a, b = socket.socketpair()
    rx.sock = b
    a.sendall(raw)
    ram = np.zeros(8 * 4096, dtype=np.uint8)
    with pytest.raises(ProtocolError, match="outside RAM") as err:
        rx.recv(sink=Landing(ram, 8, lambda pfns: None))
    assert not isinstance(err.value, RecordRejected)


def test_sealed_records_of_every_size_round_trip_into_ram():
    for seed, n in enumerate((1, 7, 64)):
        tx, rx = pair(True)
        ram, sink = landing()
        pfns = np.sort(np.random.default_rng(seed).choice(NPAGES, size=n, replace=False))
        data = np.frombuffer(os.urandom(n * 4096), dtype=np.uint8).reshape(n, 4096)
        t = threading.Thread(target=tx.send, args=(RecordType.PAGES, body_for(pfns, data)))
        t.start()                                       # (more than a socketpair buffers)
        assert rx.recv(sink=sink).placed
        t.join()
        assert (ram.reshape(-1, 4096)[pfns] == data).all()
        assert rx.bytes_received == tx.bytes_sent and tx.overhead == TAG


def test_a_sealed_records_digest_folds_its_aead_tag_the_same_on_both_sides():
    """Sealed, a PAGES record's AES-GCM tag stands for its pages in the
    completeness digest (kind 3): the tag the sender sealed with is the one
    the receiver authenticated, so the two digests agree; and a sealed digest
    is never a plain one (another kind, another tag)."""
    tx, rx = pair(True)
    ram, sink = landing()
    pfns = np.array([4, 5, 9])
    data = pages(pfns)
    tx.send(RecordType.PAGES, body_for(pfns, data))
    rec = rx.recv(sink=sink)
    assert len(rec.tag) == TAG and rec.tag == tx.sent_tag
    src, dst, plain = StreamDigest(NPAGES), StreamDigest(NPAGES), StreamDigest(NPAGES)
    src.update(pfns, data, tag=tx.sent_tag)
    dst.update_views(pfns, rec.placed, tag=rec.tag)
    plain.update(pfns, data)
    assert src.final(b"d") == dst.final(b"d") != plain.final(b"d")
    other = StreamDigest(NPAGES)
    other.update(pfns, data, tag=bytes(TAG))
    assert other.final(b"d") != src.final(b"d")


def test_a_plain_channel_gives_no_tag():
    tx, rx = pair(False)
    ram, sink = landing()
    tx.send(RecordType.PAGES, body_for([1], pages([1])))
    assert tx.sent_tag == b"" and rx.recv(sink=sink).tag == b""


@pytest.mark.parametrize("sealed", [False, True])
def test_a_step_hook_sees_the_same_head_of_a_placed_record_on_both_sides(sealed):
    """A step hook (the TUI's record view) shows the first HEAD_BYTES of each body.
    A placed PAGES record's body is only its head (count, frame numbers); the rest
    is in RAM, run by run: the receiver's step shows the head followed by the first
    run's pages, the bytes the sender's step showed (issue 19: the head taken from
    another run, or left empty, passed every test)."""
    from migrate.steps import HEAD_BYTES
    tx, rx = pair(sealed)
    sent, got = [], []
    tx.on_step, rx.on_step = sent.append, got.append
    ram, sink = landing()
    pfns = np.array([2, 3, 10, 63])                       # three runs
    body = body_for(pfns, pages(pfns))
    tx.send(RecordType.PAGES, body)
    assert rx.recv(sink=sink).placed
    assert sent[0].head == got[0].head == body[:HEAD_BYTES]
    assert (got[0].direction, got[0].rtype) == ("recv", "PAGES")
