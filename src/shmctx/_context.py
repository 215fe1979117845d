"""What users hold: ``MemoryContext`` handles, ``ContextInfo`` snapshots, ``SweepReport``."""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import msgpack

from . import _layout as L
from . import _payload
from ._errors import (
    ContextClosedError,
    ContextError,
    InvalidConfigError,
    InvalidContextTypeError,
)
from ._lock import ContextLock

if TYPE_CHECKING:
    # NumPy is needed only by array contexts, and imported only when one is read; type
    # checkers see what array() returns.
    from numpy.typing import NDArray

    from ._config import MemoryContextConfig
    from ._lock import RobustLock

__all__ = ["MemoryContext", "ContextInfo", "SweepReport"]


class HandleOwner(Protocol):
    """What a handle needs of the manager that made it: three questions and a queue.
    (``_mappings.Mappings`` answers them; a handle never sees the manager itself.)"""

    namespace: str
    closed: bool  # the manager was closed: nothing is given back through it any more
    # (mapping, pid) of handles dropped without being returned, queued by their
    # finalizer for the manager to give back where it holds no lock.
    dropped: list[tuple[_Mapped, int]]

    def is_open(self, m: _Mapped) -> bool:
        """Whether ``m``'s context is still open as the incarnation it mapped."""
        ...

    def version_of(self, m: _Mapped) -> tuple[int, bool]:
        """(version, newest): ``m``'s version of its name, and whether it is the
        current one (no newer version published, not closed, the manager open)."""
        ...

    def lock_of(self, m: _Mapped) -> ContextLock:
        """The one ``ctx.lock`` object of ``m``'s context in this process."""
        ...

# put()/get() frame at offset 0 of a context's memory: magic, length, then msgpack bytes.
_VALUE_HEAD = struct.Struct("<4sI")
_VALUE_MAGIC = b"SMV1"
_NO_VALUE = object()


class _Mapped:
    """This process's mapping of one context incarnation, shared by its handles.

    The manager's cache (``Mappings.mapped``) keeps it after its handles are
    returned, so the next get of the same context maps nothing, but only while the
    context is open and, among those this process holds no reference to, only the
    most recently used (``Mappings.prune``). Out of the cache it lives
    exactly as long as something of this process still uses it: a handle (returned or
    not), a buffer exported from it (``ctx.buf``, a numpy array over it), a thread in
    ``put``. With the last of them it goes, by reference counting: the memory is
    unmapped (and its descriptor closed) when the ``mmap`` object is freed, and its
    ``ctx.lock`` semaphore closed when that lock object is (``_MappedLock``). Nothing
    here refers back to the mapping from those objects, so no cycle waits for the
    garbage collector.
    """

    __slots__ = ("name", "slot", "inc", "size", "mm", "view", "lock", "parent", "off", "stripe",
                 "hot", "kind", "payload")

    def __init__(self, name: str, slot: int, inc: int, size: int, mm: mmap.mmap | None,
                 parent: str | None, off: int, stripe: RobustLock, stripe_index: int,
                 kind: int = L.KIND_BYTES):
        self.name = name
        self.slot = slot
        self.inc = inc
        self.size = size
        self.mm = mm
        self.view = memoryview(mm) if mm is not None else memoryview(b"")
        self.lock: _MappedLock | None = None
        self.parent = parent
        # The slot's offset in the table and its stripe lock, looked up once per mapping
        # rather than on every get and return.
        self.off = off
        self.stripe = stripe
        # The same, as the C hot path (_speedups.c) reads it: one attribute, plain ints.
        self.hot = (off, stripe_index, inc, slot)
        self.kind = kind  # what the memory holds: the slot's kind, L.KIND_*
        self.payload: _payload.Payload | None = None  # read once, by payload_of

    def unmap(self) -> None:
        """Unmap now (the manager is closing, or a creation failed): handles still
        around see the context as closed. Its lock object goes with its last user
        (``_MappedLock``)."""
        self.lock = None
        try:
            self.view.release()
            if self.mm is not None:
                self.mm.close()
        except BufferError:
            pass  # the user still exports it (numpy, a slice): it unmaps when they let go


def payload_of(m: _Mapped) -> _payload.Payload:
    """The payload of a typed context's mapping, read from its memory once."""
    p = m.payload
    if p is None:
        try:
            p = _payload.read(m.view, m.kind)
        except ContextError as e:
            raise ContextError(f"context {m.name!r} (incarnation {m.inc}): {e}") from None
        m.payload = p
    return p


def data_of(m: _Mapped) -> memoryview:
    """A new view of the context's data: all of its memory for a bytes context, the
    payload's data for a typed one."""
    if m.kind == L.KIND_BYTES:
        return m.view[:]
    p = payload_of(m)
    return m.view[p.data_off:p.data_off + p.data_len]


