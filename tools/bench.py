#!/usr/bin/env python3
"""Benchmark: shmctx against the alternatives a user would pick instead, side by side.

What is measured is one *pair*: take a reference to a named, reference-counted entry
and give it back. The contenders, all run in one process tree:

* ``shmctx``: the hot path, ``ctx, _ = m.get_or_create_context(name)`` on a context
  that exists and is already mapped in this process, then ``m.return_context(ctx)``;
  also on a table holding 10,000 live contexts (``shmctx-10k``). Both use the C hot path
  (``_speedups.c``) when it was built; ``shmctx-py`` is the same on the pure-Python hot
  path, what an install without a C compiler (or ``SHMCTX_PURE_PYTHON=1``) runs;
* ``floor``: the least a pure-Python shared-memory registry can do: one POSIX semaphore
  around a ``struct`` read and write of a fixed 16-byte slot, found by ``hash(name)``,
  in an mmap (get: +1, return: -1). It has no crash safety and no per-name locking;
* ``manager``: a ``multiprocessing.Manager`` dict guarded by a Manager ``Lock``;
* ``filelock-10`` / ``filelock-10k``: a ``filelock.FileLock`` around a JSON file
  holding 10 / 10,000 names (read, update one count, write back);
* ``redis``: ``HINCRBY`` +1 / -1 over loopback, one round trip per operation, against
  a ``redis-server`` the benchmark starts (127.0.0.1, a free port, no persistence);
* ``ultradict``: an ``UltraDict`` (shared-memory dict) updated under its shared lock.

Everything is interleaved: each round runs every contender once per measurement (A B
A B ...), and the figures are medians over rounds; ratios are medians of the per-round
ratios, so slow drift of a shared machine hits both sides of a ratio alike.

Latency: single pairs timed with ``time.perf_counter_ns`` in one worker process, the
median cost of timing an empty call subtracted. Throughput: 1, 2 and 4 worker
processes, started and warmed up before timing, released together by an Event into a
common window of ``--seconds``, all on the same name or each on its own; aggregate
pairs/s and each process's share. Then, shmctx only: churn (create + return + close
per second, size 4096 with its segment and size 0), attach of a new (spawned) process
to contexts of 1 MiB, 64 MiB and 1 GiB with its RSS before and after and a zero-copy
check through ``numpy.frombuffer``, the bytes the table costs per slot, and a sweep of
a full 10,240-slot table of idle contexts with every hold of the table and stripe
locks timed (the bench wraps the locks of its own manager; measurement only), while a
worker's hot-path latency is sampled during the sweep and without it.

Prints a markdown table, writes JSON (``--out``) and plots throughput against
processes (``--plot``, via ``tools/bench_plot.py``). ``--quick`` takes about a minute.
Everything it creates (namespaces, semaphores, files, redis-server, Manager) is removed
at the end, also on Ctrl-C. ``--profile`` profiles the shmctx hot path with cProfile;
``--hot-loop SECONDS`` just runs it, for an external sampler such as ``py-spy``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import logging
import mmap
import multiprocessing as mp
import os
import platform
import pstats
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from time import monotonic, perf_counter_ns

import posix_ipc

from shmctx import ContextConfig, ContextManager, MemoryContextConfig, _manager, _shm

log = logging.getLogger("bench")

MIB = 1 << 20
PROCS = (1, 2, 4)
TARGET_NAMES = [f"bench-{i}" for i in range(10)]  # the 10 live names every contender has
BIG_CAPACITY = 10240  # room for 10,000 contexts; also the capacity of the hot table
FLOOR_SLOTS = 1024
FLOOR_SLOT = 16
ATTACH_SIZES = {"1 MiB": MIB, "64 MiB": 64 * MIB, "1 GiB": 1024 * MIB}
ATTACH_MARK = 0x5A  # written by the attaching child, read back by the parent
_U32 = struct.Struct("<I")

# Contenders: key -> label. shmctx-10k is measured for latency only.
LABELS = {
    "shmctx": "shmctx hot path",
    "shmctx-10k": "shmctx hot path, 10,000 live contexts",
    "shmctx-py": "shmctx hot path, pure Python (no C compiler)",
    "floor": "floor: 1 semaphore + struct in mmap",
    "manager": "multiprocessing.Manager dict + Lock",
    "filelock-10": "FileLock + JSON, 10 names",
    "filelock-10k": "FileLock + JSON, 10,000 names",
    "redis": "Redis HINCRBY over loopback",
    "ultradict": "UltraDict (shared lock)",
}
THROUGHPUT_KEYS = [k for k in LABELS if k != "shmctx-10k"]


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


# --- statistics -----------------------------------------------------------------------

def _pct(sorted_vals, q: float) -> float:
    if not sorted_vals:
        return float("nan")
    return float(sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))])


def _summary(samples, overhead_ns: float = 0.0) -> dict:
    s = sorted(samples)
    n = len(s)
    if not n:
        return {"n": 0}
    return {
        "n": n,
        "median_us": max(0.0, _pct(s, 0.5) - overhead_ns) / 1e3,
        "p99_us": max(0.0, _pct(s, 0.99) - overhead_ns) / 1e3,
        "p999_us": max(0.0, _pct(s, 0.999) - overhead_ns) / 1e3,
        "max_us": max(0.0, s[-1] - overhead_ns) / 1e3,
        "mean_us": max(0.0, sum(s) / n - overhead_ns) / 1e3,
    }


def _median(vals) -> float:
    vals = [v for v in vals if v is not None and v == v]
    return statistics.median(vals) if vals else float("nan")


# --- contenders, as seen by a worker process ----------------------------------------

class _Client:
    """One contender opened in one process: ``pair(name)`` takes and returns a
    reference; ``close()`` lets go of the connection/mapping."""

    def __init__(self, pair: Callable[[str], None], close: Callable[[], None],
                 manager: ContextManager | None = None) -> None:
        self.pair = pair
        self.close = close
        self.manager = manager


def _open_shmctx(spec: dict) -> _Client:
    m = ContextManager(namespace=spec["ns"], sweeper=False)
    if spec.get("pure_python"):
        _use_pure_python(m)
    for name in spec["names"]:  # map each one here, so the timed gets take the hot path
        ctx, _ = m.get_or_create_context(name)
        m.return_context(ctx)
    return _Client(_shmctx_pair(m), m.close, m)


def _use_pure_python(m: ContextManager) -> None:
    # What an install without the C hot path runs: the class's own methods (the C
    # object is only installed as instance attributes in front of them).
    for attr in ("get_or_create_context", "get_context", "return_context"):
        vars(m).pop(attr, None)


def _shmctx_pair(m: ContextManager) -> Callable[[str], None]:
    get, ret = m.get_or_create_context, m.return_context

    def pair(name: str) -> None:
        ctx, _ = get(name)
        ret(ctx)

    return pair


def _open_floor(spec: dict) -> _Client:
    shm = posix_ipc.SharedMemory(spec["shm"])
    mm = mmap.mmap(shm.fd, shm.size)
    shm.close_fd()
    buf = memoryview(mm)
    sem = posix_ipc.Semaphore(spec["sem"])
    mask = FLOOR_SLOTS - 1
    unpack, pack = _U32.unpack_from, _U32.pack_into

    # hash() of a str is cached and equal in every process of this fork tree.
    def get(name: str) -> None:
        off = (hash(name) & mask) * FLOOR_SLOT
        sem.acquire()
        pack(buf, off, unpack(buf, off)[0] + 1)
        sem.release()

    def ret(name: str) -> None:
        off = (hash(name) & mask) * FLOOR_SLOT
        sem.acquire()
        pack(buf, off, unpack(buf, off)[0] - 1)
        sem.release()

    def pair(name: str) -> None:
        get(name)
        ret(name)

    def close() -> None:
        buf.release()
        mm.close()
        sem.close()

    return _Client(pair, close)


def _locked_counter_pair(d, lock) -> Callable[[str], None]:
    """acquire + return on a dict of counts behind a lock (Manager, UltraDict)."""
    def pair(name: str) -> None:
        with lock:
            d[name] = d[name] + 1
        with lock:
            d[name] = d[name] - 1

    return pair


def _open_manager(spec: dict) -> _Client:
    return _Client(_locked_counter_pair(spec["dict"], spec["lock"]), lambda: None)


def _open_filelock(spec: dict) -> _Client:
    from filelock import FileLock

    lock = FileLock(spec["lock"])
    path = spec["path"]

    def update(name: str, delta: int) -> None:
        with lock, open(path, "r+") as f:
            data = json.load(f)
            data[name] += delta
            f.seek(0)
            json.dump(data, f)
            f.truncate()

    def pair(name: str) -> None:
        update(name, 1)
        update(name, -1)

    return _Client(pair, lambda: None)


def _open_redis(spec: dict) -> _Client:
    import redis

    r = redis.Redis(host="127.0.0.1", port=spec["port"])
    key = spec["key"]
    hincrby = r.hincrby

    def pair(name: str) -> None:
        hincrby(key, name, 1)
        hincrby(key, name, -1)

    return _Client(pair, r.close)


def _open_ultradict(spec: dict) -> _Client:
    from UltraDict import UltraDict

    d = UltraDict(name=spec["name"], create=False, shared_lock=True, auto_unlink=False)
    return _Client(_locked_counter_pair(d, d.lock), d.close)


_OPENERS = {
    "shmctx": _open_shmctx,
    "floor": _open_floor,
    "manager": _open_manager,
    "filelock": _open_filelock,
    "redis": _open_redis,
    "ultradict": _open_ultradict,
}


# --- the worker process ---------------------------------------------------------------

def _noop(name: str) -> None:
    pass


def _time_pairs(pair: Callable[[str], None], name: str, most: int, budget: float) -> array:
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


def _warm(pair: Callable[[str], None], name: str, seconds: float = 0.02) -> None:
    end = monotonic() + seconds
    pair(name)
    while monotonic() < end:
        pair(name)


def _timer_overhead() -> float:
    return _pct(sorted(_time_pairs(_noop, "x", 200_000, 0.05)), 0.5)


def _worker(conn, start, stop, window) -> None:
    """Serve the parent's commands until "quit". ``start``/``window`` release timed
    runs together; ``stop`` ends open-ended sampling (during a sweep)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we go
    clients: dict[str, _Client] = {}
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
            clients[key] = _OPENERS[spec["kind"]](spec)
        return None
    if cmd == "overhead":
        return _timer_overhead()
    if cmd == "latency":
        key, name, most, budget = args
        pair = clients[key].pair
        _warm(pair, name, min(0.05, budget / 5))
        return list(_time_pairs(pair, name, most, budget))
    if cmd == "throughput":
        key, name, seconds = args
        pair = clients[key].pair
        _warm(pair, name)
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
    if cmd == "sample":  # time pairs until the parent sets ``stop`` or ``seconds`` pass
        key, name, seconds = args
        pair = clients[key].pair
        _warm(pair, name)
        out = array("q")
        add = out.append
        pc = perf_counter_ns
        end = pc() + int(seconds * 1e9) if seconds else None
        if end is None:
            conn.send(("ready", None))  # open-ended: the parent starts its action now
        while True:
            for _ in range(256):
                t0 = pc()
                pair(name)
                add(pc() - t0)
            if stop.is_set() or (end is not None and pc() > end):
                break
        return _summary(out)
    raise ValueError(f"unknown command {cmd!r}")


