#!/usr/bin/env python3
"""How the hot path's cost depends on how many distinct contexts the process holds.

One process holds references to ``N - 1`` distinct contexts (taken once, kept), plus
the context ``x`` it gets and returns in the timed loop: during each get it holds ``N``
distinct contexts. Timed: ``m.return_context(m.get_context("x"))``, ``timeit`` with
``--number`` pairs per run, ``--runs`` runs; the figures are the minimum and the median
of the runs, per pair, in nanoseconds. Once on the C hot path, once on the Python one
(``SHMCTX_PURE_PYTHON=1``).

Two modes:

* ``held_bench.py --measure 1,60,1000``: measure in this process, with whatever shmctx
  ``import`` finds (set ``PYTHONPATH`` to pick a source tree), and print JSON lines.
* ``held_bench.py --trees /tmp/before/src,src --held 1,60,1000 --rounds 3``: run the
  measurement in a child per (tree, hot path), the trees and hot paths interleaved in
  each round (a loaded machine then slows every side alike), and print a table of the
  minimum and the median over every run of every round. A tree that cannot hold ``N``
  distinct contexts (an older layout's per-process limit) shows the error instead.

Every namespace it makes is unlinked at the end, also when a measurement fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import timeit
import uuid


def measure(held: list[int], number: int, runs: int) -> list[dict]:
    from shmctx import ContextConfig, ContextManager

    out = []
    for n in held:
        ns = f"held-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        m = ContextManager(ContextConfig(capacity=max(64, 2 * n), cleanup_interval=0),
                           namespace=ns, sweeper=False)
        try:
            x, _ = m.get_or_create_context("x")
            m.return_context(x)  # mapped: the next get of x is the hot path
            try:
                kept = [m.get_or_create_context(f"h{i}")[0] for i in range(n - 1)]
            except Exception as e:  # the per-process limit of an older layout
                out.append({"held": n, "error": f"{type(e).__name__}: {e}"[:120]})
                continue

            def pair(m: ContextManager = m) -> None:
                m.return_context(m.get_context("x"))

            pair()  # warm
            times = timeit.repeat(pair, number=number, repeat=runs)
            ns_per = [t / number * 1e9 for t in times]
            out.append({"held": n, "min": min(ns_per), "median": statistics.median(ns_per),
                        "runs": ns_per, "hot": type(m._hot).__name__ if m._hot else "Python"})
            for h in kept:
                m.return_context(h)
        finally:
            m.unlink(force=True)
    return out


def drive(trees: list[str], held: list[int], number: int, runs: int, rounds: int) -> None:
    results: dict[tuple[str, str, int], list[float]] = {}
    errors: dict[tuple[str, str, int], str] = {}
    for _ in range(rounds):
        for impl in ("C", "Python"):
            for tree in trees:
                env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
                env.pop("SHMCTX_PURE_PYTHON", None)
                if impl == "Python":
                    env["SHMCTX_PURE_PYTHON"] = "1"
                r = subprocess.run(
                    [sys.executable, __file__, "--measure", ",".join(map(str, held)),
                     "--number", str(number), "--runs", str(runs)],
                    env=env, capture_output=True, text=True, check=True)
                for line in r.stdout.splitlines():
                    d = json.loads(line)
                    key = (tree, impl, d["held"])
                    if "error" in d:
                        errors[key] = d["error"]
                    else:
                        results.setdefault(key, []).extend(d["runs"])
    print(f"ns per get+return pair; {rounds} round(s) x {runs} runs x {number} pairs")
    print("| hot path | held | " + " | ".join(f"{t} min / median" for t in trees) + " |")
    print("|---|---:|" + "---:|" * len(trees))
    for impl in ("C", "Python"):
        for n in held:
            cells = []
            for tree in trees:
                key = (tree, impl, n)
                if key in results:
                    v = results[key]
                    cells.append(f"{min(v):.0f} / {statistics.median(v):.0f}")
                else:
                    cells.append(errors.get(key, "-").split(":")[0])
            print(f"| {impl} | {n} | " + " | ".join(cells) + " |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--measure", help="held counts, comma-separated: measure here")
    what.add_argument("--trees", help="source trees (PYTHONPATH), comma-separated")
    ap.add_argument("--held", default="1,60,1000", help="held counts for --trees")
    ap.add_argument("--number", type=int, default=20000, help="pairs per run")
    ap.add_argument("--runs", type=int, default=9, help="runs per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (--trees)")
    args = ap.parse_args()
    if args.measure:
        for d in measure([int(n) for n in args.measure.split(",")], args.number, args.runs):
            print(json.dumps(d))
    else:
        drive(args.trees.split(","), [int(n) for n in args.held.split(",")], args.number,
              args.runs, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
