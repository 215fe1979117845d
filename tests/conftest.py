"""Shared fixtures: every test gets its own namespace, and must leave nothing behind."""

from __future__ import annotations

import multiprocessing as mp
import uuid

import pytest

from shmctx import ContextManager, _shm


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
    made: list[ContextManager] = []

    def make(config=_MODULE_CFG, *, namespace=None, sweeper=False, **kw) -> ContextManager:
        m = ContextManager(default if config is _MODULE_CFG else config,
                           namespace=namespace or ns, sweeper=sweeper, **kw)
        made.append(m)
        return m

    yield make
    for m in made:
        if not m._closed:
            m.close()
    for n in {m.namespace for m in made}:
        if _shm.namespace_objects(n):
            ContextManager(namespace=n, sweeper=False).unlink(force=True)


@pytest.fixture(params=["fork", "spawn"])
def mp_ctx(request: pytest.FixtureRequest):
    """A multiprocessing context for each start method the suite must work under."""
    return mp.get_context(request.param)

