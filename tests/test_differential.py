"""The C hot path and the Python one, byte for byte.

``_speedups.c`` completes the common case of get and return itself and defers everything
else to the Python methods; the Python hot path does the same common case in Python. The
two must leave the table in the very same bytes. Here one seeded random sequence of
operations (gets and creations with sizes and parents, returns, closes with and without
force, validation, sweeps, ``put``/``get``, ``ctx.lock``, dropped handles, and the errors
all of these raise) runs on two namespaces at once, one whose managers run the C hot path
and one whose managers run the Python one. After every step both must have given the
same result (value, or exception type and message) and their tables must be equal, byte
for byte, once the fields that cannot be equal are normalized:

* the random table id and the namespace name: zeroed;
* wall-clock and CLOCK_MONOTONIC stamps (table creation, sweeper beat, a process entry's
  attach time, a slot's creation and last use): each distinct value becomes the number of
  its first appearance in that run, so a stamp written by one implementation and not by
  the other, or at another step, still shows;
* the table lock's record (owner pid, epoch, owner's start time): any process of the
  host may take it (ctx-inspect does, to copy a table), and the hot path never does.

Nothing else is normalized: both namespaces are driven by this one process, so the pids
and process start times in process entries and lock owner records are equal, and the
stripe locks' epochs must be bumped identically.
"""

from __future__ import annotations

import random
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from helpers import hot_path_of, table_bytes

from shmctx import (
    ContextConfig,
    ContextManager,
    MemoryContext,
    MemoryContextConfig,
    SweepReport,
)
from shmctx import _layout as L

# Small, so that the errors come often: a full table (7 names, 6 slots), the reference
# limit, and sweeps that close every unreferenced context (the idle limit is a
# microsecond, and every step takes longer than that).
CFG = ContextConfig(capacity=6, max_processes=4, max_references=3, max_idle_time=1e-6,
                    cleanup_interval=0, lock_timeout=0.2)
NAMES = ["a", "b", "c", "d", "e", "f", "g"]
SEEDS = range(40)
STEPS = 200
GEO = L.Geometry(CFG.capacity, CFG.max_processes)  # the tables' regions


# --- normalizing a table --------------------------------------------------------------

def _fields(st: struct.Struct) -> list[tuple[int, str]]:
    """(offset, type code) of each field of a layout record, in order."""
    out, pos = [], 0
    for count, code in re.findall(r"(\d*)([a-zA-Z?])", st.format.lstrip("<=")):
        n = int(count or 1)
        if code == "x":
            pos += n
        elif code == "s":
            out.append((pos, code))
            pos += n
        else:
            for _ in range(n):
                out.append((pos, code))
                pos += struct.calcsize("<" + code)
    assert pos == st.size, st.format
    return out


def _stamp(base: int, st: struct.Struct, index: int) -> int:
    """Offset of the time stamp that is field ``index`` of record ``st`` at ``base``."""
    off, code = _fields(st)[index]
    assert code == "d", f"field {index} of {st.format} is not a time stamp"
    return base + off


_F64 = struct.calcsize("<d")
# In the header: "created" ends the fixed part, "beat" ends the sweeper record.
_HEADER_STAMPS = (_stamp(L.H_FIXED_OFF, L.H_FIXED, -1), _stamp(L.H_SWEEPER_OFF, L.H_SWEEPER, -1))
_HEADER_IDENTITY = ((L.H_TABLE_ID_OFF, L.H_TABLE_ID.size), (L.H_NAMESPACE_OFF, L.H_NAMESPACE.size))
_PROC_STAMPS = (_stamp(0, L.P_HEAD, -1),)  # attached
_SLOT_STAMPS = (_stamp(L.S_BODY_OFF, L.S_BODY, -2), L.S_LAST_USED_OFF)  # created, last_used
assert _SLOT_STAMPS[1] == _stamp(L.S_BODY_OFF, L.S_BODY, -1)


def _stamp_offsets(geo: L.Geometry) -> list[int]:
    offs = list(_HEADER_STAMPS)
    offs += [geo.proc_off(p) + o for p in range(geo.max_processes) for o in _PROC_STAMPS]
    offs += [geo.slot_off(s) + o for s in range(geo.capacity) for o in _SLOT_STAMPS]
    return sorted(offs)


