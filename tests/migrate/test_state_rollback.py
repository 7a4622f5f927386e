"""Rollback (issue 13 item 6): an old state file of a VM that has since
migrated away -- to B, or A -> B -> A -- cannot be migrated again, nor resumed
on the host it left; and the identity in the file cannot be edited to escape.
In one process, real TPM state on disk, real loopback TCP."""

import base64
import hashlib
import json

import pytest

from migrate.secure.errors import OldCopy, StaleGeneration
from migrate.secure.rollback import check_restore
from migrate.secure.statekeys import TpmKeyWrap
from migrate.source import MIGRATED
from minivmm.errors import StateError
from minivmm.machine import Machine
from minivmm.state import HEADER

from securehelp import Trust, secure_receive_in_thread
from inproc import BOUNDED
from test_secure_attacks import guest, migrate


def hop(src_mode, dst_factory, m):
    """Migrate ``m``; the destination resumes it and does not run it (it goes on)."""
    from migrate.secure.channel import SealedChannel
    from migrate.server import Server
    from migrate.source import Source
    server = Server("127.0.0.1:0", timeout=5, channel=lambda sock, timeout: SealedChannel(
        sock, timeout=timeout, role="destination"))
    res = {}
    t = secure_receive_in_thread(server, res, dst_factory, timeout=5, run_ticks=None)
    res["report"] = Source(m, mode=src_mode, timeout=5, policy=BOUNDED).migrate(server.label)
    t.join(60)
    server.close()
    return res["incoming"].machine


def edit_doc(path, change):
    """Rewrite a state file's JSON section (checksum made good again): a host
    admin with a text editor."""
    data = path.read_bytes()
    magic, version, res, json_len, ram_len, ram_size, _ = HEADER.unpack_from(data)
    doc = json.loads(data[HEADER.size:HEADER.size + json_len])
    change(doc)
    blob = json.dumps(doc, sort_keys=True).encode()
    body = blob + data[HEADER.size + json_len:]
    path.write_bytes(HEADER.pack(magic, version, res, len(blob), ram_len, ram_size,
                                 hashlib.sha256(body).digest()) + body)


@pytest.fixture
def hosts(tmp_path):
    trust = Trust(tmp_path)
    return trust, trust.host("a"), trust.host("b", role="destination")


def test_an_old_state_of_a_vm_that_migrated_away_is_refused_everywhere(tmp_path, hosts):
    trust, a, b = hosts
    m = guest()
    old = tmp_path / "old.mvstate"
    m.save(old, wrap=TpmKeyWrap(a))                      # generation 0, keys sealed to A's TPM
    vm_id = m.migration_identity[0]
    m, res = migrate(trust, trust.mode(a), lambda: trust.mode(b), m)
    assert res["report"].outcome == "completed" and m.halted == MIGRATED
    on_b = res["incoming"].machine
    assert on_b.migration_identity == (vm_id, 1)

    # A refuses to migrate the old copy again (its mark, before anything is sent) ...
    copy = Machine.load(old, unwrap=TpmKeyWrap(a))
    assert copy.migration_identity == (vm_id, 0)
    copy, res = migrate(trust, trust.mode(a), lambda: trust.mode(b), copy)
    assert isinstance(res["source_error"], OldCopy) and "marked migrated-away" in str(res["source_error"])
    # ... and a VMM that does not know the VM left (host C: no mark, its own TPM;
    # it got the copy's keys as A's administrator could) is refused by B.
    c = trust.host("c")
    copy, res = migrate(trust, trust.mode(c), lambda: trust.mode(b), copy)
    assert isinstance(res["error"], StaleGeneration), res
    assert "generation 1 is not newer than 1" in str(res["error"])
    assert copy.halted is None                          # the source keeps its (old) copy

    # A refuses to resume it: the durable mark, then (mark deleted) its TPM.
    with pytest.raises(OldCopy, match=r"marked migrated-away from this host .* at generation 1 .*"
                                      r"generation 0, an older copy.*minivmm recover"):
        check_restore(Machine.load(old, unwrap=TpmKeyWrap(a)), a, str(old))
    (a / f"migration-{vm_id}.mark").unlink()
    with pytest.raises(OldCopy, match="stale state: .* generation 0, but this host's TPM .* has seen "
                                         "generation 1"):
        check_restore(Machine.load(old, unwrap=TpmKeyWrap(a)), a, str(old))


