"""Published versions of a name, in real processes: ``ContextManager.publish``,
``publish_object`` and ``refresh``, ``MemoryContext.version`` and ``is_current``, as
their docstrings promise them and as ``Slots.switch``/``free_superseded``/
``after_return``, ``ColdPath.publish``, the return step R7 (``_hotpath.py``),
``Table.repair_table``, the sweep's pass over superseded versions and
``_snapshot.violations`` say they are kept.

A version's memory is a file in /dev/shm: "freed" is checked as that file being gone.
Worker bodies are module-level functions (spawn pickles them by name) that report
through one queue; a worker that fails reports its traceback, which fails the test at
once. No fixed sleeps: the parent waits on messages, events and joins.
"""

from __future__ import annotations

import gc
import os
import threading

import numpy as np
import pytest
from helpers import WAIT, Workers

from shmctx import (
    ContextClosedError,
    ContextConfig,
    ContextInUseError,
    ContextManager,
    ContextNotFoundError,
    InvalidConfigError,
    MemoryContextConfig,
    _failpoints,
    _shm,
)
from shmctx._context import mapping_of

pytestmark = pytest.mark.usefixtures("hot_path")  # each test on the C and Python hot path

# No sweeper thread: the tests that want a sweep call sweep() themselves. A short
# lock_timeout, so that a table lock left held by a dead publisher is taken over fast.
CFG = ContextConfig(lock_timeout=0.2, cleanup_interval=0, capacity=64, max_processes=32)
SIZE = 256
MEM = MemoryContextConfig(size=SIZE)


def _pattern(seed: int, n: int = SIZE) -> bytes:
    """``n`` bytes that differ from every other seed's at almost every position, so a
    version read in part from another's memory cannot pass for itself."""
    return bytes((i * 31 + seed * 97 + 7) % 251 for i in range(n))


OLD, NEW = _pattern(1), _pattern(2)


def _writer(data: bytes):
    """An ``init`` that fills the whole context with ``data``."""
    def init(ctx) -> None:
        ctx.buf[:] = data
    return init


# --- harness -------------------------------------------------------------------------

def _open(ns: str, leg: str) -> ContextManager:
    """A worker's own manager, on the hot path of the test's leg (fork and spawn children
    inherit the leg's environment; this checks it)."""
    m = ContextManager(CFG, namespace=ns, sweeper=False)
    assert m.hot_path == leg, (m.hot_path, leg)
    return m


@pytest.fixture
def workers():
    w = Workers()
    try:
        yield w
    finally:
        w.cleanup()


@pytest.fixture
def m(managers) -> ContextManager:
    return managers()


def _rows(m: ContextManager, name: str) -> list[tuple]:
    """(version, superseded, pending, state, size, refcount) of every version of
    ``name``, oldest first."""
    return [(i.version, i.superseded, i.pending, i.state, i.size, i.refcount)
            for i in m.contexts() if i.name == name]


def _everything(m: ContextManager) -> list[tuple]:
    """Every context of the namespace, each version, as ``contexts()`` says (its
    timestamps left out: they are clock readings, not state)."""
    return [(i.name, i.version, i.superseded, i.pending, i.state, i.size, i.refcount,
             i.holders, i.incarnation, i.kind) for i in m.contexts()]


def _segment(m: ContextManager, ctx) -> str:
    """The /dev/shm file of ``ctx``'s memory."""
    mp_ = mapping_of(ctx)
    return _shm.host_path(m._table.segment(mp_.slot, mp_.inc))


def _seen(ctx) -> tuple[int, bytes, bool]:
    return ctx.version, bytes(ctx.buf), ctx.is_current


# --- versions and what contexts() says of them ---------------------------------------

def test_versions_count_up_from_one_and_contexts_lists_them(m):
    with pytest.raises(ContextNotFoundError):
        m.get_context("v")
    v1 = m.publish("v", MemoryContextConfig(size=64), init=_writer(_pattern(1, 64)))
    assert (v1.version, v1.is_current, bytes(v1.buf)) == (1, True, _pattern(1, 64))
    assert _rows(m, "v") == [(1, False, False, "ready", 64, 1)]
    assert m.check() == []

    v2 = m.publish("v", MemoryContextConfig(size=4096), init=_writer(_pattern(2, 4096)))
    assert (v2.version, v2.is_current, v1.is_current) == (2, True, False)
    assert _rows(m, "v") == [(1, True, False, "ready", 64, 1),
                             (2, False, False, "ready", 4096, 1)]
    assert m.check() == []

    v3 = m.publish("v", MemoryContextConfig(size=128), init=_writer(_pattern(3, 128)))
    assert (v3.version, v2.is_current, v3.is_current) == (3, False, True)
    assert _rows(m, "v") == [(1, True, False, "ready", 64, 1),
                             (2, True, False, "ready", 4096, 1),
                             (3, False, False, "ready", 128, 1)]
    assert m.check() == []
    # Each holder reads its own version, and keeps its number.
    assert [(h.version, bytes(h.buf)) for h in (v1, v2, v3)] == \
        [(1, _pattern(1, 64)), (2, _pattern(2, 4096)), (3, _pattern(3, 128))]

    for h in (v2, v1, v3):
        m.return_context(h)
        assert m.check() == []
    assert _rows(m, "v") == [(3, False, False, "ready", 128, 0)]
    got = m.get_context("v")
    assert (got.version, bytes(got.buf)) == (3, _pattern(3, 128))
    m.return_context(got)

    # publish_object of a name that does not exist creates its version 1 as well.
    o = m.publish_object("o", {"x": 1})
    assert (o.version, o.load(), o.kind) == (1, {"x": 1}, "object")
    m.return_context(o)
    assert [r[:4] for r in _rows(m, "o")] == [(1, False, False, "ready")]
    assert m.check() == []


