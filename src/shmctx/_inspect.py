"""``ctx-inspect``: see and repair the namespaces of this host from the shell.

It is the ``ipcs`` of shmctx: list the namespaces, show one namespace's contexts and who
holds them, check the table's invariants, and collect what dead processes left behind.

Read-only unless ``--gc --yes``. A table is read by holding its table lock only while
copying its bytes (as a recorded owner: the one write, so that waiters see a live holder)
and decoding the copy afterwards. If the lock cannot be had within ctx-inspect's own
``--timeout`` (busy, or wedged by a dead holder) the bytes are copied without it and the
result is marked as an unlocked snapshot: an inspection tool must still work on the tables
that most need inspecting. The table's own ``lock_timeout`` is never waited for: it is a
value in the file being inspected, and a damaged or hostile file may say anything.
Reading never takes a lock over from a dead owner and never attaches as a process of the
namespace (a ``ContextManager`` would register a process entry); only ``--gc --yes``, the
repair path, does either.

What a read costs is bounded by the file, never by what its header claims: the header is
checked (``header_problem``: the geometry must be the one the layout computes for its
capacity, and must add up to the file's real size) before anything is sized from it, and
the table is copied with ``pread``, not through a mapping. A mapping would fault in a page
for every hole of the sparse table (SIGBUS on a full ``/dev/shm``) and for every byte of a
file shrunk meanwhile (SIGBUS); ``pread`` reads holes as zeros and a shrunk file as a short
copy, which the decoder then rejects. The only page mapped is the first, for the lock's
owner record: it holds the magic, so it has memory behind it.

Output formats, the JSON schema and the exit codes are documented in ``docs/inspect.md``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import mmap
import os
import shutil
import signal
import stat
import sys
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

import msgpack
import posix_ipc

from . import _layout as L
from . import _shm
from ._errors import ContextError, ContextInUseError, TableFormatError
from ._layout import LOCKS_OFF
from ._lock import RobustLock
from ._manager import ContextManager
from ._proc import is_alive
from ._snapshot import Snapshot, decode, violations
from ._sweeper import remove_namespace_orphans, remove_stale, stale_objects
from ._table import Table, header_problem

EXIT_OK = 0
EXIT_VIOLATIONS = 1
EXIT_USAGE = 2  # also: unknown namespace, permission denied
EXIT_FORMAT = 3  # a table of another layout, or garbage
EXIT_BUSY = 75  # --gc --yes: a lock stayed busy past --timeout, nothing done (EX_TEMPFAIL)
EXIT_INTERNAL = 70  # a bug in ctx-inspect (EX_SOFTWARE)

SCHEMA = 1  # version of the JSON/msgpack documents; bumped only on incompatible changes
WIDTH = 100
DEFAULT_WATCH = 2.0
DEFAULT_GRACE = 10.0  # --gc leaves unused tables younger than this alone
DEFAULT_TIMEOUT = 1.0  # --timeout: the longest ctx-inspect waits for a table lock
SORT_KEYS = ("name", "refs", "idle", "size", "age")

_ANSI = {"bold": "1", "dim": "2", "dead": "31", "warn": "33", "new": "32", "changed": "36"}
_HOME, _CLEAR_EOL, _CLEAR_EOS = "\x1b[H", "\x1b[K", "\x1b[J"
_HIDE_CURSOR, _SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"


class _Fail(Exception):
    """An error meant for the user: a message and the exit code it ends with."""

    def __init__(self, code: int, message: str, brief: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.brief = brief or message  # the same without naming the namespace


class _Unknown(_Fail):
    """No such namespace (or it vanished while being looked at)."""


# --- reading a table ------------------------------------------------------------------


@dataclass
class _Read:
    ns: str
    path: str
    snap: Snapshot
    tag: str
    size: int
    unlocked_reason: str  # '' when the copy was taken under the table lock
    lock_busy: bool  # unlocked because another held the lock (past --timeout, or died)


def _table_namespaces() -> list[str]:
    """Namespaces with a table on this host: /dev/shm entries named exactly shmctx@NS."""
    try:
        entries = os.listdir(_shm.SHM_DIR)
    except OSError as e:
        raise _Fail(EXIT_USAGE, f"cannot list {_shm.SHM_DIR}: {e.strerror}") from None
    return sorted(
        e[len(_shm.PREFIX):] for e in entries
        if e.startswith(_shm.PREFIX) and _shm.NAMESPACE_RE.fullmatch(e[len(_shm.PREFIX):])
    )


def _tableless_namespaces(tables: list[str]) -> dict[str, list[str]]:
    """{namespace: its objects} of the namespaces that have objects but no table."""
    try:
        entries = os.listdir(_shm.SHM_DIR)
    except OSError:
        return {}
    out: dict[str, list[str]] = {}
    have = set(tables)
    for e in entries:
        body = e.removeprefix("sem.")
        if not body.startswith(_shm.PREFIX):
            continue
        ns = body[len(_shm.PREFIX):].partition("@")[0]
        if ns not in have and _shm.NAMESPACE_RE.fullmatch(ns):
            out.setdefault(ns, []).append(e)
    return {ns: sorted(v) for ns, v in sorted(out.items())}


def _unknown(ns: str) -> _Unknown:
    tables = _table_namespaces()
    orphans = _tableless_namespaces(tables).get(ns)
    msg = f"no namespace {ns!r} on this host"
    if orphans:
        msg += (f" (it has {len(orphans)} object(s) in {_shm.SHM_DIR} but no table; "
                f"'ctx-inspect --gc {ns}' collects them)")
    msg += "; existing: " + (", ".join(tables) if tables else "none")
    return _Unknown(EXIT_USAGE, msg)


def _denied(ns: str, path: str, what: str = "read the table") -> _Fail:
    try:
        st = os.stat(path)
        owner = f" (owner uid {st.st_uid}, mode {st.st_mode & 0o777:04o})"
    except OSError:
        owner = ""
    return _Fail(EXIT_USAGE, f"permission denied: cannot {what} of namespace {ns!r}: "
                             f"{path}{owner}", f"permission denied{owner.replace('owner ', '')}")


def _open_table(ns: str, path: str) -> tuple[int, bool]:
    """A descriptor of ``ns``'s table file and whether it is writable.

    Opened with ``os.open`` rather than ``shm_open`` for ``O_NONBLOCK``: /dev/shm is
    writable by every user, and a FIFO planted under a table's name would block an open
    for reading forever (``O_NOFOLLOW``, as ``shm_open`` uses, refuses a symbolic link).
    """
    flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        try:
            return os.open(path, os.O_RDWR | flags), True
        except PermissionError:
            return os.open(path, os.O_RDONLY | flags), False
    except FileNotFoundError:
        raise _unknown(ns) from None
    except PermissionError:
        raise _denied(ns, path) from None
    except OSError as e:  # a symbolic link (ELOOP), a socket (ENXIO), ...
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            mode = stat.S_IFREG
        problem = "not a regular file (a symbolic link)" if stat.S_ISLNK(mode) else \
            "not a regular file" if not stat.S_ISREG(mode) else f"cannot open it: {e.strerror}"
        raise _Fail(EXIT_FORMAT, f"table of namespace {ns!r} ({path}): {problem}",
                    problem) from None


def _pread(fd: int, size: int) -> bytes:
    """The first ``size`` bytes of the file (fewer if it is shorter now), by ``pread``:
    holes read as zeros without allocating, and a shrunk file cannot raise SIGBUS."""
    chunks, got = [], 0
    while got < size:
        chunk = os.pread(fd, size - got, got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _read(ns: str, timeout: float) -> _Read:
    """Copy namespace ``ns``'s table (under its lock if it can be had within ``timeout``
    seconds) and decode the copy."""
    path = _shm.host_path(_shm.table_name(ns))
    what = f"table of namespace {ns!r} ({path})"
    fd, writable = _open_table(ns, path)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            problem = "not a regular file"
            raise _Fail(EXIT_FORMAT, f"{what}: {problem}", problem)
        size = st.st_size
        head = _pread(fd, L.HEADER_SIZE)
        if size < L.HEADER_SIZE or len(head) < L.HEADER_SIZE:
            problem = f"truncated: {size} bytes, a table has at least {L.HEADER_SIZE}"
            raise _Fail(EXIT_FORMAT, f"{what}: {problem}", problem)
        # Checked before anything is sized from the header: its geometry must be the
        # layout's for its capacity and add up to ``size``, so the copy below is bounded
        # by the file's real size and the layout's limits, whatever the header says.
        problem = header_problem(head, size)
        if problem:
            raise _Fail(EXIT_FORMAT, f"{what}: {problem}", problem)
        tag = _shm.tag_of(L.H_TABLE_ID.unpack_from(head, L.H_TABLE_ID_OFF)[0])
        if writable:
            data, why, busy = _copy_locked(ns, tag, fd, size, timeout)
        else:
            data, why, busy = _pread(fd, size), \
                "read-only access: the table lock cannot be taken", False
    finally:
        os.close(fd)
    try:
        snap = decode(data, locked=not why)
    except ValueError as e:  # the file changed under an unlocked copy
        raise _Fail(EXIT_FORMAT, f"{what}: {e}", str(e)) from None
    return _Read(ns, path, snap, tag, size, why, busy)


# Signals whose handlers (KeyboardInterrupt) or default action (termination) would end
# ctx-inspect between taking the table lock and recording itself as its owner: a lock
# left taken with no owner recorded holds every process of the namespace for two of the
# table's lock_timeouts. They are held back for the length of the hold, at most --timeout
# plus one copy, and delivered right after the release.
_DEFERRED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}


def _copy_locked(ns: str, tag: str, fd: int, size: int,
                 timeout: float) -> tuple[bytes, str, bool]:
    """The table's bytes, why they were copied without the table lock ('' if not), and
    whether that was because the lock was busy.

    The lock is held as any holder holds it, with this process recorded as its owner (the
    only bytes ctx-inspect writes outside --gc --yes), so that waiters see a live owner
    and never mistake the copy for a dead holder's wedge; it gives up after ``timeout``
    instead of taking the lock over from a dead owner, and at once when the recorded owner
    is dead: nobody will release that lock, only a process of the namespace taking it over.
    """
    try:
        sem = posix_ipc.Semaphore(_shm.table_lock_name(ns, tag))
    except posix_ipc.ExistentialError:
        return _pread(fd, size), "its table lock semaphore is missing", False
    except posix_ipc.PermissionsError:
        return _pread(fd, size), "no permission to take its table lock", False
    try:
        # The first page only: it holds the lock's owner record and the magic, so it has
        # memory behind it (the header check above read the magic from it).
        mm = mmap.mmap(fd, L.PAGE)
        buf = memoryview(mm)
        try:
            lock = RobustLock(sem, buf, LOCKS_OFF, 0, timeout, None, None,
                              f"table lock of namespace {ns!r}")
            old = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
            try:
                why = _take(lock, timeout)
                if not why:
                    try:
                        return _pread(fd, size), "", False
                    finally:
                        lock.release()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
            return _pread(fd, size), why, True
        finally:
            buf.release()
            mm.close()
    finally:
        sem.close()


_LOOK = 0.05  # how often a wait for the table lock looks whether its owner died


def _take(lock: RobustLock, timeout: float) -> str:
    """'' once ``lock`` is ours, else why not."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if lock.try_acquire(max(0.0, min(left, _LOOK))):
            return ""
        pid, _epoch, start = lock.owner()
        if pid and not is_alive(pid, start):
            return f"the table lock is held by dead pid {pid}"
        if left <= _LOOK:
            return f"the table lock was not free within {timeout:g}s"


