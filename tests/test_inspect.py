"""ctx-inspect, run as the installed console script against live tables whose references
other real processes hold: text, JSON and msgpack outputs, --check, --gc, --watch, colour,
and every exit code (0 ok, 1 violations, 2 unknown/permission/usage, 3 foreign table)."""

from __future__ import annotations

import json
import math
import mmap
import multiprocessing as mp
import os
import pty
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager

import msgpack
import posix_ipc
import pytest
from helpers import real_table_bytes, wait_for

from shmctx import ContextConfig, ContextManager, MemoryContextConfig, TableFormatError, _shm
from shmctx import _layout as L
from shmctx._lock import RobustLock
from shmctx._table import name_hash

# The script installed beside this interpreter: CI runs .venv/bin/pytest without putting
# .venv/bin on PATH.
CLI = shutil.which("ctx-inspect", path=os.path.dirname(sys.executable)) or \
    shutil.which("ctx-inspect")
LT = 0.2  # lock_timeout of the tables made here
QUICK = ("--timeout", str(LT))  # ctx-inspect's own wait for a busy or wedged table lock
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
    held = [m.get_context(name) for name in names]  # kept: a dropped handle gives its back
    os._exit(0 if held else 1)  # no close: the references stay recorded for a dead pid


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
        # NAME KIND VER STATE REFS: a bytes context, in its first (and only) version.
        assert row["alpha"].split()[1:5] == ["bytes", "1", "ready", "3"]
        assert "64.0 KiB" in row["alpha"]
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
        # No row of b1 (the namespace, random hex, may well contain "b1" itself).
        rows = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
        assert "1 more (--limit)" in r.stdout and "b1" not in rows
        assert "(no contexts match --filter)" in cli(ns, "--filter", "zz*").stdout
        for c in held:
            m.return_context(c)


# --- kinds and versions ------------------------------------------------------------------


def _rows(text: str, name: str) -> list[list[str]]:
    """The cells of every row of context ``name`` in the namespace view, in order."""
    return [ln.split() for ln in text.splitlines() if ln.split()[:1] == [name]]


def _segment_bytes(ns: str, tag: str, c: dict) -> int:
    """What context ``c`` (a row of the JSON document) takes in /dev/shm."""
    return os.stat(_shm.host_path(_shm.segment_name(ns, tag, c["slot"],
                                                    c["incarnation"]))).st_size


