"""The cold path of a get: the first get of a context in this process, a create, a
wait for another process's init, and every case the hot path defers.

It looks the name up under the table lock and then, by what it finds: takes a
reference to a ready context and maps it; claims a slot, makes the memory, runs
``init`` and publishes; or waits for the process creating it. Each pass follows
progress made elsewhere, and every wait ends at the caller's deadline.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from time import monotonic

import posix_ipc

from . import _failpoints, _payload, _shm
from . import _layout as L
from ._config import MemoryContextConfig
from ._context import MemoryContext, check_spec, mark_counted
from ._entry import holding
from ._errors import (
    ContextError,
    ContextNotFoundError,
    MaxReferencesReachedError,
)
from ._proc import identity
from ._slots import Slots
from ._table import name_hash

__all__ = ["ColdPath"]


def _kind(cfg: MemoryContextConfig, factory: object) -> int:
    """What a context made with ``cfg`` (and ``factory``, for an object) holds."""
    return L.KIND_OBJECT if factory is not None else cfg.kind


class ColdPath:
    """The cold path of one manager. ``register`` registers this process's entry
    (and turns the hot path on for it)."""

    def __init__(self, slots: Slots, register: Callable[[], None]) -> None:
        self.slots = slots
        self.mappings = slots.mappings
        self.table = slots.table
        self.register = register

    def get(
        self,
        name: str,
        name_b: bytes,
        config: MemoryContextConfig | None,
        init: Callable[[MemoryContext], object] | None,
        create: bool,
        timeout: float | None,
        factory: Callable[[], object] | None = None,
    ) -> tuple[MemoryContext, bool]:
        """A handle on ``name`` and whether it existed. ``factory``: the context holds
        the object it returns (``get_or_create_object``), made by this process if the
        context does not exist (``config`` and ``init`` are then None)."""
        slots, t = self.slots, self.table
        slots.entry.ensure(self.register)
        slots.return_dropped()
        ns = slots.namespace
        h = name_hash(name_b)
        deadline = None if timeout is None else monotonic() + timeout
        reclaimed_once = False
        # Every pass but the first follows progress made elsewhere (a context published,
        # closed or re-created, a dead creator's slot freed, dead references reclaimed);
        # damage that would make the same pass again is raised instead (Slots.damaged),
        # and every wait, the table lock's included, ends at the deadline.
        retry = False
        while True:
            if retry and deadline is not None and monotonic() >= deadline:
                raise TimeoutError(f"timed out after {timeout}s getting context {name!r} in "
                                   f"namespace {ns!r}")
            retry = True
            # A reference counted below and not yet held by a handle: given back if
            # anything (the context gone, another user's object, no descriptor left,
            # Ctrl-C) stops this pass before the handle is made.
            counted: tuple[int, int] | None = None
            # A slot claimed by this pass, removed if anything (an interrupt above all)
            # stops the pass before the context is published: its creator lives, so no
            # sweep would ever remove it, and every get of the name would wait for it.
            claims: list[tuple[int, int]] = []
            creator = identity.pid
            try:
                wait: tuple[int, int, posix_ipc.Semaphore] | None = None
                with holding(t.table_lock, deadline):
                    t.check_usable()
                    slot = t.find(name_b, h)
                    if slot >= 0:
                        f = t.read_slot(slot)
                        state, inc, size, kind = f.state, f.incarnation, f.size, f.kind
                        if state not in (L.CREATING, L.READY):
                            raise slots.damaged(name, slot, inc,
                                                f"its slot {slot} holds state {state}, not a state")
                        if state == L.READY:
                            # Checked once it is ready, not while it is being created:
                            # a dead creator's context is removed by the wait below and
                            # then made afresh with this config.
                            if config is not None:
                                slots.check_config(name, f, config)
                            if factory is not None and kind != L.KIND_OBJECT:
                                raise _payload.kind_error(name, kind, L.KIND_OBJECT)
                            parent_name = slots.parent_name(f)
                            try:
                                slots.take_ref(name, slot, inc)
                                counted = (slot, inc)
                            except MaxReferencesReachedError:
                                if reclaimed_once or not slots.reclaim_dead(locked=True):
                                    raise
                                reclaimed_once = True
                                continue
                        else:
                            if slots.initialising.get((slot, inc)) == threading.get_ident():
                                raise ContextError(
                                    f"context {name!r} is being initialised by this thread: "
                                    "its init cannot get it (use the handle init receives)"
                                )
                            sem = slots.register_waiter(slot, inc)
                            if sem is None:
                                continue  # published (or removed) meanwhile: look again
                            wait = (slot, inc, sem)
                    else:
                        if not create:
                            raise ContextNotFoundError(f"no context {name!r} in namespace {ns!r}")
                        cfg = config or MemoryContextConfig()
                        kind = _kind(cfg, factory)
                        slots.claim(name, name_b, h, cfg, kind, claims)
                        slot, inc = claims[0]
                        size = cfg.size
                if wait is not None:
                    slots.wait_for_init(name, *wait, deadline, timeout)
                    continue
                # Set by the pass above: cfg where it created the context, parent_name
                # where it took a reference to a ready one (pyright cannot follow that).
                if claims:  # this pass claimed the slot: create the context
                    return self._finish_create(name, slot, inc, cfg, init, factory), False  # pyright: ignore[reportPossiblyUnboundVariable]
                try:
                    m = self.mappings.map(name, slot, inc, size, parent_name, kind)  # pyright: ignore[reportPossiblyUnboundVariable]
                    if config is not None:
                        check_spec(m, config)  # raised: the reference is given back below
                    handle = MemoryContext(self.mappings, m, identity.pid, False)
                except posix_ipc.ExistentialError:
                    counted = None  # first: an interrupt now leaks it, never gives it twice
                    slots.undo_ref(slot, inc)
                    # Closed between our reference and the mapping (look again), or the
                    # memory is gone while the table still says ready: damage, raised.
                    with holding(t.table_lock, deadline):
                        state, _rc, now_inc = L.S_CHECK.unpack_from(t.buf, t.geo.slot_off(slot))
                        if state == L.READY and now_inc == inc:
                            path = _shm.host_path(t.segment(slot, inc))
                            raise slots.damaged(name, slot, inc, f"its memory segment {path} is "
                                                "gone (removed by something other than shmctx: "
                                                "systemd-logind's RemoveIPC, an rm)") from None
                    continue
                # From here the handle stands for the reference. No call that runs Python
                # code comes between these two statements, so no signal handler can run
                # between them.
                counted = None
                mark_counted(handle)
                return handle, True
            except BaseException:
                # A lock this frame took and an interrupt left held (in the ``with``'s
                # exit, say) is recovered first: the undo below takes it again.
                t.recover_leaked_locks(sys._getframe(0))
                if counted is not None:
                    slots.undo_ref(*counted)
                if identity.pid == creator:  # not a forked child: the slot is its parent's
                    for slot, inc in claims:
                        slots.abort_create(name, slot, inc)  # nothing once published
                raise

    def publish(self, name: str, name_b: bytes, cfg: MemoryContextConfig,
                init: Callable[[MemoryContext], object] | None,
                factory: Callable[[], object] | None,
                timeout: float | None) -> MemoryContext:
        """A new version of ``name``, built here (``init`` or ``factory`` run in this
        process) in a slot no get can find, then made current (``Slots.switch``)."""
        slots, t = self.slots, self.table
        slots.entry.ensure(self.register)
        slots.return_dropped()
        deadline = None if timeout is None else monotonic() + timeout
        kind = _kind(cfg, factory)
        claims: list[tuple[int, int]] = []
        creator = identity.pid
        try:
            with holding(t.table_lock, deadline):
                t.check_usable()
                slots.claim(name, name_b, name_hash(name_b), cfg, kind, claims, pending=True)
            return self._finish_create(name, *claims[0], cfg, init, factory, pending=name_b)
        except BaseException:
            # An interrupt between the claim and _finish_create's own cleanup must not
            # leave a pending slot behind (its creator lives, so no sweep would remove it).
            t.recover_leaked_locks(sys._getframe(0))  # as in get
            if identity.pid == creator:
                for slot, inc in claims:
                    slots.abort_create(name, slot, inc)
            raise

    def _finish_create(self, name: str, slot: int, inc: int, cfg: MemoryContextConfig,
                       init: Callable[[MemoryContext], object] | None,
                       factory: Callable[[], object] | None,
                       pending: bytes | None = None) -> MemoryContext:
        """Make the memory of the context just claimed, run ``init``, publish it. With
        ``factory``, the memory holds what it returns, pickled: its size is known only
        then, so the memory is made after it runs (the others wait all the same).
        ``pending``: the name (UTF-8) of a new version being published: made current by
        ``Slots.switch`` instead."""
        # A failure anywhere here is undone by the caller (get, publish), which removes
        # every slot its pass claimed: this one included.
        slots, t, mappings = self.slots, self.table, self.mappings
        size = cfg.size
        kind = _kind(cfg, factory)
        creator = identity.pid
        packed = None
        if factory is not None:
            if _failpoints.armed:
                _failpoints.hit("create.in_factory")
            obj = self._run_once(name, slot, inc, creator, factory)
            packed = _payload.pack_object(obj, f"context {name!r}")
            del obj  # the pickled buffers keep what they need until written
            size = packed.size
            if _failpoints.armed:
                _failpoints.hit("create.object_packed")
        mm = None
        if size:
            mm = _shm.create_segment(
                t.segment(slot, inc), size, t.mode,
                what=f"context {name!r} in namespace {slots.namespace!r}",
                trusted=t.trusted,
            )
        if _failpoints.armed:
            _failpoints.hit("create.segment_made")
        m = mappings.mapping(name, slot, inc, size, mm, cfg.parent, kind)
        # The payload before init, and before anyone else can map it.
        if packed is not None:
            packed.write(m.view)
        elif kind == L.KIND_ARRAY:
            assert cfg.shape is not None  # an array context's config has a shape
            meta, n = _payload.array_meta(cfg.shape, cfg.dtype)
            _payload.write_header(m.view, kind, meta, n)
        handle = MemoryContext(mappings, m, identity.pid)
        if init is not None:
            if pending is None:  # a pending version is no get's to find, even here
                mappings.keep(m)
            if _failpoints.armed:
                _failpoints.hit("create.in_init")
            self._run_once(name, slot, inc, creator, lambda: init(handle))
        if pending is not None and _failpoints.armed:
            _failpoints.hit("publish.built")
        if pending is None:
            slots.publish(name, slot, inc, m)
        else:
            try:
                with holding(t.table_lock, None):
                    slots.switch(name, pending, slot, inc, m)
            except BaseException:
                # Once the new version is ready the switch must complete (a table repair
                # would complete it anyway, later): then the reference this call would
                # have handed back is given back, since the exception loses the handle.
                t.recover_leaked_locks(sys._getframe(0))  # left held by the with's exit
                with holding(t.table_lock, None):
                    if slots.settle(name, pending, slot, inc):
                        slots.undo_ref(slot, inc)
                raise
        mappings.keep(m)
        mappings.added()
        return handle

    def _run_once(self, name: str, slot: int, inc: int, creator: int,
                  fn: Callable[[], object]) -> object:
        """Run the user's ``init`` or factory of the context this thread creates: a get
        of the same context from inside it is an error, not a wait for itself."""
        slots = self.slots
        slots.initialising[(slot, inc)] = threading.get_ident()
        try:
            result = fn()
        finally:
            slots.initialising.pop((slot, inc), None)
        if identity.pid != creator:
            # It forked and this is the child, back from it: the context is its parent's
            # to publish (or remove), not ours.
            raise ContextError(
                f"context {name!r}: pid {identity.pid} was forked inside its init (or "
                f"factory) by pid {creator}, which creates it; the child cannot publish it"
            )
        return result
