"""The Ray driver of membench's ``ray`` scenario: starts a local Ray instance (loopback
only, no dashboard, no usage reporting), ``ray.put``s the array once and hands the
reference to a named actor, from which every gunicorn worker takes it.

Usage: ray_holder.py NPY OBJECT_STORE_BYTES TEMP_DIR. Prints one JSON line
``{"address": ..., "put_seconds": ...}`` when ready, then keeps the reference until its
standard input closes, and shuts Ray down."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import ray


@ray.remote(num_cpus=0)
class Holder:
    def __init__(self, refs: list) -> None:
        self._refs = refs  # a list, so that Ray passes the reference, not the array

    def refs(self) -> list:
        return self._refs


def main() -> None:
    npy, store, temp_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    ctx = ray.init(include_dashboard=False, num_cpus=1, object_store_memory=store,
                   namespace="membench", _node_ip_address="127.0.0.1", _temp_dir=temp_dir,
                   logging_level="WARNING", log_to_driver=False)
    t0 = time.monotonic()
    ref = ray.put(np.load(npy))  # the driver's own copy is freed once it is in the store
    holder = Holder.options(name="membench-holder").remote([ref])
    ray.get(holder.refs.remote())  # the actor is up
    print(json.dumps({"address": ctx.address_info["gcs_address"],
                      "put_seconds": time.monotonic() - t0}), flush=True)
    sys.stdin.read()  # until the benchmark closes our standard input (or dies)
    ray.shutdown()


if __name__ == "__main__":
    main()
