"""The commit layer's formats, byte by byte (issue 19, seeded bugs).

Known answers rebuilt from the formats documented in migrate/secure/commit.py:
the COMMIT token, the migrated-away mark, and the one-shot sealed recovery
file, whose every truncation must be refused before anything is unsealed."""

import base64
import hashlib
import hmac
import json
import os
import stat
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from migrate.secure import commit
from migrate.secure.errors import BadToken
from tpm import SoftTpm
from tpm.errors import UnsealError

KEYS = SimpleNamespace(commit=b"\x05" * 32, transcript=b"\x06" * 32)


def test_commit_token_is_the_documented_hmac():
    want = hmac.new(KEYS.commit, b"minivmm-commit v1\0" + (32).to_bytes(4, "little") + KEYS.transcript,
                    hashlib.sha256).digest()
    assert commit.commit_token(KEYS) == want
    commit.check_commit(KEYS, want)


@pytest.mark.parametrize("body", [b"", b"\0" * 32, "short", "long", "other"])
def test_a_commit_token_must_be_exactly_this_sessions(body):
    good = commit.commit_token(KEYS)
    body = {"short": good[:31], "long": good + b"\0",
            "other": commit.commit_token(SimpleNamespace(commit=KEYS.commit, transcript=b"\x07" * 32))
            }.get(body, body)
    with pytest.raises(BadToken, match="does not verify"):
        commit.check_commit(KEYS, body)


def test_the_mark_goes_pending_then_migrated_away(tmp_path):
    vm = "ab" * 16
    mark = commit.MigrationMark(tmp_path / "marks", vm, 6)
    assert commit.read_mark(tmp_path / "marks", vm) is None
    mark.prepare()
    path = tmp_path / "marks" / f"migration-{vm}.mark"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_size == commit.MigrationMark.SIZE
    got = commit.read_mark(tmp_path / "marks", vm)
    assert (got["state"], got["vm_id"], got["generation"]) == ("pending", vm, 6)
    mark.commit(7, "10.0.0.2:7000", b"sealed keys")
    assert path.stat().st_size == commit.MigrationMark.SIZE
    got = commit.read_mark(tmp_path / "marks", vm)
    assert {k: got[k] for k in ("state", "vm_id", "generation", "to")} == {
        "state": "migrated-away", "vm_id": vm, "generation": 7, "to": "10.0.0.2:7000"}
    assert base64.b64decode(got["sealed_keys"]) == b"sealed keys"
    assert mark._fd is None                      # closed


def test_an_undone_mark_leaves_no_file(tmp_path):
    vm = "cd" * 16
    mark = commit.MigrationMark(tmp_path, vm, 1)
    mark.prepare()
    mark.undo()
    assert commit.read_mark(tmp_path, vm) is None and not list(tmp_path.iterdir())


def test_a_mark_too_large_is_refused(tmp_path):
    mark = commit.MigrationMark(tmp_path, "ef" * 16, 1)
    mark.prepare()
    with pytest.raises(ValueError, match="too large"):
        mark.commit(1, "x" * commit.MigrationMark.SIZE, b"")
    mark.close()
    assert commit.read_mark(tmp_path, "ef" * 16)["state"] == "pending"     # the old mark stands


# ------------------------------------------------------------- recovery file
def documented_recovery(tpm, state, name=b"recover-" + b"12" * 16):
    """magic || u32 len || TPM-sealed key || u8 len || counter name || u64 value || AES-GCM."""
    key = bytes(range(32))
    blob = tpm.seal(key, [8, 9, 10])
    head = (b"MVRECOV2" + len(blob).to_bytes(4, "little") + blob + bytes([len(name)]) + name
            + (tpm.counter_read(name.decode()) if name.isascii() else 0).to_bytes(8, "little"))
    return head, head + AESGCM(key).encrypt(bytes(12), state, head)


@pytest.fixture
def tpm(tmp_path):
    return SoftTpm.open(tmp_path / "tpm")


