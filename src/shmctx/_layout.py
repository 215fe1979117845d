"""Byte layout of a namespace's table: every record declared once, everything else derived.

The table is one POSIX shared-memory object, ``/dev/shm/shmctx@<namespace>``, mapped by
every process of the namespace. All integers are little-endian (native on the hosts we
support), floats are IEEE-754 doubles, every record starts on an 8-byte boundary and
every region on a 64-byte boundary. Nothing in it is a pointer: slots, process entries
and index entries refer to each other by number, stored as ``number + 1`` so that the
all-zero bytes of a fresh table mean "empty".

The records are declared below, field by field, with a comment each (``HEADER``,
``LOCK_RECORD``, ``INDEX_ENTRY_RECORD``, ``PROC``, ``SLOT``, ``REF_RECORD``); a field's
offset follows from the fields before it. Everything else comes from those declarations:

* the ``struct.Struct``s and offsets the other modules use (``H_FIXED``, ``S_CHECK``,
  ``S_REFCOUNT_OFF``, ...: the "derived" sections after the declarations), and each
  field's own offset and struct (``SLOT["name_hash"].off``, ``.st``, ``.read(buf, off)``);
* named records, ``Header``, ``LockRecord``, ``ProcHead`` and ``Slot``
  (``typing.NamedTuple``s with ``read(buf, off)``), so that no caller indexes a slot's 19
  fields by number;
* ``FINGERPRINT``, a BLAKE2b digest of the declarations (record and field names, types,
  offsets, sizes, the order of the regions, the region constants and
  ``LAYOUT_VERSION``). Each table stores the fingerprint of the code that created it,
  and a table with another one is refused at attach (``_table.header_problem``): two
  builds whose layouts differ in any field never share a table, whatever version
  number they claim. The C hot path has it compiled in and refuses a table, and
  ``_hotpath`` refuses a build, whose fingerprint differs;
* ``_layout.h``, the offsets and sizes for ``_speedups.c`` (``python -m shmctx._layout
  --c-header``), and the byte tables of docs/architecture.md (``--markdown``);
  ``tools/gen_layout.py`` rewrites both, tests/test_layout.py fails when either is stale;
* ``_records.pyi``, the named records for type checkers (``--records-stub``), which
  tests/test_stubs.py keeps current.

Changing a declaration changes the fingerprint, so a table made by the old code is
refused rather than misread; bump ``LAYOUT_VERSION`` and the last byte of ``MAGIC`` too,
so that the refusal names versions, and regenerate (``tools/gen_layout.py``).

Regions, in order (``REGIONS``): the header; the lock records, one per 64-byte cache line
(``[0]`` the table lock, ``[1 + k]`` stripe ``k``) so that processes working on unrelated
stripes never write the same line; the name index; the process entries; the context
slots; the reference counts. ``Geometry`` computes their offsets for one table.

Name index: ``index_size`` u32 entries, each ``slot + 1`` or 0. A name hashes (BLAKE2b, 8
bytes, the same in every process, unlike ``hash()``) to ``hash & (index_size - 1)``;
collisions probe linearly; deletion shifts back the following entries, so there are no
tombstones. The index is derived data: ``Table.repair_table`` rebuilds it from the slots.

References are recorded per process (as the LMDB database keeps one record per reader)
rather than per slot, so that any number of processes can share one context (a gunicorn
master with 100 workers). The reference counts region is a matrix: one row per process
entry, one u32 count per slot in it (``Geometry.ref_off(p, s)``), each row starting on a
cache line. A process finds its count for a slot by position, with no lookup and no
record to claim, and can hold references to every context of the table at once; the
price is 4 bytes per (process entry, slot) pair, whether used or not (1 MiB with the
default 1024 slots and 256 process entries). The region is last: the regions before it
keep their offsets whatever its size, and it is the one a reader of the slots alone
never needs. The per-process counts are the primary record; a slot's ``refcount`` is
their sum, kept for the hot path and recomputed by ``Table.repair_table`` and
``Table.repair_stripe``.

Slot state machine (every transition under the slot's stripe lock; all but publish also
under the table lock, since publish changes neither the index nor the free list)::

    FREE --claim--> CREATING --publish--> READY --close--> FREE
                       |                                   ^
                       +---- init failed / creator died ---+

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

Reads without the lock: each field, who reads it without holding the lock that guards
it, and the worst a stale or in-between value does.

* Lock record (owner pid, epoch, start). Read by waiters after a timed-out wait
  (``_lock``), by the sweeper's recovery of dead owners and by snapshots. The pid is
  written last, alone (epoch and pid share one 8-byte store), so a reader sees either "no
  owner" or a whole owner. Worst case: a stale record costs one more wait; a takeover
  re-reads pid and epoch under the arbiter before it acts.
* Slot state and incarnation. Read by the orphan sweep (``_sweeper``), the planning of
  the idle sweep, the dead-creation scan and the damage scan, ``Slots.wait_for_init``,
  ``validate_context``, ``ctx.lock``'s check that its context lives, and the dead-lock
  recovery. A live slot read as free would let the orphan sweep unlink that context's
  memory and ``ctx.lock`` semaphore: so the state byte is written only by single-byte
  stores, never rewritten when only the flags change, and at claim written after the
  incarnation. Worst case otherwise: a plan that the locks' re-check discards.
* Slot refcount and last_used. Read by the idle-sweep planning, ``Slots.evict_lru``
  (table lock only) and snapshots. Worst case: a candidate too many or too few, as
  ``Slots.close`` re-checks under the stripe locks.
* Reference counts. Read by ``unlink`` (table lock only) and by the snapshots of
  ``check``, ``contexts`` and ctx-inspect; a count changes by a single store. Worst
  case: a snapshot that disagrees for an instant with the slot's refcount, which is
  written a moment later.
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

import functools
import hashlib
import struct
import sys
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

LAYOUT_VERSION = 4  # bump (with the last byte of MAGIC) on any change of the declarations
MAGIC = b"SHMCTX\x00" + bytes([LAYOUT_VERSION])
LOCK_STRIDE = 64  # one cache line per table/stripe lock record
REGION_ALIGN = 64  # every region starts on a cache line
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
SLOT_SUPERSEDED = 4  # an older version of its name: out of the index, freed at refcount 0
SLOT_PENDING = 8  # a new version being built by publish: out of the index until the switch
UNINDEXED = SLOT_SUPERSEDED | SLOT_PENDING  # live slots the name index does not hold

# Process-entry flags.
P_LIVE_LOCK = 1

# What a context's memory holds (the slot's ``kind``): the user's bytes, or a payload
# (_payload.py) with a NumPy array or a pickled object in it.
KIND_BYTES = 0
KIND_ARRAY = 1
KIND_OBJECT = 2
PAYLOAD_ALIGN = 64  # the payload's data, and each buffer in it, start at a multiple
PAYLOAD_MAGIC = b"shmctxP1"

# Header flags.
FLAG_UNLINKED = 1

# The regions of a table, in the order they follow each other (Geometry places them).
REGIONS = ("header", "locks", "index", "procs", "slots", "refs")

# The values stored in the table besides offsets: part of its format too.
CONSTANTS = {
    "LOCK_STRIDE": LOCK_STRIDE, "REGION_ALIGN": REGION_ALIGN,
    "PAGE": PAGE, "MAX_STRIPES": MAX_STRIPES,
    "FREE": FREE, "CREATING": CREATING, "READY": READY,
    "SLOT_WAITERS": SLOT_WAITERS, "SLOT_LOCK": SLOT_LOCK, "P_LIVE_LOCK": P_LIVE_LOCK,
    "SLOT_SUPERSEDED": SLOT_SUPERSEDED, "SLOT_PENDING": SLOT_PENDING,
    "FLAG_UNLINKED": FLAG_UNLINKED, "KIND_BYTES": KIND_BYTES, "KIND_ARRAY": KIND_ARRAY,
    "KIND_OBJECT": KIND_OBJECT, "PAYLOAD_ALIGN": PAYLOAD_ALIGN,
}


# --- the declarations' vocabulary ---------------------------------------------------

# type -> (struct code, size, Python type). Besides these: bytes[N] (N bytes of text),
# pad[N] (N reserved bytes, zero), and <record>[N] (N records of an earlier declaration).
_SCALARS: dict[str, tuple[str, int, type]] = {
    "u8": ("B", 1, int), "u16": ("H", 2, int), "u32": ("I", 4, int), "u64": ("Q", 8, int),
    "f64": ("d", 8, float),
}


@dataclass(frozen=True)
class Field:
    """One field as declared: ``name``, ``type`` (see ``_SCALARS``), ``comment``."""

    name: str
    type: str
    comment: str


@dataclass(frozen=True)
class Placed:
    """A declared field at its place in its record."""

    name: str
    type: str
    comment: str
    off: int  # from the start of the record
    size: int
    code: str  # struct format of the field, without byte order

    @property
    def pad(self) -> bool:
        return self.type.startswith("pad[")

    @functools.cached_property
    def st(self) -> struct.Struct:
        """The field alone."""
        return struct.Struct("<" + self.code)

    def read(self, buf: memoryview | bytes | bytearray, rec_off: int) -> Any:
        """The field's value in the record at ``rec_off``."""
        return self.st.unpack_from(buf, rec_off + self.off)[0]


