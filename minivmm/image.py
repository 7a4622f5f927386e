"""Guest images: what the loader puts in guest RAM before the first instruction.

File format (little-endian; version 1)::

    offset  size  field
    0       8     magic  b"MVMIMG\\r\\n"
    8       2     version (1)
    10      2     reserved (0)
    12      4     entry       kernel entry point (physical = virtual at boot)
    16      4     boot_esp    initial stack pointer
    20      4     min_ram     bytes of guest RAM the image needs
    24      4     nseg        number of segments (<= MAX_SEGMENTS)
    28      4     meta_len    bytes of JSON metadata (<= MAX_META)
    32      32    sha256      of everything after this header
    64      ...   nseg x (paddr u32, length u32, bytes)
    ...     ...   metadata: JSON {name, description, kernel_symbols, processes}

Every size is checked against the file and the limits *before* it is used,
and the checksum before anything is parsed, so a truncated or hostile file
gives an :class:`ImageError` that says what is wrong and where.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field

from minivmm.errors import ImageError

MAGIC = b"MVMIMG\r\n"
VERSION = 1
HEADER = struct.Struct("<8sHHIIIII32s")
SEGMENT = struct.Struct("<II")
MAX_RAM = 256 << 20
MAX_SEGMENTS = 65536
MAX_META = 4 << 20
MAX_FILE = MAX_RAM + MAX_META + HEADER.size + MAX_SEGMENTS * SEGMENT.size


@dataclass(frozen=True)
class ImageProcess:
    """What the builder knows about one process (the guest kernel owns the truth)."""

    pid: int
    name: str
    cr3: int
    entry: int
    data_pages: int = 0
    args: tuple[int, ...] = ()
    symbols: dict[str, int] = field(default_factory=dict, compare=False)


@dataclass
class GuestImage:
    name: str
    entry: int
    boot_esp: int
    min_ram: int
    segments: list[tuple[int, bytes]]
    kernel_symbols: dict[str, int] = field(default_factory=dict)
    processes: list[ImageProcess] = field(default_factory=list)
    description: str = ""

    def validate(self, where: str = "image") -> None:
        if not 0 < self.min_ram <= MAX_RAM:
            raise ImageError(f"{where}: needs {self.min_ram} bytes of RAM (limit {MAX_RAM})")
        for i, (paddr, data) in enumerate(self.segments):
            if paddr < 0 or paddr + len(data) > self.min_ram:
                raise ImageError(f"{where}: segment {i} [{paddr:#x}, {paddr + len(data):#x}) "
                                 f"lies outside the image's {self.min_ram:#x} bytes of RAM")
        if not any(p <= self.entry < p + len(d) for p, d in self.segments):
            raise ImageError(f"{where}: entry point {self.entry:#x} is not inside any segment")

    def to_bytes(self) -> bytes:
        self.validate()
        body = bytearray()
        for paddr, data in self.segments:
            body += SEGMENT.pack(paddr, len(data)) + data
        meta = json.dumps({
            "name": self.name, "description": self.description,
            "kernel_symbols": self.kernel_symbols,
            "processes": [{"pid": p.pid, "name": p.name, "cr3": p.cr3, "entry": p.entry,
                           "data_pages": p.data_pages, "args": list(p.args),
                           "symbols": p.symbols} for p in self.processes],
        }, sort_keys=True).encode()
        body += meta
        digest = hashlib.sha256(body).digest()
        header = HEADER.pack(MAGIC, VERSION, 0, self.entry, self.boot_esp, self.min_ram,
                             len(self.segments), len(meta), digest)
        return header + bytes(body)

    @classmethod
    def from_bytes(cls, blob: bytes, where: str = "image") -> "GuestImage":
        if len(blob) < HEADER.size:
            raise ImageError(f"{where}: truncated: {len(blob)} bytes, a header needs {HEADER.size}")
        if len(blob) > MAX_FILE:
            raise ImageError(f"{where}: {len(blob)} bytes is larger than any valid image")
        magic, version, _, entry, esp, min_ram, nseg, meta_len, digest = HEADER.unpack_from(blob)
        if magic != MAGIC:
            raise ImageError(f"{where}: not a minivmm image (bad magic {magic!r})")
        if version != VERSION:
            raise ImageError(f"{where}: image format version {version}, this VMM reads {VERSION}")
        if nseg > MAX_SEGMENTS or meta_len > MAX_META:
            raise ImageError(f"{where}: header claims {nseg} segments / {meta_len} metadata bytes")
        body = memoryview(blob)[HEADER.size:]
        if hashlib.sha256(body).digest() != digest:
            raise ImageError(f"{where}: checksum mismatch (corrupt or truncated file)")
        off, segments = 0, []
        for i in range(nseg):
            if off + SEGMENT.size > len(body):
                raise ImageError(f"{where}: segment {i} header at offset {HEADER.size + off} is truncated")
            paddr, length = SEGMENT.unpack_from(body, off)
            off += SEGMENT.size
            if length > MAX_RAM or off + length > len(body):
                raise ImageError(f"{where}: segment {i} claims {length} bytes, file has {len(body) - off}")
            segments.append((paddr, bytes(body[off:off + length])))
            off += length
        if off + meta_len != len(body):
            raise ImageError(f"{where}: metadata length {meta_len} does not match the "
                             f"{len(body) - off} bytes left in the file")
        try:
            meta = json.loads(bytes(body[off:]))
            procs = [ImageProcess(pid=int(p["pid"]), name=str(p["name"]), cr3=int(p["cr3"]),
                                  entry=int(p["entry"]), data_pages=int(p["data_pages"]),
                                  args=tuple(int(a) for a in p["args"]),
                                  symbols={str(k): int(v) for k, v in p["symbols"].items()})
                     for p in meta["processes"]]
            image = cls(name=str(meta["name"]), entry=entry, boot_esp=esp, min_ram=min_ram,
                        segments=segments, description=str(meta.get("description", "")),
                        kernel_symbols={str(k): int(v) for k, v in meta["kernel_symbols"].items()},
                        processes=procs)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ImageError(f"{where}: bad metadata: {exc}") from None
        image.validate(where)
        return image
