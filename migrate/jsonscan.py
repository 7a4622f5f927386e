"""A bounded JSON parse: measure a document's structure before building it.

``json.loads`` builds every object a document describes.  A document of
nested empty lists (``[[],[],...]``) costs ~3 bytes of input per list but
~64 bytes of Python object, so 128 MiB of it asks for gigabytes before
anything can reject it; deep nesting costs recursion.  :func:`loads_bounded`
first scans the raw bytes, with only C-speed passes over them (a regular
expression that blanks strings, byte counts, and a depth profile over 1 MiB
windows with numpy), and refuses a document whose nesting depth, number of
containers or number of values exceeds the caller's limits.  Only then does
``json.loads`` run, on a document whose object count is bounded: its memory
stays proportional to the bytes received, with a small constant.

The deadline (an absolute ``time.monotonic()``) is checked between the
scan's windows and around ``json.loads``: a peer cannot buy unbounded CPU
outside the session's time budget.  The scan is conservative, not a JSON
validator: ``json.loads`` still rejects anything malformed.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

import numpy as np

WINDOW = 1 << 20
# A JSON string: the quote, runs of plain characters, escapes, the quote
# (the "unrolled loop" form: linear, no backtracking).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_OPEN = np.zeros(256, dtype=np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


class ScanError(ValueError):
    """The document's structure exceeds a limit (or is not JSON at all)."""


class Expired(ScanError):
    """The deadline passed while the document was being parsed."""


@dataclass(frozen=True)
class Limits:
    max_depth: int          # nesting of arrays and objects
    max_containers: int     # arrays + objects
    max_values: int         # separators (',' and ':'): a bound on values and keys
    max_strings: int


def _check_time(deadline: float | None, what: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise Expired(f"the session deadline passed while {what}")


def scan(data, limits: Limits, deadline: float | None = None) -> None:
    """Raise :class:`ScanError` if ``data`` (bytes-like) exceeds ``limits``."""
    _check_time(deadline, "the state document was arriving")
    # Strings blanked (a copy at most the document's size; none without strings).
    stripped, nstrings = _STRING.subn(b"0", data) if b'"' in data else (data, 0)
    if nstrings > limits.max_strings:
        raise ScanError(f"{nstrings} strings, more than the {limits.max_strings} a state can hold")
    if b'"' in stripped:
        raise ScanError("an unterminated string")
    _check_time(deadline, "strings were scanned")
    containers = stripped.count(b"[") + stripped.count(b"{")
    if containers > limits.max_containers:
        raise ScanError(f"{containers} arrays and objects, more than the {limits.max_containers} "
                        f"a state can hold")
    values = stripped.count(b",") + stripped.count(b":")
    if values > limits.max_values:
        raise ScanError(f"{values} values, more than the {limits.max_values} a state can hold")
    depth = 0
    view = np.frombuffer(stripped, dtype=np.uint8)
    for off in range(0, len(view), WINDOW):
        steps = _OPEN[view[off:off + WINDOW]].astype(np.int32)
        if not steps.any():
            continue
        profile = np.cumsum(steps) + depth
        if int(profile.max()) > limits.max_depth:
            raise ScanError(f"nested deeper than {limits.max_depth} levels")
        if int(profile.min()) < 0:
            raise ScanError("more closing brackets than opening ones")
        depth = int(profile[-1])
        _check_time(deadline, "the document's nesting was scanned")


def loads_bounded(data, limits: Limits, deadline: float | None = None):
    """``json.loads(data)`` after :func:`scan`; raises :class:`ScanError`
    (or ``ValueError`` from json) instead of building an oversized object."""
    scan(data, limits, deadline)
    try:
        doc = json.loads(data)
    except RecursionError:
        raise ScanError("nested too deeply") from None
    _check_time(deadline, "the state document was parsed")
    return doc
