"""A live session: source and destination engines in worker threads of this
process, two Machines, one real loopback TCP connection between them (plain,
or secure with the same trust set-up ``minivmm demo`` makes).

The engines know nothing of the TUI: each side's channel gets a step hook
(``migrate.steps.attach``) that runs :meth:`Stepper.at_step`, and both
event buses feed a :class:`Tracker`, which turns steps and events into
frozen :class:`tui.model.Frame` objects and hands them to ``publish`` (the
app posts them to its event loop; a transcript writer records them).
"""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from migrate import events as mev
from migrate.errors import MigrationError
from migrate.precopy import PrecopyPolicy
from migrate.steps import SEND, Timebase, attach
from minivmm.events import EventBus
from tui import bodies, capture, phases
from tui.model import Frame, HostView, Message, RoundPoint, Stats
from tui.stepper import Position, SliceGate, Stepper

STALE = 0.1             # running: capture the hosts at most every 100 ms
AFTER_TICKS = 20        # like `minivmm demo`
RUN_ON_TICKS = 400      # the destination runs the guest this long after resuming (or to its end)
TICKS_PER_FRAME = 10


@dataclass(frozen=True)
class Scenario:
    guest: str = "demo"
    ram_mib: int = 16
    after: int = AFTER_TICKS
    plain: bool = False
    insecure: tuple[str, ...] = ()
    tpm_dir: str | None = None      # None: a fresh temporary directory per run
    run_on: int = RUN_ON_TICKS
    attack: str | None = None       # a network attack of the lab (migrate/lab/attacks.py): a man
                                    # in the middle relays the connection and meddles with it

    @property
    def mode(self) -> str:
        mode = "plain" if self.plain else (
            "secure" + (f", INSECURE: {', '.join(self.insecure)} off" if self.insecure else ""))
        return mode + (f", ATTACK: {self.attack}" if self.attack else "")


class Tracker:
    """Steps and events to frames.  All methods may run on any engine thread."""

    def __init__(self, scenario: Scenario, publish, *, every_step: bool = False):
        self.scenario = scenario
        # Capture the hosts at every step, even while running (a recording:
        # the replay then shows each step as it was, not a view up to 100 ms old).
        self.every_step = every_step
        self.publish = publish
        self.lock = threading.RLock()
        self.index = 0
        self.n = 0
        self.phase = "boot"
        self.round: int | None = None
        self.final_round: int | None = None
        self.stats = Stats()
        self.bytes = 0
        self.machine = None          # the source's machine
        self.source = None           # migrate.source.Source
        self.dest = None             # migrate.destination.Destination
        self.incoming = None         # the destination's machine once resumed
        self.views = {"source": HostView("source", "booting"), "destination": HostView("destination", "listening")}
        self.captured = 0.0
        self.gate = None             # the SliceGate: held while a frame captures the source
        self.timebase = None         # the engines' shared clock (stands still while held)
        self.t_pause: float | None = None
        self.src_status = "booting"
        self.dst_status = "listening on loopback"
        self.recent: dict[str, list[Message]] = {"source": [], "destination": []}
        self.pending: dict[tuple, tuple] = {}   # (side, direction, rtype) -> body for its next record
        self.updated: list[Message] = []        # bodies filled since the last frame

    # ------------------------------------------------------------- capture
    def _capture(self) -> None:
        m = self.machine
        if m is not None:
            self.views["source"] = capture.source_view(self.src_status, m, self.source)
        if self.incoming is not None:
            self.views["destination"] = capture.destination_view(self.dst_status, machine=self.incoming)
        elif self.dest is not None:
            self.views["destination"] = capture.destination_view(self.dst_status, self.dest, self.dest.machine)
        else:
            self.views["destination"] = HostView("destination", self.dst_status)
        self.captured = time.monotonic()

    def frame(self, note: str, message: Message | None = None, *, fresh: bool = True) -> Frame:
        with self.lock:
            if fresh or self.every_step or time.monotonic() - self.captured > STALE:
                self._capture()
            rnd = self.round if self.phase in ("precopy", "stopcopy") else None
            f = Frame(self.index, self.phase, rnd, self.scenario.mode, note, message,
                      self.views["source"], self.views["destination"], self.stats, tuple(self.updated))
            self.updated.clear()
            self.index += 1
            self.publish(f)
            return f

    # --------------------------------------------------------------- steps
    def position(self, side: str, step) -> Position:
        with self.lock:
            self.n += 1
            if side == "source" and step.direction == SEND and step.rtype == "ROUND_BEGIN":
                self.round = 0 if self.round is None else self.round + 1
            self.phase = phases.later(self.phase, phases.of_record(step.rtype))
            if self.final_round is not None and self.phase == "precopy":
                self.phase = "stopcopy"         # the source paused: every record now is the final phase
            if self.phase == "stopcopy":
                self.round = self.final_round
            if self.phase in ("precopy", "stopcopy") and self.round is None:
                self.round = 0
            if side == "source" and step.direction == SEND:
                self.bytes += step.length
                self.stats = replace(self.stats, bytes=self.bytes)
            return Position(self.n, self.phase, self.round if self.phase in ("precopy", "stopcopy") else None)

    def step_frame(self, side: str, step, channel, pos: Position, fresh: bool) -> None:
        if step.direction == SEND:
            verdict = "sealed" if getattr(channel, "sealed", False) else "sent"
        else:
            verdict = "verified" if getattr(channel, "sealed", False) else "accepted"
        with self.lock:
            body = (self.pending.pop((side, step.direction, step.rtype), ())
                    or bodies.from_head(side, step, getattr(channel, "overhead", 0)))
            msg = Message(pos.n, side, step.direction, step.rtype, step.length, step.seq, verdict, body)
            recent = self.recent[side]
            recent.append(msg)
            del recent[:-64]
        arrow = "->" if step.direction == SEND else "<-"
        who = "A" if side == "source" else "B"
        self.frame(f"{who} {arrow} {step.rtype} ({step.length} bytes, seq {step.seq})", msg, fresh=fresh)

    # -------------------------------------------------------------- events
    def _describe(self, e) -> None:
        """Fill in the body of the record event ``e`` describes (tui.bodies)."""
        for when, direction, rtype, fields in bodies.describes(e):
            if not fields:
                continue
            if when == bodies.NEXT:
                key = (e.role, direction, rtype)
                self.pending[key] = self.pending.get(key, ()) + fields
                continue
            recent = self.recent[e.role]
            for i in range(len(recent) - 1, -1, -1):
                m = recent[i]
                if (m.direction, m.rtype) == (direction, rtype):
                    if not m.body:          # the latest such record, once: never an older one
                        recent[i] = replace(m, body=fields)
                        self.updated.append(recent[i])
                    break

    def on_event(self, e) -> None:
        with self.lock:
            self._describe(e)
            if isinstance(e, mev.RoundFinished) and e.role == "source":
                st = self.stats
                self.stats = replace(st, round=e.round, pages_sent=st.pages_sent + e.pages,
                                     data_pages=st.data_pages + e.data_pages,
                                     zero_pages=st.zero_pages + e.zero_pages, dirty_rate=e.dirty_rate,
                                     rounds=st.rounds + (RoundPoint(e.round, e.pages, e.dirtied),))
            elif isinstance(e, mev.StopAndCopy) and e.role == "source":
                self.t_pause = self.timebase.now()
                self.final_round = (self.round or 0) + 1
                self.src_status = f"paused for stop-and-copy ({e.reason}; {e.remaining} pages left)"
            elif isinstance(e, mev.Committed) and e.role == "source":
                self.src_status = "committed: migrated away, never runs again"
            elif isinstance(e, mev.Prepared) and e.role == "destination":
                self.dst_status = "prepared: restored, waiting for COMMIT"
            elif isinstance(e, mev.Resumed) and e.role == "destination":
                self.dst_status = "resumed: the guest runs here"
                # The downtime on the shared held clock: from A's pause to B's
                # resume, without the time the TUI held the engines (the
                # engine's own report counts wall time, holds included).
                if self.t_pause is not None:
                    self.stats = replace(self.stats, downtime_ms=(self.timebase.now() - self.t_pause) * 1000)
            elif isinstance(e, mev.Aborted):
                self.phase = "aborted"
                self.round = None
                who = "A" if e.role == "source" else "B"
                self.n += 1
                msg = Message(self.n, e.role, "reject", "ABORT", 0, -1, f"rejected: {e.reason}",
                              (("reason", e.reason),))
                if e.role == "source":
                    self.src_status = "migration aborted: the guest runs on here"
                else:
                    self.dst_status = "aborted: everything received discarded"
                self.gate.hold()        # the source's guest may be running: stop it to look
                try:
                    self.frame(f"{who} aborted: {e.reason}", msg)
                finally:
                    self.gate.release()


