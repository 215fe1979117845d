"""The locking protocol: POSIX semaphores made safe against holders that die.

A POSIX semaphore has no owner: if its holder is SIGKILLed, nothing ever posts it. So
every lock here is a semaphore *plus* a 16-byte owner record in shared memory
(``_layout.LOCK``: pid, epoch, start time). The protocol:

acquire
    ``sem_trywait``; on success write (pid, epoch + 1, start) into the record. If it is
    taken, yield the CPU and try again a few times first: on a busy machine the holder is
    often runnable but not running, and sleeping in the kernel at once costs a wake-up
    per hand-over (4 processes hammering one context keep about 0.5x of one process's
    throughput without this, about 0.8x with it). Then ``sem_timedwait``, looking at the
    record after 10 ms, then every ``lock_timeout``:

    * owner alive (``_liveness``: a process entry of that pid and start time still
      holds its kernel lock, or, where it has no entry, the pid runs with the recorded
      start time): wait again. A slow but live owner is never robbed.
    * owner dead: *take over* (below).
    * no owner recorded while the semaphore is taken: a holder is between ``sem_wait``
      and writing the record (a few instructions) or died exactly there. If the record
      still shows no owner *and the same epoch* one full ``lock_timeout`` later, nobody
      can be in that window that long: treat it as dead.

    So a waiter goes on about 10 ms after it finds a dead owner recorded, and within two
    ``lock_timeout`` when the owner died in the unrecorded window.

take over
    Only one waiter may do it, or two would both "own" the lock. Waiters race for an
    *arbiter*: a Linux open-file-description lock (``F_OFD_SETLK``) on one byte of the
    table file, which the kernel drops the instant its holder dies, so the arbiter can
    never wedge. The winner re-reads the record; if it is not exactly what it judged
    dead (pid *and* epoch), someone else already recovered, and it goes back to waiting.
    Otherwise it writes itself as owner with a new epoch, keeping the semaphore at 0:
    ownership passes without a post, so no third process can slip in. It then runs the
    lock's repair callback, which rebuilds whatever the dead owner may have left half
    written, from primary data (see ``_table.py``).

release
    Clear the owner pid, then post. A death between the two is the "no owner recorded"
    case above.

left held by a live process
    An asynchronous exception (Ctrl-C's ``KeyboardInterrupt``, an exception raised by a
    signal handler) can land between taking a lock and the ``try`` that releases it.
    Other processes see a live owner and never rob it, so the owning process recovers it
    itself (takeover, repair, release). Each lock object records which thread holds it
    through it and the frame whose critical section that is (``holder``, ``frame``: set
    before the owner record names this process, cleared after the record is cleared).
    The lock counts as left held when the record names this process and that frame is no
    longer on its thread's stack, or the thread has ended. A signal handler or finalizer
    calling shmctx inside the critical section it interrupted does not count (the frame is
    still there); if it waits for that very lock it gets ``ContextError`` instead of
    waiting for itself. The manager asks as any exception leaves one of its public
    methods, a waiter of this process asks at its looks, and the sweep asks too.

Lock order: table lock, then stripe locks (ascending), then a context's own lock is
never taken by shmctx while it holds the others. ``SignalError`` (a signal during the
wait) is retried with the remaining time: gunicorn workers and test runners get signals.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import sys
import threading
from collections.abc import Callable
from sys import _getframe
from threading import get_ident
from time import monotonic

import posix_ipc

from . import _failpoints
from ._errors import ContextError
from ._layout import LOCK, LockRecord, Words
from ._proc import identity, is_alive

log = logging.getLogger("shmctx.lock")

__all__ = ["RobustLock", "ContextLock", "Arbiter", "recoveries"]

_FLOCK = struct.Struct("hhxxxxqqixxxx")  # struct flock on Linux x86_64/aarch64
_ARBITER_BASE = 1 << 40  # byte offsets far past the table's end
_FIRST_LOOK = 0.01
_SPINS = 16


class Arbiter:
    """Kernel-released exclusive claims on single bytes of one file.

    An OFD lock belongs to an open file description, so the arbiter opens its own (via
    ``/proc/self/fd``, which works even for an unlinked table) and a forked child opens
    another: a description shared across ``fork`` would let parent and child both claim
    the same key, and would keep a dead parent's claim alive while the child runs.
    Threads of one process share the description, so a process-local mutex makes the
    claim exclusive between threads too.
    """

    def __init__(self, fd: int) -> None:
        self._source = fd  # the table's own descriptor, which it outlives
        self.fd = _reopen(fd)
        self._local = threading.Lock()
        self._claimed: set[int] = set()
        # How a waiter judges a recorded owner (pid, start): the table installs the rule
        # of ``_liveness`` (process-entry locks held on this description, then /proc).
        self.owner_alive: Callable[[int, int], bool] = is_alive

    def descriptor(self) -> int:
        """This process's own description of the file (also what holds its process
        entries' liveness locks, ``_liveness``)."""
        if self.fd < 0:  # a child forked at the descriptor limit could not reopen it
            self.fd = _reopen(self._source)
        return self.fd

    def _fcntl(self, cmd: int, kind: int, key: int) -> None:
        fcntl.fcntl(self.descriptor(), cmd,
                    _FLOCK.pack(kind, os.SEEK_SET, _ARBITER_BASE + key, 1, 0))

    def try_claim(self, key: int) -> bool:
        # Per key: a thread recovering one lock must not stop another thread of this
        # process from recovering a different one (which the first may be waiting for).
        with self._local:
            if key in self._claimed:
                return False
            self._claimed.add(key)
        try:
            self._fcntl(fcntl.F_OFD_SETLK, fcntl.F_WRLCK, key)
        except OSError as e:
            with self._local:
                self._claimed.discard(key)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False  # another process holds the claim
            raise  # no descriptor to claim with: an error, not "someone else recovers"
        return True

    def release(self, key: int) -> None:
        try:
            self._fcntl(fcntl.F_OFD_SETLK, fcntl.F_UNLCK, key)
        finally:
            with self._local:
                self._claimed.discard(key)

    def reset_after_fork(self) -> None:
        """In a forked child: let go of the parent's description (its claims stay the
        parent's) and open our own. Runs in an at-fork handler, so it must not fail: the
        inherited descriptor is closed first, which frees one for the reopen even at the
        descriptor limit, and a reopen that fails all the same is retried at first use."""
        self._local = threading.Lock()
        self._claimed = set()
        inherited, self.fd = self.fd, -1
        if inherited >= 0:
            os.close(inherited)
        try:
            self.fd = _reopen(self._source)
        except OSError:
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _reopen(fd: int) -> int:
    """A new open file description of the file behind ``fd``."""
    return os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)


def wait_and_look(sem: posix_ipc.Semaphore, deadline: float | None, first: float,
                  period: float, look: Callable[[], bool], timeout_message: str) -> bool:
    """Wait for ``sem`` until ``deadline`` (a ``monotonic()`` time, None for no limit),
    calling ``look()`` once ``first`` seconds of waiting have passed and then every
    ``period`` seconds. Returns True once the semaphore is taken, False as soon as
    ``look()`` returns True (the caller got what it waited for another way); raises
    ``TimeoutError(timeout_message)`` at the deadline.

    The looks are on a schedule of their own: a signal interrupts ``sem_timedwait``
    (posix_ipc raises ``SignalError``), and the wait then resumes with the time left until
    the next look. Restarting the whole period instead would let a timer signal more
    frequent than ``period`` (a profiler, a watchdog) postpone every look, and with it
    the takeover of a dead holder's lock, forever.
    """
    next_look = monotonic() + first
    while True:
        now = monotonic()
        if deadline is not None and now >= deadline:
            raise TimeoutError(timeout_message)
        end = next_look if deadline is None else min(next_look, deadline)
        try:
            sem.acquire(max(0.0, end - now))
            return True
        except posix_ipc.SignalError:
            continue
        except posix_ipc.BusyError:
            pass
        # sem_timedwait keeps a wall-clock deadline, so it may return a hair before
        # next_look on the monotonic clock: then the loop waits out the rest.
        if monotonic() >= next_look:
            if look():
                return False
            next_look = monotonic() + period


