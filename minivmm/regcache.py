"""Make Unicorn's Python register access cheaper: cache its register-class lookup.

Every ``reg_read``/``reg_write`` in unicorn 2.1's Python binding first asks
``UcIntel._select_reg_class(reg_id)`` which value type the register has; that
walks a tuple of ranges with a generator each time, about a third of the cost
of a register access.  The VMM makes ~60 register accesses per system call
(reading the CPU state, loading it back with the privilege tricks), so the
lookup alone was ~40 of a ~137 µs round trip.

The answer depends only on the register id, so it is memoised.  This touches
a private method of the binding, which is why unicorn is pinned (==2.1.4) and
why :func:`install` checks, for every x86 register id, that the cached answer
equals the original before it takes effect -- on any mismatch or a missing
method it leaves the binding alone.
"""

from __future__ import annotations

import functools

from unicorn import x86_const

_installed = False


def install() -> bool:
    """Memoise the lookup (idempotent).  Returns whether it is in effect."""
    global _installed
    if _installed:
        return True
    try:
        from unicorn.unicorn_py3.arch.intel import UcIntel
        original = UcIntel._select_reg_class.__func__
    except (ImportError, AttributeError):
        return False
    cached = functools.lru_cache(maxsize=None)(original)
    ids = [v for k, v in vars(x86_const).items() if k.startswith("UC_X86_REG_") and isinstance(v, int)]
    try:
        if any(cached(UcIntel, r) is not original(UcIntel, r) for r in ids):
            return False
    except Exception:       # noqa: BLE001 - a binding we do not know: leave it alone
        return False
    UcIntel._select_reg_class = classmethod(cached)
    _installed = True
    return True
