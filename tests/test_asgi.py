"""shmctx.asgi: the lifespan protocol and the async helpers in this process, and real
uvicorn servers (``--workers``) on 127.0.0.1 running tests/apps/asgi_app.py and the
documented example."""

from __future__ import annotations

import asyncio
import fcntl
import http.client
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import types
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for
from servers import HttpServer, children, cmdline, free_port, kill_session, spawn_in_session

import shmctx.asgi
from shmctx import (
    ContextConfig,
    ContextError,
    ContextManager,
    InvalidConfigError,
    MemoryContext,
    MemoryContextConfig,
    _shm,
)
from shmctx._proc import start_time

ROOT = Path(__file__).parent.parent
APPS_DIR = Path(__file__).parent / "apps"
EXAMPLE = ROOT / "docs" / "examples" / "asgi"
# What a client sees of a connection whose worker was killed under it.
CONNECTION_LOST = (ConnectionError, http.client.RemoteDisconnected,
                   http.client.IncompleteRead, http.client.BadStatusLine)


# --- real uvicorn servers -------------------------------------------------------------


def holders(ns: str, name: str) -> dict[int, int]:
    with ContextManager(namespace=ns, create=False, sweeper=False) as tm:
        return {i.name: i for i in tm.contexts()}[name].holders


def sweeper_pid(ns: str) -> int:
    with ContextManager(namespace=ns, create=False, sweeper=False) as tm:
        return tm._snapshot().sweeper[0]  # the leader recorded in the table header


class Server(HttpServer):
    """A server started by ``serve()``: its process, port and log."""

    def workers(self, n: int) -> set[int]:
        """The ``n`` worker processes, once there are that many (uvicorn's supervisor also
        has multiprocessing's resource tracker as a child: not a worker)."""
        def found() -> set[int] | None:
            ws = {c for c in children(self.pid) if b"spawn_main" in cmdline(c)}
            return ws if len(ws) == n else None
        return wait_for(found, 20, f"{n} uvicorn workers")

    def stop(self, ns: str, sig: int = signal.SIGTERM) -> None:
        """Stop the supervisor with ``sig``: it must exit cleanly and the last worker to
        leave must have unlinked the namespace."""
        os.kill(self.pid, sig)
        self.proc.wait(timeout=30)
        assert self.proc.returncode == 0, self.log()
        assert _shm.namespace_objects(ns) == [], self.log()
        assert re.search(rf"namespace '{re.escape(ns)}': pid \d+ was the last process "
                         "attached; namespace unlinked", self.log()), self.log()


@contextmanager
def serve(argv: list[str], tmp_path: Path, *, cwd: Path = ROOT,
          env: dict[str, str] | None = None, wait: bool = True,
          bind: Callable[[int], list[str]] = lambda port: ["--port", str(port)],
          ) -> Iterator[Server]:
    """Run ``python ARGV --port P`` (P free; ``bind`` gives other servers' arguments)
    in a session of its own until it serves; SIGKILL the whole session at the end
    (uvicorn's workers do not watch their parent). SHMCTX_NAMESPACE is only what ``env``
    sets."""
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if k != shmctx.asgi.ENV_NAMESPACE}
    environ.update(env or {})
    log_path = tmp_path / f"server-{port}.log"
    proc = spawn_in_session([sys.executable, *argv, *bind(port)], log_path, cwd=cwd,
                            env=environ)
    server = Server(proc, port, log_path)
    try:
        if wait:
            wait_for(server.ready, 30, "the server to serve")
        yield server
    finally:
        kill_session(proc)


def uvicorn_argv(app: str, workers: int | None, *extra: str) -> list[str]:
    argv = ["-m", "uvicorn", app, *extra]
    if workers is not None:
        argv += ["--workers", str(workers)]
    return argv


def _pids(results: list[dict]) -> set[int]:
    return {r["pid"] for r in results}


def test_uvicorn_workers_share_sweep_for_each_other_and_the_last_one_unlinks(ns, tmp_path):
    env = {shmctx.asgi.ENV_NAMESPACE: ns, "SHMCTX_TEST_CLEANUP": "0.2"}
    with serve(uvicorn_argv("tests.apps.asgi_app:app", 4), tmp_path, env=env) as srv:
        workers = srv.workers(4)
        # Each worker's own lifespan took its lease once shmctx had attached it.
        wait_for(lambda: holders(ns, "lease") == dict.fromkeys(workers, 1), 20,
                 "every worker to hold its lease")
        with ContextManager(namespace=ns, create=False, sweeper=False) as tm:
            assert tm.config == ContextConfig(max_references=0, max_idle_time=0,
                                              lock_timeout=0.2, cleanup_interval=0.2)
        counts = srv.gather("/count", lambda rs: len(_pids(rs)) >= 2, at_least=48)
        # Each increment happened exactly once, whichever worker and coroutine served it.
        assert sorted(r["value"] for r in counts) == list(range(1, len(counts) + 1))
        data = srv.gather("/dataset", lambda rs: len(_pids(rs)) >= 2)
        assert {r["crc"] for r in data} == {zlib.crc32(bytes(range(256)) * 4096)}
        assert len({r["incarnation"] for r in data}) == 1  # built once, by one worker
        leader = wait_for(lambda: sweeper_pid(ns) in workers and sweeper_pid(ns), 10,
                          "a worker to lead the sweep")

        # Load on fresh connections while workers are killed: a request fails only if
        # the killed worker had its connection.
        stop = threading.Event()
        ok: list[dict] = []
        lost: list[BaseException] = []

        def load() -> None:
            while not stop.is_set():
                try:
                    ok.append(srv.get("/count"))
                except CONNECTION_LOST as e:
                    lost.append(e)

        threads = [threading.Thread(target=load) for _ in range(4)]
        for th in threads:
            th.start()
        try:
            victims = (next(iter(workers - {leader})), leader)
            for victim in victims:
                before = len(ok)
                wait_for(lambda b=before: len(ok) > b + 10, 20, "the load to be served")
                os.kill(victim, signal.SIGKILL)
                # Its lease is reclaimed by the sweep of a surviving worker (after the
                # leader itself is killed, of the worker that takes over the lead).
                wait_for(lambda v=victim: v not in holders(ns, "lease"), 20,
                         f"the lease of killed worker {victim} to be reclaimed")
                new_leader = sweeper_pid(ns)
                assert new_leader != victim and new_leader in children(srv.pid)
                # uvicorn's supervisor replaces the dead worker, which attaches.
                workers = wait_for(
                    lambda v=victim: v not in (ws := srv.workers(4)) and ws, 20,
                    "uvicorn to replace the killed worker")
                wait_for(lambda w=workers: holders(ns, "lease") == dict.fromkeys(w, 1), 20,
                         "every worker, the new one too, to hold its lease")
            before = len(ok)
            wait_for(lambda: len(ok) > before + 10, 20, "the load to be served again")
        finally:
            stop.set()
            for th in threads:
                th.join(30)
        # At most one lost request per load thread and kill: the killed worker's own.
        assert len(lost) <= 2 * len(threads), lost
        values = [r["value"] for r in ok]
        assert len(values) == len(set(values))  # no increment was lost or doubled
        assert f"sweeper pid {leader} is dead; pid {new_leader} takes the lead" in srv.log()
        for victim in victims:  # the sweeper's lines, in uvicorn's log
            # Its lease, and the counter's reference too if it was killed inside /count.
            assert re.search(rf"reclaimed [12] reference\(s\) of dead pid {victim}\b",
                             srv.log()), srv.log()
        srv.stop(ns, signal.SIGTERM)


