"""The console device: two I/O ports, one byte stream, one stream per process.

The kernel writes ``pid`` to ``PORT_CONSOLE_CHANNEL`` before it copies a
process's ``write`` buffer to ``PORT_CONSOLE``, and 0 before its own
messages, so the VMM can file each byte under the process that wrote it.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_CONSOLE = 64 << 20      # bytes kept; older output is dropped past this


@dataclass(frozen=True)
class ConsoleState:
    VERSION = 1
    channel: int
    output: bytes
    per_pid: dict[int, bytes]


class Console:
    def __init__(self):
        self.channel = 0
        self.output = bytearray()
        self.per_pid: dict[int, bytearray] = {}
        self.unflushed: list[tuple[int, bytearray]] = []

    def select(self, pid: int) -> None:
        self.channel = pid

    def put(self, byte: int) -> None:
        self.output.append(byte)
        self.per_pid.setdefault(self.channel, bytearray()).append(byte)
        if self.unflushed and self.unflushed[-1][0] == self.channel:
            self.unflushed[-1][1].append(byte)
        else:
            self.unflushed.append((self.channel, bytearray([byte])))
        if len(self.output) > MAX_CONSOLE:
            del self.output[:len(self.output) - MAX_CONSOLE]

    def take_unflushed(self) -> list[tuple[int, bytes]]:
        out = [(pid, bytes(data)) for pid, data in self.unflushed]
        self.unflushed.clear()
        return out

    def text(self, pid: int | None = None) -> str:
        data = self.output if pid is None else self.per_pid.get(pid, b"")
        return bytes(data).decode("utf-8", "replace")

    def save(self) -> ConsoleState:
        return ConsoleState(self.channel, bytes(self.output),
                            {pid: bytes(d) for pid, d in self.per_pid.items()})

    @classmethod
    def restore(cls, st: ConsoleState) -> "Console":
        c = cls()
        c.channel = st.channel
        c.output = bytearray(st.output)
        c.per_pid = {int(pid): bytearray(d) for pid, d in st.per_pid.items()}
        return c
