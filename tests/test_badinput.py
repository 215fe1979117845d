"""Bad input: invalid configuration, namespaces and context names; damaged or foreign
tables (refused, never overwritten); permissions of every object in /dev/shm; context
names that must never reach a file name."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import struct
import unicodedata
from datetime import timedelta

import pytest
from helpers import real_table_bytes

from shmctx import (
    ContextConfig,
    ContextError,
    ContextManager,
    InvalidConfigError,
    InvalidContextTypeError,
    MemoryContextConfig,
    TableFormatError,
    _shm,
)
from shmctx import _layout as L

CFG = ContextConfig(lock_timeout=0.2, cleanup_interval=0, capacity=16, max_processes=8)


# --- ContextConfig -------------------------------------------------------------------

DURATIONS = ["max_idle_time", "cleanup_interval", "lock_timeout"]
COUNTS = ["max_references", "capacity", "max_processes"]
BAD_DURATIONS = [-1, -0.001, math.nan, math.inf, -math.inf, True, False, "1", None, [1],
                 timedelta(seconds=-1)]
BAD_COUNTS = [-1, 1.5, math.nan, math.inf, True, False, "3", None]


@pytest.mark.parametrize("value", BAD_DURATIONS, ids=repr)
@pytest.mark.parametrize("field", DURATIONS)
def test_bad_duration(field, value):
    with pytest.raises(InvalidConfigError, match=field):
        ContextConfig(**{field: value})


@pytest.mark.parametrize("value", BAD_COUNTS, ids=repr)
@pytest.mark.parametrize("field", COUNTS)
def test_bad_count(field, value):
    with pytest.raises(InvalidConfigError, match=field):
        ContextConfig(**{field: value})


def test_capacity_below_one():
    with pytest.raises(InvalidConfigError, match="capacity"):
        ContextConfig(capacity=0)


def test_durations_accept_timedelta_and_int():
    cfg = ContextConfig(max_idle_time=timedelta(minutes=2), cleanup_interval=timedelta(0),
                        lock_timeout=timedelta(milliseconds=250))
    assert (cfg.max_idle_time, cfg.cleanup_interval, cfg.lock_timeout) == (120.0, 0.0, 0.25)
    assert ContextConfig(max_idle_time=5).max_idle_time == 5.0
    assert ContextConfig(max_idle_time=timedelta(minutes=2)) == ContextConfig(max_idle_time=120)
    assert ContextConfig(max_references=0, max_idle_time=0, cleanup_interval=0) is not None


def test_config_is_frozen():
    cfg = ContextConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_references = 3


@pytest.mark.parametrize("config", ["default", {"max_references": 3}, 10, MemoryContextConfig()],
                         ids=repr)
def test_manager_config_must_be_a_context_config(ns, config):
    with pytest.raises(InvalidConfigError, match="config"):
        ContextManager(config, namespace=ns)
    assert _shm.namespace_objects(ns) == []


@pytest.mark.parametrize("size", [-1, 1.5, True, "8", None], ids=repr)
def test_bad_memory_context_size(size):
    with pytest.raises(InvalidConfigError, match="size"):
        MemoryContextConfig(size=size)


@pytest.mark.parametrize("parent", [5, b"p", ["p"]], ids=repr)
def test_bad_memory_context_parent(parent):
    with pytest.raises(InvalidConfigError, match="parent"):
        MemoryContextConfig(parent=parent)


def test_memory_config_must_be_a_memory_context_config(managers):
    m = managers()
    with pytest.raises((InvalidConfigError, TypeError)):
        m.get_or_create_context("x", {"size": 8})
    with pytest.raises((InvalidConfigError, TypeError)):
        m.get_or_create_context("x", CFG)
    assert m.contexts() == []


# --- namespaces ----------------------------------------------------------------------

@pytest.mark.parametrize("namespace", [
    "", "a/b", "../up", "/abs", "x" * 65, "with space", "ümlaut", "a@b", "tab\t", "nul\0",
    None, 5, b"bytes",
], ids=repr)
def test_bad_namespace(namespace):
    with pytest.raises(InvalidConfigError, match="namespace"):
        ContextManager(namespace=namespace)
    if isinstance(namespace, str) and namespace:
        assert not [e for e in os.listdir(_shm.SHM_DIR)
                    if e.removeprefix("sem.").startswith(_shm.PREFIX + namespace)]


def test_namespace_edge_lengths_and_characters(ns):
    for namespace in (ns + "x" * (64 - len(ns)), ns + ".A-b_9"):
        with ContextManager(CFG, namespace=namespace, sweeper=False) as m:
            ctx, _ = m.get_or_create_context("c", MemoryContextConfig(size=8))
            m.return_context(ctx)
            m.unlink()
        assert _shm.namespace_objects(namespace) == []


# --- context names -------------------------------------------------------------------

BAD_NAMES = ["", "a" * 129, "é" * 65, "🎉" * 33, "a\0b", "\0", "\ud800", None, b"name", 5,
             ["x"], 1.0]


@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda n: repr(n)[:20])
def test_bad_context_name(managers, name):
    m = managers()
    calls = {
        "get_or_create_context": lambda: m.get_or_create_context(name),
        "get_context": lambda: m.get_context(name),
        "close_context": lambda: m.close_context(name),
        "context": lambda: m.context(name).__enter__(),
    }
    for what, call in calls.items():
        with pytest.raises(InvalidContextTypeError):
            call()
            pytest.fail(f"{what} accepted {name!r}")
    assert m.contexts() == []


def test_name_length_is_counted_in_utf8_bytes(managers):
    m = managers()
    longest = ["a" * 128, "é" * 64, "🎉" * 32, "€" * 42 + "ab"]
    assert all(len(n.encode()) == 128 for n in longest)
    for name in longest:
        ctx, existed = m.get_or_create_context(name)
        assert not existed and ctx.name == name
        m.return_context(ctx)
    assert sorted(i.name for i in m.contexts()) == sorted(longest)


HOSTILE_NAMES = [
    "../../../../etc/passwd", "a/b/c", "/abs/path", "..", ".", "sem.evil", "shmctx@other",
    "shmctx@" + "x" * 20, "日本語 🎉", "spaces and\ttabs\nnewline", "%s%n%x", "back\\slash",
    "c0.1", "@t", "*", "\u202eRTL", unicodedata.normalize("NFC", "é"),
    unicodedata.normalize("NFD", "é"),
]


def test_hostile_names_work_and_never_reach_dev_shm(managers, ns):
    m = managers(ContextConfig(lock_timeout=0.2, cleanup_interval=0, capacity=64))
    for i, name in enumerate(HOSTILE_NAMES):
        ctx, existed = m.get_or_create_context(name, MemoryContextConfig(size=64))
        assert not existed
        ctx.buf[:8] = struct.pack("<Q", i)
        with ctx.lock:
            pass  # the context's lock semaphore exists too
        m.return_context(ctx)
    other = managers(None)
    for i, name in enumerate(HOSTILE_NAMES):
        ctx = other.get_context(name)
        assert ctx.name == name and struct.unpack("<Q", ctx.buf[:8])[0] == i
        other.return_context(ctx)
    assert sorted(i.name for i in m.contexts()) == sorted(HOSTILE_NAMES)  # NFC != NFD
    pattern = re.compile(
        rf"(sem\.)?shmctx@{re.escape(ns)}(@[0-9a-f]{{12}}(t|s\d+|c\d+\.\d+|l\d+|i\d+))?")
    objects = _shm.namespace_objects(ns)
    assert all(pattern.fullmatch(e) for e in objects), objects
    assert len([e for e in objects if re.search(r"@[0-9a-f]{12}c\d", e)]) == len(HOSTILE_NAMES)
    # Nothing named after a context anywhere near /dev/shm (other processes of the host
    # create files there too, so look for the names, not for "anything new").
    for where in (_shm.SHM_DIR, "/dev", "/"):
        for part in ("passwd", "evil", "日本語", "RTL", "slash", "tabs"):
            assert not [e for e in os.listdir(where) if part in e], (where, part)
    m.unlink()
    assert _shm.namespace_objects(ns) == []


# --- damaged and foreign tables ------------------------------------------------------

def _real_table(new_ns) -> bytes:
    return real_table_bytes(new_ns(), CFG)


def _patched(data: bytes, off: int, fmt: str, value) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, off, value)
    return bytes(out)


DAMAGE = {
    "wrong magic": lambda d: b"NOTOURS!" + d[8:],
    "all zeros": lambda d: bytes(len(d)),
    "another program's text": lambda d: b"hello, world\n" * 1000,
    "magic of another layout": lambda d: L.MAGIC[:6] + bytes([0, L.MAGIC[7] + 1]) + d[8:],
    "another layout version": lambda d: _patched(d, 8, "<I", L.LAYOUT_VERSION + 1),
    "empty": lambda d: b"",
    "truncated header": lambda d: d[:100],
    "truncated body": lambda d: d[: len(d) // 2],
    "too large": lambda d: d + bytes(4096),
    "size field disagrees": lambda d: _patched(d, 32, "<Q", len(d) + 4096),
    "impossible capacity": lambda d: _patched(d, 20, "<I", 0),
    "impossible lock_timeout": lambda d: _patched(d, 64, "<d", math.nan),
}


@pytest.fixture
def plant(ns):
    """Put a file of our choosing where ``ns``'s table belongs; removed afterwards."""
    path = _shm.host_path(_shm.table_name(ns))

    def put(data: bytes) -> str:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return path

    yield put
    if os.path.exists(path):
        os.unlink(path)