def test_the_documented_example_runs_with_the_default_namespace(tmp_path):
    readme = (EXAMPLE / "README.md").read_text()
    (command,) = re.findall(r"^(uvicorn app:app .*)$", readme, re.M)
    argv = ["-m", *command.split(), "--workers", "2"]  # the last --workers counts
    ns = None
    try:
        with serve(argv, tmp_path, cwd=EXAMPLE) as srv:
            ns = f"asgi-{srv.pid}"  # the supervisor's pid: the workers' parent
            srv.workers(2)
            assert _shm.namespace_objects(ns)
            answers = srv.gather("/?i=7", lambda rs: len(_pids(rs)) >= 2)
            # One hit went to the probe that saw the server ready.
            assert sorted(a["hits"] for a in answers) == list(range(2, len(answers) + 2))
            assert {a["value"] for a in answers} == {7}
            srv.stop(ns, signal.SIGINT)
    finally:
        if ns is not None and _shm.namespace_objects(ns):
            _shm.remove_namespace_objects(ns)
            pytest.fail(f"namespace {ns!r} was left in /dev/shm")


def test_single_process_uvicorn_startup_failure_leaves_nothing(tmp_path):
    # No --workers: uvicorn serves in the process it started in, whose parent is this
    # test (a shell, usually): the default namespace is the server's own pid.
    env = {"SHMCTX_TEST_FAIL_STARTUP": "1"}
    ns = None
    try:
        with serve(uvicorn_argv("tests.apps.asgi_app:app", None), tmp_path, env=env,
                   wait=False) as srv:
            ns = f"asgi-{srv.pid}"
            assert srv.proc.wait(30) == 3, srv.log()  # uvicorn's STARTUP_FAILURE
            assert f"attached to namespace {ns!r}" in srv.log()
            assert "test app: no startup" in srv.log()
            assert _shm.namespace_objects(ns) == [], srv.log()
    finally:
        if ns is not None and _shm.namespace_objects(ns):
            _shm.remove_namespace_objects(ns)


LIMIT = ["--limit-max-requests", "3", "--limit-max-requests-jitter", "0"]
UNLINKED = "namespace unlinked"  # the last worker's log line, as Server.stop checks it


def _kept(ns: str) -> tuple[int, bytes]:
    """Incarnation and data of context ``kept`` of namespace ``ns``."""
    with ContextManager(namespace=ns, create=False, sweeper=False) as tm:
        ctx = tm.get_context("kept")
        try:
            return ctx.incarnation, bytes(ctx.buf)
        finally:
            tm.return_context(ctx)


def test_a_worker_recycled_by_limit_max_requests_leaves_the_namespace(ns, tmp_path):
    env = {shmctx.asgi.ENV_NAMESPACE: ns}
    argv = uvicorn_argv("tests.apps.asgi_app:app", 2, *LIMIT)
    with serve(argv, tmp_path, env=env) as srv:
        srv.workers(2)
        # One worker under the supervisor (uvicorn 0.55 serves `--workers 1` in a single
        # process, with no supervisor). The supervisor stops the other one with SIGTERM.
        # From now on, each time the worker reaches its limit, no worker is attached
        # until the supervisor's next poll starts its successor.
        os.kill(srv.pid, signal.SIGTTOU)
        srv.workers(1)
        # Data published from outside, which no worker would make again.
        with ContextManager(namespace=ns, create=False, sweeper=False) as tm:
            ctx = tm.publish("kept", MemoryContextConfig(size=8),
                             init=lambda c: c.buf.__setitem__(slice(None), b"survives"))
            kept = (ctx.incarnation, b"survives")
            tm.return_context(ctx)
        served: dict[int, int] = {}

        def three_recycles() -> bool:
            try:
                pid = srv.get("/ping")["pid"]
            except CONNECTION_LOST:
                return False  # accepted by a worker that stopped before reading it
            served[pid] = served.get(pid, 0) + 1
            assert _kept(ns) == kept, srv.log()
            return len(served) > 3  # the first worker and three successors served

        wait_for(three_recycles, 60, "uvicorn to recycle its worker three times")
        (current,) = srv.workers(1)
        assert served[current] < 3  # it goes on serving: no recycle races the stop
        wait_for(lambda: holders(ns, "lease") == {current: 1}, 20,
                 "the recycled workers to be gone")
        log = srv.log()
        assert log.count("Maximum request limit of 3 exceeded") == 3, log
        assert log.count("while its server goes on") == 3, log
        assert UNLINKED not in log, log
        assert _kept(ns) == kept
        srv.stop(ns, signal.SIGTERM)  # the namespace is unlinked now, and only now


