"""Resumption order (DESIGN §6, obligation 6): who runs, decided here alone.

* The source, before it sends COMMIT, destroys its process keys (the
  machine's protection forgets them; the guest's protected pages in its RAM are
  ciphertext nobody here can open again) and durably marks the VM
  migrated-away: a mark file, fsync'ed, that names the VM, its generation and
  the destination.  Only then is COMMIT sent -- with a token
  ``HMAC(commit key, "commit" || transcript)`` the destination checks.
* The destination resumes only after a COMMIT whose token verifies (and that
  arrived in the sealed channel).
* Before COMMIT, ABORT from either side is a sealed record: nobody without
  the session keys can forge one, so a forged ABORT cannot make the source
  resume a guest the destination runs, nor a forged RESUMED make it believe
  the destination runs one it discarded.
* A commit whose confirmation never arrives: the source's copy stays dead;
  its recovery file (the paused state) is sealed to this host's TPM
  (``seal_recovery``) so that its process keys are never on disk in clear.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from minivmm.cloak import PageCipher
from migrate.secure.attest import QUOTED_PCRS
from migrate.secure.errors import BadToken
from migrate.secure.keyschedule import mac, mac_equal

TOKEN = 32


def commit_token(keys) -> bytes:
    return mac(keys.commit, b"minivmm-commit v1\0", keys.transcript)


def check_commit(keys, body: bytes) -> None:
    if len(body) != TOKEN or not mac_equal(bytes(body), commit_token(keys)):
        raise BadToken("COMMIT token does not verify: not from this session's source")


def escrow_keys(machine, tpm) -> bytes:
    """Seal ``machine``'s process keys to this host's TPM (PCRs 8-10), then forget
    them (:func:`destroy_keys`).  Returns the sealed blob: the only way back to the keys,
    through this TPM while this VMM's measured state is unchanged (an aborted
    commit, or an operator's recovery after an unconfirmed one).

    Reaches into ``Protection``'s key table (``_keys``/``_ciphers``): minivmm has
    no public "forget keys" call, and migrate may not change minivmm here."""
    prot = machine.protection
    keys = prot._keys
    doc = json.dumps({str(h): base64.b64encode(k).decode() for h, k in keys.items()}).encode()
    return tpm.seal(doc, list(QUOTED_PCRS))


def destroy_keys(machine) -> None:
    """Forget every process key in the VMM (overwrite, then drop)."""
    machine.protection.forget_keys()


def restore_keys(machine, tpm, blob: bytes) -> None:
    """Undo :func:`escrow_keys` + :func:`destroy_keys` (the destination proved it will not resume)."""
    doc = json.loads(tpm.unseal(blob))
    keys = {int(h): base64.b64decode(k) for h, k in doc.items()}
    prot = machine.protection
    prot._keys.update(keys)
    prot._ciphers.update({h: PageCipher(k) for h, k in keys.items()})


class MigrationMark:
    """The durable migrated-away mark of one VM on the source host.

    A fixed-size file, created and fsync'ed (file and directory) at the
    handshake as ``pending``, outside the downtime; at commit it is rewritten
    in place as ``migrated-away`` -- generation, destination, and the process
    keys *sealed to this host's TPM* (the only way back to them) -- with one
    ``fdatasync`` (~2 ms here, against ~10 ms for a new file).  After a crash:
    ``migrated-away`` means the VM left (never resume it here), ``pending``
    means ask the destination first, ``aborted`` or no file means it never left.
    ``migrate.secure.rollback.check_restore`` reads it: a state of the VM older
    than the marked generation is never resumed here.
    """
    SIZE = 16384

    def __init__(self, directory: Path | str, vm_id: str, generation: int):
        self.directory = Path(directory)
        self.path = self.directory / f"migration-{vm_id}.mark"
        self.vm_id = vm_id
        self.generation = generation
        self._fd = None

    def _write(self, doc: dict, *, sync) -> None:
        data = json.dumps(doc, sort_keys=True).encode()
        if len(data) > self.SIZE:
            raise ValueError("migration mark too large")
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.pwrite(self._fd, data.ljust(self.SIZE, b" "), 0)
        sync(self._fd)

    def prepare(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self._write({"state": "pending", "vm_id": self.vm_id, "generation": self.generation, "at": time.time()},
                    sync=os.fsync)
        dfd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def commit(self, generation: int, peer: str, sealed_keys: bytes) -> None:
        self._write({"state": "migrated-away", "vm_id": self.vm_id, "generation": generation, "to": peer,
                     "at": time.time(), "sealed_keys": base64.b64encode(sealed_keys).decode()},
                    sync=os.fdatasync)
        self.close()

    def undo(self) -> None:
        self._write({"state": "aborted", "vm_id": self.vm_id, "at": time.time()}, sync=os.fdatasync)
        self.close()
        try:
            self.path.unlink()
        except OSError:
            pass

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_mark(directory: Path | str, vm_id: str) -> dict | None:
    try:
        return json.loads((Path(directory) / f"migration-{vm_id}.mark").read_bytes().rstrip(b" "))
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------ recovery
RECOVERY_MAGIC = b"MVRECOV2"


def recovery_counter(vm_id: str) -> str:
    """The TPM NV counter that makes a VM's recovery file good for one use."""
    return f"recover-{vm_id}"


