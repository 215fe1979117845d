"""A real Dask cluster for tests/test_dask.py, in a process of its own (its nannies run
here, and so does shmctx's supervisor role: keeping them out of the test process keeps
``route_logs`` from rerouting the test session's own logging).

    python dask_cluster.py N_WORKERS

starts ``LocalCluster(n_workers=N_WORKERS, processes=True, threads_per_worker=2)`` on
127.0.0.1 (N_WORKERS=0: a scheduler only, for workers started apart or later), prints one
JSON line ``{"address": ..., "pid": ...}``, then obeys lines on stdin:

* ``scale N``: ``cluster.scale(N)``, waits for N workers, prints ``{"workers": N}``;
* ``close`` (or the end of stdin): ``cluster.close()``, prints ``{"closed": true}``, exits.

Its log (stderr) is at INFO, so the test can read the lines shmctx writes into
distributed's log.
"""

from __future__ import annotations

import json
import logging
import os
import sys


def main() -> None:
    from distributed import LocalCluster

    n = int(sys.argv[1])
    cluster = LocalCluster(n_workers=n, processes=True, threads_per_worker=2,
                           host="127.0.0.1", dashboard_address=None,
                           silence_logs=logging.INFO)
    print(json.dumps({"address": cluster.scheduler_address, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[:1] != ["scale"]:
            break
        cluster.scale(int(command[1]))
        cluster.wait_for_workers(int(command[1]), timeout=60)
        print(json.dumps({"workers": int(command[1])}), flush=True)
    cluster.close()
    print(json.dumps({"closed": True}), flush=True)


if __name__ == "__main__":  # the workers are spawned: they import this module again
    main()