def test_a_single_process_uvicorn_that_reaches_its_limit_unlinks(ns, tmp_path):
    # No --workers: no supervisor restarts the server, which ends with its worker.
    env = {shmctx.asgi.ENV_NAMESPACE: ns}
    with serve(uvicorn_argv("tests.apps.asgi_app:app", None, *LIMIT), tmp_path,
               env=env) as srv:
        def ended() -> bool:
            try:
                srv.get("/ping")
            except (OSError, *CONNECTION_LOST):
                pass  # the server stopped listening, or stopped before answering
            return srv.proc.poll() is not None

        wait_for(ended, 30, "uvicorn to stop at its limit")
        assert srv.proc.returncode == 0, srv.log()
        assert _shm.namespace_objects(ns) == [], srv.log()
        assert re.search(rf"namespace '{re.escape(ns)}': pid {srv.pid} was the last process "
                         f"attached; {UNLINKED}", srv.log()), srv.log()


def _start_watcher(ns: str, pid: int, start: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "shmctx._watcher", ns, str(pid), str(start)],
                            stderr=subprocess.PIPE, text=True)


def _flocked(ns: str) -> bool:
    """Whether a process holds the flock of namespace ``ns``'s table file (a watcher)."""
    fd = os.open(_shm.host_path(_shm.table_name(ns)), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@pytest.mark.parametrize("attached_at_exit", [False, True])
def test_the_watcher_left_by_a_recycled_worker_unlinks_once_the_supervisor_exits(
        ns, attached_at_exit):
    # The last worker left while its server went on: the namespace stays. The server is
    # then stopped before a successor attached: once its supervisor has exited, the
    # watcher that worker started unlinks the namespace, unless a live process (an
    # outside publisher) is attached then.
    supervisor = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                                  stdin=subprocess.PIPE)
    watcher = None
    try:
        start = start_time(supervisor.pid)
        assert start is not None
        ContextManager(namespace=ns).close()  # a recycled worker's plain leaving
        watcher = _start_watcher(ns, supervisor.pid, start)
        wait_for(lambda: _flocked(ns) or watcher.poll() is not None, 30,
                 "the watcher to wait for the supervisor")
        assert watcher.poll() is None, watcher.communicate()
        second = _start_watcher(ns, supervisor.pid, start)  # one watcher is enough
        assert second.wait(30) == 0, second.communicate()
        assert watcher.poll() is None and _shm.namespace_objects(ns)
        observer = ContextManager(namespace=ns, create=False) if attached_at_exit else None
        supervisor.communicate(timeout=30)  # it exits (the server has stopped)
        _, err = watcher.communicate(timeout=30)
        assert watcher.returncode == 0, err
        if observer is not None:  # not the watcher's to unlink: the observer does it
            assert _shm.namespace_objects(ns) and UNLINKED not in err, err
            observer.close(unlink_if_last=True)
        else:
            assert f"namespace '{ns}': pid {watcher.pid} was the last process" in err, err
        assert _shm.namespace_objects(ns) == []
    finally:
        supervisor.kill()
        supervisor.wait()
        if watcher is not None:
            watcher.kill()
            watcher.wait()


def test_a_watcher_of_a_supervisor_that_has_exited_already_unlinks_at_once(ns):
    supervisor = subprocess.Popen([sys.executable, "-c", "pass"])
    start = start_time(supervisor.pid)
    supervisor.wait()
    ContextManager(namespace=ns).close()
    watcher = _start_watcher(ns, supervisor.pid, start or 1)
    _, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 0, err
    assert _shm.namespace_objects(ns) == [], err


# --- the lifespan protocol, in this process ---------------------------------------------


class FakeServer:
    """Drives an ASGI app's lifespan as a server does, recording what it sends."""

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.incoming: asyncio.Queue[dict] = asyncio.Queue()

    async def receive(self) -> dict:
        return await self.incoming.get()

    async def send(self, message: dict) -> None:
        self.sent.append(dict(message))

    async def run(self, app, steps: list[str]) -> list[dict]:
        """Send ``lifespan.<step>`` for each step, each once the previous one's answer
        arrived (or the app ended)."""
        task = asyncio.ensure_future(app({"type": "lifespan", "asgi": {"version": "3.0"},
                                          "state": {}}, self.receive, self.send))
        for step in steps:
            n = len(self.sent)
            await self.incoming.put({"type": f"lifespan.{step}"})
            await _until(lambda n=n: len(self.sent) > n or task.done(),
                         f"lifespan.{step}'s answer")
        await asyncio.wait_for(task, 10)
        return self.sent


def _types(sent: list[dict]) -> list[str]:
    return [m["type"] for m in sent]


def _lifespan_app(events: list[str], *, fail: str | None = None, raise_in: str | None = None):
    """An app whose own lifespan records what it can do at each step."""
    async def app(scope, receive, send):
        assert scope["type"] == "lifespan"
        await receive()
        if raise_in == "startup":
            raise RuntimeError("startup broke")
        if fail == "startup":
            await send({"type": "lifespan.startup.failed", "message": "no startup"})
            return
        ctx, _ = shmctx.asgi.manager().get_or_create_context("lease")  # attached already
        events.append("startup")
        await send({"type": "lifespan.startup.complete"})
        await receive()
        shmctx.asgi.manager().return_context(ctx)  # still attached
        events.append("shutdown")
        if fail == "shutdown":
            await send({"type": "lifespan.shutdown.failed", "message": "no shutdown"})
            return
        await send({"type": "lifespan.shutdown.complete"})
    return app


