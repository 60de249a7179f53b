"""POSIX shared-memory segments: create, open, map, reserve, unlink, list.

On Linux a POSIX shm segment is a file in the tmpfs at ``/dev/shm``:
``shm_open("/x")`` is ``open("/dev/shm/x")``.  We open the files directly so
that every segment comes with a real file descriptor (for ``fcntl`` OFD locks,
``fallocate`` and ``fstat``) and every failure is an ``OSError`` we translate
here into a typed ``ShmHeapError``.  Nothing above this module sees a raw
``OSError`` from a segment.

This module owns single segments only.  It knows nothing of heaps, layouts or
locks, and never decides on its own to unlink anything.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import resource
import sys
from collections.abc import Callable

from .errors import (
    HeapCorruptError,
    HeapExistsError,
    HeapNotFoundError,
    OutOfSharedMemoryError,
    ShmHeapError,
)
from .names import SHM_DIR

_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC
#: Python < 3.13 keeps a duplicate descriptor open for every mmap; 3.13 can be told not to.
_MMAP_EXTRA: dict[str, bool] = {"trackfd": False} if sys.version_info >= (3, 13) else {}


def raise_descriptor_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit; return the soft limit now.

    Where mmap keeps a descriptor per mapping (Python < 3.13), a process that
    maps more arenas than the soft limit (often 1024) would fail with EMFILE.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


if not _MMAP_EXTRA:
    raise_descriptor_limit()


class SegmentPermissionError(ShmHeapError, PermissionError):
    """The segment exists but this user may not open it in the requested mode."""


def path_of(name: str) -> str:
    return f"{SHM_DIR}/{name}"


class Segment:
    """One mapped shm segment.  ``buf`` is a memoryview of all ``size`` bytes.

    ``fd`` stays open only when the caller asked to keep it (for file locks);
    a mapping does not need its descriptor.
    """

    __slots__ = ("buf", "fd", "map", "name", "readonly", "size")

    def __init__(self, name: str, fd: int, size: int, readonly: bool, keep_fd: bool) -> None:
        self.name = name
        self.size = size
        self.readonly = readonly
        prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
        try:
            self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, prot, **_MMAP_EXTRA)
        except OSError as exc:
            os.close(fd)
            raise _translate(exc, name) from None
        self.buf = memoryview(self.map)
        if keep_fd:
            self.fd: int | None = fd
        else:
            os.close(fd)
            self.fd = None

    def close(self) -> None:
        """Unmap (if no caller still holds a view into it) and close the descriptor."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.buf.release()
        # If someone still holds a memoryview of this mapping, it stays valid
        # and is unmapped when the last view goes away.
        with contextlib.suppress(BufferError):
            self.map.close()


def _translate(exc: OSError, name: str) -> ShmHeapError:
    """Turn an OSError about segment ``name`` into the matching ShmHeapError."""
    if exc.errno == errno.ENOENT:
        return HeapNotFoundError(f"shared-memory segment {path_of(name)} does not exist")
    if exc.errno == errno.EEXIST:
        return HeapExistsError(f"shared-memory segment {path_of(name)} already exists")
    if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
        return OutOfSharedMemoryError(
            f"no room in {SHM_DIR} for {path_of(name)}: free space there "
            "(df -h /dev/shm; `shmheap gc` removes abandoned heaps) or use smaller arenas"
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return SegmentPermissionError(
            f"permission denied on {path_of(name)}: it belongs to another user or its mode "
            "forbids this access"
        )
    if exc.errno == errno.ELOOP:
        return HeapCorruptError(f"{path_of(name)} is a symbolic link, not a segment; remove it")
    return ShmHeapError(f"{path_of(name)}: {exc.strerror} (errno {exc.errno})")


def create(
    name: str, size: int, mode: int = 0o600, reserve: bool = True, keep_fd: bool = False,
    on_open: Callable[[int], None] | None = None,
) -> Segment:
    """Create segment ``name`` of ``size`` bytes exclusively and map it writable.

    With ``reserve`` the memory is allocated now (``posix_fallocate``), so a full
    /dev/shm raises OutOfSharedMemoryError here instead of SIGBUS at first
    touch.  Without it the file stays sparse.  HeapExistsError if the
    name is taken.  ``on_open(fd)`` runs right after the exclusive open,
    before anything else.  On any failure the half-made segment is unlinked
    again.
    """
    try:
        fd = os.open(path_of(name), os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, mode)
    except OSError as exc:
        raise _translate(exc, name) from None
    try:
        if on_open is not None:
            on_open(fd)
        os.fchmod(fd, mode)  # the umask must not narrow what the caller asked for
        os.ftruncate(fd, size)
        if reserve:
            os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        os.close(fd)
        unlink(name)
        raise _translate(exc, name) from None
    except ShmHeapError:
        os.close(fd)
        unlink(name)
        raise
    try:
        return Segment(name, fd, size, readonly=False, keep_fd=keep_fd)
    except ShmHeapError:
        unlink(name)
        raise


def check_free_space(name: str, size: int) -> None:
    """Raise OutOfSharedMemoryError if /dev/shm cannot hold ``size`` more bytes."""
    stat = os.statvfs(SHM_DIR)
    if stat.f_bavail * stat.f_frsize < size:
        raise _translate(OSError(errno.ENOSPC, "no space"), name)


def open_fd(name: str, readonly: bool) -> int:
    """Open segment ``name`` without mapping it.  HeapNotFoundError if absent."""
    try:
        return os.open(path_of(name), (os.O_RDONLY if readonly else os.O_RDWR) | _OPEN_FLAGS)
    except OSError as exc:
        raise _translate(exc, name) from None


def open_existing(
    name: str, readonly: bool, keep_fd: bool = False, expect_size: int | None = None
) -> Segment:
    """Map existing segment ``name``.  HeapNotFoundError if absent.

    ``expect_size`` (if given) must equal the file's size, else HeapCorruptError;
    without it the file's current size is mapped and must be non-zero.
    """
    fd = open_fd(name, readonly)
    size = os.fstat(fd).st_size
    if (expect_size is not None and size != expect_size) or size == 0:
        os.close(fd)
        want = f"{expect_size} bytes" if expect_size is not None else "a non-empty segment"
        raise HeapCorruptError(f"{path_of(name)} has {size} bytes, expected {want}")
    return Segment(name, fd, size, readonly=readonly, keep_fd=keep_fd)


def unlink(name: str) -> bool:
    """Remove segment ``name``; True if it existed.  Mappings elsewhere stay valid."""
    try:
        os.unlink(path_of(name))
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise _translate(exc, name) from None
    return True


def exists(name: str) -> bool:
    return os.path.lexists(path_of(name))


def size_of(name: str) -> int | None:
    """The size in bytes of segment ``name``, or None if it does not exist."""
    try:
        return os.stat(path_of(name), follow_symlinks=False).st_size
    except FileNotFoundError:
        return None


def allocated_bytes(name: str) -> int:
    """Bytes of memory the segment occupies now (st_blocks), 0 if absent."""
    try:
        return os.stat(path_of(name), follow_symlinks=False).st_blocks * 512
    except FileNotFoundError:
        return 0


def list_all() -> list[str]:
    """Every entry of /dev/shm, sorted."""
    try:
        return sorted(os.listdir(SHM_DIR))
    except FileNotFoundError:
        return []
