"""The guest toolchain: keystone shims, error reporting, image format, disassembly."""

import struct

import pytest
from capstone import CS_ARCH_X86, CS_MODE_32, Cs

from guests.asm import AsmError, assemble
from guests.build import BuildError, Program, build_image
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


def test_built_programs_disassemble():
    image = GUESTS["demo"].build()
    for proc in image.processes:
        assert proc.entry == abi.IMAGE_VADDR
        assert "_start" in proc.symbols


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
