"""The key schedule: ephemeral X25519, transcript hash, HKDF-SHA256.

Each side sends one KEY_SHARE (its X25519 public key and a 32-byte nonce).
The transcript hash covers, in order, a label, the HELLO body and both
KEY_SHARE bodies, so the keys (and the quotes, which bind this hash) belong to
this session and to nobody else's key shares::

    th     = SHA-256("minivmm-secure-transcript v1\\0" || u32 len || HELLO
                     || KEY_SHARE(source) || KEY_SHARE(destination))
    secret = X25519(own private, peer public)        (all-zero result refused)
    okm    = HKDF-SHA256(ikm=secret, salt=th, info="minivmm-secure-keys v1", L=128)
    s2d | d2s | release | commit = okm[0:32] | okm[32:64] | okm[64:96] | okm[96:128]

``s2d``/``d2s``: AES-256-GCM record keys, one per direction;
``release``: mixed into the key-release wrap (``keyrelease.py``);
``commit``: HMAC-SHA256 key of the COMMIT and ABORT tokens (``commit.py``).
Nothing here is hand-written cryptography: ``cryptography``'s primitives.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from migrate.errors import ProtocolError

SHARE_SIZE = 32
NONCE_SIZE = 32
KEY_SHARE_SIZE = SHARE_SIZE + NONCE_SIZE
TRANSCRIPT_LABEL = b"minivmm-secure-transcript v1\0"
KEYS_INFO = b"minivmm-secure-keys v1"


def public_bytes(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class KeyShare:
    public: bytes       # X25519 public key, 32 bytes
    nonce: bytes        # fresh 32 bytes: the peer's quote must bind it

    def encode(self) -> bytes:
        return self.public + self.nonce

    @classmethod
    def decode(cls, body: bytes) -> "KeyShare":
        if len(body) != KEY_SHARE_SIZE:
            raise ProtocolError(f"KEY_SHARE of {len(body)} bytes, expected {KEY_SHARE_SIZE}")
        return cls(bytes(body[:SHARE_SIZE]), bytes(body[SHARE_SIZE:]))


class Ephemeral:
    """One side's ephemeral key pair and nonce (used for one session only)."""

    def __init__(self):
        self._private = X25519PrivateKey.generate()
        self.share = KeyShare(public_bytes(self._private.public_key()), os.urandom(NONCE_SIZE))

    def exchange(self, peer_public: bytes) -> bytes:
        try:
            secret = self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as exc:       # a low-order point gives an all-zero secret
            raise ProtocolError(f"KEY_SHARE: peer key share refused ({exc})") from None
        self._private = None            # used once
        return secret


def transcript_hash(*parts: bytes) -> bytes:
    h = hashlib.sha256(TRANSCRIPT_LABEL)
    for p in parts:
        h.update(struct.pack("<I", len(p)))
        h.update(p)
    return h.digest()


@dataclass(frozen=True)
class SessionKeys:
    transcript: bytes
    s2d: bytes
    d2s: bytes
    release: bytes
    commit: bytes

    def __repr__(self) -> str:          # never print a key
        return f"SessionKeys(transcript={self.transcript.hex()[:16]}...)"


def derive(shared_secret: bytes, transcript: bytes) -> SessionKeys:
    okm = HKDF(algorithm=hashes.SHA256(), length=128, salt=transcript, info=KEYS_INFO).derive(shared_secret)
    return SessionKeys(transcript, okm[0:32], okm[32:64], okm[64:96], okm[96:128])


def mac(key: bytes, label: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256(key, label || u32 len || part ...): tokens and bindings."""
    h = hmac.new(key, label, hashlib.sha256)
    for p in parts:
        h.update(struct.pack("<I", len(p)))
        h.update(p)
    return h.digest()


def mac_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)
