"""Whether the process behind a record of the table still runs: the rule, in one place.

A (pid, start time) pair names a process (``_proc``), but judging it needs ``/proc``,
which ``hidepid=`` hides from other users, and start times count clock ticks (10 ms), so
a pid reused within one tick looks like the same process. So every process entry is also
backed by a kernel lock (as in LMDB, an embedded database whose readers each hold a
byte-range lock that tells a live reader from a dead one): the process that registers
entry ``p`` holds an OFD write lock (``F_OFD_SETLK``) on byte ``ENTRY_BASE + p`` of the
table file, through its own open file description (the one ``_lock.Arbiter`` opened for
this manager). The kernel drops that lock when the last descriptor of the description
closes: when the manager closes, or when the process exits, however it dies. Any other
description can ask whether it is held (``F_OFD_GETLK``), with no ``/proc`` and no
permission to see the process.

The verdicts:

process entry ``p``
    Registered holding its lock (flag ``P_LIVE_LOCK``): alive exactly while the lock is
    held. Otherwise (the lock could not be taken, or a process of an older shmctx wrote
    it): its (pid, start) by ``_proc.is_alive``.
a recorded owner (pid, start) of a lock, a creation or the sweep lead
    This process itself is alive. Else, among the entries recorded for the same (pid,
    start): one with its lock held means alive; if all of them have the flag and none a
    lock, the process that registered them is gone, even when a newcomer got the same
    pid within the same clock tick. No such entry (a process between attaching and
    registering, or that has closed): ``_proc.is_alive``.

What makes "lock free" mean "dead": registration takes the lock before it writes the
entry's pid, and ``close`` frees the entry (pid 0) before it drops the lock, both under
the table lock. So under the table lock an entry with its pid set and its lock free is
dead. Without the table lock a looker reads the entry again after asking the kernel: a
process closing that entry meanwhile shows as changed, never as a dead entry; a process
that closed it and registered it again in between would show a new ``attached`` time.

A child forked by ``os.fork`` closes its copy of the parent's description at once (the
manager's at-fork handler calls ``_lock.Arbiter.reset_after_fork``) and registers its own
entry; ``exec`` closes it (``O_CLOEXEC``). A child forked behind Python's back (C code
calling ``fork()`` and going on without ``exec``) keeps the parent's entry looking alive
as long as it runs: a leak until it exits, never a live process taken for dead.

All of this is for slow paths only (a sweep, a wait that timed out, registering,
``reclaim``, ``unlink``); the hot path never asks.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os

from . import _layout as L
from ._lock import _FLOCK, Arbiter
from ._proc import identity, is_alive

log = logging.getLogger("shmctx.liveness")

__all__ = ["ENTRY_BASE", "Liveness"]

ENTRY_BASE = 1 << 41  # past the table's end and the arbiter's keys (1 << 40 + key)


class Liveness:
    """The liveness rule for one mapped table, as seen through one manager."""

    __slots__ = ("arbiter", "buf", "geo", "mine")

    def __init__(self, arbiter: Arbiter, buf: memoryview, geo: L.Geometry) -> None:
        self.arbiter = arbiter  # owns this manager's description of the table file
        self.buf = buf
        self.geo = geo
        # (entry, pid) this manager registered. Asked about its own lock, a description
        # sees no conflict, so its own entry is known alive rather than asked about; the
        # pid makes a forked child, whose entry is not this one, ask the kernel.
        self.mine: tuple[int, int] = (-1, 0)

    # --- the entry locks ------------------------------------------------------------

    def _lock(self, cmd: int, kind: int, proc: int) -> bytes:
        return fcntl.fcntl(self.arbiter.descriptor(), cmd,
                           _FLOCK.pack(kind, os.SEEK_SET, ENTRY_BASE + proc, 1, 0))

    def hold(self, proc: int) -> bool | None:
        """Take entry ``proc``'s lock. False if another description holds it (its
        process lives on, although the entry reads as free: skip that entry); None if
        locks cannot be had here (logged; the entry is then judged by pid and start)."""
        try:
            self._lock(fcntl.F_OFD_SETLK, fcntl.F_WRLCK, proc)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            log.warning(
                "pid %d cannot take the liveness lock of its process entry %d (%s); other "
                "processes will judge it by pid and start time, which /proc hidepid= "
                "hides and a pid reused within one clock tick fools", identity.pid, proc, e)
            return None
        return True

    def drop(self, proc: int) -> None:
        """Let go of entry ``proc``'s lock (after freeing the entry, under the table
        lock). Closing the description would drop it as well."""
        try:
            self._lock(fcntl.F_OFD_SETLK, fcntl.F_UNLCK, proc)
        except OSError:
            pass

    def _held(self, proc: int) -> bool | None:
        """Whether another description holds entry ``proc``'s lock; None if the kernel
        cannot be asked (no descriptor of our own)."""
        try:
            got = self._lock(fcntl.F_OFD_GETLK, fcntl.F_WRLCK, proc)
        except OSError:
            return None
        kind: int = _FLOCK.unpack(got)[0]
        return kind != fcntl.F_UNLCK

    # --- verdicts -------------------------------------------------------------------

    def entry_alive(self, proc: int) -> bool:
        """Whether the process registered in entry ``proc`` still runs (False for a
        free entry). Exact under the table lock; without it, an entry that changes while
        being looked at is judged by the (pid, start) it showed first."""
        off = self.geo.proc_off(proc)
        head = L.ProcHead.read(self.buf, off)
        if not head.pid:
            return False
        if head.flags & L.P_LIVE_LOCK:
            if self.mine == (proc, identity.pid):
                return True
            held = self._held(proc)
            if held:
                return True
            if held is False and L.ProcHead.read(self.buf, off) == head:
                return False
        return is_alive(head.pid, head.start)

    def dead_entries(self) -> list[tuple[int, L.ProcHead]]:
        """(entry, head) of every process entry judged dead, without the table lock (a
        fallback judgement reads /proc); confirm each with ``still_dead`` under it."""
        out: list[tuple[int, L.ProcHead]] = []
        for p in range(self.geo.max_processes):
            head = L.ProcHead.read(self.buf, self.geo.proc_off(p))
            if head.pid and not self.entry_alive(p):
                out.append((p, head))
        return out

    def still_dead(self, proc: int, head: L.ProcHead) -> bool:
        """Under the table lock: whether entry ``proc``, judged dead when it read
        ``head``, still names that dead process. A locked entry is asked again (the
        kernel answers at once); a (pid, start) found dead by /proc stays dead."""
        now = L.ProcHead.read(self.buf, self.geo.proc_off(proc))
        if (now.pid, now.flags, now.start) != (head.pid, head.flags, head.start):
            return False
        return not (now.flags & L.P_LIVE_LOCK) or not self.entry_alive(proc)

    def owner_alive(self, pid: int, start: int) -> bool:
        """Whether the process recorded as (pid, start) as a lock's owner, a context's
        creator or the sweep leader still runs."""
        if not pid:
            return False
        if pid == identity.pid and start == identity.start:
            return True  # never robs itself, whatever a predecessor of its pid left
        buf, geo = self.buf, self.geo
        gone = fallback = False
        for p in range(geo.max_processes):
            off = geo.proc_off(p)
            head = L.ProcHead.read(buf, off)
            if head.pid != pid or head.start != start:
                continue
            if not head.flags & L.P_LIVE_LOCK:
                fallback = True
                continue
            held = self._held(p)
            if held:
                return True
            if held is None or L.ProcHead.read(buf, off) != head:
                fallback = True  # no answer, or the entry changed while we looked
            else:
                gone = True
        if gone and not fallback:
            return False
        return is_alive(pid, start)
