"""The whole machine's state as an explicit, versioned object and file format.

Never a pickle of engine internals: a ``UcContext`` is raw QEMU bytes tied to
one Unicorn build.  Instead each component contributes its own versioned
state (``CpuState``, ``TimerState``, ``ConsoleState``, ``DirtyLogState``) and
this module puts them in one container.

File format (little-endian; version 2)::

    offset  size  field
    0       8     magic  b"MVMSTATE"
    8       2     version (2; version 1 had no protection metadata)
    10      2     reserved (0)
    12      4     json_len   (<= MAX_JSON)
    16      4     ram_len    compressed RAM bytes (<= MAX_RAM_BLOB)
    20      4     ram_size   uncompressed guest RAM bytes (16..256 MiB)
    24      32    sha256 of everything after this header
    56      ...   JSON: {cpu, timer, console, dirty, vmm, image, protection}
    ...     ...   zlib(RAM)

``protection`` holds the protection metadata *and the page keys*
(``minivmm.protection.ProtectionState``): a state file is as secret as the
VMM itself.

The header, the sizes and the checksum are checked before anything is
parsed; a file from another version, truncated, or tampered with raises
:class:`StateError` saying what is wrong.  (The checksum detects accidents,
not attackers: migration protects state with its own MAC.)
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import zlib
from dataclasses import asdict, dataclass, field

from minivmm.console import ConsoleState
from minivmm.cpu import CpuState
from minivmm.dirtylog import DirtyLogState
from minivmm.errors import StateError
from minivmm.memory import MAX_RAM, MIN_RAM
from minivmm.protection import ProtectionState
from minivmm.timer import TimerState

MAGIC = b"MVMSTATE"
VERSION = 2
HEADER = struct.Struct("<8sHHIII32s")
MAX_JSON = 64 << 20
MAX_RAM_BLOB = MAX_RAM + (MAX_RAM >> 6) + 1024      # zlib's worst case on random data


@dataclass(frozen=True)
class VmmState:
    """The VMM's own bookkeeping about the guest."""
    VERSION = 1
    mode: str
    tick_us: int
    pids: dict[int, int]          # cr3 -> pid
    names: dict[int, str]
    exits: dict[int, int]
    event_seq: int
    slices: int
    halted: str | None
    halt_detail: str
    shutdown_status: int | None


@dataclass(frozen=True)
class MachineState:
    VERSION = VERSION
    ram_size: int
    ram: bytes
    cpu: CpuState
    timer: TimerState
    console: ConsoleState
    dirty: DirtyLogState
    vmm: VmmState
    image: dict = field(default_factory=dict)   # name, description, kernel_symbols, processes
    protection: ProtectionState | None = None   # None: protection on, nothing protected yet

    # --------------------------------------------------------------- encode
    def to_doc(self) -> dict:
        """Everything except RAM, as a JSON-able dict: the file's JSON section,
        and what live migration sends at stop-and-copy (so a field added here
        migrates with no change to the migration engine)."""
        return {
            "cpu": self.cpu.to_dict(),
            "timer": asdict(self.timer),
            "console": {"channel": self.console.channel,
                        "output": base64.b64encode(self.console.output).decode(),
                        "per_pid": {str(p): base64.b64encode(d).decode()
                                    for p, d in self.console.per_pid.items()}},
            "dirty": {"enabled": self.dirty.enabled, "dirty_pfns": list(self.dirty.dirty_pfns)},
            "vmm": {**asdict(self.vmm),
                    "pids": {str(k): v for k, v in self.vmm.pids.items()},
                    "names": {str(k): v for k, v in self.vmm.names.items()},
                    "exits": {str(k): v for k, v in self.vmm.exits.items()}},
            "image": self.image,
            "protection": self.protection.to_dict() if self.protection else None,
        }

    def to_bytes(self, level: int = 1) -> bytes:
        blob = json.dumps(self.to_doc(), sort_keys=True).encode()
        ram = zlib.compress(self.ram, level)
        body = blob + ram
        return HEADER.pack(MAGIC, VERSION, 0, len(blob), len(ram), self.ram_size,
                           hashlib.sha256(body).digest()) + body

    # --------------------------------------------------------------- decode
    @classmethod
    def from_bytes(cls, data: bytes, where: str = "state") -> "MachineState":
        if len(data) < HEADER.size:
            raise StateError(f"{where}: truncated: {len(data)} bytes, the header needs {HEADER.size}")
        magic, version, _, json_len, ram_len, ram_size, digest = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise StateError(f"{where}: not a minivmm machine state (magic {magic!r})")
        if version != VERSION:
            raise StateError(f"{where}: state format version {version}; this VMM reads version {VERSION}")
        if json_len > MAX_JSON or ram_len > MAX_RAM_BLOB or not MIN_RAM <= ram_size <= MAX_RAM:
            raise StateError(f"{where}: header out of bounds (json {json_len}, ram blob {ram_len}, "
                             f"ram size {ram_size})")
        if len(data) != HEADER.size + json_len + ram_len:
            raise StateError(f"{where}: {len(data)} bytes, header says "
                             f"{HEADER.size + json_len + ram_len} (truncated or padded)")
        body = memoryview(data)[HEADER.size:]
        if hashlib.sha256(body).digest() != digest:
            raise StateError(f"{where}: checksum mismatch (corrupt file)")
        try:
            inflater = zlib.decompressobj()
            ram = inflater.decompress(body[json_len:], ram_size)
            if len(ram) != ram_size or inflater.unconsumed_tail or not inflater.eof:
                raise StateError(f"{where}: RAM section does not hold exactly {ram_size} bytes")
            doc = json.loads(bytes(body[:json_len]))
        except StateError:
            raise
        except (ValueError, zlib.error) as exc:
            raise StateError(f"{where}: malformed state: {type(exc).__name__}: {exc}") from None
        return cls.from_doc(doc, ram_size, ram, where)

    @classmethod
    def from_doc(cls, doc: dict, ram_size: int, ram: bytes = b"", where: str = "state") -> "MachineState":
        """The inverse of :meth:`to_doc`; ``ram`` may be empty when the caller
        supplies guest RAM separately (``Machine.restore(st, ram=...)``)."""
        try:
            con = doc["console"]
            vmm = doc["vmm"]
            return cls(
                ram_size=ram_size, ram=ram,
                cpu=CpuState.from_dict(doc["cpu"]),
                timer=TimerState(**doc["timer"]),
                console=ConsoleState(int(con["channel"]), base64.b64decode(con["output"]),
                                     {int(p): base64.b64decode(d) for p, d in con["per_pid"].items()}),
                dirty=DirtyLogState(bool(doc["dirty"]["enabled"]),
                                    tuple(int(p) for p in doc["dirty"]["dirty_pfns"])),
                vmm=VmmState(**{**vmm,
                                "pids": {int(k): int(v) for k, v in vmm["pids"].items()},
                                "names": {int(k): str(v) for k, v in vmm["names"].items()},
                                "exits": {int(k): int(v) for k, v in vmm["exits"].items()}}),
                image=dict(doc["image"]),
                protection=ProtectionState.from_dict(doc["protection"]) if doc["protection"] else None)
        except StateError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, zlib.error) as exc:
            raise StateError(f"{where}: malformed state: {type(exc).__name__}: {exc}") from None
