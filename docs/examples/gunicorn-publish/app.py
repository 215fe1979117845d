"""Every gunicorn worker serves from one shared NumPy array, and picks up a new version
of it, published from outside while the server runs, at its next request. Run it: see
README.md in this directory."""

from __future__ import annotations

import json
import os

import numpy as np

import shmctx.gunicorn
from shmctx import MemoryContextConfig

NAME = "embeddings"
FIRST = MemoryContextConfig.for_array((1000, 16), "float32")

_ctx = None  # this worker's handle: one reference, kept from request to request


def _fill_ones(ctx) -> None:
    """Version 1, made by the first worker that asks (the others wait for it)."""
    ctx.array(writeable=True).fill(1.0)


def app(environ, start_response):
    global _ctx
    m = shmctx.gunicorn.manager()  # this worker's manager
    if _ctx is None:
        _ctx, _ = m.get_or_create_context(NAME, FIRST, init=_fill_ones)
    # Between requests is where a worker can let go of an old version: refresh returns
    # it (the last holder frees its memory) and takes the current one.
    _ctx = m.refresh(_ctx)
    emb = _ctx.array()  # read-only view of the shared memory: nothing copied
    body = json.dumps({"pid": os.getpid(), "version": _ctx.version,
                       "shape": list(emb.shape), "first": float(emb[0, 0]),
                       "sum": float(np.sum(emb[:4]))}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
