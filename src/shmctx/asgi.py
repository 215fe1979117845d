"""ASGI servers (uvicorn, and any server that runs the ASGI lifespan protocol): every
worker process of one server shares one shmctx namespace.

Wrap the app, and reach the worker's manager with ``shmctx.asgi.manager()``
(see ``docs/asgi.md``)::

    app = shmctx.asgi.lifespan(app)                 # any ASGI app

or, inside a Starlette/FastAPI lifespan::

    async with shmctx.asgi.attached() as m:
        yield

What runs where:

* ``uvicorn app:app --workers N``: uvicorn's supervisor runs no user code, so the workers
  are *peers*. The first one to start creates the namespace; each one attaches when its
  lifespan starts up; one live worker leads the sweeper (it reclaims the references of
  dead workers every ``cleanup_interval``) and another takes the lead when it dies.
  When the server stops, the last worker to shut down unlinks the namespace; a worker
  that leaves while the server goes on (``--limit-max-requests``) only detaches, even
  if it is the last one attached, since its successor will attach (``docs/asgi.md``,
  "What runs where", says how a worker tells the two apart).
* ``gunicorn -k uvicorn_worker.UvicornWorker`` with the ``shmctx.gunicorn`` hooks: the
  gunicorn master owns the namespace (see ``docs/gunicorn.md``); this module then hands
  out the gunicorn worker's manager and leaves the namespace's lifetime to the master.

The namespace is, by priority: the ``namespace=`` argument, the ``SHMCTX_NAMESPACE``
environment variable, else ``asgi-<pid>`` where pid is the server's supervisor (the
process that started this worker: uvicorn's with ``--workers`` or ``--reload``, or a
gunicorn master) or, for a server running in a single process, that process itself. Two
servers on one host thus never share, or unlink, each other's contexts.

Blocking: getting or returning a context this worker has mapped before takes one short
lock and is safe on the event loop. A get that creates a context runs ``init`` in the
calling thread, and a get of a context another worker is still creating waits for it:
the ``async`` helpers here (``get_or_create_context``, ``context``, ...) run such calls in
a thread so that the worker's other requests go on meanwhile; ``locked`` waits for
``ctx.lock`` on the event loop without blocking it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any, TypeVar

from ._config import ContextConfig, MemoryContextConfig
from ._context import MemoryContext
from ._errors import ContextError, InvalidConfigError
from ._lock import ContextLock
from ._manager import ContextManager, return_at_block_end
from ._proc import identity, start_time
from ._service import route_logs, service_config
from ._worker import WorkerManager, check_namespace

__all__ = [
    "ENV_NAMESPACE",
    "lifespan",
    "attached",
    "manager",
    "namespace",
    "default_namespace",
    "get_or_create_context",
    "get_or_create_object",
    "get_context",
    "context",
    "publish",
    "publish_object",
    "locked",
]

ENV_NAMESPACE = "SHMCTX_NAMESPACE"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
T = TypeVar("T")

log = logging.getLogger("shmctx.asgi")

# The process's attachment. A worker has one manager whatever the number of wrapped apps
# or ``attached()`` blocks; it is closed when the last of them shuts down.
_lock = threading.Lock()
_peers: WorkerManager | None = None  # the peer manager of this process (not under gunicorn)
_gunicorn = False  # attached through shmctx.gunicorn: its master owns the namespace
_attachments = 0
_attached_pid = 0

# Whether a worker that leaves unlinks the namespace if it is the last process attached.
# uvicorn's supervisor replaces a worker that ended on its own (it reached
# --limit-max-requests, or the app made it exit) only when its next poll notices, so
# for a moment no worker may be attached while the server goes on: the last one out
# must not take the namespace, and what other processes published in it, along. So a
# worker unlinks only when its server is stopping or gone:
# * a stop signal reached it: uvicorn's supervisor stops its workers with SIGTERM, and
#   Ctrl-C sends SIGINT to the whole process group (a reload, SIGHUP, stops the old
#   workers only once the new ones run, so those are not the last);
# * it has no live supervisor: the server runs in one process, or the supervisor was
#   killed and nobody will replace the worker;
# * the stop signals could not be watched: the lifespan does not run in the main thread,
#   or the worker does not handle SIGTERM in Python, so its server does not stop it that
#   way (hypercorn's workers wait for an event their parent sets, and their parent lives
#   on until they have stopped).
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_stop_signalled_pid = 0  # the pid of the process a stop signal reached (0: none yet)
_unwatched_pid = 0  # the pid of a process whose stop signals could not be watched


# --- set-up -------------------------------------------------------------------------


def lifespan(
    app: ASGIApp,
    *,
    namespace: str | None = None,
    config: ContextConfig | None = None,
    logger: logging.Logger | str | None = "uvicorn.error",
) -> ASGIApp:
    """Wrap the ASGI ``app``: the returned app attaches this worker to the namespace when
    the server starts it up (ASGI ``lifespan.startup``) and detaches it at shutdown;
    every other scope goes to ``app`` unchanged.

    If ``app`` handles the lifespan protocol itself, its startup runs after the attach
    (it may use ``manager()``) and its shutdown before the detach (it may still return
    references). A failure of either (shmctx's attach, or ``app``'s startup) is reported
    to the server as ``lifespan.startup.failed``; uvicorn then stops. ``app`` is taken not
    to handle the protocol if it returns, or raises, without having read
    ``lifespan.startup``.

    ``config`` is the namespace's ``ContextConfig`` if this worker creates it (default
    ``shmctx.SERVICE_DEFAULTS``: unlimited references, no idle closing); an explicit one
    must equal that of an existing namespace. ``logger`` receives shmctx's log lines
    (``None``: leave shmctx's logging as it is).
    """
    if not callable(app):
        raise TypeError(f"lifespan() wraps an ASGI app, not {app!r}")
    _check_args(namespace, config)
    return _Lifespan(app, namespace, config, logger)


@asynccontextmanager
async def attached(
    namespace: str | None = None,
    *,
    config: ContextConfig | None = None,
    logger: logging.Logger | str | None = "uvicorn.error",
) -> AsyncGenerator[ContextManager, None]:
    """``async with shmctx.asgi.attached() as m:`` attaches this worker for the block's
    duration (in a Starlette/FastAPI lifespan: around its ``yield``); ``m`` is the
    worker's manager, the one ``manager()`` returns. Arguments as for ``lifespan``.
    Attaching and detaching run in a thread: they may wait for the namespace's lock."""
    _check_args(namespace, config)
    m = await _join(namespace, config, logger)
    try:
        yield m
    finally:
        await _leave()


def manager() -> ContextManager:
    """This worker's manager (shared by its coroutines and threads). ``ContextError``
    outside an attached lifespan: wrap the app with ``lifespan()`` or use
    ``attached()``."""
    if _attachments <= 0:
        raise ContextError(_NOT_SET_UP)
    if _gunicorn:
        from . import gunicorn

        return gunicorn.manager()
    assert _peers is not None
    return _peers.get()


def namespace() -> str:
    """The namespace this worker is attached to."""
    return manager().namespace


def default_namespace() -> str:
    """The namespace used when neither ``namespace=`` nor ``SHMCTX_NAMESPACE`` names one:
    ``asgi-<pid>`` of the process that started this worker if it is a server's
    supervisor (a ``multiprocessing`` parent, as uvicorn's with ``--workers`` or
    ``--reload``, or a gunicorn master), else of this process (a server running in a
    single process: its parent is a shell, which may start several servers)."""
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid:
        return f"asgi-{parent.pid}"
    if "gunicorn.arbiter" in sys.modules and os.getppid() > 1:
        return f"asgi-{os.getppid()}"  # a gunicorn worker; its master forked it
    return f"asgi-{os.getpid()}"


# --- async helpers --------------------------------------------------------------------


async def get_or_create_context(
    name: str,
    config: MemoryContextConfig | None = None,
    *,
    init: Callable[[MemoryContext], object] | None = None,
    timeout: float | None = None,
) -> tuple[MemoryContext, bool]:
    """``manager().get_or_create_context(...)`` in a thread: ``init`` (in the worker that
    creates the context), or the wait for another worker's ``init``, does not hold up
    this worker's other requests. If the awaiting task is cancelled, the reference the
    thread still obtains is given back."""
    m = manager()
    return await _off_loop(
        m, lambda: m.get_or_create_context(name, config, init=init, timeout=timeout),
        lambda r: r[0])


async def get_or_create_object(
    name: str, factory: Callable[[], object], *, timeout: float | None = None
) -> tuple[MemoryContext, bool]:
    """``manager().get_or_create_object(...)`` in a thread (as ``get_or_create_context``)."""
    m = manager()
    return await _off_loop(m, lambda: m.get_or_create_object(name, factory, timeout=timeout),
                           lambda r: r[0])


async def get_context(name: str, *, timeout: float | None = None) -> MemoryContext:
    """``manager().get_context(...)`` in a thread: it waits for a context still being
    initialised."""
    m = manager()
    return await _off_loop(m, lambda: m.get_context(name, timeout=timeout), lambda r: r)


async def publish(
    name: str,
    config: MemoryContextConfig | None = None,
    *,
    init: Callable[[MemoryContext], object] | None = None,
    timeout: float | None = None,
) -> MemoryContext:
    """``manager().publish(...)`` in a thread: the new version is built (``init``) there."""
    m = manager()
    return await _off_loop(m, lambda: m.publish(name, config, init=init, timeout=timeout),
                           lambda r: r)


async def publish_object(
    name: str,
    obj: object = None,
    *,
    factory: Callable[[], object] | None = None,
    timeout: float | None = None,
) -> MemoryContext:
    """``manager().publish_object(...)`` in a thread (pickling a large object takes a
    while)."""
    m = manager()
    return await _off_loop(
        m, lambda: m.publish_object(name, obj, factory=factory, timeout=timeout), lambda r: r)


@asynccontextmanager
async def context(
    name: str,
    config: MemoryContextConfig | None = None,
    *,
    init: Callable[[MemoryContext], object] | None = None,
    timeout: float | None = None,
) -> AsyncGenerator[MemoryContext, None]:
    """``async with shmctx.asgi.context(name, ...) as ctx:``: the get as
    ``get_or_create_context`` (in a thread), the return on exit (on the event loop: a
    return never waits for long), also when the block raises."""
    m = manager()
    ctx, _ = await get_or_create_context(name, config, init=init, timeout=timeout)
    try:
        yield ctx
    finally:
        return_at_block_end(m, ctx)


@asynccontextmanager
async def locked(ctx: MemoryContext, *, timeout: float | None = None) -> AsyncGenerator[None, None]:
    """``async with shmctx.asgi.locked(ctx):`` holds ``ctx.lock`` across ``await``s.

    Use it instead of ``with ctx.lock:`` in a coroutine whose critical section awaits.
    ``ctx.lock`` is re-entrant for the *thread* that holds it, and every coroutine of a
    worker runs in the event loop's one thread: under a plain ``with ctx.lock:`` another
    request's coroutine would enter the section while this one awaits. ``locked`` first
    queues the coroutines of this worker that use it on this context (one
    ``asyncio.Lock`` per context and event loop), then takes ``ctx.lock`` against the
    other processes, in the event loop's thread: at once if it is free, else by trying
    again at short intervals, so that the wait for another process does not hold up
    this worker's other requests. ``TimeoutError`` if this block cannot start within ``timeout``
    seconds: one deadline for the whole wait, behind this worker's coroutines and then
    behind other processes. Not re-entrant: ``RuntimeError`` when a task asks for a
    context it already holds through ``locked``, instead of waiting for itself.

    Within one worker only ``locked`` keeps coroutines out of each other's sections:
    a plain ``with ctx.lock:``, ``ctx.get()`` or ``ctx.put()`` on the event loop
    re-enters the lock this block holds (the loop's thread holds it), so it must not
    await inside (see ``docs/asgi.md``). Not fair against another process that takes
    ``ctx.lock`` again and again with blocking waits: pass ``timeout`` to bound the
    wait."""
    lock = ctx.lock
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    local = _local_lock(lock, loop)
    task = asyncio.current_task()
    if task is not None and local.task is task:
        raise RuntimeError(
            f"shmctx.asgi.locked() is not re-entrant: this task already holds {lock.what} "
            "through an enclosing locked() block, and would wait for itself"
        )
    if not await _queue(local.queue, deadline):
        raise TimeoutError(f"timed out after {timeout}s waiting for {lock.what}")
    try:
        local.task = task
        await _take_on_loop(lock, deadline, timeout)
        try:
            yield
        finally:
            lock.release()  # in the loop's thread, which took it
    finally:
        local.task = None
        local.queue.release()


# --- internals --------------------------------------------------------------------------

_NOT_SET_UP = (
    "shmctx.asgi: this process is not attached to a namespace: wrap the app with "
    "`app = shmctx.asgi.lifespan(app)`, or enter `async with shmctx.asgi.attached():` in "
    "its lifespan (uvicorn runs the lifespan in each worker before it serves)"
)


def _check_args(namespace: str | None, config: ContextConfig | None) -> None:
    if namespace is not None:
        check_namespace(namespace)
    service_config(config)  # type check


def _resolve_namespace(namespace: str | None) -> str:
    if namespace is not None:
        return namespace
    env = os.environ.get(ENV_NAMESPACE)
    return check_namespace(env) if env else default_namespace()


def _gunicorn_namespace() -> str | None:
    """The namespace of the gunicorn master this process is a worker of, if the
    ``shmctx.gunicorn`` hooks are wired into that gunicorn (its master made the
    namespace before forking this worker); else None."""
    mod = sys.modules.get(f"{__package__}.gunicorn")
    if mod is None:
        return None
    try:
        return mod.namespace()  # type: ignore[no-any-return]
    except ContextError:
        return None


def _attach(namespace: str | None, config: ContextConfig | None,
            logger: logging.Logger | str | None) -> ContextManager:
    """Attach this process (once; further calls count). Blocking: run it in a thread."""
    global _peers, _gunicorn, _attachments, _attached_pid
    if logger is not None:
        route_logs(logging.getLogger(logger) if isinstance(logger, str) else logger)
    with _lock:
        if _attached_pid != identity.pid:  # nothing inherited over fork is this process's
            _attachments, _attached_pid = 0, identity.pid
        if _attachments == 0:
            _gunicorn = False
            served = _gunicorn_namespace()
            if served is not None:
                from . import gunicorn

                m = gunicorn.manager()
                _check_same(m, namespace, config, "gunicorn's master created")
                _gunicorn = True
                log.info("shmctx: worker pid %d uses namespace %r of its gunicorn master",
                         identity.pid, m.namespace)
            else:
                ns = _resolve_namespace(namespace)
                if _peers is None or _peers.namespace != ns or _peers.config != config:
                    _peers = WorkerManager("ASGI", peer=True, config=config)
                    _peers.namespace = ns
                m = _peers.get()
                log.info("shmctx: worker pid %d attached to namespace %r", identity.pid, ns)
        else:
            m = manager()
            _check_same(m, namespace, config, "this worker is attached to")
        _attachments += 1
        return m


def _check_same(m: ContextManager, namespace: str | None, config: ContextConfig | None,
                what: str) -> None:
    """A second attachment in one process (or one under gunicorn) must not ask for
    another namespace or config than what is there: a process has one manager. (Only an
    explicit ``namespace``: SHMCTX_NAMESPACE chose the one there, or was overridden by
    ``shmctx.gunicorn.configure()``.)"""
    if namespace is not None and namespace != m.namespace:
        raise InvalidConfigError(
            f"shmctx.asgi: namespace {namespace!r} asked for, but {what} namespace "
            f"{m.namespace!r}: one worker process uses one namespace")
    if config is not None and config != m.config:
        raise InvalidConfigError(
            f"shmctx.asgi: namespace {m.namespace!r} has another config than the one asked "
            f"for (requested != existing): {'; '.join(config.differences(m.config))}")


def _detach() -> None:
    """Undo one ``_attach``; the last one closes the manager. A peer then unlinks the
    namespace if it is the last process attached and its server is stopping
    (``_server_stops``). Blocking: run it in a thread."""
    global _attachments
    with _lock:
        if _attached_pid != identity.pid or _attachments <= 0:
            return
        _attachments -= 1
        if _attachments or _gunicorn or _peers is None:
            return  # under gunicorn, the worker_exit / child_exit hooks close it
        peers = _peers
    unlink = _server_stops()
    if not unlink:
        log.info("shmctx: worker pid %d detached from namespace %r while its server goes "
                 "on (its supervisor starts another worker): the namespace stays",
                 identity.pid, peers.namespace)
    # Logs, rather than raises, a failure: nothing to undo at shutdown.
    peers.close(unlink_if_last=unlink)
    if not unlink and peers.namespace is not None:
        _start_watcher(peers.namespace)


def _start_watcher(namespace: str) -> None:
    """Have a process that outlives this worker unlink the namespace once the supervisor
    has exited, if nobody is attached then (``shmctx._watcher``). This worker may be the
    last one attached, and the server may be stopped before its successor attaches: the
    supervisor then starts no successor, and no worker is left to unlink. In a session of
    its own, so that a Ctrl-C to the server's process group does not end it too."""
    parent = multiprocessing.parent_process()
    start = start_time(parent.pid) if parent is not None and parent.pid else None
    if parent is None or start is None:
        return  # no supervisor, or gone already (then the workers unlink)
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_dir, env.get("PYTHONPATH")) if p)
    try:
        subprocess.Popen(
            [sys.executable, "-m", f"{__package__}._watcher", namespace, str(parent.pid),
             str(start)],
            stdin=subprocess.DEVNULL, env=env, close_fds=True, start_new_session=True)
    except OSError:
        log.warning("shmctx: worker pid %d could not start the process that removes "
                    "namespace %r once its server has stopped: if the server stops before "
                    "another worker attaches, the namespace stays", identity.pid, namespace,
                    exc_info=True)