def test_get_or_create_returns_the_current_version(m, workers, hot_path):
    for k in (1, 2, 3):
        m.return_context(m.publish("g", MEM, init=_writer(_pattern(k))))
    for config in (None, MEM):
        ctx, existed = m.get_or_create_context("g", config)
        assert (existed, ctx.version, bytes(ctx.buf), ctx.is_current) == \
            (True, 3, _pattern(3), True)
        m.return_context(ctx)
    workers.start(_get_or_create_body, m.namespace, hot_path)  # a process of its own
    assert workers.recv("got")[1:] == ((True, 3, _pattern(3), True),) * 2
    workers.join()
    assert _rows(m, "g") == [(3, False, False, "ready", SIZE, 0)]
    assert m.check() == []


def _get_or_create_body(q, ns, leg) -> None:
    m = _open(ns, leg)
    out = []
    for config in (None, MEM):
        ctx, existed = m.get_or_create_context("g", config)
        out.append((existed, *_seen(ctx)))
        m.return_context(ctx)
    q.put(("got", *out))
    m.close()


# --- a new version is invisible until built, then the only one found -----------------

def _held_publisher_body(q, ns, leg, release, done) -> None:
    m = _open(ns, leg)

    def init(ctx) -> None:
        ctx.buf[:] = NEW  # all of the new version written before anyone may see it
        q.put(("in_init", os.getpid()))
        assert release.wait(WAIT)

    new = m.publish("cfg", MEM, init=init)
    q.put(("published", *_seen(new)))
    assert done.wait(WAIT)
    m.return_context(new)
    m.close()


def _reader_body(q, ns, leg, premap, start, after, rounds) -> None:
    m = _open(ns, leg)
    if premap:  # mapped now: its later gets take the hot path
        m.return_context(m.get_context("cfg"))
    q.put(("ready",))
    assert start.wait(WAIT)
    # The publisher is held inside its init: every get finds the old version.
    gets, creates = set(), set()
    for _ in range(rounds):
        ctx = m.get_context("cfg")
        gets.add(_seen(ctx))
        m.return_context(ctx)
        ctx, existed = m.get_or_create_context("cfg")
        creates.add((existed, *_seen(ctx)))
        m.return_context(ctx)
    q.put(("blocked", gets, creates))
    # Across the switch: only ever whole versions, and once the new one was seen, never
    # the old one again.
    newest = 1
    while not after.is_set():
        ctx = m.get_context("cfg")
        version, data, _ = _seen(ctx)
        m.return_context(ctx)
        assert (version, data) in ((1, OLD), (2, NEW)), (version, data[:8])
        assert version >= newest, "the old version came back after the new one was seen"
        newest = version
    # ``after`` was set once publish had returned: the new version, in each way of getting.
    ctx = m.get_context("cfg")
    got = _seen(ctx)
    ctx2, existed = m.get_or_create_context("cfg")
    q.put(("after", got, (existed, *_seen(ctx2))))
    m.return_context(ctx)
    m.return_context(ctx2)
    m.close()


def test_new_version_is_invisible_until_built(m, workers, ns, hot_path):
    held, _ = m.get_or_create_context("cfg", MEM, init=_writer(OLD))
    old_path = _segment(m, held)
    release, done, start, after = (workers.event() for _ in range(4))
    # One reader maps the name before the publish starts (its gets then take the hot
    # path), the other makes its first get while the new version is pending.
    premaps = (True, False)
    readers = len(premaps)
    for premap in premaps:
        workers.start(_reader_body, ns, hot_path, premap, start, after, 50)
    for _ in range(readers):
        workers.recv("ready")
    workers.start(_held_publisher_body, ns, hot_path, release, done)
    workers.recv("in_init")
    # The new version is built, pending, found by no get.
    assert _rows(m, "cfg") == [(0, False, True, "creating", SIZE, 1),
                               (1, False, False, "ready", SIZE, 1)]
    assert m.check() == []
    start.set()
    for _ in range(readers):
        assert workers.recv("blocked")[1:] == ({(1, OLD, True)}, {(True, 1, OLD, True)})
    assert _seen(held) == (1, OLD, True)
    ctx = m.get_context("cfg")  # the hot path: mapped here
    assert _seen(ctx) == (1, OLD, True)
    m.return_context(ctx)

    release.set()
    assert workers.recv("published")[1:] == (2, NEW, True)
    after.set()
    for _ in range(readers):
        msg = workers.recv("after")
        assert msg[1:] == ((2, NEW, True), (True, 2, NEW, True))
    # This process: its mapping of the old version is cached (and still held).
    for _ in range(2):
        ctx = m.get_context("cfg")
        assert _seen(ctx) == (2, NEW, True)
        m.return_context(ctx)
    ctx, existed = m.get_or_create_context("cfg")
    assert (existed, *_seen(ctx)) == (True, 2, NEW, True)
    m.return_context(ctx)
    assert _seen(held) == (1, OLD, False)
    # A manager that never mapped the name, in a process of its own.
    workers.start(_fresh_get_body, ns, hot_path)
    assert workers.recv("fresh")[1] == (2, NEW, True)

    assert _rows(m, "cfg") == [(1, True, False, "ready", SIZE, 1),
                               (2, False, False, "ready", SIZE, 1)]
    assert m.check() == []
    m.return_context(held)
    assert not os.path.exists(old_path)
    done.set()
    workers.join()
    assert _rows(m, "cfg") == [(2, False, False, "ready", SIZE, 0)]
    assert m.check() == []


