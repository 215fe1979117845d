"""What the server integrations share: the last peer out unlinks the namespace
(``close(unlink_if_last=True)``), peers attach as workers (``WorkerManager(peer=True)``),
service defaults and the routing of shmctx's log lines into a server's logger."""

from __future__ import annotations

import logging
import multiprocessing as mp
import secrets
import signal

import pytest

from shmctx import ContextConfig, ContextManager, ContextNotFoundError, MemoryContextConfig, _shm
from shmctx._entry import ProcessEntry
from shmctx._errors import InvalidConfigError
from shmctx._service import SERVICE_DEFAULTS, open_namespace, route_logs, service_config
from shmctx._table import Table
from shmctx._worker import WorkerManager


def _exists(ns: str) -> bool:
    return bool(_shm.namespace_objects(ns))


def _attach_and_wait(ns: str, ready, go) -> None:
    m = ContextManager(namespace=ns, sweeper=False)
    ctx, _ = m.get_or_create_context("x", MemoryContextConfig(size=8))
    m.return_context(ctx)
    ready.set()
    go.wait(30)
    m.close(unlink_if_last=True)


def test_last_peer_out_unlinks_and_not_before(ns):
    m = ContextManager(namespace=ns)
    ctx_mp = mp.get_context("fork")
    ready, go = ctx_mp.Event(), ctx_mp.Event()
    p = ctx_mp.Process(target=_attach_and_wait, args=(ns, ready, go))
    p.start()
    try:
        assert ready.wait(30)
        m.close(unlink_if_last=True)  # the child is still attached: only detach
        assert _exists(ns)
        go.set()
        p.join(30)
        assert p.exitcode == 0
        assert not _exists(ns)  # the child left last and unlinked
    finally:
        go.set()
        p.join(30)


def test_other_manager_of_same_process_counts(ns):
    a = ContextManager(namespace=ns)
    b = ContextManager(namespace=ns)
    a.close(unlink_if_last=True)
    assert _exists(ns)
    ctx, _ = b.get_or_create_context("x", MemoryContextConfig(size=8))
    b.return_context(ctx)
    b.close(unlink_if_last=True)
    assert not _exists(ns)


def _register_then_hang(ns: str, ready) -> None:
    ContextManager(namespace=ns, sweeper=False)
    ready.set()
    signal.pause()


def test_peers_leaving_at_the_same_moment_leave_nothing(ns, monkeypatch):
    """B leaves while A is between deciding and giving back its entry: whichever asks
    last must see the other gone. (Asking before giving back, each saw the other still
    registered and neither unlinked: uvicorn workers stopping together left the
    namespace in /dev/shm.)"""
    a = ContextManager(namespace=ns)
    b = ContextManager(namespace=ns)
    real = ProcessEntry.give_back
    calls = []

    def give_back_while_the_other_leaves(self, *args, **kwargs):
        calls.append(self)
        if len(calls) == 1:  # a's: b leaves entirely in the middle of a's leaving
            b.close(unlink_if_last=True)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ProcessEntry, "give_back", give_back_while_the_other_leaves)
    a.close(unlink_if_last=True)
    assert len(calls) == 2
    assert not _exists(ns)


def test_dead_peer_does_not_keep_namespace(ns):
    m = ContextManager(namespace=ns)
    ctx_mp = mp.get_context("fork")
    ready = ctx_mp.Event()
    p = ctx_mp.Process(target=_register_then_hang, args=(ns, ready))
    p.start()
    assert ready.wait(30)
    p.kill()
    p.join(30)
    m.close(unlink_if_last=True)
    assert not _exists(ns)


def test_attach_racing_the_last_peer_makes_a_fresh_namespace(ns, monkeypatch):
    """A process that found the table just before the last peer unlinked it opens
    again instead of failing on the removed table."""
    leaving = ContextManager(namespace=ns)
    real_open = Table.open.__func__
    calls = []

    def open_then_peer_leaves(cls, *args, **kwargs):
        found = real_open(cls, *args, **kwargs)
        calls.append(found[1])
        if len(calls) == 1:
            leaving.close(unlink_if_last=True)  # alone: unlinks under the opener's feet
        return found

    monkeypatch.setattr(Table, "open", classmethod(open_then_peer_leaves))
    m = ContextManager(namespace=ns)
    monkeypatch.undo()
    assert calls == [False, True]  # joined the old table, then made a fresh one
    ctx, existed = m.get_or_create_context("x", MemoryContextConfig(size=8))
    assert not existed
    m.return_context(ctx)
    m.close(unlink_if_last=True)
    assert not _exists(ns)


