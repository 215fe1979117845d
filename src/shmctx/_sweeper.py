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
import time
import weakref
from time import monotonic
from typing import TYPE_CHECKING, Optional

from . import _failpoints, _layout as L, _shm
from ._context import SweepReport
from ._errors import ContextError, ContextManagerClosedError
from ._proc import identity, is_alive

if TYPE_CHECKING:
    from ._manager import ContextManager

log = logging.getLogger("shmctx.sweeper")

# Objects of another table's tag are removed only once they are this old: a table being
# created right now (under its staging name) is never mistaken for leftovers.
_FOREIGN_GRACE = 30.0


def take_lead(m: "ContextManager") -> bool:
    """Become (or stay) the namespace's sweeper leader, unless a live process leads."""
    t = m._table
    with t.table_lock:
        t.check_usable()
        pid, _f, start, _beat = t.sweeper()
        me = (identity.pid, identity.start)
        if (pid, start) != me:
            if pid and is_alive(pid, start):
                return False
            if pid:
                log.warning("namespace %r: sweeper pid %d is dead; pid %d takes the lead",
                            m.namespace, pid, identity.pid)
            if _failpoints.armed:
                _failpoints.hit("sweep.leader_taken")
        t.set_sweeper(identity.pid, identity.start, monotonic())
        return True


def sweep_once(m: "ContextManager") -> SweepReport:
    began = monotonic()
    report = SweepReport()
    t = m._table
    buf, geo = m._buf, m._geo
    with t.table_lock:
        t.check_usable()
        report.reclaimed = m._reclaim_dead_locked()
    idle_limit = m.config.max_idle_time
    if idle_limit > 0:
        now = monotonic()
        candidates = []
        for slot in range(geo.capacity):
            so = geo.slot_off(slot)
            state, rc, inc = L.S_CHECK.unpack_from(buf, so)
            if state == L.READY and rc == 0 and \
                    now - L.S_LAST_USED.unpack_from(buf, so + L.S_LAST_USED_OFF)[0] > idle_limit:
                candidates.append((slot, inc))
        for slot, inc in candidates:
            with t.table_lock:
                so = geo.slot_off(slot)
                state, rc, cur = L.S_CHECK.unpack_from(buf, so)
                last = L.S_LAST_USED.unpack_from(buf, so + L.S_LAST_USED_OFF)[0]
                if state != L.READY or cur != inc or rc or monotonic() - last <= idle_limit:
                    continue
                tree = m._subtree(slot)
                names = [t.slot_name(s).decode("utf-8", "replace") for s in tree]
                if any(L.S_CHECK.unpack_from(buf, geo.slot_off(s))[1] for s in tree):
                    report.skipped_in_use.append(names[-1])
                    continue
                for s in tree:
                    m._free_slot(s)
                report.closed.extend(names)
    report.orphans_removed = remove_namespace_orphans(m)
    report.duration = monotonic() - began
    return report


def remove_namespace_orphans(m: "ContextManager") -> list[str]:
    """Remove objects of the namespace that no live slot of our table uses, and objects
    of other (dead) tables of the same namespace."""
    t = m._table
    entries = _shm.namespace_objects(m.namespace)  # list first, then read the live set
    if not entries:
        return []
    with t.table_lock:
        t.check_usable()
        live = set()
        for slot in range(m._geo.capacity):
            state, _rc, inc = L.S_CHECK.unpack_from(m._buf, m._geo.slot_off(slot))
            if state != L.FREE:
                live.add(inc)
    now = time.time()
    removed = []
    for entry in entries:
        parsed = _shm.parse_object(m.namespace, entry)
        if parsed is None:
            continue
        tag, kind, inc = parsed
        if tag == t.tag:
            doomed = kind in ("c", "l", "i") and inc not in live
        else:
            try:
                age = now - os.stat(os.path.join(_shm.SHM_DIR, entry)).st_ctime
            except FileNotFoundError:
                continue
            doomed = age > _FOREIGN_GRACE
        if doomed:
            _shm.remove_host_object(entry)
            removed.append(entry)
    if removed:
        log.info("namespace %r: removed %d orphaned object(s): %s", m.namespace,
                 len(removed), ", ".join(removed))
    return removed


def run_sweeper(ref: "weakref.ref[ContextManager]", stop: threading.Event) -> None:
    """Body of the sweeper thread: lead if nobody live leads, sweep every interval."""
    first = True
    while True:
        m = ref()
        if m is None or m._closed:
            return
        interval = m.config.cleanup_interval
        try:
            if take_lead(m):
                if not first:
                    report = sweep_once(m)
                    if report:
                        log.info("namespace %r sweep: closed %s, reclaimed %s, orphans %d "
                                 "(%.1f ms)", m.namespace, report.closed or "nothing",
                                 report.reclaimed or "nothing", len(report.orphans_removed),
                                 report.duration * 1e3)
        except ContextManagerClosedError:
            return
        except ContextError as e:
            log.error("namespace %r: sweep failed: %s", m.namespace, e)
        except Exception:
            if m._closed:
                return
            log.exception("namespace %r: sweep failed", m.namespace)
        first = False
        del m
        if stop.wait(interval):
            return


def supervise(m: "ContextManager", stop: threading.Event,
              interval: Optional[float] = None) -> None:
    """Run the sweeper loop in the calling thread until ``stop`` is set (used by
    ``ctx-supervisor``): sweep at once, then every ``interval`` seconds."""
    interval = interval or m.config.cleanup_interval or 1.0
    leading = False
    while not stop.is_set():
        try:
            if take_lead(m):
                if not leading:
                    log.info("namespace %r: pid %d leads the sweep", m.namespace, identity.pid)
                leading = True
                report = sweep_once(m)
                if report:
                    log.info("sweep: closed %s, reclaimed %s, orphans removed %d (%.1f ms)",
                             report.closed or "nothing", report.reclaimed or "nothing",
                             len(report.orphans_removed), report.duration * 1e3)
            elif leading:
                log.warning("namespace %r: another live process leads the sweep", m.namespace)
                leading = False
        except ContextManagerClosedError:
            return
        except ContextError as e:
            log.error("sweep failed: %s", e)
        stop.wait(interval)