# --- documents: the one source of the text, JSON and msgpack outputs -------------------


def _liveness() -> Callable[[int, int], bool]:
    seen: dict[tuple[int, int], bool] = {}

    def alive(pid: int, start: int) -> bool:
        key = (pid, start)
        if key not in seen:
            seen[key] = is_alive(pid, start)
        return seen[key]

    return alive


def _r3(x: float) -> float:
    return round(x, 3)


def _context_docs(snap: Snapshot, alive: Callable[[int, int], bool]) -> list[dict]:
    out = []
    for s in snap.slots:
        if s.state == L.FREE:
            continue  # a free slot still referenced: garbage for --check, not a context
        out.append({
            "name": s.name,
            "slot": s.slot,
            "state": L.STATE_NAMES.get(s.state, f"invalid({s.state})"),
            "refs": s.refcount,
            "holders": [
                {"pid": pid, "count": c, "alive": alive(pid, s.holder_starts.get(pid, 0))}
                for pid, c in sorted(s.holders.items())
            ],
            "size": s.size,
            "idle": _r3(max(0.0, snap.taken_at_mono - s.last_used)),
            "age": _r3(max(0.0, snap.taken_at_wall - s.created)),
            "created": s.created,
            "last_used": snap.wall(s.last_used),
            "incarnation": s.incarnation,
            "parent": snap.parent_name(s),
        })
    return out


