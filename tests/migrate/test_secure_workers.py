"""The secure protocol's side-work threads (migrate/secure/workers.py): started
before the protocol needs them, never making a job wait behind another, and
rebuilt in a forked child."""

from __future__ import annotations

import os
import threading
import time
from types import SimpleNamespace

import pytest

from migrate.secure import workers


def test_a_job_on_a_prepared_pool_starts_no_thread():
    # The point of the module: a job on the critical path costs a queue put,
    # not a thread start (which waits for the new thread to get the GIL).
    workers.prepare()
    before = {t.ident for t in threading.enumerate()}
    for _ in range(workers.WARM):
        assert workers.background(lambda: 7).result(timeout=30) == 7
    assert {t.ident for t in threading.enumerate()} <= before


def test_a_job_never_waits_behind_a_blocked_one():
    # An NV write can take 60 ms; a quote submitted meanwhile must not queue
    # behind it -- and a job waiting for another job's result must not starve it.
    release = threading.Event()
    slow = [workers.background(release.wait) for _ in range(workers.WARM + 2)]
    try:
        inner = workers.background(lambda: "quote")
        outer = workers.background(lambda: inner.result(timeout=30) + " verified")
        assert outer.result(timeout=30) == "quote verified"
        assert not any(f.done() for f in slow)
    finally:
        release.set()
    assert all(f.result(timeout=30) for f in slow)


def test_a_failure_reaches_whoever_waits():
    def fail():
        raise ValueError("quote refused")
    with pytest.raises(ValueError, match="quote refused"):
        workers.background(fail).result(timeout=30)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_runs_jobs_on_its_own_workers():
    # The parent's workers do not exist in a child: a job put on their queue
    # would wait for ever.  (The test suite's fork server forks VMM processes.)
    workers.prepare()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # child: report, never return into pytest
        try:
            ok = workers.background(lambda: os.getpid()).result(timeout=10) == os.getpid()
            os.write(w, b"ok" if ok else b"bad")
        except BaseException as exc:                # noqa: BLE001 - reported to the parent
            os.write(w, repr(exc).encode()[:200])
        finally:
            os._exit(0)
    os.close(w)
    try:
        answer = os.read(r, 256)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert answer == b"ok"


def test_a_job_running_at_exit_finishes_before_the_process_ends(tmp_path):
    # An NV write still running when a VMM exits ends as on a thread of its own.
    import subprocess
    import sys
    done = tmp_path / "written"
    code = ("import time, pathlib\n"
            "from migrate.secure import workers\n"
            "started = __import__('threading').Event()\n"
            "def nv_write():\n"
            "    started.set(); time.sleep(0.3)\n"
            f"    pathlib.Path({str(done)!r}).write_text('ok')\n"
            "workers.background(nv_write)\n"
            "started.wait()\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert done.read_text() == "ok"


def test_a_pool_counts_exactly_the_threads_it_started_so_an_idle_one_drains_at_once():
    # drain() (at exit) waits until every worker is idle: a count of threads
    # above the workers that exist never reaches it, and every VMM exit would
    # wait EXIT_WAIT (30 s) for a job that is not there.
    before = {t.ident for t in threading.enumerate()}
    pool = workers._Pool(2)
    assert pool.threads == pool.idle == 2
    assert pool.submit(lambda: "quote").result(timeout=30) == "quote"
    assert pool.drain(workers.EXIT_WAIT)        # at once: both idle once the job is done
    assert pool.idle == pool.threads == 2
    started = {t.ident for t in threading.enumerate()} - before
    assert len(started) == pool.threads         # the job found an idle worker: no third thread


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_childs_exit_does_not_wait_for_its_parents_jobs():
    # The parent's pool, copied into a child that never used one, counts jobs
    # that run only in the parent: draining it at the child's exit would wait
    # EXIT_WAIT for nothing.
    workers.prepare()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # child: report, never return into pytest
        try:
            workers._pool.drain = lambda timeout: os.write(w, b"drained the parent's pool ")
            workers._drain()                        # what atexit runs
            os.write(w, b"exit")
        finally:
            os._exit(0)
    os.close(w)
    try:
        answer = b""
        while chunk := os.read(r, 256):
            answer += chunk
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert answer == b"exit"


def test_a_job_yields_the_interpreter_once_unless_asked_to_start_now(monkeypatch):
    # background() is called on the critical path: its worker first gives the
    # GIL back (sleep(0)) so that the submitter sends its record; a job that
    # must run at once (now=True) does not.  A longer sleep would be paid by
    # every quote, verification and NV write of a migration.
    slept = []
    monkeypatch.setattr(workers, "time", SimpleNamespace(sleep=slept.append))   # this module's only
    assert workers.background(lambda: 1).result(timeout=30) == 1
    assert slept == [0]
    assert workers.background(lambda: 2, now=True).result(timeout=30) == 2
    assert slept == [0]


def test_an_idle_worker_keeps_nothing_of_its_last_job():
    # A job's closure can hold what a migration must not keep (the machine and
    # its process keys, for the escrow): an idle worker drops its last job.
    import gc
    import weakref

    class Secret:
        pass
    pool = workers._Pool(1)
    held = Secret()
    gone = weakref.ref(held)
    assert pool.submit(lambda s=held: s is not None).result(timeout=30)     # held by the job itself
    del held
    assert pool.drain(workers.EXIT_WAIT)        # the worker is past its job (idle again)
    gc.collect()
    assert gone() is None


def test_a_drain_already_waiting_is_woken_when_the_last_job_ends():
    # At exit, drain() waits for an NV write in flight: the worker that ends it
    # must wake the waiter, which would otherwise sleep out its whole bound
    # (EXIT_WAIT, 30 s, at every VMM exit that caught a job).  This drain may
    # wait an hour: only a drain nobody woke outlasts the join's bound, however
    # loaded the machine.
    pool = workers._Pool(1)
    release = threading.Event()
    job = pool.submit(release.wait)
    drained = []
    waiter = threading.Thread(target=lambda: drained.append(pool.drain(3600)), daemon=True)
    waiter.start()
    for _ in range(100_000):                    # until the drain waits on the condition
        if pool._idle_cv._waiters:
            break
        time.sleep(0.001)
    assert pool._idle_cv._waiters and not drained
    release.set()
    assert job.result(timeout=60) is True
    waiter.join(timeout=120)
    assert drained == [True]
