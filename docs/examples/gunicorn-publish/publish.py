"""Publish a new version of the served array while the server runs.

    SHMCTX_NAMESPACE=embeddings-demo python publish.py [VALUE] [ROWS]

The namespace is the one the server was started with (SHMCTX_NAMESPACE). The new version
(ROWS x 16 float32, filled with VALUE) is built here, in full, before any worker can see
it; then every worker's next request serves it."""

from __future__ import annotations

import os
import sys

from shmctx import ContextManager, ContextNotFoundError, MemoryContextConfig


def main() -> int:
    namespace = os.environ.get("SHMCTX_NAMESPACE", "embeddings-demo")
    value = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
    rows = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    # create=False: attach only to the namespace the server made. A mistyped name is
    # then an error, not a new namespace that no worker looks at.
    try:
        m = ContextManager(namespace=namespace, create=False, sweeper=False)
    except ContextNotFoundError as e:
        print(f"{e}", file=sys.stderr)
        return 1
    with m:  # the master sweeps
        new = m.publish("embeddings", MemoryContextConfig.for_array((rows, 16), "float32"),
                        init=lambda c: c.array(writeable=True).fill(value))
        print(f"published version {new.version}: {rows} x 16 of {value}")
        m.return_context(new)  # the workers take it from their next request on
    return 0


if __name__ == "__main__":
    sys.exit(main())
