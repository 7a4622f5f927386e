"""Key release (DESIGN §6, obligations 3 and 4: protected content, TOCTOU).

Process keys and protection metadata (the *secret part* of the state
document) leave the source only here, at the end, after the destination has
proved a second time -- a fresh quote over a fresh source nonce, inside the
sealed channel -- that its measured state is the one attested in the
handshake.  They are wrapped so that the destination can only open them
while its PCRs still hold those values:

1. the destination makes a one-off X25519 *release key*, seals its private half
   to its TPM under a PCR policy over PCRs 8-10 (``SoftTpm.seal``), and quotes
   with qualifying data ``bind_nonce(fresh_nonce, transcript || R)`` (R = the
   release public key), so the quote vouches for R;
2. the source verifies that quote (``attest.py``), checks that the same AK
   reports the same PCR values as in the handshake, and only then sends
   ``E || AES-256-GCM(k, secret)`` with ``k = HKDF(X25519(e, R) || release key
   of the session, salt = transcript, info = label || R || E)``;
3. the destination asks its TPM to unseal the release private key -- refused
   (``UnsealError``) if any of PCRs 8-10 changed after the quote, or if the TPM
   was reset or restarted since the seal (which can bring the same PCR values
   back) -- and decrypts.

This is the "equivalent you justify" of a TPM-resident decryption key with a
PCR policy: the soft TPM has no asymmetric decrypt, so the private half lives
sealed under the PCR policy and is unsealed only for the one decryption.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tpm import errors as tpm_errors

from migrate.errors import ProtocolError
from migrate.secure.attest import QUOTED_PCRS
from migrate.secure.errors import KeyReleaseRefused
from migrate.secure.keyschedule import public_bytes

LABEL = b"minivmm-key-release v1"
PUB = 32
ZERO_NONCE = bytes(12)          # each wrap key is used exactly once


def _wrap_key(shared: bytes, session_release: bytes, transcript: bytes, r_pub: bytes, e_pub: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=transcript,
                info=LABEL + r_pub + e_pub).derive(shared + session_release)


def binding(transcript: bytes, r_pub: bytes) -> bytes:
    """What the final quote binds besides the fresh nonce."""
    return transcript + r_pub


class ReleaseKey:
    """The destination's one-off release key; private half TPM-sealed to PCRs 8-10."""

    def __init__(self, tpm, *, seal: bool = True):
        private = X25519PrivateKey.generate()
        self.public = public_bytes(private.public_key())
        raw = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
        self._tpm = tpm
        # --insecure toctou keeps the private half in memory instead.
        self._boot = _boot(tpm) if seal else None
        self._blob = tpm.seal(raw, list(QUOTED_PCRS)) if seal else None
        self._raw = None if seal else raw

    def open(self, body: bytes, keys) -> bytes:
        """Decrypt KEY_RELEASE's body: E || ciphertext."""
        if len(body) < PUB + 16:
            raise ProtocolError(f"KEY_RELEASE of {len(body)} bytes is too short")
        e_pub, sealed = bytes(body[:PUB]), bytes(body[PUB:])
        if self._blob is not None:
            try:
                raw = self._tpm.unseal(self._blob)
            except tpm_errors.UnsealError as exc:
                raise KeyReleaseRefused(f"this TPM refuses to unseal the release key: the PCRs changed "
                                        f"since the final quote ({exc})") from None
            # The PCR policy alone holds again after a TPM Reset and the same
            # measured start (PCRs cleared, something unapproved run, the attested
            # VMM measured again): the key opens only in the boot it was sealed
            # in.  Checked after the unseal: the counts never go back, so equal
            # now means no reset or restart since the seal.  (A hardware TPM
            # would put this in the sealed object's policy: TPM2_PolicyCounterTimer
            # on resetCount and restartCount.)
            if _boot(self._tpm) != self._boot:
                raise KeyReleaseRefused("this TPM refuses to open the release key: the TPM was reset or "
                                        "restarted since the release key was sealed (its PCRs were cleared "
                                        "and measured again)")
        else:
            raw = self._raw
        try:
            shared = X25519PrivateKey.from_private_bytes(raw).exchange(X25519PublicKey.from_public_bytes(e_pub))
        except ValueError as exc:
            raise ProtocolError(f"KEY_RELEASE: bad key share ({exc})") from None
        key = _wrap_key(shared, keys.release, keys.transcript, self.public, e_pub)
        try:
            return AESGCM(key).decrypt(ZERO_NONCE, sealed, keys.transcript + self.public)
        except InvalidTag:
            raise KeyReleaseRefused("KEY_RELEASE failed authentication (not wrapped for this release key)") \
                from None


def _boot(tpm) -> tuple[int, int]:
    """Which boot of the TPM this is: (resetCount, restartCount)."""
    info = tpm.clock_info()
    return info.reset_count, info.restart_count


def wrap(secret: bytes, r_pub: bytes, keys) -> bytes:
    """The source's side: KEY_RELEASE body for the destination's release key ``r_pub``."""
    e = X25519PrivateKey.generate()
    e_pub = public_bytes(e.public_key())
    try:
        shared = e.exchange(X25519PublicKey.from_public_bytes(r_pub))
    except ValueError as exc:
        raise ProtocolError(f"FINAL_QUOTE: bad release key ({exc})") from None
    key = _wrap_key(shared, keys.release, keys.transcript, r_pub, e_pub)
    return e_pub + AESGCM(key).encrypt(ZERO_NONCE, secret, keys.transcript + r_pub)


def fresh_nonce() -> bytes:
    return os.urandom(32)
