"""The documents: the one source of the text, JSON and msgpack outputs of the views.

A namespace document describes one table copy; the listing document has a row per
namespace and the namespaces that have objects but no table. The text views are rendered
from these documents (``_render``), and ``--watch`` compares the states derived from them
here between refreshes. Their schema is documented in ``docs/inspect.md``.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
from collections.abc import Callable
from typing import Any

from .. import _layout as L
from .. import _payload, _shm
from .._proc import is_alive
from .._snapshot import Snapshot
from ._fail import Fail
from ._namespaces import each_namespace, table_namespaces, tableless_namespaces
from ._read import Read, read

SCHEMA = 1  # version of the JSON/msgpack documents; bumped only on incompatible changes
SORT_KEYS = ("name", "refs", "idle", "size", "age")

# A document, or a part of it that is a JSON object (its values: JSON's types).
Doc = dict[str, Any]
# What --watch compares between refreshes (namespace_state, listing_state): for each
# context or namespace, its key.
State = dict[Any, tuple[int, object]]
# How a view sorts its rows (by a key of the row; reversed or not), by --sort name.
Sorts = dict[str, tuple[Callable[[Doc], Any], bool]]


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


def _context_docs(snap: Snapshot, alive: Callable[[int, int], bool]) -> list[Doc]:
    out: list[Doc] = []
    for s in snap.slots:
        if s.state == L.FREE:
            continue  # a free slot still referenced: garbage for --check, not a context
        out.append({
            "name": s.name,
            "slot": s.slot,
            "state": L.STATE_NAMES.get(s.state, f"invalid({s.state})"),
            # A name may have several slots at once: its current version, older ones
            # still held (superseded), and one being published (pending, version 0
            # until it becomes current). Each is its own row, told apart by these.
            "kind": _payload.KIND_NAMES.get(s.kind, f"invalid({s.kind})"),
            "version": s.version,
            "superseded": bool(s.flags & L.SLOT_SUPERSEDED),
            "pending": bool(s.flags & L.SLOT_PENDING),
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


def _versions(c: Doc) -> tuple[Any, ...]:
    """The order of a context's row among rows of the same name: oldest version first,
    a pending one (not numbered yet) last, the slot breaking ties in a damaged table."""
    return (c["name"], c["pending"], c["version"], c["slot"])


_SORTS: Sorts = {
    "name": (_versions, False),
    "refs": (lambda c: c["refs"], True),
    "idle": (lambda c: c["idle"], True),
    "size": (lambda c: c["size"], True),
    "age": (lambda c: c["age"], True),
}


def _select(items: list[Doc], key_name: str, glob: str | None, sort: str,
            limit: int | None, sorts: Sorts,
            tie: Callable[[Doc], Any] | None = None) -> tuple[list[Doc], int]:
    """Filter by ``glob`` on ``key_name``, sort, cut to ``limit``; ties are broken by
    ``tie`` (default: ``key_name``). Returns (shown, matched count)."""
    if glob is not None:
        items = [i for i in items if fnmatch.fnmatchcase(i[key_name], glob)]
    key, reverse = sorts[sort]
    # The tie-break, kept by the stable sort below.
    items = sorted(items, key=tie or (lambda i: i[key_name]))
    items.sort(key=key, reverse=reverse)
    return (items if limit is None else items[:limit]), len(items)


def namespace_doc(r: Read, args: argparse.Namespace) -> Doc:
    """The document of one namespace's table copy; ``args`` gives --filter, --sort and
    --limit, which cut its ``contexts`` only."""
    snap = r.snap
    alive = _liveness()
    procs = [
        {"pid": p.pid, "alive": alive(p.pid, p.start), "attached": p.attached,
         "references": sum(c for _s, c in p.refs)}
        for p in snap.procs
    ]
    contexts = _context_docs(snap, alive)
    shown, matched = _select(contexts, "name", args.filter, args.sort, args.limit, _SORTS,
                             _versions)
    # In a locked snapshot the record names ctx-inspect itself, which held it for the copy.
    table_lock = snap.locks[0]
    lpid = 0 if snap.locked else table_lock.pid
    lepoch, lstart = table_lock.epoch, table_lock.start
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
            # What the contexts' segments take in /dev/shm, older versions included: those
            # stay until their last holder returns them.
            "context_bytes": sum(c["size"] for c in contexts),
            "superseded_bytes": sum(c["size"] for c in contexts if c["superseded"]),
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


_LIST_SORTS: Sorts = {
    "name": (lambda n: n["namespace"], False),
    "refs": (lambda n: n["references"] or 0, True),
    "idle": (lambda n: n["namespace"], False),  # no idle time for a whole namespace
    "size": (lambda n: n["bytes"] or 0, True),
    "age": (lambda n: n["age"] or 0.0, True),
}

# Options for internal reads that must see every context (the listing's counts).
_ALL = argparse.Namespace(filter=None, sort="name", limit=None)


def listing_doc(args: argparse.Namespace) -> Doc:
    """The document of every namespace of this host (--timeout, --filter, --sort and
    --limit from ``args``)."""
    tables = table_namespaces()
    rows: list[Doc] = []
    for ns, d in each_namespace(tables, False,
                                lambda ns: namespace_doc(read(ns, args.timeout), _ALL)):
        row: Doc = {"namespace": ns, "error": None, "locked": None, "unlocked_reason": None,
                     "contexts": None,
                     "references": None, "references_dead": None, "processes": None,
                     "processes_dead": None, "sweeper": {"pid": None, "alive": None},
                     "bytes": None, "age": None}
        if isinstance(d, Fail):
            row["error"] = d.brief
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
            for ns, objs in tableless_namespaces(tables).items()
        ],
    }


# --- what --watch compares between refreshes ---------------------------------------------


def holders_key(c: Doc) -> tuple[tuple[int, int, bool], ...]:
    """A context's holders, as compared between refreshes."""
    return tuple((h["pid"], h["count"], h["alive"]) for h in c["holders"])


def context_key(c: Doc) -> tuple[int, object]:
    """A context's references, and the rest of it that --watch marks as changed: its
    holders, and its version's standing (a pending version becoming current keeps its
    slot and incarnation, and is given its number then; a current one is superseded)."""
    return (c["refs"], (holders_key(c), c["version"], c["superseded"], c["pending"]))


def namespace_state(d: Doc) -> State:
    """What --watch compares between refreshes of a namespace view: one entry per slot
    (name and incarnation), so that each version of a name is followed on its own."""
    return {(c["name"], c["incarnation"]): context_key(c) for c in d["contexts"]}


def listing_key(n: Doc) -> tuple[int, object]:
    """A listing row's references, and the rest of it that --watch marks as changed."""
    return (n["references"] or 0, (n["contexts"], n["processes"], n["sweeper"]["pid"],
                                   n["error"], n["locked"]))


def listing_state(d: Doc) -> State:
    """What --watch compares between refreshes of the namespace list."""
    return {n["namespace"]: listing_key(n) for n in d["namespaces"]}