_SORTS: dict[str, tuple[Callable[[dict], object], bool]] = {
    "name": (lambda c: c["name"], False),
    "refs": (lambda c: c["refs"], True),
    "idle": (lambda c: c["idle"], True),
    "size": (lambda c: c["size"], True),
    "age": (lambda c: c["age"], True),
}


def _select(items: list[dict], key_name: str, glob: str | None, sort: str,
            limit: int | None, sorts: dict) -> tuple[list[dict], int]:
    """Filter by ``glob`` on ``key_name``, sort, cut to ``limit``. Returns (shown,
    matched count)."""
    if glob is not None:
        items = [i for i in items if fnmatch.fnmatchcase(i[key_name], glob)]
    key, reverse = sorts[sort]
    items = sorted(items, key=lambda i: i[key_name])  # the tie-break, kept by stable sort
    items.sort(key=key, reverse=reverse)
    return (items if limit is None else items[:limit]), len(items)


def _namespace_doc(r: _Read, args: argparse.Namespace) -> dict:
    snap = r.snap
    alive = _liveness()
    procs = [
        {"pid": p.pid, "alive": alive(p.pid, p.start), "attached": p.attached,
         "references": sum(c for _s, c in p.refs)}
        for p in snap.procs
    ]
    contexts = _context_docs(snap, alive)
    shown, matched = _select(contexts, "name", args.filter, args.sort, args.limit, _SORTS)
    # In a locked snapshot the record names ctx-inspect itself, which held it for the copy.
    lpid, lepoch, lstart = (0, *snap.locks[0][1:]) if snap.locked else snap.locks[0]
    spid, _sflags, sstart, sbeat = snap.sweeper
    return {
        "schema": SCHEMA,
        "namespace": r.ns,
        "snapshot": {
            "locked": snap.locked,
            "unlocked_reason": r.unlocked_reason or None,
            "taken_at": snap.taken_at_wall,
        },
        "table": {
            "path": r.path,
            "bytes": r.size,
            "tag": r.tag,
            "layout_version": L.LAYOUT_VERSION,
            "mode": f"{snap.mode:04o}",
            "created": snap.created,
            "age": _r3(max(0.0, snap.taken_at_wall - snap.created)),
            "unlinked": bool(snap.flags & L.FLAG_UNLINKED),
        },
        "config": dict(snap.config),
        "usage": {
            "contexts": len(contexts),
            "capacity": snap.geo.capacity,
            "processes": len(procs),
            "processes_dead": sum(not p["alive"] for p in procs),
            "max_processes": snap.geo.max_processes,
            "references": sum(p["references"] for p in procs),
            "references_dead": sum(p["references"] for p in procs if not p["alive"]),
        },
        "lock": {
            "owner_pid": lpid or None,
            "owner_alive": alive(lpid, lstart) if lpid else None,
            "epoch": lepoch,
        },
        "sweeper": {
            "pid": spid or None,
            "alive": alive(spid, sstart) if spid else None,
            "last_sweep_ago": _r3(max(0.0, snap.taken_at_mono - sbeat)) if spid and sbeat
            else None,
        },
        "processes": procs,
        "matched": matched,
        "contexts": shown,
    }


_LIST_SORTS: dict[str, tuple[Callable[[dict], object], bool]] = {
    "name": (lambda n: n["namespace"], False),
    "refs": (lambda n: n["references"] or 0, True),
    "idle": (lambda n: n["namespace"], False),  # no idle time for a whole namespace
    "size": (lambda n: n["bytes"] or 0, True),
    "age": (lambda n: n["age"] or 0.0, True),
}


def _listing_doc(args: argparse.Namespace) -> dict:
    tables = _table_namespaces()
    rows = []
    for ns in tables:
        row: dict = {"namespace": ns, "error": None, "locked": None, "unlocked_reason": None,
                     "contexts": None,
                     "references": None, "references_dead": None, "processes": None,
                     "processes_dead": None, "sweeper": {"pid": None, "alive": None},
                     "bytes": None, "age": None}
        try:
            d = _namespace_doc(_read(ns, args.timeout), _ALL)
        except _Unknown:
            continue  # unlinked since the directory was listed
        except _Fail as f:
            row["error"] = f.brief
            try:
                row["bytes"] = os.stat(_shm.host_path(_shm.table_name(ns))).st_size
            except OSError:
                pass
        else:
            u = d["usage"]
            row.update(
                locked=d["snapshot"]["locked"],
                unlocked_reason=d["snapshot"]["unlocked_reason"], contexts=u["contexts"],
                references=u["references"], references_dead=u["references_dead"],
                processes=u["processes"], processes_dead=u["processes_dead"],
                sweeper={"pid": d["sweeper"]["pid"], "alive": d["sweeper"]["alive"]},
                bytes=d["table"]["bytes"], age=d["table"]["age"],
            )
        rows.append(row)
    shown, matched = _select(rows, "namespace", args.filter, args.sort, args.limit, _LIST_SORTS)
    return {
        "schema": SCHEMA,
        "namespaces": shown,
        "matched": matched,
        "tableless": [
            {"namespace": ns, "objects": objs}
            for ns, objs in _tableless_namespaces(tables).items()
        ],
    }


# Options for internal reads that must see every context (the listing's counts).
_ALL = argparse.Namespace(filter=None, sort="name", limit=None)


# --- text rendering ---------------------------------------------------------------------


Cell = list[tuple[str, str]]  # (text, style) segments


