"""Damage from outside and torn writes: a context whose memory segment was removed, a slot
in no state, damaged derived header data (live count, free list), and readers that read
shared fields without the lock while they are being written.

Every lookup that could repeat forever (damage that a lookup keeps finding again) runs in
a forked child with a deadline, so a regression fails the test instead of hanging the
suite.
"""

from __future__ import annotations

import ast
import multiprocessing as mp
import os
import pathlib
import struct
import time
import traceback

import posix_ipc
import pytest
from helpers import wait_for

from shmctx import ContextConfig, ContextError, ContextManager, MemoryContextConfig, _shm
from shmctx import _layout as L
from shmctx._context import mapping_of
from shmctx._lock import LOCK
from shmctx._sweeper import in_use_incarnations

CFG = ContextConfig(capacity=4, lock_timeout=0.5, cleanup_interval=0)
MEM = MemoryContextConfig(size=4096)
_FORK = mp.get_context("fork")


def _run(q, ns: str, fn) -> None:
    try:
        m = ContextManager(namespace=ns, sweeper=False)
        try:
            q.put(("ok", fn(m)))
        finally:
            m.close()
    except BaseException as e:
        q.put(("error", type(e).__name__, str(e), traceback.format_exc()))


def in_child(ns: str, fn, deadline: float = 10.0):
    """``fn(manager)`` in a forked child with its own manager on ``ns``; its result, or
    ("error", type name, message). Fails if the child is still busy after ``deadline``
    seconds (then it is killed): a lookup that loops on damage never ends by itself."""
    q = _FORK.Queue()
    p = _FORK.Process(target=_run, args=(q, ns, fn))
    p.start()
    try:
        out = q.get(timeout=deadline)
    except Exception:
        p.kill()
        p.join()
        pytest.fail(f"the child was still busy after {deadline}s (a lookup that never ends)")
    p.join(10)
    return out


def _seg_path(m: ContextManager, name: str) -> str:
    mapped = m._mapped[name]
    return _shm.host_path(m._table.segment(mapped.slot, mapped.inc))


def _slot_off(m: ContextManager, name: str) -> int:
    return m._geo.slot_off(m._mapped[name].slot)


def _make(m: ContextManager, *names: str) -> None:
    for n in names:
        ctx, _ = m.get_or_create_context(n, MEM)
        m.return_context(ctx)


# --- damaged entries: bounded, reported, repaired ----------------------------------------


def test_a_ready_context_whose_segment_is_gone_raises_once_then_is_made_afresh(managers):
    m = managers()
    _make(m, "x")
    os.unlink(_seg_path(m, "x"))  # systemd-logind's RemoveIPC, or an rm
    began = time.monotonic()
    out = in_child(m.namespace, lambda c: c.get_context("x", timeout=1.0))
    assert out[:2] == ("error", "ContextError"), out
    assert "damaged" in out[2] and "segment" in out[2] and "is gone" in out[2], out[2]
    assert time.monotonic() - began < 5
    # Closed as damaged: a get finds nothing, a get_or_create makes it afresh.
    assert in_child(m.namespace, lambda c: _exists_after(c, "x"))[:2] == \
        ("ok", ("not found", False))
    assert m.check() == []


def _exists_after(c: ContextManager, name: str):
    try:
        c.get_context(name)
        first = "found"
    except ContextError:
        first = "not found"
    ctx, existed = c.get_or_create_context(name, MEM)
    c.return_context(ctx)
    return first, existed


def test_a_slot_in_no_state_raises_instead_of_looping(managers):
    m = managers()
    _make(m, "x")
    m._buf[_slot_off(m, "x")] = 7  # a flipped bit: no state at all
    assert any("impossible state 7" in v for v in m.check())
    out = in_child(m.namespace, lambda c: c.get_or_create_context("x", MEM, timeout=1.0))
    assert out[:2] == ("error", "ContextError"), out
    assert "damaged" in out[2] and "state 7" in out[2], out[2]
    assert in_child(m.namespace, lambda c: _exists_after(c, "x"))[1] == ("not found", False)
    assert m.check() == []


