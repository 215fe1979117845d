"""One namespace's mapped table: creation, attachment, and the operations on its regions.

Field offsets come from ``_layout``; the locking protocol from ``_lock``. This module
knows which lock each operation needs but does not take them itself, except in the
``repair_*`` methods, ``retire`` and ``recover_leaked_locks``; ``_slots.Slots`` (and
``_entry``, ``_sweeper``) compose the operations under the locks.

Creation is atomic by construction: the creator builds the whole table, semaphores
included, under a private staging name and then ``link(2)``s it to the public name,
which fails if a table already exists there. A half-built table is never visible, two
racing creators end with one table, and an existing table is never overwritten.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import mmap
import os
import secrets
import threading
import time
from collections.abc import Callable, Collection
from functools import partial

import posix_ipc

from . import _failpoints, _shm
from . import _layout as L
from ._config import ContextConfig
from ._errors import (
    ContextManagerClosedError,
    ContextNotFoundError,
    InvalidConfigError,
    TableFormatError,
)
from ._liveness import Liveness
from ._lock import Arbiter, RobustLock

log = logging.getLogger("shmctx.table")


def name_hash(name_b: bytes) -> int:
    """BLAKE2b-64 of a name: the same in every process, unlike ``hash()``."""
    return int.from_bytes(hashlib.blake2b(name_b, digest_size=8).digest(), "little")


class Table:
    """A mapped table and its semaphores, as seen by one process."""

    def __init__(self, ns: str, shm: posix_ipc.SharedMemory, mm: mmap.mmap,
                 trusted: Collection[int] = ()) -> None:
        self.ns = ns
        self.trusted = frozenset(trusted)  # uids besides ours whose objects we may use
        self._shm = shm
        self.mm = mm
        self.buf = memoryview(mm)
        self._sems: list[posix_ipc.Semaphore] = []
        arbiter: Arbiter | None = None
        words: L.Words | None = None
        # Whatever fails below (a header field, a descriptor limit, a semaphore missing or
        # another user's), what was taken is given back and the view released, so that
        # the caller can unmap and close: the mapping cannot close while a view exists.
        try:
            # Every write to the table goes through these (see _layout, "Writing shared
            # fields"); they pin the mapping, so close() releases them before it.
            self.words = words = L.Words(self.buf)
            self.fd = shm.fd
            self.ino = os.fstat(shm.fd).st_ino
            h = L.H_FIXED.unpack_from(self.buf, L.H_FIXED_OFF)
            (_ver, _hs, _ss, capacity, stripes, max_procs, _total, max_refs, mode,
             max_idle, interval, lock_timeout, _created) = h
            index_size = L.H_INDEX_SIZE.unpack_from(self.buf, L.H_INDEX_SIZE_OFF)[0]
            self.geo = L.Geometry(capacity, max_procs, stripes, index_size)
            self.mode: int = mode
            self.config = ContextConfig(
                max_references=max_refs,
                max_idle_time=max_idle,
                cleanup_interval=interval,
                capacity=capacity,
                lock_timeout=lock_timeout,
                max_processes=max_procs,
            )
            self.table_id = L.H_TABLE_ID.unpack_from(self.buf, L.H_TABLE_ID_OFF)[0]
            self.tag = _shm.tag_of(self.table_id)
            with _shm.os_errors(f"the table of namespace {ns!r}"):
                arbiter = Arbiter(self.fd)
            self._open_sems(ns, mode)
            self.arbiter = arbiter
            timeout = float(lock_timeout)
            self.table_lock = RobustLock(
                self._sems[0], self.words, self.geo.lock_off(0), 0, timeout, self.arbiter,
                self.repair_table, f"table lock of namespace {ns!r}",
            )
            self.stripe_locks = [
                RobustLock(
                    self._sems[1 + k], self.words, self.geo.lock_off(1 + k), 1 + k, timeout,
                    self.arbiter, partial(self.repair_stripe, k, locked=True),
                    f"stripe lock {k} of namespace {ns!r}",
                )
                for k in range(self.geo.stripes)
            ]
            # Who is alive: the process entries' kernel locks, /proc where there are none.
            self.liveness = Liveness(self.arbiter, self.buf, self.geo)
            self.arbiter.owner_alive = self.liveness.owner_alive
        except BaseException:
            self._close_sems()
            if arbiter is not None:
                arbiter.close()
            if words is not None:
                words.release()
            self.buf.release()
            raise

    def _open_sems(self, ns: str, mode: int) -> None:
        names = [(_shm.table_lock_name(ns, self.tag), f"the table lock of namespace {ns!r}")]
        names += [(_shm.stripe_name(ns, self.tag, k), f"stripe lock {k} of namespace {ns!r}")
                  for k in range(self.geo.stripes)]
        try:
            for name, what in names:
                self._sems.append(
                    _shm.open_semaphore(name, mode, False, trusted=self.trusted, what=what)
                )
        except posix_ipc.PermissionsError:
            raise PermissionError(
                errno.EACCES, f"no permission to open the semaphores of namespace {ns!r}"
            ) from None
        except posix_ipc.ExistentialError:
            if _same_file(_shm.table_name(ns), self.ino):
                raise TableFormatError(
                    f"table of namespace {ns!r} ({_shm.host_path(_shm.table_name(ns))}): its "
                    f"semaphores ({_shm.table_lock_name(ns, self.tag)}, ...) are missing; the "
                    "table is damaged or is a copy; remove that file if no process uses it"
                ) from None
            raise  # unlinked while we attached: Table.open looks again

    # --- opening --------------------------------------------------------------------

    @classmethod
    def open(cls, ns: str, config: ContextConfig | None, mode: int,
             trusted: Collection[int] = (), create: bool = True) -> tuple[Table, bool]:
        """Attach to namespace ``ns``'s table, creating it if absent (unless not
        ``create``: then ``ContextNotFoundError``). Returns ``(table, created)``. Every
        object of the namespace must be owned by this process's effective uid or one in
        ``trusted`` (``ForeignObjectError``)."""
        for _ in range(100):
            try:
                shm = _shm.open_shm(_shm.table_name(ns), f"the table of namespace {ns!r}")
            except posix_ipc.ExistentialError:
                if not create:
                    raise ContextNotFoundError(
                        f"namespace {ns!r} does not exist (it was asked for with "
                        "create=False: is the process that makes it running?)") from None
                table = cls._create(ns, config or ContextConfig(), mode, trusted)
                if table is not None:
                    return table, True
                continue  # lost the race: attach to the winner's table
            except (PermissionError, posix_ipc.PermissionsError):
                raise PermissionError(
                    errno.EACCES, f"no permission to open the table of namespace {ns!r} "
                    f"({_shm.host_path(_shm.table_name(ns))})"
                ) from None
            try:
                table = cls._attach(ns, shm, trusted)
            except posix_ipc.ExistentialError:
                shm.close_fd()
                continue  # unlinked under our feet; look again
            if table.flags() & L.FLAG_UNLINKED:
                # An unlink() began, and may have died half way: finish removing the
                # names (idempotent if it is still running) and make a new table.
                table.unlink_names()
                table.close()
                continue
            return table, False
        raise TableFormatError(f"namespace {ns!r}: table keeps vanishing while being opened")

    @classmethod
    def _attach(cls, ns: str, shm: posix_ipc.SharedMemory,
                trusted: Collection[int] = ()) -> Table:
        """The table behind ``shm`` (which it closes on failure), once its owner is
        trusted and its header sound."""
        path = _shm.host_path(_shm.table_name(ns))
        what = f"table of namespace {ns!r} ({path})"
        mm = None
        try:
            # The owner of the very file we map, not of whatever the name shows later.
            st = os.fstat(shm.fd)
            _shm.check_owner(st, path, f"the table of namespace {ns!r}", trusted)
            if st.st_size < L.HEADER_SIZE:
                raise TableFormatError(f"{what} is truncated: {st.st_size} bytes")
            with _shm.os_errors(f"the table of namespace {ns!r}"):
                mm = mmap.mmap(shm.fd, st.st_size)
            problem = header_problem(memoryview(mm)[: L.HEADER_SIZE], st.st_size)
            if problem:
                raise TableFormatError(f"{what}: {problem}")
            return cls(ns, shm, mm, trusted)
        except BaseException:
            if mm is not None:
                mm.close()
            shm.close_fd()
            raise

    @classmethod
    def attach(cls, ns: str) -> Table | None:
        """Namespace ``ns``'s table as it is, for the repair tools (``ctx-inspect --gc``):
        None when there is none (never created), and never registered as a process of
        it. ``TableFormatError`` when it is damaged; ``posix_ipc.ExistentialError`` when
        it is unlinked while being attached."""
        try:
            shm = posix_ipc.SharedMemory(_shm.table_name(ns))
        except posix_ipc.ExistentialError:
            return None
        return cls._attach(ns, shm)

    @classmethod
    def _create(cls, ns: str, config: ContextConfig, mode: int,
                trusted: Collection[int] = ()) -> Table | None:
        table_id = secrets.randbits(64) or 1
        tag = _shm.tag_of(table_id)
        geo = L.Geometry(config.capacity, config.max_processes)
        staging = _shm.staging_name(ns, tag, os.getpid())
        what = f"the table of namespace {ns!r}"
        shm = _shm.open_shm(staging, what, posix_ipc.O_CREX, mode)
        sems: list[str] = []
        mm: mmap.mmap | None = None
        buf: memoryview | None = None
        try:
            if mode != 0o600:
                os.fchmod(shm.fd, mode)
            # Every page allocated now: a sparse table would be a SIGBUS on a full
            # /dev/shm the first time a process (or ctx-inspect) touches a new page.
            _shm.reserve(shm.fd, geo.total, what)
            with _shm.os_errors(what):
                mm = mmap.mmap(shm.fd, geo.total)
            buf = memoryview(mm)
            L.H_FIXED.pack_into(
                buf, L.H_FIXED_OFF, L.LAYOUT_VERSION, L.HEADER_SIZE, L.SLOT_SIZE,
                geo.capacity, geo.stripes, geo.max_processes, geo.total,
                config.max_references, mode, config.max_idle_time, config.cleanup_interval,
                config.lock_timeout, time.time(),
            )
            L.H_NEXT_INC.pack_into(buf, L.H_NEXT_INC_OFF, 1)
            L.H_INDEX_SIZE.pack_into(buf, L.H_INDEX_SIZE_OFF, geo.index_size)
            L.H_TABLE_ID.pack_into(buf, L.H_TABLE_ID_OFF, table_id)
            ns_b = ns.encode()
            L.H_NAMESPACE.pack_into(buf, L.H_NAMESPACE_OFF, len(ns_b), ns_b)
            L.H_FINGERPRINT.pack_into(buf, L.H_FINGERPRINT_OFF, L.FINGERPRINT)
            _rebuild_free_list(buf, geo)
            for name in [_shm.table_lock_name(ns, tag)] + [
                _shm.stripe_name(ns, tag, k) for k in range(geo.stripes)
            ]:
                _shm.create_semaphore(name, mode, trusted=trusted).close()
                sems.append(name)
            if _failpoints.armed:
                _failpoints.hit("table.create_before_magic")
            L.H_MAGIC.pack_into(buf, 0, L.MAGIC)
            buf.release()
            mm.close()
            try:
                os.link(_shm.host_path(staging), _shm.host_path(_shm.table_name(ns)))
                won = True
            except FileExistsError:
                won = False
        except BaseException:
            if buf is not None:
                buf.release()
            if mm is not None:
                mm.close()
            for name in sems:
                _shm.unlink_semaphore(name)
            shm.close_fd()
            _shm.unlink_segment(staging)
            raise
        shm.close_fd()
        _shm.unlink_segment(staging)
        if not won:
            for name in sems:
                _shm.unlink_semaphore(name)
            return None
        attached = _shm.open_shm(_shm.table_name(ns), what)
        return cls._attach(ns, attached, trusted)

    # --- header ---------------------------------------------------------------------

    def flags(self) -> int:
        flags: int = L.H_FLAGS.unpack_from(self.buf, L.H_FLAGS_OFF)[0]
        return flags

    def check_usable(self) -> None:
        if self.flags() & L.FLAG_UNLINKED:
            raise ContextManagerClosedError(f"namespace {self.ns!r} was unlinked")

    def mark_unlinked(self) -> None:
        """Set FLAG_UNLINKED. Needs the table lock."""
        self.words.put32(L.H_FLAGS_OFF, self.flags() | L.FLAG_UNLINKED)

    def next_incarnation(self) -> int:
        """Needs the table lock."""
        inc: int = L.H_NEXT_INC.unpack_from(self.buf, L.H_NEXT_INC_OFF)[0]
        self.words.put64(L.H_NEXT_INC_OFF, inc + 1)
        return inc

    def add_live(self, delta: int) -> None:
        """Needs the table lock. The live count is derived data, for reports only: no
        decision trusts it (see ``derived_problems``)."""
        live = L.H_LIVE.unpack_from(self.buf, L.H_LIVE_OFF)[0]
        self.words.put32(L.H_LIVE_OFF, max(0, live + delta))

    def live_count(self) -> int:
        live: int = L.H_LIVE.unpack_from(self.buf, L.H_LIVE_OFF)[0]
        return live

    def sweeper(self) -> L.Sweeper:
        return L.Sweeper.read(self.buf)  # the header starts the table

    def set_sweeper(self, pid: int, start: int, beat: float) -> None:
        self.words.store(L.H_SWEEPER_OFF, L.H_SWEEPER, pid, 0, start, beat)

    # --- slots ----------------------------------------------------------------------

    def stripe_of(self, slot: int) -> RobustLock:
        return self.stripe_locks[slot % self.geo.stripes]

    def slot_name(self, slot: int) -> bytes:
        off = self.geo.slot_off(slot)
        n = L.SLOT["name_len"].read(self.buf, off)
        return bytes(self.buf[off + L.S_NAME_OFF : off + L.S_NAME_OFF + min(n, L.NAME_MAX)])

    def read_slot(self, slot: int) -> L.Slot:
        """Every field of slot ``slot``, as a named record."""
        return L.Slot.read(self.buf, self.geo.slot_off(slot))

    def segment(self, slot: int, inc: int) -> str:
        return _shm.segment_name(self.ns, self.tag, slot, inc)

    # --- name index (table lock) ----------------------------------------------------

    def find(self, name_b: bytes, h: int) -> int:
        """Slot of the live context named ``name_b``, or -1."""
        buf, geo = self.buf, self.geo
        mask = geo.index_size - 1
        pos = h & mask
        for _ in range(geo.index_size):
            e: int = L.INDEX_ENTRY.unpack_from(buf, geo.index_entry_off(pos))[0]
            if e == 0:
                return -1
            slot = e - 1
            if slot < geo.capacity:
                off = geo.slot_off(slot)
                state, _f, n, _rc, _inc, sh = L.S_HEAD.unpack_from(buf, off)
                # (A memoryview equals the bytes of the same content, which pyright does
                # not know.)
                if (sh == h and state != L.FREE and n == len(name_b)
                        and buf[off + L.S_NAME_OFF : off + L.S_NAME_OFF + n] == name_b):  # pyright: ignore[reportUnnecessaryComparison]
                    return slot
            pos = (pos + 1) & mask
        return -1

    def index_insert(self, slot: int, h: int) -> None:
        buf, geo = self.buf, self.geo
        mask = geo.index_size - 1
        pos = h & mask
        for _ in range(geo.index_size):
            off = geo.index_entry_off(pos)
            if L.INDEX_ENTRY.unpack_from(buf, off)[0] == 0:
                self.words.put32(off, slot + 1)
                return
            pos = (pos + 1) & mask
        raise TableFormatError(f"namespace {self.ns!r}: name index is full (damaged table)")

    def index_replace(self, old: int, new: int, h: int) -> None:
        """Point ``old``'s index entry (of hash ``h``) at ``new``, a slot of the same
        name, in one store: a lookup sees one or the other, never neither."""
        buf, geo = self.buf, self.geo
        mask = geo.index_size - 1
        pos = h & mask
        for _ in range(geo.index_size):
            off = geo.index_entry_off(pos)
            e = L.INDEX_ENTRY.unpack_from(buf, off)[0]
            if e == old + 1:
                self.words.put32(off, new + 1)
                return
            if e == 0:
                break
            pos = (pos + 1) & mask
        self.index_insert(new, h)  # old was not indexed (damage repaired since)

    def index_remove(self, slot: int, h: int) -> None:
        """Remove ``slot``'s entry, shifting back the entries that follow it in its
        probe run (no tombstones, so lookups never degrade)."""
        buf, geo = self.buf, self.geo
        mask = geo.index_size - 1
        i = h & mask
        for _ in range(geo.index_size):
            e = L.INDEX_ENTRY.unpack_from(buf, geo.index_entry_off(i))[0]
            if e == 0:
                return
            if e == slot + 1:
                break
            i = (i + 1) & mask
        else:
            return
        j = i
        while True:
            j = (j + 1) & mask
            e = L.INDEX_ENTRY.unpack_from(buf, geo.index_entry_off(j))[0]
            if e == 0 or j == i:
                break
            home = (self._hash_of(e - 1)) & mask
            # The entry at j may move to the hole at i unless its home lies cyclically
            # in (i, j], where a lookup starting at home would not pass i.
            if (i < home <= j) if i <= j else (home > i or home <= j):
                continue
            self.words.put32(geo.index_entry_off(i), e)
            i = j
        self.words.put32(geo.index_entry_off(i), 0)

    def _hash_of(self, slot: int) -> int:
        if slot >= self.geo.capacity:
            return 0
        h: int = L.SLOT["name_hash"].read(self.buf, self.geo.slot_off(slot))
        return h

    # --- free list (table lock) -----------------------------------------------------

    def pop_free(self) -> int:
        """A free slot taken off the free list, or -1 if the list has none. The list is
        derived data: an entry that is not free is skipped (and dropped), and a walk
        longer than the table (a loop, which only damage makes) ends it, so a damaged
        list costs at most one pass. ``Slots.claim`` checks a -1 against the slots."""
        buf, geo, w = self.buf, self.geo, self.words
        head: int = L.H_FREE_HEAD.unpack_from(buf, L.H_FREE_HEAD_OFF)[0]
        for _ in range(geo.capacity):
            if not head or head > geo.capacity:
                break
            slot = head - 1
            head = L.S_NEXT_FREE.unpack_from(buf, geo.slot_off(slot) + L.S_NEXT_FREE_OFF)[0]
            w.put32(L.H_FREE_HEAD_OFF, head)
            if buf[geo.slot_off(slot)] == L.FREE:
                return slot
        w.put32(L.H_FREE_HEAD_OFF, 0)
        return -1

    def push_free(self, slot: int) -> None:
        head = L.H_FREE_HEAD.unpack_from(self.buf, L.H_FREE_HEAD_OFF)[0]
        self.words.put32(self.geo.slot_off(slot) + L.S_NEXT_FREE_OFF, head)
        self.words.put32(L.H_FREE_HEAD_OFF, slot + 1)

    def has_free_slot(self) -> bool:
        """Whether any slot is free, by the slots' own states (the primary record)."""
        return self.first_free_slot() >= 0

    def first_free_slot(self) -> int:
        """The first free slot by the slots' own states, or -1. A slot taken this way
        stays on the free list, whose walk (pop_free) skips slots that are not free."""
        buf, geo = self.buf, self.geo
        return next((s for s in range(geo.capacity) if buf[geo.slot_off(s)] == L.FREE), -1)

    # --- process entries ------------------------------------------------------------

    def proc_head(self, proc: int) -> L.ProcHead:
        return L.ProcHead.read(self.buf, self.geo.proc_off(proc))

    def proc_refs(self, proc: int) -> list[tuple[int, int]]:
        """(slot, count) of each nonzero count in process entry ``proc``'s row."""
        return L.nonzero_counts(self.buf, self.geo.row_off(proc), self.geo.capacity)

    def clear_column(self, slot: int) -> None:
        """Zero every process entry's count for ``slot`` (a slot being freed: its
        references go with it, whatever its refcount says, so that no count outlives
        the incarnation it was taken on). Only the rows of registered entries: a free
        entry's row is zeroed when the entry is claimed, and writing it here would touch
        (and make resident) a page of every row, one page fault per entry on the first
        close of each page's worth of slots. Each count is one aligned 4-byte store.
        Needs the slot's stripe lock."""
        geo = self.geo
        u32 = self.words.u32
        first = geo.ref_off(0, slot) >> 2
        step = geo.row_stride >> 2
        p0, pstep = geo.procs_off >> 2, L.PROC_SIZE >> 2  # each entry's pid, its 1st word
        for p, pid in enumerate(u32[p0:p0 + pstep * geo.max_processes:pstep]):
            if pid:
                u32[first + step * p] = 0

    # --- repair ---------------------------------------------------------------------

    def repair_table(self) -> None:
        """Rebuild everything the table lock guards from the slots themselves. Runs under
        the table lock: after taking it over from a dead owner, and when derived data
        (the live count, the free list) is found to disagree with the slots."""
        buf, geo, w = self.buf, self.geo, self.words
        current: dict[bytes, list[int]] = {}  # name -> its slots that look current
        for slot in range(geo.capacity):
            off = geo.slot_off(slot)
            state, flags, n, _rc, _inc, h = L.S_HEAD.unpack_from(buf, off)
            if state == L.FREE:
                continue
            name_b = self.slot_name(slot)
            if state not in (L.CREATING, L.READY) or n > L.NAME_MAX or \
                    name_hash(name_b) != h:
                self._clear_damaged(slot, state)
                continue
            if not flags & L.UNINDEXED:  # superseded and pending versions share the name
                current.setdefault(name_b, []).append(slot)
        # A name has one current version at most. Two current-looking ones are what a
        # publisher that died inside Slots.switch leaves: the higher version number is
        # current, as if the switch had completed, and a lower one is superseded. Two of
        # one number are damage.
        for slots in current.values():
            if len(slots) < 2:
                continue
            slots = self.newest_first(slots)
            top = L.SLOT["version"].read(buf, geo.slot_off(slots[0]))
            for slot in slots[1:]:
                off = geo.slot_off(slot)
                # A lower version being created by a live process (the name's first
                # version when a publish overtook it) is superseded too, not damage.
                if L.SLOT["version"].read(buf, off) < top:
                    with self.stripe_of(slot):
                        w.put8(off + 1, buf[off + 1] | L.SLOT_SUPERSEDED)
                else:
                    self._clear_damaged(slot, buf[off])
        # After clearing: references to a cleared slot are dropped with the others.
        for k in range(geo.stripes):
            self.repair_stripe(k)  # under the stripe lock, taken in order
        for pos in range(geo.index_size):
            w.put32(geo.index_entry_off(pos), 0)
        live = 0
        for slot in range(geo.capacity):
            off = geo.slot_off(slot)
            if buf[off] != L.FREE:
                if not buf[off + 1] & L.UNINDEXED:
                    self.index_insert(slot, self._hash_of(slot))
                live += 1
        w.put32(L.H_LIVE_OFF, live)
        _rebuild_free_list(w, geo)
        self._recount_children()

    def newest_first(self, slots: list[int]) -> list[int]:
        """``slots`` (versions of one name), the one that is to be current first: the
        highest version number, and of equal numbers a ready one before one still being
        created."""
        buf, geo = self.buf, self.geo
        return sorted(slots, reverse=True, key=lambda s: (
            L.SLOT["version"].read(buf, geo.slot_off(s)), buf[geo.slot_off(s)] == L.READY))

    def _clear_damaged(self, slot: int, state: int) -> None:
        # Its objects (memory, semaphores) no longer match a live incarnation: the orphan
        # sweep removes them.
        log.warning("namespace %r: clearing damaged slot %d (state %d)", self.ns, slot, state)
        off = self.geo.slot_off(slot)
        with self.stripe_of(slot):
            self.words.put8(off + 1, 0)
            self.words.put8(off, L.FREE)

    def repair_derived(self, why: str) -> None:
        """Derived data was found wrong (``why``): rebuild it. Needs the table lock."""
        log.warning("namespace %r: %s; rebuilding the table's derived data from its slots",
                    self.ns, why)
        self.repair_table()

    def children(self) -> dict[int, list[int]]:
        """Live parent slot -> its live child slots, by a scan of every slot (the child
        counts in the slots say only how many). Needs the table lock."""
        geo = self.geo
        out: dict[int, list[int]] = {}
        for slot in range(geo.capacity):
            f = self.read_slot(slot)
            if f.state != L.FREE and f.parent and f.parent <= geo.capacity:
                p = f.parent - 1
                pf = self.read_slot(p)
                if pf.state != L.FREE and pf.incarnation == f.parent_inc:
                    out.setdefault(p, []).append(slot)
        return out

    def _recount_children(self) -> None:
        children = self.children()
        for slot in range(self.geo.capacity):
            self.words.put32(self.geo.slot_off(slot) + L.S_CHILDREN_OFF,
                             len(children.get(slot, ())))

    def dead_creations(self) -> list[tuple[int, int]]:
        """(slot, incarnation) of every slot in CREATING state whose creator is dead."""
        out: list[tuple[int, int]] = []
        for slot in range(self.geo.capacity):
            f = self.read_slot(slot)
            if f.state == L.CREATING and \
                    not self.liveness.owner_alive(f.creator_pid, f.creator_start):
                out.append((slot, f.incarnation))
        return out

    def repair_stripe(self, k: int, locked: bool = False) -> None:
        """Recompute the derived refcount of every slot of stripe ``k`` from the
        per-process counts (the primary record), and drop counts that point at free
        slots. ``locked``: the caller already holds stripe ``k``."""
        geo, buf = self.geo, self.buf
        lock = self.stripe_locks[k]
        if not locked:
            lock.acquire()
        try:
            slots = range(k, geo.capacity, geo.stripes)
            free = [buf[geo.slot_off(s)] == L.FREE for s in slots]
            sums = [0] * len(slots)
            u32 = self.words.u32
            for proc in range(geo.max_processes):
                if L.P_PID.unpack_from(buf, geo.proc_off(proc))[0] == 0:
                    continue
                # The entry's counts for this stripe's slots: every stripes-th count of
                # its row, read in one strided slice.
                first = geo.ref_off(proc, k) >> 2
                counts = u32[first:first + geo.stripes * len(slots):geo.stripes].tolist()
                for j, c in enumerate(counts):
                    if not c:
                        continue
                    if free[j]:  # a count left for a freed slot: its references went
                        u32[first + geo.stripes * j] = 0
                    else:
                        sums[j] += c
            for j, slot in enumerate(slots):
                off = geo.slot_off(slot)
                if L.S_REFCOUNT.unpack_from(buf, off + L.S_REFCOUNT_OFF)[0] != sums[j]:
                    self.words.put32(off + L.S_REFCOUNT_OFF, sums[j])
        finally:
            if not locked:
                lock.release()

    # --- teardown -------------------------------------------------------------------

    def _close_sems(self) -> None:
        for sem in self._sems:
            try:
                sem.close()
            except posix_ipc.Error:
                pass
        self._sems = []

    def unlink_names(self) -> None:
        """Remove the table and its lock semaphores from the host, if the public name
        still refers to this table."""
        if _same_file(_shm.table_name(self.ns), self.ino):
            _shm.unlink_segment(_shm.table_name(self.ns), strict=True)
        _shm.unlink_semaphore(_shm.table_lock_name(self.ns, self.tag), strict=True)
        for k in range(self.geo.stripes):
            _shm.unlink_semaphore(_shm.stripe_name(self.ns, self.tag, k), strict=True)

    def retire(self, timeout: float, keep: Callable[[], str]) -> str:
        """Remove this table from the host unless ``keep()``, asked under the table lock,
        gives a reason to keep it (the repair tools' "remove it if unused"). Returns that
        reason, '' when the table was removed.

        The table lock is waited for at most ``timeout`` seconds (``TimeoutError``), and
        taken over from a dead holder. The table is marked unlinked before its names are
        removed, so that a process attaching meanwhile sees the mark and makes a new
        table (``Table.open``) instead of using one pulled from under it. Its contexts'
        objects are left for ``_sweeper.remove_stale``."""
        self.table_lock.acquire(timeout=timeout)
        try:
            why = keep()
            if not why:
                self.mark_unlinked()
                self.unlink_names()
            return why
        finally:
            self.table_lock.release()

    def recover_leaked_locks(self, exiting: object) -> None:
        """An exception is leaving one of this thread's calls (whose frame is
        ``exiting``): recover any table or stripe lock the thread left held on the way
        (an interrupt between taking a lock and the ``try`` that releases it; see
        RobustLock.leaked). Stripe locks first: recovering the table lock repairs every
        stripe, which takes each of them."""
        me = threading.get_ident()
        try:
            for lock in (*self.stripe_locks, self.table_lock):
                if lock.holder == me:
                    lock.recover_leaked(exiting)
        except ValueError:
            pass  # closed (close() or unlink() unmapped the table): nothing to do

    def close(self) -> None:
        self._close_sems()
        self.arbiter.close()
        try:
            self.words.release()
            self.buf.release()
            self.mm.close()
        except BufferError:
            pass  # a snapshot view is still exported; the mapping goes with it
        self._shm.close_fd()


def _same_file(name: str, ino: int) -> bool:
    """Whether shared-memory object ``name`` is still the file with inode ``ino``."""
    try:
        return os.stat(_shm.host_path(name)).st_ino == ino
    except FileNotFoundError:
        return False


def _rebuild_free_list(w: L.Words | memoryview, geo: L.Geometry) -> None:
    if not isinstance(w, L.Words):
        w = L.Words.unpinned(w)  # a table being built, not yet shared
    head = 0
    for slot in range(geo.capacity - 1, -1, -1):
        off = geo.slot_off(slot)
        if w.buf[off] == L.FREE:
            w.put32(off + L.S_NEXT_FREE_OFF, head)
            head = slot + 1
    w.put32(L.H_FREE_HEAD_OFF, head)


def derived_problems(buf: memoryview | bytes, geo: L.Geometry) -> list[str]:
    """What is wrong with the derived data of the header (live count, free list) as
    checked against the slots' states, the primary record; empty when it agrees. For a
    table read under its lock (or a copy taken under it), where both are stable."""
    out: list[str] = []
    cap = geo.capacity
    free = [buf[geo.slot_off(s)] == L.FREE for s in range(cap)]
    used = cap - sum(free)
    live = L.H_LIVE.unpack_from(buf, L.H_LIVE_OFF)[0]
    if live != used:
        out.append(f"header: live count {live} != {used} slots in use")
    on_list: set[int] = set()
    cur = L.H_FREE_HEAD.unpack_from(buf, L.H_FREE_HEAD_OFF)[0]
    while cur:
        slot = cur - 1
        if slot >= cap:
            out.append(f"free list: links to slot {slot}, out of range (capacity {cap})")
            break
        if slot in on_list:
            out.append(f"free list: loops back to slot {slot}")
            break
        if not free[slot]:
            out.append(f"free list: slot {slot} is on it but in use")
        on_list.add(slot)
        cur = L.S_NEXT_FREE.unpack_from(buf, geo.slot_off(slot) + L.S_NEXT_FREE_OFF)[0]
    lost = [s for s in range(cap) if free[s] and s not in on_list]
    if lost:
        out.append(f"free list: {len(lost)} free slot(s) missing from it (slot {lost[0]}"
                   f"{', ...' if len(lost) > 1 else ''}): creating would evict needlessly")
    return out


