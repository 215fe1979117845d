#!/usr/bin/env python3
"""Chaos run: workers do random context operations while the harness SIGKILLs them.

N worker processes get, create (with init), return, close and force-close contexts on a
small set of names, and take each context's lock to update a value in it; every
``--kill-every`` seconds (on average) the harness SIGKILLs a random worker, at whatever
point it happens to be, and starts a replacement. The harness's own manager leads the
sweep throughout (a thread of the harness calling ``sweep()`` every cleanup interval, so
that its reports can be added up). At the end it checks that:

* ``check()`` finds nothing wrong;
* every remaining reference belongs to a live process;
* no operation stalled longer than ``lock_timeout + cleanup_interval``;
* no worker saw an error other than the documented ones, nor a torn value;
* after ``unlink()`` nothing of the namespace is left in /dev/shm.

The last line printed is one line of figures. Exit status 0 when there were no
violations. The short run is part of the test suite; the long one is
``tools/chaos.py --seconds 300 --workers 8``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import re
import signal
import sys
import threading
import time
import uuid

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
from shmctx._proc import is_alive

# Per-worker figures in a shared array: plain stores, so a SIGKILL mid-write loses at
# most that worker's last increment.
F_OPS, F_MAX_STALL, F_RECOVERIES, F_VIOLATIONS, F_PID, F_STALL_OP = range(6)
FIELDS = 6
OPS = ("get_or_create", "return", "get", "lock+put", "close", "force close")
EXPECTED = (ContextNotFoundError, ContextInUseError, MaxReferencesReachedError,
            ContextClosedError, TimeoutError)
SIZE = 512
# glibc's sem_open(O_CREAT) builds a semaphore in a temporary /dev/shm/sem.XXXXXX and then
# links it into place; a worker SIGKILLed in between leaves the temporary behind under a
# name nothing can attribute (see docs/reliability.md, Limits).
GLIBC_SEM_TEMP = re.compile(r"sem\.[A-Za-z0-9]{6}")


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


def _worker(ns: str, names: list[str], seed: int, stats, base: int, stop) -> None:
    rng = random.Random(seed)
    stats[base + F_PID] = os.getpid()
    m = ContextManager(namespace=ns, sweeper=False)
    held = []
    mem = MemoryContextConfig(size=SIZE)

    def init(ctx):
        ctx.put({"by": os.getpid(), "n": 0})

    while not stop.value:
        name = rng.choice(names)
        op = rng.random()
        kind = 0 if op < 0.35 else 1 if op < 0.55 and held else 2 if op < 0.7 else \
            3 if op < 0.85 and held else 4 if op < 0.95 else 5
        began = time.monotonic()
        try:
            if op < 0.35:
                ctx, _ = m.get_or_create_context(name, mem, init=init, timeout=30)
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
                    ctx.put({"by": os.getpid(), "n": (value or {"n": 0})["n"] + 1})
            elif op < 0.95:
                m.close_context(name)
            else:
                m.close_context(name, force=True)
        except EXPECTED:
            if held and rng.random() < 0.5:  # drop handles that a force close invalidated
                held = [h for h in held if m.validate_context(h)]
        except Exception as e:  # anything else is a defect
            print(f"worker {os.getpid()}: {type(e).__name__}: {e}", file=sys.stderr)
            stats[base + F_VIOLATIONS] += 1
        stall = time.monotonic() - began
        if stall > stats[base + F_MAX_STALL]:
            stats[base + F_MAX_STALL] = stall
            stats[base + F_STALL_OP] = kind
        stats[base + F_OPS] += 1
        stats[base + F_RECOVERIES] = _lock.recoveries()
    for ctx in held:
        try:
            m.return_context(ctx)
        except ContextError:
            pass
    m.close()


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
    print(f"chaos: namespace {ns!r}, seed {seed}, {args.workers} workers, {args.seconds}s, "
          f"stall bound {bound:.2f}s", flush=True)
    sup = ContextManager(config, namespace=ns, sweeper=False)
    slots = args.workers * 4096  # enough slots for every worker ever started
    stats = mpc.Array("d", FIELDS * slots, lock=False)
    # A plain shared flag, not an mp.Event: Event.is_set() takes a lock, and a worker
    # SIGKILLed while holding it would wedge the harness's every later wait or set.
    stop = mpc.RawValue("b", 0)
    harness_done = threading.Event()

    def halt() -> None:
        stop.value = 1
        harness_done.set()
    procs: dict[int, mp.process.BaseProcess] = {}
    used = 0

    def start_worker() -> None:
        nonlocal used
        base = FIELDS * (used % slots)
        p = mpc.Process(target=_worker, args=(ns, names, rng.randrange(1 << 30), stats, base,
                                              stop), daemon=True)
        p.start()
        procs[used] = p
        used += 1

    temps_before = _glibc_sem_temps()
    kills = 0
    reclaimed = [0]
    violations: list[str] = []

    def sweeper() -> None:
        while not harness_done.wait(args.cleanup_interval):
            reclaimed[0] += sum(sup.sweep().reclaimed.values())

    sweep_thread = threading.Thread(target=sweeper, daemon=True)
    try:
        sweep_thread.start()
        for _ in range(args.workers):
            start_worker()
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            # Poisson-ish kill times; waiting here is the harness's schedule, not a
            # stand-in for synchronisation.
            time.sleep(max(0.0, min(rng.expovariate(1 / args.kill_every),
                                    deadline - time.monotonic())))
            alive = [k for k, p in procs.items() if p.is_alive()]
            if not alive:
                continue
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
                violations.append(f"worker {p.pid} did not stop")
                p.kill()
                p.join()
            elif p.exitcode != 0:
                violations.append(f"worker {p.pid} exited with {p.exitcode}")
        reclaimed[0] += sum(sup.sweep().reclaimed.values())
        problems = sup.check()
        violations += [f"check: {p}" for p in problems]
        for info in sup.contexts():
            for pid in info.holders:
                if not is_alive(pid, 0):
                    violations.append(f"context {info.name!r}: reference of dead pid {pid}")
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
    n = used
    ops = int(sum(stats[FIELDS * i + F_OPS] for i in range(min(n, slots))))
    worker_violations = int(sum(stats[FIELDS * i + F_VIOLATIONS] for i in range(min(n, slots))))
    recoveries = int(sum(stats[FIELDS * i + F_RECOVERIES] for i in range(min(n, slots))))
    worst = max(range(min(n, slots)), key=lambda i: stats[FIELDS * i + F_MAX_STALL])
    longest = stats[FIELDS * worst + F_MAX_STALL]
    if longest > bound:
        violations.append(f"a {OPS[int(stats[FIELDS * worst + F_STALL_OP])]} operation "
                          f"stalled {longest:.3f}s > bound {bound:.3f}s")
    if worker_violations:
        violations.append(f"{worker_violations} unexpected error(s) in workers (see stderr)")
    for v in violations:
        print(f"VIOLATION: {v}", file=sys.stderr)
    figures = dict(ops=ops, kills=kills, recoveries=recoveries, reclaimed=reclaimed[0],
                   violations=len(violations), longest_stall=round(longest, 4),
                   orphaned_sem_temps=sem_temps,
                   seconds=args.seconds, workers=args.workers, seed=seed)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    print(f"chaos: ops={ops} kills={kills} recoveries={recoveries} reclaimed={reclaimed[0]} "
          f"violations={len(violations)} longest_stall={longest:.3f}s "
          f"orphaned_sem_temps={sem_temps}", flush=True)
    return 0 if not violations else 1


if __name__ == "__main__":
    sys.exit(main())