def test_lifespan_runs_the_apps_own_lifespan_inside_the_attachment(ns):
    events: list[str] = []
    app = shmctx.asgi.lifespan(_lifespan_app(events), namespace=ns, logger=None)
    sent = asyncio.run(FakeServer().run(app, ["startup", "shutdown"]))
    assert _types(sent) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert events == ["startup", "shutdown"]
    with pytest.raises(ContextError, match="not attached"):
        shmctx.asgi.manager()
    assert _shm.namespace_objects(ns) == []  # the only process attached unlinked it


@pytest.mark.parametrize("how", ["failed", "raised"])
def test_a_failed_app_startup_fails_the_lifespan_and_detaches(ns, how):
    events: list[str] = []
    inner = _lifespan_app(events, **({"fail": "startup"} if how == "failed"
                                     else {"raise_in": "startup"}))
    app = shmctx.asgi.lifespan(inner, namespace=ns, logger=None)
    sent = asyncio.run(FakeServer().run(app, ["startup"]))
    assert _types(sent) == ["lifespan.startup.failed"]
    assert sent[0]["message"] == ("no startup" if how == "failed" else
                                  "the app's lifespan startup raised RuntimeError: startup broke")
    assert events == []
    assert _shm.namespace_objects(ns) == []


def test_a_failed_app_shutdown_is_reported_and_still_detaches(ns):
    events: list[str] = []
    app = shmctx.asgi.lifespan(_lifespan_app(events, fail="shutdown"), namespace=ns,
                               logger=None)
    sent = asyncio.run(FakeServer().run(app, ["startup", "shutdown"]))
    assert sent == [{"type": "lifespan.startup.complete"},
                    {"type": "lifespan.shutdown.failed", "message": "no shutdown"}]
    assert _shm.namespace_objects(ns) == []


def test_an_app_without_a_lifespan_gets_only_shmctx_s_and_its_http_scopes(ns):
    seen: list[str] = []

    async def http_only(scope, receive, send):
        assert scope["type"] == "http", "HTTP only"  # raises on lifespan, unread
        seen.append(shmctx.asgi.namespace())
        await send({"type": "http.response.start", "status": 204, "headers": []})

    app = shmctx.asgi.lifespan(http_only, namespace=ns, logger=None)

    async def main() -> list[dict]:
        server = FakeServer()
        task = asyncio.ensure_future(server.run(app, ["startup", "shutdown"]))
        await _until(lambda: server.sent, "the startup")
        assert _types(server.sent) == ["lifespan.startup.complete"]
        await app({"type": "http"}, server.receive, server.send)  # passed through
        return await task

    sent = asyncio.run(main())
    assert _types(sent) == ["lifespan.startup.complete", "http.response.start",
                            "lifespan.shutdown.complete"]
    assert seen == [ns]
    assert _shm.namespace_objects(ns) == []


def test_a_failed_attach_fails_the_startup_before_the_app_runs(ns):
    events: list[str] = []
    with ContextManager(ContextConfig(max_references=3), namespace=ns, sweeper=False) as other:
        app = shmctx.asgi.lifespan(_lifespan_app(events), namespace=ns,
                                   config=ContextConfig(max_references=0), logger=None)
        sent = asyncio.run(FakeServer().run(app, ["startup"]))
        assert _types(sent) == ["lifespan.startup.failed"]
        assert "another configuration" in sent[0]["message"]
        assert sent[0]["message"].startswith("shmctx: ")
        assert events == []
        other.unlink()


def test_attached_nests_one_manager_and_the_last_exit_unlinks(ns):
    async def main() -> None:
        async with shmctx.asgi.attached(ns, logger=None) as outer:
            async with shmctx.asgi.attached(ns, logger=None) as inner:
                assert inner is outer is shmctx.asgi.manager()
            assert shmctx.asgi.manager() is outer and not outer.closed
            with pytest.raises(InvalidConfigError, match="one namespace"):
                async with shmctx.asgi.attached(ns + "x", logger=None):
                    pass
            with pytest.raises(InvalidConfigError, match="another config"):
                async with shmctx.asgi.attached(
                        ns, config=ContextConfig(max_references=7), logger=None):
                    pass
            assert shmctx.asgi.manager() is outer  # the refused ones changed nothing
        assert outer.closed
        with pytest.raises(ContextError, match="not attached"):
            shmctx.asgi.namespace()

    asyncio.run(main())
    assert _shm.namespace_objects(ns) == []


def test_namespace_argument_then_environment_then_default(ns, monkeypatch):
    async def attached_to(namespace=None) -> str:
        async with shmctx.asgi.attached(namespace, logger=None):
            return shmctx.asgi.namespace()

    monkeypatch.setenv(shmctx.asgi.ENV_NAMESPACE, ns)
    assert asyncio.run(attached_to()) == ns
    assert asyncio.run(attached_to(ns + "-arg")) == ns + "-arg"
    assert _shm.namespace_objects(ns) == [] == _shm.namespace_objects(ns + "-arg")

    monkeypatch.delitem(sys.modules, "gunicorn.arbiter", raising=False)
    monkeypatch.setattr(multiprocessing, "parent_process", lambda: None)
    assert shmctx.asgi.default_namespace() == f"asgi-{os.getpid()}"  # a single process
    monkeypatch.setattr(multiprocessing, "parent_process",
                        lambda: types.SimpleNamespace(pid=4242))
    assert shmctx.asgi.default_namespace() == "asgi-4242"  # uvicorn --workers: its parent
    monkeypatch.setattr(multiprocessing, "parent_process", lambda: None)
    monkeypatch.setitem(sys.modules, "gunicorn.arbiter", types.ModuleType("gunicorn.arbiter"))
    assert shmctx.asgi.default_namespace() == f"asgi-{os.getppid()}"  # a gunicorn worker


def test_bad_arguments_fail_when_wrapping():
    with pytest.raises(InvalidConfigError, match="namespace"):
        shmctx.asgi.lifespan(lambda *a: None, namespace="no/slashes")
    with pytest.raises(InvalidConfigError, match="ContextConfig"):
        shmctx.asgi.lifespan(lambda *a: None, config={"cleanup_interval": 1})
    with pytest.raises(TypeError, match="ASGI app"):
        shmctx.asgi.lifespan("app:app")