def _measure(typ: str, records: dict[str, Record]) -> tuple[int, str]:
    """(size, struct code) of a declared type."""
    if typ in _SCALARS:
        code, size, _py = _SCALARS[typ]
        return size, code
    base, _, count = typ.partition("[")
    n = int(count.rstrip("]"))
    if base == "bytes":
        return n, f"{n}s"
    if base == "pad":
        return n, "x" * n if n <= 4 else f"{n}x"
    rec = records[base]  # KeyError: an undeclared type
    return rec.size * n, rec.struct.format.lstrip("<") * n


class Record:
    """A record's fields, placed one after the other from offset 0: every number at a
    multiple of its own width (so that ``Words`` and the C code store it with one
    machine store), ``size`` bytes in all, a multiple of its widest number's width."""

    def __init__(self, key: str, title: str, size: int, fields: Iterable[Field],
                 about: str = "", records: dict[str, Record] | None = None) -> None:
        self.key, self.title, self.size, self.about = key, title, size, about
        known = _RECORDS if records is None else records
        placed: list[Placed] = []
        off = 0
        for f in fields:
            n, code = _measure(f.type, known)
            if f.type in _SCALARS and off % n:
                raise ValueError(f"{key}.{f.name}: {f.type} at offset {off} is not aligned")
            placed.append(Placed(f.name, f.type, f.comment, off, n, code))
            off += n
        widest = max((p.size for p in placed if p.type in _SCALARS), default=1)
        if off != size or size % widest:
            raise ValueError(f"record {key}: fields make {off} bytes, declared {size}")
        self.fields = placed
        self._named = {p.name: p for p in placed if not p.pad}
        if len(self._named) != sum(not p.pad for p in placed):
            raise ValueError(f"record {key}: a field name is declared twice")
        # The whole record: every field but the reserved ones.
        self.struct = self.pick(*(p.name for p in placed if not p.pad))
        known[key] = self

    def __getitem__(self, name: str) -> Placed:
        return self._named[name]

    def off(self, name: str) -> int:
        return self._named[name].off

    def pick(self, *names: str) -> struct.Struct:
        """The fields ``names`` (in offset order), from the first one's offset: every
        byte in between that they do not cover is skipped (``x``)."""
        chosen = sorted((self._named[n] for n in names), key=lambda p: p.off)
        fmt, at = "<", chosen[0].off
        for p in chosen:
            gap = p.off - at
            if gap < 0:
                raise ValueError(f"record {self.key}: {p.name} overlaps the field before")
            fmt += ("x" * gap if gap <= 4 else f"{gap}x") + p.code
            at = p.off + p.size
        return struct.Struct(fmt)

    def span(self, first: str, last: str) -> struct.Struct:
        """Every field from ``first`` to ``last``, in one struct."""
        lo, hi = self.off(first), self.off(last)
        return self.pick(*(p.name for p in self.fields if not p.pad and lo <= p.off <= hi))

    def named(self, cls_name: str, first: str | None = None,
              last: str | None = None) -> type[typing.NamedTuple]:
        """A ``typing.NamedTuple`` of the record's fields (or of those from ``first`` to
        ``last``), but the reserved ones, with ``read(buf, off)``: the fields of the
        record that starts at ``off``."""
        lo = self.off(first) if first else 0
        hi = self.off(last) if last else self.size
        names = [p.name for p in self.fields if not p.pad and lo <= p.off <= hi]
        st = self.pick(*names)
        start = self._named[names[0]].off
        fields = [(n, _python_type(self._named[n].type)) for n in names]
        # Name and fields are data here, which type checkers do not follow (they read
        # _records.pyi instead).
        base = typing.NamedTuple(cls_name, fields)  # type: ignore[misc]

        def read(cls: Any, buf: memoryview | bytes | bytearray, off: int = 0) -> object:
            return cls._make(st.unpack_from(buf, off + start))

        doc = f"{self.title}: {', '.join(names)}, read from the table with ``read``."
        return type(cls_name, (base,), {
            "__slots__": (), "__doc__": doc, "__module__": __name__,
            "read": classmethod(read), "STRUCT": st,
        })


