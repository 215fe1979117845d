"""pytest plugin: one shmctx namespace per test run, shared by the pytest-xdist controller
and all its workers, and session values built once per run (``docs/pytest.md``).

Registered through the ``pytest11`` entry point under the name ``shmctx``; ``-p
no:shmctx`` disables it. It costs nothing when no test uses its fixtures: the controller
(or the single process of a run without xdist) only chooses the namespace's *name* at
configure time; the table is created by the first process that uses ``shmctx_manager``
or ``shmctx_once``, and the controller unlinks whatever exists of it at the end of the
run.

``shmctx_once`` builds a value exactly once per run. The size of a context is fixed at
creation but the value's size is known only after the factory ran, so each value uses
two contexts: a fixed-size *record* ``once:KEY`` whose ``init`` (which shmctx runs in
exactly one process while the others wait) runs the factory, then creates the *data*
context ``once-data<INC>:KEY`` of exactly the payload's size, fills it, and writes the
payload's kind and length into the record. ``INC`` is the record's incarnation, so a
retry after a creator died mid-init never collides with the dead attempt's data.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import select
import struct
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from functools import partial
from time import monotonic
from typing import Any

import msgpack
import pytest

from . import _shm
from ._config import ContextConfig, MemoryContextConfig
from ._context import MemoryContext
from ._errors import ContextError, InvalidContextTypeError
from ._manager import ContextManager
from ._proc import start_time

__all__ = [
    "SessionValues",
    "SessionValueError",
    "PluginUsageError",
    "run_namespace",
    "RUN_CONFIG",
]

log = logging.getLogger("shmctx.pytest")

# Every process of a run attaches with this one config, so whichever creates the table
# agrees with the rest. A run's contexts live until the controller unlinks the
# namespace: no reference limit, no idle closing, no sweeper thread (the controller
# reclaims a crashed worker's references when xdist reports the crash).
RUN_CONFIG = ContextConfig(max_references=0, max_idle_time=0, cleanup_interval=0)

_PREFIX_INI = "shmctx_namespace_prefix"
_DEFAULT_PREFIX = "pytest"
_PREFIX_RE = re.compile(r"[A-Za-z0-9._-]{1,40}")  # + "-<pid>-<8 hex>" stays within 64
_WORKERINPUT_KEY = "shmctx_namespace"
_CRASH_WAIT = 5.0  # seconds the controller waits for a crashed worker's pid to exit


class PluginUsageError(ContextError):
    """The plugin cannot serve this process (e.g. a remote xdist worker, which does not
    share this host's ``/dev/shm``)."""


class SessionValueError(ContextError):
    """A session value's factory failed (in another process: the error's text is in the
    message), or the value could not be read back."""


# --- one run's namespace, as seen by one process ------------------------------------


class _Run:
    """The run's namespace in this process; ``owner`` is the controller (or the single
    process of a run without xdist), which unlinks the namespace at the end."""

    def __init__(self, namespace: str | None, owner: bool, why_none: str = "") -> None:
        self.namespace = namespace
        self.owner = owner
        self._why_none = why_none
        self._manager: ContextManager | None = None
        self._lock = threading.Lock()

    def manager(self) -> ContextManager:
        """This process's manager of the run's namespace, attached (and the namespace
        created) on first use."""
        with self._lock:
            if self._manager is None:
                if self.namespace is None:
                    raise PluginUsageError(self._why_none)
                self._manager = ContextManager(RUN_CONFIG, namespace=self.namespace,
                                               sweeper=False)
            return self._manager

    def exists(self) -> bool:
        return self.namespace is not None and bool(_shm.namespace_objects(self.namespace))

    def after_worker_crash(self, pid: int | None) -> None:
        """Release the references of a crashed worker now, so that nothing of the run
        waits for them (``pid`` None: whichever registered processes are dead)."""
        if not self.exists():
            return  # nothing was ever created: nothing to reclaim
        if pid is not None and not _wait_exit(pid, _CRASH_WAIT):
            log.warning("shmctx: crashed xdist worker pid %d has not exited after %.0fs; "
                        "its references are released when the namespace is unlinked",
                        pid, _CRASH_WAIT)
            return
        try:
            report = self.manager().sweep()
        except ContextError as e:
            log.warning("shmctx: could not reclaim a crashed worker's references in "
                        "namespace %r: %s", self.namespace, e)
            return
        if report.reclaimed:
            log.info("shmctx: reclaimed references of crashed worker(s) %s in namespace %r",
                     report.reclaimed, self.namespace)

    def finish(self) -> None:
        """End of the run in this process: a worker detaches, the owner removes the
        whole namespace from the host."""
        with self._lock:
            m, self._manager = self._manager, None
        if m is not None and m.closed:  # a test closed or unlinked it itself
            m = None
        if not self.owner:
            if m is not None:
                _quietly(m.close, "detach from", self.namespace)
            return
        if m is None and self.namespace is not None and self.exists():
            try:
                m = ContextManager(namespace=self.namespace, sweeper=False)
            except ContextError as e:  # damaged or half-made: remove its objects below
                log.warning("shmctx: cannot open namespace %r to unlink it: %s",
                            self.namespace, e)
        if m is not None:
            _quietly(partial(m.unlink, force=True), "unlink", self.namespace)
        if self.namespace is not None:
            _remove_namespace(self.namespace)


def _quietly(fn: Callable[[], object], what: str, ns: str | None) -> None:
    # Runs at pytest_unconfigure: a failure is reported, but must not hide the run's result.
    try:
        fn()
    except ContextError as e:
        log.warning("shmctx: could not %s namespace %r: %s", what, ns, e)


def _remove_namespace(ns: str) -> None:
    for entry in _shm.namespace_objects(ns):
        try:
            _shm.remove_host_object(entry)
        except OSError as e:  # e.g. another user's object in the sticky /dev/shm
            log.warning("shmctx: cannot remove /dev/shm/%s: %s", entry, e)


def _wait_exit(pid: int, timeout: float) -> bool:
    """True once ``pid`` has exited (a zombie counts), False after ``timeout``."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except (OSError, AttributeError):  # no pidfd (old kernel): poll /proc instead
        deadline = monotonic() + timeout
        while start_time(pid) is not None:
            if monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def _remove_stale_runs(prefix: str) -> None:
    """Remove the namespaces of earlier runs with this prefix whose controller is dead
    (killed before it could unlink them). Their names carry the controller's pid."""
    pattern = re.compile(re.escape(prefix) + r"-(\d+)-[0-9a-f]{8}")
    head = f"{_shm.PREFIX}{prefix}-"
    try:
        entries = os.listdir(_shm.SHM_DIR)
    except OSError:
        return
    stale: set[str] = set()
    for entry in entries:
        body = entry.removeprefix("sem.")
        if body.startswith(head):
            ns = body[len(_shm.PREFIX):].split("@", 1)[0]
            match = pattern.fullmatch(ns)
            if match and start_time(int(match.group(1))) is None:
                stale.add(ns)
    for ns in sorted(stale):
        log.info("shmctx: removing namespace %r of a dead pytest run", ns)
        _remove_namespace(ns)


# --- values built once per run ------------------------------------------------------

_RECORD = struct.Struct("<4sB3xQ")  # magic, kind, payload length
_MAGIC = b"SOV1"
_VALUE, _BUFFER, _ERROR = 1, 2, 3
_KIND_NAMES = {_VALUE: "shmctx_once(...)", _BUFFER: "shmctx_once.buffer(...)"}
_RECORD_PREFIX = "once:"
_DATA_PREFIX = "once-data"
_KEY_MAX = 96  # bytes: the longest context name built from a key stays within 128


def _data_name(record_inc: int, key: str) -> str:
    return f"{_DATA_PREFIX}{record_inc}:{key}"


def _check_key(key: object) -> str:
    if not isinstance(key, str) or not key:
        raise InvalidContextTypeError(f"session value key must be a non-empty str, got {key!r}")
    if len(key.encode("utf-8", "surrogatepass")) > _KEY_MAX:
        raise InvalidContextTypeError(
            f"session value key {key[:40]!r}... is longer than {_KEY_MAX} UTF-8 bytes"
        )
    return key


def _encode(key: str, kind: int, value: object) -> bytes | memoryview:
    if kind == _VALUE:
        try:
            return msgpack.packb(value, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as e:
            raise TypeError(
                f"session value {key!r}: the factory returned a {type(value).__name__}, "
                f"which msgpack cannot encode ({e}); use shmctx_once.buffer() for raw bytes"
            ) from None
    try:
        view = memoryview(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"session buffer {key!r}: the factory must return a bytes-like object (bytes, "
            f"bytearray, memoryview, a NumPy array), not {type(value).__name__}"
        ) from None
    if not view.c_contiguous:
        raise TypeError(f"session buffer {key!r}: the factory's buffer is not C-contiguous")
    return view.cast("B") if view.ndim != 1 or view.format != "B" else view


def _fill(payload: bytes | memoryview, ctx: MemoryContext) -> None:
    if len(payload):
        ctx.buf[:] = payload


class SessionValues:
    """What the ``shmctx_once`` fixture returns: values built once per test run.

    ``values(key, factory)`` returns the msgpack-able value ``factory()`` built, running
    ``factory`` in exactly one process of the run while the others wait for it;
    ``values.buffer(key, factory)`` does the same for a bytes-like result and returns a
    read-only ``memoryview`` over the shared memory itself (zero-copy). ``key`` names
    the value for the whole run; later calls with the same key return the first value
    (cached per process) and never call their factory.

    If the factory raises, that process gets the exception and every other process
    asking for the key gets ``SessionValueError`` with its text; the factory is not run
    again. If the process running the factory dies, a waiting process runs it anew.
    """

    def __init__(self, manager: ContextManager) -> None:
        self._m = manager
        self._lock = threading.RLock()  # re-entrant: a factory may ask for another key
        self._cache: dict[str, tuple[int, Any]] = {}
        self._held: list[MemoryContext] = []
        self._built: dict[str, tuple[MemoryContext, BaseException | None]] = {}

    def __call__(self, key: str, factory: Callable[[], Any]) -> Any:
        """The run's value ``key``: ``factory()``'s msgpack-able result, built once."""
        return self._get(key, factory, _VALUE)

    def buffer(self, key: str, factory: Callable[[], Any]) -> memoryview:
        """The run's buffer ``key``: the bytes of ``factory()``'s bytes-like result,
        built once, as a read-only view over the shared memory (no copy)."""
        view: memoryview = self._get(key, factory, _BUFFER)
        return view

    def release(self) -> None:
        """Return every reference this process took (values already handed out stay
        usable: a buffer's mapping lives as long as its views)."""
        with self._lock:
            held, self._held = self._held, []
            for ctx in held:
                try:
                    self._m.return_context(ctx)
                except ContextError:
                    pass  # closed or unlinked meanwhile: nothing left to return

    def _get(self, key: str, factory: Callable[[], Any], kind: int) -> Any:
        _check_key(key)
        if not callable(factory):
            raise TypeError(f"session value {key!r}: factory must be callable, not "
                            f"{type(factory).__name__}")
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._load(key, factory, kind)
            stored, value = self._cache[key]
        if stored == _ERROR:
            raise value
        if stored != kind:
            raise InvalidContextTypeError(
                f"session value {key!r} was made by {_KIND_NAMES[stored]}; "
                f"{_KIND_NAMES[kind]} cannot read it"
            )
        return value

    def _load(self, key: str, factory: Callable[[], Any], kind: int) -> tuple[int, Any]:
        try:
            record, _existed = self._m.get_or_create_context(
                _RECORD_PREFIX + key, MemoryContextConfig(size=_RECORD.size),
                init=partial(self._build, key, factory, kind),
            )
        except BaseException:
            built = self._built.pop(key, None)
            if built is not None:  # the record was lost after its data was made
                self._held.append(built[0])
            raise
        self._held.append(record)
        magic, stored, length = _RECORD.unpack_from(record.buf)
        if magic != _MAGIC:
            raise SessionValueError(f"session value {key!r}: its record is damaged")
        data, failure = self._built.pop(key, (None, None))
        if data is None:
            try:
                data = self._m.get_context(_data_name(record.incarnation, key))
            except ContextError as e:
                raise SessionValueError(
                    f"session value {key!r}: its data context is gone ({e})"
                ) from None
        self._held.append(data)
        if stored == _ERROR:
            if failure is None:
                failure = SessionValueError(
                    f"session value {key!r}: its factory failed in another process of "
                    f"this run:\n{bytes(data.buf[:length]).decode('utf-8', 'replace')}"
                )
            return _ERROR, failure
        if stored == _VALUE:
            return stored, msgpack.unpackb(data.buf[:length], raw=False,
                                           strict_map_key=False)
        return stored, data.buf[:length].toreadonly()

    def _build(self, key: str, factory: Callable[[], Any], kind: int,
               record: MemoryContext) -> None:
        # Runs as the record's init: in exactly one process, the others waiting.
        failure: BaseException | None = None
        try:
            payload = _encode(key, kind, factory())
            stored = kind
        except Exception as e:
            failure = e
            text = "".join(traceback.format_exception(e))
            payload = f"(pid {os.getpid()})\n{text}".encode("utf-8", "replace")
            stored = _ERROR
        data, _ = self._m.get_or_create_context(
            _data_name(record.incarnation, key), MemoryContextConfig(size=len(payload)),
            init=partial(_fill, payload),
        )
        self._built[key] = (data, failure)
        _RECORD.pack_into(record.buf, 0, _MAGIC, stored, len(payload))


# --- pytest hooks -------------------------------------------------------------------

_RUN = pytest.StashKey[_Run]()


def run_namespace(config: pytest.Config) -> str | None:
    """The run's namespace (the same in the controller and every worker), or None in a
    worker that got none (see ``PluginUsageError``). It exists in ``/dev/shm`` only once
    a test has used the fixtures."""
    return config.stash[_RUN].namespace


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        _PREFIX_INI,
        help="prefix of the shmctx namespace of each test run: the namespace is "
        f"'<prefix>-<controller pid>-<random>' (default {_DEFAULT_PREFIX!r})",
        default=_DEFAULT_PREFIX,
    )


def pytest_configure(config: pytest.Config) -> None:
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        ns = workerinput.get(_WORKERINPUT_KEY)
        config.stash[_RUN] = _Run(
            ns, owner=False,
            why_none="this xdist worker got no shmctx namespace from its controller: it "
            "is not a local (popen) worker, so it does not share the controller's "
            "/dev/shm, or the controller runs without the shmctx plugin",
        )
        return
    prefix = config.getini(_PREFIX_INI)
    if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
        raise pytest.UsageError(
            f"{_PREFIX_INI} must be 1-40 characters of [A-Za-z0-9._-], got {prefix!r}"
        )
    _remove_stale_runs(prefix)
    run = _Run(f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}", owner=True)
    config.stash[_RUN] = run
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistController(run), "shmctx-xdist")


