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
a full 10,240-slot table of idle contexts, while a worker samples its hot-path latency
and, every 100 µs, how long an operation needing the table lock keeps it waiting (its
own wait for a CPU left out), during the sweep and without it.

Prints a markdown table, writes JSON (``--out``) and plots throughput against
processes (``--plot``, via ``tools/bench_plot.py``). ``--quick`` takes about a minute.
Everything it creates (namespaces, semaphores, files, redis-server, Manager) is removed
at the end, also on Ctrl-C. ``--profile`` profiles the shmctx hot path with cProfile;
``--hot-loop SECONDS`` just runs it, for an external sampler such as ``py-spy``.

The pieces live in the package ``shmctx_bench`` beside this file; it measures shmctx
from outside, through its public API.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from time import monotonic

# The package beside this file, also when this file is not run as a script (which puts
# its directory first on sys.path): ``python -m tools.bench``, ``runpy.run_path``.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from bench_plot import plot_throughput  # noqa: E402
from shmctx_bench import phases, profile, report  # noqa: E402
from shmctx_bench.contenders import LABELS  # noqa: E402
from shmctx_bench.runner import Settings  # noqa: E402
from shmctx_bench.stats import median  # noqa: E402

log = logging.getLogger("bench")


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
    b = phases.Bench(settings, only)
    began = monotonic()
    result: dict = {}
    interrupted = False

    def on_term(signum, frame):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        b.start_workers()  # first: the workers inherit nothing the run sets up
        result.update({
            "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "quick": args.quick,
            "settings": settings.__dict__,
            "machine": report.machine(b.session.hot_path()),
            "source": report.source_state(),
            "busy_before": report.busy_processes(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        })
        b.set_up()
        raw = phases.new_raw(list(b.specs))
        log.info("setup done in %.1fs", monotonic() - began)
        for r in range(settings.rounds):
            t0 = monotonic()
            phases.measure_round(b, r, raw)
            raw["load"].append({"round": r + 1, "load_average": os.getloadavg(),
                                "top": report.busy_processes()})
            log.info("round %d/%d done in %.1fs", r + 1, settings.rounds, monotonic() - t0)
        result["timer_overhead_ns"] = median(raw["timer_overhead_ns"])
        result["load_per_round"] = raw["load"]
        result["summary"] = report.summarise(b, raw)
        if "shmctx" in b.specs and not args.no_sweep:
            t0 = monotonic()
            result["sweep"] = phases.sweep_phase(b)
            log.info("sweep phase done in %.1fs", monotonic() - t0)
        result["memory"] = phases.memory(b.session)
        if "redis" in b.specs:
            result["redis_version"] = b.specs["redis"]["version"]
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the cleanup finish
        b.cleanup()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, old_term)
    if interrupted:
        raise SystemExit("interrupted; everything the benchmark created was removed")
    result["targets"] = report.targets(result["summary"], result)
    result["busy_after"] = report.busy_processes()
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
        profile.profile(args.profile)
        return 0
    if args.hot_loop:
        profile.hot_loop(args.hot_loop)
        return 0
    result = _run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(report.markdown(result))
    print(f"\nJSON: {out}  ({result['seconds']:.0f} s)")
    plot = Path(args.plot) if args.plot else out.with_name(out.stem + "-throughput.png")
    try:
        plot_throughput(out, plot)
        print(f"plot: {plot}")
    except ImportError as e:
        log.warning("no plot: %s (pip install matplotlib)", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
