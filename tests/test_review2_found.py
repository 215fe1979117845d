"""Found by a second adversarial review of how a lock left held by an asynchronous exception
is recognised (``RobustLock.leaked``: the frame that took the lock is no longer on its
thread's stack).

That rule holds for the table and stripe locks, which shmctx takes and releases within one
frame of its own. It does not hold for ``ctx.lock``, whose critical section is shaped by the
user: ``ctx.lock.acquire()`` in one function and ``release()`` in another (the documented
explicit API, a class's ``__enter__``/``__exit__``), ``with ctx.lock:`` inside a
``contextlib.contextmanager`` generator (suspended, so on no stack, for the whole body of
the caller's ``with``), or inside a coroutine across an ``await``. In each case the holder
thread is alive and inside its critical section, yet the frame that took the lock is not
on its stack, and another thread of the same process waiting for ``ctx.lock`` "recovers"
it at its first look (about 10 ms): two holders of one lock, and the real holder's
``release`` then raises RuntimeError. Real threads; every wait is for a real condition.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    time out. Before the fix B took it over at its first look, as "left held by an
    interrupt", because the frame that took it is not on A's stack (and A's release then
    raised RuntimeError)."""
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
