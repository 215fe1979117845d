"""This process's entry in a namespace's table: registering it, the reference counts it
holds, and giving it back, by ``close()`` or when a manager is collected without it.

A process entry (see ``_layout``) owns one row of the table's reference counts, a count
per slot: the primary record of who holds what, from which a dead process's references
are reclaimed and every slot's refcount can be rebuilt. A count is found by position
(the row's offset + 4 x slot), so there is nothing to look up and nothing to claim: a
process may hold references to every context of the table at once. A manager registers
its entry on first use (a forked child registers its own) and gives it back when it
leaves.
"""

from __future__ import annotations

import _thread
import gc
import logging
import threading
import time
from collections.abc import Callable
from time import monotonic

from . import _failpoints
from . import _layout as L
from ._lock import RobustLock
from ._proc import identity
from ._table import Table

log = logging.getLogger("shmctx")

__all__ = ["ProcessEntry", "holding", "reclaim_entry"]


class ProcessEntry:
    """One manager's process entry in its table, and where its row of counts is.

    It refers to the table and to nothing that refers to the manager, so the finalizer
    that keeps it (``abandoned``) does not keep the manager alive.
    """

    __slots__ = ("table", "stop", "entry", "ready_pid", "row_off", "row", "register_lock")

    def __init__(self, table: Table, stop: threading.Event) -> None:
        self.table = table
        self.stop = stop  # the sweeper thread's, if it runs: set when the entry goes
        self.entry = (-1, 0)  # (process entry, pid that registered it)
        # The pid whose entry the row below is: the hot path runs only when it is this
        # process's (0: none yet, or a forked child's inherited one).
        self.ready_pid = 0
        self.row_off = -1  # offset of the entry's row of counts (-1: not registered)
        # The row's first count as an index of ``table.words.u32``: this process's count
        # for slot s is ``u32[row + s]``.
        self.row = -1
        # One registration among the threads of a (forked) process.
        self.register_lock = threading.Lock()

    @property
    def proc(self) -> int:
        """The entry's number (-1 before it registers)."""
        return self.entry[0]

    # --- registering ----------------------------------------------------------------

    def claim(self) -> bool:
        """Claim a free entry for this process, with its liveness lock; False if none is
        free. Needs the table lock."""
        t = self.table
        proc, locked = self._claim_free_proc()
        if proc < 0:
            return False
        off = t.geo.proc_off(proc)
        w = t.words
        # The whole row zeroed: counts a previous owner of the entry left (an entry
        # freed by anything but reclaim_entry, a forged or damaged one) must not be
        # taken for this process's. Nobody else writes the row meanwhile: reclaims
        # and closes hold the table lock (held here), and a stripe's repair writes only
        # rows of registered entries, which this is not until its pid is written.
        row_off = t.geo.row_off(proc)
        w.buf[row_off:row_off + t.geo.row_stride] = bytes(t.geo.row_stride)
        # pid last: a half-written entry stays free. Its liveness lock is already held,
        # so nobody sees it registered and unlocked (dead) while we live.
        w.store(off, L.P_HEAD, 0, L.P_LIVE_LOCK if locked else 0, identity.start,
                time.time())
        if _failpoints.armed:
            _failpoints.hit("register.entry_claimed")
        w.put32(off, identity.pid)
        t.liveness.mine = (proc, identity.pid)
        self.entry = (proc, identity.pid)
        self.row_off = row_off
        self.row = row_off >> 2
        return True

    def _claim_free_proc(self) -> tuple[int, bool]:
        """A free process entry with its liveness lock taken (``_liveness``), and whether
        the lock could be had at all (if not, others judge the entry by pid and start
        time). An entry whose lock another description still holds is skipped: it reads
        as free, yet a live process still counts on it. Needs the table lock."""
        p = self._find_free_proc()
        while p >= 0:
            held = self.table.liveness.hold(p)
            if held is not False:
                return p, bool(held)
            p = self._find_free_proc(p + 1)
        return -1, False

    def _find_free_proc(self, first: int = 0) -> int:
        t = self.table
        for p in range(first, t.geo.max_processes):
            if L.P_PID.unpack_from(t.buf, t.geo.proc_off(p))[0] == 0:
                return p
        return -1

    def ensure(self, register: Callable[[], None]) -> None:
        """Run ``register`` unless this process has registered its entry."""
        if self.ready_pid != identity.pid:
            with self.register_lock:  # threads of a forked child: one registration
                if self.ready_pid != identity.pid:
                    register()

    def after_fork(self, stop: threading.Event) -> None:
        """In a forked child: the entry is the parent's; the child has none until it
        registers. Judging that by the pid alone would fail once a descendant got a dead
        ancestor's pid."""
        self.ready_pid = 0
        self.entry = (-1, 0)
        self.table.liveness.mine = (-1, 0)
        self.stop = stop
        self.register_lock = threading.Lock()
        self.row_off = self.row = -1

    # --- reference counts (every change under the slot's stripe lock) --------------

    def count(self, slot: int, delta: int) -> bool:
        """Add ``delta`` to this process's count for ``slot`` (the primary record): one
        read and one store of the u32 at its place in this entry's row. Needs the slot's
        stripe lock, and the entry registered. False if there is nothing to take away."""
        u32 = self.table.words.u32
        i = self.row + slot
        c = u32[i] + delta
        if c < 0:
            return False
        u32[i] = c
        return True

    def holds(self, slot: int) -> bool:
        """Whether this process holds a reference to ``slot`` (its count is above 0)."""
        if self.row < 0 or self.entry[1] != identity.pid:
            return False  # not registered, or the entry is a parent's (a forked child)
        return self.table.words.u32[self.row + slot] > 0

    # --- giving it back -------------------------------------------------------------

    def own_entry(self) -> int:
        """The process entry this process registered and may give back, or -1: none
        yet, its parent's (a forked child that never registered), or the namespace was
        unlinked (the entry went with it)."""
        proc, pid = self.entry
        if proc < 0 or pid != identity.pid or self.table.flags() & L.FLAG_UNLINKED:
            return -1
        # And the entry must still name this very process: a descendant that got a dead
        # ancestor's pid must not give back the entry another process registered since.
        head = self.table.proc_head(proc)
        return proc if (head.pid, head.start) == (identity.pid, identity.start) else -1

    def give_back(self, deadline: float | None = None) -> None:
        """Give back this process's entry as a manager leaves (``close()``, or collected
        without it): its references, the entry, the entry's liveness lock, and the sweep
        lead if this process holds it. Takes the table lock (at most until
        ``deadline``)."""
        t = self.table
        proc = self.own_entry()
        if proc < 0:
            return
        with holding(t.table_lock, deadline):
            reclaim_entry(t, proc)
            # Only once the entry is free: a looker never sees it registered with its
            # lock gone, which would mean this process died.
            t.liveness.drop(proc)
            spid, _f, sstart, _b = t.sweeper()
            if spid == identity.pid and sstart == identity.start:
                t.set_sweeper(0, 0, 0.0)


