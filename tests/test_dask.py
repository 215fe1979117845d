"""shmctx.dask against a real Dask cluster: LocalCluster(processes=True) with nannies,
and nanny-less ``dask worker --no-nanny`` processes, on 127.0.0.1.

Each cluster runs in a process of its own (tests/apps/dask_cluster.py), driven from here
through a ``distributed.Client``; the task functions are in tests/apps/dask_tasks.py,
which the workers import.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from distributed import Client
from distributed.diagnostics.plugin import NannyPlugin, WorkerPlugin
from helpers import wait_for
from servers import kill_session, spawn_in_session

import shmctx.dask
from shmctx import (
    SERVICE_DEFAULTS,
    ContextConfig,
    ContextError,
    ContextManager,
    InvalidConfigError,
    _shm,
)
from shmctx.dask import HostContexts, PeerContexts

APPS = Path(__file__).parent / "apps"
EXAMPLE = Path(__file__).parent.parent / "docs" / "examples" / "dask"
sys.path.insert(0, str(APPS))
import dask_tasks  # noqa: E402  (after its directory is on the path)

# A sweep interval no test reaches: a reference released within the test was released by
# the nanny noticing its worker's exit, not by the sweeper.
NO_SWEEP = ContextConfig(max_references=0, max_idle_time=0, cleanup_interval=3600)
TABLE_CRC = zlib.crc32(dask_tasks.table_bytes())


def _env() -> dict[str, str]:
    """The environment of the processes a test starts: the workers import dask_tasks."""
    env = {k: v for k, v in os.environ.items() if k != shmctx.dask.ENV_NAMESPACES}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(APPS), env.get("PYTHONPATH", "")) if p)
    return env


def _start(args: list[str], log: Path, **kw) -> subprocess.Popen:
    """``python ARGS`` in a session of its own (``kill_session`` ends it), its output
    added to ``log``: the two nanny-less workers of a test share one."""
    return spawn_in_session([sys.executable, *args], log, env=_env(), append=True, **kw)


class _Cluster:
    def __init__(self, proc: subprocess.Popen, log: Path) -> None:
        self.proc = proc
        self.log_path = log
        line = proc.stdout.readline()
        assert line, f"the cluster process exited ({proc.wait()}):\n{self.log()}"
        self.address = json.loads(line)["address"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def scale(self, n: int) -> None:
        """``cluster.scale(n)`` in the cluster process; returns once n workers run."""
        self.proc.stdin.write(f"scale {n}\n")
        self.proc.stdin.flush()
        assert json.loads(self.proc.stdout.readline()) == {"workers": n}, self.log()

    def close(self) -> None:
        """``cluster.close()`` in the cluster process, which must then exit cleanly."""
        self.proc.stdin.write("close\n")
        self.proc.stdin.flush()
        assert json.loads(self.proc.stdout.readline()) == {"closed": True}, self.log()
        assert self.proc.wait(timeout=30) == 0, self.log()


@contextmanager
def _cluster(tmp_path: Path, n_workers: int) -> Iterator[_Cluster]:
    """A LocalCluster of ``n_workers`` nanny-supervised worker processes (0: a scheduler
    only) in a process of its own; whatever is left of it is SIGKILLed at the end."""
    proc = _start([str(APPS / "dask_cluster.py"), str(n_workers)], tmp_path / "cluster.log",
                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield _Cluster(proc, tmp_path / "cluster.log")
    finally:
        kill_session(proc)


def _workers(client: Client, n: int, exclude: set[int] = frozenset()) -> dict[str, int]:
    """{worker address: pid} once exactly ``n`` workers run, none of them in ``exclude``."""
    def ready() -> dict[str, int] | None:
        try:
            pids = client.run(os.getpid)
        except OSError:  # a worker went away between the scheduler's list and the call
            return None
        return pids if len(pids) == n and not exclude & set(pids.values()) else None
    return wait_for(ready, 30, f"{n} workers, none of {sorted(exclude)}")


def _read_on_each(client: Client, workers: dict[str, int], inits: Path,
                  per_worker: int) -> list[dict]:
    """``per_worker`` concurrent ``read_table`` tasks pinned to each worker."""
    futures = [client.submit(dask_tasks.read_table, str(inits), i, workers=[addr], pure=False)
               for addr in workers for i in range(per_worker)]
    return client.gather(futures)


def _init_count(inits: Path) -> int:
    return len(list(inits.iterdir()))


def _holders(observer: ContextManager) -> dict[int, int]:
    return {pid: n for c in observer.contexts() if c.name == "table"
            for pid, n in c.holders.items()}


def _segments(ns: str) -> list[str]:
    """The context segments of ``ns`` in /dev/shm (not the table, not semaphores)."""
    return [o for o in _shm.namespace_objects(ns)
            if not o.startswith("sem.") and o != _shm.table_name(ns).lstrip("/")]


def _assert_one_copy(results: list[dict], workers: dict[str, int], ns: str,
                     inits: Path) -> None:
    assert {r["pid"] for r in results} == set(workers.values())
    assert all(r["crc"] == TABLE_CRC and r["namespace"] == ns for r in results)
    assert _init_count(inits) == 1, "init ran more than once on this host"
    assert len(_segments(ns)) == 1, _shm.namespace_objects(ns)
    managers: dict[int, set[int]] = {}
    for r in results:
        managers.setdefault(r["pid"], set()).add(r["manager"])
    assert all(len(ids) == 1 for ids in managers.values()), \
        f"a worker's threads must share one manager: {managers}"


def test_nanny_cluster_shares_one_copy_per_host_and_reclaims_a_killed_worker(ns, tmp_path):
    """A LocalCluster of 4 worker processes (processes=True, threads_per_worker=2): init
    once, one segment; a worker SIGKILLed while a task holds a reference is restarted by
    its nanny and its reference reclaimed at once; closing the cluster leaves nothing.

    The plugin is registered before the cluster scales to its 4 workers: their nannies get
    it before they start their workers, which then need no restart (and the test no
    second start of 4 processes). Registering on running workers, which restarts them, is
    what the next test and the example do."""
    inits = tmp_path / "inits"
    inits.mkdir()
    with _cluster(tmp_path, 0) as cluster:
        with Client(cluster.address, timeout=30) as client:
            plugin = HostContexts(namespace=ns, config=NO_SWEEP)
            client.register_plugin(plugin)
            cluster.scale(4)
            workers = _workers(client, 4)
            assert f"nanny-plugin-{plugin.name}-restart" not in cluster.log()

            # Four tasks per worker (two threads each) ask for the table at once.
            results = _read_on_each(client, workers, inits, 4)
            _assert_one_copy(results, workers, ns, inits)
            assert sum(not r["existed"] for r in results) == 1

            # Registering again (another client would) changes nothing: no restart.
            client.register_plugin(HostContexts(namespace=ns, config=NO_SWEEP))
            assert _workers(client, 4) == workers

            observer = ContextManager(namespace=ns, create=False)
            try:
                assert _holders(observer) == {}
                victim_addr, victim = sorted(workers.items())[0]
                held = client.submit(dask_tasks.hold, workers=[victim_addr], pure=False)
                wait_for(lambda: _holders(observer) == {victim: 1}, 30,
                         "the task to hold the table")
                os.kill(victim, signal.SIGKILL)
                # The sweep runs hourly: only the nanny, told of its worker's exit,
                # can have released the reference.
                wait_for(lambda: _holders(observer) == {}, 10,
                         "the nanny to reclaim its dead worker's reference")
                held.cancel()  # pinned to the dead worker's address: it never runs again
                restarted = _workers(client, 4, exclude={victim})
                (new_addr, new_pid), = set(restarted.items()) - set(workers.items())
                again = client.submit(dask_tasks.read_table, str(inits), 99,
                                      workers=[new_addr], pure=False).result()
                assert again["pid"] == new_pid and again["existed"]
                assert again["crc"] == TABLE_CRC and _init_count(inits) == 1
                assert [c.refcount for c in observer.contexts()] == [0]
            finally:
                observer.close()
        wait_for(lambda: (f"distributed.shmctx - INFO - reclaimed 1 reference(s) of dead "
                          f"worker pid {victim} in namespace {ns!r}") in cluster.log(),
                 20, "the nanny's reclaim line")
        cluster.close()
        assert _shm.namespace_objects(ns) == [], cluster.log()
        # shmctx's own line, routed into distributed's log by the plugin.
        assert f"namespace {ns!r}: pid {cluster.proc.pid} was the last process attached; " \
               "namespace unlinked" in cluster.log()


def test_unregistering_restarts_the_workers_without_the_namespace(ns, tmp_path):
    inits = tmp_path / "inits"
    inits.mkdir()
    with _cluster(tmp_path, 1) as cluster:
        with Client(cluster.address, timeout=30) as client:
            plain = _workers(client, 1)
            plugin = HostContexts(namespace=ns)
            client.register_plugin(plugin)
            workers = _workers(client, 1, exclude=set(plain.values()))
            _assert_one_copy(_read_on_each(client, workers, inits, 2), workers, ns, inits)

            # The same namespace with another config: refused, naming both configs. That
            # registration stays with the scheduler until removed, and removing it leaves
            # the first one's set-up as it was: same worker, same data.
            other = HostContexts(namespace=ns, config=NO_SWEEP)
            with pytest.raises(InvalidConfigError) as refused:
                client.register_plugin(other)
            message = str(refused.value)
            assert repr(NO_SWEEP) in message and repr(SERVICE_DEFAULTS) in message, message
            assert "cleanup_interval: 3600.0 != 60.0" in message, message
            assert f"unregister_worker_plugin({other.name!r}, nanny=True)" in message, message
            client.unregister_worker_plugin(other.name, nanny=True)
            assert _workers(client, 1) == workers
            _assert_one_copy(_read_on_each(client, workers, inits, 2), workers, ns, inits)

            client.unregister_worker_plugin(plugin.name, nanny=True)
            assert _shm.namespace_objects(ns) == [], cluster.log()
            restarted = _workers(client, 1, exclude=set(workers.values()))
            (addr, _pid), = restarted.items()
            error = client.submit(dask_tasks.manager_error, workers=[addr], pure=False).result()
            assert error is not None and "HostContexts" in error
        cluster.close()
    assert _shm.namespace_objects(ns) == []


def test_nanny_less_workers_are_peers(ns, tmp_path):
    """Two ``dask worker --no-nanny`` processes with PeerContexts: init once for both; a
    SIGKILLed worker's reference is reclaimed by the other's sweeper; the last worker to
    stop unlinks the namespace."""
    inits = tmp_path / "inits"
    inits.mkdir()
    log = tmp_path / "workers.log"
    procs: list[subprocess.Popen] = []
    with _cluster(tmp_path, 0) as cluster:
        try:
            for _ in range(2):
                procs.append(_start(["-m", "distributed.cli.dask_worker", cluster.address,
                                     "--no-nanny", "--nthreads", "2", "--host", "127.0.0.1"],
                                    log))
            with Client(cluster.address, timeout=30) as client:
                workers = _workers(client, 2)
                assert set(workers.values()) == {p.pid for p in procs}
                client.register_plugin(PeerContexts(
                    namespace=ns, config=ContextConfig(max_references=0, max_idle_time=0,
                                                       cleanup_interval=0.2)))
                _assert_one_copy(_read_on_each(client, workers, inits, 4), workers, ns,
                                 inits)

                observer = ContextManager(namespace=ns, create=False)
                try:
                    (victim_addr, victim), (_, survivor) = sorted(workers.items())
                    held = client.submit(dask_tasks.hold, workers=[victim_addr], pure=False)
                    wait_for(lambda: _holders(observer) == {victim: 1}, 30,
                             "the task to hold the table")
                    os.kill(victim, signal.SIGKILL)
                    wait_for(lambda: _holders(observer) == {}, 10,
                             "the surviving peer's sweeper to reclaim the reference")
                    held.cancel()
                    _workers(client, 1, exclude={victim})
                finally:
                    observer.close()
            # The survivor stops (SIGTERM: the worker closes, its plugin's teardown runs):
            # the last process attached, it unlinks the namespace.
            os.kill(survivor, signal.SIGTERM)
            assert next(p for p in procs if p.pid == survivor).wait(timeout=30) == 0, \
                log.read_text(errors="replace")
            assert _shm.namespace_objects(ns) == [], log.read_text(errors="replace")
        finally:
            for p in procs:
                kill_session(p)
        cluster.close()


def test_documented_example_runs_with_its_one_command(ns, tmp_path):
    readme = (EXAMPLE / "README.md").read_text()
    assert "\npython run.py\n" in readme
    env = _env()
    env["SHMCTX_NAMESPACE"] = ns
    proc = subprocess.run([sys.executable, "run.py"], cwd=EXAMPLE, env=env, timeout=90,
                          capture_output=True, text=True, start_new_session=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "the table was built 1 time(s) on this host" in proc.stdout, proc.stdout
    assert "all correct" in proc.stdout, proc.stdout
    assert _shm.namespace_objects(ns) == []


# A script that ends without closing its cluster: distributed closes it in an exit handler,
# once the interpreter has shut its thread pools down, and after the exit handler of the
# plugin's own manager has run (while the workers were still attached).
SCRIPT_WITHOUT_CLOSE = """
import sys
import time

