"""Single-process semantics of the public API, exactly as its docstrings and the "API"
section of README.md state them.

Cross-process behaviour is in ``test_multiprocess.py``; bad input, damaged tables,
permissions and name safety are in ``test_badinput.py``.
"""

from __future__ import annotations

import os
import re
import threading
import time

import pytest
from helpers import hot_path_of

from shmctx import (
    DEFAULT_CLEANUP_INTERVAL,
    DEFAULT_MAX_IDLE_TIME,
    DEFAULT_MAX_REFERENCES,
    ContextClosedError,
    ContextConfig,
    ContextError,
    ContextInfo,
    ContextInUseError,
    ContextManager,
    ContextManagerClosedError,
    ContextNotFoundError,
    InvalidConfigError,
    MaxReferencesReachedError,
    MemoryContext,
    MemoryContextConfig,
    TableFullError,
    _shm,
)

pytestmark = pytest.mark.usefixtures("hot_path")  # each test on the C and Python hot path

# No automatic sweeping: the tests that want a sweep call sweep() themselves.
CFG = ContextConfig(lock_timeout=0.2, cleanup_interval=0, capacity=64, max_processes=16)


@pytest.fixture
def m(managers) -> ContextManager:
    return managers()


def _info(m: ContextManager, name: str) -> ContextInfo | None:
    return next((i for i in m.contexts() if i.name == name), None)


# --- get / get_or_create -------------------------------------------------------------

def test_get_or_create_reports_existed_and_counts_references(m):
    a, existed_a = m.get_or_create_context("alpha", MemoryContextConfig(size=128))
    b, existed_b = m.get_or_create_context("alpha")
    c = m.get_context("alpha")
    assert (existed_a, existed_b) == (False, True)
    assert all(isinstance(h, MemoryContext) for h in (a, b, c))
    assert a.name == "alpha" and a.size == 128 and len(a.buf) == 128
    info = _info(m, "alpha")
    assert info.refcount == 3 and info.holders == {os.getpid(): 3}
    assert info.state == "ready" and info.size == 128 and info.parent is None
    assert info.incarnation == a.incarnation
    for h in (a, b, c):
        m.return_context(h)
    assert _info(m, "alpha").refcount == 0
    assert _info(m, "alpha").holders == {}
    assert m.check() == []


def test_memory_is_shared_between_handles_and_managers(managers):
    m1, m2 = managers(), managers()
    a, _ = m1.get_or_create_context("shared", MemoryContextConfig(size=64))
    a.buf[:5] = b"hello"
    b, existed = m2.get_or_create_context("shared")
    assert existed and bytes(b.buf[:5]) == b"hello"
    b.buf[5:8] = b"!!!"
    assert bytes(a.buf[:8]) == b"hello!!!"
    m1.return_context(a)
    m2.return_context(b)


def test_get_context_of_missing_name(m):
    with pytest.raises(ContextNotFoundError) as e:
        m.get_context("nope")
    assert "nope" in str(e.value) and m.namespace in str(e.value)
    assert isinstance(e.value, ContextError)


def test_contexts_snapshot_fields(m):
    before = time.time()
    p, _ = m.get_or_create_context("p", MemoryContextConfig(size=32))
    c, _ = m.get_or_create_context("c", MemoryContextConfig(size=0, parent="p"))
    m.return_context(c)
    infos = {i.name: i for i in m.contexts()}
    assert set(infos) == {"p", "c"}
    assert infos["c"].parent == "p" and infos["c"].size == 0 and infos["c"].refcount == 0
    assert infos["p"].refcount == 1 and infos["p"].holders == {os.getpid(): 1}
    assert infos["p"].incarnation != infos["c"].incarnation
    for i in infos.values():
        assert before - 1 <= i.created <= time.time() + 1
        assert i.created - 1 <= i.last_used <= time.time() + 1
        assert i.idle >= 0
    m.return_context(p)


def test_return_stamps_last_used(m):
    ctx, _ = m.get_or_create_context("stamp")
    first = _info(m, "stamp").last_used
    deadline = time.monotonic() + 5
    while time.time() <= first + 0.01 and time.monotonic() < deadline:
        pass  # let the clock move past the creation stamp
    m.return_context(ctx)
    assert _info(m, "stamp").last_used > first + 0.005


# --- return_context ------------------------------------------------------------------