def seal_recovery(machine, tpm, escrow: bytes, path: Path | str) -> Path:
    """After an unconfirmed commit: write the paused VM, process keys included,
    so that only this host's TPM (while PCRs 8-10 are unchanged) can open it,
    and only once: ``magic || u32 len || TPM-sealed AES key || u8 len ||
    counter name || u64 value || AES-256-GCM(state file bytes)`` with
    everything before the ciphertext as associated data.  The file names the
    value of the VM's recovery counter now; opening it advances the counter,
    so a second open of the file (or of a copy) is refused -- a recovery file
    is a way to resume one copy, not many.  The keys come back from the
    escrow for the save and are destroyed again."""
    restore_keys(machine, tpm, escrow)
    halted, detail = machine.halted, machine.halt_detail
    machine.halted, machine.halt_detail = None, ""
    try:
        data = machine.save_state(ram=True).to_bytes()
    finally:
        machine.halted, machine.halt_detail = halted, detail
        destroy_keys(machine)
    vm_id = (getattr(machine, "migration_identity", None) or (os.urandom(16).hex(), 0))[0]
    name = recovery_counter(vm_id).encode()
    key = os.urandom(32)
    blob = tpm.seal(key, list(QUOTED_PCRS))
    head = (RECOVERY_MAGIC + len(blob).to_bytes(4, "little") + blob + bytes([len(name)]) + name
            + tpm.counter_read(name.decode()).to_bytes(8, "little"))
    sealed = AESGCM(key).encrypt(bytes(12), data, head)
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(head + sealed)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def open_recovery(path: Path | str, tpm) -> bytes:
    """The state file bytes of a sealed recovery file; raises ``ValueError`` if
    it is malformed, fails authentication or was opened before, and the TPM's
    error if this TPM (or its PCRs) refuses.  Advances the VM's recovery
    counter first: a second open of the file, or of a copy, is refused."""
    data = Path(path).read_bytes()
    if data[:8] != RECOVERY_MAGIC or len(data) < 12:
        raise ValueError(f"{path}: not a sealed minivmm recovery file (of this version)")
    n = int.from_bytes(data[8:12], "little")
    if n > 1 << 16 or len(data) < 12 + n + 1:
        raise ValueError(f"{path}: truncated recovery file")
    at = 12 + n
    m = data[at]
    if len(data) < at + 1 + m + 8 + 16:
        raise ValueError(f"{path}: truncated recovery file")
    try:
        name = data[at + 1:at + 1 + m].decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: bad recovery counter name") from None
    value = int.from_bytes(data[at + 1 + m:at + 9 + m], "little")
    head = data[:at + 9 + m]
    key = tpm.unseal(data[12:12 + n])
    try:
        state = AESGCM(key).decrypt(bytes(12), data[at + 9 + m:], head)
    except InvalidTag:
        raise ValueError(f"{path}: recovery file failed authentication") from None
    if tpm.counter_read(name) != value:
        raise ValueError(f"{path}: this recovery file was used before: it resumes a VM once, "
                         f"never a second copy")
    tpm.counter_increment(name)
    return state
