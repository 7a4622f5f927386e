"""Every example in README.md and docs/*.md runs as written.

The examples are extracted from the fenced code blocks at test time, so an
example that stops working (or a new one that never worked) fails the build:

* ``sh`` blocks: each command runs in a fresh directory that looks like a
  checkout (the quick start starts in one: links to the project's folders)
  with this environment's ``bin/`` first on PATH (the README says: activate
  the venv, or use ``.venv/bin/minivmm``; ``.venv`` there points at this
  environment).  A
  block runs as one shell script, so a later command sees what an earlier one
  wrote (``N=$(...)``, ``/tmp/c.mvstate``).  The expected exit status is 0,
  or the one the command's comment names (``# exit 3``, ``# ...Error``:
  non-zero).  ``minivmm serve --listen ADDR`` is the peer of the commands
  with ``--migrate-to ADDR`` in the same block: each of those runs against
  its own fresh ``serve`` on a free port (ADDR's port replaced), and
  ``--after signal`` gets its ``kill -USR1 PID`` once the VMM prints its pid.
* ``python`` blocks: a block with ``def test_`` is a test file and runs under
  pytest; any other block runs as a script.  ``asm`` blocks whose first line
  is ``; NAME: ...`` are saved as ``NAME.s`` beside them (the docs say so),
  and beside the ``sh`` blocks of the same page too (a lab says "save this as
  NAME.s", then builds and runs it).
* ``asm`` blocks: each is linked into an image with the toy kernel and runs
  to a clean shutdown.
* Other blocks (no language, ``text``, ``json``) show output or formats, not
  commands: not run.

Two kinds of command are not run verbatim, and the test says so by name:
the README's quick start (it creates ``.venv`` and installs; ``.ci/run`` runs
exactly its second line on every CI build), and the benchmarks, which run
with their documented quick options (``bench --part compute --iterations ...
--repeat 1``, ``bench-migrate --quick``): their full runs take minutes and
measure speed (the whole ``bench`` suite runs in ``tests/migrate/test_bench_suite.py``).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "docs" / "labs").rglob("*.md"))]         # the labs and their answer keys
BIN = Path(sys.executable).parent
TIMEOUT = 300                      # generous: the suite runs on loaded 2-core machines
CHECKOUT = ("minivmm", "guests", "tpm", "migrate", "tests", "docs", "README.md", "pyproject.toml")

FENCE = re.compile(r"^([ \t]*)```(\w*)[^\n]*\n(.*?)^\1```[ \t]*$", re.M | re.S)
QUICK = {                          # command prefix -> what is appended (see the docstring)
    "minivmm bench-migrate": " --quick",
    "minivmm bench": " --part compute --iterations 200000 --repeat 1",
}
NOT_RUN = {"python3 -m venv .venv": "the quick start: .ci/run runs it verbatim on every build"}


def fenced_blocks():
    for doc in DOCS:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            indent, lang, body = m.groups()
            line = text.count("\n", 0, m.start()) + 1
            yield doc, line, lang, textwrap.dedent(body) if indent else body


def _id(doc: Path, line: int) -> str:
    return f"{doc.relative_to(ROOT)}:{line}"


def blocks(lang: str):
    return [pytest.param(doc, line, body, id=_id(doc, line))
            for doc, line, lng, body in fenced_blocks() if lng == lang]


def commands(body: str) -> list[tuple[str, str]]:
    """(command, comment) for each logical line of a shell block."""
    out, pending = [], ""
    for raw in body.splitlines():
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line = pending + raw
        pending = ""
        if not line.strip():
            continue
        cmd, _, comment = line.partition(" #") if not line.lstrip().startswith("#") else ("", "", line)
        if cmd.strip():
            out.append((cmd.strip(), comment.strip()))
    return out


def expected_status(comment: str):
    m = re.search(r"\bexit (\d+)\b", comment)
    if m:
        return int(m.group(1))
    if re.search(r"\w+Error\b", comment):
        return "nonzero"
    return 0


def environment(cwd: Path) -> dict:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               MINIVMM_TPM_STATE=str(cwd / ".minivmm-tpm"), PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    (cwd / ".venv").symlink_to(Path(sys.prefix))
    for name in CHECKOUT:          # the docs speak from a checkout (`--code minivmm`)
        (cwd / name).symlink_to(ROOT / name)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Background:
    """A shell command in its own process group; stderr lines kept as they come."""

    def __init__(self, cmd: str, cwd: Path, env: dict):
        self.cmd = cmd
        self.proc = subprocess.Popen(["bash", "-c", "exec " + cmd], cwd=cwd, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.err: list[str] = []
        self.out: list[str] = []
        self.threads = [threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True),
                        threading.Thread(target=self._pump, args=(self.proc.stdout, self.out), daemon=True)]
        for t in self.threads:
            t.start()

    @staticmethod
    def _pump(stream, into):
        for line in iter(stream.readline, ""):
            into.append(line)

    def wait_for(self, pattern: str, timeout: float = TIMEOUT) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.err):
                m = re.search(pattern, line)
                if m:
                    return m
            if self.proc.poll() is not None and not self.threads[0].is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"{self.cmd}: {pattern!r} never printed:\n{self.log()}")

    def finish(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill()

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for t in self.threads:
            t.join(timeout=10)

    def log(self) -> str:
        return f"--- stdout\n{''.join(self.out)[-3000:]}\n--- stderr\n{''.join(self.err)[-3000:]}"


def run_migration(cmd: str, peers: dict[str, str], cwd: Path, env: dict) -> None:
    """``cmd`` has --migrate-to ADDR: run it against a fresh copy of ADDR's serve."""
    addr = re.search(r"--migrate-to\s+(\S+)", cmd).group(1)
    assert addr in peers, f"{cmd}: no 'minivmm serve --listen {addr}' in the same block"
    port = free_port()
    here = f"127.0.0.1:{port}"
    serve = Background(peers[addr].replace(addr, here), cwd, env)
    try:
        serve.wait_for(r"listening on")
        source = Background(cmd.replace(addr, here), cwd, env)
        try:
            if re.search(r"--after\s+signal\b", cmd):
                pid = int(source.wait_for(r"kill -USR1 (\d+)").group(1))
                os.kill(pid, signal.SIGUSR1)
            rc = source.finish()
            assert rc == 0, f"{cmd}: exit {rc}\n{source.log()}"
            assert "migrating to" in "".join(source.err), f"{cmd}: never migrated\n{source.log()}"
        finally:
            source.kill()
        rc = serve.finish()
        assert rc == 0, f"{peers[addr]}: exit {rc}\n{serve.log()}"
        assert "resumed guest" in "".join(serve.err)
    finally:
        serve.kill()


