"""Arenas and the arena map.

An arena is the segment ``shmheap.NAME.a<hex index>``: ``arena_size`` data
bytes (the heap addresses ``[index * arena_size, (index + 1) * arena_size)``)
followed by a trailer that names its heap and index::

    off          size  field
    arena_size      8  magic b"shmarena"
    +8              8  heap_id (the control segment's)
    +16             8  index
    +24             8  created_ns
    +64                page metadata (layout.py), ``layout.meta_size`` bytes

A new arena is made whole under a temporary name (``shmheap.NAME.new<slot>``,
one per liveness slot, made without the heap lock), reserved, stamped with
its trailer under the lock, and only then renamed to its final name with
``renameat2(RENAME_NOREPLACE)`` (one system call; ``link`` + ``unlink``
where that is missing), which fails if that name is taken: a foreign file
there is a collision, never overwritten, and an arena file under its final
name is always complete.  A holder stopped after the rename leaves a
complete but unpublished arena that the journal names (``GROW``) and repair
removes.

The arena map ``shmheap.NAME.map`` holds one bit per arena index
(``max_arenas`` bits, a sparse file: only pages with set bits take memory).
It is read with ``pread`` rather than through a mapping, so a lookup never
allocates a page; a writer sets a bit through a mapping of its own, in a
page it first reserved with ``fallocate``, so a full /dev/shm is an error,
not SIGBUS.  A bit is set by the heap-lock holder after the arena's index
entry is published and never cleared while the heap exists (invariant 4);
lookups need no lock.

Mappings
    A process maps an arena when it first touches it and keeps at most
    ``MappingBudget.keep`` of them mapped for reuse (``ArenaCache``, least
    recently used first out).  An arena dropped from the cache is unmapped at
    once unless something still holds it: a ``view()``, an ``ndarray``, an
    ``Arena`` object, a span this process caches.  Such a pinned mapping stays
    until it is released, and counts against ``MappingBudget.limit``, the
    most mappings a heap may have at once (half of what ``vm.max_map_count``
    and, where every mapping holds a descriptor, ``RLIMIT_NOFILE`` leave the
    process when it attaches).  Past that, ``MappingLimitError``.

Runs of arenas mapped as one
    A giant object (giant.py) lies in consecutive arenas, and every process
    sees it as one contiguous buffer: ``map_run`` reserves its length of
    address space (an anonymous ``PROT_NONE`` mapping) and maps the data of
    each arena into it back to back with ``MAP_FIXED``.  The buffer's owner
    (``_native.Mapping``, or its pure-Python twin here, a ctypes array over
    the reservation) unmaps the whole range when the last view of it goes,
    not before: views outlive ``Heap.close()``.  Each arena of a run is a
    mapping of its own for the kernel, so a run counts that many against
    the limit for as long as its owner lives (``ArenaCache.track``).

This module owns arena segments, trailers, the map and the cache of mapped
arenas.  It does not touch the index or the lock.
"""

from __future__ import annotations

import errno
import functools
import mmap
import os
import struct
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from . import core, segments
from .errors import (
    HeapClosedError,
    HeapCorruptError,
    HeapExistsError,
    MappingLimitError,
    OutOfSharedMemoryError,
    ShmHeapError,
)
from .layout import DEFAULT_PAGE_SIZE, meta_size
from .names import PAGE_SIZE, arena_name, map_name, temp_arena_name

if TYPE_CHECKING:
    import ctypes

TRAILER = struct.Struct("<8sQQQ")
TRAILER_SIZE = 64
ARENA_MAGIC = b"shmarena"


def segment_size(arena_size: int, page_size: int = DEFAULT_PAGE_SIZE) -> int:
    """Bytes of an arena segment: the data, the trailer and the page metadata."""
    return arena_size + TRAILER_SIZE + meta_size(arena_size, page_size)


