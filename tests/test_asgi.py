"""shmctx.asgi: the lifespan protocol and the async helpers in this process, and real
uvicorn servers (``--workers``) on 127.0.0.1 running tests/apps/asgi_app.py and the
documented example."""

from __future__ import annotations

import asyncio
import ctypes
import http.client
import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import types
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import wait_for

import shmctx.asgi
from shmctx import (
    ContextConfig,
    ContextError,
    ContextManager,
    InvalidConfigError,
    MemoryContextConfig,
    _shm,
)

ROOT = Path(__file__).parent.parent
APPS_DIR = Path(__file__).parent / "apps"
EXAMPLE = ROOT / "docs" / "examples" / "asgi"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_PPID = 1  # field of /proc/PID/stat after the command name
# What a client sees of a connection whose worker was killed under it.
CONNECTION_LOST = (ConnectionError, http.client.RemoteDisconnected,
                   http.client.IncompleteRead, http.client.BadStatusLine)


# --- real uvicorn servers -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> set[int]:
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
        if int(fields[_PPID]) == pid and fields[0] not in (b"Z", b"X"):
            out.add(int(entry))
    return out


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def holders(ns: str, name: str) -> dict[int, int]:
    with ContextManager(namespace=ns, create=False, sweeper=False) as tm:
        return {i.name: i for i in tm.contexts()}[name].holders


def sweeper_pid(ns: str) -> int:
    with ContextManager(namespace=ns, create=False, sweeper=False) as tm:
        return tm._snapshot().sweeper[0]  # the leader recorded in the table header


class Server:
    """A server started by ``serve()``: its process, port and log."""

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
            raise AssertionError(f"the server exited with {self.proc.returncode}:\n"
                                 f"{self.log()}")
        try:
            self.get("/ping")
        except OSError:
            return False
        return True

    def children(self) -> set[int]:
        return children(self.pid)

    def workers(self, n: int) -> set[int]:
        """The ``n`` worker processes, once there are that many (uvicorn's supervisor also
        has multiprocessing's resource tracker as a child: not a worker)."""
        def found() -> set[int] | None:
            ws = {c for c in children(self.pid) if b"spawn_main" in _cmdline(c)}
            return ws if len(ws) == n else None
        return wait_for(found, 20, f"{n} uvicorn workers")

    def gather(self, path: str, done: Callable[[list[dict]], bool],
               at_least: int = 30) -> list[dict]:
        """Issue concurrent requests, in rounds, until ``done(responses)`` holds."""
        results: list[dict] = []
        with ThreadPoolExecutor(8) as pool:
            def more() -> bool:
                results.extend(pool.map(lambda _: self.get(path), range(16)))
                return len(results) >= at_least and done(results)
            wait_for(more, 30, f"responses of {path} to satisfy the test")
        return results

    def stop(self, ns: str, sig: int = signal.SIGTERM) -> None:
        """Stop the supervisor with ``sig``: it must exit cleanly and the last worker to
        leave must have unlinked the namespace."""
        os.kill(self.pid, sig)
        self.proc.wait(timeout=30)
        assert self.proc.returncode == 0, self.log()
        assert _shm.namespace_objects(ns) == [], self.log()
        assert re.search(rf"namespace '{re.escape(ns)}': pid \d+ was the last process "
                         "attached; namespace unlinked", self.log()), self.log()


def _stop_with_parent() -> None:
    """In the server process, before exec: SIGTERM it if the test process dies without
    reaching its ``finally`` (the test's own cleanup then kills the whole session)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


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
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, *argv, *bind(port)], cwd=cwd, env=environ, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_stop_with_parent)
    server = Server(proc, port, log_path)
    try:
        if wait:
            wait_for(server.ready, 30, "the server to serve")
        yield server
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


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
            assert f"reclaimed 1 reference(s) of dead pid {victim}" in srv.log()
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
            while len(self.sent) == n and not task.done():
                await asyncio.sleep(0)
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
        while not server.sent:
            await asyncio.sleep(0)
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
            let_go.set()  # runs only if enter() waits off the loop
            await asyncio.wait_for(entered.wait(), 10)
            await task
            await asyncio.to_thread(th.join, 10)
            m.return_context(ctx)

    asyncio.run(main())
    assert released_in_time == [True]
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
