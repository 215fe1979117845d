"""Cross-process behaviour of the public API, in real separate processes, under both the
``fork`` and the ``spawn`` start method.

Worker bodies are module-level functions (``spawn`` pickles them by name). Every worker
reports through one queue; a worker that fails reports its traceback, which fails the
test at once instead of as a timeout. No fixed sleeps: the parent waits on messages,
events and joins, or polls a real condition with a deadline.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import struct
import threading
import time

import pytest
from helpers import run_worker, wait_for

from shmctx import (
    ContextClosedError,
    ContextConfig,
    ContextError,
    ContextInUseError,
    ContextManager,
    ContextManagerClosedError,
    MaxReferencesReachedError,
    MemoryContextConfig,
    _shm,
)
from shmctx import (
    _layout as L,
)
from shmctx._snapshot import decode

pytestmark = pytest.mark.usefixtures("hot_path")  # each test on the C and Python hot path

CFG = ContextConfig(lock_timeout=0.3, cleanup_interval=0, capacity=64, max_processes=32)
WAIT = 30.0  # generous upper bound for any one message; never reached when things work
U64 = struct.Struct("<Q")


# --- harness -------------------------------------------------------------------------

class Harness:
    """Starts workers, collects their messages, and never leaves one running."""

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.q = ctx.Queue()
        self.procs: list = []

    def start(self, body, *args):
        p = self.ctx.Process(target=run_worker, args=(self.q, body, *args), daemon=True)
        p.start()
        self.procs.append(p)
        return p

    def recv(self, kind: str | None = None, timeout: float = WAIT) -> tuple:
        """The next message (of ``kind``, if given: anything else fails the test)."""
        try:
            msg = self.q.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no message from the workers within {timeout}s (waiting for {kind})")
        if msg[0] == "crash":
            pytest.fail(f"worker {msg[1]} failed:\n{msg[2]}")
        if kind is not None:
            assert msg[0] == kind, f"expected a {kind!r} message, got {msg!r}"
        return msg

    def nothing_for(self, seconds: float) -> None:
        """Assert that no worker reports anything for ``seconds``."""
        try:
            msg = self.q.get(timeout=seconds)
        except queue.Empty:
            return
        pytest.fail(f"unexpected message {msg!r}")

    def join(self) -> None:
        for p in self.procs:
            p.join(WAIT)
            assert p.exitcode == 0, f"worker {p.pid} exited with {p.exitcode}"

    def cleanup(self) -> None:
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        self.q.close()


@pytest.fixture
def harness(mp_ctx):
    h = Harness(mp_ctx)
    try:
        yield h
    finally:
        h.cleanup()


@pytest.fixture
def parent(managers):
    """The test process's own managers of ``ns`` (see conftest ``managers``)."""
    return managers


def _open(ns: str, config=CFG) -> ContextManager:
    return ContextManager(config, namespace=ns, sweeper=False)


def _info(m: ContextManager, name: str):
    return next((i for i in m.contexts() if i.name == name), None)


def _poll(condition, what: str, deadline: float = 15.0) -> None:
    wait_for(condition, deadline, what)


def _table_snapshot(ns: str):
    """Decode the table straight from /dev/shm, without any manager or lock."""
    with open(_shm.host_path(_shm.table_name(ns)), "rb") as f:
        return decode(f.read(), locked=False)


# --- racing get_or_create (and racing to create the namespace) -----------------------

def _race_body(q, ns, barrier, done) -> None:
    m = _open(ns)  # the table does not exist yet: every worker races to create it

    def init(ctx):
        ctx.buf[:8] = U64.pack(os.getpid())

    barrier.wait(WAIT)
    ctx, existed = m.get_or_create_context("race", MemoryContextConfig(size=64), init=init)
    q.put(("got", os.getpid(), existed, ctx.incarnation, bytes(ctx.buf)))
    done.wait(WAIT)
    m.return_context(ctx)
    m.close()
    q.put(("done", os.getpid()))


