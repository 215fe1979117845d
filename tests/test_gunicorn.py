"""shmctx.gunicorn against a real gunicorn: 3 workers on 127.0.0.1, app in tests/apps/."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

import pytest
from gunicorn.config import KNOWN_SETTINGS
from helpers import wait_for
from servers import (
    PPID,
    HttpServer,
    children,
    free_port,
    kill_session,
    processes,
    session,
    spawn_in_session,
)

import shmctx.gunicorn
from shmctx import ContextError, ContextManager, InvalidConfigError, _shm
from shmctx._proc import is_alive
from shmctx._worker import WorkerManager, attach

GUNICORN_SETTINGS = {setting.name for setting in KNOWN_SETTINGS}

APPS = Path(__file__).parent / "apps"
T = TypeVar("T")


def _load_app():
    spec = importlib.util.spec_from_file_location("shmctx_test_gunicorn_app",
                                                  APPS / "gunicorn_app.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


APP = _load_app()
DATASET_CRC = zlib.crc32(APP.dataset_bytes())


def _table_id(ns: str) -> int:
    with ContextManager(namespace=ns, sweeper=False) as tm:
        return tm._snapshot().table_id


def _info(m: ContextManager, name: str):
    return {i.name: i for i in m.contexts()}[name]


class _Server(HttpServer):
    """A gunicorn master (``pid``; after a SIGUSR2 re-exec, not always ``proc``'s) with
    3 workers unless told otherwise."""

    NAME = "gunicorn"
    BATCH = 24

    def workers(self, n: int = 3) -> set[int]:
        return wait_for(lambda: len(c := children(self.pid)) == n and c,
                         20, f"{n} gunicorn workers")

    def serve_all(self) -> None:
        """Wait until every worker has answered: a worker still booting ignores the
        master's stop signal (gunicorn's own handlers are not installed yet), which would
        turn a shutdown into a wait for graceful_timeout."""
        workers = self.workers()
        self.gather("/ping", lambda rs: workers <= _pids(rs), at_least=1)

    def replaced(self, old: set[int], n: int = 3) -> set[int]:
        """After a reload: ``n`` workers, none of them one of ``old``, and nothing else
        left in the server's session (an old worker orphaned by a dead master would be)."""
        new = wait_for(lambda: len(c := children(self.pid)) == n and not c & old and c,
                       20, "gunicorn to replace its workers")
        wait_for(lambda: session(self.proc.pid) == {self.pid} | new, 20,
                 f"the server's session to hold only master {self.pid} and workers {new}")
        return new

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


def _spawn(ns: str | None, tmp_path: Path, *args: str, preload: bool = False,
           cwd: Path = APPS, env: dict[str, str] | None = None) -> _Server:
    """Start ``gunicorn ARGS`` in ``cwd`` (the test app and config unless ARGS say
    otherwise) on a free port, with SHMCTX_NAMESPACE=ns and ``env``, in a session of its
    own. The caller must end that session (see ``kill_session``)."""
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if k != shmctx.gunicorn.ENV_NAMESPACE}
    environ["SHMCTX_TEST_PRELOAD"] = "1" if preload else "0"
    if ns is not None:
        environ[shmctx.gunicorn.ENV_NAMESPACE] = ns
    environ.update(env or {})
    if not args or args[0] != "-c":
        args = ("-c", str(APPS / "gunicorn_conf.py"), *args, "gunicorn_app:app")
    log_path = tmp_path / "gunicorn.log"
    argv = [sys.executable, "-m", "gunicorn", *args, "-b", f"127.0.0.1:{port}"]
    proc = spawn_in_session(argv, log_path, cwd=cwd, env=environ)
    return _Server(proc, port, log_path)


@contextmanager
def _gunicorn(ns: str | None, tmp_path: Path, *args: str, preload: bool = False,
              cwd: Path = APPS, started: list | None = None,
              env: dict[str, str] | None = None) -> Iterator[_Server]:
    """Run ``gunicorn ARGS`` (see ``_spawn``) until it serves; SIGKILL whatever is left of
    it at the end. The server is appended to ``started`` as soon as it runs."""
    server = _spawn(ns, tmp_path, *args, preload=preload, cwd=cwd, env=env)
    if started is not None:
        started.append(server)
    try:
        wait_for(server.ready, 30, "gunicorn to serve")
        yield server
    finally:
        kill_session(server.proc)


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
        # Logged right after the reclaim it reports: wait for the line too.
        wait_for(lambda: f"reclaimed 1 reference(s) of dead worker {victim}" in srv.log(),
                 20, "the master's reclaim line")

        new = wait_for(lambda: (c := srv.workers()) != workers and c - workers, 20,
                        "gunicorn to respawn the worker")
        assert len(new) == 1 and victim not in srv.workers()
        (respawned,) = new
        wait_for(lambda: srv.get("/count")["pid"] == respawned, 30,
                  "the respawned worker to serve a request")
        srv.stop(ns)


