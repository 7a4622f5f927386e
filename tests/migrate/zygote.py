"""Many VMM processes from one warm interpreter: a fork server for walks that
start hundreds of VMMs (the fault-injection walk).

``python zygote.py`` imports minivmm, migrate, tpm and the guests once, then
reads one JSON request per line on stdin -- ``{"argv", "cwd", "env",
"stdout", "stderr"}`` -- and forks a child per request that runs
``minivmm ARGV`` (``minivmm.cli.main``) with its console and stderr written
unbuffered to the two files, as ``python -m minivmm ARGV`` would.  It answers
``{"pid": P}`` per request and ``{"exit": P, "status": S}`` when a child ends
(S as ``Popen.returncode``: -9 for SIGKILL).  Each child is a real VMM OS
process; only the 0.5 s of imports per start is saved.  The server is
single-threaded, so a fork never copies a lock some other thread held.

``Zygote`` is the test side; ``Forked`` one child, with the small part of
``minivmm.vmmproc.Vmm``'s interface the walk needs (files instead of pipes).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


# ---------------------------------------------------------------- the server
def _child(req: dict) -> None:
    import io
    os.chdir(req["cwd"])
    os.environ.update(req["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    # PYTHONUNBUFFERED: every write reaches the file at once (a crash loses nothing)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
    rc = 1
    try:
        from minivmm.cli import main
        rc = main(req["argv"])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:               # noqa: BLE001 - as the interpreter would: traceback, 1
        import traceback
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush(), sys.stderr.flush()
        finally:
            os._exit(rc if isinstance(rc, int) else 1)


def serve() -> None:
    import minivmm.cli  # noqa: F401 - the imports every child would otherwise make
    import migrate.cli, migrate.source, migrate.destination, migrate.secure.mode, tpm  # noqa: F401,E401
    from guests.catalog import get_guest  # noqa: F401
    minivmm.cli.build_parser()          # loads the entry points once
    out = sys.stdout
    children: set[int] = set()

    def reply(msg) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()
    reply({"ready": os.getpid()})
    buf = b""
    while True:
        ready, _, _ = select.select([0], [], [], 0.05)
        if ready:
            chunk = os.read(0, 65536)
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                req = json.loads(line)
                out.flush()
                pid = os.fork()
                if pid == 0:
                    _child(req)
                children.add(pid)
                reply({"pid": pid})
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                reply({"exit": pid, "status": os.waitstatus_to_exitcode(status)})


# ------------------------------------------------------------- the test side
class Forked:
    def __init__(self, zygote: "Zygote", pid: int, name: str, out: Path, err: Path):
        self.zygote, self.pid, self.name, self.out, self.err = zygote, pid, name, out, err

    @property
    def returncode(self) -> int | None:
        return self.zygote.status.get(self.pid)

    @property
    def stdout(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        """The first stderr line containing ``text`` (AssertionError if the
        process ends, or ``timeout`` passes, without it)."""
        deadline = time.monotonic() + timeout
        while True:
            ended = self.returncode is not None
            for line in self.stderr.splitlines():
                if text in line:
                    return line
            if ended or time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: {text!r} not seen; stderr:\n{self.stderr}")
            time.sleep(0.02)

    def finish(self, timeout: float = 120.0) -> int:
        with self.zygote.cond:
            if not self.zygote.cond.wait_for(lambda: self.pid in self.zygote.status, timeout):
                raise AssertionError(f"{self.name} did not end within {timeout} s; stderr:\n{self.stderr}")
            return self.zygote.status[self.pid]

    def kill(self) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.finish(30)


class Zygote:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=Path(__file__).resolve().parent)
        self.cond = threading.Condition()
        self.status: dict[int, int] = {}
        self._pids: list[int] = []
        self._lock = threading.Lock()
        first = json.loads(self.proc.stdout.readline())
        assert "ready" in first, first
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self.cond:
                if "pid" in msg:
                    self._pids.append(msg["pid"])
                else:
                    self.status[msg["exit"]] = msg["status"]
                self.cond.notify_all()

    def spawn(self, *argv: str, cwd: Path, name: str, env: dict | None = None) -> Forked:
        cwd = Path(cwd)
        env = {"MINIVMM_TPM_STATE": str(cwd / f"tpm-{name}"), **(env or {})}
        out, err = cwd / f"{name}.out", cwd / f"{name}.err"
        with self._lock:                        # one request, one pid, in order
            with self.cond:
                n = len(self._pids)
            self.proc.stdin.write(json.dumps({"argv": list(argv), "cwd": str(cwd), "env": env,
                                              "stdout": str(out), "stderr": str(err)}) + "\n")
            self.proc.stdin.flush()
            with self.cond:
                self.cond.wait_for(lambda: len(self._pids) > n, 30)
                pid = self._pids[n]
        return Forked(self, pid, name, out, err)

    def close(self) -> None:
        with self.cond:
            live = [p for p in self._pids if p not in self.status]
        for pid in live:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.stdin.close()
        self.proc.wait(30)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # noqa: the checkout (an editable install has it)
    import minivmm_boot                 # as the minivmm command: before any of the VMM's packages
    minivmm_boot.install()
    serve()
