"""The whole machine's state as an explicit, versioned object and file format.

Never a pickle of engine internals: a ``UcContext`` is raw QEMU bytes tied to
one Unicorn build.  Instead each component contributes its own versioned
state (``CpuState``, ``TimerState``, ``ConsoleState``, ``DirtyLogState``) and
this module puts them in one container.

File format (little-endian; version 3)::

    offset  size  field
    0       8     magic  b"MVMSTATE"
    8       2     version (3; 2 had no identity and its keys in clear, 1 no protection metadata)
    10      2     reserved (0)
    12      4     json_len   (<= MAX_JSON)
    16      4     ram_len    compressed RAM bytes (<= MAX_RAM_BLOB)
    20      4     ram_size   uncompressed guest RAM bytes (16..256 MiB)
    24      32    sha256 of everything after this header
    56      ...   JSON: {cpu, timer, console, dirty, vmm, image, identity, protection, sealed}
    ...     ...   zlib(RAM)

``identity`` is the VM's identity and migration generation
(``{"vm_id": 32 hex, "generation": n}``): it travels with the VM (state
files, live migration), so a destination can refuse an old copy of it.

``protection`` holds the protection metadata *and the process keys*
(``minivmm.protection.ProtectionState``).  In a file they are never in clear:
``to_bytes(wrap=...)`` moves the whole section into ``sealed``
(``{"by": wrapper name, "blob": base64}``, ``protection`` null), sealed by a
:class:`KeyWrap` that binds the identity to it -- so an identity edited in
the file means the keys do not open.  ``minivmm`` does no sealing itself: the
wrapper is a seam (``minivmm run`` gets one from ``args.key_wrap``; the
``migrate`` package gives a TPM-backed one, ``migrate/secure/statekeys.py``).
A file without process keys needs no wrapper.  ``Machine.save`` refuses to
write process keys in clear; ``to_bytes()`` without a wrapper does (in
memory, for tests and the sealed recovery file, which seals it whole).

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
from typing import Protocol

from minivmm.console import ConsoleState
from minivmm.cpu import CpuState
from minivmm.dirtylog import DirtyLogState
from minivmm.errors import StateError
from minivmm.memory import MAX_RAM, MIN_RAM
from minivmm.protection import ProtectionState
from minivmm.timer import TimerState

MAGIC = b"MVMSTATE"
VERSION = 3
_ID_HEX = frozenset("0123456789abcdef")
MAX_GENERATION = 1 << 40
IDENTITY_LABEL = b"minivmm-state-identity v1\0"


class KeyWrap(Protocol):
    """Seals the secret part of a state file (the ``protection`` section:
    process keys and metadata).  ``bound`` (the VM's identity and generation)
    must be bound to the blob: ``unwrap`` with another ``bound`` fails."""
    name: str

    def wrap(self, secret: bytes, bound: bytes) -> bytes: ...

    def unwrap(self, blob: bytes, bound: bytes) -> bytes:
        """The secret, or ``StateError`` saying why not."""


def check_identity(ident, where: str = "state") -> dict:
    """``{"vm_id": 32 lowercase hex, "generation": 0..2**40}``, or StateError."""
    if (not isinstance(ident, dict) or set(ident) != {"vm_id", "generation"}
            or not isinstance(ident["vm_id"], str) or len(ident["vm_id"]) != 32
            or not set(ident["vm_id"]) <= _ID_HEX or not isinstance(ident["generation"], int)
            or isinstance(ident["generation"], bool) or not 0 <= ident["generation"] < MAX_GENERATION):
        raise StateError(f"{where}: bad VM identity (vm_id of 32 hex digits and a generation)")
    return {"vm_id": ident["vm_id"], "generation": ident["generation"]}


def identity_binding(ident: dict) -> bytes:
    """What a :class:`KeyWrap` binds the sealed keys to."""
    return IDENTITY_LABEL + json.dumps(check_identity(ident), sort_keys=True, separators=(",", ":")).encode()
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
    identity: dict | None = None                # {"vm_id", "generation"}; None only in hand-made states

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
            "identity": self.identity,
            "protection": self.protection.to_dict() if self.protection else None,
        }

    def has_keys(self) -> bool:
        return bool(self.protection and self.protection.keys)

    def to_bytes(self, level: int = 1, *, wrap: KeyWrap | None = None) -> bytes:
        """The file's bytes; with ``wrap`` the protection section is sealed (see the module docstring)."""
        doc = self.to_doc()
        doc["sealed"] = None
        if wrap is not None:
            if self.identity is None:
                raise StateError("state: no VM identity to bind the sealed keys to")
            secret = json.dumps({"protection": doc["protection"]}, sort_keys=True).encode()
            doc["sealed"] = {"by": str(wrap.name),
                             "blob": base64.b64encode(wrap.wrap(secret, identity_binding(self.identity))).decode()}
            doc["protection"] = None
        blob = json.dumps(doc, sort_keys=True).encode()
        ram = zlib.compress(self.ram, level)
        body = blob + ram
        return HEADER.pack(MAGIC, VERSION, 0, len(blob), len(ram), self.ram_size,
                           hashlib.sha256(body).digest()) + body

    # --------------------------------------------------------------- decode
    @classmethod
    def from_bytes(cls, data: bytes, where: str = "state", *, unwrap: KeyWrap | None = None) -> "MachineState":
        """Parse a state file; ``unwrap`` opens its sealed keys (a file with
        sealed keys and no ``unwrap`` is refused, saying how to restore it)."""
        if len(data) < HEADER.size:
            raise StateError(f"{where}: truncated: {len(data)} bytes, the header needs {HEADER.size}")
        magic, version, _, json_len, ram_len, ram_size, digest = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise StateError(f"{where}: not a minivmm machine state (magic {magic!r})")
        if version != VERSION:
            old = (" (version 2 kept process keys in clear and no VM identity: it is not read any more)"
                   if version == 2 else "")
            raise StateError(f"{where}: state format version {version}; this VMM reads version {VERSION}{old}")
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
        if not isinstance(doc, dict) or "sealed" not in doc:
            raise StateError(f"{where}: malformed state: no 'sealed' section")
        sealed = doc.pop("sealed")
        if sealed is not None:
            doc["protection"] = cls._unseal(sealed, doc, where, unwrap)
        return cls.from_doc(doc, ram_size, ram, where)

    @staticmethod
    def _unseal(sealed, doc: dict, where: str, unwrap: KeyWrap | None):
        if not isinstance(sealed, dict) or set(sealed) != {"by", "blob"} or doc.get("protection") is not None:
            raise StateError(f"{where}: malformed state: bad 'sealed' section")
        if unwrap is None:
            raise StateError(f"{where}: its process keys are sealed (by {str(sealed['by'])[:32]!r}); restore "
                             f"it where they can be unsealed: 'minivmm run {where} --restore' on the host "
                             f"whose TPM saved it (--tpm-dir)")
        if sealed["by"] != unwrap.name:
            raise StateError(f"{where}: keys sealed by {str(sealed['by'])[:32]!r}, not {unwrap.name!r}")
        try:
            blob = base64.b64decode(sealed["blob"], validate=True)
        except (TypeError, ValueError):
            raise StateError(f"{where}: malformed state: sealed keys are not base64") from None
        secret = unwrap.unwrap(blob, identity_binding(check_identity(doc.get("identity"), where)))
        try:
            part = json.loads(secret)
        except ValueError:
            raise StateError(f"{where}: sealed keys: not JSON") from None
        if not isinstance(part, dict) or set(part) != {"protection"}:
            raise StateError(f"{where}: sealed keys: must hold exactly 'protection'")
        return part["protection"]

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
                protection=ProtectionState.from_dict(doc["protection"]) if doc["protection"] else None,
                identity=check_identity(doc["identity"], where))
        except StateError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, zlib.error) as exc:
            raise StateError(f"{where}: malformed state: {type(exc).__name__}: {exc}") from None
