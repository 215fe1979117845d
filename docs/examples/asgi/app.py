"""Every uvicorn worker serves lookups from one table, built once per server, and counts
hits in one counter shared by all workers. Run it: see README.md in this directory."""

from __future__ import annotations

import json
import os
import struct
from urllib.parse import parse_qs

import shmctx.asgi
from shmctx import MemoryContext, MemoryContextConfig

TABLE = MemoryContextConfig(size=8 << 20)  # 8 MiB, mapped (not copied) by every worker
HITS = struct.Struct("<Q")
HITS_CONFIG = MemoryContextConfig(size=HITS.size)


def build_table(ctx: MemoryContext) -> None:
    """Runs once per server, in the first worker that asks, in a thread of its own
    (the worker's other requests go on); the workers asking meanwhile wait for it.
    Stands in for loading a model or a dataset."""
    ctx.buf[:] = bytes(range(256)) * (ctx.size // 256)


async def lookup(scope, receive, send) -> None:
    if scope["type"] != "http":
        return  # no lifespan of its own: shmctx.asgi.lifespan handles that scope
    query = parse_qs(scope["query_string"].decode())
    i = int(query.get("i", ["0"])[0]) % TABLE.size
    # The get may build the table or wait for another worker building it: in a thread.
    async with shmctx.asgi.context("lookup-table", TABLE, init=build_table) as table:
        value = table.buf[i]  # reads the shared memory in place
    # A short critical section with no await in it: the plain calls are right here.
    m = shmctx.asgi.manager()
    with m.context("hits", HITS_CONFIG) as hits, hits.lock:
        n = HITS.unpack_from(hits.buf)[0] + 1  # one counter for all workers
        HITS.pack_into(hits.buf, 0, n)
    body = json.dumps({"pid": os.getpid(), "hits": n, "i": i, "value": value}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


# Attaches each worker when uvicorn starts it up, detaches it at shutdown; the last
# worker to leave removes the namespace from /dev/shm.
app = shmctx.asgi.lifespan(lookup)
