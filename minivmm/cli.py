"""``minivmm``: the command line.

Exit status of ``minivmm run``: 0 the guest shut down cleanly; 1 the guest
crashed (kernel panic, triple fault, hang); 2 bad input (unknown guest,
malformed image or state file, bad arguments); 3 a bound (``--ticks``,
``--instructions``) was reached before the guest shut down.

Later layers add subcommands without ``minivmm`` importing them: a package
registers a function ``register(subparsers)`` under the entry-point group
``minivmm.commands``.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points
from pathlib import Path

from minivmm import events as ev
from minivmm.errors import GuestError, ImageError, StateError, VmmError

EXIT_OK, EXIT_CRASH, EXIT_BADINPUT, EXIT_BOUND = 0, 1, 2, 3


def _load_image(spec: str, ram_size: int):
    """A built-in guest name, or the path of an image file."""
    path = Path(spec)
    if path.suffix == ".mvimg" or path.exists():
        from minivmm.image import GuestImage
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"{spec}: cannot read: {exc.strerror}") from None
        return GuestImage.from_bytes(data, str(path))
    from guests.catalog import get_guest
    try:
        guest = get_guest(spec)
    except KeyError as exc:
        raise ImageError(str(exc.args[0])) from None
    return guest.build(ram_size)


def _ram(value: str) -> int:
    mib = int(value)
    if not 16 <= mib <= 256:
        raise argparse.ArgumentTypeError("RAM must be 16..256 MiB")
    return mib << 20


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


def _stream(machine, args) -> None:
    out = sys.stdout

    def show(e):
        if isinstance(e, ev.ConsoleOutput):
            out.write(e.text)
            out.flush()
            return
        report = protection_report(e)
        if report:
            out.flush()
            print(report, file=sys.stderr, flush=True)
        elif args.events:
            print(f"  [event] {e}", file=sys.stderr)
    machine.events.subscribe(show)


def machine_from_args(args):
    """The machine ``run``'s arguments describe: a state file to continue
    (``--restore``), or a guest booted with ``--ram/--mode/--tick`` and the
    protection options.  Plugins that extend ``run`` build theirs here too."""
    from minivmm.machine import Machine
    if args.restore:
        return Machine.load(args.guest)
    image = _load_image(args.guest, args.ram)
    return Machine(image, ram_size=args.ram, mode=args.mode, tick_instructions=args.tick,
                   protection=not args.no_protection,
                   key_seed=args.key_seed.encode() if args.key_seed else None)


def cmd_run(args) -> int:
    machine = machine_from_args(args)
    _stream(machine, args)
    try:
        result = machine.run(max_ticks=args.ticks, max_instructions=args.instructions)
    except GuestError as exc:
        print(f"minivmm: {exc}", file=sys.stderr)
        return EXIT_CRASH
    finally:
        if args.save_state:
            machine.save(args.save_state)
            print(f"minivmm: machine state saved to {args.save_state}", file=sys.stderr)
    summary = (f"minivmm: {result} after {machine.ticks} ticks, {machine.vclock} virtual "
               f"instructions; exits: " + (", ".join(f"pid {p}={s}" for p, s in sorted(machine.exits.items())) or "none"))
    print(summary, file=sys.stderr)
    return EXIT_OK if result == "shutdown" else EXIT_BOUND


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
    image = _load_image(args.guest, args.ram)
    Path(args.output).write_bytes(image.to_bytes())
    print(f"{args.output}: image {image.name!r}, {len(image.processes)} processes, "
          f"needs {image.min_ram:#x} bytes of RAM")
    return EXIT_OK


def cmd_bench(args) -> int:
    from minivmm.bench import main as bench_main
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
                       description="Boot GUEST (a built-in name from 'minivmm guests', or an "
                                   ".mvimg file from 'minivmm build') and stream its console to "
                                   "stdout until it shuts down or a bound is reached.")
    r.add_argument("guest", metavar="GUEST", help="built-in guest name, image file, or (with --restore) a state file")
    r.add_argument("--ram", type=_ram, default=16 << 20, metavar="MIB", help="guest RAM in MiB (16..256, default 16)")
    r.add_argument("--mode", choices=["deterministic", "fast"], default="deterministic",
                   help="deterministic: instruction-count slices, reproducible (default); "
                        "fast: host-timeout slices, quicker, not reproducible")
    r.add_argument("--tick", type=int, default=100_000, metavar="N",
                   help="timer period in guest instructions (default 100000)")
    r.add_argument("--ticks", type=int, metavar="N", help="stop after N timer ticks")
    r.add_argument("--instructions", type=int, metavar="N", help="stop after N virtual instructions")
    r.add_argument("--events", action="store_true", help="also print every VMM event to stderr")
    r.add_argument("--no-protection", action="store_true",
                   help="run without process protection: HC_PROTECT fails with -ENOSYS, so the "
                        "attack-* guests show what a hostile kernel gets away with")
    r.add_argument("--key-seed", metavar="TEXT",
                   help="derive protection keys from TEXT, so a run is reproducible down to the "
                        "ciphertext a snooping kernel prints (labs; never for real secrets)")
    r.add_argument("--save-state", metavar="FILE", help="save the machine state to FILE when the run ends")
    r.add_argument("--restore", action="store_true", help="GUEST is a state file from --save-state: continue it")
    r.set_defaults(func=cmd_run)

    g = sub.add_parser("guests", help="list the built-in guest images and programs",
                       description="List the built-in guest images and user programs.")
    g.set_defaults(func=cmd_guests)

    b = sub.add_parser("build", help="write a built-in guest's image to a file",
                       description="Assemble a built-in guest and write its image file.")
    b.add_argument("guest", metavar="GUEST")
    b.add_argument("-o", "--output", required=True, metavar="FILE")
    b.add_argument("--ram", type=_ram, default=16 << 20, metavar="MIB")
    b.set_defaults(func=cmd_build)

    bench = sub.add_parser("bench", help="measure VMM speed against bare Unicorn",
                           description="Run the benchmark: guest instructions per second of a compute "
                                       "loop under the full VMM vs bare Unicorn, as ratios; the cost "
                                       "of process protection (per page, and protected vs "
                                       "unprotected programs in the same run).")
    bench.add_argument("--iterations", type=int, default=3_000_000, metavar="N",
                       help="loop iterations per process (default 3000000)")
    bench.add_argument("--repeat", type=int, default=3, metavar="K", help="take the best of K runs (default 3)")
    bench.add_argument("--part", choices=["all", "compute", "protection"], default="all",
                       help="compute: VMM vs bare Unicorn; protection: cloak/uncloak cost and "
                            "protected vs unprotected programs (default: all)")
    bench.set_defaults(func=cmd_bench)

    for ep in entry_points(group="minivmm.commands"):
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
    except (ValueError, OSError) as exc:        # bad numbers, unreadable files
        print(f"minivmm: {exc}", file=sys.stderr)
        return EXIT_BADINPUT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
