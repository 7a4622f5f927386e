"""Bodies of the migration records (the framing is ``migrate/wire.py``).

All integers little-endian.  Every decoder checks the body's exact length
and every field's range before using it, and raises :class:`ProtocolError`
with the reason; none of them trusts a count to size an allocation.

    HELLO        magic[8] version:u16 flags:u16 ram_size:u32 info:json
                 info = {"vm": name, "vclock": n, "source": host label}
    WELCOME      magic[8] version:u16 status:u16 reason:utf-8
                 status 0 OK, 1 BUSY, 2 VERSION, 3 UNSUPPORTED (e.g. RAM size)
    ROUND_BEGIN  round:u32 pages:u32          pages this round will carry
    PAGES        count:u32 pfn:u32[count] data[count * 4096]
                 count 1..256, pfns strictly increasing and < ram_size/4096
    ZERO_PAGES   count:u32 pfn:u32[count]     pages that are all zero
    ROUND_END    round:u32 pages:u32          must equal ROUND_BEGIN's count
    ROUND_ACK    round:u32 pages:u32          destination -> source: round stored
    STATE        a chunk of the state document (canonical JSON of
                 MachineState.to_doc(): CPU, timer, console, dirty log, VMM
                 bookkeeping, image metadata, and whatever later layers add)
    DIGEST       state_len:u64 digest[32]     see ``migrate/digest.py``
    PREPARED     (empty) destination holds the whole VM, ready to resume
    COMMIT       (empty) source's point of no return
    RESUMED      json {"vclock": n, "clock": monotonic s, "boot_id": str}
    ABORT        reason:utf-8
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

from minivmm.memory import MAX_RAM, MIN_RAM          # the VMM's own bounds on guest RAM
from migrate.errors import ProtocolError, Unsupported, VersionMismatch
from migrate.wire import MAGIC, MAX_BATCH, MAX_SMALL, MAX_ZERO_BATCH, PAGE_SIZE, VERSION

STATUS_OK, STATUS_BUSY, STATUS_VERSION, STATUS_UNSUPPORTED = 0, 1, 2, 3
STATUS_NAMES = {0: "ok", 1: "busy", 2: "version", 3: "unsupported"}

_HELLO = struct.Struct("<8sHHI")
_WELCOME = struct.Struct("<8sHH")
_ROUND = struct.Struct("<II")
_DIGEST = struct.Struct("<Q32s")
_U32 = struct.Struct("<I")


def _json(body: bytes, what: str) -> dict:
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:    # deep nesting is hostile too
        raise ProtocolError(f"{what}: not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ProtocolError(f"{what}: JSON object expected")
    return doc


def _dumps(doc: dict) -> bytes:
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    if len(data) > MAX_SMALL - 64:
        raise ValueError("control message too large")
    return data


# ------------------------------------------------------------------ handshake
@dataclass(frozen=True)
class Hello:
    ram_size: int
    info: dict
    version: int = VERSION

    def encode(self) -> bytes:
        return _HELLO.pack(MAGIC, self.version, 0, self.ram_size) + _dumps(self.info)

    @classmethod
    def decode(cls, body: bytes) -> "Hello":
        if len(body) < _HELLO.size:
            raise ProtocolError(f"HELLO of {len(body)} bytes is too short")
        magic, version, flags, ram_size = _HELLO.unpack_from(body)
        if magic != MAGIC:
            raise ProtocolError(f"not a minivmm migration stream (magic {magic!r})")
        if version != VERSION:
            raise VersionMismatch(f"peer speaks migration protocol version {version}; this VMM speaks {VERSION}")
        if flags:
            raise Unsupported(f"HELLO flags {flags:#x} not understood")
        if ram_size % PAGE_SIZE or not MIN_RAM <= ram_size <= MAX_RAM:
            raise Unsupported(f"HELLO: guest RAM of {ram_size} bytes is not a page multiple in "
                                f"[{MIN_RAM >> 20}, {MAX_RAM >> 20}] MiB")
        return cls(ram_size, _json(body[_HELLO.size:], "HELLO info"), version)


@dataclass(frozen=True)
class Welcome:
    status: int
    reason: str = ""
    version: int = VERSION

    def encode(self) -> bytes:
        return _WELCOME.pack(MAGIC, self.version, self.status) + self.reason.encode()[:1024]

    @classmethod
    def decode(cls, body: bytes) -> "Welcome":
        if len(body) < _WELCOME.size:
            raise ProtocolError(f"WELCOME of {len(body)} bytes is too short")
        magic, version, status = _WELCOME.unpack_from(body)
        if magic != MAGIC:
            raise ProtocolError(f"the peer is not a minivmm migration destination (magic {magic!r})")
        if version != VERSION:
            raise ProtocolError(f"destination speaks migration protocol version {version}; we speak {VERSION}")
        if status not in STATUS_NAMES:
            raise ProtocolError(f"WELCOME status {status} unknown")
        return cls(status, body[_WELCOME.size:].decode("utf-8", "replace"), version)


# --------------------------------------------------------------------- rounds
@dataclass(frozen=True)
class RoundMark:
    """ROUND_BEGIN and ROUND_END share a layout."""
    round: int
    pages: int

    def encode(self) -> bytes:
        return _ROUND.pack(self.round, self.pages)

    @classmethod
    def decode(cls, body: bytes, what: str) -> "RoundMark":
        if len(body) != _ROUND.size:
            raise ProtocolError(f"{what} of {len(body)} bytes, expected {_ROUND.size}")
        return cls(*_ROUND.unpack(body))


def _pfns(body: bytes, count: int, npages: int, what: str) -> np.ndarray:
    pfns = np.frombuffer(body, dtype="<u4", count=count, offset=4)
    if count > 1 and not bool(np.all(pfns[1:] > pfns[:-1])):
        raise ProtocolError(f"{what}: frame numbers not strictly increasing")
    if int(pfns[-1]) >= npages:
        raise ProtocolError(f"{what}: frame {int(pfns[-1])} outside RAM of {npages} pages")
    return pfns.astype(np.int64)


def encode_pages(pfns: np.ndarray, data: np.ndarray) -> tuple:
    """The body's parts (sent scatter-gather, no joining copy); ``data``:
    the pages' bytes, shape (len(pfns), 4096), uint8, C-contiguous."""
    return (_U32.pack(len(pfns)), pfns.astype("<u4").tobytes(), np.ascontiguousarray(data).data.cast("B"))


