"""The pre-copy policy's rules, the report, and the CLI's argument parsing."""

import argparse

import pytest

from migrate.cli import parse_after
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