class RobustLock:
    """One cross-process mutex of the protocol above. Not re-entrant."""

    __slots__ = ("sem", "buf", "off", "key", "timeout", "arbiter", "repair", "what",
                 "w32", "w64", "i32", "i64", "holder", "frame")

    def __init__(
        self,
        sem: posix_ipc.Semaphore,
        buf: Words | memoryview,
        off: int,
        key: int,
        timeout: float,
        arbiter: Arbiter | None,
        repair: Callable[[], None] | None,
        what: str,
    ) -> None:
        # The owner record is written with single stores, pid last (see _layout,
        # "Writing shared fields"): waiters and the sweeper read it without the lock.
        # A bare view (a short-lived mapping, ctx-inspect's) gets slice copies instead,
        # which do not pin the mapping.
        words = buf if isinstance(buf, Words) else Words.unpinned(buf)
        self.sem = sem
        self.buf = words.buf
        self.w32, self.w64 = words.u32, words.u64
        self.i32, self.i64 = off >> 2, off >> 3
        self.off = off
        self.key = key
        self.timeout = timeout
        self.arbiter = arbiter
        self.repair = repair
        self.what = what
        # Which thread of this process holds the lock through this object (0: none), and
        # the frame that took it, whose critical section it is: set before the owner
        # record names this process, cleared after the record is cleared. See leaked().
        self.holder = 0
        self.frame: object = None

    def acquire(self, timeout: float | None = None, _depth: int = 1) -> None:
        """Take the lock, waiting at most ``timeout`` seconds (None: as long as the
        owner lives). Raises ``TimeoutError`` when ``timeout`` runs out. ``_depth``: how
        many frames up the frame is whose critical section holds the lock (1, the
        caller); never a generator's, which is on no stack while it is suspended."""
        # _take_sem and _own, inlined: this is the hot path of every get and return.
        sem = self.sem
        try:
            sem.acquire(0)
        except posix_ipc.BusyError:
            if not self._spin():
                self._acquire_slow(timeout, _getframe(_depth))
                return
        self.frame = _getframe(_depth)  # the caller's: its section holds the lock
        self.holder = get_ident()
        w64, i = self.w64, self.i64
        epoch = w64[i] >> 32  # the u64 at the record's start: pid, then epoch above it
        if _failpoints.armed:
            _failpoints.hit("lock.acquired_before_owner")
        w64[i + 1] = identity.start
        w64[i] = ((epoch + 1) & 0xFFFFFFFF) << 32 | identity.pid  # epoch and pid: one store

    def try_acquire(self, timeout: float = 0.0) -> bool:
        """Take the lock if it is free within ``timeout`` seconds, else return False.
        Never takes it over from a dead owner: for readers that would rather give up
        than repair (``ctx-inspect``), and for tries that must not wait."""
        deadline = monotonic() + timeout
        while True:
            try:
                self.sem.acquire(max(0.0, deadline - monotonic()))
                break
            except posix_ipc.SignalError:
                continue
            except posix_ipc.BusyError:
                return False
        self._own(None, None, _getframe(1))
        return True

    def try_acquire_unless(self, timeout: float, give_up: Callable[[], bool],
                           every: float) -> bool:
        """``try_acquire`` that also stops waiting, and returns False, as soon as
        ``give_up()`` (asked after each ``every`` seconds of waiting) returns True. For
        ``ctx-inspect``, which gives up at once when the recorded owner is dead (only a
        takeover by a process of the namespace will ever free that lock) instead of
        waiting out ``timeout``. Takes a free lock at once, also with ``timeout`` 0, and
        never takes it over."""
        deadline = monotonic() + timeout
        try:
            self.sem.acquire(0)
        except posix_ipc.BusyError:
            try:
                if not wait_and_look(self.sem, deadline, every, every, give_up, self.what):
                    return False
            except TimeoutError:
                return False
        self._own(None, None, _getframe(1))
        return True

    def _take_sem(self, timeout: float | None, frame: object) -> bool:
        """Get the semaphore: True if the owner record is still to be written, False if
        the slow path got it and recorded this process (or took it over)."""
        try:
            self.sem.acquire(0)
            return True
        except posix_ipc.BusyError:
            if self._spin():
                return True
        self._acquire_slow(timeout, frame)
        return False

    def _spin(self) -> bool:
        """Contended: give the CPU to the holder a few times (on a busy machine it is
        often runnable but not running) before sleeping in the kernel."""
        for _ in range(_SPINS):
            os.sched_yield()
            try:
                self.sem.acquire(0)
                return True
            except posix_ipc.BusyError:
                pass
        return False

    def release(self) -> None:
        self.w32[self.i32] = 0
        self.holder = 0
        self.frame = None
        if _failpoints.armed:
            _failpoints.hit("lock.release_before_post")
        self.sem.release()

    def leaked(self, exiting: object = None) -> bool:
        """Whether this process holds the lock through this object with no thread of it
        inside the critical section: an asynchronous exception (KeyboardInterrupt, an
        exception from a signal handler) came between taking it and the ``try`` that
        releases it, or between that ``finally`` and the release. Every other process
        takes such a holder for alive and would wait for it forever, so this process
        must recover it. The test is exact: the frame that took the lock is no longer on
        its thread's stack (or the thread has ended). A signal handler or a finalizer
        that calls into shmctx while an outer frame of its thread holds the lock does not
        count: that frame is still on the stack. ``exiting``: a frame an exception is
        leaving (a public method's, in its ``except`` clause): it counts as gone."""
        pid, _epoch, start = LOCK.unpack_from(self.buf, self.off)
        if pid != identity.pid or start != identity.start:
            return False
        # Only this object's own holder counts: another object for the same lock (a
        # second manager of this process on the namespace) keeps its holder apart, and
        # a 0 here may mean that one holds it.
        holder, frame = self.holder, self.frame
        if not holder:
            return False
        if frame is exiting and holder == get_ident():
            return True
        # Every thread with a Python state, also those threading does not list.
        top = sys._current_frames().get(holder)
        while top is not None:
            if top is frame:
                return False
            top = top.f_back
        return True

    def recover_leaked(self, exiting: object = None) -> bool:
        """Recover (repair and release) the lock if ``leaked(exiting)``."""
        # The record as it was before the verdict: the takeover re-reads it under the
        # arbiter and gives up unless it is the same hold (pid and epoch), so a hold
        # released and taken again since the verdict, by another thread or by a
        # concurrent recovery of the same leak, is never robbed.
        pid, epoch, _start = LOCK.unpack_from(self.buf, self.off)
        return self.leaked(exiting) and self._recover(pid, epoch)

    def _recover(self, pid: int, epoch: int) -> bool:
        """Take the lock over from the hold (pid, epoch) judged lost, repair, release."""
        if not self._take_over(pid, epoch, None, _getframe(0)):
            return False
        self._mark_held()
        self.release()
        return True

    def __enter__(self) -> RobustLock:
        self.acquire(None, 2)  # the with block's frame holds it, not this one
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _own(self, epoch: int | None, deadline: float | None = None,
             frame: object = None) -> None:
        """Record this process as owner (the semaphore is already ours), taken by
        ``frame``."""
        w64, i = self.w64, self.i64
        if epoch is None:
            epoch = w64[i] >> 32
        self.frame = frame
        self.holder = get_ident()
        w64[i + 1] = identity.start  # start before pid: see acquire
        w64[i] = ((epoch + 1) & 0xFFFFFFFF) << 32 | identity.pid

    def recover_if_owner_dead(self) -> bool:
        """Take the lock over (running its repair) and release it, if its recorded owner
        is dead. The sweeper's proactive repair: otherwise the next waiter does it, after
        waiting ``lock_timeout``."""
        pid, epoch, start = LOCK.unpack_from(self.buf, self.off)
        return bool(pid) and not self._owner_alive(pid, start) and self._recover(pid, epoch)

    def _mark_held(self) -> None:
        """Hook: bookkeeping after acquiring by takeover outside ``acquire``."""

    def _owner_alive(self, pid: int, start: int) -> bool:
        arbiter = self.arbiter
        return is_alive(pid, start) if arbiter is None else arbiter.owner_alive(pid, start)

    def owner(self) -> LockRecord:
        """The owner record (pid, epoch, start) as it is now; pid 0 when no owner is
        recorded."""
        return LockRecord.read(self.buf, self.off)

    def _acquire_slow(self, timeout: float | None, frame: object) -> None:
        deadline = None if timeout is None else monotonic() + timeout
        suspect: tuple[int, int] | None = None  # (pid, epoch) seen without an owner

        def look() -> bool:
            nonlocal suspect
            suspect = self._after_timeout(suspect, deadline, frame)
            return suspect == (-1, -1)

        # The first look at the owner comes early: an owner recorded dead is taken over
        # at once instead of after a whole lock_timeout. Later looks come every
        # lock_timeout, which is also the least time between the two observations that
        # condemn a lock with no recorded owner.
        if wait_and_look(self.sem, deadline, min(self.timeout, _FIRST_LOOK), self.timeout,
                         look, f"timed out after {timeout}s waiting for {self.what}"):
            self._own(None, deadline, frame)

    def _after_timeout(self, suspect: tuple[int, int] | None, deadline: float | None,
                       frame: object) -> tuple[int, int] | None:
        """Decide what a timed-out wait means. Returns the new suspect, or (-1, -1) when
        this process took the lock over."""
        pid, epoch, start = LOCK.unpack_from(self.buf, self.off)
        if pid == identity.pid and start == identity.start:
            if not self.leaked():
                if self.holder == get_ident():
                    raise ContextError(
                        f"{self.what}: this thread already holds it, further up its stack "
                        f"(taken in {_where(self.frame)}; shmctx called again from a "
                        "signal handler or a finalizer while it held the lock); waiting "
                        "would wait for itself"
                    )
                return None  # another thread of this process holds it
        elif pid:
            if self._owner_alive(pid, start):
                return None
        else:
            if self.sem.value > 0:
                return None  # released meanwhile; the next wait takes it
            if suspect != (0, epoch):
                return (0, epoch)  # give a live holder one more full timeout
        if self._take_over(pid, epoch, deadline, frame):
            return (-1, -1)
        return None

    def _take_over(self, pid: int, epoch: int, deadline: float | None,
                   frame: object) -> bool:
        if self.arbiter is None or not self.arbiter.try_claim(self.key):
            return False  # another waiter is recovering; it will release in time
        try:
            now_pid, now_epoch, _ = LOCK.unpack_from(self.buf, self.off)
            if (now_pid, now_epoch) != (pid, epoch):
                return False
            try:
                self.sem.acquire(0)
                recovered = False  # it was released after all: an ordinary acquisition
            except posix_ipc.BusyError:
                recovered = True
            if _failpoints.armed:
                _failpoints.hit("lock.takeover")
            self._own(epoch, deadline, frame)
        finally:
            self.arbiter.release(self.key)
        if recovered:
            if pid == identity.pid:
                log.warning("%s: recovering it from this process, which an exception left "
                            "holding it; repairing", self.what)
            else:
                log.warning("%s: took over from dead owner pid %s (epoch %s); repairing",
                            self.what, pid or "unknown", epoch)
            _recoveries[0] += 1
            if self.repair is not None:
                try:
                    self.repair()
                except BaseException:
                    self.release()
                    raise
        return True


