#!/usr/bin/env python3
"""Chaos run: workers do random context operations while the harness SIGKILLs them.

N worker processes get, create (with init), return, close and force-close contexts on a
small set of names, and take each context's lock to update a value in it; every
``--kill-every`` seconds (on average) the harness SIGKILLs a random worker, at whatever
point it happens to be, and starts a replacement. The harness's own manager leads the
sweep throughout (a thread of the harness calling ``sweep()`` every cleanup interval, so
that its reports can be added up).

``--faults`` adds, at random, the faults real deployments add to those deaths (none by
default; ``--faults all`` for the long run):

* ``timers``: a share of the workers run an ``ITIMER_REAL`` timer every few milliseconds
  with a Python ``SIGALRM`` handler that returns (a profiler, a watchdog); waits must
  still take dead owners' locks over on schedule.
* ``sigint``: the harness sends ``SIGINT`` to a random worker every ``--sigint-every``
  seconds on average; the ``KeyboardInterrupt`` lands anywhere in a get, a return or a
  ``ctx.lock`` block. The worker catches it at the top of its loop and drops every
  handle it holds unreturned: their finalizers must give the references back.
* ``threads``: a share of the workers run 2 or 3 threads doing the same operations on
  one manager (and the same ``ctx.lock`` objects).
* ``fork``: now and then a worker forks a short-lived child, plainly, inside ``with
  ctx.lock`` or inside ``init``; the child gets and returns a context through the
  inherited manager and leaves with ``os._exit``.
* ``scribble``: the harness writes random values into derived data of the table (the
  header's live count and free-list head, at the offsets ``_layout`` documents), as a
  stray write would; the library must rebuild them.

Besides the plain contexts, the workers use published versions (on by default; 0 for
both shares turns them off). With chance ``--publish-share`` an operation publishes a new
version of one of a few versioned names: two bytes contexts (their size changes with the
version), one array context and one object context (a dict holding a NumPy array). Each
version's ``init`` (or object) holds a pattern computed from the name and the version
number, so a reader can check every byte it sees against ``ctx.version``: a torn read,
or bytes of another version or context, is a violation. The version number is only
known once the publish switched, so the publishers (and the one creator of the object
name, ``get_or_create_object``) of one name take turns under the ``ctx.lock`` of a guard
context; each also checks that its publish got the number after the one it held. With
chance ``--version-share`` an operation gets (or loads) a versioned name, refreshes a
held handle, reads one again, or returns one; every read is verified.

At the end it checks that:

* ``check()`` finds nothing wrong;
* every remaining reference belongs to a live process, and each worker, before it
  detaches, holds in the table exactly the references of its handles still valid (a
  reference left behind by an interrupt is a leak that ``close()`` would hide);
* no operation (nor a forked child's get and return) stalled longer than
  ``lock_timeout + cleanup_interval``;
* no worker or child saw an error other than the documented ones, nor a torn value,
  nor a version whose bytes are not that version's, nor hung;
* no superseded version without references, and no version still pending, is left
  after the final sweep;
* after ``unlink()`` nothing of the namespace is left in /dev/shm.

Documented errors the workers saw are counted by class (``errors:`` line): a run that
only "passes" because everything failed politely shows there. The last line printed is
one line of figures. Exit status 0 when there were no violations. The short run is part
of the test suite; the long one is ``tools/chaos.py --seconds 300 --workers 8 --faults
all``.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import faulthandler
import gc
import hashlib
import json
import multiprocessing as mp
import os
import random
import re
import signal
import sys
import threading
import time
import traceback
import uuid

import numpy as np

from shmctx import (
    ContextClosedError,
    ContextConfig,
    ContextError,
    ContextInUseError,
    ContextManager,
    ContextNotFoundError,
    MaxReferencesReachedError,
    MemoryContextConfig,
    _lock,
    _shm,
)
from shmctx import _layout as L
from shmctx._proc import is_alive

# Per-thread figures in a shared array: plain stores, so a SIGKILL mid-write loses at
# most that thread's last increment. Each worker owns THREADS_MAX consecutive records,
# one per thread, so that no two threads write the same field.
(F_OPS, F_MAX_STALL, F_RECOVERIES, F_VIOLATIONS, F_PID, F_STALL_OP, F_TICKS, F_INTERRUPTS,
 F_FORKS, F_CHILD_BAD, F_LEAKS, F_THREADS) = range(12)
EXPECTED = (ContextNotFoundError, ContextInUseError, MaxReferencesReachedError,
            ContextClosedError, TimeoutError)
# Documented errors, counted by class: the EXPECTED ones, and a context found damaged
# (a plain ContextError naming the damage), which only the scribbles may cause.
ERRORS = [e.__name__ for e in EXPECTED] + ["ContextError(damaged)", "KeyboardInterrupt"]
F_ERRORS = 12
# Versions: publishes, refreshes that moved to a newer version, reads verified against
# their version, distinct (name, version, incarnation) verified by the thread, and the
# highest version number seen.
(F_PUBLISHES, F_REFRESHES, F_VERIFIED, F_VERSIONS_SEEN, F_MAX_VERSION) = range(
    F_ERRORS + len(ERRORS), F_ERRORS + len(ERRORS) + 5)
FIELDS = F_MAX_VERSION + 1
THREADS_MAX = 3
OPS = ("get_or_create", "return", "get", "lock+put", "close", "force close", "fork",
       "versions")
# The versioned names and what each holds; none of them is among the plain names, so the
# plain operations (put, close, force close) never meet a versioned context.
VERSIONED = {"ver-0": "bytes", "ver-1": "bytes", "arr-0": "array", "obj-0": "object"}
VHELD_MAX = 8  # handles of versioned names a thread holds at most
FAULTS = ("timers", "sigint", "threads", "fork", "scribble")
SIZE = 512
# Exit statuses of a forked child (see fork_child).
CHILD_OK, CHILD_ERROR, CHILD_STALL = 0, 2, 3
CHILD_WATCHDOG = 20  # seconds: a child still running then is hung; SIGALRM ends it
# glibc's sem_open(O_CREAT) builds a semaphore in a temporary /dev/shm/sem.XXXXXX and then
# links it into place; a worker SIGKILLed in between leaves the temporary behind under a
# name nothing can attribute (see docs/reliability.md, Limits).
GLIBC_SEM_TEMP = re.compile(r"sem\.[A-Za-z0-9]{6}")
PR_SET_CHILD_SUBREAPER = 36


class TornRead(AssertionError):
    """What a handle read is not wholly its version's bytes."""


