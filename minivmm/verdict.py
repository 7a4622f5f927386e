"""Benchmark goals and verdicts: what every ``bench`` prints beside a figure.

A goal is a bound on one figure (``>= 0.35``, ``<= 2``).  The verdict says
``met`` or, standing out in capitals, ``MISSED by`` how much (absolute, and
as a fraction of the goal), so a reader scanning the output cannot miss a
miss.  ``progress`` lines go to stderr as each measurement starts, so a
long benchmark is never silent.  Benchmarks report; they never fail a build.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Goal:
    name: str
    op: str            # ">=" or "<="
    bound: float
    unit: str = ""

    def met(self, value: float) -> bool:
        return value >= self.bound if self.op == ">=" else value <= self.bound

    def verdict(self, value: float) -> str:
        goal = f"goal {self.op} {self.bound:g}{self.unit}"
        if self.met(value):
            return f"met ({goal})"
        short = abs(value - self.bound)
        return (f"*** MISSED by {short:.3g}{self.unit} ({100 * short / abs(self.bound):.0f}% of the goal; "
                f"{goal}) ***")


def summary(results: list[tuple[Goal, float]]) -> str:
    """One closing line: how many goals were met, and which were missed."""
    missed = [g.name for g, v in results if not g.met(v)]
    line = f"goals: {len(results) - len(missed)} of {len(results)} met"
    return line + (f"; *** MISSED: {', '.join(missed)} ***" if missed else "")


class Progress:
    """``what ...`` on stderr before a step, ``done in N s`` after it."""

    def __init__(self, prefix: str, total: int, stream=None):
        self.prefix, self.total, self.n = prefix, total, 0
        self.stream = stream or sys.stderr

    def step(self, what: str):
        self.n += 1
        return _Step(self, f"{self.prefix}: [{self.n}/{self.total}] {what}")


class _Step:
    def __init__(self, progress: Progress, text: str):
        self.progress, self.text = progress, text

    def __enter__(self):
        print(f"{self.text} ...", file=self.progress.stream, flush=True)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            print(f"{self.text}: {time.perf_counter() - self.t0:.2f} s", file=self.progress.stream, flush=True)