class Arena:
    """One arena as this process sees it: index, heap base address and data.

    ``buf`` is a memoryview of exactly ``size`` bytes: writable, or read-only
    when the heap was attached ``readonly=True``; ``meta`` is the page
    metadata after the trailer, likewise.  Once the handle is closed, both
    raise HeapClosedError.
    """

    __slots__ = ("__weakref__", "_buf", "_meta", "_seg", "base", "identity", "index",
                 "meta_offset", "size")

    def __init__(self, index: int, arena_size: int, seg: segments.Segment) -> None:
        self.index = index
        self.size = arena_size
        self.base = index * arena_size
        self._seg = seg
        #: (st_dev, st_ino) of the segment mapped (segments.Segment.identity)
        self.identity = seg.identity
        self._buf: memoryview | None = seg.buf[:arena_size]
        #: where the page metadata starts in the segment (pages.py)
        self.meta_offset = arena_size + TRAILER_SIZE
        self._meta: memoryview | None = seg.buf[self.meta_offset:]

    @property
    def buf(self) -> memoryview:
        """The arena's data bytes."""
        if self._buf is None:
            raise self._closed_error()
        return self._buf

    @property
    def meta(self) -> memoryview:
        """The arena's page metadata (layout.py)."""
        if self._meta is None:
            raise self._closed_error()
        return self._meta

    def _closed_error(self) -> HeapClosedError:
        return HeapClosedError(f"arena {self.index} belongs to a closed heap handle; attach "
                               "the heap again to use it")

    @property
    def mapping(self) -> mmap.mmap:
        """The mapping itself (alive while any view of this arena is)."""
        return self._seg.map

    def punch(self, offset: int, length: int) -> None:
        """Return the memory of data bytes ``[offset, offset + length)`` to the OS (writers)."""
        self._seg.punch(offset, length)

    def close(self) -> None:
        for view in (self._buf, self._meta):
            if view is not None:
                view.release()
        self._buf = self._meta = None
        self._seg.close()

    def __repr__(self) -> str:
        return f"Arena(index={self.index}, base={self.base:#x}, size={self.size})"


def read_trailer(buf: memoryview, arena_size: int) -> tuple[bytes, int, int, int]:
    """(magic, heap_id, index, created_ns) of an arena segment's trailer."""
    magic, heap_id, index, created_ns = TRAILER.unpack_from(buf, arena_size)
    return magic, heap_id, index, created_ns


def build(heap_name: str, slot: int, arena_size: int, mode: int,
          reserve: bool, page_size: int = DEFAULT_PAGE_SIZE) -> segments.Segment:
    """Make a new arena segment under the temporary name of liveness slot ``slot``.

    Runs without the heap lock (reserving a big arena takes milliseconds).

    Without ``reserve`` the free space of /dev/shm is still checked, so the
    common "it is full" case is an error here; with it, the memory is
    allocated now and SIGBUS at first touch cannot happen.
    """
    tmp = temp_arena_name(heap_name, slot)
    size = segment_size(arena_size, page_size)
    if not reserve:
        segments.check_free_space(tmp, size)
    try:
        return segments.create(tmp, size, mode, reserve=reserve)
    except HeapExistsError:  # left by this slot's holder that died building one
        segments.remove_own(tmp)
        return segments.create(tmp, size, mode, reserve=reserve)


def link(heap_name: str, seg: segments.Segment, heap_id: int, arena_size: int,
         index: int) -> bool:
    """Stamp ``seg`` as arena ``index`` and move it to its final name; ``seg.name`` is
    then that name.

    False if the name is taken (a collision: pick another index and call
    again with the same segment, still under its temporary name).
    """
    TRAILER.pack_into(seg.buf, arena_size, ARENA_MAGIC, heap_id, index, time.time_ns())
    final = arena_name(heap_name, index)
    try:
        if not _rename_noreplace(segments.path_of(seg.name), segments.path_of(final)):
            return False
    except OSError as exc:
        raise ShmHeapError(f"cannot link arena {index} of heap {heap_name!r}: {exc}") from None
    seg.name = final
    return True