@pytest.mark.parametrize("spent", [0, 2])
def test_a_documented_recovery_file_opens_once(tmp_path, tpm, spent):
    for _ in range(spent):             # earlier recoveries of this VM: the file names the value now
        tpm.counter_increment("recover-" + "12" * 16)
    _, data = documented_recovery(tpm, b"the paused state")
    (tmp_path / "r").write_bytes(data)
    assert commit.open_recovery(tmp_path / "r", tpm) == b"the paused state"
    assert tpm.counter_read("recover-" + "12" * 16) == spent + 1
    with pytest.raises(ValueError, match="used before"):
        commit.open_recovery(tmp_path / "r", tpm)
    assert commit.recovery_counter("12" * 16) == "recover-" + "12" * 16


def test_every_truncation_of_a_recovery_file_is_refused(tmp_path, tpm):
    head, data = documented_recovery(tpm, b"")
    n = int.from_bytes(head[8:12], "little")
    m = head[12 + n]
    for cut in range(len(data)):
        (tmp_path / "r").write_bytes(data[:cut])
        # each field's bound, in order: magic and length, sealed key and name length,
        # name, value and the 16-byte tag
        expect = ("not a sealed" if cut < 12 else "truncated" if cut < 12 + n + 1 + m + 8 + 16
                  else "failed authentication")
        with pytest.raises(ValueError, match=expect):
            commit.open_recovery(tmp_path / "r", tpm)
    assert tpm.counter_read("recover-" + "12" * 16) == 0      # nothing was spent
    (tmp_path / "r").write_bytes(data)
    assert commit.open_recovery(tmp_path / "r", tpm) == b""   # the shortest whole file


@pytest.mark.parametrize("where", ["magic", "length", "name", "value", "body"])
def test_a_changed_recovery_file_is_refused(tmp_path, tpm, where):
    head, data = documented_recovery(tpm, b"state")
    n = int.from_bytes(head[8:12], "little")
    at = {"magic": 0, "length": 8, "name": 12 + n + 1, "value": len(head) - 8, "body": len(head) + 1}[where]
    bad = bytearray(data)
    bad[at] ^= {"length": 0x80}.get(where, 1)
    (tmp_path / "r").write_bytes(bytes(bad))
    expect = {"magic": "not a sealed", "length": "truncated"}.get(where, "failed authentication")
    with pytest.raises((ValueError, UnsealError), match=expect):
        commit.open_recovery(tmp_path / "r", tpm)
    assert tpm.counter_read("recover-" + "12" * 16) == 0


def test_a_huge_sealed_key_length_is_refused_before_reading_it(tmp_path, tpm):
    n = (1 << 16) + 1                  # the file is long enough: the bound alone refuses it
    (tmp_path / "r").write_bytes(b"MVRECOV2" + n.to_bytes(4, "little") + bytes(n + 100))
    with pytest.raises(ValueError, match="truncated"):
        commit.open_recovery(tmp_path / "r", tpm)


def test_a_recovery_counter_name_must_be_ascii(tmp_path, tpm):
    _, data = documented_recovery(tpm, b"s", name=b"recover-\xff")
    (tmp_path / "r").write_bytes(data)
    with pytest.raises(ValueError, match="bad recovery counter name"):
        commit.open_recovery(tmp_path / "r", tpm)


def test_a_sealed_key_of_the_bound_itself_goes_to_the_tpm(tmp_path, tpm):
    n = 1 << 16                        # the largest sealed-key length read: the TPM judges it
    (tmp_path / "r").write_bytes(b"MVRECOV2" + n.to_bytes(4, "little") + bytes(n + 100))
    with pytest.raises(UnsealError):
        commit.open_recovery(tmp_path / "r", tpm)


