"""The WSGI app that ``tools/membench.py`` serves with gunicorn (sync workers).

Every scenario serves the same array of ``MEMBENCH_ELEMS`` float32 ones, read from the
.npy file ``MEMBENCH_NPY`` that the benchmark wrote once; only where the array lives
differs (``MEMBENCH_SCENARIO``):

* ``baseline``: no array at all: what the interpreters themselves cost.
* ``own-copy``: each worker loads its own copy when it imports the app.
* ``preload-cow``: the master loads it before forking (``--preload``); the workers
  share its pages copy-on-write.
* ``shmctx-array``: the documented gunicorn wiring; each worker gets (the first one
  creates) an array context once, keeps the handle and reads ``ctx.array()``.
* ``shmctx-object``: ``get_or_create_object`` of a dict holding the array and some Python
  objects; each worker keeps ``ctx.load()``.
* ``shmctx-publish``: as ``shmctx-array``, and each request starts with
  ``m.refresh(ctx)``, so that a version published from outside is picked up.
* ``ray``: a driver outside gunicorn did ``ray.put`` once and keeps the reference in a
  named actor; each worker connects to that Ray instance and ``ray.get``s the array.

Each request sums a few elements at random indices, so every worker touches the array,
and answers JSON: the worker's pid, the version of the data (``ctx.version`` for
shmctx, else 1), when the request started (``time.monotonic()``, one clock for the
whole host) and the sum, which the load generator checks (``K`` times the version).
``?sleep=S`` makes the request take S seconds longer: the benchmark's warm-up uses it
to make sure every worker gets requests.
"""

from __future__ import annotations

import json
import os
import random
import time

import numpy as np

SCENARIO = os.environ["MEMBENCH_SCENARIO"]
NPY = os.environ["MEMBENCH_NPY"]
N = int(os.environ["MEMBENCH_ELEMS"])
NAME = "membench-array"  # the context's name in the scenarios that use shmctx
K = 8  # elements summed per request

CTX = None  # this worker's handle (shmctx scenarios): kept for the worker's life
ARRAY = None  # what the requests read
OBJ = None  # shmctx-object: the loaded dict (its Python parts are this worker's own)
M = None  # this worker's shmctx manager


def _fill(ctx) -> None:
    """``init`` of the array context: runs once per server, in the first worker that
    asks; the others wait for it. Copies from the file straight into shared memory."""
    ctx.array(writeable=True)[:] = np.load(NPY, mmap_mode="r")


def _model() -> dict:
    """The object of ``shmctx-object``: the array (stored once, read as a view) and some
    plain Python objects (unpickled in every worker that loads it)."""
    return {
        "emb": np.load(NPY),
        "vocab": {f"w{i}": i for i in range(20_000)},
        "meta": {"name": "membench", "dim": 1, "labels": [f"label-{i}" for i in range(1000)]},
    }


if SCENARIO in ("own-copy", "preload-cow"):
    ARRAY = np.load(NPY)  # private pages of this process (preload: of the master)
elif SCENARIO in ("shmctx-array", "shmctx-publish", "shmctx-object"):
    import shmctx.gunicorn
    from shmctx import MemoryContextConfig

    M = shmctx.gunicorn.manager()  # post_fork has run: this worker's own manager
    if SCENARIO == "shmctx-object":
        CTX, _ = M.get_or_create_object(NAME, _model)
        OBJ = CTX.load()
        ARRAY = OBJ["emb"]  # a read-only view of the shared memory
    else:
        CTX, _ = M.get_or_create_context(
            NAME, MemoryContextConfig.for_array((N,), "float32"), init=_fill)
        ARRAY = CTX.array()
elif SCENARIO == "ray":
    import ray

    ray.init(address=os.environ["MEMBENCH_RAY_ADDRESS"], namespace="membench",
             _node_ip_address="127.0.0.1", logging_level="WARNING", log_to_driver=False)
    _holder = ray.get_actor("membench-holder")
    (_ref,) = ray.get(_holder.refs.remote())
    ARRAY = ray.get(_ref)  # zero-copy, read-only view of Ray's object store
elif SCENARIO != "baseline":
    raise SystemExit(f"unknown MEMBENCH_SCENARIO {SCENARIO!r}")


def app(environ, start_response):
    global CTX, ARRAY
    started = time.monotonic()  # before refresh: a v1 answer must have started earlier
    if SCENARIO == "shmctx-publish":
        new = M.refresh(CTX)
        if new is not CTX:
            # Drop the old array too: it keeps the old version mapped in this process,
            # and its memory can only go once no worker maps it any more.
            CTX, ARRAY = new, new.array()
    query = environ.get("QUERY_STRING", "")
    if query.startswith("sleep="):
        time.sleep(float(query[len("sleep="):]))
    if ARRAY is None:
        total = float(K)  # baseline: nothing to read
    else:
        total = float(ARRAY[[random.randrange(N) for _ in range(K)]].sum())
    if OBJ is not None:
        total += OBJ["vocab"]["w0"]  # uses the Python part too (it is 0)
    body = json.dumps({"pid": os.getpid(), "v": CTX.version if CTX is not None else 1,
                       "t": started, "s": total}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
