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
    ContextManager,
    InvalidConfigError,
    MemoryContextConfig,
)
from shmctx._proc import identity

pytestmark = pytest.mark.usefixtures("hot_path")  # each test on the C and Python hot path

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
    if p.is_alive():  # wedged: kill it, so that what it holds is recovered as a death
        p.kill()
        p.join()
        raise AssertionError(f"{target.__name__} did not finish")
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
        assert lock.owner().pid == os.getpid()
    assert lock.sem.value == 1
    m.return_context(ctx)


def _fork_at_the_descriptor_limit(ns: str, report: int, hold: int) -> None:
    """Middle process: attach, use the hot path, then fork with no descriptor free. The
    grandchild frees a few, takes a reference, reports its pid and waits."""
    import resource

    m = ContextManager(namespace=ns)
    m.return_context(m.get_context("c"))  # mapped: the next get takes the hot path
    # The child's start time must differ from ours, or a child that kept our start time
    # would pass for itself: let the clock (in ticks since boot) move on first.
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/uptime") as f:
        wait_for(lambda: float(f.seek(0) or f.read().split()[0]) * tick > identity.start + 2,
                 what="the clock to pass our start time")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
    fillers = []
    while True:
        try:
            fillers.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            break
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            for fd in fillers:
                os.close(fd)
            m.get_context("c")
            os.write(report, str(os.getpid()).encode().ljust(16))
            os.read(hold, 1)
        except BaseException:
            code = 1
            os.write(report, b"error".ljust(16))
        os._exit(code)
    for fd in fillers:
        os.close(fd)
    os._exit(_wait_child(pid))


def test_fork_at_the_descriptor_limit_books_the_child_as_itself(managers):
    m = managers(CFG)
    ctx, _ = m.get_or_create_context("c", MEM)
    m.return_context(ctx)
    report_r, report_w = os.pipe()
    hold_r, hold_w = os.pipe()
    p = fork.Process(target=_fork_at_the_descriptor_limit,
                     args=(m.namespace, report_w, hold_r))
    p.start()
    try:
        got = os.read(report_r, 16).strip()
        assert got != b"error"
        child = int(got)
        holders = {i.name: i.holders for i in m.contexts()}["c"]
        assert holders == {child: 1}  # its own entry, not its parent's
        m.sweep()  # and alive: its entry names it, start time included
        assert {i.name: i.holders for i in m.contexts()}["c"] == {child: 1}
    finally:
        os.write(hold_w, b"x")
        p.join(30)
        for fd in (report_r, report_w, hold_r, hold_w):
            os.close(fd)
    assert p.exitcode == 0
    m.sweep()
    assert {i.name: i.holders for i in m.contexts()}["c"] == {}


def test_get_context_inside_its_own_init_raises_instead_of_waiting_for_itself(managers):
    m = managers(CFG)
    seen = []

    def init(ctx):
        with pytest.raises(ContextError, match="being initialised by this thread"):
            m.get_context("x", timeout=5)
        with pytest.raises(ContextError, match="being initialised by this thread"):
            m.get_or_create_context("x", MEM, timeout=5)
        seen.append(True)

    ctx, existed = m.get_or_create_context("x", MEM, init=init)
    assert seen and not existed
    m.return_context(ctx)
    m.return_context(m.get_context("x"))  # published as usual afterwards
    assert m.check() == []


def test_fork_inside_init_leaves_the_context_to_the_parent(managers):
    m = managers(CFG)
    children = []

    def init(ctx):
        ctx.buf[:6] = b"parent"
        pid = os.fork()
        if pid:
            children.append(pid)
            assert _wait_child(pid) == 9  # the child returned from init and was refused
        # the child goes on into get_or_create_context's publish step, as a fork does

    try:
        ctx, existed = m.get_or_create_context("x", MEM, init=init)
    except ContextError as e:
        if not children:  # the child: refused, and it must not touch the parent's slot
            os._exit(9 if "forked inside its init" in str(e) else 1)
        raise
    except BaseException:
        if not children:
            os._exit(2)
        raise
    if not children:
        os._exit(3)  # the child published: the bug
    assert not existed
    assert bytes(ctx.buf[:6]) == b"parent"
    assert m.validate_context(ctx)
    m.return_context(ctx)
    assert m.check() == []


