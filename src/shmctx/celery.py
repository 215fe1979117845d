"""Celery integration: the worker's main process owns the namespace, its pool processes
share it.

One call, in the module that defines the Celery app (see ``docs/celery.md``)::

    from shmctx.celery import install, manager
    install(app)                       # or install(app, namespace="myapp", config=...)

    @app.task
    def score(i):
        ctx, _ = manager().get_or_create_context(...)

What runs where:

* main process, ``worker_init``: opens the namespace (creating it if absent) and runs
  its sweeper thread, before the pool starts any process.
* main process, a worker bootstep (``app.steps["worker"]``): routes shmctx's log lines
  into Celery's worker log, and asks the prefork pool to report dead pool processes:
  their references are reclaimed at once (``ContextManager.reclaim``).
* pool process, ``worker_process_init``: drops the main process's manager object it
  inherited and attaches a manager of its own.
* pool process, ``worker_process_shutdown`` (a clean exit, such as recycling by
  ``--max-tasks-per-child``): closes that manager, returning what it still holds.
* main process, ``worker_shutdown`` (or at exit, after a cold shutdown): leaves the
  namespace, unlinking it when no other process uses it.

With ``--pool solo`` or ``--pool threads`` the tasks run in the main process, and
``manager()`` returns the main process's manager.

The namespace is, by priority: ``install(app, namespace=...)``, the ``SHMCTX_NAMESPACE``
environment variable, else ``celery-<main pid>``: then no two workers of a host share (or
unlink) each other's contexts. Several workers given the same namespace are peers: each
opens it (the first creates it), one sweeps at a time, and the last to leave unlinks it.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from typing import Any, NamedTuple

try:
    from celery import Celery, bootsteps, signals
    from celery.utils.log import get_logger
except ImportError as e:  # pragma: no cover - the optional dependency is missing
    raise ImportError(
        "shmctx.celery needs Celery: pip install 'shmctx[celery]'") from e

from . import _shm
from ._config import ContextConfig
from ._errors import ContextError, ContextInUseError, ContextManagerClosedError, InvalidConfigError
from ._manager import ContextManager
from ._proc import identity
from ._service import open_namespace, route_logs, service_config
from ._worker import WorkerManager, check_namespace

__all__ = ["install", "manager", "namespace"]

ENV_NAMESPACE = "SHMCTX_NAMESPACE"
# Set by the main process for pool processes started as fresh interpreters
# (worker_pool_start_method = "spawn"): they inherit the environment, not this module's
# state.
ENV_POOL_NAMESPACE = "SHMCTX_CELERY_NAMESPACE"

log = logging.getLogger("shmctx.celery")


class _Settings(NamedTuple):
    namespace: str | None
    config: ContextConfig | None


_lock = threading.Lock()
# install()'s arguments per app. Celery's signals are global to the process; each
# receiver below acts only for a worker of an installed app.
_installed: weakref.WeakKeyDictionary[Celery, _Settings] = weakref.WeakKeyDictionary()
_main: ContextManager | None = None  # the main process's manager (inherited by forks)
_main_pid = 0  # the worker's main process: how a process tells it is a pool process
_private = False  # the namespace was derived from the main pid: nobody else uses it
_startup_error: BaseException | None = None
_children = WorkerManager("Celery pool")
# The callbacks _watch_pool gave the pool: not chained twice when it runs again.
_chained: weakref.WeakSet[Any] = weakref.WeakSet()


def install(app: Celery, *, namespace: str | None = None,
            config: ContextConfig | None = None) -> None:
    """Share one shmctx namespace among the processes of ``app``'s workers.

    Call it once, at import time, in the module that defines ``app`` (the module
    ``celery -A`` loads). It connects Celery's worker signals, filtered to ``app``'s
    workers, and adds a worker bootstep to ``app``. Calling it again with the same
    arguments changes nothing; with other arguments it raises ``InvalidConfigError``.

    ``namespace``: the namespace's name; default ``SHMCTX_NAMESPACE``, else
    ``celery-<main pid>``. ``config``: the ``ContextConfig`` of a namespace this worker
    creates; default ``SERVICE_DEFAULTS`` (no reference limit, no idle closing). With an
    explicit config, an existing namespace must have the same one.
    """
    if not isinstance(app, Celery):
        raise InvalidConfigError(f"app must be a Celery app, not {type(app).__name__}")
    if namespace is not None:
        check_namespace(namespace)
    service_config(config)  # type check only: None stays None (adopt an existing config)
    wanted = _Settings(namespace, config)
    with _lock:
        have = _installed.get(app)
        if have is not None:
            if have != wanted:
                raise InvalidConfigError(
                    f"shmctx.celery.install() was already called for app {app.main!r} "
                    f"with other arguments ({have} != {wanted}): call it once, where the "
                    "app is defined")
            return
        _installed[app] = wanted
        # A set: adding the step again for another install() is a no-op.
        app.steps["worker"].add(_WorkerStep)
    # dispatch_uid makes each connection happen once per process, whatever the number
    # of apps; weak=False keeps the module-level receivers connected.
    for signal, receiver in ((signals.worker_init, _on_worker_init),
                             (signals.worker_process_init, _on_worker_process_init),
                             (signals.worker_process_shutdown, _on_worker_process_shutdown),
                             (signals.worker_shutdown, _on_worker_shutdown)):
        # The celery-types stub of Signal lacks the ``name`` every signal has.
        uid = f"shmctx.celery.{signal.name}"  # type: ignore[attr-defined]
        signal.connect(receiver, weak=False, dispatch_uid=uid)


def manager() -> ContextManager:
    """The calling process's manager: a pool process's own (attached when the process
    started, shared by its threads), or the main process's in the main process (the
    ``solo`` and ``threads`` pools run tasks there)."""
    if _main is not None and identity.pid == _main_pid:
        return _main
    if _children.namespace is None:
        raise ContextError(_NOT_SET_UP)
    return _children.get()


def namespace() -> str:
    """The namespace of this process's worker (for ``ctx-inspect`` or a publisher)."""
    if _children.namespace is None:
        raise ContextError(_NOT_SET_UP)
    return _children.namespace


