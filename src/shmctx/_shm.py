"""Named POSIX shared-memory objects and semaphores: names, creation, attachment.

Why not ``multiprocessing.shared_memory.SharedMemory``: on Python < 3.13 every instance,
even one that only attaches, registers with the resource tracker, which unlinks the
segment when *that* process exits (python/cpython#82300) -- a worker would destroy a
context its siblings still use; and its mode is hard-wired to 0600. ``posix_ipc`` opens
the same kernel objects (they appear in ``/dev/shm`` exactly as SharedMemory's do) with
an explicit mode and no tracker, and it is already our semaphore library.

Every name is derived from the namespace (validated: ``[A-Za-z0-9._-]{1,64}``) and from
numbers, never from a context name, and starts with ``shmctx@`` so operators and tests
can find them: ``shmctx@NS`` (table), ``sem.shmctx@NS@t`` (table lock),
``sem.shmctx@NS@s<k>`` (stripe locks), ``shmctx@NS@c<slot>.<inc>`` (a context's memory),
``sem.shmctx@NS@l<inc>`` (its ``ctx.lock``), ``sem.shmctx@NS@i<inc>`` (its init waiters).
``@`` cannot occur in a namespace, so one namespace's names never parse as another's.
"""

from __future__ import annotations

import errno
import mmap
import os
import re

import posix_ipc

from ._errors import ContextError, InvalidConfigError

SHM_DIR = "/dev/shm"
PREFIX = "shmctx@"
NAMESPACE_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
TAG_LEN = 12  # hex digits of the table id in every name but the table's own


def check_namespace(namespace: object) -> str:
    """``namespace`` if it is a valid namespace name, else ``InvalidConfigError``."""
    if not isinstance(namespace, str) or not NAMESPACE_RE.fullmatch(namespace):
        raise InvalidConfigError(
            f"namespace must be 1-64 characters of [A-Za-z0-9._-], got {namespace!r}"
        )
    return namespace


def table_name(ns: str) -> str:
    return f"/{PREFIX}{ns}"


def staging_name(ns: str, tag: str, pid: int) -> str:
    return f"/{PREFIX}{ns}@{tag}new{pid}"


def table_lock_name(ns: str, tag: str) -> str:
    return f"/{PREFIX}{ns}@{tag}t"


def stripe_name(ns: str, tag: str, k: int) -> str:
    return f"/{PREFIX}{ns}@{tag}s{k}"


def segment_name(ns: str, tag: str, slot: int, inc: int) -> str:
    return f"/{PREFIX}{ns}@{tag}c{slot}.{inc}"


def ctx_lock_name(ns: str, tag: str, inc: int) -> str:
    return f"/{PREFIX}{ns}@{tag}l{inc}"


def init_sem_name(ns: str, tag: str, inc: int) -> str:
    return f"/{PREFIX}{ns}@{tag}i{inc}"


def parse_object(ns: str, entry: str) -> tuple[str, str, int] | None:
    """Split a /dev/shm entry of namespace ``ns`` into (tag, kind, incarnation).

    kind is one of ``t s c l i new``; the number is the incarnation for ``c l i``, the
    creator's pid for ``new`` (a table being built), 0 otherwise.
    """
    body = entry.removeprefix("sem.")
    own = f"{PREFIX}{ns}@"
    if not body.startswith(own):
        return None
    rest = body[len(own):]
    tag, tail = rest[:TAG_LEN], rest[TAG_LEN:]
    if len(tag) != TAG_LEN or not tail:
        return None
    if tail == "t":
        return tag, tail, 0
    if tail.startswith("new"):
        return (tag, "new", int(tail[3:])) if tail[3:].isdigit() else None
    kind, num = tail[0], tail[1:]
    try:
        inc = int(num.rpartition(".")[2]) if kind == "c" else int(num) if kind in "li" else 0
    except ValueError:
        return None
    return tag, kind, inc


def public_tag(ns: str) -> str | None:
    """Tag of the table now published under namespace ``ns``'s name, if any."""
    from ._layout import H_TABLE_ID, H_TABLE_ID_OFF, HEADER_SIZE

    try:
        with open(host_path(table_name(ns)), "rb") as f:
            head = f.read(HEADER_SIZE)
    except OSError:
        return None
    if len(head) < HEADER_SIZE:
        return None
    return tag_of(H_TABLE_ID.unpack_from(head, H_TABLE_ID_OFF)[0])


