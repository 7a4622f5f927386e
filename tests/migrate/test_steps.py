"""The protocol-step seam (migrate/steps.py): a hook at every record, and a
clock that stands still while a holder (the TUI) holds the engine."""

import socket
import threading

import pytest

from guests.catalog import get_guest
from migrate.errors import PeerTimeout
from migrate.secure.errors import RecordRejected
from migrate.secure.channel import SealedChannel
from migrate.secure.keyschedule import derive
from migrate.server import Server
from migrate.source import Source
from migrate.steps import HEAD_BYTES, RECV, SEND, Step, Timebase, attach, real_deadline
from migrate.wire import Channel, RecordType
from minivmm.machine import Machine

from inproc import BOUNDED, receive_in_thread


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_timebase_stands_still_while_held_and_holds_nest():
    clk = FakeClock()
    tb = Timebase(clk)
    assert tb.now() == 100.0
    clk.t = 101.0
    tb.hold()
    clk.t = 105.0
    assert tb.now() == 101.0 and tb.held and tb.held_seconds == 4.0
    tb.hold()                   # a second holder (the other engine)
    tb.release()
    clk.t = 106.0
    assert tb.now() == 101.0    # still held by the first
    tb.release()
    assert not tb.held and tb.now() == 101.0
    clk.t = 107.5
    assert tb.now() == 102.5 and tb.held_seconds == 5.0
    with tb:
        clk.t = 110.0
        assert tb.now() == 102.5
    with pytest.raises(RuntimeError, match="without hold"):
        tb.release()


def test_every_record_is_one_step_in_order_on_both_sides():
    a, b = socket.socketpair()
    sent, got = [], []
    tx, rx = attach(Channel(a, timeout=5), sent.append), attach(Channel(b, timeout=5), got.append)
    tx.send(RecordType.HELLO, b"x" * 10)
    tx.send(RecordType.PAGES, b"abc", b"de")
    tx.send(RecordType.COMMIT)
    for _ in range(3):
        rx.recv()
    assert sent == [Step(1, SEND, "HELLO", 10, 0, b"x" * 10), Step(2, SEND, "PAGES", 5, 1, b"abcde"),
                    Step(3, SEND, "COMMIT", 0, 2)]
    assert got == [Step(1, RECV, "HELLO", 10, 0, b"x" * 10), Step(2, RECV, "PAGES", 5, 1, b"abcde"),
                   Step(3, RECV, "COMMIT", 0, 2)]
    rx.send(RecordType.PREPARED)
    assert got[-1] == Step(4, SEND, "PREPARED", 0, 0)      # one count over both directions
    a.close(), b.close()


def test_a_hook_that_raises_stops_the_record_before_it_is_written():
    a, b = socket.socketpair()

    def crash(step):
        if step.n == 2:
            raise ConnectionAbortedError("fault injected at step 2")
    tx = attach(Channel(a, timeout=5), crash)
    tx.send(RecordType.HELLO, b"1")
    with pytest.raises(ConnectionAbortedError, match="step 2"):
        tx.send(RecordType.PAGES, b"2")
    assert tx.send_seq == 1 and tx.bytes_sent == 16 + 1    # nothing of record 2 went out
    b.settimeout(0.5)
    assert len(b.recv(100)) == 17
    a.close(), b.close()


def test_a_sealed_record_that_fails_authentication_is_not_a_step():
    a, b = socket.socketpair()
    keys = derive(bytes(32), b"transcript")
    got = []
    tx = SealedChannel(a, role="source", timeout=5)
    rx = attach(SealedChannel(b, role="destination", timeout=5), got.append)
    tx.seal(keys), rx.seal(keys)
    tx.send(RecordType.PAGES, b"page")
    assert rx.recv().body == b"page"
    assert got == [Step(1, RECV, "PAGES", 4 + 16, 0, b"page")]     # the wire length; the plaintext head
    forged = SealedChannel(socket.socketpair()[0], role="source")
    forged.seal(derive(bytes([1]) * 32, b"transcript"))
    forged.sock = a
    forged.send_seq = 1
    forged.send(RecordType.COMMIT)
    with pytest.raises(RecordRejected):
        rx.recv()
    assert len(got) == 1
    a.close(), b.close()


