"""Typed contents of a context's memory: a NumPy array, or a pickled Python object
whose large buffers are laid out beside it so that loading them copies nothing.

A raw context's memory is the user's bytes from offset 0. A typed one (its slot's
``kind`` says which; the slot, not these bytes, is trusted for that) starts with a
payload header (``_layout.PAYLOAD``), then its metadata, msgpack-encoded, then the data
at ``data_off``, a multiple of 64 (``_layout.PAYLOAD_ALIGN``), as every buffer inside
it: a cache line, and the alignment NumPy and Arrow expect of SIMD-friendly data. ::

    0            64                    data_off                       data_off + data_len
    | header     | metadata (msgpack)  | data: the array, or the pickle stream and its
                                         out-of-band buffers, each 64-byte aligned

* Array (``KIND_ARRAY``): metadata ``{"shape": [...], "descr": ...}``, the dtype in
  the form NumPy's own ``.npy`` files use (``numpy.lib.format.dtype_to_descr``), so a
  structured dtype survives; the data is the array in C order.
* Object (``KIND_OBJECT``): metadata ``{"pickle": [off, len], "buffers": [[off, len],
  ...]}``, offsets from ``data_off``. The object was pickled with protocol 5 and a
  ``buffer_callback``: every buffer the pickler handed out of band (NumPy arrays,
  ``pickle.PickleBuffer``, Arrow buffers) is one of ``buffers``, and ``load`` gives them
  back to the unpickler as read-only views of the shared memory.

Unpickling runs code chosen by whoever wrote the bytes: a context is exactly as safe
to load as its namespace is to write, which is why namespaces are owner-only unless
their creator widens them (docs/architecture.md, "Who may share a namespace").

NumPy is optional: it is imported when an array is asked for, and its absence is an
``ImportError`` that names the extra to install.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, cast

import msgpack

from . import _layout as L
from ._errors import ContextError, InvalidConfigError, InvalidContextTypeError

__all__ = [
    "Payload", "Packed", "array_layout", "array_meta", "array_view", "describe", "dtype_of",
    "load_object", "pack_object", "read", "write_header",
]

KIND_NAMES = {L.KIND_BYTES: "bytes", L.KIND_ARRAY: "array", L.KIND_OBJECT: "object"}


def numpy() -> Any:
    """The numpy module, or the ImportError that says how to get it."""
    try:
        import numpy
    except ImportError:
        raise ImportError(
            "shmctx arrays need NumPy: install it with `pip install 'shmctx[numpy]'`"
        ) from None
    return numpy


def _align(n: int) -> int:
    return -(-n // L.PAYLOAD_ALIGN) * L.PAYLOAD_ALIGN


# --- arrays -------------------------------------------------------------------------

def dtype_of(dtype: Any) -> Any:
    """``dtype`` as a ``numpy.dtype`` fit for shared memory, or ``InvalidConfigError``."""
    np = numpy()
    try:
        dt = np.dtype(dtype)
    except Exception as e:  # NumPy's parser raises TypeError, ValueError, SyntaxError...
        raise InvalidConfigError(f"dtype {dtype!r} is not a NumPy dtype: {e}") from None
    if dt.hasobject:
        raise InvalidConfigError(
            f"dtype {dt} holds Python object references, which mean nothing in another "
            "process: use get_or_create_object for Python objects"
        )
    if dt.itemsize == 0:
        raise InvalidConfigError(f"dtype {dt} has no fixed item size (give one, e.g. 'S16')")
    return dt


def array_spec(shape: Any, dtype: Any) -> tuple[tuple[int, ...], Any]:
    """(shape, dtype) as an array of them really is: a subarray dtype such as
    ``("f8", (2, 3))`` folds into the shape, as NumPy itself folds it when it makes the
    array. ``InvalidConfigError`` for what cannot be shared or recorded."""
    dims, dt = shape_of(shape), dtype_of(dtype)
    if dt.subdtype is not None:
        dt, sub = dt.subdtype
        dims += sub
        dt = dtype_of(dt)
    np = numpy()
    back = np.lib.format.descr_to_dtype(_descr_in(_roundtrip(np.lib.format.dtype_to_descr(dt))))
    if back != dt:
        raise InvalidConfigError(f"dtype {dt} cannot be recorded with the context (it would "
                                 f"read back as {back})")
    try:
        np.empty((0,) * len(dims))  # NumPy's own limit on dimensions
    except ValueError as e:
        raise InvalidConfigError(f"shape {dims}: {e}") from None
    return dims, dt


def _roundtrip(descr: Any) -> Any:
    """``descr`` as it comes back from msgpack."""
    return msgpack.unpackb(msgpack.packb(descr, use_bin_type=True), raw=False)


def shape_of(shape: Any) -> tuple[int, ...]:
    """``shape`` (an int or a sequence of ints) as a tuple, or ``InvalidConfigError``."""
    dims = (shape,) if isinstance(shape, int) else shape
    try:
        dims = tuple(dims)
    except TypeError:
        raise InvalidConfigError(f"shape must be an int or a sequence of ints, not "
                                 f"{type(shape).__name__}") from None
    for d in dims:
        if isinstance(d, bool) or (not isinstance(d, int) and not hasattr(d, "__index__")):
            raise InvalidConfigError(f"shape {shape!r}: {d!r} is not an int")
        if int(d) < 0:
            raise InvalidConfigError(f"shape {shape!r}: {d} is negative")
    return tuple(int(d) for d in dims)


def array_meta(shape: tuple[int, ...], dt: Any) -> tuple[bytes, int]:
    """(metadata, data bytes) of an array of ``shape`` and ``dt``."""
    descr = numpy().lib.format.dtype_to_descr(dt)
    n = dt.itemsize
    for d in shape:
        n *= d
    return msgpack.packb({"shape": list(shape), "descr": descr}, use_bin_type=True), n


def array_layout(shape: tuple[int, ...], dt: Any) -> tuple[int, int]:
    """(memory size, data bytes) of an array context of ``shape`` and ``dt``."""
    meta, n = array_meta(shape, dt)
    size = _align(L.PAYLOAD.size + len(meta)) + n
    if size >= 1 << 62:
        raise InvalidConfigError(f"an array of shape {shape} and dtype {dt} is too large "
                                 f"({n} bytes)")
    return size, n


def _descr_in(d: Any) -> Any:
    """A descr back from msgpack (lists where NumPy wants tuples)."""
    if isinstance(d, str):
        return d
    fields: list[tuple[Any, ...]] = []
    for f in d:
        name = tuple(f[0]) if isinstance(f[0], list) else f[0]
        rest = [_descr_in(f[1])] + ([tuple(f[2])] if len(f) > 2 else [])
        fields.append((name, *rest))
    return fields


def describe(shape: tuple[int, ...] | None, dt: Any) -> str:
    return f"shape {shape} dtype {dt}"


# --- the header ---------------------------------------------------------------------

@dataclass(frozen=True)
class Payload:
    """A typed context's header and metadata, as read from its memory."""

    kind: int
    meta: dict[str, Any]
    data_off: int
    data_len: int

    def array_spec(self) -> tuple[tuple[int, ...], Any]:
        """(shape, dtype) of an array payload."""
        return self._array_spec

    # Parsed once per payload (and a payload is read once per mapping): a get of an array
    # context already mapped checks its config against it on every call. An exception is
    # not cached, so damaged metadata raises every time.
    @cached_property
    def _array_spec(self) -> tuple[tuple[int, ...], Any]:
        np = numpy()
        try:
            shape = shape_of(self.meta["shape"])
            dt = dtype_of(np.lib.format.descr_to_dtype(_descr_in(self.meta["descr"])))
        except (KeyError, TypeError, ValueError, InvalidConfigError) as e:
            raise ContextError(f"the array metadata is damaged: {e}") from None
        return shape, dt


def write_header(view: memoryview, kind: int, meta: bytes, data_len: int) -> int:
    """Write a payload header and its metadata at the start of ``view``; the offset of
    the data. The header last: a reader of a half-written one finds no magic."""
    data_off = _align(L.PAYLOAD.size + len(meta))
    if data_off + data_len > len(view):
        raise ValueError(f"payload of {data_off + data_len} bytes in {len(view)}")
    view[L.PAYLOAD.size:L.PAYLOAD.size + len(meta)] = meta
    header = L.PAYLOAD.struct.pack(*L.Payload(
        magic=L.PAYLOAD_MAGIC, kind=kind, meta_len=len(meta), data_off=data_off,
        data_len=data_len))
    view[:len(header)] = header
    return data_off


def read(view: memoryview, kind: int) -> Payload:
    """The payload of a context whose slot says ``kind``; ``ContextError`` if its
    bytes are not a whole one of that kind (damaged, or still being written)."""
    size = len(view)
    if size < L.PAYLOAD.size:
        raise ContextError(f"its memory ({size} bytes) is too small for a payload header")
    h = L.Payload.read(view)
    if h.magic != L.PAYLOAD_MAGIC or h.kind != kind:
        raise ContextError("its memory holds no payload header of its kind (damaged, or "
                           "written over through buf)")
    meta_end = L.PAYLOAD.size + h.meta_len
    if meta_end > h.data_off or h.data_off % L.PAYLOAD_ALIGN or \
            h.data_off + h.data_len > size:
        raise ContextError(f"its payload header is damaged (metadata {h.meta_len} bytes, "
                           f"data {h.data_len} bytes at {h.data_off}, memory {size} bytes)")
    try:
        meta = msgpack.unpackb(view[L.PAYLOAD.size:meta_end], raw=False)
    except Exception as e:  # msgpack raises several types for damaged bytes
        raise ContextError(f"its payload metadata is damaged: {e}") from None
    if not isinstance(meta, dict):
        raise ContextError("its payload metadata is damaged: not a map")
    # A map, as written by array_meta or the object writer below; its keys and values
    # are checked where they are used.
    return Payload(kind, cast("dict[str, Any]", meta), h.data_off, h.data_len)


