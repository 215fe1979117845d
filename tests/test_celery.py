"""shmctx.celery against real ``celery worker`` processes (prefork, solo, threads pools),
with kombu's filesystem transport and a file result backend under tmp_path: no broker
server. The app is tests/apps/celery_app.py."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from celery import Celery, signals
from helpers import wait_for
from servers import kill_session, spawn_in_session

import shmctx.celery
from shmctx import ContextConfig, ContextError, ContextManager, InvalidConfigError, _shm

APPS = Path(__file__).parent / "apps"
EXAMPLE = Path(__file__).parent.parent / "docs" / "examples" / "celery"
WAIT = 30.0  # for a task's result or a worker's exit; never reached when things work


def _load_conf():
    # Registered under its own name: the worker and the client name the transport class
    # "celery_conf:AtomicFilesystemTransport", and kombu imports it by that name.
    if "celery_conf" not in sys.modules:
        spec = importlib.util.spec_from_file_location("celery_conf", APPS / "celery_conf.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["celery_conf"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["celery_conf"]


CONF = _load_conf()


class _Worker:
    """One ``celery worker`` process and its log."""

    def __init__(self, proc: subprocess.Popen, log: Path) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.log_path = log

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it with ``sig`` (SIGTERM: warm shutdown; SIGQUIT: cold) and wait for its
        exit; it must exit cleanly."""
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker did not stop:\n{self.log()}") from None
        assert code == 0, f"worker exited with {code}:\n{self.log()}"


@contextmanager
def _worker(root: Path, name: str, *args: str, ns: str | None, cleanup: float | None = None,
            env: dict[str, str] | None = None,
            command: list[str] | None = None) -> Iterator[_Worker]:
    """Run ``celery -A celery_app worker ARGS`` (or ``python COMMAND``) with its broker
    under ``root``, in a session of its own; SIGKILL whatever is left of it at the end."""
    full = {**os.environ, "SHMCTX_TEST_CELERY_DIR": str(root),
            "PYTHONPATH": os.pathsep.join([str(APPS), os.environ.get("PYTHONPATH", "")])}
    full.pop("SHMCTX_NAMESPACE", None)
    if ns is not None:
        full["SHMCTX_NAMESPACE"] = ns
    if cleanup is not None:
        full["SHMCTX_TEST_CELERY_CLEANUP"] = str(cleanup)
    full.update(env or {})
    log = root / f"{name}.log"
    proc = spawn_in_session(
        [sys.executable, *command] if command else
        [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "--loglevel", "INFO",
         "--hostname", f"{name}@%h", "--without-heartbeat", "--without-gossip",
         "--without-mingle", *args],
        log, cwd=APPS, env=full)
    try:
        yield _Worker(proc, log)
    finally:
        kill_session(proc)  # the worker and its pool processes


@contextmanager
def _client(root: Path) -> Iterator[Celery]:
    """A Celery app of the test process that sends to the workers under ``root``."""
    app = Celery("shmctx-test-client", set_as_current=False)
    app.conf.update(CONF.settings(str(root)))
    try:
        yield app
    finally:
        app.close()


def _call(client: Celery, task: str, *args: object, queue: str = "celery") -> dict:
    return client.send_task(task, args=list(args), queue=queue).get(timeout=WAIT,
                                                                     interval=0.02)


def _observer(ns: str) -> ContextManager:
    """A manager of the worker's namespace in the test process: attach only, no sweeper.
    Close it before the worker stops (a registered process keeps a shared namespace)."""
    return ContextManager(namespace=ns, create=False, sweeper=False)


def _info(m: ContextManager, name: str):
    return {i.name: i for i in m.contexts()}.get(name)


def _marks(root: Path, what: str) -> set[int]:
    """Pids of the processes that created ``<what>-<pid>`` in ``root`` (celery_app)."""
    return {int(p.name.rsplit("-", 1)[1]) for p in root.glob(f"{what}-*")}


def _inits(root: Path) -> list[int]:
    """Pids that ran the context's init, one line each."""
    path = root / "inits"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


@contextmanager
def _no_leftovers(*namespaces: str) -> Iterator[None]:
    """Fail if anything of ``namespaces`` is in /dev/shm at the end (and remove it, so
    that one failure does not leak into the next test)."""
    try:
        yield
    finally:
        left = {n: objs for n in namespaces if (objs := _shm.namespace_objects(n))}
        for n in left:
            _shm.remove_namespace_objects(n)
        assert not left, f"left in /dev/shm: {left}"


