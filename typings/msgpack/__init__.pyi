# Type stubs for the two functions of msgpack that shmctx uses (msgpack ships no types).
# Read only when shmctx itself is type-checked (see posix_ipc.pyi beside this folder).
# What unpackb returns is whatever the bytes encode: ``Any`` by nature.

from collections.abc import Callable
from typing import Any

from _typeshed import ReadableBuffer

def packb(o: Any, *, use_bin_type: bool = ..., use_single_float: bool = ...,
          strict_types: bool = ..., datetime: bool = ...,
          unicode_errors: str | None = ...,
          default: Callable[[Any], Any] | None = ...) -> bytes: ...
def unpackb(packed: ReadableBuffer, *, raw: bool = ..., use_list: bool = ...,
            strict_map_key: bool = ..., timestamp: int = ...,
            unicode_errors: str | None = ...,
            object_hook: Callable[[dict[Any, Any]], Any] | None = ...,
            max_buffer_size: int = ...) -> Any: ...
