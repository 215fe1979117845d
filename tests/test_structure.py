"""The library's structure, as docs/architecture.md describes it: no module reaches
into another object's private (underscore) attributes, and no import cycle among the
library's modules, at import time or otherwise (imports for type checking included)."""

from __future__ import annotations

import ast
import pathlib

import shmctx

SRC = pathlib.Path(shmctx.__file__).parent
MODULES = sorted(SRC.rglob("*.py"))


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("shmctx", *parts))


def _imported_modules(tree: ast.AST) -> set[str]:
    """Names bound by ``import`` statements: attributes of these are a module's own."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names.add((alias.asname or alias.name).split(".")[0])
    return names


def _own_private_names(tree: ast.AST) -> set[str]:
    """Private attributes of the classes this module defines: its methods, slots and
    ``self._x`` assignments. A module may use those on any object (a class's helpers
    beside it, such as ``_context``'s functions for its handles)."""
    names = set()
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        for node in ast.walk(cls):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.value.id == "self" and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)  # __slots__ entries
    return {n for n in names if n.startswith("_")}


def test_no_module_uses_another_objects_private_attributes():
    offenders = []
    for path in MODULES:
        tree = ast.parse(path.read_text())
        modules = _imported_modules(tree)
        own = _own_private_names(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            attr = node.attr
            if not attr.startswith("_") or attr.startswith("__"):
                continue
            base = node.value
            if isinstance(base, ast.Name) and (base.id in ("self", "cls") or base.id in modules):
                continue  # its own attribute, or a private name of a module it imports
            if attr in own or (isinstance(base, ast.Call) and isinstance(base.func, ast.Name)
                               and base.func.id == "super"):
                continue
            offenders.append(f"{path.relative_to(SRC)}:{node.lineno}: .{attr}")
    assert offenders == []


def _imports(path: pathlib.Path) -> set[str]:
    """The library modules ``path`` imports (relative imports resolved)."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if not mod.startswith("shmctx"):
                continue
            for alias in node.names:  # "from . import _shm" imports a module
                if f"{mod}.{alias.name}" in KNOWN:
                    out.add(f"{mod}.{alias.name}")
            if mod in KNOWN:
                out.add(mod)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in KNOWN}
    out.discard(me)
    return out


KNOWN = {_module_name(p) for p in MODULES}


def test_no_import_cycle_among_the_library_modules():
    graph = {_module_name(p): _imports(p) for p in MODULES}
    # Package __init__ modules re-export their submodules: an edge into them is the
    # public entry point, not a dependency of the pieces on each other.
    for deps in graph.values():
        deps.discard("shmctx")
    cycles = []
    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join([*stack[stack.index(d):], d]))
            elif d not in state:
                visit(d, [*stack, d])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert cycles == []
