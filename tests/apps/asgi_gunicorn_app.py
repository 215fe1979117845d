"""ASGI app served by gunicorn with uvicorn workers (``-k uvicorn_worker.UvicornWorker``,
``-c tests/apps/gunicorn_conf.py``) in tests/test_gunicorn_uvicorn.py. It reaches the
worker's manager with ``shmctx.gunicorn.manager()``, and is also wrapped with
``shmctx.asgi.lifespan``, which under gunicorn hands out that same manager.

Every endpoint answers JSON carrying the worker's pid:

* ``/count``: increments one counter shared by all workers (a context, under its lock).
* ``/lease``: takes one reference to context ``leased`` the first time a worker is asked,
  and keeps it until the worker exits.
* ``/whoami``: what ``shmctx.asgi`` hands out in this worker.
"""

from __future__ import annotations

import json
import os
import struct

import shmctx.asgi
import shmctx.gunicorn
from shmctx import MemoryContext, MemoryContextConfig

COUNTER = struct.Struct("<Q")
_leased: list[MemoryContext] = []


def _count() -> dict:
    m = shmctx.gunicorn.manager()
    with m.context("counter", MemoryContextConfig(size=COUNTER.size)) as ctx, ctx.lock:
        value = COUNTER.unpack_from(ctx.buf)[0] + 1
        COUNTER.pack_into(ctx.buf, 0, value)
    return {"value": value}


def _lease() -> dict:
    if not _leased:  # one coroutine at a time runs this: no await in between
        _leased.append(shmctx.gunicorn.manager().get_or_create_context("leased")[0])
    return {}


def _whoami() -> dict:
    return {"same_manager": shmctx.asgi.manager() is shmctx.gunicorn.manager(),
            "namespace": shmctx.asgi.namespace()}


async def _app(scope, receive, send) -> None:
    assert scope["type"] == "http"
    routes = {"/ping": dict, "/count": _count, "/lease": _lease, "/whoami": _whoami}
    body = json.dumps({"pid": os.getpid(), **routes[scope["path"]]()}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


app = shmctx.asgi.lifespan(_app)