def test_sweeper_lines_reach_gunicorns_error_log(ns, tmp_path):
    knob = tmp_path / "configure.json"
    knob.write_text(json.dumps({"config": {"cleanup_interval": 0.1, "max_idle_time": 0.2}}))
    with _gunicorn(ns, tmp_path, "-k", "sync",
                   env={"SHMCTX_TEST_CONFIGURE": str(knob)}) as srv:
        srv.get("/count")  # makes context "counter", then leaves it idle
        # Logged by the master's sweeper thread through logging ("shmctx.sweeper"):
        # seen only if the hooks route it into gunicorn's error log.
        wait_for(lambda: re.search(r"\[INFO\] namespace '[^']+' sweep: closed \['counter'\]",
                                   srv.log()), 20, "the idle sweep's line in gunicorn's log")
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


def _holders(ns: str, name: str) -> dict[int, int]:
    with ContextManager(namespace=ns, sweeper=False) as tm:
        return _info(tm, name).holders


def test_ttin_ttou_hup_term_one_server_keeps_one_namespace(ns, tmp_path):
    knob = tmp_path / "configure.json"  # read by gunicorn_conf.py on every (re)load
    with _gunicorn(ns, tmp_path, "-k", "sync",
                   env={"SHMCTX_TEST_CONFIGURE": str(knob)}) as srv:
        table_id = _table_id(ns)
        dataset = srv.get("/dataset")
        counted = srv.get("/count")["value"]
        three = srv.workers()

        # SIGTTIN adds a worker, which attaches like the others.
        os.kill(srv.pid, signal.SIGTTIN)
        four = srv.workers(4)
        srv.gather("/lease", lambda rs: four <= _pids(rs), at_least=1)
        assert _holders(ns, "leased") == dict.fromkeys(four, 1)
        # SIGTTOU stops the oldest worker: the references it held are returned with it.
        os.kill(srv.pid, signal.SIGTTOU)
        three = srv.workers(3)
        (removed,) = four - three
        assert removed not in session(srv.pid)
        wait_for(lambda: _holders(ns, "leased") == dict.fromkeys(three, 1), 20,
                 f"the references of removed worker {removed} to be released")

        # SIGHUP: gunicorn executes gunicorn.conf.py again (configure() with the same
        # arguments) and replaces every worker. The master, its namespace and the
        # contexts in it carry on.
        srv.serve_all()  # a booting worker would ignore the reload's SIGTERM for a while
        os.kill(srv.pid, signal.SIGHUP)
        reloaded = srv.replaced(three)
        assert srv.proc.poll() is None, srv.log()
        assert f"shmctx: reload keeps namespace {ns!r}" in srv.log()
        assert "now asks for" not in srv.log()
        assert _table_id(ns) == table_id
        # The retired workers' references went with them; the new workers took none yet.
        wait_for(lambda: _holders(ns, "leased") == {}, 20, "the old workers' references")
        srv.serve_all()
        assert srv.get("/dataset")["incarnation"] == dataset["incarnation"]  # not rebuilt
        assert srv.get("/count")["value"] > counted  # the same counter
        _assert_all_served(srv, reloaded)

        # A reload cannot move the server to another namespace or config: the master
        # keeps both, says so in its log, and goes on serving.
        other = f"{ns}x"
        knob.write_text(json.dumps({"namespace": other, "config": {"cleanup_interval": 10}}))
        os.kill(srv.pid, signal.SIGHUP)
        srv.replaced(reloaded)
        assert srv.proc.poll() is None, srv.log()
        assert (f"[ERROR] shmctx: gunicorn.conf.py now asks for namespace: {other!r} != "
                f"{ns!r}; config.cleanup_interval: 10.0 != 3600.0; a reload cannot change "
                f"the namespace") in srv.log()
        assert _shm.namespace_objects(other) == []
        assert _table_id(ns) == table_id
        with ContextManager(namespace=ns, sweeper=False) as tm:
            assert tm.config.cleanup_interval == 3600
        srv.serve_all()
        assert srv.get("/dataset")["incarnation"] == dataset["incarnation"]

        srv.stop(ns)  # SIGTERM: a clean exit, nothing left in /dev/shm
        assert session(srv.pid) == set()


