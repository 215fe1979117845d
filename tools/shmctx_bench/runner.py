"""Worker processes, and the timing they do.

Four workers are forked before anything is set up, so they inherit nothing. Each serves
the parent's commands over a pipe: open a contender, time single pairs (latency), count
pairs in a common window (throughput), churn through fresh contexts, or sample pairs
until the parent's action is over. Everything in a worker is timed with
``time.perf_counter_ns``; timed runs of several workers are released together by an
Event into a window whose end the parent writes before setting it.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import traceback
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from time import monotonic, perf_counter_ns
from typing import TypeVar

from shmctx import ContextNotFoundError, MemoryContextConfig

from . import stats
from .contenders import WORKERS, Client, open_client

PROCS = (1, 2, 4)  # worker processes a throughput measurement runs with
T = TypeVar("T")
ABSENT_NAME = "bench-absent"  # never created: the sweep's table-lock probe looks it up


@dataclass
class Settings:
    rounds: int
    latency_pairs: int  # most single pairs timed per contender and round
    latency_budget: float  # ... or at most this many seconds
    seconds: float  # throughput window
    churn_seconds: float
    sweep_contexts: int
    sweep_baseline: float  # seconds of worker sampling without a sweep
    max_idle: float  # max_idle_time of the swept table

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(rounds=2, latency_pairs=20_000, latency_budget=0.25, seconds=0.25,
                       churn_seconds=0.3, sweep_contexts=400, sweep_baseline=1.0,
                       max_idle=0.3)
        return cls(rounds=5, latency_pairs=200_000, latency_budget=1.0, seconds=1.0,
                   churn_seconds=1.0, sweep_contexts=10_000, sweep_baseline=3.0,
                   max_idle=0.5)


# --- timing primitives ------------------------------------------------------------------

def _noop(name: str) -> None:
    pass


def time_pairs(pair: Callable[[str], None], name: str, most: int, budget: float) -> array:
    """Time single pairs: at most ``most`` of them or ``budget`` seconds, at least 5."""
    out = array("q")
    add = out.append
    pc = perf_counter_ns
    deadline = pc() + int(budget * 1e9)
    for i in range(most):
        t0 = pc()
        pair(name)
        t1 = pc()
        add(t1 - t0)
        if t1 > deadline and i >= 4:
            break
    return out


def warm(pair: Callable[[str], None], name: str, seconds: float = 0.02) -> None:
    end = monotonic() + seconds
    pair(name)
    while monotonic() < end:
        pair(name)


def timer_overhead() -> float:
    """The median cost in ns of timing an empty call, taken off every latency figure."""
    return stats.pct(sorted(time_pairs(_noop, "x", 200_000, 0.05)), 0.5)


def table_lock_probe(client: Client) -> Callable[[], None]:
    """One operation of another process that needs the namespace's table lock and
    nothing else: closing a context that does not exist (the lock, a lookup, then
    ``ContextNotFoundError``). How long it takes while a sweep runs is how long a
    process creating, attaching or closing a context would wait for the sweep."""
    assert client.manager is not None
    close = client.manager.close_context

    def probe() -> None:
        try:
            close(ABSENT_NAME)
        except ContextNotFoundError:
            return
        raise RuntimeError(f"{ABSENT_NAME!r} exists: the probe would have closed it")

    return probe


# --- the worker process -------------------------------------------------------------------

def worker(conn, start, stop, window) -> None:
    """Serve the parent's commands until "quit". ``start``/``window`` release timed
    runs together; ``stop`` ends open-ended sampling (during a sweep)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we go
    clients: dict[str, Client] = {}
    try:
        while True:
            cmd, *args = conn.recv()
            if cmd == "quit":
                break
            try:
                conn.send(("ok", _serve(cmd, args, clients, conn, start, stop, window)))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    finally:
        for c in clients.values():
            with contextlib.suppress(Exception):
                c.close()


def _serve(cmd, args, clients, conn, start, stop, window):
    if cmd == "open":
        key, spec = args
        if key not in clients:
            clients[key] = open_client(spec)
        return None
    if cmd == "overhead":
        return timer_overhead()
    if cmd == "latency":
        key, name, most, budget = args
        pair = clients[key].pair
        warm(pair, name, min(0.05, budget / 5))
        return list(time_pairs(pair, name, most, budget))
    if cmd == "throughput":
        key, name, seconds = args
        pair = clients[key].pair
        warm(pair, name)
        conn.send(("ready", None))
        start.wait()
        end = window.value
        began = end - seconds
        n = 0
        now = monotonic
        while now() < end:
            pair(name)
            n += 1
        return n, now() - began
    if cmd == "churn":
        key, size, seconds = args
        m = clients[key].manager
        get, ret, close = m.get_or_create_context, m.return_context, m.close_context
        cfg = MemoryContextConfig(size=size)
        prefix = f"churn-{os.getpid()}-{size}-"
        n = 0
        began = monotonic()
        end = began + seconds
        while monotonic() < end:
            name = prefix + str(n)
            ctx, _ = get(name, cfg)
            ret(ctx)
            close(name)
            n += 1
        return n / (monotonic() - began)
    if cmd == "sample":
        key, name, seconds, probe_every = args
        return _sample(clients[key], name, seconds, probe_every, conn, stop)
    raise ValueError(f"unknown command {cmd!r}")