def _assert_refused(ns: str, path: str, data: bytes, error=TableFormatError) -> None:
    for config in (None, CFG):
        with pytest.raises(error) as e:
            ContextManager(config, namespace=ns, sweeper=False)
        assert isinstance(e.value, ContextError)
        assert ns in str(e.value)
    with open(path, "rb") as f:
        assert f.read() == data  # never overwritten or reinitialised
    assert _shm.namespace_objects(ns) == [f"shmctx@{ns}"]  # and nothing else created


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_or_foreign_table_is_refused(ns, new_ns, plant, damage):
    data = DAMAGE[damage](_real_table(new_ns))
    _assert_refused(ns, plant(data), data)


def test_table_copy_without_its_semaphores_is_refused(ns, new_ns, plant):
    """A genuine header whose semaphores are gone (copied, or half removed): refused
    with a ContextError, the file left alone."""
    data = _real_table(new_ns)
    _assert_refused(ns, plant(data), data, error=ContextError)


def test_table_format_error_is_a_context_error():
    assert issubclass(TableFormatError, ContextError)


# --- permissions ---------------------------------------------------------------------

def _modes(ns: str) -> dict[str, int]:
    return {e: os.stat(os.path.join(_shm.SHM_DIR, e)).st_mode & 0o777
            for e in _shm.namespace_objects(ns)}


