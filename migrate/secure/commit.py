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
    prot = machine.protection
    keys = prot._keys
    for h in list(keys):
        keys[h] = bytes(len(keys[h]))       # overwrite, then drop
    keys.clear()
    prot._ciphers.clear()


def restore_keys(machine, tpm, blob: bytes) -> None:
    """Undo :func:`escrow_keys` + :func:`destroy_keys` (the destination proved it will not resume)."""
    doc = json.loads(tpm.unseal(blob))
    keys = {int(h): base64.b64decode(k) for h, k in doc.items()}
    prot = machine.protection
    prot._keys.update(keys)
    prot._ciphers.update({h: PageCipher(k) for h, k in keys.items()})


def unmark(directory: Path | str, vm_id: str) -> None:
    try:
        (Path(directory) / f"migrated-away-{vm_id}.json").unlink()
    except OSError:
        pass


def mark_migrated_away(directory: Path | str, vm_id: str, generation: int, peer: str) -> Path:
    """Durably record that this VM left (written and fsync'ed before COMMIT)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"migrated-away-{vm_id}.json"
    tmp = path.with_suffix(".tmp")
    data = json.dumps({"vm_id": vm_id, "generation": generation, "to": peer, "at": time.time()}).encode()
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def migrated_away(directory: Path | str, vm_id: str) -> dict | None:
    path = Path(directory) / f"migrated-away-{vm_id}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
