"""Ctrl-C, then --save-state, then --restore continues exactly: a real
``minivmm run`` process gets a real SIGINT at whatever moment the host
scheduler gives, and the interrupted, saved and restored run must match an
uninterrupted one tick for tick (same console bytes, same instruction count).
"""

import re
import signal
import subprocess
import sys
import time

import pytest

from guests.build import Program, build_image
from minivmm.machine import Machine

SUMMARY = re.compile(r"; (\d+) ticks, (\d+) virtual instructions since boot")


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "minivmm", *args], capture_output=True,
                          text=True, timeout=timeout)


def totals(stderr: str) -> tuple[int, int]:
    ticks, vclock = SUMMARY.findall(stderr)[-1]
    return int(ticks), int(vclock)


def slow_multi(path):
    """Three counters the timer interleaves (a tick lost or doubled shows as a
    different interleaving), slow enough that Ctrl-C lands mid-run."""
    path.write_bytes(build_image([Program.builtin("counter", args=(50, 2_000_000), as_name=f"counter-{c}")
                                  for c in "abc"], name="slow-multi").to_bytes())
    return str(path)


def interrupted_run(image, state, wait_for: str):
    """Start ``run IMAGE``, send SIGINT once ``wait_for`` is on its console."""
    proc = subprocess.Popen([sys.executable, "-m", "minivmm", "run", image, "--save-state", str(state)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    out = ""
    deadline = time.monotonic() + 300
    while wait_for not in out:
        line = proc.stdout.readline()
        assert line and time.monotonic() < deadline, f"{wait_for!r} never came: {out!r}"
        out += line
    proc.send_signal(signal.SIGINT)
    # Go on reading through the same file object: communicate() would read
    # the pipe underneath it and lose what readline() had buffered already.
    rest = proc.stdout.read()
    err = proc.stderr.read()            # small: the run's few report lines
    proc.wait(timeout=300)
    return proc.returncode, out + rest, err


@pytest.mark.parametrize("wait_for", ["counter 2\n", "counter 7\n"])
def test_a_run_interrupted_saved_and_restored_matches_an_uninterrupted_one(tmp_path, wait_for):
    image = slow_multi(tmp_path / "slow-multi.mvimg")
    state = tmp_path / "t.mvstate"
    rc, first, err = interrupted_run(image, state, wait_for)
    assert "toykernel: all processes exited" not in first     # it really stopped mid-run
    ticks = Machine.load(state).ticks

    more = 25
    end_a, end_b = tmp_path / "a.mvstate", tmp_path / "b.mvstate"
    restored = cli("run", str(state), "--restore", "--ticks", str(more), "--save-state", str(end_a))
    assert restored.returncode == 3, restored.stderr
    reference = cli("run", image, "--ticks", str(ticks + more), "--save-state", str(end_b))
    assert reference.returncode == 3, reference.stderr

    assert first + restored.stdout == reference.stdout
    assert totals(restored.stderr) == totals(reference.stderr)
    # The whole guest, not only its console: a tick lost at the interrupt
    # shows in the kernel's own tick counter and the scheduler's state.
    a, b = Machine.load(end_a).save_state(), Machine.load(end_b).save_state()
    assert (a.timer, a.cpu) == (b.timer, b.cpu)
    assert a.ram == b.ram
    assert totals(reference.stderr)[0] == ticks + more
    assert rc == 130, err
    assert "interrupted (Ctrl-C)" in err and "Traceback" not in err
    assert f"machine state saved to {state}" in err
    assert totals(err)[0] == ticks
