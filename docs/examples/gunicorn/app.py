"""Every gunicorn worker serves from one lookup table, built once per server, and counts
hits in one shared counter. Run it: see README.md in this directory."""

from __future__ import annotations

import json
import os
import struct
from urllib.parse import parse_qs

import shmctx.gunicorn
from shmctx import MemoryContextConfig

TABLE = MemoryContextConfig(size=8 << 20)  # 8 MiB, mapped (not copied) by every worker
HITS = struct.Struct("<Q")


def build_table(ctx) -> None:
    """Runs once per server, in the first worker that asks; the others wait for it.
    Stands in for loading a model or a dataset."""
    ctx.buf[:] = bytes(range(256)) * (ctx.size // 256)


def app(environ, start_response):
    m = shmctx.gunicorn.manager()  # this worker's manager, shared by its threads
    i = int(parse_qs(environ.get("QUERY_STRING", "")).get("i", ["0"])[0]) % TABLE.size
    with m.context("lookup-table", TABLE, init=build_table) as table:
        value = table.buf[i]  # reads the shared memory in place
    with m.context("hits", MemoryContextConfig(size=HITS.size)) as hits, hits.lock:
        n = HITS.unpack_from(hits.buf)[0] + 1  # one counter for all workers
        HITS.pack_into(hits.buf, 0, n)
    body = json.dumps({"pid": os.getpid(), "hits": n, "i": i, "value": value}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