def test_return_twice_is_a_context_error_and_changes_nothing(m):
    a, _ = m.get_or_create_context("twice")
    b = m.get_context("twice")
    m.return_context(a)
    with pytest.raises(ContextError) as e:
        m.return_context(a)
    assert not isinstance(e.value, ContextClosedError)  # the context is alive: not "closed"
    assert "twice" in str(e.value)
    info = _info(m, "twice")
    assert info.refcount == 1 and info.holders == {os.getpid(): 1}
    m.return_context(b)
    assert m.check() == []


def test_return_after_force_close_is_context_closed(m):
    ctx, _ = m.get_or_create_context("gone")
    m.close_context("gone", force=True)
    with pytest.raises(ContextClosedError, match="gone"):
        m.return_context(ctx)
    assert _info(m, "gone") is None


def test_return_after_recreate_is_context_closed_and_spares_new_incarnation(m):
    old, _ = m.get_or_create_context("phoenix", MemoryContextConfig(size=16))
    m.close_context("phoenix", force=True)
    new, existed = m.get_or_create_context("phoenix", MemoryContextConfig(size=16))
    assert not existed and new.incarnation != old.incarnation
    with pytest.raises(ContextClosedError):
        m.return_context(old)
    info = _info(m, "phoenix")
    assert info.refcount == 1 and info.holders == {os.getpid(): 1}
    assert m.validate_context(new) and not m.validate_context(old)
    m.return_context(new)
    assert m.check() == []


@pytest.mark.parametrize("thing", [None, "name", 42, object(), b"ctx"])
def test_return_non_handle_is_type_error(m, thing):
    with pytest.raises(TypeError):
        m.return_context(thing)


def test_return_through_another_manager_is_refused(managers):
    m1, m2 = managers(), managers()
    ctx, _ = m1.get_or_create_context("mine")
    with pytest.raises(ContextError):
        m2.return_context(ctx)
    assert _info(m1, "mine").refcount == 1
    m1.return_context(ctx)


# --- close_context -------------------------------------------------------------------

def test_close_context_in_use_then_free(m):
    ctx, _ = m.get_or_create_context("busy", MemoryContextConfig(size=8))
    with pytest.raises(ContextInUseError) as e:
        m.close_context("busy")
    assert "busy" in str(e.value)
    assert m.validate_context(ctx) and _info(m, "busy").refcount == 1
    m.return_context(ctx)
    m.close_context("busy")
    assert _info(m, "busy") is None
    with pytest.raises(ContextNotFoundError):
        m.get_context("busy")
    with pytest.raises(ContextNotFoundError, match="busy"):
        m.close_context("busy")


def test_force_close_invalidates_every_handle(managers):
    m1, m2 = managers(), managers()
    a, _ = m1.get_or_create_context("forced", MemoryContextConfig(size=64))
    b = m1.get_context("forced")
    c = m2.get_context("forced")
    view = a.buf  # taken before the close
    m1.close_context("forced", force=True)
    for mgr, h in ((m1, a), (m1, b), (m2, c)):
        assert mgr.validate_context(h) is False
        with pytest.raises(ContextClosedError):
            _ = h.buf
        with pytest.raises(ContextClosedError):
            _ = h.lock
        with pytest.raises(ContextClosedError):
            h.put(1)
        with pytest.raises(ContextClosedError):
            mgr.return_context(h)
    del view
    assert m1.contexts() == [] and m1.check() == []


def test_children_close_with_their_parent(m):
    p, _ = m.get_or_create_context("p", MemoryContextConfig(size=8))
    c, _ = m.get_or_create_context("p/c", MemoryContextConfig(size=8, parent="p"))
    g, _ = m.get_or_create_context("p/c/g", MemoryContextConfig(parent="p/c"))
    other, _ = m.get_or_create_context("other")
    for h in (p, c, g, other):
        m.return_context(h)
    m.close_context("p")
    assert [i.name for i in m.contexts()] == ["other"]
    assert m.check() == []


def test_closing_parent_with_referenced_child(m):
    p, _ = m.get_or_create_context("p")
    c, _ = m.get_or_create_context("c", MemoryContextConfig(parent="p"))
    m.return_context(p)
    with pytest.raises(ContextInUseError):
        m.close_context("p")
    assert {i.name for i in m.contexts()} == {"p", "c"}
    m.close_context("p", force=True)
    assert m.contexts() == []
    assert not m.validate_context(c)
    with pytest.raises(ContextClosedError):
        m.return_context(c)


