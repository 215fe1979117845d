"""The sweeper: reclaims references of dead processes, closes idle contexts, removes
orphaned objects. One process leads it per namespace, recorded in the table header.

Each context is closed under its own short hold of the table lock; planning reads the
slots without any lock (the plan is re-checked under the lock), so a sweep over a large
table never stalls workers for more than one close at a time.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable
from functools import partial
from time import monotonic
from typing import TYPE_CHECKING

from . import _failpoints, _shm
from . import _layout as L
from ._context import SweepReport
from ._errors import ContextError, ContextManagerClosedError
from ._proc import identity, is_alive
from ._table import derived_problems

if TYPE_CHECKING:
    from ._slots import Slots
    from ._table import Table

log = logging.getLogger("shmctx.sweeper")

def take_lead(slots: Slots) -> bool:
    """Become (or stay) the namespace's sweeper leader, unless a live process leads."""
    t = slots.table
    with t.table_lock:
        t.check_usable()
        pid, _f, start, _beat = t.sweeper()
        me = (identity.pid, identity.start)
        if (pid, start) != me:
            if pid and t.liveness.owner_alive(pid, start):
                return False
            if pid:
                log.warning("namespace %r: sweeper pid %d is dead; pid %d takes the lead",
                            t.ns, pid, identity.pid)
            if _failpoints.armed:
                _failpoints.hit("sweep.leader_taken")
        t.set_sweeper(identity.pid, identity.start, monotonic())
        return True


def sweep_once(slots: Slots) -> SweepReport:
    began = monotonic()
    report = SweepReport()
    t = slots.table
    buf, geo = t.buf, t.geo
    t.check_usable()
    slots.return_dropped()  # references of handles dropped unreturned in this process
    # Liveness checks read /proc and are slow: they are made without the table lock, and
    # each finding is acted on under a short hold after checking it still stands.
    report.reclaimed = slots.reclaim_dead(locked=False)
    slots.remove_dead_creations()
    report.damaged = close_damaged(slots)
    # One pass over the slots finds the two kinds of unreferenced context it closes:
    # superseded versions, at once (their last holder died, and its references were
    # reclaimed above; or a repair marked them), and the others once idle for
    # max_idle_time.
    idle_limit = t.config.max_idle_time
    now = monotonic()
    superseded: list[tuple[int, int]] = []  # (slot, incarnation)
    candidates: list[tuple[int, int]] = []
    for slot in range(geo.capacity):
        so = geo.slot_off(slot)
        state, rc, inc = L.S_CHECK.unpack_from(buf, so)
        if state != L.READY or rc:
            continue
        if buf[so + 1] & L.SLOT_SUPERSEDED:
            superseded.append((slot, inc))
        elif idle_limit > 0 and \
                now - L.S_LAST_USED.unpack_from(buf, so + L.S_LAST_USED_OFF)[0] > idle_limit:
            candidates.append((slot, inc))
    for slot, inc in superseded:
        with t.table_lock:
            name = slots.name_of(slot)
            if slots.free_superseded(slot, inc):
                report.closed.append(name)
    for slot, inc in candidates:
        with t.table_lock:
            names, closed = slots.close_idle(slot, inc, idle_limit)
        if closed:
            report.closed.extend(names)
        elif names:
            report.skipped_in_use.append(names[-1])
    report.locks_recovered = slots.recover_dead_locks()
    report.orphans_removed = remove_namespace_orphans(t)
    report.duration = monotonic() - began
    return report


def close_damaged(slots: Slots) -> list[str]:
    """Repair damage that lookups would otherwise trip over, and name the contexts it
    cost: slots in no state, ready contexts whose memory segment is gone (see
    ``Slots.damaged``), derived header data (live count, free list) that disagrees with
    the slots (rebuilt by ``Table.repair_derived``).

    Planned without a lock, from one listing of /dev/shm made before the slots are read:
    a context created since has no entry in it but is confirmed, like every finding,
    under the table lock (where a ready slot's segment exists unless damage removed it).
    """
    t = slots.table
    buf, geo = t.buf, t.geo
    present = set(_shm.namespace_objects(t.ns))
    suspects: list[tuple[int, int]] = []  # (slot, incarnation)
    for slot in range(geo.capacity):
        so = geo.slot_off(slot)
        state, _rc, inc = L.S_CHECK.unpack_from(buf, so)
        if state not in L.STATE_NAMES or (
                state == L.READY and L.SLOT["size"].read(buf, so) and
                t.segment(slot, inc).lstrip("/") not in present):
            suspects.append((slot, inc))
    names: list[str] = []
    for slot, inc in suspects:
        with t.table_lock:
            so = geo.slot_off(slot)
            state, _rc, now_inc = L.S_CHECK.unpack_from(buf, so)
            path = _shm.host_path(t.segment(slot, inc))
            if now_inc != inc:
                continue
            if state not in L.STATE_NAMES:
                what = f"its slot {slot} holds state {state}, not a state"
            elif state == L.READY and not os.path.exists(path):
                what = f"its memory segment {path} is gone"
            else:
                continue
            name = slots.name_of(slot)
            slots.damaged(name, slot, inc, what)
            names.append(name)
    if derived_problems(buf, geo):  # a guess without the lock; confirmed under it
        with t.table_lock:
            problems = derived_problems(buf, geo)
            if problems:
                t.repair_derived("; ".join(problems))
    return names


