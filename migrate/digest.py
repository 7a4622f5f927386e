"""The completeness digest: proof that the VM arrived whole.

Both sides fold every page record into one running digest, in stream order:
the source each PAGES / ZERO_PAGES record it sends, the destination each one
it stores.  A PAGES record contributes its frame numbers and a GHASH tag of
its page bytes (AES-GCM with an empty plaintext and the pages as associated
data: a GMAC, ~20 GB/s with the CPU's carry-less multiply, one call per
record of up to 256 pages); a ZERO_PAGES record its frame numbers.  A PAGES
record the secure channel sealed (AES-256-GCM under the session key,
``migrate/secure/channel.py``) contributes that record's own 16-byte tag
instead (kind 3): the channel already authenticated its pages, header and
sequence number, and a second pass over them would only repeat it.  At the
end::

    digest = SHA-256( "minivmm-migration-digest v2\\0" || ram_size:u64
                      || stream || SHA-256(state document) )
    stream = SHA-256 over, per record i:  kind:u8 || i:u64 || count:u32
                      || frame numbers (u32 each) || tag[16] (PAGES only)
    kind   = 1 PAGES (tag: the GMAC), 2 ZERO_PAGES, 3 sealed PAGES (tag: its AEAD tag)

The destination resumes only if its own digest equals the source's and every
page arrived at least once (``seen``, the per-page bitmap).  The records reach
the destination in the order they were sent (one TCP stream; in the secure
mode also sealed and numbered), and it stores them in that order, so equal
digests mean "every page record that was sent arrived unchanged and was
stored in order" -- a page sent again in a later round simply comes later.

Why a GMAC and not SHA-256 per page (digest v1): a per-page SHA-256 in a
Python loop ran at ~1 GB/s and was half of the migration's time on both
sides.  The GMAC key is public (all zero), so this is a checksum, not
authentication: it catches accidents and bugs (a lost, reordered, truncated
or corrupted record; a page stored in the wrong frame) with a 128-bit
polynomial tag, as the plain engine always promised (it never resisted an
attacker: one can rewrite the digest as easily as the pages).  In the secure
mode every record is already authenticated, in sequence, by the channel's
AES-GCM under a secret key (docs/protocol.md).

The digest proves "what was sent arrived", not "what was sent is what RAM
holds" -- the latter is the dirty log's job, and ``check_ram`` lets the
source verify it (tests turn it on) with :class:`PageHashes`, one SHA-256 per
page kept only then.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PAGE_SIZE = 4096
ZERO_PAGE_HASH = hashlib.sha256(bytes(PAGE_SIZE)).digest()
DOMAIN = b"minivmm-migration-digest v2\0"
_KEY = bytes(16)                   # public key: a checksum, see above
_GMAC = AESGCM(_KEY)
_REC = struct.Struct("<BQI")
_NONCE = struct.Struct(">4xQ")
PAGES_KIND, ZERO_KIND, SEALED_KIND = 1, 2, 3


class StreamDigest:
    """The running digest of one migration's page records (both sides)."""

    def __init__(self, npages: int):
        self.npages = npages
        self.seen = np.zeros(npages, dtype=bool)     # arrived (or sent) at least once
        self.records = 0
        self._stream = hashlib.sha256()

    def _fold(self, kind: int, pfns: np.ndarray, tag: bytes = b"") -> None:
        self._stream.update(_REC.pack(kind, self.records, len(pfns)))
        self._stream.update(np.asarray(pfns, dtype="<u4").tobytes())
        self._stream.update(tag)
        self.records += 1
        self.seen[pfns] = True

    def update(self, pfns: np.ndarray, data: np.ndarray, tag: bytes = b"") -> None:
        """One PAGES record: ``data[i]`` is page ``pfns[i]`` (shape (n, 4096)).
        ``tag``: the record's AES-GCM tag if the channel sealed it (then it
        stands for the pages: see the module's docstring)."""
        if tag:
            self._fold(SEALED_KIND, pfns, tag)
            return
        pages = np.ascontiguousarray(data, dtype=np.uint8).data.cast("B")
        tag = _GMAC.encrypt(_NONCE.pack(self.records), b"", pages)
        self._fold(PAGES_KIND, pfns, tag)

    def update_views(self, pfns: np.ndarray, views, tag: bytes = b"") -> None:
        """One PAGES record whose pages lie in ``views`` (buffers, in frame
        order: the runs of guest RAM a destination received them into).  The
        same tag as :meth:`update` over the concatenation: GHASH takes its
        associated data in pieces."""
        if tag:
            self._fold(SEALED_KIND, pfns, tag)
            return
        gmac = Cipher(algorithms.AES(_KEY), modes.GCM(_NONCE.pack(self.records))).encryptor()
        for v in views:
            gmac.authenticate_additional_data(v)
        gmac.finalize()
        self._fold(PAGES_KIND, pfns, gmac.tag)

    def update_zero(self, pfns: np.ndarray) -> None:
        """One ZERO_PAGES record."""
        self._fold(ZERO_KIND, pfns)

    def missing(self) -> int:
        return int(self.npages - np.count_nonzero(self.seen))

    def final(self, state_doc: bytes) -> bytes:
        h = hashlib.sha256(DOMAIN)
        h.update(struct.pack("<Q", self.npages * PAGE_SIZE))
        h.update(self._stream.copy().digest())
        h.update(hashlib.sha256(state_doc).digest())
        return h.digest()


class PageHashes:
    """One SHA-256 per page, the last sent copy's (``check_ram`` only)."""

    def __init__(self, npages: int):
        self.hashes = np.zeros((npages, 32), dtype=np.uint8)
        self._zero = np.frombuffer(ZERO_PAGE_HASH, dtype=np.uint8)

    def update(self, pfns: np.ndarray, data: np.ndarray) -> None:
        sha = hashlib.sha256
        out = bytearray(32 * len(pfns))
        for i in range(len(pfns)):
            out[32 * i:32 * i + 32] = sha(data[i]).digest()
        self.hashes[pfns] = np.frombuffer(bytes(out), dtype=np.uint8).reshape(-1, 32)

    def update_zero(self, pfns: np.ndarray) -> None:
        self.hashes[pfns] = self._zero


def hash_ram(array: np.ndarray) -> np.ndarray:
    """Per-page hashes of a whole RAM buffer (uint8, length npages*4096)."""
    pages = array.reshape(-1, PAGE_SIZE)
    out = PageHashes(len(pages))
    nz = np.flatnonzero(pages.view(np.uint64).max(axis=1) != 0)
    out.update_zero(np.arange(len(pages)))
    if len(nz):
        out.update(nz, pages[nz])
    return out.hashes
