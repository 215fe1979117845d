"""Exit codes, and the error that carries one to the user."""

from __future__ import annotations

EXIT_OK = 0
EXIT_VIOLATIONS = 1
EXIT_USAGE = 2  # also: unknown namespace, permission denied
EXIT_FORMAT = 3  # a table of another layout, or garbage
EXIT_BUSY = 75  # --gc --yes: a lock stayed busy past --timeout, nothing done (EX_TEMPFAIL)
EXIT_INTERNAL = 70  # a bug in ctx-inspect (EX_SOFTWARE)


class Fail(Exception):
    """An error meant for the user: a message and the exit code it ends with."""

    def __init__(self, code: int, message: str, brief: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.brief = brief or message  # the same without naming the namespace


class Unknown(Fail):
    """No such namespace (or it vanished while being looked at)."""
