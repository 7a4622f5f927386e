"""Page cloaking: the authenticated encryption of one protected page.

A cloaked page is AES-256-GCM ciphertext of the same length (4096 bytes)
written over the plaintext in place, so the kernel can still page it, copy it
or send it elsewhere, but learns nothing; the 16-byte tag stays in the VMM's
metadata.  The associated data binds the page to where it belongs:

    AD = b"minivmm-page-v1" || ident (u64) || vpn (u32) || version (u32)

so a page moved to another virtual address (vpn), handed to another process
(ident), or rolled back to an older copy (version) fails verification.

Nonces are 96 bits: ``u32 prefix || u64 counter``.  The counter is per
process and only goes up (it is part of the process's metadata and migrates
with it); the prefix is drawn fresh by every VMM instance (each boot, each
restore, each migration destination), so a state restored twice, or an old
state restored after a newer run, still never repeats a nonce.  Each process
has its own key, so no (key, nonce) pair is ever used twice: GCM's one fatal
misuse.
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from minivmm.abi import PAGE_SIZE

KEY_BYTES = 32
TAG_BYTES = 16
NONCE_BYTES = 12
_AD = struct.Struct("<15sQII")
_NONCE = struct.Struct("<IQ")


def nonce_for(prefix: int, counter: int) -> bytes:
    return _NONCE.pack(prefix, counter)


def associated_data(ident: int, vpn: int, version: int) -> bytes:
    return _AD.pack(b"minivmm-page-v1", ident, vpn, version)


class PageCipher:
    """One process's page key.  ``seal`` returns (ciphertext, tag);
    ``open`` raises ``cryptography.exceptions.InvalidTag`` on any mismatch:
    callers treat that as an integrity violation, never as a warning."""

    def __init__(self, key: bytes):
        if len(key) != KEY_BYTES:
            raise ValueError(f"page key must be {KEY_BYTES} bytes")
        self._aead = AESGCM(key)

    def seal(self, plaintext, nonce: bytes, ad: bytes) -> tuple[bytes, bytes]:
        out = self._aead.encrypt(nonce, bytes(plaintext), ad)
        return out[:PAGE_SIZE], out[PAGE_SIZE:]

    def open(self, ciphertext, tag: bytes, nonce: bytes, ad: bytes) -> bytes:
        return self._aead.decrypt(nonce, bytes(ciphertext) + tag, ad)
