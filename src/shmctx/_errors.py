"""Every error shmctx raises on purpose, under one base class.

The seven kinds of the Go ``ContextManager`` keep their names (with the Python
``Error`` suffix); ``TableFullError`` and ``TableFormatError`` are the two that a
fixed-size, shared table adds; ``ForeignObjectError`` is the refusal of an object
another user owns.
"""

from __future__ import annotations

__all__ = [
    "ContextError",
    "ContextNotFoundError",
    "ContextInUseError",
    "InvalidContextTypeError",
    "ContextClosedError",
    "ContextManagerClosedError",
    "MaxReferencesReachedError",
    "InvalidConfigError",
    "TableFullError",
    "TableFormatError",
    "ForeignObjectError",
]


class ContextError(Exception):
    """Base class of every shmctx error."""


class ContextNotFoundError(ContextError, KeyError):
    """No context of that name exists in the namespace."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ContextInUseError(ContextError):
    """The context (or namespace) still has references and ``force`` was not given."""


class InvalidContextTypeError(ContextError, TypeError):
    """A context name or handle is not of an acceptable type or form."""


class ContextClosedError(ContextError):
    """The context behind a handle was returned, closed, swept or re-created."""


class ContextManagerClosedError(ContextError):
    """The manager was closed (or its namespace unlinked); it can do nothing more."""


class MaxReferencesReachedError(ContextError):
    """The context already holds ``max_references`` live references."""


class InvalidConfigError(ContextError, ValueError):
    """A configuration value is invalid, or conflicts with the existing table or context."""


class TableFullError(ContextError):
    """No slot is free and no unreferenced context can be evicted to make room."""


class TableFormatError(ContextError):
    """A namespace's table is not ours, is another layout version, or is damaged."""


class ForeignObjectError(ContextError, PermissionError):
    """An object of the namespace in ``/dev/shm`` is owned by a user who is neither this
    process's effective uid nor one of the manager's ``trusted_uids``; it is refused
    rather than read, written, waited on or replaced. ``filename`` is its path,
    ``owner_uid`` its owner."""

    owner_uid: int | None = None

    def __str__(self) -> str:  # the message names the path already; no "[Errno 1]"
        return str(self.strerror)
