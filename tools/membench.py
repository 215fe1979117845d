#!/usr/bin/env python3
"""Memory benchmark: what one read-only array served by N gunicorn workers really costs
the host, held six ways side by side, and what a publish of a new version costs while
the server is under load.

Each scenario is a real gunicorn (sync workers) on 127.0.0.1 serving the WSGI app in
``tools/membench_apps/membench_app.py``, whose requests each sum a few elements of the
array at random indices (so every worker touches it):

* ``baseline``: the same server and app with no array: what the interpreters cost;
* ``own-copy``: each worker ``np.load``s its own copy;
* ``preload-cow``: ``--preload``: the master loads it before forking, the workers share
  its pages copy-on-write;
* ``shmctx-array``: the documented wiring (``from shmctx.gunicorn import *``); each worker
  takes the array context once (``get_or_create_context(..., for_array(...),
  init=fill)``), keeps the handle and reads ``ctx.array()``;
* ``shmctx-object``: ``get_or_create_object`` of a dict holding the array and some Python
  objects, ``ctx.load()`` once per worker;
* ``ray``: a driver ``ray.put``s the array once; each worker ``ray.get``s it (only if
  ``ray`` is installed; otherwise reported as not installed);
* ``shmctx-publish``: ``shmctx-array`` whose requests start with ``m.refresh(ctx)``; in
  the middle of the load, an outside process publishes version 2 (filled with 2.0).

Memory is measured once the load is over, over every process of the scenario (gunicorn's
master and workers, and for Ray its driver, daemons and actor):

* ``uss``: private pages, summed (smaps: Private_Clean + Private_Dirty), leaving out
  mappings of shared memory (a /dev/shm page that only one process maps counts as that
  process's private page: it is counted once, in ``shm``, instead);
* ``cow``: anonymous pages several of these processes share (copy-on-write after fork),
  counted once: the sum over anonymous mappings of Pss - Private;
* ``shm``: the shared memory that exists, counted once: the allocated bytes of every
  /dev/shm file these processes map or hold open (deleted ones included, found through
  /proc/PID/map_files) and of every file of the scenario's shmctx namespace (mapped or
  not);
* ``real`` = uss + cow + shm: what the host would get back if the scenario stopped;
* ``pss``: the sum of PSS, for comparison: it misses every shared page that no live
  process has mapped (a context's pages that the workers have not touched yet);
* ``statvfs``: the growth of /dev/shm's use since before the server started, a check of
  ``shm`` that other programs using /dev/shm at the same time disturb.

Also: the time from starting the server to its first successful answer and until every
worker has answered; requests/s and errors under wrk (or, without wrk, a small
multi-process Python client: the JSON says which) for ``--seconds``.

Prints a markdown table of medians over ``--repeat`` runs (scenarios interleaved), writes
everything to JSON (``--out``) and plots memory per scenario (``--plot``). Everything it
starts or creates (servers, Ray, namespaces, its temporary folder) is removed at the end,
also on Ctrl-C or a failure; it checks /dev/shm for anything left of its namespaces.

    python tools/membench.py --out membench.json --plot docs/performance-memory.png
    python tools/membench.py --mib 64 --workers 4 --quick
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import median
from typing import Any

HERE = Path(__file__).resolve().parent
APPS = HERE / "membench_apps"
SHM = "/dev/shm"
MiB = 1 << 20
SCENARIOS = ("baseline", "own-copy", "preload-cow", "shmctx-array", "shmctx-object", "ray",
             "shmctx-publish")
SHMCTX_SCENARIOS = ("shmctx-array", "shmctx-object", "shmctx-publish")
ARRAY_NAME = "membench-array"  # as in membench_app.py
K = 8  # elements each request sums, as in membench_app.py
TARGET = 1.10  # shmctx's real cost: within 10% of one copy + the interpreters

_STATE, _SESSION = 0, 3  # fields of /proc/PID/stat after the command name


# --- processes ------------------------------------------------------------------------


def _stat(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``: each server and Ray driver is
    started in a session of its own, so this is it and everything it started."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = _stat(int(entry))
            if f is not None and int(f[_SESSION]) == sid and f[_STATE] not in (b"Z", b"X"):
                out.append(int(entry))
    return sorted(out)


def kill_session(sid: int, timeout: float) -> None:
    """SIGKILL every process of session ``sid`` and wait (at most ``timeout``) until
    they are gone."""
    deadline = time.monotonic() + timeout
    while True:
        pids = session_pids(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} of session {sid} survive SIGKILL")
        time.sleep(0.05)


def wait_session_gone(sid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while session_pids(sid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- memory ---------------------------------------------------------------------------


def _kind(path: str) -> str:
    """What a mapping is: shared memory (counted in ``shm``), anonymous (private, or
    shared copy-on-write after fork) or a file (libraries: the page cache, shared with
    the whole host and the same in every scenario)."""
    if path.startswith(SHM + "/") or path.startswith("/memfd:") or path.startswith("/SYSV"):
        return "shm"
    if not path or path in ("[heap]", "[stack]") or path.startswith("[anon"):
        return "anon"
    return "file"


def _smaps(pid: int) -> list[dict]:
    """The mappings of ``pid`` with their sizes in bytes."""
    vmas: list[dict] = []
    cur: dict = {}
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if head.endswith(":"):
                if head in ("Rss:", "Pss:", "Private_Clean:", "Private_Dirty:"):
                    cur[head[:-1]] = int(line.split()[1]) * 1024
            else:
                parts = line.split(None, 5)
                path = parts[5].strip() if len(parts) > 5 else ""
                cur = {"range": parts[0], "path": path, "kind": _kind(path)}
                vmas.append(cur)
    return vmas


def _rollup(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def _shm_file(path: str, files: dict[tuple[int, int], dict], name: str) -> None:
    """Count the /dev/shm file at ``path`` (a /proc link or a name) once, by inode."""
    try:
        st = os.stat(path)
    except OSError:
        return
    files.setdefault((st.st_dev, st.st_ino), {"name": name, "bytes": st.st_blocks * 512,
                                              "size": st.st_size})


def namespace_files(ns: str | None) -> list[str]:
    """Every /dev/shm entry of shmctx namespace ``ns``: its table, semaphores, contexts."""
    if not ns:
        return []
    own = f"shmctx@{ns}"
    return [e for e in os.listdir(SHM)
            if e.removeprefix("sem.") == own or e.removeprefix("sem.").startswith(own + "@")]


def namespace_bytes(ns: str) -> int:
    total = 0
    for e in namespace_files(ns):
        try:
            total += os.stat(f"{SHM}/{e}").st_blocks * 512
        except OSError:
            pass  # removed meanwhile
    return total


def shm_used() -> int:
    st = os.statvfs(SHM)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def measure(roles: dict[int, str], ns: str | None, shm_before: int) -> dict:
    """The memory of processes ``roles`` (pid -> role) and of namespace ``ns``."""
    shm_dev = os.stat(SHM).st_dev
    files: dict[tuple[int, int], dict] = {}
    procs = []
    sums = dict.fromkeys(("uss", "uss_rollup", "cow", "pss", "rss"), 0)
    for pid, role in sorted(roles.items()):
        try:
            vmas, roll = _smaps(pid), _rollup(pid)
        except OSError:
            continue  # gone meanwhile
        uss = cow = 0
        for v in vmas:
            private = v.get("Private_Clean", 0) + v.get("Private_Dirty", 0)
            if v["kind"] == "shm":
                _shm_file(f"/proc/{pid}/map_files/{v['range']}", files, v["path"])
                continue
            uss += private
            if v["kind"] == "anon":
                cow += v.get("Pss", 0) - private
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            fds = []
        for fd in fds:  # shared memory held open but not mapped (or not yet)
            link = f"/proc/{pid}/fd/{fd}"
            try:
                if os.stat(link).st_dev == shm_dev:
                    _shm_file(link, files, os.readlink(link))
            except OSError:
                pass
        uss_rollup = roll.get("Private_Clean", 0) + roll.get("Private_Dirty", 0)
        procs.append({"pid": pid, "role": role, "uss": uss, "uss_rollup": uss_rollup,
                      "cow": cow, "pss": roll.get("Pss", 0), "rss": roll.get("Rss", 0)})
        for key, value in (("uss", uss), ("uss_rollup", uss_rollup), ("cow", cow),
                           ("pss", roll.get("Pss", 0)), ("rss", roll.get("Rss", 0))):
            sums[key] += value
    for e in namespace_files(ns):  # contexts nobody maps count too
        _shm_file(f"{SHM}/{e}", files, f"{SHM}/{e}")
    shm = sum(f["bytes"] for f in files.values())
    return {**sums, "shm": shm, "real": sums["uss"] + max(sums["cow"], 0) + shm,
            "statvfs": shm_used() - shm_before, "processes": procs,
            "shm_files": sorted(files.values(), key=lambda f: -f["bytes"])[:8]}


class Sampler(threading.Thread):
    """Samples /dev/shm's use (statvfs) and the namespace's bytes every ``interval``."""

    def __init__(self, ns: str | None, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.ns, self.interval = ns, interval
        self.samples: list[tuple[float, int, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while True:
            self.samples.append((time.monotonic(), shm_used(),
                                 namespace_bytes(self.ns) if self.ns else 0))
            if self._halt.wait(self.interval):
                return

    def stop(self) -> None:
        self._halt.set()
        self.join()


# --- HTTP -----------------------------------------------------------------------------


def http_get(port: int, path: str = "/", timeout: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _load_worker(port: int, deadline: float, halt: Any, out: Any) -> None:
    """One process of the Python load client: the same checks as check.lua."""
    stats = {"requests": 0, "connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0,
             "ok": 0, "bad": 0, "non200": 0, "v1": 0, "v2": 0, "vother": 0,
             "max_t_v1": -1.0, "min_t_v2": -1.0, "lat": []}
    while time.monotonic() < deadline and not halt.is_set():
        t = time.monotonic()
        try:
            # gunicorn's sync workers close the connection after each answer: one
            # connection per request, as wrk does against them.
            status, body = http_get(port, "/", timeout=5.0)
        except TimeoutError:
            stats["timeout"] += 1
            continue
        except ConnectionRefusedError:
            stats["connect"] += 1
            continue
        except (OSError, http.client.HTTPException):
            stats["read"] += 1
            continue
        stats["requests"] += 1
        stats["lat"].append(time.monotonic() - t)
        if status != 200:
            stats["non200"] += 1
            continue
        try:
            a = json.loads(body)
            v, s, started = int(a["v"]), float(a["s"]), float(a["t"])
        except (ValueError, KeyError, TypeError):
            stats["bad"] += 1
            continue
        if s != K * v:
            stats["bad"] += 1
            continue
        stats["ok"] += 1
        if v == 1:
            stats["v1"] += 1
            stats["max_t_v1"] = max(stats["max_t_v1"], started)
        elif v == 2:
            stats["v2"] += 1
            if stats["min_t_v2"] < 0 or started < stats["min_t_v2"]:
                stats["min_t_v2"] = started
        else:
            stats["vother"] += 1
    out.put(stats)


def run_load(port: int, seconds: int, connections: int,
             stop: threading.Event | None = None) -> dict:
    """``seconds`` of load on the server; wrk if it is installed. With ``stop``, the load
    goes on until ``stop`` is set instead (at most ``seconds`` + 300 s)."""
    t0 = time.monotonic()
    limit = seconds if stop is None else seconds + 300
    if shutil.which("wrk"):
        p = subprocess.Popen(
            ["wrk", "-t1", f"-c{connections}", f"-d{limit}s", "--timeout", "5s",
             "-s", str(APPS / "check.lua"), f"http://127.0.0.1:{port}/"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        if stop is not None:
            # SIGINT: wrk stops, and reports (the script's done() included) as usual.
            threading.Thread(target=lambda: stop.wait(limit) is not None and
                             p.poll() is None and p.send_signal(signal.SIGINT),
                             daemon=True).start()
        try:
            out, _ = p.communicate(timeout=limit + 60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        lines = [ln for ln in out.splitlines() if ln.startswith("MEMBENCH ")]
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"wrk failed ({p.returncode}):\n{out}")
        r = json.loads(lines[-1].removeprefix("MEMBENCH "))
        r["generator"] = f"wrk -t1 -c{connections} --timeout 5s"
        r["seconds"] = r["duration_us"] / 1e6
    else:
        mp = multiprocessing.get_context("spawn")
        q, halt = mp.Queue(), mp.Event()
        deadline = time.monotonic() + limit + 0.5  # the processes take a while to start
        procs = [mp.Process(target=_load_worker, args=(port, deadline, halt, q))
                 for _ in range(connections)]
        for p in procs:
            p.start()
        if stop is not None:
            threading.Thread(target=lambda: stop.wait(limit) is not None and halt.set(),
                             daemon=True).start()
        parts = [q.get(timeout=limit + 120) for _ in procs]
        for p in procs:
            p.join()
        r = {key: sum(x[key] for x in parts) for key in parts[0]
             if key not in ("max_t_v1", "min_t_v2", "lat")}
        r["max_t_v1"] = max(x["max_t_v1"] for x in parts)
        r["min_t_v2"] = min((x["min_t_v2"] for x in parts if x["min_t_v2"] >= 0), default=-1)
        lat = sorted(v for x in parts for v in x["lat"])
        r["p50_us"] = int(lat[len(lat) // 2] * 1e6) if lat else 0
        r["p99_us"] = int(lat[int(len(lat) * 0.99)] * 1e6) if lat else 0
        r["generator"] = f"python http.client, {connections} processes"
        r["seconds"] = time.monotonic() - t0
    # wrk counts a non-2xx answer in "status", the script in "non200": the same ones.
    r["errors"] = (r["connect"] + r["read"] + r["write"] + r["timeout"]
                   + max(r["status"], r["non200"]) + r["bad"])
    r["rps"] = r["requests"] / r["seconds"] if r["seconds"] else 0.0
    r["started"] = t0
    return r


# --- one scenario ---------------------------------------------------------------------


class Run:
    """One scenario once: its server (and Ray driver), and everything to undo."""

    def __init__(self, bench: Bench, scenario: str, rep: int) -> None:
        self.b, self.scenario, self.rep = bench, scenario, rep
        self.ns = (f"membench-{bench.run_id}-{scenario.split('-', 1)[1]}-{rep}"
                   if scenario in SHMCTX_SCENARIOS else None)
        self.port = free_port()
        self.server: subprocess.Popen | None = None
        self.holder: subprocess.Popen | None = None
        self.log = bench.dir / f"{scenario}-{rep}.log"
        self.result: dict = {"scenario": scenario, "rep": rep, "namespace": self.ns}

    def env(self) -> dict[str, str]:
        env = dict(os.environ, MEMBENCH_SCENARIO=self.scenario, MEMBENCH_NPY=str(self.b.npy),
                   MEMBENCH_ELEMS=str(self.b.elems),
                   # Ray: no usage report, and every address on the loopback (this
                   # variable makes Ray use 127.0.0.1 as the node's address, as it does
                   # on a laptop, instead of the host's network address). The driver's
                   # Ray requires a token; the workers must then say they use one.
                   RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                   RAY_AUTH_MODE="token")
        env.pop("SHMCTX_NAMESPACE", None)
        if self.ns:
            env["SHMCTX_NAMESPACE"] = self.ns  # how the publisher finds the namespace
        return env

    def start_ray(self) -> None:
        store = max(2 * self.b.nbytes, 128 * MiB)
        with open(self.b.dir / f"ray-{self.rep}.log", "wb") as err:
            self.holder = subprocess.Popen(
                [sys.executable, str(APPS / "ray_holder.py"), str(self.b.npy), str(store),
                 str(self.b.dir / "ray")],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                env=self.env(), start_new_session=True)
        self.b.sessions.add(self.holder.pid)
        line = _readline(self.holder, 300)
        if not line:
            # The log goes with the temporary folder: show its end now.
            tail = (self.b.dir / f"ray-{self.rep}.log").read_text(errors="replace")
            raise RuntimeError("the Ray driver did not start:\n"
                               + "\n".join(tail.splitlines()[-30:]))
        info = json.loads(line)
        self.result["ray_put_seconds"] = info["put_seconds"]
        self.ray_address = info["address"]

    def start(self) -> None:
        cmd = [sys.executable, "-m", "gunicorn",
               "-c", str(APPS / ("conf_shmctx.py" if self.ns else "conf_plain.py")),
               "-b", f"127.0.0.1:{self.port}", "-w", str(self.b.workers),
               "--pythonpath", str(APPS)]
        if self.scenario == "preload-cow":
            cmd.append("--preload")
        cmd.append("membench_app:app")
        env = self.env()
        if self.scenario == "ray":
            env["MEMBENCH_RAY_ADDRESS"] = self.ray_address
        with open(self.log, "wb") as log:
            self.server = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True)
        self.b.sessions.add(self.server.pid)
        if self.ns:
            self.b.namespaces.add(self.ns)

    def wait_first(self, t0: float, timeout: float = 300) -> float:
        """Seconds from ``t0`` to the first answer 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise RuntimeError(f"gunicorn exited ({self.server.returncode}):\n"
                                   + self.log_tail())
            try:
                status, _ = http_get(self.port, "/", timeout=5.0)
                if status == 200:
                    return time.monotonic() - t0
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.02)
        raise RuntimeError(f"no answer within {timeout} s:\n{self.log_tail()}")

    def wait_all(self, t0: float, timeout: float = 300) -> float:
        """Seconds from ``t0`` until every worker has answered: rounds of 2N
        concurrent slow requests (50 ms each), so that no worker can take them all."""
        n = self.b.workers
        seen: set[int] = set()
        deadline = time.monotonic() + timeout

        def one(_: int) -> int | None:
            try:
                status, body = http_get(self.port, "/?sleep=0.05", timeout=30.0)
            except (OSError, http.client.HTTPException):
                return None
            return json.loads(body)["pid"] if status == 200 else None

        ex = ThreadPoolExecutor(2 * n)
        try:
            while len(seen) < n:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {len(seen)} of {n} workers answered")
                seen |= {p for p in ex.map(one, range(2 * n)) if p is not None}
        finally:
            # On Ctrl-C, not waiting for requests still out to a booting server: they
            # end when the cleanup stops it.
            ex.shutdown(wait=False, cancel_futures=True)
        return time.monotonic() - t0

    def roles(self) -> dict[int, str]:
        roles = {}
        if self.server is not None:
            for pid in session_pids(self.server.pid):
                roles[pid] = "master" if pid == self.server.pid else "worker"
        if self.holder is not None:
            for pid in session_pids(self.holder.pid):
                roles[pid] = "ray driver" if pid == self.holder.pid else "ray"
        return roles

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def publish(self) -> dict:
        p = subprocess.Popen(
            [sys.executable, str(APPS / "publisher.py"), self.ns, ARRAY_NAME,
             str(self.b.elems)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env(),
            start_new_session=True)
        # Killed by the cleanup if the run is interrupted: a publisher going on after
        # the namespace was removed would leave its new version in /dev/shm.
        self.b.sessions.add(p.pid)
        try:
            out, err = p.communicate(timeout=300)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            self.b.sessions.discard(p.pid)
        if p.returncode != 0:
            raise RuntimeError(f"publisher failed ({p.returncode}):\n{err}")
        return json.loads(out.strip().splitlines()[-1])

    def stop(self) -> None:
        """Stop the server the way an operator does (SIGTERM: shmctx's on_exit unlinks
        the namespace), then Ray; SIGKILL whatever is left after the grace period."""
        r = self.result
        if self.server is not None:
            sid = self.server.pid
            t = time.monotonic()
            try:
                self.server.send_signal(signal.SIGTERM)
                self.server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                r.setdefault("problems", []).append("gunicorn did not stop within 60 s")
            if not wait_session_gone(sid, 30):
                r.setdefault("problems", []).append("workers outlived their master")
            kill_session(sid, 30)
            self.b.sessions.discard(sid)
            r["stop_seconds"] = time.monotonic() - t
        if self.holder is not None:
            sid = self.holder.pid
            try:
                self.holder.stdin.close()  # the driver shuts Ray down
                self.holder.wait(timeout=60)
            except (subprocess.TimeoutExpired, OSError):
                r.setdefault("problems", []).append("the Ray driver did not stop in 60 s")
            wait_session_gone(sid, 30)
            kill_session(sid, 30)
            self.b.sessions.discard(sid)
            shutil.rmtree(self.b.dir / "ray", ignore_errors=True)
        if self.ns:
            left = namespace_files(self.ns)
            if left:
                # shmctx's on_exit should have removed them: say so, then clean up.
                r.setdefault("problems", []).append(
                    f"left in /dev/shm after the server stopped: {left[:5]}")
                self.b.remove_namespace(self.ns)
            self.b.namespaces.discard(self.ns)

    def go(self) -> dict:
        r = self.result
        before = shm_used()
        sampler = Sampler(self.ns if self.scenario == "shmctx-publish" else None)
        try:
            t0 = time.monotonic()
            if self.scenario == "ray":
                self.start_ray()
            self.start()
            r["first_response_s"] = self.wait_first(t0)
            r["all_workers_s"] = self.wait_all(t0)
            r["memory_idle"] = measure(self.roles(), self.ns, before)
            pub: dict = {}
            if self.scenario == "shmctx-publish":
                sampler.start()
                stop = threading.Event()

                def during_load() -> None:
                    # 40% of --seconds of load on version 1, the publish (however long
                    # it takes), then 60% of --seconds more on version 2.
                    try:
                        if not stop.wait(self.b.seconds * 0.4):
                            pub.update(self._publish_safely(before))
                            stop.wait(self.b.seconds * 0.6)
                    finally:
                        stop.set()

                publisher = threading.Thread(target=during_load, daemon=True)
                publisher.start()
                try:
                    r["load"] = run_load(self.port, self.b.seconds, self.b.connections, stop)
                finally:
                    stop.set()
                    publisher.join()
                sampler.stop()
                r["publish"] = self._publish_report(pub, sampler, before, r["load"])
            else:
                r["load"] = run_load(self.port, self.b.seconds, self.b.connections)
            r["memory"] = measure(self.roles(), self.ns, before)
            r["loadavg"] = os.getloadavg()
            if self.scenario == "shmctx-publish":
                r["publish"]["shm_after"] = r["memory"]["shm"]
        except KeyboardInterrupt:
            print("interrupted: stopping the server (a worker still booting delays it by "
                  "up to gunicorn's graceful_timeout, 10 s) and removing what the run made",
                  file=sys.stderr, flush=True)
            raise
        finally:
            if sampler.is_alive():
                sampler.stop()
            self.stop()
        return r

    def _publish_safely(self, before: int) -> dict:
        try:
            pub = self.publish()
            # Right after the switch, while the old version is still mapped by the
            # workers that have not refreshed yet and the new one only where a request
            # has touched it: where a sum of PSS is furthest from the truth.
            at = measure(self.roles(), self.ns, before)
            pub["at_switch"] = {k: at[k] for k in ("real", "uss", "cow", "shm", "pss")}
            return pub
        except Exception as e:  # reported, and the run fails after the load
            return {"error": repr(e)}

    def _publish_report(self, pub: dict, sampler: Sampler, before: int, load: dict) -> dict:
        if "error" in pub or not pub:
            raise RuntimeError(f"the publish failed: {pub.get('error', 'did not run')}")
        s = sampler.samples
        pre = [x for x in s if x[0] < pub["start"]]
        during = [x for x in s if x[0] >= pub["start"]]
        one = pre[-1][2] if pre else 0  # the namespace's bytes with one version
        settled = next((x[0] - pub["end"] for x in during
                        if x[0] >= pub["end"] and x[2] <= one + MiB), None)
        # /dev/shm as a whole: the old version's pages are gone once the last process
        # mapping them has let go and the kernel has freed them (which takes a while:
        # some 0.1 s for 512 MiB here). Others' use of /dev/shm moves this figure: the
        # test is "less than half a copy above the level before the publish".
        level = pre[-1][1] if pre else before
        freed = next((x[0] - pub["end"] for x in during
                      if x[0] >= pub["end"] and x[1] < level + self.b.nbytes // 2), None)
        return {
            **pub,
            "samples": len(s),
            "named_before": one,
            "named_peak": max((x[2] for x in during), default=0),
            "statvfs_before": (pre[-1][1] - before) if pre else None,
            "statvfs_peak": max((x[1] for x in during), default=before) - before,
            "named_back_to_one_copy_after_s": settled,
            "statvfs_back_to_one_copy_after_s": freed,
            # Every answer of version 1 must have started before the publish returned,
            # every request that started after it must have got version 2.
            "v1_after_switch": load["max_t_v1"] > pub["end"],
            "v2_answers": load["v2"],
            "failed_requests": load["errors"],
            # (seconds since the publish started, /dev/shm growth, namespace's bytes)
            "timeline": [(round(t - pub["start"], 4), used - before, named)
                         for t, used, named in s],
        }


def _readline(p: subprocess.Popen, timeout: float) -> str:
    """A line of ``p``'s standard output, or "" if none came in ``timeout`` seconds."""
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(p.stdout.readline().decode()),
                         daemon=True)
    t.start()
    t.join(timeout)
    return out[0] if out else ""


# --- the benchmark --------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.workers, self.seconds = args.workers, args.seconds
        self.connections = args.connections
        self.elems = args.mib * MiB // 4
        self.nbytes = self.elems * 4
        self.run_id = uuid.uuid4().hex[:8]
        self.dir = Path(tempfile.mkdtemp(prefix=f"membench-{self.run_id}-"))
        self.npy = self.dir / "array.npy"
        self.sessions: set[int] = set()  # of servers and drivers still to stop
        self.namespaces: set[str] = set()  # still to check in /dev/shm

    def write_array(self) -> None:
        import numpy as np

        np.save(self.npy, np.ones(self.elems, dtype=np.float32))

    def remove_namespace(self, ns: str) -> None:
        """Remove whatever is left of ``ns`` in /dev/shm; called once every process that
        used it is dead."""
        for e in namespace_files(ns):
            try:
                os.unlink(f"{SHM}/{e}")
            except FileNotFoundError:
                pass

    def cleanup(self) -> list[str]:
        """Kill every server and driver still running, remove every namespace and the
        temporary folder; returns what had to be removed by force."""
        forced = []
        for sid in list(self.sessions):
            if session_pids(sid):
                forced.append(f"session {sid}")
            try:
                kill_session(sid, 30)
            except RuntimeError as e:
                forced.append(str(e))
        self.sessions.clear()
        # Every namespace of this run is named membench-<run id>-...: none can be
        # another program's, and no process of this run is left to use one.
        for e in os.listdir(SHM):
            if f"shmctx@membench-{self.run_id}-" in e:
                forced.append(e)
                try:
                    os.unlink(f"{SHM}/{e}")
                except FileNotFoundError:
                    pass
        self.namespaces.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
        return forced


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("numpy", "gunicorn", "ray"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = "not installed"
    if shutil.which("wrk"):
        p = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
        out["wrk"] = (p.stdout + p.stderr).split("[")[0].strip()
    try:
        out["shmctx_commit"] = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
            text=True).stdout.strip()
        # Figures of a tree with uncommitted changes to the library are not the commit's.
        out["src_changed_since_commit"] = subprocess.run(
            ["git", "-C", str(HERE), "status", "--porcelain", "--", "../src"],
            capture_output=True, text=True).stdout.split()[1::2]
    except OSError:
        pass
    return out


def _machine() -> dict:
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) * 1024
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                   platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": total,
            "kernel": platform.release()}