def check_spec(m: _Mapped, config: MemoryContextConfig) -> None:
    """``InvalidConfigError`` naming both if the array ``config`` asks for is not the
    one mapping ``m`` holds (same kind already checked against the slot)."""
    if config.kind != L.KIND_ARRAY:
        return
    shape, dt = payload_of(m).array_spec()
    if shape != config.shape or dt != config.dtype:
        raise InvalidConfigError(
            f"context {m.name!r} exists with another array: requested "
            f"{_payload.describe(config.shape, config.dtype)} != existing "
            f"{_payload.describe(shape, dt)}")


class _MappedLock(ContextLock):
    """``ctx.lock`` of one context incarnation in this process; it owns its semaphore
    and closes it when the last reference to it goes.

    Not sooner: ``sem_close`` unmaps the semaphore, so closing it under a thread that
    sleeps in ``sem_wait`` on it (or will post it) would pull the memory from under that
    thread. Such a thread always references this object (its ``with`` block, its frame
    in ``acquire``), so the last reference cannot go while one holds or waits on it. A
    lock acquired with ``acquire()`` and held without any reference is kept referenced
    by its mapping: the cache keeps a mapping whose lock a thread of this process holds.

    The manager finds a live one by incarnation (``Mappings.lock_of``, through a weak
    registry), so a context mapped again while an older lock object of it is still in
    use here gets that same object: one lock object per context incarnation and
    manager, which the lock's re-entrancy needs (two objects would each let the same
    thread in, or make it wait for itself).
    """

    __slots__ = ("__weakref__",)

    def held_here(self) -> bool:
        """Whether a thread holds it now (re-entered or not)."""
        return self._depth > 0

    def __del__(self) -> None:
        try:
            self.sem.close()
        except Exception:  # closed already, or the interpreter is exiting
            pass


