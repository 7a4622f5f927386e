"""Typed, ordered events: how the VMM tells later layers what the guest did.

Every event is a frozen dataclass carrying ``seq`` (a per-machine sequence
number, strictly increasing) and ``vtime`` (the machine's virtual clock, in
guest instructions).  Subscribers receive events synchronously, in order, on
the thread that runs the machine; they must not call back into the machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Event:
    seq: int
    vtime: int


@dataclass(frozen=True)
class Boot(Event):
    image: str
    ram_size: int


@dataclass(frozen=True)
class ConsoleOutput(Event):
    pid: int          # 0 = the kernel
    text: str


@dataclass(frozen=True)
class Syscall(Event):
    pid: int
    number: int
    args: tuple[int, int, int]


@dataclass(frozen=True)
class Interrupt(Event):
    vector: int
    cpl: int          # privilege level that was interrupted


@dataclass(frozen=True)
class Fault(Event):
    pid: int
    vector: int
    eip: int
    error_code: int
    address: int      # CR2 for a page fault, else 0


@dataclass(frozen=True)
class ProcessStart(Event):
    pid: int
    name: str
    cr3: int


@dataclass(frozen=True)
class ProcessExit(Event):
    pid: int
    status: int       # exit status; 128 + vector when the kernel killed it


@dataclass(frozen=True)
class Hypercall(Event):
    pid: int
    number: int
    args: tuple[int, int, int]
    result: int


@dataclass(frozen=True)
class Halted(Event):
    """The run ended: ``reason`` is shutdown, panic, triple-fault, hang, ..."""
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class TrustedOutput(Event):
    """A protected process's own output (HC_TRUSTED_WRITE): read by the VMM
    from the process's protected pages, never through the kernel."""
    pid: int
    name: str
    ident: int            # the identity HC_PROTECT gave it (ProcessProtected.ident)
    text: str


@dataclass(frozen=True)
class ProcessProtected(Event):
    """A process asked for protection (HC_PROTECT) and got it."""
    pid: int
    name: str
    ident: int            # identity bound into its pages' AEAD
    measurement: str      # SHA-256 (hex) of its image pages
    pages: int            # protected pages
    shared_vaddr: int     # its uncloaked page for system-call buffers


@dataclass(frozen=True)
class PageCloaked(Event):
    """A protected page was encrypted in place because someone else reached it."""
    pid: int
    vaddr: int
    frame: int
    version: int
    reason: str           # "kernel access", "pid 3 access", "vmm access", "export", ...


@dataclass(frozen=True)
class PageUncloaked(Event):
    """The owner touched a cloaked page: verified and decrypted."""
    pid: int
    vaddr: int
    frame: int
    version: int


@dataclass(frozen=True)
class PageAdopted(Event):
    """A page mapped into a protected process after HC_PROTECT, protected at its first touch."""
    pid: int
    vaddr: int
    frame: int


@dataclass(frozen=True)
class IntegrityViolation(Event):
    """A protected page failed verification or was remapped: the process is stopped."""
    pid: int
    name: str
    vaddr: int
    reason: str


@dataclass(frozen=True)
class RegisterTamper(Event):
    """The kernel handed a protected process back registers it had not been
    shown; the VMM restored the saved ones."""
    pid: int
    name: str
    registers: tuple[str, ...]
    detail: str


Subscriber = Callable[[Event], None]


@dataclass
class EventBus:
    """Fan-out of events to subscribers, optionally filtered by type."""

    _subs: list[tuple[tuple[type, ...], Subscriber]] = field(default_factory=list)
    seq: int = 0

    def subscribe(self, callback: Subscriber, *types: type) -> Callable[[], None]:
        entry = (types or (Event,), callback)
        self._subs.append(entry)
        return lambda: self._subs.remove(entry)

    def emit(self, cls: type, vtime: int, **fields) -> Event | None:
        self.seq += 1
        if not self._subs:
            return None
        event = cls(seq=self.seq, vtime=vtime, **fields)
        for types, callback in list(self._subs):
            if isinstance(event, types):
                callback(event)
        return event