def test_no_timeout_fires_while_the_timebase_is_held():
    """The receiver's record timeout is 0.2 s; the sender sends only after the
    holder has held the shared clock for longer.  Held, the receiver waits; the
    outcome does not depend on how loaded the machine is (the clock stands
    still for as long as the hold lasts, whatever that is)."""
    a, b = socket.socketpair()
    tb = Timebase()
    rx = attach(Channel(b, timeout=0.2), timebase=tb)
    tx = Channel(a, timeout=5)
    tb.hold()
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", rx.recv()), daemon=True)
    t.start()
    t.join(0.8)                 # several of the receiver's timeouts pass, held
    assert t.is_alive()
    tx.send(RecordType.HELLO, b"late")
    t.join(30)
    tb.release()
    assert out["r"].body == b"late"
    # and without a hold the same wait does time out
    with pytest.raises(PeerTimeout):
        rx.recv()
    a.close(), b.close()


def test_real_deadline_translates_the_held_clock():
    a, b = socket.socketpair()
    tb = Timebase()
    ch = attach(Channel(a), timebase=tb)
    with tb:
        pass
    d = ch.now() + 3.0
    import time
    assert abs(real_deadline(ch, d) - (time.monotonic() + 3.0)) < 0.5
    assert real_deadline(ch, None) is None
    a.close(), b.close()


def test_a_whole_migration_seen_step_by_step_from_both_sides():
    """Source and destination hooks see the same records in the same order
    (the source's sends are the destination's receives), the session opens
    with HELLO and ends with RESUMED, and a hook that holds the engine at
    every step changes nothing the guest computes."""
    ref = Machine(get_guest("counter").build())
    ref.run(max_ticks=100_000)
    tb = Timebase()
    src_steps, dst_steps = [], []

    def holding(log):
        def hook(step):
            with tb:            # what the TUI does while a student reads
                log.append(step)
        return hook
    server = Server("127.0.0.1:0", timeout=10,
                    channel=lambda sock, timeout: attach(Channel(sock, timeout=timeout), holding(dst_steps), tb))
    result = {}
    t = receive_in_thread(server, result, timeout=10)
    m = Machine(get_guest("counter").build())
    m.run(max_ticks=10)
    Source(m, timeout=10, channel=lambda sock, timeout: attach(Channel(sock, timeout=timeout),
                                                              holding(src_steps), tb)).migrate(server.label)
    t.join(60)
    server.close()
    assert "error" not in result, result.get("error")
    sends = [(s.rtype, s.length, s.seq) for s in src_steps if s.direction == SEND]
    recvs = [(s.rtype, s.length, s.seq) for s in dst_steps if s.direction == RECV]
    assert sends == recvs and sends[0][0] == "HELLO" and "COMMIT" in [r[0] for r in sends]
    back = [(s.rtype, s.seq) for s in dst_steps if s.direction == SEND]
    assert back == [(s.rtype, s.seq) for s in src_steps if s.direction == RECV]
    assert back[-1][0] == "RESUMED"
    assert [s.n for s in src_steps] == list(range(1, len(src_steps) + 1))
    assert result["incoming"].machine.console.text() == ref.console.text()


def test_time_held_by_a_hook_is_not_counted_as_the_cost_of_sending_pages():
    """The source times its rounds on the channel's clock: a holder that keeps
    the engine for a long time at every step (here 1000 s per step on a
    clock that only moves while held) adds nothing to a round's seconds or to
    the per-page cost the pre-copy policy decides on."""
    fake = FakeClock()
    tb = Timebase(fake)

    def hold_long(step):
        with tb:
            fake.t += 1000.0
    server = Server("127.0.0.1:0", timeout=10,
                    channel=lambda sock, timeout: attach(Channel(sock, timeout=timeout), timebase=tb))
    result = {}
    t = receive_in_thread(server, result, timeout=10, run_ticks=None)
    m = Machine(get_guest("counter").build())
    m.run(max_ticks=10)
    report = Source(m, timeout=10, channel=lambda sock, timeout: attach(Channel(sock, timeout=timeout),
                                                                       hold_long, tb)).migrate(server.label)
    t.join(60)
    server.close()
    assert "error" not in result, result.get("error")
    assert fake.t >= 1000.0 * 10            # every step was held
    assert all(r.seconds == 0.0 and r.send_seconds == 0.0 for r in report.rounds), report.rounds


