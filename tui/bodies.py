"""What a record's body says, from the engines' typed events (migrate/events.py).

A step (migrate/steps.py) names a record's type, size and sequence number,
not its body.  The engine decodes a body and reports it in an event; this
table says which record of which side each event describes, and what it
says of it.  ``NEXT``: the event comes before its record's step (the source
announces a round, then sends ROUND_BEGIN); ``LAST``: after it (a received
record is decoded, checked, then reported).  A body is only ever filled from
an event of the side that sent or received that record: a received record
shows what the receiver decoded, never what the sender meant to send.
"""

from __future__ import annotations

from migrate import events as mev

NEXT, LAST = "next", "last"


def _info(e) -> tuple[tuple[str, str], ...]:
    return (("ram", f"{e.ram_size >> 20} MiB"),) + tuple((str(k), str(v)) for k, v in sorted(e.info.items()))


def _round(e) -> tuple[tuple[str, str], ...]:
    return (("round", str(e.round)), ("pages", str(e.pages)))


def _round_totals(e) -> tuple[tuple[str, str], ...]:
    out = _round(e) + (("round carried", f"{e.data_pages} data pages, {e.zero_pages} zero pages, "
                                         f"{e.bytes:,} bytes"),)
    if e.role == "source":
        out += (("dirtied meanwhile", f"{e.dirtied} pages ({e.dirty_rate:,.0f}/s)"),)
    return out


def _quote(e) -> tuple[tuple[str, str], ...]:
    """The peer's QUOTE this side received: what verifying it established."""
    if not e.attestation:
        return ()
    return (("verdict", "verified: signed by an AK the issuer certified, over this side's nonce "
                        "bound to this key exchange, PCRs as the policy approves"),) + e.attestation


# (role, event class) -> [(when, direction, record type, fields of the event)]
TABLE = {
    ("source", mev.Handshake): [(LAST, "send", "HELLO", _info),
                                (LAST, "recv", "WELCOME", lambda e: (("status", "OK: B accepts"),)),
                                (LAST, "recv", "QUOTE", _quote)],
    ("destination", mev.Handshake): [(LAST, "recv", "HELLO", _info),
                                     (LAST, "send", "WELCOME", lambda e: (("status", "OK: B accepts"),)),
                                     (LAST, "recv", "QUOTE", _quote)],
    ("source", mev.StopAndCopy): [(NEXT, "send", "ROUND_BEGIN",
                                   lambda e: (("final round", f"stop-and-copy ({e.reason}); the guest is "
                                                              f"paused, {e.remaining} pages left"),))],
    ("source", mev.RoundStarted): [(NEXT, "send", "ROUND_BEGIN", _round)],
    ("destination", mev.RoundStarted): [(LAST, "recv", "ROUND_BEGIN", _round)],
    ("source", mev.RoundFinished): [(LAST, "send", "ROUND_END", _round_totals)],
    ("destination", mev.RoundFinished): [(LAST, "recv", "ROUND_END", _round_totals),
                                         (LAST, "send", "ROUND_ACK", _round)],
    ("source", mev.StateSent): [(LAST, "send", "DIGEST", lambda e: (("state document", f"{e.state_bytes:,} bytes"),
                                                                    ("digest", e.digest[:32] + "...")))],
    ("source", mev.Resumed): [(LAST, "recv", "RESUMED", lambda e: (("vclock at resume", f"{e.vclock:,}"),))],
    ("destination", mev.Resumed): [(LAST, "send", "RESUMED", lambda e: (("vclock at resume", f"{e.vclock:,}"),))],
    ("source", mev.Aborted): [(LAST, "send", "ABORT", lambda e: (("reason", e.reason),)),
                              (LAST, "recv", "ABORT", lambda e: (("reason", e.reason),))],
    ("destination", mev.Aborted): [(LAST, "send", "ABORT", lambda e: (("reason", e.reason),)),
                                   (LAST, "recv", "ABORT", lambda e: (("reason", e.reason),))],
}