def test_child_of_missing_parent(m):
    with pytest.raises(ContextNotFoundError, match="ghost"):
        m.get_or_create_context("kid", MemoryContextConfig(parent="ghost"))
    assert m.contexts() == []


# --- validate_context and handles ----------------------------------------------------

def test_validate_context_lifecycle(m):
    ctx, _ = m.get_or_create_context("v")
    assert m.validate_context(ctx) is True
    m.return_context(ctx)
    assert m.validate_context(ctx) is False
    with pytest.raises(ContextClosedError):
        _ = ctx.buf
    again = m.get_context("v")
    assert m.validate_context(again) is True and m.validate_context(ctx) is False
    m.return_context(again)


def test_handle_equality_and_hash(m):
    a, _ = m.get_or_create_context("eq")
    b = m.get_context("eq")
    other, _ = m.get_or_create_context("ne")
    assert a == b and hash(a) == hash(b) and a is not b
    assert len({a, b}) == 1
    assert a != other
    m.return_context(a)
    assert _info(m, "eq").refcount == 1  # equal handles are still separate references
    m.return_context(b)
    m.return_context(other)
    m.close_context("eq")
    c, _ = m.get_or_create_context("eq")
    assert c != a
    m.return_context(c)


# --- limits --------------------------------------------------------------------------

def test_max_references(managers):
    m = managers(ContextConfig(max_references=2, lock_timeout=0.2, cleanup_interval=0))
    a, _ = m.get_or_create_context("lim")
    b = m.get_context("lim")
    with pytest.raises(MaxReferencesReachedError, match="lim"):
        m.get_context("lim")
    with pytest.raises(MaxReferencesReachedError):
        m.get_or_create_context("lim")
    assert _info(m, "lim").refcount == 2
    m.return_context(a)
    c = m.get_context("lim")
    m.return_context(b)
    m.return_context(c)
    assert m.check() == []


def test_max_references_zero_is_unlimited(managers):
    m = managers(ContextConfig(max_references=0, lock_timeout=0.2, cleanup_interval=0))
    handles = [m.get_or_create_context("many")[0] for _ in range(50)]
    assert _info(m, "many").refcount == 50
    for h in handles:
        m.return_context(h)


def test_table_full_evicts_least_recently_used(managers):
    m = managers(ContextConfig(capacity=2, lock_timeout=0.2, cleanup_interval=0))
    a, _ = m.get_or_create_context("a", MemoryContextConfig(size=16))
    b, _ = m.get_or_create_context("b", MemoryContextConfig(size=16))
    m.return_context(a)
    m.return_context(b)  # a is now the least recently used
    c, existed = m.get_or_create_context("c")
    assert not existed
    assert {i.name for i in m.contexts()} == {"b", "c"}
    # b unreferenced, c referenced: the next newcomer can only take b's place.
    d, _ = m.get_or_create_context("d")
    assert {i.name for i in m.contexts()} == {"c", "d"}
    with pytest.raises(TableFullError) as e:
        m.get_or_create_context("e")
    assert m.namespace in str(e.value)
    assert {i.name for i in m.contexts()} == {"c", "d"}
    assert m.validate_context(c) and m.validate_context(d)
    m.return_context(c)
    m.return_context(d)
    assert m.check() == []


# --- configuration -------------------------------------------------------------------

def test_default_constants():
    assert (DEFAULT_MAX_REFERENCES, DEFAULT_MAX_IDLE_TIME, DEFAULT_CLEANUP_INTERVAL) == \
        (10, 300.0, 60.0)
    cfg = ContextConfig()
    assert (cfg.max_references, cfg.max_idle_time, cfg.cleanup_interval, cfg.capacity) == \
        (10, 300.0, 60.0, 1024)


def test_config_none_adopts_and_mismatch_lists_fields(managers):
    first = managers(ContextConfig(max_references=3, capacity=8, lock_timeout=0.3,
                                   cleanup_interval=0))
    adopted = managers(None)
    assert adopted.config == first.config
    same = managers(ContextConfig(max_references=3, capacity=8, lock_timeout=0.3,
                                  cleanup_interval=0))
    assert same.config == first.config
    with pytest.raises(InvalidConfigError) as e:
        managers(ContextConfig(max_references=4, capacity=16, lock_timeout=0.3,
                               cleanup_interval=0))
    msg = str(e.value)
    assert "max_references" in msg and "capacity" in msg and first.namespace in msg
    assert "lock_timeout" not in msg and "cleanup_interval" not in msg