# --- signal receivers -------------------------------------------------------------------


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    """Main process, before the bootsteps and the pool: open the namespace, sweeper on."""
    global _main, _main_pid, _private, _startup_error
    settings = _settings_of(sender)
    if settings is None:
        return  # another app's worker
    with _lock:
        if _main is not None and _main_pid == identity.pid:
            return  # a second WorkController in this process: it shares ours
        try:
            ns, private = _resolve_namespace(settings.namespace)
            _main = open_namespace(ns, settings.config, sweeper=True)
        except BaseException as e:
            # Celery logs and swallows a receiver's exception; the bootstep raises it
            # again, so that the worker stops instead of running without shmctx.
            _startup_error = e
            raise
        _main_pid, _private, _startup_error = identity.pid, private, None
        _children.namespace = ns
        # Pool processes started as fresh interpreters learn the namespace from here.
        os.environ[ENV_POOL_NAMESPACE] = ns
    # A cold shutdown (SIGQUIT, a second Ctrl-C) does not send worker_shutdown.
    atexit.register(_leave)


def _on_worker_process_init(**_: Any) -> None:
    """Pool process, before its first task: attach a manager of its own."""
    inherited = _main
    if inherited is not None and identity.pid == _main_pid:
        return  # the solo pool sends this signal in the main process, which serves
    if _main_pid == 0:
        # A fresh interpreter (spawn): only the environment tells whose pool this is.
        ns = os.environ.get(ENV_POOL_NAMESPACE)
        if not ns or not _installed:
            return
        _children.namespace = ns
    elif inherited is not None:
        # The main process's manager came along with fork. Its references stay the main
        # process's: closing this copy releases only this process's mapping, and makes
        # handles made from it raise instead of passing for this process's own.
        try:
            inherited.close()
        except ContextManagerClosedError:
            pass
    route_logs(get_logger("celery.worker"))  # a no-op repeat after fork; needed after spawn
    try:
        _children.get()
    except Exception:  # Celery would only log it; say which process and why
        log.exception("shmctx: pool process %d could not attach to namespace %r",
                      identity.pid, _children.namespace)


def _on_worker_process_shutdown(**_: Any) -> None:
    """Pool process, exiting cleanly (recycled, pool shrunk, worker stopping): return
    what it holds. (It leaves with ``os._exit``: no atexit handler would run.)"""
    if identity.pid != _main_pid:
        _children.close()


def _on_worker_shutdown(sender: Any = None, **_: Any) -> None:
    """Main process, after a warm shutdown has stopped the pool: leave the namespace."""
    if _settings_of(sender) is not None:
        _leave()


# --- the worker bootstep ----------------------------------------------------------------