def _assert_all_served(srv: _Server, workers: set[int]) -> None:
    srv.gather("/count", lambda rs: workers <= _pids(rs), at_least=1)


def test_configure_twice_with_other_arguments_stops_the_start(new_ns, tmp_path):
    first, second = new_ns(), new_ns()
    conf = tmp_path / "twice.conf.py"
    conf.write_text("import shmctx.gunicorn\n"
                    "from shmctx.gunicorn import *  # noqa: F403\n"
                    f"shmctx.gunicorn.configure({first!r})\n"
                    f"shmctx.gunicorn.configure({first!r})  # the same: a no-op\n"
                    f"shmctx.gunicorn.configure({second!r})\n"
                    "control_socket_disable = True\n")
    srv = _spawn(None, tmp_path, "-c", str(conf), "gunicorn_app:app")
    try:
        assert srv.proc.wait(timeout=30) == 1, srv.log()
        assert ("InvalidConfigError: shmctx.gunicorn.configure() was already called in this "
                f"process with other arguments (namespace: {second!r} != {first!r})"
                in srv.log())
    finally:
        kill_session(srv.proc)
    # new_ns checks that neither namespace was created


def _remove_namespaces_of(servers: list[_Server]) -> None:
    """After a failure: do not leave a pid-derived namespace to the next run."""
    for srv in servers:
        _shm.remove_namespace_objects(f"gunicorn-{srv.pid}")


def _reexec(master: _Server) -> _Server:
    """SIGUSR2 ``master``: a new master beside it, once that one runs 3 workers."""
    old_workers = master.workers()
    master.serve_all()
    os.kill(master.pid, signal.SIGUSR2)
    pid = wait_for(lambda: len(c := children(master.pid) - old_workers) == 1 and next(iter(c)),
                   20, "the re-executed master")
    wait_for(lambda: len(children(pid)) == 3, 20, "the new master's workers")
    new = _Server(master.proc, master.port, master.log_path)
    new.pid = pid
    return new


def _retire(old: _Server, new: _Server, ns: str, promoted: bool = True) -> None:
    """SIGTERM the old master: it leaves the namespace to the new one. With ``promoted``,
    wait until gunicorn promotes the new one (only then may it re-execute in turn).
    ``_reexec`` made sure the old master's workers have booted, so that they heed the
    SIGTERM at once."""
    os.kill(old.pid, signal.SIGTERM)
    if old.pid == old.proc.pid:
        assert old.proc.wait(timeout=30) == 0, old.log()  # ours to reap
    else:
        wait_for(lambda: not is_alive(old.pid, 0), 30, f"master {old.pid} to exit")
    log = old.log()
    assert f"[{old.pid}] [INFO] shmctx: master pid {new.pid} still runs; leaving namespace " \
           f"{ns!r} to it" in log, log
    if promoted:
        wait_for(lambda: f"[{new.pid}] [INFO] Master has been promoted." in old.log(), 20,
                 f"master {new.pid} to be promoted")