class _Pool:
    """Worker processes, forked before anything is set up so they inherit nothing."""

    def __init__(self, n: int) -> None:
        ctx = mp.get_context("fork")
        self.start = ctx.Event()
        self.stop = ctx.Event()
        self.window = ctx.Value("d", 0.0, lock=False)
        self.conns = []
        self.procs = []
        for _ in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(child, self.start, self.stop, self.window),
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

    def sample_while(self, i: int, key: str, name: str, action: Callable[[], object]):
        """Worker ``i`` times pairs while ``action()`` runs in this process."""
        self.stop.clear()
        self.conns[i].send(("sample", key, name, 0))
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


# --- the attaching child (spawned: it inherits no mapping) ------------------------------

def _status_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0])
    return out


def _attach_child(conn, ns: str, names: list[str]) -> None:
    import numpy as np

    try:
        m = ContextManager(namespace=ns, sweeper=False)
        ctx = m.get_context("warm")  # the first get of a process pays one-time costs
        _ = ctx.buf
        m.return_context(ctx)
        out = {}
        for name in names:
            s0 = _status_kib()
            t0 = perf_counter_ns()
            ctx = m.get_context(name)
            buf = ctx.buf
            t1 = perf_counter_ns()
            s1 = _status_kib()
            a = np.frombuffer(buf, dtype=np.uint8)
            t2 = perf_counter_ns()
            last = int(a[-1])  # written by the parent
            a[0] = ATTACH_MARK  # the parent looks for it in its own mapping
            t3 = perf_counter_ns()
            touched = int(a[::4096].sum(dtype=np.uint64))  # one byte of every page
            t4 = perf_counter_ns()
            s2 = _status_kib()
            del a
            m.return_context(ctx)
            out[name] = {
                "attach_us": (t1 - t0) / 1e3,
                "frombuffer_us": (t2 - t1) / 1e3,
                "size": ctx.size,
                "parent_byte_seen": last,
                "read_every_page_ms": (t4 - t3) / 1e6,
                "page_sum": touched,
                "rss_kib": {"before": s0, "after_attach": s1, "after_reading_all": s2},
            }
        m.close()
        conn.send(("ok", out))
    except Exception:
        conn.send(("error", traceback.format_exc()))


