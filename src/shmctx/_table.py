"""One namespace's mapped table: creation, attachment, and the operations on its regions.

Field offsets come from ``_layout``; the locking protocol from ``_lock``. This module
knows which lock each operation needs but does not take them itself, except in the
``repair_*`` methods; ``_manager`` composes the operations under the locks.

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
import time
from collections.abc import Iterator
from functools import partial

import posix_ipc

from . import _failpoints, _shm
from . import _layout as L
from ._config import ContextConfig
from ._errors import ContextManagerClosedError, TableFormatError
from ._lock import Arbiter, RobustLock
from ._proc import is_alive

log = logging.getLogger("shmctx.table")


def name_hash(name_b: bytes) -> int:
    """BLAKE2b-64 of a name: the same in every process, unlike ``hash()``."""
    return int.from_bytes(hashlib.blake2b(name_b, digest_size=8).digest(), "little")


class Table:
    """A mapped table and its semaphores, as seen by one process."""

    def __init__(self, ns: str, shm: posix_ipc.SharedMemory, mm: mmap.mmap) -> None:
        self.ns = ns
        self._shm = shm
        self.mm = mm
        self.buf = memoryview(mm)
        self.fd = shm.fd
        self.ino = os.fstat(shm.fd).st_ino
        h = L.H_FIXED.unpack_from(self.buf, L.H_FIXED_OFF)
        (_ver, _hs, _ss, capacity, stripes, max_procs, _total, max_refs, mode,
         max_idle, interval, lock_timeout, _created) = h
        index_size = L.H_INDEX_SIZE.unpack_from(self.buf, L.H_INDEX_SIZE_OFF)[0]
        self.geo = L.Geometry(capacity, max_procs, stripes, index_size)
        self.mode = mode
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
        self.arbiter = Arbiter(self.fd)
        self._sems: list[posix_ipc.Semaphore] = []
        try:
            self._sems.append(_shm.open_semaphore(_shm.table_lock_name(ns, self.tag), mode, False))
            for k in range(self.geo.stripes):
                self._sems.append(
                    _shm.open_semaphore(_shm.stripe_name(ns, self.tag, k), mode, False)
                )
        except posix_ipc.PermissionsError:
            self._close_sems()
            self.buf.release()
            raise PermissionError(
                errno.EACCES, f"no permission to open the semaphores of namespace {ns!r}"
            ) from None
        except posix_ipc.ExistentialError:
            self._close_sems()
            self.buf.release()  # so the caller can unmap
            if _same_file(_shm.table_name(ns), self.ino):
                raise TableFormatError(
                    f"table of namespace {ns!r} ({_shm.host_path(_shm.table_name(ns))}): its "
                    f"semaphores ({_shm.table_lock_name(ns, self.tag)}, ...) are missing; the "
                    "table is damaged or is a copy; remove that file if no process uses it"
                ) from None
            raise  # unlinked while we attached: Table.open looks again
        timeout = float(lock_timeout)
        self.table_lock = RobustLock(
            self._sems[0], self.buf, self.geo.lock_off(0), 0, timeout, self.arbiter,
            self.repair_table, f"table lock of namespace {ns!r}",
        )
        self.stripe_locks = [
            RobustLock(
                self._sems[1 + k], self.buf, self.geo.lock_off(1 + k), 1 + k, timeout,
                self.arbiter, partial(self.repair_stripe, k, locked=True),
                f"stripe lock {k} of namespace {ns!r}",
            )
            for k in range(self.geo.stripes)
        ]

    # --- opening --------------------------------------------------------------------

    @classmethod
    def open(cls, ns: str, config: ContextConfig | None, mode: int) -> tuple[Table, bool]:
        """Attach to namespace ``ns``'s table, creating it if absent. Returns
        ``(table, created)``."""
        for _ in range(100):
            try:
                shm = posix_ipc.SharedMemory(_shm.table_name(ns))
            except posix_ipc.ExistentialError:
                table = cls._create(ns, config or ContextConfig(), mode)
                if table is not None:
                    return table, True
                continue  # lost the race: attach to the winner's table
            except (PermissionError, posix_ipc.PermissionsError):
                raise PermissionError(
                    errno.EACCES, f"no permission to open the table of namespace {ns!r} "
                    f"({_shm.host_path(_shm.table_name(ns))})"
                ) from None
            try:
                table = cls._attach(ns, shm)
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
    def _attach(cls, ns: str, shm: posix_ipc.SharedMemory) -> Table:
        size = os.fstat(shm.fd).st_size
        what = f"table of namespace {ns!r} ({_shm.host_path(_shm.table_name(ns))})"
        if size < L.HEADER_SIZE:
            shm.close_fd()
            raise TableFormatError(f"{what} is truncated: {size} bytes")
        mm = mmap.mmap(shm.fd, size)
        try:
            problem = header_problem(memoryview(mm)[: L.HEADER_SIZE], size)
            if problem:
                raise TableFormatError(f"{what}: {problem}")
            return cls(ns, shm, mm)
        except BaseException:
            mm.close()
            shm.close_fd()
            raise

    @classmethod
    def _create(cls, ns: str, config: ContextConfig, mode: int) -> Table | None:
        table_id = secrets.randbits(64) or 1
        tag = _shm.tag_of(table_id)
        geo = L.Geometry(config.capacity, config.max_processes)
        staging = _shm.staging_name(ns, tag, os.getpid())
        shm = posix_ipc.SharedMemory(staging, posix_ipc.O_CREX, mode=mode, size=0)
        sems: list[str] = []
        try:
            if mode != 0o600:
                os.fchmod(shm.fd, mode)
            os.ftruncate(shm.fd, geo.total)
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
            _rebuild_free_list(buf, geo)
            for name in [_shm.table_lock_name(ns, tag)] + [
                _shm.stripe_name(ns, tag, k) for k in range(geo.stripes)
            ]:
                _shm.create_semaphore(name, mode).close()
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
        attached = posix_ipc.SharedMemory(_shm.table_name(ns))
        return cls._attach(ns, attached)

    # --- header ---------------------------------------------------------------------

    def flags(self) -> int:
        return L.H_FLAGS.unpack_from(self.buf, L.H_FLAGS_OFF)[0]

    def check_usable(self) -> None:
        if self.flags() & L.FLAG_UNLINKED:
            raise ContextManagerClosedError(f"namespace {self.ns!r} was unlinked")

    def next_incarnation(self) -> int:
        """Needs the table lock."""
        inc = L.H_NEXT_INC.unpack_from(self.buf, L.H_NEXT_INC_OFF)[0]
        L.H_NEXT_INC.pack_into(self.buf, L.H_NEXT_INC_OFF, inc + 1)
        return inc

    def add_live(self, delta: int) -> None:
        live = L.H_LIVE.unpack_from(self.buf, L.H_LIVE_OFF)[0]
        L.H_LIVE.pack_into(self.buf, L.H_LIVE_OFF, max(0, live + delta))

    def live_count(self) -> int:
        return L.H_LIVE.unpack_from(self.buf, L.H_LIVE_OFF)[0]

    def sweeper(self) -> tuple[int, int, int, float]:
        return L.H_SWEEPER.unpack_from(self.buf, L.H_SWEEPER_OFF)

    def set_sweeper(self, pid: int, start: int, beat: float) -> None:
        L.H_SWEEPER.pack_into(self.buf, L.H_SWEEPER_OFF, pid, 0, start, beat)

    # --- slots ----------------------------------------------------------------------

    def stripe_of(self, slot: int) -> RobustLock:
        return self.stripe_locks[slot % self.geo.stripes]

    def slot_name(self, slot: int) -> bytes:
        off = self.geo.slot_off(slot)
        n = L.S_HEAD.unpack_from(self.buf, off)[2]
        return bytes(self.buf[off + L.S_NAME_OFF : off + L.S_NAME_OFF + min(n, L.NAME_MAX)])

    def read_slot(self, slot: int) -> tuple:
        """All 24 used fields of a slot, in ``_layout.SLOT_ALL`` order."""
        return L.SLOT_ALL.unpack_from(self.buf, self.geo.slot_off(slot))

    def segment(self, slot: int, inc: int) -> str:
        return _shm.segment_name(self.ns, self.tag, slot, inc)

    # --- name index (table lock) ----------------------------------------------------

    def find(self, name_b: bytes, h: int) -> int:
        """Slot of the live context named ``name_b``, or -1."""
        buf, geo = self.buf, self.geo
        mask = geo.index_size - 1
        pos = h & mask
        for _ in range(geo.index_size):
            e = L.INDEX_ENTRY.unpack_from(buf, geo.index_entry_off(pos))[0]
            if e == 0:
                return -1
            slot = e - 1
            if slot < geo.capacity:
                off = geo.slot_off(slot)
                state, _f, n, _rc, _inc, sh = L.S_HEAD.unpack_from(buf, off)
                if (sh == h and state != L.FREE and n == len(name_b)
                        and buf[off + L.S_NAME_OFF : off + L.S_NAME_OFF + n] == name_b):
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
                L.INDEX_ENTRY.pack_into(buf, off, slot + 1)
                return
            pos = (pos + 1) & mask
        raise TableFormatError(f"namespace {self.ns!r}: name index is full (damaged table)")

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
            L.INDEX_ENTRY.pack_into(buf, geo.index_entry_off(i), e)
            i = j
        L.INDEX_ENTRY.pack_into(buf, geo.index_entry_off(i), 0)

    def _hash_of(self, slot: int) -> int:
        if slot >= self.geo.capacity:
            return 0
        return L.S_HEAD.unpack_from(self.buf, self.geo.slot_off(slot))[5]

    # --- free list (table lock) -----------------------------------------------------

    def pop_free(self) -> int:
        buf, geo = self.buf, self.geo
        head = L.H_FREE_HEAD.unpack_from(buf, L.H_FREE_HEAD_OFF)[0]
        while head:
            slot = head - 1
            if slot >= geo.capacity:
                break
            nxt = L.S_NEXT_FREE.unpack_from(buf, geo.slot_off(slot) + L.S_NEXT_FREE_OFF)[0]
            L.H_FREE_HEAD.pack_into(buf, L.H_FREE_HEAD_OFF, nxt)
            if L.S_STATE.unpack_from(buf, geo.slot_off(slot))[0] == L.FREE:
                return slot
            head = nxt  # a stale entry (repairable damage): skip it
        L.H_FREE_HEAD.pack_into(buf, L.H_FREE_HEAD_OFF, 0)
        return -1

    def push_free(self, slot: int) -> None:
        buf = self.buf
        head = L.H_FREE_HEAD.unpack_from(buf, L.H_FREE_HEAD_OFF)[0]
        L.S_NEXT_FREE.pack_into(buf, self.geo.slot_off(slot) + L.S_NEXT_FREE_OFF, head)
        L.H_FREE_HEAD.pack_into(buf, L.H_FREE_HEAD_OFF, slot + 1)

    # --- process entries ------------------------------------------------------------

    def proc_head(self, proc: int) -> tuple[int, int, int, float]:
        return L.P_HEAD.unpack_from(self.buf, self.geo.proc_off(proc))

    def proc_refs(self, proc: int) -> Iterator[tuple[int, int, int]]:
        """(ref index, slot, count) of each used ref entry of process entry ``proc``."""
        flat = L.P_REFS.unpack_from(self.buf, self.geo.proc_off(proc) + L.REFS_OFF)
        for i in range(L.REFS_PER_PROCESS):
            sp1 = flat[2 * i]
            if sp1:
                yield i, sp1 - 1, flat[2 * i + 1]

    def ref_off(self, proc: int, ref: int) -> int:
        return self.geo.proc_off(proc) + L.REFS_OFF + L.REF_SIZE * ref

    # --- repair ---------------------------------------------------------------------

    def repair_table(self) -> None:
        """Rebuild everything the table lock guards from the slots themselves (runs
        after taking the table lock over from a dead owner, under that lock)."""
        buf, geo = self.buf, self.geo
        for k in range(geo.stripes):
            self.repair_stripe(k)  # under the stripe lock, taken in order
        for pos in range(geo.index_size):
            L.INDEX_ENTRY.pack_into(buf, geo.index_entry_off(pos), 0)
        live = 0
        seen: set[bytes] = set()
        for slot in range(geo.capacity):
            off = geo.slot_off(slot)
            state, _f, n, _rc, _inc, h = L.S_HEAD.unpack_from(buf, off)
            if state == L.FREE:
                continue
            name_b = self.slot_name(slot)
            if state not in (L.CREATING, L.READY) or n > L.NAME_MAX or name_b in seen \
                    or name_hash(name_b) != h:
                log.warning("namespace %r: clearing damaged slot %d", self.ns, slot)
                with self.stripe_of(slot):
                    L.S_STATE.pack_into(buf, off, L.FREE, 0)
                continue
            seen.add(name_b)
            self.index_insert(slot, h)
            live += 1
        L.H_LIVE.pack_into(buf, L.H_LIVE_OFF, live)
        _rebuild_free_list(buf, geo)
        self._recount_children()

    def children(self) -> dict[int, list[int]]:
        """Live parent slot -> its live child slots, by a scan of every slot (the child
        counts in the slots say only how many). Needs the table lock."""
        geo = self.geo
        out: dict[int, list[int]] = {}
        for slot in range(geo.capacity):
            f = self.read_slot(slot)
            if f[0] != L.FREE and f[7] and f[7] <= geo.capacity:
                p = f[7] - 1
                pf = self.read_slot(p)
                if pf[0] != L.FREE and pf[4] == f[9]:
                    out.setdefault(p, []).append(slot)
        return out

    def _recount_children(self) -> None:
        children = self.children()
        for slot in range(self.geo.capacity):
            L.S_CHILDREN.pack_into(self.buf, self.geo.slot_off(slot) + L.S_CHILDREN_OFF,
                                   len(children.get(slot, ())))

    def dead_creations(self) -> list[tuple[int, int]]:
        """(slot, incarnation) of every slot in CREATING state whose creator is dead."""
        out = []
        for slot in range(self.geo.capacity):
            f = self.read_slot(slot)
            if f[0] == L.CREATING and not is_alive(f[12], f[13]):
                out.append((slot, f[4]))
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
            sums: dict[int, int] = {}
            for proc in range(geo.max_processes):
                if L.P_PID.unpack_from(buf, geo.proc_off(proc))[0] == 0:
                    continue
                for i, s, c in self.proc_refs(proc):
                    if s % geo.stripes != k:
                        continue
                    if s >= geo.capacity or \
                            L.S_STATE.unpack_from(buf, geo.slot_off(s))[0] == L.FREE:
                        L.REF.pack_into(buf, self.ref_off(proc, i), 0, 0)
                    else:
                        sums[s] = sums.get(s, 0) + c
            for slot in range(k, geo.capacity, geo.stripes):
                off = geo.slot_off(slot)
                if L.S_REFCOUNT.unpack_from(buf, off + L.S_REFCOUNT_OFF)[0] != sums.get(slot, 0):
                    L.S_REFCOUNT.pack_into(buf, off + L.S_REFCOUNT_OFF, sums.get(slot, 0))
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
            _shm.unlink_segment(_shm.table_name(self.ns))
        _shm.unlink_semaphore(_shm.table_lock_name(self.ns, self.tag))
        for k in range(self.geo.stripes):
            _shm.unlink_semaphore(_shm.stripe_name(self.ns, self.tag, k))

    def close(self) -> None:
        self._close_sems()
        self.arbiter.close()
        try:
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


def _rebuild_free_list(buf: memoryview, geo: L.Geometry) -> None:
    head = 0
    for slot in range(geo.capacity - 1, -1, -1):
        off = geo.slot_off(slot)
        if L.S_STATE.unpack_from(buf, off)[0] == L.FREE:
            L.S_NEXT_FREE.pack_into(buf, off + L.S_NEXT_FREE_OFF, head)
            head = slot + 1
    L.H_FREE_HEAD.pack_into(buf, L.H_FREE_HEAD_OFF, head)


def header_problem(head: memoryview | bytes, size: int) -> str:
    """What is wrong with a table header of a file of ``size`` bytes, or ''."""
    if len(head) < L.HEADER_SIZE:
        return f"truncated: {len(head)} bytes"
    magic = L.H_MAGIC.unpack_from(head, 0)[0]
    if magic != L.MAGIC:
        if magic[:6] == L.MAGIC[:6]:
            return f"layout version {magic[6:]!r} is not this library's {L.MAGIC[6:]!r}"
        return f"not a shmctx table (magic {magic!r})"
    (ver, hs, ss, cap, stripes, procs, total, _mr, _mode, idle, interval, lt, _c) = \
        L.H_FIXED.unpack_from(head, L.H_FIXED_OFF)
    if ver != L.LAYOUT_VERSION:
        return f"layout version {ver} is not this library's {L.LAYOUT_VERSION}"
    if hs != L.HEADER_SIZE or ss != L.SLOT_SIZE:
        return f"header/slot size {hs}/{ss} do not match this layout"
    if not (1 <= cap <= 1 << 20 and 1 <= stripes <= L.MAX_STRIPES and 1 <= procs <= 1 << 16):
        return f"impossible geometry: capacity {cap}, stripes {stripes}, processes {procs}"
    index_size = L.H_INDEX_SIZE.unpack_from(head, L.H_INDEX_SIZE_OFF)[0]
    if index_size < 2 * cap or index_size & (index_size - 1):
        return f"impossible index size {index_size} for capacity {cap}"
    expect = L.Geometry(cap, procs, stripes, index_size).total
    if total != expect or size != expect:
        return f"size is {size} bytes, header says {total}, layout needs {expect} (truncated?)"
    for name, v in (("max_idle_time", idle), ("cleanup_interval", interval), ("lock_timeout", lt)):
        if not (v == v and 0 <= v < float("inf")) or (name == "lock_timeout" and v <= 0):
            return f"impossible {name} {v!r}"
    return ""

