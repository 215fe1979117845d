"""The outside process of membench's ``shmctx-publish`` scenario: attaches to the
namespace that the gunicorn master created (its name is the SHMCTX_NAMESPACE the
server was started with, see docs/gunicorn.md, "Settings") and publishes version 2 of
the array, filled with 2.0, while the server is under load.

Usage: publisher.py NAMESPACE NAME ELEMS. Prints one JSON line: when the publish started
and ended (``time.monotonic()``, the clock the app stamps its answers with), how long
it took and how much of that was the fill (``init``), and the new version."""

from __future__ import annotations

import json
import os
import sys
import time

from shmctx import ContextManager, MemoryContextConfig


def main() -> None:
    ns, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    # ContextManager() would create a namespace that does not exist (shmctx has no
    # public attach-only switch), and publish where no worker looks: refuse instead.
    if not os.path.exists(f"/dev/shm/shmctx@{ns}"):
        raise SystemExit(f"namespace {ns!r} does not exist: is the server running?")
    fill: list[float] = []

    def fill_with_2(ctx) -> None:
        t = time.monotonic()
        ctx.array(writeable=True).fill(2.0)
        fill.append(time.monotonic() - t)

    with ContextManager(namespace=ns, sweeper=False) as m:  # the master sweeps
        t0 = time.monotonic()
        new = m.publish(name, MemoryContextConfig.for_array((n,), "float32"),
                        init=fill_with_2)
        t1 = time.monotonic()
        version = new.version
        m.return_context(new)  # the workers hold it from their next refresh on
    print(json.dumps({"start": t0, "end": t1, "seconds": t1 - t0, "init_seconds": fill[0],
                      "version": version}), flush=True)


if __name__ == "__main__":
    main()
