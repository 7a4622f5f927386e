"""The migration commands, added to ``minivmm`` through the ``minivmm.commands``
entry-point group (``minivmm`` never imports this package).

* ``minivmm serve --listen HOST:PORT`` -- a destination VMM: waits for one VM
  (``--count N``, ``--forever``), resumes it, streams its console and runs it
  to the end (or migrates it on with ``--migrate-to``).
* ``minivmm run GUEST --migrate-to HOST:PORT --after N|Ns`` -- a source VMM:
  ``register`` extends minivmm's own ``run`` parser with the migration options
  and wraps its handler; without ``--migrate-to``, ``run`` is unchanged.
* ``minivmm demo`` -- the README's main job (``migrate/demo.py``).
* ``minivmm bench-migrate`` -- the migration benchmark (``migrate/bench.py``).

Exit status of ``run --migrate-to`` (and ``serve --migrate-to``): see
``EXIT_STATUS`` below (also in ``--help`` and the README).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import signal
import sys
import time
import traceback
from pathlib import Path

from minivmm.cli import count, mib
from minivmm.errors import GuestError
from migrate import events as mev, fault
from migrate.errors import CommitUnconfirmed, GuestStopped, InternalError, MigrationError
from migrate.measure import default_tpm_dir, measure_start
from migrate.precopy import PrecopyPolicy
from migrate.lab import hooks as lab_hooks
from migrate.secure import cliopts as secure_cli
from migrate.secure.setup import protection_policy
from migrate.wire import VERSION, parse_address

EXIT_OK, EXIT_CRASH, EXIT_BADINPUT, EXIT_BOUND, EXIT_UNCONFIRMED, EXIT_NOT_MIGRATED = 0, 1, 2, 3, 4, 5
EXIT_STATUS = ("exit status with --migrate-to: 0 migrated (the destination confirmed it resumed the "
               "guest); 5 not migrated (the migration failed or was abandoned, or the guest shut down "
               "first: it ran here instead, to its end or a bound); 4 committed but unconfirmed (the "
               "guest may run there or nowhere, never twice; its paused state is saved here); 1 the "
               "guest crashed (here); 2 bad input")


def parse_after(text: str) -> tuple[str, float]:
    """``N`` ticks, ``Ns`` seconds, ``Nms`` milliseconds, or ``signal``
    (when the running VMM receives SIGUSR1: a migrate command sent to it)."""
    if text.strip() == "signal":
        return "signal", 0
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"--after takes N (ticks), Ns, Nms or 'signal', not {text!r}")
    value, unit = float(m.group(1)), m.group(2)
    if unit is None:
        if not value.is_integer():
            raise argparse.ArgumentTypeError("ticks must be a whole number")
        return "ticks", int(value)
    return "seconds", value / 1000 if unit == "ms" else value


def _address(text: str) -> str:
    try:
        parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _positive(kind):
    def conv(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
        return value
    return conv


def _nonnegative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value


def _say(role: str, text: str) -> None:
    print(f"minivmm {role}: {text}", file=sys.stderr, flush=True)


def migration_options(p: argparse.ArgumentParser, *, source: bool) -> None:
    g = p.add_argument_group("live migration (migrate package)", EXIT_STATUS if source else None)
    if source:
        g.add_argument("--migrate-to", type=_address, metavar="HOST:PORT",
                       help="live-migrate the running guest to a 'minivmm serve' there")
        g.add_argument("--after", type=parse_after, default=None, metavar="N|Ns|signal",
                       help="start migrating after N timer ticks (default 10), after N seconds "
                            "('2s', '500ms'), or when the VMM receives SIGUSR1 ('signal')")
        g.add_argument("--downtime-ms", type=_positive(float), default=30.0, metavar="MS",
                       help="pre-copy stops when the dirty set fits this downtime target (default 30)")
        g.add_argument("--max-rounds", type=_positive(int), default=30, metavar="N",
                       help="pre-copy stops after N rounds at most (default 30)")
        g.add_argument("--max-bytes-ratio", type=_positive(float), default=3.0, metavar="X",
                       help="pre-copy stops before sending more than X times guest RAM (default 3)")
        g.add_argument("--round-ticks", type=_nonnegative_int, default=0, metavar="N",
                       help="lockstep pre-copy: the guest waits while the source connects and attests and "
                            "while each round is sent, and runs exactly N timer ticks between rounds "
                            "(default 0: it runs freely beside the copy); what a round copies and dirties then "
                            "no longer depends on the host's speed (the migration lab uses 8)")
        g.add_argument("--check-ram", action="store_true",
                       help="at pause, hash all guest RAM and refuse to commit if it differs from what "
                            "was sent (a dirty-log self-check; adds to the downtime)")
    g.add_argument("--timeout", type=_positive(float), default=10.0, metavar="S",
                   help="seconds to wait for any one record from the peer (default 10)")
    g.add_argument("--tpm-dir", metavar="DIR",
                   help="this VMM's software TPM state directory (default: $MINIVMM_TPM_STATE/<role> "
                        "or .minivmm-tpm/<role>, role = source or destination)")
    secure_cli.add_options(g)
    fault.add_options(g)


DEFAULT_AFTER = ("ticks", 10)
SOURCE_ONLY = ("--after", "--downtime-ms", "--max-rounds", "--max-bytes-ratio", "--round-ticks", "--check-ram")


def _refuse_source_options_without_target(parser: argparse.ArgumentParser, args) -> None:
    """``--after 3`` without ``--migrate-to`` would be silently ignored: refuse it."""
    if getattr(args, "migrate_to", None):
        return
    given = [opt for opt in SOURCE_ONLY
             if getattr(args, opt[2:].replace("-", "_")) != parser.get_default(opt[2:].replace("-", "_"))]
    if given:
        parser.error(f"{', '.join(given)} only mean something with --migrate-to HOST:PORT")


def _policy(args) -> PrecopyPolicy:
    return PrecopyPolicy(downtime_target=args.downtime_ms / 1000, max_rounds=args.max_rounds,
                         max_bytes_ratio=args.max_bytes_ratio, round_ticks=args.round_ticks)


def _config(role: str, args, machine_mode=None) -> dict:
    """The canonical configuration measured into PCR 9: what changes the
    VMM's behaviour, not where it listens."""
    cfg = {"role": role, "migration_protocol": VERSION, "secure": secure_cli.mode_name(args) == "secure",
           "timeout": args.timeout}
    if getattr(args, "migrate_to", None):
        cfg["precopy"] = _policy(args).to_dict()
        cfg["check_ram"] = bool(args.check_ram)
    if getattr(args, "fault", None) is not None:     # a lab configuration: on record
        cfg["fault"] = str(args.fault)
    for key in ("mode", "tick"):
        if getattr(args, key, None) is not None:
            cfg[key] = getattr(args, key)
    return cfg


