"""``minivmm bench`` as CI runs it: every figure produced and sane, never fast.

One run of the whole suite in its smallest setting (``--smoke``: 2 runs of
each measurement, 64 MiB full-RAM guest) in its own process; the migration
part comes from the ``minivmm.bench_suites`` entry point.  Speed is never
asserted: only that each figure exists, is finite and positive, that each
goal got a verdict, and that the report directory holds what it promises."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from migrate.bench_suite import PROTECTED_PAIRS
from minivmm import benchsuite

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "report"
    run = subprocess.run([sys.executable, "-m", "minivmm", "bench", "--smoke", "--report", str(out)],
                         capture_output=True, text=True, timeout=900, cwd=out.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    return out, run, json.loads((out / "results.json").read_text())


def test_every_part_runs_and_shows_progress(report):
    out, run, results = report
    assert [s["name"] for s in results["sections"]] == ["guest speed", "process protection", "migration"]
    assert results["suites"] == ["migration"]
    for prefix in ("bench compute: [1/", "bench protection: [1/", "bench migration: [1/"):
        assert prefix in run.stderr
    last = [l for l in run.stderr.splitlines() if l.startswith("bench migration: [")][-1]
    done, total = last.split("[")[1].split("]")[0].split("/")
    assert done == total, last              # the announced plan is what ran
    assert run.stdout.rstrip().splitlines()[-1].startswith(f"report: {out / 'report.md'}")


def test_every_figure_is_finite_and_positive(report):
    _, _, results = report
    for sec in results["sections"]:
        assert sec["figures"], sec["name"]
        for name, values in sec["figures"].items():
            pairs = PROTECTED_PAIRS if name.startswith("protected_") else 1    # more pairs of the small guest
            assert len(values) == results["settings"]["repeat"] * pairs, name
            for v in values:
                # dirty rates of guests that dirty nothing may be 0; everything else is > 0
                assert math.isfinite(v) and (v > 0 or (name.endswith("dirty_rate_pages_per_s") and v == 0)), (name, v)
            st = sec["stats"][name]
            assert st["min"] <= st["median"] <= st["max"]
    mig = next(s for s in results["sections"] if s["name"] == "migration")["figures"]
    for key in ("ceiling_loopback_MBps", "ceiling_aes_gcm_MBps", "ceiling_memcpy_MBps", "full_plain_MBps",
                "full_secure_MBps", "full_plain_pct_of_loopback", "counter_64MiB_plain_downtime_ms",
                "ceiling_datapath_plain_MBps", "ceiling_datapath_secure_MBps", "datapath_secure_pct_of_loopback",
                "full_plain_pct_of_datapath", "full_secure_pct_of_datapath",
                "full_plain_outside_round0_ms", "full_secure_pct_if_round0_at_datapath",
                "protected_secure_over_plain_total_x", "protected_secure_over_plain_downtime_x"):
        assert key in mig, key


def test_every_goal_has_a_verdict_in_the_report(report):
    out, run, results = report
    text = (out / "report.md").read_text()
    verdicts = [v for s in results["sections"] for v in s["verdicts"]]
    assert len(verdicts) == 9
    for v in verdicts:
        assert v["median"] is not None and v["met"] in (True, False), v
        assert v["verdict"] in text and v["goal"] in text
    for heading in ("## Goals", "## guest speed", "## process protection", "## migration", "## Machine",
                    "## Versions", "## Plots", "| figure | median | min | max | runs |"):
        assert heading in text
    assert f"goals: {sum(v['met'] for v in verdicts)} of 9 met" in run.stdout
    assert "`full_<mode>_pct_of_datapath` is how much of it the migration reaches" in text
    assert "`full_<mode>_pct_if_round0_at_datapath`" in text


def test_plots_are_written_or_said_to_be_skipped(report, tmp_path, monkeypatch):
    out, _, results = report
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert results["plots"] == [] and "Plots skipped: matplotlib is not installed" in (out / "report.md").read_text()
    else:
        assert results["plots"] == ["throughput.png", "rounds.png", "by_ram_size.png", "by_dirty_rate.png"]
        for p in results["plots"]:
            assert (out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"![{p}]({p})" in (out / "report.md").read_text()
    # Without matplotlib the same results give a report that says so, and no PNG.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.delitem(sys.modules, "minivmm.benchplots", raising=False)
    benchsuite.finish(tmp_path, dict(results))
    assert "Plots skipped: matplotlib is not installed" in (tmp_path / "report.md").read_text()
    assert not list(Path(tmp_path).glob("*.png")) and (tmp_path / "results.json").exists()


def test_the_report_reads_the_commit_without_running_git(tmp_path, monkeypatch):
    """The report's commit is read from ``.git``, never asked of ``git``: where
    there is no repository (an installed wheel) git searches the parent
    directories, and a planted repository's configuration (core.fsmonitor) makes
    it run a command (hostile review)."""
    def no_git(*args, **kwargs):
        raise AssertionError(f"a subprocess was started: {args}")
    monkeypatch.setattr(subprocess, "run", no_git)
    monkeypatch.setattr(subprocess, "Popen", no_git)
    sha = "0123456789abcdef0123456789abcdef01234567"
    git = tmp_path / "checkout" / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "refs" / "heads" / "main").write_text(sha + "\n")
    assert benchsuite._git_commit(tmp_path / "checkout") == "0123456"
    (git / "refs" / "heads" / "main").unlink()
    (git / "packed-refs").write_text(f"# pack-refs with: peeled\n{sha.replace('0', 'f')} refs/heads/main\n")
    assert benchsuite._git_commit(tmp_path / "checkout") == "f123456"
    (git / "HEAD").write_text(sha + "\n")                    # detached
    assert benchsuite._git_commit(tmp_path / "checkout") == "0123456"
    (git / "HEAD").write_text("not a commit\n")
    assert benchsuite._git_commit(tmp_path / "checkout") == "unknown"
    assert benchsuite._git_commit(tmp_path / "no-checkout") == "unknown"
    assert benchsuite._versions()["git commit"] != "", "the report still names a commit"


def test_the_overhead_free_bound_puts_round_0_at_the_data_paths_rate_and_keeps_the_rest():
    """100 MB whose round 0 took 3 s of a 4 s migration, against a data path of
    50 MB/s: 1 s outside round 0, and 100 MB in 2 + 1 s had round 0 run at 50 MB/s."""
    from types import SimpleNamespace

    from migrate.bench_suite import overhead_free
    from migrate.report import RoundStats
    r = SimpleNamespace(ram_size=100e6, total_seconds=4.0, rounds=[RoundStats(0, 1, seconds=3.0), RoundStats(1, 1)])
    outside, rate = overhead_free(r, 50e6)
    assert outside == pytest.approx(1.0) and rate == pytest.approx(100e6 / 3)