def test_kinds_and_every_version_of_a_name_are_shown(ns, mp_ctx):
    with manager(ns, ("b", 100, None)) as m:
        arr, _ = m.get_or_create_context("arr", MemoryContextConfig.for_array((10,), "float32"))
        m.return_context(arr)
        obj, _ = m.get_or_create_object("o", lambda: {"a": 1})
        m.return_context(obj)
        v1 = m.publish("v", MemoryContextConfig(size=4096))
        dead = run_child(mp_ctx, _take_and_die, ns, "b")  # gives --gc --yes work to do

        # While the second version is being built (its init runs), it is a pending slot
        # of the name beside the current one: look at the namespace from outside then.
        seen: dict[str, subprocess.CompletedProcess] = {}

        def look(_ctx) -> None:
            for what, args in (("text", ()), ("json", ("--json",)), ("check", ("--check",)),
                               ("gc", ("--gc", "--yes"))):
                seen[what] = cli(ns, *args)

        v2 = m.publish("v", MemoryContextConfig(size=4096), init=look)
        assert (v1.version, v2.version) == (1, 2)

        # The pending version: listed after the current one, numbered only at the switch.
        assert seen["text"].returncode == 0, seen["text"].stderr
        assert [r[1:4] for r in _rows(seen["text"].stdout, "v")] == \
            [["bytes", "1", "ready"], ["bytes", "-", "pending"]]
        during = [c for c in json.loads(seen["json"].stdout)["contexts"] if c["name"] == "v"]
        assert [(c["version"], c["state"], c["superseded"], c["pending"]) for c in during] == \
            [(1, "ready", False, False), (0, "creating", False, True)]
        assert during[1]["incarnation"] == v2.incarnation and during[1]["refs"] == 1
        # A version being built by a live process is no damage, and nothing to collect:
        # the repair reclaims the dead holder and leaves both slots of "v" and their memory.
        assert (seen["check"].returncode, seen["check"].stdout) == (0, f"{ns}: sound\n")
        assert seen["gc"].returncode == 0, seen["gc"].stderr
        assert seen["gc"].stdout.splitlines() == [
            f"{ns}: reclaimed the references of dead pid {dead}: 1 reference(s) released, "
            "entry freed"]

        # Now: v1 superseded and still held here, v2 current.
        d = doc(ns)
        cs = {(c["name"], c["version"]): c for c in d["contexts"]}
        assert [(c["name"], c["version"]) for c in d["contexts"]] == \
            [("arr", 1), ("b", 1), ("o", 1), ("v", 1), ("v", 2)]
        assert {k: (c["kind"], c["superseded"], c["pending"]) for k, c in cs.items()} == {
            ("arr", 1): ("array", False, False), ("b", 1): ("bytes", False, False),
            ("o", 1): ("object", False, False), ("v", 1): ("bytes", True, False),
            ("v", 2): ("bytes", False, False)}
        assert cs["b", 1]["refs"] == 0 and cs["b", 1]["holders"] == []  # reclaimed
        assert cs["v", 1]["incarnation"] == v1.incarnation and cs["v", 1]["refs"] == 1
        assert cs["v", 2]["incarnation"] == v2.incarnation and cs["v", 2]["refs"] == 1
        # Each version's size is what its segment takes in /dev/shm, the old one included.
        tag = d["table"]["tag"]
        assert {k: c["size"] for k, c in cs.items()} == \
            {k: _segment_bytes(ns, tag, c) for k, c in cs.items()}
        assert cs["v", 1]["size"] == cs["v", 2]["size"] == 4096
        assert d["usage"]["contexts"] == 5
        assert d["usage"]["context_bytes"] == sum(c["size"] for c in cs.values())
        assert d["usage"]["superseded_bytes"] == 4096
        packed = msgpack.unpackb(cli(ns, "--msgpack", binary=True).stdout)["contexts"]
        stable = ("name", "slot", "kind", "version", "superseded", "pending", "size")
        assert [{k: c[k] for k in stable} for c in packed] == \
            [{k: c[k] for k in stable} for c in d["contexts"]]

        r = cli(ns)
        assert r.returncode == 0, r.stderr
        assert all(len(ln) <= 100 for ln in r.stdout.splitlines())
        header = r.stdout.splitlines()[6].split()
        assert header[:5] == ["NAME", "KIND", "VER", "STATE", "REFS"]
        assert [r[1:4] for r in _rows(r.stdout, "v")] == \
            [["bytes", "1", "superseded"], ["bytes", "2", "ready"]]
        assert [row[1:4] for name in ("arr", "b", "o") for row in _rows(r.stdout, name)] == \
            [["array", "1", "ready"], ["bytes", "1", "ready"], ["object", "1", "ready"]]
        assert "4.0 KiB of it in superseded versions" in r.stdout
        # A superseded version still held is normal: sound, and nothing to collect.
        assert (cli(ns, "--check").stdout, cli(ns, "--gc").stdout) == \
            (f"{ns}: sound\n", "nothing to collect\n")
        assert m.check() == []

        # Its last holder returns it: it is freed, and only the current version is left.
        m.return_context(v1)
        d = doc(ns)
        assert [(c["name"], c["version"], c["superseded"]) for c in d["contexts"]
                if c["name"] == "v"] == [("v", 2, False)]
        assert d["usage"]["superseded_bytes"] == 0
        assert "superseded" not in cli(ns).stdout
        m.return_context(v2)


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
        r = cli(ns, *QUICK)  # must not hang (the DEADLINE guard would fail the test)
        assert r.returncode == 0, r.stderr
        assert "UNLOCKED SNAPSHOT" in r.stdout and f"held by pid {p.pid}† (dead" in r.stdout
        row = next(ln for ln in r.stdout.splitlines() if ln.startswith("alpha "))
        assert f"{p.pid}:1†" in row
        d = doc(ns, *QUICK)
        assert d["snapshot"]["locked"] is False  # at once: nobody releases a dead owner's lock
        assert d["snapshot"]["unlocked_reason"] == f"the table lock is held by dead pid {p.pid}"
        assert d["lock"] == {"owner_pid": p.pid, "owner_alive": False,
                             "epoch": d["lock"]["epoch"]}
        assert msgpack.unpackb(cli(ns, "--msgpack", *QUICK, binary=True).stdout)["snapshot"][
            "locked"] is False
        listed = {n["namespace"]: n for n in doc(*QUICK)["namespaces"]}
        assert listed[ns]["locked"] is False and listed[ns]["contexts"] == 1
        check = cli(ns, "--check", *QUICK)
        assert check.returncode == 1
        assert f"{ns}: table lock: held by dead pid {p.pid}" in check.stdout.splitlines()
        # Read-only: nobody took the lock over, the dead owner is still recorded.
        assert m._table.table_lock.owner().pid == p.pid
        # The repair path does take a dead owner's lock over, within --timeout.
        gc = cli(ns, "--gc", "--yes", *QUICK)
        assert gc.returncode == 0, gc.stderr
        assert f"reclaimed the references of dead pid {p.pid}" in gc.stdout
        assert f"took over from dead owner pid {p.pid}" in gc.stderr


