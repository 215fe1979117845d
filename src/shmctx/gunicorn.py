"""gunicorn integration: the master (arbiter) owns the namespace, the workers share it.

Wire it into ``gunicorn.conf.py`` with one line (see ``docs/gunicorn.md``)::

    from shmctx.gunicorn import *  # on_starting, post_fork, worker_exit, child_exit, on_exit

and reach the worker's manager in the app with ``shmctx.gunicorn.manager()``.

What runs where:

* master, ``on_starting``: creates (or adopts) the namespace with the sweeper thread.
* worker, ``post_fork``: drops the master's manager object it inherited and attaches a
  manager of its own (one per worker process, shared by its threads).
* worker, ``worker_exit``: closes that manager, returning whatever it still holds.
* master, ``child_exit``: the worker is dead and reaped; its references are reclaimed at
  once (``ContextManager.reclaim``) rather than at the next sweep.
* master, ``on_exit``: unlinks the namespace: nothing is left in /dev/shm.

The namespace is, by priority: ``configure(namespace=...)`` in ``gunicorn.conf.py``, the
``SHMCTX_NAMESPACE`` environment variable, else ``gunicorn-<master pid>`` so that two
servers on one host never share (or unlink) each other's contexts. A master re-executed by
``SIGUSR2`` keeps its predecessor's namespace, and neither master unlinks it while the
other still runs.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from ._config import ContextConfig
from ._errors import ContextError, ContextInUseError, ContextManagerClosedError, InvalidConfigError
from ._manager import ContextManager
from ._proc import identity, is_alive
from ._worker import WorkerManager, check_namespace

# ``from shmctx.gunicorn import *`` in gunicorn.conf.py installs exactly the hooks. They
# log through ``server.log``, gunicorn's error log: where gunicorn users look.
__all__ = ["on_starting", "post_fork", "worker_exit", "child_exit", "on_exit"]

ENV_NAMESPACE = "SHMCTX_NAMESPACE"

_lock = threading.Lock()
_settings: dict[str, Any] = {"namespace": None, "config": None, "mode": None}
_configured_pid = 0  # the process that called configure(): gunicorn's master
_master: ContextManager | None = None
_master_pid = 0  # inherited by the workers: how a process tells it is not the master
_workers = WorkerManager("gunicorn")
_pending: list[int] = []  # dead workers whose references are still to be reclaimed
_reaping = False


def configure(
    namespace: str | None = None,
    *,
    config: ContextConfig | None = None,
    mode: int | None = None,
) -> None:
    """Choose the namespace, its ``ContextConfig`` and permission ``mode``. Call it in
    ``gunicorn.conf.py`` (it runs in the master, before any worker is forked)."""
    global _configured_pid
    if namespace is not None:
        check_namespace(namespace)
    if config is not None and not isinstance(config, ContextConfig):
        raise InvalidConfigError(
            f"config must be a ContextConfig or None, not {type(config).__name__}"
        )
    with _lock:
        if _master is not None:
            raise ContextError(
                "shmctx.gunicorn.configure() must run before the master creates the "
                f"namespace (it already owns {_master.namespace!r}): call it in gunicorn.conf.py"
            )
        _settings.update(namespace=namespace, config=config, mode=mode)
        _configured_pid = os.getpid()


def namespace() -> str:
    """The namespace this server's master created and its workers attach to."""
    if _workers.namespace is None:
        raise ContextError(_NOT_SET_UP)
    return _workers.namespace


def manager() -> ContextManager:
    """The calling process's manager: the worker's own (created on first use, shared by
    the worker's threads), or the master's in the master.

    With ``preload_app = True`` the app module may call it at import time, in the master:
    it then gets the master's manager, whose references stay the master's. In a worker
    that manager is closed, and ``manager()`` returns the worker's own.
    """
    if _master is not None and identity.pid == _master_pid:
        return _master
    if _master_pid == 0:
        if _hooks_wired():
            return _start_master()  # preload_app: imported in the master before on_starting
        raise ContextError(_NOT_SET_UP)
    return _workers.get()


# --- hooks ------------------------------------------------------------------------------