class MemoryContext:
    """A handle on one reference to a context. Each handle is one reference: return it
    once with ``ContextManager.return_context`` (or use ``ContextManager.context``).

    Two handles of the same context incarnation compare (and hash) equal.
    """

    __slots__ = ("_owner", "_mapped", "_pid", "_returned", "_view", "__weakref__")

    def __init__(self, owner: HandleOwner, mapped: _Mapped, pid: int,
                 counted: bool = True) -> None:
        # The C hot path (_speedups.c, new_handle) makes handles without calling this and
        # sets the same five fields: keep the two in step. ``counted=False``: the
        # reference is yet to be counted, so until the caller marks it (``mark_counted``),
        # the handle stands for none (its finalizer gives nothing back).
        self._owner = owner
        self._mapped = mapped
        self._pid = pid
        self._returned = not counted
        self._view: memoryview | None = None

    @property
    def name(self) -> str:
        """The context's name in its namespace."""
        return self._mapped.name

    @property
    def size(self) -> int:
        """Bytes of shared memory the context owns."""
        return self._mapped.size

    @property
    def incarnation(self) -> int:
        """Unique per namespace: a context closed and created again gets a new one."""
        return self._mapped.inc

    @property
    def version(self) -> int:
        """Which version of its name this context is: 1 for the first, then one more for
        each ``ContextManager.publish`` of the name."""
        self._ensure_valid()
        return self._owner.version_of(self._mapped)[0]

    @property
    def is_current(self) -> bool:
        """False once a newer version of the name was published (or the context was
        closed): ``ContextManager.refresh`` then gives the current one. A handle keeps
        its own version's bytes until it is returned, whatever is published meanwhile."""
        return not self._returned and self._owner.version_of(self._mapped)[1]

    @property
    def kind(self) -> str:
        """What the context holds: ``"bytes"`` (``buf``, ``put``/``get``), ``"array"``
        (``array()``) or ``"object"`` (``load()``)."""
        k = self._mapped.kind
        return _payload.KIND_NAMES.get(k, f"invalid({k})")  # a damaged slot's byte

    @property
    def buf(self) -> memoryview:
        """The context's memory, the same bytes in every process (zero-copy). For an
        array context, the array's bytes; for an object context, the pickled object and
        its buffers.

        Raises ``ContextClosedError`` once the handle was returned or the context was
        closed; the view itself is released when the handle is returned.
        """
        self._ensure_valid()
        if self._view is None:
            self._view = data_of(self._mapped)
        return self._view

    def array(self, writeable: bool = False) -> NDArray[Any]:
        """The context's NumPy array (``MemoryContextConfig.for_array``), over the
        shared memory itself: nothing is copied, and every process sees the same
        elements. Read-only unless ``writeable``.

        The array stays valid after ``return_context`` (it keeps the memory mapped in
        this process until it is garbage collected), but once the handle is returned
        nothing stops the context from being closed and another version from taking
        its name: return the handle when you are done with the array.
        ``InvalidContextTypeError`` if the context holds no array.

        >>> emb = ctx.array()          # emb.flags.writeable is False
        >>> ctx.array(writeable=True)[0] = 1.0
        """
        self._ensure_valid()
        m = self._mapped
        if m.kind != L.KIND_ARRAY:
            raise _payload.kind_error(self.name, m.kind, L.KIND_ARRAY)
        try:
            arr: NDArray[Any] = _payload.array_view(data_of(m), payload_of(m), writeable)
            return arr
        except ContextError as e:
            raise ContextError(f"context {self.name!r}: {e}") from None

    def load(self) -> Any:
        """The object stored with ``ContextManager.get_or_create_object``, rebuilt from
        the shared memory: its large buffers (NumPy arrays, ``pickle.PickleBuffer``s)
        are read-only views of that memory, not copies; the rest is unpickled anew on
        each call. ``InvalidContextTypeError`` if the context holds no object.

        Unpickling runs code chosen by whoever wrote the context: load only from a
        namespace whose writers you trust (by default only your own user can open it).
        """
        self._ensure_valid()
        m = self._mapped
        if m.kind != L.KIND_OBJECT:
            raise _payload.kind_error(self.name, m.kind, L.KIND_OBJECT)
        try:
            return _payload.load_object(data_of(m), payload_of(m))
        except ContextError as e:
            raise ContextError(f"context {self.name!r}: {e}") from None

    @property
    def lock(self) -> ContextLock:
        """A cross-process lock for this context: ``with ctx.lock: ...``, or
        ``ctx.lock.acquire(timeout=...)`` / ``release()``. Re-entrant for the thread that
        holds it (``put`` and ``get`` take it too). If its holder dies, the next waiter
        takes it over (within ``lock_timeout``, usually about 10 ms)."""
        self._ensure_valid()
        return self._owner.lock_of(self._mapped)

    def put(self, obj: Any) -> None:
        """Store one msgpack-encoded value in the context's memory, under its lock.

        A value that does not fit raises ``ValueError``, one msgpack cannot encode
        ``TypeError``; in both cases nothing is written. ``put`` and ``buf`` share the same
        bytes: use one or the other on a context.
        """
        self._bytes_only("put")
        try:
            data = msgpack.packb(obj, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as e:
            raise TypeError(f"context {self.name!r}: cannot encode {type(obj).__name__} "
                            f"with msgpack: {e}") from None
        need = _VALUE_HEAD.size + len(data)
        if need > self.size:
            raise ValueError(
                f"value of {len(data)} bytes (+{_VALUE_HEAD.size} header) does not fit in "
                f"context {self.name!r} of {self.size} bytes"
            )
        with self.lock:
            view = self._mapped.view
            # Invalidate first, publish last: a reader after a crash mid-write sees no
            # value rather than half of one.
            _VALUE_HEAD.pack_into(view, 0, b"\0\0\0\0", 0)
            view[_VALUE_HEAD.size : need] = data
            _VALUE_HEAD.pack_into(view, 0, _VALUE_MAGIC, len(data))

    def get(self, default: Any = None) -> Any:
        """The value last stored with ``put``, or ``default`` if there is none."""
        self._bytes_only("get")
        if self.size < _VALUE_HEAD.size:
            self._ensure_valid()
            return default
        with self.lock:
            view = self._mapped.view
            magic, length = _VALUE_HEAD.unpack_from(view, 0)
            if magic != _VALUE_MAGIC or _VALUE_HEAD.size + length > self.size:
                return default
            data = bytes(view[_VALUE_HEAD.size : _VALUE_HEAD.size + length])
        return msgpack.unpackb(data, raw=False, strict_map_key=False)

    def __del__(self) -> None:
        # A handle dropped without return_context: an exception (Ctrl-C above all) between
        # a get and the code that would have returned it. Its reference must not stay
        # booked to this process for the rest of its life. Returning it here could wait
        # for a stripe lock this very thread holds (a finalizer runs at any allocation),
        # so it is queued, and the manager returns it at its next call or sweep. When the
        # C hot path is built, a C function with the same logic replaces this one
        # (_speedups.c, handle_finalize): this one costs as much as a get/return pair.
        if getattr(self, "_returned", True) is False and not self._owner.closed:
            self._owner.dropped.append((self._mapped, self._pid))  # ^ never fully made

    def _bytes_only(self, what: str) -> None:
        if self._mapped.kind != L.KIND_BYTES:
            raise InvalidContextTypeError(
                f"context {self.name!r} holds {self.kind}: {what}() stores msgpack values "
                "in a bytes context only")

    def _ensure_valid(self) -> None:
        if self._returned:
            raise ContextClosedError(f"context {self.name!r}: this handle was returned")
        if not self._owner.is_open(self._mapped):
            raise ContextClosedError(
                f"context {self.name!r} (incarnation {self._mapped.inc}) was closed"
            )

    def _release_view(self) -> None:
        if self._view is not None:
            try:
                self._view.release()
            except BufferError:
                pass
            self._view = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MemoryContext):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> tuple[str, int, int]:
        return (self._owner.namespace, self._mapped.slot, self._mapped.inc)

    def __repr__(self) -> str:
        state = "returned" if self._returned else "held"
        return (f"<MemoryContext {self.name!r} ns={self._owner.namespace!r} "
                f"size={self.size} incarnation={self._mapped.inc} {state}>")


