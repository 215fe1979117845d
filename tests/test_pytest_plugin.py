"""The pytest plugin, tested with real inner pytest sessions (``pytester``, in separate
processes, under real pytest-xdist workers) and, for its building blocks, in-process.

Each inner run gets its own namespace prefix (``-o shmctx_namespace_prefix=...``), so the
outer test can find everything of the run in /dev/shm without trusting the plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from shmctx import (
    ContextConfig,
    ContextManager,
    InvalidContextTypeError,
    _shm,
)
from shmctx.pytest_plugin import RUN_CONFIG, SessionValueError, SessionValues

# Shared by the inner runs: every worker appends what it saw to out/<pid>.jsonl, and the
# controller records the run's namespace and the holders of its contexts at the end.
INNER_CONFTEST = '''
import json, os, pathlib, time
import pytest
from shmctx import ContextManager, _shm
from shmctx.pytest_plugin import run_namespace

HERE = pathlib.Path(__file__).parent
OUT = HERE / "out"


def log_line(name, text):
    with open(HERE / name, "a") as f:
        f.write(text + "\\n")


@pytest.fixture
def record():
    OUT.mkdir(exist_ok=True)
    def write(**seen):
        log_line(f"out/{os.getpid()}.jsonl", json.dumps(seen))
    return write


@pytest.fixture(scope="session")
def all_workers_ready(pytestconfig):
    """Hold each worker's first test until every worker got there, so that they all
    ask for the session values at the same time."""
    want = pytestconfig.workerinput["workercount"]
    (HERE / "arrived").mkdir(exist_ok=True)
    (HERE / "arrived" / str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while len(os.listdir(HERE / "arrived")) < want:
        assert time.monotonic() < deadline, "not every worker started"
        time.sleep(0.005)


def pytest_sessionfinish(session):
    config = session.config
    if hasattr(config, "workerinput"):
        return
    ns = run_namespace(config)
    holders = None
    if _shm.namespace_objects(ns):
        with ContextManager(namespace=ns, sweeper=False) as m:
            holders = {i.name: i.holders for i in m.contexts()}
    (HERE / "run.json").write_text(json.dumps({"namespace": ns, "holders": holders}))
'''


@pytest.fixture
def prefix():
    """A namespace prefix unique to this test; fails it if any namespace with the
    prefix is left in /dev/shm (and removes those leftovers)."""
    name = f"pt{uuid.uuid4().hex[:10]}"
    yield name
    left = _leftovers(name)
    for entry in left:
        _shm.remove_host_object(entry)
    assert not left, f"the inner run left objects in /dev/shm: {left}"


def _leftovers(prefix: str) -> list[str]:
    head = f"{_shm.PREFIX}{prefix}"
    return sorted(e for e in os.listdir(_shm.SHM_DIR) if e.removeprefix("sem.").startswith(head))


def _run(pytester: pytest.Pytester, prefix: str, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-o", f"shmctx_namespace_prefix={prefix}", *args,
        timeout=100,
    )


def _seen(pytester: pytest.Pytester) -> list[dict]:
    return [json.loads(line) for f in sorted((pytester.path / "out").iterdir())
            for line in f.read_text().splitlines()]


def _lines(pytester: pytest.Pytester, name: str) -> list[str]:
    path = pytester.path / name
    return path.read_text().splitlines() if path.exists() else []


def _run_info(pytester: pytest.Pytester) -> dict:
    return json.loads((pytester.path / "run.json").read_text())


def _assert_all_returned(info: dict) -> None:
    assert info["holders"], "the run created no contexts"
    held = {name: h for name, h in info["holders"].items() if any(h.values())}
    assert not held, f"references still held at the end of the run: {held}"


def test_xdist_three_workers_build_once_and_share(pytester, prefix):
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile(test_shared='''
        import hashlib, mmap, os
        import pytest
        from shmctx.pytest_plugin import SessionValueError
        from conftest import log_line

        def make_dataset():
            log_line("factory-dataset.log", str(os.getpid()))
            return {"rows": list(range(2000)), "token": os.urandom(16).hex()}

        def make_blob():
            log_line("factory-blob.log", str(os.getpid()))
            return os.urandom(1 << 20)

        def make_broken():
            log_line("factory-broken.log", str(os.getpid()))
            raise ValueError("no dataset today")

        @pytest.mark.parametrize("i", range(9))
        def test_shared(i, all_workers_ready, shmctx_once, shmctx_manager, record):
            value = shmctx_once("dataset", make_dataset)
            blob = shmctx_once.buffer("blob", make_blob)
            with pytest.raises((ValueError, SessionValueError), match="no dataset today") as e:
                shmctx_once("broken", make_broken)
            record(pid=os.getpid(), namespace=shmctx_manager.namespace,
                   token=value["token"], rows_ok=value["rows"] == list(range(2000)),
                   blob=hashlib.sha256(blob).hexdigest(), blob_len=len(blob),
                   blob_readonly=blob.readonly,
                   blob_in_shm=isinstance(blob.obj, mmap.mmap),
                   broken=type(e.value).__name__)
    ''')
    result = _run(pytester, prefix, "-n", "3")
    result.assert_outcomes(passed=9)

    seen = _seen(pytester)
    assert len(seen) == 9
    assert len({s["pid"] for s in seen}) == 3, "not every worker ran tests"
    # Built exactly once in the whole run, counted outside the plugin.
    assert len(_lines(pytester, "factory-dataset.log")) == 1
    assert len(_lines(pytester, "factory-blob.log")) == 1
    broken_pids = _lines(pytester, "factory-broken.log")
    assert len(broken_pids) == 1
    # Every worker saw the same value, the buffer zero-copy over shared memory.
    assert len({s["token"] for s in seen}) == 1
    assert all(s["rows_ok"] for s in seen)
    assert len({s["blob"] for s in seen}) == 1
    assert all(s["blob_len"] == 1 << 20 and s["blob_readonly"] and s["blob_in_shm"]
               for s in seen)
    # The factory's own process got its exception, every other one the recorded text.
    for s in seen:
        want = "ValueError" if str(s["pid"]) == broken_pids[0] else "SessionValueError"
        assert s["broken"] == want, s
    # One namespace for the whole run, owned and unlinked by the controller.
    info = _run_info(pytester)
    assert {s["namespace"] for s in seen} == {info["namespace"]}
    assert info["namespace"].startswith(prefix + "-")
    _assert_all_returned(info)
    assert not _leftovers(prefix)


def test_plain_run_without_xdist(pytester, prefix):
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile(test_plain='''
        import os
        from shmctx import MemoryContextConfig, _shm
        from shmctx.pytest_plugin import run_namespace
        from conftest import log_line

        def make():
            log_line("factory.log", str(os.getpid()))
            return [os.urandom(8).hex(), 42]

        def test_0_nothing_created_before_first_use(pytestconfig):
            assert run_namespace(pytestconfig).startswith(pytestconfig.getini(
                "shmctx_namespace_prefix") + "-")
            assert _shm.namespace_objects(run_namespace(pytestconfig)) == []

        def test_1_value(shmctx_once, record):
            record(pid=os.getpid(), value=shmctx_once("v", make))

        def test_2_value_again(shmctx_once, record):
            record(pid=os.getpid(), value=shmctx_once("v", make))

        KEPT = []  # handles kept to the end of the run (a dropped one gives its back)

        def test_3_manager_direct(shmctx_manager):
            # A reference the test never returns: the end of the run removes it anyway.
            ctx, existed = shmctx_manager.get_or_create_context(
                "direct", MemoryContextConfig(size=64))
            KEPT.append(ctx)
            ctx.put({"n": 1})
            assert ctx.get() == {"n": 1} and not existed
            assert _shm.namespace_objects(shmctx_manager.namespace)
    ''')
    result = _run(pytester, prefix)
    result.assert_outcomes(passed=4)
    seen = _seen(pytester)
    assert len(_lines(pytester, "factory.log")) == 1
    assert len(seen) == 2 and seen[0]["value"] == seen[1]["value"]
    info = _run_info(pytester)
    assert info["holders"]["direct"], "the unreturned reference should still be held"
    assert not _leftovers(prefix)


def test_crashed_workers_do_not_wedge_the_run(pytester, prefix):
    """Two crashes under -n 2: a worker dies inside the factory (another process builds
    the value instead), and one dies holding the value's references (the controller
    reclaims them when xdist reports the crash)."""
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile(test_crash='''
        import os
        import pytest
        from conftest import HERE, log_line

        def make():
            log_line("factory.log", str(os.getpid()))
            marker = HERE / "crashed-in-factory"
            if not marker.exists():
                marker.touch()
                os._exit(1)
            return os.urandom(16).hex()

        @pytest.mark.parametrize("i", range(6))
        def test_value(i, shmctx_once, record):
            record(pid=os.getpid(), value=shmctx_once("token", make))

        def test_die_holding_references(shmctx_once):
            shmctx_once("token", make)
            os._exit(1)
    ''')
    result = _run(pytester, prefix, "-n", "2")
    result.assert_outcomes(passed=5, failed=2)
    result.stdout.fnmatch_lines(["*crashed while running*test_die_holding_references*"])
    assert len(_lines(pytester, "factory.log")) == 2  # the crashed attempt + the real one
    seen = _seen(pytester)
    assert len(seen) == 5 and len({s["value"] for s in seen}) == 1
    _assert_all_returned(_run_info(pytester))
    assert not _leftovers(prefix)


def test_disabled_with_p_no_shmctx(pytester, prefix):
    pytester.makepyfile(test_off='''
        def test_not_loaded(request):
            assert not request.config.pluginmanager.hasplugin("shmctx")

        def test_fixture_missing(shmctx_manager):
            pass
    ''')
    result = _run(pytester, prefix, "-p", "no:shmctx")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*fixture 'shmctx_manager' not found*"])
    assert not _leftovers(prefix)


def test_bad_prefix_is_a_usage_error(pytester):
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_inprocess("-o", "shmctx_namespace_prefix=no/slash")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*shmctx_namespace_prefix must be 1-40 characters*"])


def test_namespaces_of_dead_runs_are_removed(pytester, prefix):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          check=True, capture_output=True, text=True)
    stale, alive = f"{prefix}-{int(dead.stdout)}-0badf00d", f"{prefix}-1-0badf00d"
    for ns in (stale, alive):  # pid 1 always runs
        ContextManager(RUN_CONFIG, namespace=ns, sweeper=False).close()
    pytester.makepyfile("def test_x(): pass")
    try:
        result = pytester.runpytest_inprocess("-o", f"shmctx_namespace_prefix={prefix}")
        result.assert_outcomes(passed=1)
        assert _shm.namespace_objects(stale) == []
        assert _shm.namespace_objects(alive) != []
    finally:
        _shm.remove_namespace_objects(alive)


# --- SessionValues in one process -----------------------------------------------------


@pytest.fixture
def two_managers(ns):
    cfg = ContextConfig(max_references=0, max_idle_time=0, cleanup_interval=0)
    a = ContextManager(cfg, namespace=ns, sweeper=False)
    b = ContextManager(cfg, namespace=ns, sweeper=False)
    yield a, b
    b.close()
    a.unlink(force=True)


def test_session_values_built_once_and_released(two_managers):
    a, b = two_managers
    calls = []

    def make():
        calls.append(1)
        return {"x": [1, 2, 3]}

    va, vb = SessionValues(a), SessionValues(b)
    assert va("k", make) == vb("k", make) == {"x": [1, 2, 3]}
    assert va("k", make) is va("k", make)  # cached in the process
    assert bytes(vb.buffer("blob", lambda: bytearray(b"abc"))) == b"abc"
    assert bytes(va.buffer("empty", lambda: b"")) == b""
    assert len(calls) == 1
    assert any(any(i.holders.values()) for i in a.contexts())
    va.release()
    vb.release()
    assert not any(any(i.holders.values()) for i in a.contexts())


def test_session_values_errors(two_managers):
    a, b = two_managers
    va, vb = SessionValues(a), SessionValues(b)
    calls = []

    def bad():
        calls.append(1)
        return object()

    with pytest.raises(TypeError, match="msgpack cannot encode"):
        va("bad", bad)
    with pytest.raises(SessionValueError, match="msgpack cannot encode"):
        vb("bad", bad)
    assert len(calls) == 1
    with pytest.raises(TypeError, match="bytes-like"):
        va.buffer("notbytes", lambda: 12)
    va("kind", lambda: 1)
    with pytest.raises(InvalidContextTypeError, match="cannot read it"):
        vb.buffer("kind", lambda: b"x")
    with pytest.raises(InvalidContextTypeError, match="non-empty str"):
        va("", lambda: 1)
    with pytest.raises(InvalidContextTypeError, match="longer than"):
        va("k" * 97, lambda: 1)
    with pytest.raises(TypeError, match="callable"):
        va("k", 3)
    va.release()
    vb.release()
