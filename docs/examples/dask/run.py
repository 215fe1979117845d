"""Dask workers sharing one lookup table per host, built once.

Starts a local cluster of 2 worker processes (2 threads each), registers shmctx's
HostContexts plugin, and runs 256 lookup tasks. The first task on the host to ask for the
table builds it; every other task, in every worker process, reads the same shared memory.
"""

from __future__ import annotations

import os
from array import array

from distributed import Client, LocalCluster

from shmctx import MemoryContextConfig
from shmctx.dask import HostContexts, manager

NAMESPACE = os.environ.get("SHMCTX_NAMESPACE", "dask-example")
ROWS = 1 << 20
ROW = 8  # bytes: one unsigned 64-bit value per row, 8 MiB in all
TABLE = MemoryContextConfig(size=ROWS * ROW)
BUILDS = MemoryContextConfig(size=8)  # how many times the table was built

# The tasks below are defined in this script, so Dask sends them to the workers by value
# (cloudpickle), with the globals they use: those must be picklable (a struct.Struct is
# not). Functions in an installed module are sent by name instead.


def read_u64(buf, offset: int = 0) -> int:
    return int.from_bytes(buf[offset:offset + 8], "little")


def value_of(row: int) -> int:
    return row * row


def load_table(ctx) -> None:
    """Runs once per host, in the first worker that asks for the table."""
    ctx.buf[:] = array("Q", (value_of(r) for r in range(ROWS))).tobytes()
    with manager().context("builds", BUILDS) as builds, builds.lock:
        builds.buf[:8] = (read_u64(builds.buf) + 1).to_bytes(8, "little")


def lookup(row: int) -> tuple[int, bool]:
    """A task: read one row of the shared table, in place."""
    with manager().context("table", TABLE, init=load_table) as table:
        value = read_u64(table.buf, row * ROW)
    return os.getpid(), value == value_of(row)


def builds() -> int:
    with manager().context("builds", BUILDS) as b:
        return read_u64(b.buf)


def main() -> None:
    with LocalCluster(n_workers=2, threads_per_worker=2, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.register_plugin(HostContexts(namespace=NAMESPACE))
        results = client.gather(client.map(lookup, range(0, ROWS, ROWS // 256)))
        pids = {pid for pid, _ in results}
        ok = all(correct for _, correct in results)
        print(f"{len(results)} lookups by {len(pids)} of the "
              f"{len(client.scheduler_info()['workers'])} worker processes, "
              f"{'all correct' if ok else 'SOME WRONG'}")
        print(f"the table was built {client.submit(builds).result()} time(s) on this host")
    # Closing the cluster closed the namespace: nothing of it is left in /dev/shm.


if __name__ == "__main__":  # the worker processes are spawned: they import this file
    main()