def remove_namespace_orphans(t: Table) -> list[str]:
    """Remove objects of ``t``'s namespace that no live slot of ``t`` uses, and
    leftovers of other tables of the same namespace (crashed creations, unlinked
    tables)."""
    entries = _shm.namespace_objects(t.ns)  # list first, then read the live set
    if not entries:
        return []
    # No lock needed: a context's slot is claimed before any of its objects exist, its
    # incarnation written before its state, and its state never rewritten while in use
    # but by single stores of another state in use (see _layout, "Writing shared
    # fields"). So every object listed above belongs to an incarnation that reads as in
    # use here unless that context was closed since.
    t.check_usable()
    removed = remove_stale(t.ns, entries, t.tag, in_use_incarnations(t.buf, t.geo))
    if removed:
        log.info("namespace %r: removed %d orphaned object(s): %s", t.ns,
                 len(removed), ", ".join(removed))
    return removed


def in_use_incarnations(buf: memoryview, geo: L.Geometry) -> set[int]:
    """Incarnations of the slots in use, read without a lock (see
    ``remove_namespace_orphans`` for why that is safe)."""
    live: set[int] = set()
    for slot in range(geo.capacity):
        state, _rc, inc = L.S_CHECK.unpack_from(buf, geo.slot_off(slot))
        if state != L.FREE:
            live.add(inc)
    return live


def stale_objects(ns: str, entries: list[str], own_tag: str | None,
                  live_incs: set[int] | None) -> list[tuple[str, str]]:
    """The stale ones among ``entries`` (as listed by ``_shm.namespace_objects``), each
    with why it is stale.

    Objects of ``own_tag``: those of contexts whose incarnation is not in ``live_incs``
    (all of them when ``live_incs`` is None: the table is being removed). Objects of any
    other tag: unless they belong to the table now at the public name, or to a table
    still being built by a live creator (its staging object names the creator's pid).
    """
    public = _shm.public_tag(ns)
    parsed = [(e, _shm.parse_object(ns, e)) for e in entries]
    building = {p[0] for _e, p in parsed if p and p[1] == "new" and is_alive(p[2], 0)}
    out: list[tuple[str, str]] = []
    for entry, p in parsed:
        if p is None:
            continue
        tag, kind, inc = p
        if tag == own_tag:
            if live_incs is None:
                out.append((entry, "of the removed table"))
            elif kind in ("c", "l", "i") and inc not in live_incs:
                out.append((entry, f"no context of the table has incarnation {inc}"))
        elif tag != public and tag not in building:
            out.append((entry, "left by a table that is gone (crashed or unlinked)"))
    return out


def remove_stale(ns: str, entries: list[str], own_tag: str | None,
                 live_incs: set[int] | None) -> list[str]:
    """Remove what ``stale_objects`` finds stale; returns what was removed."""
    removed: list[str] = []
    for entry, _why in stale_objects(ns, entries, own_tag, live_incs):
        _shm.remove_host_object(entry)
        removed.append(entry)
    return removed


def sweep_round(slots: Slots) -> bool:
    """Sweep if this process leads (or can take the lead). Returns whether it leads.
    Either way, let go of this process's mappings of contexts closed meanwhile."""
    slots.mappings.prune()
    if not take_lead(slots):
        return False
    report = sweep_once(slots)
    if report:
        log.info("namespace %r sweep: closed %s, reclaimed %s, orphans removed %d (%.1f ms)",
                 slots.namespace, report.closed or "nothing", report.reclaimed or "nothing",
                 len(report.orphans_removed), report.duration * 1e3)
    return True


def _guarded(slots: Slots, action: Callable[[], bool]) -> bool | None:
    """Run one sweeper action; None means the manager is gone and the loop must end."""
    try:
        return action()
    except ContextManagerClosedError:
        return None
    except ContextError as e:
        log.error("namespace %r: sweep failed: %s", slots.namespace, e)
    except Exception:
        if slots.mappings.closed:
            return None
        log.exception("namespace %r: sweep failed", slots.namespace)
    return False


def run_sweeper(ref: weakref.ref[Slots], stop: threading.Event) -> None:
    """Body of a manager's sweeper thread: claim the lead at once if nobody live holds
    it, then sweep every ``cleanup_interval`` (standing by while another process leads).
    Holds only a weak reference between rounds, so an abandoned manager (whose slot
    operations go with it) can be freed."""
    slots = ref()
    if slots is None or _guarded(slots, partial(take_lead, slots)) is None:
        return
    interval = slots.table.config.cleanup_interval
    del slots
    while not stop.wait(interval):
        current = ref()
        if current is None or current.mappings.closed or \
                _guarded(current, partial(sweep_round, current)) is None:
            return
        del current


def supervise(slots: Slots, stop: threading.Event, interval: float | None = None) -> None:
    """Run the sweeper loop in the calling thread until ``stop`` is set: sweep at once,
    then every ``interval`` seconds (``ContextManager.supervise``)."""
    interval = interval or slots.table.config.cleanup_interval or 1.0
    leading = False
    while not stop.is_set():
        now_leading = _guarded(slots, partial(sweep_round, slots))
        if now_leading is None:
            return
        if now_leading != leading:
            log.info("namespace %r: pid %d %s the sweep", slots.namespace, identity.pid,
                     "leads" if now_leading else "stands by; another live process leads")
        leading = now_leading
        stop.wait(interval)
