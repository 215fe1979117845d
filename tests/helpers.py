"""Helpers shared by the test modules (import as ``from helpers import ...``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def real_table_bytes(namespace: str, config: object) -> bytes:
    """The bytes of a genuine table, made under ``namespace`` with ``config`` and unlinked
    again at once: the starting point of every damaged or hostile table the tests make."""
    from shmctx import ContextManager

    m = ContextManager(config, namespace=namespace, sweeper=False)  # type: ignore[arg-type]
    try:
        return table_bytes(namespace)
    finally:
        m.unlink(force=True)


def table_bytes(namespace: str) -> bytes:
    """The whole table of ``namespace`` as it is now, read from /dev/shm."""
    from shmctx import _shm

    with open(_shm.host_path(_shm.table_name(namespace)), "rb") as f:
        return f.read()


def hot_path_of(manager: object) -> str:
    """Which hot path ``manager`` runs: "C" (``_speedups.c``) or "Python"."""
    return manager.hot_path


def wait_for(condition: Callable[[], T | None], timeout: float = 10.0,
             what: str = "condition") -> T:
    """Poll a real condition until it is truthy and return its value; fail after
    ``timeout`` seconds. The sleep is the poll interval, never a stand-in for the
    condition itself."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)
    return value
