"""A protected process's life in the VMM's books: sealing, exit, a CR3
announced again, pruning of exited processes, the key's end; and the checks
``Protection.restore`` makes of a state document a hostile state file (or a
hostile migration source, before the secure layer) controls.  Issue 19: each
check here had a one-line mutant no other test noticed.

The tests call what the hypercalls call (``HC_PROC_START`` ->
``process_started``, ``HC_PROC_EXIT`` -> ``process_exited``) with exactly the
values a hostile kernel may pass; the kernel is free to invent address
spaces and pids.
"""

import struct

import pytest

from guests.build import build_image
from guesthelp import IDLE, prog, started
from minivmm import abi
from minivmm.machine import Machine
from minivmm.protection import CLOAKED, DETACHED, MAX_EXITED, PLAINTEXT, ProtectionState

SHARED = abi.DATA_VADDR
PTE_PWU = 7


@pytest.fixture
def two():
    """Pids 1 and 2 alive and protected: (machine, {pid: cr3})."""
    m, cr3 = started(prog("a", IDLE, data_pages=3), prog("b", IDLE, data_pages=3))
    for pid in (1, 2):
        assert m.protection.protect(cr3[pid], pid, "ab"[pid - 1], SHARED, 0) == 0
    return m, cr3


def fake_space(m, top):
    """A made-up address space (frames top-2..top): a shared page and one page to own."""
    pd, pt = (top - 2) << 12, (top - 1) << 12
    for f in (pd, pt):
        m.ram.view[f:f + 4096] = bytes(4096)
    struct.pack_into("<I", m.ram.view, pd + (SHARED >> 22) * 4, pt | PTE_PWU)
    struct.pack_into("<II", m.ram.view, pt + ((SHARED >> 12) & 0x3FF) * 4, pd | PTE_PWU, (top << 12) | PTE_PWU)
    return pd


def test_seal_all_cloaks_every_plaintext_page_once_and_counts_them(two):
    m, _ = two
    plain = sum(len(p.pages) for p in m.protection.procs.values())
    assert plain > 2
    assert m.protection.seal_all() == plain
    assert {meta.state for p in m.protection.procs.values() for meta in p.pages.values()} == {CLOAKED}
    assert m.protection.seal_all() == 0


def test_an_exit_cloaks_what_is_left_releases_the_frames_and_destroys_the_key(two):
    m, cr3 = two
    p1 = m.protection.procs[1]
    frames = {meta.ppn for meta in p1.pages.values()}
    p1.in_kernel = True
    m.protection.process_exited(1)
    assert p1.exited and not p1.in_kernel and p1.saved is None and p1.shown is None
    assert {meta.state for meta in p1.pages.values()} == {CLOAKED}
    assert not frames & set(m.protection.frames)                    # the kernel's to reuse
    assert p1.key_handle not in m.protection._keys and p1.key_handle not in m.protection._ciphers
    assert p1.key_handle not in m.protection.save().keys
    assert m.protection.by_cr3[cr3[1]] is p1                        # a resumed liar is still caught
    assert m.protection.procs[2].pages and not m.protection.procs[2].exited
    m.protection.process_exited(1)                                  # a second report changes nothing
    m.protection.process_exited(77)                                 # nor one of a pid never protected
    assert m.protection.by_cr3[cr3[1]] is p1 and len(m.protection.procs) == 2


def test_a_cr3_announced_again_forgets_only_an_exited_owner(two):
    m, cr3 = two
    m.protection.process_started(9, cr3[2] | 0x19)                 # pid 2 is alive: kept
    assert m.protection.by_cr3[cr3[2]].pid == 2
    assert m.protection.protect(cr3[1], 9, "c", SHARED, 0) == -abi.EEXIST
    m.protection.process_exited(1)
    assert m.protection.protect(cr3[1], 9, "c", SHARED, 0) == -abi.EEXIST   # exited, not yet reused
    m.protection.process_started(9, cr3[1] | 0x19)                 # (the kernel's raw argument)
    assert cr3[1] not in m.protection.by_cr3 and m.protection.procs[1].exited    # still in the view
    assert m.protection.protect(cr3[1], 9, "c", SHARED, 0) == 0
    assert m.protection.by_cr3[cr3[1]].pid == 9


