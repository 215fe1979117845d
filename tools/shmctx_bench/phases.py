"""The phases of a run: set up the contenders, the interleaved rounds (latency,
throughput, churn, attach), the sweep, the table's memory.

Each round measures every contender once per measurement, in alternating order (A B ...
then ... B A), so no position is favoured and slow drift of a shared machine hits every
contender alike; the report takes medians over rounds.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
import traceback
from time import monotonic, perf_counter_ns

from shmctx import ContextConfig, MemoryContextConfig

from . import stats
from .contenders import (
    BIG_CAPACITY,
    SETUPS,
    TARGET_NAMES,
    THROUGHPUT_KEYS,
    Unavailable,
    shmctx_spec,
)
from .runner import PROCS, Pool, Settings
from .session import Session, make_manager, table_path

log = logging.getLogger("bench")

MIB = 1 << 20
ATTACH_SIZES = {"1 MiB": MIB, "64 MiB": 64 * MIB, "1 GiB": 1024 * MIB}
ATTACH_MARK = 0x5A  # written by the attaching child, read back by the parent
PROBE_EVERY = 100e-6  # seconds between two table-lock probes of the sweep phase's worker


class Bench:
    """One run: its settings, the contenders wanted, what it created (``session``), its
    workers, and the spec of every contender that could be set up."""

    def __init__(self, settings: Settings, only: set[str] | None) -> None:
        self.s = settings
        self.only = only
        self.session = Session()
        self.pool: Pool | None = None
        self.specs: dict[str, dict] = {}
        self.unavailable: dict[str, str] = {}

    def wanted(self, key: str) -> bool:
        return self.only is None or key in self.only

    @property
    def workers(self) -> Pool:
        assert self.pool is not None, "start_workers() first"
        return self.pool

    def start_workers(self) -> None:
        """Fork the workers; before anything is set up, so they inherit nothing."""
        self.pool = Pool()

    def set_up(self) -> None:
        """Set up every wanted contender and open it in every worker."""
        for key, setup in SETUPS.items():
            if not self.wanted(key):
                continue
            began = monotonic()
            try:
                spec = setup(self.session, self.specs)
            except Unavailable as e:
                self.unavailable[key] = str(e)
                log.warning("%s: unavailable (%s)", key, e)
                continue
            self.workers.open_everywhere(key, spec)
            self.specs[key] = spec
            log.info("set up %s in %.2fs", key, monotonic() - began)
        if "shmctx" in self.specs:
            _set_up_churn_and_attach(self)

    def cleanup(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self.session.cleanup()


def new_raw(keys: list[str]) -> dict:
    """Where the rounds put their measurements."""
    return {
        "timer_overhead_ns": [],
        "latency": {k: [] for k in keys},
        "throughput": {k: {m: {str(n): [] for n in PROCS} for m in ("same", "different")}
                       for k in keys if k in THROUGHPUT_KEYS},
        "churn": {"4096": [], "0": []},
        "attach": [],
        "load": [],  # what else ran: the load and top CPU users after each round
    }


def measure_round(b: Bench, r: int, res: dict) -> None:
    s, pool = b.s, b.workers
    keys = list(b.specs)
    order = keys if r % 2 == 0 else keys[::-1]  # A B ... then ... B A: no position favoured
    overhead = pool.call(0, "overhead")
    res["timer_overhead_ns"].append(overhead)
    for key in order:
        samples = pool.call(0, "latency", key, TARGET_NAMES[0], s.latency_pairs,
                            s.latency_budget)
        res["latency"][key].append(stats.summary(samples, overhead))
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


# --- churn and attach (shmctx only) -------------------------------------------------------

def _set_up_churn_and_attach(b: Bench) -> None:
    import numpy as np

    m = b.session.manager("churn", capacity=1024)
    b.workers.open_everywhere("churn", shmctx_spec(m, []))
    a = b.session.manager("attach", capacity=16)
    ctx, _ = a.get_or_create_context("warm", MemoryContextConfig(size=4096))
    a.return_context(ctx)
    for label, size in ATTACH_SIZES.items():
        ctx, _ = a.get_or_create_context(label, MemoryContextConfig(size=size))
        arr = np.frombuffer(ctx.buf, dtype=np.uint8)
        arr[:] = size.bit_length()  # real data on every page, known to the child
        del arr
        a.return_context(ctx)


def _status_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0])
    return out


def attach_child(conn, ns: str, names: list[str]) -> None:
    """In a freshly spawned process (it inherits no mapping): time getting each context
    up to holding ``ctx.buf``, with the process's RSS before and after, and check through
    numpy that the parent's data is seen and the child's write reaches the parent."""
    import numpy as np

    try:
        m = make_manager(ns)
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


def _attach_round(b: Bench, r: int) -> dict:
    a = b.session.managers["attach"]
    names = list(ATTACH_SIZES)
    names = names[r % len(names):] + names[: r % len(names)]  # rotate which goes first
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=attach_child, args=(child, a.namespace, names))
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


# --- the sweep --------------------------------------------------------------------------

def sweep_phase(b: Bench) -> dict:
    """Fill a 10,240-slot table with idle contexts, then sample one worker's hot path
    without a sweep and during a sweep (in this process) that closes them all.

    How long the sweep holds the table lock is measured from outside, as another process
    feels it: every ``PROBE_EVERY`` seconds between two of its pairs the worker times one
    operation that needs the table lock (``table_lock_probe``); during the sweep a probe
    waits for whatever hold of the sweep it meets. Its figure leaves out the time the
    worker itself waited for a CPU (the kernel's run delay), which on a busy machine
    would otherwise dwarf the holds. The stripe locks the sweep takes show in the
    worker's own pairs (the hot context's stripe is one of them)."""
    s, pool = b.s, b.workers
    m = b.session.manager("sweep", capacity=BIG_CAPACITY, max_idle_time=s.max_idle)
    pool.open_everywhere("sweep", shmctx_spec(m, ["hot"]))
    began = monotonic()
    cfg = MemoryContextConfig(size=4096)
    for i in range(s.sweep_contexts - 1):
        ctx, _ = m.get_or_create_context(f"idle-{i}", cfg)
        m.return_context(ctx)
    filled = monotonic()
    live = len(m.contexts())
    # Idleness is a matter of time passing: wait until max_idle_time has elapsed.
    time.sleep(max(0.0, s.max_idle * 1.5 - (monotonic() - filled)))
    baseline, idle_probes = pool.sample(0, "sweep", "hot", s.sweep_baseline, PROBE_EVERY)
    report, (during, probes) = pool.sample_while(0, "sweep", "hot", m.sweep, PROBE_EVERY)

    def ms(summary: dict, key: str) -> float:
        return summary.get(key, float("nan")) / 1e3

    wait, wall, idle = probes["wait"], probes["wall"], idle_probes["wait"]
    return {
        "capacity": BIG_CAPACITY,
        "live_contexts": live,
        "fill_seconds": filled - began,
        "sweep_seconds": report.duration,
        "closed": len(report.closed),
        "table_lock": {
            "measured_as": "another process's close_context of an absent name (table lock "
                           f"+ lookup), one every {PROBE_EVERY * 1e6:.0f} µs, less that "
                           "process's own wait for a CPU"
                           + ("" if probes["cpu_wait_subtracted"] else " (not known here)"),
            "probes": wait["n"], "max_ms": ms(wait, "max_us"), "p99_ms": ms(wait, "p99_us"),
            "median_ms": ms(wait, "median_us"), "max_wall_ms": ms(wall, "max_us"),
            "without_sweep_median_ms": ms(idle, "median_us"),
            "without_sweep_max_ms": ms(idle, "max_us"),
        },
        "worker_without_sweep": baseline,
        "worker_during_sweep": during,
    }


# --- memory -----------------------------------------------------------------------------

def memory(session: Session) -> dict:
    """Bytes of the table per context slot, from the sizes of real tables in /dev/shm."""
    sizes = {}
    for cap in (1024, BIG_CAPACITY):
        ns = session.namespace(f"mem{cap}")
        m = make_manager(ns, ContextConfig(capacity=cap, cleanup_interval=0))
        try:
            sizes[cap] = os.stat(table_path(ns)).st_size
        finally:
            m.unlink(force=True)
    per_slot = (sizes[BIG_CAPACITY] - sizes[1024]) / (BIG_CAPACITY - 1024)
    fixed = sizes[1024] - per_slot * 1024
    return {"table_bytes": {str(k): v for k, v in sizes.items()}, "bytes_per_slot": per_slot,
            "fixed_bytes": fixed, "max_processes": ContextConfig().max_processes}
