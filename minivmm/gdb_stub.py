"""A GDB stub: ``minivmm run GUEST --gdb [HOST:]PORT``.

It serves the GDB remote serial protocol (GDB manual, "Remote Protocol")
for the one guest CPU, from the VMM's own run loop: the stub decides when
the machine runs a slice, and the slices are the same as without a debugger
(see ``debug_counter.py``: breakpoints and steps stop a slice part way and
the rest of it runs later, so virtual time and the guest's results do not
change in deterministic mode).  Packets (``gdb_packets.py`` frames them):

====================  =====================================================
``?``                 why the guest stopped (``S05`` at boot)
``g`` / ``G``         all registers, in ``gdb_regs.REGISTERS`` order
``p n`` / ``P n=v``   one register; x87 and CR0/2/3/4 are read-only
``m a,l`` / ``M``     memory by *virtual* address through the current CR3,
                      as the CPU sees it at CPL0 (protected pages: ciphertext)
``Z0`` / ``z0``       software breakpoint (a code hook, never an ``int3``
                      in guest memory); other ``Z`` kinds are unsupported
``s`` / ``c``         step one instruction / continue (resume address
                      arguments are refused: set ``$eip`` instead)
0x03                  interrupt a running guest (Ctrl-C in GDB): ``S02``
``D`` / ``k``         detach (the guest runs on) / kill (the run ends)
``qSupported``,       ``PacketSize=4000;qXfer:features:read+``; target.xml
``qXfer``,            from ``gdb_regs``; one thread (pid 1), attached
``qAttached``, ...
====================  =====================================================

The guest's end is reported as ``W`` + its shutdown status, or ``X`` + a
signal for a crash: ``06`` (SIGABRT) kernel panic, ``0b`` (SIGSEGV) triple
fault, ``09`` (SIGKILL) a hang or another guest error.  Any other packet
gets the empty reply that means "not supported".
"""

from __future__ import annotations

import socket

from minivmm import gdb_regs
from minivmm.debug_counter import BREAK, InstructionCounter
from minivmm.errors import GuestError, KernelPanic, TripleFault, VmmError
from minivmm.gdb_packets import INTERRUPT, Connection, ProtocolError, escape

SIGINT, SIGTRAP, SIGABRT, SIGKILL, SIGSEGV = 2, 5, 6, 9, 11
MAX_MEMORY = 0x1000                     # bytes per m/M packet (we advertise PacketSize=4000)


def hexnum(text: str) -> int:
    """A protocol number: 1..8 hex digits, nothing else (``int(x, 16)`` would
    also take signs, ``0x``, underscores and spaces)."""
    if not 1 <= len(text) <= 8 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise ValueError(f"not a hex number: {text[:16]!r}")
    return int(text, 16)


def parse_address(spec: str) -> tuple[str, int]:
    """``[HOST:]PORT`` → (host, port); the host defaults to 127.0.0.1 (never
    every interface by default: the stub gives full control of the guest)."""
    host, _, port = spec.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise VmmError(f"--gdb takes [HOST:]PORT, not {spec!r}") from None
    if not 0 <= number <= 65535:
        raise VmmError(f"--gdb port must be 0..65535, not {number}")
    return host or "127.0.0.1", number


def listen(spec: str) -> socket.socket:
    host, port = parse_address(spec)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise VmmError(f"--gdb {spec}: cannot listen there: {exc.strerror}") from None
    sock.listen(1)
    return sock


class GuestEnded(Exception):
    """The guest shut down or crashed while the debugger had it: the session
    reported it (W/X) and the caller finishes the run as without a debugger."""

    def __init__(self, error: GuestError | None):
        self.error = error