# The handle's part of the get and return protocol (_hotpath.py), for the modules that
# make and return handles: the fields stay the handle's own.

def mark_counted(h: MemoryContext) -> None:
    """``h`` now stands for the reference counted for it (get, step G8)."""
    h._returned = False


def returned(h: MemoryContext) -> bool:
    """Whether ``h`` stands for no reference (returned, or never counted)."""
    return h._returned


def mapping_of(h: MemoryContext) -> _Mapped:
    return h._mapped


def owner_of(h: MemoryContext) -> HandleOwner:
    return h._owner


def returnable(h: MemoryContext, owner: HandleOwner, pid: int) -> _Mapped | None:
    """``h``'s mapping if ``h`` stands for a reference ``owner`` can return in process
    ``pid`` (return, step R1), else None."""
    if h._owner is owner and h._pid == pid and h._returned is False:
        return h._mapped
    return None


def check_returnable(h: object, owner: HandleOwner, pid: int) -> _Mapped:
    """``h``'s mapping, if ``h`` is a handle that ``owner`` may return in process
    ``pid``; else the error that says why not."""
    if not isinstance(h, MemoryContext):
        raise TypeError(f"return_context() takes a MemoryContext, not {type(h).__name__}")
    if h._owner is not owner:
        raise ContextError(
            f"context {h.name!r} was acquired through another ContextManager "
            f"(namespace {h._owner.namespace!r}); return it there"
        )
    if h._pid != pid:
        raise ContextError(
            f"context {h.name!r} was acquired by pid {h._pid}; pid {pid} cannot return it "
            "(a handle inherited over fork is not a reference of the child)"
        )
    return h._mapped


def mark_returned(h: MemoryContext) -> bool:
    """Mark ``h`` returned (return, step R4); False if it was already. Under the stripe
    lock: marked before the counts change, so a return interrupted part way (Ctrl-C)
    may leak this one reference, but never give it back twice (once by the caller,
    once by the handle's finalizer), which would take away another handle's."""
    if h._returned:
        return False
    h._returned = True
    return True


# Let go of the view ``h.buf`` handed out (return, last step): the method itself, so
# that the hot path makes one call here, not two.
release_view: Callable[[MemoryContext], None] = MemoryContext._release_view


@dataclass(frozen=True)
class ContextInfo:
    """A snapshot of one context, as ``ContextManager.contexts()`` returns it.

    ``created`` and ``last_used`` are wall-clock timestamps (``time.time()`` scale);
    ``idle`` is seconds since the last return, measured on CLOCK_MONOTONIC.
    """

    name: str
    size: int
    state: str
    refcount: int
    holders: dict[int, int]
    created: float
    last_used: float
    idle: float
    incarnation: int
    parent: str | None
    kind: str = "bytes"  # what it holds: "bytes", "array" or "object"
    version: int = 1  # of its name (ContextManager.publish)
    superseded: bool = False  # a newer version is current; this one goes with its holders
    pending: bool = False  # a version being published, not yet current


@dataclass
class SweepReport:
    """What one sweep did."""

    closed: list[str] = field(default_factory=list[str])
    reclaimed: dict[int, int] = field(default_factory=dict[int, int])  # dead pid -> references
    skipped_in_use: list[str] = field(default_factory=list[str])
    orphans_removed: list[str] = field(default_factory=list[str])
    locks_recovered: int = 0  # locks taken over from dead owners and released
    duration: float = 0.0
    damaged: list[str] = field(default_factory=list[str])  # contexts closed as damaged

    def __bool__(self) -> bool:
        return bool(self.closed or self.reclaimed or self.orphans_removed
                    or self.locks_recovered or self.damaged)
