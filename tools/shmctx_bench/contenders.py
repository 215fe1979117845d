"""The contenders: what each one is, how the parent sets it up, how a worker opens it.

A contender is measured by one operation, the *pair*: take a reference to a named,
reference-counted entry and give it back. ``SETUPS[key](session, specs)`` creates the
contender's shared state in the parent and returns a *spec* (a picklable dict, or one of
multiprocessing.Manager proxies); ``open_client(spec)`` opens it in a worker process as a
``Client`` whose ``pair(name)`` does one pair. A contender that cannot run here (a
package or program missing) raises ``Unavailable`` with the reason, and is reported as
such, never as zero.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import multiprocessing as mp
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from time import monotonic

import posix_ipc

from shmctx import ContextManager, MemoryContextConfig

from .session import Session, make_manager

TARGET_NAMES = [f"bench-{i}" for i in range(10)]  # the 10 live names every contender has
WORKERS = 4  # the most processes a throughput measurement uses
BIG_CAPACITY = 10240  # room for 10,000 contexts; also the capacity of the hot table
FLOOR_SLOTS = 1024
FLOOR_SLOT = 16
_U32 = struct.Struct("<I")

# Contenders: key -> label. shmctx-10k is measured for latency only.
LABELS = {
    "shmctx": "shmctx hot path",
    "shmctx-10k": "shmctx hot path, 10,000 live contexts",
    "shmctx-py": "shmctx hot path, pure Python (no C compiler)",
    "floor": "floor: 1 semaphore + struct in mmap",
    "manager": "multiprocessing.Manager dict + Lock",
    "filelock-10": "FileLock + JSON, 10 names",
    "filelock-10k": "FileLock + JSON, 10,000 names",
    "redis": "Redis HINCRBY over loopback",
    "ultradict": "UltraDict (shared lock)",
}
THROUGHPUT_KEYS = [k for k in LABELS if k != "shmctx-10k"]
SHMCTX_KEYS = ("shmctx", "shmctx-10k", "shmctx-py")  # the library itself, not alternatives


class Unavailable(Exception):
    """The contender cannot run on this machine; the message says why."""


class Client:
    """One contender opened in one process: ``pair(name)`` takes and returns a
    reference; ``close()`` lets go of the connection/mapping. ``manager`` is the shmctx
    manager behind a shmctx client (churn and the sweep probe use it)."""

    def __init__(self, pair: Callable[[str], None], close: Callable[[], None],
                 manager: ContextManager | None = None) -> None:
        self.pair = pair
        self.close = close
        self.manager = manager


# --- the worker's side ------------------------------------------------------------------

def shmctx_pair(m: ContextManager) -> Callable[[str], None]:
    """The shmctx pair: the hot path's get and return, bound once."""
    get, ret = m.get_or_create_context, m.return_context

    def pair(name: str) -> None:
        ctx, _ = get(name)
        ret(ctx)

    return pair


def _open_shmctx(spec: dict) -> Client:
    m = make_manager(spec["ns"], pure_python=spec.get("pure_python", False))
    for name in spec["names"]:  # map each one here, so the timed gets take the hot path
        ctx, _ = m.get_or_create_context(name)
        m.return_context(ctx)
    return Client(shmctx_pair(m), m.close, m)


def open_floor(spec: dict) -> Client:
    """The floor: one semaphore around a struct read and write of a 16-byte slot found
    by ``hash(name)`` in an mmap; no crash safety, no per-name locking."""
    shm = posix_ipc.SharedMemory(spec["shm"])
    mm = mmap.mmap(shm.fd, shm.size)
    shm.close_fd()
    buf = memoryview(mm)
    sem = posix_ipc.Semaphore(spec["sem"])
    mask = FLOOR_SLOTS - 1
    unpack, pack = _U32.unpack_from, _U32.pack_into

    # hash() of a str is cached and equal in every process of this fork tree.
    def get(name: str) -> None:
        off = (hash(name) & mask) * FLOOR_SLOT
        sem.acquire()
        pack(buf, off, unpack(buf, off)[0] + 1)
        sem.release()

    def ret(name: str) -> None:
        off = (hash(name) & mask) * FLOOR_SLOT
        sem.acquire()
        pack(buf, off, unpack(buf, off)[0] - 1)
        sem.release()

    def pair(name: str) -> None:
        get(name)
        ret(name)

    def close() -> None:
        buf.release()
        mm.close()
        sem.close()

    return Client(pair, close)


