"""``minivmm bench``: the one benchmark suite and its report directory.

Runs, ``repeat`` times each (interleaved inside each part): guest speed
(``minivmm/bench.py``: the VMM against bare Unicorn), process protection
(``minivmm/bench_protection.py``), and every suite registered on the
``minivmm.bench_suites`` entry point (the ``migrate`` package registers
live migration, plain and secure: ``migrate/bench_suite.py``; ``minivmm``
never imports it).  Progress goes to stderr as each measurement starts.

The report directory gets ``report.md`` (per part: parameters, a table of
every figure with its median, min, max and number of runs, and a met/missed
verdict per goal on the median; the machine and the versions), ``results.json``
(the same, every run's value) and PNG plots when matplotlib is installed (the
``plots`` extra); without it ``report.md`` says the plots were skipped.  Speed
is reported, never asserted: a missed goal does not change the exit status.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from minivmm.plugins import own_entry_points
from minivmm.verdict import Goal, Progress

# Quick's compute loops are a third of full's, not a fifteenth: at 200,000
# iterations the bare run took 0.05-0.09 s, a run's fixed costs weighed on the
# VMM's side, and quick reports missed the guest-speed goals that full runs met
# on the same machine (deterministic 0.31-0.34 against 0.35-0.39 at 1-3 M).
SETTINGS = {          # name -> repeat, compute iterations, protection (syscalls, compute iterations)
    "full": dict(repeat=5, iterations=3_000_000, syscalls=20_000, compute=3_000_000),
    "quick": dict(repeat=3, iterations=1_000_000, syscalls=2_000, compute=1_000_000),
    "smoke": dict(repeat=2, iterations=50_000, syscalls=500, compute=50_000),
}


def _compute_part(s: dict, progress_factory) -> dict:
    from minivmm.bench import GOAL_DETERMINISTIC, GOAL_FAST, measure
    figures: dict[str, list[float]] = {}
    progress = progress_factory("bench compute", 3 * s["repeat"])
    for _ in range(s["repeat"]):
        r = measure(s["iterations"], 1, progress=progress)
        for key in ("bare", "deterministic", "fast"):
            figures.setdefault(f"{key}_Minstr_per_s", []).append(r["ips"][key] / 1e6)
        figures.setdefault("deterministic_over_bare", []).append(r["ratio_deterministic"])
        figures.setdefault("fast_over_bare", []).append(r["ratio_fast"])
    goals = [(GOAL_DETERMINISTIC.name, "deterministic_over_bare", GOAL_DETERMINISTIC.op, GOAL_DETERMINISTIC.bound, ""),
             (GOAL_FAST.name, "fast_over_bare", GOAL_FAST.op, GOAL_FAST.bound, "")]
    return {"name": "guest speed", "params": {"iterations_per_process": s["iterations"], "repeat": s["repeat"]},
            "figures": figures, "goals": goals, "series": {}}


def _protection_part(s: dict, progress_factory) -> dict:
    from minivmm.bench_protection import GOAL_COMPUTE, GOAL_SYSCALLS, measure
    figures: dict[str, list[float]] = {}
    progress = progress_factory("bench protection", 5 * s["repeat"])
    for _ in range(s["repeat"]):
        r = measure(1, s["syscalls"], s["compute"], progress=progress)
        for key in ("cloak_us", "uncloak_us", "syscall_ratio", "compute_ratio"):
            figures.setdefault(key, []).append(r[key])
    goals = [(GOAL_SYSCALLS.name, "syscall_ratio", GOAL_SYSCALLS.op, GOAL_SYSCALLS.bound, "x"),
             (GOAL_COMPUTE.name, "compute_ratio", GOAL_COMPUTE.op, GOAL_COMPUTE.bound, "x")]
    return {"name": "process protection", "params": {"syscalls": s["syscalls"], "compute_iterations": s["compute"],
                                                     "repeat": s["repeat"]},
            "figures": figures, "goals": goals, "series": {}}


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("minivmm", "unicorn", "keystone-engine", "numpy", "cryptography", "matplotlib"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    out["git commit"] = _git_commit(Path(__file__).resolve().parent.parent)
    return out


def _git_commit(root: Path) -> str:
    """The checkout's commit, read from ``root/.git`` (short hash), or "unknown".
    Read, not asked of ``git``: git searches the parent directories for a
    repository when there is none here (an installed wheel), and a planted
    repository's configuration can make git run a command of its choosing
    (hostile review)."""
    git = root / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            ref_file = git / ref
            if ref_file.is_file():
                head = ref_file.read_text().strip()
            else:
                packed = (git / "packed-refs").read_text().splitlines()
                head = next(line.split()[0] for line in packed if line.endswith(" " + ref))
    except (OSError, StopIteration, UnicodeDecodeError):
        return "unknown"
    return head[:7] if len(head) == 40 and all(c in "0123456789abcdef" for c in head) else "unknown"


def _machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    return {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(),
            "load average at start (1, 5, 15 min)": [round(x, 2) for x in load]}


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def _verdicts(section: dict) -> list[dict]:
    out = []
    for name, key, op, bound, unit in section["goals"]:
        goal = Goal(name, op, bound, unit)
        values = section["figures"].get(key)
        if not values:
            out.append({"goal": name, "figure": key, "bound": f"{op} {bound:g}{unit}", "median": None,
                        "met": None, "verdict": "not measured"})
            continue
        med = statistics.median(values)
        out.append({"goal": name, "figure": key, "bound": f"{op} {bound:g}{unit}", "median": med,
                    "met": goal.met(med), "verdict": goal.verdict(med)})
    return out


#: A ceiling (a figure named ``ceiling_*``: the wire, AES-GCM, a memory copy)
#: whose slowest run is this much slower than its fastest says the machine was
#: not steady during the report: another job took cores or memory bandwidth.
UNSTEADY = 1.25


def unsteady(sections: list[dict]) -> list[str]:
    """The ceilings that moved more than UNSTEADY during the run, as phrases."""
    out = []
    for sec in sections:
        for name, values in sec["figures"].items():
            if name.startswith("ceiling_") and min(values) > 0 and max(values) / min(values) > UNSTEADY:
                out.append(f"{name} {_fmt(min(values))}–{_fmt(max(values))}")
    return out


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def write_report(out: Path, results: dict) -> None:
    lines = ["# minivmm benchmark report", "",
             f"Setting `{results['setting']}`, {results['finished']} UTC, {results['seconds']:.0f} s. "
             "Each figure: median of the runs, with min and max (the machine may be shared: read ratios "
             "taken in the same run, not absolute times). Verdicts are on the median.", "",
             "## Goals", "", "| part | goal | median | verdict |", "|---|---|---|---|"]
    for sec in results["sections"]:
        for v in sec["verdicts"]:
            med = "—" if v["median"] is None else _fmt(v["median"])
            lines.append(f"| {sec['name']} | {v['goal']} ({v['bound']}) | {med} | {v['verdict']} |")
    moved = unsteady(results["sections"])
    if moved:
        lines += ["", f"**The machine was not steady during this run:** {', '.join(moved)} "
                  f"(slowest to fastest run of a ceiling beyond {UNSTEADY:g}×). A verdict near its bound may "
                  "come out the other way in the next run; the ratios taken side by side hold better than "
                  "the absolute figures."]
    for sec in results["sections"]:
        lines += ["", f"## {sec['name']}", "", "Parameters: " + ", ".join(
            f"{k} = `{json.dumps(v)}`" for k, v in sec["params"].items()), ""]
        for note in sec.get("notes", ()):     # what a figure measures, where its name cannot say it
            lines += [note, ""]
        lines += ["| figure | median | min | max | runs |", "|---|---|---|---|---|"]
        for key, st in sec["stats"].items():
            lines.append(f"| {key} | {_fmt(st['median'])} | {_fmt(st['min'])} | {_fmt(st['max'])} | {st['runs']} |")
    lines += ["", "## Machine", ""] + [f"* {k}: {v}" for k, v in results["machine"].items()]
    lines += ["", "## Versions", ""] + [f"* {k}: {v}" for k, v in results["versions"].items()]
    lines += ["", "## Plots", ""]
    if results["plots"]:
        lines += [f"![{p}]({p})" for p in results["plots"]]
    else:
        lines.append(f"Plots skipped: {results['plots_skipped']}")
    (out / "report.md").write_text("\n".join(lines) + "\n")


def finish(out: Path, results: dict) -> None:
    """Plots (or why not), results.json and report.md for ``results``."""
    results["plots"], results["plots_skipped"] = [], None
    try:
        from minivmm.benchplots import plot_all
    except ImportError as exc:          # matplotlib is the optional `plots` extra
        results["plots_skipped"] = f"matplotlib is not installed ({exc}); pip install 'minivmm[plots]'"
    else:
        results["plots"] = plot_all(out, results["sections"])
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    write_report(out, results)


def main(args) -> int:
    setting = "smoke" if getattr(args, "smoke", False) else "quick" if args.quick else "full"
    s = dict(SETTINGS[setting])
    if args.repeat_given:
        s["repeat"] = args.repeat
    out = Path(args.report)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    machine = _machine()
    sections = [_compute_part(s, Progress), _protection_part(s, Progress)]
    suites = own_entry_points("minivmm.bench_suites")
    for ep in suites:
        sections.append(ep.load()(quick=setting != "full", repeat=s["repeat"], progress_factory=Progress,
                                  smoke=setting == "smoke"))
    for sec in sections:
        sec["stats"] = {k: _stats(v) for k, v in sec["figures"].items()}
        sec["verdicts"] = _verdicts(sec)
    results = {"format": "minivmm-bench-report v1", "setting": setting, "settings": s,
               "finished": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
               "seconds": time.perf_counter() - t0, "machine": machine, "versions": _versions(),
               "suites": [e.name for e in suites], "sections": sections}
    finish(out, results)
    met = [v for sec in sections for v in sec["verdicts"] if v["met"] is not None]
    missed = [v["goal"] for v in met if not v["met"]]
    for sec in sections:
        for v in sec["verdicts"]:
            med = "not measured" if v["median"] is None else _fmt(v["median"])
            print(f"{sec['name']}: {v['goal']}: {med}  {v['verdict']}")
    print(f"goals: {len(met) - len(missed)} of {len(met)} met" + (f"; *** MISSED: {', '.join(missed)} ***"
                                                                  if missed else ""))
    moved = unsteady(sections)
    if moved:
        print(f"the machine was not steady during this run ({', '.join(moved)}): "
              f"a verdict near its bound may flip in the next run")
    print(f"report: {out / 'report.md'} (results.json, "
          + (f"{len(results['plots'])} plots)" if results["plots"] else "plots skipped)"))
    return 0