def test_check_reports_and_the_sweep_repairs_damaged_contexts(managers):
    m = managers()
    _make(m, "gone", "stateless", "fine")
    os.unlink(_seg_path(m, "gone"))
    stateless_lock = _shm.host_path(
        _shm.ctx_lock_name(m.namespace, m._table.tag, m._mapped["stateless"].inc), True)
    ctx = m.get_context("stateless")
    with ctx.lock:  # so that it has a ctx.lock semaphore, which must go with it
        pass
    m.return_context(ctx)
    assert os.path.exists(stateless_lock)
    m._buf[_slot_off(m, "stateless")] = 9
    problems = m.check()
    assert any("'gone'" in p and "is missing" in p for p in problems), problems
    assert any("impossible state 9" in p for p in problems), problems
    report = m.sweep()
    assert sorted(report.damaged) == ["gone", "stateless"]
    assert m.check() == []
    assert [i.name for i in m.contexts()] == ["fine"]
    assert not os.path.exists(stateless_lock)


def test_a_stray_post_of_an_init_semaphore_does_not_spin_its_waiters(managers):
    """A waiter woken with the context still being created (a post nobody made by
    publishing or closing) waits on instead of passing the post on in a busy loop."""
    m = managers()
    creating = _FORK.Event()
    go = _FORK.Event()

    def creator() -> None:
        c = ContextManager(namespace=m.namespace, sweeper=False)
        c.get_or_create_context("slow", MEM, init=lambda ctx: (creating.set(), go.wait(30)))
        c.close()

    p = _FORK.Process(target=creator)
    p.start()
    try:
        assert creating.wait(10)
        so = m._geo.slot_off(m._table.find(b"slow", _hash(b"slow")))
        inc = L.SLOT["incarnation"].read(m._buf, so)
        sem_name = _shm.init_sem_name(m.namespace, m._table.tag, inc)

        def wait_and_measure(c: ContextManager):
            cpu = time.process_time()
            try:
                c.get_context("slow", timeout=1.5)
                return "got it", time.process_time() - cpu
            except TimeoutError:
                return "timed out", time.process_time() - cpu

        q = _FORK.Queue()
        w = _FORK.Process(target=_run, args=(q, m.namespace, wait_and_measure))
        w.start()
        wait_for(lambda: os.path.exists(_shm.host_path(sem_name, True)), 10,
                 "the waiter to register")
        stray = posix_ipc.Semaphore(sem_name)
        stray.release()  # the stray post
        stray.close()
        out = q.get(timeout=20)
        w.join(10)
        assert out[0] == "ok", out
        what, cpu = out[1]
        assert what == "timed out"
        assert cpu < 0.5, f"the waiter burnt {cpu:.2f}s of CPU in 1.5s of waiting"
    finally:
        go.set()
        p.join(10)


def _hash(b: bytes) -> int:
    from shmctx._table import name_hash

    return name_hash(b)


# --- derived header data: validated before it is trusted --------------------------------


def _full_live_count(m: ContextManager) -> None:
    m._words.put32(L.H_LIVE_OFF, m._geo.capacity)


def _lost_free_list(m: ContextManager) -> None:
    m._words.put32(L.H_FREE_HEAD_OFF, 0)


def _free_head_out_of_range(m: ContextManager) -> None:
    m._words.put32(L.H_FREE_HEAD_OFF, 0xFFFF)


def _free_list_loops_through_live_slots(m: ContextManager) -> None:
    a, b = m._mapped["a"].slot, m._mapped["b"].slot
    m._words.put32(m._geo.slot_off(a) + L.S_NEXT_FREE_OFF, b + 1)
    m._words.put32(m._geo.slot_off(b) + L.S_NEXT_FREE_OFF, a + 1)
    m._words.put32(L.H_FREE_HEAD_OFF, a + 1)


@pytest.mark.parametrize("damage", [_full_live_count, _lost_free_list, _free_head_out_of_range,
                                    _free_list_loops_through_live_slots])
