"""Every code block of docs/data.md runs as written and leaves nothing in /dev/shm: the
page's examples are the API's promises, so they are tested as such."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import uuid

import pytest

from shmctx import _shm

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "data.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def test_the_page_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_each_example_runs_and_leaves_nothing(i):
    # Each run gets a namespace of its own, so that parallel runs never meet.
    namespaces = re.findall(r'namespace="([^"]+)"', BLOCKS[i])
    assert namespaces, "an example names its namespace"
    code = BLOCKS[i]
    mine = {}
    for ns in set(namespaces):
        mine[ns] = f"{ns}-{uuid.uuid4().hex[:8]}"
        code = code.replace(f'namespace="{ns}"', f'namespace="{mine[ns]}"')
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    leftovers = {ns: _shm.namespace_objects(ns) for ns in mine.values()}
    for ns in leftovers:
        _shm.remove_namespace_objects(ns)
    assert r.returncode == 0, r.stderr
    assert all(not objs for objs in leftovers.values()), leftovers
