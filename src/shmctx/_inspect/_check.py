"""``--check``: the table's invariants, checked on a copy (the checks of
``ContextManager.check()``, from ``_snapshot.violations``)."""

from __future__ import annotations

import argparse

from .._snapshot import violations
from ._fail import EXIT_OK, EXIT_VIOLATIONS, Fail
from ._model import SCHEMA, Doc
from ._namespaces import each_namespace, table_namespaces
from ._read import read
from ._render import Out


def check(args: argparse.Namespace, out: Out) -> tuple[Doc, list[str], int]:
    """The --check document, its text lines and the exit code."""
    targets = [args.namespace] if args.namespace else table_namespaces()
    results: list[Doc] = []
    lines: list[str] = []
    code = EXIT_OK
    for ns, r in each_namespace(targets, bool(args.namespace),
                                lambda ns: read(ns, args.timeout)):
        if isinstance(r, Fail):
            results.append({"namespace": ns, "locked": None, "violations": None,
                            "error": r.brief})
            lines.append(f"{ns}: cannot check: {r.brief}")
            code = max(code, r.code)
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
