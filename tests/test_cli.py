"""The command line, run as a user would run it (a real subprocess)."""

import dataclasses
import json
import re
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
    assert out.returncode == 2 and "argument --tick: must be 1000.." in out.stderr and "Traceback" not in out.stderr


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
    with pytest.raises(dataclasses.FrozenInstanceError):
        seen[0].pid = 5                      # frozen: subscribers cannot change history


def test_timer_interrupt_events_name_the_interrupted_privilege_level():
    m = boot(Program.builtin("counter", args=(3, 300_000)))
    ticks = []
    m.events.subscribe(ticks.append, ev.Interrupt)
    m.run(max_ticks=1000)
    assert ticks and {e.cpl for e in ticks} == {3}     # a busy counter is always in user mode


# ------------------------------------------------------ messages a person understands
def test_the_summary_says_which_bound_stopped_the_run():
    out = cli("run", "counter", "--ticks", "20")
    assert out.returncode == 3
    assert "stopped after 20 more ticks (--ticks 20)" in out.stderr
    out = cli("run", "counter", "--instructions", "5000")
    assert out.returncode == 3 and "(--instructions 5000)" in out.stderr
    out = cli("run", "hello")
    assert "the guest shut down cleanly" in out.stderr


@pytest.mark.parametrize("args, option", [
    (("--ticks", "-5"), "--ticks"), (("--instructions", "-1"), "--instructions"),
    (("--tick", "0"), "--tick"), (("--tick", "99"), "--tick"), (("--ticks", "many"), "--ticks"),
    (("--ram", "abc"), "--ram"), (("--ram", "8"), "--ram"),
])
def test_impossible_numbers_are_refused_naming_the_option(args, option):
    out = cli("run", "hello", *args)
    assert out.returncode == 2, out.stderr
    assert f"argument {option}:" in out.stderr and "Traceback" not in out.stderr
    assert "_ram" not in out.stderr and "invalid" not in out.stderr   # no internal names
    assert out.stdout == ""                                             # the guest never ran


@pytest.mark.parametrize("command", [("bench", "--iterations", "0"), ("bench", "--repeat", "0"),
                                     ("demo", "--ram", "5"), ("serve", "--listen", "127.0.0.1:0", "--ticks", "-1")])
def test_other_commands_refuse_impossible_numbers(command):
    out = cli(*command)
    assert out.returncode == 2 and f"argument {command[-2]}:" in out.stderr and "Traceback" not in out.stderr


def test_a_state_file_without_restore_suggests_restore(tmp_path):
    state = tmp_path / "c.mvstate"
    assert cli("run", "counter", "--ticks", "2", "--save-state", str(state)).returncode == 3
    out = cli("run", str(state))
    assert out.returncode == 2
    assert f"continue it with 'minivmm run {state} --restore'" in out.stderr
    image = tmp_path / "h.mvimg"
    assert cli("build", "hello", "-o", str(image)).returncode == 0
    out = cli("run", str(image), "--restore")
    assert out.returncode == 2 and "run it without --restore" in out.stderr


def test_restore_refuses_options_it_would_ignore(tmp_path):
    state = tmp_path / "c.mvstate"
    assert cli("run", "counter", "--ticks", "2", "--save-state", str(state)).returncode == 3
    out = cli("run", str(state), "--restore", "--ram", "32", "--mode", "fast")
    assert out.returncode == 2 and "--ram, --mode cannot change a saved machine" in out.stderr


def test_an_unwritable_save_state_is_refused_before_the_guest_runs(tmp_path):
    out = cli("run", "hello", "--save-state", str(tmp_path / "no-such-dir" / "x.mvstate"))
    assert out.returncode == 2 and "--save-state" in out.stderr and "cannot write there" in out.stderr
    assert out.stdout == ""                                  # refused before booting
    out = cli("run", "hello", "--save-state", str(tmp_path))
    assert out.returncode == 2 and "is a directory" in out.stderr and out.stdout == ""
    out = cli("build", "hello", "-o", str(tmp_path / "no-such-dir" / "h.mvimg"))
    assert out.returncode == 2 and "-o" in out.stderr and "cannot write there" in out.stderr
    keep = tmp_path / "keep.mvstate"                         # the probe loses nothing
    keep.write_bytes(b"precious")
    out = cli("run", "hello", "--save-state", str(keep), "--ram", "8")
    assert out.returncode == 2 and keep.read_bytes() == b"precious"


@pytest.mark.parametrize("option", [("--after", "3"), ("--after", "10"), ("--check-ram",),
                                    ("--max-rounds", "4"), ("--round-ticks", "8")])
def test_migration_options_without_migrate_to_are_an_error(option):
    out = cli("run", "hello", *option)
    assert out.returncode == 2 and f"{option[0]} only mean something with --migrate-to" in out.stderr
    assert out.stdout == ""