def test_prefork_processes_share_one_context_and_a_killed_one_is_reclaimed_at_once(
        ns, tmp_path):
    """Four forked pool processes hold one context built once. One of them is SIGKILLed
    while it holds it: the main process reclaims its reference as soon as the pool reaps
    it, though the sweeper would not run for an hour. A warm shutdown leaves nothing."""
    with _worker(tmp_path, "main", "--pool", "prefork", "--concurrency", "4", ns=ns,
                 cleanup=3600) as w, _client(tmp_path) as client:
        pending = [client.send_task("t.hold", args=["data", "release"]) for _ in range(4)]
        holders = wait_for(lambda: len(p := _marks(tmp_path, "holding")) == 4 and p,
                           WAIT, "four pool processes to hold the context")
        with _observer(ns) as obs:
            info = _info(obs, "data")
            assert info.refcount == 4 and set(info.holders) == holders
            assert w.pid not in holders  # the tasks ran in the pool processes
            assert len(_inits(tmp_path)) == 1  # built once, by one of them
            assert obs.config.cleanup_interval == 3600

            victim = min(holders)
            os.kill(victim, signal.SIGKILL)
            # Well within the hour the sweeper waits: the pool's report of the death.
            wait_for(lambda: _info(obs, "data").refcount == 3, 10,
                     "the killed process's reference to be reclaimed")
            assert victim not in _info(obs, "data").holders
            # Logged right after the reclaim it reports: wait for the line too.
            wait_for(lambda: f"shmctx: reclaimed 1 reference(s) of dead pool process "
                     f"{victim}" in w.log(), 10, "the reclaim's line in the worker's log")

        (tmp_path / "release").touch()
        results = []
        for r in pending:
            try:
                results.append(r.get(timeout=WAIT, interval=0.02))
            except Exception as e:  # the killed process's task: WorkerLostError
                assert "SIGKILL" in str(e), repr(e)
        assert {r["pid"] for r in results} == holders - {victim}
        assert {r["content"] for r in results} == {str(_inits(tmp_path)[0])}
        assert {r["namespace"] for r in results} == {ns}
        with _no_leftovers(ns):
            w.stop(signal.SIGTERM)
        log = w.log()
        # shmctx's lines reach the worker's log (Celery's format), the core's included.
        assert f"INFO/MainProcess] shmctx: main process {w.pid} uses namespace {ns!r}" in log
        assert f"namespace {ns!r}: pid {w.pid} was the last process attached; namespace " \
            "unlinked" in log


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_recycled_pool_processes_return_their_references(ns, tmp_path, start):
    """``--max-tasks-per-child 1``: every task runs in a new pool process, which keeps a
    reference and exits after the task. Each returns its reference as it exits (the main
    process has nothing to reclaim). Pool processes started as fresh interpreters
    (``spawn``) find the namespace too. A cold shutdown (SIGQUIT) leaves nothing."""
    with _worker(tmp_path, "recycle", "--pool", "prefork", "--concurrency", "1",
                 "--max-tasks-per-child", "1", ns=ns, cleanup=3600,
                 env={"SHMCTX_TEST_CELERY_START": start}) as w, _client(tmp_path) as client:
        results = [_call(client, "t.keep", "data") for _ in range(3)]
        pids = {r["pid"] for r in results}
        assert len(pids) == 3 and w.pid not in pids  # one process per task
        assert {r["content"] for r in results} == {str(results[0]["pid"])}
        assert _inits(tmp_path) == [results[0]["pid"]]
        with _observer(ns) as obs:
            wait_for(lambda: _info(obs, "data").refcount == 0, 10,
                     "the recycled processes to return their references")
        assert "reclaimed" not in w.log()  # returned by each process, not reclaimed
        with _no_leftovers(ns):
            w.stop(signal.SIGQUIT)


