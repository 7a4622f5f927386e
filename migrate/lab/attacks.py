"""The network attacks of the migration lab, one class each (``ATTACKS``).

Each attack sits in :class:`migrate.lab.relay.Relay` between a source and a
destination.  Against a stream it can read (plain mode, or ``--insecure
encryption``) it works through :class:`migrate.lab.stream.ClearStream`,
which re-frames the stream so the plain engine's consistency checks
(sequence, round counts, digest) still pass; against the sealed channel it
does the same thing to the records it cannot read, and the secure protocol
names the failure.  ``defence`` says which defence is meant to stop it,
``expect`` the failure the secure protocol reports.

The lab's victim guest (``migrate-lab`` in ``guests/catalog.py``) runs the
protected secret keeper beside an unprotected counter; the counter's page
(found by its ``counter `` string, next to its count) is the target of the
attacks on memory: an old version of it on the destination makes the counter
count again from an earlier value.
"""

from __future__ import annotations

import json
import os
import time

from migrate.lab.records import body_of, encode_pages, make, pages_of
from migrate.lab.stream import ClearStream
from migrate.wire import HEADER, RecordType

R = RecordType
MARK = b"counter \x00\n\x00"    # the counter program's strings (guests/programs/counter.s); its count follows
TAMPERED = b"HACKED! \x00\n\x00"


def count_in(page: bytes) -> int | None:
    """The counter's count in its page (the word after MARK), if the page holds it."""
    i = page.find(MARK)
    if i < 0 or i + len(MARK) + 4 > len(page):
        return None
    return int.from_bytes(page[i + len(MARK): i + len(MARK) + 4], "little")


class Attack:
    name = ""
    summary = ""
    defence = ""                # the secure defence that catches it
    expect = ""                 # a phrase of the secure protocol's error
    plain_damage = ""           # what it achieves against --plain
    buffers_rounds = False      # re-frames whole pre-copy rounds (ClearStream.round)

    def __init__(self, relay=None, *, delay: float = 12.0):
        self.relay = relay
        self.delay = delay
        self.stream = ClearStream(self)
        self.notes: list[str] = []

    # the relay's two meddlers
    def to_dest(self, seen, rtype, raw):
        return self.stream.to_dest(seen, rtype, raw)

    def to_source(self, seen, rtype, raw):
        return self.stream.to_source(seen, rtype, raw)

    # what a subclass changes (default: forward as is)
    def round(self, r: int, recs: list[bytes]) -> list[bytes]:
        return recs

    def other(self, seen, rtype, raw) -> list[bytes]:
        return [raw]

    def sealed(self, seen, rtype, raw) -> list[bytes]:
        return [raw]

    def back(self, seen, rtype, raw) -> list[bytes]:
        return [raw]

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
            if self.relay is not None and self.relay.log is not None:
                self.relay.log(f"ATTACK {self.name}: {text}")

    def findings(self) -> list[str]:
        return list(self.notes)


def _sealed_pages(seen) -> int:
    """How many PAGES records went by after the handshake (sealed or not)."""
    return sum(1 for t, _ in seen if t is R.PAGES)


class Forward(Attack):
    name = "none"
    summary = "forward and log every record (no attack)"


class Eavesdrop(Attack):
    name = "eavesdrop"
    summary = "read the stream; in plain mode open the protected pages with the keys in the state document"
    defence = "encryption (sealed channel) and key release"
    expect = "nothing readable"
    plain_damage = "the protected secret, decrypted by the proxy"

    def findings(self):
        from migrate.lab.eavesdrop import analyse
        lines = analyse([raw for _, raw in self.relay.seen]).lines() if self.relay else []
        return [x.removeprefix("eavesdrop: ") for x in lines]


class _PageAttack(Attack):
    """Helpers for attacks on the counter's page (clear streams)."""
    buffers_rounds = True
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.first: dict[int, bytes] = {}       # target frame -> its first version on the wire

    def targets(self, recs):
        for raw in recs:
            if raw[0] == R.PAGES:
                for pfn, data in pages_of(body_of(raw)) or ():
                    if MARK in data and pfn not in self.first:
                        self.first[pfn] = data

    def rewrite(self, raw, fn):
        """``raw`` (a PAGES record) with each target page's data replaced by
        ``fn(pfn, data)`` (None: take the page out)."""
        pairs = pages_of(body_of(raw))
        if pairs is None:
            return raw
        out = []
        for pfn, data in pairs:
            new = fn(pfn, data) if pfn in self.first else data
            if new is not None:
                out.append((pfn, new))
        if not out:
            return None
        return make(R.PAGES, encode_pages(out), 0)


