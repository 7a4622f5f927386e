"""The secure protocol's side work, on threads that exist before it is needed.

The protocol runs TPM quotes, quote verifications and NV writes beside its
critical path (mode.py).  Each used to start a thread of its own, and a thread
start is not free here: ``Thread.start()`` waits until the new thread has run
its bootstrap, which needs the interpreter lock, which the guest's thread (or
the destination's receiver) holds meanwhile.  A trace of both ends on one clock
found 0.8-1.9 ms per start on the handshake's and the pause's critical path,
e.g. between a verification and WELCOME.  A worker that already exists only
takes a job off a queue: ``submit`` is a queue put and a lock release, and the
submitting thread keeps the interpreter until it blocks.

One pool per process (a destination serves many sessions; tests run both ends
in one process), started by ``prepare()`` when an Attestor is made -- at VMM
start, off any critical path.  It grows a thread when every worker is busy, so
a job never waits behind another (an NV write takes 10-60 ms), and a job that
waits for another job's future cannot starve it.  At exit, running jobs are
waited for (bounded), as the threads of their own were.  A forked child (the test
suite's fork server) starts its own pool: the parent's threads do not exist in
it, and submitting to their queue would wait for ever.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import time
from concurrent.futures import Future

WARM = 4            # handshake: our quote, the NV write, the mark; then a verification
EXIT_WAIT = 30.0    # at exit, how long a running job (an NV write) may still take


class _Pool:
    """Worker threads over one queue.  ``idle`` counts workers neither running
    a job nor promised one: a job that finds none starts a thread, so no job
    ever waits behind another.  (concurrent.futures' pool decides by a
    semaphore that a worker gives back only after its job's future is done, so
    a job submitted just after another finished may start a thread anyway.)"""

    def __init__(self, warm: int):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle_cv = threading.Condition(self._lock)
        self.idle = 0
        self.threads = 0
        for _ in range(warm):
            self._start()
        self.idle = warm

    def _start(self) -> None:
        self.threads += 1
        threading.Thread(target=self._work, name=f"secure-worker-{self.threads}", daemon=True).start()

    def submit(self, fn) -> Future:
        future: Future = Future()
        with self._lock:
            if self.idle:
                self.idle -= 1
            else:
                self._start()
        self._jobs.put((future, fn))
        return future

    def _work(self) -> None:
        while True:
            future, fn = self._jobs.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:        # noqa: BLE001 - the waiter's to raise
                    future.set_exception(exc)
            del future, fn
            with self._lock:
                self.idle += 1
                self._idle_cv.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait (bounded) until no job runs: at exit, an NV write in flight ends
        as it would have on a thread of its own.  False if one still runs."""
        with self._lock:
            return self._idle_cv.wait_for(lambda: self.idle >= self.threads, timeout)


_lock = threading.Lock()
_pool: _Pool | None = None
_pid = None


def _get() -> _Pool:
    global _pool, _pid
    with _lock:
        if _pool is None or _pid != os.getpid():
            _pool, _pid = _Pool(WARM), os.getpid()
        return _pool


@atexit.register
def _drain() -> None:
    if _pool is not None and _pid == os.getpid():
        _pool.drain(EXIT_WAIT)


def prepare() -> None:
    """Start the workers (once per process); call off the critical path."""
    _get()


def background(work, *, now: bool = False) -> Future:
    """``work()`` on a worker; its future.  Unless ``now``, the worker first
    yields the interpreter: the submitter is on the critical path (about to send
    a record and wait), and a worker running Python at once would keep it
    waiting for the lock up to a switch interval (5 ms)."""
    def run():
        if not now:
            time.sleep(0)
        return work()
    return _get().submit(run)