def summarise(runs: dict[str, list[dict]], nbytes: int) -> dict[str, dict]:
    """Medians per scenario, and each one's real cost against one copy + baseline."""
    out: dict[str, dict] = {}
    for sc, rs in runs.items():
        if not rs or "skipped" in rs[0]:
            out[sc] = {"skipped": rs[0]["skipped"] if rs else "not run"}
            continue
        med = {key: median(r["memory"][key] for r in rs)
               for key in ("real", "uss", "uss_rollup", "cow", "shm", "pss", "rss",
                           "statvfs")}
        med.update({key: median(r[key] for r in rs)
                    for key in ("first_response_s", "all_workers_s")})
        med["rps"] = median(r["load"]["rps"] for r in rs)
        med["errors"] = sum(r["load"]["errors"] for r in rs)
        med["p99_ms"] = median(r["load"]["p99_us"] for r in rs) / 1000
        med["runs"] = len(rs)
        if sc == "shmctx-publish":
            pubs = [r["publish"] for r in rs]
            med["publish"] = {
                "seconds": median(p["seconds"] for p in pubs),
                "init_seconds": median(p["init_seconds"] for p in pubs),
                "named_peak": median(p["named_peak"] for p in pubs),
                "statvfs_peak": median(p["statvfs_peak"] for p in pubs),
                "shm_after": median(p["shm_after"] for p in pubs),
                "real_at_switch": median(p["at_switch"]["real"] for p in pubs),
                "pss_at_switch": median(p["at_switch"]["pss"] for p in pubs),
                "failed_requests": sum(p["failed_requests"] for p in pubs),
                "v1_after_switch": sum(bool(p["v1_after_switch"]) for p in pubs),
                "v2_answers": median(p["v2_answers"] for p in pubs),
                "back_to_one_copy_s": _median_known(
                    p["named_back_to_one_copy_after_s"] for p in pubs),
                "pages_freed_s": _median_known(
                    p["statvfs_back_to_one_copy_after_s"] for p in pubs),
            }
        out[sc] = med
    base = out.get("baseline", {}).get("real")
    if base:
        goal = nbytes + base
        for med in out.values():
            if "real" in med:
                med["vs_one_copy_plus_baseline"] = med["real"] / goal
                med["extra_over_baseline_copies"] = (med["real"] - base) / nbytes
    return out


