"""Drive a real TPM 2.0 (swtpm) with tpm2-tools, for the cross-check tests.

swtpm runs as a child process listening on two free TCP ports of 127.0.0.1 (the TPM
command port N and the control port N + 1, the pair the ``swtpm`` TCTI expects),
with its state in a temporary directory.  Every tool runs with
``TPM2TOOLS_TCTI=swtpm:host=127.0.0.1,port=N``.  There is no resource manager in
between, so transient objects are flushed after every command (a TPM holds only a
few loaded objects at once).

``missing_tools()`` says what is not installed, so the tests can skip with a reason;
``.ci/run`` installs the Debian packages ``swtpm swtpm-tools tpm2-tools``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

TOOLS = ("swtpm", "tpm2_createek", "tpm2_createak", "tpm2_quote", "tpm2_checkquote",
         "tpm2_print", "tpm2_eventlog", "tpm2_pcrextend", "tpm2_pcrread", "tpm2_readpublic",
         "tpm2_flushcontext", "tpm2_startauthsession", "tpm2_policypcr")
#: Generous bounds: a loaded CI machine is slow, but a wedged tool must not hang the suite.
START_TIMEOUT = 30.0
TOOL_TIMEOUT = 60.0


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def _free_port_pair() -> int:
    """A port N such that N and N + 1 were both free on 127.0.0.1 a moment ago."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free pair of TCP ports on 127.0.0.1")


class SwTpm:
    """A running swtpm and a way to run tpm2-tools against it."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> "SwTpm":
        state = self.workdir / "swtpm-state"
        state.mkdir(parents=True, exist_ok=True)
        last = ""
        for _ in range(5):  # another process may take the ports between choice and bind
            self.port = _free_port_pair()
            self.proc = subprocess.Popen(
                ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
                 "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                 "--ctrl", f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
                 "--flags", "not-need-init,startup-clear"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            if self._wait_listening():
                return self
            last = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
            self.stop()
        raise RuntimeError(f"swtpm did not start: {last.strip()}")

    def _wait_listening(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port + 1), timeout=1.0):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def env(self) -> dict:
        return {**os.environ, "TPM2TOOLS_TCTI": f"swtpm:host=127.0.0.1,port={self.port}"}

    def run(self, *args: str, check: bool = True, flush: bool = True) -> subprocess.CompletedProcess:
        """Run one tool in the work directory; then flush transient objects."""
        proc = subprocess.run(list(args), cwd=self.workdir, env=self.env(), capture_output=True,
                              text=True, timeout=TOOL_TIMEOUT)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        if flush:
            subprocess.run(["tpm2_flushcontext", "-t"], cwd=self.workdir, env=self.env(),
                           capture_output=True, timeout=TOOL_TIMEOUT, check=True)
        return proc

    def path(self, name: str) -> Path:
        return self.workdir / name


def run_tool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """A tpm2-tools command that needs no TPM (tpm2_print, tpm2_eventlog, tpm2_checkquote)."""
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT)


def yaml_fields(text: str) -> dict[str, str]:
    """The ``key: value`` lines of tpm2-tools' YAML output (first occurrence of each key)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep and value.strip() and key not in fields:
            fields[key.strip()] = value.strip()
    return fields


def yaml_pcrs(text: str) -> dict[int, bytes]:
    """The ``pcrs: sha256:`` block of tpm2_eventlog / tpm2_checkquote output."""
    out: dict[int, bytes] = {}
    in_block = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped == "sha256:":
            in_block = True
            continue
        if in_block:
            index, sep, value = stripped.partition(":")
            if not sep or not index.strip().isdigit():
                in_block = False
                continue
            out[int(index)] = bytes.fromhex(value.strip().removeprefix("0x"))
    return out