class _RunDelay:
    """How long this thread has been runnable but waiting for a CPU (ns), from the
    kernel's scheduler statistics; always 0 where the kernel keeps none."""

    def __init__(self) -> None:
        try:
            self._fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self._fd = -1

    @property
    def available(self) -> bool:
        return self._fd >= 0

    def ns(self) -> int:
        if self._fd < 0:
            return 0
        return int(os.pread(self._fd, 128, 0).split()[1])  # cpu time, run delay, slices

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _sample(client: Client, name: str, seconds: float, probe_every: float, conn,
            stop) -> tuple[dict, dict]:
    """Time pairs until the parent sets ``stop`` (``seconds`` 0: the parent acts
    meanwhile) or ``seconds`` pass; every ``probe_every`` seconds between two pairs, time
    one table-lock probe too.

    Returns the summary of the pairs, and of the probes: ``wall``, their time, and
    ``wait``, their time less this process's own wait for a CPU meanwhile (on a busy
    machine a process woken when the lock is free may wait milliseconds to run; that
    is the scheduler's doing, not the lock holder's)."""
    pair = client.pair
    probe = table_lock_probe(client) if probe_every else None
    warm(pair, name)
    out = array("q")
    walls = array("q")
    waits = array("q")
    add = out.append
    pc = perf_counter_ns
    run_delay = _RunDelay()
    subtracted = run_delay.available
    every = int(probe_every * 1e9)
    next_probe = pc() + every if probe is not None else 1 << 62  # never, without a probe
    end = pc() + int(seconds * 1e9) if seconds else None
    if end is None:
        conn.send(("ready", None))  # open-ended: the parent starts its action now
    try:
        while True:
            for _ in range(256):
                t0 = pc()
                pair(name)
                t1 = pc()
                add(t1 - t0)
                if t1 >= next_probe and probe is not None:
                    d0 = run_delay.ns()
                    t2 = pc()
                    probe()
                    t3 = pc()
                    delayed = run_delay.ns() - d0
                    walls.append(t3 - t2)
                    waits.append(max(0, t3 - t2 - delayed))
                    next_probe = pc() + every
            if stop.is_set() or (end is not None and pc() > end):
                break
    finally:
        run_delay.close()
    return stats.summary(out), {"wall": stats.summary(walls), "wait": stats.summary(waits),
                                "cpu_wait_subtracted": subtracted}


class Pool:
    """Worker processes, forked before anything is set up so they inherit nothing."""

    def __init__(self, n: int = WORKERS) -> None:
        ctx = mp.get_context("fork")
        self.start = ctx.Event()
        self.stop = ctx.Event()
        self.window = ctx.Value("d", 0.0, lock=False)
        self.conns = []
        self.procs = []
        for _ in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker, args=(child, self.start, self.stop, self.window),
                            daemon=True)
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)

    def _reply(self, i: int):
        status, value = self.conns[i].recv()
        if status == "error":
            raise RuntimeError(f"worker {i} failed:\n{value}")
        return value

    def call(self, i: int, *cmd):
        self.conns[i].send(cmd)
        return self._reply(i)

    def open_everywhere(self, key: str, spec: dict) -> None:
        for c in self.conns:
            c.send(("open", key, spec))
        for i in range(len(self.conns)):
            self._reply(i)

    def throughput(self, key: str, names: list[str], seconds: float) -> list[tuple[int, float]]:
        self.start.clear()
        for i, name in enumerate(names):
            self.conns[i].send(("throughput", key, name, seconds))
        for i in range(len(names)):
            if self._reply(i) is not None:
                raise RuntimeError("worker out of step")
        self.window.value = monotonic() + seconds
        self.start.set()
        return [self._reply(i) for i in range(len(names))]

    def sample(self, i: int, key: str, name: str, seconds: float,
               probe_every: float = 0.0) -> tuple[dict, dict]:
        """Worker ``i`` times pairs for ``seconds`` (and table-lock probes)."""
        return self.call(i, "sample", key, name, seconds, probe_every)

    def sample_while(self, i: int, key: str, name: str, action: Callable[[], T],
                     probe_every: float = 0.0) -> tuple[T, tuple[dict, dict]]:
        """Worker ``i`` times pairs (and table-lock probes) while ``action()`` runs in
        this process."""
        self.stop.clear()
        self.conns[i].send(("sample", key, name, 0, probe_every))
        self._reply(i)  # ready
        try:
            result = action()
        finally:
            self.stop.set()
        return result, self._reply(i)

    def close(self) -> None:
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.send(("quit",))
        deadline = monotonic() + 10
        for p in self.procs:
            p.join(max(0.1, deadline - monotonic()))
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
