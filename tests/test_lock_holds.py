"""Holds of locks whose shape the user decides, and the recovery of a lock left held by an
asynchronous exception (``RobustLock.leaked``): ``ctx.lock`` held by a live thread from a
frame that returned or is suspended (``acquire()`` in a helper, a class's ``__enter__``, a
``contextmanager`` generator, a coroutine across an ``await``) is never taken over by
another thread of the process; two recoveries of the same left-held lock never rob the
next holder; ``ctx.lock.try_acquire()`` is a hold like ``acquire()``; a manager dropped as
the interpreter exits leaves no lock held. Real threads and processes; every wait is for
a real condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading

import pytest

from shmctx import ContextConfig, MemoryContextConfig
from shmctx._lock import recoveries

LT = 0.2
CFG = ContextConfig(lock_timeout=LT, cleanup_interval=0, max_references=0)
MEM = MemoryContextConfig(size=64)


def _take(ctx) -> None:
    """Takes ``ctx.lock`` and returns holding it: the caller releases it later."""
    ctx.lock.acquire()


class _Transaction:
    """A user's own context manager over ``ctx.lock``: acquire in ``__enter__``, release in
    ``__exit__`` (the frame that took the lock returns before the body runs)."""

    def __init__(self, ctx) -> None:
        self.ctx = ctx

    def __enter__(self):
        self.ctx.lock.acquire()
        return self.ctx

    def __exit__(self, *exc) -> None:
        self.ctx.lock.release()


@contextlib.contextmanager
def _locked(ctx):
    with ctx.lock:
        yield ctx


def _hold_explicitly(ctx, holding: threading.Event, done: threading.Event) -> None:
    _take(ctx)
    try:
        holding.set()
        done.wait(10)
    finally:
        ctx.lock.release()


def _hold_in_enter(ctx, holding: threading.Event, done: threading.Event) -> None:
    with _Transaction(ctx):
        holding.set()
        done.wait(10)


def _hold_in_generator(ctx, holding: threading.Event, done: threading.Event) -> None:
    with _locked(ctx):
        holding.set()
        done.wait(10)


def _hold_across_await(ctx, holding: threading.Event, done: threading.Event) -> None:
    async def critical() -> None:
        with ctx.lock:
            holding.set()
            # The coroutine is suspended here, its frame on no stack, while it holds the
            # lock; the loop's thread waits in select() for the other thread to finish.
            await asyncio.get_running_loop().run_in_executor(None, done.wait, 10)

    asyncio.run(critical())


@pytest.mark.parametrize("hold", [_hold_explicitly, _hold_in_enter, _hold_in_generator,
                                  _hold_across_await],
                         ids=["acquire-in-a-helper", "class-enter", "contextmanager",
                              "across-await"])
def test_ctx_lock_held_by_a_live_thread_outside_the_frame_that_took_it_is_not_robbed(
        managers, hold):
    """Thread A holds ``ctx.lock`` in one of the shapes above, alive and inside its
    critical section. Thread B (the test's) waits for the lock with a timeout: it must
    time out. The frame that took the lock is not on A's stack, yet taking that for
    "left held by an interrupt" would let B take the lock over at its first look (and
    A's release would then raise RuntimeError)."""
    m = managers(CFG)
    ctx, _ = m.get_or_create_context("c", MEM)
    holding, done = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def a() -> None:
        try:
            hold(ctx, holding, done)
        except BaseException as e:  # reported by the assertion below
            errors.append(e)

    th = threading.Thread(target=a)
    th.start()
    before = recoveries()
    try:
        assert holding.wait(10)
        # Three looks at the owner at least (after 10 ms, then every lock_timeout).
        with pytest.raises(TimeoutError):
            ctx.lock.acquire(timeout=2.5 * LT)
            ctx.lock.release()  # reached only when robbed: leave the lock as A expects
    finally:
        done.set()
        th.join(10)
    assert not errors, f"the holder's own release failed: {errors!r}"
    assert recoveries() == before, "a live thread's hold was taken over as left held"
    # Held by nobody now: B gets it at once.
    ctx.lock.acquire(timeout=1.0)
    ctx.lock.release()
    m.return_context(ctx)


def test_recovering_a_leak_twice_at_once_never_robs_the_next_holder(managers):
    """``recover_leaked`` read the owner record (pid, epoch) only after ``leaked()`` gave
    its verdict, and the takeover checks that the record is still that one. Two threads
    recovering the same left-held stripe lock at once (the holder thread's own recovery
    as its exception leaves a call, and the sweep in another thread) could therefore
    interleave as: the sweep judges it left held; the other recovers and releases it; a
    third thread takes it; the sweep then reads the *third thread's* record and takes the
    lock over from it, a live holder inside its critical section. Both then release: the
    semaphore ends at 2, and two threads or processes can hold the lock at once from then
    on. The interleaving is forced by pausing the sweep's thread right after the verdict
    (a trace function of that thread); every step is a real thread."""
    m = managers(CFG)
    ctx, _ = m.get_or_create_context("c", MEM)
    lock = ctx._mapped.stripe
    m.return_context(ctx)

    def leave_held() -> None:
        lock.acquire()  # and return holding it: what an interrupt before the try leaves

    leaker = threading.Thread(target=leave_held)
    leaker.start()
    leaker.join()
    assert lock.leaked()

    verdict, go = threading.Event(), threading.Event()
    holding, done = threading.Event(), threading.Event()
    swept: list[bool] = []
    leaked_code = type(lock).leaked.__code__

    def pause_after_verdict(frame, event, arg):
        if event == "call" and frame.f_code is leaked_code:
            def local(frame, event, arg):
                if event == "return" and arg is True and not verdict.is_set():
                    verdict.set()
                    go.wait(10)
                return local
            return local
        return None

    def sweep() -> None:
        sys.settrace(pause_after_verdict)
        try:
            swept.append(lock.recover_leaked())
        finally:
            sys.settrace(None)

    def hold() -> None:
        with lock:
            holding.set()
            done.wait(10)

    sweeper = threading.Thread(target=sweep)
    holder = threading.Thread(target=hold)
    sweeper.start()
    try:
        assert verdict.wait(10)
        assert lock.recover_leaked()  # the concurrent recovery: repaired and released
        holder.start()
        assert holding.wait(10)
        go.set()
        sweeper.join(10)
        # The sweep's verdict was about a hold that no longer exists: it must give up.
        assert swept == [False], "the sweep took the lock over from a live holder"
    finally:
        go.set()
        done.set()
        sweeper.join(10)
        if holder.ident is not None:
            holder.join(10)
    assert lock.owner().pid == 0 and lock.sem.value == 1


_DROP_AT_EXIT = r"""
import gc, sys, threading, time
from shmctx import ContextManager, MemoryContextConfig, _failpoints

m = ContextManager(namespace=sys.argv[1], sweeper=False)
handles = [m.get_or_create_context(f"c{i}", MemoryContextConfig(size=0))[0]
           for i in range(20)]

inside = threading.Event()

def hit(name):
    # The give-back of the dropped manager is inside the table lock when the script's
    # main thread ends, and takes a while longer (a loaded machine, many references).
    if name == "reclaim.ref_cleared" and \
            threading.current_thread().name.startswith("shmctx-give-back"):
        inside.set()
        while threading.main_thread().is_alive():
            time.sleep(0.001)
        # A little more, only so that a daemon give-back thread would lose the race to
        # the interpreter's finalization for sure; the give-back thread is not a daemon,
        # so the exit waits for it whatever the timing.
        time.sleep(0.002)

_failpoints.hit = hit
_failpoints.armed = True
del m, handles  # a script's last lines: the manager is dropped, not closed
gc.collect()
assert inside.wait(10)
"""


def test_a_manager_dropped_as_the_script_ends_leaves_no_lock_held(ns, managers):
    """The give-back of a manager collected without ``close()`` runs on a thread of its
    own, which must not be a *daemon* thread. Dropped as a script ends (its last lines,
    or a function returning just before exit), a daemon give-back would still be giving
    back when the interpreter finalized, which freezes daemon threads wherever they
    are: the process would exit holding the table lock (and a stripe lock) and with its
    entry half given back. Every other process would then see a crash, take the locks
    over from a dead owner and repair, or, if the freeze fell between taking a semaphore
    and recording its owner, wait two lock_timeouts for the table lock first. With a
    daemon give-back and without the hook below, the table lock was left so in about 1
    of 20 such exits under SHMCTX_PURE_PYTHON=1, and the entry never given back before
    the exit. The hook (a failpoint of the child) only makes the give-back slow enough
    that a daemon thread would always lose the race. A real process and a real
    interpreter exit."""
    keeper = managers(CFG)
    r = subprocess.run([sys.executable, "-c", _DROP_AT_EXIT, ns], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    t = keeper._table
    left = {lk.what: (lk.owner().pid, lk.sem.value) for lk in (t.table_lock, *t.stripe_locks)
            if (lk.owner().pid, lk.sem.value) != (0, 1)}
    before = recoveries()
    keeper.sweep()  # repairs whatever the exit left, and reclaims the entry if need be
    assert not left, f"the exit left locks held: {left}"
    assert recoveries() == before


def test_ctx_lock_try_acquire_is_a_hold_like_acquire(managers):
    """``ContextLock.try_acquire`` must mark the calling thread as the holder
    (``_mark_held``), as ``acquire`` does, not only record the owner (which
    ``RobustLock.try_acquire`` does, through ``ContextLock._own``, under the stripe
    lock). Otherwise a successful ``ctx.lock.try_acquire()`` could not be released
    (RuntimeError: "released by a thread that does not hold it"), would not be
    re-entrant (``ctx.put`` in the same thread would raise ContextError claiming a
    signal handler or a finalizer), and, the record naming a live process, would leave
    the context's lock held for every process for as long as this one lived. A real
    second thread checks that the lock is free afterwards."""
    m = managers(CFG)
    ctx, _ = m.get_or_create_context("c", MEM)
    assert ctx.lock.try_acquire()
    try:
        ctx.put(1)  # re-entrant, as under acquire()
    finally:
        ctx.lock.release()
    got: list[bool] = []
    th = threading.Thread(target=lambda: got.append(ctx.lock.try_acquire(1.0)))
    th.start()
    th.join(10)
    assert got == [True]
    assert ctx.lock.owner().pid != 0  # the other thread, which has ended, holds it
    m.return_context(ctx)
