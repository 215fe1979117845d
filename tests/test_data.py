"""Typed contexts, in real processes: array contexts (``MemoryContextConfig.for_array``,
``ctx.array()``) and object contexts (``get_or_create_object``, ``ctx.load()``), as the
docstrings of ``_payload.py``, ``MemoryContext.array/load/kind/buf``,
``MemoryContextConfig.for_array`` and ``ContextManager.get_or_create_object`` promise
them.

Races run under every start method (fork, spawn, forkserver). Worker bodies are
module-level functions (spawn and forkserver pickle them by name) that report through a
queue; a worker that fails reports its traceback, which fails the test at once. No
fixed sleeps: the parent waits on messages, events and joins, or polls a real condition
with a deadline.
"""

from __future__ import annotations

import ast
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from helpers import WAIT, Workers, follow_leg, wait_for

from shmctx import (
    ContextClosedError,
    ContextConfig,
    ContextManager,
    InvalidConfigError,
    InvalidContextTypeError,
    MemoryContextConfig,
    _shm,
)
from shmctx import _layout as L
from shmctx._snapshot import decode

pytestmark = pytest.mark.usefixtures("hot_path")  # each test on the C and Python hot path

# No automatic sweeping; a short lock_timeout so that a waiter finds a dead creator fast.
CFG = ContextConfig(lock_timeout=0.2, cleanup_interval=0, capacity=64, max_processes=32)
ALIGN = 64  # the alignment _payload promises for array data and every object buffer

# A structured dtype with a sub-array field and a fixed-size string; and an aligned one
# (padding bytes between fields) nesting another structure.
STRUCT = np.dtype([("id", "<i4"), ("pos", "<f4", (3,)), ("tag", "S5")])
NESTED = np.dtype([("flag", "u1"), ("p", [("x", "<f8"), ("y", "<f8")]), ("n", ">i2")],
                  align=True)


# --- harness -------------------------------------------------------------------------

def _open(ns: str, leg: str) -> ContextManager:
    follow_leg(leg)  # forkserver children do not inherit the leg's environment
    m = ContextManager(CFG, namespace=ns, sweeper=False)
    assert m.hot_path == leg, (m.hot_path, leg)
    return m


@pytest.fixture(params=["fork", "spawn", "forkserver"])
def workers(request):
    w = Workers(request.param)
    try:
        yield w
    finally:
        w.cleanup()


@pytest.fixture
def forked():
    w = Workers("fork")
    try:
        yield w
    finally:
        w.cleanup()


@pytest.fixture
def m(managers) -> ContextManager:
    return managers()


def _info(m: ContextManager, name: str):
    return next((i for i in m.contexts() if i.name == name), None)


def _span(ctx) -> tuple[int, int]:
    """[start, end) addresses of the context's data (``ctx.buf``) in this process."""
    base = np.frombuffer(ctx.buf, np.uint8)
    return base.ctypes.data, base.ctypes.data + base.nbytes


def _address(buf) -> int:
    """Address of the first byte of an array or a buffer (a loaded PickleBuffer)."""
    return buf.ctypes.data if isinstance(buf, np.ndarray) else \
        np.frombuffer(buf, np.uint8).ctypes.data


def _mapped_here(ns: str) -> list[str]:
    """Lines of this process's memory map and descriptors naming a context segment of
    ``ns`` (the table's own mapping excluded)."""
    prefix = _shm.host_path(f"shmctx@{ns}@")  # a context's segment; not sem.shmctx@...
    with open("/proc/self/maps") as f:
        lines = [ln for ln in f if prefix in ln]
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the descriptor listdir itself used, closed since
        if target.startswith(prefix):
            lines.append(f"fd {fd} -> {target}")
    return lines


# --- arrays: dtypes, shapes, layout ---------------------------------------------------

def _pattern(n: int) -> bytes:
    return bytes((i * 37 + 11) % 256 for i in range(n))


def _fill(ctx) -> None:
    """init of the array cases: every byte of the array set, through a writeable view."""
    a = ctx.array(writeable=True)
    a.reshape(-1).view(np.uint8)[:] = np.frombuffer(_pattern(a.nbytes), np.uint8)


def _describe_array(ctx) -> dict:
    """Everything the array cases compare, seen through ``ctx`` in this process."""
    a = ctx.array()
    try:
        a[...] = np.zeros(a.shape, a.dtype)
        write = "allowed"
    except ValueError:
        write = "ValueError"
    lo, hi = _span(ctx)
    return {
        "dtype": a.dtype, "shape": a.shape, "strides": a.strides,
        "c_contiguous": a.flags.c_contiguous, "writeable": a.flags.writeable,
        "write": write, "aligned": a.ctypes.data % ALIGN == 0,
        "inside": lo == a.ctypes.data and a.ctypes.data + a.nbytes == hi,
        "bytes": a.tobytes(), "buf": bytes(ctx.buf), "kind": ctx.kind,
    }