def header_problem(head: memoryview | bytes, size: int) -> str:
    """What is wrong with a table header of a file of ``size`` bytes, or ''."""
    if len(head) < L.HEADER_SIZE:
        return f"truncated: {len(head)} bytes"
    magic = L.H_MAGIC.unpack_from(head, 0)[0]
    if magic != L.MAGIC:
        if magic[:6] == L.MAGIC[:6]:
            return f"layout version {magic[6:]!r} is not this library's {L.MAGIC[6:]!r}"
        return f"not a shmctx table (magic {magic!r})"
    (ver, hs, ss, cap, stripes, procs, total, mr, _mode, idle, interval, lt, _c) = \
        L.H_FIXED.unpack_from(head, L.H_FIXED_OFF)
    if ver != L.LAYOUT_VERSION:
        return f"layout version {ver} is not this library's {L.LAYOUT_VERSION}"
    if hs != L.HEADER_SIZE or ss != L.SLOT_SIZE:
        return f"header/slot size {hs}/{ss} do not match this layout"
    # The same version number is no proof of the same layout (a build with a changed
    # declaration and no version bump): the fingerprint of every field is.
    fingerprint = L.H_FINGERPRINT.unpack_from(head, L.H_FINGERPRINT_OFF)[0]
    if fingerprint != L.FINGERPRINT:
        return (f"layout fingerprint {fingerprint:016x} is not this library's "
                f"{L.FINGERPRINT:016x} (made by a build of shmctx with another layout)")
    if not (1 <= cap <= 1 << 20 and 1 <= stripes <= L.MAX_STRIPES and 1 <= procs <= 1 << 16):
        return f"impossible geometry: capacity {cap}, stripes {stripes}, processes {procs}"
    # A table is only ever created with the geometry the layout computes from its capacity
    # and process count, so any other index size or stripe count is damage. Accepting a
    # merely plausible one (any power of two, up to 2**31 entries) would let one damaged
    # header make every reader allocate and scan gigabytes; this way what a reader sizes
    # from the header is bounded by the layout's limits and checked against the file.
    geo = L.Geometry(cap, procs)
    index_size = L.H_INDEX_SIZE.unpack_from(head, L.H_INDEX_SIZE_OFF)[0]
    if index_size != geo.index_size or stripes != geo.stripes:
        return (f"impossible geometry: index size {index_size}, stripes {stripes} for capacity "
                f"{cap} (this layout uses {geo.index_size}, {geo.stripes})")
    if total != geo.total or size != geo.total:
        return f"size is {size} bytes, header says {total}, layout needs {geo.total} (truncated?)"
    # The stored settings must be ones ContextConfig accepts, by ContextConfig's own rules:
    # one definition of a legal value for the API and the file alike, and attaching
    # (which builds a ContextConfig from them) cannot fail later with a config error.
    try:
        ContextConfig(max_references=mr, max_idle_time=idle, cleanup_interval=interval,
                      capacity=cap, lock_timeout=lt, max_processes=procs)
    except InvalidConfigError as e:
        return f"impossible setting: {e}"
    return ""

