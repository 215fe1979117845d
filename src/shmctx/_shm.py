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
import logging
import mmap
import os
import pwd
import re
import resource
from collections.abc import Collection, Generator
from contextlib import contextmanager

import posix_ipc

from ._errors import ContextError, ForeignObjectError, InvalidConfigError

log = logging.getLogger("shmctx.shm")

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


# --- ownership --------------------------------------------------------------------
#
# Every object of a namespace is used only if its owner is this process's effective uid
# or a uid the manager was told to trust: a stranger who pre-creates a namespace's names
# (mode 0666, a valid table) must not have its values read as ours, nor its semaphores
# waited on or posted. The owner is read with fstat on the descriptor we go on to use,
# where there is one (the table, segments): no window between the check and the use.
# glibc's sem_open gives no descriptor, so a semaphore's name is stat'ed just before and
# just after the open and both must show the same trusted file. For the name to lead to
# another file at the open in between, whoever owns the trusted file must remove it in
# that window (``/dev/shm`` is sticky: nobody else may remove or rename over it), and its
# inode number must come back within the window (tmpfs does not reuse inode numbers
# short of 2**32 creations); both are beyond a stranger's reach.


def describe_uid(uid: int) -> str:
    """``uid 1001 (alice)``, or ``uid 1001`` if no user has that uid."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (KeyError, OverflowError):
        return f"uid {uid}"


def owner_problem(uid: int, trusted: Collection[int] = ()) -> str:
    """Why an object owned by ``uid`` must not be used by this process, or '' if it may:
    it may if ``uid`` is this process's effective uid or in ``trusted``. ``ctx-inspect``
    calls this to show a foreign table without trusting it."""
    euid = os.geteuid()
    if uid == euid or uid in trusted:
        return ""
    return (f"owned by {describe_uid(uid)}, not by this process's user ({describe_uid(euid)}) "
            "nor by a trusted uid")


def check_owner(st: os.stat_result, path: str, what: str, trusted: Collection[int]) -> None:
    """Raise ``ForeignObjectError`` unless ``st`` (of ``path``, which is ``what``) is owned
    by a user this process may trust."""
    problem = owner_problem(st.st_uid, trusted)
    if problem:
        e = ForeignObjectError(
            errno.EPERM,
            f"refusing {what} ({path}): it is {problem}. If it is left over, remove it; to "
            f"share a namespace between users on purpose, pass trusted_uids=[{st.st_uid}] "
            "to ContextManager",
            path,
        )
        e.owner_uid = st.st_uid
        raise e


def _refuse_if_foreign(path: str, what: str, trusted: Collection[int]) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    check_owner(st, path, what, trusted)


# --- running out of descriptors or of shared memory ----------------------------------

# posix_ipc reports these two as a bare OSError carrying only a message.
_IPC_ERRNO = {
    "This process already has the maximum number of files open": errno.EMFILE,
    "The system limit on the total number of open files has been reached": errno.ENFILE,
}
PAGE = mmap.PAGESIZE  # what a semaphore takes in /dev/shm


@contextmanager
def os_errors(what: str, needed: int = PAGE) -> Generator[None, None, None]:
    """Turn a descriptor limit (EMFILE, ENFILE) met while opening ``what`` into an
    ``OSError`` with that errno and a message naming the limit, and a full ``/dev/shm``
    (ENOSPC; glibc's sem_open writes a page there) into ``no_space``."""
    try:
        yield
    except OSError as e:
        code = e.errno or _IPC_ERRNO.get(str(e))
        if code == errno.EMFILE:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            raise OSError(code, f"too many open files (EMFILE) while opening {what}: this "
                          f"process is at its descriptor limit (RLIMIT_NOFILE, `ulimit -n`) "
                          f"of {soft}") from e
        if code == errno.ENFILE:
            raise OSError(code, f"too many open files in the system (ENFILE) while opening "
                          f"{what} (fs.file-max)") from e
        if code == errno.ENOSPC:
            raise no_space(what, needed) from e
        raise


def no_space(what: str, needed: int) -> ContextError:
    return ContextError(
        f"not enough shared memory for {what}: {needed} bytes needed, {_free_bytes()} bytes "
        f"free in {SHM_DIR} (ENOSPC)"
    )


def reserve(fd: int, size: int, what: str) -> None:
    """Give the file behind ``fd`` ``size`` bytes with every page allocated now.

    A page of a tmpfs file is allocated when first touched, and on a full ``/dev/shm``
    (Docker's default is 64 MiB) that touch is a SIGBUS that kills the process, reading
    included; ``posix_fallocate`` makes it a clear error here instead, and nothing that
    reserved its pages can fault later.
    """
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise no_space(what, size) from e
        raise


# --- semaphores and segments ---------------------------------------------------------

_RETRIES = 100  # an object replaced or removed this many times in a row while opened


def open_semaphore(name: str, mode: int, create: bool, initial: int = 1, *,
                   trusted: Collection[int] = (), what: str = "") -> posix_ipc.Semaphore:
    """Open (or with ``create``, create-or-open) a named semaphore with exactly ``mode``.
    An existing one is used only if a trusted user owns it (``ForeignObjectError``)."""
    what = what or f"semaphore {name}"
    for _ in range(_RETRIES):
        if create:
            try:
                with os_errors(what):
                    sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=mode,
                                              initial_value=initial)
            except posix_ipc.ExistentialError:
                pass  # someone made it first: open theirs, if they may be trusted
            else:
                _exact_mode(host_path(name, semaphore=True), mode)
                return sem
        try:
            return _open_existing_semaphore(name, what, trusted)
        except posix_ipc.ExistentialError:
            if not create:
                raise
            # removed between our create and our open: create it again
    raise ContextError(f"{what} keeps being replaced while it is opened")