def test_only_the_last_max_exited_exited_processes_are_kept(two):
    m, cr3 = two
    m.protection.process_exited(1)
    m.protection.process_started(50, cr3[1])                        # pid 1's address space reused...
    assert m.protection.protect(cr3[1], 50, "again", SHARED, 0) == 0   # ...by a live protected one
    top = m.ram.size // abi.PAGE_SIZE - 1
    for k in range(MAX_EXITED):
        pd = fake_space(m, top - 3 * k)
        assert m.protection.protect(pd, 100 + k, "short", SHARED, 0) == 0
        m.protection.process_exited(100 + k)
    exited = sorted(p.pid for p in m.protection.procs.values() if p.exited)
    assert exited == [100 + k for k in range(MAX_EXITED)]           # pid 1, the oldest, dropped
    assert m.protection.by_cr3[cr3[1]].pid == 50                    # and its CR3 is not the live one's
    assert all(m.protection.by_cr3[m.protection.procs[pid].cr3].pid == pid for pid in exited)
    assert sorted(p.pid for p in m.protection.view()) == sorted([2, 50] + exited)
    # One more: the oldest kept one (pid 100) is dropped, and with it its claim on
    # its address space, which a new process may now protect.
    first = m.protection.procs[100].cr3
    pd = fake_space(m, top - 3 * MAX_EXITED)
    assert m.protection.protect(pd, 200, "last", SHARED, 0) == 0
    m.protection.process_exited(200)
    assert 100 not in m.protection.procs and first not in m.protection.by_cr3
    assert m.protection.protect(first, 300, "reuse", SHARED, 0) == 0


def test_process_looks_up_one_pid(two):
    m, _ = two
    assert m.protection.process(2).pid == 2 and m.protection.process(1).pid == 1
    with pytest.raises(KeyError, match="pid 3 is not protected"):
        m.protection.process(3)


# ------------------------------------------------------- restore's checks
def edited(m, edit):
    doc = m.protection.save().to_dict()
    edit({p["pid"]: p for p in doc["processes"]}, doc)
    return ProtectionState.from_dict(doc)


def restore(m, st):
    """Into a fresh machine of the same RAM size (what Machine.restore does)."""
    r = Machine(build_image([prog("x", IDLE)]), _boot=False)
    r.protection.restore(st)
    return r


def test_a_state_whose_live_process_names_a_missing_key_is_refused(two):
    m, _ = two

    def drop_key(procs, doc):
        del doc["keys"][str(procs[2]["key_handle"])]
    with pytest.raises(ValueError, match="pid 2 names a missing key"):
        restore(m, edited(m, drop_key))


def test_an_exited_process_needs_no_key_and_its_pages_own_no_frame(two):
    m, _ = two
    m.protection.process_exited(1)
    gone = m.protection.procs[1]

    def reuse(procs, doc):                       # its old frames now hold pid 2's pages
        for entry, other in zip(procs[1]["pages"], procs[2]["pages"]):
            entry[1] = other[1]
    r = restore(m, edited(m, reuse))
    assert r.protection.procs[1].exited and gone.key_handle not in r.protection._keys
    assert {p for p, (owner, _) in r.protection.frames.items() if owner.pid == 1} == set()
    assert len(r.protection.frames) == len(m.protection.procs[2].pages)