def test_unlink_if_last_is_checked(ns):
    m = ContextManager(namespace=ns)
    with pytest.raises(InvalidConfigError, match="unlink_if_last"):
        m.close(unlink_if_last="yes")
    m.unlink()


def test_service_config():
    assert service_config(None) is SERVICE_DEFAULTS
    assert SERVICE_DEFAULTS.max_references == 0 and SERVICE_DEFAULTS.max_idle_time == 0
    mine = ContextConfig(max_references=3)
    assert service_config(mine) is mine
    with pytest.raises(InvalidConfigError, match="dict"):
        service_config({"max_references": 3})


def _peer_body(ns: str, q) -> None:
    w = WorkerManager("test", peer=True)
    w.namespace = ns
    m = w.get()
    ctx, existed = m.get_or_create_context("data", MemoryContextConfig(size=8))
    m.return_context(ctx)
    q.put((existed, m.config.max_references, m.config.max_idle_time))
    w.close()


def test_peers_create_share_and_the_last_unlinks(ns):
    observer = ContextManager(namespace=ns, config=SERVICE_DEFAULTS, sweeper=False)
    ctx_mp = mp.get_context("spawn")
    q = ctx_mp.Queue()
    procs = [ctx_mp.Process(target=_peer_body, args=(ns, q)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(g[0] for g in got) == [False, True]  # built once, found once
    assert {g[1:] for g in got} == {(0, 0)}
    assert _exists(ns)  # the observer is still attached
    observer.close(unlink_if_last=True)
    assert not _exists(ns)
    with pytest.raises(ContextNotFoundError):
        ContextManager(namespace=ns, create=False)


def test_attached_worker_refuses_missing_namespace(ns):
    w = WorkerManager("test")
    w.namespace = ns
    with pytest.raises(Exception, match="does not exist"):
        w.get()
    assert not _exists(ns)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}:{record.getMessage()}")


def test_route_logs():
    server = logging.getLogger(f"server-{secrets.token_hex(3)}")
    server.propagate = False
    server.setLevel(logging.INFO)
    mine, root_seen = _Collect(), _Collect()
    server.addHandler(mine)
    logging.getLogger().addHandler(root_seen)
    try:
        route_logs(server)
        route_logs(server)  # idempotent: still one line per record
        logging.getLogger("shmctx.sweeper").info("swept %d", 3)
        logging.getLogger("shmctx.sweeper").debug("below the server's level")
    finally:
        logging.getLogger().removeHandler(root_seen)
    assert mine.lines == ["shmctx.sweeper:swept 3"]
    assert root_seen.lines == []


def test_route_logs_refuses_the_shmctx_tree_itself():
    lg = logging.getLogger("shmctx")
    before = (list(lg.handlers), lg.level, lg.propagate)
    for name in ("shmctx", "shmctx.asgi"):
        with pytest.raises(InvalidConfigError, match="part of the 'shmctx' logger tree"):
            route_logs(logging.getLogger(name))
    with pytest.raises(InvalidConfigError, match=r"logging\.Logger"):
        route_logs("uvicorn.error")
    assert (list(lg.handlers), lg.level, lg.propagate) == before  # refused: nothing changed


def test_adopting_a_namespace_with_other_limits_says_so(ns, caplog):
    logging.getLogger("shmctx").propagate = True  # to caplog (conftest restores it)
    made = ContextManager(ContextConfig(max_references=10), namespace=ns, sweeper=False)
    try:
        with caplog.at_level(logging.WARNING, logger="shmctx.service"):
            m = open_namespace(ns, sweeper=False)
        assert m.config.max_references == 10  # adopted as it is
        (line,) = [r.getMessage() for r in caplog.records if r.name == "shmctx.service"]
        assert "max_references: 0 != 10; max_idle_time: 0.0 != 300.0;" in line
        m.close()
    finally:
        made.unlink()


def test_adopting_a_namespace_made_with_the_server_defaults_is_quiet(ns, caplog):
    logging.getLogger("shmctx").propagate = True  # to caplog (conftest restores it)
    made = ContextManager(SERVICE_DEFAULTS, namespace=ns, sweeper=False)
    try:
        with caplog.at_level(logging.WARNING, logger="shmctx.service"):
            open_namespace(ns, sweeper=False).close()
        assert [r for r in caplog.records if r.name == "shmctx.service"] == []
    finally:
        made.unlink()