def _fresh_get_body(q, ns, leg) -> None:
    m = _open(ns, leg)
    ctx = m.get_context("cfg")
    seen = _seen(ctx)
    m.return_context(ctx)  # before saying so: the parent counts references next
    q.put(("fresh", seen))
    m.close()


# --- holders keep their version; refresh moves them on --------------------------------

def _array_cfg(shape, dtype) -> MemoryContextConfig:
    return MemoryContextConfig.for_array(shape, dtype)


OLD_ARRAY = np.arange(24, dtype=np.float32).reshape(4, 6) * 1.5
NEW_ARRAY = np.arange(10, dtype=np.int64) * -7


def _content(ctx, kind: str):
    """What a holder reads: every byte, and for an array its shape and dtype too."""
    if kind == "bytes":
        return bytes(ctx.buf)
    a = ctx.array()
    return a.shape, a.dtype.str, a.tobytes()


def _make_version(m: ContextManager, name: str, kind: str, which: int):
    """Publish version ``which`` (1: the old, 2: the new) of ``name``."""
    if kind == "bytes":
        return m.publish(name, MEM, init=_writer(OLD if which == 1 else NEW))
    arr = OLD_ARRAY if which == 1 else NEW_ARRAY

    def init(ctx) -> None:
        ctx.array(writeable=True)[...] = arr
    return m.publish(name, _array_cfg(arr.shape, arr.dtype), init=init)


def _expected(kind: str, which: int):
    if kind == "bytes":
        return OLD if which == 1 else NEW
    arr = OLD_ARRAY if which == 1 else NEW_ARRAY
    return arr.shape, arr.dtype.str, arr.tobytes()


def _holder_body(q, ns, leg, kind, go) -> None:
    m = _open(ns, leg)
    old = m.get_context("h")
    early = old.array() if kind == "array" else None  # a view taken before the switch
    q.put(("holding", _content(old, kind), old.version, old.is_current))
    assert go.wait(WAIT)
    out = {"content": _content(old, kind), "version": old.version,
           "current": old.is_current}
    if early is not None:
        out["early"] = (early.shape, early.dtype.str, early.tobytes())
    new = m.refresh(old)
    out["refreshed"] = (new is not old, new.version, new.is_current, _content(new, kind))
    with pytest.raises(ContextClosedError):
        old.buf  # noqa: B018 -- refresh returned it
    out["again"] = m.refresh(new) is new
    q.put(("after", out))
    m.return_context(new)
    m.close()


@pytest.mark.parametrize("kind", ["bytes", "array"])
def test_holders_keep_their_version_and_refresh_moves_them_on(m, workers, ns, hot_path, kind):
    v1 = _make_version(m, "h", kind, 1)
    go = workers.event()
    workers.start(_holder_body, ns, hot_path, kind, go)
    assert workers.recv("holding")[1:] == (_expected(kind, 1), 1, True)
    early = v1.array() if kind == "array" else None

    v2 = _make_version(m, "h", kind, 2)
    assert (v2.version, v2.is_current, _content(v2, kind)) == (2, True, _expected(kind, 2))
    # This process's holder of the old version.
    assert (v1.version, v1.is_current, _content(v1, kind)) == (1, False, _expected(kind, 1))
    if early is not None:
        assert np.array_equal(early, OLD_ARRAY) and early.dtype == OLD_ARRAY.dtype
    assert m.refresh(v2) is v2
    # Another process's holder of the old version.
    go.set()
    out = workers.recv("after")[1]
    assert out["content"] == _expected(kind, 1)
    assert (out["version"], out["current"]) == (1, False)
    if kind == "array":
        assert out["early"] == _expected(kind, 1)
    assert out["refreshed"] == (True, 2, True, _expected(kind, 2))
    assert out["again"] is True
    workers.join()

    new = m.refresh(v1)
    assert new is not v1 and _seen(new)[0::2] == (2, True)
    with pytest.raises(ContextClosedError):
        v1.buf  # noqa: B018 -- refresh returned it
    assert _rows(m, "h") == [(2, False, False, "ready", v2.size, 2)]
    m.return_context(new)
    m.return_context(v2)
    assert m.check() == []


# --- an old version is freed with its last reference ---------------------------------

def test_old_version_freed_at_its_last_return_in_this_process(managers):
    m1, m2 = managers(), managers()  # two managers: two reference holders of one process
    a = m1.publish("f", MEM, init=_writer(OLD))
    b = m2.get_context("f")
    path = _segment(m1, a)
    new = m1.publish("f", MEM, init=_writer(NEW))
    m1.return_context(new)
    m1.return_context(a)
    assert os.path.exists(path)  # b still reads it
    assert bytes(b.buf) == OLD
    assert _rows(m1, "f") == [(1, True, False, "ready", SIZE, 1),
                              (2, False, False, "ready", SIZE, 0)]
    m2.return_context(b)
    assert not os.path.exists(path)
    assert _rows(m1, "f") == [(2, False, False, "ready", SIZE, 0)]
    assert m1.check() == []