# The table lock's record (lock record 0): its owner pid, epoch and owner's start time.
# ctx-inspect, run by any process of the host (another test, an operator), takes every
# namespace's table lock to copy the table: the epoch and start time then count takes
# that are not this test's, and the pid is ctx-inspect's if it holds the lock as this
# test copies the table. The hot path never takes the table lock (the stripe locks'
# records, which it does take, are compared in full).
_TABLE_LOCK = (L.LOCKS_OFF, L.LOCK_RECORD.size)


def _normalize(raw: bytes, geo: L.Geometry, seen: dict[bytes, int]) -> bytes:
    b = bytearray(raw)
    for off, size in (*_HEADER_IDENTITY, _TABLE_LOCK):
        b[off:off + size] = bytes(size)
    for off in _stamp_offsets(geo):
        value = bytes(b[off:off + _F64])
        if any(value):
            b[off:off + _F64] = seen.setdefault(value, len(seen) + 1).to_bytes(_F64, "little")
    return bytes(b)


def _where(geo: L.Geometry, off: int) -> str:
    """Which record and byte of it ``off`` is, for a failure message."""
    if off < L.LOCKS_OFF:
        return f"header+{off}"
    if off < geo.index_off:
        return "lock record {}+{}".format(*divmod(off - L.LOCKS_OFF, L.LOCK_STRIDE))
    if off < geo.procs_off:
        return f"index entry {(off - geo.index_off) // L.INDEX_ENTRY.size}"
    if off < geo.slots_off:
        return "process entry {}+{}".format(*divmod(off - geo.procs_off, L.PROC_SIZE))
    return "slot {}+{}".format(*divmod(off - geo.slots_off, L.SLOT_SIZE))


# --- one namespace driven by one hot path ----------------------------------------------

@dataclass
class _Leg:
    """A namespace, its two managers in this process (index 0 and 1), the handles they
    gave in the order they gave them (None once dropped) with the manager's index, and
    the ``ctx.lock`` objects held, innermost last."""

    namespace: str
    managers: list[ContextManager]
    handles: list[tuple[int, MemoryContext] | None] = field(default_factory=list)
    locks: list[object] = field(default_factory=list)
    stamps: dict[bytes, int] = field(default_factory=dict)

    def table(self) -> bytes:
        raw = table_bytes(self.namespace)
        assert len(raw) == GEO.total, "the table is not laid out as GEO says"
        return _normalize(raw, GEO, self.stamps)

    def run(self, op: tuple) -> object:
        """Apply ``op``; what it gave, exceptions included, comparable across legs."""
        try:
            return _describe(_apply(self, op))
        except Exception as e:  # the outcome is what is compared
            return ("raised", type(e).__name__, str(e).replace(self.namespace, "NS"))


def _describe(result: object) -> object:
    if isinstance(result, tuple) and result and isinstance(result[0], MemoryContext):
        ctx, existed = result
        return ("handle", ctx.name, ctx.incarnation, ctx.size, existed)
    if isinstance(result, SweepReport):
        return ("sweep", result.closed, result.reclaimed, result.skipped_in_use,
                result.orphans_removed, result.locks_recovered, result.damaged)
    return result


def _init_put(ctx: MemoryContext) -> None:
    ctx.put(["made", ctx.name])


def _init_fails(ctx: MemoryContext) -> None:
    raise ValueError(f"init of {ctx.name} failed")


_INITS: dict[str, Callable[[MemoryContext], None] | None] = {
    "none": None, "put": _init_put, "fails": _init_fails}
_VALUES = [0, 7, "x" * 10, [1, 2, [3]], {"k": b"\x00v"}, "y" * 100, object()]


