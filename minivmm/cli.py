"""``minivmm``: the command line.

Exit status of ``minivmm run``: 0 the guest shut down cleanly; 1 the guest
crashed (kernel panic, triple fault, hang); 2 bad input (unknown guest,
malformed image or state file, bad arguments); 3 a bound (``--ticks``,
``--instructions``) was reached before the guest shut down; 130 interrupted
(Ctrl-C: the run stops between two slices, so a ``--save-state`` file holds a
consistent machine that continues exactly as if never stopped).

Later layers add subcommands without ``minivmm`` importing them: a package
registers a function ``register(subparsers)`` under the entry-point group
``minivmm.commands``.  A layer that wraps ``run`` may set ``args.key_wrap``
(a ``minivmm.state.KeyWrap``): ``--save-state`` then seals process keys with
it and ``--restore`` opens them with it (the migrate package seals them to the
host's TPM); without one, a machine with process keys is not saved.  It may
also set ``args.check_restore(machine, path)``, which refuses a restored
machine by raising ``StateError`` (the migrate package: an old copy of a VM
that has left this host).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from minivmm import events as ev
from minivmm.errors import GuestError, ImageError, StateError, VmmError
from minivmm.plugins import own_entry_points

EXIT_OK, EXIT_CRASH, EXIT_BADINPUT, EXIT_BOUND, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
STATE_MAGIC = b"MVMSTATE"           # minivmm/state.py's file magic


def _load_image(spec: str, ram_size: int):
    """A built-in guest name, the path of an image file, or a program FILE.s."""
    path = Path(spec)
    if path.suffix == ".s":
        return _assemble(path, ram_size)
    if path.suffix in (".mvimg", ".mvstate") or path.exists():
        from minivmm.image import GuestImage
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"{spec}: cannot read: {exc.strerror}") from None
        if data.startswith(STATE_MAGIC):
            raise ImageError(f"{spec} is a saved machine state, not an image: continue it with "
                             f"'minivmm run {spec} --restore'")
        return GuestImage.from_bytes(data, str(path))
    from guests.catalog import get_guest
    try:
        guest = get_guest(spec)
    except KeyError as exc:
        raise ImageError(str(exc.args[0])) from None
    return guest.build(ram_size)


def _assemble(path: Path, ram_size: int, data_pages: int = 1, args: tuple[int, ...] = ()):
    """A user program linked with the toy kernel; its errors as ImageError."""
    from guests.asm import AsmError
    from guests.build import BuildError, program_image
    try:
        return program_image(path, data_pages=data_pages, args=args, ram_size=ram_size)
    except (AsmError, BuildError) as exc:
        raise ImageError(str(exc)) from None


def _ram(value: str) -> int:
    """``--ram MIB`` → bytes."""
    return mib(value) << 20


def mib(value: str) -> int:
    """A guest RAM size in MiB, 16..256 (argparse names the option in its error)."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a whole number of MiB (16..256), not {value!r}") from None
    if not 16 <= n <= 256:
        raise argparse.ArgumentTypeError(f"guest RAM must be 16..256 MiB, not {n}")
    return n


