"""The operations on context slots, each under the locks it needs: take and give back a
reference, claim a slot, publish a created context, wait for another process's init,
close, evict, remove a dead process's half-made context, reclaim a dead process's
references, recover locks of dead owners.

Which lock each needs is said at each method ("Needs the table lock"); the locks and
their order are in docs/architecture.md, "Locks and their order". The manager (the
public API), the cold path, the sweeper and ctx-inspect's garbage collection all act on
slots only through these.
"""

from __future__ import annotations

import logging
import time
from time import monotonic

import posix_ipc

from . import _failpoints, _payload, _shm
from . import _layout as L
from ._config import MemoryContextConfig
from ._context import _Mapped
from ._entry import ProcessEntry, reclaim_entry
from ._errors import (
    ContextClosedError,
    ContextError,
    ContextInUseError,
    ContextNotFoundError,
    ForeignObjectError,
    InvalidConfigError,
    InvalidContextTypeError,
    MaxReferencesReachedError,
    TableFullError,
)
from ._lock import RobustLock, wait_and_look
from ._mappings import Mappings
from ._proc import identity
from ._table import Table, name_hash

log = logging.getLogger("shmctx")

__all__ = ["Slots", "check_name"]


def check_name(name: object) -> bytes:
    """``name`` as the UTF-8 bytes the table stores, or ``InvalidContextTypeError``."""
    if not isinstance(name, str):
        raise InvalidContextTypeError(f"context name must be a str, not {type(name).__name__}")
    if not name:
        raise InvalidContextTypeError("context name must not be empty")
    if "\0" in name:
        raise InvalidContextTypeError(f"context name {name!r} contains a NUL character")
    try:
        name_b = name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidContextTypeError(f"context name {name!r} is not valid UTF-8: {e}") from None
    if len(name_b) > L.NAME_MAX:
        raise InvalidContextTypeError(
            f"context name {name[:40]!r}... is {len(name_b)} UTF-8 bytes; the limit is "
            f"{L.NAME_MAX}"
        )
    return name_b