def _return_last_body(q, ns, leg, path, go) -> None:
    m = _open(ns, leg)
    old = m.get_context("f")
    q.put(("holding", old.version))
    assert go.wait(WAIT)
    data, current = bytes(old.buf), old.is_current
    existed = os.path.exists(path)
    m.return_context(old)
    q.put(("returned", data, current, existed, os.path.exists(path)))
    m.close()


def test_old_version_freed_when_another_process_returns_last(m, workers, ns, hot_path):
    mine = m.publish("f", MEM, init=_writer(OLD))
    path = _segment(m, mine)
    go = workers.event()
    workers.start(_return_last_body, ns, hot_path, path, go)
    assert workers.recv("holding")[1] == 1
    m.return_context(m.publish("f", MEM, init=_writer(NEW)))
    m.return_context(mine)
    assert os.path.exists(path)  # the child holds it
    assert _rows(m, "f")[0][:2] == (1, True)
    go.set()
    # Read, it was still there; right after the child's return, gone.
    assert workers.recv("returned")[1:] == (OLD, False, True, False)
    workers.join()
    assert not os.path.exists(path)
    assert _rows(m, "f") == [(2, False, False, "ready", SIZE, 0)]
    assert m.check() == []


def test_dropped_old_handle_is_given_back_at_the_next_call(m):
    old = m.publish("d", MEM, init=_writer(OLD))
    path = _segment(m, old)
    new = m.publish("d", MEM, init=_writer(NEW))
    del old
    gc.collect()  # the handle is gone unreturned: its reference is queued
    got = m.get_context("d")  # the next call gives it back, and the old version goes
    assert not os.path.exists(path)
    assert _seen(got) == (2, NEW, True)
    assert _rows(m, "d") == [(2, False, False, "ready", SIZE, 2)]
    m.return_context(got)
    m.return_context(new)
    assert m.check() == []


def _hold_until_killed_body(q, ns, leg) -> None:
    m = _open(ns, leg)
    ctx = m.get_context("k")
    q.put(("holding", ctx.version))
    threading.Event().wait()  # until SIGKILLed, holding it


def test_dead_holder_old_version_freed_by_sweep(m, workers, ns, hot_path):
    mine = m.publish("k", MEM, init=_writer(OLD))
    path = _segment(m, mine)
    p = workers.start(_hold_until_killed_body, ns, hot_path)
    assert workers.recv("holding")[1] == 1
    m.return_context(mine)
    m.return_context(m.publish("k", MEM, init=_writer(NEW)))
    assert _rows(m, "k") == [(1, True, False, "ready", SIZE, 1),
                             (2, False, False, "ready", SIZE, 0)]
    workers.kill(p)
    assert os.path.exists(path)  # the dead child's reference is still counted
    assert m.check() == []
    report = m.sweep()
    assert report.reclaimed == {p.pid: 1}
    assert not os.path.exists(path)
    assert _rows(m, "k") == [(2, False, False, "ready", SIZE, 0)]
    assert m.check() == []


# --- a publish that fails leaves nothing behind --------------------------------------

class _Boom(Exception):
    pass


def _boom(*_args) -> None:
    raise _Boom("init failed")


def test_publisher_that_raises_leaves_the_current_version_and_nothing_behind(m, ns):
    cur = m.publish("r", MEM, init=_writer(OLD))
    obj = m.publish_object("o", {"v": 1})
    rows, objects = _everything(m), _shm.namespace_objects(ns)

    with pytest.raises(_Boom):
        m.publish("r", MEM, init=_boom)
    with pytest.raises(_Boom):
        m.publish("r", _array_cfg((3,), "f8"), init=_boom)
    with pytest.raises(_Boom):
        m.publish("absent", MEM, init=_boom)
    with pytest.raises(TypeError):
        m.publish_object("o", threading.Lock())  # cannot be pickled
    with pytest.raises(TypeError):
        m.publish_object("o", factory=lambda: threading.Lock())
    with pytest.raises(_Boom):
        m.publish_object("o", factory=_boom)

    assert _everything(m) == rows  # no pending version, no new version, nothing else
    assert _shm.namespace_objects(ns) == objects
    assert m.check() == []
    assert _seen(cur) == (1, OLD, True)
    assert (obj.version, obj.is_current, obj.load()) == (1, True, {"v": 1})
    with pytest.raises(ContextNotFoundError):
        m.get_context("absent")
    got = m.get_context("r")
    assert _seen(got) == (1, OLD, True)
    for h in (got, cur, obj):
        m.return_context(h)
    assert m.check() == []


def _publisher_dies_in_init_body(q, ns, leg, how) -> None:
    m = _open(ns, leg)
    if how == "failpoint":
        _failpoints.arm("publish.built")  # SIGKILL right after init, before the switch

    def init(ctx) -> None:
        ctx.buf[:] = NEW
        if how == "blocked":
            q.put(("in_init", os.getpid()))
            threading.Event().wait()  # until SIGKILLed, inside init

    m.publish("c", MEM, init=init)
    q.put(("survived",))  # fails the test: it should have died