def _python_type(typ: str) -> type:
    return _SCALARS[typ][2] if typ in _SCALARS else bytes


_RECORDS: dict[str, Record] = {}


# --- the declarations ---------------------------------------------------------------
# Changing anything here changes FINGERPRINT: bump LAYOUT_VERSION, then run
# tools/gen_layout.py to regenerate _layout.h and the tables in docs/architecture.md.

HEADER = Record("header", "Header", 256, [
    Field("magic", "bytes[8]", 'MAGIC, b"SHMCTX\\0" and the layout version in its last byte; '
          "written LAST when the table is created, so that a half-initialised table is "
          "never mistaken for a live one"),
    Field("version", "u32", "LAYOUT_VERSION"),
    Field("header_size", "u32", "HEADER_SIZE, the size of this record"),
    Field("slot_size", "u32", "SLOT_SIZE"),
    Field("capacity", "u32", "number of context slots"),
    Field("stripes", "u32", "number of stripe locks (slot k: stripe k % stripes)"),
    Field("max_processes", "u32", "number of process entries"),
    Field("total_size", "u64", "size of the whole table in bytes"),
    Field("max_references", "u32", "per context, 0 = unlimited"),
    Field("mode", "u32", "permission bits of every object of the namespace"),
    Field("max_idle_time", "f64", "seconds, 0 = never close idle contexts"),
    Field("cleanup_interval", "f64", "seconds, 0 = no automatic sweeping"),
    Field("lock_timeout", "f64", "seconds a waiter trusts a lock holder"),
    Field("created", "f64", "wall-clock time the table was created"),
    Field("next_incarnation", "u64", "source of context incarnations (never reused)"),
    Field("live", "u32", "contexts in a CREATING or READY slot (derived)"),
    Field("free_head", "u32", "first free slot + 1, 0 = none (derived)"),
    Field("flags", "u32", "FLAG_UNLINKED once unlink() has begun"),
    Field("index_size", "u32", "entries of the name index (power of two >= 2 x capacity)"),
    Field("table_id", "u64", "random: tells apart two tables of the same name over time; "
          "its low 48 bits, in hex, are the `<tag>` in the names of the table's objects"),
    Field("sweeper_pid", "u32", "process leading the sweep, 0 = none"),
    Field("sweeper_flags", "u32", "reserved, zero"),
    Field("sweeper_start", "u64", "its start time (clock ticks since boot): tells a reused "
          "pid apart"),
    Field("sweeper_beat", "f64", "CLOCK_MONOTONIC time of its last sweep"),
    Field("namespace_len", "u8", "bytes of the namespace name"),
    Field("namespace", "bytes[64]", "the namespace name (for tools listing /dev/shm)"),
    Field("reserved", "pad[7]", "zero"),
    Field("fingerprint", "u64", "FINGERPRINT of the code that created the table; a table "
          "with another one is refused"),
    Field("reserved2", "pad[40]", "zero"),
])

