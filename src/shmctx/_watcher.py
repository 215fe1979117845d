"""``python -m shmctx._watcher NAMESPACE PID START``: once process PID has exited, remove
namespace NAMESPACE if no live process is attached to it any more.

``shmctx.asgi`` starts it, in a session of its own, from a worker that leaves while its
server goes on (uvicorn's ``--limit-max-requests``): that worker does not unlink the
namespace, since its supervisor (PID) starts a successor that attaches to it. But if the
server is stopped before the successor attaches, no worker is left to unlink it. The
supervisor exits only after its workers have ended, so its exit is when the question can
be settled: this process then attaches and leaves with ``unlink_if_last``, which unlinks
the namespace only if no live process is registered in it (a worker still serving, an
outside publisher), and does nothing if it is gone already.

START is PID's start time (clock ticks since boot, as ``shmctx._proc.start_time``; 0:
unknown), so that another process that later gets the same pid is not waited for.

One watcher per namespace: each holds an ``flock`` on the namespace's table file while
it waits, and a second one exits at once (shmctx's own locks on that file are fcntl
record locks, which Linux keeps apart from ``flock``). Two watchers at once (the
namespace was made again in between) would be harmless: of processes leaving with
``unlink_if_last`` the last one unlinks.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import sys
import time

from . import _shm
from ._errors import ContextNotFoundError
from ._manager import ContextManager
from ._proc import is_alive

log = logging.getLogger("shmctx.asgi")

# How often to look whether PID still runs when the kernel has no pidfd (before 5.3).
_POLL = 1.0


def wait_for_exit(pid: int, start: int) -> None:
    """Return once the process (pid, start) no longer runs."""
    if not is_alive(pid, start):
        return
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = -1
    if fd >= 0:
        try:
            # Checked again now that the pidfd is open: if it is still the same process,
            # the pidfd refers to it (and not to one that got its pid after it died).
            if is_alive(pid, start):
                select.select([fd], [], [])  # readable when the process has exited
        finally:
            os.close(fd)
        return
    while is_alive(pid, start):
        time.sleep(_POLL)


def watch(namespace: str, pid: int, start: int) -> int:
    """Wait for (pid, start) to exit, then unlink ``namespace`` if it is left with no
    live process attached. 0 when done, or when another watcher is on it."""
    _shm.check_namespace(namespace)
    try:
        fd = os.open(_shm.host_path(_shm.table_name(namespace)), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0  # unlinked already
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # another watcher waits for the same exit
        wait_for_exit(pid, start)
        try:
            m = ContextManager(namespace=namespace, create=False, sweeper=False)
        except ContextNotFoundError:
            return 0  # the last worker to stop unlinked it
        m.close(unlink_if_last=True)  # logs, rather than raises, a failure
        return 0
    finally:
        os.close(fd)  # only now: the flock is this watcher's claim while it waits


def main(argv: list[str]) -> int:
    namespace, pid, start = argv[0], int(argv[1]), int(argv[2])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    return watch(namespace, pid, start)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
