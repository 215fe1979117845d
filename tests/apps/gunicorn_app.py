"""WSGI app served by real gunicorn in tests/test_gunicorn.py.

Every endpoint answers JSON carrying the worker's pid:

* ``/count``: increments one counter shared by all workers (a context, under its lock).
* ``/dataset``: CRC of a 1 MiB dataset the first worker to ask builds, once, for all.
* ``/hold?path=P``: takes a reference to context ``held``, writes its pid to ``P``, then
  blocks until the worker is killed.
* ``/lease``: takes one reference to context ``leased`` the first time a worker is asked,
  and keeps it until the worker exits.
* ``/preload``: with ``SHMCTX_TEST_PRELOAD=1`` the master built the dataset at import
  (``preload_app``); reports what a worker can do with the master's handle.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import zlib
from urllib.parse import parse_qs

import shmctx.gunicorn
from shmctx import ContextError, MemoryContextConfig

COUNTER = struct.Struct("<Q")
DATASET_SIZE = 1 << 20


def dataset_bytes() -> bytes:
    return bytes(range(256)) * (DATASET_SIZE // 256)


def _build_dataset(ctx) -> None:
    ctx.buf[:] = dataset_bytes()


def _dataset_config() -> MemoryContextConfig:
    return MemoryContextConfig(size=DATASET_SIZE)


PRELOADED = os.environ.get("SHMCTX_TEST_PRELOAD") == "1"
if PRELOADED:
    # Runs in the master: preload_app imports the app before forking the workers.
    MASTER_PID = os.getpid()
    MASTER_MANAGER = shmctx.gunicorn.manager()
    MASTER_CTX, _ = MASTER_MANAGER.get_or_create_context(
        "dataset", _dataset_config(), init=_build_dataset
    )


def _count() -> dict:
    m = shmctx.gunicorn.manager()
    with m.context("counter", MemoryContextConfig(size=COUNTER.size)) as ctx, ctx.lock:
        value = COUNTER.unpack_from(ctx.buf)[0] + 1
        COUNTER.pack_into(ctx.buf, 0, value)
    return {"value": value, "manager": id(m), "thread": threading.get_ident()}


def _dataset() -> dict:
    m = shmctx.gunicorn.manager()
    ctx, _ = m.get_or_create_context("dataset", _dataset_config(), init=_build_dataset)
    try:
        return {"crc": zlib.crc32(ctx.buf), "incarnation": ctx.incarnation}
    finally:
        m.return_context(ctx)


def _hold(query: dict) -> dict:
    m = shmctx.gunicorn.manager()
    m.get_or_create_context("held")  # never returned: the worker is killed holding it
    path = query["path"][0]
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    threading.Event().wait()
    return {}


_LEASED: list = []
_LEASE_LOCK = threading.Lock()


def _lease() -> dict:
    with _LEASE_LOCK:  # one reference per worker, whatever the number of requests
        if not _LEASED:
            _LEASED.append(shmctx.gunicorn.manager().get_or_create_context("leased")[0])
    return {}


def _error_name(action) -> str:
    try:
        action()
    except ContextError as e:
        return type(e).__name__
    return "no error"


def _preload() -> dict:
    own = shmctx.gunicorn.manager()
    return {
        "own_manager": own is not MASTER_MANAGER,
        "master_buf": _error_name(lambda: MASTER_CTX.buf),
        "master_return": _error_name(lambda: own.return_context(MASTER_CTX)),
        **_dataset(),
    }


def app(environ, start_response):
    path = environ["PATH_INFO"]
    query = parse_qs(environ.get("QUERY_STRING", ""))
    routes = {
        "/ping": lambda: {},
        "/count": _count,
        "/dataset": _dataset,
        "/hold": lambda: _hold(query),
        "/lease": _lease,
        "/preload": _preload,
    }
    if path not in routes:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]
    body = json.dumps({"pid": os.getpid(), **routes[path]()}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
