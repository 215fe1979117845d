"""shmctx: named, reference-counted shared-memory contexts for the processes of one host.

Every process that opens the same namespace gets and returns contexts directly through
one shared table; there is no server. See ``docs/architecture.md``.
"""

from ._config import (
    DEFAULT_CLEANUP_INTERVAL,
    DEFAULT_LOCK_TIMEOUT,
    DEFAULT_MAX_IDLE_TIME,
    DEFAULT_MAX_REFERENCES,
    ContextConfig,
    MemoryContextConfig,
)
from ._context import ContextInfo, MemoryContext, SweepReport
from ._errors import (
    ContextClosedError,
    ContextError,
    ContextInUseError,
    ContextManagerClosedError,
    ContextNotFoundError,
    ForeignObjectError,
    InvalidConfigError,
    InvalidContextTypeError,
    MaxReferencesReachedError,
    TableFormatError,
    TableFullError,
)
from ._manager import ContextManager
from ._service import SERVICE_DEFAULTS
from ._version import __version__

__all__ = [
    "__version__",
    "ContextManager",
    "ContextConfig",
    "MemoryContextConfig",
    "MemoryContext",
    "ContextInfo",
    "SweepReport",
    "DEFAULT_MAX_REFERENCES",
    "DEFAULT_MAX_IDLE_TIME",
    "DEFAULT_CLEANUP_INTERVAL",
    "DEFAULT_LOCK_TIMEOUT",
    "SERVICE_DEFAULTS",
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