def _describe_body(q, ns, leg, name, cfg) -> None:
    m = _open(ns, leg)
    ctx, existed = m.get_or_create_context(name, cfg)
    q.put(("seen", os.getpid(), existed, _describe_array(ctx)))
    m.return_context(ctx)
    m.close()


ARRAY_CASES = [
    pytest.param((5,), "float32", id="float32"),
    pytest.param((2, 3, 4), "int16", id="int16-3d"),
    pytest.param(7, ">u4", id="int-shape-bigendian"),
    pytest.param((3,), "complex128", id="complex128"),
    pytest.param((9,), "?", id="bool"),
    pytest.param((2, 2), "M8[ms]", id="datetime64"),
    pytest.param((3,), "U4", id="unicode"),
    pytest.param((4,), STRUCT, id="structured"),
    pytest.param((2, 3), NESTED, id="structured-aligned-nested"),
    pytest.param((), "float64", id="0-d"),
    pytest.param((0,), "int32", id="empty"),
    pytest.param((3, 0), STRUCT, id="empty-2d-structured"),
    # A dtype with a fixed item size whose elements are themselves arrays.
    pytest.param((3,), "(2,3)f8", id="subarray-dtype"),
]


@pytest.mark.parametrize(("shape", "dtype"), ARRAY_CASES)
def test_array_dtypes_shapes_alignment_and_read_only(m, ns, hot_path, forked, shape, dtype):
    """An array context of any dtype with a fixed item size (structured, sub-array,
    0-d and empty shapes included) holds the array it was configured with, C order,
    its data 64-byte aligned, read-only unless asked; a process of its own sees the same
    dtype, shape and bytes."""
    cfg = MemoryContextConfig.for_array(shape, dtype)
    # The array NumPy itself makes of that shape and dtype, in C order (a sub-array dtype
    # adds its dimensions to the shape: "(2,3)f8" elements make float64 of shape (3, 2, 3)).
    ref = np.empty(shape, dtype)
    ctx, existed = m.get_or_create_context("a", cfg, init=_fill)
    assert existed is False and ctx.kind == "array"
    assert _info(m, "a").kind == "array"
    mine = _describe_array(ctx)
    forked.start(_describe_body, ns, hot_path, "a", cfg)
    _kind, _pid, child_existed, child = forked.recv("seen")
    forked.join()
    for seen in (mine, child):
        assert (seen["dtype"], seen["shape"]) == (ref.dtype, ref.shape)
        assert seen["c_contiguous"]
        if ref.size:  # an empty array's strides mean nothing (NumPy varies them)
            assert seen["strides"] == ref.strides
        assert seen["writeable"] is False and seen["write"] == "ValueError"
        assert seen["aligned"] and seen["inside"] and seen["kind"] == "array"
        assert seen["bytes"] == seen["buf"] == _pattern(ref.nbytes)
    assert child_existed is True
    w = ctx.array(writeable=True)
    assert w.flags.writeable and np.shares_memory(w, ctx.array()) == (w.nbytes > 0)
    del w
    m.return_context(ctx)
    assert m.check() == []


def _writer_body(q, ns, leg, parent_wrote) -> None:
    m = _open(ns, leg)
    ctx, existed = m.get_or_create_context("w", MemoryContextConfig.for_array((3, 4), "f8"))
    ro = ctx.array()
    try:
        ro[0, 0] = 1.0
        refused = "no"
    except ValueError:
        refused = "ValueError"
    ctx.array(writeable=True)[1] = [10.0, 11.0, 12.0, 13.0]
    q.put(("wrote", os.getpid(), existed, refused))
    parent_wrote.wait(WAIT)
    q.put(("read", os.getpid(), ro.tolist()))  # the read-only view sees later writes too
    m.return_context(ctx)
    m.close()


def test_writeable_array_writes_are_seen_by_another_process(m, ns, hot_path, forked):
    """``array()`` is read-only (writing raises ValueError); ``array(writeable=True)``
    writes the shared memory itself: each process sees the other's writes, also through
    a read-only array it took before them."""
    w = forked  # spawned and forkserver children read arrays in the race below
    ctx, _ = m.get_or_create_context("w", MemoryContextConfig.for_array((3, 4), "f8"),
                                     init=lambda c: c.array(writeable=True).fill(0.5))
    mine = ctx.array()
    parent_wrote = w.event()
    w.start(_writer_body, ns, hot_path, parent_wrote)
    assert w.recv("wrote")[2:] == (True, "ValueError")
    assert mine[1].tolist() == [10.0, 11.0, 12.0, 13.0]
    ctx.array(writeable=True)[2, :] = -1.0
    parent_wrote.set()
    assert w.recv("read")[2] == [[0.5] * 4, [10.0, 11.0, 12.0, 13.0], [-1.0] * 4]
    w.join()
    with pytest.raises(ValueError):
        mine[0, 0] = 2.0
    del mine
    m.return_context(ctx)
    assert m.check() == []


