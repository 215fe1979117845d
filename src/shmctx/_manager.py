"""``ContextManager``: the public API, composed from the table operations under the locks.

Hot path (a process gets a context it has mapped before, then returns it): one stripe
lock, three fixed-offset reads and two writes each way; no table lock, no scan, no
``shm_open``/``mmap``, no msgpack. The cold path (first get in a process, create,
close, sweep) takes the table lock, then the slot's stripe lock; publishing a created
context and creating a context's own lock take only the stripe lock.
"""

from __future__ import annotations

import _thread
import gc
import logging
import mmap
import os
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from sys import _getframe
from threading import get_ident
from time import monotonic

import posix_ipc

from . import _failpoints, _shm
from . import _layout as L
from ._config import ContextConfig, MemoryContextConfig
from ._context import ContextInfo, MemoryContext, SweepReport, _Mapped, _MappedLock
from ._errors import (
    ContextClosedError,
    ContextError,
    ContextInUseError,
    ContextManagerClosedError,
    ContextNotFoundError,
    ForeignObjectError,
    InvalidConfigError,
    InvalidContextTypeError,
    MaxReferencesReachedError,
    TableFullError,
)
from ._lock import ContextLock, RobustLock, wait_and_look
from ._proc import identity
from ._snapshot import Snapshot, decode, violations
from ._sweeper import remove_stale, run_sweeper, sweep_once
from ._table import Table, name_hash

log = logging.getLogger("shmctx")

__all__ = ["ContextManager"]

_live_managers: weakref.WeakSet[ContextManager] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for m in list(_live_managers):
        try:
            m._after_fork()
        except Exception:  # an at-fork handler must not skip the other managers'
            log.exception("namespace %r: resetting the manager in a forked child failed",
                          m.namespace)


os.register_at_fork(after_in_child=_after_fork_in_child)


def _load_speedups():  # type: ignore[no-untyped-def]
    """The C hot path (``_speedups.c``), unless it was not built (no compiler at
    install): then the Python hot path below serves alone. ``SHMCTX_PURE_PYTHON`` set
    when a manager is made makes that manager use the Python one."""
    try:
        from . import _speedups
    except ImportError as e:
        log.debug("C speedups not available (%s); the hot path runs in Python", e)
        return None
    # The field widths _speedups.c reads and writes; the offsets it gets from _layout. A
    # stale build (say, an old .so left in a source tree) must not write the table.
    if (L.LOCK.format, L.REF.format, L.S_CHECK.format, L.S_LAST_USED.format,
            L.REF_SIZE) != ("<IIQ", "<II", "<BxxxIQ", "<d", 8):
        log.warning("C speedups do not match the table layout; the hot path runs in Python")
        return None
    _speedups.install_finalizer(MemoryContext, tuple(
        MemoryContext.__dict__[f] for f in ("_returned", "_manager", "_mapped", "_pid")))
    return _speedups


_speedups = _load_speedups()


def _check_name(name: object) -> bytes:
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


def _check_timeout(timeout: object) -> None:
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(
            timeout, (int, float)) or not 0 <= timeout < float("inf")):
        raise InvalidConfigError(f"timeout must be None or >= 0 seconds, got {timeout!r}")