def test_demo_with_an_unknown_guest_fails_before_starting_the_second_vmm(tmp_path):
    out = subprocess.run([sys.executable, "-m", "minivmm", "demo", "--guest", "nosuch",
                          "--tpm-dir", str(tmp_path / "tpm")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no built-in guest 'nosuch'" in out.stderr
    assert "VMM B" not in out.stdout + out.stderr and "listening" not in out.stdout + out.stderr
    assert not (tmp_path / "tpm").exists()                  # nothing measured, nothing started


# ------------------------------------------------------------- --events format
EVENT_LINE = re.compile(r"^event (\d+) @(\d+) ([A-Z]\w+)((?: [a-z_0-9]+=(?:\"(?:[^\"\\]|\\.)*\"|\S+))*)$")


def test_events_never_break_a_console_line():
    plain = cli("run", "multi")
    merged = subprocess.run([sys.executable, "-m", "minivmm", "run", "multi", "--events"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert merged.returncode == 0
    lines = merged.stdout.splitlines(keepends=True)
    console = [line for line in lines if not EVENT_LINE.match(line.rstrip("\n"))
               and not line.startswith("minivmm: ")]
    assert "".join(console) == plain.stdout          # every console line whole, in order
    events = [EVENT_LINE.match(line.rstrip("\n")) for line in lines if line.startswith("event ")]
    assert all(events) and len(events) > 500
    seqs = [int(m.group(1)) for m in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_event_lines_name_syscalls_and_print_addresses_in_hex():
    out = cli("run", "hello", "--events")
    lines = [line for line in out.stderr.splitlines() if line.startswith("event ")]
    assert all(EVENT_LINE.match(line) for line in lines), lines
    write = next(line for line in lines if " Syscall " in line and "write" in line)
    assert re.search(r" pid=1 call=write\(2\) args=0x4000101a,0xd,0x0$", write), write
    assert any(re.search(r" ProcessStart pid=1 name=hello cr3=0x[0-9a-f]+$", line) for line in lines)
    assert any(" Halted reason=shutdown detail=\"status 0\"" in line for line in lines)


def test_event_text_format_is_stable():
    from minivmm.eventformat import to_text
    e = ev.Fault(seq=7, vtime=1200, pid=3, vector=14, eip=0x40001234, error_code=6, address=0x60000000)
    assert to_text(e) == ("event 7 @1200 Fault pid=3 vector=#PF(14) eip=0x40001234 error_code=0x6 "
                          "address=0x60000000")
    e = ev.PageCloaked(seq=8, vtime=5, pid=1, vaddr=0x40801000, frame=0x123000, version=2, reason="kernel access")
    assert to_text(e) == ('event 8 @5 PageCloaked pid=1 vaddr=0x40801000 frame=0x123000 version=2 '
                          'reason="kernel access"')
    e = ev.Syscall(seq=9, vtime=6, pid=2, number=99, args=(1, 2, 3))
    assert to_text(e) == "event 9 @6 Syscall pid=2 call=unknown(99) args=0x1,0x2,0x3"


def test_events_json_is_one_object_per_line():
    out = cli("run", "hello", "--events", "json")
    assert out.returncode == 0
    docs = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    assert [d["seq"] for d in docs] == sorted(d["seq"] for d in docs)
    assert "".join(d["text"] for d in docs if d["type"] == "ConsoleOutput") == out.stdout
    write = next(d for d in docs if d["type"] == "Syscall" and d["call"] == "write")
    assert write["pid"] == 1 and write["number"] == 2 and write["args"][1] == 13
    assert docs[-1]["type"] == "Halted" and docs[-1]["reason"] == "shutdown"
    bad = cli("run", "--events", "hello")
    assert bad.returncode == 2 and "write the guest before --events" in bad.stderr


# ----------------------------------------------------- benchmarks: progress, verdicts
def test_goal_verdicts_say_met_or_by_how_much_missed():
    from minivmm.verdict import Goal, summary
    ratio = Goal("fast mode", ">=", 0.8)
    assert ratio.verdict(0.9) == "met (goal >= 0.8)"
    assert ratio.verdict(0.6) == "*** MISSED by 0.2 (25% of the goal; goal >= 0.8) ***"
    downtime = Goal("downtime", "<=", 30, " ms")
    assert downtime.verdict(30) == "met (goal <= 30 ms)"
    assert "MISSED by 15 ms (50% of the goal" in downtime.verdict(45)
    assert summary([(ratio, 0.9), (downtime, 45)]) == "goals: 1 of 2 met; *** MISSED: downtime ***"


def test_bench_shows_progress_and_a_verdict_per_goal():
    out = cli("bench", "--part", "compute", "--iterations", "100000", "--repeat", "1")
    assert out.returncode == 0, out.stderr
    steps = [line for line in out.stderr.splitlines() if line.startswith("bench compute: [")]
    assert [s.split("]")[0] for s in steps[::2]] == ["bench compute: [1/3", "bench compute: [2/3",
                                                     "bench compute: [3/3"]
    assert all(s.endswith(" ...") for s in steps[::2]) and all(s.endswith(" s") for s in steps[1::2])
    verdicts = re.findall(r"ratio \d\.\d\d  (met \(goal >= [\d.]+\)|\*\*\* MISSED by .*\*\*\*)$", out.stdout, re.M)
    assert len(verdicts) == 2, out.stdout
    assert re.search(r"^goals: \d of 2 met", out.stdout, re.M)


def test_bench_migrate_shows_progress_and_verdicts(tmp_path):
    out = subprocess.run([sys.executable, "-m", "minivmm", "bench-migrate", "--sizes", "64", "--repeat", "1"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "bench-migrate: [1/6] loopback TCP ceiling" in out.stderr
    assert "bench-migrate: [6/6] 64 MiB counter guest" in out.stderr
    assert re.search(r"64 MiB counter guest, downtime: [\d.]+ ms  (met|\*\*\* MISSED)", out.stdout)
    assert re.search(r"^goals: \d of 3 met", out.stdout, re.M)     # + secure/plain total and downtime
