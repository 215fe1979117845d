"""Library defects found by tools/chaos.py (--faults sigint, --faults fork), each reduced
to a minimal reproducer that failed on the code before its fix:

* an interrupt between the cold path's counting of a reference and the existence of
  the handle that stands for it leaked that reference for the life of the process;
* a child forked inside ``init`` was refused a get of that context ("being initialised
  by this thread"): the initialising-thread record, inherited over fork, was taken for
  the child's own."""

from __future__ import annotations

import gc
import os

import pytest
from helpers import wait_for

from shmctx import MemoryContextConfig
from shmctx import _layout as L


def test_interrupt_between_cold_reference_and_handle_leaks_nothing(managers):
    m = managers()
    other = managers()  # creates the context, so that m's get is a first, cold one
    ctx, _ = other.get_or_create_context("c", MemoryContextConfig(size=64))
    real_map = m._mappings.map

    def interrupted_map(*args, **kwargs):
        # Ctrl-C arriving as Mappings.map starts (shm_open, mmap: Python calls, where Python
        # runs signal handlers), after the reference was counted.
        m._mappings.map = real_map
        raise KeyboardInterrupt

    m._mappings.map = interrupted_map
    with pytest.raises(KeyboardInterrupt):
        m.get_context("c")
    gc.collect()
    m._slots.return_dropped()
    [info] = m.contexts()
    assert info.holders.get(os.getpid(), 0) == 1, \
        f"references booked to this process: {info.holders} (only `other`'s one is held)"
    other.return_context(ctx)


def test_child_forked_inside_init_can_wait_for_the_context(managers):
    m = managers()
    r, w = os.pipe()

    def init(ctx):
        ctx.put(1)
        pid = os.fork()
        if pid == 0:
            os.close(r)
            status = 1
            try:
                # Another process: it waits for its parent's init like any other.
                c = m.get_context("c", timeout=5)
                status = 0 if c.get() == 1 else 2
                m.return_context(c)
            except BaseException as e:  # reported to the parent through the pipe
                os.write(w, f"{type(e).__name__}: {e}".encode())
            finally:
                os._exit(status)
        init.child = pid
        # Stay in init until the child either waits for it (it sets the slot's
        # SLOT_WAITERS flag) or is done: its get must meet the context still CREATING.
        so = m._geo.slot_off(ctx._mapped.slot)

        def child_waits_or_ended() -> bool:
            if m._buf[so + 1] & L.SLOT_WAITERS:
                return True
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                init.status = status
            return bool(done)
        wait_for(child_waits_or_ended)

    ctx, _ = m.get_or_create_context("c", MemoryContextConfig(size=64), init=init)
    os.close(w)
    status = init.status if hasattr(init, "status") else os.waitpid(init.child, 0)[1]
    error = os.read(r, 4096).decode()
    os.close(r)
    m.return_context(ctx)
    assert os.waitstatus_to_exitcode(status) == 0, error
