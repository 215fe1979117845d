"""shmctx.pool: multiprocessing.Pool and ProcessPoolExecutor workers on a parent's namespace."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import zlib
from concurrent.futures import ProcessPoolExecutor

import pytest
from helpers import wait_for

from shmctx import (
    ContextConfig,
    ContextError,
    ContextManager,
    InvalidConfigError,
    MemoryContextConfig,
    pool,
)
from shmctx._proc import is_alive

BLOB_SIZE = 16 << 20  # large enough that pickling it per task would show

# No sweeper thread (cleanup_interval=0): only what a test does explicitly, or what a
# worker does itself, can release a reference.
NO_SWEEPER = ContextConfig(cleanup_interval=0, lock_timeout=0.2)


@pytest.fixture(params=["fork", "spawn", "forkserver"])
def start_method(request: pytest.FixtureRequest) -> str:
    return request.param


# --- tasks (module level: spawn and forkserver workers import them by name) --------------

_LEAKED: list = []
_TAG: list = []


def crc_of(name: str) -> tuple[int, int]:
    """The canonical task: the argument is a context name, the payload is read in place."""
    m = pool.manager()
    ctx = m.get_context(name)
    try:
        return os.getpid(), zlib.crc32(ctx.buf)
    finally:
        m.return_context(ctx)


def partial_sum(src: str, out: str, i: int, lo: int, hi: int) -> int:
    """Sum a slice of a float64 array in ``src`` into element ``i`` of ``out``."""
    import numpy as np

    m = pool.manager()
    a_ctx, o_ctx = m.get_context(src), m.get_context(out)
    try:
        a = np.frombuffer(a_ctx.buf, dtype=np.float64)
        o = np.frombuffer(o_ctx.buf, dtype=np.float64)
        o[i] = a[lo:hi].sum()
        del a, o  # drop the views before the references go back
    finally:
        m.return_context(a_ctx)
        m.return_context(o_ctx)
    return os.getpid()


def leak_reference(name: str) -> int:
    """Take a reference and keep it: only closing the worker's manager releases it."""
    _LEAKED.append(pool.manager().get_context(name))
    return os.getpid()


def die_holding(name: str) -> None:
    pool.manager().get_context(name)
    os.kill(os.getpid(), signal.SIGKILL)


def remember(tag: str) -> None:
    _TAG.append(tag)


def tag_and_namespace(_: object) -> tuple[list, str]:
    return _TAG, pool.manager().namespace


# --- helpers ----------------------------------------------------------------------------


def _info(m: ContextManager, name: str):
    return {i.name: i for i in m.contexts()}[name]


def _put_blob(m: ContextManager, name: str, data: bytes):
    def fill(ctx) -> None:
        ctx.buf[:] = data

    ctx, existed = m.get_or_create_context(name, MemoryContextConfig(size=len(data)), init=fill)
    assert not existed
    return ctx





# --- tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["Pool", "ProcessPoolExecutor"])
def test_workers_read_a_blob_in_place(ns, start_method, kind):
    blob = os.urandom(BLOB_SIZE)
    ctx_mp = mp.get_context(start_method)
    with ContextManager(ContextConfig(lock_timeout=0.2), namespace=ns, sweeper=True) as m:
        ctx = _put_blob(m, "blob", blob)
        names = ["blob"] * 8
        if kind == "Pool":
            p = ctx_mp.Pool(2, **pool.worker_args(m))
            try:
                results = p.map(crc_of, names, chunksize=1)
                p.close()
                p.join()  # workers exit normally: their finalizers close their managers
            finally:
                p.terminate()
        else:
            with ProcessPoolExecutor(2, mp_context=ctx_mp, **pool.worker_args(m)) as ex:
                results = list(ex.map(crc_of, names))
        assert {crc for _pid, crc in results} == {zlib.crc32(blob)}
        assert os.getpid() not in {pid for pid, _crc in results}
        # Every worker returned its references; the parent's one is all that is left.
        assert _info(m, "blob").holders == {os.getpid(): 1}
        m.return_context(ctx)
        m.unlink()


