"""Helpers shared by the test modules (import as ``from helpers import ...``)."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")
WAIT = 30.0  # generous upper bound for any one worker message; never reached when things work


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


# --- worker processes ----------------------------------------------------------------
# Spawned and forkserver children import what they run by name: the functions below and
# every worker body must stay at module level.

def follow_leg(leg: str) -> None:
    """Make the managers this process makes from now on run the hot path of the test's
    leg ("C" or "Python"). Fork and spawn children inherit the leg's environment; a
    forkserver's children inherit the server's, fixed when it started, so each of them
    must call this itself."""
    if leg == "Python":
        os.environ["SHMCTX_PURE_PYTHON"] = "1"
    else:
        os.environ.pop("SHMCTX_PURE_PYTHON", None)


def run_worker(q, body, *args) -> None:
    """A worker process's target: runs ``body(q, *args)``; if it fails, its traceback is
    put on ``q`` as ``("crash", pid, traceback)`` (so the test fails at once, naming the
    cause, rather than timing out) and the exception is raised again."""
    try:
        body(q, *args)
    except BaseException:
        q.put(("crash", os.getpid(), traceback.format_exc()))
        raise


class Workers:
    """Starts worker processes, collects their messages, never leaves one running.

    ``start`` uses ``method`` unless told another. The queue and every event are the
    spawn context's: those can be handed to children of any start method."""

    def __init__(self, method: str = "fork") -> None:
        self.method = method
        self.mp = mp.get_context("spawn")
        self.q = self.mp.Queue()
        self.procs: list = []
        self.killed: set[int] = set()  # pids the test killed on purpose

    def event(self):
        return self.mp.Event()

    def start(self, body, *args, method: str | None = None):
        p = mp.get_context(method or self.method).Process(
            target=run_worker, args=(self.q, body, *args), daemon=True)
        p.start()
        self.procs.append(p)
        return p

    def recv(self, kind: str) -> tuple:
        """The next message, which must be of ``kind``. A worker that died without a word
        (killed, crashed in C) fails the test as soon as that is seen."""
        deadline = time.monotonic() + WAIT
        while True:
            try:
                msg = self.q.get(timeout=0.1)  # a poll interval: each pass checks exits
                break
            except queue.Empty:
                dead = [(p.pid, p.exitcode) for p in self.procs
                        if p.exitcode not in (None, 0) and p.pid not in self.killed]
                if dead:  # a negative exit code is the signal that killed it: -11 is SIGSEGV
                    pytest.fail(f"worker(s) died without reporting (pid, exit code): {dead}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no {kind!r} message from the workers within {WAIT}s")
        if msg[0] == "crash":
            pytest.fail(f"worker {msg[1]} failed:\n{msg[2]}")
        assert msg[0] == kind, f"expected a {kind!r} message, got {msg!r}"
        return msg

    def kill(self, p) -> None:
        """SIGKILL worker ``p`` on purpose and wait for it."""
        self.killed.add(p.pid)
        os.kill(p.pid, signal.SIGKILL)
        p.join(WAIT)

    def died_by_itself(self, p) -> None:
        """``p`` SIGKILLed itself (a failpoint): wait for it and say so."""
        self.killed.add(p.pid)
        p.join(WAIT)
        assert p.exitcode == -signal.SIGKILL, f"worker {p.pid} exited with {p.exitcode}"

    def join(self) -> None:
        for p in self.procs:
            p.join(WAIT)
            if p.pid not in self.killed:
                assert p.exitcode == 0, f"worker {p.pid} exited with {p.exitcode}"

    def cleanup(self) -> None:
        # A test that passed has joined every worker: one still running is left waiting
        # by a failed test, for an event that will never come.
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(5)
        self.q.close()
        self.q.join_thread()