def pages_body(buf: bytearray, pfns: np.ndarray) -> tuple[memoryview, np.ndarray]:
    """Lay a PAGES body out in ``buf`` (a sender's reused buffer, at least
    MAX_BODY[PAGES] bytes): the count and frame numbers written, the pages
    left for the caller.  Returns (the body, the (count, 4096) uint8 array
    inside it that the pages go in) -- the same bytes as :func:`encode_pages`."""
    n = len(pfns)
    pages_head(buf, pfns)
    data = np.frombuffer(buf, dtype=np.uint8, count=n * PAGE_SIZE, offset=4 + 4 * n).reshape(n, PAGE_SIZE)
    return memoryview(buf)[:4 + n * (4 + PAGE_SIZE)], data


def pages_head(buf: bytearray, pfns: np.ndarray) -> memoryview:
    """Only the head of a PAGES body (count, frame numbers) laid out in
    ``buf``: for a sender that seals the pages straight from guest RAM."""
    n = len(pfns)
    _U32.pack_into(buf, 0, n)
    np.frombuffer(buf, dtype="<u4", count=n, offset=4)[:] = pfns
    return memoryview(buf)[:4 + 4 * n]


def decode_pages(body: bytes, npages: int) -> tuple[np.ndarray, np.ndarray]:
    """(pfns, data of shape (count, 4096))."""
    if len(body) < 4:
        raise ProtocolError("PAGES record too short")
    (count,) = _U32.unpack_from(body)
    if not 1 <= count <= MAX_BATCH:
        raise ProtocolError(f"PAGES count {count} outside 1..{MAX_BATCH}")
    if len(body) != 4 + count * (4 + PAGE_SIZE):
        raise ProtocolError(f"PAGES of {len(body)} bytes, {count} pages need {4 + count * (4 + PAGE_SIZE)}")
    pfns = _pfns(body, count, npages, "PAGES")
    data = np.frombuffer(body, dtype=np.uint8, offset=4 + 4 * count).reshape(count, PAGE_SIZE)
    return pfns, data


def decode_pages_head(head: bytes, length: int, npages: int) -> np.ndarray:
    """The frame numbers of a PAGES record of ``length`` body bytes from its
    head (count, frame numbers), read before its pages: the same checks as
    :func:`decode_pages`."""
    (count,) = _U32.unpack_from(head)
    if not 1 <= count <= MAX_BATCH:
        raise ProtocolError(f"PAGES count {count} outside 1..{MAX_BATCH}")
    if length != 4 + count * (4 + PAGE_SIZE) or len(head) != 4 + 4 * count:
        raise ProtocolError(f"PAGES of {length} bytes, {count} pages need {4 + count * (4 + PAGE_SIZE)}")
    return _pfns(head, count, npages, "PAGES")


def encode_zero_pages(pfns: np.ndarray) -> bytes:
    return _U32.pack(len(pfns)) + pfns.astype("<u4").tobytes()


def decode_zero_pages(body: bytes, npages: int) -> np.ndarray:
    if len(body) < 4:
        raise ProtocolError("ZERO_PAGES record too short")
    (count,) = _U32.unpack_from(body)
    if not 1 <= count <= MAX_ZERO_BATCH:
        raise ProtocolError(f"ZERO_PAGES count {count} outside 1..{MAX_ZERO_BATCH}")
    if len(body) != 4 + 4 * count:
        raise ProtocolError(f"ZERO_PAGES of {len(body)} bytes, {count} frames need {4 + 4 * count}")
    return _pfns(body, count, npages, "ZERO_PAGES")


# ---------------------------------------------------------------------- final
@dataclass(frozen=True)
class Digest:
    state_len: int
    digest: bytes

    def encode(self) -> bytes:
        return _DIGEST.pack(self.state_len, self.digest)

    @classmethod
    def decode(cls, body: bytes) -> "Digest":
        if len(body) != _DIGEST.size:
            raise ProtocolError(f"DIGEST of {len(body)} bytes, expected {_DIGEST.size}")
        return cls(*_DIGEST.unpack(body))


@dataclass(frozen=True)
class Resumed:
    vclock: int
    clock: float          # destination's time.monotonic() at resume
    boot_id: str          # same boot id = same host = one monotonic clock

    def encode(self) -> bytes:
        return _dumps({"vclock": self.vclock, "clock": self.clock, "boot_id": self.boot_id})

    @classmethod
    def decode(cls, body: bytes) -> "Resumed":
        doc = _json(body, "RESUMED")
        try:
            vclock, clock, boot_id = int(doc["vclock"]), float(doc["clock"]), str(doc["boot_id"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"RESUMED: bad field: {exc}") from None
        return cls(vclock, clock, boot_id)


def encode_reason(reason: str) -> bytes:
    return reason.encode("utf-8")[:1024]


def decode_reason(body: bytes) -> str:
    return body.decode("utf-8", "replace")
