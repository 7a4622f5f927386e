"""The text and JSON forms of VMM events (``minivmm run --events``).

Text (``--events``), one event per line on stderr, fields in a fixed order::

    event <seq> @<vtime> <Type> key=value key=value ...

``seq`` and ``vtime`` are decimal; addresses, frames, page-table roots and
register values are hex (``0x40800000``); pids, statuses, counts and versions
are decimal; system calls, hypercalls and vectors are named, with the number
in parentheses (``call=write(2)``, ``vector=#PF(14)``); a tuple is
comma-separated without spaces (``args=0x40800000,0x8,0x0``); a string is
bare when it is one word, else JSON-quoted (``reason="kernel access"``).
The keys are the event's dataclass fields (``number`` is printed as
``call``), so the line names everything the event carries.

JSON (``--events=json``): one JSON object per line (JSON Lines) with
``"type"`` and every field as a number or string, plus ``"call"`` (the
name) for system calls and hypercalls and ``"vector_name"`` for vectors.
Console output is included there as ``ConsoleOutput`` events (the console
itself still goes to stdout).

Both forms are versioned by ``FORMAT_VERSION``; a new field may be added
at the end of a line, nothing is renamed or reordered within a version.
"""

from __future__ import annotations

import dataclasses
import json

from minivmm import abi
from minivmm import events as ev

FORMAT_VERSION = 1

SYSCALLS = {abi.SYS_EXIT: "exit", abi.SYS_WRITE: "write", abi.SYS_YIELD: "yield",
            abi.SYS_GETPID: "getpid", abi.SYS_SLEEP: "sleep", abi.SYS_TICKS: "ticks"}
HYPERCALLS = {abi.HC_VERSION: "version", abi.HC_SHUTDOWN: "shutdown", abi.HC_PANIC: "panic",
              abi.HC_PROC_START: "proc_start", abi.HC_PROC_EXIT: "proc_exit",
              abi.HC_PROTECT: "protect"}
VECTORS = {abi.VEC_DE: "#DE", abi.VEC_DB: "#DB", abi.VEC_BP: "#BP", abi.VEC_OF: "#OF",
           abi.VEC_UD: "#UD", abi.VEC_DF: "#DF", abi.VEC_GP: "#GP", abi.VEC_PF: "#PF",
           abi.VEC_TIMER: "timer", abi.VEC_SYSCALL: "syscall", abi.VEC_HYPERCALL: "hypercall"}
HEX_FIELDS = {"cr3", "eip", "address", "vaddr", "frame", "shared_vaddr", "error_code", "args", "ident"}


def call_name(event: ev.Event) -> str | None:
    """The name of a Syscall's or Hypercall's number (None: another event or unknown)."""
    if isinstance(event, ev.Syscall):
        return SYSCALLS.get(event.number)
    if isinstance(event, ev.Hypercall):
        return HYPERCALLS.get(event.number)
    return None


def _word(text: str) -> str:
    return text if text and all(c.isalnum() or c in "-_.:/#()" for c in text) else json.dumps(text)


def _value(name: str, value) -> str:
    if isinstance(value, tuple):
        return ",".join(_value(name, v) for v in value) or "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:#x}" if name in HEX_FIELDS else str(value)
    return _word(str(value))


def to_text(event: ev.Event) -> str:
    """The event's one-line text form (see the module docstring)."""
    parts = [f"event {event.seq} @{event.vtime} {type(event).__name__}"]
    for f in dataclasses.fields(event):
        if f.name in ("seq", "vtime"):
            continue
        value = getattr(event, f.name)
        if f.name == "number" and isinstance(event, (ev.Syscall, ev.Hypercall)):
            parts.append(f"call={call_name(event) or 'unknown'}({value})")
        elif f.name == "vector":
            parts.append(f"vector={VECTORS.get(value, 'vector')}({value})")
        else:
            parts.append(f"{f.name}={_value(f.name, value)}")
    return " ".join(parts)


def to_json(event: ev.Event) -> str:
    """The event as one line of JSON (see the module docstring)."""
    doc = {"type": type(event).__name__}
    for f in dataclasses.fields(event):
        value = getattr(event, f.name)
        doc[f.name] = list(value) if isinstance(value, tuple) else value
    if isinstance(event, (ev.Syscall, ev.Hypercall)):
        doc["call"] = call_name(event)
    if hasattr(event, "vector"):
        doc["vector_name"] = VECTORS.get(event.vector)
    return json.dumps(doc, separators=(",", ":"))