class Session:
    """One GDB connection driving one machine.  :meth:`serve` returns
    ``"detach"`` or ``"lost"`` (the guest runs on without a debugger) or
    ``"kill"``, or raises :class:`GuestEnded`."""

    def __init__(self, machine, sock: socket.socket):
        self.machine = machine
        self.conn = Connection(sock)
        self.counter = InstructionCounter()
        self.last_signal = SIGTRAP

    # ----------------------------------------------------------- the loop
    def serve(self) -> str:
        try:
            while True:
                packet = self.conn.read_packet()
                if packet == bytes((INTERRUPT,)):
                    continue                # already stopped
                text = packet.decode("latin-1")
                cmd = text[:1]
                if cmd in ("c", "s"):
                    if len(text) > 1:
                        self._send("E01")   # resume at an address: not supported
                        continue
                    self._send(self._resume(step=cmd == "s"))
                elif cmd == "D":
                    self._send("OK")
                    return "detach"
                elif cmd == "k":
                    return "kill"
                else:
                    self._send(self.dispatch(text))
        except (EOFError, ConnectionError):
            # GDB went away (closed, crashed, network): as a detach, the
            # guest runs on; a slice stopped part way is finished normally.
            return "lost"
        finally:
            self.counter.uninstall()

    def _send(self, reply: str | bytes) -> None:
        self.conn.send_packet(reply.encode("latin-1") if isinstance(reply, str) else reply)

    # ------------------------------------------------------- run control
    def _resume(self, *, step: bool) -> str:
        m, c = self.machine, self.counter
        if step or c.breakpoints:
            c.install(m)
        else:
            c.uninstall()
        eip = m.cpu().eip
        c.skip_once = eip if eip in c.breakpoints else None
        c.step_limit = 1 if step else None
        try:
            while True:
                if m.halted == "shutdown":
                    raise GuestEnded(None)
                why = m.step()
                if m.halted == "shutdown":
                    raise GuestEnded(None)
                if why == BREAK or (step and c.step_limit == 0):
                    break
                if self.conn.poll_interrupt():
                    self.last_signal = SIGINT
                    return self._stopped()
        except GuestError as exc:
            c.step_limit = None
            self._send(f"X{_crash_signal(exc):02x}")
            raise GuestEnded(exc) from exc
        except GuestEnded:
            self._send(f"W{(m.shutdown_status or 0) & 0xFF:02x}")
            raise
        finally:
            c.step_limit = None
        self.last_signal = SIGTRAP
        return self._stopped()

    def _stopped(self) -> str:
        # A step (or a stop) at the end of a slice: a due tick is delivered
        # now, so GDB shows the handler's first instruction next; the guest
        # sees the same as when the next slice delivers it.
        if not self.machine.halted:
            self.machine.deliver_pending_timer()
        return f"S{self.last_signal:02x}"

    # ----------------------------------------------------------- packets
    def dispatch(self, text: str) -> str | bytes:
        cmd, arg = text[:1], text[1:]
        try:
            if text == "?":
                return f"S{self.last_signal:02x}"
            if cmd == "g":
                return gdb_regs.encode_all(self.machine.cpu())
            if cmd == "G":
                self.machine.write_registers(gdb_regs.decode_all(arg))
                return "OK"
            if cmd == "p":
                n = hexnum(arg)
                if n >= len(gdb_regs.REGISTERS):
                    return "E01"
                return gdb_regs.encode_one(self.machine.cpu(), n)
            if cmd == "P":
                n, _, value = arg.partition("=")
                n = hexnum(n)
                if n >= len(gdb_regs.REGISTERS) or not gdb_regs.REGISTERS[n][2] or len(value) != 8:
                    return "E01"
                self.machine.write_registers({gdb_regs.REGISTERS[n][0]:
                                              int.from_bytes(bytes.fromhex(value), "little")})
                return "OK"
            if cmd == "m":
                addr, length = (hexnum(x) for x in arg.split(","))
                return self._read_memory(addr, min(length, MAX_MEMORY))
            if cmd == "M":
                where, _, data = arg.partition(":")
                addr, length = (hexnum(x) for x in where.split(","))
                raw = bytes.fromhex(data)
                if length != len(raw) or length > MAX_MEMORY:
                    return "E01"
                self.machine.write_guest(addr, raw)
                return "OK"
            if cmd in "Zz" and arg.startswith("0,"):
                addr = hexnum(arg.split(",")[1])
                if cmd == "Z":
                    self.counter.breakpoints.add(addr)
                else:
                    self.counter.breakpoints.discard(addr)
                return "OK"
            if cmd == "H" or text.startswith("T"):
                return "OK"
            if cmd == "q":
                return self._query(text)
        except (ValueError, IndexError):
            return "E01"
        except VmmError:
            return "E0e"                # EFAULT-like: unmapped, refused
        return ""

    def _read_memory(self, addr: int, length: int) -> str:
        """Page by page: a read that reaches an unmapped page returns what
        came before it (GDB accepts a short reply), or an error if nothing."""
        out = b""
        while length > 0:
            chunk = min(length, 0x1000 - (addr & 0xFFF))
            try:
                out += self.machine.read_guest(addr, chunk)
            except VmmError:
                if not out:
                    raise
                break
            addr, length = (addr + chunk) & 0xFFFFFFFF, length - chunk
        return out.hex()

    def _query(self, text: str) -> str | bytes:
        if text.startswith("qSupported"):
            return "PacketSize=4000;qXfer:features:read+"
        if text == "qAttached":
            return "1"                  # attached to an existing guest: kill does not lose a process we made
        if text == "qC":
            return "QC1"
        if text == "qfThreadInfo":
            return "m1"
        if text == "qsThreadInfo":
            return "l"
        if text.startswith("qXfer:features:read:target.xml:"):
            offset, length = (hexnum(x) for x in text.rsplit(":", 1)[1].split(","))
            xml = gdb_regs.target_xml().encode()
            part = xml[offset:offset + length]
            return (b"l" if offset + length >= len(xml) else b"m") + escape(part)
        return ""


def _crash_signal(exc: GuestError) -> int:
    if isinstance(exc, KernelPanic):
        return SIGABRT
    if isinstance(exc, TripleFault):
        return SIGSEGV
    return SIGKILL                      # a hang (GuestHang) or another guest error


def serve(machine, spec: str, *, announce, cancelled=lambda: False) -> str:
    """Listen on ``spec``, wait for GDB, and debug ``machine`` until GDB
    detaches, goes away or kills it (returns ``"detach"``, ``"lost"``,
    ``"kill"``); raises :class:`GuestEnded` when the guest ended under the
    debugger.  ``announce(host, port)`` is called once the port is open
    (port 0: the system picks one, and ``announce`` says which).  While
    nobody has connected yet, ``cancelled()`` (Ctrl-C) ends the wait:
    returns ``"cancelled"``."""
    listener = listen(spec)
    try:
        host, port = listener.getsockname()[:2]
        announce(host, port)
        # Wake up now and then to notice Ctrl-C (a flag, see cli.Interrupt).
        listener.settimeout(0.25)
        while True:
            try:
                sock, _ = listener.accept()
                break
            except socket.timeout:
                if cancelled():
                    return "cancelled"
        sock.settimeout(None)
    finally:
        listener.close()
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            return Session(machine, sock).serve()
        except (ProtocolError, ConnectionError) as exc:
            raise VmmError(f"gdb connection: {exc}") from None
