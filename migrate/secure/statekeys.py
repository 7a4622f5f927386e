"""Process keys in a saved state file, sealed to this host's TPM
(``minivmm.state.KeyWrap``; issue 13 item 4, issue 9 item 7).

``minivmm run --save-state`` / ``serve --save-state`` hand the state file's
secret part (the ``protection`` section: process keys and metadata) to
:class:`TpmKeyWrap`, which seals it to the role's TPM (``--tpm-dir``, default
``$MINIVMM_TPM_STATE/<role>``, created on first use as every VMM start does).
Blob (little-endian)::

    4   magic "MVSK"
    2   version (1)
    4   n: length of the sealed data key (<= 4096)
    n   TPM-sealed 32-byte AES key (``tpm.seal`` with no PCR policy: this TPM alone)
    ... AES-256-GCM(key, nonce 0, secret) with AAD = everything above || bound

``bound`` is the VM's identity and generation (``minivmm.state.identity_binding``):
edit them in the file and the keys do not open.  No PCR policy: a state file
must survive a VMM restart with another configuration (PCR 9) -- but not a
copy to another host, whose TPM has another storage key.  The data key is
fresh per file, so the all-zero nonce is used once.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from minivmm.errors import StateError

MAGIC = b"MVSK"
VERSION = 1
MAX_SEALED_KEY = 4096


class TpmKeyWrap:
    name = "tpm"

    def __init__(self, tpm_dir: Path | str):
        self.tpm_dir = Path(tpm_dir)

    def wrap(self, secret: bytes, bound: bytes) -> bytes:
        from tpm import SoftTpm
        key = os.urandom(32)
        sealed = SoftTpm.open(self.tpm_dir, startup=None).seal(key, None)   # created on first use
        head = MAGIC + VERSION.to_bytes(2, "little") + len(sealed).to_bytes(4, "little") + sealed
        return head + AESGCM(key).encrypt(bytes(12), secret, head + bound)

    def unwrap(self, blob: bytes, bound: bytes) -> bytes:
        from tpm import SoftTpm
        from tpm.errors import NoTpmStateError, TpmError
        if len(blob) < 10 or blob[:4] != MAGIC:
            raise StateError("sealed keys: not a minivmm TPM key wrap")
        if int.from_bytes(blob[4:6], "little") != VERSION:
            raise StateError(f"sealed keys: version {int.from_bytes(blob[4:6], 'little')}, this VMM reads {VERSION}")
        n = int.from_bytes(blob[6:10], "little")
        if n > MAX_SEALED_KEY or len(blob) < 10 + n + 16:
            raise StateError("sealed keys: truncated")
        head = blob[:10 + n]
        try:
            tpm = SoftTpm.open(self.tpm_dir, startup=None, create=False)
        except NoTpmStateError:
            raise StateError(f"its process keys are sealed to a TPM and there is none at {self.tpm_dir}: "
                             f"restore it on the host that saved it, with that TPM (--tpm-dir)") from None
        try:
            key = tpm.unseal(blob[10:10 + n])
        except TpmError as exc:
            raise StateError(f"the TPM at {self.tpm_dir} cannot unseal its process keys ({exc}): it was "
                             f"saved on another host or with another TPM (--tpm-dir)") from None
        try:
            return AESGCM(key).decrypt(bytes(12), blob[10 + n:], head + bound)
        except InvalidTag:
            raise StateError("its sealed process keys do not open for the VM identity and generation the "
                             "file names (edited, or corrupt): refused") from None
