"""Process identity and liveness: a pid plus its start time names one process for good.

A pid alone is not enough: pid_max is 32768 on many hosts, so a long run reuses pids,
and ``kill(pid, 0)`` cannot tell the dead holder from the newcomer. The start time
(field 22 of ``/proc/PID/stat``, clock ticks since boot) can. A zombie counts as dead:
it will never return a reference or release a lock.

With ``/proc`` mounted ``hidepid=``, another user's process cannot be looked at: its
start time is unknown, and unknown is not dead (``kill(pid, 0)`` still tells whether the
pid exists). Where the table has better evidence, a process entry's kernel lock, it is
used first (``_liveness``); this is the fallback.
"""

from __future__ import annotations

import os

__all__ = ["start_time", "is_alive", "identity"]

_PID_MAX_LIMIT = 1 << 22  # the kernel's highest possible pid_max


def start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, 0 if the process exists but
    ``/proc`` hides it from us, or None if there is no such process or it is a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except ProcessLookupError:  # it exited while we read
        return None
    except (FileNotFoundError, PermissionError):
        # No such process, or hidepid= hides it: hidepid=2 (invisible) makes another
        # user's /proc/PID vanish as if the process had exited, hidepid=1 denies reading
        # it. kill(pid, 0) tells them apart without needing to see the process.
        return 0 if _kill_probe(pid) else None
    # comm (field 2) may hold spaces and parentheses; everything after the last ')' is
    # fixed-format, starting with field 3 (state).
    rest = stat[stat.rindex(b")") + 2 :].split()
    if rest[0] in (b"Z", b"X"):
        return None
    return int(rest[19])


def _kill_probe(pid: int) -> bool:
    if not 0 < pid <= _PID_MAX_LIMIT:
        return False  # a damaged record; kill() would take it for a process group or fail
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
    """This process's (pid, start), refreshed in a forked child.

    The refresh runs in an at-fork handler, where an exception is only printed and the
    handlers after it are skipped. A child forked at the file-descriptor limit cannot
    open ``/proc/self/stat`` there; keeping the parent's start time would make every
    record it writes name a process that does not exist (so others would judge it dead
    while it runs). So the pid is set first (``getpid`` cannot fail), an unreadable start
    time is recorded as unknown (0), and ``require()`` reads it again before this
    process records itself in a table.
    """

    __slots__ = ("pid", "start")

    def __init__(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        self.pid = os.getpid()
        try:
            self.start = start_time(self.pid) or 0
        except OSError:
            self.start = 0

    def require(self) -> None:
        """Make sure the start time is known; ``OSError`` (say, EMFILE) if it cannot be
        read even now."""
        if not self.start:
            self.start = start_time(self.pid) or 0


identity = _Identity()
os.register_at_fork(after_in_child=identity.refresh)
