"""The capture file (migrate/lab/capture.py): written, read back, and every
malformed input refused with a message that names the offset -- no guess."""

import struct

import pytest

from migrate.lab import capture as cap
from migrate.lab.records import describe, make
from migrate.wire import HEADER, RecordType


def _file(entries):
    out = cap.FILE_HEADER.pack(cap.MAGIC, cap.VERSION, 0, 0)
    for d, a, raw in entries:
        out += cap.ENTRY.pack(d, a, 0, len(raw)) + raw
    return out


HELLO = make(RecordType.HELLO, b"MVMIGRAT" + bytes(8) + b"{}", 0)
ACK = make(RecordType.ROUND_ACK, struct.pack("<II", 0, 4096), 1)


def test_written_and_read_back(tmp_path):
    path = tmp_path / "c.mvcap"
    w = cap.CaptureWriter(path)
    w.write(cap.TO_DEST, cap.FORWARDED, HELLO)
    w.write(cap.TO_SOURCE, cap.INJECTED, ACK)
    w.write(cap.TO_DEST, cap.DROPPED, ACK)
    w.close()
    got = cap.load(path)
    assert [(e.direction, e.action, e.raw) for e in got] == [
        (cap.TO_DEST, cap.FORWARDED, HELLO), (cap.TO_SOURCE, cap.INJECTED, ACK), (cap.TO_DEST, cap.DROPPED, ACK)]
    assert got[1].type_name() == "ROUND_ACK" and got[1].seq == 1
    assert "round 0, 4096 pages" in describe(ACK)


@pytest.mark.parametrize("data, message", [
    (b"", "shorter than its 16-byte header"),
    (b"NOTACAPT" + bytes(8), "not a minivmm capture file"),
    (cap.FILE_HEADER.pack(cap.MAGIC, 2, 0, 0), "version 2"),
    (cap.FILE_HEADER.pack(cap.MAGIC, 1, 1, 0), "reserved"),
    (_file([]) + b"\x01\x00", "truncated entry header at offset 16"),
    (_file([(3, 0, HELLO)]), "direction 3"),
    (_file([(1, 7, HELLO)]), "action 7"),
    (_file([(1, 0, HELLO)])[:-1], "announced"),
    (_file([])[:16] + cap.ENTRY.pack(1, 0, 0, 8) + bytes(8), "length 8 outside"),
    (_file([])[:16] + cap.ENTRY.pack(1, 0, 0, cap.MAX_ENTRY + 1), "outside"),
    (_file([])[:16] + cap.ENTRY.pack(1, 0, 5, 16) + bytes(16), "reserved field 5"),
    # the record's own header must agree with the entry's length
    (_file([(1, 0, HEADER.pack(1, 0, 99, 0) + b"xy")]), "header says 99 body bytes"),
])
def test_malformed_capture_is_refused_by_name(data, message):
    with pytest.raises(cap.CaptureError, match=message):
        cap.parse(data)


def test_a_huge_length_is_refused_before_anything_is_read():
    data = _file([])[:16] + cap.ENTRY.pack(1, 0, 0, 0xFFFFFFFF)
    with pytest.raises(cap.CaptureError, match="outside"):
        cap.parse(data)


def test_the_writer_refuses_what_the_reader_would():
    w_entries = [(0, 0, HELLO), (1, 9, HELLO), (1, 0, b"short")]
    for d, a, raw in w_entries:
        with pytest.raises(ValueError):
            cap.CaptureWriter.write(_Dummy(), d, a, raw)


class _Dummy:
    """Stands in for an open writer: write() must refuse before touching it."""
    _f = None
    _lock = None