def test_a_live_process_may_not_take_the_key_of_an_exited_one(two):
    # Handles are never reused in a VMM: a live process naming the handle of an
    # exited one (listed before it) is a forged state.
    m, _ = two
    m.protection.process_exited(1)

    def share(procs, doc):
        doc["processes"].sort(key=lambda p: p["pid"])
        procs[2]["key_handle"] = procs[1]["key_handle"]
        doc["keys"][str(procs[1]["key_handle"])] = doc["keys"][str(m.protection.procs[2].key_handle)]
    with pytest.raises(ValueError, match="pid 2 shares a key"):
        restore(m, edited(m, share))


def test_two_exited_processes_may_name_the_same_old_key(two):
    m, _ = two
    m.protection.process_exited(1)
    m.protection.process_exited(2)

    def share(procs, doc):
        procs[2]["key_handle"] = procs[1]["key_handle"]
    r = restore(m, edited(m, share))
    assert sorted(r.protection.procs) == [1, 2] and not r.protection.frames


@pytest.mark.parametrize("what", ["pid", "cr3"])
def test_a_pid_or_a_live_address_space_named_twice_is_refused(two, what):
    m, _ = two

    def twice(procs, doc):
        procs[2][what] = procs[1][what]
    with pytest.raises(ValueError, match="named twice"):
        restore(m, edited(m, twice))


def test_an_exited_and_a_live_process_may_share_an_address_space_and_the_live_one_owns_it(two):
    m, cr3 = two
    m.protection.process_exited(1)

    def same(procs, doc):
        procs[1]["cr3"] = procs[2]["cr3"]
        doc["processes"].reverse()              # the live one first: it must win anyway
    r = restore(m, edited(m, same))
    assert r.protection.by_cr3[cr3[2]].pid == 2 and not r.protection.by_cr3[cr3[2]].exited


def test_a_detached_page_owns_no_frame_and_ram_edges_are_checked(two):
    m, _ = two
    size = m.ram.size // abi.PAGE_SIZE

    def detach_and_move(procs, doc):
        procs[1]["pages"][0][1] = DETACHED
        procs[2]["pages"][0][1] = size - 1      # RAM's last frame
        procs[2]["pages"][1][1] = 0             # and its first
        procs[2]["pages"][2][1] = 1             # and its second
    r = restore(m, edited(m, detach_and_move))
    p1 = r.protection.procs[1]
    assert DETACHED not in r.protection.frames
    assert [meta.ppn for meta in p1.pages.values()].count(DETACHED) == 1
    assert all(r.protection.frames[f][0].pid == 2 for f in (0, 1, size - 1))
    assert len(r.protection.frames) == sum(len(p.pages) for p in m.protection.procs.values()) - 1

    def beyond(procs, doc):
        procs[2]["pages"][0][1] = size
    with pytest.raises(ValueError, match="outside RAM"):
        restore(m, edited(m, beyond))