# --- --check ---------------------------------------------------------------------------


def test_check_exit_codes(ns):
    with manager(ns, ("alpha", 4096, None)) as m:
        held = m.get_context("alpha")
        r = cli(ns, "--check")
        assert (r.returncode, r.stdout) == (0, f"{ns}: sound\n")
        assert m._table.table_lock.owner().pid == 0  # the copy's hold of the lock is over
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


# --- hostile tables: ctx-inspect is bounded by its own timeout and the file's size -----

_LT_OFF = L.HEADER.off("lock_timeout")
_STRIPES_OFF, _TOTAL_OFF = L.HEADER.off("stripes"), L.HEADER.off("total_size")


def _hold_table_lock(ns: str, ready, release) -> None:
    """Take ``ns``'s table lock and keep it, alive, until the test writes to ``release``
    (a pipe), then give it back."""
    m = ContextManager(namespace=ns, sweeper=False)
    m._table.table_lock.acquire()
    ready.set()
    try:
        release.recv()
    except EOFError:  # the test died: let go all the same
        pass
    m._table.table_lock.release()
    m.close()


def test_absurd_lock_timeout_and_a_live_holder_cost_only_own_timeout(ns):
    """A header's lock_timeout of 1e9 s and a table lock held by a live process that
    never lets go: every read ends after ctx-inspect's own --timeout as an unlocked
    snapshot, and --gc --yes, which would have to wait as a process of the namespace,
    does nothing and says so (exit 75)."""
    fork = mp.get_context("fork")
    with manager(ns, ("alpha", 0, None)) as m:
        dead = run_child(fork, _take_and_die, ns, "alpha")  # something for --gc to do
        struct.pack_into("<d", m._buf, _LT_OFF, 1e9)
        ready, (ours, theirs) = fork.Event(), fork.Pipe()
        holder = fork.Process(target=_hold_table_lock, args=(ns, ready, theirs))
        holder.start()
        try:
            assert ready.wait(DEADLINE)
            d = doc(ns)  # the default --timeout, never the table's 1e9 s
            assert d["config"]["lock_timeout"] == 1e9
            assert d["snapshot"] == {"locked": False, "taken_at": d["snapshot"]["taken_at"],
                                     "unlocked_reason": "the table lock was not free within 1s"}
            assert d["lock"]["owner_pid"] == holder.pid and d["lock"]["owner_alive"] is True
            r = cli(ns, "--timeout", "0.3")
            assert r.returncode == 0
            assert "UNLOCKED SNAPSHOT: the table lock was not free within 0.3s" in r.stdout
            assert f"held by pid {holder.pid} (alive)" in r.stdout
            check = cli(ns, "--check", "--timeout", "0.3")
            assert check.returncode == 0, check.stdout
            assert check.stdout.splitlines()[0] == \
                f"{ns}: note: unlocked snapshot, the table lock was not free within 0.3s"
            listed = {n["namespace"]: n for n in doc("--timeout", "0.3")["namespaces"]}
            assert listed[ns]["locked"] is False and listed[ns]["contexts"] == 1
            gc = cli(ns, "--gc", "--yes", "--timeout", "0.3")
            assert gc.returncode == 75 and gc.stdout == ""
            assert gc.stderr == (
                f"ctx-inspect: the table lock of namespace {ns!r} was not free within 0.3s "
                f"(held by live pid {holder.pid}); --gc --yes changed nothing; try again, "
                "or raise --timeout\n")
            assert dead in {h["pid"] for h in by_name(doc(ns, *QUICK))["alpha"]["holders"]}
        finally:
            ours.send(None)
            holder.join(DEADLINE)
        done = cli(ns, "--gc", "--yes", *QUICK)  # the holder let go: the repair runs
        assert done.returncode == 0, done.stderr
        assert f"reclaimed the references of dead pid {dead}" in done.stdout


def _genuine_table(new_ns) -> bytes:
    return real_table_bytes(new_ns(), CFG)