@pytest.mark.parametrize("how", ["failpoint", "blocked"])
def test_publisher_killed_inside_init(m, workers, ns, hot_path, how):
    cur = m.publish("c", MEM, init=_writer(OLD))
    objects = _shm.namespace_objects(ns)
    p = workers.start(_publisher_dies_in_init_body, ns, hot_path, how)
    if how == "blocked":
        workers.recv("in_init")
        workers.kill(p)
    else:
        workers.died_by_itself(p)
    # The dead publisher's version is left pending, found by no get.
    assert _rows(m, "c") == [(0, False, True, "creating", SIZE, 1),
                             (1, False, False, "ready", SIZE, 1)]
    assert _seen(cur) == (1, OLD, True)
    got = m.get_context("c")
    assert _seen(got) == (1, OLD, True)
    m.return_context(got)
    m.sweep()
    assert _rows(m, "c") == [(1, False, False, "ready", SIZE, 1)]
    assert _shm.namespace_objects(ns) == objects
    assert m.check() == []
    assert _seen(cur) == (1, OLD, True)
    # And the next publish of the name goes on from the current version.
    nxt = m.publish("c", MEM, init=_writer(NEW))
    assert _seen(nxt) == (2, NEW, True)
    m.return_context(nxt)
    m.return_context(cur)
    assert m.check() == []


def _publisher_dies_switching_body(q, ns, leg) -> None:
    m = _open(ns, leg)
    _failpoints.arm("publish.new_ready")  # SIGKILL holding the table lock, mid-switch
    m.publish("n", MEM, init=_writer(NEW))
    q.put(("survived",))  # fails the test: it should have died


@pytest.mark.parametrize("held", [True, False], ids=["old-held", "old-unheld"])
def test_publisher_killed_mid_switch_is_completed_by_the_repair(m, workers, ns, hot_path,
                                                                held):
    old = m.publish("n", MEM, init=_writer(OLD))
    path = _segment(m, old)
    if not held:
        m.return_context(old)
    p = workers.start(_publisher_dies_switching_body, ns, hot_path)
    workers.died_by_itself(p)
    # contexts() takes the table lock, which the dead publisher holds: taken over, the
    # table repaired, the switch completed (the higher version current).
    assert _rows(m, "n") == [(1, True, False, "ready", SIZE, int(held)),
                             (2, False, False, "ready", SIZE, 1)]
    assert m.check() == []
    got = m.get_context("n")
    assert _seen(got) == (2, NEW, True)
    ctx, existed = m.get_or_create_context("n")
    assert (existed, *_seen(ctx)) == (True, 2, NEW, True)
    m.return_context(ctx)
    if held:
        assert _seen(old) == (1, OLD, False)
        assert os.path.exists(path)
        m.return_context(old)  # the last reference: the old version goes now
        assert not os.path.exists(path)
    report = m.sweep()  # the dead publisher's reference to the new version
    assert report.reclaimed == {p.pid: 1}
    assert not os.path.exists(path)
    assert _rows(m, "n") == [(2, False, False, "ready", SIZE, 1)]
    assert m.check() == []
    m.return_context(got)
    assert m.check() == []


# --- concurrent publishers -------------------------------------------------------------

def _racing_publisher_body(q, ns, leg, tag, go, in_init) -> None:
    m = _open(ns, leg)
    data = _pattern(10 + tag)

    def init(ctx) -> None:
        ctx.buf[:] = data
        in_init.wait(WAIT)  # every publisher inside its init at once, then all switch

    q.put(("ready",))
    assert go.wait(WAIT)
    new = m.publish("race", MEM, init=init)
    q.put(("published", tag, new.version, bytes(new.buf) == data, _segment(m, new)))
    m.return_context(new)
    m.close()


def test_concurrent_publishers_get_distinct_versions(m, workers, ns, hot_path):
    held = m.publish("race", MEM, init=_writer(OLD))
    methods = ["fork", "spawn", "fork", "spawn"]
    go = workers.event()
    in_init = workers.mp.Barrier(len(methods))
    for tag, method in enumerate(methods):
        workers.start(_racing_publisher_body, ns, hot_path, tag, go, in_init, method=method)
    for _ in methods:
        workers.recv("ready")
    go.set()
    results = [workers.recv("published")[1:] for _ in methods]
    workers.join()
    versions = sorted(r[1] for r in results)
    assert versions == [2, 3, 4, 5], results
    assert all(r[2] for r in results), results  # each got the version it built
    winner = max(results, key=lambda r: r[1])
    got = m.get_context("race")
    assert _seen(got) == (5, _pattern(10 + winner[0]), True)
    assert _seen(held) == (1, OLD, False)
    m.return_context(held)
    # Every version but the current one went with its last reference.
    assert [os.path.exists(r[3]) for r in results] == [r is winner for r in results]
    assert _rows(m, "race") == [(5, False, False, "ready", SIZE, 1)]
    m.return_context(got)
    assert len(m.contexts()) == 1
    assert m.check() == []


# --- what a version holds: shape, dtype, size, objects ---------------------------------

def _array_reader_body(q, ns, leg) -> None:
    m = _open(ns, leg)
    ctx = m.get_context("arr")
    a = ctx.array()
    q.put(("array", ctx.version, a.shape, a.dtype.str, a.tobytes()))
    m.return_context(ctx)
    m.close()


