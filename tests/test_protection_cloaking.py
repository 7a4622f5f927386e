"""Cloaking's own bookkeeping, attacked (issue 19's cloaking classes).

Each test fails when its class of bug is seeded: a nonce that repeats, a
field dropped from the associated data, a plaintext page the kernel remaps
to a fresh frame, a frame aliased at HC_PROTECT, a restored state that owns
a frame twice or outside RAM.  The associated-data attacks edit a saved
state (ciphertext and metadata moved together: what the kernel alone cannot
do, since the tags never leave the VMM) -- the attacker a state file at rest
has to be guarded against (docs/protection.md, "Secrets at rest")."""

import dataclasses

import pytest

from guests.build import Program, build_image, kernel_text
from guesthelp import prog
from minivmm import abi
from minivmm import events as ev
from minivmm.errors import StateError
from minivmm.machine import Machine
from minivmm.protection import CLOAKED, ProtectionState
from minivmm.state import MachineState
from test_protection_attacks import SCAN, keeper_under

SECRET_VPN, DECOY_VPN = 0x40801000 >> 12, 0x40802000 >> 12


def test_no_nonce_repeats_within_one_run():
    m, _ = keeper_under(SCAN, key_seed=b"nonces")
    nonces = []
    m.events.subscribe(lambda e: nonces.append(
        m.protection.procs[e.pid].pages[e.vaddr >> 12].nonce), ev.PageCloaked)
    m.run(until=lambda m: "round 3," in m.console.text(1))
    for _ in range(3):                  # the VMM's own sealing, between kernel scans
        m.seal_for_export()
        m.run(max_ticks=1)
    assert m.run(max_ticks=3000) == "shutdown" and m.exits == {1: 0}
    assert len(nonces) >= 20
    assert len(set(nonces)) == len(nonces)


def keepers(n=1):
    progs = [Program.builtin("keeper", data_pages=3, args=(6, 1), as_name=f"keeper{i}")
             for i in range(1, n + 1)]
    return Machine(build_image(progs), key_seed=b"ad")


def sealed_state(m):
    m.seal_for_export()
    return m.save_state()


def edited(st, edit):
    doc = st.protection.to_dict()
    ram = bytearray(st.ram)
    edit(doc, ram)
    return dataclasses.replace(st, ram=bytes(ram), protection=ProtectionState.from_dict(doc))


def pages_of(doc, pid):
    [p] = [p for p in doc["processes"] if p["pid"] == pid]
    return {entry[0]: entry for entry in p["pages"]}, p


def frame(ram, ppn):
    return ram[ppn << 12:(ppn + 1) << 12]


def run_restored(st):
    r = Machine.restore(st)
    seen = []
    r.events.subscribe(seen.append, ev.IntegrityViolation)
    r.run(max_ticks=3000)
    return r, seen


def test_associated_data_binds_the_virtual_page():
    m = keepers()
    m.run(until=lambda m: "round 1," in m.console.text(1))

    def swap(doc, ram):         # the secret's and the decoy's ciphertext and metadata, swapped
        pages, _ = pages_of(doc, 1)
        s, d = pages[SECRET_VPN], pages[DECOY_VPN]
        fs, fd = frame(ram, s[1]), frame(ram, d[1])
        ram[s[1] << 12:(s[1] + 1) << 12], ram[d[1] << 12:(d[1] + 1) << 12] = fd, fs
        s[3:], d[3:] = d[3:], s[3:]
    r, seen = run_restored(edited(sealed_state(m), swap))
    assert "SECRET CHANGED" not in r.console.text(1)
    [v] = seen
    assert v.vaddr == SECRET_VPN << 12 and "MAC" in v.reason


