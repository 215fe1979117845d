"""Shared fixtures: every test gets its own namespace, and must leave nothing behind."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import uuid

import pytest
from helpers import hot_path_of

import shmctx
from shmctx import ContextManager, _hotpath, _shm

# Set by the CI step that installs shmctx from its sdist with no C compiler: the run then
# tests the pure-Python hot path a host without a compiler gets. It must really have no
# C module (else that step proves nothing), and the tests of the C hot path itself, which
# the wheel's run covers, cannot run.
NO_COMPILER = os.environ.get("SHMCTX_TEST_NO_COMPILER") == "1"
# Modules that test the C hot path, or compare it with the Python one, as a whole.
_C_ONLY_MODULES = {"test_speedups.py", "test_differential.py", "test_differential_found.py"}


def pytest_report_header(config: pytest.Config) -> str:
    hot = "C and Python" if _hotpath._speedups is not None else "Python only (no C module)"
    return f"shmctx {shmctx.__version__} from {os.path.dirname(shmctx.__file__)}; hot path: {hot}"


def pytest_sessionstart(session: pytest.Session) -> None:
    if NO_COMPILER and _hotpath._speedups is not None:
        raise pytest.UsageError(
            "SHMCTX_TEST_NO_COMPILER=1 but this shmctx has its C module "
            f"({_hotpath._speedups.__file__}): it was not installed without a compiler")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not NO_COMPILER:
        return
    skip = pytest.mark.skip(reason="tests the C hot path; this install has none "
                                   "(SHMCTX_TEST_NO_COMPILER=1, the no-compiler run)")
    for item in items:
        callspec = getattr(item, "callspec", None)
        if item.path.name in _C_ONLY_MODULES or item.get_closest_marker("needs_c") or \
                (callspec is not None and callspec.params.get("hot_path") == "C"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _shmctx_logging_restored():
    """Tests that attach a server integration in-process route shmctx's logs into the
    server's logger (``route_logs``), which changes the ``shmctx`` logger for the whole
    process: put it back after each test, so no later test in the same worker process
    sees another test's routing."""
    lg = logging.getLogger("shmctx")
    saved = (list(lg.handlers), lg.level, lg.propagate)
    yield
    lg.handlers[:] = saved[0]
    lg.setLevel(saved[1])
    lg.propagate = saved[2]


@pytest.fixture
def new_ns():
    """A factory of namespaces unique to this test. The test fails if anything of them is
    left in /dev/shm afterwards (the leftovers are then removed, so one leak does not
    cascade)."""
    made: list[str] = []

    def make() -> str:
        made.append(f"t{uuid.uuid4().hex[:12]}")
        return made[-1]

    yield make
    leaked = {n: left for n in made if (left := _shm.namespace_objects(n))}
    for n in leaked:
        _shm.remove_namespace_objects(n)
    if leaked:
        pytest.fail(f"test left objects in /dev/shm: {leaked}")


@pytest.fixture
def ns(new_ns) -> str:
    """One namespace unique to this test, checked for leftovers like ``new_ns``."""
    return new_ns()


_MODULE_CFG = object()


@pytest.fixture
def managers(ns: str, request: pytest.FixtureRequest):
    """Factory of managers on ``ns`` (or ``namespace=``), configured by default with the
    test module's ``CFG`` and without a sweeper. Teardown closes every one and unlinks
    their namespaces, so nothing is left in /dev/shm."""
    default = getattr(request.module, "CFG", None)
    claimed = request.getfixturevalue("hot_path") if "hot_path" in request.fixturenames \
        else None
    made: list[ContextManager] = []

    def make(config=_MODULE_CFG, *, namespace=None, sweeper=False, **kw) -> ContextManager:
        m = ContextManager(default if config is _MODULE_CFG else config,
                           namespace=namespace or ns, sweeper=sweeper, **kw)
        made.append(m)
        if claimed is not None:  # the leg runs the hot path it is named after
            assert hot_path_of(m) == claimed, f"{m!r} runs the {hot_path_of(m)} hot path"
        return m

    yield make
    for m in made:
        if not m._closed:
            m.close()
    for n in {m.namespace for m in made}:
        if _shm.namespace_objects(n):
            ContextManager(namespace=n, sweeper=False).unlink(force=True)


@pytest.fixture(params=["C", "py"])
def hot_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test once on each hot path, ``[C]`` (``_speedups.c``) and ``[py]`` (the
    Python one, all a host without a C compiler has), and returns the one of this leg as
    ``helpers.hot_path_of`` names it. A module opts in with
    ``pytestmark = pytest.mark.usefixtures("hot_path")``, which sets this up before any
    fixture of its own makes a manager.

    A manager chooses its hot path when it is made, from ``SHMCTX_PURE_PYTHON``. Child
    processes inherit the environment, so managers made in fork and spawn children and
    in subprocesses follow the leg. A forkserver's children do not: they inherit the
    environment the server started with, once per test process."""
    if request.param == "py":
        monkeypatch.setenv("SHMCTX_PURE_PYTHON", "1")
        return "Python"
    monkeypatch.delenv("SHMCTX_PURE_PYTHON", raising=False)
    return "C"


@pytest.fixture(params=["fork", "spawn"])
def mp_ctx(request: pytest.FixtureRequest):
    """A multiprocessing context for each start method the suite must work under."""
    return mp.get_context(request.param)

