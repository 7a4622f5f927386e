"""ProtectionState and the per-process records, as read from a state file or a
migration stream a hostile party wrote: every bound and field check, at its
edge (issue 19: seeded one-line bugs in minivmm/prot_state.py), and the
seeded key source against its documented construction."""

import base64
import hashlib
import hmac

import pytest

from minivmm import abi
from minivmm.prot_state import (CLOAKED, DETACHED, MAX_EXITED, MAX_PAGES, MAX_PROTECTED, PLAINTEXT,
                                ProtectedProcess, ProtectionState, proc_from_dict, proc_to_dict,
                                seeded_keys)

KEY = base64.b64encode(bytes(range(32))).decode()


def doc(keys=1, procs=()):
    return {"version": 3, "enabled": True, "next_handle": keys + 1,
            "keys": {str(h): KEY for h in range(1, keys + 1)}, "processes": list(procs)}


def proc(**changes):
    d = proc_to_dict(ProtectedProcess(pid=1, cr3=0x10000, name="p", ident=7, key_handle=1,
                                      measurement=bytes(32), shared_vaddr=abi.DATA_VADDR, pages={}))
    d.update(changes)
    return d


def test_the_constants_the_checks_rest_on():
    assert MAX_PAGES == (abi.USER_END - abi.USER_BASE) // abi.PAGE_SIZE == 0x40000
    assert MAX_PROTECTED == MAX_EXITED == abi.NPROC and DETACHED < 0        # never a frame number
    assert ProtectionState.VERSION == 3


def test_a_process_record_has_the_defaults_of_a_process_never_run():
    p = proc_from_dict(proc())
    assert (p.nonce_counter, p.in_kernel, p.syscall, p.saved, p.shown, p.stopped, p.exited,
            p.pinned, p.fpu) == (0, False, False, None, None, None, False, None, None)
    d = proc(pages=[[0x40001, 5, PLAINTEXT, 0, "", ""]])
    [meta] = proc_from_dict(d).pages.values()
    assert (meta.vpn, meta.ppn, meta.state, meta.version, meta.nonce, meta.tag) == (0x40001, 5, PLAINTEXT, 0, b"", b"")


def test_the_version_is_checked():
    assert ProtectionState.from_dict(doc()).keys == {1: bytes(range(32))}
    for v in (1, 2, 4, None):       # 2: before the x87 environment was saved (18 registers)
        with pytest.raises(ValueError, match="protection state version"):
            ProtectionState.from_dict(dict(doc(), version=v))


def test_the_key_table_is_bounded_and_every_key_is_32_bytes():
    assert len(ProtectionState.from_dict(doc(keys=MAX_PROTECTED)).keys) == MAX_PROTECTED
    with pytest.raises(ValueError, match="bad key table"):
        ProtectionState.from_dict(doc(keys=MAX_PROTECTED + 1))
    for raw in (bytes(31), bytes(33)):
        with pytest.raises(ValueError, match="bad key table"):
            ProtectionState.from_dict(dict(doc(), keys={"1": base64.b64encode(raw).decode()}))
    for bad in (KEY[:4] + "*" + KEY[4:], KEY[:4] + "\n" + KEY[4:]):   # a character outside the alphabet,
        with pytest.raises(ValueError):                                  # which a lax decoder would skip
            ProtectionState.from_dict(dict(doc(), keys={"1": bad}))


def test_the_process_list_is_bounded():
    most = [proc(pid=i) for i in range(MAX_PROTECTED + MAX_EXITED)]
    assert len(ProtectionState.from_dict(doc(procs=most)).processes) == MAX_PROTECTED + MAX_EXITED
    with pytest.raises(ValueError, match="too many protected processes"):
        ProtectionState.from_dict(doc(procs=most + [proc(pid=99)]))


def test_the_page_list_is_bounded():
    # A list of MAX_PAGES entries is read; one more is refused before any is parsed.
    pages = [[0x40000 + i, i, PLAINTEXT, 0, "", ""] for i in range(0x40000)]     # MAX_PAGES
    assert len(proc_from_dict(proc(pages=pages)).pages) == MAX_PAGES
    with pytest.raises(ValueError, match="too many pages"):
        proc_from_dict(proc(pages=pages + [[0x80000, 0, PLAINTEXT, 0, "", ""]]))


@pytest.mark.parametrize("nonce, tag, ok", [
    (12, 16, True), (11, 16, False), (13, 16, False), (12, 15, False), (12, 17, False), (0, 0, False)])
def test_a_cloaked_page_carries_a_12_byte_nonce_and_a_16_byte_tag(nonce, tag, ok):
    d = proc(pages=[[0x40001, 5, CLOAKED, 1, "00" * nonce, "11" * tag]])
    if ok:
        [meta] = proc_from_dict(d).pages.values()
        assert (meta.state, len(meta.nonce), len(meta.tag)) == (CLOAKED, 12, 16)
    else:
        with pytest.raises(ValueError, match="cloaked page without nonce and tag"):
            proc_from_dict(d)


def test_a_page_is_plaintext_or_cloaked_and_nothing_else():
    assert proc_from_dict(proc(pages=[[0x40001, 5, PLAINTEXT, 3, "", ""]])).pages[0x40001].version == 3
    for state in ("bogus", "Plaintext", ""):
        with pytest.raises(ValueError, match="page state"):
            proc_from_dict(proc(pages=[[0x40001, 5, state, 0, "", ""]]))


def test_pinned_descriptors_are_checked_when_present():
    assert proc_from_dict(proc(pinned=None)).pinned is None
    with pytest.raises(ValueError, match="pinned"):
        proc_from_dict(proc(pinned={"cr0": 1}))


def test_the_seeded_key_source_is_hmac_sha256_in_counter_mode():
    # docs: HMAC-SHA256(seed, "minivmm-keys" || counter u64 LE), counter from 1,
    # one stream across calls, each call taking a fresh block.
    def block(i):
        return hmac.new(b"lab", b"minivmm-keys" + i.to_bytes(8, "little"), hashlib.sha256).digest()
    src = seeded_keys(b"lab")
    assert src(32) == block(1)
    assert src(4) == block(2)[:4]
    assert src(40) == (block(3) + block(4))[:40]
    assert src(0) == b""
    assert seeded_keys(b"lab")(64) == block(1) + block(2)


def test_a_vmms_own_state_passes_the_migration_state_check():
    # What a VMM saves (plaintext and cloaked pages, a live and an exited process)
    # is what a destination's state check (migrate/statecheck.py) accepts: a
    # plaintext page carries no nonce and no tag, a fresh page is at version 0.
    import json
    from guesthelp import IDLE, prog, started
    from migrate.statecheck import check_protection
    m, cr3 = started(prog("a", IDLE, data_pages=3), prog("b", IDLE, data_pages=3))
    for pid in (1, 2):
        assert m.protection.protect(cr3[pid], pid, "ab"[pid - 1], abi.DATA_VADDR, 0) == 0
    m.protection.process_exited(2)
    p1 = m.protection.procs[1]
    some = sorted(p1.pages.values(), key=lambda x: x.vpn)
    m.protection.touch_frame(some[0].ppn, "test")
    assert {x.state for x in some} == {PLAINTEXT, CLOAKED}
    assert all((x.version, x.nonce, x.tag) == (0, b"", b"") for x in some if x.state == PLAINTEXT)
    doc = json.loads(json.dumps(m.protection.save().to_dict()))
    check_protection("protection", doc, m.ram.size, {str(k): v for k, v in m.pids.items()})


def test_a_protection_state_is_immutable_once_made():
    import dataclasses
    st = ProtectionState.from_dict(doc())
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.enabled = False
