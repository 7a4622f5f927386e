"""Seal / unseal bound to a PCR policy.

Sealing lets the TPM keep a secret that it releases only while the platform is in a
given measured state.  The state is expressed as a TPM 2.0 policy digest computed
exactly as TPM2_PolicyPCR extends a session's policyDigest (TPM 2.0 Part 3, 23.7)::

    policyDigest = SHA-256(0^32 || TPM_CC_PolicyPCR || TPML_PCR_SELECTION || pcrDigest)

with TPM_CC_PolicyPCR = 0x0000017F and pcrDigest = SHA-256 of the selected PCR
values in index order.  The data is encrypted with AES-256-GCM under the TPM's
internal storage key (it never leaves the state directory), and the whole header —
including the selection and the policy digest — is the AEAD associated data, so
the policy cannot be swapped without the tag failing.

Unseal recomputes the policy digest from the *current* PCRs and refuses (UnsealError)
unless it matches before it even tries to decrypt.  Extending any selected PCR after
sealing therefore makes the secret unavailable: a host whose measured state changed
between attestation and the moment a secret is needed gets nothing (TOCTOU defence).

Sealing with no PCR policy (``selection`` None: TPML_PCR_SELECTION with
count 0, policyDigest all zero) binds the data to this TPM alone, as a sealed
data object with an empty authPolicy would: any software on this host that can
use the TPM unseals it, nobody elsewhere can (saved machine states, whose
keys must survive a VMM restart with another configuration).

Blob layout (big-endian)::

    u32   magic         0x4D565342 ("MVSB")
    u16   version       1
    10|4  pcrSelect     TPML_PCR_SELECTION (count=1, sha256, 3-byte bitmap; or count=0: no policy)
    32    policyDigest
    12    iv            AES-GCM nonce (random per blob)
    u32+n ciphertext    AES-256-GCM(data) || 16-byte tag, data <= 64 KiB
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import FormatError, UnsealError
from .marshal import Reader, Writer
from .pcr import DIGEST_SIZE, ZERO_DIGEST, PcrSelection

TPM_CC_POLICY_PCR = 0x0000017F
SEAL_MAGIC = 0x4D565342  # "MVSB"
SEAL_VERSION = 1
IV_SIZE = 12
TAG_SIZE = 16
MAX_SEALED_DATA = 64 * 1024


def policy_pcr_digest(selection: PcrSelection, pcr_digest: bytes, previous: bytes = ZERO_DIGEST) -> bytes:
    """The policyDigest after TPM2_PolicyPCR(selection, pcr_digest) on a fresh trial session."""
    if len(pcr_digest) != DIGEST_SIZE or len(previous) != DIGEST_SIZE:
        raise ValueError("digests are 32 bytes")
    return hashlib.sha256(
        previous + TPM_CC_POLICY_PCR.to_bytes(4, "big") + selection.marshal_list() + pcr_digest
    ).digest()


NO_SELECTION = b"\0\0\0\0"      # TPML_PCR_SELECTION with count 0


@dataclass(frozen=True)
class SealedBlob:
    selection: PcrSelection | None     # None: no PCR policy (bound to the TPM only)
    policy_digest: bytes
    iv: bytes
    ciphertext: bytes

    def header(self) -> bytes:
        return (
            Writer()
            .u32(SEAL_MAGIC)
            .u16(SEAL_VERSION)
            .raw(self.selection.marshal_list() if self.selection is not None else NO_SELECTION)
            .raw(self.policy_digest)
            .raw(self.iv)
            .bytes()
        )

    def to_bytes(self) -> bytes:
        return Writer().raw(self.header()).blob32(self.ciphertext, MAX_SEALED_DATA + TAG_SIZE).bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> "SealedBlob":
        r = Reader(data, "sealed blob")
        r.expect(SEAL_MAGIC, r.u32("magic"), "magic")
        r.expect(SEAL_VERSION, r.u16("version"), "version")
        if bytes(data[r.offset:r.offset + 4]) == NO_SELECTION:
            r.raw(4, "pcrSelect.count")
            selection = None
        else:
            selection = PcrSelection.unmarshal_list(r)
        policy = r.raw(DIGEST_SIZE, "policyDigest")
        if selection is None and policy != bytes(DIGEST_SIZE):
            raise FormatError("sealed blob: a policy digest without a PCR selection")
        iv = r.raw(IV_SIZE, "iv")
        ct = r.blob32(MAX_SEALED_DATA + TAG_SIZE, "ciphertext")
        if len(ct) < TAG_SIZE:
            raise FormatError("sealed blob: ciphertext shorter than its tag")
        r.end()
        return cls(selection, policy, iv, ct)


def seal(storage_key: bytes, data: bytes, selection: PcrSelection | None, pcr_digest: bytes | None) -> bytes:
    """Encrypt ``data`` so that it unseals only while ``selection`` digests to
    ``pcr_digest`` (``selection`` None: no PCR policy, this TPM alone)."""
    if len(data) > MAX_SEALED_DATA:
        raise ValueError(f"can seal at most {MAX_SEALED_DATA} bytes")
    policy = bytes(DIGEST_SIZE) if selection is None else policy_pcr_digest(selection, pcr_digest)
    unsigned = SealedBlob(selection, policy, os.urandom(IV_SIZE), b"")
    ct = AESGCM(storage_key).encrypt(unsigned.iv, bytes(data), unsigned.header())
    return SealedBlob(unsigned.selection, unsigned.policy_digest, unsigned.iv, ct).to_bytes()


def unseal(storage_key: bytes, blob: bytes, current_pcr_digest) -> bytes:
    """Decrypt a sealed blob if the current PCRs satisfy its policy.

    ``current_pcr_digest(selection) -> bytes`` reads the TPM's PCRs *now*.
    """
    try:
        sealed = SealedBlob.from_bytes(blob)
    except FormatError as e:
        raise UnsealError(f"malformed sealed blob: {e}") from None
    if sealed.selection is not None and not hmac.compare_digest(
            policy_pcr_digest(sealed.selection, current_pcr_digest(sealed.selection)), sealed.policy_digest):
        raise UnsealError(
            f"PCR policy not satisfied: PCRs {sealed.selection} differ from their values at sealing"
        )
    try:
        return AESGCM(storage_key).decrypt(sealed.iv, sealed.ciphertext, sealed.header())
    except InvalidTag:
        raise UnsealError("sealed blob failed authentication (tampered, or sealed by another TPM)") from None
