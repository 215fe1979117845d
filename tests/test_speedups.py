"""The C hot path (``_speedups.c``) against the Python one it stands in front of.

The C path either completes a get or a return exactly as the Python methods do, or
defers to them. Shown here: that it is built and serves the hot path, that threads and
forked children stay correct on it, that a collection or an unlink at an awkward moment
is an error and not a crash, and that the ``hot_path`` fixture's legs reach child
processes. That both paths leave the table in the same bytes after any sequence of
operations is ``test_differential.py``; the core, multi-process, crash and hardening
tests run on both paths (``[C]`` and ``[py]``, the ``hot_path`` fixture in conftest).
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading

import pytest
from helpers import hot_path_of

from shmctx import (
    ContextConfig,
    ContextManager,
    ContextManagerClosedError,
    _hotpath,
)
from shmctx._entry import ProcessEntry
from shmctx._hotpath import PyHotPath

CFG = ContextConfig(lock_timeout=0.2, cleanup_interval=0, capacity=32, max_processes=8,
                    max_references=3)


def test_the_c_hot_path_is_built_and_serves_gets_and_returns(managers, monkeypatch):
    assert _hotpath._speedups is not None, (
        "the C hot path was not built (no C compiler at install?); shmctx works without "
        "it, but this suite expects it: set SHMCTX_PURE_PYTHON=1 to test without it")
    m = managers()
    with m.context("a"):
        pass

    def python_path_used(*a: object) -> None:
        raise AssertionError("the Python hot path ran")

    monkeypatch.setattr(PyHotPath, "try_get", python_path_used)
    monkeypatch.setattr(PyHotPath, "try_return", python_path_used)
    monkeypatch.setattr(ProcessEntry, "count", python_path_used)
    for _ in range(3):
        ctx, existed = m.get_or_create_context("a")
        assert existed
        m.return_context(ctx)
        m.return_context(m.get_context("a"))
    with m.context("a", init=print, timeout=None) as ctx:  # existing: init is not run
        assert m.contexts()[0].refcount == 1
    assert m.contexts()[0].refcount == 0
    monkeypatch.undo()
    # A stale mapping (closed since) is not the C path's business: it defers to Python.
    m.close_context("a")
    seen: list[str] = []
    python_try_get = PyHotPath.try_get
    monkeypatch.setattr(PyHotPath, "try_get",
                        lambda hot, name: seen.append(name) or python_try_get(hot, name))
    with m.context("a"):
        pass
    assert seen == ["a"]
    with m.context("a"):
        pass
    assert seen == ["a"]  # mapped again: the C path serves it


def _report_hot_path(namespace: str, q) -> None:  # type: ignore[no-untyped-def]
    m = ContextManager(namespace=namespace, sweeper=False)
    q.put(hot_path_of(m))
    m.close()


_REPORT_HOT_PATH = """
import sys
sys.path.insert(0, sys.argv[2])
from helpers import hot_path_of
from shmctx import ContextManager
m = ContextManager(namespace=sys.argv[1], sweeper=False)
print(hot_path_of(m))
m.close()
"""


@pytest.mark.parametrize("start", ["fork", "spawn", "subprocess"])
def test_each_hot_path_leg_reaches_child_processes(hot_path, managers, ns, start):
    """The ``[py]`` leg sets SHMCTX_PURE_PYTHON in this process; a manager made in a
    child reads it from the environment the child inherited."""
    managers()  # the namespace the children attach to (the fixture checks its path)
    if start == "subprocess":
        r = subprocess.run([sys.executable, "-c", _REPORT_HOT_PATH, ns, os.path.dirname(__file__)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]
        got = r.stdout.strip()
    else:
        import multiprocessing as mp

        ctx = mp.get_context(start)
        q = ctx.Queue()
        p = ctx.Process(target=_report_hot_path, args=(ns, q))
        p.start()
        got = q.get(timeout=60)
        p.join()
        assert p.exitcode == 0
    assert got == hot_path


def test_threads_on_the_c_hot_path(managers):
    m = managers()
    with m.context("a"):
        pass
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def hammer() -> None:
        try:
            start.wait()
            for _ in range(3000):
                ctx, _ = m.get_or_create_context("a")
                m.return_context(ctx)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert m.contexts()[0].refcount == 0
    assert m.check() == []


def _child_gets(conn) -> None:  # type: ignore[no-untyped-def]
    m = _FORKED[0]
    ctx = m.get_context("a")
    info = m.contexts()[0]
    conn.send((os.getpid(), dict(info.holders)))
    m.return_context(ctx)
    conn.send(dict(m.contexts()[0].holders))
    os._exit(0)


_FORKED: list[ContextManager] = []


def test_a_forked_child_counts_under_its_own_entry(managers):
    import multiprocessing as mp

    m = managers()
    held = m.get_or_create_context("a")[0]
    _FORKED[:] = [m]
    parent, child = mp.get_context("fork").Pipe()
    p = mp.get_context("fork").Process(target=_child_gets, args=(child,))
    p.start()
    pid, holders = parent.recv()
    assert holders == {os.getpid(): 1, pid: 1}
    assert parent.recv() == {os.getpid(): 1}
    p.join()
    assert p.exitcode == 0
    m.return_context(held)
    assert m.check() == []


_CLOSE_IN_COLLECTION = """
import gc, sys
from shmctx import ContextManager, ContextManagerClosedError
m = ContextManager(namespace=sys.argv[1], sweeper=False)
m.return_context(m.get_or_create_context("a")[0])
fired = []

def close_once(phase, info):
    if phase == "start" and not fired:
        fired.append(1)
        m.close()

gc.collect()
gc.callbacks.append(close_once)
gc.set_threshold(1)  # the handle the get makes is the allocation that starts a collection
try:
    m.get_context("a")
except ContextManagerClosedError:
    print("closed error")
"""


def test_a_collection_that_closes_the_manager_mid_get_is_an_error_not_a_crash(new_ns):
    """Making the handle may start a garbage collection, and a finalizer run by it may
    close the manager (freeing the semaphores and the table buffer the C path was about
    to use): the get must see that and report it, as the Python path does."""
    ns = new_ns()
    r = subprocess.run([sys.executable, "-c", _CLOSE_IN_COLLECTION, ns],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
    assert r.stdout.strip() == "closed error"
    ContextManager(namespace=ns, sweeper=False).unlink(force=True)


def test_a_failed_hot_path_construction_leaks_no_reference():
    class Field:  # a descriptor, as the slot descriptors of MemoryContext are
        def __get__(self, obj, owner=None): ...
        def __set__(self, obj, value): ...

    fields = tuple(Field() for _ in range(5))
    before = [sys.getrefcount(f) for f in fields]
    for _ in range(3):
        with pytest.raises(TypeError):  # failpoints must be a dict
            _hotpath._speedups.HotPath(
                None, bytearray(8192), ["/x"], 0, {}, object, fields, [], [])
    gc.collect()
    assert [sys.getrefcount(f) for f in fields] == before


def test_a_namespace_unlinked_while_attaching_is_the_documented_error(managers, monkeypatch):
    """The C path opens the stripe semaphores anew by name; if the namespace goes in the
    moment between attaching the table and that, the manager reports it as the Python
    path does instead of a raw FileNotFoundError."""
    m = managers()
    choose = _hotpath.choose

    def unlink_first(slots):  # type: ignore[no-untyped-def]
        m.unlink(force=True)
        return choose(slots)

    monkeypatch.setattr(_hotpath, "choose", unlink_first)
    with pytest.raises(ContextManagerClosedError):
        ContextManager(namespace=m.namespace, sweeper=False)
