"""The record layer's documented format, number by number (migrate/wire.py).

The record-type numbers and each type's body bound are the wire format two VMMs of
different builds must agree on: they are read here from the tables in docs/migration.md
(types 1-13) and docs/protocol.md (the secure types 14-18) and compared with the code, and
the bounds are then exercised at their edge on a real channel (the bound itself is read, one
byte more is refused from the header alone).  Raw headers are built from literal numbers,
not from the module's constants, so a constant changed in the code cannot follow itself
into the test.
"""

import re
import socket
import struct
import threading
from pathlib import Path

import pytest

from migrate.errors import ProtocolError
from migrate.messages import Hello, Welcome
from migrate.wire import MAX_BODY, Channel, Record, RecordType

DOCS = Path(__file__).resolve().parents[2] / "docs"
_HEAD = struct.Struct("<HHIQ")          # type, flags, length, seq: written out, not imported


def _bound(text: str) -> int:
    """``1 MiB + 1028``, ``32 + 256 KiB``, ``exactly 64`` -> bytes."""
    expr = text.replace("exactly", "").replace("MiB", "* 1048576").replace("KiB", "* 1024")
    assert re.fullmatch(r"[0-9 +*]+", expr), text
    return eval(expr)                   # digits, '+' and '*' only (checked above)


def documented() -> dict[str, tuple[int, int]]:
    """name -> (type number, bound) from the two documents' message tables."""
    rows = {}
    for doc in ("migration.md", "protocol.md"):
        in_table = False
        for line in (DOCS / doc).read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[:2] == ["type", "name"]:
                in_table, bound_col = True, cells.index("bound")
                continue
            if not line.startswith("|"):
                in_table = False
            if not in_table or not re.fullmatch(r"[0-9]+", cells[0]) or cells[bound_col] == "as plain":
                continue
            rows[cells[1]] = (int(cells[0]), _bound(cells[bound_col]))
    return rows


DOCUMENTED = documented()


