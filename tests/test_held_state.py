"""State a process keeps about what it holds, under interrupts and fork: Ctrl-C in
``ctx.lock``'s acquire, try_acquire or release in the window where its owner record names
this process but the hold's bookkeeping does not (the lock is released as the exception
leaves, or every other process would wait for a live owner without end); and a fork
descendant that inherits a manager and gets a dead ancestor's pid (it never gives back or
books into the entry a live process registered since). Every child is a real process,
the pid reuse real, in a pid namespace."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from shmctx import ContextConfig, ContextManager, MemoryContextConfig
from shmctx._context import _MappedLock
from shmctx._lock import RobustLock

LT = 0.2
CFG = ContextConfig(lock_timeout=LT, cleanup_interval=0, max_references=0)
MEM = MemoryContextConfig(size=4096)
fork = mp.get_context("fork")


class _InterruptedBeforeMarkHeld(_MappedLock):
    """``ctx.lock`` whose next ``_mark_held`` is preceded by Ctrl-C: what a SIGINT
    arriving as ``take()`` returns inside ``_hold`` does."""

    __slots__ = ()

    def _mark_held(self):
        self.__class__ = _MappedLock  # once
        raise KeyboardInterrupt


class _InterruptedBeforeAcquire(RobustLock):
    """A stripe lock whose next ``acquire`` is preceded by Ctrl-C (ctx.lock.release's
    ``with self.guard:`` interrupted as it starts)."""

    __slots__ = ()

    def acquire(self, timeout=None, _depth=1):
        self.__class__ = RobustLock  # once
        raise KeyboardInterrupt


def _other_process_takes(ns: str, timeout: float) -> bool:
    def child(conn):
        m = ContextManager(CFG, namespace=ns, sweeper=False)
        ctx = m.get_context("c")
        try:
            ctx.lock.acquire(timeout=timeout)
            ctx.lock.release()
            conn.send(True)
        except TimeoutError:
            conn.send(False)
        finally:
            m.return_context(ctx)
            m.close()

    a, b = fork.Pipe()
    p = fork.Process(target=child, args=(b,))
    p.start()
    ok = a.recv()
    p.join()
    return ok


@pytest.mark.parametrize("how", ["acquire", "try_acquire"])
def test_ctrl_c_before_the_hold_is_marked_does_not_wedge_ctx_lock(managers, ns, how):
    m = managers()
    ctx, _ = m.get_or_create_context("c", MEM)
    lock = ctx.lock
    lock.__class__ = _InterruptedBeforeMarkHeld
    with pytest.raises(KeyboardInterrupt):
        getattr(lock, how)()
    try:
        assert _other_process_takes(ns, 10 * LT), "ctx.lock left held by a live process"
    finally:
        m.return_context(ctx)


def test_ctrl_c_in_release_before_the_record_is_cleared_does_not_wedge_ctx_lock(managers, ns):
    m = managers()
    ctx, _ = m.get_or_create_context("c", MEM)
    lock = ctx.lock
    lock.acquire()
    lock.guard.__class__ = _InterruptedBeforeAcquire
    with pytest.raises(KeyboardInterrupt):
        lock.release()
    try:
        assert _other_process_takes(ns, 10 * LT), "ctx.lock left held by a live process"
    finally:
        m.return_context(ctx)


# --- which process entry a manager may give back: a fork descendant with a reused pid ---

_PID_REUSE = r'''
import os, sys
from shmctx import ContextConfig, ContextManager, MemoryContextConfig
import shmctx._layout as L
assert os.getpid() == 1  # the first process of a new pid namespace
ns, how = sys.argv[1], sys.argv[2]
CFG = ContextConfig(lock_timeout=0.2, cleanup_interval=0, max_references=0)
go_r, go_w = os.pipe()
done_r, done_w = os.pipe()
forked_r, forked_w = os.pipe()
P = os.fork()
if P == 0:  # pid 2: registers, forks a child that never registers, dies
    m = ContextManager(CFG, namespace=ns, sweeper=False)
    c, _ = m.get_or_create_context("c", MemoryContextConfig(size=4096))
    if os.fork() == 0:  # pid 3, the child: outlives P
        # Its at-fork handler has run by now: the child let go of P's description of
        # the table file, so P's entry lock goes with P (else P would look alive).
        os.write(forked_w, b"x")
        os.read(go_r, 1)
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write("1")  # the next pid is 2 again: P's
        G = os.fork()
        if G == 0:  # the grandchild, with its grandparent's pid
            assert os.getpid() == 2
            if how == "close":
                m.close()
            else:
                m.return_context(m.get_context("c"))
            os._exit(0)
        os.waitpid(G, 0)
        os.write(done_w, b"x")
        os._exit(0)
    os.read(forked_r, 1)
    os._exit(0)  # P dies holding its entry and its reference
os.waitpid(P, 0)
x = ContextManager(CFG, namespace=ns, sweeper=False)
x.reclaim(P)  # P's entry is free again...
y = ContextManager(CFG, namespace=ns, sweeper=False)  # ...and Y, alive, registers in it
h = y.get_context("c")
t = y._table
before = (t.proc_head(y._proc).pid, sorted(c for _s, c in t.proc_refs(y._proc)),
          L.SLOT["refcount"].read(t.buf, y._geo.slot_off(0)))
os.write(go_w, b"x")
os.read(done_r, 1)
after = (t.proc_head(y._proc).pid, sorted(c for _s, c in t.proc_refs(y._proc)),
         L.SLOT["refcount"].read(t.buf, y._geo.slot_off(0)))
print(before, after)
x.unlink(force=True)
sys.exit(0 if before == after else 1)
'''


@pytest.mark.parametrize("how", ["close", "get"])
def test_fork_descendant_with_a_reused_pid_leaves_a_live_process_entry_alone(ns, how):
    """A child that never registered forks a grandchild that gets the pid of its
    grandparent, dead meanwhile (a pid namespace makes the reuse happen now). The
    manager it inherits still carries the grandparent's entry, which a live process Y
    has registered in since. The grandchild's close (own_entry: pid matches) must not
    give back Y's entry and reference; its get must not book in Y's entry."""
    import subprocess
    import sys

    r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable,
                        "-c", _PID_REUSE, ns, how], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
