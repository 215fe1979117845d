"""Faults real deployments produce: signals, threads, fork timing, Ctrl-C. Every child here
is a real process; every signal is really sent."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time

import pytest
from helpers import wait_for

from shmctx import (
    ContextConfig,
    ContextError,
    ContextInUseError,
    ContextManager,
    InvalidConfigError,
    MemoryContextConfig,
)
from shmctx import _layout as L

LT = 0.2
CFG = ContextConfig(lock_timeout=LT, cleanup_interval=0, max_references=0)
MEM = MemoryContextConfig(size=4096)
fork = mp.get_context("fork")


def _wait_child(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


class _Pelter:
    """Sends ``signum`` to one thread every ``interval`` seconds, the way a sampling
    profiler or a watchdog timer does, until stopped. Aimed at one thread with
    ``pthread_kill`` so that it is that thread's wait that gets interrupted."""

    def __init__(self, signum: int, interval: float) -> None:
        self.signum, self.interval = signum, interval
        self.target = threading.get_ident()
        self.sent = 0
        self._stop = threading.Event()
        self._old = signal.signal(signum, lambda *_: None)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            signal.pthread_kill(self.target, self.signum)
            self.sent += 1

    def __enter__(self) -> _Pelter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        signal.signal(self.signum, self._old)


def _hold_table_lock_and_die(ns: str) -> None:
    m = ContextManager(namespace=ns)
    m._table.table_lock.acquire()
    os.kill(os.getpid(), signal.SIGKILL)


def _run(target, *args) -> int:
    p = fork.Process(target=target, args=args)
    p.start()
    p.join(30)
    assert not p.is_alive()
    return p.exitcode


# --- signals -------------------------------------------------------------------------

def test_timer_signals_do_not_starve_dead_owner_takeover(managers):
    """A signal every 2 ms, more often than the first look at the owner (10 ms): the
    dead owner's lock is still taken over on schedule, not postponed forever."""
    m = managers()
    assert _run(_hold_table_lock_and_die, m.namespace) == -signal.SIGKILL
    lock = m._table.table_lock
    began = time.monotonic()
    with _Pelter(signal.SIGALRM, 0.002) as p:
        lock.acquire(timeout=10)
    took = time.monotonic() - began
    lock.release()
    assert p.sent > 0
    # On schedule: the first look comes 10 ms into the wait, so this is far below the
    # timeout; a wait restarted by every signal would only look at the very end.
    assert took < 5, took
    assert m.check() == []


def _create_and_die_in_init(ns: str, ready) -> None:
    m = ContextManager(namespace=ns)

    def init(ctx):
        ready.set()
        os.kill(os.getpid(), signal.SIGKILL)

    m.get_or_create_context("x", MEM, init=init)


def test_timer_signals_do_not_starve_a_waiter_for_a_dead_creator(managers):
    """A waiter for init looks at the creator every lock_timeout; signals more frequent
    than that must not postpone the look that finds the creator dead."""
    m = managers()
    ready = fork.Event()
    p = fork.Process(target=_create_and_die_in_init, args=(m.namespace, ready))
    p.start()
    try:
        assert ready.wait(10)
        p.join(10)
        began = time.monotonic()
        with _Pelter(signal.SIGALRM, 0.005):
            ctx, existed = m.get_or_create_context("x", MEM, timeout=10)
        took = time.monotonic() - began
    finally:
        p.join(10)
    assert took < 5, took  # the creator is looked at after one lock_timeout (0.2 s)
    assert not existed  # the dead creator's half-made context was replaced by ours
    m.return_context(ctx)


# --- threads -------------------------------------------------------------------------

def test_two_threads_first_touching_ctx_lock_get_one_lock(managers):
    m = managers()
    for i in range(30):
        ctx, _ = m.get_or_create_context(f"c{i}", MEM)
        barrier = threading.Barrier(2)
        got = []

        def touch(ctx=ctx, barrier=barrier, got=got):
            barrier.wait()
            got.append(ctx.lock)

        threads = [threading.Thread(target=touch) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got[0] is got[1]
        with ctx.lock:  # the documented read-modify-write, which two objects deadlock
            ctx.put((ctx.get() or 0) + 1)
        m.return_context(ctx)


def _take_sem_and_stripe_then_die(ns: str) -> None:
    """Die exactly while recording itself as the owner of ctx.lock: its semaphore
    taken, the slot's stripe lock held (and recorded), the owner record not written."""
    m = ContextManager(namespace=ns)
    ctx = m.get_context("c")
    lock = ctx.lock
    lock.sem.acquire()
    lock.guard.acquire()
    os.kill(os.getpid(), signal.SIGKILL)


def test_holder_killed_while_recording_ctx_lock_owner_does_not_wedge_it(managers):
    m = managers(CFG)
    ctx, _ = m.get_or_create_context("c", MEM)
    lock = ctx.lock  # made now: making it later would touch the stripe (and recover it)
    assert _run(_take_sem_and_stripe_then_die, m.namespace) == -signal.SIGKILL
    lock.acquire(timeout=5)  # nobody else touches that stripe meanwhile
    lock.release()
    m.return_context(ctx)
    m.sweep()
    assert m.check() == []


# --- fork ----------------------------------------------------------------------------

def test_fork_inside_ctx_lock_child_does_not_release_the_parents_hold(managers):
    m = managers(CFG)
    ctx, _ = m.get_or_create_context("c", MEM)
    lock = ctx.lock
    with lock:
        pid = os.fork()
        if pid == 0:  # the child leaves the same `with` block
            code = 1
            try:
                lock.release()
            except RuntimeError:
                code = 7
            except BaseException:
                code = 2
            os._exit(code)
        assert _wait_child(pid) == 7
        assert lock.sem.value == 0  # still held: by the parent only
        assert lock.owner()[0] == os.getpid()
    assert lock.sem.value == 1
    m.return_context(ctx)