@pytest.mark.parametrize("how", ["recycled", "stop signal", "stop signal while starting",
                                 "orphan", "not the main thread", "SIGTERM not handled"])
def test_a_worker_unlinks_when_it_leaves_only_if_its_server_stops(ns, monkeypatch, caplog,
                                                                  how):
    # This process plays a worker whose supervisor is alive (or, "orphan", dead), and
    # whose server handles SIGTERM (or, "SIGTERM not handled", leaves it to its default:
    # it stops its workers some other way, so a stop cannot be told from a recycle).
    alive = how != "orphan"
    monkeypatch.setattr(multiprocessing, "parent_process",
                        lambda: types.SimpleNamespace(pid=4242, is_alive=lambda: alive))
    monkeypatch.setattr(shmctx.asgi, "_stop_signalled_pid", 0)
    monkeypatch.setattr(shmctx.asgi, "_unwatched_pid", 0)
    watchers: list[str] = []  # the namespaces handed to a watcher of the supervisor
    monkeypatch.setattr(shmctx.asgi, "_start_watcher", watchers.append)
    caplog.set_level("INFO", logger="shmctx.asgi")
    stops: list[int] = []

    def server_handler(sig: int, frame: object) -> None:  # as uvicorn's handle_exit
        stops.append(sig)

    async def worker() -> None:
        async with shmctx.asgi.attached(ns, logger=None):
            if how == "stop signal":
                signal.raise_signal(signal.SIGTERM)
                await _until(lambda: stops, "the server's handler to run")

    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(worker())
        except BaseException as e:
            errors.append(e)

    class Server:  # as uvicorn's: a stop signal sets its public should_exit
        should_exit = False

        def handle_exit(self, sig: int, frame: object) -> None:
            self.should_exit = True

    handler: Any = signal.SIG_DFL if how == "SIGTERM not handled" else server_handler
    if how == "stop signal while starting":
        # The signal came before the lifespan started: only the server's handler saw it.
        handler = Server().handle_exit
        handler(signal.SIGTERM, None)
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        if how == "not the main thread":  # where no signal handler can be set
            th = threading.Thread(target=run)
            th.start()
            th.join(30)
        else:
            run()
        assert signal.getsignal(signal.SIGTERM) is handler  # put back on leaving
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert errors == []
    assert stops == ([signal.SIGTERM] if how == "stop signal" else [])
    stays = how == "recycled"
    assert ("the namespace stays" in caplog.text) == stays
    assert watchers == ([ns] if stays else [])
    assert bool(_shm.namespace_objects(ns)) == stays
    if stays:  # the documented removal of a namespace left behind
        ContextManager(namespace=ns, create=False).unlink()
    assert _shm.namespace_objects(ns) == []


def test_the_stop_signal_watch_keeps_default_and_ignored_signals_as_they_were():
    # A child: SIG_DFL ends it, as without the watch; SIG_IGN stays ignored; a second
    # watch wraps nothing again.
    code = """if True:
        import signal
        import shmctx.asgi as a
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        a._watch_stop_signals()
        a._watch_stop_signals()
        term = signal.getsignal(signal.SIGTERM)
        print(type(term).__name__, term.previous == signal.SIG_DFL,
              signal.getsignal(signal.SIGINT) == signal.SIG_IGN, flush=True)
        signal.raise_signal(signal.SIGINT)
        print("SIGINT ignored", flush=True)
        signal.raise_signal(signal.SIGTERM)
        print("not reached", flush=True)
    """
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == -signal.SIGTERM, r.stderr
    assert r.stdout == "_StopSignalWatch True True\nSIGINT ignored\n", r.stderr


# --- the async helpers ------------------------------------------------------------------


