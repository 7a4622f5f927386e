"""The real app in a real terminal (tmux): a live plain migration run to the
end, the screen read back, then q; the process exits 0."""

import shlex
import shutil
import subprocess
import sys
import time
import uuid

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


def _tmux(*args):
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=False)


def _wait_for(name, text, tries=600):
    """Poll the pane (bounded by a count of polls, not by a deadline the test asserts)."""
    screen = ""
    for _ in range(tries):
        screen = _tmux("capture-pane", "-t", name, "-p").stdout
        if text in screen:
            return screen
        time.sleep(0.1)
    raise AssertionError(f"{text!r} never appeared; the screen:\n{screen}")


def test_live_run_to_the_end_in_tmux_and_quit(tmp_path):
    name = f"minivmm-tui-{uuid.uuid4().hex[:8]}"
    record = tmp_path / "run.jsonl"
    # COLUMNS/LINES of the test process would override the pane's size for Textual.
    cmd = (f"env -u COLUMNS -u LINES {shlex.quote(sys.executable)} -m minivmm tui --plain --run --record {shlex.quote(str(record))}; "
           f"echo TUI-EXITED $?; sleep 60")
    assert _tmux("new-session", "-d", "-s", name, "-x", "120", "-y", "40", cmd).returncode == 0
    try:
        screen = _wait_for(name, "migration complete")
        assert "A  source VMM" in screen and "B  destination VMM" in screen
        assert "RESUMED" in screen and "committed: migrated away" in screen
        _tmux("send-keys", "-t", name, "t")            # the light theme still draws the screen
        _wait_for(name, "migration complete")
        _tmux("send-keys", "-t", name, "q")
        _wait_for(name, "TUI-EXITED 0")
    finally:
        _tmux("kill-session", "-t", name)
    assert record.read_text().rstrip().endswith("}}") and '"end"' in record.read_text().splitlines()[-1]


def test_minivmm_demo_in_a_terminal_opens_the_tui(tmp_path):
    """The README's first command: in a terminal it opens the TUI (held at the
    first message); in a pipe it prints the report (tests/test_doc_examples.py)."""
    name = f"minivmm-demo-{uuid.uuid4().hex[:8]}"
    cmd = (f"cd {shlex.quote(str(tmp_path))} && env -u COLUMNS -u LINES {shlex.quote(sys.executable)} "
           f"-m minivmm demo --plain; echo DEMO-EXITED $?; sleep 60")
    assert _tmux("new-session", "-d", "-s", name, "-x", "120", "-y", "40", cmd).returncode == 0
    try:
        screen = _wait_for(name, "HELD: both VMMs stopped")
        assert "A -> HELLO" in screen and "Handshake" in screen
        _tmux("send-keys", "-t", name, "C-c")         # Ctrl+C quits as cleanly as q
        _wait_for(name, "DEMO-EXITED 0")
    finally:
        _tmux("kill-session", "-t", name)
