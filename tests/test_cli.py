"""The command line, run as a user would run it (a real subprocess)."""

import subprocess
import sys

import pytest

from minivmm import events as ev
from guests.build import Program
from guesthelp import boot


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "minivmm", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_help_explains_every_command():
    top = cli("--help")
    assert top.returncode == 0
    for command in ("run", "guests", "build", "bench"):
        assert command in top.stdout
        sub = cli(command, "--help")
        assert sub.returncode == 0 and "usage: minivmm " + command in sub.stdout
    assert "--ticks" in cli("run", "--help").stdout


def test_guests_lists_builtin_images():
    out = cli("guests")
    assert out.returncode == 0
    for name in ("demo", "hello", "counter", "multi", "crashers", "memcheck", "dirtier"):
        assert f"  {name}" in out.stdout


def test_run_streams_console_and_exits_zero_on_clean_shutdown():
    out = cli("run", "hello")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "toykernel: booting\nhello, world\ntoykernel: all processes exited\n"
    assert "shutdown" in out.stderr


def test_run_bound_reached_exits_three():
    out = cli("run", "counter", "--ticks", "5")
    assert out.returncode == 3
    assert "counter 1" in out.stdout


def test_crashing_guest_exits_one(tmp_path):
    # An image whose kernel panics: build it in Python, run the file from the CLI.
    from guests.build import KERNEL_DIR, build_image
    src = (KERNEL_DIR / "kernel.s").read_text().replace(
        "sys_getpid:\n    mov eax, [esi+PROC_PID]", "sys_getpid:\n    mov eax, [0x0]")
    image = build_image([Program("getpid", "mov eax, SYS_GETPID\nint 0x80\nud2")], kernel_source=src)
    path = tmp_path / "panic.mvimg"
    path.write_bytes(image.to_bytes())
    out = cli("run", str(path))
    assert out.returncode == 1
    assert "kernel panic" in out.stderr and "Traceback" not in out.stderr


def test_bad_input_exits_two_with_a_clear_message(tmp_path):
    out = cli("run", "no-such-guest")
    assert out.returncode == 2 and "no built-in guest 'no-such-guest'" in out.stderr
    junk = tmp_path / "junk.mvimg"
    junk.write_bytes(b"this is not an image at all, just some bytes" * 3)
    out = cli("run", str(junk))
    assert out.returncode == 2 and "bad magic" in out.stderr and "Traceback" not in out.stderr
    state = tmp_path / "junk.mvstate"
    state.write_bytes(b"MVMSTATE" + b"\0" * 10)
    out = cli("run", str(state), "--restore")
    assert out.returncode == 2 and "truncated" in out.stderr
    out = cli("run", str(tmp_path / "missing.mvstate"), "--restore")
    assert out.returncode == 2 and "No such file" in out.stderr and "Traceback" not in out.stderr
    out = cli("run", "hello", "--tick", "5")
    assert out.returncode == 2 and "timer period" in out.stderr and "Traceback" not in out.stderr


def test_build_then_run_an_image_file(tmp_path):
    path = tmp_path / "multi.mvimg"
    assert cli("build", "multi", "-o", str(path)).returncode == 0
    out = cli("run", str(path))
    assert out.returncode == 0
    assert out.stdout.count("counter 20") == 3


def test_console_script_is_installed():
    import shutil
    exe = shutil.which("minivmm") or str((__import__("pathlib").Path(sys.executable).parent / "minivmm"))
    out = subprocess.run([exe, "guests"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "demo" in out.stdout


def test_events_are_typed_and_ordered():
    m = boot(Program.builtin("hello"))
    seen = []
    m.events.subscribe(seen.append)
    m.run(max_ticks=100)
    kinds = [type(e).__name__ for e in seen]
    assert kinds[:2] == ["ConsoleOutput", "ProcessStart"]      # the boot banner comes first
    assert kinds.index("Syscall") < kinds.index("ProcessExit") < kinds.index("Halted")
    assert [e.seq for e in seen] == sorted(e.seq for e in seen)
    out = [e for e in seen if isinstance(e, ev.ConsoleOutput) and e.pid == 1]
    assert "".join(e.text for e in out) == "hello, world\n"
    assert seen[-1] == ev.Halted(seq=seen[-1].seq, vtime=seen[-1].vtime, reason="shutdown", detail="status 0")
    with pytest.raises(Exception):
        seen[0].pid = 5                      # frozen: subscribers cannot change history


def test_timer_interrupt_events_name_the_interrupted_privilege_level():
    m = boot(Program.builtin("counter", args=(3, 300_000)))
    ticks = []
    m.events.subscribe(ticks.append, ev.Interrupt)
    m.run(max_ticks=1000)
    assert ticks and {e.cpl for e in ticks} == {3}     # a busy counter is always in user mode
