"""Send 16 lookups to the worker and show which pool process answered each."""

from __future__ import annotations

import sys

from tasks import lookup

results = [r.get(timeout=30) for r in [lookup.delay(i) for i in range(16)]]
for r in results:
    print(f"lookup({r['i']:2}) = {r['value']:3}  served by pid {r['pid']}, "
          f"table built by pid {r['built_by']}")
print(f"{len({r['pid'] for r in results})} pool process(es) served")
if len({r["built_by"] for r in results}) != 1:
    sys.exit("the table was built more than once")
print("the table was built once, by one pool process")