def test_a_step_carries_the_plaintext_head_of_a_body_never_more():
    """Sent sealed, the hook sees the body as written (not the ciphertext);
    a 1 MiB body gives it HEAD_BYTES, across the scatter-gather parts."""
    a, b = socket.socketpair()
    keys = derive(bytes(32), b"transcript")
    sent, got = [], []
    tx = attach(SealedChannel(a, role="source", timeout=5), sent.append)
    rx = attach(SealedChannel(b, role="destination", timeout=5), got.append)
    tx.seal(keys), rx.seal(keys)
    parts = (b"\x01\x00\x00\x00", b"\x07\x00\x00\x00", bytes(range(256)) * 16 * 4)
    t = threading.Thread(target=lambda: got.append(rx.recv(max_body=1 << 20)))
    t.start()
    tx.send(RecordType.PAGES, *parts)
    t.join(10)
    body = b"".join(parts)
    assert sent[0].head == body[:HEAD_BYTES] and len(sent[0].head) == HEAD_BYTES
    assert got[0].head == body[:HEAD_BYTES] and got[1].body == body
    a.close(), b.close()


def test_the_tui_reads_each_records_fields_from_its_step_and_never_a_key(tmp_path):
    """A real secure migration, a step hook on both channels: every record no
    engine event describes gets its fields from the step's head (tui.bodies),
    they agree with what crossed, and no process key appears in any of them."""
    from securehelp import Trust, secure_receive_in_thread
    from tui import bodies

    trust = Trust(tmp_path)
    a, b = trust.host("a"), trust.host("b", role="destination")
    m = Machine(get_guest("migrate-lab").build())
    m.run(max_ticks=6)
    keys = [k.hex()[:16] for k in m.protection._keys.values()]
    assert keys
    seen = []

    def hooked(role):
        def factory(sock, timeout):
            ch = SealedChannel(sock, timeout=timeout, role=role)
            return attach(ch, lambda step: seen.append((role, step, bodies.from_head(role, step, ch.overhead))))
        return factory
    server, res = Server("127.0.0.1:0", timeout=10, channel=hooked("destination")), {}
    t = secure_receive_in_thread(server, res, lambda: trust.mode(b), run_ticks=None)
    Source(m, mode=trust.mode(a), channel=hooked("source"), policy=BOUNDED).migrate(server.label)
    t.join(60)
    server.close()
    assert "incoming" in res, res
    fields = {(role, s.direction, s.rtype): dict(f) for role, s, f in seen if f}
    pages = [dict(f) for role, s, f in seen if (role, s.direction, s.rtype) == ("source", SEND, "PAGES")]
    assert pages and all(int(p["pages"]) >= 1 and "frames" in p for p in pages)
    assert fields["source", SEND, "KEY_SHARE"]["X25519 public key"]
    assert fields["destination", RECV, "KEY_SHARE"]["nonce"]
    assert "release key R" in fields["source", RECV, "FINAL_QUOTE"]
    wrapped = fields["destination", RECV, "KEY_RELEASE"]["wrapped"]
    length = next(s.length for role, s, _ in seen if (role, s.direction, s.rtype) == ("destination", RECV, "KEY_RELEASE"))
    assert wrapped.startswith(f"{length - 16 - 32:,} bytes")           # the tag and E are not the keys
    assert "HMAC" in fields["source", SEND, "COMMIT"]["commit token"]
    text = repr([f for _, _, f in seen])
    assert not any(k in text for k in keys)