def test_every_record_type_is_documented_with_its_number_and_bound():
    assert len(DOCUMENTED) == 18
    assert {t.name: t.value for t in RecordType if t.value} == {n: v for n, (v, _) in DOCUMENTED.items()}
    assert RecordType.INVALID.value == 0 and len(set(RecordType)) == 19      # no aliases
    assert {t.name: b for t, b in MAX_BODY.items()} == {n: b for n, (_, b) in DOCUMENTED.items()}


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, Channel(b, timeout=5.0)
    a.close()
    b.close()


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_one_byte_past_the_documented_bound_is_refused_from_the_header(pair, name):
    a, ch = pair
    number, bound = DOCUMENTED[name]
    a.sendall(_HEAD.pack(number, 0, bound + 1, 0))        # no body: refused without waiting for one
    with pytest.raises(ProtocolError, match="exceeds its bound"):
        ch.recv()


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_a_body_of_exactly_the_documented_bound_is_read(pair, name):
    a, ch = pair
    number, bound = DOCUMENTED[name]
    body = bytes(range(256)) * (bound // 256) + bytes(bound % 256)
    writer = threading.Thread(target=a.sendall, args=(_HEAD.pack(number, 0, bound, 0) + body,))
    writer.start()
    try:
        rec = ch.recv()
    finally:
        writer.join()
    assert (rec.type.name, rec.seq, rec.flags, bytes(rec.body)) == (name, 0, 0, body)


def test_only_flag_bit_0_means_optional(pair):
    a, ch = pair
    a.sendall(_HEAD.pack(77, 1, 3, 0) + b"abc" + _HEAD.pack(9, 0, 0, 1))
    rec = ch.recv()
    assert (rec.type, rec.seq, ch.skipped) == (RecordType.PREPARED, 1, 1)
    a.sendall(_HEAD.pack(77, 2, 0, 2))
    with pytest.raises(ProtocolError, match="unknown flags 0x2"):
        ch.recv()


def test_sixty_four_unknown_optional_records_are_skipped_and_no_more(pair):
    a, ch = pair
    a.sendall(b"".join(_HEAD.pack(77, 1, 0, seq) for seq in range(64)) + _HEAD.pack(9, 0, 0, 64))
    assert ch.recv().seq == 64 and ch.skipped == 64
    a.sendall(_HEAD.pack(77, 1, 0, 65))
    with pytest.raises(ProtocolError, match="unknown optional record type 77"):
        ch.recv()


def test_hello_and_welcome_carry_protocol_version_3_after_the_magic():
    """docs/migration.md: protocol version 3 (1 had the completeness digest v1; 2 folded a
    GMAC for sealed PAGES records too, where 3 folds the record's AEAD tag)."""
    hello = Hello(16 << 20, {}).encode()
    assert hello[:12] == b"MVMIGRAT" + struct.pack("<HH", 3, 0)
    assert Welcome(0).encode()[:12] == b"MVMIGRAT" + struct.pack("<HH", 3, 0)


def test_a_record_is_immutable_and_has_no_flags_unless_given():
    rec = Record(RecordType.PREPARED, b"", 0)
    assert rec.flags == 0
    with pytest.raises(AttributeError):
        rec.seq = 1


def test_a_sent_record_has_the_documented_header_and_numbered_steps():
    a, b = socket.socketpair()
    try:
        ch, steps = Channel(a, timeout=5.0), []
        ch.on_step = steps.append
        ch.send(RecordType.COMMIT)
        ch.send(RecordType.ROUND_ACK, b"\x01\x00\x00\x00", b"\x02\x00\x00\x00")
        got = b.recv(64)
        assert got == (_HEAD.pack(10, 0, 0, 0) + _HEAD.pack(13, 0, 8, 1) + bytes([1, 0, 0, 0, 2, 0, 0, 0]))
        b.sendall(_HEAD.pack(9, 0, 0, 0) + _HEAD.pack(12, 0, 3, 1) + b"why")
        ch.recv()
        ch.recv()
        assert [(s.n, s.direction, s.rtype, s.length, s.seq) for s in steps] == \
            [(1, "send", "COMMIT", 0, 0), (2, "send", "ROUND_ACK", 8, 1), (3, "recv", "PREPARED", 0, 0),
             (4, "recv", "ABORT", 3, 1)]
    finally:
        a.close()
        b.close()


def test_a_record_the_socket_takes_in_pieces_arrives_whole():
    """Small socket buffers and a slow reader: sendmsg takes each record a piece at a
    time, across the boundaries of its parts; the reader gets every byte, in order."""
    a, b = socket.socketpair()
    for s, opt in ((a, socket.SO_SNDBUF), (b, socket.SO_RCVBUF)):
        s.setsockopt(socket.SOL_SOCKET, opt, 4096)
    parts = [bytes([i]) * n for i, n in enumerate((5000, 1, 70_000, 3, 4096 * 20))]
    got = bytearray()
    total = 16 + sum(map(len, parts))

    def reader():
        while len(got) < total:
            chunk = b.recv(1000)
            if not chunk:
                return
            got.extend(chunk)
    t = threading.Thread(target=reader)
    t.start()
    try:
        Channel(a, timeout=30.0).send(RecordType.STATE, *parts)
    finally:
        t.join(60)
        a.close()
        b.close()
    assert bytes(got) == _HEAD.pack(7, 0, total - 16, 0) + b"".join(parts)


def test_a_peer_that_never_reads_cannot_hold_a_send_and_nothing_follows():
    from migrate.errors import ConnectionLost, PeerTimeout
    a, b = socket.socketpair()
    try:
        ch, out = Channel(a, timeout=0.3), []

        def send():
            try:
                ch.send(RecordType.STATE, bytes(1 << 20))      # far more than the socket buffers
            except Exception as exc:                            # noqa: BLE001 - asserted below
                out.append(exc)
        t = threading.Thread(target=send, daemon=True)
        t.start()
        t.join(60)                                              # a bound on the test, not a timing
        assert not t.is_alive(), "the send ignored its timeout"
        assert isinstance(out[0], PeerTimeout) and "did not take a STATE record" in str(out[0])
        with pytest.raises(ConnectionLost, match="nothing more is sent after a failed send"):
            ch.send(RecordType.ABORT, b"late")
    finally:
        a.close()
        b.close()


def test_an_unknown_optional_record_as_large_as_the_largest_bound_is_skipped(pair):
    a, ch = pair
    largest = 8 << 20                                       # KEY_RELEASE's bound
    writer = threading.Thread(target=a.sendall, args=(_HEAD.pack(77, 1, largest, 0) + bytes(largest)
                                                      + _HEAD.pack(9, 0, 0, 1),))
    writer.start()
    try:
        assert ch.recv().type is RecordType.PREPARED
    finally:
        writer.join()
    a.sendall(_HEAD.pack(77, 1, largest + 1, 2))
    with pytest.raises(ProtocolError, match="unknown optional record type 77"):
        ch.recv()


def test_pending_abort_peeks_at_a_whole_abort_header_only(pair):
    """The source's last look before COMMIT: true only when a complete ABORT header is
    waiting, and the record stays there for recv()."""
    a, ch = pair
    assert ch.pending_abort() is False                      # nothing waiting
    a.sendall(_HEAD.pack(12, 0, 2, 0)[:15])
    assert ch.pending_abort() is False                      # half a header
    a.sendall(_HEAD.pack(12, 0, 2, 0)[15:] + b"no")
    assert ch.pending_abort() is True
    rec = ch.recv()
    assert (rec.type, bytes(rec.body)) == (RecordType.ABORT, b"no")
    a.sendall(_HEAD.pack(9, 0, 0, 1))
    assert ch.pending_abort() is False                      # another record waiting
    assert ch.recv().type is RecordType.PREPARED
    a.sendall(_HEAD.pack(1, 12, 0, 2))                      # flags 12 (ABORT's number): not ABORT
    assert ch.pending_abort() is False
    ch.sock.close()
    assert ch.pending_abort() is False                      # a dead socket: COMMIT's send will tell


def test_recv_narrowed_by_type_and_by_bound_before_the_body(pair):
    a, ch = pair
    a.sendall(_HEAD.pack(9, 0, 0, 0))
    assert ch.recv(only=frozenset({RecordType.PREPARED})).type is RecordType.PREPARED
    a.sendall(_HEAD.pack(12, 0, 3, 1) + b"why")
    with pytest.raises(ProtocolError, match="unexpected ABORT record"):
        ch.recv(only=frozenset({RecordType.PREPARED}))
    a2, b2 = socket.socketpair()
    try:
        narrow = Channel(b2, timeout=5.0)
        a2.sendall(_HEAD.pack(1, 0, 100, 0) + bytes(100))
        assert len(narrow.recv(max_body=100).body) == 100
        a2.sendall(_HEAD.pack(1, 0, 101, 1))                        # no body: refused from the header
        with pytest.raises(ProtocolError, match="HELLO record of 101 bytes exceeds its bound 100"):
            narrow.recv(max_body=100)
        a2.sendall(_HEAD.pack(8, 0, 41, 1))                         # the type's own bound still holds
        with pytest.raises(ProtocolError, match="DIGEST record of 41 bytes exceeds its bound 40"):
            narrow.recv(max_body=1000)
    finally:
        a2.close()
        b2.close()


def test_a_receive_whose_time_is_exactly_up_is_a_timeout(pair):
    """The clock seam (``Channel.now``) at the deadline itself: a timeout, never a
    non-blocking read that reports a lost connection instead."""
    from migrate.errors import PeerTimeout
    a, ch = pair
    ch.timeout, ch.now = 0.0, lambda: 100.0
    with pytest.raises(PeerTimeout, match="0 of 16 bytes"):
        ch.recv()


@pytest.mark.parametrize("text, address", [
    ("[::1]:65535", ("::1", 65535)), ("host]:0", ("host]", 0)), ("[host:1", ("[host", 1)),
])
def test_addresses_at_their_edges(text, address):
    from migrate.wire import parse_address
    assert parse_address(text) == address


def test_a_port_past_65535_is_refused():
    from migrate.wire import parse_address
    with pytest.raises(ValueError, match="port out of range"):
        parse_address("127.0.0.1:65536")


def test_send_takes_type_numbers_and_refuses_unknown_ones_as_value_errors(pair):
    a, ch = pair
    sender = Channel(a, timeout=5.0)
    sender.send(9)                                  # a plain number is a record type too
    assert ch.sock.recv(16) == _HEAD.pack(9, 0, 0, 0)
    for bad in (0, 99):
        with pytest.raises(ValueError):
            sender.send(bad)


def test_a_tcp_channel_turns_nagle_off_and_close_closes():
    """Small control records (PREPARED, COMMIT) must not wait for Nagle's timer."""
    server = socket.create_server(("127.0.0.1", 0))
    try:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        ch = Channel(client, timeout=5.0)
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        ch.close()
        assert client.fileno() == -1
        assert peer.recv(1) == b""                          # the peer sees the end
        peer.close()
    finally:
        server.close()


def test_a_body_cut_short_times_out_saying_how_much_arrived():
    """A peer that sends 40 bytes of a 100-byte ABORT body and then nothing: the
    read times out, and the error says how much of the body arrived (issue 19: the
    count, going the wrong way, passed every test).  The 40 bytes are in the socket
    before the read starts: no timing."""
    from migrate.errors import PeerTimeout
    a, b = socket.socketpair()
    try:
        b.sendall(_HEAD.pack(12, 0, 100, 0) + b"x" * 40)         # 12: ABORT
        with pytest.raises(PeerTimeout, match=re.escape("timed out waiting for a ABORT body (40 of 100 bytes")):
            Channel(a, timeout=0.2).recv()
    finally:
        a.close()
        b.close()


def test_a_send_after_the_phase_deadline_times_out_at_once():
    """A phase deadline already passed (the source's pause-to-PREPARED one): the
    next send is a PeerTimeout before any byte goes, and the stream is marked
    broken (issue 19: the deadline check removed gave the socket a negative
    timeout -- a ValueError, not a migration error)."""
    from migrate.errors import ConnectionLost, PeerTimeout
    a, b = socket.socketpair()
    try:
        ch = Channel(a, timeout=5.0)
        ch.deadline = ch.now() - 1.0
        with pytest.raises(PeerTimeout, match="did not take a COMMIT record of 0 bytes"):
            ch.send(RecordType.COMMIT)
        assert ch.broken and ch.bytes_sent == 0
        ch.deadline = None
        with pytest.raises(ConnectionLost, match="nothing more is sent after a failed send"):
            ch.send(RecordType.ABORT, b"x")
        b.settimeout(0)
        with pytest.raises(BlockingIOError):
            b.recv(64)                                  # not a byte of either record went
    finally:
        a.close()
        b.close()


def test_a_connection_reset_while_reading_is_a_connection_lost():
    """A peer that resets the connection (RST: SO_LINGER 0, then close) while we
    wait for a record: ConnectionLost naming what we were reading, at once -- not a
    loop over the dead socket until the timeout (issue 19: that raise removed
    passed every test; a socketpair only ever gives a clean end of stream)."""
    from migrate.errors import ConnectionLost
    listener = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(listener.getsockname()[:2])
    b, _ = listener.accept()
    try:
        b.sendall(_HEAD.pack(12, 0, 100, 0) + b"x" * 10)        # part of an ABORT body ...
        b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        b.close()                                               # ... then a reset
        with pytest.raises(ConnectionLost, match="connection lost while reading a ABORT body"):
            Channel(a, timeout=30.0).recv()
    finally:
        a.close()
        listener.close()


def test_closing_a_channel_wakes_a_thread_blocked_reading_it():
    """close() shuts the socket down before closing it: a thread blocked in a
    read on it (a source's handshake helper whose guest stopped, a receiver the
    server is shutting down) returns at once with ConnectionLost -- a bare
    close() leaves it blocked until its timeout (issue 19: wire.close's shutdown
    dropped passed every test)."""
    from migrate.errors import ConnectionLost, MigrationError
    a, b = socket.socketpair()
    reader = Channel(a, timeout=30)
    got = []
    tid = []

    def read():
        tid.append(threading.get_native_id())
        try:
            reader.recv()
        except MigrationError as exc:
            got.append(exc)
    t = threading.Thread(target=read, daemon=True)
    t.start()
    try:
        # Close only once the reader sleeps in its read (poll or recv: Linux
        # shows a thread's current system call), so that close() is what must
        # wake it, not a read that starts after it.
        blocked = {"7", "271", "45", "47", "232", "281"}   # poll ppoll recvfrom recvmsg epoll_wait epoll_pwait
        for _ in range(2000):
            if tid:
                try:
                    now = Path(f"/proc/self/task/{tid[0]}/syscall").read_text().split()[0]
                except OSError:
                    pytest.skip("needs Linux /proc/<pid>/task/<tid>/syscall")
                if now in blocked:
                    break
            threading.Event().wait(0.005)
        else:
            pytest.fail("the reader never blocked in its read")
        reader.close()
        t.join(20)
        assert not t.is_alive(), "the reader is still blocked after close()"
        assert len(got) == 1 and isinstance(got[0], ConnectionLost), got
    finally:
        b.close()
