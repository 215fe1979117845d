"""Byte layout of a namespace's table: every field, offset and size, in one place.

The table is one POSIX shared-memory object, ``/dev/shm/shmctx@<namespace>``, mapped by
every process of the namespace. All integers are little-endian (native on the hosts we
support), floats are IEEE-754 doubles, every record starts on an 8-byte boundary and
every region on a 64-byte boundary. Nothing in it is a pointer: slots, process entries
and index entries refer to each other by number, stored as ``number + 1`` so that the
all-zero bytes of a fresh table mean "empty".

Regions, in order::

    offset            size                     region
    0                 HEADER_SIZE (256)        header
    256               64 * (1 + stripes)       lock records: [0] table lock, [1+k] stripe k
    index_off         4 * index_size           name-hash index (open addressing, u32 slot+1)
    procs_off         512 * max_processes      process entries
    slots_off         256 * capacity           context slots
    total                                      rounded up to 4096

Header (256 bytes)::

    off size  type   field
    0   8     8s     magic            b"SHMCTX\\x00\\x02", written LAST when the table is created,
                                      so a half-initialised table is never mistaken for a live one
    8   4     u32    version          LAYOUT_VERSION
    12  4     u32    header_size      256
    16  4     u32    slot_size        256
    20  4     u32    capacity         number of context slots
    24  4     u32    stripes          number of stripe locks (slot k: stripe k % stripes)
    28  4     u32    max_processes    number of process entries
    32  8     u64    total_size       size of the whole table in bytes
    40  4     u32    max_references   0 = unlimited
    44  4     u32    mode             permission bits for every object of the namespace
    48  8     f64    max_idle_time    seconds, 0 = never close idle contexts
    56  8     f64    cleanup_interval seconds, 0 = no automatic sweeping
    64  8     f64    lock_timeout     seconds a waiter trusts a lock holder
    72  8     f64    created          wall-clock time the table was created
    80  8     u64    next_incarnation source of context incarnations (never reused)
    88  4     u32    live             contexts in a CREATING or READY slot      (derived)
    92  4     u32    free_head        first free slot + 1, 0 = none             (derived)
    96  4     u32    flags            FLAG_UNLINKED once unlink() has begun
    100 4     u32    index_size       entries of the name index (power of two >= 2 * capacity)
    104 8     u64    table_id         random, tells apart two tables of the same name over time
    112 4     u32    sweeper_pid      process leading the sweep, 0 = none
    116 4     u32    sweeper_flags    reserved
    120 8     u64    sweeper_start    its start time (clock ticks since boot), tells pid reuse apart
    128 8     f64    sweeper_beat     CLOCK_MONOTONIC time of its last sweep
    136 1     u8     namespace_len
    137 64    64s    namespace        the namespace name (for tools listing /dev/shm)
    201 55           reserved, zero

Lock record (16 bytes; one per table/stripe lock, each alone on its 64-byte cache line so
that processes working on unrelated stripes never write the same line; and one inside each
slot for ``ctx.lock``)::

    0   4     u32    owner_pid        0 = free (or: taken, owner not yet written: see _lock.py)
    4   4     u32    epoch            incremented on every acquisition and every recovery
    8   8     u64    owner_start      owner's start time, so a reused pid is not taken for it

Name index: ``index_size`` u32 entries, each ``slot + 1`` or 0. A name hashes (BLAKE2b, 8
bytes, the same in every process, unlike ``hash()``) to ``hash & (index_size - 1)``;
collisions probe linearly; deletion shifts back the following entries, so there are no
tombstones. The index is derived data: ``repair`` rebuilds it from the slots.

Process entry (512 bytes, one per attached process; LMDB's reader table is the model)::

    0   4     u32    pid              0 = free
    4   4     u32    flags            P_LIVE_LOCK: the process holds this entry's liveness
                                      lock (an OFD lock on the table file, _liveness.py)
    8   8     u64    start            start time of the process (clock ticks since boot)
    16  8     f64    attached         wall-clock time it attached
    24  8            reserved
    32  480   60 x   refs             (u32 slot + 1, u32 count): references this process holds

References are recorded per process rather than per slot so that any number of processes
can share one context (a gunicorn master with 100 workers); the price is that one process
holds references to at most ``REFS_PER_PROCESS`` distinct contexts at once. The per-process
counts are the primary record; a slot's ``refcount`` is their sum, kept for the hot path
and recomputed by ``repair``.

Context slot (256 bytes)::

    0   1     u8     state            FREE, CREATING, READY (see STATE_NAMES)
    1   1     u8     flags            SLOT_WAITERS: someone waits on the init semaphore
                                      SLOT_LOCK: the ctx.lock semaphore was created
    2   2     u16    name_len         bytes of UTF-8 name
    4   4     u32    refcount         sum of the per-process counts                (derived)
    8   8     u64    incarnation      unique per namespace, never reused
    16  8     u64    name_hash        BLAKE2b-64 of the name
    24  8     u64    size             bytes of the context's segment
    32  4     u32    parent           parent slot + 1, 0 = none
    36  4     u32    next_free        next free slot + 1 (free list)               (derived)
    40  8     u64    parent_inc       parent's incarnation
    48  8     f64    created          wall-clock creation time
    56  8     f64    last_used        CLOCK_MONOTONIC time of the last return (or creation)
    64  4     u32    creator_pid      process running init (CREATING state)
    68  4     u32    children         live contexts whose parent this is           (derived)
    72  8     u64    creator_start
    80  16    lock   ctx_lock         owner record of the context's own lock
    96  128   128s   name
    224 32           reserved, zero

Slot state machine (every transition under the slot's stripe lock; all but publish also
under the table lock, since publish changes neither the index nor the free list)::

    FREE --claim--> CREATING --publish--> READY --close--> FREE
                       |                                   ^
                       +---- init failed / creator died ---+

Memory: 256 (slot) + at most 16 (index) bytes per context, plus the header, lock records
and process entries (512 bytes each).

Writing shared fields
---------------------
Some fields are read by processes that do not hold the lock guarding them (listed
below), so a write must never show them a value nobody wrote. ``struct.pack_into`` does:
CPython clears its whole target to zero before it writes the fields, so a reader in
between sees a live slot's state as 0 (FREE), a lock's owner pid as 0 or beside another
owner's start time. Hence no ``pack_into`` on the table; every write goes through
``Words``:

* ``Words.put8/put32/put64/putf`` (and the views ``u32``, ``u64``, ``f64`` that the hot
  path indexes directly): one aligned field, one machine store. A reader sees the old
  value or the new one.
* ``Words.store``: several fields at once, packed into a ``bytes`` first and copied with
  one slice assignment (a ``memcpy``, which never clears its target first). Every byte
  goes from its old value straight to its new one; only fields that no reader takes
  without the lock, or whose reader re-checks under it, are written this way.
* A record that a lock-free reader must see whole has one *publishing* field, written
  last with a single store, and read first: the owner pid of a lock record (epoch and
  start time before it), the pid of a process entry, the state of a slot being claimed.
  x86-64 keeps stores in program order and loads in program order, so a reader that sees
  the publishing field sees everything written before it.

Reads without the lock (as LMDB documents its reader table): each field, who reads it
without holding the lock that guards it, and the worst a stale or in-between value does.

* Lock record (owner pid, epoch, start). Read by waiters after a timed-out wait
  (``_lock``), by the sweeper's recovery of dead owners and by snapshots. The pid is
  written last, alone (epoch and pid share one 8-byte store), so a reader sees either "no
  owner" or a whole owner. Worst case: a stale record costs one more wait; a takeover
  re-reads pid and epoch under the arbiter before it acts.
* Slot state and incarnation. Read by the orphan sweep (``_sweeper``), the planning of
  the idle sweep, the dead-creation scan and the damage scan, ``_wait_for_init``,
  ``validate_context``, ``ctx.lock``'s check that its context lives, and the dead-lock
  recovery. A live slot read as free would let the orphan sweep unlink that context's
  memory and ``ctx.lock`` semaphore: so the state byte is written only by single-byte
  stores, never rewritten when only the flags change, and at claim written after the
  incarnation. Worst case otherwise: a plan that the locks' re-check discards.
* Slot refcount and last_used. Read by the idle-sweep planning, ``_evict_lru`` (table
  lock only) and snapshots. Worst case: a candidate too many or too few, as ``_close``
  re-checks under the stripe locks.
* Reference records (slot + 1, count). Read by ``unlink`` (table lock only) and by the
  snapshots of ``check``, ``contexts`` and ctx-inspect; a count changes by a single store
  of the count alone. Worst case: a snapshot that disagrees for an instant with the
  slot's refcount, which is written a moment later.
* Process entry (pid, start). Read by the sweeper's scan for dead processes outside the
  table lock, and snapshots. The pid is written last. Worst case: an entry being
  registered or freed is missed or listed once; the reclaim re-checks it under the lock.
* Header flags (``FLAG_UNLINKED``). Read by ``check_usable`` everywhere. Worst case: one
  more operation on a table being unlinked, which then fails on its removed objects.
* Header live count, free-list head, index, sweeper record: read without the lock only by
  ctx-inspect when the table lock is busy (its report says the copy is unlocked). Worst
  case: a report of a table mid-change.

The C hot path (``_speedups.c``) writes the same fields with single stores in the same
order (lock record: epoch, start, then pid).
"""

