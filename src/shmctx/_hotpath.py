"""The hot path: a process gets a context it has mapped before, and returns it.

One stripe lock, three fixed-offset reads and two writes each way; no table lock, no
scan, no ``shm_open``/``mmap``, no msgpack. Two implementations follow the protocol
below, and both cite its step numbers:

* ``PyHotPath`` here: the whole protocol, every case of a mapped context (a busy stripe
  is waited for and taken over from a dead owner; handles dropped unreturned are given
  back first).
* ``_speedups.HotPath`` (``_speedups.c``), when it was built: the common case of the
  same steps, with the same writes in the same order; in every other case it changes
  nothing and defers to ``PyHotPath``. The manager's ``get_or_create_context``,
  ``get_context`` and ``return_context`` are ``front`` descriptors: with the C hot path
  they try it first, in C, before any Python code runs.

Which one a manager runs is chosen once, when it is made (``choose``): C if it was
built, matches this layout (its fingerprint) and ``SHMCTX_PURE_PYTHON`` is not set.

The protocol
------------
Get, ``try_get(name)`` (a handle, or None: the cold path decides)::

    G0  Handles dropped unreturned are queued: give their references back first
        (Python; C defers while the queue is not empty).
    G1  Find this process's mapping of ``name``, and this process's own entry (a
        forked child has none until it registers): else defer.
    G2  Make the handle, marked as standing for no reference: once the counts are
        written nothing may fail, and an interrupt after G5 must not lose the only
        object that can give the reference back (its finalizer does, once G8 marks it).
    G3  Take the slot's stripe lock (L1-L2). C first makes G4's test once without the
        lock, and defers at once if it fails: a get C cannot complete then takes the
        lock only in the Python method it defers to, as often as on the Python path
        (the lock's epoch counts takes, and must end equal on both). Only the test
        under the lock decides.
    G4  Read state, refcount and incarnation in one read: another incarnation, not
        READY, superseded by a newer version (the flags), or refcount at
        ``max_references``: release, defer.
    G5  This process's count for the slot +1 (its row in the refs region, the slot's
        column: found by position, the primary record).
    G6  The slot's refcount +1 (derived: a death between G5 and G6 is repaired from
        the per-process counts).
    G7  Release the stripe lock (L3).
    G8  Mark the handle as standing for the reference. Nothing that can run Python
        code (a signal handler, another thread) comes between G6 and G8.

Return, ``try_return(ctx)`` (True: done; False: the handle is not one this manager can
return now, and the manager raises the error that says why)::

    R0  As G0.
    R1  The handle is this owner's, was got by this pid, and stands for a reference.
    R2  Take the slot's stripe lock (L1-L2); C makes R3's test once before, as at G3.
    R3  The slot still holds the handle's incarnation, not FREE, and this process's
        count for it is above 0: else C releases and defers; Python (after R4, as the
        whole definition) raises ``ContextClosedError``.
    R4  Mark the handle returned, before the counts: an interrupt may then leak this
        one reference, but never give it back twice (here and by its finalizer).
    R5  Count -1, refcount -1 (not below 0), last_used = CLOCK_MONOTONIC now.
    R6  Release the stripe lock (L3), then the handle's ``buf`` view.
    R7  If the context is a superseded version (a newer one was published), it goes
        with its last reference: ``Slots.after_return`` takes the table lock and frees
        it if its refcount is 0 (C leaves such returns to Python).

A stripe lock (``_lock.RobustLock``)::

    L1  Take the semaphore (a short spin, then yield; C defers if it stays busy, and
        Python waits in the kernel, looking at the owner after each lock_timeout and
        taking over from a dead one: ``RobustLock._after_timeout``).
    L2  Write the owner record: epoch + 1, owner start time, then the owner pid last,
        in one aligned store (readers without the lock see no owner or a whole one).
    L3  Release: owner pid = 0, then post the semaphore.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from . import _failpoints
from . import _layout as L
from ._context import (
    MemoryContext,
    mark_counted,
    mark_returned,
    release_view,
    returnable,
    returned,
)
from ._errors import ContextClosedError
from ._proc import identity
from ._slots import Slots

log = logging.getLogger("shmctx")

__all__ = ["HotPath", "PyHotPath", "choose", "front"]


class HotPath(Protocol):
    """What both implementations offer (see the protocol above)."""

    def try_get(self, name: str) -> MemoryContext | None: ...

    def try_return(self, ctx: MemoryContext) -> bool: ...


def _load_speedups() -> Any:
    """The C hot path (``_speedups.c``), unless it was not built (no compiler at
    install) or was built for another table layout (a stale build left in a source
    tree must never write a table)."""
    try:
        from . import _speedups
    except ImportError as e:
        log.debug("C speedups not available (%s); the hot path runs in Python", e)
        return None
    if getattr(_speedups, "LAYOUT_FINGERPRINT", None) != L.FINGERPRINT:
        log.warning("C speedups were built for another table layout; the hot path runs "
                    "in Python (rebuild shmctx)")
        return None
    _speedups.install_finalizer(MemoryContext, tuple(
        MemoryContext.__dict__[f] for f in ("_returned", "_owner", "_mapped", "_pid")))
    return _speedups


_speedups = _load_speedups()

F = TypeVar("F", bound=Callable[..., Any])


def front(method: F) -> F:
    """``method`` of ``ContextManager`` (get_or_create_context, get_context or
    return_context), with the C hot path in front of it when it was built: a method
    descriptor in C that completes the common case itself (if the manager chose C)
    and calls ``method`` for everything else, so ``method`` stays the one full
    definition."""
    if _speedups is None:
        return method
    return _speedups.front(method)  # type: ignore[no-any-return]


def choose(slots: Slots) -> Any:
    """The C hot path for a new manager, or None: then ``PyHotPath`` serves alone.
    Chosen once per manager, here."""
    if _speedups is None or os.environ.get("SHMCTX_PURE_PYTHON"):
        return None
    t, mappings = slots.table, slots.mappings
    try:
        return _speedups.HotPath(
            mappings, t.buf, [lk.sem.name for lk in t.stripe_locks], slots.max_refs,
            mappings.mapped, MemoryContext,
            tuple(MemoryContext.__dict__[f] for f in
                  ("_owner", "_mapped", "_pid", "_returned", "_view")),
            vars(_failpoints), mappings.dropped,
        )
    except FileNotFoundError:
        # It opens the stripe semaphores anew by name: the namespace was unlinked
        # since the table was attached. The Python path, which registers next, reports
        # that as the documented error.
        log.debug("namespace %r went away while attaching; the hot path runs in Python",
                  t.ns)
        return None


class PyHotPath:
    """The protocol above, in Python, for one manager."""

    __slots__ = ("slots", "mappings", "entry", "u32", "buf", "max_refs", "uncount")

    def __init__(self, slots: Slots) -> None:
        self.slots = slots
        self.mappings = slots.mappings
        self.entry = slots.entry
        self.u32 = slots.table.words.u32
        self.buf = slots.table.buf
        self.max_refs = slots.max_refs
        self.uncount = slots.uncount  # bound once: a return looks up nothing it need not

    def try_get(self, name: str) -> MemoryContext | None:
        mappings = self.mappings
        if mappings.dropped:  # G0
            self.slots.return_dropped()
        m = mappings.mapped.get(name)  # G1
        if m is None or self.entry.ready_pid != identity.pid:
            return None
        so = m.off
        lock = m.stripe
        handle = MemoryContext(mappings, m, identity.pid, False)  # G2
        lock.acquire()  # G3
        try:
            state, flags, rc, inc = L.S_GET.unpack_from(self.buf, so)  # G4
            if inc != m.inc or state != L.READY or (self.max_refs and rc >= self.max_refs) \
                    or flags & L.SLOT_SUPERSEDED:
                return None
            # G5: Slots.add_ref and ProcessEntry.count, inlined (this is the hot path):
            # this process's count for the slot, at its place in the entry's row.
            u32 = self.u32
            ref = self.entry.row + m.slot
            rc_i = (so + L.S_REFCOUNT_OFF) >> 2
            u32[ref] += 1
            try:
                if _failpoints.armed:
                    _failpoints.hit("acquire.proc_counted")
                u32[rc_i] = rc + 1  # G6
                mark_counted(handle)  # G8 (before G7 here: a marked handle is a counted one)
            except BaseException:
                # A signal handler can raise as mark_counted is entered (Python checks
                # for signals when a function starts), after G5: the handle then stands
                # for nothing and would never give the reference back, so it is not
                # taken. Still under the stripe lock: both counts as they were.
                if returned(handle):
                    u32[ref] -= 1
                    u32[rc_i] = rc
                raise
        finally:
            lock.release()  # G7
        return handle

    def try_return(self, ctx: MemoryContext) -> bool:
        if self.mappings.dropped:  # R0
            self.slots.return_dropped()
        m = returnable(ctx, self.mappings, identity.pid)  # R1
        if m is None:
            return False
        lock = m.stripe
        lock.acquire()  # R2
        try:
            if not mark_returned(ctx):  # R4 (another thread returned it meanwhile)
                return False
            if not self.uncount(m):  # R3 and R5 in one read of the slot
                raise ContextClosedError(
                    f"context {m.name!r} (incarnation {m.inc}) was closed, swept or "
                    "re-created since this handle was acquired"
                )
        finally:
            lock.release()  # R6
        release_view(ctx)
        if self.buf[m.off + 1] & L.SLOT_SUPERSEDED:  # R7
            self.slots.after_return(m)
        return True
