"""Reading a table out of band: open it without blocking, check its header, and copy its
bytes by ``pread``, under its table lock if that can be had within ``--timeout``.

A read never attaches as a process of the namespace and never takes a lock over from a
dead owner; its one write is the lock's owner record while it holds the lock for the copy.
What it costs is bounded by the file, never by what the header claims (see the package
docstring).
"""

from __future__ import annotations

import mmap
import os
import signal
import stat
from dataclasses import dataclass

import posix_ipc

from .. import _layout as L
from .. import _shm
from .._layout import LOCKS_OFF
from .._lock import RobustLock
from .._proc import is_alive
from .._snapshot import Snapshot, decode
from .._table import header_problem
from ._fail import EXIT_FORMAT, EXIT_USAGE, Fail
from ._namespaces import unknown


@dataclass
class Read:
    """A copy of one namespace's table, decoded, and how it was taken."""

    ns: str
    path: str
    snap: Snapshot
    tag: str
    size: int
    unlocked_reason: str  # '' when the copy was taken under the table lock
    lock_busy: bool  # unlocked because another held the lock (past --timeout, or died)


def _denied(ns: str, path: str, what: str = "read the table") -> Fail:
    try:
        st = os.stat(path)
        owner = f" (owner uid {st.st_uid}, mode {st.st_mode & 0o777:04o})"
    except OSError:
        owner = ""
    return Fail(EXIT_USAGE, f"permission denied: cannot {what} of namespace {ns!r}: "
                            f"{path}{owner}", f"permission denied{owner.replace('owner ', '')}")


def _open_table(ns: str, path: str) -> tuple[int, bool]:
    """A descriptor of ``ns``'s table file and whether it is writable.

    Opened with ``os.open`` rather than ``shm_open`` for ``O_NONBLOCK``: /dev/shm is
    writable by every user, and a FIFO planted under a table's name would block an open
    for reading forever (``O_NOFOLLOW``, as ``shm_open`` uses, refuses a symbolic link).
    """
    flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        try:
            return os.open(path, os.O_RDWR | flags), True
        except PermissionError:
            return os.open(path, os.O_RDONLY | flags), False
    except FileNotFoundError:
        raise unknown(ns) from None
    except PermissionError:
        raise _denied(ns, path) from None
    except OSError as e:  # a symbolic link (ELOOP), a socket (ENXIO), ...
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            mode = stat.S_IFREG
        problem = "not a regular file (a symbolic link)" if stat.S_ISLNK(mode) else \
            "not a regular file" if not stat.S_ISREG(mode) else f"cannot open it: {e.strerror}"
        raise Fail(EXIT_FORMAT, f"table of namespace {ns!r} ({path}): {problem}",
                   problem) from None


def pread(fd: int, size: int) -> bytes:
    """The first ``size`` bytes of the file (fewer if it is shorter now), by ``pread``:
    holes read as zeros without allocating, and a shrunk file cannot raise SIGBUS."""
    chunks: list[bytes] = []
    got = 0
    while got < size:
        chunk = os.pread(fd, size - got, got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def read(ns: str, timeout: float) -> Read:
    """Copy namespace ``ns``'s table (under its lock if it can be had within ``timeout``
    seconds) and decode the copy."""
    path = _shm.host_path(_shm.table_name(ns))
    what = f"table of namespace {ns!r} ({path})"
    fd, writable = _open_table(ns, path)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            problem = "not a regular file"
            raise Fail(EXIT_FORMAT, f"{what}: {problem}", problem)
        size = st.st_size
        head = pread(fd, L.HEADER_SIZE)
        if size < L.HEADER_SIZE or len(head) < L.HEADER_SIZE:
            problem = f"truncated: {size} bytes, a table has at least {L.HEADER_SIZE}"
            raise Fail(EXIT_FORMAT, f"{what}: {problem}", problem)
        # Checked before anything is sized from the header: its geometry must be the
        # layout's for its capacity and add up to ``size``, so the copy below is bounded
        # by the file's real size and the layout's limits, whatever the header says.
        problem = header_problem(head, size)
        if problem:
            raise Fail(EXIT_FORMAT, f"{what}: {problem}", problem)
        tag = _shm.tag_of(L.H_TABLE_ID.unpack_from(head, L.H_TABLE_ID_OFF)[0])
        if writable:
            data, why, busy = _copy_locked(ns, tag, fd, size, timeout)
        else:
            data, why, busy = pread(fd, size), \
                "read-only access: the table lock cannot be taken", False
    finally:
        os.close(fd)
    try:
        snap = decode(data, locked=not why)
    except ValueError as e:  # the file changed under an unlocked copy
        raise Fail(EXIT_FORMAT, f"{what}: {e}", str(e)) from None
    return Read(ns, path, snap, tag, size, why, busy)


# Signals whose handlers (KeyboardInterrupt) or default action (termination) would end
# ctx-inspect between taking the table lock and recording itself as its owner: a lock
# left taken with no owner recorded holds every process of the namespace for two of the
# table's lock_timeouts. They are held back for the length of the hold, at most --timeout
# plus one copy, and delivered right after the release.
_DEFERRED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}


def _copy_locked(ns: str, tag: str, fd: int, size: int,
                 timeout: float) -> tuple[bytes, str, bool]:
    """The table's bytes, why they were copied without the table lock ('' if not), and
    whether that was because the lock was busy.

    The lock is held as any holder holds it, with this process recorded as its owner (the
    only bytes ctx-inspect writes outside --gc --yes), so that waiters see a live owner
    and never mistake the copy for a dead holder's wedge; it gives up after ``timeout``
    instead of taking the lock over from a dead owner, and at once when the recorded owner
    is dead: nobody will release that lock, only a process of the namespace taking it over.
    """
    try:
        sem = posix_ipc.Semaphore(_shm.table_lock_name(ns, tag))
    except posix_ipc.ExistentialError:
        return pread(fd, size), "its table lock semaphore is missing", False
    except posix_ipc.PermissionsError:
        return pread(fd, size), "no permission to take its table lock", False
    try:
        # The first page only: it holds the lock's owner record and the magic, so it has
        # memory behind it (the header check above read the magic from it).
        mm = mmap.mmap(fd, L.PAGE)
        buf = memoryview(mm)
        try:
            lock = RobustLock(sem, buf, LOCKS_OFF, 0, timeout, None, None,
                              f"table lock of namespace {ns!r}")
            old = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
            try:
                why = _take(lock, timeout)
                if not why:
                    try:
                        return pread(fd, size), "", False
                    finally:
                        lock.release()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
            return pread(fd, size), why, True
        finally:
            buf.release()
            mm.close()
    finally:
        sem.close()


_LOOK = 0.05  # how often a wait for the table lock looks whether its owner died


def _take(lock: RobustLock, timeout: float) -> str:
    """'' once ``lock`` is ours, else why not."""
    dead = 0

    def owner_dead() -> bool:
        nonlocal dead
        pid, _epoch, start = lock.owner()
        if pid and not is_alive(pid, start):
            dead = pid
        return bool(dead)

    if lock.try_acquire_unless(timeout, owner_dead, _LOOK):
        return ""
    # One more look once the time is up: an owner that died in the last moments of the
    # wait (or, with --timeout 0, at all) is still named as dead.
    if dead or owner_dead():
        return f"the table lock is held by dead pid {dead}"
    return f"the table lock was not free within {timeout:g}s"