# --- arrays: mismatches and the wrong kind ------------------------------------------------

@pytest.mark.parametrize(("made", "asked", "names"), [
    pytest.param(((10, 4), "float32"), ((4, 10), "float32"), ("(10, 4)", "(4, 10)"),
                 id="shape-same-nbytes"),
    pytest.param(((8,), "float32"), ((8,), "int32"), ("float32", "int32"),
                 id="dtype-same-nbytes"),
    pytest.param(((8,), "float32"), ((16,), "float64"), ("(8,)", "(16,)", "float32", "float64"),
                 id="both"),
    pytest.param(((2,), STRUCT), ((2,), [("id", "<i4"), ("pos", "<f4", (3,)), ("tag", "S6")]),
                 ("S5", "S6"), id="structured-field"),
])
def test_another_array_config_is_refused_naming_both(managers, made, asked, names):
    """An array config that differs from the existing context's in shape or dtype, even
    of the same size in bytes, raises InvalidConfigError naming both; for a manager that
    has the context mapped and one that has not, and without keeping a reference."""
    m1, m2 = managers(), managers()
    have = MemoryContextConfig.for_array(*made)
    want = MemoryContextConfig.for_array(*asked)
    ctx, _ = m1.get_or_create_context("x", have)
    for m in (m1, m2):
        with pytest.raises(InvalidConfigError) as err:
            m.get_or_create_context("x", want)
        msg = str(err.value)
        assert "'x'" in msg and all(s in msg for s in names), msg
    assert _info(m1, "x").holders == {os.getpid(): 1}  # only ctx, nothing leaked
    again, existed = m2.get_or_create_context("x", have)  # the right one still works
    assert existed and again.array().shape == have.shape
    m1.return_context(ctx)
    m2.return_context(again)
    assert m1.check() == []


def test_bytes_config_and_array_config_refuse_each_other(m):
    """A bytes config against an array context, and an array config against a bytes
    (or object) context, raise InvalidConfigError naming both kinds."""
    arr, _ = m.get_or_create_context("arr", MemoryContextConfig.for_array((4,), "u1"))
    raw, _ = m.get_or_create_context("raw", MemoryContextConfig(size=arr.size))
    obj, _ = m.get_or_create_object("obj", lambda: {"k": 1})
    for name, cfg, requested, existing in [
        ("arr", MemoryContextConfig(size=arr.size), "bytes", "array"),
        ("arr", MemoryContextConfig(size=64), "bytes", "array"),
        ("raw", MemoryContextConfig.for_array((4,), "u1"), "array", "bytes"),
        ("obj", MemoryContextConfig.for_array((4,), "u1"), "array", "object"),
        ("obj", MemoryContextConfig(size=obj.size), "bytes", "object"),
    ]:
        with pytest.raises(InvalidConfigError) as err:
            m.get_or_create_context(name, cfg)
        msg = str(err.value)
        assert f"'{name}'" in msg and requested in msg and existing in msg, msg
    # Without a config, any kind is got as it is.
    for name, kind in (("arr", "array"), ("raw", "bytes"), ("obj", "object")):
        h, existed = m.get_or_create_context(name)
        assert existed and h.kind == kind
        m.return_context(h)
    assert {i.name: i.refcount for i in m.contexts()} == {"arr": 1, "obj": 1, "raw": 1}
    for h in (arr, raw, obj):
        m.return_context(h)
    assert m.check() == []


def test_each_kind_refuses_the_others_accessors(m):
    """``array()`` on a context holding no array, ``put``/``get`` on one that is not
    bytes, ``load()`` on one holding no object raise InvalidContextTypeError naming the
    context and what it holds; ``get_or_create_object`` of an existing bytes or array
    context too, without taking a reference."""
    raw, _ = m.get_or_create_context("raw", MemoryContextConfig(size=64))
    arr, _ = m.get_or_create_context("arr", MemoryContextConfig.for_array((2, 2), "f4"))
    obj, _ = m.get_or_create_object("obj", lambda: [1, 2, 3])
    calls = [
        ("raw", lambda: raw.array()), ("raw", lambda: raw.load()),
        ("arr", lambda: arr.put(1)), ("arr", lambda: arr.get()), ("arr", lambda: arr.load()),
        ("obj", lambda: obj.put(1)), ("obj", lambda: obj.get()), ("obj", lambda: obj.array()),
        ("raw", lambda: m.get_or_create_object("raw", lambda: 1)),
        ("arr", lambda: m.get_or_create_object("arr", lambda: 1)),
    ]
    held = {"arr": "array", "raw": "bytes", "obj": "object"}
    for name, call in calls:
        with pytest.raises(InvalidContextTypeError) as err:
            call()
        assert f"'{name}'" in str(err.value) and held[name] in str(err.value), str(err.value)
    assert {i.name: (i.kind, i.refcount) for i in m.contexts()} == {
        "arr": ("array", 1), "obj": ("object", 1), "raw": ("bytes", 1)}
    assert (raw.kind, arr.kind, obj.kind) == ("bytes", "array", "object")
    raw.put({"still": "works"})
    assert raw.get() == {"still": "works"} and obj.load() == [1, 2, 3]
    for h in (raw, arr, obj):
        m.return_context(h)
    assert m.check() == []