def _kinds(ns: str, entries) -> set[str]:
    out = set()
    for e in entries:
        parsed = _shm.parse_object(ns, e)
        out.add("table" if parsed is None else parsed[1])
    return out


def _populate(m: ContextManager) -> None:
    parent, _ = m.get_or_create_context("p", MemoryContextConfig(size=4096))
    child, _ = m.get_or_create_context("p/c", MemoryContextConfig(size=64, parent="p"))
    with parent.lock:
        pass
    m.return_context(child)
    m.return_context(parent)


def test_default_mode_is_owner_only(managers, ns):
    _populate(managers())
    modes = _modes(ns)
    assert _kinds(ns, modes) == {"table", "t", "s", "c", "l"}
    assert modes == {e: 0o600 for e in modes}


def test_mode_widens_every_object(managers, ns):
    old = os.umask(0o077)  # the requested mode wins over the umask
    try:
        m = managers(mode=0o660)
        _populate(m)
    finally:
        os.umask(old)
    modes = _modes(ns)
    assert _kinds(ns, modes) == {"table", "t", "s", "c", "l"}
    assert modes == {e: 0o660 for e in modes}
    assert managers(None).get_context("p").size == 4096  # mode=None adopts


def test_mode_mismatch_with_existing_table(managers):
    managers(mode=0o660)
    with pytest.raises(InvalidConfigError, match="mode"):
        managers(mode=0o600)


@pytest.mark.parametrize("mode", [0o400, 0o200, 0o000, 0o1600, 0o4600, -1, 1.5, True, "0600"],
                         ids=repr)
def test_bad_mode(ns, mode):
    with pytest.raises(InvalidConfigError, match="mode"):
        ContextManager(CFG, namespace=ns, mode=mode)
    assert _shm.namespace_objects(ns) == []


def test_a_table_of_too_many_reference_counts_is_refused():
    """Each process entry keeps a count per slot: capacity x max_processes is capped so
    that a table stays a sane size (each limit alone is allowed)."""
    ContextConfig(capacity=1 << 20, max_processes=64)
    ContextConfig(capacity=1024, max_processes=1 << 16)
    with pytest.raises(InvalidConfigError, match="capacity x max_processes"):
        ContextConfig(capacity=1 << 20, max_processes=1 << 16)