def test_after_a_to_b_to_a_the_old_state_is_refused_by_both(tmp_path, hosts):
    trust, a, b = hosts
    m = guest()
    old = tmp_path / "old.mvstate"
    m.save(old, wrap=TpmKeyWrap(a))
    on_b = hop(trust.mode(a), lambda: trust.mode(b), m)
    home = hop(trust.mode(b), lambda: trust.mode(a), on_b)                    # B -> A
    assert home.migration_identity[1] == 2
    check_restore(home, a, "the VM back on A")                 # the current copy is fine
    for dst in (a, b):
        c = trust.host(f"c-{dst.name}")     # a host that does not know the VM (A refuses it itself)
        copy = Machine.load(old, unwrap=TpmKeyWrap(a))
        copy, res = migrate(trust, trust.mode(c), lambda: trust.mode(dst), copy)
        assert isinstance(res["error"], StaleGeneration), res
        assert "generation 1 is not newer than 2" in str(res["error"])


@pytest.mark.parametrize("field", ["vm_id", "generation"])
def test_an_identity_edited_in_the_file_opens_no_keys(tmp_path, hosts, field):
    trust, a, b = hosts
    m = guest()
    path = tmp_path / "s.mvstate"
    m.save(path, wrap=TpmKeyWrap(a))
    fresh = {"vm_id": "0" * 32, "generation": 7}[field]
    edit_doc(path, lambda doc: doc["identity"].update({field: fresh}))
    with pytest.raises(StateError, match="do not open for the VM identity and generation"):
        Machine.load(path, unwrap=TpmKeyWrap(a))


def test_a_saved_state_holds_no_process_key_and_opens_only_with_its_tpm(tmp_path, hosts):
    trust, a, b = hosts
    m = guest()
    keys = list(m.protection._keys.values())
    assert keys
    path = tmp_path / "s.mvstate"
    with pytest.raises(StateError, match="never written to a file in clear"):
        m.save(path)
    assert not path.exists()
    m.save(path, wrap=TpmKeyWrap(a))
    data = path.read_bytes()
    for k in keys:
        assert k not in data and base64.b64encode(k) not in data
    again = Machine.load(path, unwrap=TpmKeyWrap(a))
    assert again.save_state().to_doc() == m.save_state().to_doc()
    assert again.protection._keys == m.protection._keys
    with pytest.raises(StateError, match="cannot unseal its process keys"):
        Machine.load(path, unwrap=TpmKeyWrap(b))            # another host's TPM
    with pytest.raises(StateError, match="there is none at"):
        Machine.load(path, unwrap=TpmKeyWrap(tmp_path / "no-tpm"))
    with pytest.raises(StateError, match="process keys are sealed"):
        Machine.load(path)
    edit_doc(path, lambda doc: doc["sealed"].update(blob=base64.b64encode(b"MVSK\1\0" + (5000).to_bytes(4, "little") + bytes(40)).decode()))
    with pytest.raises(StateError, match="sealed keys: truncated"):
        Machine.load(path, unwrap=TpmKeyWrap(a))


def test_a_guest_without_process_keys_needs_no_tpm(tmp_path):
    from guests.build import Program, build_image
    m = Machine(build_image([Program.builtin("counter", args=(3, 1000))]))
    m.run(max_ticks=3)
    path = tmp_path / "c.mvstate"
    m.save(path, wrap=None)
    again = Machine.load(path)
    assert again.migration_identity == m.migration_identity
    assert again.save_state().to_doc() == m.save_state().to_doc()
    assert not (tmp_path / ".minivmm-tpm").exists()


def test_a_state_whose_identity_is_not_the_one_hello_announced_is_refused(hosts):
    """The identity travels twice (HELLO, authenticated by the transcript; the
    state document): a source cannot announce one generation and hand over
    a VM that carries another."""
    from migrate.secure.mode import SecureMode

    class Relabels(SecureMode):
        def split_state(self, doc):
            public, secret = super().split_state(doc)
            public["identity"] = {"vm_id": "0" * 32, "generation": 9}
            return public, secret

    trust, a, b = hosts
    m, res = migrate(trust, Relabels(trust.mode(a).attestor), lambda: trust.mode(b))
    assert "not the ones HELLO announced" in str(res["error"]), res
    assert m.halted is None and "incoming" not in res
