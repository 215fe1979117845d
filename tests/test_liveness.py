"""Liveness of the processes a table records (``_liveness``): a kernel lock per process
entry, and ``/proc`` start times only where there is no entry.

Two faults the start times alone got wrong, shown with real processes:

* ``/proc`` mounted ``hidepid=2``: another user's live process has no ``/proc/PID``, so
  it looked dead and a sweep by a non-root user took its references, its lock and let
  ``unlink`` destroy its namespace.
* a pid reused within one clock tick (same pid, same start time): the dead process's
  lock was never recovered and the newcomer inherited its references.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing as mp
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import wait_for

from shmctx import ContextConfig, ContextManager, MemoryContextConfig
from shmctx import _layout as L
from shmctx._entry import reclaim_entry
from shmctx._liveness import ENTRY_BASE
from shmctx._lock import _FLOCK
from shmctx._proc import start_time

LT = 0.2
CFG = ContextConfig(lock_timeout=LT, cleanup_interval=0, max_references=0)
MEM = MemoryContextConfig(size=64)
fork = mp.get_context("fork")


def _kernel_says_held(fd: int, proc: int) -> bool:
    got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK,
                      _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, ENTRY_BASE + proc, 1, 0))
    return _FLOCK.unpack(got)[0] != fcntl.F_UNLCK


def _needs_root() -> None:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) for a private /proc or pid namespace")


# --- the mechanism --------------------------------------------------------------------


def test_an_entry_is_locked_exactly_while_registered(managers):
    """Registering takes the entry's kernel lock (flagged in the entry); another
    description sees it held; closing frees the entry, then the lock."""
    a, b = managers(CFG), managers(CFG)
    pa = a._proc
    assert a._table.proc_head(pa).flags & L.P_LIVE_LOCK
    assert _kernel_says_held(b._table.arbiter.fd, pa)
    assert a._table.liveness.entry_alive(pa) and b._table.liveness.entry_alive(pa)
    a.close()
    assert b._table.proc_head(pa).pid == 0
    assert not _kernel_says_held(b._table.arbiter.fd, pa)


def _fork_and_spawn_then_wait(ns: str, out) -> None:
    m = ContextManager(CFG, namespace=ns, sweeper=False)
    held = m.get_context("c")  # a reference of this process, for as long as it runs
    child = os.fork()
    if child == 0:  # holds its inherited copy of the parent's descriptors, unless closed
        signal.pause()
        os._exit(0)
    spawned = os.posix_spawn("/bin/sleep", ["sleep", "60"], os.environ)  # exec: CLOEXEC
    out.send((child, spawned))
    signal.pause()
    m.return_context(held)


def test_children_do_not_keep_a_dead_parents_entry_alive(managers, ns):
    """A child forked by os.fork closes its copy of the parent's description at fork,
    and an exec'd child never has one: when the parent dies, its entry is dead although
    both children (which share nothing else with it) still run."""
    m = managers(CFG)
    ctx, _ = m.get_or_create_context("c", MEM)
    m.return_context(ctx)
    here, there = fork.Pipe()
    p = fork.Process(target=_fork_and_spawn_then_wait, args=(ns, there))
    p.start()
    assert here.poll(30), "the parent did not start its children"
    children = here.recv()
    try:
        wait_for(lambda: m.contexts()[0].holders.get(p.pid), what="the parent's reference")
        p.kill()
        # Not p.join(): the forked child keeps multiprocessing's sentinel pipe open.
        wait_for(lambda: start_time(p.pid) is None, what="the parent to die")
        assert all(start_time(c) for c in children), "the children must outlive the parent"
        assert m.sweep().reclaimed == {p.pid: 1}
        assert m.check() == []
    finally:
        for c in children:
            os.kill(c, signal.SIGKILL)  # orphans: init reaps them
        p.kill()
        p.join(30)


def _register_without_a_lock(ns: str, out) -> None:
    """At the descriptor limit with no description of its own: the lock cannot be had."""
    import logging
    import resource

    seen: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logging.getLogger("shmctx.liveness").addHandler(Catch())
    m = ContextManager(CFG, namespace=ns, sweeper=False)
    t = m._table
    with t.table_lock:  # now as in a forked child: no entry of its own yet ...
        reclaim_entry(t, m._proc)
        t.liveness.drop(m._proc)
    m._entry.ready_pid = 0
    t.arbiter.close()  # ... and its description could not be reopened at fork
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE,
                       (max(map(int, os.listdir("/proc/self/fd"))) + 8, hard))
    filler = []
    try:
        while True:
            filler.append(os.dup(0))
    except OSError:
        pass  # EMFILE: not one descriptor left
    m._entry.ensure(m._register)
    for fd in filler:
        os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    held = m.get_context("c")
    out.send((m._table.proc_head(m._proc).flags, seen))
    signal.pause()
    m.return_context(held)


def test_registering_without_a_lock_falls_back_to_pid_and_start(managers, ns):
    """A process that cannot take its entry's lock (EMFILE reopening its description)
    still registers, says so, and is judged by pid and start time: alive while it runs,
    reclaimed once it is dead."""
    m = managers(CFG)
    ctx, _ = m.get_or_create_context("c", MEM)
    m.return_context(ctx)
    here, there = fork.Pipe()
    p = fork.Process(target=_register_without_a_lock, args=(ns, there))
    p.start()
    try:
        assert here.poll(30), "the child did not register"
        flags, warnings = here.recv()
        assert not flags & L.P_LIVE_LOCK
        assert any("cannot take the liveness lock" in w and "Too many open files" in w
                   for w in warnings), warnings
        assert m.sweep().reclaimed == {}
        assert m.contexts()[0].holders.get(p.pid) == 1
    finally:
        p.kill()
        p.join(30)
    assert m.sweep().reclaimed == {p.pid: 1}


# --- hidepid ----------------------------------------------------------------------------

_SWEEP_AS_ANOTHER_USER = r"""
import inspect, json, os, sys
from shmctx import ContextInUseError, ContextManager
ns, holder = sys.argv[1], int(sys.argv[2])
kw = {"trusted_uids": [0]} if "trusted_uids" in inspect.signature(ContextManager).parameters \
    else {}