def _tpm_dir(args, role: str) -> Path:
    return Path(args.tpm_dir) if args.tpm_dir else default_tpm_dir(role)


def _measure(role: str, args):
    secure_cli.check(args)
    tpm_dir = _tpm_dir(args, role)
    # PCR 10: protection, key source, migration mode and any defence turned off
    # (a seeded key source is measured as the seed's hash, never the seed).
    policy = protection_policy(mode=secure_cli.mode_name(args), insecure=getattr(args, "insecure", ()),
                               protection=not getattr(args, "no_protection", False),
                               key_seed=getattr(args, "key_seed", None),
                               behaviour=lab_hooks.behaviour(args))
    m = measure_start(tpm_dir, _config(role, args), policy)
    who = "serve" if role == "destination" else "run"
    _say(who, m.describe())
    trusted = secure_cli.prepare(args, tpm_dir)     # secure: certify; measure issuer + policy
    if trusted:
        _say(who, trusted)
    _say(who, secure_cli.announce(args))
    lab_hooks.announce(args, who)
    if fault.announce(args):
        _say(who, fault.announce(args))
    return m


def _stream(machine, args) -> None:
    # minivmm's printer: the console on stdout, --events one per line on
    # stderr, never in the middle of a console line.
    from minivmm.cli import EventPrinter
    EventPrinter("text" if getattr(args, "events", False) else None, reports=False).attach(machine)


def _events_printer(args):
    if not getattr(args, "events", False):
        return None
    bus = mev.EventBus()
    bus.subscribe(lambda e: print(f"  [migration] {e}", file=sys.stderr, flush=True))
    return bus


def _summary(role: str, machine, result: str, args=None) -> None:
    from minivmm.cli import outcome
    _say(role, outcome(result, machine, args))


