"""From the rounds' measurements to the figures: medians and ratios, the targets, the
markdown tables, and what machine and source they were measured on."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from .contenders import LABELS, SHMCTX_KEYS, THROUGHPUT_KEYS
from .phases import ATTACH_SIZES, Bench
from .stats import median, paired_ratio


def summarise(b: Bench, raw: dict) -> dict:
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
            "median_us": median([x["median_us"] for x in lat]),
            "p99_us": median([x["p99_us"] for x in lat]),
            "pairs_timed_per_round": [x["n"] for x in lat],
            "rounds": lat,
        }
        if key in THROUGHPUT_KEYS:
            tp = {}
            for mode, by_n in raw["throughput"][key].items():
                tp[mode] = {n: {"pairs_per_s": median([x["pairs_per_s"] for x in rounds]),
                                "fairness": median([x["fairness"] for x in rounds]),
                                "rounds": rounds}
                            for n, rounds in by_n.items()}
            entry["throughput"] = tp
        methods[key] = entry
    for key, entry in methods.items():
        if entry["available"] and "floor" in b.specs:
            entry["latency"]["vs_floor"] = paired_ratio(
                [x["median_us"] for x in raw["latency"][key]],
                [x["median_us"] for x in raw["latency"]["floor"]])
    out: dict = {"methods": methods}
    if "shmctx" in b.specs:
        out["churn_pairs_per_s"] = {k: median(v) for k, v in raw["churn"].items()}
        out["churn_rounds"] = raw["churn"]
        out["attach"] = {
            label: {
                "attach_us": median([r[label]["attach_us"] for r in raw["attach"]]),
                "frombuffer_us": median([r[label]["frombuffer_us"] for r in raw["attach"]]),
                "rounds": [r[label] for r in raw["attach"]],
            } for label in ATTACH_SIZES
        }
    return out


def targets(summary: dict, extra: dict) -> list[dict]:
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
            (*SHMCTX_KEYS, "floor")]
    if alts:
        best = min(alts, key=lambda k: meth[k]["latency"]["median_us"])
        v = meth[best]["latency"]["median_us"] / lat["median_us"]
        add(f"fastest alternative ({best}) median / hot path median", "> 1", v, v > 1, "x")
    rounds = hot["throughput"]
    one = [x["pairs_per_s"] for x in rounds["different"]["1"]["rounds"]]
    for mode, goal in (("different", 1.5), ("same", 0.7)):
        four = [x["pairs_per_s"] for x in rounds[mode]["4"]["rounds"]]
        v = paired_ratio(four, one)
        add(f"4 processes, {mode} names / 1 process", f">= {goal}", v, v >= goal, "x")
        v = rounds[mode]["4"]["fairness"]
        add(f"fairness, 4 processes, {mode} names (fewest / most pairs)", ">= 0.5", v,
            v >= 0.5)
    if meth.get("shmctx-10k", {}).get("available"):
        v = paired_ratio([x["median_us"] for x in meth["shmctx-10k"]["latency"]["rounds"]],
                         [x["median_us"] for x in lat["rounds"]])
        add("hot path, 10,000 / 10 live contexts", "<= 1.10", v, v <= 1.10, "x")
    for size, v in summary.get("churn_pairs_per_s", {}).items():
        add(f"churn, size {size} (create+return+close)", ">= 20,000/s", v, v >= 20_000, "/s")
    if "attach" in summary:
        v = summary["attach"]["1 GiB"]["attach_us"] / 1e3
        add("attach a new process to 1 GiB", "< 1 ms", v, v < 1, "ms")
    sw = extra.get("sweep")
    if sw:
        v = sw["table_lock"]["max_ms"]
        add(f"sweep of {sw['closed']} idle contexts: longest table-lock wait of another "
            "process", "<= 1 ms", v, v <= 1, "ms")
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


def markdown(result: dict) -> str:
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
        wo, du, tl = sw["worker_without_sweep"], sw["worker_during_sweep"], sw["table_lock"]
        lines += ["", f"Sweep: {sw['closed']} idle contexts closed of {sw['live_contexts']} "
                  f"live in a {sw['capacity']}-slot table in {sw['sweep_seconds']:.2f} s; "
                  f"another process's table-lock operation ({tl['probes']} probes during the "
                  f"sweep) took at most {_fmt(tl['max_ms'], 2)} ms besides its own wait for "
                  f"a CPU ({_fmt(tl['max_wall_ms'], 2)} ms with it), p99 "
                  f"{_fmt(tl['p99_ms'], 2)} ms, median {_fmt(tl['median_ms'], 3)} ms "
                  f"({_fmt(tl['without_sweep_median_ms'], 3)} ms without a sweep). Worker "
                  f"hot path p99 {_fmt(du.get('p99_us'), 1)} µs during the sweep vs "
                  f"{_fmt(wo.get('p99_us'), 1)} µs without (medians "
                  f"{_fmt(du.get('median_us'), 2)} / {_fmt(wo.get('median_us'), 2)} µs)."]
    return "\n".join(lines)


# --- machine and source -------------------------------------------------------------------

def _run_text(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine(hot_path: str) -> dict:
    """The machine, and which hot path (``hot_path``: "C" or "Python") shmctx ran."""
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
        "shmctx_hot_path": hot_path,
        "load_average": os.getloadavg(),
    }


def source_state() -> dict:
    """Which shmctx was measured: the commit, and the files changed since (if any)."""
    root = Path(__file__).resolve().parents[2]
    head = _run_text(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
    dirty = _run_text(["git", "-C", str(root), "status", "--porcelain", "--", "src"])
    return {"commit": head or "unknown",
            "uncommitted_src_changes": [ln.split(maxsplit=1)[-1] for ln in dirty.splitlines()]}


def busy_processes() -> list[str]:
    """The top CPU users right now, to say what else was running."""
    out = _run_text(["top", "-bn1", "-o", "%CPU"]).splitlines()
    for i, line in enumerate(out):
        if line.lstrip().startswith("PID"):
            return [" ".join(x.split()) for x in out[i: i + 9]]
    return []
