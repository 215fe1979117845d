"""Task functions for tests/test_dask.py and the workers it starts. Dask pickles them by
reference (module ``dask_tasks``), so the workers import this file: the test puts its
directory on their ``PYTHONPATH``.
"""

from __future__ import annotations

import functools
import os
import threading
import zlib

import shmctx.dask
from shmctx import ContextError, MemoryContextConfig

TABLE_SIZE = 1 << 20


def table_bytes() -> bytes:
    return bytes(range(256)) * (TABLE_SIZE // 256)


def _build(count_dir: str, ctx) -> None:
    # One file per init call: the test counts them (a count kept outside shmctx, so a
    # shmctx bug cannot hide a second init).
    fd = os.open(os.path.join(count_dir, f"init-{os.getpid()}-{threading.get_ident()}"),
                 os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.close(fd)
    ctx.buf[:] = table_bytes()


def read_table(count_dir: str, _i: int = 0) -> dict:
    """Get (creating once per host) the table, checksum it in place, return it."""
    m = shmctx.dask.manager()
    ctx, existed = m.get_or_create_context(
        "table", MemoryContextConfig(size=TABLE_SIZE), init=functools.partial(_build, count_dir))
    try:
        crc = zlib.crc32(ctx.buf)
    finally:
        m.return_context(ctx)
    return {"pid": os.getpid(), "manager": id(m), "existed": existed, "crc": crc,
            "namespace": m.namespace}


def hold() -> None:
    """Take a reference to the table and keep it until this worker is killed."""
    m = shmctx.dask.manager()
    m.get_or_create_context("table")
    threading.Event().wait(60)


def manager_error() -> str | None:
    """The ContextError manager() raises here, or None if it gives a manager."""
    try:
        shmctx.dask.manager()
    except ContextError as e:
        return str(e)
    return None
