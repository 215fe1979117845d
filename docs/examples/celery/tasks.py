"""A Celery app whose pool processes serve lookups from one 8 MiB table, built once per
worker (by the first pool process that needs it) and mapped by every pool process.
Run it: see README.md in this directory."""

from __future__ import annotations

import os

import broker
from celery import Celery

from shmctx import MemoryContextConfig
from shmctx.celery import install, manager

app = Celery("tasks")
app.conf.update(broker.settings())
install(app)  # the whole set-up: the worker's main process owns the namespace

TABLE = MemoryContextConfig(size=8 << 20)  # 8 MiB, mapped (not copied) by every process
HEADER = 8  # the table starts with the pid of the process that built it


def build_table(ctx) -> None:
    """Runs once per worker, in the first pool process that asks; the others wait for
    it. Stands in for loading a model or a dataset."""
    ctx.buf[:HEADER] = os.getpid().to_bytes(HEADER, "little")
    body = ctx.size - HEADER
    ctx.buf[HEADER:] = (bytes(range(256)) * (body // 256 + 1))[:body]


@app.task
def lookup(i: int) -> dict:
    with manager().context("lookup-table", TABLE, init=build_table) as table:
        built_by = int.from_bytes(table.buf[:HEADER], "little")
        value = table.buf[HEADER + i % (TABLE.size - HEADER)]  # read in place
    return {"pid": os.getpid(), "i": i, "value": value, "built_by": built_by}