class Slots:
    """The slot operations of one manager: its table, its process entry (whose records
    every reference change books) and its mappings (which a close makes stale)."""

    def __init__(self, table: Table, entry: ProcessEntry, mappings: Mappings) -> None:
        self.table = table
        self.entry = entry
        self.mappings = mappings
        self.namespace = table.ns
        self.max_refs = table.config.max_references
        # (slot, incarnation) -> the thread running that context's init, in this process
        self.initialising: dict[tuple[int, int], int] = {}

    def name_of(self, slot: int) -> str:
        return self.table.slot_name(slot).decode("utf-8", "replace")

    # --- references (under the slot's stripe lock) ---------------------------------

    def add_ref(self, slot: int, so: int, rc: int) -> None:
        """Count one more reference of ours to ``slot`` (whose refcount was ``rc``):
        the per-process count first, the derived refcount second (get, steps G5-G6).
        Needs its stripe lock. The Python hot path does the same inline."""
        self.entry.count(slot, 1)
        if _failpoints.armed:
            _failpoints.hit("acquire.proc_counted")
        self.table.words.put32(so + L.S_REFCOUNT_OFF, rc + 1)

    def uncount(self, m: _Mapped) -> bool:
        """Give back one reference of ours to ``m``'s context and stamp its last use
        (return, steps R3-R5); False if it was closed since (there is nothing to give
        back). Needs its stripe lock."""
        t = self.table
        so = m.off
        state, rc, inc = L.S_CHECK.unpack_from(t.buf, so)
        if inc != m.inc or state == L.FREE or not self.entry.count(m.slot, -1):
            return False
        if _failpoints.armed:
            _failpoints.hit("return.proc_counted")
        w = t.words
        w.u32[(so + L.S_REFCOUNT_OFF) >> 2] = rc - 1 if rc else 0
        w.f64[(so + L.S_LAST_USED_OFF) >> 3] = monotonic()
        return True

    def take_ref(self, name: str, slot: int, inc: int) -> None:
        """One more reference of ours to the ready context in ``slot``, within
        ``max_references``. Needs the table lock (so the state cannot move)."""
        t = self.table
        so = t.geo.slot_off(slot)
        with t.stripe_of(slot):
            rc = L.SLOT["refcount"].read(t.buf, so)
            if self.max_refs and rc >= self.max_refs:
                raise MaxReferencesReachedError(
                    f"context {name!r} in namespace {self.namespace!r} already holds "
                    f"{rc} references (max_references={self.max_refs})"
                )
            self.add_ref(slot, so, rc)

    def undo_ref(self, slot: int, inc: int) -> None:
        """Give back a reference counted for a handle that was never made."""
        t = self.table
        so = t.geo.slot_off(slot)
        with t.stripe_of(slot):
            state, rc, cur = L.S_CHECK.unpack_from(t.buf, so)
            if cur == inc and state != L.FREE and self.entry.count(slot, -1):
                t.words.put32(so + L.S_REFCOUNT_OFF, max(0, rc - 1))

    def return_dropped(self) -> None:
        """Give back the references of handles garbage-collected without being returned
        (queued by their finalizer, ``MemoryContext.__del__``). Called where this thread
        holds no lock: at the start of the cold path, a Python get or return and a
        sweep."""
        dropped = self.mappings.dropped
        while dropped:
            try:
                m, pid = dropped.pop()
            except IndexError:
                return  # another thread took the last one
            if pid != identity.pid or self.mappings.closed:
                continue  # inherited over fork: the parent's reference, not ours
            with m.stripe:
                self.uncount(m)  # False: closed meanwhile, nothing left to give back
            self.after_return(m)

    def after_return(self, m: _Mapped) -> None:
        """A reference to ``m``'s context was just given back (no lock held): if the
        context is a superseded version, it goes with its last reference, now rather than
        at the next sweep (return, step R7)."""
        if self.table.buf[m.off + 1] & L.SLOT_SUPERSEDED:
            with self.table.table_lock:
                self.free_superseded(m.slot, m.inc)

    def free_superseded(self, slot: int, inc: int) -> bool:
        """Close ``slot`` if it still holds ``inc`` as a superseded version that nothing
        references (nor any context whose parent it is). Needs the table lock."""
        t = self.table
        f = t.read_slot(slot)
        if f.state != L.READY or f.incarnation != inc or not f.flags & L.SLOT_SUPERSEDED \
                or f.refcount:
            return False
        if self.close(self.subtree(slot), force=False) >= 0:
            return False
        # Its parent may be a superseded version that waited only for its children.
        parent = f.parent - 1
        if 0 <= parent < t.geo.capacity:
            pf = t.read_slot(parent)
            if pf.incarnation == f.parent_inc:
                self.free_superseded(parent, pf.incarnation)
        return True

    # --- looking up (under the table lock) -------------------------------------------

    def check_config(self, name: str, f: L.Slot, config: MemoryContextConfig) -> None:
        """``InvalidConfigError`` if ``config`` is not the existing context's. An array's
        shape and dtype are in its memory, not in the slot: compared once it is mapped
        (``ColdPath``), and its size, which follows from them, not here."""
        problems: list[str] = []
        if f.kind != config.kind:
            problems.append(f"type: requested {_payload.KIND_NAMES[config.kind]} != existing "
                            f"{_payload.KIND_NAMES.get(f.kind, f.kind)}")
        elif f.kind != L.KIND_ARRAY and f.size != config.size:
            problems.append(f"size: requested {config.size} != existing {f.size}")
        existing_parent = self.parent_name(f)
        if config.parent != existing_parent:
            problems.append(f"parent: requested {config.parent!r} != existing {existing_parent!r}")
        if problems:
            raise InvalidConfigError(
                f"context {name!r} in namespace {self.namespace!r} exists with another "
                f"configuration: {'; '.join(problems)}"
            )

    def parent_name(self, f: L.Slot) -> str | None:
        """Name of the live parent of a slot read with ``read_slot``. Needs the table lock."""
        parent, parent_inc = f.parent, f.parent_inc
        if not parent or parent > self.table.geo.capacity:
            return None
        pf = self.table.read_slot(parent - 1)
        if pf.state == L.FREE or pf.incarnation != parent_inc:
            return None
        return self.name_of(parent - 1)

    def damaged(self, name: str, slot: int, inc: int, what: str) -> ContextError:
        """Close the damaged context in ``slot`` (incarnation ``inc``) and return the
        error that says so. Needs the table lock.

        A segment is only ever unlinked after its slot is freed, and a state byte is only
        ever one of three values, so a ready slot without its memory, or a slot in no
        state, is damage from outside: looking again would find it again, forever. It is
        closed (as ``force`` does: handles become invalid; processes that mapped it keep
        their mapping until they let go), so that the next get_or_create_context makes
        the context afresh. Its data is lost either way."""
        log.warning("namespace %r: context %r is damaged: %s; closing it", self.namespace,
                    name, what)
        self.close([slot], force=True)
        return ContextError(
            f"context {name!r} in namespace {self.namespace!r} (incarnation {inc}) is "
            f"damaged: {what}. Its data is lost; it was closed, and get_or_create_context "
            "creates it afresh"
        )

    # --- creating -------------------------------------------------------------------

    def claim(self, name: str, name_b: bytes, h: int, cfg: MemoryContextConfig,
              kind: int, claims: list[tuple[int, int]], pending: bool = False) -> None:
        """Claim a slot for a new context in CREATING state, with one reference of ours;
        ``kind`` says what its memory will hold. ``pending``: a new version of ``name``
        for ``publish``, kept out of the name index (so no get finds it) until
        ``switch`` makes it current. Needs the table lock.

        The claim, ``(slot, incarnation)``, is appended to the caller's ``claims`` as
        soon as the slot is written, not returned: an exception (a signal handler's)
        landing anywhere after that still finds it there, and the caller removes the
        claim (``abort_create``) unless it was published."""
        t = self.table
        geo, buf = t.geo, t.buf
        parent_slot, parent_inc = -1, 0
        if cfg.parent is not None:
            try:
                pb = check_name(cfg.parent)
            except InvalidContextTypeError as e:
                raise InvalidConfigError(f"parent of {name!r}: {e}") from None
            parent_slot = t.find(pb, name_hash(pb))
            if parent_slot < 0 or \
                    L.SLOT["state"].read(buf, geo.slot_off(parent_slot)) != L.READY:
                raise ContextNotFoundError(
                    f"parent context {cfg.parent!r} of {name!r} does not exist in namespace "
                    f"{self.namespace!r}"
                )
            parent_inc = L.SLOT["incarnation"].read(buf, geo.slot_off(parent_slot))
        # The live count and the free list are derived data: one damaged byte of either
        # must not make every create evict an unrelated context. Only the slots' own
        # states decide that the table is full; derived data found to disagree with them
        # is rebuilt (under the table lock, held here) before anything is evicted.
        live = t.live_count()
        if live >= geo.capacity and t.has_free_slot():
            t.repair_derived(f"the live count ({live}) says the table is full, yet a slot "
                             "is free")
        slot = t.pop_free()
        if slot < 0 and t.has_free_slot():
            t.repair_derived("the free list is missing slots that are free")
            # By the slots themselves if the rebuilt list fails too (a stray write from
            # outside during the rebuild): never evict, or say full, while a slot is free.
            slot = t.pop_free()
            if slot < 0:
                slot = t.first_free_slot()
        if slot < 0:
            # Never the parent the new context names, which would go as the new context
            # takes its place; nor, for a new version, the current one, which would leave
            # the name without a version (a get in between would create an empty one).
            self.evict_lru(name, spare=(parent_slot, t.find(name_b, h) if pending else -1))
            slot = t.pop_free()
            if slot < 0:
                raise TableFullError(f"namespace {self.namespace!r}: no free slot for {name!r}")
        inc = t.next_incarnation()
        so = geo.slot_off(slot)
        # What the claim has counted so far, for the undo below: an interrupt (a signal
        # handler raising) may land between any two of these steps.
        live = child = False
        try:
            with t.stripe_of(slot):
                # Every field but the state first, the state byte last and alone: a reader
                # without the lock (the orphan sweep) that sees the slot in use sees its
                # incarnation too.
                t.words.store(so, L.SLOT_ALL, *L.Slot(
                    state=L.FREE, flags=L.SLOT_PENDING if pending else 0,
                    name_len=len(name_b), refcount=0,
                    incarnation=inc, name_hash=h, size=cfg.size, parent=parent_slot + 1,
                    next_free=0, parent_inc=parent_inc, created=time.time(),
                    last_used=monotonic(), creator_pid=identity.pid, children=0,
                    creator_start=identity.start, lock_pid=0, lock_epoch=0, lock_start=0,
                    name=name_b, kind=kind, version=0 if pending else 1,
                ))
                t.words.put8(so, L.CREATING)
                claims.append((slot, inc))
                if _failpoints.armed:
                    _failpoints.hit("create.slot_claimed")
                self.add_ref(slot, so, 0)
            if not pending:
                t.index_insert(slot, h)
            t.add_live(1)
            live = True
            if parent_slot >= 0:
                self._add_child(parent_slot, 1)
                child = True
        except BaseException:
            # Give the slot back rather than leave a CREATING slot that no index entry,
            # waiter or sweep would ever find while we live.
            if L.SLOT["state"].read(buf, so) == L.FREE:
                t.push_free(slot)  # failed before it was written
            else:
                if not live:
                    t.add_live(1)  # close counts it out again
                if parent_slot >= 0 and not child:
                    self._add_child(parent_slot, 1)  # and this too
                self.close([slot], force=True)
            raise

    def _add_child(self, parent: int, delta: int) -> None:
        t = self.table
        off = t.geo.slot_off(parent) + L.S_CHILDREN_OFF
        n = L.S_CHILDREN.unpack_from(t.buf, off)[0]
        t.words.put32(off, max(0, n + delta))

    def evict_lru(self, for_name: str, spare: tuple[int, ...] = ()) -> None:
        """Close the least recently used context with no references and no children, to
        make room; never the slots in ``spare``. Needs the table lock."""
        t = self.table
        buf, geo = t.buf, t.geo
        candidates: list[tuple[float, int]] = []  # (last used, slot)
        for slot in range(geo.capacity):
            so = geo.slot_off(slot)
            state, rc, _inc = L.S_CHECK.unpack_from(buf, so)
            if state == L.READY and rc == 0 and slot not in spare and \
                    not L.S_CHILDREN.unpack_from(buf, so + L.S_CHILDREN_OFF)[0]:
                candidates.append((L.S_LAST_USED.unpack_from(buf, so + L.S_LAST_USED_OFF)[0],
                                   slot))
        for _used, slot in sorted(candidates):
            name = self.name_of(slot)
            if self.close([slot], force=False) < 0:  # unless referenced meanwhile
                log.info("namespace %r full: evicted least recently used context %r",
                         self.namespace, name)
                return
        raise TableFullError(
            f"namespace {self.namespace!r} is full ({geo.capacity} contexts, all referenced "
            f"or parents); cannot create {for_name!r}"
        )

    def publish(self, name: str, slot: int, inc: int, m: _Mapped, version: int = 0) -> None:
        """Make the context this process created in ``slot`` ready, and wake the
        processes waiting for it. Needs no lock held (takes the stripe lock: publishing
        changes neither the index nor the free list). ``ContextClosedError`` if it was
        force-closed meanwhile. The slot's size becomes ``m.size``: an object's is known
        only once it is pickled, after the claim. ``version``: a pending version's
        number (``switch``), written with it, and the pending flag cleared."""
        t = self.table
        so = t.geo.slot_off(slot)
        with t.stripe_of(slot):
            state, _rc, cur = L.S_CHECK.unpack_from(t.buf, so)
            if cur != inc or state != L.CREATING:
                m.unmap()
                if m.size:  # made after the force close, so nobody else will unlink it
                    _shm.unlink_segment(t.segment(slot, inc))
                raise ContextClosedError(
                    f"context {name!r} was force-closed while it was being created"
                )
            flags = L.SLOT["flags"].read(t.buf, so)
            w = t.words
            # Before the state: a process that sees READY (under the table lock, or
            # none) reads the size it maps after it.
            w.put64(so + L.SLOT.off("size"), m.size)
            w.putf(so + L.S_LAST_USED_OFF, monotonic())
            if version:
                w.put32(so + L.SLOT.off("version"), version)
            w.put8(so + 1, flags & ~(L.SLOT_WAITERS | L.SLOT_PENDING))
            w.put8(so, L.READY)  # a byte of its own: readers without the lock watch it
            if flags & L.SLOT_WAITERS:
                _wake_waiters(_shm.init_sem_name(self.namespace, t.tag, inc))

    def switch(self, name: str, name_b: bytes, slot: int, inc: int, m: _Mapped) -> int:
        """Make the version this process built in ``slot`` (claimed ``pending``) the
        current one of ``name``: its version number is the current one's plus one (1 if
        there is none), the name index points at it, and the version it replaces is
        marked superseded (freed at once if nothing references it, else with its last
        reference). Returns the version. Needs the table lock; ``ContextClosedError`` if
        the pending version was force-closed meanwhile.

        Gets take the index's slot under the table lock (cold path) or check the
        superseded flag under the slot's stripe lock (hot path), so once this returns
        every get finds the new version."""
        t = self.table
        h = name_hash(name_b)
        old = t.find(name_b, h)
        version = 1 if old < 0 else L.SLOT["version"].read(t.buf, t.geo.slot_off(old)) + 1
        if version > 0xFFFF_FFFF:  # a u32: only a damaged slot gets there
            raise ContextError(f"context {name!r} in namespace {self.namespace!r}: its "
                               "version number cannot grow (damaged slot?); close it first")
        # The order keeps the table sound for whoever takes the table lock over if this
        # process dies half way: the new version is ready (with its number) before the
        # index points at it, and the old one is marked superseded after. A repair that
        # finds two current-looking versions of a name keeps the higher number current
        # and marks the other superseded (Table.repair_table), as if the switch had
        # completed.
        self.publish(name, slot, inc, m, version)
        if _failpoints.armed:
            _failpoints.hit("publish.new_ready")
        if old < 0:
            t.index_insert(slot, h)
            return version
        t.index_replace(old, slot, h)
        # The old version may still be being created (a publish overtook the name's
        # first get-or-create): it is superseded all the same, and its creator publishes
        # it so; it goes with its last reference like any other.
        self.supersede(old)
        return version

    def supersede(self, slot: int) -> None:
        """Mark ``slot``'s version superseded, and with it the contexts made with it as
        their parent (they belong to that version: they go with it, and a get of their
        names finds nothing until they are made anew, under the current version); free
        what nothing references. A child that is itself a version being published is
        left alone. Needs the table lock."""
        t = self.table
        buf = t.buf
        tree = [s for s in self.subtree(slot)  # children first
                if s == slot or not buf[t.geo.slot_off(s) + 1] & L.SLOT_PENDING]
        done: list[tuple[int, int]] = []  # (slot, incarnation)
        for s in tree:
            so = t.geo.slot_off(s)
            f = t.read_slot(s)
            if f.flags & L.SLOT_SUPERSEDED:
                continue
            if s != slot:
                t.index_remove(s, f.name_hash)  # the name's current one: no longer
            with t.stripe_of(s):
                t.words.put8(so + 1, buf[so + 1] | L.SLOT_SUPERSEDED)
            # This process's next get of the name maps whatever is current then.
            self.mappings.forget(self.name_of(s), f.incarnation)
            done.append((s, f.incarnation))
        for s, inc in done:  # children first: a parent goes once its children have
            self.free_superseded(s, inc)

    def settle(self, name: str, name_b: bytes, slot: int, inc: int) -> bool:
        """Complete a ``switch`` that an exception interrupted after the new version in
        ``slot`` was made ready: of the versions of ``name`` that look current (in no
        flag), the highest-numbered one goes in the index and the others are superseded
        (freed if nothing references them). False (nothing done) if ``slot`` is no
        longer ``inc`` ready. Scans every slot: for that rare case only. Needs the table
        lock."""
        t = self.table
        geo = t.geo
        f = t.read_slot(slot)
        if f.state != L.READY or f.incarnation != inc or f.flags & L.UNINDEXED:
            return False
        h = name_hash(name_b)
        versions = t.newest_first([
            s for s in range(geo.capacity)
            if (g := t.read_slot(s)).state in (L.CREATING, L.READY)
            and not g.flags & L.UNINDEXED and g.name_hash == h and t.slot_name(s) == name_b])
        top = versions[0]
        cur = t.find(name_b, h)
        if cur != top:
            if cur < 0:
                t.index_insert(top, h)
            else:
                t.index_replace(cur, top, h)
        for s in versions[1:]:
            self.supersede(s)
        return True

    def abort_create(self, name: str, slot: int, inc: int) -> None:
        """Remove the context this process failed to create."""
        t = self.table
        self.mappings.forget(name, inc)
        with t.table_lock:
            f = t.read_slot(slot)
            if f.state == L.CREATING and f.incarnation == inc:
                self.close([slot], force=True)

    def register_waiter(self, slot: int, inc: int) -> posix_ipc.Semaphore | None:
        """Mark ``slot`` as waited on and open its init semaphore; None if it is no longer
        being created as ``inc``. The creator publishes under the stripe lock alone, so the
        state is checked again under it."""
        t = self.table
        so = t.geo.slot_off(slot)
        with t.stripe_of(slot):
            state, flags = L.S_STATE.unpack_from(t.buf, so)
            if state != L.CREATING or L.S_INC.unpack_from(t.buf, so + L.S_INC_OFF)[0] != inc:
                return None
            # Opened before the flag is set: if it cannot be (another user's object is in
            # the way, no descriptor left), the creator has nothing to post.
            sem = _shm.open_semaphore(
                _shm.init_sem_name(self.namespace, t.tag, inc), t.mode,
                create=True, initial=0, trusted=t.trusted,
                what=f"the init semaphore of a context in namespace {self.namespace!r}",
            )
            # The flags byte alone: the state byte is read without a lock (the orphan
            # sweep), and must never be seen rewritten.
            t.words.put8(so + 1, flags | L.SLOT_WAITERS)
            return sem

    def wait_for_init(self, name: str, slot: int, inc: int, sem: posix_ipc.Semaphore,
                      deadline: float | None, timeout: float | None) -> None:
        """Wait until the creation of ``slot``'s context ``inc`` is over (published,
        removed, or its creator found dead and its half-made context removed)."""
        t = self.table
        so = t.geo.slot_off(slot)

        def look() -> bool:
            """After each lock_timeout of waiting: is the creation over, or its creator
            dead (then remove the half-made context and look up the name again)?"""
            f = L.Slot.read(t.buf, so)
            if f.state != L.CREATING or f.incarnation != inc:
                return True
            if not t.liveness.owner_alive(f.creator_pid, f.creator_start):
                with t.table_lock:
                    self.remove_dead_creation(slot, inc)
                return True
            return False

        try:
            lt = t.config.lock_timeout
            if wait_and_look(sem, deadline, lt, lt, look,
                             f"timed out after {timeout}s waiting for context {name!r} in "
                             f"namespace {self.namespace!r} to be initialised"):
                state, _rc, now_inc = L.S_CHECK.unpack_from(t.buf, so)
                if state != L.CREATING or now_inc != inc:
                    sem.release()  # pass the baton to the next waiter
                # Else nobody published or closed it: a stray post (or a damaged slot).
                # Absorbed here, or every waiter would wake the next at once, forever;
                # the caller looks again and waits anew.
        finally:
            sem.close()

    # --- closing (under the table lock) ---------------------------------------------

    def subtree(self, slot: int) -> list[int]:
        """``slot`` and its descendants, children before parents. Needs the table lock."""
        t = self.table
        off = t.geo.slot_off(slot) + L.S_CHILDREN_OFF
        if not L.S_CHILDREN.unpack_from(t.buf, off)[0]:
            return [slot]  # a leaf, the common case: no scan of the table
        children = t.children()
        order: list[int] = []
        stack = [slot]
        seen: set[int] = set()
        while stack:
            s = stack.pop()
            if s in seen:
                continue
            seen.add(s)
            order.append(s)
            stack.extend(children.get(s, ()))
        return order[::-1]

    def close(self, slots: list[int], *, force: bool, idle_limit: float = 0.0) -> int:
        """Close the contexts in ``slots`` (a subtree, children first): clear every
        reference to them, mark them free, remove them from the index and free list, wake
        their init waiters, unlink their objects. Needs the table lock.

        Unless ``force``, nothing is closed if one of them holds a reference (or, with
        ``idle_limit``, was returned within that many seconds); that slot is returned,
        else -1. The check is made with the slots' stripe locks all held (taken in
        ascending order): the hot path takes references under a stripe lock alone, so a
        check under the table lock only could close a context referenced a moment later.
        """
        t = self.table
        buf, geo = t.buf, t.geo
        held: list[RobustLock] = []
        try:
            for k in sorted({s % geo.stripes for s in slots}):
                t.stripe_locks[k].acquire()
                held.append(t.stripe_locks[k])
            if not force:
                now = monotonic()
                for s in slots:
                    so = geo.slot_off(s)
                    last = L.S_LAST_USED.unpack_from(buf, so + L.S_LAST_USED_OFF)[0]
                    in_use = L.SLOT["refcount"].read(buf, so)
                    if in_use or (idle_limit and now - last <= idle_limit):
                        return s
            freed = [self._free_slot_state(s) for s in slots]
        finally:
            for lock in reversed(held):
                lock.release()
        for f in freed:
            if f is not None:
                self._free_slot_rest(*f)
        return -1

    def close_named(self, name: str, name_b: bytes, force: bool) -> None:
        """``close_context``: close context ``name`` and its children. Needs the table
        lock."""
        t = self.table
        t.check_usable()
        slot = t.find(name_b, name_hash(name_b))
        if slot < 0:
            raise ContextNotFoundError(f"no context {name!r} in namespace {self.namespace!r}")
        busy = self.close(self.subtree(slot), force=force)
        if busy >= 0:
            which = "it" if busy == slot else f"its child {self.name_of(busy)!r}"
            raise ContextInUseError(
                f"context {name!r} in namespace {self.namespace!r}: {which} still has "
                "references; pass force=True to close anyway"
            )

    def close_all(self) -> None:
        """Close every context, referenced or not (unlink). Needs the table lock."""
        t = self.table
        for slot in range(t.geo.capacity):
            if L.SLOT["state"].read(t.buf, t.geo.slot_off(slot)) != L.FREE:
                self.close([slot], force=True)

    def close_idle(self, slot: int, inc: int, idle_limit: float) -> tuple[list[str], bool]:
        """Close ``slot``'s context (incarnation ``inc``) and its subtree if the whole
        subtree is unreferenced and idle for ``idle_limit`` seconds, checked under its
        stripe locks (a worker may have taken a reference since the sweep planned it).
        Returns the names of the subtree, children first, and whether it was closed.
        Needs the table lock."""
        state, _rc, cur = L.S_CHECK.unpack_from(self.table.buf, self.table.geo.slot_off(slot))
        if state != L.READY or cur != inc:
            return [], False
        tree = self.subtree(slot)
        names = [self.name_of(s) for s in tree]
        return names, self.close(tree, force=False, idle_limit=idle_limit) < 0

    def _free_slot_state(self, slot: int) -> tuple[int, int, int, int, int, int] | None:
        """The part of closing a slot that needs its stripe lock (held by the caller)."""
        t = self.table
        buf, geo = t.buf, t.geo
        so = geo.slot_off(slot)
        state, flags, _n, _rc, inc, h = L.S_HEAD.unpack_from(buf, so)
        if state == L.FREE:
            return None
        size, parent, _nf, parent_inc, _c, _u = L.S_BODY.unpack_from(buf, so + L.S_BODY_OFF)
        t.clear_column(slot)  # every process's count for it
        w = t.words
        w.put8(so, L.FREE)
        w.put8(so + 1, 0)
        w.put32(so + L.S_REFCOUNT_OFF, 0)
        if _failpoints.armed:
            _failpoints.hit("close.state_freed")
        if flags & L.SLOT_WAITERS:
            _wake_waiters(_shm.init_sem_name(self.namespace, t.tag, inc))
        if flags & L.SLOT_LOCK:
            _shm.unlink_semaphore(_shm.ctx_lock_name(self.namespace, t.tag, inc))
        return slot, inc, h, size, parent, parent_inc

    def _free_slot_rest(self, slot: int, inc: int, h: int, size: int, parent: int,
                        parent_inc: int) -> None:
        """The part of closing a slot that needs only the table lock."""
        t = self.table
        buf, geo = t.buf, t.geo
        t.index_remove(slot, h)
        if _failpoints.armed:
            _failpoints.hit("close.index_removed")
        t.push_free(slot)
        t.add_live(-1)
        if parent and parent <= geo.capacity and \
                L.S_INC.unpack_from(buf, geo.slot_off(parent - 1) + L.S_INC_OFF)[0] == parent_inc:
            self._add_child(parent - 1, -1)
        if size:
            _shm.unlink_segment(t.segment(slot, inc))
        # This process's own mapping of it leaves the cache (and goes with the last
        # handle using it).
        self.mappings.forget(self.name_of(slot), inc)

    # --- dead processes ---------------------------------------------------------------

    def remove_dead_creation(self, slot: int, inc: int) -> bool:
        """Free ``slot`` if it is still being created as ``inc`` by a process that died.
        Needs the table lock."""
        t = self.table
        f = t.read_slot(slot)
        if f.state != L.CREATING or f.incarnation != inc or \
                t.liveness.owner_alive(f.creator_pid, f.creator_start):
            return False
        log.warning("namespace %r: context %r: creator pid %d died during init; removing "
                    "the half-made context", self.namespace, self.name_of(slot),
                    f.creator_pid)
        self.close([slot], force=True)
        return True

    def remove_dead_creations(self) -> None:
        """``remove_dead_creation`` for every slot a dead process was creating, each
        under a short hold of the table lock. Needs no lock held."""
        t = self.table
        for slot, inc in t.dead_creations():
            with t.table_lock:
                self.remove_dead_creation(slot, inc)

    def recover_dead_locks(self) -> int:
        """Recover every lock of the namespace whose recorded owner is dead. Needs no
        lock held. Returns how many were recovered."""
        t = self.table
        buf, geo = t.buf, t.geo
        # And those this process left held (an interrupt between taking one and its
        # try): safe to ask with one held by the caller, whose frame is on its stack.
        n = sum(lock.recover_if_owner_dead() or lock.recover_leaked()
                for lock in [t.table_lock, *t.stripe_locks])
        for slot in range(geo.capacity):
            so = geo.slot_off(slot)
            pid, _epoch, start = L.LOCK.unpack_from(buf, so + L.S_LOCK_OFF)
            state, _rc, inc = L.S_CHECK.unpack_from(buf, so)
            if state == L.FREE or not pid or t.liveness.owner_alive(pid, start):
                continue
            try:
                sem = _shm.open_semaphore(_shm.ctx_lock_name(self.namespace, t.tag, inc),
                                          t.mode, False, trusted=t.trusted)
            except (posix_ipc.ExistentialError, ForeignObjectError):
                continue  # not ours to post: nothing of ours waits on another user's
            mappings = self.mappings
            try:
                # The lock object owns the semaphore: closed when it goes, right after.
                m = mappings.mapping(self.name_of(slot), slot, inc, 0, None, None)
                n += mappings.context_lock(m, sem).recover_if_owner_dead()
            except ContextClosedError:
                pass
        return n

    def reclaim_dead(self, *, locked: bool) -> dict[int, int]:
        """Reclaim every dead process entry; returns {pid: references released}.

        ``locked``: the caller holds the table lock. Otherwise liveness, which may read
        /proc, is judged without it, and each dead entry is reclaimed under a short hold
        after checking it still names the same dead process (a sweep must not stall
        workers)."""
        t = self.table
        out: dict[int, int] = {}
        dead = t.liveness.dead_entries()
        if any(head.flags & L.P_LIVE_LOCK for _p, head in dead):
            self._settle_dead_owners(locked=locked)
        for proc, head in dead:
            if locked:
                self._reclaim_if_same(proc, head, out)
            else:
                with t.table_lock:
                    self._reclaim_if_same(proc, head, out)
        return out

    def _reclaim_if_same(self, proc: int, head: L.ProcHead, out: dict[int, int]) -> None:
        if not self.table.liveness.still_dead(proc, head):
            return
        pid = head.pid
        n = reclaim_entry(self.table, proc)
        out[pid] = out.get(pid, 0) + n
        log.info("namespace %r: reclaimed %d reference(s) of dead pid %d",
                 self.namespace, n, pid)

    def reclaim_pid(self, pid: int) -> int:
        """Reclaim the references of ``pid``, refusing (``ContextInUseError``) while it
        lives. Needs the table lock."""
        t = self.table
        entries = [p for p in range(t.geo.max_processes) if t.proc_head(p).pid == pid]
        if any(t.liveness.entry_alive(p) for p in entries):
            raise ContextInUseError(
                f"pid {pid} is still alive; refusing to reclaim its references "
                f"in namespace {self.namespace!r}"
            )
        if any(t.proc_head(p).flags & L.P_LIVE_LOCK for p in entries):
            self._settle_dead_owners(locked=True)  # see there: before the entries go
        return sum(reclaim_entry(t, p) for p in entries)

    def _settle_dead_owners(self, *, locked: bool) -> None:
        """Recover the locks and remove the half-made contexts of dead owners, before
        their process entries are reclaimed. An entry whose kernel lock is gone is the
        one proof that its process died when a new process got the same pid within the
        same clock tick (same pid, same start time); once the entry is freed, a lock or a
        creation that process owned would look owned by the newcomer for as long as it
        lives. ``locked``: the caller holds the table lock."""
        self.recover_dead_locks()
        if locked:
            for slot, inc in self.table.dead_creations():
                self.remove_dead_creation(slot, inc)
        else:
            self.remove_dead_creations()

    def register(self) -> None:
        """Register this process's entry, reclaiming dead processes' entries if none is
        free (``TableFullError`` if all are live)."""
        t = self.table
        identity.require()  # others judge this entry's liveness by it
        with t.table_lock:
            t.check_usable()
            if not self.entry.claim():
                self.reclaim_dead(locked=True)
                if not self.entry.claim():
                    raise TableFullError(
                        f"namespace {self.namespace!r}: all {t.geo.max_processes} process "
                        "entries are taken by live processes (ContextConfig.max_processes)"
                    )


def _wake_waiters(sem_name: str) -> None:
    """Post an init semaphore once (each woken waiter passes it on) and unlink its name;
    waiters that opened it keep their handle."""
    try:
        sem = posix_ipc.Semaphore(sem_name)
    except posix_ipc.ExistentialError:
        return
    try:
        sem.release()
    finally:
        sem.close()
        _shm.unlink_semaphore(sem_name)