@pytest.mark.parametrize("n", [2, 4])
def test_racing_get_or_create(harness, parent, ns, n):
    barrier, done = harness.ctx.Barrier(n), harness.ctx.Event()
    for _ in range(n):
        harness.start(_race_body, ns, barrier, done)
    got = [harness.recv("got") for _ in range(n)]
    done.set()
    for _ in range(n):
        harness.recv("done")
    harness.join()
    creators = [g for g in got if g[2] is False]
    assert len(creators) == 1, got
    creator_pid = creators[0][1]
    assert {g[3] for g in got} == {creators[0][3]}
    assert {g[4] for g in got} == {U64.pack(creator_pid) + bytes(56)}
    # One table: a single table file, and every object carries the same table tag.
    objects = _shm.namespace_objects(ns)
    assert [e for e in objects if e == f"shmctx@{ns}"] == [f"shmctx@{ns}"]
    assert len({_shm.parse_object(ns, e)[0] for e in objects if e != f"shmctx@{ns}"}) == 1
    m = parent(None)
    info = _info(m, "race")
    assert info.refcount == 0 and info.holders == {}
    assert m.check() == []


# --- init: once, others wait, failure, timeout ----------------------------------------

def _creator_body(q, ns, release, fail) -> None:
    m = _open(ns)

    def init(ctx):
        q.put(("init", os.getpid(), ctx.incarnation))
        release.wait(WAIT)
        if fail:
            raise RuntimeError("init boom")
        ctx.buf[:8] = b"INITDONE"

    try:
        ctx, existed = m.get_or_create_context("slow", MemoryContextConfig(size=8), init=init)
    except RuntimeError as e:
        q.put(("raised", os.getpid(), str(e)))
    else:
        q.put(("got", os.getpid(), existed, ctx.incarnation, bytes(ctx.buf)))
        m.return_context(ctx)
    m.close()


def _waiter_body(q, ns) -> None:
    m = _open(ns)

    def init(ctx):
        ctx.buf[:8] = b"BCREATED"

    q.put(("calling", os.getpid()))
    ctx, existed = m.get_or_create_context("slow", MemoryContextConfig(size=8), init=init)
    q.put(("got", os.getpid(), existed, ctx.incarnation, bytes(ctx.buf)))
    m.return_context(ctx)
    m.close()


def _impatient_body(q, ns) -> None:
    m = _open(ns)
    q.put(("calling", os.getpid()))
    outcomes = []
    for call in (lambda: m.get_or_create_context("slow", timeout=0.3),
                 lambda: m.get_context("slow", timeout=0.3)):
        try:
            call()
            outcomes.append("returned")
        except TimeoutError as e:
            outcomes.append("TimeoutError" if "slow" in str(e) else f"unnamed: {e}")
    q.put(("impatient", os.getpid(), outcomes))
    m.close()


def _slot_has_waiters(ns: str, name: str) -> bool:
    s = _table_snapshot(ns).by_name().get(name)
    return s is not None and s.state == L.CREATING and bool(s.flags & L.SLOT_WAITERS)


def _start_blocked_creator(harness, ns, fail: bool):
    release = harness.ctx.Event()
    harness.start(_creator_body, ns, release, fail)
    init_msg = harness.recv("init")
    return release, init_msg


def test_init_runs_once_while_others_wait(harness, parent, ns):
    m = parent()
    release, init_msg = _start_blocked_creator(harness, ns, fail=False)
    for _ in range(2):
        harness.start(_waiter_body, ns)
    harness.start(_impatient_body, ns)
    # Three "calling" and the impatient worker's verdict, in whatever order they come: a
    # spawned waiter may start later than the impatient worker's two short timeouts end.
    msgs = [harness.recv() for _ in range(4)]
    assert sorted(x[0] for x in msgs) == ["calling"] * 3 + ["impatient"], msgs
    _poll(lambda: _slot_has_waiters(ns, "slow"), "a waiter registers on the context")
    # The impatient worker gave up after its timeouts; nobody else gets the context.
    assert [x[2] for x in msgs if x[0] == "impatient"] == [["TimeoutError", "TimeoutError"]]
    harness.nothing_for(0.2)
    assert _info(m, "slow").state == "creating"
    release.set()
    got = sorted((harness.recv("got") for _ in range(3)), key=lambda g: g[1] != init_msg[1])
    harness.join()
    assert got[0][1:3] == (init_msg[1], False)
    assert [g[2] for g in got[1:]] == [True, True]
    assert {g[3] for g in got} == {init_msg[2]}
    assert {g[4] for g in got} == {b"INITDONE"}  # nobody saw the memory before init ended
    info = _info(m, "slow")
    assert info.refcount == 0 and info.incarnation == init_msg[2]
    assert m.check() == []


