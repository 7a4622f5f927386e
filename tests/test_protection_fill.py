"""The fill hook and the paging-off hook, called as the MMU calls them, with
what a hostile kernel controls: the frame a user address maps to, and the
CPU state it resumes a protected process in (issue 19: each check here had a
one-line mutant no other test noticed).

Each test builds a real guest, stops it while its processes are alive, and
makes the call ``mmu.py`` makes for the access (``Protection.on_fill`` for a
walk that succeeded, ``Protection.on_physical`` with CR0.PG clear), with the
frame the kernel's page tables would give.
"""

import struct

import pytest
from unicorn.x86_const import UC_X86_REG_CR3, UC_X86_REG_SS

from guests.build import build_image
from guesthelp import IDLE, prog, started
from minivmm import abi, events as ev
from minivmm.machine import Machine
from minivmm.protection import CLOAKED, DETACHED, PLAINTEXT

SHARED = abi.DATA_VADDR
SECRET = abi.DATA_VADDR + abi.PAGE_SIZE         # a protected data page of each process
READ, WRITE = 5, 7                              # the #PF codes of a refused user read / write


@pytest.fixture
def two():
    """Pids 1 and 2 alive, pid 1 protected: (machine, {pid: cr3}, events seen)."""
    m, cr3 = started(prog("a", IDLE, data_pages=3), prog("b", IDLE, data_pages=3))
    assert m.protection.protect(cr3[1], 1, "a", SHARED, 0) == 0
    seen = []
    m.events.subscribe(seen.append, ev.IntegrityViolation, ev.PageCloaked, ev.PageAdopted)
    return m, cr3, seen


def frame_of(m, cr3, vaddr):
    pde = struct.unpack_from("<I", m.ram.view, cr3 + (vaddr >> 22) * 4)[0]
    return struct.unpack_from("<I", m.ram.view, (pde & 0xFFFFF000) + ((vaddr >> 12) & 0x3FF) * 4)[0] & 0xFFFFF000


def fill(m, cr3, vaddr, frame, *, user=True, write=False, fetch=False):
    return m.protection.on_fill(m._uc, vaddr, frame, user, write, fetch, cr3)


def test_the_owner_reaching_its_own_frame_at_a_new_address_is_a_violation(two):
    # The kernel maps a fresh address of pid 1 (one it never protected) onto the
    # frame of pid 1's secret page: two addresses, one frame, is not adoption.
    m, cr3, seen = two
    secret = frame_of(m, cr3[1], SECRET)
    assert fill(m, cr3[1], 0x50000123, secret) == READ
    assert m.protection.procs[1].stopped.startswith("aliased")
    assert [(type(e), e.vaddr) for e in seen] == [(ev.IntegrityViolation, 0x50000000)]
    assert 0x50000 not in m.protection.procs[1].pages


def test_the_owner_reaching_its_frame_through_its_info_page_is_a_violation(two):
    m, cr3, seen = two
    secret = frame_of(m, cr3[1], SECRET)
    assert fill(m, cr3[1], abi.INFO_VADDR, secret) == READ
    assert m.protection.procs[1].stopped.startswith("aliased")


def test_another_processs_frame_at_a_new_address_is_cloaked_not_adopted(two):
    # pid 2 is protected too; the kernel maps pid 2's secret frame into pid 1.
    m, cr3, seen = two
    assert m.protection.protect(cr3[2], 2, "b", SHARED, 0) == 0
    theirs = frame_of(m, cr3[2], SECRET)
    assert fill(m, cr3[1], 0x50000000, theirs) is None
    assert m.protection.procs[1].stopped is None and m.protection.procs[2].stopped is None
    assert 0x50000 not in m.protection.procs[1].pages
    assert m.protection.procs[2].pages[SECRET >> 12].state == CLOAKED
    assert [(type(e), e.pid, e.reason) for e in seen] == [(ev.PageCloaked, 2, "pid 1 access")]


def test_a_page_outside_the_user_range_is_never_adopted(two):
    m, cr3, seen = two
    fresh = frame_of(m, cr3[2], SECRET)           # pid 2's, unprotected: nobody's to the VMM
    for vaddr in (abi.USER_END, abi.USER_BASE - abi.PAGE_SIZE):
        assert fill(m, cr3[1], vaddr, fresh) is None
    assert fill(m, cr3[1], abi.USER_END - abi.PAGE_SIZE * 64, fresh) is None      # inside: adopted
    assert [(type(e), e.vaddr) for e in seen] == [(ev.PageAdopted, abi.USER_END - abi.PAGE_SIZE * 64)]
    assert min(m.protection.procs[1].pages) >= abi.USER_BASE >> 12
    assert max(m.protection.procs[1].pages) < abi.USER_END >> 12


def test_a_cloak_names_who_reached_the_page(two):
    m, cr3, seen = two
    assert m.protection.protect(cr3[2], 2, "b", SHARED, 0) == 0
    mine = frame_of(m, cr3[1], SECRET)
    assert fill(m, cr3[2] | 0x19, 0x50000000, mine) is None          # pid 2, CR3 with low bits set
    unprotected = m.protection.procs.pop(2)
    del m.protection.by_cr3[unprotected.cr3]
    m.protection.on_fill(m._uc, SECRET, mine, True, False, False, cr3[1])      # pid 1 takes it back
    assert fill(m, 0x7000, 0x50000000, mine) is None                 # an address space nobody protected
    m.protection.on_fill(m._uc, SECRET, mine, True, False, False, cr3[1])
    assert fill(m, cr3[1], SECRET, mine, user=False) is None         # the kernel
    assert [e.reason for e in seen if isinstance(e, ev.PageCloaked)] == \
        ["pid 2 access", "pid 0 access", "kernel access"]


def test_a_violation_names_the_page_and_the_reason_of_a_remapped_cloaked_page(two):
    m, cr3, seen = two
    mine, other = frame_of(m, cr3[1], SECRET), frame_of(m, cr3[2], SECRET)
    m.protection.seal_all()
    meta = m.protection.procs[1].pages[SECRET >> 12]
    assert meta.state == CLOAKED
    assert fill(m, cr3[1], SECRET + 0x345, other) == READ                  # moved: the MAC fails there
    assert m.protection.procs[1].stopped == \
        f"MAC check failed on frame {other >> 12:#x} (remapped from {mine >> 12:#x})"
    [v] = [e for e in seen if isinstance(e, ev.IntegrityViolation)]
    assert v.vaddr == SECRET and v.pid == 1


class ParkedCpu:
    """What on_physical reads of the CPU: SS (its RPL is the ring) and CR3."""

    def __init__(self, ss, cr3):
        self.regs = {UC_X86_REG_SS: ss, UC_X86_REG_CR3: cr3}

    def reg_read(self, reg):
        return self.regs[reg]


@pytest.mark.parametrize("low", [0x8, 0x19])
def test_a_protected_process_resumed_with_paging_off_is_stopped_once(two, low):
    # The kernel clears CR0.PG and returns to pid 1 at ring 3: its memory
    # would be reached through no translation the VMM checks.  CR3's low bits
    # (PWT, PCD, and bits the CPU ignores, bit 0 among them) are the kernel's
    # to set: they must not hide the process.
    m, cr3, seen = two
    ring3 = ParkedCpu(abi.SEL_UDATA | 3, cr3[1] | low)
    mine = frame_of(m, cr3[1], SECRET)
    assert m.protection.on_physical(ring3, mine, False, False) == READ
    assert m.protection.procs[1].stopped == "resumed with paging off (CR0.PG clear)"
    assert m.protection.on_physical(ring3, mine, True, True) == WRITE
    assert [type(e) for e in seen] == [ev.IntegrityViolation]           # reported once
    assert m.protection.procs[1].pages[SECRET >> 12].state == PLAINTEXT  # nothing was read
    # Another process (not protected) at ring 3 with paging off: like the kernel.
    assert m.protection.on_physical(ParkedCpu(abi.SEL_UDATA | 3, cr3[2]), mine, False, False) is None
    assert m.protection.procs[1].pages[SECRET >> 12].state == CLOAKED


