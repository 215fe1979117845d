"""Interrupts and re-entrance around the locks: Ctrl-C as a lock is taken or a handle made,
a signal handler or a finalizer calling shmctx inside a critical section of the frame it
interrupted, threads that ``threading`` does not list, ``ctx.lock.acquire(timeout)`` while
a live process keeps the stripe lock. These probe the recovery of locks left held and of
dropped handles. Every child is a real process and every signal is really sent."""

from __future__ import annotations

import _thread
import gc
import multiprocessing as mp
import os
import signal
import threading

import pytest
from helpers import wait_for

import shmctx._hotpath as hotpath_module
from shmctx import (
    ContextConfig,
    ContextManager,
    ContextNotFoundError,
    MemoryContextConfig,
    _failpoints,
)
from shmctx._context import MemoryContext
from shmctx._lock import RobustLock

LT = 0.2
CFG = ContextConfig(lock_timeout=LT, cleanup_interval=0, max_references=0)
MEM = MemoryContextConfig(size=4096)
fork = mp.get_context("fork")


class _InterruptedAfterAcquire(RobustLock):
    """A stripe or table lock whose next ``acquire`` is followed at once by Ctrl-C: what
    a SIGINT arriving as ``acquire`` returns, before the caller's ``try``, does. (Its
    instances are the real lock objects of the table, re-classed; nothing else changes.)"""

    __slots__ = ()

    def acquire(self, timeout=None, _depth=1):
        super().acquire(timeout, _depth + 1)  # the lock's holder is our caller's frame
        self.__class__ = RobustLock  # once
        raise KeyboardInterrupt


def _interrupt_after_next_acquire(lock: RobustLock) -> None:
    lock.__class__ = _InterruptedAfterAcquire


def _left_held(lock: RobustLock) -> bool:
    return lock.owner().pid != 0 or lock.sem.value == 0


# --- 1. recovery as the exception leaves the call, on every public entry --------------

def test_get_or_create_context_recovers_a_lock_an_interrupt_left_held(managers):
    """Ctrl-C right after the cold path of ``get_or_create_context`` takes the table
    lock leaves it held by this (live) process, which every other process would then
    wait for without end. Every public method, ``get_or_create_context`` (and with it
    ``context()``) included, recovers such a lock as the exception leaves it
    (``_recover_leaked_locks`` in its ``except BaseException``)."""
    m = managers(CFG)
    table_lock = m._table.table_lock
    _interrupt_after_next_acquire(table_lock)
    with pytest.raises(KeyboardInterrupt):
        m.get_or_create_context("new", MEM)
    assert not _left_held(table_lock), "the table lock stays held by a live process"


@pytest.mark.parametrize("lock_made", [False, True], ids=["first-ctx.lock", "ctx.lock-made"])
def test_ctx_put_recovers_a_stripe_lock_an_interrupt_left_held(managers, lock_made):
    """``ctx.put`` takes the slot's stripe lock twice: on first use of ``ctx.lock``, to
    create its semaphore (``Mappings.lock_of``: ``with m.stripe``), and in every
    acquisition, to record the owner (``ContextLock._own``: ``with self.guard``).
    Ctrl-C as the stripe lock is taken leaves it held by this live process: every other
    process's get or return of any context of that stripe would then wait for ever, so
    the lock must be recovered as the exception leaves ``ctx.lock`` or ``put``."""
    m = managers(CFG)
    ctx, _ = m.get_or_create_context("c", MEM)
    stripe = ctx._mapped.stripe
    if lock_made:
        assert ctx.lock is not None  # made now: put's interrupt comes in _own
    _interrupt_after_next_acquire(stripe)
    with pytest.raises(KeyboardInterrupt):
        ctx.put(1)
    try:
        assert not _left_held(stripe), "the stripe lock stays held by a live process"
    finally:
        if _left_held(stripe) and stripe.holder == threading.get_ident():
            stripe.recover_leaked(threading.get_ident())  # let teardown through
        m.return_context(ctx)


# --- 2. a handle stands for no reference before it is counted --------------------------

class _HandleInterruptedAsMade(MemoryContext):
    """A ``MemoryContext`` whose construction is followed by a real SIGINT, handled the
    moment ``__init__`` is done: what Ctrl-C arriving as ``MemoryContext(...)`` returns
    in ``PyHotPath.try_get`` does, before the reference is counted."""

    __slots__ = ()

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)


