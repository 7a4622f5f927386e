"""The "user" colour of the memory map comes from the guest's page tables
(tui/pagewalk.py): checked against minivmm.mmu.walk, the VMM's own walker,
on a real booted guest, and on hand-made tables with every kind of entry."""

import struct

import numpy as np

from guests.catalog import get_guest
from minivmm.memory import GuestRAM
from minivmm.mmu import PTE_P, PTE_PS, PTE_U, PTE_W, WalkFault, walk
from minivmm.machine import Machine
from tui import capture
from tui.pagewalk import LIVE, process_frames, user_frames


def _oracle(ram, cr3):
    """The frames mmu.walk lets user mode reach through ``cr3``, address by
    address, plus the directory and the tables of its present entries."""
    frames = {cr3 >> 12}
    for i in range(1024):
        pde = struct.unpack_from("<I", ram.view, (cr3 & ~0xFFF) + 4 * i)[0]
        if not pde & PTE_P:
            continue
        if not pde & PTE_PS and (pde >> 12) < ram.npages:
            frames.add(pde >> 12)
        for j in range(1024):
            try:
                page, _ = walk(ram, cr3, (i << 22) | (j << 12), write=False, user=True)
            except WalkFault:
                continue
            frames.add(page >> 12)
    return frames


def test_the_walk_finds_what_the_mmu_lets_user_mode_reach_on_a_real_guest():
    m = Machine(get_guest("demo").build(16 << 20), ram_size=16 << 20)
    m.run(until=lambda mm: mm.ticks >= 20)
    live = [p for p in m.processes() if p.state in LIVE]
    assert len(live) >= 3
    want = set().union(*(_oracle(m.ram, p.cr3) for p in live))
    got = process_frames(m)
    assert set(np.flatnonzero(got).tolist()) == want
    # The kernel's identity map is supervisor-only: the kernel image is not "user".
    assert not got[m.cpu().eip >> 12]
    # The screen's content codes: user exactly there, except protected frames.
    view = capture.source_view("x", m)
    codes = view.memory.cells[0::2]
    prot = set(m.protection.frames)
    assert {f for f, c in enumerate(codes) if c == "u"} == want - prot
    assert prot and all(codes[f] in "pc" for f in prot)


def test_every_kind_of_entry_on_hand_made_tables():
    ram = GuestRAM(16 << 20)
    pd, pt_user, pt_super = 0x200, 0x201, 0x202

    def put(frame, index, value):
        ram.view[(frame << 12) + 4 * index:(frame << 12) + 4 * index + 4] = struct.pack("<I", value)
    put(pd, 1, 0x00400000 | PTE_PS | PTE_U | PTE_P)            # a 4 MiB user page: frames 0x400-0x7ff
    put(pd, 2, (pt_user << 12) | PTE_U | PTE_W | PTE_P)
    put(pt_user, 0, (0x300 << 12) | PTE_U | PTE_P)              # user: counted
    put(pt_user, 1, (0x301 << 12) | PTE_P)                      # supervisor page: not counted
    put(pt_user, 2, (0x302 << 12) | PTE_U)                      # not present: not counted
    put(pt_user, 3, 0xFFFFF000 | PTE_U | PTE_P)                 # beyond RAM: nothing (a bus error)
    put(pd, 3, (pt_super << 12) | PTE_W | PTE_P)                # a supervisor table:
    put(pt_super, 0, (0x310 << 12) | PTE_U | PTE_P)             #   U in the PTE alone grants nothing
    put(pd, 4, 0xFFFFF000 | PTE_U | PTE_P)                      # a table beyond RAM: ignored
    put(pd, 5, (0x800 << 12) | PTE_PS | PTE_P)                  # a supervisor 4 MiB page: not counted
    got = set(np.flatnonzero(user_frames(ram, [pd << 12, pd << 12, 0xFFFFF000])).tolist())
    assert got == {pd, pt_user, pt_super, 0x300} | set(range(0x400, 0x800))
    assert got == _oracle(ram, pd << 12)