def test_solo_pool_serves_from_the_main_process_and_the_sweeper_logs_to_the_worker_log(
        tmp_path):
    """``--pool solo``: the tasks run in the main process, on its manager. The namespace
    is the default ``celery-<main pid>``. The sweeper runs in the main process and its
    lines appear in the worker's log: it reclaims the reference of an outside process
    killed while holding one."""
    with ExitStack() as stack:
        w = stack.enter_context(_worker(tmp_path, "solo", "--pool", "solo", ns=None,
                                        cleanup=0.2))
        ns = f"celery-{w.pid}"
        stack.enter_context(_no_leftovers(ns))
        client = stack.enter_context(_client(tmp_path))
        first = _call(client, "t.keep", "data")
        assert first == {"pid": w.pid, "content": str(w.pid), "namespace": ns}
        assert _call(client, "t.keep", "data")["pid"] == w.pid

        outside = subprocess.Popen(
            [sys.executable, "-c",
             "import sys, shmctx\n"
             f"m = shmctx.ContextManager(namespace={ns!r}, create=False, sweeper=False)\n"
             "ctx = m.get_context('data')\n"
             "print('holding', flush=True)\n"
             "sys.stdin.read()\n"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert outside.stdout.readline() == "holding\n"
            with _observer(ns) as obs:
                assert _info(obs, "data").holders == {w.pid: 2, outside.pid: 1}
                outside.kill()
                outside.wait()
                wait_for(lambda: _info(obs, "data").holders == {w.pid: 2}, 10,
                         "the sweeper to reclaim the killed process's reference")
        finally:
            outside.kill()
            outside.wait()
        wait_for(lambda: f"namespace {ns!r} sweep: closed nothing, reclaimed" in w.log(), 10,
                 "the sweeper's line in the worker's log")
        w.stop(signal.SIGTERM)
        assert f"shmctx: namespace {ns!r} unlinked" in w.log()


def test_two_workers_naming_one_namespace_share_it_and_the_last_one_unlinks(ns, tmp_path):
    """Two ``celery worker`` processes given the same namespace, one prefork and one with
    the threads pool (whose tasks run in its main process). Both see the context built
    once. The first to stop leaves the namespace to the other; the last one unlinks it."""
    with _no_leftovers(ns), \
            _worker(tmp_path, "a", "--pool", "prefork", "--concurrency", "1", "-Q", "qa",
                    ns=ns) as a, \
            _worker(tmp_path, "b", "--pool", "threads", "--concurrency", "2", "-Q", "qb",
                    ns=ns) as b, \
            _client(tmp_path) as client:
        from_a = _call(client, "t.keep", "data", queue="qa")
        from_b = _call(client, "t.keep", "data", queue="qb")
        assert from_a["pid"] not in (a.pid, b.pid)  # a's pool process
        assert from_b["pid"] == b.pid  # threads: the main process serves
        assert len(_inits(tmp_path)) == 1
        assert from_a["content"] == from_b["content"] == str(_inits(tmp_path)[0])

        a.stop(signal.SIGTERM)
        assert f"shmctx: main process {a.pid} left namespace {ns!r}; other processes still " \
            "use it" in a.log()
        with _observer(ns) as obs:  # b and its reference carry on
            assert _info(obs, "data").holders == {b.pid: 1}
        assert _call(client, "t.keep", "data", queue="qb")["content"] == from_a["content"]

        b.stop(signal.SIGTERM)
        assert f"namespace {ns!r}: pid {b.pid} was the last process attached; namespace " \
            "unlinked" in b.log()


def test_event_loop_pool_reports_a_killed_process_too(ns, tmp_path):
    """With the redis and amqp transports Celery runs an event loop and another prefork
    pool (AsynPool), which sets its own process-exit callback when it joins the loop:
    shmctx's is chained after it. Each pool process takes a reference as it starts; one
    is SIGKILLed, and its reference is reclaimed by the main process (the sweeper would
    not run for an hour)."""
    with _worker(tmp_path, "loop", ns=ns, cleanup=3600,
                 env={"SHMCTX_TEST_CELERY_BOOT_REF": "1"},
                 command=[str(APPS / "celery_eventloop.py"), "loop"]) as w:
        def booted() -> set[int] | None:
            assert w.proc.poll() is None, w.log()
            return len(p := _marks(tmp_path, "booted")) == 2 and p
        first = wait_for(booted, WAIT, "two pool processes holding a reference")
        with _observer(ns) as obs:
            assert _info(obs, "data") is None and set(_info(obs, "boot").holders) == first
            victim = min(first)
            os.kill(victim, signal.SIGKILL)
            # Celery's event loop notices a dead pool process within its own checks
            # (every 5 s at most); then the reference goes at once.
            wait_for(lambda: victim not in _info(obs, "boot").holders, 15,
                     "the killed process's reference to be reclaimed")
        wait_for(lambda: f"shmctx: reclaimed 1 reference(s) of dead pool process "
                 f"{victim}" in w.log(), 10, "the reclaim's line in the worker's log")
        with _no_leftovers(ns):
            w.stop(signal.SIGTERM)


def test_a_worker_that_cannot_open_its_namespace_does_not_start(ns, tmp_path):
    """The namespace exists with another config than the worker's install() asks for: the
    worker exits before it starts a pool process, names the difference in its log, and
    leaves the namespace as it was."""
    with ContextManager(ContextConfig(cleanup_interval=7), namespace=ns, sweeper=False) as m:
        with _worker(tmp_path, "refused", "--pool", "prefork", "--concurrency", "1", ns=ns,
                     cleanup=3600) as w:
            try:
                code = w.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"worker did not exit:\n{w.log()}") from None
            log = w.log()
            assert code != 0, log
            assert "shmctx.celery could not open the worker's namespace" in log
            assert "cleanup_interval" in log and "ready." not in log
        assert m.config.cleanup_interval == 7 and _shm.namespace_objects(ns)
        m.unlink()


def test_documented_example_runs_with_its_commands(tmp_path):
    readme = (EXAMPLE / "README.md").read_text()
    assert "celery -A tasks worker --loglevel=INFO --concurrency 4" in readme
    assert "python client.py" in readme
    env = {**os.environ, "EXAMPLE_DIR": str(tmp_path)}
    env.pop("SHMCTX_NAMESPACE", None)
    log = tmp_path / "worker.log"
    worker = spawn_in_session(
        [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--loglevel=INFO",
         "--concurrency", "4"],
        log, cwd=EXAMPLE, env=env)
    ns = f"celery-{worker.pid}"
    with _no_leftovers(ns):
        try:
            out = subprocess.run([sys.executable, "client.py"], cwd=EXAMPLE, env=env,
                                 capture_output=True, text=True, timeout=WAIT)
            assert out.returncode == 0, out.stderr + log.read_text()
            lines = out.stdout.splitlines()
            assert lines[-1] == "the table was built once, by one pool process", out.stdout
            assert len(lines) == 18 and lines[-2].endswith("pool process(es) served")
            with ContextManager(namespace=ns, create=False, sweeper=False) as obs:
                # No config given: the service defaults (no reference limit, no idle
                # closing of the table loaded once for the life of the worker).
                assert (obs.config.max_references, obs.config.max_idle_time) == (0, 0)
            worker.send_signal(signal.SIGINT)  # Ctrl-C, as the README says
            worker.wait(WAIT)  # a warm shutdown; Celery exits with 1 after a Ctrl-C
            assert "Warm shutdown" in log.read_text()
            assert f"shmctx: namespace {ns!r} unlinked" in log.read_text()
        finally:
            kill_session(worker)


# --- in the test process: install() and the signal filtering --------------------------


def test_install_is_idempotent_and_refuses_other_arguments():
    app = Celery("shmctx-test-install", set_as_current=False)
    cfg = ContextConfig(cleanup_interval=5)
    shmctx.celery.install(app, namespace="t-install", config=cfg)
    before = {s: len(s.receivers) for s in (signals.worker_init, signals.worker_shutdown,
                                            signals.worker_process_init,
                                            signals.worker_process_shutdown)}
    shmctx.celery.install(app, namespace="t-install", config=ContextConfig(cleanup_interval=5))
    shmctx.celery.install(Celery("another", set_as_current=False))
    assert {s: len(s.receivers) for s in before} == before  # connected once per process
    assert [s for s in app.steps["worker"] if s.__module__ == "shmctx.celery"] == \
        [shmctx.celery._WorkerStep]
    with pytest.raises(InvalidConfigError, match="already called"):
        shmctx.celery.install(app, namespace="t-other", config=cfg)
    with pytest.raises(InvalidConfigError):
        shmctx.celery.install(app, namespace="bad/name")
    with pytest.raises(InvalidConfigError, match="ContextConfig"):
        shmctx.celery.install(Celery("x", set_as_current=False), config={"max_references": 0})
    with pytest.raises(InvalidConfigError, match="Celery app"):
        shmctx.celery.install("app")


def test_signals_of_another_apps_worker_are_ignored(ns):
    """Celery's signals go to every receiver in the process: a worker of an app that did
    not call install() creates no namespace, and manager() says how to set it up."""
    ours = Celery("ours", set_as_current=False)
    shmctx.celery.install(ours, namespace=ns)

    class OtherWorker:  # what Celery passes as sender: the WorkController
        app = Celery("other", set_as_current=False)

    with _no_leftovers(ns):
        signals.worker_init.send(sender=OtherWorker())
        signals.worker_init.send(sender=None)
        signals.worker_process_init.send(sender="other@host")
        signals.worker_shutdown.send(sender=OtherWorker())
        assert _shm.namespace_objects(ns) == []
        with pytest.raises(ContextError, match=r"install\(app\)"):
            shmctx.celery.manager()
        with pytest.raises(ContextError):
            shmctx.celery.namespace()


def test_namespace_priority(monkeypatch):
    monkeypatch.setenv("SHMCTX_NAMESPACE", "from-env")
    assert shmctx.celery._resolve_namespace("explicit") == ("explicit", False)
    assert shmctx.celery._resolve_namespace(None) == ("from-env", False)
    monkeypatch.delenv("SHMCTX_NAMESPACE")
    assert shmctx.celery._resolve_namespace(None) == (f"celery-{os.getpid()}", True)
    monkeypatch.setenv("SHMCTX_NAMESPACE", "bad/name")
    with pytest.raises(InvalidConfigError):
        shmctx.celery._resolve_namespace(None)
