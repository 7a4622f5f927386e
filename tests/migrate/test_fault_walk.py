"""Fault injection at every protocol step (``--fault ACTION@N``, migrate/fault.py):
two real VMM processes over real loopback TCP, one of them made to crash, hang,
stall or close the connection at step N, for every N of a whole secure
migration, on both sides.

The invariant (docs/protocol.md, "Failure at every step"): never two running
copies of the VM; exactly one copy whenever the faulted process survives, and
the guest's counter continues without gap or repeat wherever it ends up
(compared with a run that never migrated).  A crash is a host failure: a
source that dies before its COMMIT reached the destination loses the VM (as
any host crash would), and the destination must not resume it; a destination
that dies after COMMIT leaves the source's sealed recovery file, which
``minivmm recover`` continues.

The steps are counted first with ``--trace-steps`` on both sides, and the walk
checks that it hit each of them.  VMM processes are forked from one warm
interpreter (tests/migrate/zygote.py) to keep the walk's ~200 process starts
cheap; each is still its own OS process.
"""

from __future__ import annotations

import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from guests.build import Program, build_image
from migrate.secure.setup import setup
from minivmm.vmmproc import mode_args, reference_run

from zygote import Zygote

pytestmark = pytest.mark.slow

PEER_TIMEOUT = "3"          # the peer of a hanging/stalling side gives up after this (s)
FAULTED_TIMEOUT = "60"      # the faulted side itself never gives up first
STEP = re.compile(r"step (\d+): (send|recv) (\w+)")
SURVIVING = ("hang", "stall", "close")
INJECTED = re.compile(r"FAULT INJECTED: (\w+) at step (\d+) \((send|recv) (\w+)")


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def _world(base: Path, zygote: Zygote, secure: bool) -> "World":
    """Trust (secure), a small protected-counter image, the never-migrated
    reference run, and the steps of one whole fault-free migration as each side
    saw them (``--trace-steps``)."""
    trust = None
    if secure:
        trust = base / "trust"
        setup(trust, [{}])
    img = base / "pcounter.mvimg"
    img.write_bytes(build_image([Program.builtin("counter", data_pages=1, args=(30, 100_000, 1))],
                                name="pcounter", ram_size=16 << 20).to_bytes())
    ref = reference_run(base, str(img))
    assert ref.returncode == 0 and "counter 30" in ref.stdout, ref.stderr
    w = World(base, zygote, str(img), ref.stdout, trust)
    trace = w.case("trace", None, None, None)
    assert trace.src_rc == 0 and trace.dst_resumed, trace.describe()
    w.steps = {"src": _steps(trace.src.stderr), "dst": _steps(trace.dst.stderr)}
    assert len(w.steps["src"]) == len(w.steps["dst"]) >= 15, w.steps
    return w


@pytest.fixture(scope="module")
def world(tmp_path_factory, zygote):
    return _world(tmp_path_factory.mktemp("faultwalk"), zygote, secure=True)


def _steps(stderr: str) -> list[tuple[str, str]]:
    steps = [(d, t) for n, d, t in STEP.findall(stderr)]
    assert [int(n) for n, _, _ in STEP.findall(stderr)] == list(range(1, len(steps) + 1))
    return steps


class Case:
    """What one faulted migration left behind."""

    def __init__(self, name):
        self.name = name
        self.src = self.dst = self.rec = None
        self.src_rc = None
        self.dst_resumed = False
        self.src_killed_hung = False
        self.injected = None

    def describe(self) -> str:
        parts = [f"case {self.name}: src rc {self.src_rc}, dst resumed {self.dst_resumed}"]
        for who in ("src", "dst", "rec"):
            p = getattr(self, who)
            if p is not None:
                parts.append(f"--- {who} (rc {p.returncode}) stderr:\n{p.stderr[-3000:]}")
        return "\n".join(parts)


class World:
    def __init__(self, base: Path, zygote: Zygote, img: str, ref: str, trust: Path | None):
        self.base, self.zygote, self.img, self.ref, self.trust = base, zygote, img, ref, trust
        self.steps = {}

    def case(self, name, side, action, n) -> Case:
        cwd = self.base / name
        cwd.mkdir()
        c = Case(name)
        fault = {side: ["--fault", f"{action}@{n}"]} if side else {}
        trace = ["--trace-steps"] if side is None else []
        t_dst = FAULTED_TIMEOUT if side == "dst" else PEER_TIMEOUT
        t_src = FAULTED_TIMEOUT if side == "src" else PEER_TIMEOUT
        if side is None:
            t_dst = t_src = "30"
        z = self.zygote
        c.dst = dst = z.spawn("serve", *mode_args(self.trust), "--listen", "127.0.0.1:0",
                              "--timeout", t_dst, *trace, *fault.get("dst", []), cwd=cwd, name="dst")
        line = dst.wait_for("listening on")
        port = line.split("listening on ", 1)[1].split()[0].rsplit(":", 1)[1]
        c.src = src = z.spawn("run", self.img, *mode_args(self.trust), "--migrate-to", f"127.0.0.1:{port}",
                              "--after", "5", "--max-rounds", "1", "--timeout", t_src, *trace,
                              *fault.get("src", []), cwd=cwd, name="src")
        try:
            if side == "src" and action == "hang":
                self._settle(dst)                   # the destination's deadlines decide
                c.src_killed_hung = src.returncode is None
                src.kill()                          # stuck for good (the guest with it, or ended)
                c.src_rc = src.returncode
            else:
                c.src_rc = src.finish(120)
            if side == "dst" and action == "hang":
                c.dst_resumed = False               # blocked for ever: it never resumes
                dst.kill()
            else:
                c.dst_resumed = self._settle(dst)
            if c.src_rc == 4 and not c.dst_resumed:   # the documented recovery: only if B did not resume
                line = src.wait_for("continue it with: minivmm ")
                how = line.rsplit("continue it with: minivmm ", 1)[1].split()    # recover F | run F --restore
                c.rec = z.spawn(*how, cwd=cwd, name="rec", env={"MINIVMM_TPM_STATE": str(cwd / "tpm-src")})
                assert c.rec.finish(120) == 0, c.describe()
            if side:
                m = INJECTED.search((src if side == "src" else dst).stderr)
                assert m and (m.group(1), int(m.group(2))) == (action, n), c.describe()
                c.injected = (m.group(3), m.group(4))
        finally:
            for p in (src, dst):
                p.kill()
        return c

    @staticmethod
    def _settle(dst) -> bool:
        """Wait until the destination resumed (and ran the guest to its end) or
        discarded the VM; whether it resumed."""
        while True:
            err = dst.stderr
            if "nothing resumed" in err:
                return False
            if dst.returncode is not None:
                return "resumed guest" in err
            time.sleep(0.05)


