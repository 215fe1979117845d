"""Validated configuration objects: ``ContextConfig`` and ``MemoryContextConfig``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Union

from . import _layout as L
from . import _payload
from ._errors import InvalidConfigError

__all__ = [
    "ContextConfig",
    "MemoryContextConfig",
    "DEFAULT_MAX_REFERENCES",
    "DEFAULT_MAX_IDLE_TIME",
    "DEFAULT_CLEANUP_INTERVAL",
    "DEFAULT_CAPACITY",
    "DEFAULT_LOCK_TIMEOUT",
    "DEFAULT_MAX_PROCESSES",
]

DEFAULT_MAX_REFERENCES = 10
DEFAULT_MAX_IDLE_TIME = 300.0
DEFAULT_CLEANUP_INTERVAL = 60.0
DEFAULT_CAPACITY = 1024
DEFAULT_LOCK_TIMEOUT = 1.0
DEFAULT_MAX_PROCESSES = 256

# The least lock_timeout. A waiter condemns a lock whose semaphore is taken but whose
# owner record stays empty for one lock_timeout (the holder died between sem_wait and
# writing the record). A live holder sits in that window for a few instructions, but a
# process can be descheduled there, or wait there for the GIL behind its own busy
# threads, for a scheduler slice or several: a lock_timeout of a millisecond takes such
# a holder for dead and lets a second one in. 0.1 s is well beyond that on a loaded host.
MIN_LOCK_TIMEOUT = 0.1

# Hard limits of the table layout (see _layout.py).
MAX_CAPACITY = 1 << 20
MAX_PROCESSES_LIMIT = 1 << 16
MAX_REFERENCES_LIMIT = (1 << 32) - 1
# Every process entry has a reference count for every slot (4 bytes each): the table
# grows as capacity x max_processes. This caps that part at 256 MiB, so that a table
# (or a hostile file posing as one, which ctx-inspect reads whole) stays a sane size.
MAX_REFERENCE_COUNTS = 1 << 26

Duration = Union[float, int, timedelta]  # noqa: UP007 - a runtime alias on 3.10


def _duration(field: str, value: object, *, positive: bool = False,
              least: float = 0.0) -> float:
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidConfigError(
            f"{field} must be a number of seconds or a timedelta, not {type(value).__name__}"
        )
    else:
        seconds = float(value)
    if math.isnan(seconds) or math.isinf(seconds):
        raise InvalidConfigError(f"{field} must be finite, got {value!r}")
    if seconds < 0 or (positive and seconds == 0):
        raise InvalidConfigError(
            f"{field} must be {'> 0' if positive else '>= 0'} seconds, got {value!r}"
        )
    if seconds < least:
        raise InvalidConfigError(
            f"{field} must be at least {least} seconds, got {value!r}: shorter, a live "
            "holder that is merely slow could be taken for a dead one"
        )
    return seconds


def _count(field: str, value: object, *, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidConfigError(f"{field} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise InvalidConfigError(f"{field} must be in [{low}, {high}], got {value}")
    return value


@dataclass(frozen=True)
class ContextConfig:
    """Namespace-wide settings, stored in the table and shared by every process.

    Durations are seconds (``float``) or ``timedelta``. ``max_references=0`` means
    unlimited, ``max_idle_time=0`` means idle contexts are never closed,
    ``cleanup_interval=0`` means no automatic sweeping. ``capacity`` is the number
    of context slots, ``max_processes`` the number of processes that can be attached
    at once, ``lock_timeout`` how long a waiter trusts a lock holder before it checks
    whether the holder is dead.
    """

    # The durations are stored as float seconds (__post_init__), whatever they were
    # given as: the fields say what they hold, the signature below what they accept.
    max_references: int = DEFAULT_MAX_REFERENCES
    max_idle_time: float = DEFAULT_MAX_IDLE_TIME
    cleanup_interval: float = DEFAULT_CLEANUP_INTERVAL
    capacity: int = DEFAULT_CAPACITY
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    max_processes: int = DEFAULT_MAX_PROCESSES

    if TYPE_CHECKING:
        # For type checkers only (at run time the dataclass makes __init__ from the
        # fields above, in this order): a duration may be given as a timedelta.
        def __init__(self, max_references: int = DEFAULT_MAX_REFERENCES,
                     max_idle_time: Duration = DEFAULT_MAX_IDLE_TIME,
                     cleanup_interval: Duration = DEFAULT_CLEANUP_INTERVAL,
                     capacity: int = DEFAULT_CAPACITY,
                     lock_timeout: Duration = DEFAULT_LOCK_TIMEOUT,
                     max_processes: int = DEFAULT_MAX_PROCESSES) -> None: ...

    def __post_init__(self) -> None:
        norm = {
            "max_references": _count(
                "max_references", self.max_references, low=0, high=MAX_REFERENCES_LIMIT
            ),
            "max_idle_time": _duration("max_idle_time", self.max_idle_time),
            "cleanup_interval": _duration("cleanup_interval", self.cleanup_interval),
            "capacity": _count("capacity", self.capacity, low=1, high=MAX_CAPACITY),
            "lock_timeout": _duration("lock_timeout", self.lock_timeout, positive=True,
                                      least=MIN_LOCK_TIMEOUT),
            "max_processes": _count(
                "max_processes", self.max_processes, low=1, high=MAX_PROCESSES_LIMIT
            ),
        }
        if norm["capacity"] * norm["max_processes"] > MAX_REFERENCE_COUNTS:
            raise InvalidConfigError(
                f"capacity x max_processes must be at most {MAX_REFERENCE_COUNTS} (each "
                "process entry keeps a 4-byte reference count per slot), got "
                f"{norm['capacity']} x {norm['max_processes']}"
            )
        for name, value in norm.items():
            object.__setattr__(self, name, value)

    def differences(self, other: ContextConfig) -> list[str]:
        """Names of the fields whose values differ, as ``field: ours != theirs``."""
        return [
            f"{f.name}: {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


@dataclass(frozen=True)
class MemoryContextConfig:
    """Per-context settings: ``size`` bytes of shared memory (0 = metadata only) and
    an optional ``parent`` context whose closing also closes this one.

    An array context (``for_array``) also records its ``shape`` and ``dtype``; its
    ``size`` is computed from them (the array plus a 64-byte-aligned header).
    """

    size: int = 0
    parent: str | None = None
    shape: tuple[int, ...] | None = None
    dtype: Any = None  # a numpy.dtype, for an array context

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int):
            raise InvalidConfigError(f"size must be an int, not {type(self.size).__name__}")
        if not 0 <= self.size < 1 << 62:
            raise InvalidConfigError(f"size must be in [0, 2**62) bytes, got {self.size}")
        if self.parent is not None and not isinstance(self.parent, str):
            raise InvalidConfigError(
                f"parent must be a context name or None, not {type(self.parent).__name__}"
            )
        if self.shape is None and self.dtype is None:
            return
        if self.shape is None or self.dtype is None:
            raise InvalidConfigError("an array context needs both shape and dtype "
                                     "(MemoryContextConfig.for_array)")
        shape, dt = _payload.array_spec(self.shape, self.dtype)
        size, _n = _payload.array_layout(shape, dt)
        if self.size not in (0, size):
            raise InvalidConfigError(
                f"size {self.size} does not match shape {shape} and dtype {dt} ({size} "
                "bytes with the header): leave size out of an array config")
        # Normalized, so that two configs of one array compare equal.
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dtype", dt)
        object.__setattr__(self, "size", size)

    @classmethod
    def for_array(cls, shape: int | Sequence[int], dtype: Any,
                  parent: str | None = None) -> MemoryContextConfig:
        """The config of a context holding one NumPy array of ``shape`` and ``dtype``
        (any dtype with a fixed item size, structured ones included; C order; the data
        64-byte aligned). Read it with ``ctx.array()``.

        >>> cfg = MemoryContextConfig.for_array((1000, 64), "float32")
        >>> ctx, _ = m.get_or_create_context("emb", cfg,
        ...                                  init=lambda c: c.array(writeable=True).fill(0))
        """
        return cls(parent=parent, shape=shape, dtype=dtype)  # type: ignore[arg-type]

    @property
    def kind(self) -> int:
        """What the context's memory holds (``_layout.KIND_*``)."""
        return L.KIND_BYTES if self.shape is None else L.KIND_ARRAY