# ------------------------------------------------- the mark's file, more (issue 19, seeded bugs)
VM = "ab" * 16


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_a_mark_keeps_one_descriptor_while_pending_and_none_after(tmp_path):
    """prepare opens the file once (the in-place rewrite at commit needs no new
    open); commit and undo close it; an undo after the mark was closed opens
    it again to write ``aborted`` (a crash between the two leaves that), and
    closes it.  Its directory is made on first use, parents too."""
    before = open_fds()
    mark = commit.MigrationMark(tmp_path / "state" / "source", VM, 3)
    mark.prepare()
    assert open_fds() == before + 1
    mark.commit(3, "10.0.0.2:7000", b"k")
    assert open_fds() == before
    assert commit.read_mark(tmp_path / "state" / "source", VM)["state"] == "migrated-away"
    mark.undo()                                  # after close
    assert open_fds() == before and commit.read_mark(tmp_path / "state" / "source", VM) is None


@pytest.mark.parametrize("first", ["commit", "undo-fails-to-unlink"])
def test_a_mark_is_0600_whichever_write_creates_it(tmp_path, first, monkeypatch):
    mark = commit.MigrationMark(tmp_path, VM, 3)
    path = tmp_path / f"migration-{VM}.mark"
    if first == "commit":
        mark.commit(3, "10.0.0.2:7000", b"k")
        want = "migrated-away"
    else:
        monkeypatch.setattr(commit.Path, "unlink", lambda self: (_ for _ in ()).throw(PermissionError()))
        mark.undo()                              # an aborted mark the unlink could not remove
        want = "aborted"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_size == commit.MigrationMark.SIZE
    assert commit.read_mark(tmp_path, VM)["state"] == want


def test_a_mark_of_exactly_the_file_size_is_written_and_one_byte_more_is_not(tmp_path, monkeypatch):
    monkeypatch.setattr(commit.time, "time", lambda: 1.5)          # a fixed-length "at"
    size = commit.MigrationMark.SIZE
    doc = {"at": 1.5, "generation": 3, "sealed_keys": "", "state": "migrated-away", "to": "", "vm_id": VM}
    peer = "p" * (size - len(json.dumps(doc, sort_keys=True)))
    mark = commit.MigrationMark(tmp_path, VM, 3)
    mark.prepare()
    mark.commit(3, peer, b"")
    assert commit.read_mark(tmp_path, VM)["to"] == peer
    assert (tmp_path / f"migration-{VM}.mark").read_bytes()[-1:] == b"}"   # no padding left
    again = commit.MigrationMark(tmp_path, VM, 3)
    again.prepare()
    with pytest.raises(ValueError, match="too large"):
        again.commit(3, peer + "p", b"")
    again.close()


# -------------------------------------------- a recovery file written by seal_recovery
@pytest.fixture(scope="module")
def keeper_image():
    from guests.build import Program, build_image
    return build_image([Program.builtin("keeper", data_pages=3, args=(30, 1))], name="k")


def test_seal_recovery_writes_the_documented_file_holding_the_whole_paused_vm(tmp_path, tpm, keeper_image):
    """The source's side of the recovery file: the paused VM (running, not
    "migrated"; RAM and process keys included), sealed under the counter of
    *this* VM at its value now; the keys are destroyed again after the save."""
    from minivmm.machine import Machine
    m = Machine(keeper_image)
    m.run(max_ticks=6)
    keys = dict(m.protection._keys)
    assert keys
    m.migration_identity = (VM, 2)
    want = m.save_state(ram=True).to_bytes()
    tpm.counter_increment(commit.recovery_counter(VM))             # an earlier recovery of this VM
    escrow = commit.escrow_keys(m, tpm)
    commit.destroy_keys(m)
    m.halted, m.halt_detail = "migrated", "committed to b"
    path = commit.seal_recovery(m, tpm, escrow, tmp_path / "vm.sealed")
    assert path == tmp_path / "vm.sealed" and sorted(p.name for p in tmp_path.iterdir()) == ["tpm", "vm.sealed"]
    assert (m.halted, m.halt_detail) == ("migrated", "committed to b") and not m.protection._keys
    data = path.read_bytes()
    assert data[:8] == b"MVRECOV2"
    n = int.from_bytes(data[8:12], "little")
    at = 12 + n
    name = data[at + 1:at + 1 + data[at]]
    assert name == f"recover-{VM}".encode()
    assert int.from_bytes(data[at + 1 + data[at]:at + 9 + data[at]], "little") == 1
    key = tpm.unseal(data[12:12 + n])
    assert len(key) == 32
    assert AESGCM(key).decrypt(bytes(12), data[at + 9 + data[at]:], data[:at + 9 + data[at]]) == want
    assert commit.open_recovery(path, tpm) == want
    tpm.extend(9, bytes(32))                     # the measured state changed: the key stays sealed
    with pytest.raises(UnsealError):
        tpm.unseal(data[12:12 + n])


