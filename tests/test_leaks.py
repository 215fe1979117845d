"""What a process keeps of a namespace, and that it lets go of it: mappings of closed
contexts, the bound on cached mappings, ``ctx.lock`` semaphores, and managers dropped
without ``close()``.

Everything is counted where the kernel shows it: mappings in ``/proc/<pid>/maps``,
descriptors in ``/proc/<pid>/fd``, process entries in the table itself.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import threading
import weakref

import numpy
import pytest
from helpers import wait_for

from shmctx import (
    ContextClosedError,
    ContextConfig,
    ContextManager,
    InvalidConfigError,
    MemoryContextConfig,
    _failpoints,
    _shm,
)

CFG = ContextConfig(lock_timeout=0.2, cleanup_interval=0, capacity=256, max_processes=16)
MiB = 1 << 20


# --- counting what a process holds ---------------------------------------------------

def _objects(ns: str, lines: list[str]) -> list[tuple[str, int]]:
    """(kind, incarnation) of every object of namespace ``ns`` among ``lines`` (paths
    under /dev/shm, as /proc shows them): kind "c" a context's memory, "t"/"s" the
    table's semaphores, "table" the table itself."""
    out = []
    for path in lines:
        path = path.removesuffix(" (deleted)")
        if not path.startswith(_shm.SHM_DIR + "/"):
            continue
        entry = os.path.basename(path)
        if entry == _shm.table_name(ns).lstrip("/"):
            out.append(("table", 0))
            continue
        parsed = _shm.parse_object(ns, entry)
        if parsed is not None:
            out.append((parsed[1], parsed[2]))
    return out


def mapped(ns: str, kind: str | None = None, pid: int | str = "self") -> list[tuple[str, int]]:
    """Mappings of ``ns``'s objects in process ``pid`` (of one kind, if given)."""
    with open(f"/proc/{pid}/maps") as f:
        paths = [line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6]
    return [o for o in _objects(ns, paths) if kind is None or o[0] == kind]


def mapped_inodes(pid: int | str = "self") -> set[int]:
    """Inodes of the /dev/shm files mapped in process ``pid``. A semaphore this process
    created shows in its maps under glibc's temporary name (it builds the semaphore in
    a file of another name and links it into place), so semaphores are told by inode."""
    dev = os.stat(_shm.SHM_DIR).st_dev
    out = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split(None, 5)
            if len(fields) == 6 and fields[5].startswith(_shm.SHM_DIR + "/"):
                major, minor = (int(x, 16) for x in fields[3].split(":"))
                if os.makedev(major, minor) == dev:
                    out.add(int(fields[4]))
    return out


def lock_inode(m: ContextManager, inc: int) -> int:
    """Inode of the ctx.lock semaphore of incarnation ``inc`` (while it exists)."""
    name = _shm.ctx_lock_name(m.namespace, m._table.tag, inc)
    return os.stat(_shm.host_path(name, semaphore=True)).st_ino


def descriptors(ns: str, pid: int | str = "self") -> list[tuple[str, int]]:
    """Open descriptors of process ``pid`` on ``ns``'s objects."""
    paths = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            paths.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass  # closed since the listing
    return _objects(ns, paths)


def entries(m: ContextManager) -> list[int]:
    """Pids of the process entries in use in ``m``'s table."""
    return [p.pid for p in m._snapshot().procs]


def _info(m: ContextManager, name: str):
    return next((i for i in m.contexts() if i.name == name), None)


def _run_in_child(fn, *args) -> None:
    """Run ``fn(*args)`` in a forked process and fail if it fails."""
    p = mp.get_context("fork").Process(target=fn, args=args)
    p.start()
    p.join(30)
    assert p.exitcode == 0, f"child running {fn.__name__} exited with {p.exitcode}"


def _close_elsewhere(ns: str, names: list[str], force: bool = False) -> None:
    with ContextManager(namespace=ns, sweeper=False) as other:
        for name in names:
            other.close_context(name, force=force)