def test_damaged_derived_header_data_is_seen_and_rebuilt_not_trusted(managers, damage):
    m = managers()
    _make(m, "a", "b")  # idle and unreferenced: what an eviction would take
    assert m.check() == []
    damage(m)
    problems = m.check()
    assert any(p.startswith(("header: live count", "free list:")) for p in problems), problems
    out = in_child(m.namespace, lambda c: c.get_or_create_context("c", MEM, timeout=2)[1])
    assert out[:2] == ("ok", False), out
    assert [i.name for i in m.contexts()] == ["a", "b", "c"]  # nothing evicted
    assert m.check() == []


def test_the_sweep_rebuilds_damaged_derived_data(managers):
    m = managers()
    _make(m, "a")
    _lost_free_list(m)
    _full_live_count(m)
    assert len(m.check()) == 2
    m.sweep()
    assert m.check() == []


def test_a_really_full_table_still_evicts_the_least_recently_used(managers):
    m = managers()
    _make(m, "a", "b", "c", "d")
    ctx, existed = m.get_or_create_context("e", MEM)
    m.return_context(ctx)
    assert not existed
    assert [i.name for i in m.contexts()] == ["b", "c", "d", "e"]
    assert m.check() == []


# --- torn writes: what readers without the lock may see ---------------------------------


def _race(ns: str, writer, reader, seconds: float = 1.0):
    """``writer(manager, stop)`` in a forked child while ``reader(manager)`` runs here
    until it returns a finding (returned) or ``seconds`` pass (None).

    The writer makes a pass before it looks at ``stop`` (a child slow to start still
    writes), and returns how many passes it made. The race fails the test unless the
    writer made some and ended without an exception: a writer that dies on its first
    pass leaves the reader racing nothing, and the test would pass whatever the code
    does."""
    stop = _FORK.Event()
    started = _FORK.Event()
    results, result_end = _FORK.Pipe(duplex=False)

    def child() -> None:
        try:
            c = ContextManager(namespace=ns, sweeper=False)
            try:
                started.set()
                out = ("ok", writer(c, stop))
            finally:
                c.close()
        except BaseException:
            out = ("error", traceback.format_exc())
        started.set()  # a writer that failed early must not keep the parent waiting
        result_end.send(out)

    m = ContextManager(namespace=ns, sweeper=False)  # first: if it fails, no writer runs on
    p = _FORK.Process(target=child)
    p.start()
    result_end.close()  # the child's end: recv() then sees the child gone, if it is
    found = None
    try:
        assert started.wait(10)
        end = time.monotonic() + seconds
        while not found and time.monotonic() < end:
            found = reader(m)
    finally:
        stop.set()
        ended = results.poll(10)
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()
        m.close()
    assert ended, "the writer was still busy 10 s after it was told to stop"
    try:
        out = results.recv()
    except EOFError:
        pytest.fail(f"the writer died without a word (exit code {p.exitcode})")
    assert out[0] == "ok", f"the writer failed, so nothing raced the reader:\n{out[1]}"
    assert isinstance(out[1], int) and out[1] > 0, f"the writer made no pass: {out[1]!r}"
    assert p.exitcode == 0, p.exitcode
    return found or None


def test_the_orphan_sweep_never_reads_a_live_slot_as_free(managers):
    """The orphan sweep reads slot states without a lock; writes of a live slot's flags
    (its ctx.lock made, an init waiter registered) and its publication must never show
    it free, or the sweep unlinks the memory and ctx.lock of a live context."""
    m = managers()
    _make(m, "x")
    inc = m._mapped["x"].inc

    def writer(c: ContextManager, stop) -> int:
        ctx = c.get_context("x")
        mapped = mapping_of(ctx)
        passes = 0
        while True:
            for _ in range(200):
                # Make ctx.lock anew: that writes the lock flag into the flags byte, beside
                # the state byte the sweep reads. This process keeps one lock object per
                # incarnation (on the mapping, and in a registry that hands it to a newer
                # mapping of the same context): both must let go of it, or ctx.lock
                # returns it again and writes nothing.
                old = mapped.lock
                mapped.lock = None
                c._mappings._locks.pop(mapped.inc, None)
                assert ctx.lock is not old, "ctx.lock was not made anew"
                passes += 1
            if stop.is_set():
                break
        c.return_context(ctx)
        return passes

    geo = m._geo
    assert _race(m.namespace, writer, lambda r: inc not in in_use_incarnations(r._buf, geo)) \
        is None, "a lock-free reader saw the live context's slot as free"
    assert os.path.exists(_seg_path(m, "x"))


