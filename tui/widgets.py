"""Widgets: each renders one part of a frozen Frame, and nothing else."""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget
from textual.widgets import Static

from tui import phases
from tui.model import CONTENT_NAMES, CONTENT_ORDER, DIRTY, NOT_SENT, PARTIAL, SENT, Frame, HostView

COLOURS = {"f": "grey35", "k": "dodger_blue2", "u": "green4", "p": "yellow3", "c": "magenta"}
GLYPHS = {NOT_SENT: "·", PARTIAL: "▒", SENT: "█", DIRTY: "✱"}
MAP_ROWS = 6


class MemoryMapView(Widget):
    """Page states of one host, as coloured cells; says how many pages per cell."""

    DEFAULT_CSS = "MemoryMapView { height: auto; }"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.view: HostView | None = None

    def show(self, view: HostView) -> None:
        if view is not self.view:
            self.view = view
            self.refresh(layout=True)

    def get_content_height(self, container, viewport, width) -> int:
        return MAP_ROWS + 3

    def render(self) -> Text:
        v = self.view
        width = max(8, self.size.width or 40)
        if v is None or v.memory is None:
            return Text("memory: nothing yet", style="dim")
        m = v.memory.regroup(width * MAP_ROWS)
        t = Text()
        recv = "received" if v.role == "destination" else "sent"
        t.append(f"memory {m.npages * 4 >> 10} MiB: {m.per_cell} page{'s' if m.per_cell > 1 else ''}/cell\n",
                 style="bold")
        for i in range(m.ncells):
            c, s = m.cell(i)
            t.append(GLYPHS[s], style=COLOURS[c])
            if (i + 1) % width == 0 and i + 1 < m.ncells:
                t.append("\n")
        t.append("\n")
        for c in CONTENT_ORDER:
            t.append("■", style=COLOURS[c])
            t.append(f"{CONTENT_NAMES[c].split(' (')[0]} ")
        t.append(f"\n· not {recv} ▒ part █ {recv} ✱ dirty", style="dim")
        return t


class HostPanel(Static):
    """Status, processes, registers and disassembly, console of one host."""

    def __init__(self, title: str, **kw):
        super().__init__(**kw)
        self.title = title

    def show(self, v: HostView) -> None:
        t = Text()
        t.append(f"{self.title}\n", style="bold reverse")
        t.append(f"{v.status}\n", style="italic")
        if v.vclock:
            t.append(f"vclock {v.vclock:,}\n", style="dim")
        self.update(t)


class DetailPanel(Static):
    def show(self, v: HostView) -> None:
        t = Text()
        if v.processes:
            t.append("processes\n", style="bold")
            for p in v.processes:
                style = "yellow" if p.protection.startswith("protected") else ("red" if "STOPPED" in p.protection else "")
                t.append(f" {p.pid} {p.name:<9} {p.state:<8} {p.protection}\n", style=style)
        if v.registers:
            t.append("registers\n", style="bold")
            regs = [f"{n}={val:08x}" for n, val in v.registers]
            for i in range(0, len(regs), 2):
                t.append(" " + " ".join(regs[i:i + 2]) + "\n")
        if v.disasm:
            t.append("at EIP\n", style="bold")
            for i, line in enumerate(v.disasm):
                t.append((" > " if i == 0 else "   ") + line + "\n", style="bold" if i == 0 else "")
        t.append("console\n", style="bold")
        for line in v.console[-8:]:
            t.append(f" {line}\n")
        if not v.console:
            t.append(" (no guest here yet)\n", style="dim")
        self.update(t)


class Timeline(Static):
    def show(self, f: Frame) -> None:
        t = Text()
        secure = not f.mode.startswith("plain")
        cur = phases.PHASES.index(f.phase)
        for i, p in enumerate(phases.PHASES):
            if p in ("aborted",) and f.phase != "aborted":
                continue
            if p in phases.SECURE_ONLY and not secure:
                t.append(f" {phases.TITLES[p]} (plain: none) ", style="dim strike")
                continue
            name = phases.label(p, f.round) if p == f.phase else phases.TITLES[p]
            if p == f.phase:
                t.append(f" {name} ", style="bold black on yellow" if p != "aborted" else "bold white on red")
            elif i < cur and f.phase != "aborted":
                t.append(f" {name} ", style="green")
            else:
                t.append(f" {name} ", style="dim")
            t.append("›", style="dim")
        self.update(t)


class MessageLog(Static):
    ROWS = 12

    def show(self, frames: list[Frame], cursor: int) -> None:
        msgs = [f.message for f in frames[:cursor + 1] if f.message is not None]
        t = Text()
        t.append(f"messages ({len(msgs)}): #, host, type, bytes, seq, verdict\n", style="bold")
        for m in msgs[-self.ROWS:]:
            arrow = {"send": "->", "recv": "<-", "reject": "XX"}[m.direction] if m.direction in ("send", "recv", "reject") else "?"
            who = "A" if m.side == "source" else "B"
            style = "bold white on red" if m.direction == "reject" else ("cyan" if m.side == "source" else "green")
            seq = "" if m.seq < 0 else str(m.seq)
            t.append(f"{m.n:>4} {who}{arrow} {m.rtype:<11} {m.length:>6} {seq:>3} {m.verdict}\n", style=style)
        self.update(t)


class StatsPanel(Static):
    def show(self, f: Frame) -> None:
        s = f.stats
        t = Text()
        rnd = "-" if s.round is None else str(s.round)
        down = "-" if s.downtime_ms is None else f"{s.downtime_ms:.1f} ms"
        t.append("statistics ", style="bold")
        t.append(f"round {rnd}  sent {s.pages_sent} pages ({s.data_pages} data, {s.zero_pages} zero)  "
                 f"{s.bytes:,} bytes  dirty {s.dirty_rate:,.0f} pages/s  downtime {down}\n")
        if s.rounds:
            top = max(max(p.sent, p.dirtied) for p in s.rounds) or 1
            for p in s.rounds[-6:]:
                a, b = round(20 * p.sent / top), round(20 * p.dirtied / top)
                t.append(f" r{p.round:<2} sent ", style="dim")
                t.append("█" * max(a, 1 if p.sent else 0), style="cyan")
                t.append(f" {p.sent}\n     dirt ", style="dim")
                t.append("█" * max(b, 1 if p.dirtied else 0), style="red")
                t.append(f" {p.dirtied}\n")
        self.update(t)


class HelpPanel(Static):
    def show(self, f: Frame) -> None:
        t = Text()
        t.append(phases.label(f.phase, f.round) + ": ", style="bold")
        t.append(phases.HELP[f.phase])
        t.append(f"\n{f.note}", style="italic")
        self.update(t)
