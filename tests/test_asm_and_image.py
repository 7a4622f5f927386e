"""The guest toolchain: keystone shims, error reporting, image format, disassembly."""

import re
import struct

import pytest
from capstone import CS_ARCH_X86, CS_MODE_32, Cs

from guests.asm import AsmError, assemble
from guests.build import PROGRAMS_DIR, BuildError, Program, build_image, expand_includes
from guests.catalog import GUESTS
from minivmm import abi
from minivmm.errors import ImageError
from minivmm.image import HEADER, GuestImage

CS = Cs(CS_ARCH_X86, CS_MODE_32)


def insns(code, base):
    return list(CS.disasm(code, base))


def test_decimal_numbers_stay_decimal_whatever_keystone_did_before():
    # keystone switches to radix 16 once any option is set, and a new
    # instance can inherit that; the wrapper rewrites decimals to hex.
    from keystone import KS_ARCH_X86, KS_MODE_32, Ks
    for _ in range(20):
        ks = Ks(KS_ARCH_X86, KS_MODE_32)
        ks.sym_resolver = lambda name, value: False
        del ks
        a = assemble('mov ecx, 4096\n.long 100\nmov ebx, 42\ns: .asciz "n 12"', 0x1000)
        assert a.code == (bytes.fromhex("b900100000") + struct.pack("<I", 100)
                          + bytes.fromhex("bb2a000000") + b"n 12\0")


def test_shims_emit_the_32_bit_forms():
    a = assemble("start: push start\npush SEL_KCODE\nlgdt [tbl]\nlidt [tbl]\niret\nrep movsd\ntbl: .long 0", 0x2000)
    got = [(i.mnemonic, i.op_str, bytes(i.bytes)) for i in insns(a.code, 0x2000)]
    assert got[0][:2] == ("push", "0x2000") and got[0][2][0] == 0x68
    assert got[1][:2] == ("push", "8") and got[1][2][0] == 0x68
    assert got[2][0] == "lgdt" and got[2][2][:1] != b"\x66"
    assert got[3][0] == "lidt" and got[3][2][:1] != b"\x66"
    assert got[4][0] == "iretd"
    assert got[5][2] == b"\xf3\xa5"
    assert a.symbols == {"start": 0x2000, "tbl": 0x2000 + len(a.code) - 4}


@pytest.mark.parametrize("src,line,why", [
    ("nop\nnop\nbogus eax\n", 3, "Invalid mnemonic"),
    ("nop\nmov eax, nowhere\n", 2, "undefined symbol 'nowhere'"),
    ("a: nop\na: nop\n", 2, "defined twice"),
    ("nop\nmov eax, [esi+PROC_FRAME+FRAME_EAX]\n", 2, "keeps only the last"),
])
def test_assembler_errors_name_file_and_line(src, line, why):
    with pytest.raises(AsmError) as err:
        assemble(src, 0, "prog.s")
    assert err.value.filename == "prog.s" and err.value.line == line
    assert why in str(err.value) and f"prog.s:{line}" in str(err.value)


def test_build_reports_assembler_errors_of_programs():
    with pytest.raises(AsmError, match="<bad>:2"):
        build_image([Program("bad", "nop\nfrobnicate\n", filename="<bad>")])


def test_build_limits():
    with pytest.raises(BuildError, match="1 to 16"):
        build_image([Program.builtin("hello")] * 17)
    with pytest.raises(BuildError, match="must be 1..15"):
        build_image([Program("a-very-long-program-name", "nop")])
    with pytest.raises(BuildError, match="more than 16 MiB"):
        build_image([Program.builtin("dirtier", data_pages=5000)])
    with pytest.raises(BuildError, match="no built-in program"):
        Program.builtin("nope")


def test_built_kernel_disassembles_to_what_the_source_says():
    image = GUESTS["hello"].build()
    syms = image.kernel_symbols
    code = b"".join(d for p, d in image.segments if p == abi.KERNEL_BASE)
    text = code[:syms["idt_init"] - abi.KERNEL_BASE]         # code ends where data starts
    listing = insns(text, abi.KERNEL_BASE)
    assert sum(i.size for i in listing) == len(text)          # decodes without gaps
    assert listing[0].mnemonic == "lgdt" and listing[0].bytes[0] != 0x66
    by_addr = {i.address: i for i in listing}
    assert by_addr[syms["alltraps"]].mnemonic == "pushal"
    # No 16-bit push (0x66 0x68/0x6a) and no 16-bit iret anywhere in the kernel.
    for i in listing:
        assert not (i.mnemonic == "push" and i.bytes[0] == 0x66), hex(i.address)
        assert i.mnemonic != "iret", hex(i.address)
    assert by_addr[syms["resume"]].mnemonic == "mov"


def _data_labels(source: str) -> set[str]:
    """Labels the source puts data at (``msg: .ascii ...``, or a directive next)."""
    out, pending = set(), []
    for raw in source.splitlines():
        line = raw.split(";")[0].strip()
        if not line:
            continue
        while (m := re.match(r"([A-Za-z_.$][\w.$]*):\s*", line)):
            pending.append(m.group(1))
            line = line[m.end():]
        if line:
            if line.startswith(".") and not line.startswith((".include", ".equ", ".set")):
                out.update(pending)
            pending = []
    return out


