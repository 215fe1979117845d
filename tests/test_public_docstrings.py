"""Every public name has a docstring: the API reference (docs/api.md, built by mkdocs
with mkdocstrings) is generated from them, and a name without one would be a bare
signature there."""

from __future__ import annotations

import importlib
import inspect

import pytest

# The public modules: the package and the integrations users import.
MODULES = ["shmctx", "shmctx.gunicorn", "shmctx.pool", "shmctx.pytest_plugin",
           "shmctx.celery", "shmctx.dask", "shmctx.asgi"]


def _public(module_name: str) -> list[tuple[str, object]]:
    mod = importlib.import_module(module_name)
    names = getattr(mod, "__all__", None)
    assert names, f"{module_name} declares no __all__"
    out: list[tuple[str, object]] = [(module_name, mod)]
    for name in names:
        obj = getattr(mod, name)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue  # constants (ints, configs) are documented where they are defined
        out.append((f"{module_name}.{name}", obj))
        if inspect.isclass(obj) and obj.__module__.startswith("shmctx"):
            for attr, member in vars(obj).items():
                if attr.startswith("_") or not (inspect.isroutine(member) or
                                                isinstance(member, property)):
                    continue
                out.append((f"{module_name}.{name}.{attr}", member))
    return out


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_name_has_a_docstring(module_name):
    missing = [qual for qual, obj in _public(module_name)
               if not (inspect.getdoc(obj) or "").strip()]
    assert missing == [], f"public names without a docstring: {missing}"