def test_usr2_reexec_keeps_the_namespace_until_the_last_master_exits(tmp_path):
    # No SHMCTX_NAMESPACE: every re-executed master must use the first master's default
    # name, however many upgrades follow one another.
    knob = tmp_path / "configure.json"  # read by gunicorn_conf.py
    started: list[_Server] = []
    masters: list[int] = []  # the re-executed ones
    elsewhere = ""
    try:
        with _gunicorn(None, tmp_path, "-k", "sync", started=started,
                       env={"SHMCTX_TEST_CONFIGURE": str(knob)}) as first:
            ns = f"gunicorn-{first.pid}"
            table_id = _table_id(ns)
            counted = first.get("/count")["value"]

            # A new master told to use another namespace refuses to start: both masters
            # serve at once, so they must share one. The old one goes on serving.
            elsewhere = f"{ns}x"
            knob.write_text(json.dumps({"namespace": elsewhere}))
            workers = first.workers()
            first.serve_all()
            os.kill(first.pid, signal.SIGUSR2)
            wait_for(lambda: f"must keep its namespace {ns!r}, but gunicorn.conf.py or "
                             f"SHMCTX_NAMESPACE asks for {elsewhere!r}" in first.log(),
                     20, "the re-executed master to refuse another namespace")
            wait_for(lambda: processes(PPID, first.pid, zombies=True) == workers, 20,
                     "the old master to reap the new one")
            assert _shm.namespace_objects(elsewhere) == []
            knob.unlink()
            assert first.get("/count")["value"] > counted

            second = _reexec(first)
            masters.append(second.pid)
            _retire(first, second, ns)
            assert f"[{second.pid}] [INFO] shmctx: master pid {second.pid} owns namespace " \
                   f"{ns!r}" in first.log()

            # The promoted master upgrades again: still the same namespace and table.
            third = _reexec(second)
            masters.append(third.pid)
            _retire(second, third, ns, promoted=False)
            assert f"[{third.pid}] [INFO] shmctx: master pid {third.pid} owns namespace " \
                   f"{ns!r}" in first.log()
            assert _table_id(ns) == table_id
            assert third.get("/count")["value"] > counted + 1  # the same counter

            third.serve_all()
            os.kill(third.pid, signal.SIGTERM)
            wait_for(lambda: not is_alive(third.pid, 0), 30, "the last master to exit")
            assert _shm.namespace_objects(ns) == [], first.log()
            assert f"[{third.pid}] [INFO] shmctx: namespace {ns!r} unlinked" in first.log()
            for pid in masters:
                assert _shm.namespace_objects(f"gunicorn-{pid}") == []
            assert session(first.pid) == set()
    finally:
        # After a failure: leave no namespace behind.
        _remove_namespaces_of(started)
        for name in [f"gunicorn-{pid}" for pid in masters] + [elsewhere] * bool(elsewhere):
            _shm.remove_namespace_objects(name)


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
            with ContextManager(namespace=ns, create=False, sweeper=False) as tm:
                # No configure(): the server's defaults. No reference limit to turn
                # concurrent requests into errors, and no idle closing of the table the
                # app loads once for the life of the server.
                assert (tm.config.max_references, tm.config.max_idle_time) == (0, 0)
            srv.stop(ns, signal.SIGINT)  # Ctrl-C, as the README says
    finally:
        _remove_namespaces_of(started)


def test_documented_publish_example_switches_every_worker_without_a_failed_request(
        ns, tmp_path):
    """docs/examples/gunicorn-publish as its README runs it, under load: requests keep
    coming from several threads while publish.py (another process) publishes version 2.
    No request fails; none that starts after publish.py returned sees version 1; every
    worker moves to version 2; the old version's memory goes with the last worker's
    refresh; a clean stop leaves nothing."""
    example = Path(__file__).parent.parent / "docs" / "examples" / "gunicorn-publish"
    readme = (example / "README.md").read_text()
    assert "gunicorn -c gunicorn.conf.py app:app" in readme and "publish.py 2.0 2000" in readme
    quiet = ["--no-control-socket"] if "control_socket_disable" in GUNICORN_SETTINGS else []
    started: list[_Server] = []
    try:
        with _gunicorn(ns, tmp_path, "-c", "gunicorn.conf.py", *quiet, "app:app",
                       cwd=example, started=started) as srv:
            workers = srv.workers()
            first = srv.gather("/", lambda rs: workers <= _pids(rs))
            assert {(r["version"], r["first"], tuple(r["shape"])) for r in first} == \
                {(1, 1.0, (1000, 16))}
            stop = threading.Event()
            seen: list[tuple[float, dict]] = []
            errors: list[BaseException] = []

            def load() -> None:
                while not stop.is_set():
                    began = time.monotonic()
                    try:
                        seen.append((began, srv.get("/")))
                    except BaseException as e:  # a failed request fails the test
                        errors.append(e)
                        return

            threads = [threading.Thread(target=load) for _ in range(4)]
            for th in threads:
                th.start()
            try:
                env = dict(os.environ, SHMCTX_NAMESPACE=ns)
                r = subprocess.run([sys.executable, "publish.py", "2.0", "2000"], cwd=example,
                                   env=env, capture_output=True, text=True, timeout=60)
                published = time.monotonic()
                assert r.returncode == 0, r.stderr
                assert "published version 2" in r.stdout
                after = srv.gather("/", lambda rs: workers <= _pids(rs))
            finally:
                stop.set()
                for th in threads:
                    th.join(30)
            assert errors == []
            assert seen, "the load made no request"
            late = [a for began, a in seen if began > published]
            assert late, "the load made no request after the publish: nothing was checked"
            assert all(a["version"] == 2 for a in late)
            assert {(a["version"], a["first"], tuple(a["shape"])) for a in after} == \
                {(2, 2.0, (2000, 16))}
            # Every worker moved on: version 1's memory went with the last refresh.
            with ContextManager(namespace=ns, sweeper=False) as look:
                snap = {(c.name, c.version, c.superseded) for c in look.contexts()}
            assert snap == {("embeddings", 2, False)}
            srv.stop(ns, signal.SIGINT)
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
