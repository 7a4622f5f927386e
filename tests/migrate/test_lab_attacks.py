"""Each network attack of the migration lab (migrate/lab/attacks.py), end to
end in one process over loopback TCP: the real source and destination
engines, the lab's relay with the attack between them, a real keystone-built
guest (the protected secret keeper beside an unprotected counter).

Secure protocol: the migration fails with the attack's named error, and
exactly one copy runs on with intact state (the keeper's secret every round,
the counter without gap or repeat).  Plain engine: the damage, read from what
the guest printed or what the proxy recovered."""

import re

import pytest

from guests.build import Program, build_image
from migrate.errors import MigrationError
from migrate.lab.attacks import make_attack
from migrate.lab.eavesdrop import analyse
from migrate.lab.relay import Relay
from migrate.secure.channel import SealedChannel
from migrate.server import Server
from migrate.source import MIGRATED, Source
from minivmm.machine import Machine

from inproc import BOUNDED, receive_in_thread
from securehelp import Trust, secure_receive_in_thread

SECRET = "swordfish: launch code 4-8-15-16"
ROUNDS, LINES = 30, 40


def guest():
    img = build_image([Program.builtin("keeper", data_pages=3, args=(ROUNDS, 1)),
                       Program.builtin("counter", args=(LINES, 150_000))], name="lab")
    m = Machine(img)
    m.run(max_ticks=6)
    return m


def counts(text):
    return [int(n) for n in re.findall(r"^(?:counter|HACKED!) (\d+)$", text, re.M)]


def attacked(name, trust=None, *, dest_timeout=5.0, **kw):
    """Migrate a fresh guest through the attack; secure if ``trust``."""
    m = guest()
    if trust is None:
        server = Server("127.0.0.1:0", timeout=dest_timeout)
        res = {}
        t = receive_in_thread(server, res, timeout=dest_timeout)
        src_mode = None
    else:
        a, b = trust.host("a"), trust.host("b", role="destination")
        server = Server("127.0.0.1:0", timeout=dest_timeout, channel=lambda sock, timeout: SealedChannel(
            sock, timeout=timeout, role="destination"))
        res = {}
        t = secure_receive_in_thread(server, res, lambda: trust.mode(b), timeout=dest_timeout)
        src_mode = trust.mode(a)
    relay = Relay(server.address, start=False)
    attack = make_attack(name, relay, **kw)
    relay.meddle, relay.meddle_back = attack.to_dest, attack.to_source
    relay.thread.start()
    try:
        res["report"] = Source(m, mode=src_mode, timeout=10, policy=BOUNDED).migrate(f"127.0.0.1:{relay.port}")
    except MigrationError as exc:
        res["source_error"] = exc
    t.join(60)
    relay.done.wait(30)
    server.close()
    if m.halted is None:
        m.run(max_ticks=100_000)                # the source's copy runs on
    return m, res, attack


def one_intact_copy(m, res):
    """Exactly one copy ran to the end, with the keeper's secret intact every
    round and the counter 1..LINES once each."""
    d = res["incoming"].machine if "incoming" in res else None
    runs = [x for x in (m if m.halted != MIGRATED else None, d) if x is not None]
    assert len(runs) == 1, (m.halted, res)
    run = runs[0]
    assert run.exits == {1: 0, 2: 0}
    assert run.console.text(1).count("secret intact") == ROUNDS
    assert counts(run.console.text()) == list(range(1, LINES + 1))


def error_text(res):
    return " | ".join(str(res.get(k, "")) for k in ("error", "source_error"))


# -------------------------------------------------------- secure: named failure
SECURE = [
    ("tamper", "failed authentication"),
    ("replay-record", "out of sequence"),
    ("replay-round", "out of sequence"),
    ("reorder", "out of sequence"),
    ("drop", "out of sequence"),
    ("duplicate", "out of sequence"),
    ("forge-commit", "COMMIT record number"),
    ("downgrade", "the source speaks plain mode"),
]


@pytest.mark.parametrize("name, expect", SECURE)
def test_the_secure_protocol_names_the_attack_and_one_copy_runs_on(tmp_path, name, expect):
    m, res, attack = attacked(name, Trust(tmp_path))
    assert attack.notes, "the attack never acted"
    assert expect in error_text(res)
    assert "incoming" not in res
    one_intact_copy(m, res)


def test_secure_forged_abort_is_rejected_and_only_the_destination_runs(tmp_path):
    m, res, attack = attacked("forge-abort", Trust(tmp_path))
    assert attack.notes
    assert "ABORT record number" in str(res["source_error"]) and "failed authentication" in str(res["source_error"])
    assert m.halted == MIGRATED and not m.protection._keys        # the source can never resume
    one_intact_copy(m, res)


def test_secure_delay_past_the_deadline_aborts_and_the_source_resumes(tmp_path):
    m, res, attack = attacked("delay", Trust(tmp_path), dest_timeout=2.0, delay=4.0)
    assert attack.notes
    assert "timed out" in str(res["error"])
    one_intact_copy(m, res)


def test_secure_eavesdropper_reads_nothing(tmp_path):
    m, res, attack = attacked("eavesdrop", Trust(tmp_path))
    f = analyse([raw for _, raw in attack.relay.seen])
    assert not f.state_readable and f.readable_pages == 0 and not f.secrets
    assert SECRET.encode() not in attack.relay.wire
    one_intact_copy(m, res)


# ---------------------------------------------------------- plain: the damage
def test_plain_eavesdropper_decrypts_the_protected_secret():
    m, res, attack = attacked("eavesdrop")
    f = analyse([raw for _, raw in attack.relay.seen])
    assert f.keys == 1 and any(SECRET in s for s in f.secrets)
    assert SECRET.encode() not in attack.relay.wire        # it was cloaked on the wire: the keys opened it


def test_plain_tamper_changes_what_the_destination_runs():
    m, res, attack = attacked("tamper")
    d = res["incoming"].machine
    assert "HACKED! " in d.console.text() and "HACKED! " not in m.console.text()


# The attacks that put an old version of the counter's page on the destination
# (replay-record, replay-round, drop) need the guest to run on during
# pre-copy, as it does in a VMM process: tests/migrate/test_lab_scenarios.py.


@pytest.mark.parametrize("name", ["reorder", "duplicate"])
def test_plain_reordered_or_duplicated_records_go_unnoticed(name):
    m, res, attack = attacked(name)
    assert attack.notes and res["report"].outcome == "completed"
    one_intact_copy(m, res)


@pytest.mark.parametrize("name", ["forge-commit", "forge-abort"])
def test_plain_forgery_makes_two_copies(name):
    m, res, attack = attacked(name)
    assert attack.notes
    d = res["incoming"].machine
    assert m.halted != MIGRATED                 # the source resumed its copy...
    assert counts(m.console.text())[-1] == LINES and counts(d.console.text())[-1] == LINES   # ...and both counted