def _median_known(xs: Any) -> float | None:
    known = [x for x in xs if x is not None]
    return median(known) if known else None


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / MiB:,.0f}"


def table(summary: dict[str, dict], nbytes: int) -> str:
    lines = [
        "| scenario | real MiB | USS Σ | COW shared | shm | PSS Σ | statvfs Δ | "
        "x (copy+baseline) | first answer s | all workers s | req/s | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for sc, m in summary.items():
        if "skipped" in m:
            lines.append(f"| {sc} | {m['skipped']} |" + " |" * 12)
            continue
        ratio = m.get("vs_one_copy_plus_baseline")
        lines.append(
            f"| {sc} | {_mib(m['real'])} | {_mib(m['uss'])} | {_mib(m['cow'])} | "
            f"{_mib(m['shm'])} | {_mib(m['pss'])} | {_mib(m['statvfs'])} | "
            f"{'-' if ratio is None else f'{ratio:.3f}'} | {m['first_response_s']:.2f} | "
            f"{m['all_workers_s']:.2f} | {m['rps']:,.0f} | {m['p99_ms']:.1f} | "
            f"{m['errors']} |")
    p = summary.get("shmctx-publish", {}).get("publish")
    if p:
        back, freed = p["back_to_one_copy_s"], p["pages_freed_s"]
        lines += [
            "",
            "| publish (shmctx-publish) | median |",
            "|---|---:|",
            f"| publish() took, s (of which init filling {nbytes / MiB:.0f} MiB) | "
            f"{p['seconds']:.3f} ({p['init_seconds']:.3f}) |",
            f"| namespace's shm at the peak of the switch, MiB | {_mib(p['named_peak'])} |",
            f"| /dev/shm growth at the peak (statvfs), MiB | {_mib(p['statvfs_peak'])} |",
            f"| shm after every worker refreshed, MiB | {_mib(p['shm_after'])} |",
            f"| right after the switch: real / PSS Σ, MiB | {_mib(p['real_at_switch'])} / "
            f"{_mib(p['pss_at_switch'])} |",
            "| after publish() returned: the namespace back to one copy / the old "
            f"version's pages freed (statvfs), s | {'-' if back is None else f'{back:.3f}'}"
            f" / {'-' if freed is None else f'{freed:.3f}'} |",
            f"| failed requests (all runs) | {p['failed_requests']} |",
            f"| runs with a version-1 answer to a request started after the switch | "
            f"{p['v1_after_switch']} |",
            f"| version-2 answers | {p['v2_answers']:,.0f} |",
        ]
    return "\n".join(lines)


def plot(summary: dict[str, dict], runs: dict[str, list[dict]], nbytes: int, path: str,
         title: str) -> None:
    """Left: memory per scenario, stacked (private, copy-on-write, shared memory), with
    the sum of PSS. Right: shared memory during one publish under load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [sc for sc, m in summary.items() if "real" in m]
    uss = [summary[sc]["uss"] / MiB for sc in names]
    cow = [max(summary[sc]["cow"], 0) / MiB for sc in names]
    shm = [summary[sc]["shm"] / MiB for sc in names]
    pss = [summary[sc]["pss"] / MiB for sc in names]
    real = [summary[sc]["real"] / MiB for sc in names]
    pubs = [r["publish"] for r in runs.get("shmctx-publish", []) if "publish" in r]
    fig, axes = plt.subplots(1, 2 if pubs else 1, figsize=(13 if pubs else 9, 5.6),
                             gridspec_kw={"width_ratios": [2.2, 1]} if pubs else None,
                             squeeze=False)
    ax = axes[0][0]
    x = list(range(len(names)))
    ax.bar(x, uss, color="#4c72b0", label="private pages (USS Σ, shared memory left out)")
    ax.bar(x, cow, bottom=uss, color="#dd8452",
           label="pages shared copy-on-write (counted once)")
    ax.bar(x, shm, bottom=[a + b for a, b in zip(uss, cow, strict=True)], color="#55a868",
           label="shared memory in /dev/shm (counted once)")
    ax.scatter(x, pss, marker="_", s=700, color="black", zorder=3, label="sum of PSS")
    base = summary.get("baseline", {}).get("real")
    if base:
        ax.axhline((nbytes + base) / MiB, color="gray", ls="--", lw=1,
                   label="one copy + baseline (the interpreters)")
        ax.axhline(TARGET * (nbytes + base) / MiB, color="red", ls=":", lw=1,
                   label=f"target: {TARGET:.2f} x (one copy + baseline)")
    # Own copies dwarf the rest: the axis stops above the others, the bar says its size.
    others = sorted(real)[-2] if len(real) > 1 else real[0]
    top = max(others * 1.35, TARGET * (nbytes + (base or 0)) / MiB * 1.2)
    ax.set_ylim(0, top)
    for i, v in enumerate(real):
        if v > top:
            ax.text(i, top * 0.97, f"{v:,.0f}\n(off the axis)", ha="center", va="top",
                    fontsize=8, color="white", fontweight="bold")
        else:
            ax.text(i, max(v, pss[i]) + top * 0.01, f"{v:,.0f}", ha="center",
                    va="bottom", fontsize=8)
    ax.set_xticks(x, names, rotation=15)
    ax.set_ylabel("MiB")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    if pubs:
        p = pubs[0]
        ax2 = axes[0][1]
        t = [s[0] for s in p["timeline"]]
        ax2.plot(t, [s[2] / MiB for s in p["timeline"]], color="#55a868",
                 label="the namespace's files")
        ax2.plot(t, [s[1] / MiB for s in p["timeline"]], color="gray", lw=0.8, ls="--",
                 label="/dev/shm growth (statvfs)")
        ax2.axvspan(0, p["seconds"], color="#dd8452", alpha=0.2,
                    label=f"publish(): {p['seconds']:.2f} s")
        ax2.set_xlabel("seconds since the publish started (load throughout)")
        ax2.set_ylabel("MiB")
        ax2.set_ylim(0, max(s[2] for s in p["timeline"]) / MiB * 1.25)
        ax2.set_title(f"shmctx-publish: shared memory, sampled every 10 ms\n"
                      f"{p['failed_requests']} failed requests, {p['v2_answers']:,} answers "
                      "of version 2", fontsize=10)
        ax2.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _title(settings: dict) -> str:
    return (f"{settings['mib']} MiB float32 array, {settings['workers']} gunicorn sync "
            f"workers: real memory (median of {settings['repeat']})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=512, help="array size (float32), MiB")
    ap.add_argument("--workers", type=int, default=8, help="gunicorn sync workers")
    ap.add_argument("--seconds", type=int, help="load per run (default 5, --quick 2)")
    ap.add_argument("--repeat", type=int, help="runs per scenario (default 3, --quick 1)")
    ap.add_argument("--connections", type=int, default=16, help="load generator's")
    ap.add_argument("--only", help=f"comma-separated scenarios of: {', '.join(SCENARIOS)}")
    ap.add_argument("--quick", action="store_true", help="one short run per scenario")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--plot", help="write the memory plot (PNG) here")
    ap.add_argument("--replot", metavar="JSON",
                    help="measure nothing: print the table and draw --plot from an --out file")
    args = ap.parse_args(argv)
    if args.replot:
        done = json.loads(Path(args.replot).read_text())
        print(table(done["summary"], done["settings"]["bytes"]))
        if args.plot:
            plot(done["summary"], done["runs"], done["settings"]["bytes"], args.plot,
                 _title(done["settings"]))
        return 0
    args.seconds = args.seconds or (2 if args.quick else 5)
    args.repeat = args.repeat or (1 if args.quick else 3)
    for name in ("mib", "workers", "seconds", "repeat", "connections"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    scenarios = list(SCENARIOS)
    if args.only:
        scenarios = [s for s in args.only.split(",") if s]
        if not set(scenarios) <= set(SCENARIOS):
            ap.error(f"--only takes some of {', '.join(SCENARIOS)}")
        if "baseline" not in scenarios:
            scenarios.insert(0, "baseline")  # every figure is judged against it

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    result: dict = {
        "command": " ".join(["python", "tools/membench.py", *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": _machine(), "versions": _versions(),
        "settings": {"mib": args.mib, "bytes": args.mib * MiB, "workers": args.workers,
                     "seconds": args.seconds, "repeat": args.repeat,
                     "connections": args.connections},
        "shm_before": shm_used(),
    }
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    b = Bench(args)  # from here on, everything is undone in the finally below
    runs: dict[str, list[dict]] = {sc: [] for sc in scenarios}
    began = time.monotonic()
    has_ray = importlib.util.find_spec("ray") is not None
    failed = None
    try:
        b.write_array()
        for rep in range(args.repeat):
            for sc in scenarios:
                if sc == "ray" and not has_ray:
                    if rep == 0:
                        runs[sc].append({"skipped": "not installed"})
                    continue
                t = time.monotonic()
                print(f"[{time.monotonic() - began:6.1f}s] {sc} run {rep + 1}/{args.repeat}",
                      file=sys.stderr, flush=True)
                runs[sc].append(Run(b, sc, rep).go())
                print(f"          done in {time.monotonic() - t:.1f}s", file=sys.stderr,
                      flush=True)
    except KeyboardInterrupt:
        failed = "interrupted"
    except Exception as e:
        failed = f"{type(e).__name__}: {e}"
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # let the cleanup finish
        result["forced_cleanup"] = b.cleanup()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    left = [e for e in os.listdir(SHM) if f"membench-{b.run_id}" in e]
    result["left_in_dev_shm"] = left
    if failed:
        print(f"membench failed: {failed}\neverything it started was stopped and removed"
              f"{'' if not left else f'; still in /dev/shm: {left}'}", file=sys.stderr)
        return 1
    result["seconds"] = time.monotonic() - began
    result["summary"] = summarise(runs, b.nbytes)
    result["runs"] = runs
    generator = next((r[0]["load"]["generator"] for r in runs.values()
                      if r and "load" in r[0]), "-")
    print(f"\n{args.mib} MiB float32 array, {args.workers} gunicorn sync workers, "
          f"{args.seconds:g} s of load, medians of {args.repeat} run(s); load generator: "
          f"{generator}\n")
    print(table(result["summary"], b.nbytes))
    problems = [(r["scenario"], p) for rs in runs.values() for r in rs
                for p in r.get("problems", [])]
    for sc, p in problems:
        print(f"problem in {sc}: {p}")
    if result["forced_cleanup"] or left:
        print(f"removed by force: {result['forced_cleanup']}; left: {left}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(result["summary"], runs, b.nbytes, args.plot, _title(result["settings"]))
    # Something shmctx (or the tool) should have removed and did not: worth a failure.
    return 1 if problems or left else 0


if __name__ == "__main__":
    sys.exit(main())