from __future__ import annotations

import struct
import sys

MAGIC = b"SHMCTX\x00\x02"
LAYOUT_VERSION = 2  # bump (with the last byte of MAGIC) on any change of offsets or sizes
HEADER_SIZE = 256
LOCK_STRIDE = 64  # one cache line per table/stripe lock record
PROC_SIZE = 512
SLOT_SIZE = 256
REFS_PER_PROCESS = 60
REF_SIZE = 8
REFS_OFF = 32
NAME_MAX = 128
PAGE = 4096
MAX_STRIPES = 64

# Slot states.
FREE = 0
CREATING = 1
READY = 2
STATE_NAMES = {FREE: "free", CREATING: "creating", READY: "ready"}

# Slot flags.
SLOT_WAITERS = 1
SLOT_LOCK = 2

# Process-entry flags.
P_LIVE_LOCK = 1

# Header flags.
FLAG_UNLINKED = 1

# --- header -------------------------------------------------------------------------
H_MAGIC = struct.Struct("<8s")
H_FIXED = struct.Struct("<IIIIIIQIIdddd")  # version .. created, at offset 8
H_FIXED_OFF = 8
H_NEXT_INC = struct.Struct("<Q")
H_NEXT_INC_OFF = 80
H_LIVE = struct.Struct("<I")
H_LIVE_OFF = 88
H_FREE_HEAD = struct.Struct("<I")
H_FREE_HEAD_OFF = 92
H_FLAGS = struct.Struct("<I")
H_FLAGS_OFF = 96
H_INDEX_SIZE = struct.Struct("<I")
H_INDEX_SIZE_OFF = 100
H_TABLE_ID = struct.Struct("<Q")
H_TABLE_ID_OFF = 104
H_SWEEPER = struct.Struct("<IIQd")  # pid, flags, start, beat
H_SWEEPER_OFF = 112
H_NAMESPACE = struct.Struct("<B64s")
H_NAMESPACE_OFF = 136
LOCKS_OFF = HEADER_SIZE