def _hostile(index_size: int | None = None, stripes: int | None = None,
             fit: bool = True, lock_timeout: float | None = None):
    """A header patch, and whether the file (and the header's total size) are made to
    agree with the geometry the patched header describes."""
    def patch(data: bytes) -> tuple[bytes, int]:
        out = bytearray(data)
        head = L.Header.read(out)
        cap, n_stripes, procs = head.capacity, head.stripes, head.max_processes
        if index_size is not None:
            L.H_INDEX_SIZE.pack_into(out, L.H_INDEX_SIZE_OFF, index_size)
        if stripes is not None:
            struct.pack_into("<I", out, _STRIPES_OFF, stripes)
        if lock_timeout is not None:
            struct.pack_into("<d", out, _LT_OFF, lock_timeout)
        if not fit:
            return bytes(out), len(out)
        index = L.HEADER["index_size"].read(out, 0)
        total = L.Geometry(cap, procs, stripes or n_stripes, index).total
        struct.pack_into("<Q", out, _TOTAL_OFF, total)
        return bytes(out), total
    return patch


HOSTILE = {
    # 8 GiB as claimed, a sparse file of that size: sized from the header, a read would
    # allocate and scan it all. Checked in O(1) instead.
    "index size 2**31, file to match": (_hostile(index_size=1 << 31), "impossible geometry"),
    "index size 2**24, file to match": (_hostile(index_size=1 << 24), "impossible geometry"),
    "index size 2**31, file as it was": (_hostile(index_size=1 << 31, fit=False),
                                         "impossible geometry"),
    "1 stripe for capacity 1024, file to match": (_hostile(stripes=1), "impossible geometry"),
    "file shorter than the header says": (lambda d: (d, len(d) - L.PAGE), "size is "),
    "lock_timeout nan": (_hostile(lock_timeout=math.nan), "impossible setting: lock_timeout"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_geometry_is_refused_before_anything_is_sized_from_it(ns, new_ns, case):
    patch, problem = HOSTILE[case]
    data, size = patch(_genuine_table(new_ns))
    path = _shm.host_path(_shm.table_name(ns))
    with open(path, "xb") as f:
        f.write(data[:size])
        f.truncate(size)  # sparse beyond the genuine bytes: no memory behind it
    try:
        for args in ([ns], [ns, "--json"], [ns, "--check"], [ns, "--gc", "--yes"]):
            r = cli(*args)
            assert r.returncode == 3, (args, r.stdout[-300:], r.stderr)
            assert r.stderr.startswith(f"ctx-inspect: table of namespace '{ns}' ({path}): "
                                       f"{problem}"), r.stderr
        listed = {n["namespace"]: n for n in doc()["namespaces"]}
        assert listed[ns]["error"].startswith(problem) and listed[ns]["bytes"] == size
        with pytest.raises(TableFormatError, match=problem):  # the library's one check
            ContextManager(namespace=ns, sweeper=False)
        assert os.stat(path).st_size == size and os.stat(path).st_blocks * 512 <= len(data)
    finally:
        os.unlink(path)


def _plant(path: str, kind: str) -> socket.socket | None:
    if kind == "fifo":
        os.mkfifo(path)
        os.chmod(path, 0o444)  # readable by all: an open for reading would block
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        os.chmod(path, 0o666)
        return s
    else:
        os.symlink("/etc/passwd", path)
    return None


@pytest.mark.parametrize("kind, problem", [("fifo", "not a regular file"),
                                           ("socket", "not a regular file"),
                                           ("symlink", "not a regular file (a symbolic link)")])
def test_fifo_socket_or_symlink_planted_as_a_table_exits_3(ns, kind, problem):
    """/dev/shm is writable by every user: a FIFO named like a table would block an open
    for reading forever (the read-only fallback of a user who may not write it)."""
    prefix = _unprivileged()
    if prefix is None:
        pytest.skip("running as root with no setpriv/nobody to drop privileges to")
    path = _shm.host_path(_shm.table_name(ns))
    sock = _plant(path, kind)
    try:
        for user in (prefix, []):  # the unprivileged first: it is the one that could hang
            r = cli(ns, user=user)
            assert r.returncode == 3, (user, r.stderr)
            assert r.stderr == f"ctx-inspect: table of namespace '{ns}' ({path}): {problem}\n"
        listed = {n["namespace"]: n for n in json.loads(cli("--json", user=prefix).stdout)[
            "namespaces"]}
        assert listed[ns]["error"] == problem
    finally:
        os.unlink(path)
        if sock is not None:
            sock.close()


def _sem_waiters(path: str) -> int:
    """Processes blocked on a POSIX semaphore: glibc keeps their count in the high half
    of the first 64-bit word of the semaphore (x86_64 and aarch64)."""
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0] >> 32


def _truncate_under_the_lock(ns: str, ready, go) -> None:
    m = ContextManager(ContextConfig(lock_timeout=DEADLINE, cleanup_interval=0),
                       namespace=ns, sweeper=False)
    m._table.table_lock.acquire()
    ready.set()
    go.recv()
    os.truncate(_shm.host_path(_shm.table_name(ns)), L.PAGE)  # the owner record stays
    m._table.table_lock.release()
    os._exit(0)  # touching the rest of the table now would be a SIGBUS


def test_table_shrunk_while_waiting_for_its_lock_is_an_error_not_sigbus(ns):
    """ctx-inspect waits for the table lock; its holder shrinks the file and lets go. The
    copy taken then is short, and said to be: no read through a mapping past the end."""
    fork = mp.get_context("fork")
    ready, (ours, theirs) = fork.Event(), fork.Pipe()
    holder = fork.Process(target=_truncate_under_the_lock, args=(ns, ready, theirs))
    holder.start()
    try:
        assert ready.wait(DEADLINE)
        tag = _shm.public_tag(ns)
        sem = _shm.host_path(_shm.table_lock_name(ns, tag), semaphore=True)
        p = subprocess.Popen([CLI, ns, "--timeout", str(DEADLINE)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        wait_for(lambda: _sem_waiters(sem) or p.poll() is not None, DEADLINE,
                 "ctx-inspect to wait for the table lock")
        ours.send(None)
        _out, err = p.communicate(timeout=DEADLINE)
    finally:
        holder.join(DEADLINE)
        _shm.remove_namespace_objects(ns)
    assert p.returncode == 3, (p.returncode, err)  # -7 would be SIGBUS
    assert err.startswith(f"ctx-inspect: table of namespace '{ns}'") and "size is 4096" in err


_FULL_SHM = """
import ctypes, errno, json, os, subprocess, sys
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", "/dev/shm"], check=True)
from shmctx import ContextConfig, ContextManager, _shm
ns, cli = sys.argv[1], sys.argv[2]
m = ContextManager(ContextConfig(capacity=16, cleanup_interval=0), namespace=ns,
                   sweeper=False)
# The process entries after ours are zeros: make them holes, as in a sparse table.
start = -(-m._geo.proc_off(1) // 4096) * 4096
fd = os.open(_shm.host_path(_shm.table_name(ns)), os.O_RDWR)
libc = ctypes.CDLL(None, use_errno=True)
assert libc.fallocate(fd, 3, ctypes.c_long(start),  # PUNCH_HOLE | KEEP_SIZE
                      ctypes.c_long(m._geo.slots_off // 4096 * 4096 - start)) == 0
os.close(fd)
try:
    with open("/dev/shm/filler", "wb", buffering=0) as f:
        while True:
            f.write(bytes(65536))
except OSError as e:
    assert e.errno == errno.ENOSPC, e
runs = {" ".join(a): subprocess.run([cli, *a], capture_output=True, text=True)
        for a in ([ns], [ns, "--check"], [ns, "--json"], [])}
print(json.dumps({k: [r.returncode, r.stdout, r.stderr] for k, r in runs.items()}))
"""


def test_full_dev_shm_is_no_sigbus(ns):
    """On a full /dev/shm, reading a hole of a sparse table through a mapping faults in
    a page that cannot be had: SIGBUS. ctx-inspect copies with pread. A private tmpfs of
    1 MiB in a mount namespace of its own stands for the full /dev/shm."""
    unshare = shutil.which("unshare")
    r = subprocess.run([unshare, "--mount", sys.executable, "-c", _FULL_SHM, ns, CLI],
                       capture_output=True, text=True, timeout=DEADLINE)
    if r.returncode and "unshare failed" in r.stderr and "Operation not permitted" in r.stderr:
        pytest.skip("no permission to make a mount namespace here")
    assert r.returncode == 0, r.stderr
    runs = json.loads(r.stdout)
    for args, (code, out, err) in runs.items():
        assert code == 0, (args, code, err)  # -7 would be SIGBUS
        assert "Traceback" not in err and out
    assert runs[f"{ns} --check"][1] == f"{ns}: sound\n"
    assert json.loads(runs[f"{ns} --json"][1])["snapshot"]["locked"] is True


def test_many_contexts_cost_time_in_proportion_to_them(ns):
    """2**15 live contexts, each in the name index and each naming a parent that is gone:
    showing and checking them looks each one up once. (A scan of every slot per parent
    lookup and per index entry made that about 2**30 steps: minutes.)"""
    n = 1 << 15
    m = ContextManager(ContextConfig(capacity=n, cleanup_interval=0), namespace=ns,
                       sweeper=False)
    try:
        geo, mask = m._geo, m._geo.index_size - 1
        for i in range(n):
            name = f"c{i}".encode()
            h = name_hash(name)
            L.SLOT_ALL.pack_into(m._buf, geo.slot_off(i), *L.Slot(
                state=L.READY, flags=0, name_len=len(name), refcount=0, incarnation=i + 1,
                name_hash=h, size=0, parent=(i + 1) % n + 1, next_free=0, parent_inc=n + 7,
                created=0.0, last_used=0.0, creator_pid=0, children=0, creator_start=0,
                lock_pid=0, lock_epoch=0, lock_start=0, name=name, kind=L.KIND_BYTES, version=1))
            pos = h & mask  # the index's own placement (linear probing), so it is sound
            while L.INDEX_ENTRY.unpack_from(m._buf, geo.index_entry_off(pos))[0]:
                pos = (pos + 1) & mask
            L.INDEX_ENTRY.pack_into(m._buf, geo.index_entry_off(pos), i + 1)
        L.H_NEXT_INC.pack_into(m._buf, L.H_NEXT_INC_OFF, n + 1)
        L.H_LIVE.pack_into(m._buf, L.H_LIVE_OFF, n)
        L.H_FREE_HEAD.pack_into(m._buf, L.H_FREE_HEAD_OFF, 0)
        check = cli(ns, "--check", "--json")
        assert check.returncode == 1
        found = json.loads(check.stdout)["namespaces"][0]["violations"]
        assert len(found) == n and all(v.endswith("is gone but the child lives") for v in found)
        d = doc(ns, "--limit", "1")
        assert d["matched"] == n and d["contexts"][0]["parent"] is None
    finally:
        m.unlink(force=True)


def _hold_table_lock_unattached(ns: str, ready, release) -> None:
    """Hold ``ns``'s table lock, alive, without being a process of the namespace (so the
    table stays unused), as ctx-inspect itself holds it while copying."""
    fd = os.open(_shm.host_path(_shm.table_name(ns)), os.O_RDWR)
    tag = _shm.public_tag(ns)
    with mmap.mmap(fd, L.PAGE) as mm:
        lock = RobustLock(posix_ipc.Semaphore(_shm.table_lock_name(ns, tag)), memoryview(mm),
                          L.LOCKS_OFF, 0, LT, None, None, "table lock")
        lock.acquire()
        ready.set()
        try:
            release.recv()
        except EOFError:
            pass
        lock.release()
        lock.sem.close()
    os.close(fd)


def test_gc_of_an_unused_table_waits_only_its_own_timeout(ns):
    """Removing an unused table takes its lock first; a live holder and a lock_timeout of
    1e9 s in the header cost --timeout, then a clear refusal (exit 75)."""
    fork = mp.get_context("fork")
    run_child(fork, _attach_and_die, ns)  # its only process died; no contexts
    path = _shm.host_path(_shm.table_name(ns))
    fd = os.open(path, os.O_RDWR)
    os.pwrite(fd, struct.pack("<d", 1e9), _LT_OFF)
    os.close(fd)
    ready, (ours, theirs) = fork.Event(), fork.Pipe()
    holder = fork.Process(target=_hold_table_lock_unattached, args=(ns, ready, theirs))
    holder.start()
    try:
        assert ready.wait(DEADLINE)
        r = cli(ns, "--gc", "--grace", "0", "--yes", *QUICK)
        assert r.returncode == 75 and r.stdout == ""
        assert r.stderr == (f"ctx-inspect: the table lock of namespace {ns!r} was not free "
                            f"within {LT:g}s; --gc --yes changed nothing; try again, or raise "
                            "--timeout\n")
        assert os.path.exists(path)
    finally:
        ours.send(None)
        holder.join(DEADLINE)
    done = cli(ns, "--gc", "--grace", "0", "--yes", *QUICK)
    assert done.returncode == 0 and "removed the table" in done.stdout, done.stderr
    assert _shm.namespace_objects(ns) == []