LOCK_RECORD = Record("lock", "Lock record", 16, [
    Field("pid", "u32", "owner's pid, 0 = free (or: taken, owner not yet written: see "
          "_lock.py); written last, alone"),
    Field("epoch", "u32", "incremented on every acquisition and every recovery"),
    Field("start", "u64", "owner's start time (clock ticks since boot), so that a reused "
          "pid is not taken for it"),
], about="one per table or stripe lock, each alone on its 64-byte cache line "
         "(LOCK_STRIDE); and one inside each slot, for ctx.lock")

INDEX_ENTRY_RECORD = Record("index_entry", "Name index entry", 4, [
    Field("slot", "u32", "slot + 1 of a live context, 0 = empty"),
])

PROC = Record("proc", "Process entry", 64, [
    Field("pid", "u32", "0 = free; written last when the entry is taken"),
    Field("flags", "u32", "P_LIVE_LOCK: the process holds this entry's liveness lock (an "
          "OFD lock on the table file, _liveness.py)"),
    Field("start", "u64", "start time of the process (clock ticks since boot)"),
    Field("attached", "f64", "wall-clock time it attached"),
    Field("reserved", "pad[40]", "zero"),
], about="one per attached process; the references it holds are its row of the reference "
   "counts")


def _embedded(rec: Record, prefix: str, what: str) -> list[Field]:
    """The fields of ``rec``, renamed ``prefix + name``, to nest it in another record."""
    return [Field(prefix + p.name, p.type, f"{what}: {p.comment}") for p in rec.fields]


SLOT = Record("slot", "Context slot", 256, [
    Field("state", "u8", "FREE 0, CREATING 1, READY 2 (STATE_NAMES); written alone, by "
          "single-byte stores"),
    Field("flags", "u8", "SLOT_WAITERS 1: someone waits on the init semaphore; "
          "SLOT_LOCK 2: the ctx.lock semaphore was created; SLOT_SUPERSEDED 4: a newer "
          "version of the name was published; SLOT_PENDING 8: a version being published. "
          "Changed under the stripe lock only"),
    Field("name_len", "u16", "bytes of the UTF-8 name"),
    Field("refcount", "u32", "sum of the per-process counts (derived; kept for the hot "
          "path)"),
    Field("incarnation", "u64", "unique per namespace, never reused: a handle is valid "
          "while its slot holds its incarnation in state READY"),
    Field("name_hash", "u64", "BLAKE2b-64 of the name"),
    Field("size", "u64", "bytes of the context's memory"),
    Field("parent", "u32", "parent slot + 1, 0 = none"),
    Field("next_free", "u32", "next free slot + 1 (the free list; derived)"),
    Field("parent_inc", "u64", "parent's incarnation"),
    Field("created", "f64", "wall-clock creation time"),
    Field("last_used", "f64", "CLOCK_MONOTONIC time of the last return (or creation), the "
          "same clock in every process of the host"),
    Field("creator_pid", "u32", "process running init (meaningful while CREATING)"),
    Field("children", "u32", "live contexts whose parent this is (derived; lets closing a "
          "leaf skip the scan for children); changed only under the table lock"),
    Field("creator_start", "u64", "creator's start time"),
    *_embedded(LOCK_RECORD, "lock_", "owner record of ctx.lock"),
    Field("name", "bytes[128]", "the name, UTF-8"),
    Field("kind", "u8", "what the memory holds: KIND_BYTES 0 (the user's bytes), "
          "KIND_ARRAY 1 or KIND_OBJECT 2 (a payload, PAYLOAD below); set when the slot is "
          "claimed. A payload's own bytes are never trusted to say so"),
    Field("pad", "pad[3]", "zero"),
    Field("version", "u32", "1 for the first version of a name, then one more for each "
          "version publish() makes current (0 while one is pending)"),
    Field("reserved", "pad[24]", "zero"),
])

