"""``minivmm tui`` (and ``minivmm demo`` in a terminal), registered through
the ``minivmm.commands`` entry-point group: minivmm never imports this package."""

from __future__ import annotations

import argparse
import sys

from migrate.secure.mode import INSECURE


def _ram(text: str) -> int:
    v = int(text)
    if not 16 <= v <= 256:
        raise argparse.ArgumentTypeError("guest RAM is 16..256 MiB")
    return v


def _no_terminal() -> bool:
    if sys.stdout.isatty() and sys.stdin.isatty():
        return False
    print("minivmm tui: needs a terminal (standard input and output); for a report in a pipe or a "
          "file use 'minivmm demo'", file=sys.stderr)
    return True


def cmd_tui(args) -> int:
    from tui.app import MigrationApp
    if args.replay:
        from tui.transcript import TranscriptError, read
        try:
            _, frames = read(args.replay)
        except (TranscriptError, OSError) as exc:
            print(f"minivmm tui: cannot replay: {exc}", file=sys.stderr)
            return 2
        if _no_terminal():
            return 2
        MigrationApp(frames=frames, replay_name=args.replay).run()
        return 0
    from tui.live import Scenario
    sc = Scenario(guest=args.guest, ram_mib=args.ram, after=args.after, plain=args.plain,
                  insecure=tuple(sorted(set(args.insecure))), tpm_dir=args.tpm_dir, attack=getattr(args, "attack", None))
    from guests.catalog import get_guest
    try:
        get_guest(sc.guest)         # a bad --guest fails here, before the screen opens
    except (KeyError, LookupError, ValueError) as exc:
        print(f"minivmm tui: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    if _no_terminal():
        return 2
    MigrationApp(scenario=sc, record=args.record, paused=not args.run).run()
    return 0


def add_options(t) -> None:
    t.add_argument("--guest", default="demo", metavar="NAME", help="guest to migrate (default demo)")
    t.add_argument("--ram", type=_ram, default=16, metavar="MIB", help="guest RAM in MiB (16..256, default 16)")
    t.add_argument("--after", type=int, default=20, metavar="TICKS", help="migrate after TICKS ticks (default 20)")
    t.add_argument("--plain", action="store_true", help="plain mode (no attestation, no encryption)")
    t.add_argument("--insecure", action="append", default=[], choices=INSECURE, metavar="DEFENCE",
                   help="turn one defence off on both VMMs (repeatable): " + ", ".join(INSECURE))
    t.add_argument("--attack", choices=_attack_names(), metavar="NAME",
                   help="a network attack of the lab between A and B (docs/tui.md, 'Attacks'): "
                        + ", ".join(_attack_names()))
    t.add_argument("--tpm-dir", metavar="DIR", help="base directory of the two TPMs (default: a fresh temporary one)")
    t.add_argument("--record", metavar="FILE", help="save the session's transcript to FILE (docs/tui.md)")
    t.add_argument("--replay", metavar="FILE", help="open a recorded transcript (no VMM runs)")
    t.add_argument("--run", action="store_true", help="run to the end at once (default: held at the first message)")


def register(sub) -> None:
    t = sub.add_parser("tui", help="watch and step through a live migration (Textual)",
                       description="Source and destination VMMs in this process, a real loopback socket "
                                   "between them; step message by message, phase by phase, round by round; "
                                   "record and replay transcripts. Keys and panels: docs/tui.md.")
    add_options(t)
    t.set_defaults(func=cmd_tui)
    # `minivmm demo` in a terminal opens the TUI; in a pipe or a file (CI,
    # the README's checks) it prints today's report, unchanged.
    demo = sub.choices.get("demo")
    if demo is not None:
        plain_demo = demo.get_default("func")

        demo.add_argument("--report", action="store_true",
                          help="print the report even in a terminal (in a terminal 'demo' opens the TUI: "
                               "'minivmm tui'; in a pipe or a file it always prints the report)")

        def demo_func(args):
            kind, n = args.after
            if args.report or kind != "ticks" or not (sys.stdout.isatty() and sys.stdin.isatty()):
                return plain_demo(args)
            return cmd_tui(argparse.Namespace(guest=args.guest, ram=args.ram, after=int(n), plain=args.plain,
                                              insecure=args.insecure, tpm_dir=args.tpm_dir, record=None,
                                              replay=None, run=False))
        demo.set_defaults(func=demo_func)


def _attack_names() -> list[str]:
    from tui.attacks import SCENARIOS
    return list(SCENARIOS)
