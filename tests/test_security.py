"""Another user on the same host: their objects are refused unless trusted on purpose.

Two real uids: the tests run as root (useradd and setuid need it), and a "stranger" is a
system user created once per session; whatever the stranger does runs in a forked child
that has switched to that uid and gid.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import pwd
import subprocess
import threading
import traceback
from collections.abc import Callable
from typing import Any

import posix_ipc
import pytest
from helpers import wait_for

from shmctx import (
    ContextError,
    ContextManager,
    ContextNotFoundError,
    ForeignObjectError,
    InvalidConfigError,
    MemoryContextConfig,
    _shm,
)
from shmctx import _layout as L

STRANGER = "shmctx-stranger"
MEM = MemoryContextConfig(size=4096)

@pytest.fixture(scope="session")
def stranger() -> pwd.struct_passwd:
    """A second real user (created if absent; parallel test workers may race to)."""
    def exists() -> pwd.struct_passwd | None:
        try:
            return pwd.getpwnam(STRANGER)
        except KeyError:
            return None

    def create() -> pwd.struct_passwd | None:
        if exists() is None:
            # 0 made it, 9 "already exists" (another worker did), 10 /etc/passwd busy
            subprocess.run(["useradd", "--system", "--no-create-home", "--user-group",
                            "--shell", "/usr/sbin/nologin", STRANGER],
                           capture_output=True, check=False)
        return exists()

    return wait_for(create, what=f"user {STRANGER} to exist")


def as_stranger(who: pwd.struct_passwd, fn: Callable[..., object], *args: object) -> Any:
    """Run ``fn(*args)`` in a forked child that has become the stranger (uid, gid, no
    supplementary groups) and return its JSON-able result. A fork rather than a new
    interpreter: the stranger may not read root's Python installation, and everything
    the child needs is imported already."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(who.pw_gid)
            os.setuid(who.pw_uid)
            with os.fdopen(w, "w") as out:
                json.dump(fn(*args), out)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the stranger's steps failed (see stderr)"
    return json.loads(data)


def plant(ns: str) -> dict:
    """The stranger's namespace: mode 0666, a context with a value, its ctx.lock."""
    with ContextManager(namespace=ns, mode=0o666, sweeper=False) as m:
        ctx, _ = m.get_or_create_context("settings", MEM)
        ctx.put({"admin": "planted by a stranger"})
        with ctx.lock:
            pass
        m.return_context(ctx)
    return {"objects": _shm.namespace_objects(ns)}


def assert_names_stranger(e: BaseException, who: pwd.struct_passwd) -> None:
    assert isinstance(e, ForeignObjectError)
    assert isinstance(e, ContextError) and isinstance(e, PermissionError)
    assert f"uid {who.pw_uid} ({who.pw_name})" in str(e)
    assert e.owner_uid == who.pw_uid
    assert e.filename and e.filename.startswith(_shm.SHM_DIR) and e.filename in str(e)


def test_a_namespace_a_stranger_created_is_refused_unless_trusted(ns, stranger):
    """The stranger pre-creates the namespace (mode 0666, a valid table, a context with a
    value and a ctx.lock). Root attaching to it is refused with an error naming the owner
    and the table (without the owner check it would attach silently and read the
    stranger's values as its own).
    With trusted_uids naming the stranger, the deliberate sharing works."""
    planted = as_stranger(stranger, plant, ns)
    assert all(os.stat(os.path.join(_shm.SHM_DIR, e)).st_uid == stranger.pw_uid
               for e in planted["objects"])
    with pytest.raises(ForeignObjectError) as refused:
        ContextManager(namespace=ns, sweeper=False)
    assert_names_stranger(refused.value, stranger)
    assert refused.value.filename == _shm.host_path(_shm.table_name(ns))
    assert "trusted_uids" in str(refused.value)
    copy = pickle.loads(pickle.dumps(refused.value))  # crosses process pools intact
    assert str(copy) == str(refused.value) and copy.owner_uid == stranger.pw_uid

    with ContextManager(namespace=ns, sweeper=False, trusted_uids=[stranger.pw_uid]) as m:
        ctx = m.get_context("settings")
        with ctx.lock:
            assert ctx.get() == {"admin": "planted by a stranger"}
        m.return_context(ctx)
        m.unlink(force=True)