def _create(m: ContextManager, name: str, size: int = 4096, lock: bool = True):
    """Create ``name``, touch its lock, return the reference; its incarnation."""
    ctx, _ = m.get_or_create_context(name, MemoryContextConfig(size=size))
    inc = ctx.incarnation
    if lock:
        with ctx.lock:
            pass
    m.return_context(ctx)
    return inc


# --- closed contexts are unmapped ---------------------------------------------------

def test_context_closed_by_another_process_is_unmapped_here(managers, ns):
    m = managers()
    inc = _create(m, "big", size=4 * MiB)
    sem = lock_inode(m, inc)
    assert ("c", inc) in mapped(ns) and sem in mapped_inodes()
    assert ("c", inc) in descriptors(ns)

    _run_in_child(_close_elsewhere, ns, ["big"])
    # This process learns of it within a few contexts mapped or created (16 at most).
    for i in range(16):
        _create(m, f"other{i}", lock=False)
    assert ("c", inc) not in mapped(ns), "the closed context's memory is still mapped"
    assert ("c", inc) not in descriptors(ns)
    assert sem not in mapped_inodes(), "its ctx.lock semaphore is still mapped"
    assert "big" not in m._mapped


def test_the_sweeper_thread_unmaps_what_was_closed_without_any_call(managers, ns):
    """A process that only gets and returns contexts it has mapped (no cold operation)
    still lets go of a context closed elsewhere: its sweeper thread prunes each round."""
    cfg = ContextConfig(lock_timeout=0.2, cleanup_interval=0.05, capacity=256,
                        max_processes=16)
    m = managers(cfg, sweeper=True)
    inc = _create(m, "big", size=MiB)
    _run_in_child(_close_elsewhere, ns, ["big"])
    wait_for(lambda: ("c", inc) not in mapped(ns), 10, "the closed context to be unmapped")


def test_closed_context_stays_mapped_while_a_handle_or_export_uses_it(managers, ns):
    m = managers()
    ctx, _ = m.get_or_create_context("big", MemoryContextConfig(size=MiB))
    inc = ctx.incarnation
    ctx.buf[:5] = b"hello"
    export = numpy.frombuffer(ctx.buf, dtype=numpy.uint8)[:5]

    _run_in_child(_close_elsewhere, ns, ["big"], True)
    m.sweep()  # learns of the close now
    assert ("c", inc) in mapped(ns), "unmapped while a handle of this process holds it"
    assert bytes(export) == b"hello"
    with pytest.raises(ContextClosedError):
        m.return_context(ctx)
    del ctx
    assert ("c", inc) in mapped(ns), "unmapped under an exported buffer"
    assert bytes(export) == b"hello"
    del export
    assert ("c", inc) not in mapped(ns) and ("c", inc) not in descriptors(ns)


def test_force_close_here_does_not_pull_the_memory_from_a_writer(managers, ns):
    """Closing a context in one thread while another thread writes it under its lock:
    the writer finishes on memory that stays mapped until it lets go."""
    m = managers()
    ctx, _ = m.get_or_create_context("c", MemoryContextConfig(size=4096))
    inc = ctx.incarnation
    inside, go = threading.Event(), threading.Event()
    errors = []

    def writer(ctx):
        try:
            with ctx.lock:
                inside.set()
                go.wait(10)
                ctx._mapped.view[:3] = b"abc"  # what put() does under the lock
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=writer, args=(ctx,))
    t.start()
    assert inside.wait(10)
    sem = lock_inode(m, inc)
    m.close_context("c", force=True)
    go.set()
    t.join(10)
    assert not errors, errors
    assert sem in mapped_inodes()
    with pytest.raises(ContextClosedError):
        m.return_context(ctx)
    del ctx
    assert ("c", inc) not in mapped(ns) and sem not in mapped_inodes()


# --- the cache of unreferenced mappings is bounded ---------------------------------