class ContextLock(RobustLock):
    """``ctx.lock``: its owner record lives in the context's slot, which a later
    incarnation of another context may reuse, while the semaphore belongs to one
    incarnation. So every write of the record happens under the slot's stripe lock after
    checking the incarnation: a handle of a closed context can neither take nor clear
    the record of the context that now owns the slot, and a waiter on a closed context
    gets ``ContextClosedError`` instead of waiting forever.

    It is re-entrant for the thread that holds it, like ``threading.RLock``: ``put`` and
    ``get`` take it themselves, and ``with ctx.lock: ctx.put(ctx.get() + 1)`` is the
    read-modify-write users write first. The holder is a thread *of a process*: a child
    forked inside ``with ctx.lock`` inherits this object with the parent's thread id, but
    not the lock, so it neither re-enters nor releases it (that would post the parent's
    semaphore and let a second holder in).
    """

    __slots__ = ("guard", "is_open", "closed_error", "_thread", "_pid", "_depth")

    def __init__(self, sem: posix_ipc.Semaphore, buf: Words | memoryview, off: int, key: int,
                 timeout: float, arbiter: Arbiter, what: str, guard: RobustLock,
                 is_open: Callable[[], bool], closed_error: Callable[[], Exception]) -> None:
        super().__init__(sem, buf, off, key, timeout, arbiter, None, what)
        self.guard = guard
        self.is_open = is_open
        self.closed_error = closed_error
        self._thread = 0
        self._pid = 0
        self._depth = 0

    def acquire(self, timeout: float | None = None, _depth: int = 1) -> None:
        frame = _getframe(_depth)

        def take() -> bool:
            deadline = None if timeout is None else monotonic() + timeout
            if self._take_sem(timeout, frame):
                self._own(None, deadline, frame)
            return True

        self._hold(take)

    def try_acquire(self, timeout: float = 0.0) -> bool:
        """As ``acquire``, but gives up (False) unless the lock is free within
        ``timeout`` seconds; re-entrant like it, and released with ``release``."""
        return self._hold(lambda: RobustLock.try_acquire(self, timeout))

    def _hold(self, take: Callable[[], bool]) -> bool:
        """What ``acquire`` and ``try_acquire`` share around ``take`` (which gets the
        lock and records its owner, or returns False): re-entry, the closed check, and
        the hold's bookkeeping."""
        if self._thread == threading.get_ident() and self._pid == identity.pid:
            self._depth += 1
            return True
        if not self.is_open():
            raise self.closed_error()
        try:
            if not take():
                return False
            self._mark_held()
        except BaseException:
            self._after_interrupt()
            raise
        return True

    def _own(self, epoch: int | None, deadline: float | None = None,
             frame: object = None) -> None:
        # The stripe lock, within what is left of the caller's timeout: a live process
        # keeping it (stopped in a debugger, descheduled) must not make
        # acquire(timeout=...) wait without end.
        left = None if deadline is None else max(0.0, deadline - monotonic())
        try:
            self.guard.acquire(left)
        except TimeoutError:
            self.sem.release()  # the semaphore was ours: give it back
            raise TimeoutError(
                f"timed out waiting for the stripe lock to record the owner of {self.what}"
            ) from None
        try:
            if self.is_open():
                super()._own(epoch, deadline, frame)
                return
        finally:
            self.guard.release()
        self.sem.release()
        raise self.closed_error()

    def leaked(self, exiting: object = None) -> bool:
        """Not RobustLock's frame rule: this lock's critical section is the user's, and a
        live thread may hold it from a frame that has returned (``acquire()`` in a helper,
        a class's ``__enter__``) or is suspended (a ``contextmanager`` generator, a
        coroutine across an ``await``). Left held means recorded as held through this
        object by a thread that has ended, or by the very thread asking while it does not
        hold it (re-entrantly; else it would not be waiting): an interrupt inside
        ``acquire`` after the record, or inside ``release`` before it was cleared."""
        pid, _epoch, start = LOCK.unpack_from(self.buf, self.off)
        holder = self.holder
        if pid != identity.pid or start != identity.start or not holder:
            return False
        if holder == threading.get_ident():
            return self._thread != holder or self._pid != identity.pid
        return holder not in sys._current_frames()

    def _mark_held(self) -> None:
        self._thread = threading.get_ident()
        self._pid = identity.pid
        self._depth = 1

    def release(self) -> None:
        if self._thread != threading.get_ident():
            raise RuntimeError(f"{self.what}: released by a thread that does not hold it")
        if self._pid != identity.pid:
            raise RuntimeError(
                f"{self.what}: held by pid {self._pid} when it forked; pid {identity.pid}, "
                "its child, does not hold it and cannot release it"
            )
        self._depth -= 1
        if self._depth:
            return
        try:
            self._thread = 0
            self._drop_hold()
        except BaseException:
            self._after_interrupt()
            raise

    def _drop_hold(self) -> None:
        """Clear the owner record (if it is still this context's and ours) and post."""
        with self.guard:
            if self.is_open() and self.owner().pid == identity.pid:
                self.w32[self.i32] = 0
            self.holder = 0
            self.frame = None
        self.sem.release()

    def _after_interrupt(self) -> None:
        """An exception left ``acquire``, ``try_acquire`` or ``release`` part way.
        Recover the stripe lock it may have left held while recording the owner under
        it, then this lock itself if the record names this thread while the hold's
        bookkeeping says it does not hold it (the exception came between the record and
        ``_mark_held``, or between ``_thread = 0`` and the release): every other process
        would wait for that live owner without end."""
        self.guard.recover_leaked()
        if self.holder == threading.get_ident() and self._thread != self.holder:
            self._drop_hold()

    def _after_timeout(self, suspect: tuple[int, int] | None, deadline: float | None,
                       frame: object) -> tuple[int, int] | None:
        if not self.is_open():
            raise self.closed_error()
        if self.owner().pid == 0:
            # Between sem_wait and recording itself, a holder of this lock waits for the
            # stripe lock and writes the record under it (``_own``). So "no owner
            # recorded" means something only once the stripe lock has been free: take it
            # and let it go. That also recovers the stripe lock if its holder died, for
            # example a holder of this lock killed while recording itself, which would
            # otherwise wedge this lock until some other operation touched the stripe.
            left = None if deadline is None else max(0.0, deadline - monotonic())
            try:
                self.guard.acquire(self.timeout if left is None else min(left, self.timeout))
            except TimeoutError:
                return None  # a live process keeps the stripe lock: no verdict yet
            self.guard.release()
        return super()._after_timeout(suspect, deadline, frame)


def _where(frame: object) -> str:
    """``function (file:line)`` of a frame, for messages."""
    code = getattr(frame, "f_code", None)
    if code is None:
        return "an unknown frame"
    return f"{code.co_name} ({os.path.basename(code.co_filename)}:{frame.f_lineno})"  # type: ignore[attr-defined]


# Process-wide count of lock takeovers (read by tools/chaos.py and tests).
_recoveries = [0]


def recoveries() -> int:
    """How many dead-owner takeovers this process has performed."""
    return _recoveries[0]