REF_RECORD = Record("ref", "Reference count", 4, [
    Field("count", "u32", "how many references process entry p holds to slot s; changed "
          "by a single store, under the slot's stripe lock"),
], about="row p, column s of the reference counts: at `refs_off + row_stride * p + 4 * s`; "
   "zeroed when entry p is claimed, and when slot s is freed")

PAYLOAD = Record("payload", "Payload header", 64, [
    Field("magic", "bytes[8]", 'PAYLOAD_MAGIC, b"shmctxP1"; written after the metadata '
          "(an object's data too), so a half-written header has none"),
    Field("kind", "u8", "KIND_ARRAY or KIND_OBJECT: must equal the slot's kind"),
    Field("pad", "pad[3]", "zero"),
    Field("meta_len", "u32", "bytes of msgpack metadata right after this header"),
    Field("data_off", "u64", "offset of the data from the start of the memory: a multiple "
          "of PAYLOAD_ALIGN, past the metadata"),
    Field("data_len", "u64", "bytes of data (the array; or the pickle stream and its "
          "buffers, each PAYLOAD_ALIGN-aligned)"),
    Field("reserved", "pad[32]", "zero"),
], about="at offset 0 of the memory of a context whose kind is not KIND_BYTES; not in the "
   "table")

# --- derived: named records ---------------------------------------------------------

if typing.TYPE_CHECKING:
    # A type checker cannot see fields made at run time: _records.pyi declares the same
    # records for it (generated from these by records_stub; a test keeps it current).
    from . import _records  # pyright: ignore[reportMissingModuleSource]

    Header = _records.Header
    LockRecord = _records.LockRecord
    ProcHead = _records.ProcHead
    Sweeper = _records.Sweeper
    Slot = _records.Slot
    Payload = _records.Payload
else:
    Header = HEADER.named("Header")
    LockRecord = LOCK_RECORD.named("LockRecord")
    ProcHead = PROC.named("ProcHead", "pid", "attached")
    Sweeper = HEADER.named("Sweeper", "sweeper_pid", "sweeper_beat")  # header's sweeper fields
    Slot = SLOT.named("Slot")
    Payload = PAYLOAD.named("Payload")
NAMED = (Header, LockRecord, ProcHead, Sweeper, Slot, Payload)

# --- derived: the names the other modules use ---------------------------------------

HEADER_SIZE = HEADER.size
SLOT_SIZE = SLOT.size
PROC_SIZE = PROC.size
REF_SIZE = REF_RECORD.size  # one count; row p, column s: Geometry.ref_off(p, s)
NAME_MAX = SLOT["name"].size
LOCKS_OFF = HEADER_SIZE  # lock record k at LOCKS_OFF + LOCK_STRIDE * k

# header
H_MAGIC = HEADER["magic"].st
H_FIXED_OFF = HEADER.off("version")
H_FIXED = HEADER.span("version", "created")
H_NEXT_INC_OFF, H_NEXT_INC = HEADER.off("next_incarnation"), HEADER["next_incarnation"].st
H_LIVE_OFF, H_LIVE = HEADER.off("live"), HEADER["live"].st
H_FREE_HEAD_OFF, H_FREE_HEAD = HEADER.off("free_head"), HEADER["free_head"].st
H_FLAGS_OFF, H_FLAGS = HEADER.off("flags"), HEADER["flags"].st
H_INDEX_SIZE_OFF, H_INDEX_SIZE = HEADER.off("index_size"), HEADER["index_size"].st
H_TABLE_ID_OFF, H_TABLE_ID = HEADER.off("table_id"), HEADER["table_id"].st
H_SWEEPER_OFF = HEADER.off("sweeper_pid")
H_SWEEPER = HEADER.span("sweeper_pid", "sweeper_beat")  # pid, flags, start, beat
H_NAMESPACE_OFF = HEADER.off("namespace_len")
H_NAMESPACE = HEADER.span("namespace_len", "namespace")
H_FINGERPRINT_OFF, H_FINGERPRINT = HEADER.off("fingerprint"), HEADER["fingerprint"].st

# lock record, index entry, process entry
LOCK = LOCK_RECORD.struct  # pid, epoch, start
INDEX_ENTRY = INDEX_ENTRY_RECORD.struct
P_HEAD = PROC.span("pid", "attached")  # pid, flags, start, attached: ProcHead
P_PID = PROC["pid"].st