def test_memory_config_mismatch(managers):
    m1, m2 = managers(), managers()
    p, _ = m1.get_or_create_context("p")
    q, _ = m1.get_or_create_context("q")
    ctx, _ = m1.get_or_create_context("x", MemoryContextConfig(size=32, parent="p"))
    for mgr in (m1, m2):  # m1 has "x" mapped (fast path), m2 has not
        with pytest.raises(InvalidConfigError, match="size"):
            mgr.get_or_create_context("x", MemoryContextConfig(size=64, parent="p"))
        with pytest.raises(InvalidConfigError, match="parent"):
            mgr.get_or_create_context("x", MemoryContextConfig(size=32, parent="q"))
        same, existed = mgr.get_or_create_context("x", MemoryContextConfig(size=32, parent="p"))
        assert existed
        mgr.return_context(same)
        adopted, existed = mgr.get_or_create_context("x")
        assert existed
        mgr.return_context(adopted)
    assert _info(m1, "x").refcount == 1
    for h in (p, q, ctx):
        m1.return_context(h)


@pytest.mark.parametrize("path", ["fast", "cold"])
def test_memory_config_parent_none_differs_from_existing_parent(managers, path):
    """Requesting ``parent=None`` for a context that has a parent is a parent mismatch,
    whether or not this manager has the context mapped already."""
    m1 = managers()
    p, _ = m1.get_or_create_context("p")
    ctx, _ = m1.get_or_create_context("x", MemoryContextConfig(size=32, parent="p"))
    mgr = m1 if path == "fast" else managers()
    with pytest.raises(InvalidConfigError, match="parent"):
        h, _ = mgr.get_or_create_context("x", MemoryContextConfig(size=32))
        mgr.return_context(h)
    m1.return_context(ctx)
    m1.return_context(p)


# --- init ----------------------------------------------------------------------------

def test_init_runs_once_in_creator(m):
    calls = []

    def init(ctx):
        calls.append(ctx)
        ctx.buf[:4] = b"init"

    a, existed = m.get_or_create_context("i", MemoryContextConfig(size=8), init=init)
    b, existed2 = m.get_or_create_context("i", MemoryContextConfig(size=8), init=init)
    assert (existed, existed2) == (False, True)
    assert len(calls) == 1 and calls[0] == a
    assert bytes(b.buf[:4]) == b"init"
    m.return_context(a)
    m.return_context(b)
    assert _info(m, "i").refcount == 0


def test_init_that_raises_removes_the_context(m, ns):
    class Boom(Exception):
        pass

    def init(ctx):
        ctx.buf[:4] = b"half"
        raise Boom("init failed")

    with pytest.raises(Boom):
        m.get_or_create_context("bad", MemoryContextConfig(size=4096), init=init)
    assert _info(m, "bad") is None
    with pytest.raises(ContextNotFoundError):
        m.get_context("bad")
    # The failed incarnation's segment is gone: only the table and its locks remain.
    assert not [e for e in _shm.namespace_objects(ns) if _shm.parse_object(ns, e)
                and _shm.parse_object(ns, e)[1] == "c"]
    ctx, existed = m.get_or_create_context("bad", MemoryContextConfig(size=4096))
    assert not existed and bytes(ctx.buf[:4]) == b"\0\0\0\0"
    m.return_context(ctx)
    assert m.check() == []


# --- sweep ---------------------------------------------------------------------------

def _wait_idle(m: ContextManager, name: str, seconds: float) -> None:
    deadline = time.monotonic() + 10
    while _info(m, name).idle <= seconds:
        assert time.monotonic() < deadline, f"{name} never became idle"