def _rename_noreplace(old: str, new: str) -> bool:
    """Rename ``old`` to ``new`` unless ``new`` exists (then False): ``renameat2`` with
    RENAME_NOREPLACE, one system call; where the kernel, libc or file system lacks it,
    ``link`` + ``unlink``, which a caller cannot tell apart (a temporary name left by a
    death between the two is removed as any dead grower's is, liveness.py)."""
    try:
        if core.native is not None:
            return bool(core.native.rename_noreplace(old, new))
        return _rename_noreplace_twin(old, new)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
    try:
        os.link(old, new)
    except FileExistsError:
        return False
    os.unlink(old)
    return True


def open_arena(heap_name: str, heap_id: int, index: int, arena_size: int,
               readonly: bool, page_size: int = DEFAULT_PAGE_SIZE) -> Arena:
    """Map published arena ``index``, checking its size and trailer."""
    name = arena_name(heap_name, index)
    try:
        seg = segments.open_existing(name, readonly,
                                     expect_size=segment_size(arena_size, page_size))
    except FileNotFoundError:
        raise _missing(heap_name, index) from None
    try:
        _check_trailer(heap_name, heap_id, index, read_trailer(seg.buf, arena_size))
    except HeapCorruptError:
        seg.close()
        raise
    return Arena(index, arena_size, seg)


def verify_arena(heap_name: str, heap_id: int, index: int, arena_size: int,
                 page_size: int = DEFAULT_PAGE_SIZE) -> None:
    """Check published arena ``index``'s segment like ``open_arena``, without mapping it."""
    os.close(open_checked(heap_name, heap_id, index, arena_size, True, page_size))


def open_checked(heap_name: str, heap_id: int, index: int, arena_size: int, readonly: bool,
                 page_size: int = DEFAULT_PAGE_SIZE) -> int:
    """A descriptor of published arena ``index``'s segment, checked like ``open_arena``."""
    name = arena_name(heap_name, index)
    try:
        fd, _st = segments.open_fd(name, readonly=readonly,
                                   expect_size=segment_size(arena_size, page_size))
    except FileNotFoundError:
        raise _missing(heap_name, index) from None
    try:
        trailer = TRAILER.unpack(os.pread(fd, TRAILER.size, arena_size))
        _check_trailer(heap_name, heap_id, index, trailer)
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_run(heap_name: str, heap_id: int, first: int, size: int, arena_size: int,
            readonly: bool, page_size: int = DEFAULT_PAGE_SIZE) -> object:
    """The data of arenas ``first``, ``first + 1``, ... (``size`` bytes in all, the last
    arena's first bytes) mapped back to back as one buffer; returns the buffer's owner.

    Each arena is opened by name and checked like ``open_arena``.  MappingLimitError
    if the kernel refuses a mapping.
    """
    fds: list[int] = []
    try:
        parts = []
        for offset in range(0, size, arena_size):
            fds.append(open_checked(heap_name, heap_id, first + offset // arena_size, arena_size,
                                    readonly, page_size))
            parts.append((fds[-1], min(arena_size, size - offset)))
        try:
            if core.native is not None:
                run: object = core.native.Mapping(size, parts, not readonly)
            else:
                run = _mapped_run(size, parts, not readonly)
        except OSError as exc:
            raise segments.mapping_error(exc, arena_name(heap_name, first)) from None
        return run
    finally:
        for fd in fds:
            os.close(fd)


# -- the pure-Python twins of _native.Mapping and rename_noreplace: libc through ctypes ------

_MAP_FIXED = 0x10  # Linux, every architecture
_RENAME_NOREPLACE = 1  # linux/fs.h
_AT_FDCWD = -100
_PROT_NONE = 0


@functools.cache
def _libc() -> ctypes.CDLL:
    import ctypes  # on first use: the native core needs none of this, and ctypes is slow to import

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mmap.restype = ctypes.c_void_p
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.munmap.restype = ctypes.c_int
    if hasattr(libc, "renameat2"):  # glibc 2.28 and later
        libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                                   ctypes.c_uint]
        libc.renameat2.restype = ctypes.c_int
    return libc


def _unmap(region: ctypes.Array[ctypes.c_ubyte]) -> None:
    """Unmap a run's whole range (its owner's ``__del__``: the last view of it is gone)."""
    import ctypes

    _libc().munmap(ctypes.addressof(region), ctypes.sizeof(region))


