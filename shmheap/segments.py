"""POSIX shared-memory segments: create, open, map, reserve, unlink, list.

On Linux a POSIX shm segment is a file in the tmpfs at ``/dev/shm``:
``shm_open("/x")`` is ``open("/dev/shm/x")``.  We open the files directly so
that every segment comes with a real file descriptor (for ``fcntl`` OFD locks,
``fallocate`` and ``fstat``) and every failure is an ``OSError`` we translate
here into a typed ``ShmHeapError``.  Nothing above this module sees a raw
``OSError`` from a segment.

/dev/shm is writable by every local user, so any name may hold a FIFO, a
directory, a symbolic link or another user's file.  Every existing name is
opened through ``open_fd``: non-blocking and without following links (so a
FIFO cannot block us), then ``fstat``-checked: a regular file, of this user
(or one its owner shared by giving others write access, as a heap created
with a group or world ``mode`` does), of the expected size.  Anything else is
a ForeignObjectError.  Each mapping records the file's identity
(``st_dev``, ``st_ino``), so a name recycled by a new heap is told apart
from the file a handle mapped.

This module owns single segments only.  It knows nothing of heaps, layouts or
locks, and never decides on its own to unlink anything.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import mmap
import os
import resource
import stat
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

from .errors import (
    DescriptorLimitError,
    HeapCorruptError,
    HeapExistsError,
    HeapNotFoundError,
    InvalidParameterError,
    MappingLimitError,
    OutOfSharedMemoryError,
    ShmHeapError,
)
from .names import SHM_DIR

_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC
#: Mode bits by which a file's owner shares it with other users (group or world write).
SHARED_BITS = stat.S_IWGRP | stat.S_IWOTH
#: Python < 3.13 keeps a duplicate descriptor open for every mmap; 3.13 can be told not to.
MMAP_EXTRA: dict[str, bool] = {"trackfd": False} if sys.version_info >= (3, 13) else {}


#: True where every mapping keeps a file descriptor open (Python's mmap before 3.13)
DESCRIPTOR_PER_MAPPING = not MMAP_EXTRA
#: Mappings an attached heap keeps for reuse at most (least recently used go first).
KEEP_MAPPED = 1024
MAX_MAPPINGS_VAR = "SHMHEAP_MAX_MAPPINGS"


def max_map_count() -> int:
    """The kernel's limit on mappings per process (vm.max_map_count)."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65530


class MappingBudget(NamedTuple):
    """How many segment mappings a heap may have: ``keep`` reused, ``limit`` at once.

    ``keep`` is at most half the limit: the other half is for arenas pinned by
    views while the kept ones turn over.
    """

    keep: int
    limit: int