# slot
S_STATE = SLOT.span("state", "flags")
S_HEAD = SLOT.span("state", "name_hash")  # state, flags, name_len, refcount, inc, hash
S_CHECK = SLOT.pick("state", "refcount", "incarnation")
S_GET = SLOT.pick("state", "flags", "refcount", "incarnation")  # the Python get's one read
S_REFCOUNT_OFF, S_REFCOUNT = SLOT.off("refcount"), SLOT["refcount"].st
S_INC_OFF, S_INC = SLOT.off("incarnation"), SLOT["incarnation"].st
S_BODY_OFF = SLOT.off("size")
S_BODY = SLOT.span("size", "last_used")  # size, parent, next_free, parent_inc, created, used
S_NEXT_FREE_OFF, S_NEXT_FREE = SLOT.off("next_free"), SLOT["next_free"].st
S_LAST_USED_OFF, S_LAST_USED = SLOT.off("last_used"), SLOT["last_used"].st
S_CHILDREN_OFF, S_CHILDREN = SLOT.off("children"), SLOT["children"].st
S_LOCK_OFF = SLOT.off("lock_pid")
S_NAME_OFF = SLOT.off("name")
SLOT_ALL = SLOT.struct  # every field of Slot, in its order

# Records start on 8-byte boundaries (regions on REGION_ALIGN ones), so the alignment of
# each field within its record (checked by Record) holds in the table.
assert not any(n % 8 for n in (HEADER_SIZE, LOCK_STRIDE, PROC_SIZE, SLOT_SIZE, REGION_ALIGN,
                               S_LOCK_OFF))
assert REF_RECORD.fields[0].code == "I" and REF_SIZE == 4  # Words.u32 indexes the counts
assert LOCK_RECORD.size <= LOCK_STRIDE and REGION_ALIGN % 8 == 0

if sys.byteorder != "little" or struct.calcsize("=I") != 4 or struct.calcsize("=Q") != 8:
    # Words stores in native byte order into a little-endian layout.
    raise ImportError("shmctx's table layout needs a little-endian host with 4-byte unsigned "
                      f"int and 8-byte unsigned long long (this one: {sys.byteorder}-endian)")

# --- the fingerprint ----------------------------------------------------------------

RECORDS = (HEADER, LOCK_RECORD, INDEX_ENTRY_RECORD, PROC, SLOT, REF_RECORD, PAYLOAD)


def describe(records: Sequence[Record] = RECORDS, version: int = LAYOUT_VERSION,
             constants: dict[str, int] = CONSTANTS, regions: Sequence[str] = REGIONS) -> str:
    """The text the fingerprint digests: the version, the order of the regions, the
    constants, and every field of every record by name, type, offset and size (comments
    are left out)."""
    lines = [f"layout {version}", "regions " + " ".join(regions)]
    lines += [f"{k} {v}" for k, v in sorted(constants.items())]
    for rec in records:
        lines.append(f"record {rec.key} {rec.size}")
        lines += [f"  {p.name} {p.type} {p.off} {p.size}" for p in rec.fields]
    return "\n".join(lines) + "\n"


def fingerprint(records: Sequence[Record] = RECORDS, version: int = LAYOUT_VERSION,
                constants: dict[str, int] = CONSTANTS, regions: Sequence[str] = REGIONS) -> int:
    """BLAKE2b-64 of ``describe(...)``, as a u64."""
    digest = hashlib.blake2b(describe(records, version, constants, regions).encode(),
                             digest_size=8)
    return int.from_bytes(digest.digest(), "little")


FINGERPRINT = fingerprint()


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
        # Typed as the views they stand in for: a lock, their one user, indexes them by
        # an int alone (no slices, no tolist), which _SliceView does as they do.
        w.u32, w.u64, w.f64 = (cast("memoryview[Any]", _SliceView(buf, struct.Struct(f)))
                               for f in ("<I", "<Q", "<d"))
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
        value: int | float = self.st.unpack_from(self.buf, i * self.st.size)[0]
        return value

    def __setitem__(self, i: int, value: int | float) -> None:
        n = self.st.size
        self.buf[i * n:(i + 1) * n] = self.st.pack(value)

    def release(self) -> None:
        pass


def _round_up(value: int, unit: int) -> int:
    return (value + unit - 1) // unit * unit