def reclaim_entry(t: Table, proc: int) -> int:
    """Release every reference of process entry ``proc`` and free the entry. Needs the
    table lock."""
    buf, geo, words = t.buf, t.geo, t.words
    total = 0
    now = monotonic()
    for slot, _c in t.proc_refs(proc):
        so = geo.slot_off(slot)
        ref = geo.ref_off(proc, slot)
        with t.stripe_of(slot):
            # Read again under the lock: the count it gives back is the one it clears.
            c = words.u32[ref >> 2]
            words.put32(ref, 0)
            if not c:
                continue
            if _failpoints.armed:
                _failpoints.hit("reclaim.ref_cleared")
            state, rc, _inc = L.S_CHECK.unpack_from(buf, so)
            if state != L.FREE:
                words.put32(so + L.S_REFCOUNT_OFF, max(0, rc - c))
                words.putf(so + L.S_LAST_USED_OFF, now)
            total += c
    words.put32(geo.proc_off(proc), 0)
    return total


class holding:  # lower case: used as ``with holding(lock, deadline):``, like a function
    """``with lock:``, waiting for it at most until ``deadline`` (a ``monotonic()`` time;
    None: as long as its holder lives). Past the deadline it still takes a free lock.
    A class, not a generator: the lock records the frame whose critical section holds it
    (RobustLock.leaked), and a suspended generator's frame is on no thread's stack."""

    __slots__ = ("lock", "deadline")

    def __init__(self, lock: RobustLock, deadline: float | None) -> None:
        self.lock, self.deadline = lock, deadline

    def __enter__(self) -> None:
        d = self.deadline
        self.lock.acquire(None if d is None else max(0.0, d - monotonic()), 2)

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