# --- arrays: bad input ----------------------------------------------------------------------

@pytest.mark.parametrize(("shape", "dtype", "says"), [
    pytest.param((3, -1), "f8", "negative", id="negative-dim"),
    pytest.param(-2, "f8", "negative", id="negative-int"),
    pytest.param((2.0, 3), "f8", "not an int", id="float-dim"),
    pytest.param(("3",), "f8", "not an int", id="str-dim"),
    pytest.param((3, None), "f8", "not an int", id="none-dim"),
    pytest.param((True, 2), "f8", "not an int", id="bool-dim"),
    pytest.param(False, "f8", "not an int", id="bool-shape"),
    pytest.param(3.0, "f8", "shape", id="float-shape"),
    pytest.param((1,) * 65, "f8", "dim", id="more-dims-than-numpy"),
    pytest.param((3,), "O", "object", id="object-dtype"),
    pytest.param((3,), [("a", "f8"), ("b", "O")], "object", id="object-field"),
    pytest.param((3,), "S", "item size", id="bytes-no-size"),
    pytest.param((3,), "U", "item size", id="unicode-no-size"),
    pytest.param((3,), "not-a-dtype", "dtype", id="nonsense-name"),
    pytest.param((3,), 3.5, "dtype", id="nonsense-number"),
    pytest.param((3,), "f8,,", "dtype", id="nonsense-comma-string"),
    pytest.param((3,), ("f8", -2), "dtype", id="negative-subarray"),
])
def test_bad_array_config_is_invalid_config(shape, dtype, says):
    """A shape that is not a sequence of non-negative ints (bools refused), one NumPy
    cannot make, or a dtype that is no NumPy dtype, holds object references or has no
    item size: InvalidConfigError, from ``for_array`` and from the constructor."""
    for make in (lambda: MemoryContextConfig.for_array(shape, dtype),
                 lambda: MemoryContextConfig(shape=shape, dtype=dtype)):
        with pytest.raises(InvalidConfigError, match=says):
            make()


@pytest.mark.parametrize("kw", [
    {"shape": (3,), "dtype": None}, {"shape": None, "dtype": "f8"},
    {"shape": (3,), "dtype": "f8", "size": 8},
])
def test_half_an_array_config_is_invalid_config(kw):
    """An array config needs both shape and dtype, and its size follows from them."""
    with pytest.raises(InvalidConfigError):
        MemoryContextConfig(**kw)


_NO_NUMPY = textwrap.dedent("""
    import sys
    sys.modules["numpy"] = None  # any import of numpy now raises ImportError
    import pickle
    from shmctx import ContextManager, InvalidContextTypeError, MemoryContextConfig
    out = {}
    try:
        MemoryContextConfig.for_array((3,), "float32")
        out["for_array"] = "no error"
    except ImportError as e:
        out["for_array"] = str(e)
    m = ContextManager(None, namespace=sys.argv[1], sweeper=False)
    out["hot_path"] = m.hot_path
    ctx, _ = m.get_or_create_context("plain", MemoryContextConfig(size=64))
    ctx.put({"a": [1, 2]})
    out["put/get"] = ctx.get()
    try:
        ctx.array()
    except InvalidContextTypeError:
        out["array on bytes"] = "InvalidContextTypeError"
    m.return_context(ctx)
    obj, _ = m.get_or_create_object(
        "obj", lambda: {"n": 1, "b": pickle.PickleBuffer(bytearray(b"xyz"))})
    loaded = obj.load()
    out["object"] = (loaded["n"], bytes(loaded["b"]))
    m.return_context(obj)
    # An array context another process made: its bytes are readable, its array is not.
    arr = m.get_context("arr")
    out["array kind"] = arr.kind
    out["array buf"] = bytes(arr.buf)
    try:
        arr.array()
        out["array"] = "no error"
    except ImportError as e:
        out["array"] = str(e)
    m.return_context(arr)
    out["numpy imported"] = sys.modules["numpy"] is not None
    m.close()
    print(repr(out))
""")