def _apply(leg: _Leg, op: tuple) -> object:
    kind, *args = op
    ms = leg.managers
    if kind == "get_or_create":
        mi, name, size, parent, init, timeout = args
        config = None if size is None else MemoryContextConfig(size=size, parent=parent)
        ctx, existed = ms[mi].get_or_create_context(name, config, init=_INITS[init],
                                                    timeout=timeout)
        leg.handles.append((mi, ctx))
        return ctx, existed
    if kind == "get":
        mi, name = args
        ctx = ms[mi].get_context(name)
        leg.handles.append((mi, ctx))
        return ctx, None
    if kind == "return":
        mi, i = args
        if i is None:
            return ms[mi].return_context("a")  # type: ignore[arg-type]
        ctx = leg.handles[i][1]  # type: ignore[index]
        had_view = ctx._view is not None
        ms[mi].return_context(ctx)
        # A returned handle lets go of its view of the context's memory.
        return "view kept" if ctx._view is not None else \
            "view released" if had_view else "no view"
    if kind == "drop":  # as a handle lost to an exception: its finalizer queues it
        leg.handles[args[0]] = None
        return None
    if kind == "close":
        name, force = args
        return ms[0].close_context(name, force=force)
    if kind == "validate":
        mi, i = args
        return ms[mi].validate_context(leg.handles[i][1])  # type: ignore[index]
    if kind == "sweep":
        return ms[0].sweep()
    if kind == "close_manager":
        return ms[args[0]].close()
    if kind == "unlock" and leg.locks:
        return leg.locks.pop().release()  # type: ignore[attr-defined]
    ctx = leg.handles[args[0]][1]  # type: ignore[index]
    if kind == "put":
        return ctx.put(_VALUES[args[1]])
    if kind == "get_value":
        return ctx.get("no value")
    if kind == "buf":
        return bytes(ctx.buf[:8])
    if kind == "lock":
        lock = ctx.lock
        taken = lock.try_acquire(0)
        if taken:
            leg.locks.append(lock)
        return taken
    if kind == "unlock":  # holding none: an error
        return ctx.lock.release()
    raise AssertionError(f"unknown step {op!r}")


def _draw(rng: random.Random, leg: _Leg) -> tuple:
    """The next step. It may look at ``leg``'s handles: both legs have the same ones, or
    the run has already failed."""
    live = [i for i, h in enumerate(leg.handles) if h is not None]
    mine = [i for i in live if leg.handles[i][0] == 0]  # type: ignore[index]
    mi = 0 if rng.random() < 0.75 else 1
    kind = rng.choices(
        ["get_or_create", "get", "return", "drop", "close", "validate", "sweep", "put",
         "get_value", "buf", "lock", "unlock"],
        [20, 12, 24, 2, 5, 3, 2, 5, 4, 3, 6, 5])[0]
    if (kind in ("return", "drop", "validate") and not live) or \
            (kind in ("put", "get_value", "buf", "lock", "unlock") and not mine):
        kind = "get_or_create"
    if kind == "get_or_create":
        size = rng.choice([None, None, None, 0, 64, 256])
        parent = rng.choice([None, None, *NAMES]) if size is not None else None
        init = rng.choices(list(_INITS), [8, 1, 1])[0]
        timeout = rng.choice([None, None, None, 5.0])
        return (kind, mi, rng.choice(NAMES), size, parent, init, timeout)
    if kind == "get":
        return (kind, mi, rng.choice([*NAMES, "nope", 5]))
    if kind == "return":
        # Mostly a handle's own manager; sometimes the other one, or no handle at all.
        i = rng.choice(live)
        owner = leg.handles[i][0]  # type: ignore[index]
        r = rng.random()
        return (kind, owner if r < 0.85 else 1 - owner, i if r < 0.97 else None)
    if kind == "drop":
        return (kind, rng.choice(live))
    if kind == "close":
        return (kind, rng.choice([*NAMES, "nope"]), rng.random() < 0.4)
    if kind == "validate":
        return (kind, mi, rng.choice(live))
    if kind == "sweep":
        return (kind,)
    # ctx.put, ctx.get, ctx.buf and ctx.lock only on the first manager's handles: a put
    # through the second's would wait for ever for a lock the first one's object holds.
    return (kind, rng.choice(mine), rng.randrange(len(_VALUES)))


# --- the test -------------------------------------------------------------------------

def _legs(managers, new_ns, monkeypatch) -> tuple[_Leg, _Leg]:
    legs = []
    for path in ("C", "Python"):
        if path == "Python":
            monkeypatch.setenv("SHMCTX_PURE_PYTHON", "1")  # read as a manager is made
        else:
            monkeypatch.delenv("SHMCTX_PURE_PYTHON", raising=False)
        ns = new_ns()
        pair = [managers(CFG, namespace=ns), managers(CFG, namespace=ns)]
        assert [hot_path_of(m) for m in pair] == [path, path]
        legs.append(_Leg(ns, pair))
    monkeypatch.delenv("SHMCTX_PURE_PYTHON")
    return legs[0], legs[1]


