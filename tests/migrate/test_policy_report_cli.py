"""The pre-copy policy's rules, the report, and the CLI's argument parsing."""

import argparse

import pytest

from migrate.cli import parse_after
from minivmm.cli import main
from migrate.precopy import PrecopyPolicy
from migrate.report import MigrationReport, RoundStats

RAM = 16 << 20


def decide(policy=PrecopyPolicy(), **kw):
    args = dict(rounds_done=1, remaining=100, cost_per_page=10e-6, bytes_sent=RAM, ram_size=RAM)
    args.update(kw)
    return policy.decide(**args)


def test_rules_in_order():
    assert decide(remaining=0).reason == "no dirty pages left"
    d = decide(remaining=100)                                  # 1 ms <= 30 ms
    assert d.stop and "fits the downtime target" in d.reason and d.estimate == pytest.approx(1e-3)
    d = decide(remaining=4000, cost_per_page=1e-3)              # 4 s: keep going
    assert not d.stop
    d = decide(remaining=4000, cost_per_page=1e-3, rounds_done=30)
    assert d.stop and "round bound" in d.reason
    d = decide(remaining=4000, cost_per_page=1e-3, bytes_sent=3 * RAM)
    assert d.stop and "byte bound" in d.reason
    tight = PrecopyPolicy(downtime_target=1e-6, max_rounds=100, max_bytes_ratio=50)
    assert not decide(tight, remaining=1).stop
    assert decide(remaining=100, cost_per_page=None).estimate == pytest.approx(100 * 10e-6)


@pytest.mark.parametrize("kw", [dict(downtime_target=0), dict(max_rounds=0), dict(max_bytes_ratio=-1)])
def test_policy_parameters_checked(kw):
    with pytest.raises(ValueError):
        PrecopyPolicy(**kw)


def test_report_format_and_dict():
    r = MigrationReport("source", "h:1", RAM, rounds=[RoundStats(0, 4096, 10, 4086, 50_000, 0.01, 0.001, 20),
                                                      RoundStats(1, 20, 20, 0, 82_000, 0.001, final=True)],
                        stop_reason="fits", outcome="completed", total_seconds=0.05, downtime_seconds=0.004,
                        downtime_method="one clock", vclock_pause=10, vclock_resume=10, bytes_sent=140_000)
    text = r.format()
    for needle in ("completed", "final", "pre-copy stopped after 1 rounds: fits", "downtime 4.00 ms",
                   "at pause 10, at resume 10", "2000"):
        assert needle in text, needle
    d = r.to_dict()
    assert d["rounds"][0]["dirty_rate"] == pytest.approx(2000) and d["downtime_seconds"] == 0.004


def test_parse_after():
    assert parse_after("25") == ("ticks", 25)
    assert parse_after("2s") == ("seconds", 2.0)
    assert parse_after("500ms") == ("seconds", 0.5)
    assert parse_after("signal") == ("signal", 0)
    for bad in ("x", "-1", "1.5", "2h", "sig"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_after(bad)


def test_a_bound_stops_with_the_target_not_met():
    assert decide(remaining=100).target_met and decide(remaining=0).target_met
    for kw in (dict(rounds_done=30), dict(bytes_sent=3 * RAM)):
        d = decide(remaining=4000, cost_per_page=1e-3, **kw)
        assert d.stop and not d.target_met and d.estimate == pytest.approx(4.0)


def test_the_report_says_when_and_by_how_much_the_target_was_missed():
    r = MigrationReport("source", "h:1", RAM, policy=PrecopyPolicy().to_dict(),
                        rounds=[RoundStats(0, 4096, 10, 4086, 50_000, 0.01, 0.001, 4000),
                                RoundStats(1, 4000, 4000, 0, 16_400_000, 0.2, final=True)],
                        stop_reason="round bound reached", target_met=False, estimated_pages_seconds=0.25,
                        outcome="completed", total_seconds=0.5, downtime_seconds=0.26,
                        downtime_method="one clock", bytes_sent=16_500_000)
    text = r.format()
    assert "downtime target NOT met" in text and "estimated at 250.0 ms, 220.0 ms over the 30 ms target" in text
    assert "downtime 260.00 ms" in text and "230.00 ms over the 30 ms target" in text
    r.target_met, r.downtime_seconds = True, 0.02
    assert "NOT met" not in r.format() and "over the" not in r.format()


def test_an_aborted_report_without_transfer_is_sane():
    r = MigrationReport("source", "h:1", RAM, policy=PrecopyPolicy().to_dict(), outcome="aborted",
                        error="ConnectionLost: refused", total_seconds=0.01)
    text = r.format()
    assert "aborted -- ConnectionLost: refused" in text and "nothing was transferred" in text
    assert "throughput" not in text and "round   pages" not in text


def test_run_help_lists_the_migration_exit_statuses():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "minivmm", "run", "--help"], capture_output=True, text=True)
    text = " ".join(out.stdout.split())
    assert out.returncode == 0
    for needle in ("0 migrated", "5 not migrated", "4 committed but unconfirmed"):
        assert needle in text, needle


def test_round_ticks_option_is_checked(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "counter", "--migrate-to", "127.0.0.1:9", "--round-ticks", "-1"])
    assert exc.value.code == 2
    assert "must be >= 0, not -1" in capsys.readouterr().err


def test_round_ticks_is_a_checked_policy_field():
    with pytest.raises(ValueError, match="round ticks"):
        PrecopyPolicy(round_ticks=-1)
    assert PrecopyPolicy(round_ticks=8).to_dict()["round_ticks"] == 8
