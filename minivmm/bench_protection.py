"""``minivmm bench --part protection``: what process protection costs.

* Per page: a cloak (AES-GCM seal of 4 KiB in place, metadata update, TLB
  flush, event) and an uncloak (verify + decrypt, the same bookkeeping),
  timed one by one through the real engine on a booted machine; medians.
* Whole programs, protected against the same program unprotected, measured
  interleaved in one run (the ratio is what matters on a shared machine):
  a system-call-heavy loop (every call is a kernel entry with register
  scrubbing and a resume check) and a compute loop (no kernel entries
  beyond the timer).  Goals from the issue: <= 2x and <= 1.1x.
"""

from __future__ import annotations

import statistics
import time

from minivmm.verdict import Goal, Progress

GOAL_SYSCALLS = Goal("protected system calls vs plain", "<=", 2.0, "x")
GOAL_COMPUTE = Goal("protected compute vs plain", "<=", 1.1, "x")


def _machine(program: str, iterations: int, protect: int):
    from guests.build import Program, build_image
    from minivmm.machine import Machine
    image = build_image([Program.builtin(program, data_pages=1, args=(iterations, protect))],
                        name=f"bench-{program}")
    return Machine(image)


def _run(program: str, iterations: int, protect: int) -> float:
    m = _machine(program, iterations, protect)
    t0 = time.perf_counter()
    result = m.run(max_ticks=10_000_000)
    elapsed = time.perf_counter() - t0
    if result != "shutdown" or m.exits != {1: 0} or bool(m.protection.view()) != bool(protect):
        raise RuntimeError(f"benchmark guest {program} did not finish cleanly: {result} {m.exits}")
    return elapsed


def page_costs(samples: int = 400) -> tuple[float, float, float]:
    """Median microseconds of one cloak and one uncloak of a protected page
    (each includes dropping all translated code), and of that drop alone."""
    from minivmm import abi
    m = _machine("compute", 1000, 1)
    m.run(until=lambda m: bool(m.protection.view()))
    prot = m.protection
    proc = prot.procs[1]
    meta = proc.pages[abi.IMAGE_VADDR >> 12]
    cloak, uncloak, flush = [], [], []
    for _ in range(samples):
        t0 = time.perf_counter()
        m.flush_translations()
        flush.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        prot.cloak(proc, meta, reason="bench")
        t1 = time.perf_counter()
        if prot._owner_access(proc, meta, meta.vpn << 12, meta.ppn << 12, False) is not None:
            raise RuntimeError("uncloak failed verification in the benchmark")
        t2 = time.perf_counter()
        cloak.append(t1 - t0)
        uncloak.append(t2 - t1)
    return (statistics.median(cloak) * 1e6, statistics.median(uncloak) * 1e6,
            statistics.median(flush) * 1e6)


def measure(repeat: int = 3, syscalls: int = 20_000, compute: int = 3_000_000,
            progress: Progress | None = None) -> dict:
    best = {k: float("inf") for k in ("sys_plain", "sys_prot", "cpu_plain", "cpu_prot")}
    progress = progress or Progress("bench protection", 4 * repeat + 1)
    for k in range(repeat):
        of = f"(run {k + 1} of {repeat})"
        with progress.step(f"{syscalls:,} system calls, unprotected {of}"):
            best["sys_plain"] = min(best["sys_plain"], _run("sysloop", syscalls, 0))
        with progress.step(f"{syscalls:,} system calls, protected {of}"):
            best["sys_prot"] = min(best["sys_prot"], _run("sysloop", syscalls, 1))
        with progress.step(f"compute loop, unprotected {of}"):
            best["cpu_plain"] = min(best["cpu_plain"], _run("compute", compute, 0))
        with progress.step(f"compute loop, protected {of}"):
            best["cpu_prot"] = min(best["cpu_prot"], _run("compute", compute, 1))
    with progress.step("cloak and uncloak one page, 400 times each"):
        cloak_us, uncloak_us, flush_us = page_costs()
    return {"syscalls": syscalls, "compute": compute, "seconds": best,
            "cloak_us": cloak_us, "uncloak_us": uncloak_us, "flush_tb_us": flush_us,
            "syscall_ratio": best["sys_prot"] / best["sys_plain"],
            "compute_ratio": best["cpu_prot"] / best["cpu_plain"]}


def report(r: dict) -> str:
    s = r["seconds"]
    return "\n".join([
        "process protection",
        f"  cloak one page (median)   : {r['cloak_us']:7.1f} us",
        f"  uncloak one page (median) : {r['uncloak_us']:7.1f} us",
        f"  of which dropping translated code (flush_tb, median): {r['flush_tb_us']:5.1f} us",
        f"  {r['syscalls']:,} getpid calls      : {s['sys_plain'] * 1e6 / r['syscalls']:6.1f} us/call plain, "
        f"{s['sys_prot'] * 1e6 / r['syscalls']:6.1f} us/call protected   "
        f"slowdown {r['syscall_ratio']:.2f}x  {GOAL_SYSCALLS.verdict(r['syscall_ratio'])}",
        f"  compute loop ({r['compute']:,} it.) : {s['cpu_plain']:.3f} s plain, {s['cpu_prot']:.3f} s protected"
        f"   slowdown {r['compute_ratio']:.2f}x  {GOAL_COMPUTE.verdict(r['compute_ratio'])}"])


def goals(r: dict) -> list:
    return [(GOAL_SYSCALLS, r["syscall_ratio"]), (GOAL_COMPUTE, r["compute_ratio"])]
