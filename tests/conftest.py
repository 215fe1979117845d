"""Shared fixtures: every test gets its own namespace, and must leave nothing behind."""

from __future__ import annotations

import multiprocessing as mp
import uuid

import pytest

from shmctx import ContextManager, _shm


def _leftovers(ns: str) -> list[str]:
    return _shm.namespace_objects(ns)


def _cleanup(ns: str) -> None:
    for entry in _shm.namespace_objects(ns):
        _shm.remove_host_object(entry)


@pytest.fixture
def ns(request: pytest.FixtureRequest):
    """A namespace unique to this test. The test fails if anything of it is left in
    /dev/shm afterwards (the leftovers are then removed, so one leak does not cascade)."""
    name = f"t{uuid.uuid4().hex[:12]}"
    yield name
    left = _leftovers(name)
    if left:
        _cleanup(name)
        pytest.fail(f"test left objects in /dev/shm: {left}")


@pytest.fixture
def new_ns():
    """A factory of further unique namespaces, each checked for leftovers like ``ns``."""
    made: list[str] = []

    def make() -> str:
        name = f"t{uuid.uuid4().hex[:12]}"
        made.append(name)
        return name

    yield make
    leaked = {n: _leftovers(n) for n in made if _leftovers(n)}
    for n in leaked:
        _cleanup(n)
    if leaked:
        pytest.fail(f"test left objects in /dev/shm: {leaked}")


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

