"""``minivmm bench-migrate``: what live migration costs here.

For each guest size (16, 64, 256 MiB) and workload, boot the guest in this
process (VMM A), let it run 20 ticks, and live-migrate it to a ``minivmm
serve --forever`` child process (VMM B) over loopback TCP; report total
time, downtime, bytes on the wire, rounds and why pre-copy stopped.  In the
same run, measure raw loopback TCP throughput between two processes (1 MiB
``sendall`` into ``recv_into``) as the ceiling.

Workloads:

* ``idle``       processes asleep; guest RAM mostly never touched (zero pages)
* ``idle-full``  the same, with every free page of guest RAM filled with
                 random bytes first (a guest that has used its memory): the
                 pages must really cross the wire
* ``dirty-low``  a busy counter plus a dirtier writing 256 pages every 8 ticks
* ``dirty-high`` a busy counter plus a dirtier writing 2048 pages every tick
* ``counter``    the counter alone (the downtime goal's workload)

Migration throughput is reported two ways, each also as a fraction of the
ceiling: guest RAM migrated per second (zero pages count, as in QEMU's and
Xen's figures; it can exceed the ceiling, since zero pages barely cross) and
bytes on the wire per second.  With ``--repeat K`` each case runs K times and
the run with the lowest downtime is shown.

Each case announces itself on stderr before it runs; the two goals (a 256
MiB idle guest at >= 50% of the ceiling, downtime <= 30 ms for a 64 MiB
guest running the counter) get a verdict (``minivmm/verdict.py``) when their
case was measured.

Secure vs plain: in the same run, a second destination (``serve`` in the
secure mode, with an issuer and a policy made for the run) receives the same
workloads -- plus ``protected``, a secret keeper under process protection
beside the counter -- migrated alternately in plain and in secure mode, and
the table gives secure/plain ratios of total time and downtime, with the
handshake (key exchange + mutual attestation) and key-release (fresh quote,
sealed release key, wrap) times on their own.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from guests.build import Program, build_image
from migrate.measure import measure_start
from migrate.precopy import PrecopyPolicy
from migrate.secure.attest import Attestor
from migrate.secure.mode import SecureMode
from migrate.secure.setup import certify, protection_policy, setup
from migrate.source import Source
from minivmm.machine import Machine
from minivmm.verdict import Goal, Progress, summary

GOALS = {(256, "idle"): (Goal("256 MiB idle guest, RAM migrated vs loopback ceiling", ">=", 50, "%"), "ram_pct"),
         (64, "counter"): (Goal("64 MiB counter guest, downtime", "<=", 30, " ms"), "downtime_ms")}
SECURE_GOALS = (Goal("64 MiB protected guest, secure/plain total time", "<=", 1.15, "x"),
                Goal("64 MiB protected guest, secure/plain downtime", "<=", 1.25, "x"))

SINK = textwrap.dedent("""
    import socket, sys
    s = socket.create_server(("127.0.0.1", 0)); print(s.getsockname()[1], flush=True)
    c, _ = s.accept(); buf = bytearray(1 << 20); v = memoryview(buf); n = 0
    while True:
        k = c.recv_into(v)
        if not k: break
        n += k
    c.sendall(str(n).encode()); c.close()