# ----------------------------------------------------------------- from heads
# Records no event describes: their fields from the head of the body the step
# carries (migrate/steps.py: the plaintext as this side wrote or authenticated
# it).  Formats: migrate/messages.py, migrate/secure/keyschedule.py and
# keyrelease.py, docs/protocol.md.  Key material is never shown, only its size
# and a short prefix of public values (key shares, nonces).
DESCRIBED = {(role, d, rt) for (role, _), rows in TABLE.items() for _, d, rt, _ in rows}


def _hex(b: bytes, n: int = 8) -> str:
    return b[:n].hex() + ("..." if len(b) > n else "")


def _frames(head: bytes, length: int) -> tuple[tuple[str, str], ...]:
    """PAGES / ZERO_PAGES: u32 count, then count u32 frame numbers."""
    if len(head) < 4:
        return ()
    count = int.from_bytes(head[:4], "little")
    shown = min(count, (len(head) - 4) // 4)
    pfns = [int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "little") for i in range(shown)]
    if not pfns:
        return (("pages", str(count)),)
    span = ", ".join(f"{p:#x}" for p in pfns) if len(pfns) <= 4 else f"{min(pfns):#x}..{max(pfns):#x}"
    more = "" if shown == count else f" (the first {shown} of {count})"
    return (("pages", str(count)), ("frames", span + more))


def _from_head(rtype: str, head: bytes, length: int):
    if rtype == "PAGES":
        return _frames(head, length) + (("data", f"{length - 4 - 4 * int.from_bytes(head[:4] or bytes(4), 'little'):,} "
                                                  f"bytes of page contents (protected pages: their ciphertext)"),)
    if rtype == "ZERO_PAGES":
        return _frames(head, length) + (("data", "none: these frames are all zero"),)
    if rtype == "STATE":      # its text is not shown: in plain mode a chunk may hold process keys
        return (("state document chunk", f"{length:,} bytes of JSON"),)
    if rtype == "KEY_SHARE" and len(head) >= 64:
        return (("X25519 public key", _hex(head[:32])), ("nonce", _hex(head[32:64])),
                ("why", "ephemeral: the session keys come from both shares; the peer's quote must bind the nonce"))
    if rtype == "QUOTE":
        return (("evidence", f"{length:,} bytes: TPM quote over PCRs 8-10, its signature, the event "
                             f"log, the AK certificate"),)
    if rtype == "FRESH_NONCE":
        return (("nonce", _hex(head)), ("why", "the destination's final quote must bind it (TOCTOU)"))
    if rtype == "FINAL_QUOTE" and len(head) >= 32:
        return (("release key R", _hex(head[:32])),
                ("evidence", f"{length - 32:,} bytes: a fresh quote binding R to this session"))
    if rtype == "KEY_RELEASE" and len(head) >= 32:
        return (("ephemeral key E", _hex(head[:32])),
                ("wrapped", f"{length - 32:,} bytes: process keys and protection state, AES-GCM under "
                            f"a key from E and R (only the attested destination's TPM opens R)"),)
    if rtype == "COMMIT":
        return (("commit token", f"{length} bytes (HMAC over the session)" if length else "(empty: plain mode)"),)
    if rtype in ("PREPARED", "ROUND_ACK", "RESUMED") and not length:
        return (("body", "(empty)"),)
    return ()


def from_head(role: str, step, overhead: int = 0) -> tuple[tuple[str, str], ...]:
    """Fields of a record no event describes, read from ``step.head``;
    ``overhead``: what the channel adds to a body on the wire (its AEAD tag)."""
    if (role, step.direction, step.rtype) in DESCRIBED:
        return ()
    try:
        return _from_head(step.rtype, bytes(step.head), step.length - overhead)
    except (ValueError, IndexError):
        return ()


def describes(e):
    """[(when, direction, rtype, body fields)] for event ``e``."""
    return [(when, d, rt, fn(e)) for when, d, rt, fn in TABLE.get((e.role, type(e)), ())]