def on_starting(server: Any) -> None:
    """Master: create (or adopt) the namespace and run its sweeper."""
    m = _start_master()
    server.log.info("shmctx: master pid %d owns namespace %r", os.getpid(), m.namespace)


def post_fork(server: Any, worker: Any) -> None:
    """Worker, right after fork: leave the master's manager, attach its own."""
    inherited = _master
    if inherited is not None:
        # Closing it in the child releases only the child's mapping and descriptors;
        # handles made from it now raise instead of passing for the worker's references.
        try:
            inherited.close()
        except ContextManagerClosedError:
            pass
    _workers.get()


def worker_exit(server: Any, worker: Any) -> None:
    """Worker, on its way out: return everything it holds. (gunicorn also calls this in
    the master for a worker found already gone: then reclaim as in ``child_exit``.)"""
    if identity.pid == _master_pid:
        _reclaim(worker.pid, server.log)
    else:
        _workers.close()


def child_exit(server: Any, worker: Any) -> None:
    """Master, after reaping a worker: reclaim its references now."""
    _reclaim(worker.pid, server.log)


def on_exit(server: Any) -> None:
    """Master, on shutdown: unlink the namespace (only close it while a re-executed
    master, or the master that re-executed this one, still runs)."""
    m = _master
    if m is None or identity.pid != _master_pid:
        return
    other = [p for p in (getattr(server, "reexec_pid", 0), getattr(server, "master_pid", 0))
             if p and is_alive(p, 0)]
    try:
        if other:
            server.log.info("shmctx: master pid %d still runs; leaving namespace %r to it",
                            other[0], m.namespace)
            m.close()
            return
        try:
            m.unlink()
        except ContextInUseError as e:
            server.log.warning("shmctx: %s; unlinking anyway on shutdown", e)
            m.unlink(force=True)
        server.log.info("shmctx: namespace %r unlinked", m.namespace)
    except ContextManagerClosedError:
        pass


# --- internals --------------------------------------------------------------------------

_NOT_SET_UP = (
    "shmctx.gunicorn is not set up in this process: add `from shmctx.gunicorn import *` "
    "to gunicorn.conf.py (its on_starting hook creates the namespace in the master)"
)


def _resolve_namespace() -> str:
    if _settings["namespace"] is not None:
        return _settings["namespace"]
    env = os.environ.get(ENV_NAMESPACE)
    if env:
        return check_namespace(env)
    # A master re-executed by SIGUSR2 is told its predecessor's pid in GUNICORN_PID.
    return f"gunicorn-{os.environ.get('GUNICORN_PID') or os.getpid()}"


def _start_master() -> ContextManager:
    global _master, _master_pid
    with _lock:
        if _master is None:
            ns = _resolve_namespace()
            _master = ContextManager(
                _settings["config"], namespace=ns, sweeper=True, mode=_settings["mode"]
            )
            _master_pid = identity.pid
            _workers.namespace = ns
        return _master


def _hooks_wired() -> bool:
    """True in gunicorn's master before ``on_starting`` (a preloaded app being imported):
    ``configure()`` ran here, or a loaded config module carries our ``on_starting``."""
    if _configured_pid == os.getpid():
        return True
    for mod in list(sys.modules.values()):
        if getattr(mod, "__dict__", {}).get("on_starting") is on_starting and \
                mod.__name__ != __name__:
            return True
    return False


def _reclaim(pid: int, glog: Any) -> None:
    """Reclaim dead ``pid``'s references. Safe to re-enter: gunicorn < 23 runs
    ``child_exit`` inside its SIGCHLD handler, which may interrupt a reclaim under way
    (holding the table lock); the interrupting call only queues its pid."""
    global _reaping
    m = _master
    if m is None:
        return
    _pending.append(pid)
    if _reaping:
        return
    while True:
        _reaping = True
        try:
            while _pending:
                p = _pending.pop()
                try:
                    n = m.reclaim(p)
                except ContextInUseError:
                    glog.warning("shmctx: pid %d is still alive; its references are left "
                                 "to the sweeper", p)
                    continue
                except ContextManagerClosedError:
                    _pending.clear()
                    return
                if n:
                    glog.info("shmctx: reclaimed %d reference(s) of dead worker %d", n, p)
        finally:
            _reaping = False
        if not _pending:
            return