""")


def loopback_ceiling(total: int = 256 << 20) -> float:
    """Bytes per second from this process to another over loopback TCP."""
    import socket
    child = subprocess.Popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())
        sock = socket.create_connection(("127.0.0.1", port))
        chunk = os.urandom(1 << 20)
        t0 = time.perf_counter()
        for _ in range(total >> 20):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        got = int(sock.recv(64))
        elapsed = time.perf_counter() - t0
        sock.close()
        assert got == total
        return total / elapsed
    finally:
        child.wait(timeout=30)


def workload(name: str, ram: int):
    sleeper = Program.builtin("dirtier", data_pages=1, args=(1, 0, 1000), as_name="sleeper")
    busy = Program.builtin("counter", args=(0, 100_000))
    if name in ("idle", "idle-full"):
        progs = [sleeper]
    elif name == "dirty-low":
        progs = [busy, Program.builtin("dirtier", data_pages=256, args=(256, 0, 8))]
    elif name == "dirty-high":
        progs = [busy, Program.builtin("dirtier", data_pages=2048, args=(2048, 0, 1))]
    elif name == "counter":
        progs = [busy]
    elif name == "protected":
        progs = [busy, Program.builtin("keeper", data_pages=64, args=(1000, 1))]
    else:
        raise ValueError(name)
    return build_image(progs, name=f"bench-{name}", ram_size=ram)


def prepare(name: str, ram: int) -> Machine:
    m = Machine(workload(name, ram), ram_size=ram)
    if name == "idle-full":
        # Fill every page the image does not use with random bytes (the guest
        # never maps them, so it runs exactly as before).
        start = -(-m.image.min_ram // 4096) * 4096
        rng = np.random.default_rng(1)
        m.ram.array[start:] = rng.integers(0, 256, size=m.ram.size - start, dtype=np.uint8)
    m.run(max_ticks=20)
    return m


def _start_destination(tmp: Path, name: str, mode_args: list[str]):
    port_file = tmp / f"port-{name}"
    dest = subprocess.Popen([sys.executable, "-m", "minivmm_boot", "serve", "--listen", "127.0.0.1:0",
                             "--forever", "--ticks", "1", "--port-file", str(port_file), "--reserve-ram", "256",
                             "--tpm-dir", str(tmp / f"tpm-{name}"), *mode_args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not port_file.exists():
        if dest.poll() is not None or time.monotonic() > deadline:
            return dest, None
        time.sleep(0.02)
    return dest, f"127.0.0.1:{int(port_file.read_text())}"


class NoDestination(RuntimeError):
    """A destination VMM of the benchmark did not start."""


@contextlib.contextmanager
def destinations(tmp: Path):
    """The benchmark's two peers in ``tmp``: trust set-up, a plain and a secure
    ``serve --forever`` destination, and this process's certified source TPM.
    Yields (plain address, secure address, the source's Attestor); the
    destinations are stopped on exit.  NoDestination if one did not start."""
    issuer, policy = setup(tmp / "trust")
    dest, plain_addr = _start_destination(tmp, "plain", ["--plain"])
    sdest, secure_addr = _start_destination(tmp, "secure", ["--issuer", str(issuer), "--attest-policy", str(policy)])
    try:
        if plain_addr is None or secure_addr is None:
            raise NoDestination("a destination VMM did not start")
        src_tpm = tmp / "tpm-source"
        measure_start(src_tpm, {"role": "source", "bench": True}, protection_policy())
        certify(src_tpm, issuer)
        yield plain_addr, secure_addr, Attestor(src_tpm, issuer, policy)
    finally:
        for d in (dest, sdest):
            d.kill()
            d.wait()


def secure_vs_plain(sizes, cases, repeat, plain_addr, secure_addr, attestor) -> list:
    """Same guests, same run: plain and secure alternately; ratios and phase
    times.  Returns the verdicts of the secure goals (64 MiB, protected)."""
    verdicts: list = []
    print(f"\nsecure vs plain (same guests, alternating; median of {repeat} run(s) of each)")
    print(f"{'RAM':>4} {'workload':10} {'plain ms':>9} {'secure ms':>9} {'total x':>7} "
          f"{'plain down':>10} {'secure down':>11} {'down x':>6} {'handshake ms':>12} {'key release ms':>14}")
    for mib in sizes:
        for case in cases:
            runs = {"plain": [], "secure": []}
            for _ in range(repeat):
                for kind in ("plain", "secure"):
                    m = prepare(case, mib << 20)
                    mode = SecureMode(attestor) if kind == "secure" else None
                    runs[kind].append(Source(m, mode=mode).migrate(secure_addr if kind == "secure" else plain_addr))
                    time.sleep(0.2)
            med = {k: {f: float(np.median([getattr(r, f) for r in v])) for f in ("total_seconds", "downtime_seconds")}
                   for k, v in runs.items()}
            phase = {f: float(np.median([r.phases.get(f, 0) for r in runs["secure"]]))
                     for f in ("attestation", "key_release")}
            p, s = SimpleNamespace(**med["plain"]), SimpleNamespace(**med["secure"])
            print(f"{mib:4d} {case:10} {p.total_seconds * 1e3:9.1f} {s.total_seconds * 1e3:9.1f} "
                  f"{s.total_seconds / p.total_seconds:7.2f} {p.downtime_seconds * 1e3:10.2f} "
                  f"{s.downtime_seconds * 1e3:11.2f} {s.downtime_seconds / p.downtime_seconds:6.2f} "
                  f"{phase['attestation'] * 1e3:12.1f} {phase['key_release'] * 1e3:14.1f}",
                  flush=True)
            if mib == 64 and case == "protected":
                for goal, value in ((SECURE_GOALS[0], s.total_seconds / p.total_seconds),
                                    (SECURE_GOALS[1], s.downtime_seconds / p.downtime_seconds)):
                    verdicts.append((goal, value))
                    print(f"     {goal.name}: {value:.2f}{goal.unit}  {goal.verdict(value)}", flush=True)
    return verdicts


def main(args) -> int:
    sizes = [16] if args.quick else [int(s) for s in str(args.sizes).split(",")]
    cases = ["idle", "counter"] if args.quick else ["idle", "idle-full", "dirty-low", "dirty-high", "counter"]
    with tempfile.TemporaryDirectory(prefix="minivmm-bench-") as tmp:
        try:
            with destinations(Path(tmp)) as (address, saddress, attestor):
                return _tables(args, sizes, cases, address, saddress, attestor)
        except NoDestination as exc:
            print(f"bench-migrate: {exc}", file=sys.stderr)
            return 1


def _tables(args, sizes, cases, address, saddress, attestor) -> int:
    """The plain table (unless --secure-only), then the secure-vs-plain table."""
    progress = Progress("bench-migrate", 1 + (0 if args.secure_only else len(sizes) * len(cases) * args.repeat))
    with progress.step("loopback TCP ceiling, 256 MiB between two processes"):
        ceiling = loopback_ceiling()
    print(f"loopback TCP ceiling (two processes, 1 MiB sendall): {ceiling / 1e6:.0f} MB/s")
    print(f"pre-copy policy: {PrecopyPolicy().to_dict()}")
    print(f"{'RAM':>4} {'workload':10} {'total ms':>9} {'downtime ms':>11} {'bytes sent':>11} "
          f"{'rounds':>6} {'RAM MB/s':>8} {'RAM/ceil':>8} {'wire MB/s':>9} {'wire/ceil':>9}  "
          f"dirty rate (pages/s)  stop")
    verdicts = []
    for mib in ([] if args.secure_only else sizes):
        for case in cases:
            best = None
            for k in range(args.repeat):
                with progress.step(f"{mib} MiB {case} guest: boot, run 20 ticks, migrate"
                                   + (f" (run {k + 1} of {args.repeat})" if args.repeat > 1 else "")):
                    m = prepare(case, mib << 20)
                    report = Source(m).migrate(address)
                if best is None or report.downtime_seconds < best.downtime_seconds:
                    best = report
                time.sleep(0.2)         # let B finish its one tick and listen again
            r = best
            ram_rate = r.ram_size / r.total_seconds
            wire_rate = r.bytes_sent / r.total_seconds
            rate = r.rounds[0].dirty_rate
            stop = r.stop_reason.split(" (")[0]
            print(f"{mib:4d} {case:10} {r.total_seconds * 1e3:9.1f} {r.downtime_seconds * 1e3:11.2f} "
                  f"{r.bytes_sent:11d} {r.precopy_rounds:6d} {ram_rate / 1e6:8.0f} "
                  f"{100 * ram_rate / ceiling:7.0f}% {wire_rate / 1e6:9.0f} {100 * wire_rate / ceiling:8.0f}%  "
                  f"{rate:20.0f}  {stop}", flush=True)
            if (mib, case) in GOALS:
                goal, key = GOALS[mib, case]
                value = {"ram_pct": 100 * ram_rate / ceiling, "downtime_ms": r.downtime_seconds * 1e3}[key]
                verdicts.append((goal, value))
                print(f"     {goal.name}: {value:.1f}{goal.unit}  {goal.verdict(value)}", flush=True)
    verdicts += secure_vs_plain(sizes, ["counter", "protected"] if args.quick
                                else ["idle-full", "counter", "protected"],
                                args.repeat, address, saddress, attestor)
    if verdicts:
        print(summary(verdicts))
    else:
        print("goals: none measured (they need --sizes with 256 (idle) and 64 (counter, protected))")
    return 0
