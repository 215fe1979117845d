"""The stubs that stand in for what type checkers cannot read (``_records.pyi``: the
table records built at run time; ``_speedups.pyi``: the C module) say what the code
they describe has.

The checkers themselves (mypy --strict, pyright strict, over src/shmctx and
tests/test_typing_usage.py, whose ``assert_type`` calls catch a public type that changes
or degrades to ``Any``) run once per CI run as a step of .ci/run, with the settings in
pyproject.toml (``[tool.mypy]``, ``[tool.pyright]``): ``mypy`` and ``pyright`` with no
arguments, after installing the ``typecheck`` extra.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from shmctx import _hotpath
from shmctx import _layout as L

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "shmctx"


def test_records_stub_is_current() -> None:
    stub = (PACKAGE / "_records.pyi").read_text()
    assert stub == L.records_stub(), (
        "src/shmctx/_records.pyi no longer matches _layout's records; regenerate it: "
        "python -m shmctx._layout --records-stub > src/shmctx/_records.pyi")


def _public_names(body: list[ast.stmt]) -> set[str]:
    names: set[str] = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if not n.startswith("_")}


@pytest.mark.needs_c
def test_speedups_stub_declares_what_the_c_module_exports() -> None:
    module = ast.parse((PACKAGE / "_speedups.pyi").read_text())
    speedups = _hotpath._speedups
    assert _public_names(module.body) == {n for n in vars(speedups) if not n.startswith("_")}
    (hot_path,) = [n for n in module.body if isinstance(n, ast.ClassDef) and n.name == "HotPath"]
    assert _public_names(hot_path.body) == \
        {n for n in vars(speedups.HotPath) if not n.startswith("_")}
