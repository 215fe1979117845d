"""``ContextManager``: the public API, a facade over the pieces that do the work.

It checks arguments, holds the pieces together and runs their lifetime (made, forked,
closed, unlinked, collected). The work is done by:

* ``_table.Table``: the table, its regions and its locks;
* ``_entry.ProcessEntry``: this process's entry and its row of reference counts;
* ``_mappings.Mappings``: this process's mappings, ``ctx.lock`` objects, handle owner;
* ``_slots.Slots``: the slot operations under their locks;
* ``_hotpath``: get and return of a mapped context (Python, and C in front of it);
* ``_coldpath.ColdPath``: every other get (first in a process, create, wait for init);
* ``_sweeper``: reclaiming, idle closing and orphan removal.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable, Generator, Iterable
from contextlib import contextmanager
from sys import _getframe
from typing import Any

from . import _hotpath, _payload, _shm
from . import _layout as L
from ._coldpath import ColdPath
from ._config import ContextConfig, MemoryContextConfig
from ._context import (
    ContextInfo,
    MemoryContext,
    SweepReport,
    check_returnable,
    check_spec,
    mapping_of,
    owner_of,
    returned,
)
from ._entry import ProcessEntry, abandoned
from ._errors import (
    ContextClosedError,
    ContextError,
    ContextInUseError,
    ContextManagerClosedError,
    InvalidConfigError,
)
from ._hotpath import PyHotPath, front
from ._mappings import Mappings
from ._proc import identity
from ._slots import Slots, check_name
from ._snapshot import Snapshot, decode, violations
from ._sweeper import remove_stale, run_sweeper, supervise, sweep_once
from ._table import Table

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


def _check_timeout(timeout: object) -> None:
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(
            timeout, (int, float)) or not 0 <= timeout < float("inf")):
        raise InvalidConfigError(f"timeout must be None or >= 0 seconds, got {timeout!r}")


def _check_create_args(config: object, init: object, timeout: object) -> None:
    """The arguments a call that may create a context takes besides its name."""
    if config is not None and not isinstance(config, MemoryContextConfig):
        raise InvalidConfigError(
            f"config must be a MemoryContextConfig or None, not {type(config).__name__}"
        )
    if init is not None and not callable(init):
        raise TypeError(f"init must be a callable taking the context, not {init!r}")
    _check_timeout(timeout)


def _check_uids(uids: object) -> frozenset[int]:
    if uids is None:
        return frozenset()
    try:
        out: frozenset[Any] | None = frozenset(uids)  # type: ignore[call-overload]
    except TypeError:
        out = None
    if isinstance(uids, (str, bytes)) or out is None or not all(
            isinstance(u, int) and not isinstance(u, bool) and 0 <= u < 1 << 32 for u in out):
        raise InvalidConfigError(
            f"trusted_uids must be None or an iterable of uids (ints), got {uids!r}"
        )
    return out


class ContextManager:
    """Named, reference-counted shared-memory contexts, shared by every process of one
    host that opens the same ``namespace``.

    ``config=None`` adopts the existing table's configuration (defaults for a new one);
    an explicit config that differs from the existing table's raises
    ``InvalidConfigError``. ``create=False`` only attaches: a namespace that does not
    exist is then ``ContextNotFoundError`` instead of a new, empty one (for a process
    that works on a namespace another one makes, such as a publisher beside a server,
    where a mistyped name must not pass silently). ``sweeper=None`` runs the sweeper
    thread only in the process that created the table (and only if
    ``cleanup_interval > 0``); ``True`` always, ``False`` never. At most one process
    sweeps a namespace at a time. ``mode`` gives the permission bits of every object
    created for the namespace (default 0o600, owner only); it is fixed when the table is
    created.

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

    # ``_hot`` is a slot, not a dict entry: the C hot path in front of the get and
    # return methods reads it at a fixed offset on every call (_speedups.c, hot_of).
    __slots__ = ("_hot", "__dict__", "__weakref__")

    # Safe defaults, so that close() and the finalizers work on a half-made manager
    # (``_hot``, a slot, can have no class-level default: __init__ sets it first).
    _closed = True
    _sweeper: threading.Thread | None = None

    def __init__(
        self,
        config: ContextConfig | None = None,
        *,
        namespace: str = "default",
        create: bool = True,
        sweeper: bool | None = None,
        mode: int | None = None,
        trusted_uids: Iterable[int] | None = None,
    ) -> None:
        self._hot = None
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
        if create not in (True, False):
            raise InvalidConfigError(f"create must be True or False, got {create!r}")
        self.namespace = namespace
        # A peer leaving with close(unlink_if_last=True) may remove the namespace after
        # Table.open found it and before this process registers in it: then open again,
        # which makes (or joins) a fresh table instead of failing.
        for _ in range(100):
            created = self._open(namespace, config, mode, trusted, create)
            if created is not None:
                break
        else:
            raise ContextManagerClosedError(
                f"namespace {namespace!r} keeps being unlinked while this process attaches")
        self._closed = False
        _live_managers.add(self)
        # Not at exit: the process's end frees its entry (others see it dead) and
        # everything else.
        self._finalizer = weakref.finalize(self, abandoned, self._entry)
        self._finalizer.atexit = False
        if (sweeper or (sweeper is None and created)) and self.config.cleanup_interval > 0:
            self._start_sweeper()

    def _open(self, namespace: str, config: ContextConfig | None, mode: int | None,
              trusted: frozenset[int], create: bool) -> bool | None:
        """Open the namespace's table and register this process in it. Returns whether
        the table was created, or None when it was unlinked before this process could
        register (the caller opens again)."""
        t, created = Table.open(namespace, config, 0o600 if mode is None else mode, trusted,
                                create)
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
        self._table = t
        # Views of the table for tests and tools that read raw bytes.
        self._buf, self._words, self._geo = t.buf, t.words, t.geo
        self._close_lock = threading.Lock()
        self._stop = threading.Event()  # ends the sweeper thread
        self._entry = ProcessEntry(t, self._stop)
        self._mappings = Mappings(t, t.config.lock_timeout, self._entry.holds)
        self._mapped = self._mappings.mapped  # name -> mapping (tests look at it)
        self._slots = Slots(t, self._entry, self._mappings)
        self._py = PyHotPath(self._slots)
        self._cold = ColdPath(self._slots, self._register)
        try:
            self._hot = _hotpath.choose(self._slots)
            self._register()
        except BaseException as e:
            unlinked = isinstance(e, ContextManagerClosedError) and \
                bool(t.flags() & L.FLAG_UNLINKED)
            if self._hot is not None:
                self._hot.close()
                self._hot = None
            t.close()
            if unlinked:
                return None
            raise
        return created

    @property
    def closed(self) -> bool:
        """Whether ``close()`` or ``unlink()`` has detached this manager."""
        return self._closed

    @property
    def mode(self) -> int:
        """The permission bits of every object of the namespace (fixed when its table
        was created)."""
        return self._table.mode

    @property
    def hot_path(self) -> str:
        """Which hot path this manager's gets and returns run: ``"C"`` (the compiled
        ``_speedups``) or ``"Python"`` (no compiler at install, or
        ``SHMCTX_PURE_PYTHON`` set when the manager was made). Both keep the same
        protocol; C is about ten times faster."""
        return "C" if self._hot is not None else "Python"

    @property
    def max_cached_mappings(self) -> int:
        """How many contexts this process holds no reference to stay mapped, the most
        recently used (64 unless set). Each costs a mapping and a descriptor, and a
        ``ctx.lock`` semaphore if its lock was used; getting one of them again maps
        nothing. 0 keeps only the contexts this process holds references to."""
        return self._mappings.max_cached

    @max_cached_mappings.setter
    def max_cached_mappings(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidConfigError(f"max_cached_mappings must be an int >= 0, got {n!r}")
        self._mappings.max_cached = n

    # --- context-manager protocol ---------------------------------------------------

    def __enter__(self) -> ContextManager:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._closed:
            self.close()

    def __repr__(self) -> str:
        return f"<ContextManager namespace={self.namespace!r}{' closed' if self._closed else ''}>"

    # --- public API -----------------------------------------------------------------

    @front
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
                handle = self._py.try_get(name)
                if handle is not None:
                    return handle, True
            name_b = check_name(name)
            _check_create_args(config, init, timeout)
            if config is not None and self._matches(name, config):
                handle = self._py.try_get(name)
                if handle is not None:
                    return handle, True
            self._check_open()
            return self._cold.get(name, name_b, config, init, True, timeout)
        except BaseException:
            self._recover_leaked_locks()
            raise

    def get_or_create_object(
        self,
        name: str,
        factory: Callable[[], object],
        *,
        timeout: float | None = None,
    ) -> tuple[MemoryContext, bool]:
        """Take a reference to context ``name``, which holds a Python object; if there
        is none, create it with what ``factory()`` returns. Returns ``(ctx, existed)``;
        ``ctx.load()`` gives the object.

        ``factory`` runs in exactly one process: the others wait for it, at most
        ``timeout`` seconds (then ``TimeoutError``), as for ``init``. Its result is
        pickled (protocol 5) with its large buffers (NumPy arrays, ``PickleBuffer``s)
        out of band, each laid in the context's memory 64-byte aligned, so that
        ``load()`` in every process rebuilds the object over one shared copy of them.
        An object that cannot be pickled raises ``TypeError``; if ``factory`` raises,
        the exception propagates. Either way nothing is left behind.
        ``InvalidContextTypeError`` if ``name`` exists and holds no object.

        >>> ctx, _ = m.get_or_create_object("model", lambda: {"w": numpy.ones(10**6)})
        >>> model = ctx.load()    # model["w"] is a read-only view of the shared memory
        """
        try:
            if self._closed:
                self._raise_closed()
            name_b = check_name(name)
            if not callable(factory):
                raise TypeError(f"factory must be a callable taking no argument, not "
                                f"{factory!r}")
            _check_timeout(timeout)
            m = self._mappings.get(name)
            if m is not None and m.kind == L.KIND_OBJECT:
                handle = self._py.try_get(name)
                if handle is not None:
                    return handle, True
            self._check_open()
            return self._cold.get(name, name_b, None, None, True, timeout, factory)
        except BaseException:
            self._recover_leaked_locks()
            raise

    def publish(
        self,
        name: str,
        config: MemoryContextConfig | None = None,
        *,
        init: Callable[[MemoryContext], object] | None = None,
        timeout: float | None = None,
    ) -> MemoryContext:
        """Make a new version of context ``name`` current, and return a reference to it.

        The new version (``config``, default an empty bytes context; it may differ from
        the current one's: another size, shape or dtype) is built completely in this
        process first: its memory made, ``init(ctx)`` run. No get can see it before
        that. Then it becomes current at once: every get after this returns it, and
        ``ctx.version`` is the previous one's plus one (1 if ``name`` did not exist:
        then this creates it). Holders of older versions keep reading exactly their
        bytes until they return them (``ctx.is_current`` tells them, ``refresh`` moves
        them on); an older version is freed with its last reference. If ``init`` raises
        (or this process dies) before the switch, the current version stays current
        and nothing is left behind. Two processes publishing one name at once both
        succeed, one after the other, with distinct versions.

        >>> new = m.publish("emb", MemoryContextConfig.for_array((1000, 64), "float32"),
        ...                 init=lambda c: c.array(writeable=True).fill(2.0))
        """
        try:
            if self._closed:
                self._raise_closed()
            name_b = check_name(name)
            _check_create_args(config, init, timeout)
            self._check_open()
            return self._cold.publish(name, name_b, config or MemoryContextConfig(), init,
                                      None, timeout)
        except BaseException:
            self._recover_leaked_locks()
            raise

    def publish_object(
        self,
        name: str,
        obj: object = None,
        *,
        factory: Callable[[], object] | None = None,
        timeout: float | None = None,
    ) -> MemoryContext:
        """``publish`` for an object context (``get_or_create_object``): the new
        version holds ``obj``, or what ``factory()`` returns (run in this process), and
        every later ``load()`` of ``name`` sees it.

        >>> m.publish_object("model", new_model)
        """
        try:
            if self._closed:
                self._raise_closed()
            name_b = check_name(name)
            if factory is not None:
                if obj is not None:
                    raise TypeError("publish_object() takes an object or a factory, not both")
                if not callable(factory):
                    raise TypeError(f"factory must be a callable taking no argument, not "
                                    f"{factory!r}")
                make = factory
            else:
                def make() -> object:
                    return obj
            _check_timeout(timeout)
            self._check_open()
            return self._cold.publish(name, name_b, MemoryContextConfig(), None, make, timeout)
        except BaseException:
            self._recover_leaked_locks()
            raise

    def refresh(self, ctx: MemoryContext, *, timeout: float | None = None) -> MemoryContext:
        """``ctx`` itself if it is the current version of its name; else a reference to
        the current version, and ``ctx`` returned (in that order: if the get fails,
        ``ctx`` is still held). A worker calls it where it is safe to let go of the old
        version, e.g. at the start of each request."""
        if not isinstance(ctx, MemoryContext):
            raise TypeError(f"refresh() takes a MemoryContext, not {type(ctx).__name__}")
        if ctx.is_current:
            return ctx
        new = self.get_context(ctx.name, timeout=timeout)
        try:
            self.return_context(ctx)
        except ContextClosedError:
            pass  # its context was closed: no reference is left to give back
        return new

    @front
    def get_context(self, name: str, *, timeout: float | None = None) -> MemoryContext:
        """Take a reference to the existing context ``name`` (``ContextNotFoundError`` if
        there is none). A context still being initialised is waited for."""
        try:
            if self._closed:
                self._raise_closed()
            name_b = check_name(name)
            _check_timeout(timeout)
            handle = self._py.try_get(name)
            if handle is not None:
                return handle
            self._check_open()
            return self._cold.get(name, name_b, None, None, False, timeout)[0]
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
    ) -> Generator[MemoryContext, None, None]:
        """``with m.context(name) as ctx:`` gets or creates the context and returns the
        reference on exit, also when the block raises."""
        ctx, _ = self.get_or_create_context(name, config, init=init, timeout=timeout)
        try:
            yield ctx
        finally:
            return_at_block_end(self, ctx)

    @front
    def return_context(self, ctx: MemoryContext) -> None:
        """Release the one reference ``ctx`` stands for and stamp the context's
        last-used time."""
        try:
            if isinstance(ctx, MemoryContext) and not self._closed and \
                    self._py.try_return(ctx):
                return
            # Not one this manager can return now: say why.
            check_returnable(ctx, self._mappings, identity.pid)
            if self._closed:
                self._raise_closed()
            raise ContextError(f"context {ctx.name!r}: this handle was already returned")
        except BaseException:
            self._recover_leaked_locks()
            raise

    def close_context(self, name: str, force: bool = False) -> None:
        """Close context ``name`` and its children. ``ContextInUseError`` while
        references remain, unless ``force``: then every outstanding handle becomes
        invalid."""
        try:
            self._check_open()
            name_b = check_name(name)
            with self._table.table_lock:
                self._slots.close_named(name, name_b, force)
        except BaseException:
            self._recover_leaked_locks()
            raise

    def validate_context(self, ctx: MemoryContext) -> bool:
        """True only if ``ctx``'s context still exists as the same incarnation, is not
        closed, and this handle has not been returned."""
        if not isinstance(ctx, MemoryContext):
            raise TypeError(f"validate_context() takes a MemoryContext, not {type(ctx).__name__}")
        self._check_open()
        if returned(ctx) or owner_of(ctx) is not self._mappings:
            return False
        m = mapping_of(ctx)
        state: int
        state, _rc, inc = L.S_CHECK.unpack_from(self._table.buf, m.off)
        return state == L.READY and inc == m.inc

    def contexts(self) -> list[ContextInfo]:
        """A snapshot of every context in the namespace."""
        try:
            snap = self._snapshot()
            out: list[ContextInfo] = []
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
                    kind=_payload.KIND_NAMES.get(s.kind, f"invalid({s.kind})"),
                    version=s.version,
                    superseded=bool(s.flags & L.SLOT_SUPERSEDED),
                    pending=bool(s.flags & L.SLOT_PENDING),
                ))
            return sorted(out, key=lambda i: (i.name, i.version))
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
            report = sweep_once(self._slots)
            self._mappings.prune()
            return report
        except BaseException:
            self._recover_leaked_locks()
            raise

    def supervise(self, stop: threading.Event, interval: float | None = None) -> None:
        """Run the namespace's sweeper in the calling thread until ``stop`` is set, as a
        supervisor process does (``ctx-supervisor``): sweep now and then every
        ``interval`` seconds (default ``cleanup_interval``, or 1 s if that is 0) while
        this process leads the sweep, standing by while another live process leads."""
        self._check_open()
        supervise(self._slots, stop, interval)

    def reclaim(self, pid: int) -> int:
        """Reclaim at once the references of ``pid``, a process known to be dead (a
        supervisor's ``child_exit``). Returns how many references were released.
        Refuses (``ContextInUseError``) a pid that is still alive."""
        try:
            self._check_open()
            if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
                raise InvalidConfigError(f"pid must be a positive int, got {pid!r}")
            with self._table.table_lock:
                return self._slots.reclaim_pid(pid)
        except BaseException:
            self._recover_leaked_locks()
            raise

    def close(self, *, unlink_if_last: bool = False) -> None:
        """Detach this process: stop its sweeper, return every reference it still holds,
        unmap. Other processes are unaffected.

        With ``unlink_if_last``, a manager that is the last one registered in the
        namespace by a live process unlinks it instead (as ``unlink()``). This is how
        peers without a supervisor (uvicorn workers, several Dask nannies of one host)
        leave nothing behind: each gives back its entry first, then asks under the table
        lock whether a live process is still registered, so of peers leaving at once the
        last to ask unlinks; a process attaching at that moment makes a fresh namespace
        instead of joining the removed one."""
        if unlink_if_last not in (True, False):
            raise InvalidConfigError(
                f"unlink_if_last must be True or False, got {unlink_if_last!r}")
        try:
            with self._close_lock:
                if self._closed:
                    self._raise_closed()
                self._set_closed()
            self._stop_sweeper()
            removed = False
            try:
                self._entry.give_back()
                # Asked only after this process's entry is given back: of peers leaving at
                # once, each asks after its own leaving, so the last to ask sees every one
                # gone and unlinks (an earlier one may see a peer still registered).
                removed = unlink_if_last and self._remove_if_alone()
            finally:
                self._detach()
            if removed:
                self._remove_leftovers()
                log.info("namespace %r: pid %d was the last process attached; namespace "
                         "unlinked", self.namespace, identity.pid)
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
                    busy: dict[int, int] = {}  # pid -> references
                    for p in range(t.geo.max_processes):
                        pid = t.proc_head(p).pid
                        if not pid or pid == identity.pid:  # our own other managers do not count
                            continue
                        n = sum(c for _s, c in t.proc_refs(p))
                        if n and t.liveness.entry_alive(p):
                            busy[pid] = busy.get(pid, 0) + n
                    if busy:
                        raise ContextInUseError(
                            f"namespace {self.namespace!r}: live processes hold references "
                            f"({', '.join(f'pid {p}: {n}' for p, n in busy.items())}); "
                            "pass force=True to unlink anyway"
                        )
                self._remove_locked()
            with self._close_lock:
                self._set_closed()
            self._finish_unlink()
        except BaseException:
            self._recover_leaked_locks()
            raise

    def _remove_locked(self) -> None:
        """Mark the table unlinked, close every context, remove the names. Needs the
        table lock."""
        t = self._table
        t.mark_unlinked()
        self._slots.close_all()
        t.unlink_names()

    def _finish_unlink(self) -> None:
        """After ``_remove_locked`` and ``_set_closed``: detach, then remove what is left
        of the namespace."""
        self._stop_sweeper()
        self._detach()
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """After an unlink: remove the objects of contexts that were still being made."""
        remove_stale(self.namespace, _shm.namespace_objects(self.namespace),
                     self._table.tag, None)

    def _remove_if_alone(self) -> bool:
        """For ``close(unlink_if_last=True)``, once this manager's entry is given back:
        when no registered entry (of another process, or of another manager of this one)
        belongs to a live process, and no peer unlinked the namespace already, remove it
        (``_remove_locked``) and return True."""
        t = self._table
        with t.table_lock:
            if t.flags() & L.FLAG_UNLINKED:
                return False
            for p in range(t.geo.max_processes):
                if t.proc_head(p).pid and t.liveness.entry_alive(p):
                    return False
            self._remove_locked()
        return True

    # --- internals ------------------------------------------------------------------

    @property
    def _proc(self) -> int:
        """This manager's process entry (-1 before it registers)."""
        return self._entry.proc

    def _matches(self, name: str, config: MemoryContextConfig) -> bool:
        m = self._mappings.get(name)
        if m is None or m.kind != config.kind or m.parent != config.parent:
            return False
        if config.kind == L.KIND_ARRAY:
            # The cached mapping may be of an incarnation closed since: a mismatch is
            # judged by the cold path, against the context that has the name now.
            try:
                check_spec(m, config)
            except ContextError:
                return False
            return True
        return m.size == config.size

    def _register(self) -> None:
        """Register this process's entry, then turn the hot path on for it."""
        self._slots.register()
        e = self._entry
        # Last: other threads take the hot path as soon as the pid matches, and must then
        # find this process's own entry, not the parent's.
        e.ready_pid = identity.pid
        if self._hot is not None:
            self._hot.enable(identity.pid, identity.start, e.row_off)

    def _recover_leaked_locks(self) -> None:
        """An exception is leaving one of this thread's calls: recover any table or
        stripe lock the thread left held on the way (an interrupt between taking a lock
        and the ``try`` that releases it; see RobustLock.leaked). Every public method
        ends here on an exception, so no other process waits for such a lock for longer
        than it takes the exception to leave the call."""
        # The public method the exception is leaving may have taken a lock in its own
        # frame (return_context does): that frame is on its way out.
        self._table.recover_leaked_locks(_getframe(1))

    def _snapshot(self) -> Snapshot:
        self._check_open()
        t = self._table
        with t.table_lock:
            data = bytes(t.buf)
        return decode(data)

    def _check_open(self) -> None:
        if self._closed:
            self._raise_closed()

    def _raise_closed(self) -> None:
        raise ContextManagerClosedError(
            f"ContextManager of namespace {self.namespace!r} is closed"
        )

    def _set_closed(self) -> None:
        """Mark closed (under the close lock), the C hot path off first."""
        self._closed = True
        self._mappings.closed = True
        if self._hot is not None:
            self._hot.disable()

    def _start_sweeper(self) -> None:
        self._sweeper = threading.Thread(
            target=run_sweeper, args=(weakref.ref(self._slots), self._stop),
            name=f"shmctx-sweeper[{self.namespace}]", daemon=True,
        )
        self._sweeper.start()

    def _after_fork(self) -> None:
        """In a forked child. The child has no sweeper thread and no references; it
        registers its own process entry on first use. Locks held by other threads at
        fork time are recreated."""
        # The C hot path goes off first, before anything that can fail (the arbiter
        # opens a descriptor, which fails at the descriptor limit): left on, it would
        # book the child's references in the parent's process entry.
        if self._hot is not None:
            self._hot.disable()  # until the child registers its own entry
        self._sweeper = None
        self._stop = threading.Event()
        self._entry.after_fork(self._stop)
        self._close_lock = threading.Lock()
        self._table.arbiter.reset_after_fork()
        self._mappings.after_fork()
        # The child runs no init of its own yet: one its parent was running when it
        # forked goes on in the parent, and the child waits for it like any process.
        self._slots.initialising.clear()

    def _stop_sweeper(self) -> None:
        self._stop.set()
        th = self._sweeper
        if th is not None and th is not threading.current_thread():
            th.join()

    def _detach(self) -> None:
        self._finalizer.detach()  # closed: nothing is left to give back when collected
        _live_managers.discard(self)
        self._mappings.unmap_all()
        if self._hot is not None:
            self._hot.close()  # it holds the table's buffer, which must go before the mmap
        self._table.close()


def return_at_block_end(m: ContextManager, ctx: MemoryContext) -> None:
    """The end of a ``with``/``async with`` block over a context (``m.context``,
    ``shmctx.asgi.context``): return ``ctx`` unless the block returned it itself, the
    manager was closed meanwhile, or the context was force-closed (nothing left to
    return then)."""
    if not returned(ctx) and not m.closed:
        try:
            m.return_context(ctx)
        except ContextClosedError:
            pass
