"""ctx-inspect, run as the installed console script against live tables whose references
other real processes hold: text, JSON and msgpack outputs, --check, --gc, --watch, colour,
and every exit code (0 ok, 1 violations, 2 unknown/permission/usage, 3 foreign table)."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager

import msgpack
import posix_ipc
import pytest

from shmctx import ContextConfig, ContextManager, MemoryContextConfig, _shm
from shmctx import _layout as L

# The script installed beside this interpreter: CI runs .venv/bin/pytest without putting
# .venv/bin on PATH.
CLI = shutil.which("ctx-inspect", path=os.path.dirname(sys.executable)) or \
    shutil.which("ctx-inspect")
LT = 0.2  # lock_timeout: the wedged-lock read gives up after this
CFG = ContextConfig(lock_timeout=LT, cleanup_interval=0)
LONG = "a-context-with-a-name-far-too-long-for-a-hundred-column-terminal-" + "x" * 50
DEADLINE = 60  # subprocess timeout: a hang guard only, never a speed assertion

def cli(*args: str, env: dict | None = None, binary: bool = False,
        user: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run the installed console script; no output of it may ever be a traceback."""
    assert CLI, "ctx-inspect is not installed: pip install -e . (it is a console script)"
    full_env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    full_env.update(env or {})
    r = subprocess.run([*(user or []), CLI, *args], capture_output=True, env=full_env,
                       timeout=DEADLINE, text=not binary)
    err = r.stderr if not binary else r.stderr.decode()
    assert "Traceback" not in err, err
    return r