def _server_stops() -> bool:
    """Whether this worker leaves because its server stops, or with nobody to replace
    it (see ``_STOP_SIGNALS``): only then may the last one out unlink the namespace."""
    if identity.pid in (_stop_signalled_pid, _unwatched_pid):
        return True
    parent = multiprocessing.parent_process()
    return parent is None or not parent.is_alive()


class _StopSignalWatch:
    """A handler of a stop signal that notes it, then hands it to the handler it
    replaced (under uvicorn, ``Server.handle_exit``, which stops the server)."""

    def __init__(self, previous: Callable[[int, FrameType | None], Any] | int) -> None:
        self.previous = previous

    def __call__(self, signum: int, frame: FrameType | None) -> Any:
        global _stop_signalled_pid
        _stop_signalled_pid = identity.pid
        previous = self.previous
        if callable(previous):
            result = previous(signum, frame)
            # A second Ctrl-C makes uvicorn's handler set ``force_exit`` (public): its
            # server then skips the lifespan shutdown, and once it has stopped it raises
            # the signals it caught again, which may end the process (a SIGTERM from the
            # supervisor) before the event loop would cancel the lifespan task, whose
            # ``finally`` detaches. So have that task cancelled now, while the loop still
            # runs. Not detached here: this handler may have interrupted the main thread
            # inside a shmctx lock, and a detach takes that lock.
            if getattr(getattr(previous, "__self__", None), "force_exit", False) is True:
                _end_lifespans_soon()
            return result
        # SIG_DFL: what the signal does without a handler, end the process.
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
        return None


