"""Regenerate what comes from the table's layout declarations (src/shmctx/_layout.py):
src/shmctx/_layout.h, for the C hot path, src/shmctx/_records.pyi, the named records for
type checkers, and the byte tables of docs/architecture.md (the block between the
layout-table markers). Run it after changing a declaration:

    .venv/bin/python tools/gen_layout.py

then rebuild the C extension. tests/test_layout.py and tests/test_stubs.py fail while
any of them is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from shmctx import _layout as L  # noqa: E402
from shmctx._config import DEFAULT_CAPACITY, DEFAULT_MAX_PROCESSES  # noqa: E402

HEADER = ROOT / "src" / "shmctx" / "_layout.h"
RECORDS = ROOT / "src" / "shmctx" / "_records.pyi"
DOC = ROOT / "docs" / "architecture.md"


def main() -> int:
    HEADER.write_text(L.c_header())
    RECORDS.write_text(L.records_stub())
    text = DOC.read_text()
    old = L.markdown_block(text)
    if not old:
        print(f"{DOC}: no block between {L.MARKDOWN_BEGIN!r} and {L.MARKDOWN_END!r}",
              file=sys.stderr)
        return 1
    default = L.Geometry(DEFAULT_CAPACITY, DEFAULT_MAX_PROCESSES)
    DOC.write_text(text.replace(old, L.markdown(default)))
    print(f"wrote {HEADER.relative_to(ROOT)}, {RECORDS.relative_to(ROOT)} and the layout "
          "tables of "
          f"{DOC.relative_to(ROOT)} (fingerprint {L.FINGERPRINT:016x})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