def test_unreferenced_mappings_are_bounded_and_the_recent_ones_kept(managers, ns):
    m = managers()
    m.max_cached_mappings = 4
    held, _ = m.get_or_create_context("held", MemoryContextConfig(size=4096))
    incs, sems = [], set()
    for i in range(40):
        incs.append(_create(m, f"n{i}"))
        sems.add(lock_inode(m, incs[-1]))

    # The bound holds at each prune (when a mapping is added): the one returned since
    # may exceed it by one, and the referenced one does not count.
    contexts = [inc for kind, inc in mapped(ns) if kind == "c"]
    assert len(contexts) <= 4 + 2, f"{len(contexts)} context mappings for a bound of 4"
    assert len(sems & mapped_inodes()) <= 4 + 1
    assert len([o for o in descriptors(ns) if o[0] == "c"]) <= 4 + 2
    assert held.incarnation in contexts, "a referenced context was unmapped"
    assert set(incs[-4:]) <= set(contexts), "the most recently used ones were not kept"
    # Kept means kept: getting one of them again maps nothing new.
    before = m._mapped["n39"]
    again = m.get_context("n39")
    assert again._mapped is before
    m.return_context(again)
    m.return_context(held)
    # Evicted contexts are still usable: they are mapped again.
    old = m.get_context("n0")
    old.put("still here")
    assert old.get() == "still here"
    m.return_context(old)


@pytest.mark.parametrize("bad", [-1, 1.5, "8", None, True])
def test_max_cached_mappings_rejects_bad_values(managers, bad):
    m = managers()
    with pytest.raises(InvalidConfigError, match="max_cached_mappings"):
        m.max_cached_mappings = bad
    assert m.max_cached_mappings == 64


def test_thousands_of_locks_do_not_accumulate_semaphore_mappings(managers, ns):
    m = managers(ContextConfig(lock_timeout=0.2, cleanup_interval=0, capacity=256))
    m.max_cached_mappings = 16
    sems = set()
    for i in range(3000):  # past the capacity: the table evicts the oldest too
        ctx, _ = m.get_or_create_context(f"k{i}", MemoryContextConfig(size=64))
        ctx.put(i)
        sems.add(lock_inode(m, ctx.incarnation))
        m.return_context(ctx)
    assert len(sems & mapped_inodes()) <= 16 + 1
    assert len(mapped(ns, "c")) <= 16 + 1
    assert len([o for o in descriptors(ns) if o[0] == "c"]) <= 16 + 1


def test_a_lock_object_outlives_eviction_while_used(managers, ns):
    """One lock object per context in this process, also across its mapping leaving
    the cache: the lock is re-entrant per object, so a second object would make
    ``with ctx.lock: ctx.put(...)`` wait for itself."""
    m = managers()
    m.max_cached_mappings = 2
    ctx = m.get_or_create_context("a", MemoryContextConfig(size=64))[0]
    lock = ctx.lock
    with lock:
        m.return_context(ctx)  # returned inside the block: nothing references "a" now
        for i in range(8):
            _create(m, f"f{i}", size=64)  # pushes "a" out of the cache, unless kept
        again = m.get_context("a")
        assert again.lock is lock
        again.put(1)  # re-enters the held lock instead of waiting for itself
        m.return_context(again)
    kept = m.get_context("a")
    assert kept.lock is lock and kept.get() == 1
    m.return_context(kept)
    # A lock object held by the user (not by a thread) also stays the one lock.
    del kept
    for i in range(8):
        _create(m, f"g{i}", size=64)
    assert "a" not in m._mapped  # evicted: nothing of this process holds "a" itself
    assert m.get_context("a").lock is lock


def test_lock_semaphore_is_not_closed_under_a_waiting_thread(managers, ns):
    """The context is closed by another process while one thread holds its lock and
    another waits for it; both finish cleanly, and only then does the semaphore go."""
    m = managers()
    ctx, _ = m.get_or_create_context("c", MemoryContextConfig(size=64))
    inc = ctx.incarnation
    with ctx.lock:
        sem = lock_inode(m, inc)
    other = m.get_context("c")
    inside, leave = threading.Event(), threading.Event()
    waiting_tid = []
    outcome = []

    def holder(ctx):
        with ctx.lock:
            inside.set()
            leave.wait(10)

    def waiter(ctx):
        waiting_tid.append(threading.get_native_id())
        try:
            with ctx.lock:
                outcome.append("acquired")
        except ContextClosedError:
            outcome.append("closed")

    th = threading.Thread(target=holder, args=(ctx,))
    tw = threading.Thread(target=waiter, args=(other,))
    th.start()
    assert inside.wait(10)
    tw.start()
    # The waiter sleeps in the kernel, on the semaphore.
    wait_for(lambda: waiting_tid and _task_state(waiting_tid[0]) == "S", what="waiter asleep")
    _run_in_child(_close_elsewhere, ns, ["c"], True)
    m.sweep()  # the close is learnt here
    leave.set()
    th.join(10)
    tw.join(10)
    assert outcome == ["closed"]
    assert sem in mapped_inodes()  # the handles still hold the mapping
    for h in (ctx, other):
        with pytest.raises(ContextClosedError):
            m.return_context(h)
    del ctx, other, h
    assert sem not in mapped_inodes() and ("c", inc) not in mapped(ns)