def row_stride(capacity: int) -> int:
    """Bytes from one row of the reference counts to the next: a count per slot, rounded
    up to a whole number of cache lines, so that each row starts on its own line and a
    process counting in its row shares no line with another process's row."""
    return _round_up(REF_SIZE * capacity, REGION_ALIGN)


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
        "refs_off",
        "row_stride",
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
        self.index_off = _round_up(LOCKS_OFF + LOCK_STRIDE * (1 + self.stripes), REGION_ALIGN)
        self.procs_off = _round_up(self.index_off + INDEX_ENTRY.size * index_size, REGION_ALIGN)
        self.slots_off = _round_up(self.procs_off + PROC_SIZE * max_processes, REGION_ALIGN)
        self.refs_off = _round_up(self.slots_off + SLOT_SIZE * capacity, REGION_ALIGN)
        self.row_stride = row_stride(capacity)
        self.total = _round_up(self.refs_off + self.row_stride * max_processes, PAGE)

    def lock_off(self, lock_index: int) -> int:
        """Offset of lock record ``lock_index`` (0 = table lock, 1 + k = stripe k)."""
        return LOCKS_OFF + LOCK_STRIDE * lock_index

    def slot_off(self, slot: int) -> int:
        return self.slots_off + SLOT_SIZE * slot

    def proc_off(self, proc: int) -> int:
        return self.procs_off + PROC_SIZE * proc

    def index_entry_off(self, position: int) -> int:
        return self.index_off + INDEX_ENTRY.size * position

    def row_off(self, proc: int) -> int:
        """Offset of process entry ``proc``'s row of reference counts."""
        return self.refs_off + self.row_stride * proc

    def ref_off(self, proc: int, slot: int) -> int:
        """Offset of process entry ``proc``'s count of references to ``slot``."""
        return self.refs_off + self.row_stride * proc + REF_SIZE * slot


_COUNTS_CHUNK = 1024  # bytes of a row compared with zeros at once (256 counts)
_ZEROS = bytes(_COUNTS_CHUNK)


def nonzero_counts(buf: memoryview | bytes, off: int, n: int) -> list[tuple[int, int]]:
    """``(i, count)`` for each nonzero u32 of the ``n`` at ``off`` in ``buf``: a row of
    reference counts, ``i`` the slot. Mostly zeros, even when the process holds many
    contexts, so the row is compared with zeros a chunk at a time (a ``memcmp``) and only
    the chunks that hold a count are unpacked: a row of 2**15 slots costs about a tenth
    of unpacking it all."""
    view = memoryview(buf)
    out: list[tuple[int, int]] = []
    end = off + REF_SIZE * n
    for lo in range(off, end, _COUNTS_CHUNK):
        hi = min(lo + _COUNTS_CHUNK, end)
        part = view[lo:hi]
        if part.tobytes() == _ZEROS[:hi - lo]:
            continue
        first = (lo - off) // REF_SIZE
        out += [(first + i, c) for i, c in enumerate(part.cast("I").tolist()) if c]
    return out


# --- what is generated from the declarations ----------------------------------------

MARKDOWN_BEGIN = ("<!-- layout tables: generated from src/shmctx/_layout.py by "
                  "tools/gen_layout.py; do not edit -->")
MARKDOWN_END = "<!-- end of layout tables -->"


def c_header() -> str:
    """``_layout.h``: every field's offset and size, the regions and the stored values,
    as ``#define``s for ``_speedups.c``."""
    out = [
        "/* _layout.h: the byte layout of a shmctx table, for _speedups.c.",
        " *",
        " * generated from _layout.py; do not edit. Regenerate with tools/gen_layout.py",
        " * (or python -m shmctx._layout --c-header); tests/test_layout.py fails while",
        " * this file is stale. What each field means is written next to its declaration",
        " * in _layout.py. */",
        "#ifndef SHMCTX_LAYOUT_H",
        "#define SHMCTX_LAYOUT_H",
        "",
        _define("SHMCTX_LAYOUT_VERSION", str(LAYOUT_VERSION)),
        "/* BLAKE2b-64 of the declarations; every table stores the one of its creator at",
        " * SHMCTX_HEADER_FINGERPRINT_OFF. */",
        _define("SHMCTX_LAYOUT_FINGERPRINT", f"0x{FINGERPRINT:016x}ULL"),
    ]
    for rec in RECORDS:
        key = rec.key.upper()
        out += ["", f"/* {rec.title} ({rec.size} bytes) */",
                _define(f"SHMCTX_{key}_SIZE", str(rec.size))]
        for p in rec.fields:
            if not p.pad:
                name = f"SHMCTX_{key}_{p.name.upper()}"
                out += [_define(f"{name}_OFF", str(p.off), p.type),
                        _define(f"{name}_SIZE", str(p.size))]
    out += ["", "/* Regions and the values stored in the table */",
            _define("SHMCTX_LOCKS_OFF", str(LOCKS_OFF), "lock record k: LOCKS_OFF + "
                    "LOCK_STRIDE * k"),
            "/* Bytes from one row of reference counts to the next (Geometry.row_stride):",
            " * process entry p's count for slot s is at refs_off + p * stride + 4 * s. */",
            _define("SHMCTX_REF_ROW_STRIDE(capacity)",
                    f"((((Py_ssize_t)(capacity) * {REF_SIZE} + {REGION_ALIGN - 1}) / "
                    f"{REGION_ALIGN}) * {REGION_ALIGN})")]
    out += [_define(f"SHMCTX_{k}", str(v)) for k, v in CONSTANTS.items()]
    out += ["", "#endif /* SHMCTX_LAYOUT_H */", ""]
    names = [line.split()[1] for line in out if line.startswith("#define")]
    assert len(names) == len(set(names)), "two layout names make the same C name"
    return "\n".join(out)


