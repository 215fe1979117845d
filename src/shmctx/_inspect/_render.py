"""Text rendering of the documents: where the text goes and how it may look (``Out``:
colour, glyphs, width), display widths, aligned columns that shorten to fit, and the two
views, the namespace view and the namespace list."""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass
from typing import Any, TextIO

from ._model import Doc, State, context_key, listing_key

WIDTH = 100

_ANSI = {"bold": "1", "dim": "2", "dead": "31", "warn": "33", "new": "32", "changed": "36"}

Cell = list[tuple[str, str]]  # (text, style) segments


class Out:
    """Where text goes and how it may look: colour, glyphs, width."""

    def __init__(self, stream: TextIO, wide: bool) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.colour = self.tty and not os.environ.get("NO_COLOR")
        self.width: int | None = None if wide else WIDTH
        enc = getattr(stream, "encoding", None) or "ascii"
        try:
            "†…".encode(enc)
            self.dead, self.ellipsis = "†", "…"
        except (UnicodeEncodeError, LookupError):
            self.dead, self.ellipsis = "!", "~"

    def paint(self, text: str, style: str) -> str:
        if not self.colour or not style or not text:
            return text
        return f"\x1b[{_ANSI[style]}m{text}\x1b[0m"

    def line(self, cell: Cell) -> str:
        """One free-text line, shortened to the width."""
        if self.width is not None:
            cell = _clip(cell, self.width, self.ellipsis)
        return "".join(self.paint(t, s) for t, s in cell)


def _char_width(c: str) -> int:
    if unicodedata.combining(c):
        return 0
    return 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1


def _width(text: str) -> int:
    return sum(_char_width(c) for c in text)