from distributed import Client, LocalCluster

from shmctx import ContextManager
from shmctx.dask import HostContexts, PeerContexts

import dask_tasks

if __name__ == "__main__":
    ns, inits, plugin = sys.argv[1:]
    nanny = plugin == "HostContexts"
    # (Workers in this process talk in-process, and take no host.)
    cluster = LocalCluster(n_workers=2, processes=nanny, threads_per_worker=2,
                           dashboard_address=None, **({"host": "127.0.0.1"} if nanny else {}))
    client = Client(cluster)
    client.register_plugin((HostContexts if nanny else PeerContexts)(namespace=ns))
    results = client.gather([client.submit(dask_tasks.read_table, inits, i, pure=False)
                             for i in range(8)])
    print(sorted({r["pid"] for r in results}), flush=True)
    if nanny:  # a task still holds a reference when the script ends
        client.submit(dask_tasks.hold, pure=False)
        with ContextManager(namespace=ns, create=False, sweeper=False) as observer:
            deadline = time.monotonic() + 30
            while not any(c.holders for c in observer.contexts()):
                assert time.monotonic() < deadline, "the task never took its reference"
                time.sleep(0.01)
        print("held", flush=True)
"""


@pytest.mark.parametrize("plugin", ["HostContexts", "PeerContexts"])
def test_a_script_that_never_closes_its_cluster_leaves_nothing(ns, tmp_path, plugin):
    """The plugin's teardown runs when the thread pools no longer take work, and after its
    manager was closed at exit while workers were still attached (so that close did not
    unlink): the teardown must still stop the workers, reclaim, and unlink, quietly."""
    inits = tmp_path / "inits"
    inits.mkdir()
    script = tmp_path / "script.py"
    script.write_text(SCRIPT_WITHOUT_CLOSE)
    proc = subprocess.run([sys.executable, str(script), ns, str(inits), plugin],
                          env=_env(), timeout=90, capture_output=True, text=True,
                          start_new_session=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    if plugin == "HostContexts":
        assert "held" in proc.stdout, out  # worker processes were attached at exit
    assert _init_count(inits) == 1, out
    assert "Traceback" not in proc.stderr and "failed to teardown" not in proc.stderr, out
    assert _shm.namespace_objects(ns) == [], out


# --- without a cluster ------------------------------------------------------------------


def test_manager_outside_a_worker_says_how_to_set_it_up():
    assert shmctx.dask.namespaces() == []
    with pytest.raises(ContextError, match=r"HostContexts.*PeerContexts.*create=False"):
        shmctx.dask.manager()
    with pytest.raises(ContextError, match="'nope' is not set up for this worker"):
        shmctx.dask.manager("nope")


@pytest.mark.parametrize("cls", [HostContexts, PeerContexts])
def test_plugins_check_their_arguments_and_pickle(cls):
    with pytest.raises(InvalidConfigError, match="namespace"):
        cls(namespace="two words")
    with pytest.raises(InvalidConfigError, match="config must be a ContextConfig"):
        cls(namespace="ok", config={"max_references": 0})
    p = cls(namespace="myapp")
    assert p.config is SERVICE_DEFAULTS and p.idempotent is True
    assert isinstance(p, NannyPlugin if cls is HostContexts else WorkerPlugin)
    # A stable name per namespace and config: registering it again (from any client) is
    # a no-op, whichever way an equal config is spelled; with another config it is not.
    same = ContextConfig(max_references=0, max_idle_time=timedelta(0))
    assert p.name == cls(namespace="myapp").name == cls(namespace="myapp", config=same).name
    assert p.name != cls(namespace="other").name
    q = pickle.loads(pickle.dumps(cls(namespace="myapp", config=NO_SWEEP)))
    assert (type(q), q.namespace, q.config) == (cls, "myapp", NO_SWEEP)
    assert q.name == cls(namespace="myapp", config=NO_SWEEP).name != p.name


def test_host_contexts_restarts_the_workers_it_sets_up():
    # The worker reads the namespace from the environment it starts with.
    assert HostContexts(namespace="myapp").restart is True