def _save_for_recovery(machine, args, mode=None) -> None:
    """After an unconfirmed commit the guest may run nowhere: keep its paused
    state, runnable, for an operator who has checked that the destination
    did not resume it (resuming both would run two copies).  Secure mode: the
    file holds the process keys, so it is sealed to this host's TPM."""
    path = getattr(args, "save_state", None) or f"unconfirmed-{machine.image.name}-{os.getpid()}.mvstate"
    hint = mode.save_recovery(machine, path + ".sealed") if mode is not None else None
    if hint:
        _say("run", hint)
        return
    halted, detail = machine.halted, machine.halt_detail
    machine.halted, machine.halt_detail = None, ""
    try:
        machine.save(path, wrap=getattr(args, "key_wrap", None))
    finally:
        machine.halted, machine.halt_detail = halted, detail
    _say("run", f"the paused guest is saved in {path}; ONLY if the destination did not resume it, "
                f"continue it with: minivmm run {path} --restore")


def _report_to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)        # stdout is the guest's console


def run_guest(machine, args, *, role: str, show_report=_report_to_stderr) -> int:
    """Run ``machine``; with ``args.migrate_to``, migrate it after ``args.after``.
    On any migration failure before commit the guest simply carries on here.
    ``show_report(text)`` prints the migration report (``demo`` puts it on stdout)."""
    from migrate.source import Source
    say = "run" if role == "source" else "serve"
    if getattr(args, "migrate_to", None):
        kind, n = args.after or DEFAULT_AFTER
        tick0, t0 = machine.ticks, time.monotonic()
        if kind == "signal":
            # The migrate command: SIGUSR1 only sets a flag; the run loop looks
            # at it between slices, where a migration may start.
            asked = []
            signal.signal(signal.SIGUSR1, lambda signum, frame: asked.append(True))
            _say(say, f"will migrate to {args.migrate_to} on SIGUSR1 (kill -USR1 {os.getpid()})")
            until = lambda m: bool(asked)   # noqa: E731
        elif kind == "ticks":
            until = lambda m: m.ticks - tick0 >= n   # noqa: E731
        else:
            until = lambda m: time.monotonic() - t0 >= n   # noqa: E731
        try:
            result = machine.run(until=until)
        except GuestError as exc:
            _say(say, str(exc))
            return EXIT_CRASH
        not_migrated = True         # unless the destination confirms below
        if result == "shutdown":
            _say(say, "the guest shut down before --after; nothing to migrate")
        else:
            _say(say, f"migrating to {args.migrate_to} at tick {machine.ticks}, vclock {machine.vclock} ...")
            mode = secure_cli.session_mode(args, _tpm_dir(args, role))
            channel = fault.wrap(lambda sock, timeout: mode.channel(sock, timeout=timeout, role="source"),
                                 args, say)
            src = Source(machine, policy=_policy(args), timeout=args.timeout, check_ram=args.check_ram,
                         events=_events_printer(args), mode=mode, channel=channel)
            try:
                report = src.migrate(args.migrate_to)
            except CommitUnconfirmed as exc:
                show_report(exc.report.format())
                _say(say, f"{exc}")
                _save_for_recovery(machine, args, src.mode)
                return EXIT_UNCONFIRMED
            except GuestStopped as exc:
                _say(say, f"migration abandoned: {exc}")
            except MigrationError as exc:
                report = getattr(exc, "report", None)
                if report is not None:
                    show_report(report.format())
                _say(say, f"migration to {args.migrate_to} failed: {exc}; the guest continues here")
            except GuestError as exc:
                _say(say, f"migration abandoned, {exc}")
                return EXIT_CRASH
            else:
                show_report(report.format())
                _say(say, f"the guest now runs at {args.migrate_to}; this VMM is done")
                if not lab_hooks.double_resume(args, machine):
                    return EXIT_OK
                machine.halted, machine.halt_detail = None, ""      # LAB ONLY: a second copy
                not_migrated = False
    else:
        not_migrated = False
    until_tick = getattr(args, "until_tick", None)
    try:
        if machine.halted == "shutdown":
            result = "shutdown"
        elif until_tick is not None:
            result = machine.run(until=lambda m: m.ticks >= until_tick)
            result = "ticks" if result == "condition" else result
        else:
            result = machine.run(max_ticks=getattr(args, "ticks", None),
                                 max_instructions=getattr(args, "instructions", None))
    except GuestError as exc:
        _say(say, str(exc))
        return EXIT_CRASH
    finally:
        if getattr(args, "save_state", None) and machine.halted != "migrated":
            machine.save(args.save_state, wrap=getattr(args, "key_wrap", None))
    _summary(say, machine, result, args)
    if not_migrated:
        _say(say, f"not migrated (exit status {EXIT_NOT_MIGRATED}): the guest ran here")
        return EXIT_NOT_MIGRATED
    return EXIT_OK if result == "shutdown" else EXIT_BOUND


