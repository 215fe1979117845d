#!/usr/bin/env python3
"""Plot a ``tools/bench.py`` JSON file: throughput against processes, per contender.

``python tools/bench_plot.py bench-results/bench.json out.png`` (``tools/bench.py``
calls ``plot_throughput`` itself after every run). Two panels, every process on the
same name and each process on its own name; log scale, since the contenders span four
orders of magnitude.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def plot_throughput(json_path: str | Path, png_path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(Path(json_path).read_text())
    methods = result["summary"]["methods"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, mode, title in ((axes[0], "same", "all processes on the same name"),
                            (axes[1], "different", "each process on its own name")):
        for key, entry in methods.items():
            tp = entry.get("throughput")
            if not tp:
                continue
            procs = sorted(int(n) for n in tp[mode])
            ys = [tp[mode][str(n)]["pairs_per_s"] for n in procs]
            style = {"linewidth": 2.5, "color": "black"} if key == "shmctx" else \
                {"linestyle": "--", "color": "grey"} if key == "floor" else {}
            ax.plot(procs, ys, marker="o", label=entry["label"], **style)
        ax.set_title(title)
        ax.set_xlabel("processes")
        ax.set_xticks([1, 2, 4])
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("acquire + return pairs per second (all processes)")
    missing = [f"{k}: {e.get('reason')}" for k, e in methods.items() if not e["available"]]
    machine = result.get("machine", {})
    note = (f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, Python "
            f"{machine.get('python', '?')}; {result.get('started', '')}"
            + (f"; unavailable: {'; '.join(missing)}" if missing else ""))
    fig.suptitle("shmctx vs alternatives: throughput of a named, reference-counted "
                 "acquire + return\n" + note, fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} RESULTS.json OUT.png")
    plot_throughput(sys.argv[1], sys.argv[2])
