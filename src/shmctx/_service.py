"""What the server integrations (gunicorn, Celery, Dask, ASGI servers) share: the
configuration a long-running service wants by default, and the routing of shmctx's log
lines into the server's own log.
"""

from __future__ import annotations

import logging

from ._config import ContextConfig
from ._errors import ContextNotFoundError, InvalidConfigError
from ._manager import ContextManager

__all__ = ["SERVICE_DEFAULTS", "service_config", "open_namespace", "route_logs"]

log = logging.getLogger("shmctx.service")

SERVICE_DEFAULTS = ContextConfig(max_references=0, max_idle_time=0)
"""The config a server integration gives a namespace it creates when the user gives none.

* ``max_references=0`` (unlimited): in a server, the number of concurrent holders of a
  context is already bounded by workers x threads, and an async server holds one per
  request in flight, which has no fixed bound. A small limit there turns load into
  ``MaxReferencesReachedError`` (an HTTP 500) rather than guarding against anything;
  references leaked by a dead process are reclaimed by the sweeper either way.
* ``max_idle_time=0`` (never closed for being idle): data a service loads is meant to
  live as long as the service. Closing it after a quiet spell makes the next request
  wait while it is rebuilt. It is freed when replaced (``publish``), closed
  (``close_context``) or when the server stops and the namespace is unlinked.

The sweeper still runs every ``cleanup_interval``: it reclaims the references of
processes that died without returning them.
"""


def service_config(config: ContextConfig | None) -> ContextConfig:
    """``config``, or ``SERVICE_DEFAULTS`` when it is None."""
    if config is None:
        return SERVICE_DEFAULTS
    if not isinstance(config, ContextConfig):
        raise InvalidConfigError(
            f"config must be a ContextConfig or None, not {type(config).__name__}"
        )
    return config


def open_namespace(namespace: str, config: ContextConfig | None = None, *,
                   sweeper: bool, mode: int | None = None) -> ContextManager:
    """A manager of ``namespace`` for a server's supervisor or peer, creating the
    namespace if it is absent. With ``config=None`` an existing namespace is adopted
    with whatever config it has (made by an outside process, or by the master this one
    was re-executed from), and a new one gets ``SERVICE_DEFAULTS``; an explicit config
    must match an existing namespace's (``InvalidConfigError``)."""
    if config is None:
        try:
            m = ContextManager(namespace=namespace, create=False, sweeper=sweeper, mode=mode)
        except ContextNotFoundError:
            pass  # absent: make it, with the defaults a service wants
        else:
            # Adopted as it is. Limits a server would not have chosen are worth a line in
            # its log: a namespace made by a plain script has a reference limit that
            # turns concurrent requests into errors, and closes idle data.
            differ = [d for d in SERVICE_DEFAULTS.differences(m.config)
                      if d.startswith(("max_references", "max_idle_time"))]
            if differ:
                log.warning("namespace %r exists and is adopted with its own config, not "
                            "the server defaults (server default != existing): %s; pass "
                            "a config, or remove the namespace, to change it",
                            namespace, "; ".join(differ))
            return m
    # Two processes may both find it absent: the one that loses the race to create it
    # attaches to the winner's table, made with the same defaults.
    return ContextManager(service_config(config), namespace=namespace, sweeper=sweeper,
                          mode=mode)


class _Forward(logging.Handler):
    """Hands each record of the ``shmctx`` logger tree to another logger's handlers."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        # ``handle`` applies the target's own filters and calls its handlers (and those
        # of its ancestors, if it propagates): the record is formatted as the server
        # formats its own lines.
        self.target.handle(record)


def route_logs(target: logging.Logger) -> None:
    """Send shmctx's log records (the ``shmctx`` logger and its children, such as
    ``shmctx.sweeper``) to ``target``'s handlers, at ``target``'s effective level.

    They stop propagating to the root logger, so a server that also logs the root (Celery
    does) shows each line once. Calling it again replaces the previous target: the last
    call in a process wins.
    """
    root = logging.getLogger("shmctx")
    if not isinstance(target, logging.Logger):
        raise InvalidConfigError(
            f"logs must go to a logging.Logger, not {type(target).__name__}")
    if target.name == "shmctx" or target.name.startswith("shmctx."):
        # Forwarding a record into the tree it comes from would forward it again, for ever.
        raise InvalidConfigError(
            f"shmctx's logs cannot be routed to logger {target.name!r}, which is part of "
            "the 'shmctx' logger tree itself: name the server's logger")
    for h in list(root.handlers):
        if isinstance(h, _Forward):
            root.removeHandler(h)
    root.addHandler(_Forward(target))
    # Records below the level a logger lets through are dropped before any handler sees
    # them: without this, the sweeper's info lines would be filtered by the root's
    # default WARNING level although the server logs at INFO.
    root.setLevel(target.getEffectiveLevel())
    root.propagate = False