def records_stub() -> str:
    """``_records.pyi``: the named records (``NAMED``) as ``NamedTuple`` classes with
    their fields written out, for type checkers, which cannot see the fields that
    ``Record.named`` makes at run time."""
    out = [
        "# _records.pyi: the named records of _layout.py, declared for type checkers.",
        "#",
        "# generated from _layout.py; do not edit. Regenerate with",
        "# python -m shmctx._layout --records-stub; tests/test_stubs.py fails while",
        "# this file is stale. The records exist only as _layout.Header, _layout.Slot, ...",
        "",
        "from typing import NamedTuple",
    ]
    for cls in NAMED:
        out += ["", f"class {cls.__name__}(NamedTuple):"]
        out += [f"    {name}: {typ.__name__}"
                for name, typ in typing.get_type_hints(cls).items()]
        out += ["    @classmethod",
                "    def read(cls, buf: memoryview | bytes | bytearray, off: int = 0) -> "
                f"{cls.__name__}: ..."]
    return "\n".join(out) + "\n"


def _define(name: str, value: str, comment: str = "") -> str:
    line = f"#define {name:<40} {value}"
    return f"{line:<56} /* {comment} */" if comment else line


def markdown(default: Geometry) -> str:
    """The byte tables of docs/architecture.md ("The table, byte by byte"), between
    ``MARKDOWN_BEGIN`` and ``MARKDOWN_END``; ``default``: the geometry of the default
    configuration (given by the caller: the configuration depends on this module)."""
    entry = INDEX_ENTRY.size
    x = "\N{MULTIPLICATION SIGN}"
    out = [
        MARKDOWN_BEGIN,
        "",
        "| region | offset | size |",
        "|---|---|---|",
        f"| header | 0 | {HEADER_SIZE} |",
        f"| lock records: [0] table lock, [1+k] stripe k, one per {LOCK_STRIDE}-byte cache "
        f"line | {LOCKS_OFF} | {LOCK_STRIDE} {x} (1 + stripes) |",
        f"| name index | `index_off` ({REGION_ALIGN}-aligned) | {entry} {x} `index_size` "
        f"(power of two ≥ 2 {x} capacity) |",
        f"| process entries | `procs_off` ({REGION_ALIGN}-aligned) | {PROC_SIZE} {x} "
        "`max_processes` |",
        f"| context slots | `slots_off` ({REGION_ALIGN}-aligned) | {SLOT_SIZE} {x} `capacity` |",
        f"| reference counts: row p (process entry p), column s (slot s) | `refs_off` "
        f"({REGION_ALIGN}-aligned) | `row_stride` {x} `max_processes`, `row_stride` = "
        f"{REF_SIZE} {x} `capacity` rounded up to {REGION_ALIGN} |",
        f"| total | | rounded up to {PAGE} |",
        "",
        f"With the defaults (capacity {default.capacity}, {default.stripes} stripes, "
        f"{default.max_processes} processes) the table is {default.total:,} bytes: "
        f"{SLOT_SIZE} bytes per slot plus at most {4 * entry} bytes of index per slot, "
        f"{PROC_SIZE} bytes per process entry, {REF_SIZE} bytes of reference count per "
        f"slot per process entry ({default.row_stride * default.max_processes:,} bytes, "
        "the largest part), plus the header and the lock records.",
    ]
    for rec in (HEADER, LOCK_RECORD, INDEX_ENTRY_RECORD, PROC, SLOT, REF_RECORD, PAYLOAD):
        about = f": {rec.about}" if rec.about else ""
        out += ["", f"**{rec.title} ({rec.size} bytes)**{about}", "",
                "| off | size | type | field | meaning |", "|---:|---:|---|---|---|"]
        out += [f"| {p.off} | {p.size} | {p.type} | {'' if p.pad else f'`{p.name}`'} | "
                f"{p.comment.replace('|', '/')} |" for p in rec.fields]
    out += ["", MARKDOWN_END]
    return "\n".join(out) + "\n"


def markdown_block(text: str) -> str:
    """The generated block of a document (``MARKDOWN_BEGIN`` to ``MARKDOWN_END``, both
    included, with the newline after it), or '' if it has none."""
    begin = text.find(MARKDOWN_BEGIN)
    end = text.find(MARKDOWN_END, begin)
    if begin < 0 or end < 0:
        return ""
    return text[begin:end + len(MARKDOWN_END)] + "\n"


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m shmctx._layout",
        description="Print what is generated from the table's layout declarations.")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--c-header", action="store_true", help="_layout.h for _speedups.c")
    what.add_argument("--fingerprint", action="store_true", help="FINGERPRINT, in hex")
    what.add_argument("--records-stub", action="store_true",
                      help="_records.pyi, the named records for type checkers")
    args = ap.parse_args(argv)
    if args.c_header:
        sys.stdout.write(c_header())
    elif args.records_stub:
        sys.stdout.write(records_stub())
    else:
        print(f"{FINGERPRINT:016x}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
