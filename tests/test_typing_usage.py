"""Typical user code over shmctx's public API, type-checked as a user's code would be.

These are ordinary tests, and .ci/run also runs ``mypy --strict`` and
pyright (strict) over this file. Each ``assert_type`` states the type a user's checker
sees; the check fails if it changes, and in particular if it degrades to ``Any``, which
every other use of the value would accept without a word. So a change to the public
API's types that would break users' type checking fails CI.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from datetime import timedelta
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import shmctx.gunicorn
import shmctx.pool
from shmctx import (
    ContextConfig,
    ContextError,
    ContextInfo,
    ContextManager,
    ContextNotFoundError,
    InvalidConfigError,
    InvalidContextTypeError,
    MaxReferencesReachedError,
    MemoryContext,
    MemoryContextConfig,
    SweepReport,
)

if sys.version_info >= (3, 11):
    from typing import assert_type
else:  # what the checkers see when they check for Python 3.10
    from typing_extensions import assert_type

# No sweeper thread: nothing but the test itself changes the namespace.
NO_SWEEPER = ContextConfig(cleanup_interval=0)


def test_bytes_contexts(ns: str) -> None:
    # A duration is given as seconds or a timedelta, and read back as float seconds.
    config = ContextConfig(max_references=2, max_idle_time=timedelta(minutes=5),
                           cleanup_interval=0, lock_timeout=0.5)
    assert_type(config.max_idle_time, float)
    assert config.max_idle_time == 300.0
    with ContextManager(config, namespace=ns, sweeper=False) as m:
        assert_type(m, ContextManager)
        assert_type(m.config, ContextConfig)
        assert_type(m.namespace, str)

        def fill(c: MemoryContext) -> None:
            c.buf[:5] = b"hello"

        ctx, existed = m.get_or_create_context("greeting", MemoryContextConfig(size=64),
                                               init=fill)
        assert_type(ctx, MemoryContext)
        assert_type(existed, bool)
        assert not existed
        try:
            assert_type(ctx.buf, memoryview)
            assert bytes(ctx.buf[:5]) == b"hello"
            assert_type(ctx.name, str)
            assert_type(ctx.size, int)
            assert_type(ctx.version, int)
            assert_type(ctx.is_current, bool)
            assert_type(ctx.kind, str)
            assert (ctx.name, ctx.size, ctx.version, ctx.kind) == ("greeting", 64, 1, "bytes")
            assert_type(m.validate_context(ctx), bool)
        finally:
            m.return_context(ctx)

        with m.context("greeting") as same:
            assert_type(same, MemoryContext)
            with same.lock:
                same.put({"n": 1})  # put takes the lock too: it is re-entrant
            same.lock.acquire(timeout=1.0)
            same.lock.release()
            assert same.get() == {"n": 1}  # what put stored: Any, as msgpack decodes it
            assert same.get(default=None) is not None

        new = m.publish("greeting", MemoryContextConfig(size=128))
        assert_type(new, MemoryContext)
        try:
            assert (new.version, new.size) == (2, 128)
            assert new is m.refresh(new)
        finally:
            m.return_context(new)

        infos = m.contexts()
        assert_type(infos, list[ContextInfo])
        assert [(i.name, i.version) for i in infos] == [("greeting", 2)]
        assert_type(infos[0].parent, str | None)
        report = m.sweep()
        assert_type(report, SweepReport)
        assert_type(report.closed, list[str])
        assert_type(report.reclaimed, dict[int, int])
        assert_type(m.check(), list[str])
        assert m.check() == []
        m.unlink()
        assert_type(m.closed, bool)
        assert m.closed


def test_array_and_object_contexts(ns: str) -> None:
    with ContextManager(NO_SWEEPER, namespace=ns) as m:
        cfg = MemoryContextConfig.for_array((4, 3), "float32")
        assert_type(cfg, MemoryContextConfig)

        def ones(c: MemoryContext) -> None:
            c.array(writeable=True)[:] = 1.5

        with m.context("emb", cfg, init=ones) as ctx:
            arr = ctx.array()
            assert_type(arr, npt.NDArray[Any])
            assert arr.shape == (4, 3)
            assert arr.dtype == np.float32
            assert float(arr.sum()) == 18.0
            assert not arr.flags.writeable
            del arr

        def make_model() -> dict[str, Any]:
            return {"w": np.arange(3.0)}

        obj, existed = m.get_or_create_object("model", make_model)
        assert_type(obj, MemoryContext)
        try:
            model = obj.load()  # whatever the factory made: Any
            assert not existed
            assert model["w"].tolist() == [0.0, 1.0, 2.0]
            del model
        finally:
            m.return_context(obj)
        newer = m.publish_object("model", {"w": np.zeros(2)})
        assert_type(newer, MemoryContext)
        m.return_context(newer)
        m.unlink()


def test_errors(ns: str) -> None:
    with pytest.raises(InvalidConfigError) as bad:
        ContextConfig(max_references=-1)
    assert_type(bad.value, InvalidConfigError)
    with ContextManager(ContextConfig(max_references=1, cleanup_interval=0),
                        namespace=ns) as m:
        with pytest.raises(ContextNotFoundError) as missing:
            m.get_context("missing")
        assert_type(missing.value, ContextNotFoundError)
        assert isinstance(missing.value, ContextError)
        with m.context("bytes", MemoryContextConfig(size=8)) as ctx:
            with pytest.raises(InvalidContextTypeError):
                ctx.array()
            with pytest.raises(MaxReferencesReachedError):
                m.get_context("bytes")
        m.unlink()


# A pool task: module level, so that a worker finds it by name.
def crc_of(name: str) -> int:
    m = shmctx.pool.manager()
    assert_type(m, ContextManager)
    ctx = m.get_context(name)
    try:
        return zlib.crc32(ctx.buf)
    finally:
        m.return_context(ctx)


def test_pool_integration(ns: str) -> None:
    data = bytes(range(256)) * 4
    with ContextManager(NO_SWEEPER, namespace=ns) as m:
        def put_data(c: MemoryContext) -> None:
            c.buf[:] = data

        ctx, _ = m.get_or_create_context("data", MemoryContextConfig(size=len(data)),
                                         init=put_data)
        m.return_context(ctx)
        kwargs = shmctx.pool.worker_args(m)
        assert_type(kwargs, dict[str, Any])
        with ProcessPoolExecutor(1, mp_context=mp.get_context("fork"), **kwargs) as pool:
            assert pool.submit(crc_of, "data").result(timeout=60) == zlib.crc32(data)
        m.unlink()


def test_gunicorn_hooks_have_gunicorn_signatures() -> None:
    # What gunicorn.conf.py assigns: server hooks take the arbiter, worker hooks the
    # arbiter and the worker.
    server_hooks: list[Callable[[Any], None]] = [
        shmctx.gunicorn.on_starting, shmctx.gunicorn.on_reload, shmctx.gunicorn.pre_exec,
        shmctx.gunicorn.on_exit,
    ]
    worker_hooks: list[Callable[[Any, Any], None]] = [
        shmctx.gunicorn.post_fork, shmctx.gunicorn.worker_exit, shmctx.gunicorn.child_exit,
    ]
    assert all(callable(h) for h in [*server_hooks, *worker_hooks])
    configure: Callable[..., None] = shmctx.gunicorn.configure
    assert callable(configure)
    assert_type(shmctx.gunicorn.manager, Callable[[], ContextManager])
    assert_type(shmctx.gunicorn.namespace, Callable[[], str])
    # Outside a server there is no namespace to name.
    with pytest.raises(ContextError):
        shmctx.gunicorn.namespace()