def mapping_budget() -> MappingBudget:
    """Half of what the kernel and the descriptor limit left this process when first asked.

    ``SHMHEAP_MAX_MAPPINGS=N`` sets the limit (tests, or a process that must
    leave room for others).  Otherwise the mappings and descriptors in use are
    counted once per process (a scan of /proc/self/maps costs about as much as
    the rest of an attach) and every later heap gets the same budget.
    """
    limit = forced_limit() or _process_limit()
    return MappingBudget(keep=min(limit // 2, KEEP_MAPPED), limit=limit)


def forced_limit() -> int | None:
    """The limit ``SHMHEAP_MAX_MAPPINGS`` sets, None if it is not set."""
    forced = os.environ.get(MAX_MAPPINGS_VAR, "")
    if not forced:
        return None
    if not forced.isdigit() or int(forced) < 8:
        raise InvalidParameterError(
            f"{MAX_MAPPINGS_VAR}={forced!r}: give a number of mappings, at least 8")
    return int(forced)


@functools.cache
def _process_limit() -> int:
    """Half of the mappings (and, where each keeps one, descriptors) left to this process."""
    with open("/proc/self/maps", "rb") as f:
        in_use = f.read().count(b"\n")
    limit = (max_map_count() - in_use) // 2
    if DESCRIPTOR_PER_MAPPING:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        open_now = len(os.listdir("/proc/self/fd"))
        limit = min(limit, (soft - open_now) // 2)
    return max(limit, 8)


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


if not MMAP_EXTRA:
    raise_descriptor_limit()


class SegmentPermissionError(ShmHeapError, PermissionError):
    """The segment exists but this user may not open it in the requested mode."""


class ForeignObjectError(HeapCorruptError):
    """A name holds something that is not a segment of this user: a FIFO, a
    directory, a symbolic link, another user's file.  shmheap never uses it."""


Identity = tuple[int, int]


def path_of(name: str) -> str:
    return f"{SHM_DIR}/{name}"


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISLNK, "a symbolic link"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((word for test, word in kinds if test(mode)), "not a regular file")


def foreign(st: os.stat_result) -> str:
    """Why a file of status ``st`` is not a segment this user may use; "" if it is one."""
    if not stat.S_ISREG(st.st_mode):
        return f"is {_kind(st.st_mode)}, not a shared-memory segment"
    if st.st_uid != os.geteuid() and not st.st_mode & SHARED_BITS:
        return f"belongs to another user (uid {st.st_uid}), who did not share it"
    return ""


def foreign_error(name: str, problem: str) -> ForeignObjectError:
    return ForeignObjectError(
        f"{path_of(name)} {problem}: something other than this user's shmheap put it under "
        "a heap's name; shmheap will not use it: remove it (as its owner or root) or use "
        "another heap name")


def lstat(name: str) -> os.stat_result | None:
    """The status of entry ``name`` (links not followed), None if there is none."""
    try:
        return os.lstat(path_of(name))
    except FileNotFoundError:
        return None


def identity_of(name: str) -> Identity | None:
    """(st_dev, st_ino) of the file now at ``name``, None if there is none."""
    st = lstat(name)
    return None if st is None else (st.st_dev, st.st_ino)


class Segment:
    """One mapped shm segment.  ``buf`` is a memoryview of all ``size`` bytes.

    ``fd`` stays open only when the caller asked to keep it (for file locks);
    a mapping does not need its descriptor.
    """

    __slots__ = ("buf", "fd", "identity", "map", "name", "readonly", "size")

    def __init__(self, name: str, fd: int, size: int, readonly: bool, keep_fd: bool,
                 identity: Identity) -> None:
        self.name = name
        self.size = size
        self.readonly = readonly
        #: (st_dev, st_ino) of the file mapped: a later file under ``name`` differs
        self.identity = identity
        prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
        try:
            self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, prot, **MMAP_EXTRA)
        except OSError as exc:
            os.close(fd)
            raise _translate(exc, name, mapping=True) from None
        self.buf = memoryview(self.map)
        if keep_fd:
            self.fd: int | None = fd
        else:
            os.close(fd)
            self.fd = None

    def __del__(self, _close: Callable[[int], None] = os.close) -> None:
        # A handle dropped without close() goes with the garbage collector: the descriptor
        # kept goes with it (its OFD locks too: the liveness slot then reads as dead).
        fd = getattr(self, "fd", None)
        if fd is not None:
            _close(fd)

    def punch(self, offset: int, length: int) -> None:
        """Free the memory of ``length`` bytes at ``offset`` of this very file (they read zero).

        ``madvise(MADV_REMOVE)`` on this mapping, not a hole punched by name:
        if the name now belongs to another file, that file is not touched.
        """
        try:
            self.map.madvise(mmap.MADV_REMOVE, offset, length)
        except OSError as exc:
            raise _translate(exc, self.name) from None

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


def mapping_error(exc: OSError, name: str) -> ShmHeapError:
    """The ShmHeapError of a failed mapping of segment ``name`` (ENOMEM: the mapping limit)."""
    return _translate(exc, name, mapping=True)


def descriptor_limit_error(what: str) -> DescriptorLimitError:
    """The error of opening ``what`` with no file descriptor left (EMFILE, ENFILE)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return DescriptorLimitError(
        f"no file descriptor left to open {what} (RLIMIT_NOFILE is {soft}): "
        "raise it (ulimit -n) or keep fewer arenas mapped (SHMHEAP_MAX_MAPPINGS)")


def _translate(exc: OSError, name: str, mapping: bool = False) -> ShmHeapError:
    """Turn an OSError about segment ``name`` into the matching ShmHeapError.

    ``mapping``: the error came from ``mmap``, where ENOMEM means the kernel's
    limit on mappings (or the address space), not a full /dev/shm.
    """
    if mapping and exc.errno == errno.ENOMEM:
        return MappingLimitError(
            f"the kernel refused to map {path_of(name)}: this process has reached "
            f"vm.max_map_count ({max_map_count()}) mappings or its address space; raise "
            "it (sysctl vm.max_map_count) or keep fewer arenas mapped (SHMHEAP_MAX_MAPPINGS)")
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return descriptor_limit_error(path_of(name))
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
        return foreign_error(name, "is a symbolic link, not a shared-memory segment")
    if exc.errno in (errno.EISDIR, errno.ENOTDIR):
        return foreign_error(name, "is a directory, not a shared-memory segment")
    if exc.errno in (errno.ENXIO, errno.ENODEV, errno.ESPIPE):
        return foreign_error(name, "is not a regular file")
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
        os.ftruncate(fd, size)
        if reserve:
            os.posix_fallocate(fd, 0, size)
        st = os.fstat(fd)
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)  # the umask must not narrow what the caller asked for
    except OSError as exc:
        os.close(fd)
        unlink(name)
        raise _translate(exc, name) from None
    except ShmHeapError:
        os.close(fd)
        unlink(name)
        raise
    try:
        return Segment(name, fd, size, readonly=False, keep_fd=keep_fd,
                       identity=(st.st_dev, st.st_ino))
    except ShmHeapError:
        unlink(name)
        raise


def map_range(seg: Segment, offset: int, length: int) -> mmap.mmap:
    """Map ``length`` bytes at ``offset`` (a multiple of the page size) of ``seg``'s file.

    Through the descriptor ``seg`` keeps (opened with ``keep_fd=True``), so it is
    the very file ``seg`` mapped, whatever its name holds now.  A file grown
    shorter than the range is HeapCorruptError.
    """
    assert seg.fd is not None, "map_range() needs a segment opened with keep_fd=True"
    prot = mmap.PROT_READ if seg.readonly else mmap.PROT_READ | mmap.PROT_WRITE
    try:
        return mmap.mmap(seg.fd, length, mmap.MAP_SHARED, prot, offset=offset, **MMAP_EXTRA)
    except ValueError:
        raise HeapCorruptError(f"{path_of(seg.name)} is shorter than {offset + length} "
                               "bytes: it was truncated") from None
    except OSError as exc:
        raise _translate(exc, seg.name, mapping=True) from None


def extend(seg: Segment, size: int) -> None:
    """Make ``seg``'s file (opened with its fd) at least ``size`` bytes long; sparse, never shorter.

    Its mapping keeps its own length: use ``map_range`` for the new bytes.
    """
    assert seg.fd is not None, "extend() needs a segment opened with keep_fd=True"
    try:
        if os.fstat(seg.fd).st_size < size:
            os.ftruncate(seg.fd, size)
    except OSError as exc:
        raise _translate(exc, seg.name) from None


def reserve(seg: Segment, offset: int, length: int) -> None:
    """Allocate the memory of ``length`` bytes at ``offset`` of ``seg`` (opened with its fd).

    Never past the end of the file (which ``seg`` may map only part of).
    OutOfSharedMemoryError if /dev/shm has no room: better now than SIGBUS at
    the first store into a page with no memory.
    """
    assert seg.fd is not None, "reserve() needs a segment opened with keep_fd=True"
    try:
        size = os.fstat(seg.fd).st_size
        if offset < size and length > 0:
            os.posix_fallocate(seg.fd, offset, min(length, size - offset))
    except OSError as exc:
        raise _translate(exc, seg.name) from None


#: How long (seconds) and how much of what it saw free (a fraction) ``check_free_space``
#: trusts its last look at /dev/shm.
FREE_SPACE_TRUSTED_S = 1.0
FREE_SPACE_TRUSTED_PART = 8
#: this process's last look: [bytes free then, monotonic time of the look, bytes asked since]
_free_seen = [0, 0.0, 0]


def check_free_space(name: str, size: int) -> None:
    """Raise OutOfSharedMemoryError if /dev/shm cannot hold ``size`` more bytes.

    A check for the common case only (the space is shared, and a sparse
    segment takes its memory when it is touched): so ``statvfs`` is called
    again only once the sizes asked since the last call exceed
    1/FREE_SPACE_TRUSTED_PART of what it saw free, or FREE_SPACE_TRUSTED_S
    have passed.  A grow() of small sparse arenas then rarely pays for it.
    """
    seen = _free_seen
    asked = seen[2] + size
    now = time.monotonic()
    if asked * FREE_SPACE_TRUSTED_PART <= seen[0] and now - seen[1] < FREE_SPACE_TRUSTED_S:
        seen[2] = asked
        return
    fs = os.statvfs(SHM_DIR)
    free = fs.f_bavail * fs.f_frsize
    if free < size:
        seen[0] = 0
        raise _translate(OSError(errno.ENOSPC, "no space"), name)
    seen[:] = [free, now, size]


def open_fd(name: str, readonly: bool, expect_size: int | None = None,
            identity: Identity | None = None) -> tuple[int, os.stat_result]:
    """Open existing segment ``name`` without mapping it; return the descriptor and its status.

    Never blocks (a FIFO is opened O_NONBLOCK, which means nothing to a
    regular file, so it stays set) and never follows a link.
    HeapNotFoundError if absent; ForeignObjectError unless it is a regular
    file of this user (``foreign``); HeapCorruptError unless it has
    ``expect_size`` bytes (if given); HeapNotFoundError if it is not the file
    of ``identity`` (if given): the name was recycled since that was mapped.
    """
    flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_NONBLOCK | _OPEN_FLAGS
    try:
        fd = os.open(path_of(name), flags)
    except OSError as exc:
        raise _translate(exc, name) from None
    try:
        st = os.fstat(fd)
        problem = foreign(st)
        if problem:
            raise foreign_error(name, problem)
        if expect_size is not None and st.st_size != expect_size:
            raise HeapCorruptError(f"{path_of(name)} has {st.st_size} bytes, expected "
                                   f"{expect_size}")
        if identity is not None and (st.st_dev, st.st_ino) != identity:
            raise HeapNotFoundError(
                f"{path_of(name)} is not the segment this handle mapped: its heap was "
                "destroyed and re-created since; attach the heap again")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def open_existing(
    name: str, readonly: bool, keep_fd: bool = False, expect_size: int | None = None
) -> Segment:
    """Map existing segment ``name`` (checked as ``open_fd`` does).  HeapNotFoundError if absent.

    ``expect_size`` (if given) must equal the file's size, else HeapCorruptError;
    without it the file's current size is mapped and must be non-zero.
    """
    fd, st = open_fd(name, readonly, expect_size)
    if st.st_size == 0:
        os.close(fd)
        raise HeapCorruptError(f"{path_of(name)} has 0 bytes, expected a non-empty segment")
    return Segment(name, fd, st.st_size, readonly=readonly, keep_fd=keep_fd,
                   identity=(st.st_dev, st.st_ino))


def unlink(name: str) -> bool:
    """Remove segment ``name``; True if it existed.  Mappings elsewhere stay valid."""
    try:
        os.unlink(path_of(name))
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise _translate(exc, name) from None
    return True


def check_own(name: str) -> bool:
    """True if ``name`` holds a regular file of this user, False if nothing.

    ForeignObjectError if it holds anything else: shmheap removes no file it
    cannot have made (only ``destroy`` removes everything under a heap's names).
    """
    st = lstat(name)
    if st is None:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        raise foreign_error(name, foreign(st) or f"belongs to another user (uid {st.st_uid})")
    return True


def remove_own(name: str) -> bool:
    """Remove a leftover segment of this user at ``name`` (``check_own``); True if there was one."""
    return check_own(name) and unlink(name)


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
