"""Process protection's state: what the VMM knows per protected process and
per page (``PageMeta``, ``ProtectedProcess``), and the versioned, explicit
``ProtectionState`` it saves to and restores from.  Keys are included: the
state never leaves the VMM except inside the secure migration channel or a
local state file (0600, see ``Machine.save``)."""

from __future__ import annotations

import base64
import hmac
from dataclasses import dataclass
from typing import Callable

from minivmm import abi, prot_fpu, prot_pinned
from minivmm.cloak import KEY_BYTES, NONCE_BYTES, TAG_BYTES
from minivmm.cpu import CpuState

PLAINTEXT, CLOAKED = "plaintext", "cloaked"
PAGE = abi.PAGE_SIZE
MAX_PROTECTED = abi.NPROC
MAX_EXITED = abi.NPROC          # exited processes kept for the view; older ones are dropped
DETACHED = -1                   # ppn of a cloaked page whose ciphertext the kernel moved away
MAX_PAGES = (abi.USER_END - abi.USER_BASE) // PAGE


# --------------------------------------------------------------- metadata
@dataclass
class PageMeta:
    """What the VMM knows about one protected page (VMM-internal, mutable)."""
    vpn: int
    ppn: int               # the frame that held it when the VMM last saw it
    state: str = PLAINTEXT
    version: int = 0       # bumped on every cloak; bound into the AEAD
    nonce: bytes = b""
    tag: bytes = b""


@dataclass
class ProtectedProcess:
    pid: int
    cr3: int
    name: str
    ident: int             # the identity bound into every page's AEAD
    key_handle: int
    measurement: bytes     # SHA-256 of its image pages at protect time
    shared_vaddr: int
    pages: dict[int, PageMeta]
    nonce_counter: int = 0
    in_kernel: bool = False
    syscall: bool = False          # the pending kernel entry is int 0x80
    saved: CpuState | None = None  # its real registers while the kernel runs
    shown: CpuState | None = None  # what the kernel was shown
    stopped: str | None = None     # integrity violation that stopped it
    exited: bool = False
    pinned: dict | None = None     # descriptors and CR0 bits recorded at HC_PROTECT (prot_pinned)
    fpu: tuple | None = None       # its x87/SSE registers while the kernel runs (prot_fpu)


# ------------------------------------------------------------- state
@dataclass(frozen=True)
class ProtectionState:
    """Versioned, explicit state (keys included: it never leaves the VMM
    except inside the secure migration channel or a local state file)."""
    VERSION = 3         # 2: each process carries its pinned descriptors; 3: its saved x87/SSE
    #                     registers include the x87 environment (24, not 18: prot_fpu.REGS)
    enabled: bool
    next_handle: int
    keys: dict[int, bytes]
    processes: tuple[dict, ...] = ()

    def to_dict(self) -> dict:
        return {"version": self.VERSION, "enabled": self.enabled, "next_handle": self.next_handle,
                "keys": {str(h): base64.b64encode(k).decode() for h, k in self.keys.items()},
                "processes": list(self.processes)}

    @classmethod
    def from_dict(cls, d: dict) -> "ProtectionState":
        if d.get("version") != cls.VERSION:
            raise ValueError(f"protection state version {d.get('version')!r}, expected {cls.VERSION}")
        keys = {int(h): base64.b64decode(k, validate=True) for h, k in d["keys"].items()}
        if len(keys) > MAX_PROTECTED or any(len(k) != KEY_BYTES for k in keys.values()):
            raise ValueError("protection state: bad key table")
        procs = tuple(d["processes"])
        if len(procs) > MAX_PROTECTED + MAX_EXITED:
            raise ValueError("protection state: too many protected processes")
        return cls(enabled=bool(d["enabled"]), next_handle=int(d["next_handle"]), keys=keys,
                   processes=procs)


def proc_to_dict(p: ProtectedProcess) -> dict:
    return {"pid": p.pid, "cr3": p.cr3, "name": p.name, "ident": p.ident, "key_handle": p.key_handle,
            "measurement": p.measurement.hex(), "shared_vaddr": p.shared_vaddr,
            "nonce_counter": p.nonce_counter, "in_kernel": p.in_kernel, "syscall": p.syscall,
            "saved": p.saved.to_dict() if p.saved else None,
            "shown": p.shown.to_dict() if p.shown else None,
            "stopped": p.stopped, "exited": p.exited, "pinned": p.pinned,
            "fpu": prot_fpu.to_json(p.fpu),
            "pages": [[m.vpn, m.ppn, m.state, m.version, m.nonce.hex(), m.tag.hex()]
                      for m in p.pages.values()]}


def proc_from_dict(d: dict) -> ProtectedProcess:
    pages = {}
    if len(d["pages"]) > MAX_PAGES:
        raise ValueError("protection state: too many pages")
    for vpn, ppn, state, version, nonce, tag in d["pages"]:
        if state not in (PLAINTEXT, CLOAKED):
            raise ValueError(f"protection state: page state {state!r}")
        meta = PageMeta(int(vpn), int(ppn), state, int(version), bytes.fromhex(nonce), bytes.fromhex(tag))
        if state == CLOAKED and (len(meta.nonce) != NONCE_BYTES or len(meta.tag) != TAG_BYTES):
            raise ValueError("protection state: cloaked page without nonce and tag")
        pages[meta.vpn] = meta
    return ProtectedProcess(
        pid=int(d["pid"]), cr3=int(d["cr3"]), name=str(d["name"]), ident=int(d["ident"]),
        key_handle=int(d["key_handle"]), measurement=bytes.fromhex(d["measurement"]),
        shared_vaddr=int(d["shared_vaddr"]), pages=pages, nonce_counter=int(d["nonce_counter"]),
        in_kernel=bool(d["in_kernel"]), syscall=bool(d["syscall"]),
        saved=CpuState.from_dict(d["saved"]) if d["saved"] else None,
        shown=CpuState.from_dict(d["shown"]) if d["shown"] else None,
        stopped=d["stopped"], exited=bool(d["exited"]),
        pinned=prot_pinned.check(d["pinned"]) if d["pinned"] is not None else None,
        fpu=prot_fpu.from_json(d["fpu"]))


def seeded_keys(seed: bytes) -> Callable[[int], bytes]:
    """A deterministic key source (HMAC-SHA256 in counter mode) for reproducible
    teaching runs and tests.  Anyone who knows the seed knows every key."""
    counter = 0

    def source(n: int) -> bytes:
        nonlocal counter
        out = b""
        while len(out) < n:
            counter += 1
            out += hmac.new(seed, b"minivmm-keys" + counter.to_bytes(8, "little"), "sha256").digest()
        return out[:n]
    return source
