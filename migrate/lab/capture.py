"""The capture file: every record that crossed a man in the middle, in order.

Written by ``minivmm mitm --capture FILE`` (and the lab), read by the lab's
tools (``migrate.lab.eavesdrop``, the replay-stream attack).  Version 1::

    file header (16 bytes)
    offset  size  field
    0       8     magic      b"MVMCAPT1"
    8       2     version    u16 little-endian, 1
    10      2     reserved   0
    12      4     reserved   0

    then entries, each
    0       1     direction  1 source -> destination, 2 destination -> source
    1       1     action     0 forwarded as received, 1 dropped by the attack,
                             2 injected or rewritten by the attack (what was sent)
    2       2     reserved   0
    4       4     length     bytes of the record that follow (16..MAX_ENTRY)
    8   length    record     the record exactly as on the wire: the 16-byte
                             header of ``migrate/wire.py`` and its body (sealed
                             bodies stay sealed: the capture holds what an
                             attacker on the wire sees, nothing more)

Every field is checked before use: the length against ``MAX_ENTRY`` before a
byte of the record is read, and the record's own header length against the
entry's length.  A malformed file raises :class:`CaptureError` naming the
offset; nothing is guessed.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from migrate.wire import HEADER, MAX_BODY_ANY, RecordType

MAGIC = b"MVMCAPT1"
VERSION = 1
FILE_HEADER = struct.Struct("<8sHHI")
ENTRY = struct.Struct("<BBHI")
TO_DEST, TO_SOURCE = 1, 2
FORWARDED, DROPPED, INJECTED = 0, 1, 2
DIRECTIONS = {TO_DEST: "src->dst", TO_SOURCE: "dst->src"}
ACTIONS = {FORWARDED: "forwarded", DROPPED: "dropped", INJECTED: "injected"}
MAX_ENTRY = HEADER.size + MAX_BODY_ANY + 16         # + an AES-GCM tag
MAX_FILE = 4 << 30


class CaptureError(ValueError):
    """The capture file is not one this version reads."""


@dataclass(frozen=True)
class Entry:
    direction: int
    action: int
    raw: bytes

    @property
    def type(self) -> int:
        return HEADER.unpack_from(self.raw)[0]

    @property
    def seq(self) -> int:
        return HEADER.unpack_from(self.raw)[3]

    @property
    def body(self) -> bytes:
        return self.raw[HEADER.size:]

    def type_name(self) -> str:
        try:
            return RecordType(self.type).name
        except ValueError:
            return f"type-{self.type}"


class CaptureWriter:
    """Appends entries to a capture file (thread-safe: both directions write)."""

    def __init__(self, path: Path | str):
        self._f = open(path, "wb")
        self._f.write(FILE_HEADER.pack(MAGIC, VERSION, 0, 0))
        self._lock = threading.Lock()

    def write(self, direction: int, action: int, raw: bytes) -> None:
        if direction not in DIRECTIONS or action not in ACTIONS or not HEADER.size <= len(raw) <= MAX_ENTRY:
            raise ValueError("capture entry out of range")
        with self._lock:
            if self._f.closed:
                return
            self._f.write(ENTRY.pack(direction, action, 0, len(raw)))
            self._f.write(raw)
            self._f.flush()

    def close(self) -> None:
        with self._lock:
            self._f.close()


def parse(data: bytes) -> list[Entry]:
    """The entries of a capture file's bytes; CaptureError if malformed."""
    if len(data) < FILE_HEADER.size:
        raise CaptureError(f"capture file of {len(data)} bytes: shorter than its {FILE_HEADER.size}-byte header")
    magic, version, r1, r2 = FILE_HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CaptureError(f"not a minivmm capture file (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise CaptureError(f"capture file version {version}, this minivmm reads version {VERSION}")
    if r1 or r2:
        raise CaptureError("capture file header: reserved fields must be 0")
    out, off = [], FILE_HEADER.size
    while off < len(data):
        if len(data) - off < ENTRY.size:
            raise CaptureError(f"truncated entry header at offset {off}")
        direction, action, reserved, length = ENTRY.unpack_from(data, off)
        if direction not in DIRECTIONS:
            raise CaptureError(f"entry at offset {off}: direction {direction} (expected 1 or 2)")
        if action not in ACTIONS:
            raise CaptureError(f"entry at offset {off}: action {action} (expected 0, 1 or 2)")
        if reserved:
            raise CaptureError(f"entry at offset {off}: reserved field {reserved} (must be 0)")
        if not HEADER.size <= length <= MAX_ENTRY:
            raise CaptureError(f"entry at offset {off}: length {length} outside {HEADER.size}..{MAX_ENTRY}")
        start = off + ENTRY.size
        if len(data) - start < length:
            raise CaptureError(f"entry at offset {off}: {length} bytes announced, {len(data) - start} left")
        raw = bytes(data[start:start + length])
        if HEADER.unpack_from(raw)[2] != length - HEADER.size:
            raise CaptureError(f"entry at offset {off}: the record's header says {HEADER.unpack_from(raw)[2]} "
                               f"body bytes, the entry holds {length - HEADER.size}")
        out.append(Entry(direction, action, raw))
        off = start + length
    return out


def load(path: Path | str) -> list[Entry]:
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_FILE:
        raise CaptureError(f"{path}: {size} bytes, more than the {MAX_FILE} a capture may hold")
    return parse(path.read_bytes())