def _task_state(tid: int) -> str:
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except OSError:
        return ""


# --- managers dropped without close() ----------------------------------------------

def _fill(m: ContextManager) -> object:
    """Use ``m`` the way a worker would; returns a handle still held."""
    _create(m, "a")
    _create(m, "big", size=MiB)
    held, _ = m.get_or_create_context("held", MemoryContextConfig(size=4096))
    with held.lock:
        pass
    return held


def test_dropped_manager_gives_back_its_entry_references_and_descriptors(managers, ns):
    keep = managers()
    before_fds = descriptors(ns)
    dropped = ContextManager(CFG, namespace=ns, sweeper=False)
    held = _fill(dropped)
    inc = held.incarnation
    sem = lock_inode(keep, inc)
    assert len(entries(keep)) == 2 and _info(keep, "held").refcount == 1
    ref = weakref.ref(dropped)
    del dropped, held
    gc.collect()  # the C hot path and the manager refer to each other: a cycle
    assert ref() is None, "the manager is never freed"
    wait_for(lambda: len(entries(keep)) == 1, 10, "the dropped manager's entry to be freed")
    assert _info(keep, "held").refcount == 0
    wait_for(lambda: sorted(descriptors(ns)) == sorted(before_fds), 10,
             f"descriptors closed: {before_fds} -> {descriptors(ns)}")
    assert sem not in mapped_inodes() and ("c", inc) not in mapped(ns)
    assert not mapped(ns, "c")
    keep.close_context("held")  # nothing of the dropped manager holds it any more


def test_dropped_manager_alone_unmaps_everything(ns):
    """Without any other manager in the process, nothing of the namespace stays mapped
    or open (its semaphores included) once a dropped manager is collected."""
    m = ContextManager(CFG, namespace=ns, sweeper=False)
    _fill(m)
    del m
    gc.collect()
    wait_for(lambda: not mapped(ns) and not descriptors(ns), 10,
             "every mapping and descriptor of the namespace to go")
    survivor = ContextManager(CFG, namespace=ns, sweeper=False)
    try:
        assert entries(survivor) == [os.getpid()]
    finally:
        survivor.unlink(force=True)


@pytest.mark.parametrize("lock", ["table", "stripe"])
def test_manager_collected_while_this_thread_holds_a_lock_of_its_namespace(managers, lock):
    """A finalizer runs at any allocation: here while this very thread holds the table
    lock (or a stripe lock) of the same namespace through another manager. It must not
    wait for it (that would wait for itself), and the entry is given back once the lock
    is released; the other manager goes on working meanwhile."""
    keep = managers()
    _create(keep, "shared")
    dropped = ContextManager(CFG, namespace=ns_of(keep), sweeper=False)
    h = dropped.get_context("shared")
    dropped.return_context(h)
    del h
    other_stripe = (keep._mapped["shared"].slot + 1) % keep._geo.stripes
    held = keep._table.table_lock if lock == "table" else keep._table.stripe_locks[other_stripe]
    held.acquire()
    try:
        del dropped
        gc.collect()  # returns: nothing in the finalizer waits for the held lock
        if lock == "stripe":
            ctx = keep.get_context("shared")  # the other manager keeps working
            keep.return_context(ctx)
    finally:
        held.release()
    wait_for(lambda: len(entries(keep)) == 1, 10, "the dropped manager's entry to be freed")
    ctx = keep.get_context("shared")
    keep.return_context(ctx)


