"""The outside process of membench's ``shmctx-publish`` scenario: attaches to the
namespace that the gunicorn master created (its name is the SHMCTX_NAMESPACE the
server was started with, see docs/gunicorn.md, "Settings") and publishes version 2 of
the array, filled with 2.0, while the server is under load.

Usage: publisher.py NAMESPACE NAME ELEMS. Prints one JSON line: when the publish started
and ended (``time.monotonic()``, the clock the app stamps its answers with), how long
it took and how much of that was the fill (``init``), and the new version."""

from __future__ import annotations

import json
import sys
import time

from shmctx import ContextManager, MemoryContextConfig


def main() -> None:
    ns, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    fill: list[float] = []

    def fill_with_2(ctx) -> None:
        t = time.monotonic()
        ctx.array(writeable=True).fill(2.0)
        fill.append(time.monotonic() - t)

    # create=False: a namespace that does not exist (is the server running?) is an
    # error, not a new one where no worker looks.
    with ContextManager(namespace=ns, create=False, sweeper=False) as m:  # master sweeps
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
