"""Running out of room: a full /dev/shm, and a process at its descriptor limit.

A full /dev/shm is made for real: each test runs its steps in a child process with a
private mount namespace (``unshare --mount``) and a tiny tmpfs of its own mounted on
/dev/shm, which the library, posix_ipc and glibc's sem_open all use; the host's /dev/shm
is never touched. A SIGBUS in the child (a page of shared memory touched for the first
time when none is left) shows as return code -7.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

PRELUDE = '''
import errno, json, os, sys
from shmctx import ContextConfig, ContextError, ContextManager, MemoryContextConfig, _shm
from shmctx import _layout as L

NS = sys.argv[1]
FILLER = os.path.join(_shm.SHM_DIR, "filler")


def fill(leave=0):
    """Take every free byte of the (private) /dev/shm but ``leave``."""
    st = os.statvfs(_shm.SHM_DIR)
    fd = os.open(FILLER, os.O_CREAT | os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize - leave)
    finally:
        os.close(fd)


def left():
    """What is in /dev/shm besides the filler."""
    return sorted(e for e in os.listdir(_shm.SHM_DIR) if e != "filler")


def refused(call):
    """The message of the ContextError ``call`` raises, or None if it succeeds."""
    try:
        call()
    except ContextError as e:
        return str(e)
    return None
'''


def in_private_shm(ns: str, body: str, size: str = "4m") -> dict:
    """Run ``body`` (after PRELUDE) in a child with its own ``size`` tmpfs on /dev/shm
    (the default: room for a table of the default geometry, 1.3 MB, and more); it prints
    one JSON line as its result."""
    script = PRELUDE + textwrap.dedent(body)
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f'mount -t tmpfs -o size={size} tmpfs /dev/shm && exec "$0" -c "$1" "$2"',
         sys.executable, script, ns],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, (
        f"child exited with {proc.returncode} (-7 is SIGBUS)\n{proc.stdout}\n{proc.stderr}"
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_creating_a_namespace_on_a_full_dev_shm_is_a_clear_error_leaving_nothing(ns):
    """No room at all, room for less than the table, room for the table but not its
    semaphores: each time a ContextError naming ENOSPC and the bytes needed and free, and
    nothing left behind (no staging table, no semaphore, no glibc temporary). A table
    created sparse and filled in through its mapping would die of SIGBUS instead."""
    out = in_private_shm(ns, '''
        table = L.Geometry(1024, 256).total
        results = []
        for leave in (0, table - 4096, table + 4096):
            fill(leave)
            results.append([leave, refused(lambda: ContextManager(namespace=NS)), left()])
            os.unlink(FILLER)
        with ContextManager(namespace=NS) as m:  # with room, the same call works
            m.get_or_create_context("a", MemoryContextConfig(size=4096))
            m.unlink(force=True)
        print(json.dumps({"results": results, "after": left()}))
    ''')
    for leave, error, remains in out["results"]:
        assert error is not None and "ENOSPC" in error, (leave, error)
        assert "bytes needed" in error and "bytes free in /dev/shm" in error, error
        assert remains == [], (leave, remains)
    assert out["after"] == []


def test_a_full_dev_shm_never_kills_a_process_using_an_existing_namespace(ns):
    """The namespace exists, then /dev/shm fills up. Everything that needs no new object
    keeps working, in this process and in a new one: size-0 contexts (new index and slot
    pages), more managers (new process entries), ctx-inspect (reads every page). What
    does need one (a context's memory, its ctx.lock semaphore) is a clear ENOSPC
    ContextError that leaves nothing behind, and works once there is room again."""
    out = in_private_shm(ns, '''
        m = ContextManager(namespace=NS, sweeper=False)
        before = left()
        fill()
        for i in range(300):  # names land all over the index
            ctx, _ = m.get_or_create_context(f"zero-{i}")
            m.return_context(ctx)
        others = [ContextManager(namespace=NS, sweeper=False) for _ in range(20)]
        pid = os.fork()
        if pid == 0:  # another process attaches and creates
            try:
                with ContextManager(namespace=NS, sweeper=False) as c:
                    c.return_context(c.get_or_create_context("from-child")[0])
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        from shmctx._inspect import main as inspect
        with open(os.devnull, "w") as null:
            real, sys.stdout = sys.stdout, null
            try:
                inspected = inspect([NS])
            finally:
                sys.stdout = real
        memory = refused(lambda: m.get_or_create_context("big", MemoryContextConfig(size=4096)))
        lock_ctx, _ = m.get_or_create_context("locked")
        lock = refused(lambda: lock_ctx.lock.acquire())
        after_refusals = left()
        checks = m.check()
        os.unlink(FILLER)
        with lock_ctx.lock:
            pass
        m.return_context(lock_ctx)
        big, _ = m.get_or_create_context("big", MemoryContextConfig(size=4096))
        m.return_context(big)
        for o in others:
            o.close()
        m.unlink(force=True)
        print(json.dumps({"status": status, "inspect": inspected, "memory": memory,
                          "lock": lock, "before": before, "after_refusals": after_refusals,
                          "checks": checks, "end": left()}))
    ''')
    assert out["status"] == 0
    assert out["inspect"] == 0
    for error in (out["memory"], out["lock"]):
        assert error is not None and "ENOSPC" in error and "bytes needed" in error, error
    assert out["after_refusals"] == out["before"]  # no segment, no semaphore left
    assert out["checks"] == []
    assert out["end"] == []


EMFILE_SCRIPT = '''
import errno, json, os, resource, sys
from shmctx import ContextManager, ContextNotFoundError, MemoryContextConfig, _shm

NS = sys.argv[1]
SOFT, HARD = resource.getrlimit(resource.RLIMIT_NOFILE)
MEM = MemoryContextConfig(size=4096)


def fds():
    return sorted(os.listdir("/proc/self/fd"))


def at_limit(op, extra):
    """Run ``op`` with descriptors only up to ``extra`` past the lowest free one."""
    probe = os.dup(0)
    os.close(probe)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe + extra, HARD))
    try:
        return op(), None
    except OSError as e:
        return None, e
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT, HARD))


m = ContextManager(namespace=NS, sweeper=False)
m.return_context(m.get_or_create_context("a", MEM)[0])


def refcount(name):
    return [i.refcount for i in m.contexts() if i.name == name]


def leaked_refs():
    """None if nobody holds "a" (the failed call kept no reference), else its count."""
    return None if refcount("a") == [0] else refcount("a")


def attach(i):
    return lambda: ContextManager(namespace=NS, sweeper=False), lambda r: r.close(), None


def new_namespace(i):
    name = f"{NS}-{i}"

    def done(r):
        r.unlink(force=True)

    def after_failure():
        # Failing after the table was published leaves a sound namespace, like any
        # manager that closes without unlinking; failing before leaves nothing.
        if _shm.namespace_objects(name):
            with ContextManager(namespace=name, sweeper=False) as again:
                problems = again.check()
                again.unlink(force=True)
            if problems:
                return problems
        return _shm.namespace_objects(name) or None
    return lambda: ContextManager(namespace=name, sweeper=False), done, after_failure


def first_map(i):
    other = ContextManager(namespace=NS, sweeper=False)
    return (lambda: other.get_context("a"),
            lambda ctx: (other.return_context(ctx), other.close()),
            lambda: (leaked_refs(), other.close())[0])


def create(i):
    name = f"c{i}"
    other = ContextManager(namespace=NS, sweeper=False)  # its mappings go with it

    def done(ctx):
        other.return_context(ctx)
        other.close_context(name)
        other.close()

    def after_failure():
        other.close()
        try:
            m.return_context(m.get_context(name))
            return "created anyway"
        except ContextNotFoundError:
            return None
    return lambda: other.get_or_create_context(name, MEM)[0], done, after_failure


def ctx_lock(i):
    other = ContextManager(namespace=NS, sweeper=False)
    ctx = other.get_context("a")
    return (lambda: ctx.lock.acquire(),
            lambda _: (ctx.lock.release(), other.return_context(ctx), other.close()),
            lambda: (other.return_context(ctx), other.close(), leaked_refs())[2])


report = {}
for kind in (attach, new_namespace, first_map, create, ctx_lock):
    outcomes = []
    for extra in range(10):
        start = fds()
        objects = len(_shm.namespace_objects(NS))
        op, done, after_failure = kind(extra)
        ready = fds()
        result, error = at_limit(op, extra)
        if error is None:
            done(result)
            result = None  # a handle keeps its mapping alive, returned or not
            outcomes.append(["ok", None, fds() == start, None])
        else:
            leaked = fds() != ready  # nothing the failed call opened may remain
            state = after_failure() if after_failure else None
            outcomes.append([error.errno, str(error), not leaked and fds() == start, state])
        # A failed call leaves no object (a ctx.lock that worked stays, as it should).
        outcomes[-1].append(error is None or len(_shm.namespace_objects(NS)) == objects)
    report[kind.__name__] = outcomes
report["check"] = m.check()
report["refcount"] = refcount("a")
m.unlink(force=True)
print(json.dumps(report))
'''


@pytest.mark.parametrize("pure", [False, True], ids=["default", "pure-python"])
def test_descriptor_limit_while_attaching_is_emfile_and_leaks_nothing(new_ns, pure):
    """At every descriptor budget from none to enough, attaching a namespace, creating
    one, mapping a context for the first time, creating a context and opening its
    ctx.lock each either work or raise OSError(EMFILE) naming the limit; nothing is
    leaked: no descriptor, no reference, no object. (What it catches: a failed attach
    whose cleanup raises BufferError and leaks two descriptors; a failed first mapping
    that keeps its reference; posix_ipc's EMFILE without an errno.)"""
    ns = new_ns()
    env = {"SHMCTX_PURE_PYTHON": "1"} if pure else {}
    proc = subprocess.run([sys.executable, "-c", EMFILE_SCRIPT, ns], capture_output=True,
                          text=True, timeout=60, env={**__import__("os").environ, **env})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report.pop("check") == []
    assert report.pop("refcount") == [0]
    for kind, outcomes in report.items():
        failures = [o for o in outcomes if o[0] != "ok"]
        assert failures, f"{kind}: never ran out of descriptors"
        assert outcomes[-1][0] == "ok", f"{kind}: {outcomes[-1]}"
        for code, message, fds_same, state, objects_same in outcomes:
            assert fds_same, f"{kind}: descriptors leaked ({code}, {message})"
            assert objects_same, f"{kind}: objects left in /dev/shm ({code}, {message})"
            if code != "ok":
                assert code == 24 and "EMFILE" in message, f"{kind}: {code} {message}"
                assert not state, f"{kind}: {state} after {message}"
