"""Hand a namespace to ``multiprocessing.Pool`` and ``ProcessPoolExecutor`` workers.

The parent creates the namespace (and runs the sweeper); each worker process attaches
through the initializer shipped here and reaches its manager with ``manager()``. Tasks
pass context *names*, never payloads: a worker maps the parent's memory (``ctx.buf``)
zero-copy. See ``docs/multiprocessing.md``::

    with ContextManager(namespace="jobs", sweeper=True) as m:
        with multiprocessing.Pool(4, **shmctx.pool.worker_args(m)) as pool:
            pool.map(task, ["dataset"])

    def task(name):
        m = shmctx.pool.manager()
        ctx = m.get_context(name)
        try:
            return zlib.crc32(ctx.buf)
        finally:
            m.return_context(ctx)

Works with the ``fork``, ``spawn`` and ``forkserver`` start methods. A worker that exits
(``maxtasksperchild``, ``max_tasks_per_child``, pool shutdown) closes its manager, which
returns whatever it still holds; one that dies without doing so (SIGKILL, OOM) is
reclaimed by the parent's next sweep.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from multiprocessing import util as _mp_util
from typing import Any

from ._manager import ContextManager
from ._worker import WorkerManager, check_namespace

__all__ = ["init_worker", "worker_args", "manager"]

_workers = WorkerManager("pool")

# Run before multiprocessing's own finalizers (default priority 0), so the manager is
# closed while the worker is still whole.
_EXIT_PRIORITY = 10


def init_worker(
    namespace: str,
    initializer: Callable[..., object] | None = None,
    initargs: Iterable[Any] = (),
) -> None:
    """Pool initializer: attach this worker process to ``namespace``, which must exist,
    and arrange for its manager to be closed when the worker exits. Then call the
    user's ``initializer(*initargs)``, if any."""
    _workers.namespace = check_namespace(namespace)
    _workers.get()
    # Pool workers leave through os._exit(): atexit does not run there, Finalize does.
    _mp_util.Finalize(None, _workers.close, exitpriority=_EXIT_PRIORITY)
    if initializer is not None:
        initializer(*initargs)


def worker_args(
    namespace: str | ContextManager,
    initializer: Callable[..., object] | None = None,
    initargs: Iterable[Any] = (),
) -> dict[str, Any]:
    """``initializer``/``initargs`` keyword arguments for ``multiprocessing.Pool``,
    ``multiprocessing.get_context(...).Pool`` or ``ProcessPoolExecutor`` that attach each
    worker to ``namespace`` (a name, or the parent's manager), chaining the optional
    ``initializer(*initargs)``."""
    ns = namespace.namespace if isinstance(namespace, ContextManager) else namespace
    return {
        "initializer": init_worker,
        "initargs": (check_namespace(ns), initializer, tuple(initargs)),
    }


def manager() -> ContextManager:
    """This worker's manager (``ContextError`` outside a worker set up by ``init_worker``)."""
    return _workers.get()