def test_escrowed_keys_come_back_and_the_protected_process_runs_on(tmp_path, tpm, keeper_image):
    """An aborted commit: the keys sealed to this TPM come back (keys and
    ciphers), and the protected process reads its secret to the end; once
    the measured state changed, the escrow stays shut."""
    from minivmm.machine import Machine
    m = Machine(keeper_image)
    m.run(max_ticks=6)
    keys = dict(m.protection._keys)
    escrow = commit.escrow_keys(m, tpm)
    commit.destroy_keys(m)
    assert not m.protection._keys and not m.protection._ciphers
    commit.restore_keys(m, tpm, escrow)
    assert m.protection._keys == keys
    m.run(max_ticks=100_000)
    assert m.exits == {1: 0} and m.console.text(1).count("secret intact") == 30
    tpm.extend(10, bytes(32))
    with pytest.raises(UnsealError):
        commit.restore_keys(m, tpm, escrow)


def test_the_mark_and_the_recovery_file_are_on_disk_before_they_count(tmp_path, tpm, keeper_image, monkeypatch):
    """Durability, seen from the system calls: prepare syncs the file and its
    directory, commit and undo sync the file (``fdatasync``) with the new
    text already in it, and seal_recovery syncs the whole file before it is
    renamed into place."""
    from minivmm.machine import Machine
    synced = []

    def spy(real, how):
        def call(fd):
            target = os.readlink(f"/proc/self/fd/{fd}")
            size = os.fstat(fd).st_size
            text = open(target, "rb").read() if os.path.isfile(target) else b""
            synced.append((how, os.path.basename(target), size, text))
            return real(fd)
        return call
    monkeypatch.setattr(commit.os, "fsync", spy(os.fsync, "fsync"))
    monkeypatch.setattr(commit.os, "fdatasync", spy(os.fdatasync, "fdatasync"))
    mark = commit.MigrationMark(tmp_path / "marks", VM, 3)
    name = f"migration-{VM}.mark"
    mark.prepare()
    assert [(h, n, s) for h, n, s, _ in synced] == [("fsync", name, commit.MigrationMark.SIZE),
                                                   ("fsync", "marks", synced[1][2])]
    assert b'"state": "pending"' in synced[0][3]
    synced.clear()
    mark.commit(3, "b", b"k")
    assert [(h, n) for h, n, _, _ in synced] == [("fdatasync", name)] and b"migrated-away" in synced[0][3]
    synced.clear()
    mark.undo()
    assert [(h, n) for h, n, _, _ in synced] == [("fdatasync", name)] and b'"aborted"' in synced[0][3]
    synced.clear()
    m = Machine(keeper_image)
    m.run(max_ticks=6)
    escrow = commit.escrow_keys(m, tpm)
    commit.destroy_keys(m)
    path = commit.seal_recovery(m, tpm, escrow, str(tmp_path / "vm.sealed"))   # the CLI passes a str
    assert [(h, n, s) for h, n, s, _ in synced] == [("fsync", "vm.sealed.tmp", path.stat().st_size)]