# ----------------------------------------------------------------------- run
def _state_files(args, role: str) -> None:
    """The seams of minivmm's ``run`` (and ``serve --save-state``): process keys
    in a state file are sealed to this role's TPM (``--tpm-dir``), and a
    restored state that is an old copy of a VM that left this host is refused
    (``migrate/secure/statekeys.py``, ``migrate/secure/rollback.py``)."""
    from migrate.secure.rollback import check_restore
    from migrate.secure.statekeys import TpmKeyWrap
    tpm_dir = _tpm_dir(args, role)
    args.key_wrap = TpmKeyWrap(tpm_dir)
    args.check_restore = lambda machine, where: check_restore(machine, tpm_dir, where)


def _extend_run(run_parser: argparse.ArgumentParser) -> None:
    migration_options(run_parser, source=True)
    lab_hooks.add_run_options(run_parser)
    plain_run = run_parser.get_default("func")

    def cmd_run(args) -> int:
        _refuse_source_options_without_target(run_parser, args)
        _state_files(args, "source")
        if not args.migrate_to:
            if args.fault or args.trace_steps:
                run_parser.error("--fault and --trace-steps only mean something with --migrate-to HOST:PORT")
            return plain_run(args)
        from minivmm.cli import check_run_args, machine_from_args
        check_run_args(run_parser, args)
        _measure("source", args)
        machine = machine_from_args(args)
        _stream(machine, args)
        gc.freeze()
        return run_guest(machine, args, role="source")
    run_parser.set_defaults(func=cmd_run)


# --------------------------------------------------------------------- serve
def cmd_serve(args) -> int:
    from migrate.destination import Destination
    from migrate.reserve import RamReserve
    from migrate.server import Server
    _refuse_source_options_without_target(args.parser, args)
    _state_files(args, "destination")
    _measure("destination", args)
    gc.freeze()             # start-up objects never need collecting: cheap collections later
    early: list = []            # serve --lab-resume-early: its hook per session
    server = Server(args.listen, timeout=args.timeout,
                    channel=lab_hooks.wrap_destination_channel(
                        fault.wrap(secure_cli.channel_factory(args, "destination"), args, "serve"), args, early))
    _say("serve", f"listening on {server.label} (migration protocol v{VERSION}, "
                  f"{secure_cli.mode_name(args)} mode)")
    if args.port_file:
        tmp = Path(str(args.port_file) + ".tmp")
        tmp.write_text(f"{server.address[1]}\n")
        os.replace(tmp, args.port_file)
    status, done = EXIT_OK, 0
    reserve = RamReserve(args.reserve_ram << 20) if args.reserve_ram else None
    try:
        while args.forever or done < args.count:
            ch, peer = server.next_connection("busy: another migration is arriving")
            _say("serve", f"incoming migration from {peer}")
            dest, incoming = None, None
            try:
                mode = lab_hooks.apply_destination(args, secure_cli.session_mode(args, _tpm_dir(args, "destination")))
                dest = Destination(timeout=args.timeout, events=_events_printer(args), mode=mode, reserve=reserve)
                incoming = dest.receive(ch, peer)
                m = incoming.machine
            except MigrationError as exc:
                m = lab_hooks.resumed_early(args, early, dest)
                if m is None:
                    if isinstance(exc, InternalError):
                        traceback.print_exception(exc.__cause__ or exc, file=sys.stderr)
                    _say("serve", f"incoming migration from {peer} failed: {exc}; everything received "
                                  f"was discarded, nothing resumed")
                    continue
            finally:
                ch.close()
                if reserve is not None:
                    reserve.refill()        # backed while the guest runs, for the next one
            server.set_busy_reason("busy: running a migrated guest")
            if incoming is not None:
                print(incoming.report.format(), file=sys.stderr, flush=True)     # stdout is the guest's console
            _say("serve", f"resumed guest {m.image.name!r} at tick {m.ticks}, vclock {m.vclock}")
            _stream(m, args)
            try:
                rc = run_guest(m, args, role="destination")
            except Exception as exc:        # noqa: BLE001 - a VMM error in one guest must not end the server
                traceback.print_exception(exc, file=sys.stderr)
                _say("serve", f"the received guest stopped on a VMM error: {type(exc).__name__}: {exc}; "
                              f"serving on")
                rc = EXIT_CRASH
            status = max(status, rc)
            done += 1
    finally:
        server.close()
        if reserve is not None:
            reserve.close()
    return status