def test_interrupt_as_the_python_hot_path_makes_its_handle_takes_no_reference_away(
        managers, monkeypatch):
    """``PyHotPath.try_get`` makes its handle (``MemoryContext(...)``) before it counts
    the reference, marked as standing for none until it is counted (step G2). Were it
    made as holding one, Ctrl-C between the two would drop a handle that claims a
    reference never counted: its finalizer would queue it, and
    ``Slots.return_dropped`` would take away the reference of another handle of this
    process. That handle's return would then fail, and the context would show no
    reference while it is held (an idle sweep could close it)."""
    m = managers(CFG)
    held, _ = m.get_or_create_context("c", MEM)  # one real reference
    monkeypatch.setattr(hotpath_module, "MemoryContext", _HandleInterruptedAsMade)
    with pytest.raises(KeyboardInterrupt):
        m.get_context("c", timeout=5)  # a timeout: the Python path (PyHotPath.try_get)
    monkeypatch.undo()
    m.sweep()  # gives queued dropped handles back
    assert {i.name: i.holders for i in m.contexts()}["c"] == {os.getpid(): 1}
    m.return_context(held)
    assert m.check() == []


# --- 3. recovery never robs a lock its own thread holds further up the stack -----------

def _signal_inside(monkeypatch, site: str, handler, call, stripe: RobustLock):
    """Run ``call`` on the Python path (armed failpoints make the C path defer to it)
    with a real SIGUSR1, handled by ``handler``, delivered once at failpoint ``site``
    inside the stripe lock. Returns ``call``'s result and the stripe semaphore's value
    right after, having then undone any extra post so that teardown is sound."""
    sent: list[str] = []

    def hit(name):
        if name == site and not sent:
            sent.append(name)
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)

    old = signal.signal(signal.SIGUSR1, handler)
    try:
        monkeypatch.setattr(_failpoints, "armed", True)
        monkeypatch.setattr(_failpoints, "hit", hit)
        result = call()
        monkeypatch.undo()
    finally:
        signal.signal(signal.SIGUSR1, old)
    value = stripe.sem.value
    while stripe.sem.value > 1:
        stripe.sem.acquire(0)
    return result, value


def test_shmctx_call_from_a_signal_handler_does_not_rob_the_interrupted_hold(
        managers, monkeypatch):
    """A signal handler (or a ``__del__`` run by a collection) runs between two
    bytecodes of the Python hot path, inside its stripe lock. If a shmctx call in it
    raises (here ``ContextNotFoundError``, caught by the handler),
    ``_recover_leaked_locks`` finds the stripe lock recorded as this process's and held
    by this very thread. Taking it for one an interrupt left held and releasing it would
    let the interrupted frame release it again: the semaphore would end at 2, two
    holders at once, for every process, for good. The frame that took it is still on
    the stack, so it must be left alone."""
    m = managers(CFG)
    ctx, _ = m.get_or_create_context("c", MEM)
    m.return_context(ctx)
    stripe = ctx._mapped.stripe

    def handler(*_):
        try:
            m.get_context("missing")
        except ContextNotFoundError:
            pass

    h, value = _signal_inside(monkeypatch, "acquire.proc_counted", handler,
                              lambda: m.get_context("c"), stripe)
    m.return_context(h)
    assert value == 1, f"stripe semaphore at {value} after one hold: mutual exclusion lost"


def test_signal_handler_returning_a_handle_does_not_rob_the_interrupted_hold(
        managers, monkeypatch):
    """The same re-entrance without any exception: a signal handler returns a handle of
    the context whose stripe lock the interrupted hot path holds. Its wait looks at the
    owner after 10 ms (``_after_timeout``) and finds it recorded as this process, with
    the waiter itself as the holder thread (``leaked``). Taking the lock over from its
    own interrupted frame would let that frame release it a second time (the semaphore
    would end at 2); waiting would wait for itself for ever. It must do neither, but say
    so."""
    m = managers(CFG)
    ctx, _ = m.get_or_create_context("c", MEM)
    extra = m.get_context("c")
    stripe = ctx._mapped.stripe
    raised: list[BaseException] = []

    def handler(*_):
        try:
            m.return_context(extra)
        except Exception as e:
            raised.append(e)

    _, value = _signal_inside(monkeypatch, "return.proc_counted", handler,
                              lambda: m.return_context(ctx), stripe)
    if not extra._returned:  # refused: give it back now
        m.return_context(extra)
    assert value == 1, f"stripe semaphore at {value} after one hold: mutual exclusion lost"


# --- 4. a holder thread that threading does not list has not ended ---------------------

def test_ctx_lock_held_by_a_thread_threading_does_not_list_is_not_taken_over(managers):
    """``RobustLock.leaked`` must not take a holder thread missing from
    ``threading.enumerate()`` for one that ended (a waiter of this process would then
    take the lock over). Threads started with ``_thread.start_new_thread`` (or by C
    code, an embedding application, a native library's callbacks) are alive yet not
    listed: a second thread's ``ctx.lock.acquire`` must not rob such a thread inside its
    ``with ctx.lock``."""
    m = managers(CFG)
    ctx, _ = m.get_or_create_context("c", MEM)
    lock = ctx.lock
    inside, leave, done = threading.Event(), threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def holder():
        try:
            with lock:
                inside.set()
                leave.wait(10)
        except BaseException as e:
            errors.append(e)
        finally:
            done.set()

    _thread.start_new_thread(holder, ())
    wait_for(inside.is_set, what="the bare thread inside ctx.lock")
    try:
        with pytest.raises(TimeoutError):
            lock.acquire(timeout=0.5)  # the holder is alive and inside: must time out
    finally:
        if lock._thread == threading.get_ident():
            lock.release()  # robbed it: give it back so the holder can finish
        leave.set()
        wait_for(done.is_set, what="the bare thread to finish")
        m.return_context(ctx)


