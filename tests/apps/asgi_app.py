"""ASGI app served by real uvicorn workers in tests/test_asgi.py
(``python -m uvicorn tests.apps.asgi_app:app --workers 4``), wrapped with
``shmctx.asgi.lifespan``; the namespace comes from SHMCTX_NAMESPACE (else the default).

Its own lifespan (which the wrapper passes through) takes one reference to context
``lease`` at startup, through ``shmctx.asgi.manager()``, and returns it at shutdown: every
live worker holds exactly one, and a killed worker leaves one behind for the sweeper.

Every endpoint answers JSON carrying the worker's pid:

* ``/ping``: nothing else.
* ``/count``: increments one counter shared by all workers, under ``shmctx.asgi.locked``
  with an ``await`` inside the critical section.
* ``/dataset``: CRC of a 1 MiB dataset the first worker to ask builds (its ``init`` runs
  in a thread), once, for all.

``SHMCTX_TEST_CLEANUP`` sets the sweep interval (seconds); ``SHMCTX_TEST_FAIL_STARTUP=1``
makes the app's own lifespan startup fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import zlib

import shmctx.asgi
from shmctx import ContextConfig, MemoryContext, MemoryContextConfig

COUNTER = struct.Struct("<Q")
COUNTER_CONFIG = MemoryContextConfig(size=COUNTER.size)
DATASET_SIZE = 1 << 20

_lease: list[MemoryContext] = []


def dataset_bytes() -> bytes:
    return bytes(range(256)) * (DATASET_SIZE // 256)


def _build_dataset(ctx: MemoryContext) -> None:
    ctx.buf[:] = dataset_bytes()


async def _count() -> dict:
    async with shmctx.asgi.context("counter", COUNTER_CONFIG) as ctx, \
            shmctx.asgi.locked(ctx):
        value = COUNTER.unpack_from(ctx.buf)[0] + 1
        await asyncio.sleep(0)  # another request of this worker runs here: it must wait
        COUNTER.pack_into(ctx.buf, 0, value)
    return {"value": value}


async def _dataset() -> dict:
    ctx, _ = await shmctx.asgi.get_or_create_context(
        "dataset", MemoryContextConfig(size=DATASET_SIZE), init=_build_dataset)
    try:
        return {"crc": zlib.crc32(ctx.buf), "incarnation": ctx.incarnation}
    finally:
        shmctx.asgi.manager().return_context(ctx)


async def _lifespan(receive, send) -> None:
    await receive()  # lifespan.startup: shmctx attached this worker before passing it on
    if os.environ.get("SHMCTX_TEST_FAIL_STARTUP") == "1":
        await send({"type": "lifespan.startup.failed", "message": "test app: no startup"})
        return
    _lease.append(shmctx.asgi.manager().get_or_create_context("lease")[0])
    await send({"type": "lifespan.startup.complete"})
    await receive()  # lifespan.shutdown: shmctx detaches after this app's shutdown
    shmctx.asgi.manager().return_context(_lease.pop())
    await send({"type": "lifespan.shutdown.complete"})


async def _app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    assert scope["type"] == "http"
    routes = {"/ping": None, "/count": _count, "/dataset": _dataset}
    if scope["path"] not in routes:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"not found"})
        return
    route = routes[scope["path"]]
    body = json.dumps({"pid": os.getpid(), **(await route() if route else {})}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


app = shmctx.asgi.lifespan(_app, config=ContextConfig(
    max_references=0, max_idle_time=0, lock_timeout=0.2,
    cleanup_interval=float(os.environ.get("SHMCTX_TEST_CLEANUP", "60"))))