class LiveSession:
    def __init__(self, scenario: Scenario, publish, *, paused: bool = True, every_step: bool = False):
        self.scenario = scenario
        self.timebase = Timebase()
        self.gate = SliceGate()
        self.stepper = Stepper(self.timebase, self.gate, paused=paused)
        self.tracker = Tracker(scenario, publish, every_step=every_step)
        self.error: BaseException | None = None
        self.outcome: str | None = None
        self._threads: list[threading.Thread] = []
        self._tmp = None
        self._listener = None
        self._stopping = threading.Event()
        self._ready = threading.Event()       # the trust set-up is done: modes exist
        self._relay = self._attack = None     # the man in the middle, when the scenario has one
        self.tracker.gate = self.gate
        self.tracker.timebase = self.timebase

    # ------------------------------------------------------------ control
    def start(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        for name, body in (("tui-source", self._source), ("tui-destination", self._destination)):
            t = threading.Thread(target=self._guard(body), name=name, daemon=True)
            self._threads.append(t)
            t.start()

    def command(self, kind: str) -> None:
        self.stepper.command(kind)

    def close(self, timeout: float = 30.0) -> None:
        """Stop both engines (a held step raises: the migration aborts) and join their threads."""
        self._stopping.set()
        self.stepper.close()
        for t in self._threads:
            t.join(timeout)
        if self._listener is not None:
            self._listener.close()
        if self._relay is not None:
            self._relay.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    @property
    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def _guard(self, body):
        def run():
            try:
                body()
            except MigrationError as exc:
                if not self._stopping.is_set():
                    self.error = exc
            except BaseException as exc:        # noqa: BLE001 - shown in the TUI, not lost
                self.error = exc
                self.tracker.frame(f"internal error: {type(exc).__name__}: {exc}")
        return run

    # ---------------------------------------------------------- trust set-up
    def _modes(self):
        """(source mode, destination mode, destination channel factory)."""
        sc = self.scenario
        if sc.plain:
            from migrate.secure.mode import PlainMode
            from migrate.wire import Channel
            return PlainMode(), PlainMode(), Channel
        from migrate.measure import measure_start
        from migrate.secure.attest import Attestor
        from migrate.secure.channel import SealedChannel
        from migrate.secure.mode import SecureMode
        from migrate.secure.setup import certify, protection_policy, setup
        if sc.tpm_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="minivmm-tui-")
            base = Path(self._tmp.name)
        else:
            base = Path(sc.tpm_dir)
        # As `minivmm demo`: one issuer, a policy approving this build (and the
        # defences turned off, for the lab), both host TPMs measured and certified.
        issuer, policy = setup(base, [{"insecure": tuple(sc.insecure)}] if sc.insecure else [{}])
        modes = []
        for role in ("source", "destination"):
            tpm = base / role
            measure_start(tpm, {"role": role, "tui": True},
                          protection_policy(mode="secure", insecure=sc.insecure))
            certify(tpm, issuer)
            modes.append(SecureMode(Attestor(tpm, issuer, policy), insecure=sc.insecure))
        off = set(sc.insecure)
        factory = (lambda sock, timeout: SealedChannel(sock, timeout=timeout, role="destination",
                                                       encryption="encryption" not in off,
                                                       replay="replay" not in off))
        return modes[0], modes[1], factory

    # ------------------------------------------------------------ engines
    def _hook(self, side: str, holder: list):
        tr = self.tracker

        def hook(step):
            self.stepper.at_step(lambda: tr.position(side, step),
                                 lambda pos, stop: tr.step_frame(side, step, holder[0], pos, stop))
        return hook

    def _source(self) -> None:
        from guests.catalog import get_guest
        from migrate.source import Source
        from minivmm.machine import Machine
        sc, tr = self.scenario, self.tracker
        src_mode, self._dst_mode, self._dst_factory = self._modes()
        self._ready.set()
        if self._stopping.is_set():
            return
        m = Machine(get_guest(sc.guest).build(sc.ram_mib << 20), ram_size=sc.ram_mib << 20)
        tr.machine = m
        tr.src_status = "running the guest"
        tr.frame(f"booted {sc.guest!r} on A ({sc.ram_mib} MiB, {sc.mode} mode)")
        m.run(until=lambda mm: self._stopping.is_set() or mm.ticks >= sc.after)
        if self._stopping.is_set() or m.halted:
            return
        tr.src_status = "pre-copy: the guest keeps running"
        tr.frame(f"A starts the live migration at tick {m.ticks}")
        events = EventBus()
        events.subscribe(tr.on_event)
        holder: list = []

        def channel(sock, timeout):
            ch = src_mode.channel(sock, timeout=timeout, role="source")
            holder.append(ch)
            return attach(ch, self._hook("source", holder), self.timebase)
        # An attack replays the lab's scenario, with the lab's lockstep pre-copy and
        # round bound (migrate/lab/scenario.py): a stale page then always shows its
        # damage, and the guest never finishes during pre-copy on a loaded machine.
        from migrate.lab.scenario import MAX_ROUNDS, ROUND_TICKS
        policy = PrecopyPolicy(round_ticks=int(ROUND_TICKS), max_rounds=int(MAX_ROUNDS)) if sc.attack \
            else PrecopyPolicy()
        src = Source(m, policy=policy, timeout=10.0, events=events, mode=src_mode,
                     channel=channel, slice_gate=self.gate)
        tr.source = src
        host, port = self._listener.getsockname()[:2]
        if sc.attack:
            port = self._man_in_the_middle(sc.attack, (host, port))
        try:
            try:
                src.migrate(f"{host}:{port}")
            finally:
                self._attack_findings()
            self.outcome = "completed"
        except MigrationError as exc:
            self.outcome = f"failed: {exc}"
            if self._stopping.is_set():
                return
            # Before COMMIT the guest simply carries on here.
            for _ in range(0, sc.run_on, TICKS_PER_FRAME):
                if self._stopping.is_set() or m.halted:
                    break
                m.run(max_ticks=TICKS_PER_FRAME)
                tr.frame(f"the guest runs on at A (tick {m.ticks})", fresh=False)
            tr.frame("the migration failed; the guest ran on at A")

    def _man_in_the_middle(self, name: str, dest) -> int:
        """Put the lab's record-aware relay with attack ``name`` between A and B
        (in this process, on its own loopback port); returns the port A dials."""
        from migrate.lab.attacks import make_attack
        from migrate.lab.relay import Relay
        relay = Relay(dest, start=False)
        attack = make_attack(name, relay)
        relay.meddle, relay.meddle_back = attack.to_dest, attack.to_source
        self._relay, self._attack = relay, attack
        relay.thread.start()
        self.tracker.frame(f"a man in the middle ({name}) relays A -> B: {attack.summary}")
        return relay.port

    def _attack_findings(self) -> None:
        """What the man in the middle did and learned, one frame a line (the
        leaked secret of an eavesdropper in plain mode, for one)."""
        if self._attack is None:
            return
        self._relay.done.wait(5)
        for line in self._attack.findings():
            self.tracker.frame(f"ATTACK {self._attack.name}: {line}", fresh=False)

    def _destination(self) -> None:
        from migrate.destination import Destination
        tr = self.tracker
        while not self._stopping.is_set():
            try:
                conn, addr = self._listener.accept()
                break
            except TimeoutError:
                continue
        else:
            return
        conn.settimeout(None)
        while not self._ready.wait(0.1):
            if self._stopping.is_set():
                conn.close()
                return
        events = EventBus()
        events.subscribe(tr.on_event)
        holder: list = []
        ch = attach(self._dst_factory(conn, timeout=10.0), timebase=self.timebase)
        holder.append(ch)
        ch.on_step = self._hook("destination", holder)
        dest = Destination(timeout=10.0, events=events, mode=self._dst_mode)
        tr.dest = dest
        tr.dst_status = f"receiving from {addr[0]}:{addr[1]}"
        try:
            incoming = dest.receive(ch, f"{addr[0]}:{addr[1]}")
        finally:
            ch.close()
        m = incoming.machine
        with tr.lock:
            tr.incoming = m
        # Wait for the source to see RESUMED (its downtime figure), then run on.
        for t in self._threads:
            if t.name == "tui-source":
                t.join()
        for _ in range(0, self.scenario.run_on, TICKS_PER_FRAME):
            if self._stopping.is_set() or m.halted:
                break
            m.run(max_ticks=TICKS_PER_FRAME)
            tr.frame(f"the guest runs on B (tick {m.ticks})", fresh=False)
        with tr.lock:
            tr.phase = "done"
            tr.round = None
            tr.dst_status = f"the guest runs here ({m.halted or 'running'})"
        tr.frame("migration complete: the guest runs on B, A's copy never runs again")