def pytest_unconfigure(config: pytest.Config) -> None:
    run = config.stash.get(_RUN, None)
    if run is not None:
        run.finish()


def pytest_report_header(config: pytest.Config) -> str | None:
    if config.option.verbose > 0:
        return f"shmctx: namespace {run_namespace(config)} (created on first use)"
    return None


class _XdistController:
    """pytest-xdist hooks of the controller; registered only when xdist is installed,
    since pytest rejects implementations of hooks nobody declared."""

    def __init__(self, run: _Run) -> None:
        self._run = run

    def pytest_configure_node(self, node: Any) -> None:
        spec = node.gateway.spec
        if spec.popen and not getattr(spec, "via", None):
            node.workerinput[_WORKERINPUT_KEY] = self._run.namespace

    def pytest_testnodedown(self, node: Any, error: object) -> None:
        if error is not None:
            self._run.after_worker_crash(_worker_pid(node))


def _worker_pid(node: Any) -> int | None:
    # xdist caches execnet's remote info (which holds the pid) when it sets a node up;
    # never ask a dead gateway for it.
    info = getattr(node.gateway, "_cache_rinfo", None)
    pid = getattr(info, "pid", None)
    return pid if isinstance(pid, int) else None


@pytest.fixture(scope="session")
def shmctx_manager(pytestconfig: pytest.Config) -> ContextManager:
    """A ``ContextManager`` of the run's namespace, shared by the controller and every
    xdist worker of this run; the controller unlinks it at the end of the run."""
    return pytestconfig.stash[_RUN].manager()


@pytest.fixture(scope="session")
def shmctx_once(shmctx_manager: ContextManager) -> Iterator[SessionValues]:
    """Build expensive session values once per run: ``shmctx_once(key, factory)`` for
    msgpack-able values, ``shmctx_once.buffer(key, factory)`` for zero-copy bytes."""
    values = SessionValues(shmctx_manager)
    yield values
    values.release()
