"""The state document a destination accepts: one strict validator.

A plain-mode source is not authenticated, so its state document (the JSON of
``MachineState.to_doc()``, sent at stop-and-copy) is hostile input even when
its digest matches: the digest proves only that it arrived as sent.  Before
anything else touches it, :func:`parse_state` parses it within bounds
(``migrate/jsonscan.py``: depth, number of containers, strings and values,
all derived from the RAM size and the guest's limits) and
:func:`check_state_doc` checks every field of every section -- machine (CPU),
timer, console, dirty log, VMM bookkeeping and event counters, image
metadata, protection metadata -- for type, range and consistency with the
rest (RAM size, page counts, process tables).  A failure is a
:class:`ProtocolError` naming the field (``state document: timer.period:
...``).  Only then does ``MachineState.from_doc`` and ``Machine.restore``
see it, so neither can die on a ``TypeError`` deep inside the VMM.

The protection section has its own function, :func:`check_protection`, with
one table per object (``PROTECTION_FIELDS``, ``PROCESS_FIELDS``): a field
added to ``ProtectionState`` is one line here.

Limits that come from the guest (DESIGN §3, ``minivmm/abi.py``): at most
``NPROC`` image processes, console channels are one byte, a protected page
is a user page, page versions are u32 (they are bound into the AEAD's
associated data as u32), a process's pages lie in distinct frames inside RAM.
Limits that are this VMM's choice, generous for the toy OS and documented in
docs/migration.md: ``MAX_TABLE`` entries per VMM process table,
``MAX_SYMBOLS`` per symbol table, and at most two protected-page entries per
RAM frame (live ones hold a frame each; exited ones keep theirs).
"""

from __future__ import annotations

import base64
import binascii
import re
import time

from minivmm import abi
from minivmm.cloak import KEY_BYTES, NONCE_BYTES, TAG_BYTES
from minivmm.console import MAX_CONSOLE
from minivmm.cpu import CpuState
from minivmm.image import MAX_META as IMAGE_MAX_META, MAX_RAM as IMAGE_MAX_RAM
from minivmm import prot_fpu, prot_pinned
from minivmm.prot_state import ProtectionState
from minivmm.state import MAX_GENERATION
from minivmm.protection import DETACHED, MAX_EXITED, MAX_PAGES, MAX_PROTECTED
from migrate.errors import ProtocolError
from migrate.jsonscan import Limits, ScanError, loads_bounded

PAGE = abi.PAGE_SIZE
U32, U64 = 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF
COUNTER = 1 << 62                 # vclock, ticks, event and slice counters: far beyond any run
MAX_PERIOD = 1_000_000_000        # timer period in instructions (the CLI's --tick is far below)
MAX_TICK_US = 1_000_000           # fast mode's tick in host microseconds
MAX_TABLE = 4096                  # entries in each of vmm.pids, vmm.names, vmm.exits
MAX_SYMBOLS = 4096                # entries in each symbol table of the image
MAX_TEXT = 4096                   # halt_detail, stopped, description
MAX_NAME = 256
MAX_CHANNELS = 256                # the console channel port takes one byte
HALT_REASONS = ("shutdown", "panic", "crash", "hang", "triple-fault", "vmm-error")
PAGES_PER_FRAME = 2
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,19}")
_HEX = re.compile(r"[0-9a-f]*")

SECTIONS = ("cpu", "timer", "console", "dirty", "vmm", "image", "identity", "protection")


# ----------------------------------------------------------------- parsing
def _b64_len(n: int) -> int:
    return (n + 2) // 3 * 4


def state_limit(ram_size: int) -> int:
    """The most bytes a real state document of a ``ram_size``-byte machine
    can take: image metadata (``minivmm.image.MAX_META``) and the fixed
    sections; the console kept (``MAX_CONSOLE``, base64, once as one
    stream and once split per process); per RAM frame its dirty-log entry
    and up to ``PAGES_PER_FRAME`` protected-page entries; per protected
    process its fixed fields and two saved CPU contexts."""
    npages = ram_size // PAGE
    procs = MAX_PROTECTED + MAX_EXITED
    return (IMAGE_MAX_META + (1 << 20) + 2 * _b64_len(MAX_CONSOLE)
            + npages * (8 + PAGES_PER_FRAME * PAGE_ENTRY_BYTES) + procs * PROCESS_ENTRY_BYTES)


