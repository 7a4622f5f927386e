"""Reading records as a man in the middle sees them: one line per record.

``describe(raw)`` says what a record is and, when its body is readable (plain
mode, or ``--insecure encryption``), what it carries.  A body that does not
decode as its type says is shown as unreadable: under the sealed channel that
is every record after the handshake, which is the point.
"""

from __future__ import annotations

import json
import struct

from migrate.proxy import read_exact
from migrate.wire import HEADER, MAX_BODY_ANY, PAGE_SIZE, RecordType

TAG = 16


def read_record(sock) -> bytes | None:
    """One whole record (header and body) from ``sock``; None at end of stream.
    The length is bounded before the body is read."""
    header = read_exact(sock, HEADER.size)
    if header is None:
        return None
    length = HEADER.unpack(header)[2]
    if length > MAX_BODY_ANY + TAG:
        raise ValueError(f"record of {length} bytes: more than any record type allows")
    body = read_exact(sock, length) if length else b""
    if body is None:
        return None
    return header + body


def rtype_of(raw: bytes) -> int:
    return HEADER.unpack_from(raw)[0]


def body_of(raw: bytes) -> bytes:
    return raw[HEADER.size:]


def with_seq(raw: bytes, seq: int) -> bytes:
    t, f, n, _ = HEADER.unpack_from(raw)
    return HEADER.pack(t, f, n, seq) + raw[HEADER.size:]


def make(rtype: RecordType, body: bytes, seq: int) -> bytes:
    return HEADER.pack(rtype, 0, len(body), seq) + body


def pages_of(body: bytes) -> list[tuple[int, bytes]] | None:
    """A PAGES body's (frame, data) pairs, or None if it is not a readable one."""
    if len(body) < 4:
        return None
    n = struct.unpack_from("<I", body)[0]
    if not 1 <= n <= 256 or len(body) != 4 + n * (4 + PAGE_SIZE):
        return None
    pfns = struct.unpack_from(f"<{n}I", body, 4)
    data = 4 + 4 * n
    return [(pfns[i], body[data + PAGE_SIZE * i: data + PAGE_SIZE * (i + 1)]) for i in range(n)]


def encode_pages(pairs: list[tuple[int, bytes]]) -> bytes:
    pairs = sorted(pairs)
    return (struct.pack(f"<I{len(pairs)}I", len(pairs), *(p for p, _ in pairs))
            + b"".join(d for _, d in pairs))


def _text(body: bytes, limit: int = 120) -> str:
    s = body.decode("utf-8", "replace")
    return s if len(s) <= limit else s[:limit] + "..."


def describe_body(rtype: int, body: bytes) -> str:
    """What the body says, or 'unreadable (sealed?)'."""
    try:
        t = RecordType(rtype)
    except ValueError:
        return "unknown type"
    n = len(body)
    try:
        if t is RecordType.HELLO and body[:8] == b"MVMIGRAT" and n >= 16:
            ram = struct.unpack_from("<I", body, 12)[0]
            return f"ram {ram >> 20} MiB, info {_text(body[16:])}"
        if t is RecordType.WELCOME and body[:8] == b"MVMIGRAT" and n >= 12:
            return f"status {struct.unpack_from('<H', body, 10)[0]} {_text(body[12:])}".rstrip()
        if t in (RecordType.ROUND_BEGIN, RecordType.ROUND_END, RecordType.ROUND_ACK) and n == 8:
            r, p = struct.unpack("<II", body)
            return f"round {r}, {p} pages"
        if t is RecordType.PAGES:
            pairs = pages_of(body)
            if pairs is not None:
                return f"{len(pairs)} pages, frames {pairs[0][0]}..{pairs[-1][0]}"
        if t is RecordType.ZERO_PAGES and n >= 4 and n == 4 + 4 * struct.unpack_from("<I", body)[0]:
            return f"{(n - 4) // 4} zero pages"
        if t is RecordType.STATE and _is_text(body):
            return f"state document chunk: {_text(body, 80)}"
        if t is RecordType.DIGEST and n == 40:
            return f"state {struct.unpack_from('<Q', body)[0]} bytes, digest {body[8:16].hex()}..."
        if t in (RecordType.ABORT,) and _is_text(body):
            return f"reason: {_text(body)}"
        if t is RecordType.RESUMED and body[:1] == b"{":
            return _text(body)
        if t in (RecordType.PREPARED,) and n == 0:
            return "(empty)"
        if t is RecordType.COMMIT and n == 0:
            return "(empty: plain mode)"
        if t in (RecordType.KEY_SHARE, RecordType.QUOTE):
            return f"{n} bytes (handshake, in clear: public values)"
    except (struct.error, ValueError):
        pass
    return "unreadable (sealed?)"


def _is_text(body: bytes) -> bool:
    try:
        body[:256].decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(32 <= c < 127 or c in (9, 10, 13) for c in body[:256])


def describe(raw: bytes) -> str:
    t, flags, length, seq = HEADER.unpack_from(raw)
    try:
        name = RecordType(t).name
    except ValueError:
        name = f"type-{t}"
    return f"#{seq} {name} {length} bytes: {describe_body(t, raw[HEADER.size:])}"


def state_document(chunks: list[bytes]) -> dict | None:
    """The state document joined from STATE bodies, if they are readable JSON."""
    try:
        doc = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None