def test_sweep_closes_idle_unreferenced_only(managers):
    m = managers(ContextConfig(max_idle_time=0.1, cleanup_interval=0, lock_timeout=0.2))
    idle, _ = m.get_or_create_context("idle", MemoryContextConfig(size=16))
    held, _ = m.get_or_create_context("held", MemoryContextConfig(size=16))
    m.return_context(idle)
    _wait_idle(m, "idle", 0.15)
    _wait_idle(m, "held", 0.15)  # idle since creation, but referenced
    report = m.sweep()
    assert report.closed == ["idle"]
    assert {i.name for i in m.contexts()} == {"held"}
    assert m.validate_context(held) and len(held.buf) == 16
    m.return_context(held)
    assert m.sweep().closed == []  # just returned: not idle long enough yet
    _wait_idle(m, "held", 0.15)
    assert m.sweep().closed == ["held"]
    assert m.contexts() == [] and m.check() == []


def test_sweep_with_zero_idle_time_never_closes(managers):
    m = managers(ContextConfig(max_idle_time=0, cleanup_interval=0, lock_timeout=0.2))
    ctx, _ = m.get_or_create_context("forever")
    m.return_context(ctx)
    _wait_idle(m, "forever", 0.05)
    assert m.sweep().closed == []
    assert [i.name for i in m.contexts()] == ["forever"]


# --- put / get -----------------------------------------------------------------------

@pytest.mark.parametrize("value", [
    None, 0, -7, 2**40, 1.5, "text", "日本語", b"\x00\xffbytes", [1, [2, 3]],
    {"a": 1, "b": [True, False], "c": {"d": None}}, {1: "int key"},
])
def test_put_get_round_trip(managers, value):
    m1, m2 = managers(), managers()
    a, _ = m1.get_or_create_context("val", MemoryContextConfig(size=256))
    assert a.get() is None and a.get("dflt") == "dflt"
    a.put(value)
    b = m2.get_context("val")
    assert b.get() == value and a.get() == value
    m1.return_context(a)
    m2.return_context(b)


def test_put_too_large_writes_nothing(m):
    ctx, _ = m.get_or_create_context("small", MemoryContextConfig(size=64))
    ctx.put({"k": "v"})
    before = bytes(ctx.buf)
    with pytest.raises(ValueError, match="small"):
        ctx.put("x" * 100)
    assert bytes(ctx.buf) == before
    assert ctx.get() == {"k": "v"}
    empty, _ = m.get_or_create_context("empty")
    with pytest.raises(ValueError):
        empty.put(1)
    assert empty.get("none") == "none"
    m.return_context(ctx)
    m.return_context(empty)


def test_get_ignores_foreign_bytes(m):
    ctx, _ = m.get_or_create_context("raw", MemoryContextConfig(size=64))
    ctx.buf[:] = b"\xab" * 64
    assert ctx.get("default") == "default"
    m.return_context(ctx)


# --- the with-block ------------------------------------------------------------------

def test_context_block_returns_reference(m):
    with m.context("blk", MemoryContextConfig(size=16)) as ctx:
        assert isinstance(ctx, MemoryContext)
        assert _info(m, "blk").refcount == 1
        ctx.put("in")
    assert _info(m, "blk").refcount == 0
    assert not m.validate_context(ctx)


def test_context_block_returns_reference_on_exception(m):
    with pytest.raises(KeyError), m.context("blk2") as ctx:
        assert _info(m, "blk2").refcount == 1
        raise KeyError("inside")
    assert _info(m, "blk2").refcount == 0
    assert not m.validate_context(ctx)


# --- the manager's own life ----------------------------------------------------------

def test_close_returns_references_and_spares_others(managers):
    m1, m2 = managers(), managers()
    held = [m1.get_or_create_context("x")[0], m1.get_context("x")]  # kept: references
    b = m2.get_context("x")
    m1.close()
    info = _info(m2, "x")
    assert info.refcount == 1 and m2.validate_context(b) and len(held) == 2
    m2.return_context(b)


def test_close_twice(m):
    m.close()
    with pytest.raises(ContextManagerClosedError, match=m.namespace):
        m.close()


def test_concurrent_close_exactly_one_succeeds(m):
    n = 8
    barrier = threading.Barrier(n)
    results: list[str] = []
    lock = threading.Lock()

    def closer():
        barrier.wait()
        try:
            m.close()
            outcome = "ok"
        except ContextManagerClosedError:
            outcome = "closed"
        except Exception as e:  # anything else is a failure, reported below
            outcome = repr(e)
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=closer) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(results) == ["closed"] * (n - 1) + ["ok"]