def join_root_namespace(ns: str) -> dict:
    """The stranger's side: refused root's namespace, then joins it trusting root."""
    try:
        ContextManager(namespace=ns, sweeper=False)
        refused = None
    except ForeignObjectError as e:
        refused = [str(e), e.owner_uid, isinstance(e, PermissionError)]
    with ContextManager(namespace=ns, sweeper=False, trusted_uids=[0]) as m:
        ctx, _ = m.get_or_create_context("theirs", MEM)
        ctx.put("the stranger's")
        with ctx.lock:
            pass
        m.return_context(ctx)
    return {"refused": refused}


def test_a_stranger_is_refused_a_root_namespace_and_each_object_is_checked(ns, stranger):
    """The reverse direction, and object by object: root shares a namespace (mode
    0666). The stranger is refused it unless it trusts root; trusting root, it creates a
    context. Root, not trusting the stranger, is then refused that context's memory (its
    reference given back), and a manager that does trust the stranger uses it, ctx.lock
    included."""
    with ContextManager(namespace=ns, mode=0o666, sweeper=False) as owner:
        out = as_stranger(stranger, join_root_namespace, ns)
        assert out["refused"] is not None, "the stranger attached to root's namespace"
        message, owner_uid, is_permission = out["refused"]
        assert owner_uid == 0 and is_permission and "uid 0 (root)" in message

        with pytest.raises(ForeignObjectError) as refused:
            owner.get_context("theirs")
        assert_names_stranger(refused.value, stranger)
        assert [i.refcount for i in owner.contexts() if i.name == "theirs"] == [0]

        with ContextManager(namespace=ns, sweeper=False,
                            trusted_uids={stranger.pw_uid}) as sharing:
            ctx = sharing.get_context("theirs")
            with ctx.lock:
                assert ctx.get() == "the stranger's"
            sharing.return_context(ctx)
        assert owner.check() == []
        owner.unlink(force=True)


def precreate(names: list[tuple[str, str]]) -> list[str]:
    """The stranger plants objects (mode 0666) under the given names."""
    made = []
    for kind, name in names:
        if kind == "sem":
            posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=0o666).close()
        else:
            posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o666, size=4096).close_fd()
        path = _shm.host_path(name, semaphore=kind == "sem")
        os.chmod(path, 0o666)  # whatever the umask
        made.append(path)
    return made


def _next_claim(m: ContextManager) -> tuple[int, int]:
    """(slot, incarnation) the next context created in ``m``'s namespace will get."""
    head = L.Header.read(m._table.buf)
    return head.free_head - 1, head.next_incarnation


def test_names_a_stranger_plants_in_our_namespace_are_refused_never_opened(managers, stranger):
    """The stranger cannot read a 0600 table, but sees the object names in /dev/shm and
    can guess the next numbers. The names it plants (mode 0666) for a context's
    ctx.lock, the memory of the next context and the init semaphore of one being created
    are refused by name and owner; none is opened instead of being created, none is
    removed, and the namespace stays sound. (Creating fell back to opening the existing
    semaphore, and the planted memory surfaced as posix_ipc.ExistentialError.)"""
    m = managers()
    t = m._table
    c, _ = m.get_or_create_context("c")
    slot, inc = _next_claim(m)
    planted_names = [("sem", _shm.ctx_lock_name(m.namespace, t.tag, c._mapped.inc)),
                     ("shm", _shm.segment_name(m.namespace, t.tag, slot, inc)),
                     ("sem", _shm.init_sem_name(m.namespace, t.tag, inc + 1))]
    planted = as_stranger(stranger, precreate, planted_names)

    with pytest.raises(ForeignObjectError) as lock_refused:
        c.lock.acquire()
    assert_names_stranger(lock_refused.value, stranger)
    assert lock_refused.value.filename == planted[0]

    with pytest.raises(ForeignObjectError) as memory_refused:
        m.get_or_create_context("d", MEM)
    assert_names_stranger(memory_refused.value, stranger)
    assert memory_refused.value.filename == planted[1]
    with pytest.raises(ContextNotFoundError):
        m.get_context("d")  # the claim was given back

    # "e" gets incarnation inc + 1; while its init runs, another manager waits for it.
    release = threading.Event()
    in_init = threading.Event()
    done: list[object] = []

    def init(ctx) -> None:
        in_init.set()
        release.wait(10)

    creator = threading.Thread(
        target=lambda: done.append(m.get_or_create_context("e", init=init)))
    creator.start()
    try:
        wait_for(in_init.is_set, what="init of e to start")
        with pytest.raises(ForeignObjectError) as waiter_refused:
            managers().get_context("e", timeout=5)
        assert_names_stranger(waiter_refused.value, stranger)
        assert waiter_refused.value.filename == planted[2]
    finally:
        release.set()
        creator.join()
    e, existed = done[0]
    assert existed is False
    m.return_context(e)

    # The semaphores were refused, never removed or replaced. The planted memory took
    # the name of a slot whose creation failed; closing that slot removes what is at
    # its names, which root may (a stranger's squatter, cleaned up, never used).
    for path in planted[0::2]:
        assert os.stat(path).st_uid == stranger.pw_uid
        os.unlink(path)
    assert not os.path.exists(planted[1])
    m.return_context(c)
    assert m.check() == []


def test_a_stale_semaphore_is_replaced_only_if_it_is_ours(ns, stranger):
    """Creating a table's semaphores replaces a stale one of our own of the same name,
    but another user's is refused and left in place, never unlinked and replaced."""
    name = f"/{_shm.PREFIX}{ns}@probe"
    path = as_stranger(stranger, precreate, [("sem", name)])[0]
    try:
        with pytest.raises(ForeignObjectError) as refused:
            _shm.create_semaphore(name, 0o600)
        assert_names_stranger(refused.value, stranger)
        assert os.stat(path).st_uid == stranger.pw_uid
    finally:
        os.unlink(path)
    posix_ipc.Semaphore(name, posix_ipc.O_CREX).close()  # a stale one of ours
    _shm.create_semaphore(name, 0o600).close()
    assert os.stat(path).st_uid == os.geteuid()
    _shm.unlink_semaphore(name)


def close_as_stranger(ns: str, name: str) -> dict:
    """The stranger, trusting root, closes a context root created in root's namespace."""
    with ContextManager(namespace=ns, sweeper=False, trusted_uids=[0]) as m:
        m.close_context(name)
        return {"contexts": [i.name for i in m.contexts()], "check": m.check()}


def unlink_table_as_stranger(ns: str) -> str:
    try:
        _shm.unlink_segment(_shm.table_name(ns), strict=True)
    except PermissionError as e:
        return str(e)
    return "removed"


def test_closing_what_another_user_created_leaves_it_and_does_not_fail(managers, stranger):
    """In a sticky /dev/shm only an object's owner may remove it. The stranger, sharing
    root's namespace on purpose, closes a context root created: the close completes and
    leaves root's memory and ctx.lock semaphore for root, whose sweep removes them as
    orphans. (The close raised posix_ipc.PermissionsError half way.)"""
    m = managers(mode=0o666)
    ctx, _ = m.get_or_create_context("c", MEM)
    with ctx.lock:
        pass
    t, slot, inc = m._table, ctx._mapped.slot, ctx._mapped.inc
    m.return_context(ctx)
    left = [_shm.host_path(t.segment(slot, inc)),
            _shm.host_path(_shm.ctx_lock_name(m.namespace, t.tag, inc), semaphore=True)]
    out = as_stranger(stranger, close_as_stranger, m.namespace, "c")
    assert out == {"contexts": [], "check": []}
    assert all(os.path.exists(p) for p in left)
    m.sweep()
    assert not any(os.path.exists(p) for p in left)
    # Removing a whole table is another matter: that it could not is reported.
    assert "owned by uid 0 (root)" in as_stranger(stranger, unlink_table_as_stranger,
                                                   m.namespace)


@pytest.mark.parametrize("bad", ["1000", 1000, [True], [-1], [1 << 32], [1.0], [[1]]])
def test_trusted_uids_must_be_uids(ns, bad):
    with pytest.raises(InvalidConfigError, match="trusted_uids"):
        ContextManager(namespace=ns, trusted_uids=bad)
    assert _shm.namespace_objects(ns) == []


def test_foreign_object_error_is_a_permission_error_with_errno():
    e = ForeignObjectError(errno.EPERM, "refusing x", "/dev/shm/x")
    assert isinstance(e, PermissionError) and e.errno == errno.EPERM
    assert str(e) == "refusing x"
