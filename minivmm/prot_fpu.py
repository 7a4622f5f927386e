"""The x87/MMX/SSE registers of a protected process, at kernel entries.

A process can keep a secret in ST0-ST7 (MMX MM0-MM7 share them), XMM0-XMM7,
or in the x87 status word (the condition codes of a compare) and MXCSR's
flags; and the x87 environment (``fnstenv``) holds the addresses of the last
x87 instruction and of its memory operand, which an indexed load makes the
index.  The toy kernel switches none of them, so at a kernel entry they are
the kernel's to read.  So the VMM saves them with the general registers,
shows the kernel their reset values, and loads them back at the return.

Reading 24 registers one by one through the binding costs about as much as
the rest of a system call.  Most processes never touch them, so the VMM
first looks at a fingerprint: the bytes of the engine's context that hold
them (found once, by experiment, per engine build -- unicorn is pinned),
compared with their reset values.  Unchanged means nothing to hide.  If the
experiment cannot find every register's bytes, the fingerprint is not used
and every entry takes the slow path.  (The tag word is not saved: the
binding reads it only through a deprecated path.)
"""

from __future__ import annotations

import ctypes

from unicorn import UC_ARCH_X86, UC_MODE_32, Uc
from unicorn import x86_const as X

FP = tuple(getattr(X, f"UC_X86_REG_FP{i}") for i in range(8))
XMM = tuple(getattr(X, f"UC_X86_REG_XMM{i}") for i in range(8))
# After the status words, the x87 control word and the last x87 instruction's
# environment: its address (FIP, FCS), its memory operand's address (FDP,
# FDS) and its opcode (FOP).  FDP of `fild [table+4*secret]` is the secret.
ENV = (X.UC_X86_REG_FPCW, X.UC_X86_REG_FIP, X.UC_X86_REG_FCS, X.UC_X86_REG_FDP, X.UC_X86_REG_FDS,
       X.UC_X86_REG_FOP)
REGS = FP + XMM + (X.UC_X86_REG_FPSW, X.UC_X86_REG_MXCSR) + ENV
NAMES = (tuple(f"st{i}" for i in range(8)) + tuple(f"xmm{i}" for i in range(8)) + ("fpsw", "mxcsr")
         + ("fpcw", "fip", "fcs", "fdp", "fds", "fop"))


def _raw(ctx) -> bytes:
    return ctypes.string_at(ctx.context.value, ctx.size)


def _probe():
    """(reset values, fingerprint byte offsets or None)."""
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    fresh = uc.context_save()
    base = _raw(fresh)
    # A saved context starts with unicorn's own header: the size of the CPU
    # state after it (its first 8 bytes), then a heap pointer and padding that
    # differ from one save to the next.  Only the CPU state holds registers; a
    # header byte that happened to differ once would make the fingerprint of
    # an untouched engine differ too (the slow path for nothing).
    start = max(0, len(base) - int.from_bytes(base[:8], "little"))
    defaults = tuple(uc.reg_read_batch(list(REGS)))
    # Writing the reset values back changes a byte that is no register's own:
    # state derived from one (the x87 precision the control word selects,
    # which a fresh engine leaves unset).  A scrubbed engine must fingerprint
    # as a fresh one, so such bytes are left out.
    uc.reg_write_batch(list(zip(REGS, defaults)))
    reset = _raw(uc.context_save())
    derived = {i for i in range(start, len(base)) if base[i] != reset[i]}
    seen: dict[int, int] = {}
    per_reg = []
    for reg in REGS:
        uc.context_restore(fresh)
        # Each value differs from the reset value (zero) in every byte of the
        # register, so every byte that holds it changes.
        if reg in FP:
            uc.reg_write(reg, (0x8123456789ABCDEF, 0x7ABC))
        elif reg in XMM:
            uc.reg_write(reg, (1 << 128) - 1 - 0x5A5A)
        else:
            uc.reg_write(reg, 0x1A3D1A3D)          # 32 bits at most; the 16-bit ones take the low 16
        now = _raw(uc.context_save())
        diff = {i for i in range(start, len(base)) if base[i] != now[i]} - derived
        per_reg.append(diff)
        for i in diff:
            seen[i] = seen.get(i, 0) + 1
    offsets = sorted({i for d in per_reg for i in d if seen[i] == 1})
    own = [{i for i in d if seen[i] == 1} for d in per_reg]
    wide = [10] * 8 + [16] * 8 + [2, 4] + [2, 4, 2, 4, 2, 2]    # bytes each must own at least: its width
    if any(len(o) < w for o, w in zip(own, wide)):
        return defaults, None
    return defaults, offsets


def _spans(offsets):
    """Contiguous [start, end) runs of the offsets (fewer, faster compares)."""
    out = []
    for i in offsets:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return [tuple(s) for s in out]


DEFAULTS, _OFFSETS = _probe()
_SPANS = _spans(_OFFSETS) if _OFFSETS is not None else None
_DEFAULT_PRINT = None


def _fingerprint(uc):
    ctx = getattr(uc, "_minivmm_fpu_ctx", None)    # one context per engine, reused
    if ctx is None:
        ctx = uc._minivmm_fpu_ctx = uc.context_save()
    else:
        uc.context_update(ctx)
    raw = ctypes.string_at(ctx.context.value, ctx.size)
    return b"".join(raw[a:b] for a, b in _SPANS)


def in_use(uc) -> bool:
    """Whether any of them may differ from its reset value (a cheap check)."""
    global _DEFAULT_PRINT
    if _SPANS is None:
        return True
    if _DEFAULT_PRINT is None:
        _DEFAULT_PRINT = _fingerprint(Uc(UC_ARCH_X86, UC_MODE_32))
    return _fingerprint(uc) != _DEFAULT_PRINT


def save(uc):
    """Their values now, or None when they hold nothing but reset values."""
    if not in_use(uc):
        return None
    values = tuple(uc.reg_read_batch(list(REGS)))
    return None if values == DEFAULTS else values


def scrub(uc) -> None:
    uc.reg_write_batch(list(zip(REGS, DEFAULTS)))


def load(uc, values) -> None:
    uc.reg_write_batch(list(zip(REGS, values)))


def to_json(values):
    return None if values is None else [list(v) if isinstance(v, tuple) else v for v in values]


# What a state file may hold for each register: an x87 register is [the
# 64-bit mantissa, the 16-bit sign and exponent]; the others are no wider
# than the register (the binding would silently drop the bits above).
TOPS = (None,) * 8 + (1 << 128,) * 8 + (1 << 16, 1 << 32) + (1 << 16, 1 << 32, 1 << 16, 1 << 32, 1 << 16, 1 << 11)


def _uint(x, top) -> bool:
    return type(x) is int and 0 <= x < top      # not a bool (JSON true): no register value


def from_json(doc):
    """The registers of a state file's process record, each checked (a
    hostile file: ValueError naming the first bad one)."""
    if doc is None:
        return None
    if not isinstance(doc, list) or len(doc) != len(REGS):
        raise ValueError(f"protection state: bad saved x87/SSE registers: not a list of {len(REGS)}")
    out = []
    for name, reg, top, v in zip(NAMES, REGS, TOPS, doc):
        if reg in FP:
            if not (isinstance(v, list) and len(v) == 2 and _uint(v[0], 1 << 64) and _uint(v[1], 1 << 16)):
                raise ValueError(f"protection state: bad saved x87 register {name}")
            out.append((v[0], v[1]))
        else:
            if not _uint(v, top):
                raise ValueError(f"protection state: bad saved SSE register {name}")
            out.append(v)
    return tuple(out)
