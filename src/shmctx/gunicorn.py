"""gunicorn integration: the master (arbiter) owns the namespace, the workers share it.

Wire it into ``gunicorn.conf.py`` with one line (see ``docs/gunicorn.md``)::

    from shmctx.gunicorn import *  # on_starting, on_reload, pre_exec, post_fork, ... on_exit

and reach the worker's manager in the app with ``shmctx.gunicorn.manager()``.

What runs where:

* master, ``on_starting``: creates (or adopts) the namespace with the sweeper thread.
* master, ``on_reload`` (``SIGHUP``): nothing to redo, the namespace outlives the reload;
  it reports settings that ``gunicorn.conf.py`` now asks for but a reload cannot apply.
* master, ``pre_exec`` (``SIGUSR2``): hands the namespace to the re-executed master.
* worker, ``post_fork``: drops the master's manager object it inherited and attaches a
  manager of its own (one per worker process, shared by its threads).
* worker, ``worker_exit``: closes that manager, returning whatever it still holds.
* master, ``child_exit``: the worker is dead and reaped; its references are reclaimed at
  once (``ContextManager.reclaim``) rather than at the next sweep.
* master, ``on_exit``: unlinks the namespace: nothing is left in /dev/shm.

The namespace is, by priority: ``configure(namespace=...)`` in ``gunicorn.conf.py``, the
``SHMCTX_NAMESPACE`` environment variable, else ``gunicorn-<master pid>`` so that two
servers on one host never share (or unlink) each other's contexts. The namespace, its
config and mode are fixed for the life of the server: a reload (``SIGHUP``) keeps them, a
master re-executed by ``SIGUSR2`` takes over its predecessor's namespace (and refuses to
start if told to use another), and neither master unlinks it while the other still runs.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, TypedDict

from ._config import ContextConfig
from ._errors import ContextError, ContextInUseError, ContextManagerClosedError, InvalidConfigError
from ._manager import ContextManager
from ._proc import identity, is_alive
from ._service import open_namespace, route_logs
from ._worker import WorkerManager, check_namespace

# ``from shmctx.gunicorn import *`` in gunicorn.conf.py installs exactly the hooks. They
# log through ``server.log``, gunicorn's error log: where gunicorn users look.
__all__ = ["on_starting", "on_reload", "pre_exec", "post_fork", "worker_exit", "child_exit",
           "on_exit"]

ENV_NAMESPACE = "SHMCTX_NAMESPACE"
# Set by a master for the master it re-executes (SIGUSR2): the namespace in use. Only
# trusted together with gunicorn's own GUNICORN_PID, which marks a re-executed master.
ENV_INHERITED = "SHMCTX_GUNICORN_NAMESPACE"


class _Settings(TypedDict):
    namespace: str | None
    config: ContextConfig | None
    mode: int | None


_lock = threading.Lock()
_settings: _Settings = {"namespace": None, "config": None, "mode": None}
_configured_pid = 0  # the process that called configure(): gunicorn's master
# What gunicorn.conf.py asked for when gunicorn last executed it again (SIGHUP), in a
# master whose namespace already exists; on_reload compares it with what runs.
_reread: _Settings | None = None
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
    ``gunicorn.conf.py`` (it runs in the master, before any worker is forked).

    gunicorn executes ``gunicorn.conf.py`` again on every reload (``SIGHUP``), in the
    master that already owns the namespace. Calling ``configure()`` there with the same
    arguments is a no-op. Other arguments cannot take effect while workers use the
    namespace: the master keeps the settings it runs with and ``on_reload`` logs, as an
    error, the ones it could not apply (raising here would make gunicorn exit the master
    and orphan its workers). Before the namespace exists, a second call in the same
    process with other arguments raises ``InvalidConfigError``.
    """
    global _configured_pid, _reread
    if namespace is not None:
        check_namespace(namespace)
    if config is not None and not isinstance(config, ContextConfig):
        raise InvalidConfigError(
            f"config must be a ContextConfig or None, not {type(config).__name__}"
        )
    wanted: _Settings = {"namespace": namespace, "config": config, "mode": mode}
    with _lock:
        if _master is not None:
            if identity.pid != _master_pid:
                raise ContextError(
                    "shmctx.gunicorn.configure() runs in gunicorn's master, in "
                    f"gunicorn.conf.py; pid {identity.pid} is a worker of the server that "
                    f"owns namespace {_master.namespace!r}"
                )
            _reread = wanted  # a reload: judged by on_reload, once the config is complete
            return
        if _configured_pid == os.getpid() and wanted != _settings:
            raise InvalidConfigError(
                "shmctx.gunicorn.configure() was already called in this process with other "
                f"arguments ({'; '.join(_differences(wanted, _settings))}): call it once, "
                "in gunicorn.conf.py"
            )
        _settings.update(wanted)
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
    """Master: create (or adopt) the namespace and run its sweeper. shmctx's own log
    lines (the sweeper's) go to gunicorn's error log from here on, in the master and
    in the workers it forks."""
    route_logs(getattr(server.log, "error_log", None) or logging.getLogger("gunicorn.error"))
    m = _start_master()
    server.log.info("shmctx: master pid %d owns namespace %r", os.getpid(), m.namespace)


