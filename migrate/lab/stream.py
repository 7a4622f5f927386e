"""What a man in the middle can do to a stream it can read: re-frame it.

The plain engine's checks are consistency checks, not security: sequence
numbers, each round's page count and the completeness digest are all
computed from what crosses the wire, with no key.  An attacker who can read
the records (plain mode, or the secure protocol with ``--insecure
encryption``) recomputes them after changing the stream, and the destination
sees a perfectly consistent migration of a VM the source never had.

:class:`ClearStream` does that re-framing for the source -> destination
direction: it buffers each pre-copy round, hands its PAGES / ZERO_PAGES
records to the attack (``round(r, records) -> records``), then sends
ROUND_BEGIN / records / ROUND_END with the page counts of what it actually
sends, renumbers every record's sequence number, keeps the page hashes the
destination will compute (``migrate.digest.PageHashes``) and rewrites DIGEST
to match.  Back to the source it rewrites ROUND_ACK to the counts the source
announced.  Sealed records (the secure channel) cannot be re-framed: they go
to the attack's ``sealed(rtype, raw)`` unchanged in meaning.
"""

from __future__ import annotations

import struct

import numpy as np

from migrate.digest import StreamDigest
from migrate.lab.records import body_of, make, with_seq
from migrate.wire import MAGIC, PAGE_SIZE, RecordType

R = RecordType


def count_of(raw: bytes) -> int:
    return struct.unpack_from("<I", raw, 16)[0]


class ClearStream:
    def __init__(self, attack):
        self.attack = attack
        self.clear: bool | None = None      # decided at the first ROUND_BEGIN (8 bytes: clear)
        self.out_seq = 0
        self.hashes: StreamDigest | None = None
        self.npages = 0
        self.doc: list[bytes] = []
        self.round: tuple[int, int] | None = None
        self.buf: list[bytes] = []
        self.counts: dict[int, tuple[int, int]] = {}      # round -> (announced by source, sent)
        self.changed = False

    # ------------------------------------------------------------ to dest
    def to_dest(self, seen, rtype, raw) -> list[bytes]:
        body = body_of(raw)
        if rtype is R.HELLO and body[:8] == MAGIC and len(body) >= 16:
            self.npages = struct.unpack_from("<I", body, 12)[0] // PAGE_SIZE
            if 0 < self.npages <= 1 << 16:
                self.hashes = StreamDigest(self.npages)
        if rtype is R.ROUND_BEGIN and self.clear is None:
            self.clear = len(body) == 8
        if not self.clear or not self.attack.buffers_rounds:
            if self.clear:
                return self._number(self.attack.other(seen, rtype, raw))
            out = self.attack.sealed(seen, rtype, raw)
            self.out_seq += len(out)
            return out
        if rtype is R.ROUND_BEGIN:
            self.round, self.buf, self.begin_raw = struct.unpack("<II", body), [], raw
            return []
        if rtype in (R.PAGES, R.ZERO_PAGES) and self.round is not None:
            self.buf.append(raw)
            return []
        if rtype is R.ROUND_END and self.round is not None:
            r, n = self.round
            recs = self.attack.round(r, list(self.buf))
            self.changed = self.changed or recs != self.buf
            sent = sum(count_of(x) for x in recs)
            self.counts[r] = (n, sent)
            self.round = None
            for x in recs:
                self._hash(x)
            marks = struct.pack("<II", r, sent)
            if sent == n:       # the counts hold: the source's own framing records
                return self._number([self.begin_raw, *recs, raw])
            return self._number([make(R.ROUND_BEGIN, marks, 0), *recs, make(R.ROUND_END, marks, 0)])
        if rtype is R.STATE:
            self.doc.append(bytes(body))
        if rtype is R.DIGEST and self.changed and self.hashes is not None and len(body) == 40:
            digest = self.hashes.final(b"".join(self.doc))
            return self._number([make(R.DIGEST, body[:8] + digest, 0)])
        return self._number(self.attack.other(seen, rtype, raw))

    def _number(self, recs: list[bytes]) -> list[bytes]:
        out = []
        for x in recs:
            out.append(with_seq(x, self.out_seq))
            self.out_seq += 1
        return out

    def _hash(self, raw: bytes) -> None:
        if self.hashes is None:
            return
        n = count_of(raw)
        pfns = np.frombuffer(raw, "<u4", n, 20).astype(np.int64)
        if raw[0] == R.PAGES:
            data = np.frombuffer(raw, np.uint8, n * PAGE_SIZE, 20 + 4 * n).reshape(n, PAGE_SIZE)
            self.hashes.update(pfns, data)
        else:
            self.hashes.update_zero(pfns)

    # ---------------------------------------------------------- to source
    def to_source(self, seen, rtype, raw) -> list[bytes]:
        body = body_of(raw)
        if self.clear and rtype is R.ROUND_ACK and len(body) == 8:
            r, _ = struct.unpack("<II", body)
            if r in self.counts:
                return [raw[:16] + struct.pack("<II", r, self.counts[r][0])]
        return self.attack.back(seen, rtype, raw)