def _open_existing_semaphore(name: str, what: str,
                             trusted: Collection[int]) -> posix_ipc.Semaphore:
    path = host_path(name, semaphore=True)
    for _ in range(_RETRIES):
        try:
            before = os.stat(path)
        except FileNotFoundError:
            raise posix_ipc.ExistentialError(f"no semaphore {name}") from None
        check_owner(before, path, what, trusted)
        with os_errors(what):
            sem = posix_ipc.Semaphore(name)
        try:
            after = os.stat(path)
        except FileNotFoundError:
            sem.close()
            raise posix_ipc.ExistentialError(f"semaphore {name} was removed") from None
        if (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino):
            try:
                check_owner(after, path, what, trusted)
            except BaseException:
                sem.close()
                raise
            return sem
        sem.close()  # the name changed files between the two looks: look again
    raise ContextError(f"{what} keeps being replaced while it is opened")


def create_semaphore(name: str, mode: int, initial: int = 1, *,
                     trusted: Collection[int] = ()) -> posix_ipc.Semaphore:
    """Create a semaphore, replacing a stale one of ours of the same name (callers hold
    the lock that makes such a stale object unreachable by anyone else). One of another
    user's is refused, never removed or used."""
    what = f"semaphore {name}"
    with os_errors(what):
        try:
            sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=mode, initial_value=initial)
        except posix_ipc.ExistentialError:
            _refuse_if_foreign(host_path(name, semaphore=True), what, trusted)
            unlink_semaphore(name)
            sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=mode,
                                      initial_value=initial)
    _exact_mode(host_path(name, semaphore=True), mode)
    return sem


def unlink_semaphore(name: str, *, strict: bool = False) -> None:
    """Remove semaphore ``name`` if it exists; see ``unlink_segment`` for ``strict``."""
    try:
        posix_ipc.unlink_semaphore(name)
    except posix_ipc.ExistentialError:
        pass
    except posix_ipc.PermissionsError:
        _not_removed(host_path(name, semaphore=True), strict)


def unlink_segment(name: str, *, strict: bool = False) -> None:
    """Remove segment ``name`` if it exists. One this user may not remove (``/dev/shm``
    is sticky: only its owner may) is left for its owner unless ``strict``: closing a
    context must not fail half way because a stranger squats one of its names, or
    because a trusted user of a shared namespace created its memory."""
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass
    except posix_ipc.PermissionsError:
        _not_removed(host_path(name), strict)


def _not_removed(path: str, strict: bool) -> None:
    try:
        owner = describe_uid(os.stat(path).st_uid)
    except OSError:
        owner = "another user"
    if strict:
        raise PermissionError(errno.EPERM, f"cannot remove {path}, owned by {owner}", path)
    log.info("cannot remove %s, owned by %s: left for its owner", path, owner)


def _exact_mode(path: str, mode: int) -> None:
    # shm_open and sem_open apply the umask; the mode a user asked for is the mode.
    if mode != 0o600:
        try:
            os.chmod(path, mode)
        except OSError:
            pass


def open_shm(name: str, what: str, flags: int = 0, mode: int = 0o600) -> posix_ipc.SharedMemory:
    """``shm_open`` with a descriptor limit reported as such (see ``os_errors``). The
    caller checks the owner with ``check_owner(os.fstat(shm.fd), ...)`` before use."""
    with os_errors(what):
        return posix_ipc.SharedMemory(name, flags, mode=mode, size=0)


def create_segment(name: str, size: int, mode: int, *, what: str,
                   trusted: Collection[int] = ()) -> mmap.mmap:
    """Create segment ``name`` of ``size`` bytes, its pages reserved up front (``reserve``).
    An object already in the way is never opened instead: a stranger's is refused with
    ``ForeignObjectError``, ours raises ``posix_ipc.ExistentialError``."""
    try:
        shm = open_shm(name, what, posix_ipc.O_CREX, mode)
    except posix_ipc.ExistentialError:
        _refuse_if_foreign(host_path(name), what, trusted)
        raise
    try:
        if mode != 0o600:
            os.fchmod(shm.fd, mode)
        reserve(shm.fd, size, what)
        with os_errors(what):
            return mmap.mmap(shm.fd, size)
    except BaseException:
        unlink_segment(name)
        raise
    finally:
        shm.close_fd()


def attach_segment(name: str, *, trusted: Collection[int] = (), what: str = "") -> mmap.mmap:
    """Map an existing segment; raises ``posix_ipc.ExistentialError`` if it is gone and
    ``ForeignObjectError`` if a stranger owns it."""
    what = what or f"segment {name}"
    shm = open_shm(name, what)
    try:
        st = os.fstat(shm.fd)
        check_owner(st, host_path(name), what, trusted)
        with os_errors(what):
            return mmap.mmap(shm.fd, st.st_size)
    finally:
        shm.close_fd()


def _free_bytes() -> int:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize
