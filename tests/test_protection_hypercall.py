"""HC_PROTECT's checks, one by one, and the fill hook's owner lookup, against
what a hostile kernel controls.

The kernel decides which pid a CR3 belongs to (``HC_PROC_START``) and what the
page tables of a process map; the hypercall's own arguments come from the
process.  Each test builds a real guest, stops it while its processes are
alive, changes what a hostile kernel could change (its page tables in guest
RAM, the pid it announces), and makes the call the VMM makes for
``HC_PROTECT`` (``Machine._dispatch_hypercall``) with exactly those values.
Issue 19: each check here had a one-line mutant no other test noticed.
"""

import struct

import pytest

from guesthelp import IDLE, prog, started
from minivmm import abi

SHARED = abi.DATA_VADDR                 # the page each idle process would name as shared
PTE_P, PTE_W, PTE_U = 1, 2, 4


@pytest.fixture
def idle():
    """Two live processes (pids 1 and 2), neither protected yet: (machine, {pid: cr3})."""
    m, cr3 = started(prog("a", IDLE, data_pages=3), prog("b", IDLE, data_pages=3))
    assert sorted(cr3) == [1, 2]
    return m, cr3


def protect(m, cr3, pid, shared=SHARED, flags=0):
    return m.protection.protect(cr3, pid, m.names.get(pid, "?"), shared, flags)


def pte_addr(m, cr3, vaddr):
    pde = struct.unpack_from("<I", m.ram.view, cr3 + (vaddr >> 22) * 4)[0]
    return (pde & 0xFFFFF000) + ((vaddr >> 12) & 0x3FF) * 4


def set_pte(m, cr3, vaddr, value):
    struct.pack_into("<I", m.ram.view, pte_addr(m, cr3, vaddr), value)


def get_pte(m, cr3, vaddr):
    return struct.unpack_from("<I", m.ram.view, pte_addr(m, cr3, vaddr))[0]


def test_a_call_from_an_address_space_the_kernel_never_announced_is_refused(idle):
    m, cr3 = idle
    assert protect(m, cr3[1], 0) == -abi.EPERM
    assert not m.protection.view()


def test_an_address_space_announced_again_under_a_new_pid_cannot_be_protected_twice(idle):
    # The kernel re-announces pid 1's CR3 as pid 9 (HC_PROC_START), then the
    # code in that address space asks again: a second owner of the same pages.
    m, cr3 = idle
    assert protect(m, cr3[1], 1) == 0
    owned = dict(m.protection.frames)
    assert protect(m, cr3[1], 9) == -abi.EEXIST
    assert [p.pid for p in m.protection.view()] == [1]
    assert m.protection.by_cr3[cr3[1]].pid == 1 and m.protection.frames == owned


def test_a_live_pid_cannot_be_protected_again_from_another_address_space(idle):
    # The kernel announces pid 2's CR3 as pid 1 while pid 1 is protected and alive.
    m, cr3 = idle
    assert protect(m, cr3[1], 1) == 0
    assert protect(m, cr3[2], 1) == -abi.EEXIST
    assert m.protection.procs[1].cr3 == cr3[1] and cr3[2] not in m.protection.by_cr3


def test_an_exited_pid_may_be_protected_again(idle):
    m, cr3 = idle
    assert protect(m, cr3[1], 1) == 0
    m.protection.process_exited(1)
    assert protect(m, cr3[2], 1) == 0           # pids are reused: the exited namesake is replaced
    assert m.protection.procs[1].cr3 == cr3[2] and not m.protection.procs[1].exited


def test_a_shared_page_the_kernel_maps_read_only_is_refused(idle):
    m, cr3 = idle
    pte = get_pte(m, cr3[1], SHARED)
    assert pte & (PTE_P | PTE_W | PTE_U) == PTE_P | PTE_W | PTE_U
    set_pte(m, cr3[1], SHARED, pte & ~PTE_W)
    assert protect(m, cr3[1], 1) == -abi.EINVAL
    set_pte(m, cr3[1], SHARED, pte)
    assert protect(m, cr3[1], 1) == 0


def test_a_page_the_kernel_marks_not_present_is_not_taken(idle):
    # A not-present entry that still carries user and write bits and a frame
    # number (here: the frame of pid 2's data page) maps nothing: the VMM must
    # not take that frame from its owner.
    m, cr3 = idle
    vaddr = SHARED + 2 * abi.PAGE_SIZE
    victim = get_pte(m, cr3[2], SHARED) & 0xFFFFF000
    set_pte(m, cr3[1], vaddr, victim | PTE_W | PTE_U)            # P clear
    assert protect(m, cr3[1], 1) == 0
    [view] = m.protection.view()
    assert victim >> 12 not in m.protection.frames
    assert vaddr not in [p.vaddr for p in view.pages]


def test_the_info_page_is_never_the_shared_page_even_if_the_kernel_maps_it_writable(idle):
    m, cr3 = idle
    pte = get_pte(m, cr3[1], abi.INFO_VADDR)
    assert pte & (PTE_P | PTE_U) == PTE_P | PTE_U
    set_pte(m, cr3[1], abi.INFO_VADDR, pte | PTE_W)
    assert protect(m, cr3[1], 1, shared=abi.INFO_VADDR) == -abi.EINVAL
    assert not m.protection.view()



def _map_user_range(m, cr3, large, tables, table_frames):
    """The user range of address space ``cr3`` replaced (as a hostile kernel may):
    ``large`` 4 MiB pages, all of the first 4 MiB of RAM, then one page table per
    entry of ``tables`` (in ``table_frames``), each with that many present entries.
    The shared page 0x40800000 lies in a large page."""
    m.ram.view[cr3 + 0x400:cr3 + 0x800] = bytes(0x400)
    for i in range(large):
        struct.pack_into("<I", m.ram.view, cr3 + 0x400 + 4 * i, 0x87)     # base 0, PS|U|W|P
    for j, (count, frame) in enumerate(zip(tables, table_frames)):
        pt = frame << 12
        m.ram.view[pt:pt + 4096] = bytes(4096)
        for i in range(count):
            struct.pack_into("<I", m.ram.view, pt + 4 * i, (i << 12) | 7)
        struct.pack_into("<I", m.ram.view, cr3 + 0x400 + 4 * (large + j), pt | 7)


@pytest.mark.parametrize("large, tables, refused", [
    (16, [], False), (15, [1024], False),           # MAX_PROTECT pages: walked in full
    (16, [1], True), (15, [1024, 1], True),         # one more: refused at the bound
    (17, [], True)])                                # large pages only
def test_one_hc_protect_walks_at_most_max_protect_pages(idle, large, tables, refused):
    # 16 x 1024 = 16384 pages: the bound docs/guest-abi.md gives for E2BIG.
    m, cr3 = idle
    frames = [get_pte(m, cr3[2], SHARED + k * abi.PAGE_SIZE) >> 12 for k in (1, 2)]   # pid 2's data
    _map_user_range(m, cr3[1], large, tables, frames)
    # Every frame here is mapped many times over, so a walk that completes is refused
    # for that (EINVAL); one that stops at the bound, for its size (E2BIG).
    assert protect(m, cr3[1], 1) == (-abi.E2BIG if refused else -abi.EINVAL)
    assert not m.protection.view()


def test_the_owner_is_known_by_its_address_space_whatever_low_bits_cr3_carries(idle):
    """CR3's low bits are ignored by the MMU (bits 0-2 reserved, 3-4 cache control):
    a kernel that sets them when it switches to the protected process must not make
    the VMM take the owner for a stranger (it would cloak the page under the
    owner, which would then compute on ciphertext that no MAC check guards)."""
    m, cr3 = idle
    assert protect(m, cr3[1], 1) == 0
    proc = m.protection.procs[1]
    vaddr, meta = next((vpn << 12, meta) for vpn, meta in sorted(proc.pages.items()))
    for low in (0x1, 0x8, 0x18, 0x7):
        assert m.protection.on_fill(m._uc, vaddr, meta.ppn << 12, True, False, False, cr3[1] | low) is None
        assert meta.state == "plaintext", hex(low)
    assert m.protection.on_fill(m._uc, vaddr, meta.ppn << 12, True, False, False, cr3[2]) is None
    assert meta.state == "cloaked"                  # another process: cloaked first, as always



def _fake_address_space(m, top):
    """A page directory the kernel made up (frames ``top``-2 .. ``top``), mapping
    only a writable shared page at SHARED: the least a protect call needs."""
    pd, pt, shared = (top - 2) << 12, (top - 1) << 12, top << 12
    for f in (pd, pt, shared):
        m.ram.view[f:f + 4096] = bytes(4096)
    struct.pack_into("<I", m.ram.view, pd + (SHARED >> 22) * 4, pt | PTE_P | PTE_W | PTE_U)
    struct.pack_into("<I", m.ram.view, pt + ((SHARED >> 12) & 0x3FF) * 4, shared | PTE_P | PTE_W | PTE_U)
    return pd


def test_a_kernel_that_announces_more_address_spaces_than_it_has_slots_is_held_to_max_protected(idle):
    # The kernel is free to invent address spaces and pids (HC_PROC_START): the
    # VMM holds at most MAX_PROTECTED live protected processes (the state it
    # saves is bounded by that, prot_state); exited ones do not count.
    from minivmm.protection import MAX_PROTECTED
    m, cr3 = idle
    assert protect(m, cr3[1], 1) == 0 and protect(m, cr3[2], 2) == 0
    top = m.ram.size // abi.PAGE_SIZE - 1
    fakes = [_fake_address_space(m, top - 3 * k) for k in range(MAX_PROTECTED - 1)]
    assert not {f >> 12 for f in fakes} & set(m.protection.frames)
    for pid, pd in enumerate(fakes[:-1], start=3):
        assert protect(m, pd, pid) == 0, pid
    assert len(m.protection.procs) == MAX_PROTECTED
    assert protect(m, fakes[-1], 99) == -abi.EINVAL            # one more live one: refused
    assert 99 not in m.protection.procs and fakes[-1] not in m.protection.by_cr3
    m.protection.process_exited(3)
    assert protect(m, fakes[-1], 99) == 0                     # a slot freed by an exit
    assert len([p for p in m.protection.procs.values() if not p.exited]) == MAX_PROTECTED


BIG = IDLE + "pad: .space 5000, 0x5A\n"        # an image of two pages


def test_the_measurement_covers_exactly_the_image_pages_as_the_program_was_built():
    # Known answer: SHA-256 over (vpn, page) of each image page, from the
    # assembler's output, not from what the VMM reads. The data pages (one
    # protected, one shared) and the stack are not part of it, whatever they hold.
    import hashlib
    from guests.asm import assemble
    from guests.build import PROGRAMS_DIR, expand_includes
    m, cr3 = started(prog("big", BIG, data_pages=3))
    code = assemble(expand_includes(BIG, PROGRAMS_DIR), abi.IMAGE_VADDR).code
    assert abi.PAGE_SIZE < len(code) <= 2 * abi.PAGE_SIZE
    code = code.ljust(2 * abi.PAGE_SIZE, b"\0")
    want = hashlib.sha256(b"".join(struct.pack("<I", (abi.IMAGE_VADDR >> 12) + i) +
                                   code[i * abi.PAGE_SIZE:(i + 1) * abi.PAGE_SIZE] for i in range(2)))
    for vaddr in (abi.DATA_VADDR, abi.DATA_VADDR + 2 * abi.PAGE_SIZE, abi.USER_END - abi.PAGE_SIZE):
        frame = get_pte(m, cr3[1], vaddr) & 0xFFFFF000
        m.ram.view[frame:frame + 8] = b"not code"
    assert protect(m, cr3[1], 1, shared=abi.DATA_VADDR + abi.PAGE_SIZE) == 0
    [view] = m.protection.view()
    assert abi.DATA_VADDR in [p.vaddr for p in view.pages]       # protected, but not measured
    assert view.measurement == want.hexdigest()


def test_a_user_page_the_kernel_maps_below_the_user_range_is_not_taken(idle):
    # Protection covers [USER_BASE, USER_END) only: a user-accessible entry the
    # kernel adds just below USER_BASE (here: onto pid 2's data page) is not the
    # process's to own, and the VMM must not take that frame from pid 2.
    m, cr3 = idle
    victim = get_pte(m, cr3[2], SHARED) & 0xFFFFF000
    pt = m.ram.size - abi.PAGE_SIZE
    m.ram.view[pt:pt + 4096] = bytes(4096)
    struct.pack_into("<I", m.ram.view, pt + 0x3FF * 4, victim | PTE_P | PTE_W | PTE_U)
    below = (abi.USER_BASE >> 22) - 1
    assert struct.unpack_from("<I", m.ram.view, cr3[1] + below * 4)[0] == 0
    struct.pack_into("<I", m.ram.view, cr3[1] + below * 4, pt | PTE_P | PTE_W | PTE_U)
    assert protect(m, cr3[1], 1) == 0
    [view] = m.protection.view()
    assert victim >> 12 not in m.protection.frames
    assert min(p.vaddr for p in view.pages) >= abi.USER_BASE


def test_an_address_space_outside_ram_has_no_pages_to_protect(idle):
    # Not reachable from a guest (the MMU faults every fetch under such a CR3),
    # but the walk must refuse it, not read past the end of RAM.
    m, _ = idle
    for cr3 in (m.ram.size, m.ram.size + 0x400000):
        assert protect(m, cr3, 1) == -abi.EINVAL
    assert not m.protection.view()


def test_a_4mib_page_the_kernel_maps_is_protected_frame_by_frame_and_no_further(idle):
    # A large page at 0x60000000 onto the 4 MiB at 8 MiB of RAM (nobody's):
    # each of its 1024 frames becomes a protected page, and nothing past it.
    # A second one, at 0x60800000, lies beyond the end of RAM: no page of it.
    m, cr3 = idle
    pdi, base = 0x60000000 >> 22, (8 << 20) >> 12
    assert struct.unpack_from("<III", m.ram.view, cr3[1] + pdi * 4) == (0, 0, 0)
    struct.pack_into("<I", m.ram.view, cr3[1] + pdi * 4, (base << 12) | 0x80 | PTE_P | PTE_W | PTE_U)
    struct.pack_into("<I", m.ram.view, cr3[1] + (pdi + 2) * 4, m.ram.size | 0x80 | PTE_P | PTE_W | PTE_U)
    assert protect(m, cr3[1], 1) == 0
    [view] = m.protection.view()
    large = sorted((p.vaddr, p.frame) for p in view.pages if 0x60000000 <= p.vaddr < 0x61000000)
    assert large == [(0x60000000 + i * abi.PAGE_SIZE, base + i) for i in range(1024)]
    assert base + 1024 not in m.protection.frames


@pytest.mark.parametrize("writable", [False, True])
def test_a_shared_page_inside_a_4mib_page_is_writable_only_if_the_large_page_is(idle, writable):
    m, cr3 = idle
    pdi, base = SHARED >> 22, (12 << 20) >> 12
    struct.pack_into("<I", m.ram.view, cr3[1] + pdi * 4,
                     (base << 12) | 0x80 | PTE_P | PTE_U | (PTE_W if writable else 0))
    assert protect(m, cr3[1], 1) == (0 if writable else -abi.EINVAL)
    if writable:
        [view] = m.protection.view()
        assert view.shared_vaddr == SHARED and base not in m.protection.frames     # the shared frame
        assert m.protection.frames[base + 1][1].vpn == (SHARED >> 12) + 1
        assert base + 1023 == m.ram.size // abi.PAGE_SIZE - 1 in m.protection.frames   # RAM's last frame


def test_page_tables_and_frames_beyond_ram_map_nothing(idle):
    # A page directory entry onto a "page table" past the end of RAM, and a page
    # table entry onto a frame past it: nothing there to protect (and nothing to
    # read); RAM's last frame, mapped through a table in RAM's last frame, is.
    m, cr3 = idle
    last = m.ram.size // abi.PAGE_SIZE - 1
    pdi = 0x60000000 >> 22
    struct.pack_into("<I", m.ram.view, cr3[1] + pdi * 4, m.ram.size | PTE_P | PTE_W | PTE_U)
    pt = last << 12
    m.ram.view[pt:pt + 4096] = bytes(4096)
    struct.pack_into("<II", m.ram.view, pt, m.ram.size | 7, (last << 12) | 7)
    struct.pack_into("<I", m.ram.view, cr3[1] + (pdi + 1) * 4, pt | PTE_P | PTE_W | PTE_U)
    assert protect(m, cr3[1], 1) == 0
    [view] = m.protection.view()
    assert [p.vaddr for p in view.pages if 0x60000000 <= p.vaddr < 0x70000000] == [0x60401000]
    assert m.protection.frames[last][1].vpn == 0x60401


@pytest.mark.parametrize("pde_w, pte_w", [(False, True), (True, False), (True, True)])
def test_the_shared_page_is_writable_only_if_both_levels_grant_it(idle, pde_w, pte_w):
    m, cr3 = idle
    pde_at = cr3[1] + (SHARED >> 22) * 4
    pde = struct.unpack_from("<I", m.ram.view, pde_at)[0]
    struct.pack_into("<I", m.ram.view, pde_at, (pde & ~PTE_W) | (PTE_W if pde_w else 0))
    pte = get_pte(m, cr3[1], SHARED)
    set_pte(m, cr3[1], SHARED, (pte & ~PTE_W) | (PTE_W if pte_w else 0))
    assert protect(m, cr3[1], 1) == (0 if pde_w and pte_w else -abi.EINVAL)


@pytest.mark.parametrize("pde_bits", [PTE_P | PTE_W, PTE_W | PTE_U])
def test_a_page_table_behind_a_supervisor_or_absent_directory_entry_maps_no_user_page(idle, pde_bits):
    # The page table's own entries say "user", but the directory entry above them
    # does not (or is not present): nothing there is reachable at ring 3.
    m, cr3 = idle
    victim = get_pte(m, cr3[2], SHARED) & 0xFFFFF000
    pt = m.ram.size - abi.PAGE_SIZE
    m.ram.view[pt:pt + 4096] = bytes(4096)
    struct.pack_into("<I", m.ram.view, pt, victim | PTE_P | PTE_W | PTE_U)
    pdi = 0x60000000 >> 22
    struct.pack_into("<I", m.ram.view, cr3[1] + pdi * 4, pt | pde_bits)
    assert protect(m, cr3[1], 1) == 0
    assert victim >> 12 not in m.protection.frames
    assert 0x60000 not in m.protection.procs[1].pages


def test_protect_and_adoption_log_the_frames_dirty_and_flush_the_tlb(idle):
    # A live migration may have sent these frames in plaintext before they were
    # protected: logged dirty, they go again, sealed.  And no TLB entry to them
    # may survive (the kernel's or another process's would bypass the fill hook).
    m, cr3 = idle
    flushes = []
    real = m.protection._flush
    m.protection._flush = lambda: (flushes.append(1), real())
    m.ram.dirty.start()
    assert protect(m, cr3[1], 1) == 0
    owned = set(m.protection.frames)
    assert owned and owned <= set(int(p) for p in m.ram.dirty.fetch_and_clear())
    assert flushes
    flushes.clear()
    fresh = get_pte(m, cr3[2], SHARED + abi.PAGE_SIZE) & 0xFFFFF000      # pid 2's: nobody's to the VMM
    assert m.protection.on_fill(m._uc, 0x50000000, fresh, True, False, False, cr3[1]) is None
    assert m.protection.procs[1].pages[0x50000].ppn == fresh >> 12      # adopted
    assert fresh >> 12 in set(int(p) for p in m.ram.dirty.fetch_and_clear())
    assert flushes
    m.ram.dirty.stop()