def test_init_that_raises_lets_a_waiter_create_afresh(harness, parent, ns):
    m = parent()
    release, init_msg = _start_blocked_creator(harness, ns, fail=True)
    for _ in range(2):
        harness.start(_waiter_body, ns)
    for _ in range(2):
        harness.recv("calling")
    _poll(lambda: _slot_has_waiters(ns, "slow"), "a waiter registers on the context")
    release.set()
    msgs = [harness.recv() for _ in range(3)]
    harness.join()
    raised = [x for x in msgs if x[0] == "raised"]
    got = [x for x in msgs if x[0] == "got"]
    assert raised == [("raised", init_msg[1], "init boom")]
    assert sorted(g[2] for g in got) == [False, True]  # exactly one waiter created it
    assert {g[4] for g in got} == {b"BCREATED"}
    assert len({g[3] for g in got}) == 1 and got[0][3] != init_msg[2]
    info = _info(m, "slow")
    assert info.incarnation == got[0][3] and info.refcount == 0
    assert m.check() == []


# --- references across processes -----------------------------------------------------

def _holder_body(q, ns, step, done) -> None:
    m = _open(ns, None)
    a = m.get_context("shared")
    b = m.get_context("shared")
    q.put(("held", os.getpid()))
    step.wait(WAIT)
    m.return_context(a)
    q.put(("returned-one", os.getpid()))
    done.wait(WAIT)
    assert m.validate_context(b)
    m.close()  # returns b
    q.put(("closed", os.getpid()))


def _over_limit_body(q, ns) -> None:
    m = _open(ns, None)
    try:
        m.get_context("shared")
        q.put(("over-limit", os.getpid(), "got a reference"))
    except MaxReferencesReachedError as e:
        q.put(("over-limit", os.getpid(), "MaxReferencesReachedError" if "shared" in str(e)
               else f"unnamed: {e}"))
    m.close()


def test_references_and_max_references_are_global(harness, parent, ns):
    m = parent(ContextConfig(max_references=3, lock_timeout=0.3, cleanup_interval=0))
    mine, _ = m.get_or_create_context("shared", MemoryContextConfig(size=8))
    step, done = harness.ctx.Event(), harness.ctx.Event()
    holder = harness.start(_holder_body, ns, step, done)
    harness.recv("held")
    info = _info(m, "shared")
    assert info.refcount == 3 and info.holders == {os.getpid(): 1, holder.pid: 2}
    with pytest.raises(MaxReferencesReachedError):
        m.get_context("shared")
    harness.start(_over_limit_body, ns)
    assert harness.recv("over-limit")[2] == "MaxReferencesReachedError"
    step.set()
    harness.recv("returned-one")
    again = m.get_context("shared")
    info = _info(m, "shared")
    assert info.refcount == 3 and info.holders == {os.getpid(): 2, holder.pid: 1}
    done.set()
    harness.recv("closed")
    harness.join()
    info = _info(m, "shared")
    assert info.refcount == 2 and info.holders == {os.getpid(): 2}
    m.return_context(mine)
    m.return_context(again)
    assert m.check() == []


def _inherited_body(q, m, ctx) -> None:
    try:
        m.return_context(ctx)
        outcome = "returned"
    except ContextClosedError:
        outcome = "ContextClosedError"
    except ContextError:
        outcome = "ContextError"
    q.put(("inherited", os.getpid(), outcome))
    own = m.get_context("inh")  # the child's own reference works normally
    q.put(("own", os.getpid(), _info(m, "inh").holders))
    m.return_context(own)
    m.close()


def test_returning_a_handle_inherited_over_fork(parent):
    m = parent()
    ctx, _ = m.get_or_create_context("inh", MemoryContextConfig(size=8))
    second = m.get_context("inh")
    before = _info(m, "inh")
    h = Harness(mp.get_context("fork"))
    try:
        child = h.start(_inherited_body, m, ctx)
        assert h.recv("inherited")[2] == "ContextError"
        assert h.recv("own")[2] == {os.getpid(): 2, child.pid: 1}
        h.join()
    finally:
        h.cleanup()
    after = _info(m, "inh")
    assert (after.refcount, after.holders) == (before.refcount, before.holders) == \
        (2, {os.getpid(): 2})
    assert m.validate_context(ctx)
    m.return_context(ctx)
    m.return_context(second)
    assert m.check() == []


# --- the sweeper ---------------------------------------------------------------------

