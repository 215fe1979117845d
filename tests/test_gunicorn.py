"""shmctx.gunicorn against a real gunicorn: 3 workers on 127.0.0.1, app in tests/apps/."""

from __future__ import annotations

import ctypes
import http.client
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

import pytest
from gunicorn.config import KNOWN_SETTINGS
from helpers import wait_for

import shmctx.gunicorn
from shmctx import ContextError, ContextManager, InvalidConfigError, _shm
from shmctx._proc import is_alive
from shmctx._worker import WorkerManager, attach

GUNICORN_SETTINGS = {setting.name for setting in KNOWN_SETTINGS}

APPS = Path(__file__).parent / "apps"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
T = TypeVar("T")


def _load_app():
    spec = importlib.util.spec_from_file_location("shmctx_test_gunicorn_app",
                                                  APPS / "gunicorn_app.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


APP = _load_app()
DATASET_CRC = zlib.crc32(APP.dataset_bytes())




def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> set[int]:
    """Live (non-zombie) child processes of ``pid``."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in (b"Z", b"X"):
            out.add(int(entry))
    return out


def _info(m: ContextManager, name: str):
    return {i.name: i for i in m.contexts()}[name]


class _Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.port = port
        self.log_path = log

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200, f"GET {path}: {resp.status} {body!r}\n{self.log()}"
            return json.loads(body)
        finally:
            conn.close()

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
        try:
            self.get("/ping")
        except OSError:
            return False
        return True

    def workers(self, n: int = 3) -> set[int]:
        return wait_for(lambda: len(c := _children(self.pid)) == n and c,
                         20, f"{n} gunicorn workers")

    def gather(self, path: str, done: Callable[[list[dict]], bool],
               at_least: int = 30) -> list[dict]:
        """Issue concurrent requests, in rounds, until ``done(responses)`` holds."""
        results: list[dict] = []
        with ThreadPoolExecutor(8) as pool:
            def more() -> bool:
                results.extend(pool.map(lambda _: self.get(path), range(24)))
                return len(results) >= at_least and done(results)
            wait_for(more, 30, f"responses of {path} to satisfy the test")
        return results

    def serve_all(self) -> None:
        """Wait until every worker has answered: a worker still booting ignores the
        master's stop signal (gunicorn's own handlers are not installed yet), which would
        turn a shutdown into a wait for graceful_timeout."""
        workers = self.workers()
        self.gather("/ping", lambda rs: workers <= _pids(rs), at_least=1)

    def stop(self, ns: str, sig: int = signal.SIGTERM) -> None:
        """Stop the master with ``sig``: it must exit cleanly leaving nothing in /dev/shm."""
        self.serve_all()
        os.kill(self.pid, sig)
        self.proc.wait(timeout=30)
        self.check_clean_exit(ns)

    def check_clean_exit(self, ns: str) -> None:
        rc = self.proc.returncode
        assert rc == 0, self.log()
        assert _shm.namespace_objects(ns) == [], self.log()
        assert f"namespace {ns!r} unlinked" in self.log()


def _stop_with_parent() -> None:
    """In the server process, before exec: SIGTERM it (a clean shutdown that unlinks its
    namespace) if the test process dies without reaching its ``finally``."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@contextmanager