def test_publish_changes_shape_dtype_and_size(m, workers, ns, hot_path):
    v1 = _make_version(m, "arr", "array", 1)
    old_view = v1.array()
    v2 = _make_version(m, "arr", "array", 2)
    assert v2.version == 2 and v2.size != v1.size
    assert np.array_equal(v2.array(), NEW_ARRAY) and v2.array().dtype == np.int64
    assert v1.array().shape == (4, 6) and np.array_equal(v1.array(), OLD_ARRAY)
    assert np.array_equal(old_view, OLD_ARRAY)
    assert [(r[0], r[1], r[4]) for r in _rows(m, "arr")] == [(1, True, v1.size),
                                                             (2, False, v2.size)]
    workers.start(_array_reader_body, ns, hot_path)
    assert workers.recv("array")[1:] == (2, NEW_ARRAY.shape, NEW_ARRAY.dtype.str,
                                         NEW_ARRAY.tobytes())
    workers.join()
    # The name now means the new shape: the new config matches, the old one does not.
    ctx, existed = m.get_or_create_context("arr", _array_cfg(NEW_ARRAY.shape, NEW_ARRAY.dtype))
    assert existed and ctx.version == 2
    m.return_context(ctx)
    with pytest.raises(InvalidConfigError):
        m.get_or_create_context("arr", _array_cfg(OLD_ARRAY.shape, OLD_ARRAY.dtype))
    # A bytes context can grow and shrink the same way.
    b1 = m.publish("bytes", MemoryContextConfig(size=16), init=_writer(_pattern(1, 16)))
    b2 = m.publish("bytes", MemoryContextConfig(size=8192), init=_writer(_pattern(2, 8192)))
    assert (b1.size, bytes(b1.buf)) == (16, _pattern(1, 16))
    assert (b2.size, bytes(b2.buf)) == (8192, _pattern(2, 8192))
    for h in (v1, v2, b1, b2):
        m.return_context(h)
    assert [r[:5] for r in _rows(m, "arr")] == [(2, False, False, "ready", v2.size)]
    assert [r[:5] for r in _rows(m, "bytes")] == [(2, False, False, "ready", 8192)]
    assert m.check() == []


def _object_reader_body(q, ns, leg) -> None:
    m = _open(ns, leg)
    ctx, existed = m.get_or_create_object("obj", lambda: pytest.fail("factory ran"))
    got = ctx.load()
    q.put(("object", existed, ctx.version, got["v"], got["a"].tolist()))
    m.return_context(ctx)
    m.close()


def test_publish_object_with_an_object_and_with_a_factory(m, workers, ns, hot_path):
    v1, existed = m.get_or_create_object("obj", lambda: {"v": 1, "a": np.ones(3)})
    assert not existed and v1.version == 1
    v2 = m.publish_object("obj", {"v": 2, "a": np.arange(5.0)})
    ran = []

    def factory():
        ran.append(os.getpid())
        return {"v": 3, "a": np.full(1000, 3.0)}

    v3 = m.publish_object("obj", factory=factory)
    assert ran == [os.getpid()]  # run once, here
    assert [(h.version, h.is_current, h.load()["v"]) for h in (v1, v2, v3)] == \
        [(1, False, 1), (2, False, 2), (3, True, 3)]
    assert np.array_equal(v1.load()["a"], np.ones(3))
    assert np.array_equal(v2.load()["a"], np.arange(5.0))
    assert v3.size > v2.size  # each version as large as its object
    ctx, existed = m.get_or_create_object("obj", lambda: pytest.fail("factory ran"))
    assert existed and ctx.version == 3 and ctx.load()["v"] == 3
    m.return_context(ctx)
    workers.start(_object_reader_body, ns, hot_path)
    assert workers.recv("object")[1:] == (True, 3, 3, [3.0] * 1000)
    workers.join()
    with pytest.raises(TypeError):
        m.publish_object("obj", {"v": 4}, factory=factory)  # one or the other
    assert len(ran) == 1
    for h in (v1, v2, v3):
        m.return_context(h)
    assert [r[:4] for r in _rows(m, "obj")] == [(3, False, False, "ready")]
    assert m.check() == []


# --- close_context ---------------------------------------------------------------------

def test_close_context_closes_the_current_version_only(m):
    v1 = m.publish("cl", MEM, init=_writer(OLD))
    v2 = m.publish("cl", MEM, init=_writer(NEW))
    p1 = _segment(m, v1)
    p2 = _segment(m, v2)
    with pytest.raises(ContextInUseError):
        m.close_context("cl")  # the current version is referenced
    m.return_context(v2)
    m.close_context("cl")
    assert not os.path.exists(p2)
    with pytest.raises(ContextNotFoundError):
        m.get_context("cl")
    # The superseded version is still held and readable, and no longer current.
    assert (v1.version, bytes(v1.buf), v1.is_current) == (1, OLD, False)
    assert _rows(m, "cl") == [(1, True, False, "ready", SIZE, 1)]
    assert m.check() == []
    m.return_context(v1)
    assert not os.path.exists(p1)
    assert _rows(m, "cl") == []
    assert m.check() == []
    # The name is free again: its next publish starts over at version 1.
    again = m.publish("cl", MEM, init=_writer(NEW))
    assert _seen(again) == (1, NEW, True)
    m.return_context(again)
    assert m.check() == []


