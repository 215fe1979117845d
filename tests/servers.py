"""Helpers for the tests that run real servers and worker processes (gunicorn, uvicorn,
Celery, Dask, the documentation's commands): start one in a session of its own, find its
processes through /proc, talk HTTP to it, and kill whatever is left of it at the end.
Import as ``from servers import ...``."""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import signal
import socket
import subprocess
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import Any

from helpers import wait_for

PPID, SESSION = 1, 3  # fields of /proc/PID/stat after the command name
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_with_parent() -> None:
    """In a started process, before exec: SIGTERM it (a clean shutdown, which leaves
    nothing in /dev/shm) if the test process dies without reaching its ``finally``."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def processes(field: int, value: int, zombies: bool = False) -> set[int]:
    """Processes whose /proc/PID/stat ``field`` is ``value``; live ones only unless
    ``zombies`` (a zombie still counts as a child until its parent reaps it)."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[field]) == value and (zombies or fields[0] not in (b"Z", b"X")):
            out.add(int(entry))
    return out


def children(pid: int) -> set[int]:
    """Live (non-zombie) child processes of ``pid``."""
    return processes(PPID, pid)


def session(sid: int) -> set[int]:
    """Live processes of session ``sid``: a server's master(s) and workers, including
    any orphaned worker (it keeps its session when it is re-parented)."""
    return processes(SESSION, sid)


def cmdline(pid: int) -> bytes:
    """The command line of ``pid`` (NUL-separated), or b"" once it has gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def spawn_in_session(argv: Sequence[str], log_path: Path, *, cwd: Path | None = None,
                     env: dict[str, str], append: bool = False,
                     **popen: Any) -> subprocess.Popen:
    """Start ``argv`` in a session of its own (so that ``kill_session`` reaches every
    process it forks) that gets SIGTERM if the test process dies. Its stdout and stderr
    go to ``log_path``, which is truncated first unless ``append`` (several processes
    writing one log); a ``stdout`` in ``popen`` (a pipe the test reads) replaces the
    log for stdout only. The caller must end the session with ``kill_session``."""
    with open(log_path, "ab" if append else "wb") as log:
        return subprocess.Popen(list(argv), cwd=cwd, env=env,
                                stdout=popen.pop("stdout", log), stderr=log,
                                start_new_session=True, preexec_fn=stop_with_parent, **popen)


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and everything in its session, and reap it. The whole session:
    workers, and a master re-executed by gunicorn's SIGUSR2, may outlive the process the
    test started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            with suppress(BrokenPipeError):  # nothing is left unwritten: each write flushed
                pipe.close()


class HttpServer:
    """A server listening on 127.0.0.1:``port``: its process and its log. ``NAME`` is
    how its messages call it; ``BATCH`` how many requests ``gather`` makes in a round."""

    NAME = "the server"
    BATCH = 16

    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.port = port
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str) -> dict:
        """``GET path``, which must answer 200 with a JSON body: that body."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200, f"GET {path}: {resp.status} {body!r}\n{self.log()}"
            return json.loads(body)
        finally:
            conn.close()

    def ready(self) -> bool:
        """Whether it answers ``GET /ping``; an error if it has exited."""
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.NAME} exited with {self.proc.returncode}:\n"
                                 f"{self.log()}")
        try:
            self.get("/ping")
        except OSError:
            return False
        return True

    def children(self) -> set[int]:
        return children(self.pid)

    def gather(self, path: str, done: Callable[[list[dict]], bool],
               at_least: int = 30, batch: int | None = None) -> list[dict]:
        """Issue concurrent requests, in rounds of ``batch`` (default ``BATCH``), until
        ``done(responses)`` holds."""
        per_round = self.BATCH if batch is None else batch
        results: list[dict] = []
        with ThreadPoolExecutor(8) as pool:
            def more() -> bool:
                results.extend(pool.map(lambda _: self.get(path), range(per_round)))
                return len(results) >= at_least and done(results)
            wait_for(more, 30, f"responses of {path} to satisfy the test")
        return results
