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


def describes(e):
    """[(when, direction, rtype, body fields)] for event ``e``."""
    return [(when, d, rt, fn(e)) for when, d, rt, fn in TABLE.get((e.role, type(e)), ())]