# --- publish meeting a creation, refresh of a closed handle ----------------------------

def _creator_body(q, ns, leg, release) -> None:
    m = _open(ns, leg)

    def init(ctx) -> None:
        ctx.buf[:] = OLD
        q.put(("in_init",))
        assert release.wait(WAIT)

    ctx, existed = m.get_or_create_context("mid", MEM, init=init)
    path = _segment(m, ctx)
    q.put(("created", existed, *_seen(ctx)))
    m.return_context(ctx)
    q.put(("returned", os.path.exists(path)))
    m.close()


def test_publish_while_the_name_is_being_created_keeps_the_table_sound(m, workers, ns,
                                                                        hot_path):
    """A publish that meets the name's first version still inside its creator's init
    makes the new version current without waiting for it; the one being created is
    then an older version, which its creator gets (not current) and which goes with its
    last reference. The table is sound at every step: ``check()`` says nothing wrong."""
    release = workers.event()
    workers.start(_creator_body, ns, hot_path, release)
    workers.recv("in_init")
    new = m.publish("mid", MEM, init=_writer(NEW))
    assert _seen(new) == (2, NEW, True)
    assert m.check() == []
    release.set()
    assert workers.recv("created")[1:] == (False, 1, OLD, False)
    assert workers.recv("returned")[1] is False
    workers.join()
    got = m.get_context("mid")
    assert _seen(got) == (2, NEW, True)
    assert _rows(m, "mid") == [(2, False, False, "ready", SIZE, 2)]
    assert m.check() == []
    m.return_context(got)
    m.return_context(new)


def _publisher_dies_switching_mid_body(q, ns, leg) -> None:
    m = _open(ns, leg)
    _failpoints.arm("publish.new_ready")  # SIGKILL holding the table lock, mid-switch
    m.publish("mid", MEM, init=_writer(NEW))
    q.put(("survived",))  # fails the test: it should have died


def test_repair_after_a_publisher_died_mid_switch_spares_a_creation_in_progress(
        m, workers, ns, hot_path):
    """The same meeting, with the publisher killed inside its switch: the repair that
    completes the switch keeps the new version current and the first one an older
    version, still being created by its live creator, which gets it as usual."""
    release = workers.event()
    workers.start(_creator_body, ns, hot_path, release)
    workers.recv("in_init")
    p = workers.start(_publisher_dies_switching_mid_body, ns, hot_path)
    workers.died_by_itself(p)
    assert m.check() == []  # takes the table lock over from the dead publisher: repaired
    got = m.get_context("mid")
    assert _seen(got) == (2, NEW, True)
    release.set()
    assert workers.recv("created")[1:] == (False, 1, OLD, False)
    assert workers.recv("returned")[1] is False
    workers.join()
    assert m.sweep().reclaimed == {p.pid: 1}
    assert _rows(m, "mid") == [(2, False, False, "ready", SIZE, 1)]
    assert m.check() == []
    m.return_context(got)


def _close_and_publish_body(q, ns, leg) -> None:
    m = _open(ns, leg)
    m.close_context("rc", force=True)
    m.return_context(m.publish("rc", MEM, init=_writer(NEW)))
    q.put(("done",))
    m.close()


def test_refresh_of_a_closed_handle_gives_the_current_version(m, workers, ns, hot_path):
    """``is_current`` is False for a handle whose context was closed, and ``refresh``
    then gives the current version of the name (MemoryContext.is_current's docstring);
    the closed handle has no reference left to give back."""
    old = m.publish("rc", MEM, init=_writer(OLD))
    workers.start(_close_and_publish_body, ns, hot_path)
    workers.recv("done")
    workers.join()
    assert old.is_current is False
    new = m.refresh(old)
    assert (new.version, bytes(new.buf), new.is_current) == (1, NEW, True)
    assert _rows(m, "rc") == [(1, False, False, "ready", SIZE, 1)]
    m.return_context(new)
    assert m.check() == []


# --- interrupts (a signal handler raising) at the worst moments --------------------------

@pytest.fixture
def interrupt_once(monkeypatch):
    """``arm(obj, name)``: the next call of ``obj.name`` does its work, then raises
    KeyboardInterrupt, as a signal handler that raises would at the next bytecode."""
    def arm(obj, name):
        orig = getattr(obj, name)
        armed = [True]

        def wrapper(*a, **k):
            r = orig(*a, **k)
            if armed[0]:
                armed[0] = False
                raise KeyboardInterrupt
            return r
        monkeypatch.setattr(obj, name, wrapper)
    return arm


@pytest.mark.parametrize("call", ["publish", "get_or_create"])
def test_an_interrupt_right_after_the_claim_leaves_no_slot_being_created(
        managers, interrupt_once, call):
    """A slot claimed for a new context (or version) whose creator is interrupted before
    it could make it: the creator lives, so no sweep would ever remove it, and every get
    of the name would wait for an init that never comes. It is removed as the interrupt
    leaves."""
    from shmctx import _slots

    m = managers(CFG)
    interrupt_once(_slots.Slots, "claim")
    with pytest.raises(KeyboardInterrupt):
        if call == "publish":
            m.publish("x", MEM)
        else:
            m.get_or_create_context("x", MEM)
    assert _everything(m) == []
    assert m.check() == []
    ctx, existed = m.get_or_create_context("x", MEM, timeout=5)  # no wait for a ghost
    assert not existed
    m.return_context(ctx)