PAGE_ENTRY_BYTES = 128          # [vpn, frame, "plaintext", version, nonce hex, tag hex], at most ~110
PROCESS_ENTRY_BYTES = 8192      # fixed fields and two CPU contexts, at most ~3 KiB


def scan_limits(ram_size: int) -> Limits:
    """What the JSON of a real machine state of ``ram_size`` bytes can hold."""
    npages = ram_size // PAGE
    entries = PAGES_PER_FRAME * npages                  # protected-page entries
    procs = MAX_PROTECTED + MAX_EXITED
    strings = (1024 + (abi.NPROC + 1) * MAX_SYMBOLS + 4 * MAX_TABLE + MAX_CHANNELS
               + procs * 8 + 3 * entries)
    return Limits(max_depth=8,
                  max_containers=256 + 4 * abi.NPROC + 4 * procs + entries,
                  max_values=65536 + 4 * strings + 8 * entries + npages,
                  max_strings=strings)


def parse_state(data, ram_size: int, deadline: float | None = None) -> dict:
    """The state document ``data`` (bytes-like) parsed within bounds and
    checked; raises :class:`ProtocolError` naming what is wrong."""
    try:
        doc = loads_bounded(data, scan_limits(ram_size), deadline)
    except ScanError as exc:
        raise ProtocolError(f"state document: {exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"state document: not JSON ({exc})") from None
    check_state_doc(doc, ram_size)
    if deadline is not None and time.monotonic() > deadline:
        raise ProtocolError("state document: the session deadline passed while it was checked")
    return doc


# ------------------------------------------------------------------ helpers
def _bad(path: str, why: str):
    return ProtocolError(f"state document: {path}: {why}")


def _int(path, v, lo, hi) -> int:
    if type(v) is not int:                  # bool is an int subclass: refused too
        raise _bad(path, f"{type(v).__name__} where an integer belongs")
    if not lo <= v <= hi:
        raise _bad(path, f"{v} outside [{lo}, {hi}]")
    return v


def _u32(path, v):
    return _int(path, v, 0, U32)


def _bool(path, v) -> bool:
    if type(v) is not bool:
        raise _bad(path, f"{type(v).__name__} where true/false belongs")
    return v


def _str(path, v, maxlen, *, none=False) -> str | None:
    if v is None and none:
        return None
    if type(v) is not str:
        raise _bad(path, f"{type(v).__name__} where a string belongs")
    if len(v) > maxlen:
        raise _bad(path, f"string of {len(v)} characters, at most {maxlen}")
    return v


def _b64(path, v, maxbytes) -> int:
    _str(path, v, (maxbytes + 2) // 3 * 4)
    try:
        return len(base64.b64decode(v, validate=True))
    except (binascii.Error, ValueError):
        raise _bad(path, "not base64") from None


def _hex(path, v, lengths) -> int:
    _str(path, v, 2 * max(lengths))
    if not _HEX.fullmatch(v) or len(v) // 2 not in lengths or len(v) % 2:
        raise _bad(path, f"not lowercase hex of {' or '.join(map(str, sorted(lengths)))} bytes")
    return len(v) // 2


def _obj(path, v, keys) -> dict:
    if type(v) is not dict:
        raise _bad(path, f"{type(v).__name__} where an object belongs")
    if set(v) != set(keys):
        missing, unknown = sorted(set(keys) - set(v)), sorted(set(v) - set(keys))
        raise _bad(path, f"fields differ: missing {missing}, unknown {unknown}")
    return v


def _list(path, v, maxlen) -> list:
    if type(v) is not list:
        raise _bad(path, f"{type(v).__name__} where a list belongs")
    if len(v) > maxlen:
        raise _bad(path, f"{len(v)} entries, at most {maxlen}")
    return v


def _table(path, v, maxlen) -> dict:
    if type(v) is not dict:
        raise _bad(path, f"{type(v).__name__} where an object belongs")
    if len(v) > maxlen:
        raise _bad(path, f"{len(v)} entries, at most {maxlen}")
    return v


def _key(path, k, lo, hi) -> int:
    if not _DECIMAL.fullmatch(k):
        raise _bad(path, f"key {k[:32]!r} is not a decimal number")
    return _int(f"{path}[{k}]", int(k), lo, hi)


def _page_aligned(path, v, lo, hi) -> int:
    _int(path, v, lo, hi)
    if v % PAGE:
        raise _bad(path, f"{v:#x} is not page-aligned")
    return v


# ------------------------------------------------------------------ sections
def check_state_doc(doc, ram_size: int, *, running: bool = True) -> None:
    """Check every field of a state document for ``ram_size`` bytes of RAM.
    ``running``: the guest must not have halted (a migrated guest never has)."""
    _obj("(top level)", doc, SECTIONS)
    npages = ram_size // PAGE
    check_cpu("cpu", doc["cpu"], ram_size)
    check_timer("timer", doc["timer"])
    check_console("console", doc["console"])
    check_dirty("dirty", doc["dirty"], npages)
    check_vmm("vmm", doc["vmm"], ram_size, running=running)
    check_image("image", doc["image"], ram_size)
    check_identity("identity", doc["identity"])
    check_protection("protection", doc["protection"], ram_size, doc["vmm"]["pids"])


CPU_FIELDS = tuple(f for f in CpuState.__dataclass_fields__)


def check_cpu(path, cpu, ram_size: int) -> None:
    _obj(path, cpu, CPU_FIELDS)
    for name in CPU_FIELDS:
        _u32(f"{path}.{name}", cpu[name])
    for name in ("gdt_limit", "idt_limit"):
        _int(f"{path}.{name}", cpu[name], 0, 0xFFFF)
    if cpu["cr0"] & (1 << 31) and cpu["cr3"] & ~0xFFF >= ram_size:
        raise _bad(f"{path}.cr3", f"page directory {cpu['cr3']:#x} outside RAM of {ram_size} bytes")
    if cpu["ss"] & 3 not in (0, 3) or cpu["cs"] & 3 != cpu["ss"] & 3:
        raise _bad(f"{path}.ss", f"privilege level cs {cpu['cs'] & 3} / ss {cpu['ss'] & 3} "
                                 f"(the guest runs at ring 0 or 3)")


def check_timer(path, t) -> None:
    _obj(path, t, ("period", "exit_cost", "vclock", "next_tick", "pending", "delivered"))
    period = _int(f"{path}.period", t["period"], 1000, MAX_PERIOD)
    _int(f"{path}.exit_cost", t["exit_cost"], 1, period)
    vclock = _int(f"{path}.vclock", t["vclock"], 0, COUNTER)
    # The timer's invariant: the next tick is due after now, at most one period ahead.
    _int(f"{path}.next_tick", t["next_tick"], vclock + 1, vclock + period)
    _bool(f"{path}.pending", t["pending"])
    _int(f"{path}.delivered", t["delivered"], 0, COUNTER)


def check_console(path, c) -> None:
    _obj(path, c, ("channel", "output", "per_pid"))
    _int(f"{path}.channel", c["channel"], 0, MAX_CHANNELS - 1)
    _b64(f"{path}.output", c["output"], MAX_CONSOLE)
    per_pid = _table(f"{path}.per_pid", c["per_pid"], MAX_CHANNELS)
    for k, v in per_pid.items():
        _key(f"{path}.per_pid", k, 0, MAX_CHANNELS - 1)
        _b64(f"{path}.per_pid[{k}]", v, 1 << 40)        # the document's own bound applies


def check_dirty(path, d, npages: int) -> None:
    _obj(path, d, ("enabled", "dirty_pfns"))
    _bool(f"{path}.enabled", d["enabled"])
    pfns = _list(f"{path}.dirty_pfns", d["dirty_pfns"], npages)
    last = -1
    for i, pfn in enumerate(pfns):
        _int(f"{path}.dirty_pfns[{i}]", pfn, last + 1, npages - 1)   # ascending, inside RAM
        last = pfn


VMM_FIELDS = ("mode", "tick_us", "pids", "names", "exits", "event_seq", "slices", "halted",
              "halt_detail", "shutdown_status")


def check_vmm(path, v, ram_size: int, *, running: bool) -> None:
    _obj(path, v, VMM_FIELDS)
    if v["mode"] not in ("deterministic", "fast"):
        raise _bad(f"{path}.mode", f"{str(v['mode'])[:32]!r} is not 'deterministic' or 'fast'")
    _int(f"{path}.tick_us", v["tick_us"], 1, MAX_TICK_US)
    for k, pid in _table(f"{path}.pids", v["pids"], MAX_TABLE).items():
        cr3 = _key(f"{path}.pids", k, 0, U32)
        if cr3 % PAGE:
            raise _bad(f"{path}.pids[{k}]", "address space not page-aligned")
        _u32(f"{path}.pids[{k}]", pid)
    for k, name in _table(f"{path}.names", v["names"], MAX_TABLE).items():
        _key(f"{path}.names", k, 0, U32)
        _str(f"{path}.names[{k}]", name, MAX_NAME)
    for k, status in _table(f"{path}.exits", v["exits"], MAX_TABLE).items():
        _key(f"{path}.exits", k, 0, U32)
        _u32(f"{path}.exits[{k}]", status)
    _int(f"{path}.event_seq", v["event_seq"], 0, COUNTER)
    _int(f"{path}.slices", v["slices"], 0, COUNTER)
    halted = v["halted"]
    if running and halted is not None:
        raise _bad(f"{path}.halted", f"{str(halted)[:32]!r}: a halted guest is not a guest to resume")
    if halted is not None and halted not in HALT_REASONS:
        raise _bad(f"{path}.halted", f"{str(halted)[:32]!r} is not a halt reason")
    _str(f"{path}.halt_detail", v["halt_detail"], MAX_TEXT)
    if v["shutdown_status"] is not None:
        if running:
            raise _bad(f"{path}.shutdown_status", "set, but the guest has not shut down")
        _u32(f"{path}.shutdown_status", v["shutdown_status"])


def check_identity(path, ident) -> None:
    """The VM's identity and migration generation (``minivmm.state.check_identity``)."""
    _obj(path, ident, ("vm_id", "generation"))
    _str(f"{path}.vm_id", ident["vm_id"], 32)
    if len(ident["vm_id"]) != 32 or not set(ident["vm_id"]) <= set("0123456789abcdef"):
        raise _bad(f"{path}.vm_id", "not 32 lowercase hex digits")
    _int(f"{path}.generation", ident["generation"], 0, MAX_GENERATION - 1)


def _symbols(path, table) -> None:
    for name, value in _table(path, table, MAX_SYMBOLS).items():
        if not 0 < len(name) <= MAX_NAME:
            raise _bad(path, f"symbol name of {len(name)} characters")
        _u32(f"{path}[{name[:32]}]", value)


def check_image(path, img, ram_size: int) -> None:
    _obj(path, img, ("name", "description", "min_ram", "entry", "boot_esp", "kernel_symbols", "processes"))
    _str(f"{path}.name", img["name"], MAX_NAME)
    _str(f"{path}.description", img["description"], MAX_TEXT)
    _int(f"{path}.min_ram", img["min_ram"], 1, min(ram_size, IMAGE_MAX_RAM))
    _int(f"{path}.entry", img["entry"], 0, ram_size - 1)
    _int(f"{path}.boot_esp", img["boot_esp"], 0, ram_size)
    _symbols(f"{path}.kernel_symbols", img["kernel_symbols"])
    procs = _list(f"{path}.processes", img["processes"], abi.NPROC)
    seen = set()
    data_limit = (abi.USER_END - abi.DATA_VADDR) // PAGE - abi.STACK_PAGES
    for i, p in enumerate(procs):
        at = f"{path}.processes[{i}]"
        _obj(at, p, ("pid", "name", "cr3", "entry", "data_pages", "args", "symbols"))
        pid = _int(f"{at}.pid", p["pid"], 1, abi.NPROC)
        if pid in seen:
            raise _bad(f"{at}.pid", f"pid {pid} twice")
        seen.add(pid)
        _str(f"{at}.name", p["name"], MAX_NAME)
        _page_aligned(f"{at}.cr3", p["cr3"], 0, ram_size - PAGE)
        _int(f"{at}.entry", p["entry"], abi.USER_BASE, abi.USER_END - 1)
        _int(f"{at}.data_pages", p["data_pages"], 0, data_limit)
        for j, a in enumerate(_list(f"{at}.args", p["args"], abi.MAX_ARGS)):
            _u32(f"{at}.args[{j}]", a)
        _symbols(f"{at}.symbols", p["symbols"])


# --------------------------------------------------------------- protection
def _cpu_or_none(path, v, ram_size: int, _ctx) -> None:
    if v is not None:
        _obj(path, v, CPU_FIELDS)
        for name in CPU_FIELDS:
            _u32(f"{path}.{name}", v[name])


def _user_page(path, v, _ram_size, _ctx) -> None:
    _page_aligned(path, v, abi.USER_BASE, abi.USER_END - PAGE)
    if v == abi.INFO_VADDR:
        raise _bad(path, "the info page cannot be the shared page")


def _pages(path, v, ram_size: int, ctx) -> None:
    npages = ram_size // PAGE
    entries = _list(path, v, MAX_PAGES)
    seen = set()
    for i, e in enumerate(entries):
        at = f"{path}[{i}]"
        if len(_list(at, e, 6)) != 6:
            raise _bad(at, "a page entry is [vpn, frame, state, version, nonce, tag]")
        vpn, ppn, state, version, nonce, tag = e
        _int(f"{at}.vpn", vpn, abi.USER_BASE // PAGE, abi.USER_END // PAGE - 1)
        if vpn in seen:
            raise _bad(f"{at}.vpn", f"page {vpn << 12:#x} twice")
        seen.add(vpn)
        _int(f"{at}.frame", ppn, DETACHED, npages - 1)
        if state not in ("plaintext", "cloaked"):
            raise _bad(f"{at}.state", f"{str(state)[:32]!r} is not 'plaintext' or 'cloaked'")
        _u32(f"{at}.version", version)          # bound into the AEAD as u32
        n = _hex(f"{at}.nonce", nonce, {0, NONCE_BYTES})
        t = _hex(f"{at}.tag", tag, {0, TAG_BYTES})
        if state == "cloaked" and not (n and t):
            raise _bad(at, "a cloaked page without nonce and tag")
        if state == "plaintext" and ppn == DETACHED:
            raise _bad(f"{at}.frame", "a plaintext page must be in a frame")
        ctx["entries"] += 1
        ctx["frames"].append((ppn, at))


def _pinned(path, v, _ram_size, _ctx) -> None:
    """The descriptors pinned at HC_PROTECT (``minivmm/prot_pinned.py``):
    CR0's translation bits and, per segment register, [selector, the 8
    descriptor bytes in hex or a marker saying why there are none]."""
    if v is None:
        return
    _obj(path, v, ("cr0", "segments"))
    _int(f"{path}.cr0", v["cr0"], 0, prot_pinned.CR0_PINNED)
    if v["cr0"] & ~prot_pinned.CR0_PINNED:
        raise _bad(f"{path}.cr0", f"{v['cr0']:#x} has bits outside {prot_pinned.CR0_PINNED:#x}")
    segs = _obj(f"{path}.segments", v["segments"], [n for n, _ in prot_pinned.SEGMENTS])
    for name, entry in segs.items():
        at = f"{path}.segments.{name}"
        if len(_list(at, entry, 2)) != 2:
            raise _bad(at, "a pinned segment is [selector, descriptor]")
        _int(f"{at}[0]", entry[0], 0, 0xFFFF)
        if entry[1] not in (prot_pinned.NULL, prot_pinned.OUTSIDE, prot_pinned.UNMAPPED):
            _hex(f"{at}[1]", entry[1], {8})


def _fpu(path, v, _ram_size, _ctx) -> None:
    """The x87/SSE registers saved at a kernel entry (``minivmm/prot_fpu.py``):
    [mantissa, exponent] per x87 register, then XMM and status values."""
    if v is None:
        return
    if len(_list(path, v, len(prot_fpu.REGS))) != len(prot_fpu.REGS):
        raise _bad(path, f"{len(prot_fpu.REGS)} registers")
    for name, reg, top, value in zip(prot_fpu.NAMES, prot_fpu.REGS, prot_fpu.TOPS, v):
        at = f"{path}.{name}"
        if reg in prot_fpu.FP:
            if len(_list(at, value, 2)) != 2:
                raise _bad(at, "an x87 register is [mantissa, exponent]")
            _int(f"{at}[0]", value[0], 0, U64)
            _int(f"{at}[1]", value[1], 0, 0xFFFF)
        else:
            _int(at, value, 0, top - 1)           # 128 bits; FPSW 16, MXCSR 32


# One checker per field of a protected process (``_proc_to_dict``); a field
# added to the protection state is one line here.
PROCESS_FIELDS = {
    "pid": lambda p, v, r, c: _u32(p, v),
    "cr3": lambda p, v, r, c: _page_aligned(p, v, 0, r - PAGE),
    "name": lambda p, v, r, c: _str(p, v, MAX_NAME),
    "ident": lambda p, v, r, c: _int(p, v, 0, U64),
    "key_handle": lambda p, v, r, c: _int(p, v, 1, c["next_handle"] - 1),
    "measurement": lambda p, v, r, c: _hex(p, v, {32}),
    "shared_vaddr": _user_page,
    "nonce_counter": lambda p, v, r, c: _int(p, v, 0, U64),
    "in_kernel": lambda p, v, r, c: _bool(p, v),
    "syscall": lambda p, v, r, c: _bool(p, v),
    "saved": _cpu_or_none,
    "shown": _cpu_or_none,
    "stopped": lambda p, v, r, c: _str(p, v, MAX_TEXT, none=True),
    "exited": lambda p, v, r, c: _bool(p, v),
    "pinned": _pinned,
    "fpu": _fpu,
    "pages": _pages,
}

PROTECTION_FIELDS = ("version", "enabled", "next_handle", "keys", "processes")


def check_protection(path, prot, ram_size: int, pids: dict) -> None:
    """The protection section (``ProtectionState.to_dict()``), or null."""
    if prot is None:
        return
    _obj(path, prot, PROTECTION_FIELDS)
    if prot["version"] != ProtectionState.VERSION or type(prot["version"]) is not int:
        raise _bad(f"{path}.version",
                   f"{str(prot['version'])[:16]}, this VMM reads version {ProtectionState.VERSION}")
    _bool(f"{path}.enabled", prot["enabled"])
    next_handle = _int(f"{path}.next_handle", prot["next_handle"], 1, U32)
    keys = _table(f"{path}.keys", prot["keys"], MAX_PROTECTED)
    for k, key in keys.items():
        _key(f"{path}.keys", k, 1, next_handle - 1)
        if _b64(f"{path}.keys[{k}]", key, KEY_BYTES) != KEY_BYTES:
            raise _bad(f"{path}.keys[{k}]", f"a key is {KEY_BYTES} bytes")
    procs = _list(f"{path}.processes", prot["processes"], MAX_PROTECTED + MAX_EXITED)
    ctx = {"next_handle": next_handle, "entries": 0, "frames": []}
    live_pids, live_cr3, live_handles, owned = set(), set(), set(), {}
    npages = ram_size // PAGE
    for i, p in enumerate(procs):
        at = f"{path}.processes[{i}]"
        _obj(at, p, PROCESS_FIELDS)
        ctx["frames"] = []
        for name, check in PROCESS_FIELDS.items():
            check(f"{at}.{name}", p[name], ram_size, ctx)
        if str(p["cr3"]) not in pids:
            raise _bad(f"{at}.cr3", f"address space {p['cr3']:#x} is not in the VMM's process table")
        if p["exited"]:
            if p["in_kernel"] or p["saved"] is not None:
                raise _bad(at, "an exited process with a saved context")
            continue
        if p["in_kernel"] and (p["saved"] is None or p["shown"] is None):
            raise _bad(f"{at}.saved", "in the kernel without a saved and a shown context")
        for what, value, seen in (("pid", p["pid"], live_pids), ("cr3", p["cr3"], live_cr3),
                                  ("key_handle", p["key_handle"], live_handles)):
            if value in seen:
                raise _bad(f"{at}.{what}", f"{value} belongs to another live protected process")
            seen.add(value)
        if str(p["key_handle"]) not in keys:
            raise _bad(f"{at}.key_handle", f"no key {p['key_handle']} for a live process")
        for ppn, where in ctx["frames"]:
            if ppn == DETACHED:
                continue
            if ppn in owned:
                raise _bad(f"{where}.frame", f"frame {ppn} is owned twice (also {owned[ppn]})")
            owned[ppn] = where
    if ctx["entries"] > PAGES_PER_FRAME * npages:
        raise _bad(f"{path}.processes", f"{ctx['entries']} protected pages for {npages} frames")