# The lifespan tasks of this process that have attached and wait for lifespan.shutdown:
# what a forced exit, which skips that message, must cancel so that they detach.
_awaiting_shutdown: set[asyncio.Task[Any]] = set()


def _end_lifespans_soon() -> None:
    """From a signal handler: have each lifespan task waiting for ``lifespan.shutdown``
    cancelled by its event loop, as soon as the handler has returned (the loop is woken
    up if it waits)."""
    for task in list(_awaiting_shutdown):
        try:
            task.get_loop().call_soon_threadsafe(_end_lifespan, task)
        except RuntimeError:
            pass  # its loop is closed: the task has ended with it


def _end_lifespan(task: asyncio.Task[Any]) -> None:
    if task in _awaiting_shutdown:  # else the shutdown came after all: it detaches
        task.cancel()


def _watch_stop_signals() -> None:
    """Have the stop signals that reach this process from now on noted, by wrapping
    their current handlers. Runs in the event loop's thread as the lifespan starts up:
    uvicorn has installed its own handlers then (with ``signal.signal``, before it runs
    the lifespan), and when the server has stopped it puts back the ones it found,
    which removes the wrappers too. Python lets only the main thread set handlers."""
    global _unwatched_pid
    if threading.current_thread() is not threading.main_thread():
        _unwatched_pid = identity.pid
        return
    global _stop_signalled_pid
    for sig in _STOP_SIGNALS:
        previous = signal.getsignal(sig)
        if isinstance(previous, _StopSignalWatch):
            continue  # noted already (another app or attachment)
        # A stop signal that came while this worker was starting, before these wrappers
        # existed (Ctrl-C as the server boots), reached only the server's handler. uvicorn's
        # (``Server.handle_exit``) then has set ``should_exit``, the public flag that stops
        # its server: a server told to stop before it served is not leaving for its
        # request limit, so that counts as a stop signal.
        if getattr(getattr(previous, "__self__", None), "should_exit", False) is True:
            _stop_signalled_pid = identity.pid
        if sig == signal.SIGTERM and not callable(previous):
            # The server does not stop this worker gracefully on SIGTERM (it is left to
            # its default, ignored, or handled outside Python), so it stops it some other
            # way (hypercorn's workers wait for an event their parent sets): a stop cannot
            # be told from a worker leaving on its own.
            _unwatched_pid = identity.pid
        if previous is None or previous == signal.SIG_IGN:
            continue  # set outside Python (could not be put back), or cannot stop us
        signal.signal(sig, _StopSignalWatch(previous))