def _run(seed: int, c: _Leg, py: _Leg, outcomes: set[tuple[str, str]]) -> None:
    """Run seed ``seed`` on both legs, comparing after every step. What each step gave
    goes into ``outcomes``."""
    rng = random.Random(seed)
    history: list[str] = []

    def step(op: tuple) -> None:
        got_c, got_py = c.run(op), py.run(op)
        history.append(f"{op!r} -> {got_c!r}")
        context = f"seed {seed}, step {len(history)}; the steps so far, last ones:\n  " + \
            "\n  ".join(history[-12:])
        assert got_c == got_py, f"C gave {got_c!r}, Python {got_py!r}\n{context}"
        raised = isinstance(got_c, tuple) and got_c[0] == "raised"
        stamps = len(c.stamps)
        table_c, table_py = c.table(), py.table()
        if raised:
            outcome = (op[0], got_c[1])
        elif op[0] == "return":  # a return stamps the context's last use: a new stamp
            outcome = (op[0], f"{got_c}, {'stamped' if len(c.stamps) > stamps else 'not'}")
        else:
            outcome = (op[0], "ok")
        outcomes.add(outcome)
        if table_c == table_py:
            return
        diff = [f"{_where(GEO, o)}: C {table_c[o]:#04x}, Python {table_py[o]:#04x}"
                for o in range(len(table_c)) if table_c[o] != table_py[o]]
        pytest.fail(f"tables differ at {len(diff)} bytes: {diff[:8]}\n{context}")

    for _ in range(STEPS):
        step(_draw(rng, c))
    while c.locks:
        step(("unlock", None))
    # Closing a manager gives back every reference it holds; after it, it refuses.
    held = next((i for i, h in enumerate(c.handles) if h and h[0] == 0), None)
    step(("close_manager", 0))
    step(("get", 0, "a"))
    step(("get_or_create", 0, "a", None, None, "none", None))
    if held is not None:
        step(("return", 0, held))
    step(("close_manager", 1))
    for leg in (c, py):
        ContextManager(namespace=leg.namespace, sweeper=False).unlink(force=True)


def test_c_and_python_hot_paths_write_the_same_bytes(managers, new_ns, monkeypatch):
    outcomes: set[tuple[str, str]] = set()
    for seed in SEEDS:
        c, py = _legs(managers, new_ns, monkeypatch)
        _run(seed, c, py, outcomes)
    # Equal, and not vacuously: the runs reached the cases the hot path must get right.
    missing = {
        ("get_or_create", "ok"), ("get_or_create", "MaxReferencesReachedError"),
        ("get_or_create", "ContextNotFoundError"), ("get_or_create", "ValueError"),
        ("get_or_create", "InvalidConfigError"), ("get_or_create", "TableFullError"),
        ("get", "ok"), ("get", "ContextNotFoundError"), ("get", "InvalidContextTypeError"),
        ("get", "MaxReferencesReachedError"), ("get", "ContextManagerClosedError"),
        ("get_or_create", "ContextManagerClosedError"),
        ("return", "no view, stamped"), ("return", "view released, stamped"),
        ("return", "ContextError"), ("return", "ContextClosedError"),
        ("return", "TypeError"), ("return", "ContextManagerClosedError"),
        ("close", "ok"), ("close", "ContextInUseError"), ("close", "ContextNotFoundError"),
        ("validate", "ok"), ("sweep", "ok"), ("put", "ok"), ("put", "ValueError"),
        ("put", "TypeError"), ("put", "ContextClosedError"), ("get_value", "ok"),
        ("buf", "ok"), ("buf", "ContextClosedError"), ("lock", "ok"),
        ("lock", "ContextClosedError"), ("unlock", "ok"), ("unlock", "RuntimeError"),
        ("drop", "ok"), ("close_manager", "ok"),
    } - outcomes
    assert not missing, f"no run reached {sorted(missing)}; reached {sorted(outcomes)}"
    returns = {o for k, o in outcomes if k == "return" and not o[:1].isupper()}
    assert returns == {"no view, stamped", "view released, stamped"}, returns
