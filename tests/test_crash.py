"""Crash safety: processes die at every failpoint, holding locks, references or half-made
contexts, and the others recover. Every child here dies for real (SIGKILL / _exit)."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
from helpers import wait_for

from shmctx import (
    ContextConfig,
    ContextError,
    ContextInUseError,
    ContextManager,
    MemoryContextConfig,
    _failpoints,
    _lock,
    _shm,
)
from shmctx import (
    _layout as L,
)
from shmctx._proc import identity, start_time

pytestmark = pytest.mark.usefixtures("hot_path")  # each test on the C and Python hot path

LT = 0.2  # lock_timeout: short, so recoveries are quick
CFG = ContextConfig(lock_timeout=LT, cleanup_interval=0, max_references=0)
SIZE = 4096
MEM = MemoryContextConfig(size=SIZE)
fork = mp.get_context("fork")




def run(target, *args, ctx=fork) -> int:
    p = ctx.Process(target=target, args=args)
    p.start()
    p.join(60)
    if p.is_alive():
        p.kill()
        p.join()
        raise AssertionError("child did not finish")
    return p.exitcode


def _die_at(ns: str, spec: str, scenario: str) -> None:
    """Child body: arm failpoint ``spec`` and run ``scenario``; it must die there."""
    _failpoints.arm(spec)
    m = ContextManager(namespace=ns) if scenario != "register" else None
    if scenario == "register":
        ContextManager(namespace=ns)
    elif scenario == "create":
        m.get_or_create_context("new", MEM)
    elif scenario == "create_init":
        m.get_or_create_context("new", MEM, init=lambda c: c.buf.__setitem__(0, 1))
    elif scenario == "create_object":
        m.get_or_create_object("new", lambda: {"b": pickle.PickleBuffer(bytearray(SIZE))})
    elif scenario == "publish":
        m.publish("spare", MEM, init=lambda c: c.buf.__setitem__(0, 2))
    elif scenario == "get":
        m.get_context("held")
    elif scenario == "get_return":
        m.return_context(m.get_context("held"))
    elif scenario == "close":
        m.close_context("spare")
    elif scenario == "sweep":
        m.sweep()
    elif scenario == "lead":
        from shmctx._sweeper import take_lead

        take_lead(m._slots)
    os._exit(3)  # the failpoint was not hit


def _hold_table_lock_and_die(ns: str) -> None:
    m = ContextManager(namespace=ns)
    m._table.table_lock.acquire()
    os.kill(os.getpid(), signal.SIGKILL)


def _take_ref_and_exit(ns: str, n: int, name: str = "held") -> None:
    m = ContextManager(namespace=ns)
    held = [m.get_context(name) for _ in range(n)]  # kept: a dropped handle gives its back
    assert len(held) == n
    os._exit(0)


def _prepare(ns: str) -> tuple[ContextManager, object]:
    m = ContextManager(CFG, namespace=ns)
    held, _ = m.get_or_create_context("held", MEM)
    held.buf[:5] = b"alive"
    spare, _ = m.get_or_create_context("spare", MEM)
    m.return_context(spare)
    return m, held


def _verify_recovered(m: ContextManager, held) -> None:
    """After a crash: every lock works again, the table is sound, nothing live was lost."""
    for name in ("new", "after-1", "after-2", "spare"):
        ctx, _ = m.get_or_create_context(name, MEM)
        m.return_context(ctx)
    extra = m.get_context("held")
    m.return_context(extra)
    m.sweep()
    assert m.check() == []
    assert m.validate_context(held)
    assert bytes(held.buf[:5]) == b"alive"
    info = {i.name: i for i in m.contexts()}
    assert info["held"].holders == {os.getpid(): 1}
    for s in m._table.stripe_locks:  # no stripe left wedged by the dead child
        s.acquire(timeout=5)
        s.release()


SCENARIOS = {
    "lock.acquired_before_owner": "create",
    "lock.release_before_post": "create",
    "create.slot_claimed": "create",
    "create.segment_made": "create",
    "create.in_init": "create_init",
    "create.in_factory": "create_object",
    "create.object_packed": "create_object",
    "publish.built": "publish",
    "publish.new_ready": "publish",
    "acquire.proc_counted": "get",
    "return.proc_counted": "get_return",
    "close.state_freed": "close",
    "close.index_removed": "close",
    "register.entry_claimed": "register",
    "sweep.leader_taken": "lead",
}


@pytest.mark.parametrize("site", sorted(SCENARIOS))
def test_failpoint_kill_then_others_recover(ns, site):
    m, held = _prepare(ns)
    try:
        assert run(_die_at, ns, site, SCENARIOS[site]) == -signal.SIGKILL
        _verify_recovered(m, held)
    finally:
        m.unlink(force=True)


def _refresh_and_die(ns: str, site: str, conn) -> None:
    """Child body: hold version 1 of "v", wait for version 2, refresh with ``site``
    armed: it must die there."""
    m = ContextManager(namespace=ns, sweeper=False)
    old = m.get_context("v")
    assert old.version == 1
    conn.send("holding")
    conn.recv()  # version 2 is published
    _failpoints.arm(site)
    m.refresh(old)
    os._exit(3)  # the failpoint was not hit


@pytest.mark.parametrize("site", ["acquire.proc_counted", "return.proc_counted"])
def test_refresher_killed_mid_refresh(ns, site):
    """A worker moving from a superseded version to the current one dies half way
    (after counting its new reference, or while giving back the old one): the sweep
    reclaims what it held, the old version goes with that, the table is sound."""
    m = ContextManager(CFG, namespace=ns, sweeper=False)
    try:
        v1 = m.publish("v", MEM, init=lambda c: c.buf.__setitem__(0, 1))
        old_segment = m._table.segment(v1._mapped.slot, v1.incarnation)
        m.return_context(v1)
        parent, child = mp.Pipe()
        p = fork.Process(target=_refresh_and_die, args=(ns, site, child))
        p.start()
        assert parent.recv() == "holding"
        v2 = m.publish("v", MEM, init=lambda c: c.buf.__setitem__(0, 2))
        parent.send("go")
        p.join(60)
        assert p.exitcode == -signal.SIGKILL
        m.sweep()
        assert m.check() == []
        info = [(i.version, i.superseded, i.refcount) for i in m.contexts() if i.name == "v"]
        assert info == [(2, False, 1)]  # ours; the dead refresher holds nothing
        assert not os.path.exists(_shm.host_path(old_segment))
        m.return_context(v2)
    finally:
        m.unlink(force=True)


def test_failpoint_lock_takeover_second_recoverer_dies(ns):
    """The first waiter to take over a dead owner's lock dies mid-takeover; the kernel
    drops its arbiter claim and the next waiter recovers."""
    m, held = _prepare(ns)
    try:
        assert run(_hold_table_lock_and_die, ns) == -signal.SIGKILL
        assert run(_die_at, ns, "lock.takeover", "create") == -signal.SIGKILL
        _verify_recovered(m, held)
    finally:
        m.unlink(force=True)


def test_failpoint_reclaim_ref_cleared(ns):
    m, held = _prepare(ns)
    try:
        assert run(_take_ref_and_exit, ns, 2) == 0
        assert run(_die_at, ns, "reclaim.ref_cleared", "sweep") == -signal.SIGKILL
        _verify_recovered(m, held)
    finally:
        m.unlink(force=True)


def test_failpoint_table_create_before_magic(new_ns):
    ns = new_ns()
    assert run(_die_at, ns, "table.create_before_magic", "register") == -signal.SIGKILL
    # The dead creator's half-built table was never published: a new one is created.
    m = ContextManager(CFG, namespace=ns)
    ctx, existed = m.get_or_create_context("x", MEM)
    assert not existed
    m.return_context(ctx)
    assert m.check() == []
    m.unlink()  # also removes the dead creator's staging objects


def test_failpoint_armed_through_environment(ns):
    """The documented way to arm failpoints in a spawned program: the environment."""
    m, held = _prepare(ns)
    try:
        code = (f"from shmctx import ContextManager, MemoryContextConfig\n"
                f"m = ContextManager(namespace={ns!r})\n"
                f"m.get_or_create_context('new', MemoryContextConfig(size={SIZE}))\n")
        env = dict(os.environ, SHMCTX_FAILPOINTS="create.slot_claimed:kill")
        proc = subprocess.run([sys.executable, "-c", code], env=env, timeout=60)
        assert proc.returncode == -signal.SIGKILL
        _verify_recovered(m, held)
    finally:
        m.unlink(force=True)


def test_every_failpoint_has_a_test():
    covered = set(SCENARIOS) | {"lock.takeover", "reclaim.ref_cleared",
                                "table.create_before_magic"}
    assert covered == set(_failpoints.SITES)


# --- dead holders ---------------------------------------------------------------------


def _hold_and_die(ns: str, how: str, ready) -> None:
    m = ContextManager(namespace=ns)
    held = [m.get_context("held"), m.get_context("held")]  # kept: references
    ready.set()
    assert held
    if how == "exit":
        os._exit(0)
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_sweeper_reclaims_dead_holders(ns, mp_ctx, how):
    m = ContextManager(ContextConfig(lock_timeout=LT, cleanup_interval=0.1, max_references=0),
                       namespace=ns, sweeper=True)
    try:
        held, _ = m.get_or_create_context("held", MEM)
        ready = mp_ctx.Event()
        p = mp_ctx.Process(target=_hold_and_die, args=(ns, how, ready))
        p.start()
        p.join(30)
        assert ready.is_set()

        def only_mine():
            (info,) = m.contexts()
            return info.holders == {os.getpid(): 1} and info.refcount == 1

        wait_for(only_mine, what="the sweeper to reclaim the dead holder")
        assert m.check() == []
        m.return_context(held)
    finally:
        m.unlink(force=True)


def _hold_until(ns: str, ready, release) -> None:
    m = ContextManager(namespace=ns)
    held = m.get_context("held")  # kept: a reference
    ready.set()
    release.wait(30)
    os._exit(0 if held else 1)  # without returning


def test_reclaim_refuses_live_pid_then_reclaims_dead(ns):
    m, _held = _prepare(ns)
    try:
        ready, release = fork.Event(), fork.Event()
        p = fork.Process(target=_hold_until, args=(ns, ready, release))
        p.start()
        assert ready.wait(30)
        with pytest.raises(ContextInUseError, match=str(p.pid)):
            m.reclaim(p.pid)
        assert {i.name: i.refcount for i in m.contexts()}["held"] == 2
        release.set()
        p.join(30)
        assert m.reclaim(p.pid) == 1
        assert m.reclaim(p.pid) == 0
        assert {i.name: i.refcount for i in m.contexts()}["held"] == 1
        assert m.check() == []
    finally:
        m.unlink(force=True)


def _hold_every_context_and_die(ns: str, names: list[str]) -> None:
    """Child body: hold two references to each context (the second from the hot path),
    then die with them."""
    m = ContextManager(namespace=ns, sweeper=False)
    held = [m.get_or_create_context(n, MEM)[0] for n in names]
    held += [m.get_context(n) for n in names]
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_dead_process_holding_every_context_is_reclaimed_by_a_sweep(ns):
    """A process that held references to every context of the table (no per-process
    limit) is killed: a sweep gives all of them back, and only them (the survivor keeps
    its own), and the table is sound."""
    cap = 300
    m = ContextManager(ContextConfig(capacity=cap, lock_timeout=LT, cleanup_interval=0,
                                     max_processes=8), namespace=ns, sweeper=False)
    try:
        names = [f"c{i}" for i in range(cap)]
        mine, _ = m.get_or_create_context(names[-1], MEM)
        p = fork.Process(target=_hold_every_context_and_die, args=(ns, names))
        p.start()
        p.join(60)
        assert p.exitcode == -signal.SIGKILL
        me = os.getpid()
        before = {i.name: i for i in m.contexts()}
        assert len(before) == cap
        assert all(before[n].holders == {p.pid: 2} for n in names[:-1])
        assert before[names[-1]].holders == {p.pid: 2, me: 1}
        report = m.sweep()
        assert report.reclaimed == {p.pid: 2 * cap}
        after = {i.name: (i.refcount, i.holders) for i in m.contexts()}
        assert after[names[-1]] == (1, {me: 1})
        assert all(after.get(n, (0, {})) == (0, {}) for n in names[:-1])
        assert m.check() == []
        m.return_context(mine)
    finally:
        m.unlink(force=True)


def test_reused_pid_does_not_inherit_references(ns):
    """A process entry recorded for (pid, start) is dead once that pid runs a process
    with another start time: its references are reclaimed although the pid is alive."""
    m, _held = _prepare(ns)
    ready, release = fork.Event(), fork.Event()
    p = fork.Process(target=_hold_until, args=(ns, ready, release))
    p.start()
    try:
        assert ready.wait(30)
        t = m._table
        slot = next(s.slot for s in m._snapshot().slots if s.name == "held")
        with t.table_lock:  # forge the entry a dead, earlier owner of this pid left
            proc = m._entry._find_free_proc()
            off = t.geo.proc_off(proc)
            L.REF_RECORD.struct.pack_into(t.buf, t.geo.ref_off(proc, slot), 3)
            L.P_HEAD.pack_into(t.buf, off, p.pid, 0, start_time(p.pid) - 1000, time.time())
            with t.stripe_of(slot):
                so = t.geo.slot_off(slot)
                rc = L.SLOT["refcount"].read(t.buf, so)
                L.S_REFCOUNT.pack_into(t.buf, so + L.S_REFCOUNT_OFF, rc + 3)
        report = m.sweep()
        assert report.reclaimed == {p.pid: 3}
        info = {i.name: i for i in m.contexts()}["held"]
        assert info.holders == {os.getpid(): 1, p.pid: 1}  # the live process keeps its own
        assert m.check() == []
    finally:
        release.set()
        p.join(30)
        m.unlink(force=True)


# --- wedged locks ---------------------------------------------------------------------


def test_dead_table_lock_owner_does_not_wedge(ns, mp_ctx):
    m, held = _prepare(ns)
    try:
        assert run(_hold_table_lock_and_die, ns, ctx=mp_ctx) == -signal.SIGKILL
        before = _lock.recoveries()
        _verify_recovered(m, held)
        assert _lock.recoveries() == before + 1
    finally:
        m.unlink(force=True)


def _waiter(ns: str, name: str, start, results) -> None:
    start.wait(30)
    m = ContextManager(namespace=ns)
    ctx, _ = m.get_or_create_context(name, MEM)
    m.return_context(ctx)
    results.put(_lock.recoveries())
    m.close()


def test_only_one_waiter_recovers_a_dead_owner(ns):
    m, held = _prepare(ns)
    try:
        assert run(_hold_table_lock_and_die, ns) == -signal.SIGKILL
        inherited = _lock.recoveries()  # forked children start from this process's count
        start, results = fork.Event(), fork.Queue()
        procs = [fork.Process(target=_waiter, args=(ns, f"w{i}", start, results))
                 for i in range(4)]
        for p in procs:
            p.start()
        start.set()
        counts = [results.get(timeout=60) - inherited for _ in procs]
        for p in procs:
            p.join(30)
        assert sorted(counts) == [0, 0, 0, 1]
        _verify_recovered(m, held)
    finally:
        m.unlink(force=True)


def _hold_table_lock_stopped(ns: str, held_evt, released) -> None:
    m = ContextManager(namespace=ns)
    m._table.table_lock.acquire()
    held_evt.set()
    os.kill(os.getpid(), signal.SIGSTOP)  # alive, but not running: "slow"
    released.set()
    m._table.table_lock.release()
    m.close()
    os._exit(0)


def test_slow_live_owner_is_never_robbed(ns):
    m, _held = _prepare(ns)
    held_evt, released = fork.Event(), fork.Event()
    p = fork.Process(target=_hold_table_lock_stopped, args=(ns, held_evt, released))
    p.start()
    try:
        assert held_evt.wait(30)
        before = _lock.recoveries()
        got_it_after_release = []

        def contender():
            ctx, _ = m.get_or_create_context("contended", MEM)
            got_it_after_release.append(released.is_set())
            m.return_context(ctx)

        th = threading.Thread(target=contender)
        th.start()
        th.join(5 * LT)  # five lock timeouts: a robber would have struck by now
        assert th.is_alive(), "the waiter took the lock of a live owner"
        os.kill(p.pid, signal.SIGCONT)
        th.join(30)
        assert got_it_after_release == [True]
        assert _lock.recoveries() == before
    finally:
        os.kill(p.pid, signal.SIGCONT)
        p.join(30)
        m.unlink(force=True)


# --- creators that die ----------------------------------------------------------------


def _create_and_die_in_init(ns: str, in_init, go) -> None:
    m = ContextManager(namespace=ns)

    def init(ctx):
        in_init.set()
        go.wait(30)
        os.kill(os.getpid(), signal.SIGKILL)

    m.get_or_create_context("slow", MEM, init=init)


def _create_waiting(ns: str, results) -> None:
    m = ContextManager(namespace=ns)
    ctx, existed = m.get_or_create_context("slow", MEM, init=lambda c: c.put("second"))
    results.put((existed, ctx.get()))
    m.return_context(ctx)
    m.close()


def test_creator_dying_in_init_lets_a_waiter_create_afresh(ns, mp_ctx):
    m, held = _prepare(ns)
    try:
        in_init, go, results = mp_ctx.Event(), mp_ctx.Event(), mp_ctx.Queue()
        creator = mp_ctx.Process(target=_create_and_die_in_init, args=(ns, in_init, go))
        creator.start()
        assert in_init.wait(30)
        waiter = mp_ctx.Process(target=_create_waiting, args=(ns, results))
        waiter.start()
        slot = next(s.slot for s in m._snapshot().slots if s.name == "slow")
        so = m._table.geo.slot_off(slot)
        wait_for(lambda: L.SLOT["flags"].read(m._table.buf, so) & L.SLOT_WAITERS,
                 what="the waiter to wait on the init")
        go.set()
        assert results.get(timeout=60) == (False, "second")
        creator.join(30)
        waiter.join(30)
        assert creator.exitcode == -signal.SIGKILL
        _verify_recovered(m, held)
    finally:
        m.unlink(force=True)


# --- the sweeper's process dies -------------------------------------------------------


def _lead_then_wait(ns: str, led) -> None:
    m = ContextManager(namespace=ns, sweeper=True)
    wait_for(lambda: m._table.sweeper().sweeper_pid == os.getpid(), what="leading")
    led.set()
    threading.Event().wait(60)


def test_dead_sweeper_leader_is_replaced(ns, mp_ctx):
    m = ContextManager(ContextConfig(lock_timeout=LT, cleanup_interval=0.1), namespace=ns,
                       sweeper=False)
    try:
        led = mp_ctx.Event()
        p = mp_ctx.Process(target=_lead_then_wait, args=(ns, led))
        p.start()
        assert led.wait(30)
        standby = ContextManager(namespace=ns, sweeper=True)
        assert m._table.sweeper().sweeper_pid == p.pid  # a live leader is never displaced
        p.kill()
        p.join(30)
        wait_for(lambda: m._table.sweeper().sweeper_pid == os.getpid(), what="the standby to lead")
        standby.close()
        assert m._table.sweeper().sweeper_pid == 0
    finally:
        m.unlink(force=True)


# --- everything dies ------------------------------------------------------------------


def _owner(ns: str, ready) -> None:
    m = ContextManager(ContextConfig(lock_timeout=LT, cleanup_interval=0.05),
                       namespace=ns, sweeper=True)
    _ctx, _ = m.get_or_create_context("data", MEM, init=lambda c: c.put({"rows": [1, 2, 3]}))
    ready.set()
    threading.Event().wait(60)


def _user(ns: str, ready) -> None:
    m = ContextManager(namespace=ns)
    held = [m.get_context("data"), m.get_context("data")]  # kept: references
    ready.set()
    threading.Event().wait(60)
    assert held


def test_everything_dies_then_the_next_manager_carries_on(new_ns, mp_ctx):
    ns = new_ns()
    events = [mp_ctx.Event() for _ in range(3)]
    owner = mp_ctx.Process(target=_owner, args=(ns, events[0]))
    owner.start()
    assert events[0].wait(30)
    users = [mp_ctx.Process(target=_user, args=(ns, e)) for e in events[1:]]
    for u in users:
        u.start()
    assert all(e.wait(30) for e in events)
    for p in [owner, *users]:
        p.kill()
        p.join(30)
    m = ContextManager(namespace=ns)
    try:
        (info,) = m.contexts()
        assert info.refcount == 5
        report = m.sweep()
        assert sum(report.reclaimed.values()) == 5
        ctx = m.get_context("data")
        assert ctx.get() == {"rows": [1, 2, 3]}
        m.return_context(ctx)
        assert m.check() == []
    finally:
        m.unlink()


# --- scribbled tables -----------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_scribbled_slot_is_reported_and_others_stay_usable(ns, seed):
    rng = random.Random(seed)
    m = ContextManager(CFG, namespace=ns)
    try:
        names = [f"c{i}" for i in range(6)]
        for n in names:
            ctx, _ = m.get_or_create_context(n, MEM, init=lambda c, n=n: c.put(n))
            m.return_context(ctx)
        slots = {s.name: s.slot for s in m._snapshot().slots}
        victim = rng.choice(names)
        so = m._table.geo.slot_off(slots[victim])
        kind = seed % 3
        if kind == 0:  # random garbage over the whole slot
            m._table.buf[so : so + L.SLOT_SIZE] = rng.randbytes(L.SLOT_SIZE)
        elif kind == 1:  # an impossible refcount
            L.S_REFCOUNT.pack_into(m._table.buf, so + L.S_REFCOUNT_OFF, 0xFFFF0000)
        else:  # a wrong hash
            L.S_HEAD.pack_into(m._table.buf, so, L.READY, 0, len(victim), 0,
                               L.SLOT["incarnation"].read(m._table.buf, so),
                               rng.getrandbits(64))
        assert m.check(), "damage went unnoticed"
        for n in names:
            if n == victim:
                continue
            ctx = m.get_context(n)
            assert ctx.get() == n
            m.return_context(ctx)
        try:  # the damaged one: anything but a ContextError is a defect
            m.return_context(m.get_context(victim))
        except ContextError:
            pass
        m.contexts()
        m.sweep()
    finally:
        m.unlink(force=True)


# --- the supervisor -------------------------------------------------------------------


def test_ctx_supervisor_takes_lead_reclaims_and_unlinks(ns, mp_ctx):
    m = ContextManager(ContextConfig(lock_timeout=LT, cleanup_interval=30), namespace=ns,
                       sweeper=False)
    _held, _ = m.get_or_create_context("held", MEM)
    led = mp_ctx.Event()
    dead_leader = mp_ctx.Process(target=_lead_then_wait, args=(ns, led))
    dead_leader.start()
    assert led.wait(30)
    dead_leader.kill()
    dead_leader.join(30)
    exe = os.path.join(os.path.dirname(sys.executable), "ctx-supervisor")
    sup = subprocess.Popen([exe, "--namespace", ns, "--interval", "0.1", "--unlink-on-exit"],
                           stderr=subprocess.PIPE, text=True)
    try:
        assert run(_take_ref_and_exit, ns, 2) == 0
        wait_for(lambda: m._table.sweeper().sweeper_pid == sup.pid, what="the supervisor to lead")
        wait_for(lambda: {i.name: i.refcount for i in m.contexts()}["held"] == 1,
                 what="the supervisor to reclaim the dead holder")
        sup.send_signal(signal.SIGTERM)
        _out, err = sup.communicate(timeout=30)
        assert sup.returncode == 0, err
        assert "reclaimed" in err and "unlinked" in err
        assert "Traceback" not in err
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
        m.close()


def test_identity_follows_fork():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, f"{identity.pid} {identity.start}".encode())
        os._exit(0)
    os.close(w)
    child_pid, child_start = map(int, os.read(r, 100).split())
    os.close(r)
    os.waitpid(pid, 0)
    assert child_pid == pid and child_pid != identity.pid
    assert child_start >= identity.start


def test_forked_child_cannot_claim_the_parents_arbiter_key(ns):
    """The arbiter's OFD lock must not be shared across fork, or parent and child could
    both take over the same dead owner's lock."""
    m = ContextManager(CFG, namespace=ns)
    try:
        assert m._table.arbiter.try_claim(5)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, b"1" if m._table.arbiter.try_claim(5) else b"0")
            os._exit(0)
        os.close(w)
        claimed = os.read(r, 1)
        os.close(r)
        os.waitpid(pid, 0)
        assert claimed == b"0"
        m._table.arbiter.release(5)
    finally:
        m.unlink()


def _unlink_and_die(ns: str) -> None:
    _failpoints.arm("close.index_removed")
    ContextManager(namespace=ns).unlink(force=True)


def test_unlink_killed_half_way_does_not_block_the_namespace(new_ns):
    """A process killed inside unlink() leaves a table marked unlinked; the next manager
    of the namespace makes a new table instead of failing for good."""
    ns = new_ns()
    m = ContextManager(CFG, namespace=ns)
    ctx, _ = m.get_or_create_context("x", MEM)
    m.return_context(ctx)
    m.close()
    assert run(_unlink_and_die, ns) == -signal.SIGKILL
    fresh = ContextManager(CFG, namespace=ns)
    ctx, existed = fresh.get_or_create_context("x", MEM)
    assert not existed
    fresh.return_context(ctx)
    assert fresh.check() == []
    fresh.unlink()  # and the dead unlink's leftovers go with it