def _reachable(code: bytes, base: int, starts, data: set[int]):
    """Recursive-descent disassembly: every instruction reachable from
    ``starts`` by falling through, jumping and calling (capstone); a path
    that runs into data (after an exit that never returns) ends there."""
    seen, todo = {}, list(starts)
    while todo:
        addr = todo.pop()
        while base <= addr < base + len(code) and addr not in seen and addr not in data:
            insn = next(CS.disasm(code[addr - base:addr - base + 16], addr), None)
            assert insn is not None, f"undecodable bytes at {addr:#x}"
            seen[addr] = insn
            if (insn.mnemonic == "call" or insn.mnemonic.startswith("j")) and insn.op_str.startswith("0x"):
                todo.append(int(insn.op_str, 16))
            if insn.mnemonic in ("ret", "jmp", "ud2", "hlt", "iretd"):
                break
            addr += insn.size
    return seen


@pytest.mark.parametrize("guest", ["demo", "secret", "crashers"])
def test_built_programs_disassemble_to_what_their_sources_say(guest):
    """Disassemble each program as the built image lays it out in guest
    memory (through its own page tables): the code at ``_start`` is the
    source's first instruction, every direct call lands on a label of the
    program, every jump stays inside it, and system calls are there.  A
    program assembled for the wrong load address (DESIGN §8: keystone needs
    it for absolute references) fails the label checks."""
    from minivmm.machine import Machine
    image = GUESTS[guest].build()
    m = Machine(image)
    all_calls = []
    for proc, prog in zip(image.processes, GUESTS[guest].programs(), strict=True):
        syms = proc.symbols
        assert proc.entry == abi.IMAGE_VADDR == syms["_start"]
        length = max(syms.values()) - abi.IMAGE_VADDR + 16
        code = m.read_virtual(proc.cr3, abi.IMAGE_VADDR, length)
        data = {syms[name] for name in _data_labels(expand_includes(prog.source, PROGRAMS_DIR))}
        listing = _reachable(code, abi.IMAGE_VADDR, [syms["_start"]], data)
        labels = {addr: name for name, addr in syms.items()}

        first = prog.source.split("_start:", 1)[1].split("\n")
        first = next(line.split(";")[0].split() for line in first if line.split(";")[0].strip())
        assert listing[syms["_start"]].mnemonic == first[0], (proc.name, first)

        calls = [i for i in listing.values() if i.mnemonic == "call"]
        all_calls += calls
        for i in calls:
            target = int(i.op_str, 16)
            assert target in labels, f"{proc.name}: call at {i.address:#x} to {target:#x}, not a label"
        for i in listing.values():
            if i.mnemonic.startswith("j") and i.op_str.startswith("0x"):
                assert abi.IMAGE_VADDR <= int(i.op_str, 16) < abi.IMAGE_VADDR + length, hex(i.address)
        assert any(i.mnemonic == "int" and i.op_str == "0x80" for i in listing.values()), proc.name
        assert not calls or any(labels[int(i.op_str, 16)].startswith("ulib_") for i in calls), proc.name
        assert len(listing) >= 6 and not set(listing) & data, proc.name
    assert len(all_calls) > 10


def test_image_round_trip():
    image = GUESTS["demo"].build()
    again = GuestImage.from_bytes(image.to_bytes())
    assert again.segments == image.segments
    assert again.kernel_symbols == image.kernel_symbols
    assert [p.name for p in again.processes] == [p.name for p in image.processes]
    assert again.processes[0].symbols == image.processes[0].symbols
    assert (again.entry, again.boot_esp, again.min_ram) == (image.entry, image.boot_esp, image.min_ram)


def test_malformed_images_get_clear_errors():
    blob = GUESTS["hello"].build().to_bytes()
    with pytest.raises(ImageError, match="truncated"):
        GuestImage.from_bytes(blob[:10])
    with pytest.raises(ImageError, match="bad magic"):
        GuestImage.from_bytes(b"X" * 8 + blob[8:])
    with pytest.raises(ImageError, match="version 9"):
        GuestImage.from_bytes(blob[:8] + struct.pack("<H", 9) + blob[10:])
    with pytest.raises(ImageError, match="checksum"):
        GuestImage.from_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(ImageError, match="checksum"):
        GuestImage.from_bytes(blob[:-100])
    # A well-formed file whose segment lies outside its RAM is still refused.
    bad = GuestImage("x", 0x100000, 0x1000, 0x200000, [(0x1FF000, b"\x90" * 0x2000)])
    with pytest.raises(ImageError, match="outside"):
        bad.validate()
    assert HEADER.size == 64


@pytest.mark.parametrize("line", ["mov [eax], 1", "add [ebx+4], 0x10", "inc [ecx]", "mov [eax], ticks"])
def test_a_sizeless_memory_operand_error_hints_at_ptr(line):
    from guests.asm import AsmError, assemble
    with pytest.raises(AsmError, match=r"write 'dword ptr \[\.\.\.\]'") as info:
        assemble("nop\n" + line, 0x1000, externs={"ticks": 5})
    assert info.value.line == 2


def test_other_operand_errors_get_no_ptr_hint():
    from guests.asm import AsmError, assemble
    with pytest.raises(AsmError) as info:
        assemble("mov eax, [ebx], 3", 0x1000)
    assert "ptr" not in str(info.value)
