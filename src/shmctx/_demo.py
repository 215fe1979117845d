"""``python -m shmctx demo``: a supervisor and several workers sharing one context.

The parent is the supervisor: it creates the namespace and runs the sweeper. Each worker
process gets the shared context, adds to a counter in its memory under ``ctx.lock``,
records itself in a per-worker cell, returns the context; then it holds one reference
while the parent shows the table (as ``ctx-inspect`` does), and returns it. The parent
shows the table again, unlinks the namespace and shows that nothing is left in
``/dev/shm``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import struct
import sys
import uuid
from typing import TYPE_CHECKING

from . import _inspect
from ._config import ContextConfig, MemoryContextConfig
from ._manager import ContextManager
from ._shm import namespace_objects

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess
    from multiprocessing.synchronize import Event, Semaphore

_COUNTER = struct.Struct("<Q")
_CELL = struct.Struct("<IQ")  # pid, increments done
_ROUNDS = 200


def _worker(namespace: str, index: int, holding: Semaphore, release: Event) -> None:
    with ContextManager(namespace=namespace) as m:
        for _ in range(_ROUNDS):
            ctx = m.get_context("demo.shared")
            with ctx.lock:  # read-modify-write across processes needs the context's lock
                (n,) = _COUNTER.unpack_from(ctx.buf, 0)
                _COUNTER.pack_into(ctx.buf, 0, n + 1)
            off = _COUNTER.size + index * _CELL.size
            done = _CELL.unpack_from(ctx.buf, off)[1]
            _CELL.pack_into(ctx.buf, off, os.getpid(), done + 1)
            m.return_context(ctx)
        with m.context("demo.shared"):  # hold one reference while the table is shown
            holding.release()
            release.wait()


def run(workers: int = 4, start_method: str = "spawn") -> int:
    namespace = f"demo-{uuid.uuid4().hex[:8]}"
    size = _COUNTER.size + workers * _CELL.size
    print(f"supervisor pid {os.getpid()}: namespace {namespace!r}, {workers} workers "
          f"({start_method}), {_ROUNDS} get/increment/return rounds each")
    config = ContextConfig(cleanup_interval=0.5, max_idle_time=60.0, max_references=0)
    with ContextManager(config, namespace=namespace, sweeper=True) as sup:
        try:
            ctx, existed = sup.get_or_create_context(
                "demo.shared", MemoryContextConfig(size=size),
                init=lambda c: c.buf.__setitem__(slice(0, size), bytes(size)),
            )
            print(f"created context {ctx.name!r} ({ctx.size} bytes), existed={existed}")
            mpc = mp.get_context(start_method)
            holding, release = mpc.Semaphore(0), mpc.Event()
            # Every start method's context has Process, but typeshed declares it on each
            # context class, not on the BaseContext that get_context(str) returns.
            procs: list[BaseProcess] = [
                mpc.Process(target=_worker, args=(namespace, i, holding, release))  # type: ignore[attr-defined]
                for i in range(workers)]
            for p in procs:
                p.start()
            for _ in procs:
                holding.acquire()
            print("\ntable while every worker holds one reference (ctx-inspect):")
            show_table(namespace)
            release.set()
            for p in procs:
                p.join()
            failed = [p.exitcode for p in procs if p.exitcode != 0]
            counter = _COUNTER.unpack_from(ctx.buf, 0)[0]
            print(f"\nshared counter = {counter} (expected {workers * _ROUNDS})")
            for i in range(workers):
                pid, done = _CELL.unpack_from(ctx.buf, _COUNTER.size + i * _CELL.size)
                print(f"  worker {i}: pid {pid}, {done} rounds, wrote into the same memory")
            sup.return_context(ctx)
            print("\ntable after the workers returned their references and exited:")
            show_table(namespace)
            problems = sup.check()
            print(f"\ncheck(): {problems or 'sound'}")
        finally:
            sup.unlink(force=True)
    left = namespace_objects(namespace)
    print(f"after unlink(): objects of {namespace!r} left in /dev/shm: {left or 'none'}")
    ok = not failed and counter == workers * _ROUNDS and not left and not problems
    return 0 if ok else 1


def show_table(namespace: str) -> None:
    sys.stdout.flush()
    _inspect.main([namespace])
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m shmctx")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="supervisor + workers sharing one context")
    demo.add_argument("--workers", type=int, default=4)
    demo.add_argument("--start-method", choices=["spawn", "fork", "forkserver"], default="spawn")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    return run(args.workers, args.start_method)


if __name__ == "__main__":
    sys.exit(main())
