"""The guest's registers as GDB's i386 target sees them.

GDB numbers registers in the order of the target description we serve
(``qXfer:features:read:target.xml``).  The feature ``org.gnu.gdb.i386.core``
is GDB's own (its ``32bit-core.xml``): the eight general registers, eip,
eflags, the six segment selectors, and the x87 registers, which GDB requires
in that feature.  minivmm does not model the FPU as debuggable state (the toy
OS never uses it), so the x87 registers are sent as *unavailable* (``xx``
bytes, which GDB prints as ``<unavailable>``) and cannot be written.

GDB's i386 features have no control registers.  A target description may
carry extra features that GDB does not know; GDB then shows their registers
by name (``info registers cr3``, ``p/x $cr3``) without interpreting them.  So
CR0, CR2, CR3 and CR4 are served read-only in the feature
``org.minivmm.i386.sys``: changing paging or CR3 under the VMM's MMU and
process protection from a debugger is refused, not half done.
"""

from __future__ import annotations

import struct

GENERAL = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi", "eip", "eflags")
SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
X87_80 = tuple(f"st{i}" for i in range(8))
X87_32 = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
CONTROL = ("cr0", "cr2", "cr3", "cr4")

# (name, size in bytes, writable)
REGISTERS: tuple[tuple[str, int, bool], ...] = (
    tuple((n, 4, True) for n in GENERAL + SEGMENTS)
    + tuple((n, 10, False) for n in X87_80)
    + tuple((n, 4, False) for n in X87_32)
    + tuple((n, 4, False) for n in CONTROL))
NUMBER = {name: i for i, (name, _, _) in enumerate(REGISTERS)}
CPU_FIELDS = set(GENERAL + SEGMENTS + CONTROL)      # the ones CpuState holds

_TYPES = {"esp": "data_ptr", "ebp": "data_ptr", "eip": "code_ptr", "eflags": "i386_eflags"}

EFLAGS_FLAGS = (("CF", 0), ("", 1), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8),
                ("IF", 9), ("DF", 10), ("OF", 11), ("NT", 14), ("RF", 16), ("VM", 17),
                ("AC", 18), ("VIF", 19), ("VIP", 20), ("ID", 21))


def target_xml() -> str:
    flags = "".join(f'<field name="{n}" start="{b}" end="{b}"/>' for n, b in EFLAGS_FLAGS)
    core = "".join(f'<reg name="{n}" bitsize="32" type="{_TYPES.get(n, "int32")}"/>'
                   for n in GENERAL + SEGMENTS)
    core += "".join(f'<reg name="{n}" bitsize="80" type="i387_ext" group="float"/>' for n in X87_80)
    core += "".join(f'<reg name="{n}" bitsize="32" type="int" group="float"/>' for n in X87_32)
    sys = "".join(f'<reg name="{n}" bitsize="32" type="int32" group="system"/>' for n in CONTROL)
    return ('<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd">'
            '<target version="1.0"><architecture>i386</architecture>'
            '<feature name="org.gnu.gdb.i386.core">'
            f'<flags id="i386_eflags" size="4">{flags}</flags>{core}</feature>'
            f'<feature name="org.minivmm.i386.sys">{sys}</feature></target>')


def encode_one(cpu, number: int) -> str:
    """Register ``number`` of ``cpu`` (a CpuState) as GDB's little-endian hex."""
    name, size, _ = REGISTERS[number]
    if name in CPU_FIELDS:
        return struct.pack("<I", getattr(cpu, name) & 0xFFFFFFFF).hex()
    return "xx" * size


def encode_all(cpu) -> str:
    return "".join(encode_one(cpu, i) for i in range(len(REGISTERS)))


def decode_all(hexdata: str) -> dict[str, int]:
    """A ``G`` packet's payload → {name: value} of the writable registers in
    it (the general and segment registers; GDB may send the whole layout or a
    prefix).  The x87 and control register fields are ignored: read-only."""
    out: dict[str, int] = {}
    pos = 0
    for name, size, writable in REGISTERS:
        field = hexdata[pos:pos + 2 * size]
        if len(field) < 2 * size:
            break
        pos += 2 * size
        if writable and "x" not in field:
            out[name] = int.from_bytes(bytes.fromhex(field), "little")
    if pos != len(hexdata):
        raise ValueError("G packet length does not match the register layout")
    return out
