"""What one run of the benchmark creates on the host, and its removal.

Every name the run creates contains ``bench-<uid8>``: shmctx namespaces
(``bench-<uid8>-<what>``), the floor's segment and semaphore, the UltraDict, the
temporary directory. So what is left afterwards is found by that fragment in ``/dev/shm``
(where Linux keeps POSIX shared memory and, as ``sem.*`` files, named semaphores; a
namespace's objects are the documented ``shmctx@<namespace>*`` entries there).

shmctx is driven only through its public API: a namespace is removed with
``ContextManager.unlink(force=True)``; which hot path a manager runs is
``ContextManager.hot_path``, chosen when the manager is made (``SHMCTX_PURE_PYTHON=1`` in
the environment then makes it the pure-Python one).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from shmctx import ContextConfig, ContextManager

log = logging.getLogger("bench")

SHM_DIR = Path("/dev/shm")


@contextlib.contextmanager
def _pure_python(on: bool) -> Iterator[None]:
    """``SHMCTX_PURE_PYTHON=1`` while a manager is made, as a user without the C hot path
    would run; the environment is restored afterwards."""
    if not on:
        yield
        return
    old = os.environ.get("SHMCTX_PURE_PYTHON")
    os.environ["SHMCTX_PURE_PYTHON"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["SHMCTX_PURE_PYTHON"]
        else:
            os.environ["SHMCTX_PURE_PYTHON"] = old


def make_manager(namespace: str, config: ContextConfig | None = None, *,
                 pure_python: bool = False) -> ContextManager:
    """A manager of ``namespace`` without a sweeper thread; ``pure_python`` makes it run
    the pure-Python hot path even where the C one is built."""
    with _pure_python(pure_python):
        m = ContextManager(config, namespace=namespace, sweeper=False)
    if pure_python and (hot := m.hot_path) != "Python":
        m.close()
        raise RuntimeError(f"SHMCTX_PURE_PYTHON=1 left the {hot} hot path in place")
    return m


def table_path(ns: str) -> Path:
    """Where namespace ``ns``'s table lives (``/dev/shm/shmctx@<namespace>``)."""
    return SHM_DIR / f"shmctx@{ns}"


def shm_entries(fragment: str) -> list[str]:
    """The entries of /dev/shm whose name contains ``fragment``."""
    try:
        return sorted(e for e in os.listdir(SHM_DIR) if fragment in e)
    except FileNotFoundError:
        return []


def remove_namespace(ns: str) -> None:
    """Remove namespace ``ns`` from the host through the public API, whatever state this
    run left it in (a manager of it already closed, or never made)."""
    with contextlib.suppress(Exception):
        make_manager(ns).unlink(force=True)


class Session:
    """The run's unique id, its temporary directory, and everything to remove at the end,
    in reverse order of creation."""

    def __init__(self) -> None:
        self.uid = uuid.uuid4().hex[:8]
        self.tag = f"bench-{self.uid}"  # in the name of everything this run creates
        self.managers: dict[str, ContextManager] = {}
        self._cleanups: list[tuple[str, Callable[[], None]]] = []
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))
        self.on_cleanup("temp files", lambda: shutil.rmtree(self.tmp, True))

    def on_cleanup(self, what: str, fn: Callable[[], None]) -> None:
        self._cleanups.append((what, fn))

    def namespace(self, what: str) -> str:
        return f"{self.tag}-{what}"

    def manager(self, what: str, **cfg: Any) -> ContextManager:
        """A new namespace for ``what`` with neither a reference limit nor a sweeper
        (``ContextConfig(max_references=0, cleanup_interval=0, **cfg)``), removed at the
        end."""
        ns = self.namespace(what)
        config = ContextConfig(max_references=0, cleanup_interval=0, **cfg)
        m = make_manager(ns, config)
        self.managers[what] = m

        def drop() -> None:
            try:
                m.unlink(force=True)
            except Exception:
                remove_namespace(ns)  # our manager was closed meanwhile: through a new one

        self.on_cleanup(f"namespace {ns}", drop)
        return m

    def hot_path(self) -> str:
        """The hot path a manager made now runs, "C" or "Python" (from a throwaway
        namespace)."""
        m = make_manager(self.namespace("probe"), ContextConfig(capacity=16, cleanup_interval=0))
        try:
            return m.hot_path
        finally:
            m.unlink(force=True)

    def cleanup(self) -> None:
        """Remove everything, then make sure of it: anything of this run still in /dev/shm
        is logged as an error and removed."""
        for what, fn in reversed(self._cleanups):
            try:
                fn()
            except Exception as e:
                log.warning("cleanup of %s failed: %s", what, e)
        self._cleanups.clear()
        left = shm_entries(self.tag)
        if left:
            log.error("left behind in /dev/shm (removing them now): %s", left)
            for entry in left:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(SHM_DIR / entry)