def run_script(cmds: list[tuple[str, str]], cwd: Path, env: dict) -> None:
    """Plain commands, in order, in one shell (variables carry over), each
    with its expected exit status checked."""
    lines = ["exec 3>&2"]
    for i, (cmd, comment) in enumerate(cmds):
        want = expected_status(comment)
        check = "$rc -ne 0" if want == "nonzero" else f"$rc -eq {want}"
        lines.append(f"{{ {cmd} ; }} >>out.log 2>&1; rc=$?; if [ ! {check} ]; then "
                     f"echo {shlex.quote(f'FAILED (want exit {want}): {cmd}')}\" -> exit $rc\" >&3; exit 1; fi")
    out = subprocess.run(["bash", "-c", "\n".join(lines)], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=TIMEOUT)
    log = (cwd / "out.log").read_text()[-4000:] if (cwd / "out.log").exists() else ""
    assert out.returncode == 0, out.stderr + "\n--- output\n" + log


@pytest.mark.slow
@pytest.mark.parametrize("doc, line, body", blocks("sh"))
def test_shell_examples_run_as_written(doc, line, body, tmp_path):
    env = environment(tmp_path)
    _named_asm_files(doc, tmp_path)
    peers, plain = {}, []
    for cmd, comment in commands(body):
        skip = next((why for prefix, why in NOT_RUN.items() if cmd.startswith(prefix)), None)
        if skip:
            continue
        for prefix, extra in QUICK.items():
            if cmd == prefix or cmd.startswith(prefix + " "):
                cmd += extra
                break
        m = re.match(r"minivmm serve .*--listen\s+(\S+)", cmd)
        if m:
            peers[m.group(1)] = cmd
        elif "--migrate-to" in cmd:
            run_script(plain, tmp_path, env)
            plain = []
            run_migration(cmd, peers, tmp_path, env)
        else:
            plain.append((cmd, comment))
    run_script(plain, tmp_path, env)


def _named_asm_files(doc: Path, where: Path) -> None:
    for d, _, lang, body in fenced_blocks():
        m = re.match(r";\s*(\w+):", body)
        if d == doc and lang == "asm" and m:
            (where / f"{m.group(1)}.s").write_text(body)


@pytest.mark.parametrize("doc, line, body", blocks("python"))
def test_python_examples_run_as_written(doc, line, body, tmp_path):
    env = environment(tmp_path)
    _named_asm_files(doc, tmp_path)
    if re.search(r"^def test_", body, re.M):
        path = tmp_path / f"test_doc_example_{line}.py"
        path.write_text(body)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", "--rootdir", str(tmp_path),
               str(path)]
    else:
        path = tmp_path / "example.py"
        path.write_text(body)
        cmd = [sys.executable, str(path)]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]


@pytest.mark.parametrize("doc, line, body", blocks("asm"))
def test_asm_examples_build_and_run(doc, line, body):
    from guests.build import Program, build_image
    from minivmm.machine import Machine
    m = Machine(build_image([Program("example", body, filename=_id(doc, line), data_pages=2, args=(1,))]))
    assert m.run(max_ticks=10_000) == "shutdown"
    assert 1 in m.exits and m.console.text(1)


def test_the_extractor_finds_the_examples_it_claims_to():
    found = {(doc.name, lang) for doc, _, lang, _ in fenced_blocks()}
    assert {("README.md", "sh"), ("testing.md", "python"), ("guest-abi.md", "asm"),
            ("lab-attacks.md", "python"), ("1-toy-os.md", "sh"), ("1-toy-os.md", "asm")} <= found
    # (including indented fences; and the labs in docs/labs/)
    readme = next(body for doc, _, lang, body in fenced_blocks()
                  if doc.name == "README.md" and lang == "sh" and "minivmm guests" in body)
    cmds = commands(readme)
    assert ("minivmm run counter --ticks 20 --save-state /tmp/c.mvstate", "stop early (exit 3), save everything") in cmds
    assert expected_status("# stop early (exit 3), save everything") == 3
    assert expected_status("# PolicyViolationError") == "nonzero"
    assert commands("a \\\n  b # c\n# only a comment\n") == [("a    b", "c")]