# --- lock record --------------------------------------------------------------------
LOCK = struct.Struct("<IIQ")  # owner_pid, epoch, owner_start

# --- index --------------------------------------------------------------------------
INDEX_ENTRY = struct.Struct("<I")

# --- process entry ------------------------------------------------------------------
P_HEAD = struct.Struct("<IIQd")  # pid, flags, start, attached
P_PID = struct.Struct("<I")
REF = struct.Struct("<II")  # slot + 1, count
P_REFS = struct.Struct("<" + "II" * REFS_PER_PROCESS)

# --- slot ---------------------------------------------------------------------------
S_STATE = struct.Struct("<BB")  # state, flags at offset 0
S_HEAD = struct.Struct("<BBHIQQ")  # state, flags, name_len, refcount, incarnation, hash: 0..24
S_CHECK = struct.Struct("<BxxxIQ")  # state, refcount, incarnation: the hot path's one read
S_REFCOUNT_OFF = 4
S_REFCOUNT = struct.Struct("<I")
S_INC_OFF = 8
S_INC = struct.Struct("<Q")
S_BODY = struct.Struct("<QIIQdd")  # size, parent, next_free, parent_inc, created, last_used
S_BODY_OFF = 24
S_NEXT_FREE_OFF = 36
S_NEXT_FREE = struct.Struct("<I")
S_LAST_USED_OFF = 56
S_LAST_USED = struct.Struct("<d")
S_CHILDREN = struct.Struct("<I")  # written apart from SLOT_ALL, which zeroes it at claim
S_CHILDREN_OFF = 68
S_LOCK_OFF = 80
S_NAME_OFF = 96
SLOT_ALL = struct.Struct("<BBHIQQQIIQddIxxxxQIIQ128s")  # the whole 224 used bytes

assert SLOT_ALL.size == 224 and S_HEAD.size == 24 and S_BODY.size == 40
assert H_FIXED.size == 72 and P_REFS.size == PROC_SIZE - REFS_OFF
# Words stores u32 fields at offsets divisible by 4 and u64/f64 ones at offsets divisible
# by 8 (records start on 8-byte boundaries, regions on 64-byte ones).
assert not (H_LIVE_OFF | H_FREE_HEAD_OFF | H_FLAGS_OFF | S_REFCOUNT_OFF | S_NEXT_FREE_OFF
            | S_CHILDREN_OFF | REF_SIZE | REFS_OFF) & 3
