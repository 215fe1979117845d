"""The README's main job: ``python -m shmctx demo`` runs, shares one context among its
workers, and leaves nothing in /dev/shm."""

from __future__ import annotations

import re
import subprocess
import sys

from shmctx import _shm


def test_demo_runs_and_leaves_nothing_behind():
    r = subprocess.run([sys.executable, "-m", "shmctx", "demo", "--workers", "3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    namespace = re.search(r"namespace '([^']+)'", r.stdout).group(1)
    assert "shared counter = 600 (expected 600)" in r.stdout
    # 3 workers + the supervisor hold it (the columns: name, kind, version, state, refs)
    assert re.search(r"demo\.shared\s+bytes\s+1\s+ready\s+4\s", r.stdout)
    assert "check(): sound" in r.stdout
    assert "Traceback" not in r.stderr
    assert _shm.namespace_objects(namespace) == []
