"""Helpers for end-to-end migration tests: real VMM OS processes on loopback.

``Vmm`` wraps ``python -m minivmm ...`` as a subprocess whose stderr is read
line by line in a thread (so a test can wait for "listening on" or a
migration event); ``Proxy`` is a man in the middle on loopback that forwards
records and can cut the connection at a chosen record type.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from migrate.wire import HEADER, RecordType

ROOT = Path(__file__).resolve().parents[2]


MIGRATING = ("serve", "run", "demo")


class Vmm:
    """``trust``: None runs the plain engine (``--plain``, what these tests were
    written for); a directory made by ``migrate.secure.setup.setup`` runs the
    secure protocol with its issuer and policy."""

    def __init__(self, *args, cwd: Path, name: str = "vmm", trust: Path | None = None):
        env = dict(os.environ, MINIVMM_TPM_STATE=str(cwd / f"tpm-{name}"), PYTHONUNBUFFERED="1")
        if args and args[0] in MIGRATING:
            mode = (["--plain"] if trust is None else
                    ["--issuer", str(Path(trust) / "issuer"), "--attest-policy", str(Path(trust) / "policy.json")])
            args = (args[0], *mode, *args[1:])
        self.name = name
        self.args = args
        self.proc = subprocess.Popen([sys.executable, "-m", "minivmm", *args], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.err_lines: list[str] = []
        self.out_chunks: list[str] = []
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self._read_err, daemon=True),
                         threading.Thread(target=self._read_out, daemon=True)]
        for t in self._threads:
            t.start()

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
            self.out_chunks.append(data)

    def wait_for(self, text: str, timeout: float = 60.0, count: int = 1) -> str:
        """The ``count``-th stderr line containing ``text`` (waiting for it)."""
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

    def port(self) -> int:
        line = self.wait_for("listening on")
        return int(line.split("listening on ", 1)[1].split()[0].rsplit(":", 1)[1])

    def finish(self, timeout: float = 120.0) -> int:
        rc = self.proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=10)
        return rc

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for t in self._threads:
            t.join(timeout=10)

    @property
    def stdout(self) -> str:
        return "".join(self.out_chunks)

    @property
    def stderr(self) -> str:
        return "".join(self.err_lines)


def serve(cwd: Path, *extra, name="dst", trust: Path | None = None) -> tuple[Vmm, int]:
    v = Vmm("serve", "--listen", "127.0.0.1:0", *extra, cwd=cwd, name=name, trust=trust)
    return v, v.port()


def reference_run(cwd: Path, guest: str, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minivmm", "run", guest, *extra], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


class Proxy:
    """Forward one connection source -> destination record by record; when a
    record of type ``cut_at`` comes from the source, call ``on_cut`` (if any)
    and then cut both connections without forwarding it."""

    def __init__(self, dest_port: int, *, cut_at: RecordType | None = None, on_cut=None):
        self.dest_port = dest_port
        self.cut_at = cut_at
        self.on_cut = on_cut
        self.cut = threading.Event()
        self.seen: list[RecordType] = []
        self.recorded = bytearray()            # every byte forwarded source -> destination
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        src, _ = self.listener.accept()
        dst = socket.create_connection(("127.0.0.1", self.dest_port))
        back = threading.Thread(target=self._pump_back, args=(dst, src), daemon=True)
        back.start()
        try:
            while True:
                header = _read(src, HEADER.size)
                if header is None:
                    break
                rtype, _, length, _ = HEADER.unpack(header)
                body = _read(src, length) if length else b""
                self.seen.append(RecordType(rtype))
                if self.cut_at is not None and rtype == self.cut_at:
                    if self.on_cut:
                        self.on_cut()
                    self.cut.set()
                    break
                self.recorded += header + (body or b"")
                dst.sendall(header + (body or b""))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:        # shutdown first: close() alone does not wake a recv in another thread
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self.listener.close()

    @staticmethod
    def _pump_back(dst, src):
        try:
            while True:
                data = dst.recv(65536)
                if not data:
                    return
                src.sendall(data)
        except OSError:
            return


def _read(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)