class _Out:
    """Where text goes and how it may look: colour, glyphs, width."""

    def __init__(self, stream: TextIO, wide: bool) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.colour = self.tty and not os.environ.get("NO_COLOR")
        self.width: int | None = None if wide else WIDTH
        enc = getattr(stream, "encoding", None) or "ascii"
        try:
            "†…".encode(enc)
            self.dead, self.ellipsis = "†", "…"
        except (UnicodeEncodeError, LookupError):
            self.dead, self.ellipsis = "!", "~"

    def paint(self, text: str, style: str) -> str:
        if not self.colour or not style or not text:
            return text
        return f"\x1b[{_ANSI[style]}m{text}\x1b[0m"

    def line(self, cell: Cell) -> str:
        """One free-text line, shortened to the width."""
        if self.width is not None:
            cell = _clip(cell, self.width, self.ellipsis)
        return "".join(self.paint(t, s) for t, s in cell)


def _char_width(c: str) -> int:
    if unicodedata.combining(c):
        return 0
    return 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1


def _width(text: str) -> int:
    return sum(_char_width(c) for c in text)


def _printable(text: str) -> str:
    """A name as it can be shown on a terminal: control characters escaped, so a name
    cannot move the cursor or change colours."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _clip(cell: Cell, width: int, ellipsis: str) -> Cell:
    if sum(_width(t) for t, _s in cell) <= width:
        return cell
    out: Cell = []
    budget = width - 1
    for text, style in cell:
        w = _width(text)
        if w <= budget:
            out.append((text, style))
            budget -= w
            continue
        cut = []
        for c in text:
            budget -= _char_width(c)
            if budget < 0:
                break
            cut.append(c)
        out.append(("".join(cut), style))
        break
    out.append((ellipsis, "dim"))
    return out


@dataclass
class _Col:
    title: str
    right: bool = False  # right-aligned (numbers)
    shrink: int = 0  # narrowest width it may be shortened to; 0 = never shortened
    rank: int = 0  # shrinkable columns are shortened in rank order, lowest first


def _grid(out: _Out, cols: list[_Col], rows: list[list[Cell]]) -> list[str]:
    """Aligned columns, two spaces apart; shrinkable columns are shortened (with an
    ellipsis), in rank order, until the line fits the width."""
    widths = [max([len(c.title)] + [sum(_width(t) for t, _s in r[i]) for r in rows])
              for i, c in enumerate(cols)]
    if out.width is not None:
        excess = sum(widths) + 2 * (len(cols) - 1) - out.width
        for i in sorted((i for i, c in enumerate(cols) if c.shrink), key=lambda i: cols[i].rank):
            cut = max(0, min(excess, widths[i] - cols[i].shrink))
            widths[i] -= cut
            excess -= cut

    def fit(cell: Cell, i: int) -> str:
        cell = _clip(cell, widths[i], out.ellipsis)
        pad = " " * (widths[i] - sum(_width(t) for t, _s in cell))
        text = "".join(out.paint(t, s) for t, s in cell)
        return pad + text if cols[i].right else text + pad

    head = [[(c.title, "bold")] for c in cols]
    return ["  ".join(fit(cell, i) for i, cell in enumerate(r)).rstrip()
            for r in [head, *rows]]


def _human(n: int | None) -> str:
    """Bytes in binary units: 512 B, 1.5 KiB, 64.0 MiB."""
    if n is None:
        return "-"
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    value, i = float(n), 0
    while value >= 1023.95 and i < len(units) - 1:
        value /= 1024
        i += 1
    return f"{n} B" if i == 0 else f"{value:.1f} {units[i]}"


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0.0, seconds)
    if s < 10:
        return f"{s:.1f}s"
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _pid(out: _Out, pid: int | None, alive: bool | None) -> Cell:
    if not pid:
        return [("-", "dim")]
    return [(str(pid), "")] if alive else [(f"{pid}{out.dead}", "dead")]


def _change(prev: dict | None, key: object, now: tuple[int, object]) -> Cell:
    """The CHG cell of --watch: a new row, the change of its references since the last
    refresh, or ``~`` when something else about it changed."""
    if prev is None:
        return []
    if key not in prev:
        return [("new", "new")]
    delta = now[0] - prev[key][0]
    if delta:
        return [(f"{delta:+d}", "changed")]
    return [("~", "changed")] if now[1] != prev[key][1] else []


def _namespace_lines(out: _Out, d: dict, prev: dict | None, watching: bool) -> list[str]:
    """The namespace view. ``watching``: add the CHG column, comparing with ``prev`` (the
    state of the last refresh, None on the first)."""
    t, cfg, u, lock, sw = d["table"], d["config"], d["usage"], d["lock"], d["sweeper"]
    lines = [
        out.line([("namespace ", "bold"), (d["namespace"], "bold"),
                  (f"  {t['path']}  {_human(t['bytes'])}  mode {t['mode']}  "
                   f"created {_dur(t['age'])} ago", "")]
                 + ([("  UNLINKED", "warn")] if t["unlinked"] else [])),
        out.line([("config    ", "bold"), (
            f"max_references {cfg['max_references'] or 'unlimited'}  "
            f"max_idle_time {_secs(cfg['max_idle_time'], 'never')}  "
            f"cleanup_interval {_secs(cfg['cleanup_interval'], 'off')}  "
            f"lock_timeout {_secs(cfg['lock_timeout'], '-')}", "")]),
        out.line([("usage     ", "bold"), (
            f"contexts {u['contexts']}/{u['capacity']}  "
            f"processes {u['processes']}/{u['max_processes']}", "")]
            + ([(f" ({u['processes_dead']} dead)", "dead")] if u["processes_dead"] else [])
            + [(f"  references {u['references']}", "")]
            + ([(f" ({u['references_dead']} held by dead processes)", "dead")]
               if u["references_dead"] else [])),
    ]
    lock_cell: Cell = [("lock      ", "bold")]
    if lock["owner_pid"]:
        lock_cell += [("held by pid ", ""), *_pid(out, lock["owner_pid"], lock["owner_alive"])]
        lock_cell += [(" (dead: waiters take it over)", "dead")] if not lock["owner_alive"] \
            else [(" (alive)", "")]
    else:
        lock_cell += [("free" if d["snapshot"]["locked"] else "no owner recorded", "")]
    lock_cell += [("   sweeper ", "bold")]
    if sw["pid"]:
        lock_cell += [("pid ", ""), *_pid(out, sw["pid"], sw["alive"])]
        lock_cell += [(f" (last sweep {_dur(sw['last_sweep_ago'])} ago)", "")] if sw["alive"] \
            else [(" (dead: the next process to sweep takes the lead)", "dead")]
    else:
        lock_cell += [("none", "dim")]
    lines.append(out.line(lock_cell))
    if not d["snapshot"]["locked"]:
        lines.append(out.line([(f"UNLOCKED SNAPSHOT: {d['snapshot']['unlocked_reason']}; "
                                "the copy may catch an update half done", "warn")]))
    lines.append("")
    cols = [_Col("NAME", shrink=16, rank=1), _Col("STATE"), _Col("REFS", right=True),
            _Col("HOLDERS", shrink=12, rank=3), _Col("SIZE", right=True),
            _Col("IDLE", right=True), _Col("AGE", right=True), _Col("INC", right=True),
            _Col("PARENT", shrink=8, rank=2)]
    if watching:
        cols.insert(0, _Col("CHG"))
    rows: list[list[Cell]] = []
    any_dead = False
    for c in d["contexts"]:
        holders: Cell = []
        # Dead holders first: what a shortened cell loses are live ones.
        for h in sorted(c["holders"], key=lambda h: h["alive"]):
            if holders:
                holders.append((" ", ""))
            holders.append((f"{h['pid']}:{h['count']}" + ("" if h["alive"] else out.dead),
                            "" if h["alive"] else "dead"))
            any_dead |= not h["alive"]
        state_style = "" if c["state"] == "ready" else "warn"
        row = [[(_printable(c["name"]), "")], [(c["state"], state_style)],
               [(str(c["refs"]), "")], holders or [("-", "dim")], [(_human(c["size"]), "")],
               [(_dur(c["idle"]), "")], [(_dur(c["age"]), "")], [(str(c["incarnation"]), "")],
               [(_printable(c["parent"]), "")] if c["parent"] else [("-", "dim")]]
        if watching:
            key = (c["name"], c["incarnation"])
            row.insert(0, _change(prev, key, (c["refs"], _holders_key(c))))
        rows.append(row)
    lines += _grid(out, cols, rows)
    if not d["contexts"]:
        lines.append(out.line([("(no contexts" + (" match --filter)" if u["contexts"] else ")"),
                                "dim")]))
    if d["matched"] > len(d["contexts"]):
        lines.append(out.line([(f"{out.ellipsis} {d['matched'] - len(d['contexts'])} more "
                                "(--limit)", "dim")]))
    if prev is not None:
        now = {(c["name"], c["incarnation"]) for c in d["contexts"]}
        gone = sorted(_printable(k[0]) for k in prev if k not in now)
        if gone:
            lines.append(out.line([("gone since the last refresh: " + ", ".join(gone),
                                    "changed")]))
    if any_dead:
        lines.append(out.line([(f"{out.dead} = dead process ('ctx-inspect --gc "
                                f"{d['namespace']}' reclaims its references)", "dim")]))
    return lines


def _holders_key(c: dict) -> tuple:
    return tuple((h["pid"], h["count"], h["alive"]) for h in c["holders"])


def _namespace_state(d: dict) -> dict:
    """What --watch compares between refreshes of a namespace view."""
    return {(c["name"], c["incarnation"]): (c["refs"], _holders_key(c)) for c in d["contexts"]}


def _secs(v: float, zero: str) -> str:
    return f"{v:g}s" if v else zero


def _listing_lines(out: _Out, d: dict, prev: dict | None, watching: bool,
                   filtered: bool) -> list[str]:
    cols = [_Col("NAMESPACE", shrink=16, rank=1), _Col("CONTEXTS", right=True),
            _Col("REFS", right=True), _Col("PROCS", right=True), _Col("SWEEPER"),
            _Col("SIZE", right=True), _Col("STATUS", shrink=10, rank=2)]
    if watching:
        cols.insert(0, _Col("CHG"))
    rows: list[list[Cell]] = []
    for n in d["namespaces"]:
        if n["error"]:
            status: Cell = [(n["error"], "dead")]
        elif not n["locked"]:
            status = [(f"unlocked snapshot: {n['unlocked_reason']}", "warn")]
        else:
            status = [("ok", "")]
        procs: Cell = [("-", "dim")] if n["processes"] is None else [(str(n["processes"]), "")]
        if n["processes_dead"]:
            procs.append((f" ({n['processes_dead']}{out.dead})", "dead"))
        refs: Cell = [("-", "dim")] if n["references"] is None else [(str(n["references"]), "")]
        row = [[(n["namespace"], "")],
               [("-", "dim")] if n["contexts"] is None else [(str(n["contexts"]), "")],
               refs, procs, _pid(out, n["sweeper"]["pid"], n["sweeper"]["alive"]),
               [(_human(n["bytes"]), "")], status]
        if watching:
            row.insert(0, _change(prev, n["namespace"], _listing_key(n)))
        rows.append(row)
    if not d["namespaces"] and not d["tableless"]:
        return [out.line([("no namespace matches --filter" if filtered
                           else "no shmctx namespaces on this host", "dim")])]
    lines = _grid(out, cols, rows)
    if d["matched"] > len(d["namespaces"]):
        lines.append(out.line([(f"{out.ellipsis} {d['matched'] - len(d['namespaces'])} more "
                                "(--limit)", "dim")]))
    for t in d["tableless"]:
        lines.append(out.line([(f"{t['namespace']}: no table, {len(t['objects'])} orphaned "
                                f"object(s) ('ctx-inspect --gc {t['namespace']}')", "warn")]))
    return lines


def _listing_key(n: dict) -> tuple[int, object]:
    return (n["references"] or 0, (n["contexts"], n["processes"], n["sweeper"]["pid"],
                                   n["error"], n["locked"]))


def _listing_state(d: dict) -> dict:
    """What --watch compares between refreshes of the namespace list."""
    return {n["namespace"]: _listing_key(n) for n in d["namespaces"]}


# --- --check --------------------------------------------------------------------------


def _check(args: argparse.Namespace, out: _Out) -> tuple[dict, list[str], int]:
    targets = [args.namespace] if args.namespace else _table_namespaces()
    results, lines, code = [], [], EXIT_OK
    for ns in targets:
        try:
            r = _read(ns, args.timeout)
        except _Unknown:
            if args.namespace:
                raise
            continue  # unlinked since the directory was listed
        except _Fail as f:
            if args.namespace:
                raise
            results.append({"namespace": ns, "locked": None, "violations": None,
                            "error": f.brief})
            lines.append(f"{ns}: cannot check: {f.brief}")
            code = max(code, f.code)
            continue
        found = violations(r.snap, r.tag)
        results.append({"namespace": ns, "locked": r.snap.locked, "violations": found,
                        "error": None})
        if not r.snap.locked:
            lines.append(out.line([(f"{ns}: note: unlocked snapshot, {r.unlocked_reason}",
                                    "warn")]))
        lines += [out.line([(f"{ns}: {v}", "dead")]) for v in found]
        if not found:
            lines.append(f"{ns}: sound")
        else:
            code = max(code, EXIT_VIOLATIONS)
    if not targets:
        lines.append("no shmctx namespaces on this host")
    return {"schema": SCHEMA, "namespaces": results}, lines, code


# --- --gc -----------------------------------------------------------------------------


@dataclass
class _Action:
    namespace: str
    action: str  # reclaim | remove-orphan | remove-table | keep-table
    target: str  # a pid, or a /dev/shm entry
    detail: str
    done: bool = False

    def doc(self) -> dict:
        return {"namespace": self.namespace, "action": self.action, "target": self.target,
                "detail": self.detail, "done": self.done}

    def text(self, dry: bool) -> str:
        verbs = {"reclaim": ("would reclaim", "reclaimed", "did not reclaim"),
                 "remove-orphan": ("would remove", "removed", "did not remove"),
                 "remove-table": ("would remove", "removed", "did not remove"),
                 "keep-table": ("keeps", "kept", "kept")}[self.action]
        verb = verbs[0] if dry else verbs[1] if self.done else verbs[2]
        what = {"reclaim": f"the references of dead pid {self.target}",
                "remove-orphan": f"orphan {self.target}"}.get(self.action, "the table")
        return f"{self.namespace}: {verb} {what}: {self.detail}"


def _stale(ns: str, entries: list[str], own_tag: str | None,
           live_incs: set[int] | None) -> list[_Action]:
    """The objects ``_sweeper.remove_stale`` removes given the same arguments, with why:
    the dry run must announce what --yes does."""
    return [_Action(ns, "remove-orphan", entry, why)
            for entry, why in stale_objects(ns, entries, own_tag, live_incs)]


def _unused_reason(snap: Snapshot, grace: float) -> tuple[bool, str]:
    """(in use, why) -- why the table must stay, or '' when every process is dead and
    it holds no contexts, so nothing is lost by removing it."""
    held = [s for s in snap.slots if s.state != L.FREE]
    if held:
        return True, f"it holds {len(held)} context(s)"
    live = [p.pid for p in snap.procs if is_alive(p.pid, p.start)]
    if live:
        return True, f"live process(es) attached: {', '.join(map(str, live))}"
    age = time.time() - snap.created
    if age < grace:
        # Its creator attaches right after publishing it; do not pull it from under it.
        return False, (f"no live process and no contexts, but it was created only "
                       f"{age:.0f}s ago (--grace {grace:g}s)")
    return False, ""


def _gc_plan(ns: str, grace: float,
             timeout: float) -> tuple[list[_Action], str | None, str]:
    """What --gc would do in ``ns``, the tag of the table in use (None when there is no
    table, or it is to be removed), and why repairing that table would wait on a lock
    longer than ``timeout`` ('' if it would not)."""
    entries = _shm.namespace_objects(ns)  # listed before the snapshot, as the sweeper does
    if _shm.PREFIX + ns not in entries:
        if not entries:
            raise _unknown(ns)
        return _stale(ns, entries, None, None), None, ""
    r = _read(ns, timeout)
    snap = r.snap
    used, why = _unused_reason(snap, grace)
    if not used and not why:
        own = [e for e in entries
               if e == _shm.PREFIX + ns or (_shm.parse_object(ns, e) or ("",))[0] == r.tag]
        head = _Action(ns, "remove-table", _shm.PREFIX + ns,
                       f"no live process is attached and it holds no contexts "
                       f"({len(own)} object(s))")
        return ([head] + [a for a in _stale(ns, entries, r.tag, None) if a.target not in own],
                None, "")
    actions = [] if used else [_Action(ns, "keep-table", _shm.PREFIX + ns, why)]
    dead: dict[int, int] = {}
    for p in snap.procs:
        if not is_alive(p.pid, p.start):
            dead[p.pid] = dead.get(p.pid, 0) + sum(c for _s, c in p.refs)
    actions += [_Action(ns, "reclaim", str(pid), f"{n} reference(s), and its process entry")
                for pid, n in sorted(dead.items())]
    live_incs = {s.incarnation for s in snap.slots if s.state != L.FREE}
    return actions + _stale(ns, entries, r.tag, live_incs), r.tag, _busy(r, timeout)


def _busy(r: _Read, timeout: float) -> str:
    """Why the repair path would wait on the table lock past ``timeout``, or ''.

    The repair attaches as a process of the namespace, whose lock waits trust a live
    holder for as long as it lives: it must not start when the read just found the lock
    held past ``timeout``, unless by a recorded owner that is dead, which the repair takes
    over at once (the ordinary protocol). A holder that takes the lock between this read
    and the repair is waited for as any process of the namespace waits for it.
    """
    if not r.lock_busy:
        return ""
    pid, _epoch, start = r.snap.locks[0]
    if pid and not is_alive(pid, start):
        return ""
    holder = f"held by live pid {pid}" if pid else "taken with no owner recorded"
    return (f"the table lock of namespace {r.ns!r} was not free within {timeout:g}s "
            f"({holder}); --gc --yes changed nothing; try again, or raise --timeout")


def _mark_removed(ns: str, actions: list[_Action], removed: list[str]) -> list[_Action]:
    gone = set(removed)
    for a in actions:
        if a.action == "remove-orphan":
            a.done = a.target in gone
            if not a.done:
                a.detail = "no longer an orphan, or gone already"
            gone.discard(a.target)
    return actions + [_Action(ns, "remove-orphan", e, "became an orphan meanwhile", done=True)
                      for e in sorted(gone)]


def _gc_live(ns: str, tag: str, actions: list[_Action]) -> list[_Action]:
    """Reclaim dead pids and remove orphans of a table in use, as a process of it (the
    repair path may take a wedged table lock over). Idle contexts are left alone."""
    # Should the table vanish between the plan and here, this creates an empty one: it is
    # then not the planned table (the tag says so), and a later --gc removes it as unused.
    with ContextManager(namespace=ns, sweeper=False) as m:
        if m._table.tag != tag:
            for a in actions:
                a.detail = "the table was replaced meanwhile; run --gc again"
            return actions
        for a in actions:
            if a.action != "reclaim":
                continue
            try:
                a.detail = f"{m.reclaim(int(a.target))} reference(s) released, entry freed"
                a.done = True
            except ContextInUseError:
                a.detail = "the pid is alive again (reused); left alone"
        removed = remove_namespace_orphans(m)
    return _mark_removed(ns, actions, removed)


def _gc_unused_table(ns: str, grace: float, timeout: float,
                     actions: list[_Action]) -> list[_Action]:
    """Remove a table no live process uses, re-checked under its table lock and marked
    unlinked first, so a process attaching meanwhile gets a clear error, not a table
    pulled from under it."""
    head = actions[0]
    try:
        shm = posix_ipc.SharedMemory(_shm.table_name(ns))
    except posix_ipc.ExistentialError:
        head.detail = "it is gone already"
        return actions
    try:
        t = Table._attach(ns, shm)  # TableFormatError (damaged) goes up: exit 3
    except posix_ipc.ExistentialError:
        shm.close_fd()
        head.detail = "it was unlinked meanwhile"
        return actions
    try:
        try:
            # Waits out a live holder, at most --timeout (never the table's own
            # lock_timeout, which the file being repaired may set to anything); takes
            # over from a dead one (this is the repair path).
            t.table_lock.acquire(timeout=timeout)
        except TimeoutError:
            raise _Fail(EXIT_BUSY, f"the table lock of namespace {ns!r} was not free within "
                                   f"{timeout:g}s; --gc --yes changed nothing; try again, "
                                   "or raise --timeout") from None
        try:
            used, why = _unused_reason(decode(_pread(t.fd, t.geo.total)), grace)
            if used or why:
                head.detail = f"no longer removable: {why}"
                return actions
            t.mark_unlinked()
            t.unlink_names()
        finally:
            t.table_lock.release()
    finally:
        t.close()
    removed = remove_stale(ns, _shm.namespace_objects(ns), t.tag, None)
    head.done = True
    own = [e for e in removed if (_shm.parse_object(ns, e) or ("",))[0] == t.tag]
    head.detail = f"it and {len(own)} object(s) of it removed"
    return _mark_removed(ns, actions, [e for e in removed if e not in own])


def _gc(args: argparse.Namespace) -> tuple[dict, list[str], int]:
    dry = not args.yes
    if args.namespace:
        targets = [args.namespace]
    else:
        tables = _table_namespaces()
        targets = sorted(set(tables) | set(_tableless_namespaces(tables)))
    actions: list[_Action] = []
    errors: list[dict] = []
    code = EXIT_OK
    for ns in targets:
        try:
            plan, tag, busy = _gc_plan(ns, args.grace, args.timeout)
            if not dry:
                plan = _gc_do(ns, plan, tag, busy, args)
        except _Unknown:
            if args.namespace:
                raise
            continue  # gone since the directory was listed
        except _Fail as f:
            if args.namespace:
                raise
            errors.append({"namespace": ns, "error": f.brief})
            code = max(code, f.code)
            continue
        except ContextError as e:
            errors.append({"namespace": ns, "error": str(e)})
            code = max(code, EXIT_FORMAT if isinstance(e, TableFormatError) else EXIT_USAGE)
            continue
        actions += plan
    lines = [a.text(dry) for a in actions] + [f"{e['namespace']}: {e['error']}" for e in errors]
    if not any(a.action != "keep-table" for a in actions):
        lines.append("nothing to collect")
    elif dry:
        lines.append("dry run: nothing was changed; add --yes to do it")
    doc = {"schema": SCHEMA, "dry_run": dry, "actions": [a.doc() for a in actions],
           "errors": errors}
    return doc, lines, code


def _gc_do(ns: str, plan: list[_Action], tag: str | None, busy: str,
           args: argparse.Namespace) -> list[_Action]:
    if not any(a.action != "keep-table" for a in plan):
        return plan
    if tag is not None:
        if busy:
            raise _Fail(EXIT_BUSY, busy)
        return _gc_live(ns, tag, plan)
    if plan[0].action == "remove-table":
        return _gc_unused_table(ns, args.grace, args.timeout, plan)
    return _mark_removed(ns, plan, remove_stale(ns, [a.target for a in plan], None, None))


# --- --watch ----------------------------------------------------------------------------


def _watch(args: argparse.Namespace, out: _Out) -> int:
    """Redraw in place (cursor home, clear each line's rest and the screen's rest, never
    a full clear: no flicker) every ``args.watch`` seconds until Ctrl-C."""
    stream = out.stream
    prev: dict | None = None
    if out.tty:
        stream.write(_HIDE_CURSOR)
    try:
        while True:
            lines, prev = _frame(args, out, prev)
            if out.tty:  # a frame taller than the screen would scroll, and so flicker
                # Room for the title, its blank line, and the line the cursor ends on.
                lines = lines[: max(1, shutil.get_terminal_size().lines - 3)]
            title = out.line([(f"ctx-inspect {args.namespace or '(all namespaces)'}  every "
                               f"{args.watch:g}s  {time.strftime('%H:%M:%S')}  "
                               "Ctrl-C quits", "dim")])
            stream.write(_HOME + "".join(f"{ln}{_CLEAR_EOL}\n" for ln in [title, "", *lines])
                         + _CLEAR_EOS)
            stream.flush()
            time.sleep(args.watch)  # the refresh period itself, not a synchronisation
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        if out.tty:
            stream.write(_SHOW_CURSOR)
        stream.flush()


def _frame(args: argparse.Namespace, out: _Out,
           prev: dict | None) -> tuple[list[str], dict | None]:
    if not args.namespace:
        d = _listing_doc(args)
        return (_listing_lines(out, d, prev, True, args.filter is not None),
                _listing_state(d))
    try:
        d = _namespace_doc(_read(args.namespace, args.timeout), args)
    except _Fail as f:  # keep watching: the namespace may come (back)
        return [out.line([(str(f), "dead")])], prev
    return _namespace_lines(out, d, prev, True), _namespace_state(d)


# --- command line ---------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ctx-inspect",
        description="List the shmctx namespaces of this host, show one namespace's "
                    "contexts and who holds them, check a table, or collect what dead "
                    "processes left behind. Read-only unless --gc --yes.",
        epilog="exit codes: 0 ok; 1 --check found violations; 2 usage error, unknown "
               "namespace or permission denied; 3 a table of another layout or garbage; "
               "75 --gc --yes found a lock busy past --timeout. See docs/inspect.md.",
    )
    p.add_argument("namespace", nargs="?", help="the namespace to show (default: list all)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON document on stdout")
    fmt.add_argument("--msgpack", action="store_true",
                     help="the same document as msgpack bytes on stdout")
    p.add_argument("--wide", action="store_true",
                   help="do not shorten long names to fit 100 columns")
    p.add_argument("--sort", choices=SORT_KEYS, default="name",
                   help="row order: name ascending, the others largest first")
    p.add_argument("--filter", metavar="GLOB", help="only names matching GLOB (fnmatch)")
    p.add_argument("--limit", metavar="N", type=_count, help="show at most N rows")
    p.add_argument("--watch", metavar="SECONDS", nargs="?", const=str(DEFAULT_WATCH),
                   help=f"refresh in place every SECONDS (default {DEFAULT_WATCH:g}) "
                        "until Ctrl-C, marking changes")
    act = p.add_mutually_exclusive_group()
    act.add_argument("--check", action="store_true",
                     help="check the table's invariants (all namespaces without NAMESPACE)")
    act.add_argument("--gc", action="store_true",
                     help="reclaim references of dead processes and remove orphans "
                          "(prints what it would do; acts only with --yes)")
    p.add_argument("--yes", action="store_true", help="with --gc: do it")
    p.add_argument("--timeout", metavar="SECONDS", type=_seconds, default=DEFAULT_TIMEOUT,
                   help="wait at most SECONDS for a table lock (default "
                        f"{DEFAULT_TIMEOUT:g}); past it a table is shown as an unlocked "
                        "snapshot, and --gc --yes does nothing and exits 75")
    p.add_argument("--grace", metavar="SECONDS", type=_seconds,
                   help="with --gc: leave an unused table younger than this alone, its "
                        f"creator may be about to attach (default {DEFAULT_GRACE:g})")
    return p


def _non_negative(kind: type, what: str) -> Callable[[str], float]:
    """An argparse type: a finite number >= 0 of ``kind`` (int or float)."""
    def parse(text: str) -> float:
        try:
            v = kind(text)
        except ValueError:
            v = -1
        if not 0 <= v < float("inf"):
            raise argparse.ArgumentTypeError(f"expected {what} >= 0, got {text!r}")
        return v
    return parse


_count = _non_negative(int, "a count")
_seconds = _non_negative(float, "seconds")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = _parser()
    args = p.parse_args(argv)
    if args.watch is not None:
        try:
            args.watch = float(args.watch)
        except ValueError:
            # `ctx-inspect --watch NS`: the optional SECONDS swallowed the namespace.
            if args.namespace is None and _shm.NAMESPACE_RE.fullmatch(args.watch):
                args.namespace, args.watch = args.watch, DEFAULT_WATCH
            else:
                p.error(f"--watch: expected seconds, got {args.watch!r}")
        if not 0.05 <= args.watch < float("inf"):
            p.error(f"--watch: expected at least 0.05 seconds, got {args.watch:g}")
        for flag in ("json", "msgpack", "check", "gc"):
            if getattr(args, flag):
                p.error(f"--watch cannot be combined with --{flag}")
    if args.yes and not args.gc:
        p.error("--yes only applies to --gc")
    if args.grace is not None and not args.gc:
        p.error("--grace only applies to --gc")
    if args.grace is None:
        args.grace = DEFAULT_GRACE
    if args.namespace is not None and not _shm.NAMESPACE_RE.fullmatch(args.namespace):
        p.error(f"not a namespace name (1-64 characters of [A-Za-z0-9._-]): "
                f"{args.namespace!r}")
    return args


def _emit(args: argparse.Namespace, out: _Out, doc: dict, lines: list[str]) -> None:
    if args.json:
        out.stream.write(json.dumps(doc, indent=2) + "\n")
    elif args.msgpack:
        out.stream.flush()
        sys.stdout.buffer.write(msgpack.packb(doc, use_bin_type=True))
        sys.stdout.buffer.flush()
        return
    else:
        out.stream.write("".join(f"{ln}\n" for ln in lines))
    out.stream.flush()


def _run(args: argparse.Namespace, out: _Out) -> int:
    if args.watch is not None:
        return _watch(args, out)
    if args.check:
        doc, lines, code = _check(args, out)
    elif args.gc:
        doc, lines, code = _gc(args)
    elif args.namespace:
        doc = _namespace_doc(_read(args.namespace, args.timeout), args)
        lines, code = _namespace_lines(out, doc, None, False), EXIT_OK
    else:
        doc = _listing_doc(args)
        lines, code = _listing_lines(out, doc, None, False, args.filter is not None), EXIT_OK
    _emit(args, out, doc, lines)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ctx-inspect`` console script; returns the exit code."""
    try:
        args = _parse(argv)
    except SystemExit as e:  # --help (0) or a usage error argparse has printed (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    out = _Out(sys.stdout, args.wide)
    # The library logs what the repair path does (a lock takeover, say): show it plainly.
    logging.basicConfig(level=logging.WARNING, format="ctx-inspect: note: %(message)s")
    try:
        return _run(args, out)
    except _Fail as f:
        print(f"ctx-inspect: {f}", file=sys.stderr)
        return f.code
    except TableFormatError as e:
        print(f"ctx-inspect: {e}", file=sys.stderr)
        return EXIT_FORMAT
    except (posix_ipc.PermissionsError, PermissionError) as e:
        print(f"ctx-inspect: permission denied: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`ctx-inspect | head`): say nothing more, and keep the
        # interpreter's final flush from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as e:  # never a traceback for a user
        print(f"ctx-inspect: unexpected error (a bug, please report it): "
              f"{type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_INTERNAL
