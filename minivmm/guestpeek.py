"""Reading guest memory *without* touching it: for observers (traces, crash
reports) that must not change what the guest computes.

The VMM's ordinary reads (``Machine.read_guest``) are "anyone else" to
process protection and cloak a protected page first, which changes the
owner's next access (a decrypt, maybe a dropped translation, an early end
of a slice: virtual time moves).  An observer instead skips protected
frames: it reports them as protected and never reads them.
"""

from __future__ import annotations

from capstone import CS_ARCH_X86, CS_MODE_32, Cs

from minivmm.mmu import CR0_PG, WalkFault, walk

PROTECTED = "protected"
_CS = Cs(CS_ARCH_X86, CS_MODE_32)


def peek(machine, cr0: int, cr3: int, vaddr: int, length: int) -> bytes | str | None:
    """Bytes at ``vaddr`` as the CPU at CPL0 sees them, ``PROTECTED`` if any
    of them lies in a protected frame, or None if a page is not mapped."""
    out = bytearray()
    while length > 0:
        vaddr &= 0xFFFFFFFF
        chunk = min(length, 0x1000 - (vaddr & 0xFFF))
        if cr0 & CR0_PG:
            try:
                page, _ = walk(machine.ram, cr3, vaddr, write=False, user=False)
            except WalkFault:
                return None
        else:
            page = vaddr & 0xFFFFF000
            if page + 0x1000 > machine.ram.size:
                return None
        if machine.is_protected_frame(page >> 12):
            return PROTECTED
        out += machine.ram.read(page | (vaddr & 0xFFF), chunk)
        vaddr, length = vaddr + chunk, length - chunk
    return bytes(out)


def disasm_one(code: bytes, address: int) -> str:
    for insn in _CS.disasm(code, address, 1):
        return f"{insn.mnemonic} {insn.op_str}".strip()
    return "(bad)"


def disasm_around(machine, cpu, eip: int, before: int = 3, after: int = 4) -> list[str]:
    """Lines of disassembly around ``eip`` (marked ``=>``).  x86 code cannot
    be decoded backwards for sure: the lines before are the decoding, from
    up to 24 bytes back, that lands exactly on ``eip`` with the most
    instructions (the usual debugger heuristic)."""
    lines: list[str] = []
    best: list = []
    for back in range(24, 0, -1):
        code = peek(machine, cpu.cr0, cpu.cr3, eip - back, back)
        if not isinstance(code, bytes):
            continue
        insns = list(_CS.disasm(code, eip - back))
        if insns and insns[-1].address + insns[-1].size == eip and len(insns) > len(best):
            if sum(i.size for i in insns) == back:
                best = insns
    for insn in best[-before:]:
        lines.append(f"   {insn.address:#010x}: {insn.bytes.hex():<16} {insn.mnemonic} {insn.op_str}".rstrip())
    code = peek(machine, cpu.cr0, cpu.cr3, eip, 16 * after)
    if code == PROTECTED:
        return lines + [f"=> {eip:#010x}: (a protected page: not read, the report must not change it)"]
    if code is None:
        # the tail may run into an unmapped page: try what is there
        code = b""
        for n in range(16 * after, 0, -1):
            got = peek(machine, cpu.cr0, cpu.cr3, eip, n)
            if isinstance(got, bytes):
                code = got
                break
    if not code:
        return lines + [f"=> {eip:#010x}: (not mapped)"]
    for k, insn in enumerate(_CS.disasm(code, eip)):
        if k >= after:
            break
        mark = "=> " if k == 0 else "   "
        lines.append(f"{mark}{insn.address:#010x}: {insn.bytes.hex():<16} {insn.mnemonic} {insn.op_str}".rstrip())
    if len(lines) == len(best[-before:]):
        lines.append(f"=> {eip:#010x}: {code[:8].hex()} (cannot decode)")
    return lines