def on_reload(server: Any) -> None:
    """Master, on ``SIGHUP``, after gunicorn has read its configuration again and before
    it forks the new workers. The namespace stays as it is: ``on_starting`` does not run
    again, the new workers attach in ``post_fork``, the old ones return their references
    in ``worker_exit`` and ``child_exit`` reclaims whatever they left. Only reports: an
    exception here would end gunicorn's master without ``on_exit``."""
    global _reread
    try:
        with _lock:
            m, reread, _reread = _master, _reread, None
        if m is None or identity.pid != _master_pid:
            return
        # Compared with what runs, not with the first configure() call: asking again for
        # the config or mode the namespace already has changes nothing. No configure()
        # call in the re-read file asks for nothing.
        running: _Settings = {"namespace": m.namespace, "config": m.config,
                              "mode": m.mode}
        diffs = _differences(reread or {"namespace": None, "config": None, "mode": None},
                             running, running=True)
        if diffs:
            server.log.error(
                "shmctx: gunicorn.conf.py now asks for %s; a reload cannot change the "
                "namespace, its config or mode while workers use it: namespace %r keeps "
                "the settings it was created with (stop and start the server to apply them)",
                "; ".join(diffs), m.namespace)
        server.log.info("shmctx: reload keeps namespace %r; the new workers attach to it",
                        m.namespace)
    except Exception:  # never take gunicorn's master down for a report
        server.log.exception("shmctx: on_reload failed; the namespace is unchanged")


def pre_exec(server: Any) -> None:
    """Master, on ``SIGUSR2``, in the forked child about to exec the new master: tell it
    the namespace in use. (Deriving the default name again from ``GUNICORN_PID`` would
    name a new namespace from the second re-exec on, and strand this one.)"""
    if _master is not None:
        # gunicorn execs the new master with cfg.env_orig, not os.environ.
        env = getattr(server.cfg, "env_orig", None)
        if env is None:
            env = os.environ
        env[ENV_INHERITED] = _master.namespace


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


def _requested_namespace(namespace: str | None) -> str | None:
    """The namespace asked for by ``configure()`` or ``SHMCTX_NAMESPACE``, if any."""
    if namespace is not None:
        return namespace
    env = os.environ.get(ENV_NAMESPACE)
    return check_namespace(env) if env else None


def _resolve_namespace() -> str:
    requested = _requested_namespace(_settings["namespace"])
    predecessor = os.environ.get("GUNICORN_PID")  # set by gunicorn in a re-executed master
    inherited = os.environ.get(ENV_INHERITED) if predecessor else None
    if inherited:
        # Both masters serve at once until the old one is stopped: they must share one
        # namespace, or the old one, seeing the new one alive, would leave its own behind.
        if requested is not None and requested != inherited:
            raise InvalidConfigError(
                f"this master, re-executed by SIGUSR2 from master pid {predecessor}, must "
                f"keep its namespace {inherited!r}, but gunicorn.conf.py or "
                f"{ENV_NAMESPACE} asks for {requested!r}: the running master goes on "
                "serving; stop and start the server to change the namespace"
            )
        return check_namespace(inherited)
    if requested is not None:
        return requested
    # A predecessor without pre_exec (an older shmctx) is known only by its pid.
    return f"gunicorn-{predecessor or os.getpid()}"


def _differences(wanted: _Settings, have: _Settings, *, running: bool = False) -> list[str]:
    """``setting: wanted != have`` for each setting that differs. With ``running``,
    ``have`` is what the master runs with: a setting ``wanted`` leaves unset (None) then
    asks for nothing, and ``SHMCTX_NAMESPACE`` counts as asking for a namespace."""
    out: list[str] = []
    for key in ("namespace", "config", "mode"):
        new, old = wanted[key], have[key]
        if running and key == "namespace":
            new = _requested_namespace(wanted["namespace"])
        if new == old or (running and new is None):
            continue
        if isinstance(new, ContextConfig) and isinstance(old, ContextConfig):
            out += [f"config.{d}" for d in new.differences(old)]
        elif key == "mode":
            out.append(f"mode: {_octal(wanted['mode'])} != {_octal(have['mode'])}")
        else:
            out.append(f"{key}: {new!r} != {old!r}")
    return out


def _octal(mode: int | None) -> str:
    return oct(mode) if isinstance(mode, int) and not isinstance(mode, bool) else repr(mode)


def _start_master() -> ContextManager:
    global _master, _master_pid
    with _lock:
        if _master is None:
            ns = _resolve_namespace()
            _master = open_namespace(ns, _settings["config"], sweeper=True,
                                     mode=_settings["mode"])
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