class _WorkerStep(bootsteps.StartStopStep):
    """Main process: shmctx's part of the worker's start-up, after the pool's step."""

    label = "shmctx"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        if _main is None or identity.pid != _main_pid:
            raise ContextError(
                "shmctx.celery could not open the worker's namespace"
                + (f": {_startup_error}" if _startup_error else "")) from _startup_error
        # Celery has configured logging by now (worker_init is too early). The pool
        # processes are forked later and inherit the routing.
        route_logs(get_logger("celery.worker"))
        log.info("shmctx: main process %d uses namespace %r (%s); pool processes attach to it",
                 identity.pid, _main.namespace,
                 "its own" if _private else "shared with any worker naming it")

    def start(self, parent: Any) -> None:
        _watch_pool(parent)

    def register_with_event_loop(self, parent: Any, hub: Any) -> None:
        # With an event loop (the AsynPool of the redis and amqp transports), the pool
        # sets its process-exit callback while it registers with the loop, after this
        # step is called (Celery calls the steps in reverse order). Chain ours once the
        # loop runs; again after every re-registration (a broker reconnection).
        hub.call_soon(_watch_pool, parent)


def _watch_pool(worker: Any) -> None:
    """Have the prefork pool call ``_reclaim_child(pid)`` for each pool process that
    exits, once reaped.

    Celery has no documented signal, in the main process, for a pool process that died
    (``worker_process_shutdown`` runs in the pool process, and not when it is killed).
    billiard's ``Pool`` has one, ``on_process_down(process)``, called in the main process
    for every process it reaps: a constructor argument of billiard's pool that Celery's
    blocking pool leaves unset and its event-loop pool (AsynPool) sets for its own
    bookkeeping. We chain ours after whatever is there. Celery's ``TaskPool`` exposes
    billiard's pool only as its private ``_pool``. If a Celery version changes this,
    nothing breaks: dead processes' references are then reclaimed by the sweeper, every
    ``cleanup_interval``.
    """
    pool = getattr(getattr(worker, "pool", None), "_pool", None)
    if pool is None or not hasattr(pool, "on_process_down"):
        return  # solo, threads, eventlet, gevent: no pool processes
    current = pool.on_process_down
    if current in _chained:
        return

    def on_process_down(proc: Any) -> None:
        try:
            if current is not None:
                current(proc)
        finally:
            _reclaim_child(proc.pid)

    _chained.add(on_process_down)
    pool.on_process_down = on_process_down


def _reclaim_child(pid: int | None) -> None:
    """Main process: pool process ``pid`` is dead and reaped; reclaim its references.
    Runs in the pool's supervisor thread or event loop: it never raises."""
    m = _main
    if m is None or not pid or identity.pid != _main_pid:
        return
    try:
        n = m.reclaim(pid)
    except ContextManagerClosedError:
        return  # shutting down: the namespace is being left anyway
    except ContextInUseError:
        log.warning("shmctx: pool process %d is still alive; its references are left to "
                    "the sweeper", pid)
        return
    except Exception:
        log.exception("shmctx: reclaiming the references of pool process %d failed; the "
                      "sweeper will retry", pid)
        return
    if n:
        log.info("shmctx: reclaimed %d reference(s) of dead pool process %d", n, pid)


# --- internals --------------------------------------------------------------------------

_NOT_SET_UP = (
    "shmctx.celery is not set up in this process: call shmctx.celery.install(app) in the "
    "module that defines the Celery app, and call manager() in a task (of a worker "
    "started with `celery -A that_module worker`). Another process reaches the worker's "
    "contexts with ContextManager(namespace=..., create=False)."
)


def _settings_of(worker: Any) -> _Settings | None:
    """install()'s arguments for the app of ``worker`` (a signal's sender), if any."""
    app = getattr(worker, "app", None)
    # celery-types leaves Celery's type parameters unknown to pyright's strict mode.
    return _installed.get(app) if isinstance(app, Celery) else None  # pyright: ignore[reportUnknownArgumentType]


def _resolve_namespace(namespace: str | None) -> tuple[str, bool]:
    """The namespace to use and whether it is private to this worker (derived)."""
    if namespace is not None:
        return namespace, False
    env = os.environ.get(ENV_NAMESPACE)
    if env:
        return check_namespace(env), False
    return f"celery-{identity.pid}", True


def _leave() -> None:
    """Main process: leave the namespace, once. Its own namespace is unlinked; a shared
    one is unlinked by the last process registered in it (``unlink_if_last``), so that
    another worker's pool processes keep theirs."""
    m = _main
    if m is None or identity.pid != _main_pid or m.closed:
        return
    ns = m.namespace
    try:
        if _private:
            try:
                m.unlink()
            except ContextInUseError as e:
                log.warning("shmctx: %s; unlinking anyway on shutdown", e)
                m.unlink(force=True)
            log.info("shmctx: namespace %r unlinked", ns)
            return
        m.close(unlink_if_last=True)
    except ContextManagerClosedError:
        return  # left already (worker_shutdown, then atexit)
    if os.path.exists(_shm.host_path(_shm.table_name(ns))):
        log.info("shmctx: main process %d left namespace %r; other processes still use it",
                 identity.pid, ns)
