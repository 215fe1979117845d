"""The Celery app of tests/test_celery.py, run by a real ``celery worker``.

Environment: SHMCTX_TEST_CELERY_DIR (broker, results and the tasks' files),
SHMCTX_TEST_CELERY_CLEANUP (the namespace's cleanup_interval; unset: the defaults),
SHMCTX_NAMESPACE (the namespace; unset: celery-<main pid>).
"""

from __future__ import annotations

import os
import time

from celery import Celery, signals
from celery_conf import settings

from shmctx import ContextConfig, MemoryContextConfig
from shmctx.celery import install, manager

ROOT = os.environ["SHMCTX_TEST_CELERY_DIR"]
SIZE = MemoryContextConfig(size=64)
WAIT = 30.0  # a task waits at most this long for the test to release it

app = Celery("shmctx_test_celery")
app.conf.update(settings(ROOT))
if os.environ.get("SHMCTX_TEST_CELERY_START"):  # "spawn": pool processes are fresh interpreters
    app.conf.worker_pool_start_method = os.environ["SHMCTX_TEST_CELERY_START"]

_cleanup = os.environ.get("SHMCTX_TEST_CELERY_CLEANUP")
install(app, config=None if _cleanup is None else ContextConfig(
    max_references=0, max_idle_time=0, cleanup_interval=float(_cleanup)))

_kept = []  # references a task takes and never returns (given back when the process exits)


def _build(ctx) -> None:
    """Runs once per namespace: records which process built the context, and counts."""
    ctx.buf[:16] = b"%-16d" % os.getpid()
    with open(os.path.join(ROOT, "inits"), "a") as f:
        f.write(f"{os.getpid()}\n")


def _content(ctx) -> str:
    return bytes(ctx.buf[:16]).decode().strip()


def _mark(what: str) -> None:
    """Tell the test this process reached ``what`` (a file it polls for)."""
    open(os.path.join(ROOT, f"{what}-{os.getpid()}"), "w").close()


def _wait_released(release: str) -> None:
    deadline = time.monotonic() + WAIT
    while not os.path.exists(os.path.join(ROOT, release)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"not released: {release}")
        time.sleep(0.01)


@signals.worker_process_init.connect
def _hold_from_the_start(**_) -> None:
    """With SHMCTX_TEST_CELERY_BOOT_REF: each pool process takes a reference as it starts
    (after shmctx.celery attached it) and keeps it, and reports holding it."""
    if os.environ.get("SHMCTX_TEST_CELERY_BOOT_REF"):
        ctx, _ = manager().get_or_create_context("boot", SIZE, init=_build)
        _kept.append(ctx)
        _mark("booted")


@app.task(name="t.hold")
def hold(name: str, release: str) -> dict:
    """Take a reference to ``name`` (built once), report holding it, keep it until the
    test creates the file ``release``, then return it."""
    m = manager()
    ctx, _ = m.get_or_create_context(name, SIZE, init=_build)
    try:
        _mark("holding")
        _wait_released(release)
        return {"pid": os.getpid(), "content": _content(ctx), "namespace": m.namespace}
    finally:
        m.return_context(ctx)


@app.task(name="t.keep")
def keep(name: str) -> dict:
    """Take a reference to ``name`` and never return it."""
    m = manager()
    ctx, _ = m.get_or_create_context(name, SIZE, init=_build)
    _kept.append(ctx)
    return {"pid": os.getpid(), "content": _content(ctx), "namespace": m.namespace}