def test_associated_data_binds_the_version():
    m = keepers()
    m.run(until=lambda m: "round 1," in m.console.text(1))
    old = sealed_state(m)
    m.run(until=lambda m: "round 2," in m.console.text(1))
    new = sealed_state(m)
    old_pages, _ = pages_of(old.protection.to_dict(), 1)
    old_secret = old_pages[SECRET_VPN]

    def roll_back(doc, ram):    # the older ciphertext, nonce and tag; the current version
        pages, _ = pages_of(doc, 1)
        s = pages[SECRET_VPN]
        assert s[3] > old_secret[3] and s[2] == CLOAKED
        ram[s[1] << 12:(s[1] + 1) << 12] = frame(old.ram, old_secret[1])
        s[4], s[5] = old_secret[4], old_secret[5]
    r, seen = run_restored(edited(new, roll_back))
    [v] = seen
    assert v.vaddr == SECRET_VPN << 12 and "MAC" in v.reason


def test_associated_data_binds_the_process():
    m = keepers(2)
    m.run(until=lambda m: "round 1," in m.console.text(1) and "round 1," in m.console.text(2))

    def transplant(doc, ram):   # keeper 2 gets keeper 1's key (bytes) and all its pages
        one, p1 = pages_of(doc, 1)
        two, p2 = pages_of(doc, 2)
        assert set(one) == set(two)
        for vpn, e1 in one.items():
            e2 = two[vpn]
            ram[e2[1] << 12:(e2[1] + 1) << 12] = frame(ram, e1[1])
            e2[2:] = e1[2:]
        doc["keys"][str(p2["key_handle"])] = doc["keys"][str(p1["key_handle"])]
    r, seen = run_restored(edited(sealed_state(m), transplant))
    assert r.exits[1] == 0
    assert [v.pid for v in seen] == [2] and "MAC" in seen[0].reason


# At the keeper's 2nd system call (its secret page plaintext, untouched by the
# kernel): point the secret's PTE at a fresh frame holding a forgery.
FRESH = r"""
.include "hostile_victim.s"
syscall_hook:
    call hk_victim_call
    cmp eax, 2
    jne fr_out
    mov dword ptr [0xF00000], 0x4b434148        ; "HACK": the forgery
    mov eax, [esi+PROC_CR3]
    mov eax, [eax+0x408]
    and eax, 0xFFFFF000
    mov ebx, [eax+4]
    and ebx, 0xFFF
    or ebx, 0xF00000
    mov [eax+4], ebx
    mov eax, cr3
    mov cr3, eax
fr_out:
    ret
"""


@pytest.mark.parametrize("protection", [False, True])
def test_a_plaintext_page_remapped_to_a_fresh_frame_is_caught(protection):
    m, seen = keeper_under(FRESH, protection=protection)
    m.run(max_ticks=3000)
    if not protection:
        assert "SECRET CHANGED" in m.console.text(1)
    else:
        assert "SECRET CHANGED" not in m.console.text(1)
        [v] = [e for e in seen if isinstance(e, ev.IntegrityViolation)]
        assert v.vaddr == SECRET_VPN << 12 and "remapped" in v.reason


# Before the program asks for protection: its decoy page's PTE := its secret's.
ALIAS = r"""
syscall_hook:
    cmp dword ptr [INFO_DATA_PAGES_ADDR], 3
    jb al_out
    mov eax, [esi+PROC_CR3]
    mov eax, [eax+0x408]
    and eax, 0xFFFFF000
    mov ebx, [eax+4]
    mov [eax+8], ebx
    mov eax, cr3
    mov cr3, eax
al_out:
    ret
"""

YIELD_THEN_PROTECT = """
_start:
    mov eax, SYS_YIELD
    int 0x80
    call ulib_protect
    neg eax
    call ulib_putdec
    xor eax, eax
    call ulib_exit
.include "_ulib.s"
"""


def test_a_frame_aliased_at_protect_time_is_refused():
    source = kernel_text().replace('.include "hook_none.s"', ALIAS)
    m = Machine(build_image([prog("alias", YIELD_THEN_PROTECT, data_pages=3)], kernel_source=source))
    assert m.run(max_ticks=500) == "shutdown"
    assert m.console.text(1) == str(abi.EINVAL) and not m.protection.view()


