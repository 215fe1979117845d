"""The layout declarations in ``_layout`` and everything derived from them: the checked-in
C header and documentation tables, the format fingerprint (stored in every table and
compiled into the C hot path) and the named records."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from shmctx import ContextConfig, ContextManager, MemoryContextConfig, TableFormatError, _shm
from shmctx import _layout as L
from shmctx._config import DEFAULT_CAPACITY, DEFAULT_MAX_PROCESSES
from shmctx._table import header_problem

ROOT = Path(__file__).resolve().parent.parent

# Every layout version with the fingerprint of its declarations. A change to the
# declarations changes the fingerprint; this table makes it come with a new version.
KNOWN_LAYOUTS = {3: 0xC75D51F957A189B8, 4: 0x4DF7CC5E91B59AA9}


def test_a_changed_layout_comes_with_a_new_version():
    assert L.MAGIC[-1] == L.LAYOUT_VERSION
    assert KNOWN_LAYOUTS.get(L.LAYOUT_VERSION) == L.FINGERPRINT, (
        f"the declarations in _layout.py changed (fingerprint {L.FINGERPRINT:016x}): bump "
        "LAYOUT_VERSION, add the new pair to KNOWN_LAYOUTS, run tools/gen_layout.py")


def test_the_c_header_is_generated_from_the_declarations():
    checked_in = (ROOT / "src" / "shmctx" / "_layout.h").read_text()
    assert checked_in == L.c_header(), "src/shmctx/_layout.h is stale: run tools/gen_layout.py"
    assert f"#define SHMCTX_LAYOUT_FINGERPRINT                0x{L.FINGERPRINT:016x}ULL" in \
        checked_in
    r = subprocess.run([sys.executable, "-m", "shmctx._layout", "--c-header"],
                       capture_output=True, text=True, timeout=60, check=True)
    assert r.stdout == checked_in


def test_the_byte_tables_of_the_architecture_doc_are_the_declarations():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    block = L.markdown_block(doc)
    assert block, "docs/architecture.md lost its layout-table markers"
    default = L.Geometry(DEFAULT_CAPACITY, DEFAULT_MAX_PROCESSES)
    assert block == L.markdown(default), "docs/architecture.md's layout tables are stale: run " \
        "tools/gen_layout.py"
    # Every field of every record is in it, at its offset.
    for rec in L.RECORDS:
        for p in rec.fields:
            if not p.pad:
                assert f"| {p.off} | {p.size} | {p.type} | `{p.name}` |" in block


# --- the fingerprint ----------------------------------------------------------------

def _declared(rec: L.Record) -> list[L.Field]:
    return [L.Field(p.name, p.type, p.comment) for p in rec.fields]


def _fingerprint_with(key: str, fields: list[L.Field]) -> int:
    """The fingerprint of the layout with record ``key`` declared as ``fields`` (of the
    same size in all)."""
    known = {r.key: r for r in L.RECORDS}
    old = known[key]
    rec = L.Record(key, old.title, old.size, fields, records=known)
    return L.fingerprint(tuple(rec if r.key == key else r for r in L.RECORDS))


def _same_size_type(typ: str, size: int) -> str:
    """Another type of the same size, so that no offset moves."""
    return {"u64": "f64", "f64": "u64"}.get(typ, f"bytes[{size}]" if not
                                             typ.startswith("bytes[") else f"pad[{size}]")


def test_the_fingerprint_is_computed_from_the_declarations():
    for rec in L.RECORDS:
        assert _fingerprint_with(rec.key, _declared(rec)) == L.FINGERPRINT
        # Comments are not part of the format.
        reworded = [dataclasses.replace(f, comment=f.comment + " (reworded)")
                    for f in _declared(rec)]
        assert _fingerprint_with(rec.key, reworded) == L.FINGERPRINT


def test_the_fingerprint_changes_with_any_name_type_or_offset():
    seen = {L.FINGERPRINT}
    for rec in L.RECORDS:
        fields = _declared(rec)
        for i, f in enumerate(fields):
            size = rec.fields[i].size
            renamed = [*fields[:i], dataclasses.replace(f, name=f.name + "_x"), *fields[i + 1:]]
            retyped = [*fields[:i], dataclasses.replace(f, type=_same_size_type(f.type, size)),
                       *fields[i + 1:]]
            for changed in (renamed, retyped):
                fp = _fingerprint_with(rec.key, changed)
                assert fp not in seen, (rec.key, f.name, changed[i])
                seen.add(fp)
            last = fields[-1]
            if last.type.startswith("pad[") and rec.fields[-1].size >= 8 and \
                    not f.type.startswith("pad["):
                # Every field from f on moves 8 bytes later, the record stays its size.
                moved = [*fields[:i], L.Field("gap", "pad[8]", ""), *fields[i:-1],
                         dataclasses.replace(last, type=f"pad[{rec.fields[-1].size - 8}]")]
                fp = _fingerprint_with(rec.key, moved)
                assert fp not in seen, (rec.key, "moved", f.name)
                seen.add(fp)
    # Two fields of one type trading places: same types, same offsets, other names.
    slot = _declared(L.SLOT)
    at = [f.name for f in slot].index("parent")
    slot[at], slot[at + 1] = slot[at + 1], slot[at]
    assert _fingerprint_with("slot", slot) not in seen
    # The version and the values stored in the table count too.
    assert L.fingerprint(version=L.LAYOUT_VERSION + 1) != L.FINGERPRINT
    assert L.fingerprint(constants={**L.CONSTANTS, "READY": 3}) != L.FINGERPRINT


# --- refusal by fingerprint ---------------------------------------------------------

def _set_fingerprint(ns: str, value: int) -> None:
    with open(_shm.host_path(_shm.table_name(ns)), "r+b") as f:
        f.seek(L.H_FINGERPRINT_OFF)
        f.write(value.to_bytes(8, "little"))


def test_a_table_of_another_layout_is_refused_at_attach(ns):
    m = ContextManager(ContextConfig(capacity=8, cleanup_interval=0), namespace=ns,
                       sweeper=False)
    try:
        with open(_shm.host_path(_shm.table_name(ns)), "rb") as f:
            data = f.read()
        assert L.Header.read(data).fingerprint == L.FINGERPRINT  # written at creation
        assert header_problem(data[:L.HEADER_SIZE], len(data)) == ""
        other = L.FINGERPRINT ^ 0x5A5A
        _set_fingerprint(ns, other)
        with pytest.raises(TableFormatError) as e:
            ContextManager(namespace=ns, sweeper=False)
        assert f"{other:016x}" in str(e.value) and f"{L.FINGERPRINT:016x}" in str(e.value)
        with open(_shm.host_path(_shm.table_name(ns)), "rb") as f:
            problem = header_problem(f.read(L.HEADER_SIZE), len(data))
        assert problem.startswith(f"layout fingerprint {other:016x} is not this library's")
    finally:
        _set_fingerprint(ns, L.FINGERPRINT)
        m.unlink(force=True)


class _Field:  # a descriptor, as the slot descriptors of MemoryContext are
    def __get__(self, obj, owner=None): ...
    def __set__(self, obj, value): ...


def _hot_path(table: bytearray) -> object:
    from shmctx import _speedups

    return _speedups.HotPath(
        owner=None, table=table, sem_names=["/shmctx-test-no-such-semaphore"], max_refs=0,
        mapped={}, handle_type=object, handle_fields=tuple(_Field() for _ in range(5)),
        failpoints={}, dropped=[])


@pytest.mark.needs_c
def test_the_c_hot_path_refuses_a_table_of_another_layout():
    from shmctx import _speedups

    assert _speedups.LAYOUT_FINGERPRINT == L.FINGERPRINT
    table = bytearray(L.Geometry(8, 4).total)
    L.H_FINGERPRINT.pack_into(table, L.H_FINGERPRINT_OFF, L.FINGERPRINT ^ 1)
    with pytest.raises(ValueError, match=f"{L.FINGERPRINT ^ 1:016x}.*{L.FINGERPRINT:016x}"):
        _hot_path(table)
    # With the right one it goes on, to open the (here missing) stripe semaphores.
    L.H_FINGERPRINT.pack_into(table, L.H_FINGERPRINT_OFF, L.FINGERPRINT)
    with pytest.raises(FileNotFoundError):
        _hot_path(table)


# --- named records ------------------------------------------------------------------

def test_the_named_records_read_what_the_structs_read(ns):
    cfg = ContextConfig(capacity=8, max_processes=4, cleanup_interval=0)
    m = ContextManager(cfg, namespace=ns, sweeper=False)
    try:
        a, _ = m.get_or_create_context("alpha", MemoryContextConfig(size=4096))
        b, _ = m.get_or_create_context("beta", MemoryContextConfig(parent="alpha"))
        b2 = m.get_context("beta")
        with a.lock, open(_shm.host_path(_shm.table_name(ns)), "rb") as f:
            data = f.read()
        for h in (a, b, b2):
            m.return_context(h)
    finally:
        m.unlink(force=True)
    h = L.Header.read(data)
    assert h == L.Header._make(L.Header.STRUCT.unpack_from(data, 0))
    assert (h.magic, h.version, h.capacity, h.max_processes, h.total_size) == \
        (L.MAGIC, L.LAYOUT_VERSION, 8, 4, len(data))
    assert h[1:14] == L.H_FIXED.unpack_from(data, L.H_FIXED_OFF)
    assert h.namespace[:h.namespace_len].decode() == ns
    assert (h.live, h.free_head) == (L.H_LIVE.unpack_from(data, L.H_LIVE_OFF)[0],
                                     L.H_FREE_HEAD.unpack_from(data, L.H_FREE_HEAD_OFF)[0])
    geo = L.Geometry(h.capacity, h.max_processes, h.stripes, h.index_size)
    slots = {}
    for s in range(geo.capacity):
        off = geo.slot_off(s)
        f = L.Slot.read(data, off)
        assert tuple(f) == L.SLOT_ALL.unpack_from(data, off)
        assert (f.state, f.refcount, f.incarnation) == L.S_CHECK.unpack_from(data, off)
        assert (f.size, f.parent, f.next_free, f.parent_inc, f.created, f.last_used) == \
            L.S_BODY.unpack_from(data, off + L.S_BODY_OFF)
        assert (f.lock_pid, f.lock_epoch, f.lock_start) == \
            L.LockRecord.read(data, off + L.S_LOCK_OFF) == L.LOCK.unpack_from(data, off + 80)
        if f.state != L.FREE:
            slots[f.name[:f.name_len]] = (s, f)
    (sa, fa), (sb, fb) = slots[b"alpha"], slots[b"beta"]
    assert (fa.state, fa.size, fa.refcount, fa.parent) == (L.READY, 4096, 1, 0)
    assert (fb.refcount, fb.parent, fb.parent_inc) == (2, sa + 1, fa.incarnation)
    assert fa.lock_pid != 0 and fb.lock_pid == 0  # alpha's ctx.lock was held
    assert (fa.children, fb.children) == (1, 0)
    assert fa.children == L.SLOT["children"].read(data, geo.slot_off(sa))
    procs = [L.ProcHead.read(data, geo.proc_off(p)) for p in range(geo.max_processes)]
    assert [tuple(p) for p in procs] == \
        [L.P_HEAD.unpack_from(data, geo.proc_off(p)) for p in range(geo.max_processes)]
    (mine,) = [p for p in procs if p.pid]
    row = procs.index(mine)
    counts = [L.REF_RECORD["count"].read(data, geo.ref_off(row, s)) for s in range(geo.capacity)]
    assert [(s, c) for s, c in enumerate(counts) if c] == [(sa, 1), (sb, 2)] == \
        L.nonzero_counts(data, geo.row_off(row), geo.capacity)
    # Those two counts are the only nonzero bytes of the region: the other rows' entries
    # are free, and the padding of each row is unused.
    region = bytearray(data[geo.refs_off:])
    for s in (sa, sb):
        at = geo.ref_off(row, s) - geo.refs_off
        region[at:at + L.REF_SIZE] = bytes(L.REF_SIZE)
    assert not any(region)
    # The region follows the slots; each row starts on a cache line, one count per slot.
    assert geo.refs_off == L.Geometry(8, 4).slots_off + L.SLOT_SIZE * 8 == geo.row_off(0)
    assert geo.row_stride == 64 and geo.total == len(data) >= geo.row_off(4)


# --- the reference counts -----------------------------------------------------------

@pytest.mark.parametrize("capacity", [1, 255, 256, 257, 1000])
def test_nonzero_counts_finds_every_count_of_a_row_and_only_those(capacity):
    """A row is compared with zeros a chunk at a time: counts at the edges of chunks, in
    a last partial chunk and at the row's ends are all found, and nothing past the row
    (the next row, here all ones) is read."""
    geo = L.Geometry(capacity, 2)
    buf = bytearray(geo.total)
    for s in range(capacity):
        L.REF_RECORD.struct.pack_into(buf, geo.ref_off(1, s), 0xFFFFFFFF)
    want = {s: s + 1 for s in {0, 255, 256, 257, capacity - 1} if s < capacity}
    for s, c in want.items():
        L.REF_RECORD.struct.pack_into(buf, geo.ref_off(0, s), c)
    assert geo.row_off(1) - geo.row_off(0) == geo.row_stride >= L.REF_SIZE * capacity
    assert L.nonzero_counts(buf, geo.row_off(0), capacity) == sorted(want.items())
    assert L.nonzero_counts(bytes(buf), geo.row_off(0), capacity) == sorted(want.items())
    assert L.nonzero_counts(memoryview(buf), geo.row_off(1), capacity) == \
        [(s, 0xFFFFFFFF) for s in range(capacity)]