def test_key_handles_stay_fresh_across_a_restore(two):
    # A handle names one key: in [1, next_handle), never given twice (the
    # migration's state check holds a state to the same rule).  A restored VMM
    # goes on from the saved next_handle: a new process must not take, and so
    # overwrite, the key of a restored one.
    m, _ = two
    st = m.protection.save()
    handles = [p.key_handle for p in m.protection.procs.values()]
    assert len(set(handles)) == 2 and all(1 <= h < st.next_handle for h in handles)
    r = restore(m, st)
    pd = fake_space(r, r.ram.size // abi.PAGE_SIZE - 1)
    assert r.protection.protect(pd, 7, "new", SHARED, 0) == 0
    new = r.protection.procs[7].key_handle
    assert new not in handles and 1 <= new < r.protection.save().next_handle
    assert all(r.protection._keys[h] == st.keys[h] for h in handles)


def test_every_cloak_bumps_the_page_version_by_one(two):
    # docs/protection.md: version "+1 on every cloak", bound into the AD.
    m, cr3 = two
    m.protection.seal_all()
    pages = m.protection.procs[1].pages
    assert {meta.version for meta in pages.values()} == {1}
    vpn, meta = sorted(pages.items())[0]
    assert m.protection.on_fill(m._uc, vpn << 12, meta.ppn << 12, True, False, False, cr3[1]) is None
    assert meta.state == PLAINTEXT and meta.version == 1
    m.protection.seal_all()
    assert meta.version == 2 and {x.version for x in pages.values() if x is not meta} == {1}


def test_forgotten_keys_are_gone_from_the_saved_state_too(two):
    from minivmm.errors import KeysDestroyed
    m, _ = two
    m.protection.forget_keys()
    assert m.protection.save().keys == {}
    for pid in (1, 2):
        with pytest.raises(KeysDestroyed, match=f"pid {pid} "):
            m.protection._cipher(m.protection.procs[pid])


def test_a_pid_protected_again_counts_as_its_latest_exit_when_old_ones_are_dropped(two):
    # pid 1 exits, then MAX_EXITED - 1 others; pid 1's address space is announced
    # again and pid 1 protected again (it replaces its exited namesake) and exits
    # last but one.  When one more exit drops the oldest, that is the first of
    # the others, not pid 1.
    m, cr3 = two
    m.protection.process_exited(1)
    top = m.ram.size // abi.PAGE_SIZE - 1
    for k in range(MAX_EXITED - 1):
        pd = fake_space(m, top - 3 * k)
        assert m.protection.protect(pd, 100 + k, "short", SHARED, 0) == 0
        m.protection.process_exited(100 + k)
    m.protection.process_started(1, cr3[1])
    assert m.protection.protect(cr3[1], 1, "a", SHARED, 0) == 0
    m.protection.process_exited(1)
    m.protection.process_exited(2)                                  # one too many
    assert 1 in m.protection.procs and 2 in m.protection.procs
    assert 100 not in m.protection.procs and 101 in m.protection.procs


def test_a_restore_replaces_everything_the_engine_held(two):
    # Machine.restore always restores into a fresh engine; restore itself does not
    # count on that: nothing of the old books, TLB entries or translations survives.
    m, cr3 = two
    calls = []
    real_flush = m.protection._flush
    m.protection._flush = lambda: (calls.append("flush"), real_flush())
    m.protection._invalidate_code = lambda: calls.append("drop")
    m.protection.restore(ProtectionState(enabled=False, next_handle=1, keys={}, processes=()))
    assert (m.protection.frames, m.protection.procs, m.protection.by_cr3) == ({}, {}, {})
    assert not m.protection.enabled and not m.protection.active
    assert m.protection.protect(cr3[1], 1, "a", SHARED, 0) == -abi.ENOSYS
    assert calls == ["flush", "drop"]


def test_a_process_cannot_reach_another_processs_frame_holding_its_own_ciphertext(two):
    # pid 2 (protected, colluding with the kernel) writes pid 1's page A's
    # ciphertext into its own plaintext page P; the kernel maps A's address in
    # pid 1 onto P's frame.  pid 2's page is cloaked before pid 1's check, so the
    # check fails on P's ciphertext: pid 1 never decrypts into a frame pid 2 maps.
    m, cr3 = two
    m.protection.seal_all()
    a = m.protection.procs[1].pages[(SHARED >> 12) + 1]
    p = m.protection.procs[2].pages[(SHARED >> 12) + 1]
    assert m.protection.on_fill(m._uc, SHARED + 0x1000, p.ppn << 12, True, True, False, cr3[2]) is None
    assert p.state == PLAINTEXT
    m.ram.write(p.ppn << 12, bytes(m.ram.page(a.ppn)))           # pid 2 stores A's ciphertext
    assert m.protection.on_fill(m._uc, SHARED + 0x1000, p.ppn << 12, True, False, False, cr3[1]) == 5
    assert m.protection.procs[1].stopped.startswith("MAC check failed")
    assert p.state == CLOAKED and a.ppn != p.ppn and a.state == CLOAKED