@pytest.mark.parametrize("where", ["twice in one process", "twice across processes", "outside RAM"])
def test_a_restored_state_may_not_own_a_frame_twice_or_outside_ram(where):
    m = keepers(2)
    m.run(until=lambda m: "round 1," in m.console.text(1) and "round 1," in m.console.text(2))

    def corrupt(doc, ram):
        one, _ = pages_of(doc, 1)
        two, _ = pages_of(doc, 2)
        if where == "twice in one process":
            one[DECOY_VPN][1] = one[SECRET_VPN][1]
        elif where == "twice across processes":
            two[SECRET_VPN][1] = one[SECRET_VPN][1]
        else:
            one[SECRET_VPN][1] = len(ram) >> 12
    st = edited(sealed_state(m), corrupt)
    with pytest.raises(StateError, match="owned twice or outside RAM"):
        Machine.restore(MachineState.from_bytes(st.to_bytes()))


def test_a_restored_state_may_not_share_a_key_between_processes():
    m = keepers(2)
    m.run(until=lambda m: "round 1," in m.console.text(1) and "round 1," in m.console.text(2))

    def share(doc, ram):
        _, p1 = pages_of(doc, 1)
        _, p2 = pages_of(doc, 2)
        p2["key_handle"] = p1["key_handle"]
    with pytest.raises(StateError, match="key"):
        Machine.restore(edited(sealed_state(m), share))


# Known answers for one cloaked page (issue 19, seeded bugs): the nonce and the
# associated data laid out exactly as minivmm/cloak.py documents them, and the
# ciphertext and tag of one page under a fixed key.  A changed domain label, field
# order, width or byte order, or a swapped key/nonce, changes these bytes.
KAT_KEY = bytes(range(32))
KAT_PLAIN = bytes((i * 7 + 3) & 0xFF for i in range(abi.PAGE_SIZE))
KAT_NONCE = bytes.fromhex("04030201" "8877665544332211")          # u32 prefix || u64 counter, LE
KAT_AD = (b"minivmm-page-v1" + bytes.fromhex("0807060504030201")  # label || ident u64
          + bytes.fromhex("01080400") + bytes.fromhex("07000000"))  # vpn u32 || version u32
KAT_CIPHER_SHA256 = "82ffa0b50b0ba622f641a4ada4a37e0de1a349ff6b0fa5c926fe3a6a3511e6f5"
KAT_TAG = "04e1d79321fae81c1e4e0aa68ca793d4"


def test_cloaked_page_known_answer():
    import hashlib

    from cryptography.exceptions import InvalidTag

    from minivmm import cloak

    assert cloak.nonce_for(0x01020304, 0x1122334455667788) == KAT_NONCE
    assert cloak.associated_data(0x0102030405060708, 0x40801, 7) == KAT_AD
    ct, tag = cloak.PageCipher(KAT_KEY).seal(KAT_PLAIN, KAT_NONCE, KAT_AD)
    assert (len(ct), hashlib.sha256(ct).hexdigest(), tag.hex()) == (
        abi.PAGE_SIZE, KAT_CIPHER_SHA256, KAT_TAG)
    assert cloak.PageCipher(KAT_KEY).open(ct, tag, KAT_NONCE, KAT_AD) == KAT_PLAIN
    with pytest.raises(InvalidTag):
        cloak.PageCipher(KAT_KEY).open(ct[:-1] + bytes([ct[-1] ^ 1]), tag, KAT_NONCE, KAT_AD)
    with pytest.raises(InvalidTag):
        cloak.PageCipher(KAT_KEY).open(ct, tag, KAT_NONCE, cloak.associated_data(0x0102030405060708, 0x40801, 6))


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_a_page_key_of_the_wrong_size_is_refused(size):
    from minivmm import cloak

    with pytest.raises(ValueError, match="32 bytes"):
        cloak.PageCipher(bytes(size))