# --- instrumented locks (measurement only: wraps this process's lock objects) ---------

class _TimedLock:
    """Delegates to a lock and records how long each acquisition was held."""

    def __init__(self, lock, holds: list[int]) -> None:
        self._lock = lock
        self._holds = holds
        self._since = 0

    def acquire(self, timeout: float | None = None) -> None:
        self._lock.acquire(timeout)
        self._since = perf_counter_ns()

    def release(self) -> None:
        self._holds.append(perf_counter_ns() - self._since)
        self._lock.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __getattr__(self, name: str):
        return getattr(self._lock, name)


def _instrument(m: ContextManager) -> tuple[list[int], list[int]]:
    table_holds: list[int] = []
    stripe_holds: list[int] = []
    t = m._table
    t.table_lock = _TimedLock(t.table_lock, table_holds)
    stripes = t.stripe_locks  # the same list object as the manager's ``_stripes``
    for k, lock in enumerate(stripes):
        stripes[k] = _TimedLock(lock, stripe_holds)
    return table_holds, stripe_holds


# --- setup and teardown of every contender ---------------------------------------------

class _Bench:
    def __init__(self, settings: Settings, only: set[str] | None) -> None:
        self.s = settings
        self.only = only
        self.uid = uuid.uuid4().hex[:8]
        self.managers: dict[str, ContextManager] = {}
        self.cleanups: list[tuple[str, Callable[[], None]]] = []
        self.specs: dict[str, dict] = {}
        self.unavailable: dict[str, str] = {}
        self.tmp = Path(tempfile.mkdtemp(prefix=f"bench-{self.uid}-"))
        self.cleanups.append(("temp files", lambda: shutil.rmtree(self.tmp, True)))
        self.pool: _Pool | None = None

    def wanted(self, key: str) -> bool:
        return self.only is None or key in self.only

    def _ns(self, what: str) -> str:
        return f"bench-{self.uid}-{what}"

    def _manager(self, what: str, **cfg) -> ContextManager:
        ns = self._ns(what)
        config = ContextConfig(max_references=0, cleanup_interval=0, **cfg)
        m = ContextManager(config, namespace=ns, sweeper=False)
        self.managers[what] = m

        def drop() -> None:
            with contextlib.suppress(Exception):
                m.unlink(force=True)
            _shm.remove_namespace_objects(ns)  # whatever unlink could not reach

        self.cleanups.append((f"namespace {ns}", drop))
        return m

    def cleanup(self) -> None:
        if self.pool is not None:
            self.pool.close()
        for what, fn in reversed(self.cleanups):
            try:
                fn()
            except Exception as e:
                log.warning("cleanup of %s failed: %s", what, e)

    # Each setup returns the spec workers open, or raises _Unavailable.

    def setup(self) -> None:
        self.pool = _Pool(max(PROCS))
        steps = {
            "shmctx": self._setup_shmctx,
            "shmctx-10k": self._setup_shmctx_10k,
            "shmctx-py": self._setup_shmctx_py,
            "floor": self._setup_floor,
            "manager": self._setup_manager,
            "filelock-10": lambda: self._setup_filelock(10),
            "filelock-10k": lambda: self._setup_filelock(10_000),
            "redis": self._setup_redis,
            "ultradict": self._setup_ultradict,
        }
        for key, step in steps.items():
            if not self.wanted(key):
                continue
            began = monotonic()
            try:
                spec = step()
            except _Unavailable as e:
                self.unavailable[key] = str(e)
                log.warning("%s: unavailable (%s)", key, e)
                continue
            self.pool.open_everywhere(key, spec)
            self.specs[key] = spec
            log.info("set up %s in %.2fs", key, monotonic() - began)

    def _setup_shmctx(self) -> dict:
        m = self._manager("hot", capacity=BIG_CAPACITY)
        for name in TARGET_NAMES:
            ctx, _ = m.get_or_create_context(name, MemoryContextConfig(size=4096))
            m.return_context(ctx)
        return {"kind": "shmctx", "ns": m.namespace, "names": TARGET_NAMES[: max(PROCS)]}

    def _setup_shmctx_py(self) -> dict:
        if "shmctx" not in self.specs:
            raise _Unavailable("it shares the shmctx contender's table; run that too")
        return {**self.specs["shmctx"], "pure_python": True}

    def _setup_shmctx_10k(self) -> dict:
        m = self._manager("10k", capacity=BIG_CAPACITY)
        for i in range(10_000 - len(TARGET_NAMES)):
            ctx, _ = m.get_or_create_context(f"filler-{i}")
            m.return_context(ctx)
        for name in TARGET_NAMES:
            ctx, _ = m.get_or_create_context(name, MemoryContextConfig(size=4096))
            m.return_context(ctx)
        live = len(m.contexts())
        if live != 10_000:
            raise RuntimeError(f"expected 10,000 live contexts, found {live}")
        return {"kind": "shmctx", "ns": m.namespace, "names": TARGET_NAMES[:1]}

    def _setup_floor(self) -> dict:
        spec, remove = _create_floor(f"/bench-{self.uid}-floor")
        self.cleanups.append(("floor segment and semaphore", remove))
        return spec

    def _setup_manager(self) -> dict:
        mgr = mp.get_context("spawn").Manager()
        self.cleanups.append(("multiprocessing.Manager", mgr.shutdown))
        d = mgr.dict({n: 0 for n in TARGET_NAMES})
        return {"kind": "manager", "dict": d, "lock": mgr.Lock()}

    def _setup_filelock(self, names: int) -> dict:
        try:
            import filelock  # noqa: F401
        except ImportError as e:
            raise _Unavailable(f"filelock is not installed ({e})") from None
        path = self.tmp / f"registry-{names}.json"
        data = {n: 0 for n in TARGET_NAMES}
        data.update({f"filler-{i}": 0 for i in range(names - len(data))})
        path.write_text(json.dumps(data))
        return {"kind": "filelock", "path": str(path), "lock": str(path) + ".lock"}

    def _setup_redis(self) -> dict:
        exe = shutil.which("redis-server")
        if exe is None:
            raise _Unavailable("redis-server is not installed")
        try:
            import redis
        except ImportError as e:
            raise _Unavailable(f"the redis client package is not installed ({e})") from None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

        def stop() -> None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

        self.cleanups.append(("redis-server", stop))
        r = redis.Redis(host="127.0.0.1", port=port)
        deadline = monotonic() + 10
        while True:
            try:
                r.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or monotonic() > deadline:
                    raise _Unavailable(f"redis-server did not come up on port {port}") from None
                time.sleep(0.01)  # polling a real condition (the server answers) with a deadline
        key = f"bench-{self.uid}"
        r.hset(key, mapping={n: 0 for n in TARGET_NAMES})
        r.close()
        return {"kind": "redis", "port": port, "key": key, "version": _redis_version(exe)}

    def _setup_ultradict(self) -> dict:
        try:
            from UltraDict import UltraDict
        except Exception as e:
            raise _Unavailable(f"UltraDict does not import ({type(e).__name__}: {e})") from None
        name = f"bench-{self.uid}-ud"
        try:
            d = UltraDict({n: 0 for n in TARGET_NAMES}, name=name, create=True,
                          shared_lock=True, auto_unlink=False)
        except Exception as e:
            raise _Unavailable(f"UltraDict cannot be created ({type(e).__name__}: {e})") \
                from None
        self.cleanups.append(("UltraDict", d.unlink))
        return {"kind": "ultradict", "name": name}