# --- 5. ctx.lock.acquire(timeout): the stripe lock it records itself under -----------

def _hold_stripe_until_told(ns: str, name: str, held, go) -> None:
    m = ContextManager(namespace=ns)
    ctx = m.get_context(name)
    ctx._mapped.stripe.acquire()  # a live process inside a stripe lock, slow
    held.set()
    go.wait(30)
    ctx._mapped.stripe.release()
    m.return_context(ctx)
    m.close()
    os._exit(0)


def test_ctx_lock_acquire_timeout_holds_while_a_live_process_keeps_the_stripe(managers):
    """``ContextLock.acquire(timeout)`` gets a free ``ctx.lock`` semaphore at once, then
    records its owner under the slot's stripe lock (``_own``: ``with self.guard``).
    While a live process keeps that stripe lock (a process stopped in a debugger, or
    descheduled on a loaded host), ``acquire(timeout=0.3)`` must raise ``TimeoutError``
    after 0.3 s, not wait for the stripe lock without end."""
    m = managers(CFG)
    ctx, _ = m.get_or_create_context("c", MEM)
    lock = ctx.lock
    held, go = fork.Event(), fork.Event()
    p = fork.Process(target=_hold_stripe_until_told, args=(m.namespace, "c", held, go))
    p.start()
    try:
        assert held.wait(10)
        outcome: list[object] = []

        def try_it():
            try:
                lock.acquire(timeout=0.3)
                outcome.append("acquired")
                lock.release()
            except TimeoutError as e:
                outcome.append(e)

        t = threading.Thread(target=try_it, daemon=True)
        t.start()
        t.join(3)  # ten times the timeout
        hung = t.is_alive()
    finally:
        go.set()
        p.join(30)
    t.join(10)
    m.return_context(ctx)
    assert not hung, "acquire(timeout=0.3) was still waiting after 3 s"
    assert isinstance(outcome[0], TimeoutError)



def test_return_context_recovers_the_stripe_lock_an_interrupt_left_held_in_its_frame(
        managers, monkeypatch):
    """``return_context`` takes its stripe lock in its own frame. Ctrl-C right after that
    reaches its ``except`` clause while that frame, the one that took the lock, is still
    on the stack: it must count as leaving (it is), or the lock stays held by this live
    process and every other process waits for it without end."""
    m = managers(CFG)
    ctx, _ = m.get_or_create_context("c", MEM)
    stripe = ctx._mapped.stripe
    _interrupt_after_next_acquire(stripe)
    monkeypatch.setattr(_failpoints, "armed", True)  # the C path defers to Python's
    monkeypatch.setattr(_failpoints, "hit", lambda _name: None)
    with pytest.raises(KeyboardInterrupt):
        m.return_context(ctx)
    monkeypatch.undo()
    assert not _left_held(stripe), "the stripe lock stays held by a live process"
    # The interrupt came before the handle was marked: its reference is still held.
    assert {i.name: i.holders for i in m.contexts()}["c"] == {os.getpid(): 1}
    m.return_context(ctx)
    assert m.check() == []


def test_a_signal_as_the_python_get_marks_its_handle_takes_no_reference(managers, monkeypatch):
    """Python checks for signals when a function starts: a handler that raises as
    ``mark_counted`` is entered (after this process's count went up, before the handle
    stands for it) must not leave a reference that no handle will ever give back."""
    from shmctx import _hotpath

    monkeypatch.setenv("SHMCTX_PURE_PYTHON", "1")  # read as the manager is made
    m = managers()
    ctx, _ = m.get_or_create_context("x", MemoryContextConfig(size=8))
    m.return_context(ctx)
    real = _hotpath.mark_counted

    def interrupted(handle):
        monkeypatch.setattr(_hotpath, "mark_counted", real)  # once
        raise KeyboardInterrupt

    monkeypatch.setattr(_hotpath, "mark_counted", interrupted)
    with pytest.raises(KeyboardInterrupt):
        m.get_context("x")
    gc.collect()
    assert [(c.refcount, c.holders) for c in m.contexts()] == [(0, {})]
    assert m.check() == []
    again = m.get_context("x")  # and the path still works
    m.return_context(again)
    assert [(c.refcount, c.holders) for c in m.contexts()] == [(0, {})]