def _check(w: World, c: Case, side: str, action: str, n: int) -> None:
    """The invariant, for one case."""
    steps = w.steps[side]
    assert c.injected == steps[n - 1], f"step {n} was {c.injected}, the trace says {steps[n - 1]}\n" + c.describe()
    commit_src = steps.index(("send", "COMMIT")) + 1 if side == "src" else None
    commit_dst = steps.index(("recv", "COMMIT")) + 1 if side == "dst" else None
    ran_here = c.src_rc == 5
    # never two copies
    assert not (ran_here and c.dst_resumed), "TWO COPIES\n" + c.describe()
    assert c.src_rc in (0, 4, 5, -9, None) or c.src_killed_hung, c.describe()
    copies = int(ran_here) + int(c.dst_resumed) + int(c.rec is not None)
    held_by_hung_source = c.src_killed_hung and not c.dst_resumed
    if action == "crash" and side == "src":
        # after COMMIT reached B (the source's RESUMED step): B runs it; before: lost, B must not resume
        assert c.src_rc == -9 and c.dst_resumed == (n > commit_src), c.describe()
    elif action == "crash":
        assert c.dst.returncode == -9 and copies == 1, c.describe()
        assert c.src_rc == (4 if n >= commit_dst else 5), c.describe()
    else:
        assert copies + int(held_by_hung_source) == 1, "NOT EXACTLY ONE COPY\n" + c.describe()
    # the guest's counter, wherever it ended up: no gap, no repeat
    out = c.src.stdout + (c.dst.stdout if c.dst_resumed else "") + (c.rec.stdout if c.rec else "")
    if copies == 1 and not held_by_hung_source:
        assert out == w.ref, "COUNTER NOT INTACT\n" + out + "\n" + c.describe()
    else:
        assert w.ref.startswith(out), "COUNTER NOT A PREFIX\n" + out + "\n" + c.describe()
    if not c.dst_resumed:
        assert "counter" not in c.dst.stdout, c.describe()


def _walk(w: World, cases, workers: int) -> None:
    """Run ``cases`` ((side, action, step) each), ``workers`` at a time; every
    failing case is reported, not only the first."""
    failures = []

    def one(case):
        side, action, n = case
        try:
            c = w.case(f"{side}-{action}-{n}", side, action, n)
            _check(w, c, side, action, n)
        except Exception as exc:            # noqa: BLE001 - every case reported, not only the first
            failures.append(f"{side} {action}@{n}: {exc}")
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, cases))
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n\n".join(failures[:5])


def every_step(w: World, action: str) -> list:
    return [(side, action, n) for side in ("src", "dst") for n in range(1, len(w.steps[side]) + 1)]


def rotated(w: World, actions=SURVIVING) -> list:
    """Each step of each side with one of ``actions`` in turn (step n gets
    actions[n % 3]), and the steps from PREPARED on -- where who may run
    changes hands -- with every one of them."""
    cases = []
    for side in ("src", "dst"):
        steps = w.steps[side]
        prepared = next(i for i, (_, t) in enumerate(steps, 1) if t == "PREPARED")
        for n in range(1, len(steps) + 1):
            chosen = actions if n >= prepared else (actions[n % len(actions)],)
            cases += [(side, a, n) for a in chosen]
    return cases


def test_a_crash_at_every_step_of_a_secure_migration_on_both_sides(world):
    """The issue's "kill either process at every protocol step"."""
    cases = every_step(world, "crash")
    assert len(cases) == 2 * len(world.steps["src"])
    _walk(world, cases, workers=4)


def test_hang_stall_close_at_every_step_of_a_secure_migration_on_both_sides(world):
    """Every step of each side once with a surviving fault (hang, stall or close
    in turn), and every step from PREPARED on with all three.  The full product
    (every action at every step) is ``MINIVMM_FULL_FAULT_WALK=1``: ~4x longer."""
    cases = rotated(world)
    covered = {(side, n) for side, _, n in cases}
    assert covered == {(side, n) for side in ("src", "dst") for n in range(1, len(world.steps[side]) + 1)}
    _walk(world, cases, workers=8)


@pytest.mark.skipif(not os.environ.get("MINIVMM_FULL_FAULT_WALK"), reason="the full product: set MINIVMM_FULL_FAULT_WALK=1")
@pytest.mark.parametrize("secure", [True, False], ids=["secure", "plain"])
def test_full_walk_every_action_at_every_step(tmp_path_factory, zygote, secure):
    w = _world(tmp_path_factory.mktemp("fullwalk"), zygote, secure)
    for action in ("crash", *SURVIVING):
        _walk(w, every_step(w, action), workers=4 if action in ("crash", "close") else 8)
