"""The Textual app: live (engines in worker threads) or replay (a transcript).

Frames arrive from the engine threads as messages (``App.post_message`` is
thread-safe); the UI keeps the list of frames and a cursor, and a 20 Hz
timer re-renders the panels when something changed, so a burst of steps
never floods the event loop.  Widgets only get frozen snapshots.
"""

from __future__ import annotations

import gc
from dataclasses import replace

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message as TMessage
from textual.screen import ModalScreen
from textual.widgets import Footer, OptionList, Static

from tui import attacks, stepper
from tui.model import Frame
from tui.widgets import (DetailPanel, HelpPanel, HostPanel, MemoryMapView, MessageLog, StatsPanel, Timeline,
                         map_window, messages_until)

NARROW = 110            # below this width one column shows at a time (a, m, b switch)

CSS = """
Screen { layout: vertical; }
#main { height: 1fr; }
.col { width: 1fr; height: 100%; border: round $primary; }
#source, #destination { scrollbar-gutter: stable; }   /* a scrollbar that comes and goes would change the width: every line laid out and rendered again */
#middle { width: 1.3fr; }
#help { height: 6; border: round $secondary; }
#help.record { height: auto; min-height: 6; max-height: 12; }
#top { height: 1; }
#timeline { height: auto; max-height: 5; }
#stats { height: auto; max-height: 8; }
#log { height: 1fr; }
HostPanel { height: 4; }
Screen.narrow .col { display: none; }
Screen.narrow .col.shown { display: block; }
"""


class FrameArrived(TMessage):
    def __init__(self, frame: Frame, run: int):
        super().__init__()
        self.frame = frame
        self.run = run          # which session sent it (a restart starts a new one)


class MenuScreen(ModalScreen):
    BINDINGS = [Binding("escape", "dismiss_none", "close")]
    DEFAULT_CSS = "MenuScreen { align: center middle; } MenuScreen OptionList { width: 90%; height: auto; max-height: 80%; }"

    def compose(self) -> ComposeResult:
        self.entries = attacks.menu()
        yield OptionList(*[label for _, label in self.entries], id="menu")

    def on_option_list_option_selected(self, event) -> None:
        self.dismiss(self.entries[event.option_index][0])

    def action_dismiss_none(self) -> None:
        self.dismiss(None)


