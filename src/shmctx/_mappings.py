"""This process's mappings of a namespace's contexts: the cache that lets a second get of
a context map nothing, whether a mapping is still current, and the one ``ctx.lock``
object per context incarnation.

It is the owner every handle (``MemoryContext``) refers to: a handle asks it whether
its context is still open (``is_open``), for its lock (``lock_of``), and queues
itself on ``dropped`` when it is collected without being returned.
"""

from __future__ import annotations

import logging
import mmap
import struct
import sys
import threading
import weakref
from collections.abc import Callable
from functools import partial

import posix_ipc

from . import _layout as L
from . import _shm
from ._context import _Mapped, _MappedLock
from ._errors import ContextClosedError
from ._lock import ContextLock
from ._table import Table

log = logging.getLogger("shmctx")

__all__ = ["Mappings", "MAX_CACHED_MAPPINGS"]

MAX_CACHED_MAPPINGS = 64  # the default of ContextManager.max_cached_mappings

# A slot's state, incarnation and last-used time, in one read (for prune).
_SLOT_PRUNE = struct.Struct(
    f"<B{L.S_INC_OFF - 1}xQ{L.S_LAST_USED_OFF - L.S_INC_OFF - 8}xd")


def prune_step(limit: int) -> int:
    """How many mappings may be added between two prunes of a cache of ``limit``."""
    return max(1, min(16, limit // 4))


class Mappings:
    """The mapping cache of one manager (see ``ContextManager``'s docstring for what a
    user may rely on), and the owner of its handles."""

    def __init__(self, table: Table, lock_timeout: float,
                 holds: Callable[[int], bool]) -> None:
        self.table = table
        self.namespace = table.ns
        self.lock_timeout = lock_timeout
        self.holds = holds  # whether this process holds a reference to a slot
        self.closed = False  # set once by the manager's close() or unlink()
        self.mapped: dict[str, _Mapped] = {}  # name -> mapping; read by the C hot path
        self.dropped: list[tuple[_Mapped, int]] = []  # see HandleOwner
        self.max_cached = MAX_CACHED_MAPPINGS
        self._added = 0  # mappings added since the last prune
        # Serialises mapping and lock creation: two threads mapping the same context for
        # the first time must end with one mapping, or the loser's handles would see it
        # unmapped; two making its lock object must end with one (see lock_of).
        self._lock = threading.Lock()
        # This process's lock objects by incarnation, while anything uses them (see
        # _MappedLock): a context mapped again shares its live lock object.
        self._locks: weakref.WeakValueDictionary[int, _MappedLock] = \
            weakref.WeakValueDictionary()

    # --- the handle owner interface ------------------------------------------------

    def is_open(self, m: _Mapped) -> bool:
        return self.is_open_at(m.off, m.inc)

    def is_open_at(self, so: int, inc: int) -> bool:
        """Whether the slot at offset ``so`` still holds incarnation ``inc``, open."""
        if self.closed:
            return False
        now: int
        state, _rc, now = L.S_CHECK.unpack_from(self.table.buf, so)
        return now == inc and state != L.FREE

    def version_of(self, m: _Mapped) -> tuple[int, bool]:
        if self.closed:  # the table may be unmapped
            return 0, False
        buf, so = self.table.buf, m.off
        state, flags = L.S_STATE.unpack_from(buf, so)
        newest = state == L.READY and not flags & L.UNINDEXED and \
            L.SLOT["incarnation"].read(buf, so) == m.inc
        return L.SLOT["version"].read(buf, so), newest

    def lock_of(self, m: _Mapped) -> ContextLock:
        if m.lock is not None:
            return m.lock
        try:
            return self._make_lock(m)
        except BaseException:
            # As every public method of the manager: a stripe lock an interrupt left
            # held on the way is recovered as the exception leaves.
            self.table.recover_leaked_locks(sys._getframe(0))
            raise

    def _make_lock(self, m: _Mapped) -> ContextLock:
        t = self.table
        so = m.off
        # One lock object per mapping: two threads asking for it at once must not each
        # build their own, or each would think it holds the lock through its object, and
        # ``with ctx.lock: ctx.put(...)`` would wait for itself.
        with self._lock:
            if m.lock is not None:
                return m.lock
            # A mapping of the same incarnation made before this one may have left the
            # cache while its lock object is still in use here: share that object.
            lock = self._locks.get(m.inc)
            if lock is not None:
                m.lock = lock
                return lock
            # Created under the stripe lock after checking the incarnation, and unlinked
            # by close under the same lock: a stale handle can never re-create (and
            # leak) it.
            with m.stripe:
                state, flags = L.S_STATE.unpack_from(t.buf, so)
                if L.S_INC.unpack_from(t.buf, so + L.S_INC_OFF)[0] != m.inc or \
                        state == L.FREE:
                    raise ContextClosedError(f"context {m.name!r} was closed")
                sem = _shm.open_semaphore(
                    _shm.ctx_lock_name(self.namespace, t.tag, m.inc), t.mode, create=True,
                    trusted=t.trusted, what=f"the lock of context {m.name!r}",
                )
                # The flags byte alone: the state byte is read without a lock (the
                # orphan sweep), and must never be seen rewritten.
                t.words.put8(so + 1, flags | L.SLOT_LOCK)
            m.lock = self._locks[m.inc] = self.context_lock(m, sem)
        return m.lock

    def context_lock(self, m: _Mapped, sem: posix_ipc.Semaphore) -> _MappedLock:
        """A lock object owning ``sem`` (closed when the object goes). It refers to the
        slot and incarnation, not to ``m``: a mapping refers to its lock, and a reference
        back would make a cycle that only the garbage collector frees, pinning the
        memory until it runs."""
        t = self.table
        return _MappedLock(
            sem, t.words, m.off + L.S_LOCK_OFF, (1 << 20) + m.slot,
            self.lock_timeout, t.arbiter, f"lock of context {m.name!r}",
            m.stripe, partial(self.is_open_at, m.off, m.inc),
            partial(ContextClosedError, f"context {m.name!r} (incarnation {m.inc}) was closed"),
        )

    # --- the cache ------------------------------------------------------------------

    def get(self, name: str) -> _Mapped | None:
        return self.mapped.get(name)

    def mapping(self, name: str, slot: int, inc: int, size: int, mm: mmap.mmap | None,
                parent: str | None, kind: int = L.KIND_BYTES) -> _Mapped:
        """A new mapping object (not cached) of ``slot``'s context ``inc``."""
        geo = self.table.geo
        return _Mapped(name, slot, inc, size, mm, parent, geo.slot_off(slot),
                       self.table.stripe_of(slot), slot % geo.stripes, kind)

    def map(self, name: str, slot: int, inc: int, size: int, parent: str | None,
            kind: int = L.KIND_BYTES) -> _Mapped:
        """This process's mapping of ``slot``'s context ``inc``, mapped now unless the
        cache has it. ``posix_ipc.ExistentialError`` if its memory is gone."""
        t = self.table
        with self._lock:
            m = self.mapped.get(name)
            if m is not None and m.inc == inc:
                return m
            mm = _shm.attach_segment(
                t.segment(slot, inc), trusted=t.trusted,
                what=f"the memory of context {name!r} in namespace {self.namespace!r}",
            ) if size else None
            new = self.mapping(name, slot, inc, size, mm, parent, kind)
            # An older incarnation's mapping leaves the cache: that context was closed,
            # and its mapping goes with the last handle of this process using it.
            self.mapped[name] = new
        self.added()
        return new

    def keep(self, m: _Mapped) -> None:
        """Cache ``m``, a mapping this process made for a context it creates."""
        self.mapped[m.name] = m

    def added(self) -> None:
        """Prune the cache every few mappings added, not at each: a prune reads every
        cached slot (some 20 µs for 64 of them), as much as mapping a context costs."""
        self._added += 1
        if self._added >= prune_step(self.max_cached):
            self.prune()

    def forget(self, name: str, inc: int | None = None) -> None:
        """Drop ``name``'s mapping (of incarnation ``inc`` only, if given) from the
        cache; it goes with the last handle of this process using it. Unmapping it now
        would pull the memory from under a thread of this process still writing it
        under its lock (a force close)."""
        with self._lock:
            m = self.mapped.get(name)
            if m is not None and (inc is None or m.inc == inc):
                del self.mapped[name]

    def prune(self) -> None:
        """Let the cache of mappings go of what this process no longer needs: each
        mapping dropped here is unmapped, and its ``ctx.lock`` semaphore closed, as soon
        as nothing of this process uses it any more (see ``_Mapped``), at once if
        nothing does.

        Dropped: the mappings of contexts closed since they were mapped, by any process
        (the slot is free or holds another incarnation). Then, among the open contexts
        this process holds no reference to and whose lock none of its threads holds, the
        least recently used (by any process: the slot's last-used time, which every
        return stamps), so that names never used again do not pile up. Runs every
        ``prune_step`` mappings added, on ``sweep()`` and on each round of the sweeper
        thread; it keeps ``prune_step`` fewer than ``max_cached``, so the bound holds
        until the next run (contexts whose references are returned meanwhile come on
        top).

        Read without the stripe locks: a thread taking a reference to a mapping just
        dropped keeps a working handle on it (the mapping outlives the cache while a
        handle uses it); the next get of that name then maps the context anew.
        """
        buf = self.table.buf
        limit = self.max_cached
        keep = limit - prune_step(limit) if limit > 1 else limit
        self._added = 0
        with self._lock:
            idle: list[tuple[float, str]] = []
            for name, m in list(self.mapped.items()):
                state, inc, last = _SLOT_PRUNE.unpack_from(buf, m.off)
                if inc != m.inc or state == L.FREE:
                    del self.mapped[name]
                elif state == L.READY and not self._used_here(m):
                    idle.append((last, name))
            if len(idle) > keep:
                idle.sort()
                for _last, name in idle[: len(idle) - keep]:
                    del self.mapped[name]

    def _used_here(self, m: _Mapped) -> bool:
        """Whether this process holds a reference to ``m``'s context or one of its
        threads holds the context's lock."""
        if m.lock is not None and m.lock.held_here():
            return True
        return self.holds(m.slot)

    def after_fork(self) -> None:
        """In a forked child: locks held by the parent's threads are not held here."""
        self._lock = threading.Lock()
        for m in self.mapped.values():
            m.lock = None
        # No lock object of the parent's is handed out in the child: each is made anew.
        self._locks = weakref.WeakValueDictionary()

    def unmap_all(self) -> None:
        """The manager is closing: unmap every mapping now."""
        for m in list(self.mapped.values()):
            m.unmap()
        self.mapped.clear()
        # Handles dropped unreturned: their references went with the entry, and a queued
        # one would keep its mapping (and descriptor) alive for as long as this object.
        # The finalizers queue nothing once ``closed`` is set.
        self.dropped.clear()
