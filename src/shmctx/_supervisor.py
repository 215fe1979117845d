"""``ctx-supervisor``: run a namespace's sweeper in the foreground.

For multiprocessing pools, systemd units and containers whose parent is not Python or
should not host the sweeper. It takes the lead from a dead sweeper, logs what each sweep
did, and exits cleanly on SIGTERM/SIGINT (optionally unlinking the namespace).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from ._config import ContextConfig
from ._errors import ContextError
from ._manager import ContextManager

log = logging.getLogger("shmctx.supervisor")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ctx-supervisor",
        description="Sweep a shmctx namespace: reclaim references of dead processes, close "
        "idle contexts, remove orphans. Creates the namespace if it does not exist.",
    )
    p.add_argument("--namespace", "-n", required=True)
    p.add_argument("--interval", type=float, default=None,
                   help="seconds between sweeps (default: the namespace's cleanup_interval)")
    p.add_argument("--unlink-on-exit", action="store_true",
                   help="remove the namespace from the host when stopped")
    p.add_argument("--max-idle-time", type=float, default=None,
                   help="for a new namespace: seconds before an unreferenced context is closed")
    p.add_argument("--max-references", type=int, default=None,
                   help="for a new namespace: references per context (0 = unlimited)")
    p.add_argument("--capacity", type=int, default=None, help="for a new namespace: slots")
    p.add_argument("--mode", type=lambda s: int(s, 8), default=None,
                   help="for a new namespace: permission bits in octal (default 600)")
    p.add_argument("--quiet", "-q", action="store_true", help="log warnings only")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if args.interval is not None and not args.interval > 0:
        print("ctx-supervisor: --interval must be > 0", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    overrides = {k: v for k, v in (("max_idle_time", args.max_idle_time),
                                   ("max_references", args.max_references),
                                   ("capacity", args.capacity)) if v is not None}
    try:
        config = ContextConfig(**overrides) if overrides else None
        m = ContextManager(config, namespace=args.namespace, sweeper=False, mode=args.mode)
    except (ContextError, PermissionError) as e:
        print(f"ctx-supervisor: {e}", file=sys.stderr)
        return 2
    log.info("supervising namespace %r (pid %d)", args.namespace, os.getpid())
    try:
        m.supervise(stop, args.interval)
    except ContextError as e:
        print(f"ctx-supervisor: {e}", file=sys.stderr)
        return 1
    finally:
        try:
            if args.unlink_on_exit:
                m.unlink(force=True)
                log.info("namespace %r unlinked", args.namespace)
            else:
                m.close()
        except ContextError as e:
            log.warning("while shutting down: %s", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