def test_without_numpy_arrays_say_what_to_install_and_bytes_still_work(m, ns, hot_path):
    """In a process where NumPy cannot be imported, ``for_array`` and ``ctx.array()``
    raise ImportError naming the ``shmctx[numpy]`` extra, while bytes contexts, objects
    without arrays and the raw bytes of an array context all work."""
    arr, _ = m.get_or_create_context("arr", MemoryContextConfig.for_array((4,), "<u2"),
                                     init=lambda c: c.array(writeable=True).__setitem__(
                                         slice(None), [1, 2, 3, 4]))
    proc = subprocess.run([sys.executable, "-c", _NO_NUMPY, ns], capture_output=True,
                          text=True, timeout=WAIT)
    assert proc.returncode == 0, proc.stderr
    out = ast.literal_eval(proc.stdout)  # the repr of a dict of plain values
    assert "shmctx[numpy]" in out.pop("for_array")
    assert "shmctx[numpy]" in out.pop("array")
    assert out == {
        "hot_path": hot_path, "put/get": {"a": [1, 2]},
        "array on bytes": "InvalidContextTypeError", "object": (1, b"xyz"),
        "array kind": "array", "array buf": np.array([1, 2, 3, 4], "<u2").tobytes(),
        "numpy imported": False,
    }
    m.return_context(arr)
    assert {i.name: i.kind for i in m.contexts()} == {
        "arr": "array", "obj": "object", "plain": "bytes"}
    assert m.check() == []


# --- arrays: views outlive their handle -------------------------------------------------

def _outlive_body(q, ns, leg) -> None:
    m = _open(ns, leg)
    ctx, _ = m.get_or_create_context("v", MemoryContextConfig.for_array((16,), "f8"),
                                     init=lambda c: c.array(writeable=True).__setitem__(
                                         slice(None), np.arange(16.0)))
    obj, _ = m.get_or_create_object("o", lambda: {"a": np.arange(8, dtype=np.int32)})
    # This one is still open when the manager closes.
    still, _ = m.get_or_create_context("still", MemoryContextConfig.for_array((4,), "i8"),
                                       init=lambda c: c.array(writeable=True).fill(7))
    a, loaded, s = ctx.array(), obj.load(), still.array()
    for h in (ctx, obj, still):
        m.return_context(h)
    del h  # the loop's name would keep the last handle (and its mapping) alive
    assert a.tolist() == list(np.arange(16.0))
    m.close_context("v", force=True)
    assert a.tolist() == list(np.arange(16.0))
    q.put(("closing", os.getpid()))  # a crash from here on is the manager's close
    m.close()
    seen = {"array": a.tolist(), "object": loaded["a"].tolist(), "open array": s.tolist()}
    ContextManager(namespace=ns, sweeper=False).unlink()
    seen["in /dev/shm"] = _shm.namespace_objects(ns)
    seen["mapped while used"] = bool(_mapped_here(ns))
    seen["read again"] = (float(a.sum()), int(loaded["a"].sum()), int(s.sum()))
    # The handles go too: a handle object, returned or not, may keep its mapping.
    del a, loaded, s, ctx, obj, still
    seen["mapped after"] = _mapped_here(ns)  # the closed manager m is still referenced
    q.put(("seen", os.getpid(), seen))


def test_views_outlive_their_handle_context_and_manager(m, ns, hot_path, forked):
    """An array (and a loaded object's array) stays readable after its handle is
    returned, and its context force-closed or left open, and the manager closed: no
    BufferError, no crash. While they are used, their memory stays mapped in this
    process, though unlinked from /dev/shm; with the arrays (and the handles) the
    mappings go. In a child process, so that a crash fails this test instead of killing
    the test run."""
    forked.start(_outlive_body, ns, hot_path)
    forked.recv("closing")
    seen = forked.recv("seen")[2]
    forked.join()
    assert seen == {
        "array": list(np.arange(16.0)), "object": list(range(8)), "open array": [7] * 4,
        "in /dev/shm": [], "mapped while used": True,
        "read again": (120.0, 28, 28), "mapped after": []}


def test_array_of_a_dropped_handle_unmaps_after_the_manager_closed(m, ns):
    """A writeable array from a handle whose context was force-closed keeps working
    after the manager closes; once the array and the (unreturnable) handle are let go,
    the memory is unmapped, though the closed manager object is still referenced."""
    h, _ = m.get_or_create_context("v", MemoryContextConfig.for_array((4,), "i4"))
    w = h.array(writeable=True)
    m.close_context("v", force=True)
    assert not m.validate_context(h)  # nothing left to return: the user just lets it go
    with pytest.raises(ContextClosedError):
        h.array()
    w[:] = [1, 2, 3, 4]  # still this process's memory
    m.close()
    assert w.tolist() == [1, 2, 3, 4] and len(_mapped_here(ns)) >= 1
    del w, h
    assert _mapped_here(ns) == []


# --- objects ------------------------------------------------------------------------------