class Tamper(_PageAttack):
    name = "tamper"
    summary = "change bytes of a page record (the counter's text becomes HACKED!)"
    defence = "encryption (AEAD per record)"
    expect = "failed authentication"
    plain_damage = "the destination's counter prints HACKED! instead of counter"

    def round(self, r, recs):
        self.targets(recs)
        out = []
        for raw in recs:
            new = self.rewrite(raw, lambda pfn, d: d.replace(MARK, TAMPERED))
            if new != raw:
                self.note(f"rewrote the counter's page in round {r}")
            out.append(new)
        return out

    def sealed(self, seen, rtype, raw):
        if rtype is R.PAGES and _sealed_pages(seen) == 0:
            self.note(f"flipped a byte of sealed PAGES record #{HEADER.unpack_from(raw)[3]}")
            b = bytearray(raw)
            b[HEADER.size + 100] ^= 0x40
            return [bytes(b)]
        return [raw]


class _SealedRecordAttack(_PageAttack):
    """On the sealed channel: do it to the first PAGES records after the handshake."""
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.held: bytes | None = None

    def sealed(self, seen, rtype, raw):
        if rtype is not R.PAGES:
            return [raw]
        k = _sealed_pages(seen)
        if k == 0:
            self.held = raw
            return self.first_record(raw)
        if k == 1 and self.held is not None:
            return self.second_record(raw)
        return [raw]

    def first_record(self, raw):
        return [raw]

    def second_record(self, raw):
        return [raw]


class ReplayRecord(_SealedRecordAttack):
    name = "replay-record"
    summary = "send again a record that already went by (an old version of the counter's page)"
    defence = "replay (sequence number in the AEAD nonce)"
    expect = "out of sequence"
    plain_damage = "the counter's page arrives old: the counter counts again from an earlier value"

    def round(self, r, recs):
        self.targets(recs)
        if r == 0:
            return recs
        old = [(pfn, data) for pfn, data in sorted(self.first.items())]
        if old:
            self.note(f"re-sent the counter's page from round 0 (count {count_in(old[0][1])}) at the end "
                      f"of round {r}")
            return recs + [make(R.PAGES, encode_pages(old), 0)]
        return recs

    def second_record(self, raw):
        self.note("re-sent the first sealed PAGES record after the second")
        return [raw, self.held]


class ReplayRound(_PageAttack):
    name = "replay-round"
    summary = "put a page from an earlier round in place of its newer version"
    defence = "replay (sequence numbers; the destination keeps the newest version)"
    expect = "out of sequence"
    plain_damage = "the counter's page is the round-0 version: the counter counts again"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.round0: list[bytes] = []

    def round(self, r, recs):
        self.targets(recs)
        if r == 0:
            return recs
        out = []
        for raw in recs:
            new = self.rewrite(raw, lambda pfn, d: self._old(r, pfn, d))
            out.append(new)
        return out

    def _old(self, r, pfn, data):
        self.note(f"round {r}: the counter's page (count {count_in(data)}) sent as it was in round 0 "
                  f"(count {count_in(self.first[pfn])})")
        return self.first[pfn]

    def sealed(self, seen, rtype, raw):
        if rtype is R.PAGES:
            rounds = sum(1 for t, _ in seen if t is R.ROUND_BEGIN)
            if rounds == 1 and not self.round0:
                self.round0.append(raw)
            elif rounds >= 2 and self.round0 and not self.notes:
                self.note("sent round 0's first sealed PAGES record in place of a newer one")
                return [self.round0[0]]
        return [raw]


class Reorder(_SealedRecordAttack):
    name = "reorder"
    summary = "swap two records (each round's page records in reverse order)"
    defence = "replay (sequence number in the AEAD nonce)"
    expect = "out of sequence"
    plain_damage = "accepted silently: the plain engine takes a round's records in any order"
    buffers_rounds = True

    def round(self, r, recs):
        if len(recs) > 1:
            self.note(f"round {r}: {len(recs)} page records sent in reverse order")
        return list(reversed(recs))

    def first_record(self, raw):
        self.note("held back the first sealed PAGES record, to send it after the next one")
        return []

    def second_record(self, raw):
        self.note("swapped the first two sealed PAGES records")
        return [raw, self.held]


class Drop(_SealedRecordAttack):
    name = "drop"
    summary = "drop records (the newer versions of the counter's page never arrive)"
    defence = "replay (sequence number in the AEAD nonce)"
    expect = "out of sequence"
    plain_damage = "the counter's page stays at an old version: the counter counts again"

    def round(self, r, recs):
        self.targets(recs)
        if r == 0:
            return recs
        out = []
        for raw in recs:
            new = self.rewrite(raw, lambda pfn, d: self._drop(r, d))
            if new is not None:
                out.append(new)
        return out

    def _drop(self, r, data):
        self.note(f"round {r}: dropped the counter's newer page (count {count_in(data)})")
        return None

    def first_record(self, raw):
        self.note("dropped the first sealed PAGES record")
        return []