class _Unavailable(Exception):
    pass


def _create_floor(name: str) -> tuple[dict, Callable[[], None]]:
    """The floor's segment and semaphore; returns the spec and their remover."""
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600,
                                 size=FLOOR_SLOTS * FLOOR_SLOT)
    shm.close_fd()
    try:
        posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=0o600, initial_value=1).close()
    except BaseException:
        posix_ipc.unlink_shared_memory(name)
        raise

    def remove() -> None:
        for unlink in (posix_ipc.unlink_shared_memory, posix_ipc.unlink_semaphore):
            with contextlib.suppress(posix_ipc.ExistentialError):
                unlink(name)

    return {"kind": "floor", "shm": name, "sem": name}, remove


def _redis_version(exe: str) -> str:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --- the measurements ----------------------------------------------------------------

def _measure_round(b: _Bench, r: int, res: dict) -> None:
    s, pool = b.s, b.pool
    assert pool is not None
    keys = list(b.specs)
    order = keys if r % 2 == 0 else keys[::-1]  # A B ... then ... B A: no position favoured
    overhead = pool.call(0, "overhead")
    res["timer_overhead_ns"].append(overhead)
    for key in order:
        samples = pool.call(0, "latency", key, TARGET_NAMES[0], s.latency_pairs,
                            s.latency_budget)
        res["latency"][key].append(_summary(samples, overhead))
    tkeys = [k for k in order if k in THROUGHPUT_KEYS]
    for nprocs in PROCS:
        for mode in ("same", "different"):
            for key in tkeys:
                names = [TARGET_NAMES[0] if mode == "same" else TARGET_NAMES[i]
                         for i in range(nprocs)]
                per = pool.throughput(key, names, s.seconds)
                counts = [n for n, _ in per]
                rates = [n / el for n, el in per]
                res["throughput"][key][mode][str(nprocs)].append({
                    "pairs_per_s": sum(rates),
                    "per_process_pairs": counts,
                    "fairness": min(counts) / max(counts) if max(counts) else float("nan"),
                })
    if "shmctx" in b.specs:
        for size in (4096, 0):
            res["churn"][str(size)].append(pool.call(0, "churn", "churn", size,
                                                     s.churn_seconds))
        res["attach"].append(_attach_round(b, r))


def _setup_churn_and_attach(b: _Bench) -> None:
    m = b._manager("churn", capacity=1024)
    b.pool.open_everywhere("churn", {"kind": "shmctx", "ns": m.namespace, "names": []})
    import numpy as np

    a = b._manager("attach", capacity=16)
    ctx, _ = a.get_or_create_context("warm", MemoryContextConfig(size=4096))
    a.return_context(ctx)
    for label, size in ATTACH_SIZES.items():
        ctx, _ = a.get_or_create_context(label, MemoryContextConfig(size=size))
        arr = np.frombuffer(ctx.buf, dtype=np.uint8)
        arr[:] = size.bit_length()  # real data on every page, known to the child
        del arr
        a.return_context(ctx)