def _calls_after_close(handle: MemoryContext):
    return {
        "get_or_create_context": lambda m: m.get_or_create_context("x"),
        "get_context": lambda m: m.get_context("x"),
        "context": lambda m: m.context("x").__enter__(),
        "return_context": lambda m: m.return_context(handle),
        "close_context": lambda m: m.close_context("x"),
        "contexts": lambda m: m.contexts(),
        "sweep": lambda m: m.sweep(),
        "check": lambda m: m.check(),
        "reclaim": lambda m: m.reclaim(2**22 + 1),
        "unlink": lambda m: m.unlink(),
        "close": lambda m: m.close(),
    }


def test_every_call_after_close_raises(managers):
    keeper = managers()  # keeps the context alive for the closed manager's handle
    _kept, _ = keeper.get_or_create_context("x")
    m = managers()
    handle = m.get_context("x")
    m.close()
    for what, call in _calls_after_close(handle).items():
        with pytest.raises(ContextManagerClosedError):
            call(m)
            pytest.fail(f"{what} did not raise")
    with pytest.raises(ContextClosedError):
        _ = handle.buf
    assert _info(keeper, "x").refcount == 1


def test_validate_context_after_close_raises(managers):
    """After ``close()``, every other call raises ``ContextManagerClosedError``,
    ``validate_context`` included."""
    m = managers()
    ctx, _ = m.get_or_create_context("x")
    m.close()
    with pytest.raises(ContextManagerClosedError):
        m.validate_context(ctx)


def test_with_manager_closes_on_exit(ns):
    with ContextManager(CFG, namespace=ns, sweeper=False) as m:
        _w, _ = m.get_or_create_context("w")  # a reference m still holds at close()
        with ContextManager(namespace=ns, sweeper=False) as other:
            assert _info(other, "w").refcount == 1
            m.close()  # an explicit close inside the block is fine
            assert _info(other, "w").refcount == 0
            other.unlink()
    with pytest.raises(ContextManagerClosedError):
        m.contexts()
    with pytest.raises(ContextManagerClosedError):
        other.contexts()


def test_with_manager_closes_on_exception(ns):
    with pytest.raises(RuntimeError), ContextManager(CFG, namespace=ns, sweeper=False) as m:
        _w, _ = m.get_or_create_context("w")  # a reference m still holds at close()
        raise RuntimeError("inside")
    with pytest.raises(ContextManagerClosedError):
        m.get_context("w")
    with ContextManager(namespace=ns, sweeper=False) as cleaner:
        assert _info(cleaner, "w").refcount == 0
        cleaner.unlink()


def test_unlink_removes_everything(managers, ns):
    m, other = managers(), managers()
    a, _ = m.get_or_create_context("a", MemoryContextConfig(size=4096))
    with a.lock:
        a.buf[:6] = b"locked"
    _b, _ = m.get_or_create_context("b", MemoryContextConfig(size=128, parent="a"))
    c = other.get_context("a")
    other.return_context(c)  # mapped by a second manager, but not referenced
    assert _shm.namespace_objects(ns)
    m.unlink()
    assert _shm.namespace_objects(ns) == []
    with pytest.raises(ContextManagerClosedError):
        m.contexts()
    with pytest.raises(ContextManagerClosedError):
        other.get_context("a")  # another manager of the same (now gone) namespace
    with pytest.raises(ContextClosedError):
        _ = a.buf


def test_unlink_is_not_blocked_by_this_process(managers, ns):
    """``unlink`` raises ``ContextInUseError`` "while another live process holds
    references" (its docstring); a second manager of this same process is not another
    process."""
    m, other = managers(), managers()
    _a, _ = m.get_or_create_context("a", MemoryContextConfig(size=64))
    c = other.get_context("a")
    m.unlink()
    assert _shm.namespace_objects(ns) == []
    assert not other.validate_context(c)
    with pytest.raises(ContextClosedError):
        _ = c.buf