def count(low: int = 0, high: int | None = None, what: str = "a whole number"):
    """An argparse type: an integer in ``low..high`` (``high`` None: no upper bound)."""
    def conv(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes {what}, not {value!r}") from None
        if n < low or (high is not None and n > high):
            bound = f">= {low}" if high is None else f"{low}..{high}"
            raise argparse.ArgumentTypeError(f"must be {bound}, not {n}")
        return n
    return conv


def events_format(value: str) -> str:
    """``--events`` (text) or ``--events json``."""
    if value not in ("text", "json"):
        raise argparse.ArgumentTypeError(f"takes nothing or 'json', not {value!r} (write the guest "
                                         f"before --events: 'minivmm run {value} --events')")
    return value


def outcome(result: str, machine, args=None) -> str:
    """How a run ended, in words, with the totals since boot (for the summary line)."""
    ticks = getattr(args, "ticks", None)
    until_tick = getattr(args, "until_tick", None)
    how = {"shutdown": "the guest shut down cleanly (shutdown)",
           "interrupted": "interrupted (Ctrl-C)",
           "instructions": f"stopped at the instruction bound (--instructions "
                           f"{getattr(args, 'instructions', None)})",
           }.get(result)
    if how is None and result == "ticks":
        how = (f"stopped at tick {until_tick} (--until-tick)" if until_tick is not None
               else f"stopped after {ticks} more ticks (--ticks {ticks})" if ticks is not None
               else "stopped by a tick bound")
    exits = ", ".join(f"pid {p}={s}" for p, s in sorted(machine.exits.items())) or "none"
    return (f"{how or result}; {machine.ticks} ticks, {machine.vclock} virtual instructions since "
            f"boot; exits: {exits}")


def check_writable(path: str, option: str) -> None:
    """Refuse a FILE we could not write *before* the guest runs, without
    truncating or leaving anything behind (an existing file is kept as is)."""
    p = Path(path)
    if p.is_dir():
        raise VmmError(f"{option} {path}: is a directory")
    existed = p.exists()
    try:
        with open(p, "ab"):
            pass
    except OSError as exc:
        raise VmmError(f"{option} {path}: cannot write there: {exc.strerror}") from None
    if not existed:
        p.unlink()


def save_atomically(machine, path: str, wrap=None) -> None:
    """Write the state beside ``path`` and rename it into place: a run stopped
    during the save (a second Ctrl-C, a full disk) never leaves half a file.
    ``wrap``: seals process keys (``minivmm.state.KeyWrap``)."""
    tmp = Path(f"{path}.tmp-{os.getpid()}")
    try:
        machine.save(tmp, wrap=wrap)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class Interrupt:
    """Ctrl-C as a request, not an exception: SIGINT only sets a flag that the
    run loop checks between slices (``run(until=...)``), so the machine stops
    at a consistent point -- a KeyboardInterrupt raised inside a slice would
    stop it half way through a timer tick.  A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.asked = False
        self._old = None
        if threading.current_thread() is threading.main_thread():   # signals reach only it
            self._old = signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame):
        self.asked = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __call__(self, machine) -> bool:
        return self.asked

    def close(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def protection_report(e) -> str | None:
    """The line ``minivmm run`` prints for a protection event (None: not one to report)."""
    if isinstance(e, ev.ProcessProtected):
        return (f"minivmm: protecting pid {e.pid} ({e.name}) #{e.ident:016x}: {e.pages} pages, "
                f"shared page {e.shared_vaddr:#x}, measurement {e.measurement[:16]}...")
    if isinstance(e, ev.TrustedOutput):
        # On stderr, which only the VMM writes: the guest's console is stdout.
        text = e.text.rstrip("\n").replace("\n", "\n    ")
        return f"minivmm: [pid {e.pid} {e.name} #{e.ident:016x} verified] {text}"
    if isinstance(e, ev.IntegrityViolation):
        return (f"minivmm: INTEGRITY VIOLATION: pid {e.pid} ({e.name}) page {e.vaddr:#x}: "
                f"{e.reason}; process stopped")
    if isinstance(e, ev.RegisterTamper):
        return (f"minivmm: REGISTER TAMPERING: the kernel changed pid {e.pid} ({e.name})'s "
                f"registers ({e.detail}); restored")
    return None


class EventPrinter:
    """The console on stdout; protection reports and (``--events``) every
    event on stderr, one per line.  On a terminal both streams share the
    screen, so a line for stderr never goes out while the console is in the
    middle of a line: it waits for the console's newline (or the end of the
    run: ``close``), and keeps its order.  Each event carries its virtual
    time, so where it happened inside the line is still known."""

    def __init__(self, events: str | None = None, *, reports: bool = True, out=None, err=None):
        from minivmm import eventformat
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.format = {"text": eventformat.to_text, "json": eventformat.to_json}.get(events or "")
        self.json = events == "json"
        self.reports = reports
        self.mid_line = False
        self.pending: list[str] = []

    def attach(self, machine) -> "EventPrinter":
        machine.events.subscribe(self)
        return self

    def __call__(self, e) -> None:
        if isinstance(e, ev.ConsoleOutput):
            self.out.write(e.text)
            self.out.flush()
            if e.text:
                self.mid_line = not e.text.endswith("\n")
            if not self.mid_line:
                self._drain()
            if not self.json:
                return
        line = protection_report(e) if self.reports else None
        if line:
            self._say(line)
        if self.format is not None:
            self._say(self.format(e))
        if isinstance(e, ev.Halted):
            self.close()

    def say_lines(self, lines: list[str]) -> None:
        """VMM report lines (a crash report) on stderr, in order with the console."""
        for line in lines:
            self._say(f"minivmm: {line}")

    def _say(self, line: str) -> None:
        self.pending.append(line)
        if not self.mid_line:
            self._drain()

    def _drain(self) -> None:
        if self.pending:
            self.err.write("".join(f"{line}\n" for line in self.pending))
            self.err.flush()
            self.pending.clear()

    def close(self) -> None:
        """Print what waited for a newline the console never wrote."""
        self._drain()


def _stream(machine, args) -> EventPrinter:
    return EventPrinter(getattr(args, "events", None)).attach(machine)


RESTORE_FIXED = (("ram", "--ram"), ("mode", "--mode"), ("tick", "--tick"),
                 ("no_protection", "--no-protection"), ("key_seed", "--key-seed"))


def check_run_args(parser: argparse.ArgumentParser, args) -> None:
    """Refuse option combinations ``run`` would otherwise silently ignore."""
    if args.restore:
        fixed = [opt for dest, opt in RESTORE_FIXED
                 if getattr(args, dest) != parser.get_default(dest)]
        if fixed:
            parser.error(f"{', '.join(fixed)} cannot change a saved machine: --restore takes "
                         f"them from the state file")
    if args.save_state:
        check_writable(args.save_state, "--save-state")
    trace_opts = [opt for dest, opt in (("trace_from", "--trace-from"), ("trace_count", "--trace-count"),
                                        ("trace_regs", "--trace-regs"))
                  if getattr(args, dest, None) != parser.get_default(dest)]
    if trace_opts and not getattr(args, "trace", None):
        parser.error(f"{', '.join(trace_opts)}: only with --trace FILE")
    if (getattr(args, "gdb", None) or getattr(args, "trace", None)) and getattr(args, "migrate_to", None):
        parser.error("--gdb and --trace watch one VMM's run: not with --migrate-to")


def machine_from_args(args):
    """The machine ``run``'s arguments describe: a state file to continue
    (``--restore``), or a guest booted with ``--ram/--mode/--tick`` and the
    protection options.  Plugins that extend ``run`` build theirs here too."""
    from minivmm.machine import Machine
    if args.restore:
        if Path(args.guest).suffix == ".mvimg" and Path(args.guest).exists():
            raise StateError(f"{args.guest} is a guest image, not a saved state: run it without --restore")
        machine = Machine.load(args.guest, unwrap=getattr(args, "key_wrap", None))
        check = getattr(args, "check_restore", None)       # a layer's refusal of old copies
        if check is not None:
            check(machine, args.guest)
        return machine
    image = _load_image(args.guest, args.ram)
    return Machine(image, ram_size=args.ram, mode=args.mode, tick_instructions=args.tick,
                   protection=not args.no_protection,
                   key_seed=args.key_seed.encode() if args.key_seed else None)


def _debug_with_gdb(machine, args, interrupt) -> str | None:
    """``--gdb``: serve GDB until it detaches or goes away (None: the run
    goes on without it), kills the guest or Ctrl-C ends the wait
    (``"interrupted"``), or the guest ends (``"shutdown"``; a crash is
    raised as the GuestError it was)."""
    from minivmm import gdb_stub

    def announce(host, port):
        print(f"minivmm: waiting for gdb on {host}:{port} (gdb -ex 'set architecture i386' "
              f"-ex 'target remote {host}:{port}')", file=sys.stderr, flush=True)

    try:
        how = gdb_stub.serve(machine, args.gdb, announce=announce, cancelled=lambda: interrupt.asked)
    except gdb_stub.GuestEnded as end:
        if end.error is not None:
            raise end.error
        return "shutdown"
    print("minivmm: " + {"detach": "gdb detached: the guest runs on",
                         "lost": "gdb connection lost: the guest runs on",
                         "kill": "gdb killed the run",
                         "cancelled": "interrupted while waiting for gdb"}[how], file=sys.stderr)
    if how == "kill" and args.save_state:
        machine.finish_slice()          # a state is saved between slices only
    return "interrupted" if how in ("kill", "cancelled") else None


def _run_bounded(machine, args, interrupt, tracer) -> str:
    def traced(m):
        tracer.remove_if_done()
        return interrupt(m)
    return machine.run(until=interrupt if tracer is None else traced, max_ticks=args.ticks,
                       max_instructions=args.instructions)


def cmd_run(args) -> int:
    check_run_args(args.parser, args)
    if args.trace:
        check_writable(args.trace, "--trace")
    interrupt = Interrupt()
    trace_file = None
    try:
        machine = machine_from_args(args)
        printer = _stream(machine, args)
        from minivmm.crashreport import Recorder
        recorder = Recorder(machine, on_killed=printer.say_lines)
        tracer = None
        if args.trace:
            from minivmm.trace import Tracer
            trace_file = open(args.trace, "w")
            tracer = Tracer(machine, trace_file, start=args.trace_from, count=args.trace_count,
                            registers=args.trace_regs)
        try:
            result = _debug_with_gdb(machine, args, interrupt) if args.gdb else None
            if result is None:
                result = _run_bounded(machine, args, interrupt, tracer)
        except GuestError as exc:
            printer.close()
            print(f"minivmm: {exc}", file=sys.stderr)
            print("\n".join(f"minivmm: {line}" for line in recorder.machine_crash(exc)), file=sys.stderr)
            return EXIT_CRASH
        finally:
            if args.save_state:
                save_atomically(machine, args.save_state, getattr(args, "key_wrap", None))
                print(f"minivmm: machine state saved to {args.save_state}", file=sys.stderr)
            if tracer is not None:
                print(f"minivmm: trace: {tracer.written} instructions written to {args.trace}",
                      file=sys.stderr)
    finally:
        interrupt.close()
        if trace_file is not None:
            trace_file.close()
        if "printer" in locals():
            printer.close()
    if result == "condition":
        result = "interrupted"
    print(f"minivmm: {outcome(result, machine, args)}", file=sys.stderr)
    return {"shutdown": EXIT_OK, "interrupted": EXIT_INTERRUPTED}.get(result, EXIT_BOUND)


def cmd_guests(args) -> int:
    from guests.build import builtin_programs
    from guests.catalog import GUESTS
    print("Built-in guest images (minivmm run NAME):")
    for g in GUESTS.values():
        print(f"  {g.name:14} {g.description}")
    print("\nBuilt-in user programs (guests/programs/, for your own images):")
    print("  " + ", ".join(builtin_programs()))
    return EXIT_OK


def cmd_build(args) -> int:
    check_writable(args.output, "-o")
    image = _load_image(args.guest, args.ram)
    Path(args.output).write_bytes(image.to_bytes())
    print(f"{args.output}: image {image.name!r}, {len(image.processes)} processes, "
          f"needs {image.min_ram:#x} bytes of RAM")
    return EXIT_OK


def cmd_asm(args) -> int:
    source = Path(args.source)
    if source.suffix != ".s":
        raise VmmError(f"{args.source}: an assembly file ends in .s")
    output = args.output or str(source.with_suffix(".mvimg"))
    check_writable(output, "-o")
    image = _assemble(source, args.ram, args.data_pages, tuple(args.arg))
    Path(output).write_bytes(image.to_bytes())
    print(f"{output}: image {image.name!r}: {args.source} as pid 1 with the toy kernel, "
          f"needs {image.min_ram:#x} bytes of RAM (run it: minivmm run {output})")
    return EXIT_OK


def cmd_bench(args) -> int:
    args.repeat_given = args.repeat is not None
    if args.part == "all":
        from minivmm.benchsuite import main as suite_main
        return suite_main(args)
    from minivmm.bench import main as bench_main
    if args.repeat is None:
        args.repeat = 3
    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="minivmm",
        description="A small teaching hypervisor on Unicorn: boot the toy x86 OS, watch its "
                    "console, protect processes from their own (hostile) kernel, save and restore "
                    "the whole machine, and live-migrate it between two VMMs (serve, run "
                    "--migrate-to, demo).",
        epilog="Exit status of 'run': 0 clean guest shutdown (or migrated away), 1 guest crash, "
               "2 bad input, 3 a --ticks/--instructions bound was reached, 4 a migration "
               "committed but the destination never confirmed it resumed.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="boot a guest and stream its console",
                       description="Boot GUEST (a built-in name from 'minivmm guests', an "
                                   ".mvimg file from 'minivmm build' or 'minivmm asm', or a user "
                                   "program FILE.s, linked with the toy kernel) and stream its "
                                   "console to stdout until it shuts down or a bound is reached. "
                                   "A guest crash prints a crash report on stderr.")
    r.add_argument("guest", metavar="GUEST", help="built-in guest name, image file, or (with --restore) a state file")
    r.add_argument("--ram", type=_ram, default=16 << 20, metavar="MIB", help="guest RAM in MiB (16..256, default 16)")
    r.add_argument("--mode", choices=["deterministic", "fast"], default="deterministic",
                   help="deterministic: instruction-count slices, reproducible (default); "
                        "fast: host-timeout slices, quicker, not reproducible")
    r.add_argument("--tick", type=count(1000, 1 << 30), default=100_000, metavar="N",
                   help="timer period in guest instructions (1000..2**30, default 100000)")
    r.add_argument("--ticks", type=count(0), metavar="N", help="stop after N more timer ticks")
    r.add_argument("--instructions", type=count(0), metavar="N",
                   help="stop after N more virtual instructions")
    r.add_argument("--events", nargs="?", const="text", type=events_format, metavar="json",
                   help="also print every VMM event to stderr, one per line ('--events=json': "
                        "JSON Lines for tools; format in minivmm/eventformat.py)")
    r.add_argument("--no-protection", action="store_true",
                   help="run without process protection: HC_PROTECT fails with -ENOSYS, so the "
                        "attack-* guests show what a hostile kernel gets away with")
    r.add_argument("--key-seed", metavar="TEXT",
                   help="derive protection keys from TEXT, so a run is reproducible down to the "
                        "ciphertext a snooping kernel prints (labs; never for real secrets)")
    r.add_argument("--save-state", metavar="FILE", help="save the machine state to FILE when the run ends")
    r.add_argument("--restore", action="store_true", help="GUEST is a state file from --save-state: continue it")
    r.add_argument("--gdb", metavar="[HOST:]PORT",
                   help="wait for GDB on PORT (host 127.0.0.1 unless given; port 0: any free port, "
                        "printed) and let it control the guest: registers, memory by virtual "
                        "address, breakpoints, steps (docs/debugging.md)")
    r.add_argument("--trace", metavar="FILE",
                   help="write an instruction trace (address, CPL, pid, disassembly) to FILE")
    r.add_argument("--trace-from", type=count(0), default=0, metavar="N",
                   help="first traced instruction, counted from 0 at the start of the run (default 0)")
    r.add_argument("--trace-count", type=count(1, 10_000_000), default=1000, metavar="N",
                   help="how many instructions to trace (1..10000000, default 1000)")
    r.add_argument("--trace-regs", action="store_true",
                   help="also write the general registers and eflags before each traced instruction")
    r.set_defaults(func=cmd_run, parser=r)

    g = sub.add_parser("guests", help="list the built-in guest images and programs",
                       description="List the built-in guest images and user programs.")
    g.set_defaults(func=cmd_guests)

    b = sub.add_parser("build", help="write a built-in guest's image to a file",
                       description="Assemble a built-in guest and write its image file.")
    b.add_argument("guest", metavar="GUEST")
    b.add_argument("-o", "--output", required=True, metavar="FILE")
    b.add_argument("--ram", type=_ram, default=16 << 20, metavar="MIB")
    b.set_defaults(func=cmd_build)

    a = sub.add_parser("asm", help="assemble a user program into an image with the toy kernel",
                       description="Assemble FILE.s (Intel syntax, the guest ABI of "
                                   "docs/guest-abi.md) as the only user program (pid 1) of an "
                                   "image with the toy kernel.  Errors name FILE:LINE.  "
                                   "'minivmm run FILE.s' builds and runs it in one step.")
    a.add_argument("source", metavar="FILE.s")
    a.add_argument("-o", "--output", metavar="IMAGE", help="image file to write (default: FILE.mvimg)")
    a.add_argument("--data-pages", type=count(0, 4096), default=1, metavar="N",
                   help="zero-filled data pages at DATA_VADDR (default 1)")
    a.add_argument("--arg", type=count(0, 0xFFFFFFFF), action="append", default=[], metavar="N",
                   help="an argument for the info page (repeat, at most 8)")
    a.add_argument("--ram", type=_ram, default=16 << 20, metavar="MIB")
    a.set_defaults(func=cmd_asm)

    bench = sub.add_parser("bench", help="the benchmark suite: guest speed, protection, migration; a report",
                           description="Run the benchmark suite: guest instructions per second under the "
                                       "VMM vs bare Unicorn, the cost of process protection, and every "
                                       "registered suite (live migration, plain and secure), several runs "
                                       "each; write a report directory (report.md, results.json, PNG plots "
                                       "with the plots extra). --part compute|protection runs one half of "
                                       "the guest-speed benchmark and only prints.")
    bench.add_argument("--quick", action="store_true",
                       help="fewer and smaller runs (3 of each; under two minutes on 2 idle cores)")
    bench.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)     # CI: the smallest setting
    bench.add_argument("--report", default="bench-report", metavar="DIR",
                       help="report directory (default bench-report)")
    bench.add_argument("--iterations", type=count(1000), default=3_000_000, metavar="N",
                       help="--part compute|protection: loop iterations per process (>= 1000, default 3000000)")
    bench.add_argument("--repeat", type=count(1), default=None, metavar="K",
                       help="runs of each measurement (suite: median of K, default 5, --quick 3; "
                            "--part: the best of K, default 3)")
    bench.add_argument("--part", choices=["all", "compute", "protection"], default="all",
                       help="all: the whole suite and its report (default); compute: VMM vs bare Unicorn; "
                            "protection: cloak/uncloak cost and protected vs unprotected programs")
    bench.set_defaults(func=cmd_bench)

    for ep in own_entry_points("minivmm.commands"):
        ep.load()(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ImageError, StateError) as exc:
        print(f"minivmm: {exc}", file=sys.stderr)
        return EXIT_BADINPUT
    except VmmError as exc:
        print(f"minivmm: {exc}", file=sys.stderr)
        return EXIT_BADINPUT
    except BrokenPipeError:                     # `minivmm guests | head`: not an error
        sys.stdout = None
        return EXIT_OK
    except OSError as exc:                      # unreadable or unwritable files
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"minivmm: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_BADINPUT
    except ValueError as exc:                   # bad numbers
        print(f"minivmm: {exc}", file=sys.stderr)
        return EXIT_BADINPUT
    except KeyboardInterrupt:
        print("minivmm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