def _locked_counter_pair(d, lock) -> Callable[[str], None]:
    """acquire + return on a dict of counts behind a lock (Manager, UltraDict)."""
    def pair(name: str) -> None:
        with lock:
            d[name] = d[name] + 1
        with lock:
            d[name] = d[name] - 1

    return pair


def _open_manager(spec: dict) -> Client:
    return Client(_locked_counter_pair(spec["dict"], spec["lock"]), lambda: None)


def _open_filelock(spec: dict) -> Client:
    from filelock import FileLock

    lock = FileLock(spec["lock"])
    path = spec["path"]

    def update(name: str, delta: int) -> None:
        with lock, open(path, "r+") as f:
            data = json.load(f)
            data[name] += delta
            f.seek(0)
            json.dump(data, f)
            f.truncate()

    def pair(name: str) -> None:
        update(name, 1)
        update(name, -1)

    return Client(pair, lambda: None)


def _open_redis(spec: dict) -> Client:
    import redis

    r = redis.Redis(host="127.0.0.1", port=spec["port"])
    key = spec["key"]
    hincrby = r.hincrby

    def pair(name: str) -> None:
        hincrby(key, name, 1)
        hincrby(key, name, -1)

    return Client(pair, r.close)


def _open_ultradict(spec: dict) -> Client:
    from UltraDict import UltraDict

    d = UltraDict(name=spec["name"], create=False, shared_lock=True, auto_unlink=False)
    return Client(_locked_counter_pair(d, d.lock), d.close)


_OPENERS: dict[str, Callable[[dict], Client]] = {
    "shmctx": _open_shmctx,
    "floor": open_floor,
    "manager": _open_manager,
    "filelock": _open_filelock,
    "redis": _open_redis,
    "ultradict": _open_ultradict,
}


def open_client(spec: dict) -> Client:
    return _OPENERS[spec["kind"]](spec)


def shmctx_spec(m: ContextManager, names: list[str]) -> dict:
    """What a worker needs to open a shmctx namespace and map ``names`` in it."""
    return {"kind": "shmctx", "ns": m.namespace, "names": names}


# --- the parent's side: setups ------------------------------------------------------------

def _setup_shmctx(s: Session, specs: dict[str, dict]) -> dict:
    m = s.manager("hot", capacity=BIG_CAPACITY)
    for name in TARGET_NAMES:
        ctx, _ = m.get_or_create_context(name, MemoryContextConfig(size=4096))
        m.return_context(ctx)
    return shmctx_spec(m, TARGET_NAMES[:WORKERS])


def _setup_shmctx_py(s: Session, specs: dict[str, dict]) -> dict:
    if "shmctx" not in specs:
        raise Unavailable("it shares the shmctx contender's table; run that too")
    return {**specs["shmctx"], "pure_python": True}


def _setup_shmctx_10k(s: Session, specs: dict[str, dict]) -> dict:
    m = s.manager("10k", capacity=BIG_CAPACITY)
    for i in range(10_000 - len(TARGET_NAMES)):
        ctx, _ = m.get_or_create_context(f"filler-{i}")
        m.return_context(ctx)
    for name in TARGET_NAMES:
        ctx, _ = m.get_or_create_context(name, MemoryContextConfig(size=4096))
        m.return_context(ctx)
    live = len(m.contexts())
    if live != 10_000:
        raise RuntimeError(f"expected 10,000 live contexts, found {live}")
    return shmctx_spec(m, TARGET_NAMES[:1])


