"""A thin, honest wrapper around keystone for 32-bit x86 guest code.

It adds what keystone 0.9.2 lacks and works around what it gets wrong
(verified by experiment, see DESIGN §8):

* comments (``;``/``#`` to end of line) are stripped here: keystone treats
  ``;`` as a statement separator;
* ``iret`` assembles as the 16-bit form: it is rewritten to ``iretd``;
* ``push imm``/``push label``/``push CONST`` can come out as a 16-bit push
  (0x66 prefix): every push of a non-register, non-memory operand is emitted
  as the 32-bit opcode ``68 imm32`` by hand;
* ``lgdt [x]``/``lidt [x]`` get a 0x66 prefix (24-bit base): emitted by hand
  as ``0f 01 /2`` and ``0f 01 /3`` with a disp32 operand;
* ``movsd`` is taken for the SSE2 instruction: the string move
  ``[rep] movsd`` is emitted by hand as ``[f3] a5``;
* a memory operand with two symbols (``[esi+A+B]``) silently loses all
  but the last one: it is rejected with an error that says so;
* keystone's number radix is not reliable: setting any option (a symbol
  resolver included) switches it to 16, and a fresh instance can inherit
  that from a freed one (seen as ``mov ebx, 42`` loading 0x42 only when
  other assemblies ran first).  So every decimal literal outside a string
  is rewritten to hex here, and the result no longer depends on the radix;
* keystone has no symbol table: an export table of ``.long label`` entries is
  appended and read back to build the symbol map;
* errors are reported with the file name and line number of the culprit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from keystone import KS_ARCH_X86, KS_MODE_32, Ks, KsError

from minivmm.abi import asm_prelude

_LABEL = re.compile(r"^\s*([A-Za-z_][\w.$]*)\s*:")
_REGS = {r for base in ("a", "b", "c", "d") for r in (f"e{base}x", f"{base}x")} | {
    "esi", "edi", "ebp", "esp", "si", "di", "bp", "sp",
    "cs", "ds", "es", "fs", "gs", "ss"}
_PUSH = re.compile(r"^(\s*(?:[A-Za-z_][\w.$]*\s*:\s*)?)push\s+(.+?)\s*$", re.I)
_DESC = re.compile(r"^(\s*(?:[A-Za-z_][\w.$]*\s*:\s*)?)(lgdt|lidt)\s+(?:dword\s+ptr\s+)?\[([^\]]+)\]\s*$", re.I)
_MEMOPND = re.compile(r"\[([^\]]*)\]")
_IDENT = re.compile(r"(?<![\w.$])[A-Za-z_][\w.$]*")
_IRET = re.compile(r"\biret\b", re.I)
_MOVSD = re.compile(r"^(\s*(?:[A-Za-z_][\w.$]*\s*:\s*)?)(rep\s+)?movsd\s*$", re.I)


class AsmError(Exception):
    """An assembly source could not be assembled; says file, line and why."""

    def __init__(self, filename: str, line: int | None, text: str, reason: str):
        self.filename, self.line, self.text, self.reason = filename, line, text, reason
        where = f"{filename}:{line}" if line else filename
        super().__init__(f"{where}: {reason}" + (f"\n    {text.strip()}" if text else ""))


@dataclass
class Assembled:
    """Machine code for one section, loaded at ``base``."""

    base: int
    code: bytes
    symbols: dict[str, int] = field(default_factory=dict)


def _strip_comment(line: str) -> str:
    out, quote = [], False
    for ch in line:
        if ch == '"':
            quote = not quote
        if not quote and ch in ";#":
            break
        out.append(ch)
    return "".join(out).rstrip()


_DECIMAL = re.compile(r"(?<![\w.$])(\d+)(?![\w.$])")


def _hexify(line: str) -> str:
    """Decimal literals outside string literals become 0x... (see module doc)."""
    parts = line.split('"')
    for i in range(0, len(parts), 2):          # even parts are outside quotes
        parts[i] = _DECIMAL.sub(lambda m: hex(int(m.group(1))), parts[i])
    return '"'.join(parts)


def _rewrite(line: str) -> str:
    """Apply the keystone shims to one comment-free line."""
    line = _hexify(line)
    line = _IRET.sub("iretd", line) if not re.search(r"\biretd\b", line, re.I) else line
    m = _MOVSD.match(line)
    if m:
        return f"{m.group(1)}.byte " + ("0xf3, 0xa5" if m.group(2) else "0xa5")
    m = _PUSH.match(line)
    if m:
        prefix, operand = m.groups()
        op = operand.strip().lower()
        if op not in _REGS and "[" not in op and "ptr" not in op:
            return f"{prefix}.byte 0x68\n.long {operand.strip()}"
    m = _DESC.match(line)
    if m:
        prefix, insn, operand = m.groups()
        modrm = 0x15 if insn.lower() == "lgdt" else 0x1D
        return f"{prefix}.byte 0x0f, 0x01, {modrm:#x}\n.long {operand.strip()}"
    return line


def assemble(source: str, base: int, filename: str = "<source>",
             externs: dict[str, int] | None = None) -> Assembled:
    """Assemble ``source`` for address ``base``.

    ``externs`` resolves symbols defined elsewhere (other sections, the
    builder's own symbols).  Returns the code and every label's address.
    """
    externs = dict(externs or {})
    lines = source.splitlines()
    body: list[str] = []
    labels: list[str] = []
    for text in lines:
        clean = _strip_comment(text)
        m = _LABEL.match(clean)
        if m and not m.group(1).startswith("."):
            labels.append(m.group(1))
        body.append(_rewrite(clean))
    for i, text in enumerate(lines, 1):
        for operand in _MEMOPND.findall(_strip_comment(text)):
            names = [t for t in _IDENT.findall(operand) if t.lower() not in _REGS and t.lower() not in ("ptr",)]
            if len(names) > 1:
                raise AsmError(filename, i, text, f"memory operand [{operand}] has {len(names)} symbols; "
                               "keystone keeps only the last: use one precomputed .equ constant")
    dup = {name for name in labels if labels.count(name) > 1}
    if dup:
        name = sorted(dup)[0]
        lineno = [i for i, t in enumerate(lines, 1)
                  if (mm := _LABEL.match(_strip_comment(t))) and mm.group(1) == name][1]
        raise AsmError(filename, lineno, lines[lineno - 1], f"label {name!r} defined twice")
    clash = sorted(set(labels) & set(externs))
    if clash:
        raise AsmError(filename, None, "", f"label {clash[0]!r} clashes with a builder symbol")

    # Builder symbols become .equ lines, not a keystone symbol resolver:
    # setting *any* keystone option (the resolver included) silently switches
    # its number parser to radix 16, so "mov ecx, 4096" would mean 0x4096.
    prelude = asm_prelude() + "".join(f"\n.equ {k}, {v & 0xFFFFFFFF:#x}" for k, v in externs.items())
    export = "\n".join(f".long {name}" for name in labels)
    program = prelude + "\n" + "\n".join(body) + "\n" + export + "\n"

    ks = Ks(KS_ARCH_X86, KS_MODE_32)
    try:
        encoding, _ = ks.asm(program, base)
    except KsError as exc:
        raise _locate(filename, lines, body, prelude, program, base, exc) from None
    code = bytes(encoding or b"")
    n = len(labels)
    if len(code) < 4 * n:
        raise AsmError(filename, None, "", "assembler produced less code than its export table")
    table = code[len(code) - 4 * n:] if n else b""
    code = code[:len(code) - 4 * n] if n else code
    symbols = {name: int.from_bytes(table[4 * i:4 * i + 4], "little") for i, name in enumerate(labels)}
    return Assembled(base, code, symbols)


def _locate(filename, lines, body, prelude, program, base, exc) -> AsmError:
    """Find the source line keystone choked on (it reports no line)."""
    missing: list[str] = []

    def record(name: bytes, value) -> bool:
        missing.append(name.decode())
        return False

    # A second assembler with a resolver names the missing symbol (its radix
    # is wrong, see above, but it is only asked for names here).
    namer = Ks(KS_ARCH_X86, KS_MODE_32)
    namer.sym_resolver = record
    try:
        namer.asm(program, base)
    except KsError:
        pass
    if missing:
        name = missing[0]
        pat = re.compile(rf"(?<![\w.$]){re.escape(name)}(?![\w.$])")
        for i, text in enumerate(lines, 1):
            if pat.search(_strip_comment(text)):
                return AsmError(filename, i, text, f"undefined symbol {name!r}")
        return AsmError(filename, None, "", f"undefined symbol {name!r}")
    # Assemble each line alone, with every symbol resolving to 0, to find
    # the first line that is wrong on its own.
    probe = Ks(KS_ARCH_X86, KS_MODE_32)

    def anything(name, value):
        value[0] = 0
        return True

    probe.sym_resolver = anything
    for i, stmt in enumerate(body, 1):
        if not stmt.strip() or _LABEL.fullmatch(stmt.strip()):
            continue
        try:
            probe.asm(prelude + "\n" + stmt, 0)
        except KsError as err:
            return AsmError(filename, i, lines[i - 1], str(err) + _hint(stmt))
    return AsmError(filename, None, "", str(exc))


_SIZELESS = re.compile(r"^\s*\w+\s+\[[^\]]*\]\s*(?:,\s*([^,\[\]]+?))?\s*$", re.I)


def _hint(stmt: str) -> str:
    """What keystone's bare 'Invalid operand' most often means in Intel syntax:
    ``mov [eax], 1`` names no register, so nothing says how wide the store is."""
    m = _SIZELESS.match(stmt)
    if m and "ptr" not in stmt.lower() and (m.group(1) or "").strip().lower() not in _REGS:
        return ("; a memory operand without a register operand has no size: write "
                "'dword ptr [...]' (or 'word ptr', 'byte ptr')")
    return ""