def _pattern(name: str, version: int, n: int) -> bytes:
    """The bytes version ``version`` of bytes context ``name`` holds: n bytes from a hash
    of both, so that any two versions (or names) differ almost everywhere."""
    seed = hashlib.blake2b(f"{name}/{version}".encode(), digest_size=32).digest()
    return (seed * (n // 32 + 1))[:n]


def _bytes_size(version: int) -> int:
    return 64 * (1 + version % 4)  # the size changes with the version


def _array_of(name: str, version: int) -> np.ndarray:
    """The array version ``version`` of array or object context ``name`` holds."""
    base = int.from_bytes(_pattern(name, version, 4), "little")
    return base + np.arange(16 + 8 * (version % 3), dtype=np.int64) * version


def _object_of(name: str, version: int) -> dict:
    return {"name": name, "version": version, "arr": _array_of(name, version)}


def _glibc_sem_temps() -> set[str]:
    return {n for n in os.listdir(_shm.SHM_DIR) if GLIBC_SEM_TEMP.fullmatch(n)}


def _remove_orphaned_sem_temps(before: set[str], workers_dead_at: float) -> int:
    """Remove the glibc temporaries that appeared during the run and were last written
    before every worker was dead: those were left by killed workers (a live process
    links and unlinks its own within microseconds)."""
    removed = 0
    for name in _glibc_sem_temps() - before:
        path = os.path.join(_shm.SHM_DIR, name)
        try:
            st = os.stat(path)
            if st.st_uid == os.getuid() and st.st_size <= 32 and st.st_mtime < workers_dead_at:
                os.unlink(path)
                removed += 1
        except FileNotFoundError:
            pass
    return removed


def _child_failure(status: int) -> str:
    """What a forked child's wait status says went wrong, or ''."""
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        return {CHILD_OK: "", CHILD_ERROR: "an undocumented error (see stderr)",
                CHILD_STALL: "a get/return that stalled beyond the bound"}.get(
                    code, f"exit status {code}")
    sig = os.WTERMSIG(status)
    if sig == signal.SIGALRM:
        return f"hung for {CHILD_WATCHDOG}s (its watchdog ended it)"
    return f"death by signal {sig}"


def _reap(block: bool) -> list[str]:
    """Wait for this process's exited children; the failures they report."""
    out = []
    while True:
        try:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return out
        if pid == 0:
            return out
        why = _child_failure(status)
        if why:
            out.append(f"forked child {pid}: {why}")


class _Worker:
    """One worker process: its manager, its threads' loops, its faults."""

    def __init__(self, ns: str, names: list[str], seed: int, stats, base: int, stop,
                 opts: dict) -> None:
        self.ns, self.names, self.stats, self.base, self.stop = ns, names, stats, base, stop
        # Takeovers counted from here: a forked worker inherits the harness's count.
        self.recoveries_before = _lock.recoveries()
        self.opts = opts
        self.faults = opts["faults"]
        self.bound = opts["bound"]
        self.rng = random.Random(seed)
        self.mem = MemoryContextConfig(size=SIZE)
        self.m = ContextManager(namespace=ns, sweeper=False)
        self.helds: list[list] = []
        self.vhelds: list[list] = []  # per thread: handles of versioned names
        self.vnames = sorted(VERSIONED) if opts["publish_share"] + opts["version_share"] \
            else []
        self.seen: list[set] = []  # per thread: (name, version, incarnation) verified
        self.interruptible = self.pending = False

    # --- figures ----------------------------------------------------------------------

    def add(self, thread: int, field: int, n: float = 1) -> None:
        self.stats[self.base + FIELDS * thread + field] += n

    def error(self, thread: int, e: BaseException) -> None:
        name = type(e).__name__
        if type(e) is ContextError and "damaged" in str(e) and "scribble" in self.faults:
            name = "ContextError(damaged)"
        if name in ERRORS:
            self.add(thread, F_ERRORS + ERRORS.index(name))
        else:
            print(f"worker {os.getpid()}: {type(e).__name__}: {e}\n"
                  + "".join(traceback.format_exception(e)[-6:]), file=sys.stderr)
            self.add(thread, F_VIOLATIONS)

    # --- one operation ----------------------------------------------------------------

    def init(self, ctx) -> None:
        ctx.put({"by": os.getpid(), "n": 0})

    def init_forking(self, ctx) -> None:
        self.init(ctx)
        self.fork_child(0)  # a child forked inside init, which must neither publish nor remove it

    def fork_child(self, thread: int) -> None:
        """Fork a child that gets and returns a context through the inherited manager and
        leaves with os._exit; its exit status says how it went (see _child_failure)."""
        name = self.rng.choice(self.names)
        self.add(thread, F_FORKS)
        # Python's own at-fork handlers (logging's lock, taken before the fork and
        # released after it) do not survive a KeyboardInterrupt: one there leaves the
        # logging lock held, and every later fork of another thread waits for it forever.
        # That is the interpreter's hazard, not the library's: a SIGINT during the fork
        # is kept for the loop's next turn.
        main = thread == 0
        if main:
            was, self.interruptible = self.interruptible, False
        pid = os.fork()
        if pid:
            if main:
                self.interruptible = was
            return
        code = CHILD_OK
        try:
            # The parent's faults are not the child's: no timer, no KeyboardInterrupt, a
            # watchdog instead so that a hung child shows as such.
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(CHILD_WATCHDOG)
            began = time.monotonic()
            try:
                ctx = self.m.get_context(name, timeout=30)
                value = ctx.get()
                if value is not None and set(value) != {"by", "n"}:
                    raise AssertionError(f"torn value {value!r}")
                self.m.return_context(ctx)
            except EXPECTED:
                pass
            if time.monotonic() - began > self.bound:
                code = CHILD_STALL
        except BaseException as e:
            print(f"forked child {os.getpid()}: {type(e).__name__}: {e}", file=sys.stderr)
            code = CHILD_ERROR
        finally:
            os._exit(code)

    def one(self, thread: int, held: list) -> None:
        rng, m = self.rng, self.m
        name = rng.choice(self.names)
        op = rng.random()
        fork = "fork" in self.faults and rng.random() < self.opts["fork_prob"]
        kind = 0 if op < 0.35 else 1 if op < 0.55 and held else 2 if op < 0.7 else \
            3 if op < 0.85 and held else 4 if op < 0.95 else 5
        v = rng.random()
        publish = v < self.opts["publish_share"]
        versioned = self.vnames and v < self.opts["publish_share"] + self.opts["version_share"]
        if versioned:
            kind = 7
        began = time.monotonic()
        try:
            if versioned:
                self.versioned(thread, publish)
            elif op < 0.35:
                init = self.init_forking if fork and thread == 0 else self.init
                ctx, _ = m.get_or_create_context(name, self.mem, init=init, timeout=30)
                held.append(ctx)
            elif op < 0.55 and held:
                m.return_context(held.pop(rng.randrange(len(held))))
            elif op < 0.7:
                held.append(m.get_context(name, timeout=30))
            elif op < 0.85 and held:
                ctx = rng.choice(held)
                with ctx.lock:
                    value = ctx.get()
                    if value is not None and set(value) != {"by", "n"}:
                        raise AssertionError(f"torn value {value!r}")
                    if fork:
                        self.fork_child(thread)  # the child must not release our hold
                    ctx.put({"by": os.getpid(), "n": (value or {"n": 0})["n"] + 1})
            elif op < 0.95:
                m.close_context(name)
            else:
                m.close_context(name, force=True)
            if fork and kind in (1, 2, 4, 5):
                kind = 6
                self.fork_child(thread)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            if isinstance(e, EXPECTED) and held and rng.random() < 0.5:
                held[:] = [h for h in held if m.validate_context(h)]  # force-closed ones
            if isinstance(e, EXPECTED) and self.vhelds[thread]:
                vheld = self.vhelds[thread]  # versions whose dead holder's sweep closed
                vheld[:] = [h for h in vheld if m.validate_context(h)]
            self.error(thread, e)
        stall = time.monotonic() - began
        i = self.base + FIELDS * thread
        if stall > self.stats[i + F_MAX_STALL]:
            self.stats[i + F_MAX_STALL] = stall
            self.stats[i + F_STALL_OP] = kind
        self.stats[i + F_OPS] += 1
        self.stats[i + F_RECOVERIES] = _lock.recoveries() - self.recoveries_before

    # --- versions ---------------------------------------------------------------------

    def verify(self, thread: int, h) -> None:
        """Check that what ``h`` reads is wholly the bytes of ``h.version`` of its name."""
        name, kind = h.name, VERSIONED[h.name]
        v = h.version
        if kind == "bytes":
            got = bytes(h.buf)
            want = _pattern(name, v, _bytes_size(v))
            ok = got == want
        elif kind == "array":
            got = h.array()
            ok = not got.flags.writeable and np.array_equal(got, _array_of(name, v))
        else:
            got = h.load()
            ok = isinstance(got, dict) and got.keys() == {"name", "version", "arr"} and \
                got["name"] == name and got["version"] == v and \
                np.array_equal(got["arr"], _array_of(name, v))
        if not self.m.validate_context(h):
            return  # closed meanwhile (a dead holder's context swept): nothing to judge
        if not ok:
            raise TornRead(f"{kind} context {name!r} version {v} (incarnation "
                           f"{h.incarnation}) read {got!r:.200}, not that version's")
        self.add(thread, F_VERIFIED)
        seen = self.seen[thread]
        seen.add((name, v, h.incarnation))
        i = self.base + FIELDS * thread
        self.stats[i + F_VERSIONS_SEEN] = len(seen)
        if v > self.stats[i + F_MAX_VERSION]:
            self.stats[i + F_MAX_VERSION] = v

    def guarded(self, name: str, action):
        """``action()`` under the lock of ``name``'s guard context: the one place where a
        version of ``name`` is made. The guard held by a reference cannot be idle-closed
        (and made anew, with another lock) while anyone is inside."""
        m = self.m
        g, _ = m.get_or_create_context(f"guard-{name}", self.mem, timeout=30)
        try:
            with g.lock:
                return action()
        finally:
            m.return_context(g)

    def publish(self, thread: int, name: str):
        m = self.m

        def make():
            try:
                cur = m.get_context(name, timeout=30)
            except ContextNotFoundError:
                cur = None
            try:
                # The version held stays current until this switch (the guard), so the
                # new one's number is known before it is built.
                v = 1 if cur is None else cur.version + 1
                kind = VERSIONED[name]
                if kind == "object":
                    new = m.publish_object(name, _object_of(name, v), timeout=30)
                elif kind == "array":
                    want = _array_of(name, v)
                    new = m.publish(name, MemoryContextConfig.for_array(want.shape, want.dtype),
                                    init=lambda c: c.array(writeable=True).__setitem__(
                                        slice(None), want), timeout=30)
                else:
                    def fill(c) -> None:
                        c.buf[:] = _pattern(name, v, _bytes_size(v))
                    new = m.publish(name, MemoryContextConfig(size=_bytes_size(v)),
                                    init=fill, timeout=30)
            finally:
                if cur is not None:
                    m.return_context(cur)
            return new, v

        new, v = self.guarded(name, make)
        self.vhelds[thread].append(new)
        self.add(thread, F_PUBLISHES)
        if new.version != v:
            raise TornRead(f"publish of {name!r} over version {v - 1} made version "
                           f"{new.version}, not {v}")
        self.verify(thread, new)

    def versioned(self, thread: int, publish: bool) -> None:
        """One operation on the versioned names (see the module's docstring)."""
        rng, m, vheld = self.rng, self.m, self.vhelds[thread]
        if publish:
            self.publish(thread, rng.choice(self.vnames))
            return
        op = rng.random()
        if vheld and (op < 0.25 or len(vheld) >= VHELD_MAX):
            m.return_context(vheld.pop(rng.randrange(len(vheld))))
        elif vheld and op < 0.5:
            k = rng.randrange(len(vheld))
            old = vheld[k]
            new = m.refresh(old, timeout=30)
            if new is not old:
                vheld[k] = new  # old was returned by refresh
                self.add(thread, F_REFRESHES)
            self.verify(thread, new)
        elif vheld and op < 0.65:
            self.verify(thread, rng.choice(vheld))  # a held version, read again
        else:
            name = rng.choice(self.vnames)
            if VERSIONED[name] == "object" and rng.random() < 0.5:
                def create():
                    ctx, _ = m.get_or_create_object(name, lambda: _object_of(name, 1),
                                                    timeout=30)
                    return ctx
                h = self.guarded(name, create)
            else:
                h = m.get_context(name, timeout=30)
            vheld.append(h)
            self.verify(thread, h)

    # --- loops ------------------------------------------------------------------------

    def thread_loop(self, thread: int, held: list) -> None:
        while not self.stop.value:
            self.one(thread, held)

    def main_loop(self, held: list) -> None:
        while True:
            try:
                # Blocked from the harness's fork until here (see start_worker).
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
                self.interruptible = True
                if self.pending:  # came while the handler below ran: deliver it now
                    self.pending = False
                    raise KeyboardInterrupt
                if self.stop.value:
                    self.interruptible = False
                    return
                if "fork" in self.faults:
                    for why in _reap(block=False):
                        print(f"worker {os.getpid()}: {why}", file=sys.stderr)
                        self.add(0, F_CHILD_BAD)
                self.one(0, held)
                # Before the loop's backward jump (where Python runs signal handlers),
                # which lies outside the try.
                self.interruptible = False
            except KeyboardInterrupt:
                # No signal handler runs before this line (Python runs them on calls and
                # backward jumps), so from here to the try above a SIGINT is kept for
                # later instead of escaping the loop.
                self.interruptible = False
                self.stats[self.base + F_ERRORS + ERRORS.index("KeyboardInterrupt")] += 1
                # Drop every handle unreturned, the one in flight with them: their
                # finalizers give the references back (checked in finish()).
                held.clear()
                self.vhelds[0].clear()

    def on_sigint(self, _signum, _frame) -> None:
        if self.interruptible:
            raise KeyboardInterrupt
        self.pending = True

    def run(self) -> None:
        self.stats[self.base + F_PID] = os.getpid()
        # The harness asks a worker that does not stop for its threads' stacks.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        if "sigint" in self.faults:
            signal.signal(signal.SIGINT, self.on_sigint)
        else:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if "timers" in self.faults and self.rng.random() < self.opts["timer_share"]:
            def tick(_signum, _frame) -> None:
                self.stats[self.base + F_TICKS] += 1
            signal.signal(signal.SIGALRM, tick)
            period = self.opts["timer_interval"] * self.rng.uniform(0.5, 1.5)
            signal.setitimer(signal.ITIMER_REAL, period, period)
        n = 1
        if "threads" in self.faults and self.rng.random() < self.opts["thread_share"]:
            n = self.rng.randint(2, THREADS_MAX)
        self.stats[self.base + F_THREADS] = n
        self.helds = [[] for _ in range(n)]
        self.vhelds = [[] for _ in range(n)]
        self.seen = [set() for _ in range(n)]
        threads = [threading.Thread(target=self.thread_loop, args=(k, self.helds[k]),
                                    daemon=True) for k in range(1, n)]
        for th in threads:
            th.start()
        self.main_loop(self.helds[0])
        # No more faults from here: the harness stopped sending SIGINT before it set
        # stop, and one already delivered was taken by the loop above.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGALRM})
        signal.setitimer(signal.ITIMER_REAL, 0)
        for th in threads:
            th.join()
        if "fork" in self.faults:
            for why in _reap(block=True):
                print(f"worker {os.getpid()}: {why}", file=sys.stderr)
                self.add(0, F_CHILD_BAD)
        self.finish()

    def finish(self) -> None:
        """Check that this process's references in the table are exactly its valid
        handles, then return them and detach."""
        m = self.m
        held = [h for hs in self.helds + self.vhelds for h in hs]
        gc.collect()
        # Dropped handles queue their reference for the manager's next call; give them
        # back now, so that the table shows only what live handles stand for.
        m._slots.return_dropped()
        me = os.getpid()
        for _attempt in range(20):
            # Another worker may force-close a context meanwhile: compare only a
            # snapshot taken while our handles' validity did not change.
            before = collections.Counter(
                (h.name, h.incarnation) for h in held if m.validate_context(h))
            table = collections.Counter({
                (i.name, i.incarnation): i.holders[me]
                for i in m.contexts() if i.holders.get(me)})
            after = collections.Counter(
                (h.name, h.incarnation) for h in held if m.validate_context(h))
            if before == after:
                break
        for key in set(table) | set(before):
            if table[key] != before[key] and before == after:
                print(f"worker {me}: context {key[0]!r} (incarnation {key[1]}): the table "
                      f"books {table[key]} reference(s) to this process, which holds "
                      f"{before[key]} valid handle(s); it took "
                      f"{int(self.stats[self.base + F_ERRORS + ERRORS.index('KeyboardInterrupt')])}"
                      " KeyboardInterrupt(s)", file=sys.stderr)
                self.add(0, F_LEAKS)
        for h in held:
            try:
                m.return_context(h)
            except ContextError:
                pass
        m.close()


def _worker(ns: str, names: list[str], seed: int, stats, base: int, stop, opts: dict) -> None:
    _Worker(ns, names, seed, stats, base, stop, opts).run()


def _scribble(sup: ContextManager, rng: random.Random) -> str:
    """Write a random value into derived data of the table, as a stray write would (one
    store, no lock: a stray write takes none). Returns what was written."""
    cap = sup._geo.capacity
    if rng.random() < 0.5:
        value = rng.choice([0, cap, cap + rng.randrange(1, 1 << 16), rng.randrange(cap)])
        sup._words.put32(L.H_LIVE_OFF, value)
        return f"live={value}"
    value = rng.choice([0, cap + 1, rng.randrange(1 << 32), rng.randrange(1, cap + 1)])
    sup._words.put32(L.H_FREE_HEAD_OFF, value)
    return f"free_head={value}"


def _parse_faults(text: str) -> frozenset[str]:
    if text in ("", "none"):
        return frozenset()
    if text == "all":
        return frozenset(FAULTS)
    chosen = frozenset(f.strip() for f in text.split(","))
    unknown = chosen - set(FAULTS)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown fault(s) {', '.join(sorted(unknown))}; choose from {', '.join(FAULTS)}, "
            "all or none")
    return chosen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--names", type=int, default=6)
    ap.add_argument("--kill-every", type=float, default=0.25,
                    help="mean seconds between kills")
    ap.add_argument("--lock-timeout", type=float, default=0.2)
    ap.add_argument("--cleanup-interval", type=float, default=0.4)
    ap.add_argument("--max-references", type=int, default=12)
    ap.add_argument("--namespace", default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--start-method", default="fork", choices=["fork", "spawn", "forkserver"])
    ap.add_argument("--faults", type=_parse_faults, default=frozenset(),
                    help=f"comma-separated, from {', '.join(FAULTS)}; or all, or none "
                         "(the default)")
    ap.add_argument("--timer-share", type=float, default=0.5,
                    help="timers: share of the workers that run a timer")
    ap.add_argument("--timer-interval", type=float, default=0.003,
                    help="timers: mean seconds between SIGALRMs in such a worker")
    ap.add_argument("--sigint-every", type=float, default=0.1,
                    help="sigint: mean seconds between SIGINTs (each to a random worker)")
    ap.add_argument("--thread-share", type=float, default=0.5,
                    help="threads: share of the workers that run 2 or 3 threads")
    ap.add_argument("--fork-prob", type=float, default=0.002,
                    help="fork: chance that an operation forks a child")
    ap.add_argument("--scribble-every", type=float, default=0.5,
                    help="scribble: mean seconds between scribbles on derived data")
    ap.add_argument("--publish-share", type=float, default=0.05,
                    help="chance that an operation publishes a new version of a versioned "
                         "name")
    ap.add_argument("--version-share", type=float, default=0.15,
                    help="chance that an operation gets, loads, refreshes, reads again or "
                         "returns a versioned name (every read verified)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    ns = args.namespace or f"chaos-{uuid.uuid4().hex[:8]}"
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    mpc = mp.get_context(args.start_method)
    names = [f"ctx-{i}" for i in range(args.names)]
    config = ContextConfig(
        lock_timeout=args.lock_timeout, cleanup_interval=args.cleanup_interval,
        max_idle_time=args.cleanup_interval, max_references=args.max_references,
    )
    bound = args.lock_timeout + args.cleanup_interval
    faults = args.faults
    print(f"chaos: namespace {ns!r}, seed {seed}, {args.workers} workers, {args.seconds}s, "
          f"stall bound {bound:.2f}s, faults {','.join(sorted(faults)) or 'none'}", flush=True)
    # Children that killed workers forked become ours (not init's), so that their exit
    # statuses are seen and none of them outlives the run.
    if "fork" in faults:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    sup = ContextManager(config, namespace=ns, sweeper=False)
    slots = args.workers * 4096  # enough records for every worker ever started
    stats = mpc.Array("d", FIELDS * THREADS_MAX * slots, lock=False)
    # A plain shared flag, not an mp.Event: Event.is_set() takes a lock, and a worker
    # SIGKILLed while holding it would wedge the harness's every later wait or set.
    stop = mpc.RawValue("b", 0)
    harness_done = threading.Event()
    opts = dict(faults=faults, bound=bound, timer_share=args.timer_share,
                timer_interval=args.timer_interval, thread_share=args.thread_share,
                fork_prob=args.fork_prob, publish_share=args.publish_share,
                version_share=args.version_share)

    def halt() -> None:
        stop.value = 1
        harness_done.set()
    procs: dict[int, mp.process.BaseProcess] = {}
    used = 0

    def start_worker() -> None:
        nonlocal used
        base = FIELDS * THREADS_MAX * (used % slots)
        p = mpc.Process(target=_worker, args=(ns, names, rng.randrange(1 << 30), stats, base,
                                              stop, opts), daemon=True)
        # The worker starts with SIGINT blocked (the mask is inherited over fork), and
        # unblocks it once inside the loop that catches KeyboardInterrupt: an interrupt
        # during its start-up would end it, which is not the fault under test.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            p.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        procs[used] = p
        used += 1

    temps_before = _glibc_sem_temps()
    kills = sigints = scribbles = 0
    reclaimed = [0]
    violations: list[str] = []

    def sweeper() -> None:
        while not harness_done.wait(args.cleanup_interval):
            reclaimed[0] += sum(sup.sweep().reclaimed.values())

    def next_at(on: bool, mean: float) -> float:
        return time.monotonic() + rng.expovariate(1 / mean) if on else float("inf")

    sweep_thread = threading.Thread(target=sweeper, daemon=True)
    try:
        sweep_thread.start()
        for _ in range(args.workers):
            start_worker()
        deadline = time.monotonic() + args.seconds
        kill_at = next_at(True, args.kill_every)
        sigint_at = next_at("sigint" in faults, args.sigint_every)
        scribble_at = next_at("scribble" in faults, args.scribble_every)
        while True:
            # Poisson-ish event times; waiting here is the harness's schedule, not a
            # stand-in for synchronisation.
            at = min(kill_at, sigint_at, scribble_at, deadline)
            time.sleep(max(0.0, at - time.monotonic()))
            if at == deadline:
                break
            alive = [k for k, p in procs.items() if p.is_alive()]
            if at == scribble_at:
                scribble_at = next_at(True, args.scribble_every)
                _scribble(sup, rng)
                scribbles += 1
            elif at == sigint_at:
                sigint_at = next_at(True, args.sigint_every)
                if alive:
                    os.kill(procs[rng.choice(alive)].pid, signal.SIGINT)
                    sigints += 1
            else:
                kill_at = next_at(True, args.kill_every)
                if alive:
                    victim = procs.pop(rng.choice(alive))
                    os.kill(victim.pid, signal.SIGKILL)
                    victim.join()
                    kills += 1
                    start_worker()
        halt()
        sweep_thread.join()
        for p in procs.values():
            p.join(bound * 10 + 10)
            if p.is_alive():
                violations.append(f"worker {p.pid} did not stop (its stacks: stderr)")
                print(f"worker {p.pid} did not stop; its threads:", file=sys.stderr, flush=True)
                os.kill(p.pid, signal.SIGUSR1)
                p.join(2)  # time to print them; it is killed next either way
                p.kill()
                p.join()
            elif p.exitcode != 0:
                violations.append(f"worker {p.pid} exited with {p.exitcode}")
        if "fork" in faults:
            # Children of killed workers, now ours; each ends by its watchdog at worst.
            violations += _reap(block=True)
        reclaimed[0] += sum(sup.sweep().reclaimed.values())
        problems = sup.check()
        violations += [f"check: {p}" for p in problems]
        for info in sup.contexts():
            for pid in info.holders:
                if not is_alive(pid, 0):
                    violations.append(f"context {info.name!r}: reference of dead pid {pid}")
            # Every worker is gone and the sweep reclaimed the dead ones' references: a
            # superseded version must have gone with its last one, and a publish that did
            # not switch must have left nothing.
            if info.superseded and info.refcount == 0:
                violations.append(f"context {info.name!r} version {info.version}: "
                                  "superseded with no reference, still in the table")
            if info.pending:
                violations.append(f"context {info.name!r}: a pending version is left "
                                  f"(incarnation {info.incarnation})")
    finally:
        halt()
        if sweep_thread.is_alive():
            sweep_thread.join()
        for p in procs.values():
            if p.is_alive():
                p.kill()
                p.join()
        sup.unlink(force=True)
    sem_temps = _remove_orphaned_sem_temps(temps_before, time.time())
    left = _shm.namespace_objects(ns)
    if left:
        violations.append(f"left in /dev/shm: {left}")
    records = [FIELDS * i for i in range(THREADS_MAX * min(used, slots))]

    def total(field: int) -> int:
        return int(sum(stats[r + field] for r in records))
    ops = total(F_OPS)
    recoveries = int(sum(stats[r + F_RECOVERIES] for r in records[::THREADS_MAX]))
    worst = max(records, key=lambda r: stats[r + F_MAX_STALL])
    longest = stats[worst + F_MAX_STALL]
    if longest > bound:
        violations.append(f"a {OPS[int(stats[worst + F_STALL_OP])]} operation "
                          f"stalled {longest:.3f}s > bound {bound:.3f}s")
    for field, what in ((F_VIOLATIONS, "unexpected error(s) or torn value(s) in workers"),
                        (F_CHILD_BAD, "forked child(ren) failed"),
                        (F_LEAKS, "reference count(s) not matching a worker's handles")):
        if total(field):
            violations.append(f"{total(field)} {what} (see stderr)")
    for v in violations:
        print(f"VIOLATION: {v}", file=sys.stderr)
    errors = {e: total(F_ERRORS + k) for k, e in enumerate(ERRORS)}
    threaded = sum(1 for r in records[::THREADS_MAX] if stats[r + F_THREADS] > 1)
    versions = dict(publishes=total(F_PUBLISHES), refreshes=total(F_REFRESHES),
                    verified=total(F_VERIFIED), versions_seen=total(F_VERSIONS_SEEN),
                    max_version=int(max((stats[r + F_MAX_VERSION] for r in records),
                                        default=0)))
    figures = dict(ops=ops, kills=kills, recoveries=recoveries, reclaimed=reclaimed[0],
                   violations=len(violations), longest_stall=round(longest, 4),
                   orphaned_sem_temps=sem_temps, sigints=sigints,
                   timer_ticks=total(F_TICKS), threaded_workers=threaded,
                   forks=total(F_FORKS), scribbles=scribbles, errors=errors, **versions,
                   faults=sorted(faults), seconds=args.seconds, workers=args.workers,
                   seed=seed)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    print("chaos: errors: " + " ".join(f"{e}={n}" for e, n in errors.items()), flush=True)
    print(f"chaos: ops={ops} kills={kills} recoveries={recoveries} reclaimed={reclaimed[0]} "
          f"violations={len(violations)} longest_stall={longest:.3f}s "
          f"orphaned_sem_temps={sem_temps} sigints={sigints} timer_ticks={total(F_TICKS)} "
          f"threaded_workers={threaded} forks={total(F_FORKS)} scribbles={scribbles} "
          + " ".join(f"{k}={n}" for k, n in versions.items()), flush=True)
    return 0 if not violations else 1


if __name__ == "__main__":
    sys.exit(main())