out = {"uid": os.geteuid(), "holder_visible": os.path.exists(f"/proc/{holder}")}
m = ContextManager(namespace=ns, sweeper=False, **kw)
ctx = m.get_context("c")
try:
    ctx.lock.acquire(timeout=0.5)  # the holder has it
    out["lock"] = "taken from the holder"
    ctx.lock.release()
except TimeoutError:
    out["lock"] = "waited"
out["reclaimed"] = {str(k): v for k, v in m.sweep().reclaimed.items()}
out["holders"] = {str(k): v for k, v in m.contexts()[0].holders.items()}
m.return_context(ctx)
try:
    m.unlink()
    out["unlink"] = "unlinked"
except ContextInUseError:
    out["unlink"] = "refused"
    m.close()
print(json.dumps(out))
"""


@pytest.mark.parametrize("judged_by", ["entry lock", "pid and start"])
def test_hidepid_hides_no_live_holder_from_another_users_sweep(managers, ns, judged_by):
    """Root holds a reference and ``ctx.lock``; a second user, seeing /proc mounted
    ``hidepid=2`` (root's /proc/PID is absent to it), sweeps, waits for the lock and
    tries to unlink: nothing of root's is taken. Both by the entry's kernel lock and,
    for an entry without one, by pid and start time, where unknown is not dead."""
    _needs_root()
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' to sweep as")
    m = managers(CFG, mode=0o666)
    ctx, _ = m.get_or_create_context("c", MEM)
    if judged_by == "pid and start":  # as if the lock could not be taken at registration
        t = m._table
        with t.table_lock:
            pid, _flags, start, attached = t.proc_head(m._proc)
            L.P_HEAD.pack_into(t.buf, t.geo.proc_off(m._proc), pid, 0, start, attached)
    with ctx.lock:
        r = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "--fork", "sh", "-c",
             'mount -t proc -o hidepid=2 proc /proc && exec "$@"', "sh",
             "setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
             "--clear-groups", sys.executable, "-c", _SWEEP_AS_ANOTHER_USER, ns,
             str(os.getpid())],
            capture_output=True, text=True, timeout=60, cwd="/",
        )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["uid"] == nobody.pw_uid and not out["holder_visible"]  # the scenario
    assert out["lock"] == "waited"
    assert out["reclaimed"] == {}
    assert out["holders"].get(str(os.getpid())) == 1
    assert out["unlink"] == "refused"
    assert {i.name: i.holders for i in m.contexts()}["c"] == {os.getpid(): 1}
    m.return_context(ctx)
    assert m.check() == []


# --- a pid reused within one clock tick -------------------------------------------------

_REUSE_A_PID = r"""
import json, os, signal, sys, time
from shmctx import ContextConfig, ContextManager, MemoryContextConfig
from shmctx import _layout as L
from shmctx._proc import start_time

ns = sys.argv[1]
m = ContextManager(ContextConfig(lock_timeout=0.2, cleanup_interval=0), namespace=ns,
                   sweeper=False)
ctx, _ = m.get_or_create_context("c", MemoryContextConfig(size=64))
lock = ctx.lock  # its semaphore exists before the children come
record = ctx._mapped.off + L.S_LOCK_OFF
TICK = 1_000_000_000 // os.sysconf("SC_CLK_TCK")  # start times count these, since boot
out = {}
for attempt in range(1, 401):
    # Fork at the start of a tick (start times are CLOCK_BOOTTIME in ticks), so that the
    # whole life of x and the birth of y fit in it even on a busy machine.
    while time.clock_gettime_ns(time.CLOCK_BOOTTIME) % TICK > TICK // 10:
        pass
    x = os.fork()
    if x == 0:  # registers its own entry, takes a reference and the lock, dies
        try:
            held = m.get_context("c")
            held.lock.acquire()
            os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    os.waitpid(x, 0)
    owner, _epoch, x_start = L.LOCK.unpack_from(m._buf, record)
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(x - 1))
    y = os.fork()  # an unrelated process, with x's pid if all goes to plan
    if y == 0:
        os.execv("/bin/sleep", ["sleep", "60"])
    if owner == x and y == x and start_time(y) == x_start:
        break
    os.kill(y, signal.SIGKILL)  # another tick: start again (this leftover is
    os.waitpid(y, 0)            # judged dead by its start time alone)
    m.sweep()
