"""Named failpoints for fault-injection tests.

``SHMCTX_FAILPOINTS="name[:action],..."`` arms them when this module is imported;
without it ``armed`` is False and each site costs one global lookup. Actions: ``kill``
(default; SIGKILL this process at that point, as the OOM killer would), ``exit``
(``os._exit(70)``), ``raise`` (raise ``FailpointError``), ``pause`` (SIGSTOP itself, so
a test can look at the frozen state, then SIGKILL it).

A test arms a failpoint only in the child process it means to kill, through the
environment of a spawned process or ``arm()`` in a forked one.
"""

from __future__ import annotations

import os
import signal

armed = False
_actions: dict[str, str] = {}

SITES = (
    "lock.acquired_before_owner",
    "lock.release_before_post",
    "lock.takeover",
    "table.create_before_magic",
    "acquire.proc_counted",
    "return.proc_counted",
    "create.slot_claimed",
    "create.segment_made",
    "create.in_init",
    "create.in_factory",
    "create.object_packed",
    "publish.built",
    "publish.new_ready",
    "close.state_freed",
    "close.index_removed",
    "reclaim.ref_cleared",
    "register.entry_claimed",
    "sweep.leader_taken",
)


class FailpointError(RuntimeError):
    """Raised at a failpoint armed with the ``raise`` action."""


def arm(spec: str) -> None:
    """Arm failpoints from a spec like ``"create.in_init:kill,lock.takeover"``."""
    global armed
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, action = item.partition(":")
        if name not in SITES:
            raise ValueError(f"unknown failpoint {name!r}; known: {', '.join(SITES)}")
        _actions[name] = action or "kill"
    armed = bool(_actions)


def disarm() -> None:
    global armed
    _actions.clear()
    armed = False


def hit(name: str) -> None:
    action = _actions.get(name)
    if action is None:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "exit":
        os._exit(70)
    elif action == "pause":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif action == "raise":
        raise FailpointError(name)


if os.environ.get("SHMCTX_FAILPOINTS"):
    arm(os.environ["SHMCTX_FAILPOINTS"])