class MigrationApp(App):
    TITLE = "minivmm: live migration"
    CSS = CSS
    BINDINGS = [
        Binding("n", "step('message')", "msg"),
        Binding("p", "step('phase')", "phase"),
        Binding("o", "step('round')", "round"),
        Binding("e", "step('run')", "run"),
        Binding("space", "step('pause')", "pause", key_display="␣"),
        Binding("left", "back", "back"),
        Binding("right", "forward", "fwd", show=False),
        Binding("r", "restart", "restart"),
        Binding("v", "cycle", "view"),
        Binding("x", "menu", "menu"),
        Binding("z", "zoom(1)", "zoom"),
        Binding("Z", "zoom(-1)", "out", show=False),
        Binding("left_square_bracket", "pan(-1)", "map <", show=False),
        Binding("right_square_bracket", "pan(1)", "map >", show=False),
        Binding("k", "select(-1)", "rec"),
        Binding("j", "select(1)", "record down", show=False),
        Binding("escape", "select(0)", "unselect", show=False),
        Binding("t", "theme", "theme", show=False),
        Binding("q", "quit_app", "quit"),
        Binding("a", "column('source')", "A", show=False),
        Binding("m", "column('middle')", "mid", show=False),
        Binding("b", "column('destination')", "B", show=False),
        Binding("ctrl+c", "quit_app", "quit", show=False, priority=True),
    ]

    def __init__(self, *, scenario=None, frames: list[Frame] | None = None, record=None,
                 paused: bool = True, replay_name: str = ""):
        super().__init__()
        self.scenario = scenario
        self.replay = frames is not None
        self.frames: list[Frame] = list(frames or [])
        self.cursor = 0
        self.follow = True
        self.record = record
        self.paused = paused
        self.replay_name = replay_name
        self.session = None
        self.writer = None
        self._dirty = True
        self._shown_held = False        # what the header said last (render_frame)
        self.renders = 0
        self.run_id = 0
        self.column = "middle"
        self.zoom = None                # the memory maps' window: None (all), or (pages per cell, first frame)
        self.focus = 0                  # the frame the last zoom centred on
        self.selected: int | None = None        # the message (its n) whose fields the help panel shows
        self.msgs: list = []            # the messages up to the cursor, as the log shows them

    # ----------------------------------------------------------- layout
    def compose(self) -> ComposeResult:
        yield Static(id="top")
        with Horizontal(id="main"):
            with VerticalScroll(classes="col", id="source"):
                yield HostPanel("A  source VMM", id="src-head")
                yield MemoryMapView(id="src-map")
                yield DetailPanel(id="src-detail")
            with Vertical(classes="col shown", id="middle"):
                yield Timeline(id="timeline")
                yield StatsPanel(id="stats")
                yield MessageLog(id="log")
            with VerticalScroll(classes="col", id="destination"):
                yield HostPanel("B  destination VMM", id="dst-head")
                yield MemoryMapView(id="dst-map")
                yield DetailPanel(id="dst-detail")
        yield HelpPanel(id="help")
        yield Footer(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        # Everything built so far (Textual, the engines' modules, this app) lives
        # as long as the app: frozen, out of the collector's way (see on_frame_arrived).
        gc.collect()
        gc.freeze()
        self.theme = "textual-dark"
        self._narrow(self.size.width)
        if not self.replay:
            self._start()
        self.render_frame()
        self.set_interval(0.05, self._tick)

    def on_resize(self, event) -> None:
        self._narrow(event.size.width)
        self._dirty = True

    def _narrow(self, width: int) -> None:
        self.screen.set_class(width < NARROW, "narrow")

    # ------------------------------------------------------------ live
    def _start(self) -> None:
        from tui.live import LiveSession
        if self.record:
            from dataclasses import asdict
            from tui.transcript import Writer
            self.writer = Writer(self.record, asdict(self.scenario))
        self.run_id += 1
        run = self.run_id
        writer = self.writer

        def publish(frame: Frame) -> None:       # on an engine thread
            if writer is not None:
                writer.write(frame)
            self.post_message(FrameArrived(frame, run))
        self.session = LiveSession(self.scenario, publish, paused=self.paused,
                                   every_step=self.record is not None)
        self.session.start()

    def on_frame_arrived(self, msg: FrameArrived) -> None:
        if msg.run != self.run_id:          # a frame of a session closed by a restart
            return
        self.frames.append(msg.frame)
        if len(self.frames) % 16 == 0:
            # The frames live as long as the session: a full collection scanning
            # them (and Textual's objects) stopped the event loop for 50-100 ms
            # now and then during a 256 MiB run (tui.bench).  Collect the young
            # generations' garbage (cheap), then freeze what is left, out of
            # the collector's way; a session's end unfreezes it.
            gc.collect(1)
            gc.freeze()
        if self.follow:
            self.cursor = len(self.frames) - 1
        self._dirty = True

    def _stop_session(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
            gc.unfreeze()           # the session's frames may go now (on_frame_arrived)
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    # ---------------------------------------------------------- render
    def _held(self) -> bool:
        return self.session is not None and self.session.stepper.waiting is not None

    def _tick(self) -> None:
        # Also when only the hold changed: the held step's frame arrives before
        # its engine starts waiting, and nothing arrives after it, so a frame
        # rendered in between said "running" while both VMMs waited (seen in the
        # demo under load).
        if self._dirty or (not self.replay and self._held() != self._shown_held):
            self._dirty = False
            self.render_frame()

    def render_frame(self) -> None:
        self.renders += 1
        top = self.query_one("#top", Static)
        if not self.frames:
            top.update("starting the two VMMs (trust set-up, boot) ..." if not self.replay else "empty transcript")
            return
        f = self.frames[self.cursor]
        if self.replay:
            state = f"REPLAY {self.replay_name}: step {self.cursor + 1}/{len(self.frames)}"
        else:
            held = self._shown_held = self._held()
            state = (f"LIVE: step {self.cursor + 1}/{len(self.frames)}  "
                     + ("HELD: both VMMs stopped, no deadline runs" if held else
                        ("browsing history" if not self.follow else "running")))
        view = ""
        if self.screen.has_class("narrow"):
            view = f" | v: view ({ {'middle': 'protocol', 'source': 'A', 'destination': 'B'}[self.column] })"
        # One line, fixed height (CSS): no new layout of the screen for it.
        top.update(Text.assemble((f"{f.mode} mode", "bold"), f" | {state}{view}"), layout=False)
        self.query_one("#timeline", Timeline).show(f)
        self.query_one("#stats", StatsPanel).show(f)
        self.msgs = messages_until(self.frames, self.cursor)
        chosen = next((m for m in self.msgs if m.n == self.selected), None)
        if chosen is None:
            self.selected = None        # stepped back past it
        self.query_one("#log", MessageLog).show(self.msgs, self.selected)
        self.query_one("#help", HelpPanel).show(f, chosen)
        for side, pre in (("source", "src"), ("destination", "dst")):
            v = getattr(f, side)
            self.query_one(f"#{pre}-head", HostPanel).show(v)
            self.query_one(f"#{pre}-map", MemoryMapView).show(v, self.zoom)
            self.query_one(f"#{pre}-detail", DetailPanel).show(v)

    # --------------------------------------------------------- actions
    def _goto(self, i: int) -> None:
        self.cursor = max(0, min(i, len(self.frames) - 1))
        self.follow = self.cursor == len(self.frames) - 1
        self.render_frame()         # at once: a key shows its result in the same refresh

    def _next_where(self, differs) -> int:
        cur = self.frames[self.cursor]
        for i in range(self.cursor + 1, len(self.frames)):
            if differs(cur, self.frames[i]):
                return i
        return len(self.frames) - 1

    def action_step(self, kind: str) -> None:
        if not self.frames:
            return
        at_end = self.cursor == len(self.frames) - 1
        if self.replay or not at_end:
            if kind == stepper.MESSAGE:
                self._goto(self._next_where(lambda a, b: b.message is not None))
            elif kind == stepper.PHASE:
                self._goto(self._next_where(lambda a, b: a.phase != b.phase))
            elif kind == stepper.ROUND:
                self._goto(self._next_where(lambda a, b: (a.phase, a.round) != (b.phase, b.round)))
            elif kind == stepper.RUN:
                self._goto(len(self.frames) - 1)
            if self.replay or kind != stepper.RUN:
                return
        if self.session is not None:
            self.follow = True
            self.session.command(kind)
            self._dirty = True

    # ------------------------------------------------ memory map zoom
    def _map(self):
        """(npages, base pages per cell, capacity) of the maps, or None before any."""
        if not self.frames:
            return None
        f = self.frames[self.cursor]
        mem = f.source.memory or f.destination.memory
        if mem is None:
            return None
        shown = [w for w in self.query(MemoryMapView) if w.region.width]
        cap = (shown[0] if shown else self.query_one("#src-map", MemoryMapView)).capacity()
        return mem.npages, mem.per_cell, cap

    def zoom_into(self, frame: int, finer: int = 4) -> None:
        """Zoom the maps ``finer`` times closer, centred on ``frame`` (a click, or z)."""
        geo = self._map()
        if geo is None:
            return
        n, base, cap = geo
        _, _, per = map_window(n, base, cap, self.zoom)
        if per <= base:
            self.notify("the map already shows one page per cell" if base == 1 else
                        f"this transcript's maps have {base} pages per cell at most")
            return
        per = -(-max(base, -(-per // finer)) // base) * base
        self.zoom, self.focus = (per, frame - per * cap // 2), frame
        self.render_frame()

    def action_zoom(self, direction: int) -> None:
        geo = self._map()
        if geo is None:
            return
        n, base, cap = geo
        lo, hi, per = map_window(n, base, cap, self.zoom)
        if direction > 0:
            # Closer around the frame last zoomed into (a click), while it is in view.
            self.zoom_into(self.focus if self.zoom is not None and lo <= self.focus < hi else (lo + hi) // 2)
            return
        if self.zoom is not None:
            per *= 4
            whole = map_window(n, base, cap, None)[2]
            self.zoom = None if per >= whole else (per, (lo + hi) // 2 - per * cap // 2)
        self.render_frame()

    def action_pan(self, direction: int) -> None:
        geo = self._map()
        if geo is None or self.zoom is None:
            return
        n, base, cap = geo
        lo, hi, per = map_window(n, base, cap, self.zoom)
        lo = map_window(n, base, cap, (per, lo + direction * max(per, (hi - lo) // 2)))[0]
        self.zoom = (per, lo)
        self.render_frame()

    # ------------------------------------------------ record selection
    def select_message(self, n: int | None) -> None:
        self.selected = n
        self.render_frame()

    def action_select(self, step: int) -> None:
        ns = [m.n for m in self.msgs]
        if step == 0 or not ns:
            self.select_message(None)
            return
        if self.selected not in ns:
            self.select_message(ns[-1])
            return
        i = max(0, min(len(ns) - 1, ns.index(self.selected) + step))
        self.select_message(ns[i])

    def action_back(self) -> None:
        if self.frames:
            self._goto(self.cursor - 1)

    def action_forward(self) -> None:
        if self.frames:
            self._goto(self.cursor + 1)

    def action_restart(self) -> None:
        if self.replay:
            self._goto(0)
            return
        self._stop_session()
        self.frames, self.cursor, self.follow = [], 0, True
        self._start()
        self._dirty = True

    def action_menu(self) -> None:
        if self.replay:
            self.notify("a replay shows one recorded run; start 'minivmm tui' to choose a defence")
            return

        def chosen(key):
            if key:
                self.scenario = attacks.scenario_for(key, self.scenario)
                self.action_restart()
        self.push_screen(MenuScreen(), chosen)

    def action_column(self, which: str) -> None:
        self.column = which
        for col in self.query(".col"):
            col.set_class(col.id == which, "shown")
        self.render_frame()

    def action_cycle(self) -> None:
        order = ("middle", "source", "destination")
        self.action_column(order[(order.index(self.column) + 1) % 3])

    def action_theme(self) -> None:
        self.theme = "textual-light" if self.theme == "textual-dark" else "textual-dark"

    def action_quit_app(self) -> None:
        self._stop_session()
        self.exit()

    def on_unmount(self) -> None:
        self._stop_session()


def scenario_with(scenario, **changes):
    return replace(scenario, **changes)