def create_floor(name: str) -> tuple[dict, Callable[[], None]]:
    """The floor's segment and semaphore; returns the spec and their remover."""
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600,
                                 size=FLOOR_SLOTS * FLOOR_SLOT)
    shm.close_fd()
    try:
        posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=0o600, initial_value=1).close()
    except BaseException:
        posix_ipc.unlink_shared_memory(name)
        raise

    def remove() -> None:
        for unlink in (posix_ipc.unlink_shared_memory, posix_ipc.unlink_semaphore):
            with contextlib.suppress(posix_ipc.ExistentialError):
                unlink(name)

    return {"kind": "floor", "shm": name, "sem": name}, remove


def _setup_floor(s: Session, specs: dict[str, dict]) -> dict:
    spec, remove = create_floor(f"/{s.tag}-floor")
    s.on_cleanup("floor segment and semaphore", remove)
    return spec


def _setup_manager(s: Session, specs: dict[str, dict]) -> dict:
    mgr = mp.get_context("spawn").Manager()
    s.on_cleanup("multiprocessing.Manager", mgr.shutdown)
    d = mgr.dict({n: 0 for n in TARGET_NAMES})
    return {"kind": "manager", "dict": d, "lock": mgr.Lock()}


def _setup_filelock(s: Session, names: int) -> dict:
    try:
        import filelock  # noqa: F401
    except ImportError as e:
        raise Unavailable(f"filelock is not installed ({e})") from None
    path = s.tmp / f"registry-{names}.json"
    data = {n: 0 for n in TARGET_NAMES}
    data.update({f"filler-{i}": 0 for i in range(names - len(data))})
    path.write_text(json.dumps(data))
    return {"kind": "filelock", "path": str(path), "lock": str(path) + ".lock"}


def _setup_redis(s: Session, specs: dict[str, dict]) -> dict:
    exe = shutil.which("redis-server")
    if exe is None:
        raise Unavailable("redis-server is not installed")
    try:
        import redis
    except ImportError as e:
        raise Unavailable(f"the redis client package is not installed ({e})") from None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    s.on_cleanup("redis-server", stop)
    r = redis.Redis(host="127.0.0.1", port=port)
    deadline = monotonic() + 10
    while True:
        try:
            r.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or monotonic() > deadline:
                raise Unavailable(f"redis-server did not come up on port {port}") from None
            time.sleep(0.01)  # polling a real condition (the server answers) with a deadline
    key = s.tag
    r.hset(key, mapping={n: 0 for n in TARGET_NAMES})
    r.close()
    return {"kind": "redis", "port": port, "key": key, "version": _redis_version(exe)}


def _redis_version(exe: str) -> str:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _setup_ultradict(s: Session, specs: dict[str, dict]) -> dict:
    try:
        from UltraDict import UltraDict
    except Exception as e:
        raise Unavailable(f"UltraDict does not import ({type(e).__name__}: {e})") from None
    name = f"{s.tag}-ud"
    try:
        d = UltraDict({n: 0 for n in TARGET_NAMES}, name=name, create=True,
                      shared_lock=True, auto_unlink=False)
    except Exception as e:
        raise Unavailable(f"UltraDict cannot be created ({type(e).__name__}: {e})") \
            from None
    s.on_cleanup("UltraDict", d.unlink)
    return {"kind": "ultradict", "name": name}


# key -> setup(session, specs so far) -> spec; in this order (shmctx-py needs shmctx).
SETUPS: dict[str, Callable[[Session, dict[str, dict]], dict]] = {
    "shmctx": _setup_shmctx,
    "shmctx-10k": _setup_shmctx_10k,
    "shmctx-py": _setup_shmctx_py,
    "floor": _setup_floor,
    "manager": _setup_manager,
    "filelock-10": lambda s, _specs: _setup_filelock(s, 10),
    "filelock-10k": lambda s, _specs: _setup_filelock(s, 10_000),
    "redis": _setup_redis,
    "ultradict": _setup_ultradict,
}