def _add_serve(sub) -> None:
    s = sub.add_parser("serve", help="wait for a live-migrated guest and run it",
                       description="A destination VMM: listen on HOST:PORT, receive a live migration, "
                                   "resume the guest and stream its console until it shuts down. "
                                   "One migration at a time; a second concurrent one is refused.")
    s.add_argument("--listen", required=True, type=_address, metavar="HOST:PORT",
                   help="address to listen on (port 0: pick a free one and print it)")
    n = s.add_mutually_exclusive_group()
    n.add_argument("--count", type=_positive(int), default=1, metavar="N",
                   help="receive N guests one after another, then exit (default 1)")
    n.add_argument("--forever", action="store_true", help="receive guests until interrupted")
    s.add_argument("--port-file", metavar="FILE", help="write the port number to FILE once listening")
    s.add_argument("--save-state", metavar="FILE",
                   help="save each received guest's final machine state to FILE (overwritten)")
    s.add_argument("--ticks", type=count(0), metavar="N", help="stop each received guest after N more ticks")
    s.add_argument("--until-tick", type=count(0), metavar="T",
                   help="stop each received guest when its timer has delivered T ticks since boot "
                        "(compare with 'minivmm run GUEST --ticks T')")
    s.add_argument("--events", action="store_true", help="print VMM and migration events to stderr")
    s.add_argument("--reserve-ram", type=mib, default=0, metavar="MIB",
                   help="back MIB of guest RAM before a migration arrives (held while idle), so that "
                        "receiving pages does not wait for the host to allocate and zero memory; a guest "
                        "of up to MIB takes it (default: none)")
    migration_options(s, source=True)
    lab_hooks.add_serve_options(s)
    s.set_defaults(func=cmd_serve, parser=s)


# ---------------------------------------------------------------- demo/bench
def _add_demo(sub) -> None:
    d = sub.add_parser("demo", help="live-migrate the demo guest between two VMM processes",
                       description="Start 'minivmm serve' as a child process on a free loopback port, "
                                   "boot the demo guest here, live-migrate it there after a few ticks, "
                                   "and print both consoles and the migration report.")
    d.add_argument("--guest", default="demo", metavar="GUEST", help="guest to migrate (default demo)")
    d.add_argument("--after", type=parse_after, default=("ticks", 20), metavar="N|Ns",
                   help="migrate after N ticks (default 20)")
    d.add_argument("--ram", type=mib, default=16, metavar="MIB", help="guest RAM in MiB (16..256, default 16)")
    d.add_argument("--tpm-dir", metavar="DIR", help="base directory of the two TPMs, the issuer and the "
                   "policy (default $MINIVMM_TPM_STATE or .minivmm-tpm; source/ and destination/ below it)")
    d.add_argument("--plain", action="store_true", help="plain mode (no attestation, no encryption)")
    d.add_argument("--insecure", action="append", default=[], choices=secure_cli.INSECURE, metavar="DEFENCE",
                   help="turn one defence off on both VMMs (repeatable); the demo's policy approves it")

    def run(args):
        from migrate.demo import main
        return main(args)
    d.set_defaults(func=run)


def _add_bench(sub) -> None:
    b = sub.add_parser("bench-migrate", help="measure live migration: time, downtime, bytes, rounds",
                       description="Migrate 16/64/256 MiB guests (idle, dirtier at two rates, counter) "
                                   "to a 'minivmm serve' child process over loopback, and measure raw "
                                   "loopback TCP throughput as the ceiling. Reports numbers; not a test.")
    b.add_argument("--sizes", default="16,64,256", metavar="MIB,...", help="guest sizes (default 16,64,256)")
    b.add_argument("--repeat", type=_positive(int), default=1, metavar="K",
                   help="runs per case, best downtime kept (default 1); the secure-vs-plain table "
                        "shows the median of K runs of each mode")
    b.add_argument("--quick", action="store_true", help="only 16 MiB, idle and counter (smoke test)")
    b.add_argument("--secure-only", action="store_true",
                   help="only the secure-vs-plain table (both modes, alternating, medians)")

    def run(args):
        from migrate.bench import main
        return main(args)
    b.set_defaults(func=run)


def register(sub) -> None:
    _extend_run(sub.choices["run"])
    _add_serve(sub)
    secure_cli.add_setup_command(sub)
    secure_cli.add_recover_command(sub)
    _add_demo(sub)
    _add_bench(sub)
    from migrate.lab import lab_cli, mitm_cli
    mitm_cli.add_mitm(sub)
    lab_cli.add_lab(sub)
