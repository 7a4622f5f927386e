"""Process protection (cloaking): the VMM owns the truth about protected pages.

After Overshadow/CHAOS as used by Zhang & Chen.  A user process asks for
protection with ``HC_PROTECT``; from then on the guest kernel is untrusted
with respect to it:

* **Pages.**  Every user page of the process (except its read-only info page
  and the one *shared* page it names for system-call buffers) is either
  *plaintext* (only the owner, at ring 3, can reach it) or *cloaked*
  (AES-GCM ciphertext in place, see ``cloak.py``).  The MMU's fill hook calls
  :meth:`Protection.on_fill` for every TLB miss: anyone but the owner at ring
  3 who reaches a plaintext frame (the kernel, another process, the VMM's own
  readers) makes the VMM cloak it first; the owner reaching a cloaked page
  makes the VMM verify and decrypt it.  A failed verification, or the owner
  finding a frame the VMM did not give it at that address, is an *integrity
  violation*: the process is stopped (every later fill of it is refused, so
  the kernel sees a page fault and kills it) and the VMM reports it.
  Every state change flushes the whole TLB: that keeps the invariant that
  nobody but the owner holds a TLB entry to a plaintext frame.

* **Registers.**  On every kernel entry from a protected process the VMM
  saves its registers and shows the kernel scrubbed ones (zero), except the
  system-call number and arguments (eax, ebx, ecx, edx) on ``int 0x80``.
  The return is found without any guest cooperation (DESIGN §5): the entry
  flushes the TLB, so the first ring-3 instruction fetch under the process's
  CR3 afterwards is a fill.  There the VMM compares what the kernel hands
  back with what it showed it (only eax, the system-call result, may
  change), reports any difference as tampering, and restores the saved
  registers.  General registers are restored inside the hook; when the
  kernel changed eip, esp, eflags or a segment (the translation already
  under way is for the wrong place), the fill is refused and the machine
  restores the whole context between slices (:meth:`resume_context`).

Everything here is VMM state: it saves to and restores from
:class:`ProtectionState`, and migrates with the machine.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from typing import Callable

from cryptography.exceptions import InvalidTag
from unicorn.x86_const import UC_X86_REG_CR3, UC_X86_REG_EFLAGS, UC_X86_REG_EIP, UC_X86_REG_SS

from minivmm import abi, prot_pinned
from minivmm import events as ev
from minivmm.cloak import KEY_BYTES, NONCE_BYTES, TAG_BYTES, PageCipher, associated_data, nonce_for
from minivmm.cpu import GP_REGS, SEG_REGS, CpuState
from minivmm.mmu import WalkFault, walk

PLAINTEXT, CLOAKED = "plaintext", "cloaked"
PAGE = abi.PAGE_SIZE
_U32 = struct.Struct("<I").unpack_from
PTE_P, PTE_W, PTE_U, PTE_PS = 1, 2, 4, 0x80
PF_P, PF_W, PF_U = 1, 2, 4

GP = ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp")
SYSCALL_VISIBLE = ("eax", "ebx", "ecx", "edx")
CONTROL = ("eip", "esp", "eflags", "cs", "ss", "ds", "es", "fs", "gs")
EFLAGS_STATUS = 0x8D5           # CF PF AF ZF SF OF: scrubbed at kernel entry, restored on return

MAX_PROTECTED = abi.NPROC
MAX_EXITED = abi.NPROC          # exited processes kept for the view; older ones are dropped
DETACHED = -1                   # ppn of a cloaked page whose ciphertext the kernel moved away
MAX_PAGES = (abi.USER_END - abi.USER_BASE) // PAGE
# At most this many pages per HC_PROTECT (64 MiB of a process): the walk, the
# measurement and the bookkeeping are linear in it, so this bounds what one
# hypercall -- repeated by a kernel as often as it likes -- costs the VMM.
MAX_PROTECT = 16384


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


# ---------------------------------------------------- read-only view
@dataclass(frozen=True)
class PageView:
    owner: int
    vaddr: int
    vpn: int
    frame: int
    state: str
    version: int
    nonce: str
    mac: str


@dataclass(frozen=True)
class ProcessView:
    pid: int
    name: str
    ident: int
    measurement: str
    key_handle: int
    shared_vaddr: int
    in_kernel: bool
    saved_context: CpuState | None
    stopped: str | None
    exited: bool
    pages: tuple[PageView, ...]

    def page(self, vaddr: int) -> PageView:
        for p in self.pages:
            if p.vpn == vaddr >> 12:
                return p
        raise KeyError(f"{vaddr:#x} is not a protected page of pid {self.pid}")


# ------------------------------------------------------------- state
@dataclass(frozen=True)
class ProtectionState:
    """Versioned, explicit state (keys included: it never leaves the VMM
    except inside the secure migration channel or a local state file)."""
    VERSION = 2         # 2: each process carries its pinned descriptors
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


def _proc_to_dict(p: ProtectedProcess) -> dict:
    return {"pid": p.pid, "cr3": p.cr3, "name": p.name, "ident": p.ident, "key_handle": p.key_handle,
            "measurement": p.measurement.hex(), "shared_vaddr": p.shared_vaddr,
            "nonce_counter": p.nonce_counter, "in_kernel": p.in_kernel, "syscall": p.syscall,
            "saved": p.saved.to_dict() if p.saved else None,
            "shown": p.shown.to_dict() if p.shown else None,
            "stopped": p.stopped, "exited": p.exited, "pinned": p.pinned,
            "pages": [[m.vpn, m.ppn, m.state, m.version, m.nonce.hex(), m.tag.hex()]
                      for m in p.pages.values()]}


def _proc_from_dict(d: dict) -> ProtectedProcess:
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
        pinned=prot_pinned.check(d["pinned"]) if d["pinned"] is not None else None)


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


# ------------------------------------------------------------ the engine
class Protection:
    """The protection engine of one machine.

    ``flush`` flushes the whole TLB (safe inside hooks); ``clock`` returns
    virtual time for events; ``key_source(n)`` returns n secret random bytes.
    """

    def __init__(self, ram, events: ev.EventBus, *, flush: Callable[[], None],
                 clock: Callable[[], int], enabled: bool = True,
                 key_source: Callable[[int], bytes] = os.urandom,
                 before_event: Callable[[], None] = lambda: None,
                 invalidate_code: Callable[[], None] = lambda: None,
                 stop_slice: Callable[[], None] = lambda: None):
        self.ram = ram
        self.events = events
        self._before_event = before_event     # e.g. flush console output first, to keep order
        self.enabled = enabled
        self._flush = flush
        # Drops every translation the emulator made from guest code: after the
        # VMM rewrites a frame (cloak, uncloak, restore), a translation of its
        # old bytes must not run again -- under any virtual address, in any
        # address space, hence all of them, not a range by virtual address.
        self._invalidate_code = invalidate_code
        self._stop_slice = stop_slice
        self.code_invalidations = 0
        # Inside a data-access fill a translated block is executing: dropping
        # translations under it is not safe, so the drop waits for the end of
        # that block (the slice is stopped there; the machine then calls
        # settle_translations).  A fetch fill comes before the block is looked
        # up, so there it happens at once: the stale block never runs.
        self._in_data_fill = False
        self.code_flush_pending = False
        self._clock = clock
        self._key_source = key_source
        self.procs: dict[int, ProtectedProcess] = {}
        self.by_cr3: dict[int, ProtectedProcess] = {}      # by CR3 (exited ones until it is reused)
        self.frames: dict[int, tuple[ProtectedProcess, PageMeta]] = {}   # ppn -> owner page
        self._keys: dict[int, bytes] = {}
        self._ciphers: dict[int, PageCipher] = {}
        self._next_handle = 1
        self._nonce_prefix = int.from_bytes(key_source(4), "little")   # fresh per VMM instance
        self.resume_pending: ProtectedProcess | None = None   # set by on_fill, see machine
        # reload_data_segments(uc, {"ds": sel, ...}): loads them from the
        # guest's tables from inside the fill hook (the machine guards the
        # nested descriptor fills); None: always restore between slices.
        self.reload_data_segments: Callable | None = None

    def _emit(self, cls, **fields) -> None:
        self._before_event()
        self.events.emit(cls, self._clock(), **fields)

    @property
    def active(self) -> bool:
        return bool(self.frames) or bool(self.by_cr3)

    # ------------------------------------------------------------ protect
    def protect(self, cr3: int, pid: int, name: str, shared_vaddr: int, flags: int,
                pinned: dict | None = None) -> int:
        """HC_PROTECT from ring 3.  Returns 0 or a negative errno (see abi).
        ``pinned``: the caller's descriptors now (``prot_pinned.snapshot``),
        checked on every return to it."""
        if not self.enabled:
            return -abi.ENOSYS
        if pid == 0:
            return -abi.EPERM                       # not a process the kernel announced
        if pid in self.procs and not self.procs[pid].exited:
            return -abi.EEXIST
        if cr3 & 0xFFFFF000 in self.by_cr3:
            return -abi.EEXIST          # this address space belongs to a protected process
        if flags != 0 or shared_vaddr % PAGE or not abi.USER_BASE <= shared_vaddr < abi.USER_END \
                or shared_vaddr == abi.INFO_VADDR:
            return -abi.EINVAL
        mapped = self._user_pages(cr3)
        if mapped is None:
            return -abi.E2BIG                       # more than one hypercall may cost (see MAX_PROTECT)
        shared = mapped.get(shared_vaddr >> 12)
        if shared is None or not shared[1]:
            return -abi.EINVAL                      # the shared page must be mapped writable
        pages: dict[int, PageMeta] = {}
        owned: set[int] = {shared[0]}               # frames taken so far: linear, not quadratic
        for vpn, (ppn, _) in sorted(mapped.items()):
            if vpn in (abi.INFO_VADDR >> 12, shared_vaddr >> 12):
                continue
            if ppn in self.frames or ppn in owned:
                return -abi.EINVAL                  # a frame mapped twice cannot be owned once
            owned.add(ppn)
            pages[vpn] = PageMeta(vpn, ppn)
        if len([p for p in self.procs.values() if not p.exited]) >= MAX_PROTECTED:
            return -abi.EINVAL
        measure = hashlib.sha256()
        for vpn, meta in sorted(pages.items()):
            if abi.IMAGE_VADDR >> 12 <= vpn < abi.DATA_VADDR >> 12:
                measure.update(struct.pack("<I", vpn) + bytes(self.ram.page(meta.ppn)))
        handle = self._next_handle
        self._next_handle += 1
        self._keys[handle] = self._key_source(KEY_BYTES)
        self._ciphers[handle] = PageCipher(self._keys[handle])
        proc = ProtectedProcess(pid=pid, cr3=cr3 & 0xFFFFF000, name=name,
                                ident=int.from_bytes(self._key_source(8), "little"),
                                key_handle=handle, measurement=measure.digest(),
                                shared_vaddr=shared_vaddr, pages=pages, pinned=pinned)
        self.procs.pop(pid, None)       # an exited namesake: replaced
        self.procs[pid] = proc
        self.by_cr3[proc.cr3] = proc
        for meta in pages.values():
            self.frames[meta.ppn] = (proc, meta)
            # A live migration may already have sent this frame in plaintext
            # (it was not secret then); logged dirty, it goes again, sealed.
            self.ram.dirty.mark(meta.ppn)
        self._flush()       # nobody else may keep a TLB entry to these frames
        self._emit(ev.ProcessProtected, pid=pid, name=name, ident=proc.ident,
                         measurement=proc.measurement.hex(), pages=len(pages),
                         shared_vaddr=shared_vaddr)
        return 0

    def _user_pages(self, cr3: int) -> dict[int, tuple[int, bool]] | None:
        """vpn -> (frame, writable) for every present user page of [USER_BASE, USER_END);
        None once more than MAX_PROTECT pages are mapped (the walk stops there:
        one hypercall's cost is bounded whatever the kernel maps)."""
        out: dict[int, tuple[int, bool]] = {}
        view, size = self.ram.view, self.ram.size
        pd = cr3 & 0xFFFFF000
        for pdi in range(abi.USER_BASE >> 22, abi.USER_END >> 22):
            if pd + pdi * 4 + 4 > size:
                break
            pde = _U32(view, pd + pdi * 4)[0]
            if pde & (PTE_P | PTE_U) != PTE_P | PTE_U:
                continue
            if pde & PTE_PS:            # a 4 MiB page: protect each of its 4 KiB frames
                base = (pde & 0xFFC00000) >> 12
                for i in range(1024):
                    if (base + i + 1) * PAGE <= size:
                        out[(pdi << 10) | i] = (base + i, bool(pde & PTE_W))
                if len(out) > MAX_PROTECT:
                    return None
                continue
            pt = pde & 0xFFFFF000
            if pt + PAGE > size:
                continue
            for pti in range(1024):
                pte = _U32(view, pt + pti * 4)[0]
                if pte & (PTE_P | PTE_U) != PTE_P | PTE_U:
                    continue
                frame = (pte & 0xFFFFF000) >> 12
                if (frame + 1) * PAGE > size:
                    continue
                out[(pdi << 10) | pti] = (frame, bool(pde & pte & PTE_W))
            if len(out) > MAX_PROTECT:
                return None
        return out

    # -------------------------------------------------------- the fill hook
    def on_fill(self, uc, vaddr: int, frame: int, user: bool, write: bool, fetch: bool,
                cr3: int):
        """Called by the MMU for every successful walk while protection is active.

        Returns None to grant, an int #PF error code to refuse as a fault, or
        ``"resume"`` to refuse so that the machine restores a protected
        process's context (see the module doc).
        """
        self._in_data_fill = not fetch
        try:
            return self._on_fill(uc, vaddr, frame, user, write, fetch, cr3)
        finally:
            self._in_data_fill = False

    def _on_fill(self, uc, vaddr: int, frame: int, user: bool, write: bool, fetch: bool,
                 cr3: int):
        owner = self.by_cr3.get(cr3 & 0xFFFFF000) if user else None
        if owner is not None:
            if owner.exited and not owner.stopped:
                self._violation(owner, vaddr, write, "resumed after the kernel reported it exited")
            if owner.stopped:
                return PF_P | PF_U | (PF_W if write else 0)
            if owner.in_kernel and fetch:
                verdict = self._returned(uc, owner, vaddr)
                if verdict is not None:
                    return verdict
                # restored in place: the page itself still goes through the policy below
            meta = owner.pages.get(vaddr >> 12)
            if meta is None:
                meta = self._adopt(owner, vaddr, frame)
                if isinstance(meta, int):
                    return meta
            if meta is not None:
                return self._owner_access(owner, meta, vaddr, frame, write)
        held = self.frames.get(frame >> 12)
        if held is not None and held[1].state == PLAINTEXT:
            by = "kernel" if not user else f"pid {self._pid_of(cr3)}"
            self.cloak(held[0], held[1], reason=f"{by} access")
        return None

    def on_physical(self, uc, paddr: int, write: bool, fetch: bool):
        """A fill with CR0.PG clear: ``paddr`` is reached physically.  That is
        never the owner's access (its pages live at user virtual addresses):
        a protected plaintext frame there is cloaked first, exactly as for the
        kernel.  A protected process itself running with paging off would
        see its memory through no translation the VMM checked: stopped.
        Returns None to grant or a #PF error code to refuse."""
        if uc.reg_read(UC_X86_REG_SS) & 3 == 3:
            owner = self.by_cr3.get(uc.reg_read(UC_X86_REG_CR3) & 0xFFFFF000)
            if owner is not None and not owner.exited:
                if not owner.stopped:
                    self._violation(owner, paddr, write, "resumed with paging off (CR0.PG clear)")
                return PF_P | PF_U | (PF_W if write else 0)
        self._in_data_fill = not fetch
        try:
            self.touch_frame(paddr >> 12, "physical access (paging off)")
        finally:
            self._in_data_fill = False
        return None

    def _adopt(self, proc: ProtectedProcess, vaddr: int, frame: int):
        """The owner reached a user page it had no protection for (mapped after
        HC_PROTECT): protect it from now on, like Overshadow does on first touch.
        Returns the new page, None (not a page to protect), or a violation."""
        vpn, ppn = vaddr >> 12, frame >> 12
        if not abi.USER_BASE <= vaddr < abi.USER_END:
            return None
        held = self.frames.get(ppn)
        if held is not None and held[0] is proc:
            # Its info page, its shared page or a new address aliasing one of
            # its protected frames: the kernel is handing it the same frame twice.
            return self._violation(proc, vaddr, False,
                                   f"aliased: this address maps the frame of its page "
                                   f"{held[1].vpn << 12:#x}")
        if vpn in (abi.INFO_VADDR >> 12, proc.shared_vaddr >> 12) or held is not None:
            return None                 # not its to protect (another process's page is cloaked)
        meta = PageMeta(vpn, ppn)
        proc.pages[vpn] = meta
        self.frames[ppn] = (proc, meta)
        self.ram.dirty.mark(ppn)        # see protect(): resent sealed by a live migration
        self._flush()                   # the kernel may hold a translation to this frame
        self._emit(ev.PageAdopted, pid=proc.pid, vaddr=vpn << 12, frame=ppn)
        return meta

    def _pid_of(self, cr3: int) -> int:
        p = self.by_cr3.get(cr3 & 0xFFFFF000)
        return p.pid if p else 0

    def _owner_access(self, proc: ProtectedProcess, meta: PageMeta, vaddr: int, frame: int,
                      write: bool):
        ppn = frame >> 12
        held = self.frames.get(ppn)
        if held is not None and held[1] is not meta:
            other, other_meta = held
            if other is proc and other_meta.state == PLAINTEXT:
                return self._violation(proc, vaddr, write,
                                       f"remapped: this address now maps the frame of its page "
                                       f"{other_meta.vpn << 12:#x}")
            if other_meta.state == PLAINTEXT:
                self.cloak(other, other_meta, reason=f"pid {proc.pid} access")
        if meta.state == PLAINTEXT:
            if ppn != meta.ppn:
                return self._violation(proc, vaddr, write,
                                       f"remapped: frame {ppn:#x} instead of {meta.ppn:#x}")
            return None
        try:
            plain = self._ciphers[proc.key_handle].open(
                self.ram.page(ppn), meta.tag, meta.nonce,
                associated_data(proc.ident, meta.vpn, meta.version))
        except InvalidTag:
            why = ("MAC check failed: page modified, swapped or rolled back" if ppn == meta.ppn else
                   f"MAC check failed on frame {ppn:#x} (remapped from {meta.ppn:#x})")
            return self._violation(proc, vaddr, write, why)
        self.ram.write(ppn << 12, plain)
        if ppn != meta.ppn:             # the kernel moved the cloaked page: fine, follow it
            if self.frames.get(meta.ppn, (None, None))[1] is meta:
                del self.frames[meta.ppn]
            meta.ppn = ppn
        if held is not None and held[1] is not meta:
            # This frame was last seen holding another (cloaked) page; its
            # ciphertext is gone from here now.  Wherever the kernel put it,
            # the owner's next touch verifies it there.
            held[1].ppn = DETACHED
        # Invariant: every plaintext page is frames[its ppn], so the fill hook
        # always knows to cloak it when someone else reaches the frame.
        self.frames[ppn] = (proc, meta)
        meta.state = PLAINTEXT
        self._flush()
        self._rewrote_code()    # a translation of the ciphertext must not run either
        self._emit(ev.PageUncloaked, pid=proc.pid, vaddr=meta.vpn << 12,
                         frame=ppn, version=meta.version)
        return None

    def _violation(self, proc: ProtectedProcess, vaddr: int, write: bool, reason: str) -> int:
        proc.stopped = reason
        self._emit(ev.IntegrityViolation, pid=proc.pid, name=proc.name,
                         vaddr=vaddr & 0xFFFFF000, reason=reason)
        return PF_P | PF_U | (PF_W if write else 0)

    # ------------------------------------------------------- trusted output
    def trusted_read(self, cr3: int, vaddr: int, length: int) -> bytes | int:
        """HC_TRUSTED_WRITE from ring 3: the bytes at ``vaddr`` as the calling
        protected process holds them, or a negative errno.  Only from its own
        protected pages (not the shared page, which the kernel may rewrite
        between the process's store and the hypercall); a cloaked page is
        verified and decrypted into a copy, a frame that is not the one the
        VMM knows is refused.  The kernel is never asked: it can neither
        forge this output nor drop it."""
        proc = self.by_cr3.get(cr3 & 0xFFFFF000)
        if proc is None or proc.exited or proc.stopped:
            return -abi.EPERM
        if not 0 <= length <= abi.TRUSTED_WRITE_MAX or not 0 <= vaddr <= 0xFFFFFFFF - length:
            return -abi.EINVAL
        out = bytearray()
        while length > 0:
            chunk = min(length, PAGE - (vaddr & 0xFFF))
            meta = proc.pages.get(vaddr >> 12)
            if meta is None:
                return -abi.EFAULT
            try:
                ppn = walk(self.ram, proc.cr3, vaddr, write=False, user=True)[0] >> 12
            except WalkFault:
                return -abi.EFAULT
            if ppn != meta.ppn or self.frames.get(ppn, (None, None))[1] is not meta:
                return -abi.EFAULT          # not the frame the VMM gave it there
            if meta.state == PLAINTEXT:
                page = self.ram.page(ppn)
            else:
                try:
                    page = self._ciphers[proc.key_handle].open(
                        self.ram.page(ppn), meta.tag, meta.nonce,
                        associated_data(proc.ident, meta.vpn, meta.version))
                except InvalidTag:
                    self._violation(proc, vaddr, False, "MAC check failed (trusted write)")
                    return -abi.EFAULT
            off = vaddr & 0xFFF
            out += bytes(page[off:off + chunk])
            vaddr, length = vaddr + chunk, length - chunk
        return bytes(out)

    # -------------------------------------------------------- cloak / uncloak
    def cloak(self, proc: ProtectedProcess, meta: PageMeta, *, reason: str) -> None:
        counter = proc.nonce_counter
        proc.nonce_counter += 1
        version = meta.version + 1
        nonce = nonce_for(self._nonce_prefix, counter)
        ct, tag = self._ciphers[proc.key_handle].seal(
            self.ram.page(meta.ppn), nonce, associated_data(proc.ident, meta.vpn, version))
        self.ram.write(meta.ppn << 12, ct)
        meta.state, meta.version, meta.nonce, meta.tag = CLOAKED, version, nonce, tag
        self._flush()           # the owner's TLB entry to the plaintext must go
        self._rewrote_code()    # and so must every translation of the plaintext
        self._emit(ev.PageCloaked, pid=proc.pid, vaddr=meta.vpn << 12,
                         frame=meta.ppn, version=version, reason=reason)

    def _rewrote_code(self) -> None:
        self.code_invalidations += 1
        if self._in_data_fill:
            if not self.code_flush_pending:
                self.code_flush_pending = True
                self._stop_slice()
            return
        self._invalidate_code()

    def settle_translations(self) -> None:
        """Between slices: the drop a data-access fill deferred."""
        if self.code_flush_pending:
            self.code_flush_pending = False
            self._invalidate_code()

    def touch_frame(self, ppn: int, reason: str) -> None:
        """A VMM reader is about to read frame ``ppn``: cloak it if it is protected plaintext."""
        held = self.frames.get(ppn)
        if held is not None and held[1].state == PLAINTEXT:
            self.cloak(held[0], held[1], reason=reason)

    def seal_all(self, reason: str = "export") -> int:
        n = 0
        for proc, meta in list(self.frames.values()):
            if meta.state == PLAINTEXT:
                self.cloak(proc, meta, reason=reason)
                n += 1
        return n

    def process_exited(self, pid: int) -> None:
        """The kernel reports ``pid`` gone: cloak what is left and destroy its
        key (its frames are the kernel's to reuse: ciphertext nobody can open).
        Its CR3 stays known, so a kernel that lied and resumes it anyway gets
        an integrity violation, not a process running unprotected."""
        proc = self.procs.get(pid)
        if proc is None or proc.exited:
            return
        for meta in proc.pages.values():
            if meta.state == PLAINTEXT:
                self.cloak(proc, meta, reason="process exit")
            if self.frames.get(meta.ppn, (None, None))[0] is proc:
                del self.frames[meta.ppn]
        proc.exited, proc.in_kernel, proc.saved, proc.shown = True, False, None, None
        self._keys.pop(proc.key_handle, None)
        self._ciphers.pop(proc.key_handle, None)
        exited = [p for p in self.procs.values() if p.exited]
        for old in exited[:-MAX_EXITED]:
            del self.procs[old.pid]
            if self.by_cr3.get(old.cr3) is old:
                del self.by_cr3[old.cr3]

    def process_started(self, pid: int, cr3: int) -> None:
        """The kernel announces a (new) process: an exited one with this CR3 is gone."""
        old = self.by_cr3.get(cr3 & 0xFFFFF000)
        if old is not None and old.exited:
            del self.by_cr3[old.cr3]

    # ---------------------------------------------------------- registers
    def enter_kernel(self, cpu: CpuState, vector: int, software: bool) -> CpuState:
        """A kernel entry from ring 3: returns the state the kernel may see."""
        proc = self.by_cr3.get(cpu.cr3 & 0xFFFFF000)
        if proc is None or cpu.cpl != 3:
            return cpu
        if proc.in_kernel:
            # The kernel returned to it, but a slice ended between that iret and
            # its first fetch, and now an interrupt comes first: settle the
            # return here, or the scrubbed registers would be saved as real ones.
            self._check_return(proc, cpu.to_dict())
            cpu = self.resume_context(proc, cpu)
        syscall = software and vector == abi.VEC_SYSCALL
        keep = SYSCALL_VISIBLE if syscall else ()
        # Every general register but the system-call arguments, and the
        # arithmetic flags (a compare on a secret leaves its result there).
        shown = cpu.replace(eflags=cpu.eflags & ~EFLAGS_STATUS,
                            **{r: 0 for r in GP if r not in keep})
        proc.saved, proc.shown, proc.syscall, proc.in_kernel = cpu, shown, syscall, True
        self._flush()       # its return will then start with a ring-3 fill (see module doc)
        return shown

    def _check_return(self, proc: ProtectedProcess, current: dict[str, int]) -> list[str]:
        """Compare what the kernel hands back with what it was shown; report
        any difference (only eax after a system call may change)."""
        shown = proc.shown
        diffs = [name for name in GP + CONTROL
                 if not (name == "eax" and proc.syscall) and current[name] != getattr(shown, name)]
        if diffs:
            detail = ", ".join(f"{n} {getattr(shown, n):#x} -> {current[n]:#x}" for n in diffs)
            self._emit(ev.RegisterTamper, pid=proc.pid, name=proc.name, registers=tuple(diffs),
                       detail=detail)
        return diffs

    def _returned(self, uc, proc: ProtectedProcess, vaddr: int):
        """The first ring-3 fetch of ``proc`` after a kernel entry.  Report any
        register the kernel changed; stop the process if the descriptors or
        CR0 bits behind its addresses differ from those pinned at HC_PROTECT;
        otherwise restore its registers: here, or (when the kernel changed
        eip, esp, eflags or a selector: the translation under way is for the
        wrong place) by refusing the fill with ``"resume"``, so that between
        slices the machine loads the saved context (``resume_context``).
        Either way every data segment is reloaded from the validated tables."""
        current = {n: uc.reg_read(r) for n, r in GP_REGS.items()}
        current.update({n: uc.reg_read(r) for n, r in SEG_REGS.items()})
        current["eip"] = uc.reg_read(UC_X86_REG_EIP)
        current["eflags"] = uc.reg_read(UC_X86_REG_EFLAGS)
        redirected = any(d in CONTROL for d in self._check_return(proc, current))
        if proc.pinned is not None:
            diffs = prot_pinned.differences(
                proc.pinned, prot_pinned.snapshot(uc, self.ram, lambda f: self.touch_frame(
                    f, "vmm descriptor check")))
            if diffs:
                proc.in_kernel = False
                return self._violation(proc, vaddr, False,
                                       "descriptors changed behind its selectors: " + "; ".join(diffs))
        if redirected or self.reload_data_segments is None:
            self.resume_pending = proc
            return "resume"
        # The kernel came back to the right place (iretd has just loaded CS
        # and SS from the tables validated above): restore the registers and
        # flags here, and reload DS/ES/FS/GS, whose caches the kernel may have
        # loaded from a table it then changed back.  (Cheaper than the
        # between-slices path, which reloads everything.)
        saved = proc.saved
        self.reload_data_segments(uc, {n: getattr(saved, n) for n in ("ds", "es", "fs", "gs")})
        for name in GP:
            if not (name == "eax" and proc.syscall):
                uc.reg_write(GP_REGS[name], getattr(saved, name))
        uc.reg_write(UC_X86_REG_EFLAGS, saved.eflags)
        proc.in_kernel = False
        return None

    def resume_context(self, proc: ProtectedProcess, current: CpuState) -> CpuState:
        """The context to load when the kernel returned to the wrong place (or
        when the return is settled outside the hook): its saved registers,
        with the system-call result.  Already checked by ``_check_return``."""
        saved = proc.saved
        restore = {n: getattr(saved, n) for n in GP + CONTROL}
        if proc.syscall:
            restore["eax"] = current.eax
        proc.in_kernel = False
        return current.replace(**restore)

    # ------------------------------------------------------------- views
    def view(self) -> tuple[ProcessView, ...]:
        return tuple(
            ProcessView(pid=p.pid, name=p.name, ident=p.ident, measurement=p.measurement.hex(),
                        key_handle=p.key_handle, shared_vaddr=p.shared_vaddr, in_kernel=p.in_kernel,
                        saved_context=p.saved if p.in_kernel else None, stopped=p.stopped,
                        exited=p.exited,
                        pages=tuple(PageView(owner=p.pid, vaddr=m.vpn << 12, vpn=m.vpn, frame=m.ppn,
                                             state=m.state, version=m.version, nonce=m.nonce.hex(),
                                             mac=m.tag.hex())
                                    for m in sorted(p.pages.values(), key=lambda m: m.vpn)))
            for p in sorted(self.procs.values(), key=lambda p: p.pid))

    def process(self, pid: int) -> ProcessView:
        for p in self.view():
            if p.pid == pid:
                return p
        raise KeyError(f"pid {pid} is not protected")

    # ------------------------------------------------------- save/restore
    def save(self) -> ProtectionState:
        return ProtectionState(enabled=self.enabled, next_handle=self._next_handle,
                               keys=dict(self._keys),
                               processes=tuple(_proc_to_dict(p) for p in self.procs.values()))

    def restore(self, st: ProtectionState) -> None:
        procs = [_proc_from_dict(d) for d in st.processes]
        handles: set[int] = set()
        for p in procs:
            if not p.exited and p.key_handle not in st.keys:
                raise ValueError(f"protection state: pid {p.pid} names a missing key")
            if not p.exited and p.key_handle in handles:
                # (one process's exit would destroy the other's key)
                raise ValueError(f"protection state: pid {p.pid} shares a key with another process")
            handles.add(p.key_handle)
        live = [p for p in procs if not p.exited]
        if len({p.pid for p in procs}) != len(procs) or len({p.cr3 for p in live}) != len(live):
            raise ValueError("protection state: a pid or a live address space named twice")
        self.enabled = st.enabled
        self._next_handle = st.next_handle
        self._keys = dict(st.keys)
        self._ciphers = {h: PageCipher(k) for h, k in self._keys.items()}
        self.procs = {p.pid: p for p in procs}
        self.by_cr3 = {p.cr3: p for p in sorted(procs, key=lambda p: not p.exited)}   # live ones win
        self.frames = {}
        for p in procs:
            for meta in p.pages.values():
                if p.exited or meta.ppn == DETACHED:
                    continue
                if meta.ppn in self.frames or not 0 <= meta.ppn < self.ram.size // PAGE:
                    raise ValueError(f"protection state: frame {meta.ppn:#x} owned twice or outside RAM")
                self.frames[meta.ppn] = (p, meta)
        self._flush()
        self._rewrote_code()
