"""ctx-inspect as a package: its modules import each other in one direction only, it runs
as ``python -m shmctx._inspect``, and the library operations its reads and ``--gc`` use
instead of private attributes (``RobustLock.try_acquire_unless``, ``Table.attach``,
``Table.retire``) do what they promise."""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import pathlib
import re
import subprocess
import sys

import posix_ipc
import pytest

import shmctx._inspect
from shmctx import ContextConfig, ContextManager, MemoryContextConfig, TableFormatError, _shm
from shmctx import _layout as L
from shmctx._inspect._model import namespace_doc, namespace_state
from shmctx._inspect._read import read
from shmctx._inspect._render import Out, namespace_lines
from shmctx._lock import RobustLock
from shmctx._proc import identity
from shmctx._snapshot import decode
from shmctx._table import Table

PACKAGE = pathlib.Path(shmctx._inspect.__file__).parent
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))
CFG = ContextConfig(lock_timeout=0.2, cleanup_interval=0)
DEADLINE = 60  # subprocess hang guard only


def _imports(module: str) -> set[str]:
    """The modules of the package that ``module`` imports (``from .x import ...``,
    ``from . import x``), wherever in the file."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [a.name for a in node.names]
            out |= {n.split(".")[0] for n in names if n.split(".")[0] in MODULES}
    return out


def test_inspect_modules_import_each_other_in_one_direction():
    """No cycle among the modules, and the package docstring lists them in an order in
    which each imports only modules listed before it (so the list stays true)."""
    graph = {m: _imports(m) for m in MODULES}
    cycle: list[str] = []

    def visit(m: str, path: list[str]) -> bool:
        if m in path:
            cycle.extend([*path[path.index(m):], m])
            return True
        return any(visit(d, [*path, m]) for d in sorted(graph[m]))

    assert not any(visit(m, []) for m in MODULES), " -> ".join(cycle)
    doc = shmctx._inspect.__doc__ or ""
    listed = list(dict.fromkeys(re.findall(r"``(_[a-z]+)``", doc.split("The modules")[1])))
    assert sorted(listed) == MODULES, "the package docstring must list every module"
    for i, m in enumerate(listed):
        later = graph[m] & set(listed[i:])
        assert not later, f"{m} imports {later}, listed after it in the package docstring"


@pytest.mark.parametrize("module", MODULES)
def test_each_inspect_module_imports_alone(module):
    """In a fresh interpreter, with the package's ``__init__`` (which imports everything,
    in its own order) kept out of the way: a cycle fails here for the module it starts
    from, whichever that is."""
    code = (
        "import importlib, sys, types\n"
        "pkg = types.ModuleType('shmctx._inspect')\n"
        f"pkg.__path__ = [{str(PACKAGE)!r}]\n"
        "sys.modules['shmctx._inspect'] = pkg\n"
        f"importlib.import_module('shmctx._inspect.{module}')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=DEADLINE)
    assert r.returncode == 0, r.stderr


def test_runs_as_python_dash_m(managers, ns):
    managers()
    r = subprocess.run([sys.executable, "-m", "shmctx._inspect", ns, "--json"],
                       capture_output=True, text=True, timeout=DEADLINE)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["namespace"] == ns


# --- --watch and the versions of a name -------------------------------------------------


def _view(ns: str) -> dict:
    return namespace_doc(read(ns, 1.0), argparse.Namespace(filter=None, sort="name",
                                                            limit=None))


def _watched(now: dict, before: dict) -> list[str]:
    """The namespace view of ``now`` as --watch draws it after the frame ``before``."""
    return namespace_lines(Out(io.StringIO(), False), now, namespace_state(before), True)


def _changes(lines: list[str], name: str) -> list[str]:
    """The CHG cell of each row of ``name`` ('' when unchanged)."""
    out = []
    for ln in lines:
        cells = ln.split()
        if name in cells[:2] and cells[0] != "NAME":
            out.append("" if cells[0] == name else cells[0])
    return out


def test_watch_follows_each_version_of_a_name(managers, ns):
    """--watch keeps one row per version: a pending version becoming current and the
    current one being superseded are changes of their own rows, and a version that goes
    away is named with its number, not as if the name itself were gone."""
    m = managers()
    v1 = m.publish("v", MemoryContextConfig(size=64))
    frames: list[dict] = []

    def look(_ctx) -> None:
        frames.append(_view(ns))

    v2 = m.publish("v", MemoryContextConfig(size=64), init=look)
    after = _view(ns)
    # Same references before and after the switch, yet both rows changed.
    assert _changes(_watched(after, frames[0]), "v") == ["~", "~"]
    assert _changes(_watched(after, after), "v") == ["", ""]

    m.return_context(v1)  # its last holder: the superseded version is freed
    freed = _view(ns)
    assert "gone since the last refresh: v v1" in _watched(freed, after)
    assert _changes(_watched(freed, after), "v") == [""]

    def fail(_ctx) -> None:
        frames.append(_view(ns))
        raise RuntimeError("init failed")

    with pytest.raises(RuntimeError):
        m.publish("v", MemoryContextConfig(size=64), init=fail)
    assert "gone since the last refresh: v (pending)" in _watched(_view(ns), frames[1])
    m.return_context(v2)


# --- RobustLock.try_acquire_unless: ctx-inspect's wait for a table lock ------------------


@pytest.fixture
def lock(ns):
    """A lock of the protocol on a semaphore of ``ns`` and a private owner record."""
    sem = posix_ipc.Semaphore(_shm.table_lock_name(ns, "0" * _shm.TAG_LEN),
                              posix_ipc.O_CREX, initial_value=1)
    try:
        yield RobustLock(sem, memoryview(bytearray(64)), 0, 0, 0.2, None, None, "test lock")
    finally:
        sem.unlink()
        sem.close()


def test_try_acquire_unless_takes_a_free_lock_at_once_even_with_no_time(lock):
    asked = []
    assert lock.try_acquire_unless(0.0, lambda: asked.append(1) or True, 0.01)
    assert lock.owner().pid == identity.pid and asked == []
    lock.release()


def test_try_acquire_unless_gives_up_when_told_and_never_takes_over(lock):
    lock.sem.acquire()  # held by a dead owner: nobody will ever release it
    L.LOCK.pack_into(lock.buf, 0, 2**22 + 1, 5, 0)  # a pid no process can have
    asked = []
    # The long timeout is never reached: the first look gives up.
    assert not lock.try_acquire_unless(DEADLINE, lambda: asked.append(1) or True, 0.01)
    assert asked == [1]
    assert lock.owner() == (2**22 + 1, 5, 0) and lock.sem.value == 0
    lock.sem.release()


def test_try_acquire_unless_waits_for_the_release_and_ends_at_its_timeout(lock):
    lock.sem.acquire()
    asked = []
    assert not lock.try_acquire_unless(0.1, lambda: asked.append(1) and False, 0.02)
    assert asked and lock.sem.value == 0  # it looked, and then its own timeout ended it

    def release_at_first_look() -> bool:  # the holder lets go while it waits
        lock.sem.release()
        return False

    assert lock.try_acquire_unless(DEADLINE, release_at_first_look, 0.01)
    assert lock.owner().pid == identity.pid
    lock.release()


# --- Table.attach and Table.retire: ctx-inspect --gc removing an unused table ------------


def _procs(ns: str) -> list:
    with open(_shm.host_path(_shm.table_name(ns)), "rb") as f:
        return decode(f.read()).procs


def test_attach_registers_nothing_and_retire_removes_only_when_not_kept(ns):
    assert Table.attach(ns) is None  # no table: none is made
    ContextManager(CFG, namespace=ns, sweeper=False).close()  # the table stays, unused
    before = _procs(ns)
    t = Table.attach(ns)
    assert t is not None
    try:
        assert _procs(ns) == before  # not attached as a process of the namespace
        seen = []

        def keep(why: str):
            def ask() -> str:
                seen.append(t.table_lock.owner().pid)  # asked under the table lock
                return why
            return ask

        assert t.retire(1.0, keep("still used")) == "still used"
        assert _shm.public_tag(ns) == t.tag and not t.flags() & L.FLAG_UNLINKED

        other = Table.attach(ns)  # a live holder of the table lock, past the timeout
        assert other is not None
        with other.table_lock, pytest.raises(TimeoutError):
            t.retire(0.1, keep(""))
        other.close()
        assert seen == [identity.pid] and _shm.public_tag(ns) == t.tag

        assert t.retire(1.0, keep("")) == ""
        assert seen == [identity.pid] * 2
        assert t.flags() & L.FLAG_UNLINKED  # marked before its names went
        assert _shm.namespace_objects(ns) == [] and t.table_lock.owner().pid == 0
    finally:
        t.close()
    m = ContextManager(CFG, namespace=ns, sweeper=False)  # a new table in its place
    try:
        assert _shm.public_tag(ns) not in (None, t.tag)
    finally:
        m.unlink()


def test_attach_refuses_a_damaged_table(ns):
    path = _shm.host_path(_shm.table_name(ns))
    with open(path, "wb") as f:
        f.write(bytes(range(256)) * 32)
    try:
        with pytest.raises(TableFormatError, match="not a shmctx table"):
            Table.attach(ns)
    finally:
        os.unlink(path)
