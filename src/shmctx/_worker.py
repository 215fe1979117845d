"""The worker side shared by the server and pool integrations: one ``ContextManager``
per worker process, made on first use and closed when the process exits.

A worker either attaches to a namespace its supervisor (gunicorn master, pool parent,
Celery's main process, a Dask nanny) created, or, where no process outlives the workers
to supervise them (uvicorn's workers, nanny-less Dask workers), is a *peer*: it creates
the namespace if it is the first, takes part in the sweeper leadership (one live peer
sweeps, another takes over when it dies), and the last peer to leave unlinks it.

A worker never reuses a manager object it inherited over fork: that object's references
belong to the parent (the core refuses to return them), and its table file descriptor
shares the parent's open file description. Each worker pid gets its own manager.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading

from ._config import ContextConfig
from ._errors import ContextError, ContextManagerClosedError, ContextNotFoundError
from ._manager import ContextManager
from ._proc import identity
from ._service import open_namespace
from ._shm import check_namespace

log = logging.getLogger("shmctx.worker")

__all__ = ["check_namespace", "attach", "WorkerManager"]


def attach(namespace: str) -> ContextManager:
    """A non-sweeping manager of the existing namespace ``namespace``.

    A worker must not create the namespace: one made after the supervisor unlinked its
    own would be shared with nobody and left behind in /dev/shm.
    """
    check_namespace(namespace)
    # create=False: a namespace unlinked between a check and the open could otherwise
    # be made again here.
    try:
        return ContextManager(namespace=namespace, create=False, sweeper=False)
    except ContextNotFoundError:
        raise ContextError(
            f"namespace {namespace!r} does not exist: the supervising process (gunicorn "
            "master, pool parent) must create it before its workers attach, and keep it "
            "until they are gone"
        ) from None


class WorkerManager:
    """The ``ContextManager`` of the current worker process, created once per pid.

    Thread-safe: the threads of a worker (gunicorn ``gthread``) share one manager.
    """

    def __init__(self, what: str, *, peer: bool = False,
                 config: ContextConfig | None = None) -> None:
        self._what = what  # names the integration in error messages
        self._peer = peer
        # A peer without a config adopts the namespace's, or creates it with the service
        # defaults; an explicit one must match the table's (InvalidConfigError).
        self.config = config
        self.namespace: str | None = None
        self._manager: ContextManager | None = None
        self._pid = 0
        self._lock = threading.Lock()
        self._atexit_pid = 0
        # A fork while another thread holds the lock would leave it held forever in
        # the child; the child has a single thread, so a fresh lock is correct.
        os.register_at_fork(after_in_child=self._reset_lock)

    def _reset_lock(self) -> None:
        self._lock = threading.Lock()

    def get(self) -> ContextManager:
        """This process's manager, attaching on first use."""
        m = self._manager
        if m is not None and self._pid == identity.pid:
            return m
        with self._lock:
            pid = identity.pid
            if self._manager is None or self._pid != pid:
                if self.namespace is None:
                    raise ContextError(
                        f"this process is not a {self._what} worker attached to a shmctx "
                        "namespace (see the shmctx docs for the set-up)"
                    )
                if self._peer:
                    self._manager = open_namespace(self.namespace, self.config,
                                                   sweeper=True)
                else:
                    self._manager = attach(self.namespace)
                self._pid = pid
                if self._atexit_pid != pid:
                    atexit.register(self.close)
                    self._atexit_pid = pid
                log.debug("pid %d attached to namespace %r", pid, self.namespace)
            return self._manager

    def close(self, *, unlink_if_last: bool | None = None) -> None:
        """Close this process's manager, returning every reference it still holds.
        A no-op in a process that has none (a fork of a worker, the parent).

        ``unlink_if_last`` (default: whether this is a peer) also removes the namespace
        when no other live process is attached (``ContextManager.close``). A peer passes
        False when the server goes on and will start another worker (a worker recycled
        by its supervisor): the namespace must outlive the moment no worker runs."""
        with self._lock:
            if self._pid != identity.pid:
                return  # inherited over fork: the parent's to close
            m, self._manager, self._pid = self._manager, None, 0
        if m is None:
            return
        try:
            m.close(unlink_if_last=self._peer if unlink_if_last is None else unlink_if_last)
        except ContextManagerClosedError:
            pass
        except Exception:  # at exit: report, but never turn a clean exit into a crash
            log.exception("closing the shmctx manager of pid %d failed", identity.pid)