assert not (H_NEXT_INC_OFF | S_INC_OFF | S_LAST_USED_OFF | S_LOCK_OFF | LOCK_STRIDE
            | SLOT_SIZE | PROC_SIZE | REFS_OFF | HEADER_SIZE) & 7

if sys.byteorder != "little" or struct.calcsize("=I") != 4 or struct.calcsize("=Q") != 8:
    # Words stores in native byte order into a little-endian layout.
    raise ImportError("shmctx's table layout needs a little-endian host with 4-byte unsigned "
                      f"int and 8-byte unsigned long long (this one: {sys.byteorder}-endian)")


class Words:
    """One mapping of a table, for writes that a reader without the lock may watch (see
    "Writing shared fields" above): ``put32(off, v)`` stores one aligned u32 with one
    machine store, ``store(off, st, *values)`` copies several fields at once without
    clearing them first. The hot path indexes the typed views itself:
    ``u32[off >> 2]``, ``u64[off >> 3]``, ``f64[off >> 3]``.

    The typed views pin the mapping: ``release()`` them before closing it.
    """

    __slots__ = ("buf", "u32", "u64", "f64")

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.u32 = buf.cast("I")
        self.u64 = buf.cast("Q")
        self.f64 = buf.cast("d")

    def put8(self, off: int, value: int) -> None:
        self.buf[off] = value

    def put32(self, off: int, value: int) -> None:
        self.u32[off >> 2] = value

    def put64(self, off: int, value: int) -> None:
        self.u64[off >> 3] = value

    def putf(self, off: int, value: float) -> None:
        self.f64[off >> 3] = value

    def store(self, off: int, st: struct.Struct, *values: object) -> None:
        """Write ``values`` as ``st`` packs them at ``off``: packed into bytes, then one
        copy (``st.pack_into`` would clear the target first)."""
        self.buf[off:off + st.size] = st.pack(*values)

    @classmethod
    def unpinned(cls, buf: memoryview) -> Words:
        """The same interface without typed views: each access copies a slice of
        ``buf`` (one ``memcpy`` of the field's width), so it never pins the mapping.
        For a lock on a mapping that its user closes at once (ctx-inspect)."""
        w = cls.__new__(cls)
        w.buf = buf
        w.u32, w.u64, w.f64 = (_SliceView(buf, struct.Struct(f)) for f in ("<I", "<Q", "<d"))
        return w

    def release(self) -> None:
        for view in (self.u32, self.u64, self.f64):
            view.release()


class _SliceView:
    """Indexed like ``memoryview.cast(fmt)``, by slice copies of a byte view."""

    __slots__ = ("buf", "st")

    def __init__(self, buf: memoryview, st: struct.Struct) -> None:
        self.buf = buf
        self.st = st

    def __getitem__(self, i: int) -> int | float:
        return self.st.unpack_from(self.buf, i * self.st.size)[0]

    def __setitem__(self, i: int, value: int | float) -> None:
        n = self.st.size
        self.buf[i * n:(i + 1) * n] = self.st.pack(value)

    def release(self) -> None:
        pass


def _round_up(value: int, unit: int) -> int:
    return (value + unit - 1) // unit * unit


class Geometry:
    """Offsets of the regions for one (capacity, stripes, max_processes) triple."""

    __slots__ = (
        "capacity",
        "stripes",
        "max_processes",
        "index_size",
        "index_off",
        "procs_off",
        "slots_off",
        "total",
    )

    def __init__(self, capacity: int, max_processes: int, stripes: int | None = None,
                 index_size: int | None = None) -> None:
        self.capacity = capacity
        self.max_processes = max_processes
        self.stripes = stripes if stripes is not None else min(MAX_STRIPES, capacity)
        if index_size is None:
            index_size = 1
            while index_size < 2 * capacity:
                index_size <<= 1
        self.index_size = index_size
        self.index_off = _round_up(LOCKS_OFF + LOCK_STRIDE * (1 + self.stripes), 64)
        self.procs_off = _round_up(self.index_off + INDEX_ENTRY.size * index_size, 64)
        self.slots_off = _round_up(self.procs_off + PROC_SIZE * max_processes, 64)
        self.total = _round_up(self.slots_off + SLOT_SIZE * capacity, PAGE)

    def lock_off(self, lock_index: int) -> int:
        """Offset of lock record ``lock_index`` (0 = table lock, 1 + k = stripe k)."""
        return LOCKS_OFF + LOCK_STRIDE * lock_index

    def slot_off(self, slot: int) -> int:
        return self.slots_off + SLOT_SIZE * slot

    def proc_off(self, proc: int) -> int:
        return self.procs_off + PROC_SIZE * proc

    def index_entry_off(self, position: int) -> int:
        return self.index_off + INDEX_ENTRY.size * position