# --- arrays over the memory -----------------------------------------------------------

def array_view(data: memoryview, p: Payload, writeable: bool) -> Any:
    """An ndarray over ``data`` (the payload's data, a view of the shared memory)."""
    np = numpy()
    shape, dt = p.array_spec()
    n = dt.itemsize
    for d in shape:
        n *= d
    if n != len(data):
        raise ContextError(f"the array metadata ({describe(shape, dt)}, {n} bytes) does "
                           f"not match its data ({len(data)} bytes)")
    # frombuffer, not ndarray(buffer=...): the array then holds an export of the view,
    # so the mapping cannot be closed under it (mmap.close raises BufferError while one
    # is exported); ndarray(buffer=) keeps only the mmap object, which closes regardless,
    # and the next read of the array is a segfault.
    count = 1
    for d in shape:
        count *= d
    src = data if writeable else data.toreadonly()
    return np.frombuffer(src, dtype=dt, count=count).reshape(shape)


# --- objects ------------------------------------------------------------------------

@dataclass(frozen=True)
class Packed:
    """An object pickled for a context: ``size`` bytes of memory, filled by ``write``."""

    size: int
    write: Callable[[memoryview], None]


def pack_object(obj: object, what: str) -> Packed:
    """Pickle ``obj`` (protocol 5, large buffers out of band). ``TypeError`` naming
    ``what`` if it cannot be pickled."""
    buffers: list[pickle.PickleBuffer] = []
    try:
        stream = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        raws = [b.raw() for b in buffers]
    except (pickle.PicklingError, TypeError, AttributeError, BufferError, ValueError) as e:
        raise TypeError(f"{what}: cannot pickle {type(obj).__name__}: {e}") from None
    parts: list[tuple[int, int]] = []
    at = 0
    for n in [len(stream)] + [r.nbytes for r in raws]:
        parts.append((at, n))
        at = _align(at + n)
    meta = msgpack.packb({"pickle": list(parts[0]), "buffers": [list(p) for p in parts[1:]]},
                         use_bin_type=True)
    data_len = parts[-1][0] + parts[-1][1]
    size = _align(L.PAYLOAD.size + len(meta)) + data_len

    def write(view: memoryview) -> None:
        data_off = _align(L.PAYLOAD.size + len(meta))
        for (off, n), src in zip(parts, [memoryview(stream), *raws], strict=True):
            view[data_off + off:data_off + off + n] = src
        write_header(view, L.KIND_OBJECT, meta, data_len)

    return Packed(size, write)


def load_object(data: memoryview, p: Payload) -> Any:
    """The object of an object payload; its out-of-band buffers are read-only views of
    ``data``, so whatever the unpickler builds on them (NumPy arrays) shares the memory."""
    try:
        (po, pn) = p.meta["pickle"]
        spans = [(int(o), int(n)) for o, n in p.meta["buffers"]]
        po, pn = int(po), int(pn)
    except (KeyError, TypeError, ValueError) as e:
        raise ContextError(f"the object metadata is damaged: {e}") from None
    for o, n in [(po, pn), *spans]:
        if o < 0 or n < 0 or o + n > len(data):
            raise ContextError(f"the object metadata is damaged: span {o}+{n} outside "
                               f"{len(data)} bytes of data")
    ro = data.toreadonly()
    return pickle.loads(ro[po:po + pn], buffers=[ro[o:o + n] for o, n in spans])


def kind_error(name: str, kind: int, wanted: int) -> InvalidContextTypeError:
    return InvalidContextTypeError(
        f"context {name!r} holds {KIND_NAMES.get(kind, f'kind {kind}')}, not "
        f"{'an' if wanted == L.KIND_ARRAY or wanted == L.KIND_OBJECT else 'a'} "
        f"{KIND_NAMES[wanted]}"
    )
