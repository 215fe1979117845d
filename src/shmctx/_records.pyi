# _records.pyi: the named records of _layout.py, declared for type checkers.
#
# generated from _layout.py; do not edit. Regenerate with
# python -m shmctx._layout --records-stub; tests/test_stubs.py fails while
# this file is stale. The records exist only as _layout.Header, _layout.Slot, ...

from typing import NamedTuple

class Header(NamedTuple):
    magic: bytes
    version: int
    header_size: int
    slot_size: int
    capacity: int
    stripes: int
    max_processes: int
    total_size: int
    max_references: int
    mode: int
    max_idle_time: float
    cleanup_interval: float
    lock_timeout: float
    created: float
    next_incarnation: int
    live: int
    free_head: int
    flags: int
    index_size: int
    table_id: int
    sweeper_pid: int
    sweeper_flags: int
    sweeper_start: int
    sweeper_beat: float
    namespace_len: int
    namespace: bytes
    fingerprint: int
    @classmethod
    def read(cls, buf: memoryview | bytes | bytearray, off: int = 0) -> Header: ...

class LockRecord(NamedTuple):
    pid: int
    epoch: int
    start: int
    @classmethod
    def read(cls, buf: memoryview | bytes | bytearray, off: int = 0) -> LockRecord: ...

class ProcHead(NamedTuple):
    pid: int
    flags: int
    start: int
    attached: float
    @classmethod
    def read(cls, buf: memoryview | bytes | bytearray, off: int = 0) -> ProcHead: ...

class Sweeper(NamedTuple):
    sweeper_pid: int
    sweeper_flags: int
    sweeper_start: int
    sweeper_beat: float
    @classmethod
    def read(cls, buf: memoryview | bytes | bytearray, off: int = 0) -> Sweeper: ...

class Slot(NamedTuple):
    state: int
    flags: int
    name_len: int
    refcount: int
    incarnation: int
    name_hash: int
    size: int
    parent: int
    next_free: int
    parent_inc: int
    created: float
    last_used: float
    creator_pid: int
    children: int
    creator_start: int
    lock_pid: int
    lock_epoch: int
    lock_start: int
    name: bytes
    kind: int
    version: int
    @classmethod
    def read(cls, buf: memoryview | bytes | bytearray, off: int = 0) -> Slot: ...

class Payload(NamedTuple):
    magic: bytes
    kind: int
    meta_len: int
    data_off: int
    data_len: int
    @classmethod
    def read(cls, buf: memoryview | bytes | bytearray, off: int = 0) -> Payload: ...
