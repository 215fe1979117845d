"""Process identity and liveness: a pid plus its start time names one process for good.

A pid alone is not enough: pid_max is 32768 on many hosts, so a long run reuses pids,
and ``kill(pid, 0)`` cannot tell the dead holder from the newcomer. The start time
(field 22 of ``/proc/PID/stat``, clock ticks since boot) can. A zombie counts as dead:
it will never return a reference or release a lock.
"""

from __future__ import annotations

import os

__all__ = ["start_time", "is_alive", "identity"]


def start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if there is no such
    process or it is a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except PermissionError:  # hidepid: we cannot look, so fall back to kill(0)
        return 0 if _kill_probe(pid) else None
    # comm (field 2) may hold spaces and parentheses; everything after the last ')' is
    # fixed-format, starting with field 3 (state).
    rest = stat[stat.rindex(b")") + 2 :].split()
    if rest[0] in (b"Z", b"X"):
        return None
    return int(rest[19])


def _kill_probe(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_alive(pid: int, start: int) -> bool:
    """True if the process recorded as (pid, start) still runs.

    ``start == 0`` means the start time was unknown when it was recorded; then only the
    pid can be checked.
    """
    if pid <= 0:
        return False
    now = start_time(pid)
    if now is None:
        return False
    return start == 0 or now == 0 or now == start


class _Identity:
    """This process's (pid, start), refreshed in a forked child."""

    __slots__ = ("pid", "start")

    def __init__(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        self.pid = os.getpid()
        self.start = start_time(self.pid) or 0


identity = _Identity()
os.register_at_fork(after_in_child=identity.refresh)