def _sweep_victim_body(q, ns, release) -> None:
    m = _open(ns, None)
    held, _ = m.get_or_create_context("held", MemoryContextConfig(size=16))
    idle, _ = m.get_or_create_context("idle", MemoryContextConfig(size=16))
    m.return_context(idle)  # "held" was last used before "idle": it is idle for longer
    q.put(("ready", os.getpid()))
    release.wait(WAIT)
    valid = m.validate_context(held)
    held.buf[:4] = b"live"
    m.return_context(held)
    m.close()
    q.put(("after", os.getpid(), valid))


def test_sweeper_closes_only_unreferenced_idle_contexts(harness, parent, ns):
    m = parent(ContextConfig(max_idle_time=0.2, cleanup_interval=0.05, lock_timeout=0.3),
               sweeper=True)
    release = harness.ctx.Event()
    harness.start(_sweep_victim_body, ns, release)
    harness.recv("ready")
    _poll(lambda: _info(m, "idle") is None, "the sweeper closes the idle context")
    # The sweep that closed "idle" found "held" idle for longer, but referenced.
    assert _info(m, "held").refcount == 1
    release.set()
    assert harness.recv("after")[2] is True
    harness.join()
    _poll(lambda: _info(m, "held") is None, "the sweeper closes the returned context")
    assert m.check() == []


def _sweep_racer_body(q, ns, rounds) -> None:
    m = _open(ns, None)

    def init(ctx):
        ctx.buf[:8] = U64.pack(ctx.incarnation)

    records = []
    for i in range(rounds):
        ctx, existed = m.get_or_create_context("hot", MemoryContextConfig(size=16), init=init)
        valid = m.validate_context(ctx)
        inc = ctx.incarnation
        content = U64.unpack(ctx.buf[:8])[0]
        m.return_context(ctx)  # never raises: a referenced context is never swept
        records.append((existed, inc, valid, content))
        if i % 3 == 2:  # now and then let the sweeper take it (not asserted here)
            end = time.monotonic() + 2
            while time.monotonic() < end and any(
                    c.name == "hot" and c.incarnation == inc for c in m.contexts()):
                time.sleep(0.005)
    q.put(("records", os.getpid(), records))
    m.close()


def test_worker_racing_the_sweeper(harness, parent, ns):
    m = parent(ContextConfig(max_idle_time=0.01, cleanup_interval=0.01, lock_timeout=0.3),
               sweeper=True)
    for _ in range(2):
        harness.start(_sweep_racer_body, ns, 30)
    records = [r for _ in range(2) for r in harness.recv("records")[2]]
    harness.join()
    assert all(valid for _e, _i, valid, _c in records)  # never a closed handle that validates
    assert all(content == inc for _e, inc, _v, content in records)  # and the right memory
    created = [inc for existed, inc, _v, _c in records if not existed]
    assert len(created) == len(set(created))  # each incarnation created exactly once
    assert {inc for existed, inc, _v, _c in records if existed} <= set(created)
    assert len(created) >= 2, "the sweeper never closed the context between rounds"
    _poll(lambda: _info(m, "hot") is None, "the sweeper closes the last incarnation")
    assert m.check() == []


# --- ctx.lock ------------------------------------------------------------------------

def _increment_body(q, ns, barrier, n) -> None:
    m = _open(ns, None)
    ctx = m.get_context("counter")
    barrier.wait(WAIT)
    for _ in range(n):
        with ctx.lock:
            value = U64.unpack(ctx.buf[:8])[0]
            os.sched_yield()  # widen the read-modify-write window
            ctx.buf[:8] = U64.pack(value + 1)
    m.return_context(ctx)
    m.close()
    q.put(("counted", os.getpid()))


def test_ctx_lock_excludes_across_processes(harness, parent, ns):
    workers, n = 3, 300
    m = parent()
    ctx, _ = m.get_or_create_context("counter", MemoryContextConfig(size=8))
    barrier = harness.ctx.Barrier(workers)
    for _ in range(workers):
        harness.start(_increment_body, ns, barrier, n)
    for _ in range(workers):
        harness.recv("counted")
    harness.join()
    with ctx.lock:
        assert U64.unpack(ctx.buf[:8])[0] == workers * n
    m.return_context(ctx)
    assert m.check() == []


# --- force close and unlink seen from another process --------------------------------

