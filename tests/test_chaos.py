"""A short chaos run (tools/chaos.py) as part of the suite: random operations while
workers are SIGKILLed at random moments; the tool itself checks the invariants."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "tools" / "chaos.py"


def test_short_chaos_run_has_no_violations(ns):
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--seconds", "4", "--workers", "3", "--namespace", ns,
         "--kill-every", "0.15"],
        capture_output=True, text=True, timeout=120,
    )
    last = proc.stdout.strip().splitlines()[-1]
    figures = dict(re.findall(r"(\w+)=([\d.]+)", last))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert figures["violations"] == "0"
    assert int(figures["kills"]) > 5 and int(figures["ops"]) > 100, last