def _printable(text: str) -> str:
    """A name as it can be shown on a terminal: control characters escaped, so a name
    cannot move the cursor or change colours."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _clip(cell: Cell, width: int, ellipsis: str) -> Cell:
    if sum(_width(t) for t, _s in cell) <= width:
        return cell
    out: Cell = []
    budget = width - 1
    for text, style in cell:
        w = _width(text)
        if w <= budget:
            out.append((text, style))
            budget -= w
            continue
        cut: list[str] = []
        for c in text:
            budget -= _char_width(c)
            if budget < 0:
                break
            cut.append(c)
        out.append(("".join(cut), style))
        break
    out.append((ellipsis, "dim"))
    return out


@dataclass
class _Col:
    title: str
    right: bool = False  # right-aligned (numbers)
    shrink: int = 0  # narrowest width it may be shortened to; 0 = never shortened
    rank: int = 0  # shrinkable columns are shortened in rank order, lowest first


def _grid(out: Out, cols: list[_Col], rows: list[list[Cell]]) -> list[str]:
    """Aligned columns, two spaces apart; shrinkable columns are shortened (with an
    ellipsis), in rank order, until the line fits the width."""
    widths = [max([len(c.title)] + [sum(_width(t) for t, _s in r[i]) for r in rows])
              for i, c in enumerate(cols)]
    if out.width is not None:
        excess = sum(widths) + 2 * (len(cols) - 1) - out.width
        for i in sorted((i for i, c in enumerate(cols) if c.shrink), key=lambda i: cols[i].rank):
            cut = max(0, min(excess, widths[i] - cols[i].shrink))
            widths[i] -= cut
            excess -= cut

    def fit(cell: Cell, i: int) -> str:
        cell = _clip(cell, widths[i], out.ellipsis)
        pad = " " * (widths[i] - sum(_width(t) for t, _s in cell))
        text = "".join(out.paint(t, s) for t, s in cell)
        return pad + text if cols[i].right else text + pad

    head = [[(c.title, "bold")] for c in cols]
    return ["  ".join(fit(cell, i) for i, cell in enumerate(r)).rstrip()
            for r in [head, *rows]]


def _human(n: int | None) -> str:
    """Bytes in binary units: 512 B, 1.5 KiB, 64.0 MiB."""
    if n is None:
        return "-"
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    value, i = float(n), 0
    while value >= 1023.95 and i < len(units) - 1:
        value /= 1024
        i += 1
    return f"{n} B" if i == 0 else f"{value:.1f} {units[i]}"


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0.0, seconds)
    if s < 10:
        return f"{s:.1f}s"
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _secs(v: float, zero: str) -> str:
    return f"{v:g}s" if v else zero


def _pid(out: Out, pid: int | None, alive: bool | None) -> Cell:
    if not pid:
        return [("-", "dim")]
    return [(str(pid), "")] if alive else [(f"{pid}{out.dead}", "dead")]


def _change(prev: State | None, key: object, now: tuple[int, object]) -> Cell:
    """The CHG cell of --watch: a new row, the change of its references since the last
    refresh, or ``~`` when something else about it changed."""
    if prev is None:
        return []
    if key not in prev:
        return [("new", "new")]
    delta = now[0] - prev[key][0]
    if delta:
        return [(f"{delta:+d}", "changed")]
    return [("~", "changed")] if now[1] != prev[key][1] else []


def _state(c: Doc) -> Cell:
    """The STATE cell: the slot's state, or what the version is when it is not simply
    current. A superseded version is always ready and a pending one always being created
    on a sound table; any other pairing (damage, for --check) is shown as it is."""
    state, superseded, pending = c["state"], c["superseded"], c["pending"]
    if superseded and not pending and state == "ready":
        return [("superseded", "dim")]
    if pending and not superseded and state == "creating":
        return [("pending", "warn")]
    marks = [w for w, on in (("superseded", superseded), ("pending", pending)) if on]
    return [("+".join([state, *marks]), "" if state == "ready" and not marks else "warn")]


def _version(c: Doc) -> str:
    """The VER cell: a pending version has no number until it becomes current."""
    return str(c["version"]) if c["version"] else "-"


def _gone(name: str, key: tuple[int, Any], names: set[str]) -> str:
    """How the footer of --watch names a row that went away (``key``: its
    ``context_key``): by name, with its version when that name has others, so that an
    older version freed by its last holder is not read as the name itself gone."""
    _holders, version, _superseded, pending = key[1]
    label = _printable(name)
    if pending:
        return f"{label} (pending)"
    return f"{label} v{version}" if name in names or version > 1 else label


def namespace_lines(out: Out, d: Doc, prev: State | None, watching: bool) -> list[str]:
    """The namespace view. ``watching``: add the CHG column, comparing with ``prev`` (the
    state of the last refresh, None on the first)."""
    t, cfg, u, lock, sw = d["table"], d["config"], d["usage"], d["lock"], d["sweeper"]
    lines = [
        out.line([("namespace ", "bold"), (d["namespace"], "bold"),
                  (f"  {t['path']}  {_human(t['bytes'])}  mode {t['mode']}  "
                   f"created {_dur(t['age'])} ago", "")]
                 + ([("  UNLINKED", "warn")] if t["unlinked"] else [])),
        out.line([("config    ", "bold"), (
            f"max_references {cfg['max_references'] or 'unlimited'}  "
            f"max_idle_time {_secs(cfg['max_idle_time'], 'never')}  "
            f"cleanup_interval {_secs(cfg['cleanup_interval'], 'off')}  "
            f"lock_timeout {_secs(cfg['lock_timeout'], '-')}", "")]),
        out.line([("usage     ", "bold"), (
            f"contexts {u['contexts']}/{u['capacity']}  "
            f"processes {u['processes']}/{u['max_processes']}", "")]
            + ([(f" ({u['processes_dead']} dead)", "dead")] if u["processes_dead"] else [])
            + [(f"  references {u['references']}", "")]
            + ([(f" ({u['references_dead']} held by dead processes)", "dead")]
               if u["references_dead"] else [])),
        # A line of its own: the usage line is long already, and what it ends with (the
        # references of dead processes) must not be the part cut to fit the width.
        out.line([("memory    ", "bold"), (f"{_human(u['context_bytes'])} in the contexts' "
                                           "segments", "")]
                 + ([(f" ({_human(u['superseded_bytes'])} of it in superseded versions)",
                      "")] if u["superseded_bytes"] else [])),
    ]
    lock_cell: Cell = [("lock      ", "bold")]
    if lock["owner_pid"]:
        lock_cell += [("held by pid ", ""), *_pid(out, lock["owner_pid"], lock["owner_alive"])]
        lock_cell += [(" (dead: waiters take it over)", "dead")] if not lock["owner_alive"] \
            else [(" (alive)", "")]
    else:
        lock_cell += [("free" if d["snapshot"]["locked"] else "no owner recorded", "")]
    lock_cell += [("   sweeper ", "bold")]
    if sw["pid"]:
        lock_cell += [("pid ", ""), *_pid(out, sw["pid"], sw["alive"])]
        lock_cell += [(f" (last sweep {_dur(sw['last_sweep_ago'])} ago)", "")] if sw["alive"] \
            else [(" (dead: the next process to sweep takes the lead)", "dead")]
    else:
        lock_cell += [("none", "dim")]
    lines.append(out.line(lock_cell))
    if not d["snapshot"]["locked"]:
        lines.append(out.line([(f"UNLOCKED SNAPSHOT: {d['snapshot']['unlocked_reason']}; "
                                "the copy may catch an update half done", "warn")]))
    lines.append("")
    cols = [_Col("NAME", shrink=14, rank=1), _Col("KIND"), _Col("VER", right=True),
            _Col("STATE"), _Col("REFS", right=True), _Col("HOLDERS", shrink=10, rank=3),
            _Col("SIZE", right=True), _Col("IDLE", right=True), _Col("AGE", right=True),
            _Col("INC", right=True), _Col("PARENT", shrink=6, rank=2)]
    if watching:
        cols.insert(0, _Col("CHG"))
    rows: list[list[Cell]] = []
    any_dead = False
    for c in d["contexts"]:
        holders: Cell = []
        # Dead holders first: what a shortened cell loses are live ones.
        for h in sorted(c["holders"], key=lambda h: h["alive"]):
            if holders:
                holders.append((" ", ""))
            holders.append((f"{h['pid']}:{h['count']}" + ("" if h["alive"] else out.dead),
                            "" if h["alive"] else "dead"))
            any_dead |= not h["alive"]
        row = [[(_printable(c["name"]), "")], [(c["kind"], "")], [(_version(c), "")],
               _state(c), [(str(c["refs"]), "")], holders or [("-", "dim")],
               [(_human(c["size"]), "")], [(_dur(c["idle"]), "")], [(_dur(c["age"]), "")],
               [(str(c["incarnation"]), "")],
               [(_printable(c["parent"]), "")] if c["parent"] else [("-", "dim")]]
        if watching:
            key = (c["name"], c["incarnation"])
            row.insert(0, _change(prev, key, context_key(c)))
        rows.append(row)
    lines += _grid(out, cols, rows)
    if not d["contexts"]:
        lines.append(out.line([("(no contexts" + (" match --filter)" if u["contexts"] else ")"),
                                "dim")]))
    if d["matched"] > len(d["contexts"]):
        lines.append(out.line([(f"{out.ellipsis} {d['matched'] - len(d['contexts'])} more "
                                "(--limit)", "dim")]))
    if prev is not None:
        now = {(c["name"], c["incarnation"]) for c in d["contexts"]}
        names = {c["name"] for c in d["contexts"]}
        gone = sorted(_gone(k[0], prev[k], names) for k in prev if k not in now)
        if gone:
            lines.append(out.line([("gone since the last refresh: " + ", ".join(gone),
                                    "changed")]))
    if any_dead:
        lines.append(out.line([(f"{out.dead} = dead process ('ctx-inspect --gc "
                                f"{d['namespace']}' reclaims its references)", "dim")]))
    return lines


def listing_lines(out: Out, d: Doc, prev: State | None, watching: bool,
                  filtered: bool) -> list[str]:
    """The namespace list. ``watching`` and ``prev``: as for ``namespace_lines``;
    ``filtered``: --filter was given (an empty list then says so)."""
    cols = [_Col("NAMESPACE", shrink=16, rank=1), _Col("CONTEXTS", right=True),
            _Col("REFS", right=True), _Col("PROCS", right=True), _Col("SWEEPER"),
            _Col("SIZE", right=True), _Col("STATUS", shrink=10, rank=2)]
    if watching:
        cols.insert(0, _Col("CHG"))
    rows: list[list[Cell]] = []
    for n in d["namespaces"]:
        if n["error"]:
            status: Cell = [(n["error"], "dead")]
        elif not n["locked"]:
            status = [(f"unlocked snapshot: {n['unlocked_reason']}", "warn")]
        else:
            status = [("ok", "")]
        procs: Cell = [("-", "dim")] if n["processes"] is None else [(str(n["processes"]), "")]
        if n["processes_dead"]:
            procs.append((f" ({n['processes_dead']}{out.dead})", "dead"))
        refs: Cell = [("-", "dim")] if n["references"] is None else [(str(n["references"]), "")]
        row = [[(n["namespace"], "")],
               [("-", "dim")] if n["contexts"] is None else [(str(n["contexts"]), "")],
               refs, procs, _pid(out, n["sweeper"]["pid"], n["sweeper"]["alive"]),
               [(_human(n["bytes"]), "")], status]
        if watching:
            row.insert(0, _change(prev, n["namespace"], listing_key(n)))
        rows.append(row)
    if not d["namespaces"] and not d["tableless"]:
        return [out.line([("no namespace matches --filter" if filtered
                           else "no shmctx namespaces on this host", "dim")])]
    lines = _grid(out, cols, rows)
    if d["matched"] > len(d["namespaces"]):
        lines.append(out.line([(f"{out.ellipsis} {d['matched'] - len(d['namespaces'])} more "
                                "(--limit)", "dim")]))
    for t in d["tableless"]:
        lines.append(out.line([(f"{t['namespace']}: no table, {len(t['objects'])} orphaned "
                                f"object(s) ('ctx-inspect --gc {t['namespace']}')", "warn")]))
    return lines
