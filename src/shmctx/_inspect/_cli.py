"""The command line: arguments, the command they select, and ``main``, which turns every
failure into one ``ctx-inspect: ...`` line and its exit code, never a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable

import msgpack
import posix_ipc

from .. import _shm
from .._errors import TableFormatError
from .._version import __version__
from ._check import check
from ._fail import EXIT_FORMAT, EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, Fail
from ._gc import DEFAULT_GRACE, gc
from ._model import SORT_KEYS, Doc, listing_doc, namespace_doc
from ._read import read
from ._render import Out, listing_lines, namespace_lines
from ._watch import DEFAULT_WATCH, watch

DEFAULT_TIMEOUT = 1.0  # --timeout: the longest ctx-inspect waits for a table lock


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ctx-inspect",
        description="List the shmctx namespaces of this host, show one namespace's "
                    "contexts and who holds them, check a table, or collect what dead "
                    "processes left behind. Read-only unless --gc --yes.",
        epilog="exit codes: 0 ok; 1 --check found violations; 2 usage error, unknown "
               "namespace or permission denied; 3 a table of another layout or garbage; "
               "75 --gc --yes found a lock busy past --timeout. See docs/inspect.md.",
    )
    p.add_argument("namespace", nargs="?", help="the namespace to show (default: list all)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON document on stdout")
    fmt.add_argument("--msgpack", action="store_true",
                     help="the same document as msgpack bytes on stdout")
    p.add_argument("--wide", action="store_true",
                   help="do not shorten long names to fit 100 columns")
    p.add_argument("--sort", choices=SORT_KEYS, default="name",
                   help="row order: name ascending, the others largest first")
    p.add_argument("--filter", metavar="GLOB", help="only names matching GLOB (fnmatch)")
    p.add_argument("--limit", metavar="N", type=_count, help="show at most N rows")
    p.add_argument("--watch", metavar="SECONDS", nargs="?", const=str(DEFAULT_WATCH),
                   help=f"refresh in place every SECONDS (default {DEFAULT_WATCH:g}) "
                        "until Ctrl-C, marking changes")
    act = p.add_mutually_exclusive_group()
    act.add_argument("--check", action="store_true",
                     help="check the table's invariants (all namespaces without NAMESPACE)")
    act.add_argument("--gc", action="store_true",
                     help="reclaim references of dead processes and remove orphans "
                          "(prints what it would do; acts only with --yes)")
    p.add_argument("--yes", action="store_true", help="with --gc: do it")
    p.add_argument("--timeout", metavar="SECONDS", type=_seconds, default=DEFAULT_TIMEOUT,
                   help="wait at most SECONDS for a table lock (default "
                        f"{DEFAULT_TIMEOUT:g}); past it a table is shown as an unlocked "
                        "snapshot, and --gc --yes does nothing and exits 75")
    p.add_argument("--grace", metavar="SECONDS", type=_seconds,
                   help="with --gc: leave an unused table younger than this alone, its "
                        f"creator may be about to attach (default {DEFAULT_GRACE:g})")
    return p


def _non_negative(kind: Callable[[str], float], what: str) -> Callable[[str], float]:
    """An argparse type: a finite number >= 0 of ``kind`` (int or float)."""
    def parse(text: str) -> float:
        try:
            v = kind(text)
        except ValueError:
            v = -1
        if not 0 <= v < float("inf"):
            raise argparse.ArgumentTypeError(f"expected {what} >= 0, got {text!r}")
        return v
    return parse


_count = _non_negative(int, "a count")
_seconds = _non_negative(float, "seconds")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = _parser()
    args = p.parse_args(argv)
    if args.watch is not None:
        given: str = args.watch
        try:
            args.watch = float(given)
        except ValueError:
            # `ctx-inspect --watch NS`: the optional SECONDS swallowed the namespace.
            if args.namespace is None and _shm.NAMESPACE_RE.fullmatch(given):
                args.namespace, args.watch = given, DEFAULT_WATCH
            else:
                p.error(f"--watch: expected seconds, got {given!r}")
        if not 0.05 <= args.watch < float("inf"):
            p.error(f"--watch: expected at least 0.05 seconds, got {args.watch:g}")
        for flag in ("json", "msgpack", "check", "gc"):
            if getattr(args, flag):
                p.error(f"--watch cannot be combined with --{flag}")
    if args.yes and not args.gc:
        p.error("--yes only applies to --gc")
    if args.grace is not None and not args.gc:
        p.error("--grace only applies to --gc")
    if args.grace is None:
        args.grace = DEFAULT_GRACE
    if args.namespace is not None and not _shm.NAMESPACE_RE.fullmatch(args.namespace):
        p.error(f"not a namespace name (1-64 characters of [A-Za-z0-9._-]): "
                f"{args.namespace!r}")
    return args


def _emit(args: argparse.Namespace, out: Out, doc: Doc, lines: list[str]) -> None:
    if args.json:
        out.stream.write(json.dumps(doc, indent=2) + "\n")
    elif args.msgpack:
        out.stream.flush()
        sys.stdout.buffer.write(msgpack.packb(doc, use_bin_type=True))
        sys.stdout.buffer.flush()
        return
    else:
        out.stream.write("".join(f"{ln}\n" for ln in lines))
    out.stream.flush()


def _run(args: argparse.Namespace, out: Out) -> int:
    if args.watch is not None:
        return watch(args, out)
    if args.check:
        doc, lines, code = check(args, out)
    elif args.gc:
        doc, lines, code = gc(args)
    elif args.namespace:
        doc = namespace_doc(read(args.namespace, args.timeout), args)
        lines, code = namespace_lines(out, doc, None, False), EXIT_OK
    else:
        doc = listing_doc(args)
        lines, code = listing_lines(out, doc, None, False, args.filter is not None), EXIT_OK
    _emit(args, out, doc, lines)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ctx-inspect`` console script; returns the exit code."""
    try:
        args = _parse(argv)
    except SystemExit as e:  # --help (0) or a usage error argparse has printed (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    out = Out(sys.stdout, args.wide)
    # The library logs what the repair path does (a lock takeover, say): show it plainly.
    logging.basicConfig(level=logging.WARNING, format="ctx-inspect: note: %(message)s")
    try:
        return _run(args, out)
    except Fail as f:
        print(f"ctx-inspect: {f}", file=sys.stderr)
        return f.code
    except TableFormatError as e:
        print(f"ctx-inspect: {e}", file=sys.stderr)
        return EXIT_FORMAT
    except (posix_ipc.PermissionsError, PermissionError) as e:
        print(f"ctx-inspect: permission denied: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`ctx-inspect | head`): say nothing more, and keep the
        # interpreter's final flush from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as e:  # never a traceback for a user
        print(f"ctx-inspect: unexpected error (a bug, please report it): "
              f"{type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_INTERNAL
