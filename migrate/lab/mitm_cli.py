"""``minivmm mitm``: a record-aware man in the middle between two VMMs (lab only).

    minivmm mitm --listen HOST:PORT --forward HOST:PORT [--attack NAME] [--capture FILE]

Accepts one source (``--count N``: N, one after the other), connects to the
destination, and forwards each record, logging one line per record on
stderr: direction, sequence number, type, size and, where it can read it,
what the body says.  ``--attack NAME`` meddles (``migrate/lab/attacks.py``);
``--capture FILE`` writes everything that crossed (capture format:
``migrate/lab/capture.py``, docs/lab-migration.md).
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from migrate.lab import capture as cap
from migrate.lab.attacks import ATTACKS, STANDALONE, make_attack
from migrate.lab.relay import Relay
from migrate.wire import parse_address

LAB_ONLY = "LAB ONLY: an attack tool for the migration lab (docs/lab-migration.md); never on a real network"


def say(text: str) -> None:
    print(f"minivmm mitm: {text}", file=sys.stderr, flush=True)


def _address(text: str):
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_mitm(sub) -> None:
    names = [*ATTACKS, *STANDALONE]
    p = sub.add_parser("mitm", help="a man in the middle between two migrating VMMs (LAB ONLY)",
                       description=f"{LAB_ONLY}. Relay one migration (or --count N) from the sources "
                                   "that connect to --listen to the destination at --forward, record by "
                                   "record, logging each (direction, sequence, type, size, readable body) "
                                   "and optionally attacking it.",
                       epilog="attacks: " + "; ".join(f"{n}: {(ATTACKS[n].summary if n in ATTACKS else STANDALONE[n])}"
                                                       for n in names))
    p.add_argument("--listen", required=True, type=_address, metavar="HOST:PORT",
                   help="where sources connect (port 0: pick one and print it)")
    p.add_argument("--forward", type=_address, metavar="HOST:PORT",
                   help="the destination VMM ('minivmm serve'); not used by impersonate")
    p.add_argument("--attack", default="none", choices=names, metavar="NAME",
                   help="what to do to the stream (default none: forward and log); " + ", ".join(names))
    p.add_argument("--capture", metavar="FILE", help="write every record that crossed to FILE (capture format v1)")
    p.add_argument("--count", type=int, default=1, metavar="N", help="relay N connections, then exit (default 1)")
    p.add_argument("--delay", type=float, default=12.0, metavar="S",
                   help="delay: seconds to hold the COMMIT (default 12, past the default 10 s deadline)")
    p.add_argument("--replay", metavar="FILE", help="replay-stream: the capture of an earlier migration")
    p.add_argument("--plain", action="store_true", help="impersonate: speak plain mode (default: secure)")
    p.add_argument("--port-file", metavar="FILE", help="write the listening port to FILE")
    p.add_argument("--quiet", action="store_true", help="no line per record (findings only)")
    p.set_defaults(func=cmd_mitm, parser=p)


def cmd_mitm(args) -> int:
    if args.attack not in ("impersonate",) and args.forward is None:
        args.parser.error("--forward HOST:PORT is required (except for --attack impersonate)")
    if args.attack == "replay-stream" and not args.replay:
        args.parser.error("--attack replay-stream needs --replay CAPTURE_FILE")
    if args.count < 1:
        args.parser.error("--count must be at least 1")
    say(LAB_ONLY)
    log = None if args.quiet else say
    if args.attack == "replay-stream":
        from migrate.lab.standalone import replay_stream
        try:
            entries = cap.load(args.replay)
        except (OSError, cap.CaptureError) as exc:
            raise ValueError(f"--replay {args.replay}: {exc}") from None
        for line in replay_stream(entries, args.forward, log=log or (lambda s: None)):
            say(f"ATTACK replay-stream: {line}")
        return 0
    writer = cap.CaptureWriter(args.capture) if args.capture else None
    try:
        if args.attack == "impersonate":
            from migrate.lab.standalone import impersonate
            listener = socket.create_server(args.listen)
            _announce(listener.getsockname()[1], args)
            try:
                for _ in range(args.count):
                    for line in impersonate(listener, secure=not args.plain, log=say):
                        say(f"ATTACK impersonate: {line}")
            finally:
                listener.close()
            return 0
        port = None         # the first relay's port: later connections listen on it again
        for i in range(args.count):
            relay = Relay(args.forward, listen=args.listen if i == 0 else (args.listen[0], port),
                          capture=writer, log=log, start=False)
            port = relay.port
            attack = make_attack(args.attack, relay, delay=args.delay)
            relay.meddle, relay.meddle_back = attack.to_dest, attack.to_source
            if i == 0:
                _announce(port, args)
            relay.thread.start()
            relay.done.wait()
            say(f"connection {i + 1} ended: {len(relay.seen)} records src->dst, "
                f"{len(relay.seen_back)} dst->src" + (f" ({relay.error})" if relay.error else ""))
            for line in attack.findings():
                say(f"ATTACK {args.attack}: {line}")
    finally:
        if writer is not None:
            writer.close()
            say(f"capture written to {args.capture}")
    return 0


def _announce(port: int, args) -> None:
    say(f"listening on {args.listen[0]}:{port} (attack {args.attack})"
        + (f", forwarding to {args.forward[0]}:{args.forward[1]}" if args.forward else ""))
    if args.port_file:
        tmp = Path(str(args.port_file) + ".tmp")
        tmp.write_text(f"{port}\n")
        tmp.replace(args.port_file)
