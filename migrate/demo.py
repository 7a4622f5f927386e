"""``minivmm demo``: the README's main job -- a live migration of the demo guest
between two VMM processes on this machine, with the report.

This process is VMM A (the source); it starts VMM B (``minivmm serve``) as a
child process on a free loopback port, boots the guest, migrates it to B after
a few ticks while it runs, and prints both consoles (``A |`` and ``B |``
prefixes), the migration report, and B's summary.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from minivmm import events as ev
from migrate.cli import EXIT_CRASH, EXIT_OK, EXIT_UNCONFIRMED, migration_options, run_guest
from migrate.measure import measure_start
from migrate.secure import cliopts as secure_cli
from migrate.secure.setup import protection_policy, setup

START_TIMEOUT = 60.0


CONTINUED = "  ... (the guest migrated mid-line: the rest is on B)"


class _Lines:
    """Print console output a whole line at a time, with a prefix."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.buf = ""
        self.lock = threading.Lock()

    def write(self, text: str) -> None:
        with self.lock:
            self.buf += text
            *lines, self.buf = self.buf.split("\n")
            for line in lines:
                print(f"{self.prefix}{line}", flush=True)

    def flush(self, note: str = "") -> None:
        """Print what is left of a line that never got its newline, with ``note``."""
        if self.buf:
            self.write(note + "\n")


def _pump(stream, out: _Lines) -> None:
    for line in iter(stream.readline, ""):
        out.write(line)


def main(args) -> int:
    from minivmm.cli import _load_image
    from minivmm.machine import Machine
    base = Path(args.tpm_dir) if args.tpm_dir else Path(os.environ.get("MINIVMM_TPM_STATE", ".minivmm-tpm"))
    ram = args.ram << 20
    a, b, info = _Lines("A | "), _Lines("B | "), _Lines("   ")
    image = _load_image(args.guest, ram)        # a bad --guest fails before VMM B starts
    secure_cli.check(args)
    insecure = sorted(set(args.insecure or ()))
    mode_args = ["--plain"] if args.plain else [a for d in insecure for a in ("--insecure", d)]
    if not args.plain:
        # The demo is both hosts' administrator: one issuer, one policy that
        # approves this build (and the defences the user turned off, for the lab).
        issuer, policy = setup(base, [{"insecure": tuple(insecure)}] if insecure else [{}])
        mode_args += ["--issuer", str(issuer), "--attest-policy", str(policy)]
    with tempfile.TemporaryDirectory(prefix="minivmm-demo-") as tmp:
        port_file = Path(tmp) / "port"
        child = subprocess.Popen(
            [sys.executable, "-m", "minivmm_boot", "serve", "--listen", "127.0.0.1:0", "--port-file", str(port_file),
             "--tpm-dir", str(base / "destination"), "--reserve-ram", str(ram >> 20), *mode_args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        pumps = [threading.Thread(target=_pump, args=(child.stdout, b), daemon=True),
                 threading.Thread(target=_pump, args=(child.stderr, _Lines("B ! ")), daemon=True)]
        for t in pumps:
            t.start()
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not port_file.exists():
                if child.poll() is not None or time.monotonic() > deadline:
                    print("minivmm demo: the destination VMM did not start", file=sys.stderr)
                    return EXIT_CRASH
                time.sleep(0.02)
            port = int(port_file.read_text())
            info.write(f"VMM B (pid {child.pid}) listens on 127.0.0.1:{port}; this process is VMM A "
                       f"(pid {os.getpid()})\n")
            mode = "plain" if args.plain else "secure"
            m = measure_start(base / "source", {"role": "source", "demo": True, "secure": mode == "secure"},
                              protection_policy(mode=mode, insecure=insecure))
            info.write(f"VMM A {m.describe()}\n")
            ns = _DemoArgs(f"127.0.0.1:{port}", args.after, base, args.plain, insecure)
            trusted = secure_cli.prepare(ns, base / "source")     # certify A; measure issuer + policy
            if trusted:
                info.write(f"VMM A {trusted}\n")
            info.write(f"VMM A {secure_cli.announce(ns)}\n")
            machine = Machine(image, ram_size=ram)
            machine.events.subscribe(lambda e: a.write(e.text), ev.ConsoleOutput)
            kind, n = args.after
            info.write(f"booting {args.guest!r} on A; live migration to B after "
                       f"{n} {'ticks' if kind == 'ticks' else 'seconds'}\n")
            # A's report goes to standard output beside B's (whose stderr is
            # relayed there with "B ! "), so "minivmm demo > out.txt" keeps both.
            report = _Lines("A ! ")
            rc = run_guest(machine, ns, role="source", show_report=lambda text: report.write(text + "\n"))
            # A migration can fall between two write()s of one line ("counter "
            # on A, "11" on B): say so rather than print a line that looks whole.
            a.flush(CONTINUED if machine.halted == "migrated" else "")
            if machine.halted != "migrated" and rc != EXIT_UNCONFIRMED:
                # B never got the guest (the migration failed before COMMIT and
                # the guest ran on here): it would wait for a VM forever.
                info.write("the guest did not migrate: stopping VMM B, which never resumed it\n")
                child.terminate()
            try:
                child.wait(timeout=300)
            except subprocess.TimeoutExpired:
                info.write("VMM B still runs after 300 s: stopping it\n")
                child.terminate()
                child.wait()
            for t in pumps:
                t.join(timeout=5)
            b.flush()
            info.write(f"VMM B exited with status {child.returncode}\n")
            return rc if rc != EXIT_OK else (EXIT_OK if child.returncode == 0 else EXIT_CRASH)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()


class _DemoArgs:
    """The options ``run_guest`` reads, with the defaults of ``run --migrate-to``:
    taken from the parser's own migration options, so an option added there
    can never be missing here (a new pre-copy knob once broke the demo)."""

    def __init__(self, to: str, after, base: Path, plain: bool, insecure):
        p = argparse.ArgumentParser(add_help=False)
        migration_options(p, source=True)
        vars(self).update(vars(p.parse_args([])))
        self.migrate_to = to
        self.tpm_dir = str(base / "source")
        self.plain, self.insecure = plain, list(insecure)
        self.issuer, self.attest_policy = str(base / "issuer"), str(base / "policy.json")
        self.after = after
        self.events = False
        self.ticks = self.instructions = self.save_state = None
