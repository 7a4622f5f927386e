"""A minivmm VMM as a separate OS process, for tests, labs and scripts.

``Vmm("run", "counter", "--ticks", "20", cwd=tmp)`` starts
``python -m minivmm run counter --ticks 20`` with this interpreter and reads
its stderr line by line on a thread, so a caller can wait for a line
(``wait_for("listening on")``) while the process runs; stdout (the guest's
console) is collected as it comes.  ``serve(cwd)`` starts a destination VMM
on a free loopback port and returns it with its port; ``reference_run`` runs
one VMM to the end.

Why a subprocess of ``python -m minivmm`` and not the ``minivmm`` script:
it is the interpreter (and so the environment) the caller runs in, with no
PATH lookup.  ``minivmm/__main__.py`` keeps the current directory from
shadowing the project's packages, so ``cwd`` can be any directory.

Each process gets its own software-TPM directory (``cwd/tpm-NAME``): two
VMMs on one host are two hosts to the migration protocol.  This module
imports nothing from ``migrate`` (``minivmm`` never does); a recording man in
the middle for migration tests is ``migrate.proxy.Proxy``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path


def command(*args: str) -> list[str]:
    """The argv that runs ``minivmm ARGS`` with this interpreter."""
    return [sys.executable, "-m", "minivmm_boot", *args]


MIGRATING = ("serve", "run", "demo")      # the commands that take --plain / --issuer
_started: "weakref.WeakSet[Vmm]" = weakref.WeakSet()


def running() -> list["Vmm"]:
    """The VMM processes this module started that still run."""
    return [v for v in list(_started) if v.proc.poll() is None]


def kill_all(keep=()) -> int:
    """Kill every VMM process this module started that still runs, except
    those in ``keep`` (a test that failed before its ``kill()`` would
    otherwise leave a ``serve`` behind); returns how many it killed.  A
    fixture takes ``running()`` at setup and passes it as ``keep``."""
    alive = [v for v in running() if v not in keep]
    for v in alive:
        v.kill()
    return len(alive)


def mode_args(trust: Path | str | None) -> list[str]:
    """``trust=None``: the plain engine (``--plain``: no attestation, nothing
    to set up); a directory made by ``minivmm attest-setup`` (its ``issuer``
    and ``policy.json``): the secure protocol, with that issuer and policy."""
    if trust is None:
        return ["--plain"]
    return ["--issuer", str(Path(trust) / "issuer"), "--attest-policy", str(Path(trust) / "policy.json")]


class Vmm:
    """``minivmm ARGS`` as a running OS process (see the module docstring).
    For ``serve``, ``run`` and ``demo`` the migration mode comes from
    ``trust`` (:func:`mode_args`)."""

    def __init__(self, *args, cwd: Path, name: str = "vmm", env: dict | None = None,
                 trust: Path | str | None = None):
        cwd = Path(cwd)
        if args and args[0] in MIGRATING:
            args = (args[0], *mode_args(trust), *args[1:])
        env = dict(os.environ if env is None else env)
        env.setdefault("MINIVMM_TPM_STATE", str(cwd / f"tpm-{name}"))
        env["PYTHONUNBUFFERED"] = "1"
        self.name = name
        self.args = args
        self.proc = subprocess.Popen(command(*args), cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.err_lines: list[str] = []
        self.out_chunks: list[str] = []
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self._read_err, daemon=True),
                         threading.Thread(target=self._read_out, daemon=True)]
        for t in self._threads:
            t.start()
        _started.add(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_err(self):
        for line in iter(self.proc.stderr.readline, ""):
            with self._cond:
                self.err_lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _read_out(self):
        while True:
            data = self.proc.stdout.read(4096)
            if not data:
                return
            with self._cond:
                self.out_chunks.append(data)
                self._cond.notify_all()

    def wait_for(self, text: str, timeout: float = 60.0, count: int = 1) -> str:
        """The ``count``-th stderr line containing ``text``, waiting up to
        ``timeout`` seconds for it (AssertionError with the stderr if it never
        comes, or the process ends first)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hits = [line for line in self.err_lines if text in line]
                if len(hits) >= count:
                    return hits[count - 1]
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._threads[0].is_alive()):
                    raise AssertionError(f"{self.name}: {text!r} not seen; stderr:\n{self.stderr}")
                self._cond.wait(min(left, 0.1))

    def wait_for_output(self, text: str, timeout: float = 60.0) -> None:
        """Wait until the guest's console (stdout) contains ``text``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while text not in self.stdout:
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._threads[1].is_alive()):
                    raise AssertionError(f"{self.name}: {text!r} never on the console:\n{self.stdout[-2000:]}")
                self._cond.wait(min(left, 0.1))

    def port(self) -> int:
        """The port a ``serve --listen HOST:0`` printed it listens on."""
        line = self.wait_for("listening on")
        return int(line.split("listening on ", 1)[1].split()[0].rsplit(":", 1)[1])

    def finish(self, timeout: float = 120.0) -> int:
        """Wait for the process to exit; its exit status."""
        rc = self.proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=10)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for t in self._threads:
            t.join(timeout=10)

    def __enter__(self) -> "Vmm":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()

    @property
    def stdout(self) -> str:
        return "".join(self.out_chunks)

    @property
    def stderr(self) -> str:
        return "".join(self.err_lines)


def serve(cwd: Path, *extra, name: str = "dst", trust: Path | str | None = None) -> tuple[Vmm, int]:
    """``minivmm serve --listen 127.0.0.1:0 EXTRA``: the process and its port."""
    v = Vmm("serve", "--listen", "127.0.0.1:0", *extra, cwd=cwd, name=name, trust=trust)
    return v, v.port()


def reference_run(cwd: Path, guest: str, *extra, timeout: float = 300) -> subprocess.CompletedProcess:
    """``minivmm run GUEST EXTRA`` to the end (a run to compare a migrated one with)."""
    return subprocess.run(command("run", guest, *extra), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
