"""``ctx-inspect``: see and repair the namespaces of this host from the shell.

It is the ``ipcs`` of shmctx: list the namespaces, show one namespace's contexts and who
holds them, check the table's invariants, and collect what dead processes left behind.

Read-only unless ``--gc --yes``. A table is read by holding its table lock only while
copying its bytes (as a recorded owner: the one write, so that waiters see a live holder)
and decoding the copy afterwards. If the lock cannot be had within ctx-inspect's own
``--timeout`` (busy, or wedged by a dead holder) the bytes are copied without it and the
result is marked as an unlocked snapshot: an inspection tool must still work on the tables
that most need inspecting. The table's own ``lock_timeout`` is never waited for: it is a
value in the file being inspected, and a damaged or hostile file may say anything.
Reading never takes a lock over from a dead owner and never attaches as a process of the
namespace (a ``ContextManager`` would register a process entry); only ``--gc --yes``, the
repair path, does either.

What a read costs is bounded by the file, never by what its header claims: the header is
checked (``header_problem``: the geometry must be the one the layout computes for its
capacity, and must add up to the file's real size) before anything is sized from it, and
the table is copied with ``pread``, not through a mapping. A mapping would fault in a page
for every hole of the sparse table (SIGBUS on a full ``/dev/shm``) and for every byte of a
file shrunk meanwhile (SIGBUS); ``pread`` reads holes as zeros and a shrunk file as a short
copy, which the decoder then rejects. The only page mapped is the first, for the lock's
owner record: it holds the magic, so it has memory behind it.

The modules, each importing only those listed before it:

- ``_fail``: the exit codes, and the error that carries one to the user.
- ``_namespaces``: which namespaces the host has, and the one per-namespace loop that the
  listing, ``--check`` and ``--gc`` share.
- ``_read``: reading one table out of band (open, header check, locked or unlocked copy).
- ``_model``: the JSON/msgpack documents, and what ``--watch`` compares between refreshes.
- ``_render``: the text views of the documents (colour, widths, columns).
- ``_check``, ``_gc``, ``_watch``: the commands of those flags.
- ``_cli``: arguments, and ``main``.

Output formats, the JSON schema and the exit codes are documented in ``docs/inspect.md``.
"""

from ._cli import main

__all__ = ["main"]
