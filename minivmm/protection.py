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

* **Registers** (``prot_regs.py``): scrubbed at every kernel entry, checked
  and restored at the return, with the descriptors behind the selectors
  (``prot_pinned.py``).

* **Every path to a frame**: the fill hook with paging on or off
  (:meth:`Protection.on_fill`, :meth:`Protection.on_physical`), the VMM's own
  readers (:meth:`Protection.touch_frame`), and translated code (every VMM
  rewrite of a frame drops the emulator's translations).

The modules by concept: ``prot_state.py`` (metadata and the saved state),
``prot_view.py`` (read-only views), ``prot_regs.py`` (registers),
``prot_pinned.py`` (descriptors), this file (the engine: the fill-hook
policy, cloak/uncloak, trusted output).  The names other code imports from
here still work.

Everything here is VMM state: it saves to and restores from
:class:`ProtectionState`, and migrates with the machine.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Callable

from cryptography.exceptions import InvalidTag
from unicorn.x86_const import UC_X86_REG_CR3, UC_X86_REG_SS

from minivmm import abi
from minivmm import events as ev
from minivmm.errors import KeysDestroyed
from minivmm.cloak import KEY_BYTES, PageCipher, associated_data, nonce_for
from minivmm.mmu import WalkFault, walk
from minivmm.prot_regs import CONTROL, EFLAGS_STATUS, GP, SYSCALL_VISIBLE, RegisterProtection
from minivmm.prot_state import (CLOAKED, DETACHED, MAX_EXITED, MAX_PAGES, MAX_PROTECTED, PAGE,
                                PLAINTEXT, PageMeta, ProtectedProcess, ProtectionState,
                                proc_from_dict, proc_to_dict, seeded_keys)
from minivmm.prot_view import PageView, ProcessView, views

__all__ = ["CLOAKED", "CONTROL", "DETACHED", "EFLAGS_STATUS", "GP", "MAX_EXITED", "MAX_PAGES",
           "MAX_PROTECT", "MAX_PROTECTED", "PLAINTEXT", "SYSCALL_VISIBLE", "PageMeta", "PageView",
           "ProcessView", "ProtectedProcess", "Protection", "ProtectionState", "seeded_keys"]

_U32 = struct.Struct("<I").unpack_from
PTE_P, PTE_W, PTE_U, PTE_PS = 1, 2, 4, 0x80
PF_P, PF_W, PF_U = 1, 2, 4
# At most this many pages per HC_PROTECT (64 MiB of a process): the walk, the
# measurement and the bookkeeping are linear in it, so this bounds what one
# hypercall -- repeated by a kernel as often as it likes -- costs the VMM.
MAX_PROTECT = 16384


# ------------------------------------------------------------ the engine
class Protection(RegisterProtection):
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
            plain = self._cipher(proc).open(
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
                    page = self._cipher(proc).open(
                        self.ram.page(ppn), meta.tag, meta.nonce,
                        associated_data(proc.ident, meta.vpn, meta.version))
                except InvalidTag:
                    self._violation(proc, vaddr, False, "MAC check failed (trusted write)")
                    return -abi.EFAULT
            off = vaddr & 0xFFF
            out += bytes(page[off:off + chunk])
            vaddr, length = vaddr + chunk, length - chunk
        return bytes(out)

    def forget_keys(self) -> None:
        """Destroy every process key in this VMM (overwrite, then drop): the
        secure protocol's source does this before COMMIT, so this copy can
        never open a protected page again (``KeysDestroyed`` if it tries)."""
        for h in list(self._keys):
            self._keys[h] = bytes(len(self._keys[h]))
        self._keys.clear()
        self._ciphers.clear()

    def _cipher(self, proc: ProtectedProcess) -> PageCipher:
        """The process's page cipher; a clear error, never a KeyError, when its
        key was destroyed (migrated away: a resumed second copy stops here)."""
        try:
            return self._ciphers[proc.key_handle]
        except KeyError:
            raise KeysDestroyed(f"pid {proc.pid} ({proc.name}): its protection key was destroyed in this "
                                f"VMM (the VM migrated away), so its pages cannot be opened here: this "
                                f"copy cannot run on") from None

    # -------------------------------------------------------- cloak / uncloak
    def cloak(self, proc: ProtectedProcess, meta: PageMeta, *, reason: str) -> None:
        counter = proc.nonce_counter
        proc.nonce_counter += 1
        version = meta.version + 1
        nonce = nonce_for(self._nonce_prefix, counter)
        ct, tag = self._cipher(proc).seal(
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
        # Its registers saved at the entry it exited from (x87/SSE too) are
        # never given back: drop them with its key, not keep them in every state.
        proc.exited, proc.in_kernel, proc.saved, proc.shown = True, False, None, None
        proc.fpu = None
        self._keys.pop(proc.key_handle, None)
        self._ciphers.pop(proc.key_handle, None)
        # Kept in the order they exited, so the oldest exits are dropped first
        # (in protect order, a process that exited just now could be the one
        # dropped, and with it the CR3 that catches a kernel resuming it).
        self.procs[pid] = self.procs.pop(pid)
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

    # ------------------------------------------------------------- views
    def view(self) -> tuple[ProcessView, ...]:
        return views(self.procs.values())

    def process(self, pid: int) -> ProcessView:
        for p in self.view():
            if p.pid == pid:
                return p
        raise KeyError(f"pid {pid} is not protected")

    # ------------------------------------------------------- save/restore
    def save(self) -> ProtectionState:
        return ProtectionState(enabled=self.enabled, next_handle=self._next_handle,
                               keys=dict(self._keys),
                               processes=tuple(proc_to_dict(p) for p in self.procs.values()))

    def restore(self, st: ProtectionState) -> None:
        procs = [proc_from_dict(d) for d in st.processes]
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
