"""What users hold: ``MemoryContext`` handles, ``ContextInfo`` snapshots, ``SweepReport``."""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack

from ._errors import ContextClosedError

if TYPE_CHECKING:
    from ._lock import ContextLock, RobustLock
    from ._manager import ContextManager

__all__ = ["MemoryContext", "ContextInfo", "SweepReport"]

# put()/get() frame at offset 0 of a context's memory: magic, length, then msgpack bytes.
_VALUE_HEAD = struct.Struct("<4sI")
_VALUE_MAGIC = b"SMV1"
_NO_VALUE = object()


class _Mapped:
    """This process's mapping of one context incarnation, shared by its handles and kept
    after they are returned, so the next get of the same context maps nothing."""

    __slots__ = ("name", "slot", "inc", "size", "mm", "view", "lock", "parent", "off", "stripe",
                 "hot")

    def __init__(self, name: str, slot: int, inc: int, size: int, mm: mmap.mmap | None,
                 parent: str | None, off: int, stripe: RobustLock, stripe_index: int):
        self.name = name
        self.slot = slot
        self.inc = inc
        self.size = size
        self.mm = mm
        self.view = memoryview(mm) if mm is not None else memoryview(b"")
        self.lock: ContextLock | None = None
        self.parent = parent
        # The slot's offset in the table and its stripe lock, looked up once per mapping
        # rather than on every get and return.
        self.off = off
        self.stripe = stripe
        # The same, as the C hot path (_speedups.c) reads it: one attribute, plain ints.
        self.hot = (off, stripe_index, inc, slot)

    def unmap(self) -> None:
        try:
            self.view.release()
            if self.mm is not None:
                self.mm.close()
        except BufferError:
            pass  # the user still exports it (numpy, a slice): it unmaps when they let go


class MemoryContext:
    """A handle on one reference to a context. Each handle is one reference: return it
    once with ``ContextManager.return_context`` (or use ``ContextManager.context``).

    Two handles of the same context incarnation compare (and hash) equal.
    """

    __slots__ = ("_manager", "_mapped", "_pid", "_returned", "_view", "__weakref__")

    def __init__(self, manager: ContextManager, mapped: _Mapped, pid: int) -> None:
        # The C hot path (_speedups.c, new_handle) makes handles without calling this and
        # sets the same five fields: keep the two in step.
        self._manager = manager
        self._mapped = mapped
        self._pid = pid
        self._returned = False
        self._view: memoryview | None = None

    @property
    def name(self) -> str:
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
    def buf(self) -> memoryview:
        """The context's memory, the same bytes in every process (zero-copy).

        Raises ``ContextClosedError`` once the handle was returned or the context was
        closed; the view itself is released when the handle is returned.
        """
        self._ensure_valid()
        if self._view is None:
            self._view = self._mapped.view[:]
        return self._view

    @property
    def lock(self) -> ContextLock:
        """A cross-process lock for this context: ``with ctx.lock: ...``, or
        ``ctx.lock.acquire(timeout=...)`` / ``release()``. Re-entrant for the thread that
        holds it (``put`` and ``get`` take it too). If its holder dies, the next waiter
        takes it over (within ``lock_timeout``, usually about 10 ms)."""
        self._ensure_valid()
        return self._manager._context_lock(self)

    def put(self, obj: Any) -> None:
        """Store one msgpack-encoded value in the context's memory, under its lock.

        A value that does not fit raises ``ValueError``, one msgpack cannot encode
        ``TypeError``; in both cases nothing is written. ``put`` and ``buf`` share the same
        bytes: use one or the other on a context.
        """
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

    def _ensure_valid(self) -> None:
        if self._returned:
            raise ContextClosedError(f"context {self.name!r}: this handle was returned")
        if not self._manager._is_current(self._mapped):
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
        return (self._manager.namespace, self._mapped.slot, self._mapped.inc)

    def __repr__(self) -> str:
        state = "returned" if self._returned else "held"
        return (f"<MemoryContext {self.name!r} ns={self._manager.namespace!r} "
                f"size={self.size} incarnation={self._mapped.inc} {state}>")


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


@dataclass
class SweepReport:
    """What one sweep did."""

    closed: list[str] = field(default_factory=list)
    reclaimed: dict[int, int] = field(default_factory=dict)  # dead pid -> references
    skipped_in_use: list[str] = field(default_factory=list)
    orphans_removed: list[str] = field(default_factory=list)
    locks_recovered: int = 0  # locks taken over from dead owners and released
    duration: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.closed or self.reclaimed or self.orphans_removed
                    or self.locks_recovered)