def test_a_lock_owner_record_is_never_seen_half_written(managers):
    """Waiters and the sweeper read a lock's owner record without the lock: they must
    see no owner, or a whole one (its pid with its start time), never a pid beside a
    start time nobody wrote with it, which would be taken for a dead owner."""
    m = managers()
    lock = m._table.stripe_locks[0]
    rec = lock.off
    buf = m._buf
    from shmctx._proc import identity

    def writer(c: ContextManager, stop) -> int:
        lk = c._table.stripe_locks[0]
        passes = 0
        while True:
            for _ in range(500):
                lk.acquire()
                lk.release()
            passes += 1
            if stop.is_set():
                return passes

    starts: dict[int, int] = {identity.pid: identity.start}

    def reader(_m: ContextManager):
        for _ in range(2000):
            pid, epoch, start = LOCK.unpack_from(buf, rec)
            if pid:
                want = starts.get(pid)
                if want is None:
                    from shmctx._proc import start_time

                    want = starts[pid] = start_time(pid)
                if start != want or epoch == 0:
                    return (pid, epoch, start, want)
        return None

    assert _race(m.namespace, writer, reader) is None


def test_store_copies_without_clearing_first(managers):
    """``Words.store`` and the single stores leave no byte at a value nobody wrote."""
    m = managers()
    w = m._words
    off = m._geo.slot_off(3) + L.S_NAME_OFF  # a free slot's name bytes: ours to scribble
    st = L.S_BODY
    a = (1, 2, 3, 4, 5.0, 6.0)
    b = (7, 8, 9, 10, 11.0, 12.0)

    def writer(c: ContextManager, stop) -> int:
        cw = c._words
        passes = 0
        while True:
            for _ in range(1000):
                cw.store(off, st, *a)
                cw.store(off, st, *b)
            passes += 1
            if stop.is_set():
                return passes

    w.store(off, st, *a)
    good = {st.pack(*a), st.pack(*b)}
    words = [(i, i + 8) for i in range(0, st.size, 8)]  # no field of S_BODY spans these

    def reader(_m: ContextManager):
        for _ in range(2000):
            raw = bytes(m._buf[off:off + st.size])
            if raw not in good:
                for lo, hi in words:
                    if all(raw[lo:hi] != g[lo:hi] for g in good):
                        return raw
        return None

    assert _race(m.namespace, writer, reader) is None
    w.store(off, struct.Struct(f"{st.size}x"))  # back to zeros


def test_no_module_writes_the_table_with_pack_into():
    """``struct.pack_into`` clears its target before writing; every write to the shared
    table goes through ``_layout.Words`` (the one exception: building a table under its
    private staging name, which nobody else can see)."""
    src = pathlib.Path(L.__file__).parent
    offenders = []
    # Every module of the library, ctx-inspect's and new ones too, but those that write
    # only a context's own memory, under its ctx.lock (put, the demo, the xdist fixture
    # store), never the table.
    context_memory_only = {"_context.py", "_demo.py", "pytest_plugin.py"}
    modules = [p for p in sorted(src.rglob("*.py")) if p.name not in context_memory_only]
    assert len(modules) > 20, modules
    for path in modules:
        tree = ast.parse(path.read_text())
        allowed: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "_create":
                allowed |= {id(n) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr == "pack_into" and id(node) not in allowed:
                offenders.append(f"{path.relative_to(src)}:{node.lineno}")
    assert offenders == []