async def _until(condition: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Poll ``condition`` on the event loop (letting other tasks run) until it holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_init_runs_off_the_event_loop(ns):
    started, go = threading.Event(), threading.Event()

    def init(ctx) -> None:
        started.set()
        # Only a free event loop can set ``go``: on the loop, this would wait out.
        assert go.wait(10), "the event loop was blocked while init ran"
        ctx.buf[:] = b"done"

    async def main() -> None:
        async with shmctx.asgi.attached(ns, logger=None) as m:
            task = asyncio.ensure_future(shmctx.asgi.get_or_create_context(
                "built", MemoryContextConfig(size=4), init=init))
            await _until(started.is_set, "init to start")
            go.set()
            ctx, existed = await task
            assert (bytes(ctx.buf), existed) == (b"done", False)
            m.return_context(ctx)
            async with shmctx.asgi.context("built") as again:
                assert bytes(again.buf) == b"done"
            assert {i.name: i for i in m.contexts()}["built"].refcount == 0

    asyncio.run(main())
    assert _shm.namespace_objects(ns) == []


def test_a_cancelled_get_gives_its_reference_back(ns):
    started, go = threading.Event(), threading.Event()

    def init(ctx) -> None:
        started.set()
        assert go.wait(10)

    async def main() -> None:
        async with shmctx.asgi.attached(ns, logger=None) as m:
            task = asyncio.ensure_future(shmctx.asgi.get_or_create_context(
                "slow", MemoryContextConfig(size=4), init=init))
            await _until(started.is_set, "init to start")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            go.set()  # the thread finishes the get after its awaiter is gone
            await _until(lambda: any(i.name == "slow" for i in m.contexts()),
                         "the context to be made")
            await _until(lambda: {i.name: i for i in m.contexts()}["slow"].refcount == 0,
                         "the orphaned reference to be given back")

    asyncio.run(main())
    assert _shm.namespace_objects(ns) == []


def test_locked_keeps_the_workers_coroutines_out_across_awaits(ns):
    async def main() -> int:
        async with shmctx.asgi.attached(ns, logger=None) as m:
            ctx, _ = m.get_or_create_context("n", MemoryContextConfig(size=8))

            async def bump() -> None:
                async with shmctx.asgi.locked(ctx):
                    value = int.from_bytes(ctx.buf, "little")
                    await asyncio.sleep(0)  # every other bump runs here, and must wait
                    ctx.buf[:] = (value + 1).to_bytes(8, "little")

            await asyncio.gather(*(bump() for _ in range(20)))
            total = int.from_bytes(ctx.buf, "little")
            m.return_context(ctx)
            return total

    assert asyncio.run(main()) == 20
    assert _shm.namespace_objects(ns) == []


def test_locked_waits_for_another_holder_off_the_event_loop(ns):
    holding, let_go = threading.Event(), threading.Event()
    released_in_time: list[bool] = []

    async def main() -> None:
        async with shmctx.asgi.attached(ns, logger=None) as m:
            ctx, _ = m.get_or_create_context("guarded", MemoryContextConfig(size=1))

            def holder() -> None:  # another thread: to ctx.lock, another holder
                with ctx.lock:
                    holding.set()
                    released_in_time.append(let_go.wait(10))

            th = threading.Thread(target=holder)
            th.start()
            await asyncio.to_thread(holding.wait, 10)
            entered = asyncio.Event()

            async def enter() -> None:
                async with shmctx.asgi.locked(ctx):
                    entered.set()

            task = asyncio.ensure_future(enter())
            await asyncio.sleep(0)  # let it start waiting
            assert not entered.is_set()
            let_go.set()  # runs only if enter() waits without blocking the loop
            await asyncio.wait_for(entered.wait(), 10)
            await task
            await asyncio.to_thread(th.join, 10)
            m.return_context(ctx)

    asyncio.run(main())
    assert released_in_time == [True]
    assert _shm.namespace_objects(ns) == []


def test_a_plain_ctx_lock_section_beside_locked_re_enters_instead_of_hanging(ns):
    # locked() had to wait for another holder; once it holds ctx.lock, another request's
    # plain, await-free section on the event loop (ctx.lock, ctx.get(), ctx.put())
    # re-enters the lock, which the loop's thread holds. Were it held by a helper thread
    # waiting for the block to end, that section would block the loop for good.
    holding, let_go = threading.Event(), threading.Event()
    log: list[str] = []

    async def main() -> int:
        async with shmctx.asgi.attached(ns, logger=None) as m:
            ctx, _ = m.get_or_create_context("mixed", MemoryContextConfig(size=64))
            ctx.put(0)

            def holder() -> None:  # another thread: to ctx.lock, another holder
                with ctx.lock:
                    holding.set()
                    let_go.wait(10)

            th = threading.Thread(target=holder)
            th.start()
            await asyncio.to_thread(holding.wait, 10)
            inside = asyncio.Event()

            async def a() -> None:
                async with shmctx.asgi.locked(ctx):
                    log.append("A in")
                    inside.set()
                    await _until(lambda: "B out" in log, "B's section")
                    log.append("A out")

            async def b() -> None:
                await inside.wait()
                ctx.lock.acquire(timeout=5)  # on the loop; a hang would end in TimeoutError
                try:
                    log.append("B in")
                    ctx.put(ctx.get() + 1)
                finally:
                    ctx.lock.release()
                log.append("B out")

            both = asyncio.gather(a(), b())
            await asyncio.sleep(0)  # a() finds ctx.lock held, and waits
            assert log == []
            let_go.set()
            await asyncio.wait_for(both, 20)
            await asyncio.to_thread(th.join, 10)
            value = ctx.get()
            m.return_context(ctx)
            return value

    assert asyncio.run(main()) == 1
    assert log == ["A in", "B in", "B out", "A out"]
    assert _shm.namespace_objects(ns) == []


# Another process that holds ctx.lock until told, then takes and releases it as fast as
# it can, adding 1 to the counter in bytes 0-7 under each hold, until byte 8 is set;
# it prints how many times it added.
_HAMMER = """if True:
    import sys
    from shmctx import ContextManager
    with ContextManager(namespace=sys.argv[1], create=False, sweeper=False) as m:
        ctx = m.get_context("n")
        def bump():
            ctx.buf[:8] = (int.from_bytes(ctx.buf[:8], "little") + 1).to_bytes(8, "little")
        with ctx.lock:
            print("holding", flush=True)
            sys.stdin.readline()
            bump()
        n = 1
        while not ctx.buf[8]:
            with ctx.lock:
                bump()
            n += 1
        m.return_context(ctx)
    print(n, flush=True)
"""


def test_locked_coroutines_never_overlap_while_another_process_takes_the_lock(ns):
    async def main() -> None:
        async with shmctx.asgi.attached(ns, logger=None) as m:
            ctx, _ = m.get_or_create_context("n", MemoryContextConfig(size=9))
            inside = most = 0

            async def bump() -> None:
                nonlocal inside, most
                for _ in range(3):
                    async with shmctx.asgi.locked(ctx, timeout=20):
                        inside += 1
                        most = max(most, inside)
                        value = int.from_bytes(ctx.buf[:8], "little")
                        await asyncio.sleep(0)  # the others run here: they must wait
                        ctx.buf[:8] = (value + 1).to_bytes(8, "little")
                        inside -= 1

            child = subprocess.Popen([sys.executable, "-c", _HAMMER, ns], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            try:
                assert child.stdout is not None and child.stdin is not None
                assert await asyncio.to_thread(child.stdout.readline) == "holding\n"
                tasks = [asyncio.ensure_future(bump()) for _ in range(10)]
                await asyncio.sleep(0)  # every one waits for the other process
                assert most == 0
                child.stdin.write("go\n")
                child.stdin.flush()
                await asyncio.wait_for(asyncio.gather(*tasks), 60)
                ctx.buf[8] = 1
                out, _ = await asyncio.to_thread(child.communicate, timeout=30)
            finally:
                if child.poll() is None:
                    child.kill()
                child.wait()
            assert child.returncode == 0
            assert most == 1
            # No increment lost: neither side ever ran inside the other's section.
            assert int.from_bytes(ctx.buf[:8], "little") == 30 + int(out)
            m.return_context(ctx)

    asyncio.run(main())
    assert _shm.namespace_objects(ns) == []


# Another process that takes ctx.lock and dies holding it.
_DIE_HOLDING = """if True:
    import os, signal, sys
    from shmctx import ContextManager
    m = ContextManager(namespace=sys.argv[1], create=False, sweeper=False)
    m.get_context("n").lock.acquire()
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("death", ["recorded", "before recording itself"])
def test_locked_takes_ctx_lock_over_from_a_holder_that_died(ns, death):
    async def main() -> None:
        config = ContextConfig(max_references=0, max_idle_time=0, lock_timeout=0.1)
        async with shmctx.asgi.attached(ns, config=config, logger=None) as m:
            ctx, _ = m.get_or_create_context("n", MemoryContextConfig(size=1))
            if death == "recorded":  # a process SIGKILLed inside its section
                r = await asyncio.to_thread(subprocess.run,
                                            [sys.executable, "-c", _DIE_HOLDING, ns],
                                            timeout=60)
                assert r.returncode == -signal.SIGKILL
            else:  # the semaphore taken, and nobody recorded as its owner
                ctx.lock.sem.acquire()
            before = shmctx._lock.recoveries()
            async with shmctx.asgi.locked(ctx, timeout=20):
                assert ctx.lock.owner().pid == os.getpid()
            assert shmctx._lock.recoveries() == before + 1
            m.return_context(ctx)

    asyncio.run(main())
    assert _shm.namespace_objects(ns) == []


def test_locked_nested_in_the_same_task_is_a_clear_error_not_a_hang(ns):
    # One helper using locked() calls another on the same context: the inner one would
    # wait for the outer, which waits for it.
    async def main() -> None:
        async with shmctx.asgi.attached(ns, logger=None) as m:
            ctx, _ = m.get_or_create_context("n", MemoryContextConfig(size=1))

            async def nested() -> None:
                async with shmctx.asgi.locked(ctx, timeout=5):
                    with pytest.raises(RuntimeError, match=r"not re-entrant.*'n'"):
                        async with shmctx.asgi.locked(ctx, timeout=5):
                            pass
                    assert ctx.lock.owner().pid == os.getpid()  # the outer still holds

            await asyncio.wait_for(nested(), 10)
            assert ctx.lock.owner().pid == 0
            # Another task, or this one again, is no nesting: both get in.
            await asyncio.wait_for(_enter_locked(ctx), 10)
            await asyncio.wait_for(asyncio.ensure_future(_enter_locked(ctx)), 10)
            m.return_context(ctx)

    asyncio.run(main())
    assert _shm.namespace_objects(ns) == []


async def _enter_locked(ctx: MemoryContext, timeout: float | None = None) -> None:
    async with shmctx.asgi.locked(ctx, timeout=timeout):
        pass


def test_locked_timeout_bounds_the_wait_behind_the_workers_own_coroutines(ns):
    async def main() -> None:
        async with shmctx.asgi.attached(ns, logger=None) as m:
            ctx, _ = m.get_or_create_context("n", MemoryContextConfig(size=1))
            inside, done = asyncio.Event(), asyncio.Event()

            async def holder() -> None:
                async with shmctx.asgi.locked(ctx):
                    inside.set()
                    await done.wait()  # until the other one has given up

            task = asyncio.ensure_future(holder())
            await inside.wait()
            # Queued behind holder(); then cancelled while queued, with a deadline.
            cancelled = asyncio.ensure_future(_enter_locked(ctx, timeout=60))
            with pytest.raises(TimeoutError, match=r"after 0\.2s .*lock of context 'n'"):
                await asyncio.wait_for(_enter_locked(ctx, timeout=0.2), 10)
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            done.set()
            await asyncio.wait_for(task, 10)
            # Neither left the queue or ctx.lock taken: the next one gets in at once.
            await asyncio.wait_for(_enter_locked(ctx, timeout=0), 10)
            m.return_context(ctx)

    asyncio.run(main())
    assert _shm.namespace_objects(ns) == []


async def _contend(ctx: MemoryContext) -> int:
    """Ten coroutines bump a counter under locked(), awaiting inside: returns the most
    that were ever inside at once."""
    inside = most = 0

    async def bump() -> None:
        nonlocal inside, most
        async with shmctx.asgi.locked(ctx, timeout=30):
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0)  # the others queue here
            inside -= 1

    await asyncio.wait_for(asyncio.gather(*(bump() for _ in range(10))), 60)
    return most


def test_locked_works_in_one_event_loop_after_another_and_in_two_threads_at_once(ns):
    # asyncio.run twice (a fresh loop per test, say), and loops of several threads: the
    # queue of one loop must not be used from another.
    with ContextManager(namespace=ns, sweeper=False) as m:
        ctx, _ = m.get_or_create_context("n", MemoryContextConfig(size=1))
        assert asyncio.run(_contend(ctx)) == 1
        assert asyncio.run(_contend(ctx)) == 1
        results: list[int | BaseException] = []

        def in_a_thread() -> None:
            try:
                results.append(asyncio.run(_contend(ctx)))
            except BaseException as e:  # shown by the assert below
                results.append(e)

        threads = [threading.Thread(target=in_a_thread) for _ in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert results == [1, 1]
        assert ctx.lock.owner().pid == 0
        m.return_context(ctx)
        m.unlink()
    assert _shm.namespace_objects(ns) == []


def test_locked_recovers_ctx_lock_left_held_by_a_thread_of_this_process_that_ended(ns):
    async def main() -> None:
        config = ContextConfig(max_references=0, max_idle_time=0, lock_timeout=0.1)
        async with shmctx.asgi.attached(ns, config=config, logger=None) as m:
            ctx, _ = m.get_or_create_context("n", MemoryContextConfig(size=1))
            th = threading.Thread(target=ctx.lock.acquire)  # and never releases it
            th.start()
            await asyncio.to_thread(th.join, 10)
            assert ctx.lock.owner().pid == os.getpid()
            before = shmctx._lock.recoveries()
            async with shmctx.asgi.locked(ctx, timeout=20):
                assert ctx.lock.owner().pid == os.getpid()
            assert shmctx._lock.recoveries() == before + 1
            assert ctx.lock.owner().pid == 0
            m.return_context(ctx)

    asyncio.run(main())
    assert _shm.namespace_objects(ns) == []


def test_manager_outside_an_attached_lifespan_is_a_clear_error():
    with pytest.raises(ContextError, match=r"shmctx\.asgi\.lifespan\(app\)"):
        shmctx.asgi.manager()


def test_a_lifespan_cancelled_without_shutdown_still_detaches(ns):
    # uvicorn's forced exit (a second Ctrl-C) skips lifespan.shutdown: the lifespan task
    # is cancelled when the worker's event loop ends.
    app = shmctx.asgi.lifespan(_lifespan_app([]), namespace=ns, logger=None)

    async def main() -> None:
        server = FakeServer()
        task = asyncio.ensure_future(app({"type": "lifespan", "state": {}}, server.receive,
                                         server.send))
        await server.incoming.put({"type": "lifespan.startup"})
        await _until(lambda: server.sent, "the startup to complete")
        assert _shm.namespace_objects(ns)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert _shm.namespace_objects(ns) == []


def test_a_forced_exit_detaches_while_the_event_loop_still_runs(ns, monkeypatch):
    # A second Ctrl-C sets uvicorn's force_exit: no lifespan.shutdown comes, and the
    # server may end the process (raising a captured SIGTERM again) before the event
    # loop ends. The lifespan task must be cancelled, and detach, while the loop runs.
    monkeypatch.setattr(multiprocessing, "parent_process",
                        lambda: types.SimpleNamespace(pid=4242, is_alive=lambda: True))
    monkeypatch.setattr(shmctx.asgi, "_stop_signalled_pid", 0)
    app = shmctx.asgi.lifespan(_lifespan_app([]), namespace=ns, logger=None)

    class UvicornServer:  # uvicorn's Server.handle_exit, verbatim in effect
        should_exit = force_exit = False

        def handle_exit(self, sig: int, frame: object) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True

    uv = UvicornServer()
    detached_while_running: list[bool] = []
    # The watch asks for the lifespans to end, from the signal handler, only on a forced
    # exit: spied on, so that the first Ctrl-C can be seen not to ask, without a wait.
    ended: list[bool] = []
    end_soon = shmctx.asgi._end_lifespans_soon
    monkeypatch.setattr(shmctx.asgi, "_end_lifespans_soon",
                        lambda: (ended.append(True), end_soon())[1])

    async def main() -> None:
        server = FakeServer()
        task = asyncio.ensure_future(app({"type": "lifespan", "state": {}}, server.receive,
                                         server.send))
        await server.incoming.put({"type": "lifespan.startup"})
        await _until(lambda: server.sent, "the startup to complete")
        assert server.sent == [{"type": "lifespan.startup.complete"}]
        signal.raise_signal(signal.SIGINT)  # Ctrl-C: a graceful stop begins
        assert ended == []  # nothing asked to end the lifespan: it waits for its shutdown
        assert uv.should_exit and not task.done()
        assert _shm.namespace_objects(ns)
        signal.raise_signal(signal.SIGINT)  # Ctrl-C again: forced exit
        assert uv.force_exit and ended == [True]
        await _until(task.done, "the lifespan task to end")
        assert task.cancelled()
        detached_while_running.append(_shm.namespace_objects(ns) == [])

    previous = signal.signal(signal.SIGINT, uv.handle_exit)
    try:
        asyncio.run(main())
    finally:
        signal.signal(signal.SIGINT, previous)
    assert detached_while_running == [True]
    assert _shm.namespace_objects(ns) == []


# --- docs/asgi.md: its code blocks are promises --------------------------------------

DOC_BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "asgi.md").read_text(),
                        re.S)


def _doc_block(marker: str) -> str:
    (block,) = [b for b in DOC_BLOCKS if marker in b]
    return block


def test_every_doc_block_compiles():
    assert len(DOC_BLOCKS) >= 6
    for block in DOC_BLOCKS:
        compile(block, "docs/asgi.md", "exec")


def _http(path: str = "/") -> dict:
    return {"type": "http", "path": path, "query_string": b"", "headers": []}


def test_doc_copy_paste_app_counts_across_requests(ns, monkeypatch):
    monkeypatch.setenv(shmctx.asgi.ENV_NAMESPACE, ns)
    scope: dict = {}
    exec(_doc_block("async def hello"), scope)

    async def main() -> list[bytes]:
        server = FakeServer()
        lifespan = asyncio.ensure_future(scope["app"]({"type": "lifespan", "state": {}},
                                                      server.receive, server.send))
        await server.incoming.put({"type": "lifespan.startup"})
        await _until(lambda: server.sent, "the startup to complete")
        for _ in range(2):
            await scope["app"](_http(), server.receive, server.send)
        await server.incoming.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(lifespan, 10)
        assert server.sent[-1] == {"type": "lifespan.shutdown.complete"}
        return [m.get("body") for m in server.sent if m["type"] == "http.response.body"]

    assert asyncio.run(main()) == [b"hit 1\n", b"hit 2\n"]
    assert _shm.namespace_objects(ns) == []


def test_doc_hot_path_example_and_publisher(ns):
    scope: dict = {}
    exec(_doc_block("async def value_at"), scope)

    async def main() -> list[int]:
        async with shmctx.asgi.attached(ns, logger=None) as m:
            values = [await scope["value_at"](7), await scope["value_at"](300)]
            # The publisher, beside the running "server" (this process).
            publisher = _doc_block("create=False").replace('"myapp"', repr(ns))
            r = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", publisher],
                                        capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            ctx = m.get_context("table")
            assert ctx.version == 2 and ctx.buf[300] == 300 % 256
            m.return_context(ctx)
            return values

    assert asyncio.run(main()) == [7, 300 % 256]
    assert _shm.namespace_objects(ns) == []