def _attach_round(b: _Bench, r: int) -> dict:
    a = b.managers["attach"]
    names = list(ATTACH_SIZES)
    names = names[r % len(names):] + names[: r % len(names)]  # rotate which goes first
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_attach_child, args=(child, a.namespace, names))
    p.start()
    child.close()
    try:
        if not parent.poll(120):
            raise RuntimeError("attach child did not answer within 120 s")
        status, out = parent.recv()
    finally:
        p.join(30)
        if p.is_alive():
            p.kill()
            p.join()
    if status == "error":
        raise RuntimeError(f"attach child failed:\n{out}")
    for label, size in ATTACH_SIZES.items():
        ctx = a.get_context(label)
        view = ctx.buf
        o = out[label]
        o["child_write_seen_by_parent"] = view[0] == ATTACH_MARK
        o["parent_byte_ok"] = o["parent_byte_seen"] == size.bit_length()
        view[0] = size.bit_length()
        del view
        a.return_context(ctx)
    return out


def _sweep_phase(b: _Bench) -> dict:
    """Fill a 10,240-slot table with idle contexts, then time one worker's hot path
    without and during a sweep that closes them all, timing every lock hold."""
    s, pool = b.s, b.pool
    m = b._manager("sweep", capacity=BIG_CAPACITY, max_idle_time=s.max_idle)
    pool.open_everywhere("sweep", {"kind": "shmctx", "ns": m.namespace, "names": ["hot"]})
    began = monotonic()
    cfg = MemoryContextConfig(size=4096)
    for i in range(s.sweep_contexts - 1):
        ctx, _ = m.get_or_create_context(f"idle-{i}", cfg)
        m.return_context(ctx)
    filled = monotonic()
    live = len(m.contexts())
    # Idleness is a matter of time passing: wait until max_idle_time has elapsed.
    time.sleep(max(0.0, s.max_idle * 1.5 - (monotonic() - filled)))
    baseline = pool.call(0, "sample", "sweep", "hot", s.sweep_baseline)
    table_holds, stripe_holds = _instrument(m)
    report, during = pool.sample_while(0, "sweep", "hot", m.sweep)
    ts, ss = sorted(table_holds), sorted(stripe_holds)
    # In order: the sweep's opening hold (dead processes, dead creations), one hold per
    # closed context, the closing hold (orphan scan); more if other holds appear.
    per_close = sorted(table_holds[1:-1])
    return {
        "capacity": BIG_CAPACITY,
        "live_contexts": live,
        "fill_seconds": filled - began,
        "sweep_seconds": report.duration,
        "closed": len(report.closed),
        "table_lock": {"holds": len(ts), "max_ms": ts[-1] / 1e6 if ts else 0.0,
                       "p99_ms": _pct(ts, 0.99) / 1e6, "median_ms": _pct(ts, 0.5) / 1e6,
                       "total_ms": sum(ts) / 1e6,
                       "first_ms": table_holds[0] / 1e6 if table_holds else 0.0,
                       "last_ms": table_holds[-1] / 1e6 if table_holds else 0.0,
                       "per_close_max_ms": per_close[-1] / 1e6 if per_close else 0.0,
                       "per_close_median_ms": _pct(per_close, 0.5) / 1e6,
                       "argmax": table_holds.index(ts[-1]) if ts else -1},
        "stripe_locks": {"holds": len(ss), "max_ms": ss[-1] / 1e6 if ss else 0.0,
                         "p99_ms": _pct(ss, 0.99) / 1e6},
        "worker_without_sweep": baseline,
        "worker_during_sweep": during,
    }


def _memory() -> dict:
    """Bytes of the table per context slot, from the sizes of real tables in /dev/shm."""
    sizes = {}
    for cap in (1024, BIG_CAPACITY):
        ns = f"bench-mem-{uuid.uuid4().hex[:8]}"
        m = ContextManager(ContextConfig(capacity=cap, cleanup_interval=0), namespace=ns,
                           sweeper=False)
        try:
            sizes[cap] = os.stat(_shm.host_path(_shm.table_name(ns))).st_size
        finally:
            m.unlink(force=True)
    per_slot = (sizes[BIG_CAPACITY] - sizes[1024]) / (BIG_CAPACITY - 1024)
    fixed = sizes[1024] - per_slot * 1024
    return {"table_bytes": {str(k): v for k, v in sizes.items()}, "bytes_per_slot": per_slot,
            "fixed_bytes": fixed, "max_processes": ContextConfig().max_processes}


# --- summarising ---------------------------------------------------------------------

def _paired_ratio(num: list[float], den: list[float]) -> float:
    return _median([a / d for a, d in zip(num, den, strict=True) if d])


def _summarise(b: _Bench, raw: dict) -> dict:
    methods = {}
    for key, label in LABELS.items():
        if not b.wanted(key):
            continue
        entry: dict = {"label": label, "available": key in b.specs}
        if key not in b.specs:
            entry["reason"] = b.unavailable.get(key, "not set up")
            methods[key] = entry
            continue
        lat = raw["latency"][key]
        entry["latency"] = {
            "median_us": _median([x["median_us"] for x in lat]),
            "p99_us": _median([x["p99_us"] for x in lat]),
            "pairs_timed_per_round": [x["n"] for x in lat],
            "rounds": lat,
        }
        if key in THROUGHPUT_KEYS:
            tp = {}
            for mode, by_n in raw["throughput"][key].items():
                tp[mode] = {n: {"pairs_per_s": _median([x["pairs_per_s"] for x in rounds]),
                                "fairness": _median([x["fairness"] for x in rounds]),
                                "rounds": rounds}
                            for n, rounds in by_n.items()}
            entry["throughput"] = tp
        methods[key] = entry
    for key, entry in methods.items():
        if entry["available"] and "floor" in b.specs:
            entry["latency"]["vs_floor"] = _paired_ratio(
                [x["median_us"] for x in raw["latency"][key]],
                [x["median_us"] for x in raw["latency"]["floor"]])
    out = {"methods": methods}
    if "shmctx" in b.specs:
        out["churn_pairs_per_s"] = {k: _median(v) for k, v in raw["churn"].items()}
        out["churn_rounds"] = raw["churn"]
        out["attach"] = {
            label: {
                "attach_us": _median([r[label]["attach_us"] for r in raw["attach"]]),
                "frombuffer_us": _median([r[label]["frombuffer_us"] for r in raw["attach"]]),
                "rounds": [r[label] for r in raw["attach"]],
            } for label in ATTACH_SIZES
        }
    return out


