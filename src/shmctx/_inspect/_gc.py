"""``--gc``: collect what dead processes left behind, planned from a table copy (the dry
run) and done (``--yes``) through the library's own operations.

Per namespace: a table in use gets its dead processes' references reclaimed
(``ContextManager.reclaim``) and its orphans removed (``_sweeper.remove_namespace_orphans``),
as a process of the namespace; an unused table is removed whole (``Table.retire``, which
re-checks under the table lock), with its objects; a namespace with objects but no table
loses those objects (``_sweeper.remove_stale``). Idle contexts are never closed.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import posix_ipc

from .. import _layout as L
from .. import _shm
from .._errors import ContextError, ContextInUseError, TableFormatError
from .._manager import ContextManager
from .._proc import is_alive
from .._snapshot import Snapshot, decode
from .._sweeper import remove_namespace_orphans, remove_stale, stale_objects
from .._table import Table
from ._fail import EXIT_BUSY, EXIT_FORMAT, EXIT_OK, EXIT_USAGE, Fail
from ._model import SCHEMA, Doc
from ._namespaces import each_namespace, table_namespaces, tableless_namespaces, unknown
from ._read import Read, pread, read

DEFAULT_GRACE = 10.0  # --gc leaves unused tables younger than this alone


@dataclass
class Action:
    """One thing --gc does (or would do), and what came of it."""

    namespace: str
    action: str  # reclaim | remove-orphan | remove-table | keep-table
    target: str  # a pid, or a /dev/shm entry
    detail: str
    done: bool = False

    def doc(self) -> Doc:
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


def gc(args: argparse.Namespace) -> tuple[Doc, list[str], int]:
    """The --gc document, its text lines and the exit code; acts only with --yes."""
    dry = not args.yes
    if args.namespace:
        targets = [args.namespace]
    else:
        tables = table_namespaces()
        targets = sorted(set(tables) | set(tableless_namespaces(tables)))

    def visit(ns: str) -> list[Action] | Fail:
        try:
            plan, tag, busy = _plan(ns, args.grace, args.timeout)
            return plan if dry else _do(ns, plan, tag, busy, args)
        except ContextError as e:
            # The library refused the repair (a damaged table, another user's objects):
            # said for this namespace, also a named one, and the others still collected.
            return Fail(EXIT_FORMAT if isinstance(e, TableFormatError) else EXIT_USAGE, str(e))

    actions: list[Action] = []
    errors: list[Doc] = []
    code = EXIT_OK
    for ns, result in each_namespace(targets, bool(args.namespace), visit):
        if isinstance(result, Fail):
            errors.append({"namespace": ns, "error": result.brief})
            code = max(code, result.code)
        else:
            actions += result
    lines = [a.text(dry) for a in actions] + [f"{e['namespace']}: {e['error']}" for e in errors]
    if not any(a.action != "keep-table" for a in actions):
        lines.append("nothing to collect")
    elif dry:
        lines.append("dry run: nothing was changed; add --yes to do it")
    doc = {"schema": SCHEMA, "dry_run": dry, "actions": [a.doc() for a in actions],
           "errors": errors}
    return doc, lines, code


# --- the plan: what --gc would do, from a table copy ------------------------------------


def _stale(ns: str, entries: list[str], own_tag: str | None,
           live_incs: set[int] | None) -> list[Action]:
    """The objects ``_sweeper.remove_stale`` removes given the same arguments, with why:
    the dry run must announce what --yes does."""
    return [Action(ns, "remove-orphan", entry, why)
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


def _plan(ns: str, grace: float, timeout: float) -> tuple[list[Action], str | None, str]:
    """What --gc would do in ``ns``, the tag of the table in use (None when there is no
    table, or it is to be removed), and why repairing that table would wait on a lock
    longer than ``timeout`` ('' if it would not)."""
    entries = _shm.namespace_objects(ns)  # listed before the snapshot, as the sweeper does
    if _shm.PREFIX + ns not in entries:
        if not entries:
            raise unknown(ns)
        return _stale(ns, entries, None, None), None, ""
    r = read(ns, timeout)
    snap = r.snap
    used, why = _unused_reason(snap, grace)
    if not used and not why:
        own = [e for e in entries
               if e == _shm.PREFIX + ns or (_shm.parse_object(ns, e) or ("",))[0] == r.tag]
        head = Action(ns, "remove-table", _shm.PREFIX + ns,
                      f"no live process is attached and it holds no contexts "
                      f"({len(own)} object(s))")
        return ([head] + [a for a in _stale(ns, entries, r.tag, None) if a.target not in own],
                None, "")
    actions = [] if used else [Action(ns, "keep-table", _shm.PREFIX + ns, why)]
    dead: dict[int, int] = {}
    for p in snap.procs:
        if not is_alive(p.pid, p.start):
            dead[p.pid] = dead.get(p.pid, 0) + sum(c for _s, c in p.refs)
    actions += [Action(ns, "reclaim", str(pid), f"{n} reference(s), and its process entry")
                for pid, n in sorted(dead.items())]
    live_incs = {s.incarnation for s in snap.slots if s.state != L.FREE}
    return actions + _stale(ns, entries, r.tag, live_incs), r.tag, _busy(r, timeout)


def _busy(r: Read, timeout: float) -> str:
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


# --- doing it (--yes) ---------------------------------------------------------------------


def _do(ns: str, plan: list[Action], tag: str | None, busy: str,
        args: argparse.Namespace) -> list[Action]:
    if not any(a.action != "keep-table" for a in plan):
        return plan
    if tag is not None:
        if busy:
            raise Fail(EXIT_BUSY, busy)
        return _repair_live(ns, tag, plan)
    if plan[0].action == "remove-table":
        return _remove_unused_table(ns, args.grace, args.timeout, plan)
    return _mark_removed(ns, plan, remove_stale(ns, [a.target for a in plan], None, None))


def _mark_removed(ns: str, actions: list[Action], removed: list[str]) -> list[Action]:
    gone = set(removed)
    for a in actions:
        if a.action == "remove-orphan":
            a.done = a.target in gone
            if not a.done:
                a.detail = "no longer an orphan, or gone already"
            gone.discard(a.target)
    return actions + [Action(ns, "remove-orphan", e, "became an orphan meanwhile", done=True)
                      for e in sorted(gone)]


def _repair_live(ns: str, tag: str, actions: list[Action]) -> list[Action]:
    """Reclaim dead pids and remove orphans of a table in use, as a process of it (the
    repair path may take a wedged table lock over). Idle contexts are left alone."""
    # Should the table vanish between the plan and here, this creates an empty one: it is
    # then not the planned table (the tag says so), and a later --gc removes it as unused.
    with ContextManager(namespace=ns, sweeper=False) as m:
        t = _planned_table(ns, tag)
        if t is None:
            for a in actions:
                a.detail = "the table was replaced meanwhile; run --gc again"
            return actions
        try:
            for a in actions:
                if a.action != "reclaim":
                    continue
                try:
                    a.detail = f"{m.reclaim(int(a.target))} reference(s) released, entry freed"
                    a.done = True
                except ContextInUseError:
                    a.detail = "the pid is alive again (reused); left alone"
            removed = remove_namespace_orphans(t)
        finally:
            t.close()
    return _mark_removed(ns, actions, removed)


def _planned_table(ns: str, tag: str) -> Table | None:
    """The table published for ``ns`` now, if it is the planned one (tag ``tag``), else
    None. Asked once a manager is open, it is also the table that manager attached to: a
    table published at the plan and still now was published in between, and a tag is
    never reused."""
    try:
        t = Table.attach(ns)
    except posix_ipc.ExistentialError:  # unlinked while being attached
        return None
    if t is not None and t.tag != tag:
        t.close()
        return None
    return t


def _remove_unused_table(ns: str, grace: float, timeout: float,
                         actions: list[Action]) -> list[Action]:
    """Remove a table no live process uses, re-checked under its table lock and marked
    unlinked first (``Table.retire``), so a process attaching meanwhile gets a clear
    error, not a table pulled from under it."""
    head = actions[0]
    try:
        t = Table.attach(ns)  # TableFormatError (damaged) goes up: exit 3
    except posix_ipc.ExistentialError:
        head.detail = "it was unlinked meanwhile"
        return actions
    if t is None:
        head.detail = "it is gone already"
        return actions
    try:
        # Waits out a live holder, at most --timeout (never the table's own lock_timeout,
        # which the file being repaired may set to anything); takes over from a dead one
        # (this is the repair path).
        why = t.retire(timeout, lambda: _unused_reason(decode(pread(t.fd, t.geo.total)),
                                                       grace)[1])
    except TimeoutError:
        raise Fail(EXIT_BUSY, f"the table lock of namespace {ns!r} was not free within "
                              f"{timeout:g}s; --gc --yes changed nothing; try again, "
                              "or raise --timeout") from None
    finally:
        t.close()
    if why:
        head.detail = f"no longer removable: {why}"
        return actions
    removed = remove_stale(ns, _shm.namespace_objects(ns), t.tag, None)
    head.done = True
    own = [e for e in removed if (_shm.parse_object(ns, e) or ("",))[0] == t.tag]
    head.detail = f"it and {len(own)} object(s) of it removed"
    return _mark_removed(ns, actions, [e for e in removed if e not in own])
