"""``minivmm lab ATTACK [--plain | --insecure DEFENCE]`` and ``minivmm lab --list``
(LAB ONLY): run one whole migration attack scenario (``migrate/lab/scenario.py``)."""

from __future__ import annotations

import sys

from migrate.secure.mode import INSECURE

LAB_ONLY = ("LAB ONLY: runs attack scenarios on loopback with throw-away trust files and TPMs "
            "(docs/lab-migration.md)")


def add_lab(sub) -> None:
    from migrate.lab.scenario import SCENARIOS, list_lines
    import argparse
    p = sub.add_parser("lab", help="run one migration attack scenario (LAB ONLY)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=f"{LAB_ONLY}. Start a destination, a man in the middle or a hook, and a "
                                   "source running the protected secret keeper and a counter; print which "
                                   "defence fired, or with it off the damage. Every process is gone at the end.",
                       epilog="scenarios:\n  " + "\n  ".join(list_lines()))
    p.add_argument("attack", nargs="?", choices=list(SCENARIOS), metavar="ATTACK",
                   help="the scenario (see --list)")
    p.add_argument("--list", action="store_true", help="list the scenarios, one line each")
    p.add_argument("--insecure", action="append", default=[], choices=INSECURE, metavar="DEFENCE",
                   help="turn this defence off on both VMMs (repeatable): " + ", ".join(INSECURE))
    p.add_argument("--plain", action="store_true", help="run both VMMs with the plain engine (no defence)")
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (trust files, TPMs, captures)")
    p.set_defaults(func=cmd_lab, parser=p)


def cmd_lab(args) -> int:
    from migrate.lab.scenario import Lab, list_lines
    if args.list:
        print("\n".join(list_lines()))
        return 0
    if not args.attack:
        args.parser.error("name an ATTACK (or --list)")
    print(f"minivmm lab: {LAB_ONLY}", file=sys.stderr, flush=True)
    lab = Lab(args.attack, insecure=args.insecure, plain=args.plain, workdir=args.keep,
              out=lambda s: print(s, flush=True))
    if args.keep:
        from pathlib import Path
        Path(args.keep).mkdir(parents=True, exist_ok=True)
    try:
        lab.run()
    except KeyboardInterrupt:
        print("minivmm lab: interrupted; every process of the scenario was stopped", file=sys.stderr)
        return 130
    return 0