def _targets(summary: dict, extra: dict) -> list[dict]:
    meth = summary["methods"]
    out = []

    def add(name: str, goal: str, value: float | None, ok: bool | None, unit: str = "") -> None:
        out.append({"target": name, "goal": goal, "value": value, "unit": unit,
                    "met": ok if value is not None and value == value else None})

    hot = meth.get("shmctx", {})
    if not hot.get("available"):
        return out
    lat = hot["latency"]
    if "vs_floor" in lat:
        v = lat["vs_floor"]
        add("hot path median / floor median", "<= 1.2", v, v <= 1.2, "x")
    v = lat["p99_us"] / lat["median_us"] if lat["median_us"] else None
    add("hot path p99 / median", "<= 2", v, v is not None and v <= 2, "x")
    alts = [k for k, e in meth.items() if e.get("available") and k not in
            ("shmctx", "shmctx-10k", "shmctx-py", "floor")]
    if alts:
        best = min(alts, key=lambda k: meth[k]["latency"]["median_us"])
        v = meth[best]["latency"]["median_us"] / lat["median_us"]
        add(f"fastest alternative ({best}) median / hot path median", "> 1", v, v > 1, "x")
    rounds = hot["throughput"]
    one = [x["pairs_per_s"] for x in rounds["different"]["1"]["rounds"]]
    for mode, goal in (("different", 1.5), ("same", 0.7)):
        four = [x["pairs_per_s"] for x in rounds[mode]["4"]["rounds"]]
        v = _paired_ratio(four, one)
        add(f"4 processes, {mode} names / 1 process", f">= {goal}", v, v >= goal, "x")
        v = rounds[mode]["4"]["fairness"]
        add(f"fairness, 4 processes, {mode} names (fewest / most pairs)", ">= 0.5", v,
            v >= 0.5)
    if meth.get("shmctx-10k", {}).get("available"):
        v = _paired_ratio([x["median_us"] for x in meth["shmctx-10k"]["latency"]["rounds"]],
                          [x["median_us"] for x in lat["rounds"]])
        add("hot path, 10,000 / 10 live contexts", "<= 1.10", v, v <= 1.10, "x")
    for size, v in summary.get("churn_pairs_per_s", {}).items():
        add(f"churn, size {size} (create+return+close)", ">= 20,000/s", v, v >= 20_000, "/s")
    if "attach" in summary:
        v = summary["attach"]["1 GiB"]["attach_us"] / 1e3
        add("attach a new process to 1 GiB", "< 1 ms", v, v < 1, "ms")
    sw = extra.get("sweep")
    if sw:
        v = max(sw["table_lock"]["max_ms"], sw["stripe_locks"]["max_ms"])
        add(f"sweep of {sw['closed']} idle contexts: longest lock hold", "<= 1 ms", v, v <= 1,
            "ms")
        a, c = sw["worker_during_sweep"].get("p99_us"), sw["worker_without_sweep"].get("p99_us")
        v = a / c if a and c else None
        add("worker p99 during sweep / without", "<= 2", v, v is not None and v <= 2, "x")
    mem = extra.get("memory")
    if mem:
        v = mem["bytes_per_slot"]
        add("table bytes per context slot", "<= 512", v, v <= 512, "B")
    return out