def _model(pid: int) -> dict:
    """The object the tests store: arrays of several dtypes and layouts, a PickleBuffer,
    plain Python values."""
    return {
        "pid": pid,
        "w": np.arange(40, dtype=np.float32).reshape(8, 5) / 7,
        "ids": np.arange(-5, 11, dtype=np.int16),
        "rec": np.array([(1, (0.5, 1.5, 2.5), b"ab"), (2, (3.0, 4.0, 5.0), b"cdefg")], STRUCT),
        "fortran": np.asfortranarray(np.arange(12, dtype=np.uint8).reshape(3, 4)),
        "scalar": np.array(3.25),
        "empty": np.zeros((0, 3), np.complex64),
        "strided": np.arange(20, dtype=np.int64)[::3],  # not contiguous: pickled in band
        "raw": pickle.PickleBuffer(bytearray(_pattern(100))),
        "plain": {"name": "model", "tags": ("a", "b"), "n": 2**70, "f": 1.5, "none": None,
                  "set": {1, 2}, "bytes": b"\x00\x01", "list": [1, [2, [3]]]},
    }


ARRAY_KEYS = ("w", "ids", "rec", "fortran", "scalar", "empty", "strided")


def _assert_model(loaded: dict, pid: int) -> None:
    """``loaded`` equals ``_model(pid)``: the same keys, arrays of the same dtype, shape,
    order and values, the same buffer bytes, equal plain values."""
    want = _model(pid)
    assert loaded.keys() == want.keys()
    for k in ARRAY_KEYS:
        a, b = loaded[k], want[k]
        assert isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, k
        assert np.array_equal(a, b), k
    assert loaded["fortran"].flags.f_contiguous
    assert bytes(loaded["raw"]) == bytes(want["raw"].raw())
    assert loaded["plain"] == want["plain"] and loaded["pid"] == pid


def _out_of_band(loaded: dict) -> dict:
    """The parts of a loaded model that must be views of the shared memory."""
    return {k: loaded[k] for k in ("w", "ids", "rec", "fortran", "scalar", "raw")}


def _assert_shared(ctx, one: dict, two: dict) -> None:
    """Two loads of ``ctx`` in this process: their large buffers are read-only views of
    the context's memory, the same ones in both, each 64-byte aligned."""
    lo, hi = _span(ctx)
    for k, a in _out_of_band(one).items():
        b = _out_of_band(two)[k]
        if isinstance(a, np.ndarray):
            assert not a.flags.writeable and np.shares_memory(a, b), k
        else:  # the PickleBuffer comes back as the buffer itself
            assert isinstance(a, memoryview) and a.readonly, k
        assert _address(a) == _address(b), k
        assert _address(a) % ALIGN == 0, k
        assert lo <= _address(a) and _address(a) + a.nbytes <= hi, k
    with pytest.raises(ValueError):
        one["w"][0, 0] = 0.0
    assert one["plain"] is not two["plain"]  # the rest is unpickled anew on each load


def test_object_holds_arrays_buffers_and_plain_values(m):
    """``load()`` gives back an object equal to what the factory returned; its NumPy
    arrays and PickleBuffer are read-only views of the context's memory, 64-byte aligned,
    the same memory on every load; the context says it holds an object."""
    ctx, existed = m.get_or_create_object("model", lambda: _model(os.getpid()))
    assert existed is False and ctx.kind == "object"
    one, two = ctx.load(), ctx.load()
    _assert_model(one, os.getpid())
    _assert_shared(ctx, one, two)
    again, existed = m.get_or_create_object("model", lambda: pytest.fail("factory ran twice"))
    assert existed is True
    _assert_shared(ctx, one, again.load())
    del one, two
    info = _info(m, "model")
    assert (info.kind, info.refcount, info.size) == ("object", 2, ctx.size)
    m.return_context(ctx)
    m.return_context(again)
    assert m.check() == []


# --- init and factory run once among racing processes ----------------------------------

RACE_ARRAY = MemoryContextConfig.for_array((4, 6), "int64")


def _race_values(creator: int) -> list:
    """The array the racers' init writes: 0..23, its first element the creator's pid."""
    a = np.arange(24, dtype=np.int64).reshape(4, 6)
    a[0, 0] = creator
    return a.tolist()


def _digest(loaded: dict) -> tuple:
    """What two loads of the model must agree on, across processes."""
    return (loaded["pid"], bytes(loaded["raw"]), loaded["plain"],
            [(loaded[k].dtype.str, loaded[k].shape, loaded[k].tobytes()) for k in ARRAY_KEYS])