def test_manager_collected_inside_another_managers_critical_section(managers, ns,
                                                                   monkeypatch):
    """The collection that frees a dropped manager runs right where another manager of
    the same namespace, in this thread, holds the table lock and a stripe lock (in the
    middle of closing a context): the finalizer must not wait for them, or this thread
    would wait for itself. The entry is given back once they are released."""
    keep = managers()
    _create(keep, "victim", lock=False)
    dropped = ContextManager(CFG, namespace=ns, sweeper=False)
    _create(dropped, "d")
    ref = weakref.ref(dropped)
    del dropped
    assert ref() is not None  # in a cycle (its ctx.lock, the C hot path): a collection frees it
    collected_inside = []

    def hit(name: str) -> None:
        if name == "close.state_freed" and ref() is not None:
            lock = keep._table.table_lock
            owner = lock.owner()
            assert owner[0] == os.getpid() and lock.sem.value == 0  # held, by this thread
            gc.collect()
            collected_inside.append(ref() is None)
            assert lock.owner() == owner, "the finalizer took the lock this thread holds"

    monkeypatch.setattr(_failpoints, "hit", hit)
    monkeypatch.setattr(_failpoints, "armed", True)
    keep.close_context("victim")
    monkeypatch.setattr(_failpoints, "armed", False)
    assert collected_inside == [True]
    wait_for(lambda: len(entries(keep)) == 1, 10, "the dropped manager's entry to be freed")


def ns_of(m: ContextManager) -> str:
    return m.namespace


def test_dropped_sweeper_gives_up_the_lead_and_its_thread_ends(managers, ns):
    lead_cfg = ContextConfig(lock_timeout=0.2, cleanup_interval=3600, capacity=256,
                             max_processes=16)
    keep = managers(lead_cfg)  # no sweeper thread of its own
    dropped = ContextManager(lead_cfg, namespace=ns, sweeper=True)
    wait_for(lambda: keep._table.sweeper().sweeper_pid == os.getpid(), 10, "the sweeper to lead")
    thread = dropped._sweeper
    wait_for(lambda: ref_only(thread), 10, "the sweeper thread to wait between rounds")
    del dropped
    gc.collect()
    wait_for(lambda: keep._table.sweeper().sweeper_pid == 0, 10, "the sweep lead to be given up")
    thread.join(10)
    assert not thread.is_alive(), "the dropped manager's sweeper thread lives on"
    wait_for(lambda: len(entries(keep)) == 1, 10, "the dropped manager's entry to be freed")


def ref_only(thread: threading.Thread) -> bool:
    """Whether the sweeper thread is between rounds (holding only a weak reference):
    it waits on its stop event."""
    frames = __import__("sys")._current_frames()
    frame = frames.get(thread.ident)
    while frame is not None:
        if frame.f_code.co_name == "run_sweeper":
            return "current" not in frame.f_locals and "m" not in frame.f_locals
        frame = frame.f_back
    return False


def _drop_inherited(ns: str, parent_pid: int) -> None:
    assert descriptors(ns)
    del _inherited[:]
    gc.collect()
    # Nothing of the table to give back (the entry is the parent's), only this
    # process's copies of the descriptors and mappings.
    wait_for(lambda: not descriptors(ns) and not mapped(ns), 10, "descriptors closed")
    with open(_shm.host_path(_shm.table_name(ns)), "rb") as f:
        data = f.read()
    from shmctx._snapshot import decode
    assert [p.pid for p in decode(data, locked=False).procs] == [parent_pid]


_inherited: list = []


def test_child_dropping_an_inherited_manager_leaves_the_parents_entry(ns):
    # Referenced from _inherited only, so that the child's copy of this frame does not
    # keep the child's copy of the manager alive.
    _inherited.append(ContextManager(CFG, namespace=ns, sweeper=False))
    try:
        _create(_inherited[0], "a")
        _run_in_child(_drop_inherited, ns, os.getpid())
        assert entries(_inherited[0]) == [os.getpid()]
        _inherited[0].return_context(_inherited[0].get_context("a"))
    finally:
        _inherited.pop().unlink(force=True)