def doc(*args: str) -> dict:
    r = cli(*args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def by_name(d: dict) -> dict:
    return {c["name"]: c for c in d["contexts"]}


def holders(c: dict) -> dict:
    return {h["pid"]: (h["count"], h["alive"]) for h in c["holders"]}


# --- child processes (top level, so spawn can import them) ---------------------------


def _hold(ns: str, names: list[str], ready, done) -> None:
    m = ContextManager(namespace=ns, sweeper=False)
    held = [m.get_context(n) for n in names]
    ready.set()
    done.wait(DEADLINE)
    for c in held:
        m.return_context(c)
    m.close()


def _take_and_die(ns: str, *names: str) -> None:
    m = ContextManager(namespace=ns, sweeper=False)
    for name in names:
        m.get_context(name)
    os._exit(0)  # no close: the references stay recorded for a dead pid


def _attach_and_die(ns: str) -> None:
    ContextManager(CFG, namespace=ns, sweeper=False)
    os._exit(0)


def _wedge(ns: str, ready) -> None:
    m = ContextManager(namespace=ns, sweeper=False)
    m.get_context("alpha")
    m._table.table_lock.acquire()
    ready.set()
    threading.Event().wait()  # until SIGKILLed, the table lock held


@contextmanager
def holding(mp_ctx, ns: str, *plans: list[str]):
    """Processes that each hold references to the contexts named in their plan, until
    the block ends. Yields their pids."""
    done = mp_ctx.Event()
    procs, readies = [], []
    for names in plans:
        ready = mp_ctx.Event()
        p = mp_ctx.Process(target=_hold, args=(ns, names, ready, done))
        p.start()
        procs.append(p)
        readies.append(ready)
    try:
        for ready, p in zip(readies, procs, strict=True):
            assert ready.wait(DEADLINE), f"holder {p.pid} did not start"
        yield [p.pid for p in procs]
    finally:
        done.set()
        for p in procs:
            p.join(DEADLINE)
            if p.is_alive():
                p.kill()
                p.join()


@contextmanager
def manager(ns: str, *contexts: tuple[str, int, str | None]):
    """A table for ``ns`` with ``contexts`` (name, size, parent) created and their
    creating references returned; unlinked at the end."""
    m = ContextManager(CFG, namespace=ns, sweeper=False)
    try:
        for name, size, parent in contexts:
            c, _ = m.get_or_create_context(name, MemoryContextConfig(size=size, parent=parent))
            m.return_context(c)
        yield m
    finally:
        m.unlink(force=True)


def run_child(mp_ctx, target, *args) -> int:
    p = mp_ctx.Process(target=target, args=args)
    p.start()
    p.join(DEADLINE)
    assert not p.is_alive()
    return p.pid


# --- the views -------------------------------------------------------------------------


def test_namespace_view_shows_other_processes_references(ns, mp_ctx):
    with manager(ns, ("alpha", 64 * 1024, None), ("beta", 0, None),
                 (LONG, 3 * 1024 * 1024, None), ("kid", 10, "alpha")), \
            holding(mp_ctx, ns, ["alpha", "alpha", "beta"], ["alpha", LONG]) as (a, b):
        r = cli(ns)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert all(len(ln) <= 100 for ln in lines), max(lines, key=len)
        assert f"namespace {ns}" in lines[0]
        assert "lock_timeout 0.2s" in r.stdout and "contexts 4/1024" in r.stdout
        assert "lock      free" in r.stdout
        row = {ln.split()[0]: ln for ln in lines if ln.split() and ln.split()[0] in
               ("alpha", "beta", "kid")}
        assert f"{a}:2" in row["alpha"] and f"{b}:1" in row["alpha"]
        assert row["alpha"].split()[2] == "3" and "64.0 KiB" in row["alpha"]
        assert f"{a}:1" in row["beta"] and "0 B" in row["beta"]
        assert row["kid"].split()[-1] == "alpha" and "10 B" in row["kid"]
        assert LONG not in r.stdout and LONG[:20] in r.stdout and "…" in r.stdout
        assert "3.0 MiB" in r.stdout
        assert "†" not in r.stdout  # every holder is alive

        wide = cli(ns, "--wide")
        assert wide.returncode == 0 and LONG in wide.stdout

        d = doc(ns)
        assert d["schema"] == 1 and d["namespace"] == ns and d["snapshot"]["locked"] is True
        cs = by_name(d)
        assert set(cs) == {"alpha", "beta", LONG, "kid"}
        assert cs["alpha"]["refs"] == 3 and holders(cs["alpha"]) == {a: (2, True), b: (1, True)}
        assert cs[LONG]["size"] == 3 * 1024 * 1024 and holders(cs[LONG]) == {b: (1, True)}
        assert cs["kid"]["parent"] == "alpha" and cs["kid"]["refs"] == 0
        assert d["usage"]["references"] == 5 and d["usage"]["processes_dead"] == 0
        assert {p["pid"] for p in d["processes"]} >= {a, b}
        assert d["lock"]["owner_pid"] is None and d["sweeper"]["pid"] is None

        packed = cli(ns, "--msgpack", binary=True)
        assert packed.returncode == 0
        m = msgpack.unpackb(packed.stdout)
        assert set(m) == set(d)  # the same document, key for key
        stable = ("name", "refs", "holders", "size", "incarnation", "parent", "state")
        assert [{k: c[k] for k in stable} for c in m["contexts"]] == \
            [{k: c[k] for k in stable} for c in d["contexts"]]


def test_listing_counts_each_namespace(ns, new_ns, mp_ctx):
    other = new_ns()
    with manager(ns, ("alpha", 128, None), ("beta", 0, None)), manager(other), \
            holding(mp_ctx, ns, ["alpha", "beta"]) as (pid,):
        r = cli()
        assert r.returncode == 0, r.stderr
        assert all(len(ln) <= 100 for ln in r.stdout.splitlines())
        row = next(ln for ln in r.stdout.splitlines() if ln.startswith(ns + " "))
        assert row.split()[1:4] == ["2", "2", "2"]  # contexts, references, processes
        assert any(ln.startswith(other + " ") for ln in r.stdout.splitlines())

        listed = {n["namespace"]: n for n in doc()["namespaces"]}
        assert listed[ns]["contexts"] == 2 and listed[ns]["references"] == 2
        assert listed[ns]["processes"] == 2 and listed[ns]["error"] is None
        assert listed[other]["contexts"] == 0 and listed[other]["processes"] == 1

        only = doc("--filter", ns)["namespaces"]
        assert [n["namespace"] for n in only] == [ns]
        assert msgpack.unpackb(cli("--filter", ns, "--msgpack", binary=True).stdout)[
            "namespaces"][0]["references"] == 2
        assert pid in {p["pid"] for p in doc(ns)["processes"]}


def test_sort_filter_limit(ns):
    with manager(ns, ("a1", 10, None), ("a2", 3000, None), ("b1", 20000, None)) as m:
        held = [m.get_context("a1") for _ in range(3)] + [m.get_context("b1")]
        assert [c["name"] for c in doc(ns, "--sort", "size")["contexts"]] == ["b1", "a2", "a1"]
        assert [c["name"] for c in doc(ns, "--sort", "refs")["contexts"]] == ["a1", "b1", "a2"]
        d = doc(ns, "--filter", "a*", "--limit", "1")
        assert [c["name"] for c in d["contexts"]] == ["a1"] and d["matched"] == 2
        r = cli(ns, "--filter", "a*", "--limit", "1")
        assert "1 more (--limit)" in r.stdout and "b1" not in r.stdout
        assert "(no contexts match --filter)" in cli(ns, "--filter", "zz*").stdout
        for c in held:
            m.return_context(c)


# --- dead holders, --gc ----------------------------------------------------------------


def test_dead_holder_is_marked_and_gc_reclaims_it(ns, mp_ctx):
    with manager(ns, ("alpha", 4096, None), ("idle", 0, None), (LONG, 0, None)) as m, \
            holding(mp_ctx, ns, ["alpha", LONG]) as (live,):
        dead = run_child(mp_ctx, _take_and_die, ns, "alpha", LONG)
        r = cli(ns)
        assert r.returncode == 0
        lines = r.stdout.splitlines()
        row = next(ln for ln in lines if ln.startswith("alpha "))
        assert f"{dead}:1†" in row and f"{live}:1" in row and f"{live}:1†" not in row
        # A shortened row loses its name before the mark of a dead holder.
        long_row = next(ln for ln in lines if ln.startswith(LONG[:12]))
        assert LONG not in long_row and f"{dead}:1†" in long_row and len(long_row) <= 100
        assert "2 held by dead processes" in r.stdout and f"--gc {ns}" in r.stdout
        d = doc(ns)
        assert holders(by_name(d)["alpha"]) == {live: (1, True), dead: (1, False)}
        assert d["usage"]["processes_dead"] == 1 and d["usage"]["references_dead"] == 2

        dry = cli(ns, "--gc")
        assert dry.returncode == 0, dry.stderr
        assert f"would reclaim the references of dead pid {dead}" in dry.stdout
        assert "dry run" in dry.stdout
        assert dead in {h["pid"] for h in by_name(doc(ns))["alpha"]["holders"]}  # untouched

        as_json = json.loads(cli(ns, "--gc", "--json").stdout)
        assert as_json["dry_run"] is True and as_json["actions"][0]["target"] == str(dead)

        done = cli(ns, "--gc", "--yes")
        assert done.returncode == 0, done.stderr
        assert f"reclaimed the references of dead pid {dead}: 2 reference(s)" in done.stdout
        after = doc(ns)
        assert holders(by_name(after)["alpha"]) == {live: (1, True)}
        assert by_name(after)["alpha"]["refs"] == 1
        assert "idle" in by_name(after)  # --gc never closes idle contexts
        assert after["usage"]["processes_dead"] == 0
        assert m.check() == []
        assert cli(ns, "--gc").stdout.strip() == "nothing to collect"


def test_gc_removes_orphans_of_a_live_table(ns):
    with manager(ns, ("alpha", 4096, None)) as m:
        orphan = _shm.segment_name(ns, m._table.tag, 7, 999)
        posix_ipc.SharedMemory(orphan, posix_ipc.O_CREX, size=4096).close_fd()
        entry = orphan.lstrip("/")
        dry = cli(ns, "--gc")
        assert f"would remove orphan {entry}" in dry.stdout
        assert os.path.exists(_shm.host_path(orphan))
        done = cli(ns, "--gc", "--yes")
        assert done.returncode == 0 and f"removed orphan {entry}" in done.stdout
        assert not os.path.exists(_shm.host_path(orphan))
        assert "alpha" in by_name(doc(ns))


def test_gc_removes_an_unused_table_and_tableless_objects(ns, new_ns, mp_ctx):
    run_child(mp_ctx, _attach_and_die, ns)  # its only process died; no contexts
    young = cli(ns, "--gc")
    assert "keeps the table" in young.stdout and "--grace 10s" in young.stdout
    dry = cli(ns, "--gc", "--grace", "0")
    assert "would remove the table: no live process is attached" in dry.stdout
    assert os.path.exists(_shm.host_path(_shm.table_name(ns)))
    done = cli(ns, "--gc", "--grace", "0", "--yes")
    assert done.returncode == 0, done.stderr
    assert "removed the table" in done.stdout
    assert _shm.namespace_objects(ns) == []

    bare = new_ns()  # objects of a table that is gone
    seg = f"/{_shm.PREFIX}{bare}@{'a' * _shm.TAG_LEN}c1.1"
    posix_ipc.SharedMemory(seg, posix_ipc.O_CREX, size=4096).close_fd()
    r = cli(bare)
    assert r.returncode == 2 and "no table" in r.stderr and f"--gc {bare}" in r.stderr
    assert f"{bare}: no table, 1 orphaned object(s)" in cli().stdout
    done = cli(bare, "--gc", "--yes")
    assert done.returncode == 0 and f"removed orphan {seg.lstrip('/')}" in done.stdout
    assert _shm.namespace_objects(bare) == []


# --- a wedged table lock ---------------------------------------------------------------


def test_wedged_lock_still_shows_the_table_unlocked(ns, mp_ctx):
    with manager(ns, ("alpha", 4096, None)) as m:
        ready = mp_ctx.Event()
        p = mp_ctx.Process(target=_wedge, args=(ns, ready))
        p.start()
        assert ready.wait(DEADLINE)
        os.kill(p.pid, signal.SIGKILL)
        p.join(DEADLINE)
        r = cli(ns)  # must not hang (the DEADLINE guard would fail the test)
        assert r.returncode == 0, r.stderr
        assert "UNLOCKED SNAPSHOT" in r.stdout and f"held by pid {p.pid}† (dead" in r.stdout
        row = next(ln for ln in r.stdout.splitlines() if ln.startswith("alpha "))
        assert f"{p.pid}:1†" in row
        d = doc(ns)
        assert d["snapshot"]["locked"] is False and "not free" in d["snapshot"]["unlocked_reason"]
        assert d["lock"] == {"owner_pid": p.pid, "owner_alive": False,
                             "epoch": d["lock"]["epoch"]}
        assert msgpack.unpackb(cli(ns, "--msgpack", binary=True).stdout)["snapshot"][
            "locked"] is False
        listed = {n["namespace"]: n for n in doc()["namespaces"]}
        assert listed[ns]["locked"] is False and listed[ns]["contexts"] == 1
        check = cli(ns, "--check")
        assert check.returncode == 1
        assert f"{ns}: table lock: held by dead pid {p.pid}" in check.stdout.splitlines()
        # Read-only: nobody took the lock over, the dead owner is still recorded.
        assert m._table.table_lock.owner()[0] == p.pid


# --- --check ---------------------------------------------------------------------------


def test_check_exit_codes(ns):
    with manager(ns, ("alpha", 4096, None)) as m:
        held = m.get_context("alpha")
        r = cli(ns, "--check")
        assert (r.returncode, r.stdout) == (0, f"{ns}: sound\n")
        assert m._table.table_lock.owner()[0] == 0  # the copy's hold of the lock is over
        slot = held._mapped.slot
        so = m._geo.slot_off(slot)
        L.S_REFCOUNT.pack_into(m._buf, so + L.S_REFCOUNT_OFF, 7)  # scribble a derived count
        wrong = f"slot {slot} ('alpha'): refcount 7 != 1, the sum of its holders"
        r = cli(ns, "--check")
        assert r.returncode == 1 and r.stdout.splitlines() == [f"{ns}: {wrong}"]
        j = cli(ns, "--check", "--json")
        assert j.returncode == 1
        assert json.loads(j.stdout)["namespaces"][0]["violations"] == [wrong]
        L.S_REFCOUNT.pack_into(m._buf, so + L.S_REFCOUNT_OFF, 1)
        m.return_context(held)


# --- errors ----------------------------------------------------------------------------


def test_unknown_namespace_lists_the_existing_ones(ns):
    with manager(ns):
        missing = f"t{uuid.uuid4().hex[:12]}"
        for args in ([missing], [missing, "--json"], [missing, "--check"], [missing, "--gc"]):
            r = cli(*args)
            assert r.returncode == 2 and r.stdout == ""
            assert f"no namespace '{missing}' on this host; existing: " in r.stderr
            assert ns in r.stderr.split("existing: ")[1]


_OTHER_VERSION = bytes([0, L.MAGIC[7] + 1])  # a layout this library does not know


@pytest.mark.parametrize("content, problem", [
    (bytes(range(256)) * 32, "not a shmctx table (magic"),
    (L.MAGIC[:6] + _OTHER_VERSION + bytes(4088), f"layout version {_OTHER_VERSION!r} is not this"),
    (b"SHMC", "truncated: 4 bytes"),
])
def test_foreign_or_garbage_table_exits_3(ns, content, problem):
    path = _shm.host_path(_shm.table_name(ns))
    with open(path, "wb") as f:
        f.write(content)
    try:
        for args in ([ns], [ns, "--json"], [ns, "--check"], [ns, "--gc", "--yes"]):
            r = cli(*args)
            assert r.returncode == 3, (args, r.stderr)
            assert f"table of namespace '{ns}' ({path})" in r.stderr and problem in r.stderr
        assert os.path.exists(path)  # --gc never destroys what it does not understand
        listed = {n["namespace"]: n for n in doc()["namespaces"]}  # the list goes on
        assert problem in listed[ns]["error"] and listed[ns]["contexts"] is None
    finally:
        os.unlink(path)


def _unprivileged() -> list[str] | None:
    """A command prefix running a program as an unprivileged user, if we can."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    try:
        import pwd

        pwd.getpwnam("nobody")
    except KeyError:
        return None
    if setpriv is None:
        return None
    return [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def test_permission_denied_exits_2(ns):
    prefix = _unprivileged()
    if prefix is None:
        pytest.skip("running as root with no setpriv/nobody to drop privileges to")
    if prefix and cli("--help", user=prefix).returncode != 0:
        pytest.skip("user nobody cannot run the installed script here (directory modes)")
    with manager(ns):  # mode 0600, owned by us
        path = _shm.host_path(_shm.table_name(ns))
        if not prefix:  # not root: make our own table unreadable to ourselves
            os.chmod(path, 0)
        try:
            r = cli(ns, user=prefix)
            assert r.returncode == 2
            assert f"permission denied: cannot read the table of namespace '{ns}'" in r.stderr
            listed = cli("--json", user=prefix)
            assert listed.returncode == 0
            row = next(n for n in json.loads(listed.stdout)["namespaces"] if n["namespace"] == ns)
            assert row["error"].startswith("permission denied")
        finally:
            os.chmod(path, 0o600)


@pytest.mark.parametrize("args", [
    ["{ns}", "--json", "--msgpack"],
    ["{ns}", "--watch", "0.2", "--json"],
    ["{ns}", "--limit", "-1"],
    ["{ns}", "--yes"],
    ["{ns}", "--sort", "bogus"],
    ["{ns}", "--check", "--gc"],
    ["not/a namespace"],
])
def test_usage_errors_exit_2(ns, args):
    r = cli(*[a.format(ns=ns) for a in args])
    assert r.returncode == 2 and "usage: ctx-inspect" in r.stderr


# --- --watch and the terminal ----------------------------------------------------------


def test_watch_redraws_in_place_and_marks_changes(ns):
    with manager(ns, ("alpha", 4096, None)) as m:
        p = subprocess.Popen([CLI, "--watch", "0.1", ns], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        out = b""

        def until(predicate, what: str) -> None:
            nonlocal out
            deadline = time.monotonic() + DEADLINE
            while not predicate(out.decode(errors="replace")):
                assert time.monotonic() < deadline, f"no {what} in {out[-2000:]!r}"
                if select.select([p.stdout], [], [], 1.0)[0]:
                    out += os.read(p.stdout.fileno(), 65536)

        try:
            until(lambda s: s.count("\x1b[J") >= 1, "first frame")
            held = m.get_context("alpha")
            beta, _ = m.get_or_create_context("beta")
            # Later frames show alpha's reference delta and beta as new.
            until(lambda s: "+1   alpha" in s and "new  beta" in s, "changes")
            m.return_context(held)
            m.return_context(beta)
            m.close_context("beta")
            until(lambda s: "gone since the last refresh: beta" in s, "gone row")
            # Refreshing leaks nothing: the descriptors stay flat over many frames (a
            # read holds two or three for a moment).
            fds = len(os.listdir(f"/proc/{p.pid}/fd"))
            frames = out.count(b"\x1b[J")
            until(lambda s: s.count("\x1b[J") >= frames + 15, "15 more frames")
            assert len(os.listdir(f"/proc/{p.pid}/fd")) <= fds + 3
        finally:
            p.send_signal(signal.SIGINT)
            rest, err = p.communicate(timeout=DEADLINE)
        assert p.returncode == 0 and b"Traceback" not in err, err
        text = (out + rest).decode()
        frames = [f for f in text.split("\x1b[H") if f]
        assert len(frames) >= 3
        assert "\x1b[2J" not in text  # redrawn in place, never a full clear
        assert all(f.endswith("\x1b[J") for f in frames[:-1])
        assert all(ln.endswith("\x1b[K") for ln in frames[0].split("\n")[:-1])


def _on_terminal(args: list[str], env: dict) -> bytes:
    master, slave = pty.openpty()
    full_env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    p = subprocess.Popen([CLI, *args], stdout=slave, stderr=subprocess.PIPE,
                         env={**full_env, **env})
    os.close(slave)
    data = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        data += chunk
    os.close(master)
    assert p.wait(DEADLINE) == 0
    return data


def test_colour_only_on_a_terminal_and_never_with_no_color(ns, mp_ctx):
    with manager(ns, ("alpha", 0, None)):
        dead = run_child(mp_ctx, _take_and_die, ns, "alpha")
        coloured = _on_terminal([ns], {})
        assert b"\x1b[31m" + f"{dead}:1†".encode() in coloured  # dead holder in red
        plain = _on_terminal([ns], {"NO_COLOR": "1"})
        assert b"\x1b[" not in plain and f"{dead}:1†".encode() in plain
        piped = cli(ns)
        assert "\x1b[" not in piped.stdout and f"{dead}:1†" in piped.stdout
