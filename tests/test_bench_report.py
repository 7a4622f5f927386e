"""report.md says when the machine was not steady (minivmm/benchsuite.py).

A report's verdicts are medians of a few runs on a machine that may be shared;
when a ceiling measured in the same run (the wire, AES-GCM, a memory copy)
moved a lot between its runs, the report says so under the goals, so that a
reader does not take a verdict near its bound for a property of the code."""

from __future__ import annotations

from minivmm import benchsuite


def _results(ceiling_runs: list[float]) -> dict:
    figures = {"ceiling_loopback_MBps": ceiling_runs, "full_plain_pct_of_loopback": [40.0, 41.0, 39.0]}
    section = {"name": "migration", "params": {"repeat": 3}, "figures": figures,
               "goals": [("plain throughput vs loopback", "full_plain_pct_of_loopback", ">=", 50, "%")]}
    section["stats"] = {k: benchsuite._stats(v) for k, v in figures.items()}
    section["verdicts"] = benchsuite._verdicts(section)
    return {"setting": "quick", "finished": "2026-12-03 10:00:00", "seconds": 30.0, "sections": [section],
            "machine": {"cpus": 2}, "versions": {"python": "3.11"}, "plots": [], "plots_skipped": "none"}


def test_a_report_whose_ceiling_moved_says_the_machine_was_not_steady(tmp_path):
    benchsuite.write_report(tmp_path, _results([1212.0, 3459.0, 2760.0]))
    text = (tmp_path / "report.md").read_text()
    goals = text.split("## Goals", 1)[1].split("## migration", 1)[0]
    assert "**The machine was not steady during this run:** ceiling_loopback_MBps 1212–3459" in goals


def test_a_steady_report_says_nothing_of_it(tmp_path):
    benchsuite.write_report(tmp_path, _results([3452.0, 3663.0, 3497.0]))      # within 1.25x
    assert "not steady" not in (tmp_path / "report.md").read_text()
    assert benchsuite.unsteady(_results([3452.0, 3663.0, 3497.0])["sections"]) == []