def _racer(q, ns, leg, barrier, log_dir) -> None:
    """Race the others for an array context (its init logs this pid), then for an object
    context (its factory does); check what this process sees and report it."""
    m = _open(ns, leg)

    def log(what: str) -> None:
        with open(os.path.join(log_dir, what), "a") as f:  # O_APPEND: whole lines
            f.write(f"{os.getpid()}\n")

    def init(ctx):
        log("init")
        a = ctx.array(writeable=True)
        a[...] = np.arange(a.size).reshape(a.shape)
        a[0, 0] = os.getpid()

    def factory():
        log("factory")
        return _model(os.getpid())

    barrier.wait(WAIT)
    h1, existed = m.get_or_create_context("arr", RACE_ARRAY, init=init)
    h2, again = m.get_or_create_context("arr", RACE_ARRAY, init=init)
    a1, a2 = h1.array(), h2.array()
    assert again is True and h1 == h2
    assert np.shares_memory(a1, a2) and a1.ctypes.data == a2.ctypes.data
    assert a1.ctypes.data % ALIGN == 0 and not a1.flags.writeable
    values = a1.tolist()
    assert values == _race_values(values[0][0])  # the whole array, as one init made it
    del a1, a2

    barrier.wait(WAIT)
    o1, o_existed = m.get_or_create_object("model", factory)
    o2, o_again = m.get_or_create_object("model", factory)
    one, two = o1.load(), o2.load()
    assert o_again is True
    _assert_model(one, one["pid"])
    _assert_shared(o1, one, two)
    q.put(("got", os.getpid(), (existed, h1.incarnation, values),
           (o_existed, o1.incarnation, _digest(one))))
    del one, two
    for h in (h1, h2, o1, o2):
        m.return_context(h)
    m.close()


def test_init_and_factory_run_once_among_racing_processes(m, ns, hot_path, workers,
                                                          tmp_path):
    """N processes race ``get_or_create_context`` with one array config and an ``init``
    that logs its pid, then ``get_or_create_object`` with a factory that does: each runs
    in exactly one process, the one told ``existed=False``; every process, this one too,
    sees the array that init wrote and loads an equal object (two handles, two loads of
    one process share the memory)."""
    n = 4 if workers.method == "fork" else 3  # a spawned child costs ~0.5 s
    barrier = workers.mp.Barrier(n)
    for _ in range(n):
        workers.start(_racer, ns, hot_path, barrier, str(tmp_path))
    got = [workers.recv("got") for _ in range(n)]
    workers.join()
    by_pid = {g[1]: g[2:] for g in got}
    for i, (log, kind) in enumerate((("init", "array"), ("factory", "object"))):
        creators = [pid for pid, r in by_pid.items() if r[i][0] is False]
        assert len(creators) == 1, (kind, got)
        assert (tmp_path / log).read_text().split() == [str(creators[0])]
        assert len({r[i][1] for r in by_pid.values()}) == 1  # one incarnation for all
        info = _info(m, "arr" if kind == "array" else "model")
        assert (info.kind, info.refcount, info.incarnation) == (kind, 0, got[0][2 + i][1])
        if kind == "array":
            assert all(r[0][2] == _race_values(creators[0]) for r in by_pid.values())
            h1, existed = m.get_or_create_context("arr", RACE_ARRAY)
            h2 = m.get_context("arr")
            a1, a2 = h1.array(), h2.array()
            assert existed and np.shares_memory(a1, a2)
            assert a1.tolist() == _race_values(creators[0])
            del a1, a2
            m.return_context(h1)
            m.return_context(h2)
        else:
            assert {r[1][2][0] for r in by_pid.values()} == {creators[0]}
            assert all(r[1][2] == got[0][3][2] for r in by_pid.values())
            ctx = m.get_context("model")
            loaded = ctx.load()
            _assert_model(loaded, creators[0])
            assert _digest(loaded) == got[0][3][2]
            del loaded
            m.return_context(ctx)
    assert m.check() == []


def test_factory_that_raises_leaves_nothing(m, ns):
    """An exception from the factory propagates; no context is left of that name, nor any
    memory; the next call with a good factory creates it."""
    before = set(_shm.namespace_objects(ns))

    def boom():
        raise RuntimeError("factory boom")

    with pytest.raises(RuntimeError, match="factory boom"):
        m.get_or_create_object("obj", boom)
    assert _info(m, "obj") is None and m.contexts() == []
    assert set(_shm.namespace_objects(ns)) == before
    ctx, existed = m.get_or_create_object("obj", lambda: {"ok": np.ones(3)})
    assert existed is False and ctx.load()["ok"].tolist() == [1.0, 1.0, 1.0]
    m.return_context(ctx)
    assert m.check() == []


