"""``minivmm bench``: how fast the VMM runs guest code, against bare Unicorn.

The workload is the ``compute`` program's loop (7 instructions per
iteration: a load, an add and a store over a 4 KiB buffer; a loop with no
memory access at all would run ~15x faster on bare Unicorn and measure only
the instruction counter).  Bare Unicorn runs the same bytes at CPL0 with no hooks at all,
until a ``hlt``.  The VMM runs the toy kernel with *two* compute processes
(preemption on the timer, the MMU fill hook, system calls to print and
exit), in deterministic and in fast mode.  Each configuration is measured
``repeat`` times, interleaved, and the best time is kept, so the ratios are
taken side by side on the same (shared, noisy) machine.  Nothing here is a
pass/fail test: the figures are reported, each beside a verdict on its goal
(``minivmm/verdict.py``), with a progress line on stderr per measurement.
"""

from __future__ import annotations

import time

from unicorn import UC_ARCH_X86, UC_MODE_32, UC_PROT_ALL, Uc
from unicorn.x86_const import UC_X86_REG_ESP

from minivmm.verdict import Goal, Progress, summary

GOAL_DETERMINISTIC = Goal("deterministic mode vs bare Unicorn", ">=", 0.35)
GOAL_FAST = Goal("fast mode vs bare Unicorn", ">=", 0.80)

def _loop_source() -> str:
    """The compute program's loop, verbatim (between its bench-loop markers)."""
    from guests.build import PROGRAMS_DIR
    lines = (PROGRAMS_DIR / "compute.s").read_text().splitlines()
    begin = next(i for i, l in enumerate(lines) if "bench-loop-begin" in l)
    end = next(i for i, l in enumerate(lines) if "bench-loop-end" in l)
    return "\n".join(lines[begin:end + 1])


PER_ITERATION = 7


def bare_unicorn(iterations: int) -> float:
    from guests.asm import assemble
    # The same loop bytes, at CPL0 on a flat 64 KiB, ending in hlt.
    source = f"mov edx, {iterations}\nxor eax, eax\nxor edi, edi\nmov ebp, 0x4000\n{_loop_source()}\nhlt"
    code = assemble(source, 0x1000).code
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    uc.mem_map(0, 0x10000, UC_PROT_ALL)
    uc.mem_write(0x1000, code)
    uc.reg_write(UC_X86_REG_ESP, 0x8000)
    t0 = time.perf_counter()
    uc.emu_start(0x1000, 0)
    return time.perf_counter() - t0


def vmm(iterations: int, mode: str) -> float:
    from guests.build import Program, build_image
    from minivmm.machine import Machine
    image = build_image([Program.builtin("compute", args=(iterations,), as_name="compute-a"),
                         Program.builtin("compute", args=(iterations,), as_name="compute-b")],
                        name="bench")
    m = Machine(image, mode=mode)
    t0 = time.perf_counter()
    result = m.run(max_ticks=10_000_000)
    elapsed = time.perf_counter() - t0
    if result != "shutdown" or m.console.text().count("compute: done") != 2:
        raise RuntimeError(f"benchmark guest did not finish cleanly: {result}")
    return elapsed


def measure(iterations: int = 3_000_000, repeat: int = 3, progress: Progress | None = None) -> dict:
    total = PER_ITERATION * 2 * iterations                  # guest instructions of the two loops
    best = {"bare": float("inf"), "deterministic": float("inf"), "fast": float("inf")}
    progress = progress or Progress("bench compute", 3 * repeat)
    for k in range(repeat):
        with progress.step(f"bare Unicorn, {total:,} instructions (run {k + 1} of {repeat})"):
            best["bare"] = min(best["bare"], bare_unicorn(2 * iterations))
        with progress.step(f"VMM deterministic mode (run {k + 1} of {repeat})"):
            best["deterministic"] = min(best["deterministic"], vmm(iterations, "deterministic"))
        with progress.step(f"VMM fast mode (run {k + 1} of {repeat})"):
            best["fast"] = min(best["fast"], vmm(iterations, "fast"))
    ips = {k: total / v for k, v in best.items()}
    return {"instructions": total, "seconds": best, "ips": ips,
            "ratio_deterministic": ips["deterministic"] / ips["bare"],
            "ratio_fast": ips["fast"] / ips["bare"]}


def report(r: dict) -> str:
    lines = [f"compute loop, {r['instructions']:,} guest instructions (2 processes under the VMM)",
             f"  bare Unicorn, no hooks : {r['ips']['bare'] / 1e6:7.1f} M instr/s",
             f"  VMM deterministic mode : {r['ips']['deterministic'] / 1e6:7.1f} M instr/s"
             f"   ratio {r['ratio_deterministic']:.2f}  {GOAL_DETERMINISTIC.verdict(r['ratio_deterministic'])}",
             f"  VMM fast mode          : {r['ips']['fast'] / 1e6:7.1f} M instr/s"
             f"   ratio {r['ratio_fast']:.2f}  {GOAL_FAST.verdict(r['ratio_fast'])}"]
    return "\n".join(lines)


def goals(r: dict) -> list:
    return [(GOAL_DETERMINISTIC, r["ratio_deterministic"]), (GOAL_FAST, r["ratio_fast"])]


def main(args) -> int:
    part = getattr(args, "part", "all")
    results = []
    if part in ("all", "compute"):
        r = measure(args.iterations, args.repeat)
        print(report(r), flush=True)
        results += goals(r)
    if part in ("all", "protection"):
        from minivmm.bench_protection import goals as pgoals, measure as pmeasure, report as preport
        r = pmeasure(repeat=args.repeat)
        print(preport(r), flush=True)
        results += pgoals(r)
    print(summary(results))
    return 0