class ContextManager:
    """Named, reference-counted shared-memory contexts, shared by every process of one
    host that opens the same ``namespace``.

    ``config=None`` adopts the existing table's configuration (defaults for a new one);
    an explicit config that differs from the existing table's raises
    ``InvalidConfigError``. ``sweeper=None`` runs the sweeper thread only in the process
    that created the table (and only if ``cleanup_interval > 0``); ``True`` always,
    ``False`` never. At most one process sweeps a namespace at a time. ``mode`` gives the
    permission bits of every object created for the namespace (default 0o600, owner
    only); it is fixed when the table is created.

    Every object of the namespace in ``/dev/shm`` must be owned by this process's
    effective uid, or by one of ``trusted_uids``: another user's table, semaphore or
    memory is refused with ``ForeignObjectError`` rather than used. To share a namespace
    between users on purpose, create it with a ``mode`` that lets them in and pass the
    creator's uid (and those of the others who create contexts in it) as ``trusted_uids``;
    see docs/architecture.md, "Who may share a namespace".

    A context stays mapped in this process after its references are returned, so that
    getting it again maps nothing, but not for ever: a context closed (by any process)
    is unmapped once no handle of this process uses it any more, and of the open ones
    this process holds no reference to, only the ``max_cached_mappings`` used most
    recently stay mapped. This process notices those changes within a few contexts
    mapped or created (at most 16), on ``sweep()`` and on each round of its sweeper
    thread. A manager dropped without ``close()`` gives back its process entry,
    references, sweep lead and descriptors once it is garbage collected (a thread of its
    own does it, since the collection may run where a lock it needs is held).
    """

    def __init__(
        self,
        config: ContextConfig | None = None,
        *,
        namespace: str = "default",
        sweeper: bool | None = None,
        mode: int | None = None,
        trusted_uids: Iterable[int] | None = None,
    ) -> None:
        _shm.check_namespace(namespace)
        trusted = _check_uids(trusted_uids)
        if config is not None and not isinstance(config, ContextConfig):
            raise InvalidConfigError(
                f"config must be a ContextConfig or None, not {type(config).__name__}"
            )
        if mode is not None and (isinstance(mode, bool) or not isinstance(mode, int)
                                 or not 0 <= mode <= 0o777 or not mode & 0o600 == 0o600):
            raise InvalidConfigError(
                f"mode must be permission bits including owner read/write (0o600), got {mode!r}"
            )
        if sweeper not in (None, True, False):
            raise InvalidConfigError(f"sweeper must be None, True or False, got {sweeper!r}")
        self.namespace = namespace
        self._table, created = Table.open(namespace, config, 0o600 if mode is None else mode,
                                          trusted)
        t = self._table
        try:
            if not created:
                diffs = config.differences(t.config) if config is not None else []
                if mode is not None and mode != t.mode:
                    diffs.append(f"mode: {oct(mode)} != {oct(t.mode)}")
                if diffs:
                    raise InvalidConfigError(
                        f"namespace {namespace!r} exists with another configuration "
                        f"(requested != existing): {'; '.join(diffs)}"
                    )
        except BaseException:
            t.close()
            raise
        self.config: ContextConfig = t.config
        self._buf = t.buf
        self._words = t.words  # every write to the table: see _layout, "Writing shared fields"
        self._geo = t.geo
        self._max_refs = t.config.max_references
        self._closed = False
        self._close_lock = threading.Lock()
        self._map_lock = threading.Lock()
        self._ref_lock = threading.Lock()
        self._mapped: dict[str, _Mapped] = {}  # the cache: see _prune_mappings
        self._added = 0  # mappings added to it since the last prune
        self._max_cached = _MAX_CACHED_MAPPINGS
        # This process's lock objects by incarnation, while anything uses them (see
        # _MappedLock): a context mapped again shares its live lock object.
        self._locks: weakref.WeakValueDictionary[int, _MappedLock] = \
            weakref.WeakValueDictionary()
        # (mapping, pid) of handles dropped without return_context: _return_dropped
        self._dropped: list[tuple[_Mapped, int]] = []
        # (slot, incarnation) -> the thread running that context's init, in this process
        self._initialising: dict[tuple[int, int], int] = {}
        self._proc_pid = 0  # pid that registered it (a forked child must register anew)
        self._refs_off = 0
        self._refidx: dict[int, int] = {}
        self._free_refs: list[int] = []
        self._sweeper: threading.Thread | None = None
        self._stop = threading.Event()
        # What a collected manager gives back without close(): see _abandoned.
        self._holdings = _Holdings(t, self._stop)
        self._hot = None
        try:
            if _speedups is not None and not os.environ.get("SHMCTX_PURE_PYTHON"):
                self._install_hot_path()
            self._register()
        except BaseException:
            if self._hot is not None:
                self._hot.close()
            t.close()
            raise
        _live_managers.add(self)
        # Not at exit: the process's end frees its entry (others see it dead) and
        # everything else.
        self._finalizer = weakref.finalize(self, _abandoned, self._holdings)
        self._finalizer.atexit = False
        if (sweeper or (sweeper is None and created)) and self.config.cleanup_interval > 0:
            self._start_sweeper()

    @property
    def max_cached_mappings(self) -> int:
        """How many contexts this process holds no reference to stay mapped, the most
        recently used (64 unless set). Each costs a mapping and a descriptor, and a
        ``ctx.lock`` semaphore if its lock was used; getting one of them again maps
        nothing. 0 keeps only the contexts this process holds references to."""
        return self._max_cached

    @max_cached_mappings.setter
    def max_cached_mappings(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidConfigError(f"max_cached_mappings must be an int >= 0, got {n!r}")
        self._max_cached = n

    # --- context-manager protocol ---------------------------------------------------

    def __enter__(self) -> ContextManager:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._closed:
            self.close()

    def __repr__(self) -> str:
        return f"<ContextManager namespace={self.namespace!r}{' closed' if self._closed else ''}>"

    # --- public API -----------------------------------------------------------------

    def get_or_create_context(
        self,
        name: str,
        config: MemoryContextConfig | None = None,
        *,
        init: Callable[[MemoryContext], object] | None = None,
        timeout: float | None = None,
    ) -> tuple[MemoryContext, bool]:
        """Take a reference to context ``name``, creating it if absent.

        Returns ``(ctx, existed)``. ``init(ctx)`` runs in the creating process before any
        other process can obtain the context; others wait for it, at most ``timeout``
        seconds (then ``TimeoutError``). If ``init`` raises, the context is removed and
        the exception propagates; a waiting process then creates it afresh.
        """
        try:
            if self._closed:
                self._raise_closed()
            if config is None and timeout is None and type(name) is str:
                # The hot path: a name mapped before was validated then.
                handle = self._get_fast(name)
                if handle is not None:
                    return handle, True
            name_b = _check_name(name)
            if config is not None and not isinstance(config, MemoryContextConfig):
                raise InvalidConfigError(
                    f"config must be a MemoryContextConfig or None, not {type(config).__name__}"
                )
            if init is not None and not callable(init):
                raise TypeError(f"init must be a callable taking the context, not {init!r}")
            _check_timeout(timeout)
            if config is not None and self._matches(name, config):
                handle = self._get_fast(name)
                if handle is not None:
                    return handle, True
            return self._get_cold(name, name_b, config, init, True, timeout)
        except BaseException:
            self._recover_leaked_locks()
            raise

    def get_context(self, name: str, *, timeout: float | None = None) -> MemoryContext:
        """Take a reference to the existing context ``name`` (``ContextNotFoundError`` if
        there is none). A context still being initialised is waited for."""
        try:
            if self._closed:
                self._raise_closed()
            name_b = _check_name(name)
            _check_timeout(timeout)
            handle = self._get_fast(name)
            if handle is not None:
                return handle
            return self._get_cold(name, name_b, None, None, False, timeout)[0]
        except BaseException:
            self._recover_leaked_locks()
            raise

    @contextmanager
    def context(
        self,
        name: str,
        config: MemoryContextConfig | None = None,
        *,
        init: Callable[[MemoryContext], object] | None = None,
        timeout: float | None = None,
    ) -> Iterator[MemoryContext]:
        """``with m.context(name) as ctx:`` gets or creates the context and returns the
        reference on exit, also when the block raises."""
        ctx, _ = self.get_or_create_context(name, config, init=init, timeout=timeout)
        try:
            yield ctx
        finally:
            if not ctx._returned and not self._closed:
                try:
                    self.return_context(ctx)
                except ContextClosedError:
                    pass  # force-closed meanwhile: nothing left to return

    def return_context(self, ctx: MemoryContext) -> None:
        """Release the one reference ``ctx`` stands for and stamp the context's
        last-used time."""
        try:
            if not isinstance(ctx, MemoryContext):
                raise TypeError(
                    f"return_context() takes a MemoryContext, not {type(ctx).__name__}")
            if self._closed:
                self._raise_closed()
            if ctx._manager is not self:
                raise ContextError(
                    f"context {ctx.name!r} was acquired through another ContextManager "
                    f"(namespace {ctx._manager.namespace!r}); return it there"
                )
            if ctx._pid != identity.pid:
                raise ContextError(
                    f"context {ctx.name!r} was acquired by pid {ctx._pid}; pid "
                    f"{identity.pid} cannot return it (a handle inherited over fork is not "
                    "a reference of the child)"
                )
            if self._dropped:
                self._return_dropped()
            m = ctx._mapped
            lock = m.stripe
            lock.acquire()
            try:
                if ctx._returned:
                    raise ContextError(f"context {ctx.name!r}: this handle was already returned")
                # Marked first: a return interrupted part way (Ctrl-C) may then leak this one
                # reference, but never give it back twice (once here, once by the handle's
                # finalizer), which would take away another handle's.
                ctx._returned = True
                if not self._uncount(m):
                    raise ContextClosedError(
                        f"context {ctx.name!r} (incarnation {m.inc}) was closed, swept or "
                        "re-created since this handle was acquired"
                    )
            finally:
                lock.release()
            ctx._release_view()
        except BaseException:
            self._recover_leaked_locks()
            raise

    def _uncount(self, m: _Mapped) -> bool:
        """Give back one reference of ours to ``m``'s context and stamp its last use;
        False if it was closed since (there is nothing to give back). Needs its stripe
        lock."""
        buf, so = self._buf, m.off
        state, rc, inc = L.S_CHECK.unpack_from(buf, so)
        if inc != m.inc or state == L.FREE or not self._count(m.slot, -1):
            return False
        if _failpoints.armed:
            _failpoints.hit("return.proc_counted")
        w = self._words
        w.u32[(so + L.S_REFCOUNT_OFF) >> 2] = rc - 1 if rc else 0
        w.f64[(so + L.S_LAST_USED_OFF) >> 3] = monotonic()
        return True

    def _return_dropped(self) -> None:
        """Give back the references of handles garbage-collected without being returned
        (queued by their finalizer, ``MemoryContext.__del__``). Called where this thread
        holds no lock: at the start of the cold path, a Python return and a sweep."""
        dropped = self._dropped
        while dropped:
            try:
                m, pid = dropped.pop()
            except IndexError:
                return  # another thread took the last one
            if pid != identity.pid or self._closed:
                continue  # inherited over fork: the parent's reference, not ours
            with m.stripe:
                self._uncount(m)  # False: closed meanwhile, nothing left to give back

    def close_context(self, name: str, force: bool = False) -> None:
        """Close context ``name`` and its children. ``ContextInUseError`` while
        references remain, unless ``force``: then every outstanding handle becomes
        invalid."""
        try:
            self._check_open()
            name_b = _check_name(name)
            t = self._table
            with t.table_lock:
                t.check_usable()
                slot = t.find(name_b, name_hash(name_b))
                if slot < 0:
                    raise ContextNotFoundError(
                        f"no context {name!r} in namespace {self.namespace!r}"
                    )
                busy = self._close(self._subtree(slot), force=force)
                if busy >= 0:
                    which = "it" if busy == slot else \
                        f"its child {t.slot_name(busy).decode('utf-8', 'replace')!r}"
                    raise ContextInUseError(
                        f"context {name!r} in namespace {self.namespace!r}: {which} still has "
                        "references; pass force=True to close anyway"
                    )
        except BaseException:
            self._recover_leaked_locks()
            raise

    def validate_context(self, ctx: MemoryContext) -> bool:
        """True only if ``ctx``'s context still exists as the same incarnation, is not
        closed, and this handle has not been returned."""
        if not isinstance(ctx, MemoryContext):
            raise TypeError(f"validate_context() takes a MemoryContext, not {type(ctx).__name__}")
        self._check_open()
        if ctx._returned or ctx._manager is not self:
            return False
        state, _rc, inc = L.S_CHECK.unpack_from(self._buf, self._geo.slot_off(ctx._mapped.slot))
        return state == L.READY and inc == ctx._mapped.inc

    def contexts(self) -> list[ContextInfo]:
        """A snapshot of every context in the namespace."""
        try:
            snap = self._snapshot()
            out = []
            for s in snap.slots:
                if s.state == L.FREE:
                    continue
                out.append(ContextInfo(
                    name=s.name,
                    size=s.size,
                    state=L.STATE_NAMES.get(s.state, f"invalid({s.state})"),
                    refcount=s.refcount,
                    holders=dict(s.holders),
                    created=s.created,
                    last_used=snap.wall(s.last_used),
                    idle=max(0.0, snap.taken_at_mono - s.last_used),
                    incarnation=s.incarnation,
                    parent=snap.parent_name(s),
                ))
            return sorted(out, key=lambda i: i.name)
        except BaseException:
            self._recover_leaked_locks()
            raise

    def check(self) -> list[str]:
        """Verify the table's invariants; returns what is wrong, empty when sound."""
        try:
            snap = self._snapshot()
            return violations(snap, self._table.tag)
        except BaseException:
            self._recover_leaked_locks()
            raise

    def sweep(self) -> SweepReport:
        """One sweep now: reclaim references of dead processes, then close contexts with
        no references idle longer than ``max_idle_time``."""
        try:
            self._check_open()
            report = sweep_once(self)
            self._prune_mappings()
            return report
        except BaseException:
            self._recover_leaked_locks()
            raise

    def reclaim(self, pid: int) -> int:
        """Reclaim at once the references of ``pid``, a process known to be dead (a
        supervisor's ``child_exit``). Returns how many references were released.
        Refuses (``ContextInUseError``) a pid that is still alive."""
        try:
            self._check_open()
            if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
                raise InvalidConfigError(f"pid must be a positive int, got {pid!r}")
            t = self._table
            with t.table_lock:
                entries = [p for p in range(self._geo.max_processes) if t.proc_head(p)[0] == pid]
                if any(t.liveness.entry_alive(p) for p in entries):
                    raise ContextInUseError(
                        f"pid {pid} is still alive; refusing to reclaim its references "
                        f"in namespace {self.namespace!r}"
                    )
                if any(t.proc_head(p)[1] & L.P_LIVE_LOCK for p in entries):
                    self._settle_dead_owners(locked=True)  # see there: before the entries go
                return sum(self._reclaim_entry(p) for p in entries)
        except BaseException:
            self._recover_leaked_locks()
            raise

    def close(self) -> None:
        """Detach this process: stop its sweeper, return every reference it still holds,
        unmap. Other processes are unaffected."""
        try:
            with self._close_lock:
                if self._closed:
                    self._raise_closed()
                self._closed = True
                self._disable_hot_path()
            self._stop_sweeper()
            t = self._table
            try:
                proc = self._holdings.own_entry()
                if proc >= 0:
                    with t.table_lock:
                        _give_back_entry(t, proc)
            finally:
                self._detach()
        except BaseException:
            self._recover_leaked_locks()
            raise

    def unlink(self, force: bool = False) -> None:
        """Close every context and remove the namespace from the host: table,
        semaphores, every context segment. ``ContextInUseError`` while another live
        process holds references, unless ``force``. The manager is closed afterwards."""
        try:
            self._check_open()
            t = self._table
            with t.table_lock:
                if not force:
                    busy = {}
                    for p in range(self._geo.max_processes):
                        pid = t.proc_head(p)[0]
                        if not pid or pid == identity.pid:  # our own other managers do not count
                            continue
                        n = sum(c for _i, _s, c in t.proc_refs(p))
                        if n and t.liveness.entry_alive(p):
                            busy[pid] = busy.get(pid, 0) + n
                    if busy:
                        raise ContextInUseError(
                            f"namespace {self.namespace!r}: live processes hold references "
                            f"({', '.join(f'pid {p}: {n}' for p, n in busy.items())}); "
                            "pass force=True to unlink anyway"
                        )
                t.mark_unlinked()
                for slot in range(self._geo.capacity):
                    if L.S_STATE.unpack_from(self._buf, self._geo.slot_off(slot))[0] != L.FREE:
                        self._close([slot], force=True)
                t.unlink_names()
            with self._close_lock:
                self._closed = True
                self._disable_hot_path()
            self._stop_sweeper()
            self._detach()
            remove_stale(self.namespace, _shm.namespace_objects(self.namespace), t.tag, None)
        except BaseException:
            self._recover_leaked_locks()
            raise

    @property
    def _proc(self) -> int:
        """This manager's process entry (-1 before it registers)."""
        return self._holdings.entry[0]

    # --- hot path -------------------------------------------------------------------

    def _get_fast(self, name: str) -> MemoryContext | None:
        if self._dropped:
            self._return_dropped()
        m = self._mapped.get(name)
        if m is None or self._proc_pid != identity.pid:
            return None
        so = m.off
        buf = self._buf
        lock = m.stripe
        # The handle is made first, marked as standing for no reference, so that no
        # exception after the count (Ctrl-C) can lose the only object that can give the
        # reference back (its finalizer does, once it is marked as holding one).
        handle = MemoryContext(self, m, identity.pid, False)
        lock.acquire()
        try:
            state, rc, inc = L.S_CHECK.unpack_from(buf, so)
            if inc != m.inc or state != L.READY or (self._max_refs and rc >= self._max_refs):
                return None  # stale, or at the limit: the cold path decides
            # _add_ref, inlined: this is the hot path.
            self._count(m.slot, 1)
            if _failpoints.armed:
                _failpoints.hit("acquire.proc_counted")
            self._words.u32[(so + L.S_REFCOUNT_OFF) >> 2] = rc + 1
            # Last: interrupted before this, the reference leaks; marked before the
            # count, it could be given back without ever having been taken.
            handle._returned = False
        finally:
            lock.release()
        return handle

    def _count(self, slot: int, delta: int) -> bool:
        """Add ``delta`` to this process's count for ``slot`` (the primary record).
        Needs the slot's stripe lock. False if there is nothing to take away."""
        buf = self._buf
        ri = self._refidx.get(slot)
        if ri is not None:
            off = self._refs_off + L.REF_SIZE * ri
            sp1, c = L.REF.unpack_from(buf, off)
            if sp1 == slot + 1:
                if c + delta < 0:
                    return False
                self._words.u32[(off >> 2) + 1] = c + delta  # the count alone: one store
                return True
        if delta < 0:
            return False
        # Threads counting on other slots (under other stripe locks) may claim at the same
        # time; the free list of records is this process's, so claims are serialised here.
        with self._ref_lock:
            ri = self._claim_ref()
            self._refidx[slot] = ri
            self._words.store(self._refs_off + L.REF_SIZE * ri, L.REF, slot + 1, delta)
        return True

    def _reserve_ref(self) -> None:
        """Make sure a reference record is free for a new context (``TableFullError`` if
        this process already holds references to the per-process limit)."""
        with self._ref_lock:
            self._free_refs.append(self._claim_ref())

    def _claim_ref(self) -> int:
        try:
            return self._free_refs.pop()
        except IndexError:
            pass
        # Entries at count 0 stay reserved for their slot (it makes the next get of the
        # same context cheaper); when none is free, give back those, and any that a
        # force close or a repair cleared behind our back.
        t = self._table
        for ri in range(L.REFS_PER_PROCESS):
            off = self._refs_off + L.REF_SIZE * ri
            sp1, c = L.REF.unpack_from(self._buf, off)
            if sp1 == 0:
                self._free_refs.append(ri)
            elif c == 0 and self._refidx.get(sp1 - 1) == ri and \
                    self._try_free_zero(t.stripe_of(sp1 - 1), off, sp1):
                del self._refidx[sp1 - 1]
                self._free_refs.append(ri)
        if not self._free_refs:
            raise TableFullError(
                f"namespace {self.namespace!r}: this process already holds references to "
                f"{L.REFS_PER_PROCESS} distinct contexts, the per-process limit of the table"
            )
        return self._free_refs.pop()

    def _try_free_zero(self, lock: RobustLock, off: int, sp1: int) -> bool:
        # Another thread may be counting on this record under that slot's stripe lock.
        # Only a try: waiting for another stripe while holding ours could deadlock.
        if not lock.try_acquire():
            return False
        try:
            if L.REF.unpack_from(self._buf, off) == (sp1, 0):
                self._words.put64(off, 0)
                return True
            return False
        finally:
            lock.release()

    # --- cold path ------------------------------------------------------------------

    def _matches(self, name: str, config: MemoryContextConfig) -> bool:
        m = self._mapped.get(name)
        return m is not None and m.size == config.size and m.parent == config.parent

    def _get_cold(
        self,
        name: str,
        name_b: bytes,
        config: MemoryContextConfig | None,
        init: Callable[[MemoryContext], object] | None,
        create: bool,
        timeout: float | None,
    ) -> tuple[MemoryContext, bool]:
        self._check_open()
        self._ensure_registered()
        self._return_dropped()
        t = self._table
        h = name_hash(name_b)
        deadline = None if timeout is None else monotonic() + timeout
        reclaimed_once = False
        # Every pass but the first follows progress made elsewhere (a context published,
        # closed or re-created, a dead creator's slot freed, dead references reclaimed);
        # damage that would make the same pass again is raised instead (_damaged), and
        # every wait, the table lock's included, ends at the deadline.
        retry = False
        while True:
            if retry and deadline is not None and monotonic() >= deadline:
                raise TimeoutError(f"timed out after {timeout}s getting context {name!r} in "
                                   f"namespace {self.namespace!r}")
            retry = True
            # A reference counted below and not yet held by a handle: given back if
            # anything (the context gone, another user's object, no descriptor left,
            # Ctrl-C) stops this pass before the handle is made.
            counted: tuple[int, int] | None = None
            try:
                wait: tuple[int, int, posix_ipc.Semaphore] | None = None
                created = False
                with _holding(t.table_lock, deadline):
                    t.check_usable()
                    slot = t.find(name_b, h)
                    if slot >= 0:
                        f = t.read_slot(slot)
                        state, inc, size = f[0], f[4], f[6]
                        if state not in (L.CREATING, L.READY):
                            raise self._damaged(name, slot, inc,
                                                f"its slot {slot} holds state {state}, not a state")
                        if config is not None:
                            self._check_config(name, slot, f, config)
                        if state == L.READY:
                            parent_name = self._parent_name(f)
                            try:
                                self._take_ref_cold(name, slot, inc)
                                counted = (slot, inc)
                            except MaxReferencesReachedError:
                                if reclaimed_once or not self._reclaim_dead(locked=True):
                                    raise
                                reclaimed_once = True
                                continue
                        else:
                            if self._initialising.get((slot, inc)) == threading.get_ident():
                                raise ContextError(
                                    f"context {name!r} is being initialised by this thread: "
                                    "its init cannot get it (use the handle init receives)"
                                )
                            sem = self._register_waiter(slot, inc)
                            if sem is None:
                                continue  # published (or removed) meanwhile: look again
                            wait = (slot, inc, sem)
                    else:
                        if not create:
                            raise ContextNotFoundError(
                                f"no context {name!r} in namespace {self.namespace!r}"
                            )
                        cfg = config or MemoryContextConfig()
                        slot, inc = self._claim(name, name_b, h, cfg)
                        size = cfg.size
                        created = True
                if wait is not None:
                    self._wait_for_init(name, *wait, deadline, timeout)
                    continue
                if created:
                    return self._finish_create(name, slot, inc, cfg, init), False
                try:
                    m = self._map(name, slot, inc, size, parent_name)
                    handle = MemoryContext(self, m, identity.pid, False)
                except posix_ipc.ExistentialError:
                    counted = None  # first: an interrupt now leaks it, never gives it twice
                    self._undo_ref(slot, inc)
                    # Closed between our reference and the mapping (look again), or the
                    # memory is gone while the table still says ready: damage, raised.
                    with _holding(t.table_lock, deadline):
                        state, _rc, now_inc = L.S_CHECK.unpack_from(self._buf,
                                                                    self._geo.slot_off(slot))
                        if state == L.READY and now_inc == inc:
                            path = _shm.host_path(t.segment(slot, inc))
                            raise self._damaged(name, slot, inc, f"its memory segment {path} is "
                                                "gone (removed by something other than shmctx: "
                                                "systemd-logind's RemoveIPC, an rm)") from None
                    continue
                # From here the handle stands for the reference. No call comes between
                # these two statements, so no signal handler can run between them.
                counted = None
                handle._returned = False
                return handle, True
            except BaseException:
                if counted is not None:
                    self._undo_ref(*counted)
                raise

    def _damaged(self, name: str, slot: int, inc: int, what: str) -> ContextError:
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
        self._close([slot], force=True)
        return ContextError(
            f"context {name!r} in namespace {self.namespace!r} (incarnation {inc}) is "
            f"damaged: {what}. Its data is lost; it was closed, and get_or_create_context "
            "creates it afresh"
        )

    def _check_config(self, name: str, slot: int, f: tuple, config: MemoryContextConfig) -> None:
        size = f[6]
        problems = []
        if size != config.size:
            problems.append(f"size: requested {config.size} != existing {size}")
        existing_parent = self._parent_name(f)
        if config.parent != existing_parent:
            problems.append(f"parent: requested {config.parent!r} != existing {existing_parent!r}")
        if problems:
            raise InvalidConfigError(
                f"context {name!r} in namespace {self.namespace!r} exists with another "
                f"configuration: {'; '.join(problems)}"
            )

    def _parent_name(self, f: tuple) -> str | None:
        """Name of the live parent of a slot read with ``read_slot``. Needs the table lock."""
        parent, parent_inc = f[7], f[9]
        if not parent or parent > self._geo.capacity:
            return None
        pf = self._table.read_slot(parent - 1)
        if pf[0] == L.FREE or pf[4] != parent_inc:
            return None
        return self._table.slot_name(parent - 1).decode("utf-8", "replace")

    def _take_ref_cold(self, name: str, slot: int, inc: int) -> None:
        so = self._geo.slot_off(slot)
        with self._table.stripe_of(slot):
            rc = L.S_CHECK.unpack_from(self._buf, so)[1]  # state cannot move: table lock held
            if self._max_refs and rc >= self._max_refs:
                raise MaxReferencesReachedError(
                    f"context {name!r} in namespace {self.namespace!r} already holds "
                    f"{rc} references (max_references={self._max_refs})"
                )
            self._add_ref(slot, so, rc)

    def _add_ref(self, slot: int, so: int, rc: int) -> None:
        """Count one more reference of ours to ``slot`` (whose refcount was ``rc``):
        the per-process count first, the derived refcount second. Needs its stripe lock.
        ``_get_fast`` does the same inline."""
        self._count(slot, 1)
        if _failpoints.armed:
            _failpoints.hit("acquire.proc_counted")
        self._words.put32(so + L.S_REFCOUNT_OFF, rc + 1)

    def _claim(self, name: str, name_b: bytes, h: int, cfg: MemoryContextConfig) -> tuple[int, int]:
        """Claim a slot for a new context in CREATING state, with one reference of ours.
        Needs the table lock."""
        t = self._table
        parent_slot, parent_inc = -1, 0
        if cfg.parent is not None:
            try:
                pb = _check_name(cfg.parent)
            except InvalidContextTypeError as e:
                raise InvalidConfigError(f"parent of {name!r}: {e}") from None
            parent_slot = t.find(pb, name_hash(pb))
            if parent_slot < 0 or L.S_STATE.unpack_from(
                    self._buf, self._geo.slot_off(parent_slot))[0] != L.READY:
                raise ContextNotFoundError(
                    f"parent context {cfg.parent!r} of {name!r} does not exist in namespace "
                    f"{self.namespace!r}"
                )
            parent_inc = L.S_CHECK.unpack_from(self._buf, self._geo.slot_off(parent_slot))[2]
        self._reserve_ref()  # the one step that fails in normal use, done before any write
        # The live count and the free list are derived data: one damaged byte of either
        # must not make every create evict an unrelated context. Only the slots' own
        # states decide that the table is full; derived data found to disagree with them
        # is rebuilt (under the table lock, held here) before anything is evicted.
        live = t.live_count()
        if live >= self._geo.capacity and t.has_free_slot():
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
            self._evict_lru(name)
            slot = t.pop_free()
            if slot < 0:
                raise TableFullError(f"namespace {self.namespace!r}: no free slot for {name!r}")
        inc = t.next_incarnation()
        so = self._geo.slot_off(slot)
        try:
            with self._table.stripe_of(slot):
                # Every field but the state first, the state byte last and alone: a reader
                # without the lock (the orphan sweep) that sees the slot in use sees its
                # incarnation too.
                self._words.store(
                    so, L.SLOT_ALL, L.FREE, 0, len(name_b), 0, inc, h, cfg.size,
                    parent_slot + 1, 0, parent_inc, time.time(), monotonic(),
                    identity.pid, identity.start, 0, 0, 0, name_b,
                )
                self._words.put8(so, L.CREATING)
                if _failpoints.armed:
                    _failpoints.hit("create.slot_claimed")
                self._add_ref(slot, so, 0)
            t.index_insert(slot, h)
        except BaseException:
            # Give the slot back rather than leave a CREATING slot that no index entry,
            # waiter or sweep would ever find while we live.
            if L.S_STATE.unpack_from(self._buf, so)[0] == L.FREE:
                t.push_free(slot)  # failed before it was written
            else:
                t.add_live(1)  # _close counts it out again
                self._close([slot], force=True)
            raise
        t.add_live(1)
        if parent_slot >= 0:
            self._add_child(parent_slot, 1)
        return slot, inc

    def _add_child(self, parent: int, delta: int) -> None:
        off = self._geo.slot_off(parent) + L.S_CHILDREN_OFF
        n = L.S_CHILDREN.unpack_from(self._buf, off)[0]
        self._words.put32(off, max(0, n + delta))

    def _evict_lru(self, for_name: str) -> None:
        """Close the least recently used context with no references and no children, to
        make room. Needs the table lock."""
        buf, geo = self._buf, self._geo
        candidates = []
        for slot in range(geo.capacity):
            so = geo.slot_off(slot)
            state, rc, _inc = L.S_CHECK.unpack_from(buf, so)
            if state == L.READY and rc == 0 and \
                    not L.S_CHILDREN.unpack_from(buf, so + L.S_CHILDREN_OFF)[0]:
                candidates.append((L.S_LAST_USED.unpack_from(buf, so + L.S_LAST_USED_OFF)[0],
                                   slot))
        for _used, slot in sorted(candidates):
            name = self._table.slot_name(slot).decode("utf-8", "replace")
            if self._close([slot], force=False) < 0:  # unless referenced meanwhile
                log.info("namespace %r full: evicted least recently used context %r",
                         self.namespace, name)
                return
        raise TableFullError(
            f"namespace {self.namespace!r} is full ({geo.capacity} contexts, all referenced "
            f"or parents); cannot create {for_name!r}"
        )

    def _finish_create(self, name: str, slot: int, inc: int, cfg: MemoryContextConfig,
                       init: Callable[[MemoryContext], object] | None) -> MemoryContext:
        size = cfg.size
        t = self._table
        creator = identity.pid
        try:
            mm = None
            if size:
                mm = _shm.create_segment(
                    t.segment(slot, inc), size, t.mode,
                    what=f"context {name!r} in namespace {self.namespace!r}",
                    trusted=t.trusted,
                )
            if _failpoints.armed:
                _failpoints.hit("create.segment_made")
            m = self._mapping(name, slot, inc, size, mm, cfg.parent)
            handle = MemoryContext(self, m, identity.pid)
            if init is not None:
                self._mapped[name] = m
                if _failpoints.armed:
                    _failpoints.hit("create.in_init")
                self._initialising[(slot, inc)] = threading.get_ident()
                try:
                    init(handle)
                finally:
                    self._initialising.pop((slot, inc), None)
                if identity.pid != creator:
                    # init forked and this is the child, back from init: the context is
                    # its parent's to publish (or remove), not ours.
                    raise ContextError(
                        f"context {name!r}: pid {identity.pid} was forked inside its init "
                        f"by pid {creator}, which creates it; the child cannot publish it"
                    )
        except BaseException:
            if identity.pid == creator:  # a forked child leaves the slot to its parent
                self._abort_create(name, slot, inc)
            raise
        so = self._geo.slot_off(slot)
        with self._table.stripe_of(slot):
            state, _rc, cur = L.S_CHECK.unpack_from(self._buf, so)
            if cur != inc or state != L.CREATING:
                m.unmap()
                if size:  # made after the force close, so nobody else will unlink it
                    _shm.unlink_segment(t.segment(slot, inc))
                raise ContextClosedError(
                    f"context {name!r} was force-closed while it was being created"
                )
            flags = L.S_STATE.unpack_from(self._buf, so)[1]
            w = self._words
            w.putf(so + L.S_LAST_USED_OFF, monotonic())
            w.put8(so + 1, flags & ~L.SLOT_WAITERS)
            w.put8(so, L.READY)  # a byte of its own: readers without the lock watch it
            if flags & L.SLOT_WAITERS:
                _wake_waiters(_shm.init_sem_name(self.namespace, t.tag, inc))
        self._mapped[name] = m
        self._mapping_added()
        return handle

    def _abort_create(self, name: str, slot: int, inc: int) -> None:
        t = self._table
        self._mapped.pop(name, None)
        with t.table_lock:
            f = t.read_slot(slot)
            if f[0] == L.CREATING and f[4] == inc:
                self._close([slot], force=True)

    def _register_waiter(self, slot: int, inc: int) -> posix_ipc.Semaphore | None:
        """Mark ``slot`` as waited on and open its init semaphore; None if it is no longer
        being created as ``inc``. The creator publishes under the stripe lock alone, so the
        state is checked again under it."""
        so = self._geo.slot_off(slot)
        with self._table.stripe_of(slot):
            state, flags = L.S_STATE.unpack_from(self._buf, so)
            if state != L.CREATING or L.S_INC.unpack_from(self._buf, so + L.S_INC_OFF)[0] != inc:
                return None
            # Opened before the flag is set: if it cannot be (another user's object is in
            # the way, no descriptor left), the creator has nothing to post.
            sem = _shm.open_semaphore(
                _shm.init_sem_name(self.namespace, self._table.tag, inc), self._table.mode,
                create=True, initial=0, trusted=self._table.trusted,
                what=f"the init semaphore of a context in namespace {self.namespace!r}",
            )
            # The flags byte alone: the state byte is read without a lock (the orphan
            # sweep), and must never be seen rewritten.
            self._words.put8(so + 1, flags | L.SLOT_WAITERS)
            return sem

    def _wait_for_init(self, name: str, slot: int, inc: int, sem: posix_ipc.Semaphore,
                       deadline: float | None, timeout: float | None) -> None:
        t = self._table
        so = self._geo.slot_off(slot)

        def look() -> bool:
            """After each lock_timeout of waiting: is the creation over, or its creator
            dead (then remove the half-made context and look up the name again)?"""
            f = L.SLOT_ALL.unpack_from(self._buf, so)
            if f[0] != L.CREATING or f[4] != inc:
                return True
            if not t.liveness.owner_alive(f[12], f[13]):
                with t.table_lock:
                    self._remove_dead_creation(slot, inc)
                return True
            return False

        try:
            lt = t.config.lock_timeout
            if wait_and_look(sem, deadline, lt, lt, look,
                             f"timed out after {timeout}s waiting for context {name!r} in "
                             f"namespace {self.namespace!r} to be initialised"):
                state, _rc, now_inc = L.S_CHECK.unpack_from(self._buf, so)
                if state != L.CREATING or now_inc != inc:
                    sem.release()  # pass the baton to the next waiter
                # Else nobody published or closed it: a stray post (or a damaged slot).
                # Absorbed here, or every waiter would wake the next at once, forever;
                # the caller looks again and waits anew.
        finally:
            sem.close()

    def _map(self, name: str, slot: int, inc: int, size: int, parent: str | None) -> _Mapped:
        # Serialised per manager: two threads mapping the same context for the first time
        # must end with one mapping, or the loser's handles would see it unmapped.
        with self._map_lock:
            m = self._mapped.get(name)
            if m is not None and m.inc == inc:
                return m
            mm = _shm.attach_segment(
                self._table.segment(slot, inc), trusted=self._table.trusted,
                what=f"the memory of context {name!r} in namespace {self.namespace!r}",
            ) if size else None
            new = self._mapping(name, slot, inc, size, mm, parent)
            # An older incarnation's mapping leaves the cache: that context was closed,
            # and its mapping goes with the last handle of this process using it.
            self._mapped[name] = new
        self._mapping_added()
        return new

    def _mapping_added(self) -> None:
        """Prune the cache every few mappings added, not at each: a prune reads every
        cached slot (some 20 µs for 64 of them), as much as mapping a context costs."""
        self._added += 1
        if self._added >= _prune_step(self._max_cached):
            self._prune_mappings()

    def _prune_mappings(self) -> None:
        """Let the cache of mappings go of what this process no longer needs: each
        mapping dropped here is unmapped, and its ``ctx.lock`` semaphore closed, as soon
        as nothing of this process uses it any more (see ``_Mapped``), at once if
        nothing does.

        Dropped: the mappings of contexts closed since they were mapped, by any process
        (the slot is free or holds another incarnation). Then, among the open contexts
        this process holds no reference to and whose lock none of its threads holds, the
        least recently used (by any process: the slot's last-used time, which every
        return stamps), so that names never used again do not pile up. Runs every
        ``_prune_step`` mappings added, on ``sweep()`` and on each round of the sweeper
        thread; it keeps ``_prune_step`` fewer than ``max_cached_mappings``, so the
        bound holds until the next run (contexts whose references are returned meanwhile
        come on top).

        Read without the stripe locks: a thread taking a reference to a mapping just
        dropped keeps a working handle on it (the mapping outlives the cache while a
        handle uses it); the next get of that name then maps the context anew.
        """
        buf = self._buf
        limit = self._max_cached
        keep = limit - _prune_step(limit) if limit > 1 else limit
        self._added = 0
        with self._map_lock:
            idle = []
            for name, m in list(self._mapped.items()):
                state, inc, last = _SLOT_PRUNE.unpack_from(buf, m.off)
                if inc != m.inc or state == L.FREE:
                    del self._mapped[name]
                elif state == L.READY and not self._used_here(m):
                    idle.append((last, name))
            if len(idle) > keep:
                idle.sort()
                for _last, name in idle[: len(idle) - keep]:
                    del self._mapped[name]

    def _used_here(self, m: _Mapped) -> bool:
        """Whether this process holds a reference to ``m``'s context (its count in our
        process entry) or one of its threads holds the context's lock."""
        if m.lock is not None and m.lock.held_here():
            return True
        ri = self._refidx.get(m.slot)
        if ri is None:
            return False
        sp1, count = L.REF.unpack_from(self._buf, self._refs_off + L.REF_SIZE * ri)
        return sp1 == m.slot + 1 and count > 0

    def _mapping(self, name: str, slot: int, inc: int, size: int, mm: mmap.mmap | None,
                 parent: str | None) -> _Mapped:
        return _Mapped(name, slot, inc, size, mm, parent, self._geo.slot_off(slot),
                       self._table.stripe_of(slot), slot % self._geo.stripes)

    def _undo_ref(self, slot: int, inc: int) -> None:
        so = self._geo.slot_off(slot)
        with self._table.stripe_of(slot):
            state, rc, cur = L.S_CHECK.unpack_from(self._buf, so)
            if cur == inc and state != L.FREE and self._count(slot, -1):
                self._words.put32(so + L.S_REFCOUNT_OFF, max(0, rc - 1))

    def _is_current(self, m: _Mapped) -> bool:
        return self._is_current_at(m.off, m.inc)

    def _is_current_at(self, so: int, inc: int) -> bool:
        """Whether the slot at offset ``so`` still holds incarnation ``inc``, open."""
        if self._closed:
            return False
        state, _rc, now = L.S_CHECK.unpack_from(self._buf, so)
        return now == inc and state != L.FREE

    def _context_lock(self, ctx: MemoryContext) -> ContextLock:
        m = ctx._mapped
        if m.lock is not None:
            return m.lock
        try:
            return self._make_lock_of(m)
        except BaseException:
            self._recover_leaked_locks()  # as every public method: see there
            raise

    def _make_lock_of(self, m: _Mapped) -> ContextLock:
        t = self._table
        so = m.off
        # One lock object per mapping: two threads asking for it at once must not each
        # build their own, or each would think it holds the lock through its object, and
        # ``with ctx.lock: ctx.put(...)`` would wait for itself.
        with self._map_lock:
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
                state, flags = L.S_STATE.unpack_from(self._buf, so)
                if L.S_INC.unpack_from(self._buf, so + L.S_INC_OFF)[0] != m.inc or \
                        state == L.FREE:
                    raise ContextClosedError(f"context {m.name!r} was closed")
                sem = _shm.open_semaphore(
                    _shm.ctx_lock_name(self.namespace, t.tag, m.inc), t.mode, create=True,
                    trusted=t.trusted, what=f"the lock of context {m.name!r}",
                )
                self._words.put8(so + 1, flags | L.SLOT_LOCK)  # flags only, as in _register_waiter
            m.lock = self._locks[m.inc] = self._make_context_lock(m, sem)
        return m.lock

    def _make_context_lock(self, m: _Mapped, sem: posix_ipc.Semaphore) -> ContextLock:
        """A lock object owning ``sem`` (closed when the object goes). It refers to the
        slot and incarnation, not to ``m``: a mapping refers to its lock, and a reference
        back would make a cycle that only the garbage collector frees, pinning the
        memory until it runs."""
        return _MappedLock(
            sem, self._words, m.off + L.S_LOCK_OFF, (1 << 20) + m.slot,
            self.config.lock_timeout, self._table.arbiter, f"lock of context {m.name!r}",
            m.stripe, partial(self._is_current_at, m.off, m.inc),
            partial(ContextClosedError, f"context {m.name!r} (incarnation {m.inc}) was closed"),
        )

    def _recover_leaked_locks(self) -> None:
        """An exception is leaving one of this thread's calls: recover any table or
        stripe lock the thread left held on the way (an interrupt between taking a lock
        and the ``try`` that releases it; see RobustLock.leaked). Every public method
        ends here on an exception, so no other process waits for such a lock for longer
        than it takes the exception to leave the call."""
        me = get_ident()
        t = self._table
        # The public method the exception is leaving may have taken a lock in its own
        # frame (return_context does): that frame is on its way out. Stripe locks first:
        # recovering the table lock repairs every stripe, which takes each of them.
        exiting = _getframe(1)
        try:
            for lock in (*t.stripe_locks, t.table_lock):
                if lock.holder == me:
                    lock.recover_leaked(exiting)
        except ValueError:
            pass  # close() or unlink() got as far as unmapping the table: nothing to do

    def _recover_dead_locks(self) -> int:
        """Recover every lock of the namespace whose recorded owner is dead. Needs no
        lock held. Returns how many were recovered."""
        t, buf, geo = self._table, self._buf, self._geo
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
            name = t.slot_name(slot).decode("utf-8", "replace")
            try:
                # The lock object owns the semaphore: closed when it goes, right after.
                n += self._make_context_lock(self._mapping(name, slot, inc, 0, None, None),
                                             sem).recover_if_owner_dead()
            except ContextClosedError:
                pass
        return n

    # --- closing slots --------------------------------------------------------------

    def _subtree(self, slot: int) -> list[int]:
        """``slot`` and its descendants, children before parents. Needs the table lock."""
        off = self._geo.slot_off(slot) + L.S_CHILDREN_OFF
        if not L.S_CHILDREN.unpack_from(self._buf, off)[0]:
            return [slot]  # a leaf, the common case: no scan of the table
        children = self._table.children()
        order: list[int] = []
        stack, seen = [slot], set()
        while stack:
            s = stack.pop()
            if s in seen:
                continue
            seen.add(s)
            order.append(s)
            stack.extend(children.get(s, ()))
        return order[::-1]

    def _close(self, slots: list[int], *, force: bool, idle_limit: float = 0.0) -> int:
        """Close the contexts in ``slots`` (a subtree, children first): clear every
        reference to them, mark them free, remove them from the index and free list, wake
        their init waiters, unlink their objects. Needs the table lock.

        Unless ``force``, nothing is closed if one of them holds a reference (or, with
        ``idle_limit``, was returned within that many seconds); that slot is returned,
        else -1. The check is made with the slots' stripe locks all held (taken in
        ascending order): the hot path takes references under a stripe lock alone, so a
        check under the table lock only could close a context referenced a moment later.
        """
        buf, geo = self._buf, self._geo
        held: list[RobustLock] = []
        try:
            for k in sorted({s % self._geo.stripes for s in slots}):
                self._table.stripe_locks[k].acquire()
                held.append(self._table.stripe_locks[k])
            if not force:
                now = monotonic()
                for s in slots:
                    so = geo.slot_off(s)
                    last = L.S_LAST_USED.unpack_from(buf, so + L.S_LAST_USED_OFF)[0]
                    in_use = L.S_CHECK.unpack_from(buf, so)[1]
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

    def _free_slot_state(self, slot: int) -> tuple | None:
        """The part of closing a slot that needs its stripe lock (held by the caller)."""
        t, buf, geo = self._table, self._buf, self._geo
        so = geo.slot_off(slot)
        state, flags, _n, rc, inc, h = L.S_HEAD.unpack_from(buf, so)
        if state == L.FREE:
            return None
        size, parent, _nf, parent_inc, _c, _u = L.S_BODY.unpack_from(buf, so + L.S_BODY_OFF)
        if rc:
            for p in range(geo.max_processes):
                if L.P_PID.unpack_from(buf, geo.proc_off(p))[0] == 0:
                    continue
                for i, s, _c in t.proc_refs(p):
                    if s == slot:
                        self._words.put64(t.ref_off(p, i), 0)
        w = self._words
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
        t, buf, geo = self._table, self._buf, self._geo
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
        # This process's own mapping of it leaves the cache and goes with the last
        # handle using it. Unmapping it now would pull the memory from under a thread
        # of this process still writing it under its lock (a force close).
        name = t.slot_name(slot).decode("utf-8", "replace")
        with self._map_lock:
            m = self._mapped.get(name)
            if m is not None and m.inc == inc:
                del self._mapped[name]

    def _remove_dead_creation(self, slot: int, inc: int) -> bool:
        """Free ``slot`` if it is still being created as ``inc`` by a process that died.
        Needs the table lock."""
        f = self._table.read_slot(slot)
        if f[0] != L.CREATING or f[4] != inc or self._table.liveness.owner_alive(f[12], f[13]):
            return False
        log.warning("namespace %r: context %r: creator pid %d died during init; removing "
                    "the half-made context", self.namespace,
                    self._table.slot_name(slot).decode("utf-8", "replace"), f[12])
        self._close([slot], force=True)
        return True

    # --- processes ------------------------------------------------------------------

    def _register(self) -> None:
        t = self._table
        identity.require()  # others judge this entry's liveness by it
        with t.table_lock:
            t.check_usable()
            proc, locked = self._claim_free_proc()
            if proc < 0:
                self._reclaim_dead(locked=True)
                proc, locked = self._claim_free_proc()
            if proc < 0:
                raise TableFullError(
                    f"namespace {self.namespace!r}: all {self._geo.max_processes} process "
                    "entries are taken by live processes (ContextConfig.max_processes)"
                )
            off = self._geo.proc_off(proc)
            w = self._words
            w.store(off + L.REFS_OFF, L.P_REFS, *([0] * (2 * L.REFS_PER_PROCESS)))
            # pid last: a half-written entry stays free. Its liveness lock is already
            # held, so nobody sees it registered and unlocked (dead) while we live.
            w.store(off, L.P_HEAD, 0, L.P_LIVE_LOCK if locked else 0, identity.start,
                    time.time())
            if _failpoints.armed:
                _failpoints.hit("register.entry_claimed")
            w.put32(off, identity.pid)
            t.liveness.mine = (proc, identity.pid)
            self._holdings.entry = (proc, identity.pid)
        self._refs_off = off + L.REFS_OFF
        self._refidx = {}
        self._free_refs = list(range(L.REFS_PER_PROCESS - 1, -1, -1))
        # Last: other threads take the hot path as soon as the pid matches, and must then
        # find this process's own entry, not the parent's.
        self._proc_pid = identity.pid
        if self._hot is not None:
            self._hot.enable(identity.pid, identity.start, self._refs_off, self._refidx)

    def _claim_free_proc(self) -> tuple[int, bool]:
        """A free process entry with its liveness lock taken (``_liveness``), and whether
        the lock could be had at all (if not, others judge the entry by pid and start
        time). An entry whose lock another description still holds is skipped: it reads
        as free, yet a live process still counts on it. Needs the table lock."""
        p = self._find_free_proc()
        while p >= 0:
            held = self._table.liveness.hold(p)
            if held is not False:
                return p, bool(held)
            p = self._find_free_proc(p + 1)
        return -1, False

    def _find_free_proc(self, first: int = 0) -> int:
        for p in range(first, self._geo.max_processes):
            if L.P_PID.unpack_from(self._buf, self._geo.proc_off(p))[0] == 0:
                return p
        return -1

    def _ensure_registered(self) -> None:
        if self._proc_pid != identity.pid:
            with self._ref_lock:  # threads of a forked child: one registration
                if self._proc_pid != identity.pid:
                    self._register()

    def _reclaim_entry(self, proc: int) -> int:
        return _reclaim_entry(self._table, proc)

    def _reclaim_dead(self, *, locked: bool) -> dict[int, int]:
        """Reclaim every dead process entry; returns {pid: references released}.

        ``locked``: the caller holds the table lock. Otherwise liveness, which may read
        /proc, is judged without it, and each dead entry is reclaimed under a short hold
        after checking it still names the same dead process (a sweep must not stall
        workers)."""
        out: dict[int, int] = {}
        dead = self._table.liveness.dead_entries()
        if any(head[1] & L.P_LIVE_LOCK for _p, head in dead):
            self._settle_dead_owners(locked=locked)
        for proc, head in dead:
            if locked:
                self._reclaim_if_same(proc, head, out)
            else:
                with self._table.table_lock:
                    self._reclaim_if_same(proc, head, out)
        return out

    def _reclaim_if_same(self, proc: int, head: tuple[int, int, int, float],
                         out: dict[int, int]) -> None:
        if not self._table.liveness.still_dead(proc, head):
            return
        pid = head[0]
        n = self._reclaim_entry(proc)
        out[pid] = out.get(pid, 0) + n
        log.info("namespace %r: reclaimed %d reference(s) of dead pid %d",
                 self.namespace, n, pid)

    def _settle_dead_owners(self, *, locked: bool) -> None:
        """Recover the locks and remove the half-made contexts of dead owners, before
        their process entries are reclaimed. An entry whose kernel lock is gone is the
        one proof that its process died when a new process got the same pid within the
        same clock tick (same pid, same start time); once the entry is freed, a lock or a
        creation that process owned would look owned by the newcomer for as long as it
        lives. ``locked``: the caller holds the table lock."""
        t = self._table
        self._recover_dead_locks()
        for slot, inc in t.dead_creations():
            if locked:
                self._remove_dead_creation(slot, inc)
            else:
                with t.table_lock:
                    self._remove_dead_creation(slot, inc)

    # --- misc -----------------------------------------------------------------------

    def _snapshot(self) -> Snapshot:
        self._check_open()
        t = self._table
        with t.table_lock:
            data = bytes(self._buf)
        return decode(data)

    def _check_open(self) -> None:
        if self._closed:
            self._raise_closed()

    def _raise_closed(self) -> None:
        raise ContextManagerClosedError(
            f"ContextManager of namespace {self.namespace!r} is closed"
        )

    def _start_sweeper(self) -> None:
        self._sweeper = threading.Thread(
            target=run_sweeper, args=(weakref.ref(self), self._stop),
            name=f"shmctx-sweeper[{self.namespace}]", daemon=True,
        )
        self._sweeper.start()

    def _after_fork(self) -> None:
        # The child has no sweeper thread and no references; it registers its own process
        # entry on first use. Locks held by other threads at fork time are recreated.
        # The C hot path goes off first, before anything that can fail (the arbiter
        # opens a descriptor, which fails at the descriptor limit): left on, it would
        # book the child's references in the parent's process entry.
        self._disable_hot_path()  # until the child registers its own entry
        # The entry is the parent's: the child has none until it registers. Judging that
        # by the pid alone would fail once a descendant got a dead ancestor's pid.
        self._proc_pid = 0
        self._holdings.entry = (-1, 0)
        self._table.liveness.mine = (-1, 0)
        self._sweeper = None
        self._stop = threading.Event()
        self._holdings.stop = self._stop
        self._close_lock = threading.Lock()
        self._map_lock = threading.Lock()
        self._ref_lock = threading.Lock()
        self._table.arbiter.reset_after_fork()
        for m in self._mapped.values():
            m.lock = None  # a lock held by the parent's thread is not held in the child
        # The lock registry follows the mappings: no lock object of the parent's is
        # handed out in the child unless a mapping still has it.
        self._locks = weakref.WeakValueDictionary(
            {m.inc: m.lock for m in self._mapped.values() if m.lock is not None})
        self._refidx = {}
        self._free_refs = []
        # The child runs no init of its own yet: one its parent was running when it
        # forked goes on in the parent, and the child waits for it like any process.
        self._initialising = {}

    def _install_hot_path(self) -> None:
        """Put the C hot path in front of get_or_create_context, get_context and
        return_context. It completes their common case itself and calls the methods below
        for everything else, so these stay the one full definition."""
        t, cls = self._table, type(self)
        try:
            hot = _speedups.HotPath(
                self, t.buf, [lk.sem.name for lk in t.stripe_locks],
                [lk.off for lk in t.stripe_locks],
                (0, L.S_REFCOUNT_OFF, L.S_INC_OFF, L.S_LAST_USED_OFF, L.SLOT_SIZE),
                (L.READY, L.FREE), self._max_refs, self._mapped, MemoryContext,
                tuple(MemoryContext.__dict__[f] for f in
                      ("_manager", "_mapped", "_pid", "_returned", "_view")),
                vars(_failpoints), cls.get_or_create_context.__get__(self),
                cls.get_context.__get__(self), cls.return_context.__get__(self),
                self._dropped,
            )
        except FileNotFoundError:
            # It opens the stripe semaphores anew by name: the namespace was unlinked
            # since the table was attached. The Python path, which _register runs next,
            # reports that as the documented error.
            log.debug("namespace %r went away while attaching; the hot path runs in Python",
                      self.namespace)
            return
        self._hot = hot
        self.get_or_create_context = hot.get_or_create_context  # type: ignore[method-assign]
        self.get_context = hot.get_context  # type: ignore[method-assign]
        self.return_context = hot.return_context  # type: ignore[method-assign]

    def _disable_hot_path(self) -> None:
        if self._hot is not None:
            self._hot.disable()

    def _stop_sweeper(self) -> None:
        self._stop.set()
        th = self._sweeper
        if th is not None and th is not threading.current_thread():
            th.join()

    def _detach(self) -> None:
        self._finalizer.detach()  # closed: nothing is left to give back when collected
        _live_managers.discard(self)
        for m in list(self._mapped.values()):
            m.unmap()
        self._mapped.clear()
        if self._hot is not None:
            self._hot.close()  # it holds the table's buffer, which must go before the mmap
        self._table.close()


def _check_uids(uids: object) -> frozenset[int]:
    if uids is None:
        return frozenset()
    try:
        out = frozenset(uids)  # type: ignore[call-overload]
    except TypeError:
        out = None
    if isinstance(uids, (str, bytes)) or out is None or not all(
            isinstance(u, int) and not isinstance(u, bool) and 0 <= u < 1 << 32 for u in out):
        raise InvalidConfigError(
            f"trusted_uids must be None or an iterable of uids (ints), got {uids!r}"
        )
    return out


class _holding:  # lower case: used as ``with _holding(lock, deadline):``, like a function
    """``with lock:``, waiting for it at most until ``deadline`` (a ``monotonic()`` time;
    None: as long as its holder lives). Past the deadline it still takes a free lock.
    A class, not a generator: the lock records the frame whose critical section holds it
    (RobustLock.leaked), and a suspended generator's frame is on no thread's stack."""

    __slots__ = ("lock", "deadline")

    def __init__(self, lock: RobustLock, deadline: float | None) -> None:
        self.lock, self.deadline = lock, deadline

    def __enter__(self) -> None:
        d = self.deadline
        self.lock.acquire(None if d is None else max(0.0, d - monotonic()), 2)

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


_MAX_CACHED_MAPPINGS = 64  # the default of ContextManager.max_cached_mappings

# A slot's state, incarnation and last-used time, in one read (for _prune_mappings).
_SLOT_PRUNE = struct.Struct(
    f"<B{L.S_INC_OFF - 1}xQ{L.S_LAST_USED_OFF - L.S_INC_OFF - 8}xd")


def _prune_step(limit: int) -> int:
    """How many mappings may be added between two prunes of a cache of ``limit``."""
    return max(1, min(16, limit // 4))


def _reclaim_entry(t: Table, proc: int) -> int:
    """Release every reference of process entry ``proc`` and free the entry. Needs the
    table lock."""
    buf, geo, words = t.buf, t.geo, t.words
    total = 0
    now = monotonic()
    for i, slot, c in list(t.proc_refs(proc)):
        if slot >= geo.capacity:
            words.put64(t.ref_off(proc, i), 0)
            continue
        so = geo.slot_off(slot)
        with t.stripe_of(slot):
            words.put64(t.ref_off(proc, i), 0)
            if not c:
                continue
            if _failpoints.armed:
                _failpoints.hit("reclaim.ref_cleared")
            state, rc, _inc = L.S_CHECK.unpack_from(buf, so)
            if state != L.FREE:
                words.put32(so + L.S_REFCOUNT_OFF, max(0, rc - c))
                words.putf(so + L.S_LAST_USED_OFF, now)
            total += c
    words.put32(geo.proc_off(proc), 0)
    return total


def _give_back_entry(t: Table, proc: int) -> None:
    """Give back this process's entry ``proc`` as a manager leaves (``close()``, or
    collected without it): its references, the entry, the entry's liveness lock, and the
    sweep lead if this process holds it. Needs the table lock."""
    _reclaim_entry(t, proc)
    # Only once the entry is free: a looker never sees it registered with its lock
    # gone, which would mean this process died.
    t.liveness.drop(proc)
    spid, _f, sstart, _b = t.sweeper()
    if spid == identity.pid and sstart == identity.start:
        t.set_sweeper(0, 0, 0.0)


class _Holdings:
    """What a manager holds that must be given back if it is collected without
    ``close()``. It refers to nothing that refers to the manager, so the finalizer that
    keeps it does not keep the manager alive."""

    __slots__ = ("table", "stop", "entry")

    def __init__(self, table: Table, stop: threading.Event) -> None:
        self.table = table
        self.stop = stop  # the sweeper thread's, if it runs
        self.entry = (-1, 0)  # (process entry, pid that registered it)

    def own_entry(self) -> int:
        """The process entry this process registered and may give back, or -1: none
        yet, its parent's (a forked child that never registered), or the namespace was
        unlinked (the entry went with it)."""
        proc, pid = self.entry
        if proc < 0 or pid != identity.pid or self.table.flags() & L.FLAG_UNLINKED:
            return -1
        # And the entry must still name this very process: a descendant that got a dead
        # ancestor's pid must not give back the entry another process registered since.
        head = self.table.proc_head(proc)
        return proc if (head[0], head[2]) == (identity.pid, identity.start) else -1


def _abandoned(h: _Holdings) -> None:
    """``weakref.finalize`` callback of a manager collected without ``close()``.

    A finalizer runs wherever a collection starts: at any allocation, in any thread,
    also one that holds this namespace's table lock or a stripe lock through another
    manager (the semaphores are the same), or a Python lock (an Event's, say). Waiting
    for any lock here could wait for this very thread. So the work is handed to a thread
    of its own (``_give_back_abandoned``), started once the collection is over: the C
    hot path, collected with the manager, lets go of the table's buffer only then, and
    the table cannot be unmapped before.
    """
    if _gc_state.collecting:
        _gc_state.abandoned.append(h)
    else:  # freed by reference counting (no cycle): nothing else to wait for
        _start_give_back(h)


class _GcState:
    __slots__ = ("collecting", "abandoned")

    def __init__(self) -> None:
        self.collecting = False
        self.abandoned: list[_Holdings] = []  # collected during this collection


_gc_state = _GcState()


def _gc_phase(phase: str, _info: dict) -> None:
    """``gc.callbacks`` entry: runs in the collecting thread, before and after each
    collection (never two at once)."""
    if phase == "start":
        _gc_state.collecting = True
        return
    _gc_state.collecting = False
    while _gc_state.abandoned:
        _start_give_back(_gc_state.abandoned.pop())


gc.callbacks.append(_gc_phase)


def _start_give_back(h: _Holdings) -> None:
    # A bare _thread first: threading.Thread.start waits on threading's own locks, which
    # this thread may hold right now. That thread starts an ordinary one (daemon, listed
    # by threading.enumerate like any other), for which it can safely wait.
    try:
        _thread.start_new_thread(_start_giver, (h,))
    except RuntimeError:
        _close_abandoned(h)


def _start_giver(h: _Holdings) -> None:
    try:
        # Not a daemon: a manager dropped as a script ends would otherwise be frozen by
        # the interpreter's exit in the middle of giving back, holding the table lock.
        # The exit waits for it instead; its wait for the table lock is bounded.
        threading.Thread(target=_give_back_abandoned, args=(h,), daemon=False,
                         name=f"shmctx-give-back[{h.table.ns}]").start()
    except RuntimeError:
        _close_abandoned(h)


def _close_abandoned(h: _Holdings) -> None:
    """No thread to be had: close the descriptors, which takes no lock. That drops the
    entry's liveness lock, so the other processes (and this one's other managers) see
    the entry as dead and reclaim it at their next sweep."""
    h.table.close()


_GIVE_BACK_WAIT = 10.0  # how long a give-back (and so an exit) waits for the table lock


def _give_back_abandoned(h: _Holdings) -> None:
    """The rest of ``_abandoned``, on a thread of its own: an ordinary wait for the
    table lock, which whoever holds it releases in time. A forked child that inherited
    the manager and never registered has no entry of its own to give back: it only
    closes its copies of the descriptors."""
    t = h.table
    try:
        proc = h.own_entry()
        if proc >= 0:
            with _holding(t.table_lock, monotonic() + _GIVE_BACK_WAIT):
                _give_back_entry(t, proc)
    except TimeoutError:
        log.warning("namespace %r: the table lock stayed held for %ss; the entry of a "
                    "manager collected without close() is left for the sweep to reclaim "
                    "once this process ends", t.ns, _GIVE_BACK_WAIT)
    except Exception:  # nobody to raise to: say it, and close anyway
        log.exception("namespace %r: giving back the process entry of a manager collected "
                      "without close() failed", t.ns)
    finally:
        h.stop.set()  # its sweeper thread, if any, ends now rather than at its next round
        t.close()


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

