"""Library defects found by the randomized run of ``test_differential.py`` (while it also
checked the table's invariants after each run), each reduced to a minimal reproducer.

* Creating a context whose parent exists but is unreferenced, in a full table, could
  evict that very parent to make room (it was the least recently used context without
  references or children): the new context then took the parent's slot and named a
  parent that no longer exists, which ``check()`` reports as damage.
"""

from __future__ import annotations

from shmctx import ContextConfig, MemoryContextConfig

CFG = ContextConfig(capacity=2, cleanup_interval=0, lock_timeout=0.2)


def test_making_room_for_a_child_does_not_evict_its_parent(managers):
    m = managers()
    m.return_context(m.get_or_create_context("parent")[0])  # the least recently used
    m.return_context(m.get_or_create_context("other")[0])
    child, _ = m.get_or_create_context("child", MemoryContextConfig(parent="parent"))
    try:
        assert m.check() == []
        assert [(i.name, i.parent) for i in m.contexts()] == \
            [("child", "parent"), ("parent", None)]
    finally:
        m.return_context(child)
