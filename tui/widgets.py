"""Widgets: each renders one part of a frozen Frame, and nothing else."""

from __future__ import annotations

from rich.text import Text
from tui import phases
from tui.paragraphs import Paragraphs
from tui.model import CONTENT_NAMES, CONTENT_ORDER, DIRTY, NOT_SENT, PARTIAL, SENT, Frame, HostView, Message

COLOURS = {"f": "grey35", "k": "dodger_blue2", "u": "green4", "p": "yellow3", "c": "magenta"}
GLYPHS = {NOT_SENT: "·", PARTIAL: "▒", SENT: "█", DIRTY: "✱"}
MAP_ROWS = 6


class Shown(Paragraphs):
    """Paragraphs that re-render only when what they show changed (``key``):
    most steps change the log and the help line, not the hosts."""

    _key = None
    _view = None

    def same(self, key) -> bool:
        if key is not None and key == self._key:
            return True
        self._key = key
        return False


def map_window(npages: int, base_per: int, capacity: int, zoom) -> tuple[int, int, int]:
    """(first frame, end frame, pages per cell) that a map of ``capacity``
    cells shows; ``zoom`` is (pages per cell, first frame) or None (the whole
    map).  A zoomed window is clamped inside RAM and starts on a cell boundary."""
    capacity = max(1, capacity)
    if zoom is None:
        per = -(-max(base_per, -(-npages // capacity)) // base_per) * base_per
        return 0, npages, per
    per, lo = zoom
    per = max(base_per, -(-per // base_per) * base_per)
    span = per * capacity
    lo = max(0, min(lo, npages - span))
    lo -= lo % per
    return lo, min(npages, lo + span), per


class MemoryMapView(Paragraphs):
    """Page states of one host, as coloured cells: the whole RAM or a zoomed
    window of it; always says which frames it shows and how many pages a cell."""

    DEFAULT_CSS = "MemoryMapView { height: auto; }"
    HEAD = 2        # lines above the cells

    def __init__(self, **kw):
        super().__init__(**kw)
        self.view: HostView | None = None
        self.zoom = None
        self.shown: tuple[int, int, int] | None = None     # (lo, per, width) of the last render

    def show(self, view: HostView, zoom=None) -> None:
        if view is not self.view or zoom != self.zoom:
            # Only the rows whose cells changed are rendered and repainted (Paragraphs).
            self.view, self.zoom = view, zoom
            self.put(self.build())

    def on_resize(self, event) -> None:
        self.put(self.build())          # a row holds as many cells as the width

    def capacity(self) -> int:
        return max(8, self.size.width or 40) * MAP_ROWS

    def legend(self) -> tuple[Text, Text]:
        recv = "received" if self.view is not None and self.view.role == "destination" else "sent"
        a = Text()
        for c in CONTENT_ORDER:
            a.append("■", style=COLOURS[c])
            a.append(f"{CONTENT_NAMES[c].split(' (')[0]} ")
        return a, Text(f"· not {recv} ▒ part █ {recv} ✱ dirty", style="dim")

    def get_content_height(self, container, viewport, width) -> int:
        # The legend wraps in a narrow column: count its lines, or the last is cut.
        # (The two header lines fit 32 columns: "frames 0x1234-0x1343 of 0x10000".)
        return MAP_ROWS + self.HEAD + sum(-(-len(x.plain.rstrip()) // max(1, width)) for x in self.legend())

    def on_click(self, event) -> None:
        """A click on a cell zooms into it (the app keeps the zoom: both hosts show the same frames)."""
        if self.shown is None or event.y < self.HEAD:
            return
        lo, per, width = self.shown
        i = (event.y - self.HEAD) * width + event.x
        if 0 <= event.x < width and i < MAP_ROWS * width:
            self.app.zoom_into(lo + i * per)

    def build(self) -> Text:
        v = self.view
        width = max(8, self.size.width or 40)
        if v is None or v.memory is None:
            self.shown = None
            return Text("memory: nothing yet", style="dim")
        lo, hi, per = map_window(v.memory.npages, v.memory.per_cell, width * MAP_ROWS, self.zoom)
        lo, m = v.memory.window(lo, hi, per)
        self.shown = (lo, per, width)
        t = Text()
        t.append(f"memory {v.memory.npages * 4 >> 10} MiB, {per} page{'s' if per > 1 else ''}/cell\n", style="bold")
        last = min(hi, lo + m.ncells * per) - 1
        where = "(all)" if (lo, last) == (0, v.memory.npages - 1) else f"of {v.memory.npages:#x}"
        t.append(f"frames {lo:#x}-{last:#x} {where}\n", style="bold" if where != "(all)" else "")
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
        t.append("\n" * (1 + max(0, MAP_ROWS - -(-m.ncells // width))))
        a, b = self.legend()
        t.append_text(a)
        t.append("\n")
        t.append_text(b)
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


def messages_until(frames: list[Frame], cursor: int) -> list[Message]:
    """The messages of frames[:cursor+1], each in its latest copy (a later
    frame's ``updated`` may carry its body, decoded after its step)."""
    out: dict[int, Message] = {}
    for f in frames[:cursor + 1]:
        if f.message is not None and f.message.n not in out:
            out[f.message.n] = f.message
        for m in f.updated:
            if m.n in out:
                out[m.n] = m
    return list(out.values())


class MessageLog(Paragraphs):
    """The messages up to the cursor, as many as its height holds: the latest,
    or those around the selected one (j/k, or a click)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.msgs: tuple = ()
        self.selected: int | None = None
        self.rows: list[int] = []           # the n of each message line of the last render

    def show(self, msgs: list[Message], selected: int | None) -> None:
        msgs = tuple(msgs)
        if (msgs, selected) != (self.msgs, self.selected):
            self.msgs, self.selected = msgs, selected
            self.put(self.build())

    def on_resize(self, event) -> None:
        self.put(self.build())          # as many lines as the height holds

    def on_click(self, event) -> None:
        i = event.y - 1
        if 0 <= i < len(self.rows):
            self.app.select_message(self.rows[i])

    def build(self) -> Text:
        rows = max(1, (self.size.height or 13) - 1)
        t = Text()
        t.append(f"messages ({len(self.msgs)}): # host type bytes seq verdict\n", style="bold")
        ns = [m.n for m in self.msgs]
        start = max(0, len(ns) - rows)
        if self.selected in ns:
            s = ns.index(self.selected)
            start = max(0, min(s - rows // 2, len(ns) - rows))
        shown = self.msgs[start:start + rows]
        self.rows = [m.n for m in shown]
        for m in shown:
            arrow = {"send": "->", "recv": "<-", "reject": "XX"}.get(m.direction, "?")
            who = "A" if m.side == "source" else "B"
            style = "bold white on red" if m.direction == "reject" else ("cyan" if m.side == "source" else "green")
            if m.n == self.selected:
                style += " reverse"
            seq = "" if m.seq < 0 else str(m.seq)
            t.append(f"{m.n:>4} {who}{arrow} {m.rtype:<11} {m.length:>6} {seq:>3} {m.verdict}\n", style=style)
        return t


VERDICTS = {"sent": "sent unsealed (plain mode, or a handshake record before the keys exist)",
            "sealed": "encrypted and authenticated by the channel before it left",
            "accepted": "accepted unsealed (plain mode, or a handshake record before the keys exist: "
                        "a quote is checked by its verifier, below)",
            "verified": "authenticated by the channel (tag, sequence number) before the engine saw it"}


def describe(m: Message) -> Text:
    """A record's fields: what the step saw, and what its body says (tui.bodies)."""
    who, other = ("A", "B") if m.side == "source" else ("B", "A")
    t = Text()
    t.append(f"record #{m.n}: {m.rtype}", style="bold")
    if m.direction == "reject":
        t.append(f"  {who} REJECTED and ended the session", style="bold red")
    else:
        way = f"{who} -> {other}, sent by {who}" if m.direction == "send" else f"{other} -> {who}, received by {who}"
        t.append(f"  {way}; seq {m.seq}, {m.length} bytes\n")
        t.append(f"{m.verdict}: {VERDICTS.get(m.verdict, '')}\n", style="italic")
    if m.body:
        t.append("body: ", style="bold")
        t.append("; ".join(f"{k} {v}" for k, v in m.body))
    elif m.length == 0 and m.direction != "reject":
        t.append("body: empty (the record's type is the whole message)", style="dim")
    elif m.direction == "recv":
        t.append(f"body: not decoded yet ({who} reports it after this step) or no event describes it", style="dim")
    else:
        t.append("body: no engine event describes it", style="dim")
    t.append("   (esc: phase help)", style="dim")
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
    """The current phase's help; or, while a record is selected, its fields."""

    def show(self, f: Frame, selected: Message | None = None) -> None:
        if self.same((f.phase, f.round, f.note, selected)):
            return
        # A record's fields may take more lines than a phase's help: the panel grows (CSS).
        self.set_class(selected is not None, "record")
        if selected is not None:
            self.put(describe(selected))
            return
        t = Text()
        t.append(phases.label(f.phase, f.round) + ": ", style="bold")
        t.append(phases.HELP[f.phase])
        t.append(f"\n{f.note}", style="italic")
        self.put(t)
