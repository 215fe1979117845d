"""Dask (``distributed``) integration: the worker processes of one host share one namespace.

Set it up with one line on the client, and reach the worker's manager in a task::

    from shmctx.dask import HostContexts, manager
    client.register_plugin(HostContexts(namespace="myapp"))

    def task(i):
        ctx, _ = manager().get_or_create_context("table", cfg, init=load_table)

``init`` runs once per host, however many workers and threads ask at once; every worker
of the host maps the same memory (see ``docs/dask.md``).

What runs where, with ``HostContexts`` (a ``NannyPlugin``, for workers with a nanny: the
default of ``LocalCluster(processes=True)``, ``dask worker``, dask-jobqueue, ...):

* nanny, ``setup``: opens the namespace as a *peer* of the other nanny processes of the
  host (the first creates it; one of them sweeps, another takes over if it dies), puts
  its name in the environment the nanny gives its worker (``nanny.env``, as distributed's
  own ``Environ`` plugin does), and watches the worker process. The nanny then restarts
  its worker (``restart = True``) so that the worker starts with that environment.
* worker, ``manager()``: attaches (never creates) one manager per worker process, made on
  first use and shared by the worker's threads.
* nanny, when its worker process exits (killed, out of memory, restarted): reclaims the
  dead worker's references at once, not at the next sweep.
* nanny, ``teardown`` (the nanny closes, or the plugin is unregistered): stops the worker
  first, reclaims what it held, then closes; the last process of the host leaving the
  namespace unlinks it, so nothing is left in ``/dev/shm``.

``PeerContexts`` (a ``WorkerPlugin``) is the same for workers without a nanny
(``LocalCluster(processes=False)``, ``dask worker --no-nanny``): each worker process is a
peer itself, and a killed worker's references are reclaimed by the sweep.

shmctx shares memory between the processes of one host and no further: on a cluster of
several hosts each host has its own copy of the namespace, built by its own ``init``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from distributed import get_worker
from distributed.core import Status
from distributed.diagnostics.plugin import NannyPlugin, WorkerPlugin

from ._config import ContextConfig
from ._errors import (
    ContextError,
    ContextInUseError,
    ContextManagerClosedError,
    ContextNotFoundError,
    InvalidConfigError,
)
from ._manager import ContextManager
from ._service import route_logs, service_config
from ._worker import WorkerManager, check_namespace

if TYPE_CHECKING:
    from distributed import Nanny, Worker

__all__ = ["HostContexts", "PeerContexts", "manager", "namespaces", "ENV_NAMESPACES", "LOGGER"]

ENV_NAMESPACES = "SHMCTX_DASK_NAMESPACES"
"""The variable a nanny sets in its worker's environment: the namespaces (separated by
spaces) that the worker attaches to."""

LOGGER = "distributed.shmctx"
"""The logger of this module's lines and, once a plugin or ``manager()`` ran in a process,
of shmctx's own (the sweeper's): under ``distributed``, whose handlers Dask configures."""

log = logging.getLogger(LOGGER)

# How often a nanny looks for a newly started worker process to watch. The exit of a
# watched worker is noticed at once (a pidfd); only a worker that attaches, takes
# references and dies within this long after starting is left to the sweeper.
WATCH_INTERVAL = 0.25


@dataclass
class _Open:
    """One namespace opened by this process for the plugins that use it. All nannies of
    a ``LocalCluster`` or of ``dask worker --nworkers N`` run in one process, and so do
    all workers of ``LocalCluster(processes=False)``: they share one manager, opened by
    the first user and closed (``unlink_if_last``) by the last."""

    peer: WorkerManager  # closes with unlink_if_last, and at exit if nobody did
    manager: ContextManager  # what ``peer`` opened: a nanny's reclaims go through it
    config: ContextConfig
    # ("nanny" or "worker", id) of each user of this manager
    users: set[tuple[str, int]] = field(default_factory=set[tuple[str, int]])

    @property
    def for_workers(self) -> bool:
        """Opened by ``PeerContexts`` for a worker of this process: ``manager()`` here
        returns it. (Nannies' managers are theirs; a task never runs in a nanny.)"""
        return any(kind == "worker" for kind, _ in self.users)


_lock = threading.Lock()
_open: dict[str, _Open] = {}
_attached: dict[str, WorkerManager] = {}  # worker side of HostContexts, per namespace
_watchers: dict[tuple[str, int], asyncio.Task[None]] = {}  # (namespace, id(nanny))
_routed_pid = 0


def _route_logs() -> None:
    """shmctx's log lines (the sweeper's, a reclaim's) go where Dask users look."""
    global _routed_pid
    if _routed_pid != os.getpid():
        route_logs(log)
        _routed_pid = os.getpid()


def _acquire(namespace: str, config: ContextConfig, user: tuple[str, int]) -> ContextManager:
    """Open ``namespace`` for ``user`` as a peer (or join this process's opening of it)."""
    with _lock:
        o = _open.get(namespace)
        if o is None:
            peer = WorkerManager(f"Dask {user[0]}", peer=True, config=config)
            peer.namespace = namespace
            m = peer.get()  # creates the namespace, or joins the host's; may raise
            _open[namespace] = o = _Open(peer, m, config)
        elif o.config != config:
            raise InvalidConfigError(
                f"namespace {namespace!r} is already open in pid {os.getpid()} with "
                f"{o.config!r} (asked != open: {'; '.join(config.differences(o.config))}): "
                "every HostContexts or PeerContexts of one namespace must give the same "
                "config"
            )
        else:
            m = o.peer.get()
        o.users.add(user)
        return m


def _release(namespace: str, user: tuple[str, int]) -> None:
    """``user`` is done with ``namespace``; the last user of this process closes it, and
    the last process of the host attached to it unlinks it."""
    with _lock:
        o = _open.get(namespace)
        if o is None or user not in o.users:
            return
        o.users.discard(user)
        if o.users:
            return
        del _open[namespace]
    if o.manager.closed:
        # The process is exiting, and its exit handler (WorkerManager's: registered after
        # distributed's, so run before distributed closes the cluster) has closed the
        # manager. If workers were still attached then, that close did not unlink the
        # namespace. They are stopped now: leave again, and unlink if this is the last.
        _leave_again(namespace)
    else:
        o.peer.close()  # unlink_if_last: a peer manager closes so
    log.info("pid %d closed namespace %r", os.getpid(), namespace)


def _leave_again(namespace: str, dead_pid: int | None = None) -> int:
    """For a process whose own manager of ``namespace`` was closed at exit, through a
    short-lived manager: reclaim ``dead_pid``'s references (returns how many), or, if
    None, leave the namespace, unlinking it if no live process is attached any more."""
    try:
        m = ContextManager(namespace=namespace, create=False, sweeper=False)
    except ContextNotFoundError:
        return 0  # the last process to leave has unlinked it
    try:
        return m.reclaim(dead_pid) if dead_pid is not None else 0
    finally:
        m.close(unlink_if_last=dead_pid is None)


def _holds(namespace: str, user: tuple[str, int], config: ContextConfig) -> bool:
    """Whether ``user`` opened ``namespace`` with ``config``. A plugin whose setup failed
    because the namespace is open with another config (a second registration with
    another config, under another name) has the same user but not the same config: its
    teardown must not undo the first plugin's set-up."""
    with _lock:
        o = _open.get(namespace)
        return o is not None and user in o.users and o.config == config


def _reclaim(namespace: str, pid: int) -> None:
    """Return the references dead worker ``pid`` held in ``namespace``."""
    # Under the lock: ``_release`` removes the namespace under it before closing, so a
    # reclaim never runs on (or reopens) a manager being closed.
    with _lock:
        o = _open.get(namespace)
        if o is None:
            return
        try:
            try:
                n = o.manager.reclaim(pid)
            except ContextManagerClosedError:  # by the exit handler: see _release
                n = _leave_again(namespace, pid)
        except ContextInUseError:
            log.warning("worker pid %d is still alive; its references in namespace %r "
                        "are left to the sweeper", pid, namespace)
            return
    if n:
        log.info("reclaimed %d reference(s) of dead worker pid %d in namespace %r",
                 n, pid, namespace)


async def _off_loop(call: Callable[[], None]) -> None:
    """Run ``call`` (a reclaim or a release: it waits for the table lock) in the event
    loop's default thread pool, so the loop goes on meanwhile.

    A script that ends without closing its ``LocalCluster`` has distributed close it in
    an exit handler, after the interpreter has shut down every thread pool: the pool
    then refuses work (RuntimeError, raised here, before anything ran). The call then
    runs in the loop's thread itself: at that point nothing else on the loop needs to
    go on, and the call is short (the table lock is taken over after ``lock_timeout``
    at worst).
    """
    loop = asyncio.get_running_loop()
    try:
        in_pool = loop.run_in_executor(None, call)
    except RuntimeError:
        call()
        return
    await in_pool


async def _exit_of(nanny: Nanny, pid: int) -> None:
    """Return when process ``pid`` (the nanny's worker) has exited.

    distributed tells a nanny that its worker exited through a callback it keeps to
    itself (``WorkerProcess.on_exit`` calls ``Nanny._on_worker_exit``); replacing that
    would be patching private internals. A pidfd (Linux 5.3+) becomes readable when the
    process exits, without reaping it (the nanny still reaps its own child), so it
    tells us as soon as the nanny could know. Without pidfds, watch ``nanny.pid`` (None
    once the nanny has reaped its worker).
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # already gone
    except (AttributeError, OSError):
        # (distributed annotates Nanny.pid as always an int; it is None while no worker
        # runs, which is what these comparisons wait for.)
        while nanny.pid == pid:  # pyright: ignore[reportUnnecessaryComparison]
            await asyncio.sleep(WATCH_INTERVAL)
        return
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()
    try:
        # A pid is reused only once its process is reaped, and the nanny reports its
        # worker's pid until it has reaped it: still reported now, the pidfd names the
        # worker, not a newcomer that got its pid.
        if nanny.pid != pid:  # pyright: ignore[reportUnnecessaryComparison]
            return
        def wake() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(fd, wake)
        try:
            await exited
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)


async def _watch(nanny: Nanny, namespace: str) -> None:
    """Reclaim the references of each worker process of ``nanny`` as it exits."""
    done = 0  # the last pid reclaimed: the nanny reports it until it has reaped it
    while True:
        pid = nanny.pid  # the worker process's pid while it runs, else None
        if pid is None or pid == done:
            await asyncio.sleep(WATCH_INTERVAL)
            continue
        try:
            await _exit_of(nanny, pid)
            await _off_loop(partial(_reclaim, namespace, pid))
        except Exception:  # keep watching: the sweeper reclaims what this one missed
            log.exception("reclaiming the references of worker pid %d in namespace %r "
                          "failed", pid, namespace)
        done = pid


def _check_args(namespace: object, config: object) -> tuple[str, ContextConfig]:
    return check_namespace(namespace), service_config(config)  # type: ignore[arg-type]


def _plugin_name(prefix: str, namespace: str, config: ContextConfig) -> str:
    """A plugin's name: the same for the same namespace and config, from any client, so
    registering it again is a no-op (``idempotent``); another config gives another name,
    so that registration reaches the nannies and fails there, loudly, instead of being
    dropped by the scheduler as a repeat. (The config's repr is canonical: its fields
    are normalised, durations to float seconds.)"""
    digest = hashlib.sha256(repr(config).encode()).hexdigest()[:8]
    return f"{prefix}-{namespace}-{digest}"


def _conflict(plugin: HostContexts | PeerContexts, error: InvalidConfigError) -> InvalidConfigError:
    """The error a plugin's setup raises when the namespace exists, or is open in this
    process, with another config."""
    nanny = isinstance(plugin, HostContexts)
    return InvalidConfigError(
        f"{plugin!r} (plugin {plugin.name!r}, with {plugin.config!r}) cannot be set up: "
        f"{error}. The namespace keeps the config it has. This plugin stays registered "
        f"with the scheduler, and fails again in every {'nanny' if nanny else 'worker'} "
        f"that joins: remove it with client.unregister_worker_plugin({plugin.name!r}"
        f"{', nanny=True' if nanny else ''})"
    )


class HostContexts(NannyPlugin):
    """Share the shmctx namespace ``namespace`` between all Dask workers of each host,
    with the nannies as supervisors. Register it once:
    ``client.register_plugin(HostContexts(namespace="myapp"))``; tasks then call
    ``shmctx.dask.manager()``.

    ``config`` is the namespace's ``ContextConfig`` (``SERVICE_DEFAULTS`` if None: no
    reference limit, no idle closing); a namespace that exists with another config is
    not joined (``InvalidConfigError``). Registering restarts the workers, which must
    start with the namespace in their environment; registering it again is a no-op
    (``idempotent``, named after the namespace and the config). Registering it with
    another config makes ``register_plugin`` raise ``InvalidConfigError``, naming both.
    Unregistering (``client.unregister_worker_plugin(plugin.name, nanny=True)``)
    restarts the workers without it and unlinks the namespace.

    Every host gets its own namespace of this name (each has its own ``/dev/shm``).
    Workers without a nanny never receive a ``NannyPlugin``: use ``PeerContexts``.
    """

    idempotent = True
    restart = True

    def __init__(self, namespace: str, *, config: ContextConfig | None = None) -> None:
        self.namespace, self.config = _check_args(namespace, config)
        self.name = _plugin_name("shmctx", self.namespace, self.config)

    # distributed declares NannyPlugin.setup/teardown as plain methods but awaits them when
    # they are coroutine functions, as its own plugins' are.
    async def setup(self, nanny: Nanny) -> None:  # pyright: ignore[reportIncompatibleMethodOverride]
        """Nanny: open the namespace, hand its name to the worker, watch the worker."""
        _route_logs()
        key = (self.namespace, id(nanny))
        try:
            await asyncio.to_thread(_acquire, self.namespace, self.config, ("nanny", id(nanny)))
        except InvalidConfigError as e:
            raise _conflict(self, e) from e
        _set_env(nanny.env, self.namespace, present=True)  # read when the worker starts
        if key not in _watchers:
            _watchers[key] = asyncio.create_task(_watch(nanny, self.namespace),
                                                 name=f"shmctx watch {self.name}")
        log.info("nanny pid %d opened namespace %r for its worker", os.getpid(),
                 self.namespace)

    async def teardown(self, nanny: Nanny) -> None:  # pyright: ignore[reportIncompatibleMethodOverride]
        """Nanny: stop the worker, reclaim what it held, close the namespace."""
        user = ("nanny", id(nanny))
        if not _holds(self.namespace, user, self.config):
            return  # setup failed: nothing to undo, no reason to stop the worker
        task = _watchers.pop((self.namespace, id(nanny)), None)
        if task is not None:
            task.cancel()
        _set_env(nanny.env, self.namespace, present=False)
        pid = nanny.pid
        try:
            if pid is not None:
                if nanny.status == Status.running:
                    # The plugin is being unregistered from a running nanny: the worker
                    # is restarted without the namespace, as registering restarted it
                    # with it.
                    await nanny.restart(reason=f"nanny-plugin-{self.name}-removed")
                else:
                    # The nanny is closing. It stops its worker only after every
                    # plugin's teardown, but the namespace can be unlinked only once no
                    # live process uses it: stop the worker now (the nanny's own stop
                    # then finds it stopped).
                    await nanny.kill(reason=f"nanny-plugin-{self.name}-teardown")
                await _off_loop(partial(_reclaim, self.namespace, pid))
        finally:
            # Even if the worker would not stop: this process leaves the namespace (it
            # is unlinked later by whichever process is the last to leave).
            await _off_loop(partial(_release, self.namespace, user))

    def __repr__(self) -> str:
        return f"HostContexts(namespace={self.namespace!r})"


class PeerContexts(WorkerPlugin):
    """Share the shmctx namespace ``namespace`` between Dask workers that have no nanny
    (``LocalCluster(processes=False)``, ``dask worker --no-nanny``):
    ``client.register_plugin(PeerContexts(namespace="myapp"))``.

    Each worker process is a peer: the first creates the namespace, one of them sweeps
    (another takes over if it dies), the last to close unlinks it. A killed worker's
    references are reclaimed by the sweep, within ``config.cleanup_interval``. Named
    after the namespace and the config, as ``HostContexts``.
    """

    idempotent = True

    def __init__(self, namespace: str, *, config: ContextConfig | None = None) -> None:
        self.namespace, self.config = _check_args(namespace, config)
        self.name = _plugin_name("shmctx-peer", self.namespace, self.config)

    async def setup(self, worker: Worker) -> None:
        """Worker: open the namespace (or join this process's opening of it)."""
        _route_logs()
        try:
            await asyncio.to_thread(_acquire, self.namespace, self.config,
                                    ("worker", id(worker)))
        except InvalidConfigError as e:
            raise _conflict(self, e) from e

    async def teardown(self, worker: Worker) -> None:
        """Worker: leave the namespace; the last process of the host unlinks it."""
        user = ("worker", id(worker))
        if _holds(self.namespace, user, self.config):  # else its setup failed
            await _off_loop(partial(_release, self.namespace, user))

    def __repr__(self) -> str:
        return f"PeerContexts(namespace={self.namespace!r})"


def namespaces() -> list[str]:
    """The namespaces a task of this worker process can reach through ``manager()``."""
    env = os.environ.get(ENV_NAMESPACES, "").split()
    with _lock:
        peers = [ns for ns, o in _open.items() if o.for_workers]
    return sorted(set(env) | set(peers))


def manager(namespace: str | None = None) -> ContextManager:
    """This worker process's manager of ``namespace``: created on first use, shared by
    the worker's threads, closed when the process exits.

    ``namespace`` may be left out when one ``HostContexts`` or ``PeerContexts`` is
    registered. Raises ``ContextError`` outside a worker set up by one of them.
    """
    if namespace is not None:
        check_namespace(namespace)
    with _lock:
        o = _open.get(namespace) if namespace is not None else None
        if o is not None and o.for_workers:
            return o.peer.get()
    available = namespaces()
    if namespace is None:
        if len(available) != 1:
            raise ContextError(_not_set_up() if not available else (
                f"this worker reaches several shmctx namespaces {available}: "
                "name one, manager(namespace=...)"))
        namespace = available[0]
    elif namespace not in available:
        raise ContextError(f"namespace {namespace!r} is not set up for this worker "
                           f"(it reaches {available or 'none'}); " + _not_set_up())
    with _lock:
        o = _open.get(namespace)
        if o is not None and o.for_workers:
            return o.peer.get()
        wm = _attached.get(namespace)
        if wm is None:
            wm = _attached[namespace] = WorkerManager("Dask worker")
            wm.namespace = namespace
    _route_logs()
    return wm.get()


def _not_set_up() -> str:
    try:
        no_nanny = get_worker().nanny is None
    except ValueError:  # not in a task
        return ("shmctx.dask.manager() works in Dask tasks of a cluster with "
                "client.register_plugin(HostContexts(namespace=...)) (workers with a "
                "nanny) or PeerContexts(namespace=...) (without); another process "
                "attaches with ContextManager(namespace=..., create=False)")
    if no_nanny:
        return ("this worker has no nanny, so it never gets HostContexts (a NannyPlugin): "
                "register PeerContexts(namespace=...) for nanny-less workers")
    return ("register HostContexts(namespace=...) with client.register_plugin() first; "
            "the nanny restarts the worker with the namespace")


def _set_env(env: dict[str, str], namespace: str, *, present: bool) -> None:
    """Add ``namespace`` to (or remove it from) the namespaces in the environment the
    nanny gives its worker. Changed in place: the nanny passes this very dict on."""
    have = [ns for ns in env.get(ENV_NAMESPACES, "").split() if ns != namespace]
    if present:
        have.append(namespace)
    if have:
        env[ENV_NAMESPACES] = " ".join(have)
    else:
        env.pop(ENV_NAMESPACES, None)