def tag_of(table_id: int) -> str:
    """The tag in the names of a table's objects: the low 48 bits of its id, in hex."""
    return f"{table_id & 0xFFFFFFFFFFFF:0{TAG_LEN}x}"


def host_path(name: str, semaphore: bool = False) -> str:
    """Where the kernel object ``name`` shows in ``/dev/shm`` (Linux)."""
    return os.path.join(SHM_DIR, ("sem." if semaphore else "") + name.lstrip("/"))


def namespace_objects(ns: str) -> list[str]:
    """Every file in /dev/shm that belongs to namespace ``ns`` (table included)."""
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return []
    own = f"{PREFIX}{ns}"
    return sorted(
        e
        for e in entries
        if e.removeprefix("sem.") == own or e.removeprefix("sem.").startswith(own + "@")
    )


def remove_namespace_objects(ns: str) -> list[str]:
    """Remove every object of namespace ``ns`` from the host, whatever table it belongs
    to (for cleanups after the namespace's processes are gone). Returns what it removed;
    raises ``OSError`` for an object it may not remove."""
    removed = namespace_objects(ns)
    for entry in removed:
        remove_host_object(entry)
    return removed


def remove_host_object(entry: str) -> None:
    """Unlink a /dev/shm entry as listed by ``namespace_objects``."""
    try:
        if entry.startswith("sem."):
            posix_ipc.unlink_semaphore("/" + entry[4:])
        else:
            posix_ipc.unlink_shared_memory("/" + entry)
    except posix_ipc.ExistentialError:
        pass


def open_semaphore(name: str, mode: int, create: bool, initial: int = 1) -> posix_ipc.Semaphore:
    """Open (or with ``create``, create-or-open) a named semaphore with exactly ``mode``."""
    if not create:
        return posix_ipc.Semaphore(name)
    try:
        sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=mode, initial_value=initial)
    except posix_ipc.ExistentialError:
        return posix_ipc.Semaphore(name)
    _exact_mode(host_path(name, semaphore=True), mode)
    return sem


def create_semaphore(name: str, mode: int, initial: int = 1) -> posix_ipc.Semaphore:
    """Create a semaphore, replacing a stale one of the same name (callers hold the
    lock that makes such a stale object unreachable by anyone else)."""
    try:
        sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=mode, initial_value=initial)
    except posix_ipc.ExistentialError:
        unlink_semaphore(name)
        sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=mode, initial_value=initial)
    _exact_mode(host_path(name, semaphore=True), mode)
    return sem


def unlink_semaphore(name: str) -> None:
    try:
        posix_ipc.unlink_semaphore(name)
    except posix_ipc.ExistentialError:
        pass


def unlink_segment(name: str) -> None:
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass


def _exact_mode(path: str, mode: int) -> None:
    # shm_open and sem_open apply the umask; the mode a user asked for is the mode.
    if mode != 0o600:
        try:
            os.chmod(path, mode)
        except OSError:
            pass


def create_segment(name: str, size: int, mode: int, *, what: str) -> mmap.mmap:
    """Create segment ``name`` of ``size`` bytes, its pages reserved up front.

    ``posix_fallocate`` turns a full ``/dev/shm`` (Docker's default is 64 MiB) into a
    clear error now instead of a SIGBUS when a page is first touched.
    """
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=mode, size=0)
    try:
        if mode != 0o600:
            os.fchmod(shm.fd, mode)
        try:
            os.posix_fallocate(shm.fd, 0, size)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                free = _free_bytes()
                raise ContextError(
                    f"not enough shared memory for {what}: {size} bytes requested, "
                    f"{free} bytes free in {SHM_DIR}"
                ) from e
            raise
        return mmap.mmap(shm.fd, size)
    except BaseException:
        unlink_segment(name)
        raise
    finally:
        shm.close_fd()


def attach_segment(name: str) -> mmap.mmap:
    """Map an existing segment; raises ``posix_ipc.ExistentialError`` if it is gone."""
    shm = posix_ipc.SharedMemory(name)
    try:
        size = os.fstat(shm.fd).st_size
        return mmap.mmap(shm.fd, size)
    finally:
        shm.close_fd()


def _free_bytes() -> int:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize
