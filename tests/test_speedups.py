"""The C hot path (``_speedups.c``) against the Python one it stands in front of.

The C path either completes a get or a return exactly as the Python methods do, or
defers to them. Shown here: that it is built and serves the hot path, that a scripted
run of every hot-path case (and its errors) leaves the table and the caller in the same
state with it and without it, that threads and forked children stay correct, and that
the core test files pass with the pure-Python hot path alone (``SHMCTX_PURE_PYTHON=1``,
what a machine without a C compiler runs). The rest of the suite runs the C path.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from shmctx import (
    ContextConfig,
    ContextManager,
    ContextManagerClosedError,
    MemoryContextConfig,
    _manager,
)

CFG = ContextConfig(lock_timeout=0.2, cleanup_interval=0, capacity=32, max_processes=8,
                    max_references=3)


def test_the_c_hot_path_is_built_and_serves_gets_and_returns(managers, monkeypatch):
    assert _manager._speedups is not None, (
        "the C hot path was not built (no C compiler at install?); shmctx works without "
        "it, but this suite expects it: set SHMCTX_PURE_PYTHON=1 to test without it")
    m = managers()
    with m.context("a"):
        pass

    def python_path_used(*a: object) -> None:
        raise AssertionError("the Python hot path ran")

    monkeypatch.setattr(m, "_get_fast", python_path_used)
    monkeypatch.setattr(m, "_count", python_path_used)
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
    python_get_fast = m._get_fast
    monkeypatch.setattr(m, "_get_fast", lambda name: seen.append(name) or python_get_fast(name))
    with m.context("a"):
        pass
    assert seen == ["a"]
    with m.context("a"):
        pass
    assert seen == ["a"]  # mapped again: the C path serves it


def _script(m: ContextManager, other: ContextManager) -> list[object]:
    """Every hot-path case, in order; returns what each step gave and the table after it."""
    out: list[object] = []

    def step(what: str, fn) -> object:
        try:
            r = fn()
            out.append((what, "ok"))
        except Exception as e:  # the outcome is what is compared
            r = None
            out.append((what, type(e).__name__, str(e).replace(m.namespace, "NS")))
        out.append(_state(m))
        return r

    h0 = step("create", lambda: m.get_or_create_context("a", MemoryContextConfig(size=64))[0])
    step("return created", lambda: m.return_context(h0))
    h1 = step("get 1", lambda: m.get_or_create_context("a")[0])
    h2 = step("get 2", lambda: m.get_context("a"))
    h3 = step("get 3", lambda: m.get_or_create_context("a", MemoryContextConfig(size=64))[0])
    step("get 4: at the limit", lambda: m.get_or_create_context("a"))
    before = m.contexts()[0].last_used
    step("return 1", lambda: m.return_context(h1))
    out.append(("stamped", m.contexts()[0].last_used > before))
    step("return 1 again", lambda: m.return_context(h1))
    step("buf of 2", lambda: bytes(h2.buf[:4]))
    step("return 2 (with a view)", lambda: m.return_context(h2))
    out.append(("view released", h2._view is None))
    step("buf after return", lambda: h2.buf)
    step("return to another manager", lambda: other.return_context(h3))
    step("return a non-handle", lambda: m.return_context("a"))  # type: ignore[arg-type]
    step("return 3", lambda: m.return_context(h3))
    hb = step("create b", lambda: m.get_or_create_context("b")[0])
    step("force close b", lambda: m.close_context("b", force=True))
    step("return a force-closed handle", lambda: m.return_context(hb))
    hb2 = step("re-create b", lambda: m.get_or_create_context("b")[0])
    step("get b again", lambda: m.return_context(m.get_context("b")))
    step("return b", lambda: m.return_context(hb2))
    step("get a name never seen", lambda: m.get_context("nope"))
    step("get a non-str", lambda: m.get_context(5))  # type: ignore[arg-type]
    h4 = step("get a, then close the manager", lambda: m.get_context("a"))
    m.close()
    step("get after close", lambda: m.get_or_create_context("a"))
    step("get_context after close", lambda: m.get_context("a"))
    step("return after close", lambda: m.return_context(h4))
    return out


def _state(m: ContextManager) -> object:
    if m._closed:
        return "closed"
    me = os.getpid()
    contexts = sorted(
        (i.name, i.state, i.refcount,
         sorted(("me" if pid == me else "other", n) for pid, n in i.holders.items()))
        for i in m.contexts()
    )
    return [contexts, m.check()]


def test_c_and_python_hot_paths_leave_the_same_state(managers, new_ns, monkeypatch):
    with_c = _script(managers(namespace=(ns_c := new_ns())), managers(namespace=ns_c))
    monkeypatch.setattr(_manager, "_speedups", None)
    pure = managers(namespace=(ns_py := new_ns()))
    assert pure._hot is None
    without_c = _script(pure, managers(namespace=ns_py))
    assert with_c == without_c
    # Equal, and right: the script is not vacuous.
    outcome = {step[0]: step[1] for step in with_c if isinstance(step, tuple)}
    assert outcome == {
        "create": "ok", "return created": "ok", "get 1": "ok", "get 2": "ok", "get 3": "ok",
        "get 4: at the limit": "MaxReferencesReachedError", "return 1": "ok",
        "stamped": True, "return 1 again": "ContextError", "buf of 2": "ok",
        "return 2 (with a view)": "ok", "view released": True,
        "buf after return": "ContextClosedError", "return to another manager": "ContextError",
        "return a non-handle": "TypeError", "return 3": "ok", "create b": "ok",
        "force close b": "ok", "return a force-closed handle": "ContextClosedError",
        "re-create b": "ok", "get b again": "ok", "return b": "ok",
        "get a name never seen": "ContextNotFoundError",
        "get a non-str": "InvalidContextTypeError", "get a, then close the manager": "ok",
        "get after close": "ContextManagerClosedError",
        "get_context after close": "ContextManagerClosedError",
        "return after close": "ContextManagerClosedError",
    }


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


def test_the_core_tests_pass_on_the_pure_python_hot_path():
    here = Path(__file__).parent
    env = dict(os.environ, SHMCTX_PURE_PYTHON="1")
    for var in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_ADDOPTS"):
        env.pop(var, None)
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
         str(here / "test_api.py"), str(here / "test_multiprocess.py"),
         str(here / "test_crash.py"), str(here / "test_hardening.py")],
        env=env, cwd=here.parent, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout


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
            _manager._speedups.HotPath(
                None, bytearray(8192), ["/x"], [256], (0, 4, 8, 56, 256), (2, 0), 0, {},
                object, fields, [], None, None, None)
    gc.collect()
    assert [sys.getrefcount(f) for f in fields] == before


def test_a_namespace_unlinked_while_attaching_is_the_documented_error(managers, monkeypatch):
    """The C path opens the stripe semaphores anew by name; if the namespace goes in the
    moment between attaching the table and that, the manager reports it as the Python
    path does instead of a raw FileNotFoundError."""
    m = managers()
    install = ContextManager._install_hot_path

    def unlink_first(self: ContextManager) -> None:
        m.unlink(force=True)
        install(self)

    monkeypatch.setattr(ContextManager, "_install_hot_path", unlink_first)
    with pytest.raises(ContextManagerClosedError):
        ContextManager(namespace=m.namespace, sweeper=False)