@pytest.mark.parametrize("seconds", [0.001, 0.0001, 0.099])
def test_lock_timeout_too_short_to_tell_slow_from_dead_is_refused(seconds):
    with pytest.raises(InvalidConfigError, match=r"lock_timeout must be at least 0\.1"):
        ContextConfig(lock_timeout=seconds)
    assert ContextConfig(lock_timeout=0.1).lock_timeout == 0.1


# --- Ctrl-C ----------------------------------------------------------------------------

def test_handle_dropped_unreturned_gives_its_reference_back(managers):
    """What Ctrl-C right after a get leaves: a handle nobody will return. Its reference
    is given back (at the manager's next call), so the counts stay exact and such drops
    never add up to MaxReferencesReachedError."""
    m = managers(ContextConfig(lock_timeout=LT, cleanup_interval=0, max_references=3))
    ctx, _ = m.get_or_create_context("c", MEM)
    m.return_context(ctx)
    for _ in range(10):  # far more drops than max_references
        m.get_context("c")  # dropped at once, as an interrupted assignment would
        held = m.get_context("c")
        assert {i.name: i.refcount for i in m.contexts()}["c"] == 1
        m.return_context(held)
    m.sweep()
    assert {i.name: i.holders for i in m.contexts()}["c"] == {}
    assert m.check() == []


def test_keyboard_interrupt_right_after_a_get_leaves_exact_counts(managers):
    m = managers(CFG)
    ctx, _ = m.get_or_create_context("c", MEM)
    m.return_context(ctx)

    def interrupt(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGUSR1, interrupt)
    try:
        for _ in range(20):
            with pytest.raises(KeyboardInterrupt):
                ctx = m.get_context("c")
                # The signal arrives before the handle reaches anything that returns it.
                signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
                pytest.fail("the signal handler did not raise at once")
            del ctx
    finally:
        signal.signal(signal.SIGUSR1, old)
    m.return_context(m.get_context("c"))  # the manager gives the dropped ones back
    assert {i.name: i.holders for i in m.contexts()}["c"] == {}
    assert m.check() == []


def _leave_held(lock) -> None:
    """Take ``lock`` in a frame that then ends without releasing it: the state an
    exception (Ctrl-C) between taking a lock and the ``try`` that releases it leaves."""
    lock.acquire()


def _leak_a_stripe_then_close(ns: str) -> None:
    """Hold a reference, then leave its stripe lock taken as an exception between taking
    it and the ``try`` that releases it would (Ctrl-C there), then close()."""
    m = ContextManager(namespace=ns)
    ctx = m.get_context("c")
    assert ctx is not None
    _leave_held(ctx._mapped.stripe)
    m.close()  # returns this reference under that very stripe lock
    os._exit(0)


def test_close_after_a_lock_left_held_by_an_interrupt_does_not_wait_forever(managers):
    m = managers(CFG)
    ctx, _ = m.get_or_create_context("c", MEM)
    assert _run(_leak_a_stripe_then_close, m.namespace) == 0
    assert {i.name: i.holders for i in m.contexts()}["c"] == {os.getpid(): 1}
    m.return_context(ctx)
    assert m.check() == []


def test_a_lock_left_held_is_recovered_as_the_exception_leaves_the_call(managers):
    """Other processes take a lock held by a live process for held: the process that
    left it held recovers it as soon as an exception leaves its call."""
    m = managers(CFG)
    ctx, _ = m.get_or_create_context("c", MEM)
    stripe = ctx._mapped.stripe
    _leave_held(stripe)
    with pytest.raises(ContextError):
        m.close_context("no-such-context")  # the exception leaves the call here
    assert stripe.owner().pid == 0 and stripe.sem.value == 1
    assert _run(_get_and_return, m.namespace, "c") == 0  # another process gets through
    m.return_context(ctx)
    assert m.check() == []


def _get_and_return(ns: str, name: str) -> None:
    m = ContextManager(namespace=ns)
    m.return_context(m.get_context(name, timeout=5))
    os._exit(0)


def test_a_lock_left_held_by_a_thread_that_ended_is_recovered_by_the_sweep(managers):
    m = managers(CFG)
    ctx, _ = m.get_or_create_context("c", MEM)
    stripe = ctx._mapped.stripe
    t = threading.Thread(target=stripe.acquire)  # takes it and ends without releasing
    t.start()
    t.join()
    assert stripe.owner().pid == os.getpid()
    assert m.sweep().locks_recovered >= 1
    assert stripe.owner().pid == 0 and stripe.sem.value == 1
    m.return_context(ctx)
    assert m.check() == []
