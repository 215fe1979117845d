"""Where the hot path's time goes: ``--profile`` and ``--hot-loop``.

``--profile PAIRS`` runs cProfile over the shmctx pair, on the C hot path (when built)
and on the pure-Python one, then times the pure-Python pair's parts unprofiled: the
primitives it calls (a semaphore round trip, a struct read from shared memory, a clock
read, ...) each timed alone on objects of the benchmark's own, times how often the
profile saw the pair call them; what is left is the pair's own Python code. Next to it,
the C pair and the floor. Everything goes through the public API: a profiler observes
the library, nothing in it is replaced.

``--hot-loop SECONDS`` just runs the pair, for an external sampler such as ``py-spy``.
"""

from __future__ import annotations

import cProfile
import mmap
import pstats
import struct
import sys
import threading
import timeit
import uuid
from collections.abc import Callable
from pathlib import Path
from time import monotonic

import posix_ipc

from shmctx import ContextConfig, ContextManager, MemoryContextConfig

from .contenders import TARGET_NAMES, create_floor, open_floor, shmctx_pair
from .runner import warm
from .session import make_manager

_NAME = TARGET_NAMES[0]


def _hot_manager(ns: str, pure_python: bool = False
                 ) -> tuple[ContextManager, Callable[[str], None]]:
    """A manager of ``ns`` with the pair's context made and mapped, and its pair."""
    m = make_manager(ns, ContextConfig(max_references=0, cleanup_interval=0),
                     pure_python=pure_python)
    ctx, _ = m.get_or_create_context(_NAME, MemoryContextConfig(size=4096))
    m.return_context(ctx)
    return m, shmctx_pair(m)


def _new_namespace() -> str:
    return f"bench-prof-{uuid.uuid4().hex[:8]}"


def profile(pairs: int) -> None:
    """cProfile of the hot path as installed (the C one when built), then of the
    pure-Python one, then the unprofiled cost of the parts."""
    for pure_python in (False, True):
        m, pair = _hot_manager(_new_namespace(), pure_python)
        try:
            warm(pair, _NAME, 0.2)
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(pairs):
                pair(_NAME)
            prof.disable()
            st = pstats.Stats(prof)
            which = "C" if m.hot_path == "C" else \
                "pure-Python" if pure_python else "pure-Python (C not built, or turned off)"
            print(f"cProfile of {pairs:,} hot-path pairs, {which} hot path "
                  "(get_or_create_context + return_context); per pair = tottime / pairs:\n")
            rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])  # type: ignore[attr-defined]
            total = sum(v[2] for _k, v in rows)
            print(f"{'per pair µs':>12} {'share':>6} {'calls/pair':>10}  function")
            for (file, line, fn), (_cc, nc, tt, _ct, _callers) in rows[:16]:
                where = f"{Path(file).name}:{line}" if line else file
                print(f"{tt / pairs * 1e6:12.3f} {tt / total:6.1%} {nc / pairs:10.1f}  "
                      f"{fn} ({where})")
            print(f"{total / pairs * 1e6:12.3f} 100.0%             total (profiled; cProfile "
                  "inflates small calls)\n")
            if pure_python:
                _components(m, pair, _calls_per_pair(st, pairs))
        finally:
            m.unlink(force=True)


def _calls_per_pair(st: pstats.Stats, pairs: int) -> dict[str, float]:
    """How often the profiled pairs called each built-in function, per pair."""
    return {fn: nc / pairs
            for (file, _line, fn), (_cc, nc, *_rest) in st.stats.items()  # type: ignore[attr-defined]
            if file == "~"}


def _primitives(buf: memoryview, sem: posix_ipc.Semaphore
                ) -> list[tuple[str, str, Callable[[], object]]]:
    """(cProfile's name, label, one call timed alone) of each primitive the pair may
    call; ``buf`` is a shared-memory mapping and ``sem`` a semaphore of our own."""
    rec = struct.Struct("<IIQ")  # a 16-byte record, like the fields the pair reads
    frame = sys._getframe

    def semaphore() -> None:
        sem.acquire(1.0)
        sem.release()

    return [
        ("<method 'acquire' of 'posix_ipc.Semaphore' objects>",
         "posix_ipc semaphore acquire(timeout)+release", semaphore),
        ("<method 'unpack_from' of '_struct.Struct' objects>",
         "Struct.unpack_from, 16 bytes of shared memory", lambda: rec.unpack_from(buf, 64)),
        ("<method 'pack_into' of '_struct.Struct' objects>",
         "Struct.pack_into, 16 bytes of shared memory", lambda: rec.pack_into(buf, 64, 1, 2, 3)),
        ("<built-in method time.monotonic>", "time.monotonic()", monotonic),
        ("<built-in method sys._getframe>", "sys._getframe()", frame),
        ("<built-in method _thread.get_ident>", "threading.get_ident()", threading.get_ident),
    ]


def _best_us(fn: Callable[[], object]) -> float:
    return min(timeit.repeat(fn, number=100_000, repeat=5)) / 100_000 * 1e6


def _components(m: ContextManager, pair: Callable[[str], None],
                calls: dict[str, float]) -> None:
    """Unprofiled cost of the pure-Python pair and of the primitives it calls, next to
    the C pair and the floor."""
    spec, remove = create_floor(f"/bench-prof-{uuid.uuid4().hex[:8]}")
    floor = open_floor(spec)
    c_manager, c_pair = _hot_manager(m.namespace)
    sem_name = f"/bench-prof-{uuid.uuid4().hex[:8]}"
    sem = posix_ipc.Semaphore(sem_name, posix_ipc.O_CREX, mode=0o600, initial_value=1)
    shm = mmap.mmap(-1, 4096, flags=mmap.MAP_SHARED)
    buf = memoryview(shm)
    try:
        print(f"{'µs':>8} {'x/pair':>6} {'µs/pair':>8}  part (timeit, best of 5, unprofiled; "
              "x/pair: calls per pair in the profile above)")
        c_label = "whole pair, C hot path (get_or_create_context + return_context)" \
            if c_manager.hot_path == "C" else "whole pair, as installed (the C hot path is off)"
        whole = _best_us(lambda: pair(_NAME))
        for label, t in ((c_label, _best_us(lambda: c_pair(_NAME))),
                         ("floor pair (for comparison)", _best_us(lambda: floor.pair(_NAME))),
                         ("whole pair, pure-Python hot path; the primitives it calls:", whole)):
            print(f"{t:8.3f} {1:6d} {t:8.3f}  {label}")
        spent = 0.0
        for key, label, fn in _primitives(buf, sem):
            n = calls.get(key, 0.0)
            if not n:
                continue
            t = _best_us(fn)
            spent += t * n
            print(f"{t:8.3f} {n:6.1f} {t * n:8.3f}    {label}")
        print(f"{'':8} {'':6} {whole - spent:8.3f}    the rest: the pair's own Python code "
              "(the whole pair minus the primitives)")
    finally:
        buf.release()
        shm.close()
        sem.close()
        posix_ipc.unlink_semaphore(sem_name)
        c_manager.close()
        floor.close()
        remove()


def hot_loop(seconds: float) -> None:
    """Run the pair for ``seconds`` (as installed: the C hot path when built)."""
    m, pair = _hot_manager(_new_namespace())
    try:
        n = 0
        end = monotonic() + seconds
        while monotonic() < end:
            for _ in range(1000):
                pair(_NAME)
            n += 1000
        print(f"{n / seconds:,.0f} pairs/s")
    finally:
        m.unlink(force=True)