def _gunicorn(ns: str | None, tmp_path: Path, *args: str, preload: bool = False,
              cwd: Path = APPS, started: list | None = None) -> Iterator[_Server]:
    """Run ``gunicorn ARGS`` in ``cwd`` (the test app and config unless ARGS say otherwise)
    on a free port, with SHMCTX_NAMESPACE=ns; SIGKILL whatever is left of it at the end.
    The server is appended to ``started`` as soon as it runs."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != shmctx.gunicorn.ENV_NAMESPACE}
    env["SHMCTX_TEST_PRELOAD"] = "1" if preload else "0"
    if ns is not None:
        env[shmctx.gunicorn.ENV_NAMESPACE] = ns
    if not args or args[0] != "-c":
        args = ("-c", str(APPS / "gunicorn_conf.py"), *args, "gunicorn_app:app")
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", *args, "-b", f"127.0.0.1:{port}"],
            cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_stop_with_parent,
        )
    server = _Server(proc, port, log_path)
    if started is not None:
        started.append(server)
    try:
        wait_for(server.ready, 30, "gunicorn to serve")
        yield server
    finally:
        # The whole session: workers, and a master re-executed by SIGUSR2, may outlive
        # the master we started.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _pids(results: list[dict]) -> set[int]:
    return {r["pid"] for r in results}


def _assert_one_counter(results: list[dict]) -> None:
    # Each increment happened exactly once, whichever worker (and thread) served it.
    assert sorted(r["value"] for r in results) == list(range(1, len(results) + 1))


def test_sync_workers_share_one_counter_and_one_dataset(ns, tmp_path):
    with _gunicorn(ns, tmp_path, "-k", "sync") as srv:
        counts = srv.gather("/count", lambda rs: len(_pids(rs)) >= 2, at_least=60)
        _assert_one_counter(counts)

        data = srv.gather("/dataset", lambda rs: len(_pids(rs)) >= 2)
        assert {r["crc"] for r in data} == {DATASET_CRC}
        assert len({r["incarnation"] for r in data}) == 1  # built once, by one worker
        srv.stop(ns)


def test_gthread_workers_share_one_manager_per_process(ns, tmp_path):
    def threads_per_pid(rs: list[dict]) -> dict[int, set[int]]:
        out: dict[int, set[int]] = {}
        for r in rs:
            out.setdefault(r["pid"], set()).add(r["thread"])
        return out

    with _gunicorn(ns, tmp_path, "-k", "gthread", "--threads", "4") as srv:
        counts = srv.gather(
            "/count",
            lambda rs: len(_pids(rs)) >= 2 and any(
                len(t) >= 2 for t in threads_per_pid(rs).values()),
            at_least=60,
        )
        _assert_one_counter(counts)
        managers: dict[int, set[int]] = {}
        for r in counts:
            managers.setdefault(r["pid"], set()).add(r["manager"])
        assert all(len(ids) == 1 for ids in managers.values()), managers
        srv.stop(ns)


def test_killed_worker_is_reclaimed_by_child_exit_and_replaced(ns, tmp_path):
    with _gunicorn(ns, tmp_path, "-k", "sync") as srv:
        workers = srv.workers()
        pidfile = tmp_path / "holder.pid"
        with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as s:
            s.sendall(f"GET /hold?path={quote(str(pidfile))} HTTP/1.1\r\n"
                      "Host: test\r\n\r\n".encode())
            victim = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), 20,
                                   "the /hold request to take its reference"))
            assert victim in workers
            with ContextManager(namespace=ns, sweeper=False) as tm:
                # The idle sweep runs once an hour: only child_exit can release it.
                assert tm.config.cleanup_interval == 3600
                assert _info(tm, "held").holders == {victim: 1}
                os.kill(victim, signal.SIGKILL)
                wait_for(lambda: not _info(tm, "held").holders, 20,
                          "the killed worker's reference to be reclaimed")
                assert _info(tm, "held").refcount == 0
        assert f"reclaimed 1 reference(s) of dead worker {victim}" in srv.log()

        new = wait_for(lambda: (c := srv.workers()) != workers and c - workers, 20,
                        "gunicorn to respawn the worker")
        assert len(new) == 1 and victim not in srv.workers()
        (respawned,) = new
        wait_for(lambda: srv.get("/count")["pid"] == respawned, 30,
                  "the respawned worker to serve a request")
        srv.stop(ns)


def test_preload_app_master_references_stay_the_masters(ns, tmp_path):
    with _gunicorn(ns, tmp_path, "-k", "sync", preload=True) as srv:
        results = srv.gather("/preload", lambda rs: len(_pids(rs)) >= 2)
        for r in results:
            assert r["own_manager"] is True, r
            assert r["master_buf"] == "ContextClosedError", r  # the handle is not the worker's
            assert r["master_return"] == "ContextError", r  # nor can the worker return it
            assert r["crc"] == DATASET_CRC, r
        assert len({r["incarnation"] for r in results}) == 1
        with ContextManager(namespace=ns, sweeper=False) as tm:
            # The master's one reference is intact; every worker returned its own.
            info = _info(tm, "dataset")
            assert info.holders == {srv.pid: 1} and info.refcount == 1
        srv.stop(ns)


def _remove_namespaces_of(servers: list[_Server]) -> None:
    """After a failure: do not leave a pid-derived namespace to the next run."""
    for srv in servers:
        _shm.remove_namespace_objects(f"gunicorn-{srv.pid}")


def test_usr2_reexec_keeps_the_namespace_until_the_last_master_exits(tmp_path):
    # No SHMCTX_NAMESPACE: the re-executed master must derive the same default name.
    started: list[_Server] = []
    try:
        with _gunicorn(None, tmp_path, "-k", "sync", started=started) as srv:
            ns = f"gunicorn-{srv.pid}"
            old_workers = srv.workers()
            before = srv.get("/count")["value"]
            srv.serve_all()
            os.kill(srv.pid, signal.SIGUSR2)  # re-exec: a new master beside the old one
            new_master = wait_for(
                lambda: len(c := _children(srv.pid) - old_workers) == 1 and next(iter(c)),
                20, "the re-executed master")
            wait_for(lambda: len(_children(new_master)) == 3, 20, "the new master's workers")
            os.kill(srv.pid, signal.SIGTERM)  # retire the old master
            srv.proc.wait(timeout=30)
            assert srv.proc.returncode == 0, srv.log()
            log = srv.log()
            assert f"[{new_master}] [INFO] shmctx: master pid {new_master} owns namespace " \
                   f"{ns!r}" in log
            assert f"shmctx: master pid {new_master} still runs" in log
            # The namespace survived the old master: the new one serves the same counter.
            assert srv.get("/count")["value"] > before
            new = _Server(srv.proc, srv.port, srv.log_path)
            new.pid = new_master
            new.serve_all()
            os.kill(new_master, signal.SIGTERM)
            wait_for(lambda: not is_alive(new_master, 0), 30, "the new master to exit")
            assert _shm.namespace_objects(ns) == [], srv.log()
            assert f"namespace {ns!r} unlinked" in srv.log()
    finally:
        _remove_namespaces_of(started)


def test_documented_example_runs_with_its_one_command(tmp_path):
    example = Path(__file__).parent.parent / "docs" / "examples" / "gunicorn"
    readme = (example / "README.md").read_text()
    assert "gunicorn -c gunicorn.conf.py app:app" in readme
    # The documented command (plus a free port), without SHMCTX_NAMESPACE: the namespace
    # is then derived from the master's pid.
    # gunicorn >= 24 opens a control socket under ~/.gunicorn, one path for all servers.
    quiet = ["--no-control-socket"] if "control_socket_disable" in GUNICORN_SETTINGS else []
    started: list[_Server] = []
    try:
        with _gunicorn(None, tmp_path, "-c", "gunicorn.conf.py", *quiet, "app:app",
                       cwd=example, started=started) as srv:
            ns = f"gunicorn-{srv.pid}"
            answers = [srv.get(f"/?i={i}") for i in range(1, 7)]
            first = answers[0]["hits"]  # the readiness probe may have counted too
            assert [a["hits"] for a in answers] == list(range(first, first + 6))
            assert [a["value"] for a in answers] == [1, 2, 3, 4, 5, 6]
            assert _shm.namespace_objects(ns)
            srv.stop(ns, signal.SIGINT)  # Ctrl-C, as the README says
    finally:
        _remove_namespaces_of(started)


# --- without a server ---------------------------------------------------------------


def test_manager_outside_a_wired_gunicorn_is_a_clear_error():
    with pytest.raises(ContextError, match=r"gunicorn\.conf\.py"):
        shmctx.gunicorn.manager()
    with pytest.raises(ContextError, match="not set up"):
        shmctx.gunicorn.namespace()


def test_configure_rejects_bad_values():
    with pytest.raises(InvalidConfigError, match="namespace"):
        shmctx.gunicorn.configure("no/slashes")
    with pytest.raises(InvalidConfigError, match="ContextConfig"):
        shmctx.gunicorn.configure(config={"cleanup_interval": 1})


def test_worker_refuses_to_create_a_missing_namespace(ns):
    with pytest.raises(ContextError, match="does not exist"):
        attach(ns)


def test_threads_of_a_worker_share_one_lazily_created_manager(ns):
    with ContextManager(namespace=ns, sweeper=False) as parent:
        w = WorkerManager("test")
        w.namespace = ns
        barrier = threading.Barrier(16)
        got: list[ContextManager] = []

        def use() -> None:
            barrier.wait()
            got.append(w.get())

        threads = [threading.Thread(target=use) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(got) == 16 and len({id(m) for m in got}) == 1
        entries = [p for p in parent._snapshot().procs if p.pid == os.getpid()]
        assert len(entries) == 2  # the parent's and the one worker manager's
        w.close()
        assert len([p for p in parent._snapshot().procs if p.pid == os.getpid()]) == 1
        parent.unlink()