def _fmt(v: float | None, digits: int = 1) -> str:
    if v is None or v != v:
        return "n/a"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def _markdown(result: dict) -> str:
    meth = result["summary"]["methods"]
    lines = ["| method | median µs | p99 µs | x floor | 1 proc pairs/s | 2 same | 4 same "
             "| 2 different | 4 different | fairness 4 diff |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, e in meth.items():
        if not e["available"]:
            lines.append(f"| {key} | unavailable: {e['reason']} |||||||||")
            continue
        lat = e["latency"]
        row = [key, _fmt(lat["median_us"], 2), _fmt(lat["p99_us"], 2),
               _fmt(lat.get("vs_floor"), 2)]
        tp = e.get("throughput")
        if tp:
            row += [_fmt(tp["different"]["1"]["pairs_per_s"], 0),
                    _fmt(tp["same"]["2"]["pairs_per_s"], 0),
                    _fmt(tp["same"]["4"]["pairs_per_s"], 0),
                    _fmt(tp["different"]["2"]["pairs_per_s"], 0),
                    _fmt(tp["different"]["4"]["pairs_per_s"], 0),
                    _fmt(tp["different"]["4"]["fairness"], 2)]
        else:
            row += ["—"] * 6
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| target | goal | measured | met |", "|---|---|---:|---|"]
    for t in result["targets"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {t['goal']} | {_fmt(t['value'], 2)} {t['unit']} "
                     f"| {met} |")
    summ = result["summary"]
    if "attach" in summ:
        lines += ["", "| attach (new process) | get_context → ctx.buf µs | frombuffer µs "
                  "| RSS growth on attach KiB | RssAnon growth reading every page KiB "
                  "| RssShmem growth reading every page KiB | child write seen by parent |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for label, a in summ["attach"].items():
            last = a["rounds"][-1]
            rss = last["rss_kib"]
            lines.append(
                f"| {label} | {_fmt(a['attach_us'], 1)} | {_fmt(a['frombuffer_us'], 1)} "
                f"| {rss['after_attach']['VmRSS'] - rss['before']['VmRSS']} "
                f"| {rss['after_reading_all']['RssAnon'] - rss['after_attach']['RssAnon']} "
                f"| {rss['after_reading_all']['RssShmem'] - rss['after_attach']['RssShmem']} "
                f"| {all(r['child_write_seen_by_parent'] for r in a['rounds'])} |")
    sw = result.get("sweep")
    if sw:
        wo, du = sw["worker_without_sweep"], sw["worker_during_sweep"]
        lines += ["", f"Sweep: {sw['closed']} idle contexts closed of {sw['live_contexts']} "
                  f"live in a {sw['capacity']}-slot table in {sw['sweep_seconds']:.2f} s; "
                  f"table lock held {sw['table_lock']['holds']} times, longest "
                  f"{sw['table_lock']['max_ms']:.2f} ms (hold #{sw['table_lock']['argmax']}), "
                  f"median {sw['table_lock']['median_ms']:.2f} ms; opening hold "
                  f"{sw['table_lock']['first_ms']:.2f} ms, per closed context median "
                  f"{sw['table_lock']['per_close_median_ms']:.2f} ms / max "
                  f"{sw['table_lock']['per_close_max_ms']:.2f} ms, closing (orphan scan) "
                  f"{sw['table_lock']['last_ms']:.2f} ms; stripe locks held "
                  f"{sw['stripe_locks']['holds']} times, longest "
                  f"{sw['stripe_locks']['max_ms']:.3f} ms. Worker hot path p99 "
                  f"{_fmt(du.get('p99_us'), 1)} µs during the sweep vs "
                  f"{_fmt(wo.get('p99_us'), 1)} µs without (medians "
                  f"{_fmt(du.get('median_us'), 2)} / {_fmt(wo.get('median_us'), 2)} µs)."]
    return "\n".join(lines)


# --- machine description ----------------------------------------------------------------

def _run_text(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _machine() -> dict:
    cpu = ""
    for line in _run_text(["lscpu"]).splitlines():
        if line.startswith("Model name:"):
            cpu = line.split(":", 1)[1].strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "shmctx_hot_path": "C" if _manager._speedups is not None else "Python",
        "load_average": os.getloadavg(),
    }


def _source_state() -> dict:
    """Which shmctx was measured: the commit, and the files changed since (if any)."""
    root = Path(__file__).resolve().parent.parent
    head = _run_text(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
    dirty = _run_text(["git", "-C", str(root), "status", "--porcelain", "--", "src"])
    return {"commit": head or "unknown",
            "uncommitted_src_changes": [ln.split(maxsplit=1)[-1] for ln in dirty.splitlines()]}


def _busy_processes() -> list[str]:
    """The top CPU users right now, to say what else was running."""
    out = _run_text(["top", "-bn1", "-o", "%CPU"]).splitlines()
    for i, line in enumerate(out):
        if line.lstrip().startswith("PID"):
            return [" ".join(x.split()) for x in out[i: i + 9]]
    return []


# --- profiling ---------------------------------------------------------------------------

def _hot_manager(pure_python: bool = False) -> tuple[ContextManager, Callable[[str], None]]:
    ns = f"bench-prof-{uuid.uuid4().hex[:8]}"
    m = ContextManager(ContextConfig(max_references=0, cleanup_interval=0), namespace=ns,
                       sweeper=False)
    if pure_python:
        _use_pure_python(m)
    ctx, _ = m.get_or_create_context(TARGET_NAMES[0], MemoryContextConfig(size=4096))
    m.return_context(ctx)
    return m, _shmctx_pair(m)


def _profile(pairs: int) -> None:
    """cProfile of the hot path as installed (the C one when built), then of the
    pure-Python one, then the unprofiled cost of the parts."""
    for pure_python in (False, True):
        m, pair = _hot_manager(pure_python)
        try:
            name = TARGET_NAMES[0]
            _warm(pair, name, 0.2)
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(pairs):
                pair(name)
            prof.disable()
            st = pstats.Stats(prof)
            which = "pure-Python" if pure_python else \
                ("C" if "get_or_create_context" in vars(m) else "pure-Python (C not built)")
            print(f"cProfile of {pairs:,} hot-path pairs, {which} hot path "
                  "(get_or_create_context + return_context); per pair = tottime / pairs:\n")
            rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])  # type: ignore[attr-defined]
            total = sum(v[2] for _k, v in rows)
            print(f"{'per pair µs':>12} {'share':>6} {'calls/pair':>10}  function")
            for (file, line, fn), (_cc, nc, tt, _ct, _callers) in rows[:16]:
                where = f"{Path(file).name}:{line}" if line else file
                print(f"{tt / pairs * 1e6:12.3f} {tt / total:6.1%} {nc / pairs:10.1f}  "
                      f"{fn} ({where})")
            print(f"{total / pairs * 1e6:12.3f} 100.0%             total (profiled; cProfile "
                  "inflates small calls)\n")
            if pure_python:
                _components(m, pair)
        finally:
            m.unlink(force=True)


def _components(m: ContextManager, pair: Callable[[str], None]) -> None:
    """Unprofiled cost of the pure-Python hot path's parts (timeit, best of 5), next to the
    C hot path and the floor.
    Reaches into shmctx internals: measurement only."""
    import timeit

    from shmctx import _layout as L
    from shmctx._context import MemoryContext
    from shmctx._proc import identity

    name = TARGET_NAMES[0]
    mapped = m._mapped[name]
    slot = mapped.slot
    lock = mapped.stripe
    sem, buf, so = lock.sem, m._buf, m._geo.slot_off(slot)
    spec, remove = _create_floor(f"/bench-prof-{uuid.uuid4().hex[:8]}")
    floor = _open_floor(spec)
    c_manager = ContextManager(namespace=m.namespace, sweeper=False)
    c_pair = _shmctx_pair(c_manager)
    c_pair(name)  # maps it

    def stripe_lock() -> None:
        lock.acquire()
        lock.release()

    def semaphore() -> None:
        sem.acquire(1.0)
        sem.release()

    def counts() -> None:  # both _count calls of a pair, under the stripe lock
        lock.acquire()
        m._count(slot, 1)
        m._count(slot, -1)
        lock.release()

    def slot_io() -> None:  # what get and return each do to the slot
        L.S_CHECK.unpack_from(buf, so)
        L.S_REFCOUNT.pack_into(buf, so + L.S_REFCOUNT_OFF, 0)

    def last_used() -> None:  # return only
        L.S_LAST_USED.pack_into(buf, so + L.S_LAST_USED_OFF, monotonic())

    parts = [
        ("whole pair, C hot path (get_or_create_context + return_context)", 1,
         lambda: c_pair(name)),
        ("floor pair (for comparison)", 1, lambda: floor.pair(name)),
        ("whole pair, pure-Python hot path; its parts:", 1, lambda: pair(name)),
        ("RobustLock acquire+release (stripe lock)", 2, stripe_lock),
        ("  of which posix_ipc sem acquire(timeout)+release", 2, semaphore),
        ("_count(+1) and _count(-1), incl. one lock pair", 1, counts),
        ("MemoryContext(...) handle", 1, lambda: MemoryContext(m, mapped, identity.pid)),
        ("slot state read + refcount write", 2, slot_io),
        ("last_used stamp (monotonic() + write)", 1, last_used),
    ]
    try:
        print(f"{'µs':>8} {'x/pair':>6} {'µs/pair':>8}  part (timeit, best of 5, unprofiled)")
        for label, per_pair, fn in parts:
            t = min(timeit.repeat(fn, number=100_000, repeat=5)) / 100_000 * 1e6
            print(f"{t:8.3f} {per_pair:6d} {t * per_pair:8.3f}  {label}")
    finally:
        c_manager.close()
        floor.close()
        remove()


def _hot_loop(seconds: float) -> None:
    m, pair = _hot_manager()
    try:
        name = TARGET_NAMES[0]
        n = 0
        end = monotonic() + seconds
        while monotonic() < end:
            for _ in range(1000):
                pair(name)
            n += 1000
        print(f"{n / seconds:,.0f} pairs/s")
    finally:
        m.unlink(force=True)


# --- main -------------------------------------------------------------------------------

def _run(args: argparse.Namespace) -> dict:
    settings = Settings.make(args.quick)
    if args.rounds:
        settings.rounds = args.rounds
    if args.seconds:
        settings.seconds = args.seconds
    if args.sweep_contexts:
        settings.sweep_contexts = args.sweep_contexts
    only = set(args.only.split(",")) if args.only else None
    if only is not None and not only <= set(LABELS):
        raise SystemExit(f"--only takes some of {', '.join(LABELS)}")
    b = _Bench(settings, only)
    began = monotonic()
    result: dict = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "quick": args.quick,
        "settings": settings.__dict__,
        "machine": _machine(),
        "source": _source_state(),
        "busy_before": _busy_processes(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    interrupted = False

    def on_term(signum, frame):
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        b.setup()
        if "shmctx" in b.specs:
            _setup_churn_and_attach(b)
        keys = list(b.specs)
        raw = {
            "timer_overhead_ns": [],
            "latency": {k: [] for k in keys},
            "throughput": {k: {m: {str(n): [] for n in PROCS} for m in ("same", "different")}
                           for k in keys if k in THROUGHPUT_KEYS},
            "churn": {"4096": [], "0": []},
            "attach": [],
            "load": [],  # what else ran: the load and top CPU users after each round
        }
        log.info("setup done in %.1fs", monotonic() - began)
        for r in range(settings.rounds):
            t0 = monotonic()
            _measure_round(b, r, raw)
            raw["load"].append({"round": r + 1, "load_average": os.getloadavg(),
                                "top": _busy_processes()})
            log.info("round %d/%d done in %.1fs", r + 1, settings.rounds, monotonic() - t0)
        result["timer_overhead_ns"] = _median(raw["timer_overhead_ns"])
        result["load_per_round"] = raw["load"]
        result["summary"] = _summarise(b, raw)
        if "shmctx" in b.specs and not args.no_sweep:
            t0 = monotonic()
            result["sweep"] = _sweep_phase(b)
            log.info("sweep phase done in %.1fs", monotonic() - t0)
        result["memory"] = _memory()
        if "redis" in b.specs:
            result["redis_version"] = b.specs["redis"]["version"]
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the cleanup finish
        b.cleanup()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, old_term)
        left = _shm.namespace_objects(f"bench-{b.uid}") + [
            e for e in os.listdir(_shm.SHM_DIR) if f"bench-{b.uid}" in e]
        if left:
            log.error("left behind in /dev/shm: %s", sorted(set(left)))
    if interrupted:
        raise SystemExit("interrupted; everything the benchmark created was removed")
    result["targets"] = _targets(result["summary"], result)
    result["busy_after"] = _busy_processes()
    result["load_average_after"] = os.getloadavg()
    result["seconds"] = monotonic() - began
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short run (about a minute)")
    ap.add_argument("--out", default="bench-results/bench.json", help="JSON results file")
    ap.add_argument("--plot", default=None, metavar="FILE.png",
                    help="throughput plot (default: next to --out)")
    ap.add_argument("--rounds", type=int, default=0, help="override the number of rounds")
    ap.add_argument("--seconds", type=float, default=0.0, help="override the throughput window")
    ap.add_argument("--sweep-contexts", type=int, default=0,
                    help="idle contexts in the swept table (full: 10,000; quick: 400)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the sweep phase")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {list(LABELS)}")
    ap.add_argument("--profile", type=int, default=0, metavar="PAIRS",
                    help="profile the shmctx hot path with cProfile and exit")
    ap.add_argument("--hot-loop", type=float, default=0.0, metavar="SECONDS",
                    help="run the shmctx hot path for SECONDS (for py-spy) and exit")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if args.profile:
        _profile(args.profile)
        return 0
    if args.hot_loop:
        _hot_loop(args.hot_loop)
        return 0
    result = _run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(_markdown(result))
    print(f"\nJSON: {out}  ({result['seconds']:.0f} s)")
    plot = Path(args.plot) if args.plot else out.with_name(out.stem + "-throughput.png")
    try:
        from bench_plot import plot_throughput
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_plot import plot_throughput
    try:
        plot_throughput(out, plot)
        print(f"plot: {plot}")
    except ImportError as e:
        log.warning("no plot: %s (pip install matplotlib)", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