def test_threads_mapping_one_context_at_once_share_one_mapping(managers, monkeypatch):
    """Two threads of one process take the same context for the first time at once: the
    mapping step is held open until both are inside it (or, when they are correctly
    serialised, until the second cannot get in). Both handles must stay usable and the
    process must end with one mapping."""
    owner = managers()
    _kept, _ = owner.get_or_create_context("c", MemoryContextConfig(size=4096))
    m = managers()
    both_inside = threading.Barrier(2)
    real_attach = _shm.attach_segment

    def attach_with_the_window_open(name, **kw):
        try:
            both_inside.wait(timeout=0.5)  # only a second thread in the window releases it
        except threading.BrokenBarrierError:
            pass
        return real_attach(name, **kw)

    monkeypatch.setattr(_shm, "attach_segment", attach_with_the_window_open)
    errors: list[BaseException] = []
    handles = []

    def use() -> None:
        ctx = m.get_context("c")
        handles.append(ctx)
        try:
            ctx.buf[0] = 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=use) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert handles[0]._mapped is handles[1]._mapped
    for ctx in handles:
        m.return_context(ctx)


class _Refused:
    """Stands in for a path a test must not take: any use of it fails the test."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"{self.what} was used ({name})")


def test_one_process_holds_references_to_every_context_of_the_table(managers, hot_path):
    """No per-process limit: one process holds references to all ``capacity`` contexts
    at once (its count for each slot has a place of its own in its row), takes a second
    reference to each on the hot path alone (on the C leg without deferring to Python
    once, up to the last slot), gives them all back, and the table stays sound."""
    cap = 300
    m = managers(ContextConfig(lock_timeout=0.2, cleanup_interval=0, capacity=cap,
                               max_processes=8))
    assert hot_path_of(m) == hot_path
    names = [f"c{i}" for i in range(cap)]
    first = [m.get_or_create_context(n)[0] for n in names]
    assert {h._mapped.slot for h in first} == set(range(cap))  # every slot, the last too
    infos = m.contexts()
    assert len(infos) == cap and all(i.holders == {os.getpid(): 1} for i in infos)
    assert m.check() == []
    cold, py = m._cold, m._py
    m._cold = _Refused("the cold path")
    if hot_path == "C":
        m._py = _Refused("the Python hot path")
    try:
        second = [m.get_context(n) for n in names]
        assert all(i.holders == {os.getpid(): 2} and i.refcount == 2 for i in m.contexts())
        assert m.check() == []
        for h in first + second:
            m.return_context(h)
    finally:
        m._cold, m._py = cold, py
    infos = m.contexts()
    assert len(infos) == cap and all(i.holders == {} and i.refcount == 0 for i in infos)
    assert m.check() == []


def test_sweep_skips_a_context_referenced_after_it_was_planned(managers, monkeypatch):
    """The sweep plans from an unlocked read; a worker that takes a reference before the
    close must keep its context (the check is repeated under the stripe lock)."""
    m = managers(ContextConfig(lock_timeout=0.2, cleanup_interval=0, max_idle_time=0.001))
    worker = managers(None)  # adopts the table's config
    ctx, _ = worker.get_or_create_context("x")
    worker.return_context(ctx)  # mapped in the worker: its next get is the hot path
    idle_since = time.monotonic()
    while time.monotonic() - idle_since < 0.01:  # let it become idle for real
        time.sleep(0.002)
    taken = []
    real_subtree = m._slots.subtree

    def subtree_while_a_worker_gets(slot):
        taken.append(worker.get_context("x"))  # lands between the plan and the close
        return real_subtree(slot)

    monkeypatch.setattr(m._slots, "subtree", subtree_while_a_worker_gets)
    report = m.sweep()
    assert report.closed == [] and report.skipped_in_use == ["x"]
    assert worker.validate_context(taken[0])
    worker.return_context(taken[0])


def test_create_false_only_attaches(new_ns):
    """A process that works on a namespace another one makes (a publisher beside a
    server) asks not to create it: a missing (mistyped) namespace is then an error that
    names it, and nothing is made in /dev/shm; an existing one is attached as usual."""
    from shmctx import _shm

    ns = new_ns()
    with pytest.raises(ContextNotFoundError, match=re.escape(repr(ns))):
        ContextManager(namespace=ns, create=False)
    assert _shm.namespace_objects(ns) == []
    owner = ContextManager(namespace=ns)
    try:
        ctx, _ = owner.get_or_create_context("x", MemoryContextConfig(size=8))
        with ContextManager(namespace=ns, create=False) as m:
            assert [c.name for c in m.contexts()] == ["x"]
        owner.return_context(ctx)
    finally:
        owner.unlink()
    with pytest.raises(InvalidConfigError, match="create"):
        ContextManager(namespace=ns, create="yes")
