"""Which namespaces this host has, and the one loop over them that the listing,
``--check`` and ``--gc`` share."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from .. import _shm
from ._fail import EXIT_USAGE, Fail, Unknown

T = TypeVar("T")


def table_namespaces() -> list[str]:
    """Namespaces with a table on this host: /dev/shm entries named exactly shmctx@NS."""
    try:
        entries = os.listdir(_shm.SHM_DIR)
    except OSError as e:
        raise Fail(EXIT_USAGE, f"cannot list {_shm.SHM_DIR}: {e.strerror}") from None
    return sorted(
        e[len(_shm.PREFIX):] for e in entries
        if e.startswith(_shm.PREFIX) and _shm.NAMESPACE_RE.fullmatch(e[len(_shm.PREFIX):])
    )


def tableless_namespaces(tables: list[str]) -> dict[str, list[str]]:
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


def unknown(ns: str) -> Unknown:
    """The error for a namespace that is not on this host, naming those that are."""
    tables = table_namespaces()
    orphans = tableless_namespaces(tables).get(ns)
    msg = f"no namespace {ns!r} on this host"
    if orphans:
        msg += (f" (it has {len(orphans)} object(s) in {_shm.SHM_DIR} but no table; "
                f"'ctx-inspect --gc {ns}' collects them)")
    msg += "; existing: " + (", ".join(tables) if tables else "none")
    return Unknown(EXIT_USAGE, msg)


def each_namespace(targets: Iterable[str], named: bool,
                   visit: Callable[[str], T]) -> Iterator[tuple[str, T | Fail]]:
    """``(ns, visit(ns))`` for each of ``targets``, or ``(ns, the Fail it raised)``.

    The namespaces were listed before they are visited, so one may be gone by then: it is
    skipped. When the user ``named`` the namespace, a failure is the command's own and goes
    up to ``main``, which prints it and exits with its code; when going over all of them,
    one namespace that cannot be read must not hide the others.
    """
    for ns in targets:
        try:
            result: T | Fail = visit(ns)
        except Unknown:
            if named:
                raise
            continue  # unlinked since the directory was listed
        except Fail as f:
            if named:
                raise
            result = f
        yield ns, result