def test_an_interrupt_as_the_claims_table_lock_is_let_go(managers, monkeypatch):
    """The interrupt lands in the ``with`` exit that lets go of the table lock after the
    claim, before the lock is released: the lock is recovered and the pending version
    removed, so nothing waits for either."""
    from shmctx import _entry

    m = managers(CFG)
    m.return_context(m.publish("x", MEM))
    orig_exit = _entry.holding.__exit__
    armed = [True]

    def exit_(self, *exc):
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt  # before the release: the lock stays held
        return orig_exit(self, *exc)

    monkeypatch.setattr(_entry.holding, "__exit__", exit_)
    with pytest.raises(KeyboardInterrupt):
        m.publish("x", MEM)
    monkeypatch.undo()
    assert [r[:3] for r in _rows(m, "x")] == [(1, False, False)]  # no pending version
    m._table.table_lock.acquire(timeout=1)  # not left held (it raises on a timeout)
    m._table.table_lock.release()
    assert m.check() == []
    new = m.publish("x", MEM)
    assert new.version == 2
    m.return_context(new)


def test_an_exception_inside_the_switch_still_completes_it(managers):
    """Once the new version is ready, the switch completes even if an exception then
    leaves publish: the new version is current (also after a later table repair), the
    old one superseded and freed, and no reference is left counted for the lost handle."""
    m = managers(CFG)
    m.return_context(m.publish("x", MEM, init=_writer(OLD)))
    _failpoints.arm("publish.new_ready:raise")
    try:
        with pytest.raises(_failpoints.FailpointError):
            m.publish("x", MEM, init=_writer(NEW))
    finally:
        _failpoints.disarm()
    rows = [(c.version, c.superseded, c.pending, c.refcount) for c in m.contexts()]
    assert rows == [(2, False, False, 0)]
    ctx = m.get_context("x")
    assert (ctx.version, bytes(ctx.buf)) == (2, NEW)
    m.return_context(ctx)
    assert m.check() == []


def test_publish_into_a_full_table_never_evicts_the_current_version(managers):
    """Making room for a new version must not evict the name's current one: the name
    would have no version until the switch, and a get in between would create an empty
    one. With nothing else to evict the publish is refused; the current version stays."""
    from shmctx import TableFullError

    m = managers(ContextConfig(capacity=2, cleanup_interval=0, lock_timeout=0.2))
    m.return_context(m.publish("a", MEM, init=_writer(OLD)))
    held, _ = m.get_or_create_context("b", MEM)
    with pytest.raises(TableFullError):
        m.publish("a", MEM, init=_writer(NEW))
    ctx = m.get_context("a")
    assert (ctx.version, bytes(ctx.buf), ctx.is_current) == (1, OLD, True)
    m.return_context(ctx)
    m.return_context(held)
    assert m.check() == []


def test_children_of_an_old_version_go_with_it(managers):
    """Contexts made with a version as their parent belong to it: a publish supersedes
    them too (an unreferenced one goes at once; a get of its name then finds nothing, so
    it is made anew under the new version), and the old parent goes once the last of its
    children has, without waiting for a sweep."""
    m = managers(CFG)
    m.return_context(m.publish("par", MEM))
    kid, _ = m.get_or_create_context("kid", MemoryContextConfig(size=64, parent="par"))
    idle, _ = m.get_or_create_context("idle", MemoryContextConfig(size=64, parent="par"))
    m.return_context(idle)
    m.return_context(m.publish("par", MEM))
    rows = sorted((c.name, c.version, c.superseded, c.refcount) for c in m.contexts())
    assert rows == [("kid", 1, True, 1), ("par", 1, True, 0), ("par", 2, False, 0)]
    assert not kid.is_current
    with pytest.raises(ContextNotFoundError):
        m.get_context("idle")
    assert m.check() == []
    m.return_context(kid)  # the last reference into the old version's tree
    assert [(c.name, c.version) for c in m.contexts()] == [("par", 2)]
    again, existed = m.get_or_create_context("kid", MemoryContextConfig(size=64, parent="par"))
    assert not existed and again.is_current
    m.return_context(again)
    assert m.check() == []


def test_a_damaged_version_number_is_a_clear_error_and_leaves_nothing(managers):
    """A stray write makes the current version's number the largest a u32 holds: the
    next publish cannot number its version, says so, and leaves nothing behind; a
    damaged kind byte reads as invalid instead of raising a KeyError."""
    from shmctx import ContextError
    from shmctx import _layout as L

    m = managers(CFG)
    ctx = m.publish("x", MEM)
    t = m._table
    so = t.geo.slot_off(mapping_of(ctx).slot)
    t.words.put32(so + L.SLOT.off("version"), 0xFFFF_FFFF)
    with pytest.raises(ContextError, match="version number"):
        m.publish("x", MEM)
    assert [(c.version, c.pending) for c in m.contexts()] == [(0xFFFF_FFFF, False)]
    t.words.put8(so + L.SLOT.off("kind"), 7)
    other = managers(CFG)  # maps it afresh: the kind is read from the slot then
    seen = other.get_context("x")
    assert seen.kind == "invalid(7)"
    other.return_context(seen)
    t.words.put8(so + L.SLOT.off("kind"), L.KIND_BYTES)
    m.return_context(ctx)
    assert m.check() == []