@functools.lru_cache(maxsize=64)
def _run_type(size: int) -> type[ctypes.Array[ctypes.c_ubyte]]:
    """A ctypes array type of ``size`` bytes that unmaps itself when it goes."""
    import ctypes

    return type("ArenaRun", (ctypes.c_ubyte * size,), {"__del__": _unmap})


def _mapped_run(size: int, parts: list[tuple[int, int]], writable: bool) -> object:
    """``_native.Mapping(size, parts, writable)`` in Python: reserve, map each part, own it."""
    import ctypes

    libc = _libc()
    base = libc.mmap(None, size, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if base is None or base == ctypes.c_void_p(-1).value:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    try:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        offset = 0
        for fd, length in parts:
            if libc.mmap(base + offset, length, prot, mmap.MAP_SHARED | _MAP_FIXED, fd,
                         0) != base + offset:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            offset += length
        return _run_type(size).from_address(base)
    except BaseException:
        libc.munmap(base, size)
        raise


def _rename_noreplace_twin(old: str, new: str) -> bool:
    """``_native.rename_noreplace`` through libc's ``renameat2`` (ctypes)."""
    import ctypes

    libc = _libc()
    if not hasattr(libc, "renameat2"):
        raise OSError(errno.ENOSYS, "libc has no renameat2")
    if libc.renameat2(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new),
                      _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        return False
    raise OSError(err, os.strerror(err), old, None, new)


def _missing(heap_name: str, index: int) -> HeapCorruptError:
    return HeapCorruptError(
        f"heap {heap_name!r}: published arena {index} has no segment "
        f"/dev/shm/{arena_name(heap_name, index)}; run `shmheap fsck {heap_name}`")


def _check_trailer(heap_name: str, heap_id: int, index: int,
                   trailer: tuple[bytes, int, int, int]) -> None:
    magic, trailer_heap, trailer_index, _ = trailer
    if magic != ARENA_MAGIC or trailer_heap != heap_id or trailer_index != index:
        raise HeapCorruptError(
            f"heap {heap_name!r}: /dev/shm/{arena_name(heap_name, index)} is not arena "
            f"{index} of this heap (its trailer says heap {trailer_heap:#x}, index "
            f"{trailer_index})")


class MappedArena(Protocol):
    """What ArenaCache keeps of a mapped arena: its page views (pages.ArenaPages)."""

    index: int
    arena: Arena

    def native_record(self) -> object | None: ...

    def close(self) -> None: ...


_Mapped = TypeVar("_Mapped", bound=MappedArena)


#: mappings a cache holds before it looks the process's budget up: far below any kernel's
#: vm.max_map_count and any descriptor limit a process that maps at all runs with
UNCOUNTED = 64


class ArenaCache(Generic[_Mapped]):
    """The arenas this process has mapped, as page views (see "Mappings" above)."""

    def __init__(self, open_pages: Callable[[int], _Mapped], mutex: Any) -> None:
        self._open_pages = open_pages
        #: the handle's thread lock: every call but ``mapped`` runs with it held already
        self._budget: segments.MappingBudget | None = None
        #: SHMHEAP_MAX_MAPPINGS, read now: without it the process's mappings are counted (a
        #: scan of /proc/self/maps, ~0.3 ms) only once this cache holds more than UNCOUNTED
        self._forced = segments.forced_limit()
        #: recently used arenas, kept mapped; ``recent.get`` is the fast lookup
        self.recent: OrderedDict[int, _Mapped] = OrderedDict()
        #: every holder of mappings of this cache still alive (an arena's mapping, kept or
        #: pinned; a run of arenas mapped as one, see ``map_run``): id -> (weak ref, mappings)
        self._alive: dict[int, tuple[weakref.ref[object], int]] = {}
        #: the mappings those holders have, less those in ``_released`` (written under the
        #: mutex)
        self._count = 0
        #: the mappings of holders gone since: a weak ref's callback appends them, one atomic
        #: append and no lock (it runs in whichever thread drops the last view, inside any
        #: call, maybe while another thread holds the mutex); ``_settle`` takes them off
        self._released: deque[int] = deque()
        self._mutex = mutex
        #: the native core's records of the arenas in ``recent`` (its free() looks there)
        self.records: dict[int, object] = {}
        #: the arenas dropped from ``recent`` that something still holds (an ``Arena`` object
        #: of the program's): ``close`` closes them too
        self._dropped: weakref.WeakSet[Arena] = weakref.WeakSet()

    @property
    def budget(self) -> segments.MappingBudget:
        """This process's mapping budget, looked up on first use."""
        if self._budget is None:
            self._budget = segments.mapping_budget()
        return self._budget

    def _over(self, mappings: int, kept: bool) -> bool:
        """True if ``mappings`` exceed the budget's keep (``kept``) or limit.  Up to
        UNCOUNTED they fit any process that can map at all, and the budget is not looked up."""
        if mappings <= UNCOUNTED and self._forced is None:
            return False
        return mappings > (self.budget.keep if kept else self.budget.limit)

    @property
    def mapped(self) -> int:
        """Mappings of arenas alive now (kept for reuse, pinned, or in runs)."""
        with self._mutex:
            return self._settle()

    def _settle(self) -> int:
        """The mappings alive now (mutex held): those released taken off the tally."""
        released = self._released
        while released:  # (only a holder of the mutex takes from it)
            self._count -= released.popleft()
        return self._count

    def get(self, index: int) -> _Mapped:
        """Arena ``index`` (published), mapped now if it is not."""
        pages = self.recent.get(index)
        if pages is not None:
            self.recent.move_to_end(index)
            return pages
        self.make_room()
        pages = self._open_pages(index)
        self.add(pages)
        return pages

    def add(self, pages: _Mapped) -> None:
        """Keep ``pages`` (just mapped) as the most recently used arena."""
        self.track(pages.arena.mapping, 1)
        self.recent[pages.index] = pages
        record = pages.native_record()
        if record is not None:
            self.records[pages.index] = record
        while self._over(len(self.recent), kept=True):
            self._drop_oldest()

    def track(self, holder: object, count: int) -> None:
        """Count ``count`` mappings against the limit for as long as ``holder`` lives."""
        key = id(holder)
        alive, released = self._alive, self._released
        entry = alive.get(key)
        if entry is not None and entry[0]() is holder:
            return  # counted already (a new arena cached again)

        def gone(_ref: object) -> None:
            entry = alive.pop(key, None)
            if entry is not None:
                released.append(entry[1])

        alive[key] = (weakref.ref(holder, gone), count)
        self._count += count

    def make_room(self, count: int = 1) -> None:
        """Drop kept arenas until ``count`` more mappings fit the limit; error if they cannot."""
        if not self._over(self._settle() + count, kept=False):
            return
        limit = self.budget.limit
        while self._settle() + count > limit and self.recent:
            self._drop_oldest()
        if self._count + count > limit:
            raise MappingLimitError(
                f"{self._count} arena mappings are held (by views, ndarrays, Arena "
                f"objects) and {count} more are needed: the limit of this process is "
                f"{limit}; release views you no longer need, or raise the limit "
                f"({segments.MAX_MAPPINGS_VAR}, vm.max_map_count)")

    def _drop_oldest(self) -> None:
        index, pages = self.recent.popitem(last=False)
        self.records.pop(index, None)
        self._dropped.add(pages.arena)

    def close(self) -> None:
        self.records.clear()
        for pages in self.recent.values():
            pages.close()
        self.recent.clear()
        for arena in list(self._dropped):  # (held by the program: closed like the kept ones)
            arena.close()


class ArenaMap:
    """The arena map of a heap: one bit per arena index, read with pread; a writer sets
    bits through a mapping of its own, into pages it reserved first."""

    def __init__(self, heap_name: str, max_arenas: int, readonly: bool) -> None:
        self.max_arenas = max_arenas
        self._name = map_name(heap_name)
        try:
            fd, st = segments.open_fd(self._name, readonly)
        except FileNotFoundError:
            raise HeapCorruptError(
                f"heap {heap_name!r} has no arena map /dev/shm/{self._name}") from None
        if st.st_size < map_bytes(max_arenas):
            os.close(fd)
            raise HeapCorruptError(f"/dev/shm/{self._name} is shorter than its heap needs")
        self._fd = fd
        #: the map mapped writable, on the first ``add``, and the pages of it this process
        #: reserved (fallocate) before its first store there: a full /dev/shm is an error
        #: there, never SIGBUS at the store
        self._mapping: mmap.mmap | None = None
        self._reserved: set[int] = set()

    def __contains__(self, index: int) -> bool:
        if not 0 <= index < self.max_arenas:
            return False
        byte = os.pread(self._fd, 1, index >> 3)
        return bool(byte and byte[0] >> (index & 7) & 1)

    def add(self, index: int) -> None:
        """Set the bit of ``index`` (heap-lock holder only)."""
        offset = index >> 3
        page = offset // PAGE_SIZE
        if page not in self._reserved:
            self._reserve(page)
        mapping = self._mapping
        if mapping is None:
            mapping = self._mapping = self._map_writable()
        mapping[offset] |= 1 << (index & 7)

    def _reserve(self, page: int) -> None:
        """Give memory to ``page`` of the map (the part of it inside the file)."""
        size = map_bytes(self.max_arenas)
        try:
            os.posix_fallocate(self._fd, page * PAGE_SIZE, min(PAGE_SIZE, size - page * PAGE_SIZE))
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                raise OutOfSharedMemoryError(
                    f"/dev/shm is full: no page for the arena map of {self._name}") from None
            raise
        self._reserved.add(page)

    def _map_writable(self) -> mmap.mmap:
        try:
            return mmap.mmap(self._fd, map_bytes(self.max_arenas), mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE, **segments.MMAP_EXTRA)
        except OSError as exc:
            raise segments.mapping_error(exc, self._name) from None

    def next_free(self, start: int, stop: int) -> int | None:
        """The lowest index in ``[start, stop)`` whose bit is clear, or None."""
        index = start
        while index < stop:
            offset = index >> 3
            data = os.pread(self._fd, min(4096, ((stop + 7) >> 3) - offset), offset)
            if not data:
                break
            # the clear bits of the first byte from ``index``'s on, else of the first byte
            # after it that is not full (found at C speed)
            pos, clear = 0, ~data[0] & 0xFF & (0xFF << (index & 7))
            if not clear:
                pos = len(data) - len(data[1:].lstrip(b"\xff"))
                clear = ~data[pos] & 0xFF if pos < len(data) else 0
            if clear:
                found = (offset + pos) * 8 + (clear & -clear).bit_length() - 1
                return found if found < stop else None
            index = (offset + len(data)) * 8
        return None

    def members(self) -> list[int]:
        """Every index whose bit is set, skipping holes of the sparse file."""
        found: list[int] = []
        end = map_bytes(self.max_arenas)
        offset = 0
        while offset < end:
            try:
                offset = os.lseek(self._fd, offset, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(self._fd, offset, os.SEEK_HOLE)
            data = os.pread(self._fd, hole - offset, offset)
            for pos, byte in enumerate(data):
                if byte:
                    found.extend((offset + pos) * 8 + bit for bit in range(8) if byte >> bit & 1)
            offset = hole
        return [i for i in found if i < self.max_arenas]

    def close(self) -> None:
        if self._mapping is not None:
            self._mapping.close()
            self._mapping = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self, _close: Callable[[int], None] = os.close) -> None:
        # (a handle dropped without close(): its descriptor goes with the garbage collector)
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            _close(fd)


def map_bytes(max_arenas: int) -> int:
    return (max_arenas + 7) >> 3


def create_map(heap_name: str, max_arenas: int, mode: int) -> None:
    """Create the (sparse, all-clear) arena map of a new heap."""
    segments.create(map_name(heap_name), map_bytes(max_arenas), mode, reserve=False).close()