def _bystander_body(q, ns, step1, step2) -> None:
    m = _open(ns, None)
    a = m.get_context("a")
    b = m.get_context("b")
    with b.lock:
        b.buf[:4] = b"mine"
    q.put(("holding", os.getpid()))
    step1.wait(WAIT)  # the parent force-closed "a"
    seen = {"a_valid": m.validate_context(a), "b_valid": m.validate_context(b)}
    try:
        _ = a.buf
        seen["a_buf"] = "readable"
    except ContextClosedError:
        seen["a_buf"] = "ContextClosedError"
    try:
        m.return_context(a)
        seen["a_return"] = "returned"
    except ContextClosedError:
        seen["a_return"] = "ContextClosedError"
    q.put(("after-close", os.getpid(), seen))
    step2.wait(WAIT)  # the parent force-unlinked the namespace
    seen = {"b_valid": m.validate_context(b)}
    try:
        _ = b.buf
        seen["b_buf"] = "readable"
    except ContextClosedError:
        seen["b_buf"] = "ContextClosedError"
    try:
        m.get_or_create_context("c")
        seen["create"] = "created"
    except ContextManagerClosedError:
        seen["create"] = "ContextManagerClosedError"
    m.close()
    q.put(("after-unlink", os.getpid(), seen))


def test_force_close_and_unlink_seen_by_another_process(harness, parent, ns):
    m = parent()
    for name, size in (("a", 4096), ("b", 64)):
        h, _ = m.get_or_create_context(name, MemoryContextConfig(size=size))
        m.return_context(h)
    step1, step2 = harness.ctx.Event(), harness.ctx.Event()
    worker = harness.start(_bystander_body, ns, step1, step2)
    harness.recv("holding")
    with pytest.raises(ContextInUseError, match="'a'"):
        m.close_context("a")
    m.close_context("a", force=True)
    step1.set()
    assert harness.recv("after-close")[2] == {
        "a_valid": False, "b_valid": True, "a_buf": "ContextClosedError",
        "a_return": "ContextClosedError"}
    with pytest.raises(ContextInUseError, match=str(worker.pid)):
        m.unlink()
    assert _info(m, "b").refcount == 1
    m.unlink(force=True)
    assert _shm.namespace_objects(ns) == []
    step2.set()
    assert harness.recv("after-unlink")[2] == {
        "b_valid": False, "b_buf": "ContextClosedError", "create": "ContextManagerClosedError"}
    harness.join()
    assert _shm.namespace_objects(ns) == []


def _user_body(q, ns) -> None:
    m = _open(ns, None)
    ctx, _ = m.get_or_create_context("w", MemoryContextConfig(size=1024))
    with ctx.lock:
        pass  # creates the context's lock semaphore, which unlink must remove too
    ctx.put(list(range(10)))
    m.return_context(ctx)
    m.close()
    q.put(("used", os.getpid()))


def test_unlink_after_other_processes_leaves_nothing(harness, parent, ns):
    m = parent()
    for _ in range(2):
        harness.start(_user_body, ns)
    for _ in range(2):
        harness.recv("used")
    harness.join()
    ctx = m.get_context("w")
    assert ctx.get() == list(range(10))
    m.return_context(ctx)
    m.unlink()
    assert _shm.namespace_objects(ns) == []


def _threads_first_use_in_forked_child(ns: str, inherited, out) -> None:
    barrier = threading.Barrier(8)
    handles = []

    def first_get(i: int) -> None:
        barrier.wait()
        handles.append(inherited.get_context(f"c{i}"))

    threads = [threading.Thread(target=first_get, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = inherited._snapshot()
    mine = [p for p in snap.procs if p.pid == os.getpid()]
    out.put((len(mine), sum(c for p in mine for _s, c in p.refs), inherited.check()))
    for h in handles:
        inherited.return_context(h)
    inherited.close()


def test_threads_of_a_forked_child_register_it_once(parent):
    """A manager inherited over fork registers the child on first use; eight threads
    doing that at once must end with one process entry holding all eight references."""
    m = parent()
    for i in range(8):
        m.return_context(m.get_or_create_context(f"c{i}")[0])
    fork = mp.get_context("fork")
    out = fork.Queue()
    p = fork.Process(target=_threads_first_use_in_forked_child, args=(m.namespace, m, out))
    p.start()
    entries, refs, problems = out.get(timeout=60)
    p.join(30)
    assert (entries, refs, problems) == (1, 8, [])