@pytest.mark.parametrize("obj", [
    pytest.param(lambda: {"f": lambda x: x}, id="lambda"),
    pytest.param(lambda: [1, threading.Lock()], id="lock"),
    pytest.param(lambda: {"gen": (i for i in range(3))}, id="generator"),
    pytest.param(lambda: pickle.PickleBuffer(memoryview(bytearray(64))[::2]),
                 id="non-contiguous-buffer"),
])
def test_object_that_cannot_be_pickled_is_a_type_error(m, ns, obj):
    """What the factory returns cannot be pickled: TypeError naming the context, and
    nothing created (no context, no memory); a later good call creates it."""
    before = set(_shm.namespace_objects(ns))
    with pytest.raises(TypeError, match="'bad'"):
        m.get_or_create_object("bad", obj)
    assert m.contexts() == [] and set(_shm.namespace_objects(ns)) == before
    ctx, existed = m.get_or_create_object("bad", lambda: "fine")
    assert existed is False and ctx.load() == "fine"
    m.return_context(ctx)
    assert m.check() == []


def _stuck_creator(q, ns, leg, inside, never) -> None:
    m = _open(ns, leg)

    def factory():
        inside.set()
        never.wait()  # until SIGKILLed: never set
        return "the killed creator's"

    m.get_or_create_object("victim", factory)
    q.put(("returned", os.getpid()))  # never reached


def _patient_waiter(q, ns, leg, log_path) -> None:
    m = _open(ns, leg)

    def factory():
        with open(log_path, "a") as f:
            f.write(f"{os.getpid()}\n")
        return {"by": os.getpid(), "a": np.arange(5)}

    ctx, existed = m.get_or_create_object("victim", factory, timeout=WAIT)
    loaded = ctx.load()
    q.put(("got", os.getpid(), existed, loaded["by"], loaded["a"].tolist(), ctx.incarnation))
    del loaded
    m.return_context(ctx)
    m.close()


def _waiting_on(ns: str, name: str) -> bool:
    """Whether ``name`` is being created with a process registered to wait for it (read
    from the table in /dev/shm, without a manager)."""
    with open(_shm.host_path(_shm.table_name(ns)), "rb") as f:
        s = decode(f.read(), locked=False).by_name().get(name)
    return s is not None and s.state == L.CREATING and bool(s.flags & L.SLOT_WAITERS)


def test_creator_killed_inside_the_factory_lets_the_waiter_create_it(m, ns, hot_path,
                                                                      forked, tmp_path):
    """The creating process is SIGKILLed inside the factory while another waits for the
    object: the waiter finds the creator dead, removes the half-made context and creates
    it itself with its own factory."""
    log = tmp_path / "factories"
    inside, never = forked.event(), forked.event()
    creator = forked.start(_stuck_creator, ns, hot_path, inside, never)
    assert inside.wait(WAIT), "the creator never entered the factory"
    assert _info(m, "victim").state == "creating"
    waiter = forked.start(_patient_waiter, ns, hot_path, str(log))
    wait_for(lambda: _waiting_on(ns, "victim"), WAIT, "the waiter to wait for the creator")
    forked.kill(creator)
    assert creator.exitcode == -signal.SIGKILL
    got = forked.recv("got")
    forked.join()
    assert got[1:5] == (waiter.pid, False, waiter.pid, [0, 1, 2, 3, 4])
    assert log.read_text().split() == [str(waiter.pid)]
    info = _info(m, "victim")
    assert (info.state, info.kind, info.refcount, info.incarnation) == \
        ("ready", "object", 0, got[5])
    assert m.check() == []


# --- contexts() and check() over every kind ------------------------------------------------

def test_contexts_show_each_kind(m):
    """``contexts()`` says what each context holds, and so does each handle's ``kind``."""
    handles = [
        m.get_or_create_context("b", MemoryContextConfig(size=16))[0],
        m.get_or_create_context("b0")[0],
        m.get_or_create_context("a", MemoryContextConfig.for_array((2,), STRUCT))[0],
        m.get_or_create_object("o", lambda: (1, "two", np.arange(3)))[0],
        m.get_or_create_object("none", lambda: None)[0],
    ]
    assert [h.kind for h in handles] == ["bytes", "bytes", "array", "object", "object"]
    assert {i.name: i.kind for i in m.contexts()} == {
        "b": "bytes", "b0": "bytes", "a": "array", "o": "object", "none": "object"}
    assert handles[4].load() is None
    assert handles[2].size == MemoryContextConfig.for_array((2,), STRUCT).size
    for h in handles:
        m.return_context(h)
    assert m.check() == []


def test_damaged_array_metadata_is_a_context_error_not_numpys(m):
    """Metadata written over (by a stray writer of the namespace) to name an object
    dtype: the array is refused with ``ContextError``, never built over raw pointers."""
    import msgpack

    from shmctx import ContextError, _payload
    from shmctx._context import mapping_of

    ctx, _ = m.get_or_create_context("d", MemoryContextConfig.for_array((2,), "f8"))
    view = mapping_of(ctx).view
    _payload.write_header(view, L.KIND_ARRAY,
                          msgpack.packb({"shape": [2], "descr": "|O"}), 16)
    mapping_of(ctx).payload = None  # read afresh, as another process would
    with pytest.raises(ContextError, match="damaged"):
        ctx.array()
    m.return_context(ctx)
