"""Decoding a copy of a table's bytes: the read side shared by ``contexts()``,
``check()``, the sweeper's planning and ``ctx-inspect``.

Everything here works on an immutable ``bytes`` copy, so a decoder can take its time
(and survive garbage) without holding any lock.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from . import _layout as L
from . import _shm
from ._proc import is_alive
from ._table import derived_problems, header_problem, name_hash


@dataclass
class SlotView:
    slot: int
    state: int
    flags: int
    name: str
    name_ok: bool
    refcount: int
    incarnation: int
    name_hash: int
    size: int
    parent_slot: int  # -1 = none
    parent_inc: int
    created: float
    last_used: float  # CLOCK_MONOTONIC
    creator_pid: int
    creator_start: int
    lock_owner: tuple[int, int, int]
    children: int
    kind: int  # L.KIND_*
    version: int
    holders: dict[int, int] = field(default_factory=dict[int, int])  # pid -> count
    holder_starts: dict[int, int] = field(default_factory=dict[int, int])  # pid -> start


@dataclass
class ProcView:
    index: int
    pid: int
    start: int
    attached: float
    refs: list[tuple[int, int]]  # (slot, count), count > 0


@dataclass
class Snapshot:
    namespace: str
    geo: L.Geometry
    config: dict[str, float]  # the header's ContextConfig fields (ints and floats)
    mode: int
    created: float
    next_incarnation: int
    live: int
    free_head: int
    flags: int
    table_id: int
    sweeper: tuple[int, int, int, float]
    locks: list[L.LockRecord]
    index: list[int]
    procs: list[ProcView]
    slots: list[SlotView]  # every non-free slot, and free slots that carry garbage
    taken_at_mono: float
    taken_at_wall: float
    locked: bool = True
    derived: list[str] = field(default_factory=list[str])  # derived_problems of the copy

    def by_name(self) -> dict[str, SlotView]:
        return {s.name: s for s in self.slots if s.state != L.FREE}

    def parent_name(self, s: SlotView) -> str | None:
        if s.parent_slot < 0:
            return None
        # A map built on first use: scanning every slot on each call made listing or
        # checking n contexts cost n * n (hours for a table of 2**20 slots, damaged or not).
        names = self.__dict__.get("_names_by_slot")
        if names is None:
            names = {(p.slot, p.incarnation): p.name for p in self.slots}
            self.__dict__["_names_by_slot"] = names
        return names.get((s.parent_slot, s.parent_inc))

    def wall(self, mono: float) -> float:
        """A CLOCK_MONOTONIC stamp as wall-clock time."""
        return self.taken_at_wall - (self.taken_at_mono - mono)


def decode(data: bytes, locked: bool = True) -> Snapshot:
    """Decode a table copy. Raises ``ValueError`` with what is wrong if the header is
    unusable; damaged slots decode as they are and are left for ``check`` to report."""
    problem = header_problem(data[: L.HEADER_SIZE], len(data))
    if problem:
        raise ValueError(problem)
    head = L.Header.read(data)
    cap, procs_n = head.capacity, head.max_processes
    geo = L.Geometry(cap, procs_n, head.stripes, head.index_size)
    procs: list[ProcView] = []
    holders: dict[int, dict[int, int]] = {}
    starts: dict[int, dict[int, int]] = {}
    for p in range(procs_n):
        ph = L.ProcHead.read(data, geo.proc_off(p))
        if not ph.pid:
            continue
        # Only the rows of registered entries: a table of 2**15 slots and 256 entries
        # has 8 Mi counts, nearly all in rows nobody uses.
        refs = L.nonzero_counts(data, geo.row_off(p), cap)
        procs.append(ProcView(p, ph.pid, ph.start, ph.attached, refs))
        for s, c in refs:
            h = holders.setdefault(s, {})
            h[ph.pid] = h.get(ph.pid, 0) + c
            starts.setdefault(s, {})[ph.pid] = ph.start
    slots: list[SlotView] = []
    for s in range(cap):
        off = geo.slot_off(s)
        if data[off] == L.FREE and s not in holders:  # the state byte
            continue
        f = L.Slot.read(data, off)
        raw = f.name[: min(f.name_len, L.NAME_MAX)]
        try:
            name = raw.decode("utf-8")
            ok = f.name_len <= L.NAME_MAX and name_hash(raw) == f.name_hash
        except UnicodeDecodeError:
            name, ok = raw.decode("utf-8", "backslashreplace"), False
        slots.append(SlotView(
            s, f.state, f.flags, name, ok, f.refcount, f.incarnation, f.name_hash, f.size,
            f.parent - 1, f.parent_inc, f.created, f.last_used, f.creator_pid, f.creator_start,
            (f.lock_pid, f.lock_epoch, f.lock_start), f.children, f.kind, f.version,
            holders.get(s, {}), starts.get(s, {}),
        ))
    return Snapshot(
        namespace=head.namespace[:head.namespace_len].decode("utf-8", "replace"),
        geo=geo,
        config=dict(max_references=head.max_references, max_idle_time=head.max_idle_time,
                    cleanup_interval=head.cleanup_interval, capacity=cap,
                    lock_timeout=head.lock_timeout, max_processes=procs_n),
        mode=head.mode,
        created=head.created,
        next_incarnation=head.next_incarnation,
        live=head.live,
        free_head=head.free_head,
        flags=head.flags,
        table_id=head.table_id,
        sweeper=(head.sweeper_pid, head.sweeper_flags, head.sweeper_start, head.sweeper_beat),
        locks=[L.LockRecord.read(data, geo.lock_off(i)) for i in range(1 + geo.stripes)],
        index=[L.INDEX_ENTRY.unpack_from(data, geo.index_entry_off(i))[0]
               for i in range(geo.index_size)],
        procs=procs,
        slots=slots,
        taken_at_mono=time.monotonic(),
        taken_at_wall=time.time(),
        locked=locked,
        derived=derived_problems(data, geo),
    )


def violations(snap: Snapshot, tag: str | None = None) -> list[str]:
    """Every invariant the table breaks, one line each; empty when it is sound.

    ``tag``: the table's object tag, to check that each live context's segment exists
    with its size (skipped when None).
    """
    out: list[str] = []
    geo = snap.geo
    live_names: dict[str, int] = {}
    for s in snap.slots:
        label = f"slot {s.slot}"
        if s.state == L.FREE:
            for pid, c in s.holders.items():
                out.append(f"{label}: free, yet pid {pid} holds {c} reference(s) to it")
            continue
        if s.state not in (L.CREATING, L.READY):
            out.append(f"{label}: impossible state {s.state}")
            continue
        label = f"slot {s.slot} ({s.name!r})"
        if not s.name_ok:
            out.append(f"{label}: name and name hash disagree, or the name is not UTF-8")
        if s.kind not in (L.KIND_BYTES, L.KIND_ARRAY, L.KIND_OBJECT):
            out.append(f"{label}: impossible kind {s.kind}")
        if not s.flags & L.UNINDEXED:  # older and pending versions share the name
            if s.name in live_names:
                out.append(f"{label}: duplicate live name, also in slot {live_names[s.name]}")
            live_names.setdefault(s.name, s.slot)
        # (A version still being created when a newer one was published is superseded
        # while CREATING: its creator publishes it that way, and it goes with its holders.)
        if s.flags & L.SLOT_PENDING and s.state != L.CREATING:
            out.append(f"{label}: pending while {L.STATE_NAMES.get(s.state)}")
        total = sum(s.holders.values())
        if s.refcount != total:
            out.append(f"{label}: refcount {s.refcount} != {total}, the sum of its holders")
        if not 0 < s.incarnation < snap.next_incarnation:
            out.append(f"{label}: incarnation {s.incarnation} was never issued")
        if s.parent_slot >= 0 and snap.parent_name(s) is None:
            out.append(f"{label}: parent slot {s.parent_slot} incarnation {s.parent_inc} "
                       "is gone but the child lives")
        if s.state == L.READY and tag is not None and s.size > 0:
            path = _shm.host_path(_shm.segment_name(snap.namespace, tag, s.slot, s.incarnation))
            try:
                have = os.stat(path).st_size
                if have != s.size:
                    out.append(f"{label}: segment is {have} bytes, the table says {s.size}")
            except FileNotFoundError:
                out.append(f"{label}: segment {path} is missing")
        if s.state == L.CREATING and not is_alive(s.creator_pid, s.creator_start):
            out.append(f"{label}: being created by dead pid {s.creator_pid}")
    kids: dict[int, int] = {}
    for s in snap.slots:
        if s.state != L.FREE and s.parent_slot >= 0 and snap.parent_name(s) is not None:
            kids[s.parent_slot] = kids.get(s.parent_slot, 0) + 1
    for s in snap.slots:
        if s.state != L.FREE and s.children != kids.get(s.slot, 0):
            out.append(f"slot {s.slot} ({s.name!r}): children count {s.children} != "
                       f"{kids.get(s.slot, 0)} live children")
    out.extend(snap.derived)  # live count and free list against the slots' states
    indexed: set[int] = set()
    for pos, e in enumerate(snap.index):
        if not e:
            continue
        slot = e - 1
        if slot >= geo.capacity:
            out.append(f"index entry {pos}: slot {slot} is out of range")
        elif slot in indexed:
            out.append(f"index entry {pos}: slot {slot} is indexed twice")
        indexed.add(slot)
    for s in snap.slots:
        if s.state in (L.CREATING, L.READY) and s.slot not in indexed and \
                not s.flags & L.UNINDEXED:
            out.append(f"slot {s.slot} ({s.name!r}): live but missing from the name index")
        if s.slot in indexed and s.flags & L.UNINDEXED:
            what = "superseded" if s.flags & L.SLOT_SUPERSEDED else "pending"
            out.append(f"slot {s.slot} ({s.name!r}): {what}, yet in the name index")
    used = {s.slot for s in snap.slots if s.state != L.FREE}  # once, not once per entry
    for e in indexed:
        if e < geo.capacity and e not in used:
            out.append(f"index: points at free slot {e}")
    for i, (pid, _epoch, start) in enumerate(snap.locks):
        if pid and not is_alive(pid, start):
            what = "table lock" if i == 0 else f"stripe lock {i - 1}"
            out.append(f"{what}: held by dead pid {pid}")
    for s in snap.slots:
        pid, _e, start = s.lock_owner
        if s.state != L.FREE and pid and not is_alive(pid, start):
            out.append(f"slot {s.slot} ({s.name!r}): ctx.lock held by dead pid {pid}")
    seen: dict[tuple[int, int], int] = {}
    for p in snap.procs:
        key = (p.pid, p.start)
        if key in seen and seen[key] == p.index:
            out.append(f"process entry {p.index}: duplicate")
        seen[key] = p.index
    return out
