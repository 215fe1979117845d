"""Types of the C hot path, ``_speedups.c``: what its module, method and type tables export.

The C module ships no type information of its own, so type checkers read this file
instead; keep it in step with ``module_methods``, ``HotPath_methods`` and
``HotPath_init``'s keyword list there.
"""

from collections.abc import Callable
from typing import Any, Final, TypeVar, final

from _typeshed import WriteableBuffer

from ._context import HandleOwner, MemoryContext, _Mapped

_F = TypeVar("_F", bound=Callable[..., Any])

# The table layout this build reads and writes (``_layout.FINGERPRINT`` when it matches).
LAYOUT_FINGERPRINT: Final[int]

@final  # the C type cannot be subclassed
class HotPath:
    """The get/return hot path of one ContextManager, in C."""

    def __init__(
        self,
        owner: HandleOwner,
        table: WriteableBuffer,
        sem_names: list[str],
        max_refs: int,
        mapped: dict[str, _Mapped],
        handle_type: type[MemoryContext],
        # The slot descriptors of _owner, _mapped, _pid, _returned and _view.
        handle_fields: tuple[object, object, object, object, object],
        failpoints: dict[str, Any],
        dropped: list[tuple[_Mapped, int]],
    ) -> None: ...
    def try_get(self, name: str, /) -> MemoryContext | None:
        """Get steps G1-G8 (_hotpath.py): a handle, or None to defer."""
    def try_return(self, ctx: MemoryContext, /) -> bool:
        """Return steps R1-R6 (_hotpath.py): True if done, False to defer."""
    def enable(self, pid: int, start: int, row_off: int, /) -> None:
        """This process's entry is registered; its reference counts are the row at
        row_off."""
    def disable(self) -> None:
        """Defer every call to Python (after fork, before registering)."""
    def close(self) -> None:
        """Defer every call to Python for good; let go of the table and semaphores."""

def front(method: _F, /) -> _F:
    """``method`` (get_or_create_context, get_context or return_context of
    ContextManager) with the C hot path in front of it: a method descriptor that calls
    like ``method``."""

def install_finalizer(
    handle_type: type[MemoryContext],
    fields: tuple[object, object, object, object],
    /,
) -> None:
    """Put the C finalizer of unreturned handles in place of ``handle_type.__del__``;
    ``fields``: the slot descriptors of _returned, _owner, _mapped and _pid."""