else:
    sys.exit("no pid reuse within one clock tick in 400 attempts")
out["attempts"] = attempt
report = m.sweep()  # nobody waits: the sweep must find both
out["reclaimed"] = {str(k): v for k, v in report.reclaimed.items()}
t0 = time.monotonic()
try:
    lock.acquire(timeout=2.0)
    out["lock"] = round(time.monotonic() - t0, 3)
    lock.release()
except TimeoutError:
    out["lock"] = "timed out"
out["holders"] = {str(k): v for k, v in m.contexts()[0].holders.items()}
out["check"] = m.check()
out["me"], out["x"] = os.getpid(), x
os.kill(y, signal.SIGKILL)
m.return_context(ctx)
m.unlink(force=True)
print(json.dumps(out))
"""


def test_pid_reused_within_one_clock_tick_is_another_process(ns):
    """In a pid namespace (where ``ns_last_pid`` hands out a chosen pid), a process
    registers, takes ``ctx.lock`` and dies; an unrelated process then gets its pid within
    the same clock tick, so (pid, start time) cannot tell them apart. A sweep reclaims
    the dead process's reference and recovers its lock all the same."""
    _needs_root()
    r = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", _REUSE_A_PID,
         ns], capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["reclaimed"] == {str(out["x"]): 1}
    assert out["lock"] != "timed out" and out["lock"] < 0.1
    assert out["holders"] == {str(out["me"]): 1}
    assert out["check"] == []


def test_a_dead_entry_condemns_its_owner_although_the_pid_runs_again(managers):
    """The same, without a pid namespace: the table shows what a dead process that got
    its pid reused within the tick leaves, an entry with its (pid, start) and no kernel
    lock, and a ``ctx.lock`` owner record naming it, while a live unrelated process has
    that very (pid, start). A waiter takes the lock over, and ``reclaim`` releases the
    references, instead of waiting forever and refusing."""
    m = managers(CFG)
    ctx, _ = m.get_or_create_context("c", MEM)
    lock = ctx.lock
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        pid = sleeper.pid
        start = wait_for(lambda: start_time(pid), what="the sleeper's start time")
        t, slot = m._table, ctx._mapped.slot
        with t.table_lock:
            proc = m._entry._find_free_proc()
            off = t.geo.proc_off(proc)
            L.REF_RECORD.struct.pack_into(t.buf, t.geo.ref_off(proc, slot), 2)
            L.P_HEAD.pack_into(t.buf, off, pid, L.P_LIVE_LOCK, start, time.time())
            with t.stripe_of(slot):
                so = t.geo.slot_off(slot)
                rc = L.SLOT["refcount"].read(t.buf, so)
                L.S_REFCOUNT.pack_into(t.buf, so + L.S_REFCOUNT_OFF, rc + 2)
        lock.sem.acquire(0)  # the dead process's hold: taken, owner recorded
        epoch = lock.owner().epoch
        L.LOCK.pack_into(t.buf, lock.off, pid, epoch + 1, start)

        began = time.monotonic()
        lock.acquire(timeout=2.0)
        assert time.monotonic() - began < 1.0
        lock.release()
        assert m.reclaim(pid) == 2
        assert {i.name: i.holders for i in m.contexts()}["c"] == {os.getpid(): 1}
        m.return_context(ctx)
        assert m.check() == []
        assert sleeper.poll() is None  # the namesake was alive throughout
    finally:
        sleeper.kill()
        sleeper.wait()


def test_hidepid_start_time_is_unknown_not_dead():
    """``_proc`` on its own: a pid that exists but cannot be looked at is alive with an
    unknown start time; one that does not exist is dead."""
    _needs_root()
    code = ("import os, sys; from shmctx._proc import start_time, is_alive; "
            "p = int(sys.argv[1]); print(start_time(p), is_alive(p, 12345), "
            "is_alive(4194000, 0))")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--fork", "sh", "-c",
         'mount -t proc -o hidepid=2 proc /proc && exec "$@"', "sh", "setpriv",
         f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
         sys.executable, "-c", code, str(os.getpid())],
        capture_output=True, text=True, timeout=60, cwd="/",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "True", "False"]
