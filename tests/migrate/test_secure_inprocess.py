"""The secure protocol, source and destination in one process over loopback TCP
(real TPMs on disk, real keystone-built guests, real sockets)."""

import socket

import pytest

from guests.build import Program, build_image
from guests.catalog import get_guest
from migrate.errors import Refused
from migrate.secure.channel import SealedChannel
from migrate.secure.commit import read_mark
from migrate.server import Server
from migrate.source import MIGRATED, Source
from minivmm.machine import Machine

from inproc import BOUNDED
from securehelp import Trust, secure_receive_in_thread

SECRET = b"swordfish: launch code"


def keeper_image(rounds=30):
    return build_image([Program.builtin("keeper", data_pages=3, args=(rounds, 1)),
                        Program.builtin("counter", args=(rounds, 150_000))], name="k")


def server_for(trust, tpm_dir, insecure=()):
    enc, rep = "encryption" not in insecure, "replay" not in insecure
    return Server("127.0.0.1:0", timeout=10,
                  channel=lambda sock, timeout: SealedChannel(sock, timeout=timeout, role="destination",
                                                              encryption=enc, replay=rep))


class Recorder(SealedChannel):
    """The source's channel, keeping every byte it put on the wire."""
    wire = bytearray()

    def _sendall(self, views, deadline):
        for v in views:
            Recorder.wire += bytes(v)
        return super()._sendall(views, deadline)


def test_protected_keeper_migrates_secure_and_no_secret_or_key_on_the_wire(tmp_path):
    trust = Trust(tmp_path)
    a, b = trust.host("a"), trust.host("b", role="destination")
    m = Machine(keeper_image())
    m.run(max_ticks=8)
    keys = dict(m.protection._keys)
    assert keys, "the keeper is protected"
    server, res = server_for(trust, b), {}
    t = secure_receive_in_thread(server, res, lambda: trust.mode(b))
    Recorder.wire = bytearray()
    mode = trust.mode(a)
    report = Source(m, mode=mode, check_ram=True, policy=BOUNDED,
                    channel=lambda s, timeout: Recorder(s, timeout=timeout, role="source")).migrate(server.label)
    t.join(60)
    server.close()
    assert "error" not in res, res.get("error")
    assert report.outcome == "completed" and m.halted == MIGRATED
    assert set(mode.phases) == {"attestation", "key_release", "commit"}
    assert all(0 < t < report.total_seconds for t in mode.phases.values()), mode.phases
    assert set(res["incoming"].report.phases) == {"attestation", "key_release"}     # the destination's
    d = res["incoming"].machine
    assert d.exits == {1: 0, 2: 0} and d.console.text(1).count("secret intact") == 30
    assert SECRET not in Recorder.wire
    assert b"counter \0" not in Recorder.wire, "unprotected pages travel encrypted too"
    for k in keys.values():
        assert k not in Recorder.wire
    assert not m.protection._keys, "the source destroyed its process keys before COMMIT"
    mark = read_mark(tmp_path / "a", mode.vm[0])
    assert mark["state"] == "migrated-away" and mark["generation"] == 1 and mark["sealed_keys"]
    assert d.migration_identity == mode.vm and mode.vm[1] == 1


def test_a_busy_destination_refuses_a_secure_source_clearly(tmp_path):
    """The refusal (WELCOME BUSY, before any key exchange) reaches a secure source,
    which keeps its guest; its KEY_SHARE, sent after HELLO, is left unread."""
    trust = Trust(tmp_path)
    a = trust.host("a")
    server = server_for(trust, a)
    hog = socket.create_connection(server.address)       # takes the one slot
    try:
        for _ in range(5):
            m = Machine(get_guest("counter").build())
            m.run(max_ticks=5)
            with pytest.raises(Refused, match="busy"):
                Source(m, mode=trust.mode(a), policy=BOUNDED).migrate(server.label)
            assert not m.halted and not m.ram.dirty.enabled
        assert m.run(max_ticks=100_000) == "shutdown" and "counter 100" in m.console.text()
    finally:
        hog.close()
        server.close()


def test_the_guest_runs_while_the_destinations_final_quote_is_verified(tmp_path):
    """Final quotes are verified beside the running guest (the next round, or
    before the pause), never by holding it: a pause there would be downtime
    that no report counts.  The source's verifier here returns only once the
    guest has run 20 more ticks; a source that waited for it without running
    the guest would wait out the 20 s and fail."""
    from migrate.precopy import PrecopyPolicy
    from migrate.secure.attest import Attestor
    from migrate.secure.mode import SecureMode
    import time

    class Watching(Attestor):
        machine = None
        waited = 0

        def verify(self, evidence, my_nonce, binding, *, who):
            if "final quote" in who:
                start, deadline = self.machine.vclock, time.monotonic() + 20
                while self.machine.vclock < start + 20:
                    if time.monotonic() > deadline:
                        raise AssertionError("the guest did not run while a final quote was verified")
                    time.sleep(0.001)
                Watching.waited += 1
            return super().verify(evidence, my_nonce, binding, who=who)

    trust = Trust(tmp_path)
    a, b = trust.host("a"), trust.host("b", role="destination")
    m = Machine(keeper_image(rounds=400))
    m.run(max_ticks=8)
    attestor = Watching(a, trust.issuer, trust.policy)
    attestor.machine = m
    server, res = server_for(trust, b), {}
    t = secure_receive_in_thread(server, res, lambda: trust.mode(b))
    report = Source(m, mode=SecureMode(attestor), check_ram=True,
                    policy=PrecopyPolicy(max_rounds=3)).migrate(server.label)
    t.join(60)
    server.close()
    assert "error" not in res, res.get("error")
    assert report.outcome == "completed" and m.halted == MIGRATED
    assert Watching.waited >= 1


def test_a_full_ram_guest_goes_sealed_straight_from_ram_and_arrives_byte_for_byte(tmp_path):
    """Secure mode seals PAGES records straight from guest RAM, without the
    private copy (Source._sealed_from_ram): a 16 MiB guest whose free RAM is
    random goes almost wholly that way, and the destination's RAM is the
    source's at the pause, byte for byte (the destination does not run)."""
    from migrate.bench import prepare

    trust = Trust(tmp_path)
    a, b = trust.host("a"), trust.host("b", role="destination")
    m = prepare("idle-full", 16 << 20)
    went = []

    class Counting(SealedChannel):
        def send_pages_from(self, head, pieces, *, keep=None):
            went.append(super().send_pages_from(head, pieces, keep=keep))
            return went[-1]

    server, res = server_for(trust, b), {}
    t = secure_receive_in_thread(server, res, lambda: trust.mode(b), run_ticks=None)
    report = Source(m, mode=trust.mode(a), policy=BOUNDED,
                    channel=lambda s, timeout: Counting(s, timeout=timeout, role="source")).migrate(server.label)
    t.join(60)
    server.close()
    assert "error" not in res, res.get("error")
    assert report.outcome == "completed"
    data = sum(r.data_pages for r in report.rounds)
    assert went.count(True) * 256 >= 0.9 * data and went.count(True) > 8, (went.count(True), data)
    assert bytes(res["incoming"].machine.ram.view) == bytes(m.ram.view)
