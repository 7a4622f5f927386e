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


class Shown(Static):
    """A Static that re-renders only when what it shows changed (``key``):
    most steps change the log and the help line, not the hosts."""

    _key = None
    _view = None

    def put(self, t: Text) -> None:
        # Fixed-height widgets (CSS in tui.app) need no new layout: a
        # refresh then repaints this widget only, not the whole screen.
        self.update(t, layout=self.styles.height is None or self.styles.height.is_auto)

    def same(self, key) -> bool:
        if key is not None and key == self._key:
            return True
        self._key = key
        return False


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
        # One segment per run of equal cells in a row (a few dozen, not a
        # thousand): what keeps a refresh of the whole screen cheap.
        for row in range(0, m.ncells, width):
            run, n = None, 0
            for i in range(row, min(row + width, m.ncells)):
                cell = m.cell(i)
                if cell != run and n:
                    t.append(GLYPHS[run[1]] * n, style=COLOURS[run[0]])
                    n = 0
                run, n = cell, n + 1
            if n:
                t.append(GLYPHS[run[1]] * n, style=COLOURS[run[0]])
            if row + width < m.ncells:
                t.append("\n")
        t.append("\n")
        for c in CONTENT_ORDER:
            t.append("■", style=COLOURS[c])
            t.append(f"{CONTENT_NAMES[c].split(' (')[0]} ")
        t.append(f"\n· not {recv} ▒ part █ {recv} ✱ dirty", style="dim")
        return t


class HostPanel(Shown):
    """Status, processes, registers and disassembly, console of one host."""

    def __init__(self, title: str, **kw):
        super().__init__(**kw)
        self.title = title

    def show(self, v: HostView) -> None:
        if self.same((v.status, v.vclock)):
            return
        t = Text()
        t.append(f"{self.title}\n", style="bold reverse")
        t.append(f"{v.status}\n", style="italic")
        if v.vclock:
            t.append(f"vclock {v.vclock:,}\n", style="dim")
        self.put(t)


class DetailPanel(Shown):
    def show(self, v: HostView) -> None:
        if self.same(id(v)) and self._view is v:
            return
        self._view = v
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
        self.put(t)


class Timeline(Shown):
    def show(self, f: Frame) -> None:
        if self.same((f.phase, f.round, f.mode)):
            return
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
        self.put(t)


class MessageLog(Widget):
    """The latest messages up to the cursor, as many as its height holds."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.msgs: tuple = ()

    def show(self, frames: list[Frame], cursor: int) -> None:
        msgs = tuple(f.message for f in frames[:cursor + 1] if f.message is not None)
        if msgs != self.msgs:
            self.msgs = msgs
            self.refresh()

    def render(self) -> Text:
        rows = max(1, (self.size.height or 13) - 1)
        t = Text()
        t.append(f"messages ({len(self.msgs)}): #, host, type, bytes, seq, verdict\n", style="bold")
        for m in self.msgs[-rows:]:
            arrow = {"send": "->", "recv": "<-", "reject": "XX"}.get(m.direction, "?")
            who = "A" if m.side == "source" else "B"
            style = "bold white on red" if m.direction == "reject" else ("cyan" if m.side == "source" else "green")
            seq = "" if m.seq < 0 else str(m.seq)
            t.append(f"{m.n:>4} {who}{arrow} {m.rtype:<11} {m.length:>6} {seq:>3} {m.verdict}\n", style=style)
        return t


class StatsPanel(Shown):
    def show(self, f: Frame) -> None:
        if self.same(f.stats):
            return
        s = f.stats
        t = Text()
        rnd = "-" if s.round is None else str(s.round)
        down = "-" if s.downtime_ms is None else f"{s.downtime_ms:.1f} ms"
        t.append("statistics ", style="bold")
        t.append(f"round {rnd}  sent {s.pages_sent} pages ({s.data_pages} data, {s.zero_pages} zero)  "
                 f"{s.bytes:,} bytes  dirty {s.dirty_rate:,.0f} pages/s  downtime {down}\n")
        if s.rounds:
            top = max(max(p.sent, p.dirtied) for p in s.rounds) or 1
            for p in s.rounds[-6:]:             # per round: pages sent, then pages dirtied meanwhile
                a, b = round(12 * p.sent / top), round(12 * p.dirtied / top)
                t.append(f" r{p.round:<2}", style="dim")
                t.append("█" * max(a, 1 if p.sent else 0), style="cyan")
                t.append(f" {p.sent} sent ")
                t.append("█" * max(b, 1 if p.dirtied else 0), style="red")
                t.append(f" {p.dirtied} dirtied\n")
        self.put(t)


class HelpPanel(Shown):
    def show(self, f: Frame) -> None:
        if self.same((f.phase, f.round, f.note)):
            return
        t = Text()
        t.append(phases.label(f.phase, f.round) + ": ", style="bold")
        t.append(phases.HELP[f.phase])
        t.append(f"\n{f.note}", style="italic")
        self.put(t)