# --- a manager collected without close() ----------------------------------------------

def abandoned(e: ProcessEntry) -> None:
    """``weakref.finalize`` callback of a manager collected without ``close()``.

    A finalizer runs wherever a collection starts: at any allocation, in any thread,
    also one that holds this namespace's table lock or a stripe lock through another
    manager (the semaphores are the same), or a Python lock (an Event's, say). Waiting
    for any lock here could wait for this very thread. So the work is handed to a thread
    of its own (``_give_back_abandoned``), started once the collection is over: the C
    hot path, collected with the manager, lets go of the table's buffer only then, and
    the table cannot be unmapped before.
    """
    if _gc_state.collecting:
        _gc_state.abandoned.append(e)
    else:  # freed by reference counting (no cycle): nothing else to wait for
        _start_give_back(e)


class _GcState:
    __slots__ = ("collecting", "abandoned")

    def __init__(self) -> None:
        self.collecting = False
        self.abandoned: list[ProcessEntry] = []  # collected during this collection


_gc_state = _GcState()


def _gc_phase(phase: str, _info: dict[str, int]) -> None:
    """``gc.callbacks`` entry: runs in the collecting thread, before and after each
    collection (never two at once)."""
    if phase == "start":
        _gc_state.collecting = True
        return
    _gc_state.collecting = False
    while _gc_state.abandoned:
        _start_give_back(_gc_state.abandoned.pop())


gc.callbacks.append(_gc_phase)


def _start_give_back(e: ProcessEntry) -> None:
    # A bare _thread first: threading.Thread.start waits on threading's own locks, which
    # this thread may hold right now. That thread starts an ordinary one (daemon, listed
    # by threading.enumerate like any other), for which it can safely wait.
    try:
        _thread.start_new_thread(_start_giver, (e,))
    except RuntimeError:
        _close_abandoned(e)


def _start_giver(e: ProcessEntry) -> None:
    try:
        # Not a daemon: a manager dropped as a script ends would otherwise be frozen by
        # the interpreter's exit in the middle of giving back, holding the table lock.
        # The exit waits for it instead; its wait for the table lock is bounded.
        threading.Thread(target=_give_back_abandoned, args=(e,), daemon=False,
                         name=f"shmctx-give-back[{e.table.ns}]").start()
    except RuntimeError:
        _close_abandoned(e)


def _close_abandoned(e: ProcessEntry) -> None:
    """No thread to be had: close the descriptors, which takes no lock. That drops the
    entry's liveness lock, so the other processes (and this one's other managers) see
    the entry as dead and reclaim it at their next sweep."""
    e.table.close()


_GIVE_BACK_WAIT = 10.0  # how long a give-back (and so an exit) waits for the table lock


def _give_back_abandoned(e: ProcessEntry) -> None:
    """The rest of ``abandoned``, on a thread of its own: an ordinary wait for the
    table lock, which whoever holds it releases in time. A forked child that inherited
    the manager and never registered has no entry of its own to give back: it only
    closes its copies of the descriptors."""
    t = e.table
    try:
        e.give_back(monotonic() + _GIVE_BACK_WAIT)
    except TimeoutError:
        log.warning("namespace %r: the table lock stayed held for %ss; the entry of a "
                    "manager collected without close() is left for the sweep to reclaim "
                    "once this process ends", t.ns, _GIVE_BACK_WAIT)
    except Exception:  # nobody to raise to: say it, and close anyway
        log.exception("namespace %r: giving back the process entry of a manager collected "
                      "without close() failed", t.ns)
    finally:
        e.stop.set()  # its sweeper thread, if any, ends now rather than at its next round
        t.close()