def _unwatch_stop_signals() -> None:
    """Put back the handlers ``_watch_stop_signals`` wrapped, once this process has
    detached (a server that restores its own handlers, as uvicorn does, has removed the
    wrappers already; another program would keep them for good)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in _STOP_SIGNALS:
        current = signal.getsignal(sig)
        if isinstance(current, _StopSignalWatch):
            signal.signal(sig, current.previous)


async def _join(namespace: str | None, config: ContextConfig | None,
                logger: logging.Logger | str | None) -> ContextManager:
    """``_attach`` in a thread. If the awaiting task is cancelled meanwhile (the server
    stops during startup), the attachment the thread still makes is undone."""
    _watch_stop_signals()
    fut = asyncio.get_running_loop().run_in_executor(None, _attach, namespace, config, logger)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        fut.add_done_callback(
            lambda f: None if f.cancelled() or f.exception() is not None else _detach())
        raise


async def _leave() -> None:
    """Detach in a thread; if the awaiting task is cancelled meanwhile, the detach still
    completes there (``asyncio.run`` waits for its threads before it returns)."""
    await asyncio.shield(asyncio.get_running_loop().run_in_executor(None, _detach))
    if _attachments <= 0:
        _unwatch_stop_signals()


async def _off_loop(m: ContextManager, call: Callable[[], T],
                    reference_of: Callable[[T], MemoryContext]) -> T:
    """Run ``call`` (a get, which returns a reference) in the default executor. A
    cancelled awaiter cannot stop the thread: the reference it obtains is given back
    when it finishes, not leaked for the life of the worker."""
    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(None, contextvars.copy_context().run, call)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        def give_back(f: asyncio.Future[T]) -> None:
            if f.cancelled() or f.exception() is not None:
                return
            try:
                m.return_context(reference_of(f.result()))
            except ContextError:
                pass  # the manager closed meanwhile: it returned everything
        fut.add_done_callback(give_back)
        raise


class _LocalLock:
    """The queue of this worker's coroutines in front of one ctx.lock, in one event
    loop, and the task that is through it (to refuse a nested ``locked``, which would
    wait for itself)."""

    __slots__ = ("loop", "queue", "task")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue = asyncio.Lock()
        self.task: asyncio.Task[Any] | None = None


class _LocalLocks(threading.local):
    """Per thread, one ``_LocalLock`` per ctx.lock object (the manager keeps one object
    per context incarnation). An ``asyncio.Lock`` belongs to the one event loop that
    first waits on it and is not thread-safe, while a process may run loops one after
    another (``asyncio.run`` twice, a fresh loop per test) or at once in several
    threads. A thread runs one loop at a time, so a queue kept per thread, and made
    anew when the thread runs another loop, is always its loop's own. Coroutines of
    loops in different threads are kept apart by ctx.lock itself, which is re-entrant
    only for the thread that holds it."""

    def __init__(self) -> None:
        self.by_lock: weakref.WeakKeyDictionary[ContextLock, _LocalLock] = (
            weakref.WeakKeyDictionary())


_local_locks = _LocalLocks()

# How long ``locked`` waits before it tries a busy ctx.lock again: from the first pause
# to the last, doubling. The holder is another process (or another thread), and asyncio
# has nothing to await for that: the lock is a POSIX semaphore, and waiting on it blocks
# a thread. So the event loop's thread tries it without waiting, and sleeps in between;
# the cap bounds how late a release is noticed, at 50 cheap tries a second at most.
_RETRY_FIRST = 0.001
_RETRY_MAX = 0.02


def _local_lock(lock: ContextLock, loop: asyncio.AbstractEventLoop) -> _LocalLock:
    by_lock = _local_locks.by_lock
    local = by_lock.get(lock)
    if local is None or local.loop is not loop:
        local = by_lock[lock] = _LocalLock(loop)
    return local


async def _queue(queue: asyncio.Lock, deadline: float | None) -> bool:
    """Take ``queue`` (this worker's turn), waiting until the loop's time ``deadline``
    at most: False when it ran out first."""
    if deadline is None:
        await queue.acquire()
        return True
    # The wait runs in a task of its own that is never cancelled by the deadline, only
    # given up: cancelling the wait itself could lose a turn granted at that moment.
    # A task cancelled before it has the lock ends without it (asyncio.Lock passes the
    # turn on); one that got it is given back here when its awaiter leaves.
    loop = asyncio.get_running_loop()
    waiter = loop.create_task(queue.acquire())
    try:
        await asyncio.wait({waiter}, timeout=max(0.0, deadline - loop.time()))
    except BaseException:  # this coroutine is cancelled: it won't use its turn
        if not waiter.done():
            waiter.cancel()
        elif not waiter.cancelled() and waiter.exception() is None:
            queue.release()
        raise
    if not waiter.done():
        waiter.cancel()
        return False
    waiter.result()  # raises what the wait raised, if anything
    return True


async def _take_on_loop(lock: ContextLock, deadline: float | None,
                        timeout: float | None) -> None:
    """Take ``lock`` in the event loop's thread (this one) without blocking the loop.

    Not in a helper thread that would hold it for the coroutine: that thread would wait
    for the coroutine's block to end, which needs the loop, and a plain ``ctx.get()`` on
    the loop meanwhile would wait for that thread's hold: the worker would hang. Held by
    the loop's thread, the lock lets such a call re-enter instead.

    A holder that dies never releases the lock. A waiter blocked in ``acquire`` takes it
    over; so does this one, at a look every ``lock_timeout`` of waiting: a dead owner
    recorded in the lock is taken over at once. A lock taken with no owner recorded (its
    holder died between taking it and recording itself) only a blocking ``acquire`` can
    condemn, after watching it for a ``lock_timeout``: when two looks in a row see that
    same hold, a thread waits for the lock that way, and gives it back at once. A hold
    that this process's own thread left behind (the thread ended holding it) is
    recovered at a look too, as a blocking ``acquire`` would: otherwise every process
    would wait for that live owner without end.

    ``deadline`` (on the loop's clock) is the caller's, who has already waited in this
    worker's queue; ``timeout`` only names the wait in the ``TimeoutError``.

    Not fair: while another process waits in a blocking ``acquire``, each release wakes
    it, and tries made every few milliseconds rarely find the lock free against one
    that takes it again and again. A thread could win that race only by holding the
    lock, and a hold by any thread but the loop's can hang the worker (above); ctx.lock
    cannot hand a hold from one thread to another."""
    if lock.try_acquire(0):
        return
    loop = asyncio.get_running_loop()
    now = loop.time()
    next_look = now + lock.timeout
    unrecorded: int | None = None  # epoch of a hold seen with no owner recorded
    pause = _RETRY_FIRST
    while True:
        if deadline is not None and now >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {lock.what}")
        if now >= next_look:
            next_look = now + lock.timeout
            owner = lock.owner()
            if owner.pid == 0 and owner.epoch == unrecorded:
                await _wait_in_thread(lock, None if deadline is None else deadline - now,
                                      timeout)
                unrecorded = None
            elif not (lock.recover_leaked() or lock.recover_if_owner_dead()):
                # (True: taken over and released.) Neither: a live holder, or one that
                # has not recorded itself (yet, or ever: it died in between).
                unrecorded = owner.epoch if owner.pid == 0 else None
        else:
            await asyncio.sleep(pause if deadline is None else min(pause, deadline - now))
            pause = min(2 * pause, _RETRY_MAX)
        if lock.try_acquire(0):
            return
        now = loop.time()


async def _wait_in_thread(lock: ContextLock, left: float | None,
                          timeout: float | None) -> None:
    """Wait until ``lock`` can be taken, in a blocking ``acquire`` (which takes it over
    from a dead holder), in a thread that gives it back at once: it never holds the lock
    while it waits for anything. A thread of its own, not the loop's executor: a wait
    that outlives its awaiter (cancelled; a thread cannot be stopped) must not hold up
    the executor's shutdown when the worker stops."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if done.done():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def wait() -> None:
        error: BaseException | None = None
        try:
            lock.acquire(left)
            lock.release()
        except TimeoutError:
            error = TimeoutError(f"timed out after {timeout}s waiting for {lock.what}")
        except BaseException as e:  # handed to the awaiter
            error = e
        try:
            loop.call_soon_threadsafe(settle, error)
        except RuntimeError:
            pass  # the loop is closed: nobody awaits it any more

    threading.Thread(target=wait, name="shmctx ctx.lock waiter", daemon=True).start()
    await done


_LIFESPAN_SENT = frozenset({"lifespan.startup.complete", "lifespan.startup.failed",
                            "lifespan.shutdown.complete", "lifespan.shutdown.failed"})


class _Lifespan:
    """The app ``lifespan()`` returns."""

    def __init__(self, app: ASGIApp, namespace: str | None, config: ContextConfig | None,
                 logger: logging.Logger | str | None) -> None:
        self.app = app
        self._namespace = namespace
        self._config = config
        self._logger = logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        message = await receive()
        if message["type"] != "lifespan.startup":
            raise RuntimeError(f"ASGI lifespan: expected lifespan.startup, got "
                               f"{message['type']!r}")
        try:
            await _join(self._namespace, self._config, self._logger)
        except Exception as e:
            if not isinstance(e, ContextError):
                log.exception("shmctx: attaching worker pid %d failed", identity.pid)
            await send({"type": "lifespan.startup.failed", "message": f"shmctx: {e}"})
            return
        inner = _InnerLifespan(self.app, scope)
        attached = True
        try:
            failure = await inner.startup()
            if failure is not None:
                attached = False
                await _leave()
                await send({"type": "lifespan.startup.failed", "message": failure})
                return
            await send({"type": "lifespan.startup.complete"})
            task = asyncio.current_task()
            assert task is not None
            _awaiting_shutdown.add(task)
            try:
                message = await receive()
            finally:
                _awaiting_shutdown.discard(task)
            if message["type"] != "lifespan.shutdown":
                raise RuntimeError(f"ASGI lifespan: expected lifespan.shutdown, got "
                                   f"{message['type']!r}")
            failure = await inner.shutdown()
            attached = False
            await _leave()
            if failure is None:
                await send({"type": "lifespan.shutdown.complete"})
            else:
                await send({"type": "lifespan.shutdown.failed", "message": failure})
            await inner.ended()
        finally:
            if attached:  # cancelled (the server stopped without a shutdown) or failed
                _detach()
            inner.cancel()


class _InnerLifespan:
    """Runs the wrapped app's lifespan, if it has one, one step at a time."""

    def __init__(self, app: ASGIApp, scope: Scope) -> None:
        self._app = app
        self._scope = scope
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._from_app: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._read_startup = False
        self._running = False  # it completed its startup and awaits the shutdown

    async def _receive(self) -> Message:
        message = await self._to_app.get()
        if message["type"] == "lifespan.startup":
            self._read_startup = True
        return message

    async def _send(self, message: Message) -> None:
        if message.get("type") not in _LIFESPAN_SENT:
            raise RuntimeError(f"ASGI lifespan: the app sent {message.get('type')!r}")
        await self._from_app.put(message)

    async def _next(self) -> Message | BaseException | None:
        """The app's next message, or how it ended: None (it returned) or the
        exception it raised."""
        assert self._task is not None
        getting = asyncio.ensure_future(self._from_app.get())
        try:
            await asyncio.wait({getting, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getting.done():
                getting.cancel()
        if getting.done() and not getting.cancelled():
            return getting.result()
        if not self._from_app.empty():
            return self._from_app.get_nowait()
        if self._task.cancelled():
            return asyncio.CancelledError()
        return self._task.exception()

    async def startup(self) -> str | None:
        """Start the app's lifespan; None if it completed its startup (or has no
        lifespan), else why it failed."""
        self._task = asyncio.ensure_future(self._app(self._scope, self._receive, self._send))
        # Whatever it raises is reported through _next, or not at all once this wrapper
        # has what it needs: never as "Task exception was never retrieved".
        self._task.add_done_callback(lambda t: t.cancelled() or t.exception())
        await self._to_app.put({"type": "lifespan.startup"})
        outcome = await self._next()
        if isinstance(outcome, MutableMapping):
            if outcome["type"] == "lifespan.startup.complete":
                self._running = True
                return None
            if outcome["type"] == "lifespan.startup.failed":
                return outcome.get("message") or "the app's lifespan startup failed"
            return f"the app sent {outcome['type']!r} before lifespan.startup.complete"
        if outcome is None or not self._read_startup:
            # Returned, or raised before reading lifespan.startup (as an HTTP-only app
            # does on a scope it does not know): it has no lifespan of its own.
            log.debug("shmctx: the wrapped app does not handle the lifespan protocol (%r)",
                      outcome)
            return None
        log.error("shmctx: the wrapped app's lifespan startup raised", exc_info=outcome)
        return f"the app's lifespan startup raised {type(outcome).__name__}: {outcome}"

    async def shutdown(self) -> str | None:
        """Forward the shutdown to a running app lifespan; None if it completed."""
        if not self._running:
            return None
        self._running = False
        await self._to_app.put({"type": "lifespan.shutdown"})
        outcome = await self._next()
        if isinstance(outcome, MutableMapping):
            if outcome["type"] == "lifespan.shutdown.complete":
                return None
            if outcome["type"] == "lifespan.shutdown.failed":
                return outcome.get("message") or "the app's lifespan shutdown failed"
            return f"the app sent {outcome['type']!r} instead of lifespan.shutdown.complete"
        if outcome is None:
            return None
        log.error("shmctx: the wrapped app's lifespan shutdown raised", exc_info=outcome)
        return f"the app's lifespan shutdown raised {type(outcome).__name__}: {outcome}"

    async def ended(self) -> None:
        """Wait for the app's lifespan to return after its shutdown."""
        if self._task is not None and not self._task.done():
            await asyncio.wait({self._task})

    def cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
