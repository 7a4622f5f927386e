"""A hostile stream: truncated, oversized, reordered, dropped, duplicated and
garbage records fed to a real destination over a socket.  Whatever arrives,
the destination ends with a MigrationError in bounded time -- never another
exception, a hang, or a resumed VM that differs from what the source had.
"""

import json
import socket
import struct
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from guests.catalog import get_guest
from migrate.destination import Destination
from migrate.digest import StreamDigest
from migrate.errors import ConnectionLost, InternalError, MigrationError, ProtocolError
from migrate.messages import (Digest, Hello, RoundMark, decode_pages, decode_zero_pages, encode_pages,
                              encode_zero_pages)
from migrate.wire import FLAG_OPTIONAL, HEADER, MAX_BATCH, Channel, RecordType
from minivmm.machine import Machine

TIMEOUT = 0.5


def _valid_records():
    m = Machine(get_guest("counter").build())
    m.run(max_ticks=3)
    assert m.halted is None          # a running guest: a halted one is never migrated
    pages = m.ram.array.reshape(-1, 4096)
    npages = len(pages)
    hashes = StreamDigest(npages)
    nz = pages.view(np.uint64).any(axis=1)
    recs = [(RecordType.HELLO, Hello(m.ram.size, {"vm": "counter"}).encode()),
            (RecordType.ROUND_BEGIN, RoundMark(0, npages).encode())]
    data_pfns = np.flatnonzero(nz)
    for i in range(0, len(data_pfns), MAX_BATCH // 4):      # several small PAGES records
        sel = data_pfns[i:i + MAX_BATCH // 4]
        hashes.update(sel, pages[sel])
        recs.append((RecordType.PAGES, b"".join(encode_pages(sel, pages[sel]))))
    zero = np.flatnonzero(~nz)
    hashes.update_zero(zero)
    recs.append((RecordType.ZERO_PAGES, encode_zero_pages(zero)))
    recs.append((RecordType.ROUND_END, RoundMark(0, npages).encode()))
    doc = json.dumps(m.save_state(ram=False).to_doc(), sort_keys=True, separators=(",", ":")).encode()
    half = len(doc) // 2
    recs += [(RecordType.STATE, doc[:half]), (RecordType.STATE, doc[half:]),
             (RecordType.DIGEST, Digest(len(doc), hashes.final(doc)).encode()),
             (RecordType.COMMIT, b"")]
    return m, recs


SOURCE, RECORDS = _valid_records()
# What a correct destination holds: the source's state restored locally
# (loading the saved selectors sets the descriptors' accessed bits in RAM).
_LOCAL = Machine.restore(SOURCE.save_state())
SOURCE_RAM = bytes(_LOCAL.ram.view)
SOURCE_DOC_SENT = SOURCE.save_state(ram=False).to_doc()
SOURCE_DOC = _LOCAL.save_state(ram=False).to_doc()


def encode(records, flags=None):
    return b"".join(HEADER.pack(t, (flags or {}).get(i, 0), len(b), i) + b for i, (t, b) in enumerate(records))


def feed(data: bytes, channel=Channel, timeout=None):
    """Run a destination on ``data`` (through ``channel``, a Channel class, with
    ``timeout``, default TIMEOUT); return the Incoming or the MigrationError."""
    timeout = TIMEOUT if timeout is None else timeout
    a, b = socket.socketpair()
    a.settimeout(5)

    def writer():
        try:
            a.sendall(data)
            a.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def drain():                        # the destination's replies, read while the stream
        try:                            # goes out (a long one gets many ROUND_ACKs)
            while a.recv(65536):
                pass
        except OSError:
            pass
    t = threading.Thread(target=writer, daemon=True)
    d = threading.Thread(target=drain, daemon=True)
    t.start()
    d.start()
    t0 = time.monotonic()
    try:
        return Destination(timeout=timeout).receive(channel(b, timeout=timeout), "fuzz")
    except MigrationError as exc:
        return exc
    finally:
        assert time.monotonic() - t0 < 10 * timeout + 5, "the destination took unbounded time"
        b.close()
        t.join(5)
        d.join(5)
        a.close()


def check(outcome):
    """Either a clean error, or a VM identical to the source's."""
    assert not isinstance(outcome, InternalError), outcome     # a VMM bug, not a clean refusal
    if isinstance(outcome, MigrationError):
        return False
    m = outcome.machine
    assert bytes(m.ram.view) == SOURCE_RAM
    assert m.save_state(ram=False).to_doc() == SOURCE_DOC
    return True


def test_the_valid_stream_resumes():
    assert check(feed(encode(RECORDS)))


FUZZ = settings(derandomize=True, max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
STREAM = encode(RECORDS)


@FUZZ
@given(st.integers(0, len(STREAM) - 1))
def test_truncated(cut):
    assert not check(feed(STREAM[:cut]))


@FUZZ
@given(st.integers(0, len(STREAM) - 1), st.integers(1, 255))
def test_flipped_byte(pos, xor):
    data = bytearray(STREAM)
    data[pos] ^= xor
    check(feed(bytes(data)))        # only a harmless flip (say, in the HELLO's vm name) may succeed


@pytest.mark.parametrize("where", ["first data byte", "middle", "last byte"])
def test_a_changed_page_byte_never_resumes(where):
    # The framing, counts and frame numbers all hold: only the digest's
    # per-record tag over the page bytes (migrate/digest.py) sees the change.
    recs = list(RECORDS)
    i = next(k for k, (t, _) in enumerate(recs) if t is RecordType.PAGES)
    body = bytearray(recs[i][1])
    count = struct.unpack_from("<I", body)[0]
    start = 4 + 4 * count
    pos = {"first data byte": start, "middle": (start + len(body)) // 2, "last byte": len(body) - 1}[where]
    body[pos] ^= 0x01
    recs[i] = (RecordType.PAGES, bytes(body))
    out = feed(encode(recs))
    assert isinstance(out, MigrationError) and "final digest mismatch" in str(out), out


@FUZZ
@given(st.integers(0, len(RECORDS) - 1), st.integers(0, 0xFFFFFFFF))
def test_length_field_lies(index, length):
    offsets = np.cumsum([0] + [HEADER.size + len(b) for _, b in RECORDS])
    data = bytearray(STREAM)
    if length == len(RECORDS[index][1]):
        length += 1
    struct.pack_into("<I", data, int(offsets[index]) + 4, length)
    assert not check(feed(bytes(data)))


@FUZZ
@given(st.data())
def test_reordered_dropped_duplicated(data):
    recs = list(RECORDS)
    op = data.draw(st.sampled_from(["swap", "drop", "dup"]))
    i = data.draw(st.integers(0, len(recs) - 1))
    j = data.draw(st.integers(0, len(recs) - 1))
    if op == "swap":
        if recs[i] == recs[j]:
            return
        recs[i], recs[j] = recs[j], recs[i]
    elif op == "drop":
        del recs[i]
    else:
        recs.insert(j, recs[i])
    renumber = data.draw(st.booleans())      # re-sequenced (a careful attacker) or not
    stream = encode(recs) if renumber else b"".join(
        HEADER.pack(t, 0, len(b), RECORDS.index((t, b)) if (t, b) in RECORDS else 0) + b for t, b in recs)
    # an identical VM (two PAGES records of one round swapped; a copy of COMMIT
    # after the end) or a clean error; never anything else
    resumed = check(feed(stream))
    if op == "drop":
        assert not resumed              # every record of a valid stream is needed


@FUZZ
@given(st.binary(min_size=0, max_size=4096))
def test_garbage(junk):
    assert not check(feed(junk))


@FUZZ
@given(st.integers(1, len(RECORDS) - 1), st.binary(max_size=64), st.integers(max(RecordType) + 1, 0xFFFF))
def test_unknown_records(pos, body, rtype):
    """An unknown optional record is skipped; an unknown mandatory one ends the session."""
    recs = list(RECORDS)
    recs.insert(pos, (rtype, body))
    assert check(feed(encode(recs, flags={pos: FLAG_OPTIONAL})))
    assert not check(feed(encode(recs)))


def test_garbage_after_hello_then_silence_times_out():
    t0 = time.monotonic()
    out = feed(encode(RECORDS[:3]) + b"\x04\x00")       # half a header, then nothing (writer closes)
    assert isinstance(out, MigrationError) and time.monotonic() - t0 < 5


def test_wrong_digest_never_resumes():
    recs = list(RECORDS)
    t, body = recs[-2]
    recs[-2] = (t, body[:8] + bytes(32))
    out = feed(encode(recs))
    assert isinstance(out, MigrationError) and "digest" in str(out)


def test_missing_page_never_resumes():
    """A round that is consistent in itself but leaves pages out."""
    recs = [r for r in RECORDS if r[0] is not RecordType.ZERO_PAGES]
    sent = sum(len(b) // 4100 for t, b in recs if t is RecordType.PAGES)
    recs = [(t, RoundMark(0, sent).encode()) if t in (RecordType.ROUND_BEGIN, RecordType.ROUND_END) else (t, b)
            for t, b in recs]
    out = feed(encode(recs))
    assert isinstance(out, MigrationError) and "never arrived" in str(out)
    got = set()                         # the frames the PAGES records carried
    for t, b in recs:
        if t is RecordType.PAGES:
            n = int.from_bytes(b[:4], "little")
            got |= {int.from_bytes(b[4 + 4 * i:8 + 4 * i], "little") for i in range(n)}
    first = min(set(range(SOURCE.ram.npages)) - got)
    assert f"(first: frame {first})" in str(out), out      # it names the first one missing


SENT_RAM = bytes(SOURCE.ram.view)


def records_with_state(doc: bytes):
    """The valid stream with ``doc`` as its state document and a digest
    recomputed over it: what a hostile (unauthenticated) source can send."""
    recs = [r for r in RECORDS if r[0] not in (RecordType.STATE, RecordType.DIGEST, RecordType.COMMIT)]
    chunks = [doc[i:i + (1 << 20)] for i in range(0, len(doc), 1 << 20)] or [doc]
    recs += [(RecordType.STATE, c) for c in chunks]
    recs += [(RecordType.DIGEST, b""), (RecordType.COMMIT, b"")]
    return redigest(recs)


def redigest(recs):
    """``recs`` with its DIGEST recomputed over its own page records and state
    document, folded in stream order as a source does (migrate/digest.py)."""
    hashes = StreamDigest(len(SENT_RAM) // 4096)
    for rtype, body in recs:
        if rtype is RecordType.PAGES:
            hashes.update(*decode_pages(body, hashes.npages))
        elif rtype is RecordType.ZERO_PAGES:
            hashes.update_zero(decode_zero_pages(body, hashes.npages))
    doc = b"".join(body for rtype, body in recs if rtype is RecordType.STATE)
    return [(t, Digest(len(doc), hashes.final(doc)).encode() if t is RecordType.DIGEST else b)
            for t, b in recs]


@pytest.mark.parametrize("doc", [b"[]", b"{}", b'{"cpu": {}}', b"\xff\xfe", b'{"vmm": 1}'])
def test_hostile_state_document_with_matching_digest(doc):
    """Even a state document that hashes correctly (the plain-mode source is
    not authenticated) is parsed defensively: clean error, nothing resumed."""
    out = feed(encode(records_with_state(doc)))
    assert isinstance(out, ProtocolError) and "state document" in str(out), out


def test_the_valid_state_document_through_records_with_state():
    doc = json.dumps(SOURCE_DOC_SENT, sort_keys=True, separators=(",", ":")).encode()
    assert check(feed(encode(records_with_state(doc))))


def test_a_vmm_bug_while_receiving_is_contained(monkeypatch):
    """An unexpected exception inside the destination (a bug, simulated) is
    an InternalError: nothing resumed, the serving VMM lives on."""
    import migrate.destination as dest
    import migrate.landing as landing

    def broken(*args):
        raise KeyError("simulated bug")
    monkeypatch.setattr(dest, "decode_pages", broken)
    monkeypatch.setattr(landing, "decode_pages_head", broken)      # PAGES placed in RAM
    out = feed(encode(RECORDS))
    assert isinstance(out, InternalError) and "simulated bug" in str(out)


# --------------------------------------------------------- a hostile destination
SOURCE_IMAGE = get_guest("counter").build()


HONEST_REPLY_BYTES = 300        # WELCOME, ROUND_ACKs, PREPARED, RESUMED: about 200 bytes


def run_source_against(peer):
    """Migrate a fresh counter guest to the scripted destination ``peer``."""
    from migrate.source import Source
    m = Machine(SOURCE_IMAGE)
    m.run(max_ticks=3)
    t0 = time.monotonic()
    try:
        Source(m, timeout=TIMEOUT * 4).migrate(peer.address)
        outcome = None
    except MigrationError as exc:
        outcome = exc
    assert time.monotonic() - t0 < 20 * TIMEOUT + 5
    peer.close()
    return m, outcome


@pytest.mark.slow
@settings(derandomize=True, max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.builds(dict, cut_at=st.integers(0, HONEST_REPLY_BYTES)),
                 st.builds(dict, flip_at=st.integers(0, HONEST_REPLY_BYTES), xor=st.integers(1, 255))))
def test_source_survives_a_hostile_destination(corruption):
    """A destination that answers like an honest one (WELCOME, a ROUND_ACK per
    round, PREPARED after DIGEST, RESUMED after COMMIT: tests/migrate/scripted.py)
    but whose reply stream is cut or has one byte flipped anywhere, PREPARED
    and RESUMED included.  The source marks its guest migrated exactly when
    COMMIT went out; otherwise a clean MigrationError, the guest untouched and
    able to run to the end."""
    from migrate.errors import CommitUnconfirmed
    from migrate.source import MIGRATED
    from scripted import ScriptedDestination
    peer = ScriptedDestination(timeout=TIMEOUT * 4, **corruption)
    m, outcome = run_source_against(peer)
    assert not isinstance(outcome, InternalError), outcome
    if RecordType.COMMIT in peer.received:
        assert m.halted == MIGRATED                     # never taken back: the peer may run it
        assert outcome is None or isinstance(outcome, CommitUnconfirmed), outcome
    else:
        assert isinstance(outcome, MigrationError), "completed without COMMIT?"
        assert m.halted is None and not m.ram.dirty.enabled
        assert m.run(max_ticks=100_000) == "shutdown" and "counter 100" in m.console.text()


@pytest.mark.parametrize("record", ["PREPARED", "RESUMED"])
@pytest.mark.parametrize("how", ["cut", "flip-type"])
def test_source_facing_a_corrupted_prepared_or_resumed(record, how):
    """The two replies around the point of no return, each cut in its header
    or given another type: before COMMIT the guest stays here; after it,
    the source reports commit-unconfirmed and never runs it again."""
    from migrate.errors import CommitUnconfirmed
    from migrate.source import MIGRATED
    from scripted import ScriptedDestination
    probe = ScriptedDestination(timeout=TIMEOUT * 4)         # where do the records start?
    marks = []
    real = probe._reply
    probe._reply = lambda conn, raw: (marks.append((probe.sent, raw[:2])), real(conn, raw))[1]
    m, outcome = run_source_against(probe)
    assert outcome is None
    types = {int.from_bytes(t, "little"): start for start, t in marks}
    start = types[RecordType[record]]
    kw = {"cut_at": start + 3} if how == "cut" else {"flip_at": start, "xor": 0x0F}
    peer = ScriptedDestination(timeout=TIMEOUT * 4, **kw)
    m, outcome = run_source_against(peer)
    if record == "PREPARED":
        assert RecordType.COMMIT not in peer.received and isinstance(outcome, MigrationError)
        assert m.halted is None and m.run(max_ticks=100_000) == "shutdown"
    else:
        assert RecordType.COMMIT in peer.received and isinstance(outcome, CommitUnconfirmed)
        assert m.halted == MIGRATED


# ------------------------------------ a real destination whose replies are meddled with
MEDDLE = st.tuples(st.integers(0, 5),                                  # which of its records
                   st.sampled_from(["flip", "truncate", "abort", "drop"]),
                   st.integers(0, 15), st.integers(1, 255))


def _meddling_channel(index, how, pos, xor):
    class Meddling(Channel):
        sent_records = 0

        def send(self, rtype, *parts):
            n, Meddling.sent_records = Meddling.sent_records, Meddling.sent_records + 1
            if n != index:
                return super().send(rtype, *parts)
            body = b"".join(bytes(memoryview(p).cast("B")) for p in parts)
            raw = bytearray(HEADER.pack(rtype, 0, len(body), self.send_seq) + body)
            if how == "abort":          # (not in place of RESUMED: see the test's doc)
                rtype = RecordType.ABORT if rtype is not RecordType.RESUMED else rtype
                return super().send(rtype, *([b"meddled"] if rtype is RecordType.ABORT else parts))
            if how == "drop":
                self.sock.close()
                raise MigrationError("meddler dropped the connection")
            if how == "flip":
                raw[pos % len(raw)] ^= xor
                self.sock.sendall(raw)
                self.send_seq += 1
                return None
            self.sock.sendall(raw[:pos % len(raw)])          # truncate, then hang up
            self.sock.close()
            raise MigrationError("meddler truncated a record")
    return Meddling


@pytest.mark.slow
@settings(derandomize=True, max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(MEDDLE)
def test_exactly_one_copy_whatever_happens_to_the_destinations_replies(meddle):
    """WELCOME, ROUND_ACKs, PREPARED, RESUMED from a real destination, one of
    them flipped, cut, replaced by ABORT or dropped: never two running copies;
    the source keeps its guest unless it committed.

    One case is left out on purpose: an ABORT *forged* in place of RESUMED.
    An honest destination sends ABORT after COMMIT only when it gave up and
    discarded the VM, and the source then takes its guest back; plain mode
    authenticates nothing, so it cannot tell a forgery (docs/migration.md)."""
    from migrate.errors import CommitUnconfirmed
    from migrate.server import Server
    from migrate.source import MIGRATED, Source
    from inproc import receive_in_thread
    server, res = Server("127.0.0.1:0", timeout=TIMEOUT * 2, channel=_meddling_channel(*meddle)), {}
    t = receive_in_thread(server, res, timeout=TIMEOUT * 2, run_ticks=None)
    m = Machine(SOURCE_IMAGE)
    m.run(max_ticks=3)
    try:
        Source(m, timeout=TIMEOUT * 2).migrate(server.label)
        outcome = "completed"
    except CommitUnconfirmed:
        outcome = "unconfirmed"
    except MigrationError:
        outcome = "aborted"
    t.join(10)
    server.close()
    resumed = "incoming" in res
    assert not (resumed and m.halted is None), "two copies run"
    if outcome == "completed":
        assert resumed and m.halted == MIGRATED
    elif outcome == "aborted":
        assert m.halted is None and not resumed
        assert m.run(max_ticks=100_000) == "shutdown" and "counter 100" in m.console.text()
    else:
        assert m.halted == MIGRATED             # it may run there, or nowhere: never twice


@pytest.mark.parametrize("delta", [-1, 1])
def test_a_digest_whose_state_length_differs_is_refused(delta):
    """DIGEST carries the state document's length and its digest: the destination
    compares both with what arrived.  A stream whose digest is right but whose
    length is off by one is refused by the length, nothing resumed (issue 19: the
    length check removed passed every test -- the digest alone let it through)."""
    recs = list(RECORDS)
    doc = b"".join(body for rtype, body in recs if rtype is RecordType.STATE)
    i = next(i for i, (t, _) in enumerate(recs) if t is RecordType.DIGEST)
    good = Digest.decode(recs[i][1])
    recs[i] = (RecordType.DIGEST, Digest(len(doc) + delta, good.digest).encode())
    out = feed(encode(recs))
    assert isinstance(out, MigrationError) and \
        f"state document of {len(doc)} bytes, the source sent {len(doc) + delta}" in str(out), out


@pytest.mark.parametrize("failure, why", [
    (lambda: __import__("minivmm.errors", fromlist=["StateError"]).StateError("simulated refusal"),
     "state document rejected: simulated refusal"),
    (lambda: KeyError("simulated"), "state document rejected: KeyError: 'simulated'"),
])
def test_a_state_the_vmm_cannot_restore_is_refused_before_prepared(monkeypatch, failure, why):
    """A document that passes the validator but that ``Machine.restore`` refuses
    (simulated: the validator is meant to leave none) ends the session with a
    ProtocolError naming it -- not PREPARED with no machine behind it, and not an
    internal error (issue 19: either conversion removed passed every test)."""
    import migrate.destination as dest

    def refuse(*args, **kwargs):
        raise failure()
    monkeypatch.setattr(dest.Machine, "restore", refuse)
    out = feed(encode(RECORDS))
    assert isinstance(out, ProtocolError) and not isinstance(out, InternalError), out
    assert why in str(out), out


def test_a_session_refused_before_hello_reports_no_ram():
    """The aborted session's report (what the serving VMM prints and logs) says no
    RAM arrived when the very first record is not a HELLO."""
    t0 = time.monotonic()
    out = feed(encode([(RecordType.ROUND_BEGIN, RoundMark(0, 1).encode())]))
    took = time.monotonic() - t0
    assert isinstance(out, ProtocolError) and "unexpected ROUND_BEGIN record in state wait-hello" in str(out)
    assert out.report.outcome == "aborted" and out.report.ram_size == 0 and out.report.rounds == []
    assert 0 <= out.report.total_seconds <= took


def test_the_destination_applies_its_own_timeout_to_the_channel():
    """``Destination(timeout=…)`` is the per-record timeout, whatever the channel it
    is handed was made with: a source that sends half a header and goes silent is
    cut off by the destination's 0.5 s, which the error names (issue 19: keeping
    the channel's own 30 s passed every test; the feeder's channels use the same
    value)."""
    a, b = socket.socketpair()
    try:
        a.sendall(b"\x04\x00")                          # half a header, then silence
        with pytest.raises(MigrationError, match=r"after 0\.5 s"):
            Destination(timeout=TIMEOUT).receive(Channel(b, timeout=30.0), "slow")
    finally:
        a.close()
        b.close()


def test_a_failed_session_stops_its_prefaulter():
    """The destination touches the incoming RAM ahead of the pages on a worker
    thread (migrate/residency.py); a session that fails in a round stops it, so no
    thread keeps working for a VM that was discarded (issue 19: the stop on the
    failure path removed passed every test)."""
    made = []

    class Watched(Destination):
        @property
        def _prefault(self):
            return self.__dict__.get("_pf")

        @_prefault.setter
        def _prefault(self, value):
            self.__dict__["_pf"] = value
            if value is not None:
                made.append(value)
    recs = [r for r in RECORDS if r[0] is not RecordType.ROUND_END][:4]     # HELLO, a round, pages...
    a, b = socket.socketpair()
    try:
        a.sendall(encode(recs))
        a.shutdown(socket.SHUT_WR)                                          # ... and the source is gone
        with pytest.raises(ConnectionLost):        # not just any MigrationError: an InternalError is one
            Watched(timeout=TIMEOUT).receive(Channel(b, timeout=TIMEOUT), "cut")
    finally:
        a.close()
        b.close()
    assert len(made) == 1 and made[0]._stopped.is_set()


def test_a_session_leaves_the_garbage_collector_as_it_found_it():
    """The destination turns the collector off while it receives (no pauses in the
    downtime) and back on after, whether the VM arrived or not (issue 19: leaving
    it off passed every test; the source's side: test_source_outcomes.py)."""
    import gc
    assert gc.isenabled()
    assert check(feed(encode(RECORDS)))
    assert gc.isenabled()
    assert isinstance(feed(encode(RECORDS[:3])), MigrationError)
    assert gc.isenabled()