@pytest.mark.parametrize("fetch", [False, True])
def test_translations_are_dropped_at_once_on_a_fetch_and_after_the_block_on_a_data_access(two, fetch):
    # Inside a data access a translated block is running: the drop waits for its
    # end (the slice is stopped); on a fetch, nothing runs yet: at once.  Either
    # way, afterwards the VMM's own cloaking (between slices) drops them at once.
    m, cr3, _ = two
    calls = []
    m.protection._invalidate_code = lambda: calls.append("drop")
    m.protection._stop_slice = lambda: calls.append("stop")
    mine = frame_of(m, cr3[1], SECRET)
    kernel = ParkedCpu(abi.SEL_KDATA, cr3[2])
    assert m.protection.on_physical(kernel, mine, False, fetch) is None
    assert calls == (["drop"] if fetch else ["stop"])
    assert m.protection.code_flush_pending is not fetch
    m.protection.settle_translations()
    assert calls == (["drop"] if fetch else ["stop", "drop"])
    assert not m.protection.code_flush_pending
    calls.clear()
    other = frame_of(m, cr3[1], SECRET + abi.PAGE_SIZE)          # another plaintext page of pid 1
    m.protection.touch_frame(other >> 12, "VMM reader")         # between slices
    assert calls == ["drop"] and not m.protection.code_flush_pending
    calls.clear()
    m.protection.on_fill(m._uc, SECRET, mine, True, False, fetch, cr3[1])   # uncloaked
    assert calls == (["drop"] if fetch else ["stop"])
    m.protection.settle_translations()
    calls.clear()
    m.protection.touch_frame(mine >> 12, "VMM reader")
    assert calls == ["drop"] and not m.protection.code_flush_pending


def test_a_cloaked_page_moved_over_another_detaches_that_one_and_the_state_still_restores(two):
    # The kernel copies page A's ciphertext over page B's frame and maps A there.
    # A's next touch verifies it there and follows it; B's ciphertext is gone from
    # that frame, so B no longer claims it (DETACHED): the frame is A's alone, and
    # a state saved now restores (a frame owned twice would be refused).
    m, cr3, _ = two
    m.protection.seal_all()
    pages = m.protection.procs[1].pages
    a, b = pages[SECRET >> 12], pages[(SECRET >> 12) + 1]
    m.ram.write(b.ppn << 12, bytes(m.ram.page(a.ppn)))
    target = b.ppn
    assert fill(m, cr3[1], SECRET, target << 12) is None
    assert (a.ppn, a.state, b.ppn, b.state) == (target, PLAINTEXT, DETACHED, CLOAKED)
    assert m.protection.frames[target][1] is a
    [entry] = [e for p in m.protection.save().to_dict()["processes"] if p["pid"] == 1
               for e in p["pages"] if e[0] == b.vpn]
    assert entry[1] == -1                   # the state format's "detached" (docs/migration.md)
    r = Machine(build_image([prog("x", IDLE)]), _boot=False)
    r.protection.restore(m.protection.save())
    assert r.protection.frames[target][1].vpn == SECRET >> 12


def test_an_adopted_page_is_guarded_and_an_uncloak_flushes_the_tlb(two):
    # Adopted at the owner's first touch: from then on anyone else reaching the
    # frame makes the VMM cloak it.  And after an uncloak, no TLB entry that
    # another party made while the page was ciphertext may survive.
    m, cr3, seen = two
    fresh = frame_of(m, cr3[2], SECRET + abi.PAGE_SIZE)
    assert fill(m, cr3[1], 0x50000000, fresh) is None
    meta = m.protection.procs[1].pages[0x50000]
    assert fill(m, cr3[1], 0x50000000, fresh, user=False) is None          # the kernel
    assert meta.state == CLOAKED
    flushes = []
    real = m.protection._flush
    m.protection._flush = lambda: (flushes.append(1), real())
    assert fill(m, cr3[1], 0x50000000, fresh) is None                      # the owner again
    assert meta.state == PLAINTEXT and flushes
