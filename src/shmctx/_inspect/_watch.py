"""``--watch``: redraw a view in place every few seconds, marking what changed since the
last refresh, until Ctrl-C."""

from __future__ import annotations

import argparse
import shutil
import time

from ._fail import EXIT_OK, Fail
from ._model import State, listing_doc, listing_state, namespace_doc, namespace_state
from ._read import read
from ._render import Out, listing_lines, namespace_lines

DEFAULT_WATCH = 2.0

_HOME, _CLEAR_EOL, _CLEAR_EOS = "\x1b[H", "\x1b[K", "\x1b[J"
_HIDE_CURSOR, _SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"


def watch(args: argparse.Namespace, out: Out) -> int:
    """Redraw in place (cursor home, clear each line's rest and the screen's rest, never
    a full clear: no flicker) every ``args.watch`` seconds until Ctrl-C."""
    stream = out.stream
    prev: State | None = None
    if out.tty:
        stream.write(_HIDE_CURSOR)
    try:
        while True:
            lines, prev = _frame(args, out, prev)
            if out.tty:  # a frame taller than the screen would scroll, and so flicker
                # Room for the title, its blank line, and the line the cursor ends on.
                lines = lines[: max(1, shutil.get_terminal_size().lines - 3)]
            title = out.line([(f"ctx-inspect {args.namespace or '(all namespaces)'}  every "
                               f"{args.watch:g}s  {time.strftime('%H:%M:%S')}  "
                               "Ctrl-C quits", "dim")])
            stream.write(_HOME + "".join(f"{ln}{_CLEAR_EOL}\n" for ln in [title, "", *lines])
                         + _CLEAR_EOS)
            stream.flush()
            time.sleep(args.watch)  # the refresh period itself, not a synchronisation
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        if out.tty:
            stream.write(_SHOW_CURSOR)
        stream.flush()


def _frame(args: argparse.Namespace, out: Out,
           prev: State | None) -> tuple[list[str], State | None]:
    if not args.namespace:
        d = listing_doc(args)
        return (listing_lines(out, d, prev, True, args.filter is not None),
                listing_state(d))
    try:
        d = namespace_doc(read(args.namespace, args.timeout), args)
    except Fail as f:  # keep watching: the namespace may come (back)
        return [out.line([(str(f), "dead")])], prev
    return namespace_lines(out, d, prev, True), namespace_state(d)