def test_workers_fill_a_numpy_array_through_shared_memory(ns, start_method):
    np = pytest.importorskip("numpy")
    n, parts = 1 << 21, 8
    with ContextManager(ContextConfig(lock_timeout=0.2), namespace=ns, sweeper=True) as m:
        src, _ = m.get_or_create_context("x", MemoryContextConfig(size=n * 8))
        out, _ = m.get_or_create_context("sums", MemoryContextConfig(size=parts * 8))
        x = np.frombuffer(src.buf, dtype=np.float64)
        x[:] = np.arange(n, dtype=np.float64)
        sums = np.frombuffer(out.buf, dtype=np.float64)
        sums[:] = -1
        step = n // parts
        jobs = [("x", "sums", i, i * step, (i + 1) * step) for i in range(parts)]
        p = mp.get_context(start_method).Pool(2, **pool.worker_args(m))
        try:
            pids = p.starmap(partial_sum, jobs, chunksize=1)
            p.close()
            p.join()
        finally:
            p.terminate()
        assert os.getpid() not in pids
        # The workers wrote into the parent's own array: nothing came back pickled.
        expected = x.reshape(parts, step).sum(axis=1)
        assert np.array_equal(sums, expected)
        assert sums.sum() == n * (n - 1) / 2
        del x, sums
        assert _info(m, "x").holders == {os.getpid(): 1}
        m.return_context(src)
        m.return_context(out)
        m.unlink()


def test_worker_killed_mid_task_leaves_nothing_after_the_next_sweep(ns, start_method):
    with ContextManager(NO_SWEEPER, namespace=ns) as m:
        ctx = _put_blob(m, "blob", os.urandom(1 << 16))
        p = mp.get_context(start_method).Pool(2, **pool.worker_args(m))
        try:
            p.apply_async(die_holding, ("blob",))  # its result never comes

            def dead_holder():
                dead = [pid for pid in _info(m, "blob").holders
                        if pid != os.getpid() and not is_alive(pid, 0)]
                return dead and dead[0]

            victim = wait_for(dead_holder, 20, "a worker to die holding a reference")
            assert _info(m, "blob").holders == {os.getpid(): 1, victim: 1}
            report = m.sweep()
            assert report.reclaimed == {victim: 1}
            info = _info(m, "blob")
            assert info.holders == {os.getpid(): 1} and info.refcount == 1
            # The pool replaced the dead worker; the replacement attaches and serves.
            pid, crc = p.apply(crc_of, ("blob",))
            assert pid != victim and crc == zlib.crc32(ctx.buf)
        finally:
            p.terminate()  # a lost task would make close() + join() wait forever
            p.join()
        m.return_context(ctx)
        m.unlink()


def test_maxtasksperchild_workers_close_their_manager_on_exit(ns, start_method):
    with ContextManager(NO_SWEEPER, namespace=ns) as m:
        ctx = _put_blob(m, "blob", b"x" * 4096)
        p = mp.get_context(start_method).Pool(2, maxtasksperchild=1, **pool.worker_args(m))
        try:
            pids = p.map(leak_reference, ["blob"] * 4, chunksize=1)
            p.close()
            p.join()
        finally:
            p.terminate()
        assert len(set(pids)) == 4  # one task per worker process
        assert not any(is_alive(pid, 0) for pid in pids)
        # Each worker kept its reference; nothing swept; its exit returned it.
        info = _info(m, "blob")
        assert info.holders == {os.getpid(): 1} and info.refcount == 1
        m.return_context(ctx)
        m.unlink()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="max_tasks_per_child is new in 3.11")
@pytest.mark.parametrize("method", ["spawn", "forkserver"])  # the executor refuses fork here
def test_executor_max_tasks_per_child_workers_close_their_manager(ns, method):
    with ContextManager(NO_SWEEPER, namespace=ns) as m:
        ctx = _put_blob(m, "blob", b"x" * 4096)
        with ProcessPoolExecutor(2, mp_context=mp.get_context(method), max_tasks_per_child=1,
                                 **pool.worker_args(m)) as ex:
            pids = list(ex.map(leak_reference, ["blob"] * 4))
        assert len(set(pids)) == 4
        assert not any(is_alive(pid, 0) for pid in pids)
        info = _info(m, "blob")
        assert info.holders == {os.getpid(): 1} and info.refcount == 1
        m.return_context(ctx)
        m.unlink()


def test_user_initializer_is_chained(ns):
    with ContextManager(NO_SWEEPER, namespace=ns) as m:
        args = pool.worker_args(m, initializer=remember, initargs=("mine",))
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), **args) as ex:
            tag, namespace = ex.submit(tag_and_namespace, None).result()
        assert tag == ["mine"] and namespace == ns
        m.unlink()


def test_misuse_is_a_clear_error(ns):
    with pytest.raises(ContextError, match="not a pool worker"):
        pool.manager()
    with pytest.raises(InvalidConfigError, match="namespace"):
        pool.worker_args("has space")
    assert pool.worker_args(ns)["initargs"] == (ns, None, ())