class Duplicate(_SealedRecordAttack):
    name = "duplicate"
    summary = "send a record twice (a page record of each round after the first)"
    defence = "replay (sequence number in the AEAD nonce)"
    expect = "out of sequence"
    plain_damage = "accepted silently: each page record of a round stored twice"
    buffers_rounds = True

    def round(self, r, recs):
        pages = [raw for raw in recs if raw[0] == R.PAGES]
        if r == 0 or not pages:         # round 0 carries every page: one more would be too many
            return recs
        self.note(f"round {r}: a page record sent twice")
        i = recs.index(pages[0])
        return recs[:i + 1] + [pages[0]] + recs[i + 1:]

    def first_record(self, raw):
        self.note("sent the first sealed PAGES record twice")
        return [raw, raw]


class Delay(Attack):
    name = "delay"
    summary = "hold the source's COMMIT past the destination's deadline"
    defence = "phase deadlines and the authenticated abort"
    expect = "timed out"
    plain_damage = "none beyond the wait: the plain engine has the same deadlines"

    def _hold(self, raw):
        self.note(f"holding COMMIT for {self.delay:g} s")
        time.sleep(self.delay)
        return [raw]

    def other(self, seen, rtype, raw):
        return self._hold(raw) if rtype is R.COMMIT else [raw]

    def sealed(self, seen, rtype, raw):
        return self._hold(raw) if rtype is R.COMMIT else [raw]


class ForgeCommit(Attack):
    name = "forge-commit"
    summary = "answer the destination's PREPARED with a COMMIT of our own; the source never hears PREPARED"
    defence = "ordering (COMMIT sealed and carrying the session's commit token)"
    expect = "failed authentication"
    plain_damage = "two copies: the destination resumes, the source times out and resumes too"

    def back(self, seen, rtype, raw):
        if rtype is R.PREPARED:
            seq = self.stream.out_seq
            body = b"" if self.stream.clear else os.urandom(48)
            self.note(f"withheld PREPARED from the source; sent the destination a forged COMMIT #{seq}")
            self.relay.send_to_dest(make(R.COMMIT, body, seq))
            self.stream.out_seq += 1
            return []
        return [raw]

    def other(self, seen, rtype, raw):
        return [] if rtype in (R.ABORT, R.COMMIT) else [raw]      # the destination already committed


class ForgeAbort(Attack):
    name = "forge-abort"
    summary = "replace the destination's RESUMED with an ABORT, so the source resumes too"
    defence = "ordering (ABORT sealed; keys destroyed before COMMIT)"
    expect = "failed authentication"
    plain_damage = "two copies: both consoles keep counting"

    def back(self, seen, rtype, raw):
        if rtype is R.RESUMED:
            seq = HEADER.unpack_from(raw)[3]
            body = b"destination failed to resume (forged)"
            if not self.stream.clear:
                body = os.urandom(len(body) + 16)
            self.note(f"replaced RESUMED #{seq} with a forged ABORT")
            return [make(R.ABORT, body, seq)]
        return [raw]


class Downgrade(Attack):
    name = "downgrade"
    summary = "rewrite the source's HELLO to say plain mode"
    defence = "attestation (the destination refuses plain; the transcript covers HELLO)"
    expect = "plain mode"
    plain_damage = "nothing to downgrade: a plain migration is already in clear"

    def to_dest(self, seen, rtype, raw):
        body = body_of(raw)
        if rtype is R.HELLO and len(body) >= 16:
            try:
                info = json.loads(body[16:])
            except ValueError:
                return [raw]
            if isinstance(info, dict) and info.get("mode") == "secure":
                for k in ("mode", "vm_id", "generation"):
                    info.pop(k, None)
                new = body[:16] + json.dumps(info).encode()
                self.note("rewrote HELLO: removed mode=secure")
                return [HEADER.pack(R.HELLO, 0, len(new), 0) + new]
            self.note("HELLO already plain: nothing to downgrade")
        return super().to_dest(seen, rtype, raw)


ATTACKS = {a.name: a for a in (Forward, Eavesdrop, Tamper, ReplayRecord, ReplayRound, Reorder, Drop,
                               Duplicate, Delay, ForgeCommit, ForgeAbort, Downgrade)}
# Not relaying attacks (migrate/lab/standalone.py): replay-stream, impersonate.
STANDALONE = {"replay-stream": "play back a captured earlier migration of the same VM to the destination",
              "impersonate": "answer as the destination itself (an uncertified TPM in secure mode)"}


def make_attack(name: str, relay=None, **kw) -> Attack:
    try:
        return ATTACKS[name](relay, **kw)
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join([*ATTACKS, *STANDALONE])}") from None
