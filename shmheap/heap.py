"""``Heap``: create, attach, grow, snapshot, inspect, close and destroy a heap.

A heap is a set of objects in /dev/shm (see names.py) that any process on the
host can attach by name.  This module ties them together; each object's
protocol lives in its own module:

* control.py   -- parameters, init state, the index header word, the hint
* liveness.py  -- process slots and the lock's owner record
* lock.py      -- the heap lock and dead-holder recovery
* index.py     -- the all-arenas index and reader snapshots
* arenas.py    -- arena segments and the arena map
* repair.py    -- checks and repairs (fsck), run after a dead holder
* allocator.py, walker.py -- objects inside arenas; walking, mark/sweep, scavenging

Creation is crash-safe: the creator makes the control segment exclusively
(the one creator wins), holds an OFD lock on its first byte while it is
``INITIALISING``, and moves it to ``READY`` last.  An attacher waits for
``READY``; if the state is not ready and nobody holds the init lock, the
creator died and the attacher raises HeapCorruptError.

``grow``: build and reserve the arena under this process's temporary name
(no lock: only the holder of our liveness slot uses that name); then, under
the heap lock and in this order (invariant 4): link it under its final name
(a taken name is a collision: try the next free index) -> append its index
-> set its map bit -> move the hint.

The methods at the end of ``Heap`` (alloc ... scavenge) delegate to the
allocator and walker, made lazily per handle.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any

from . import arenas, control, crash, liveness, segments, walker
from .allocator import Allocator, as_ndarray
from .errors import (
    AddressSpaceExhaustedError,
    ArenaCollisionError,
    HeapClosedError,
    HeapCorruptError,
    HeapExistsError,
    HeapNotFoundError,
    InvalidParameterError,
    ReadOnlyError,
)
from .index import ArenaIndex, ArenaSnapshot
from .liveness import Liveness
from .lock import HeapLock, open_semaphore, unlink_semaphore
from .names import (
    PAGE_SIZE,
    arena_name,
    check_arena_size,
    check_max_arenas,
    check_name,
    control_name,
    owns,
    semaphore_name,
)
from .pages import DEFAULT_PAGE_SIZE, check_page_size
from .repair import Finding, repair_after_crash, run_checks

DEFAULT_ARENA_SIZE = 64 << 20
DEFAULT_MAX_ARENAS = 1 << 20
#: Seconds an attacher waits for a creator to finish initialising.
ATTACH_TIMEOUT = 5.0


@dataclass(frozen=True)
class HeapInfo:
    """What ``Heap.info()`` reports."""

    name: str
    arenas: int
    index_len: int
    index_cap: int
    index_generations: int
    index_bytes: int
    arena_size: int
    max_arenas: int
    reserved_bytes: int
    hint: int
    readonly: bool
    attached: int
    lock_owner_pid: int | None
    recoveries: int
    last_recovery_ns: int
    repairs: int
    created_ns: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _ClosedLock:
    """Stands in for the lock of a closed heap: every use raises HeapClosedError."""

    def __init__(self, name: str) -> None:
        self._message = f"heap {name!r} is closed; attach it again to use it"

    def acquire(self, timeout: float | None = None, role: str = "lock") -> None:
        raise HeapClosedError(self._message)

    def release(self, role: str = "lock") -> None:
        raise HeapClosedError(self._message)

    def read_word(self, view: memoryview, timeout: float | None = None) -> int:
        raise HeapClosedError(self._message)


class Heap:
    """A process's handle on a shared heap.  Use ``create``, ``attach`` or ``open``."""

    def __init__(self, name: str, control_seg: segments.Segment, params: control.Params,
                 readonly: bool) -> None:
        self.name = name
        self.readonly = readonly
        self.params = params
        self.arena_size = params.arena_size
        self.max_arenas = params.max_arenas
        self._control = control_seg
        self._words = control_seg.buf[:control.SIZE].cast("Q")
        self._header = control_seg.buf[control.HEADER_OFFSET:control.HEADER_OFFSET + 8].cast("Q")
        self._arenas: dict[int, arenas.Arena] = {}
        self._live: Liveness | None = None
        self._map: arenas.ArenaMap | None = None
        self._index = ArenaIndex(name, self._header, params.first_cap, params.mode, readonly)
        self._lock: HeapLock | _ClosedLock = _ClosedLock(name)
        #: (header word, snapshot) of this process's last snapshot
        self._last_snapshot: tuple[int, ArenaSnapshot] = (-1, ArenaSnapshot(memoryview(b""), 0))
        self._sem = None
        part = "lock semaphore"
        try:
            self._sem = open_semaphore(semaphore_name(name), create=False, mode=params.mode)
            part = "liveness segment"
            self._live = Liveness(name)
            part = "arena map"
            self._map = arenas.ArenaMap(name, params.max_arenas, readonly)
        except HeapNotFoundError:
            self._release_resources()
            raise HeapCorruptError(
                f"heap {name!r} is damaged: its {part} is missing; remove the heap with "
                f"`shmheap destroy {name}`") from None
        except BaseException:
            self._release_resources()
            raise
        # The slot is ours alone now: a new arena its previous holder left unlinked is dead.
        segments.unlink(arenas.temp_name(name, self._live.slot))
        self._lock = HeapLock(self._sem, self._live, lambda: repair_after_crash(self), name)

    # -- lifecycle ----------------------------------------------------------------

    @classmethod
    def create(cls, name: str, arena_size: int = DEFAULT_ARENA_SIZE,
               max_arenas: int = DEFAULT_MAX_ARENAS, mode: int = 0o600,
               reserve: bool = True, page_size: int = DEFAULT_PAGE_SIZE) -> Heap:
        """Create heap ``name``; HeapExistsError if the name is taken.

        ``reserve`` allocates each arena's memory when it is created, so a full
        /dev/shm is an OutOfSharedMemoryError at ``grow()`` rather than SIGBUS
        at first touch; pass False for big arenas you will touch sparsely.
        ``page_size`` is the allocator's page (pages.py).
        """
        check_name(name)
        check_arena_size(arena_size)
        check_max_arenas(max_arenas, arena_size)
        check_page_size(page_size, arena_size)
        if not isinstance(mode, int) or not 0 <= mode <= 0o777:
            raise InvalidParameterError(f"mode {mode!r} is not a file mode like 0o600")
        if mode & 0o600 != 0o600:
            raise InvalidParameterError(
                f"mode {mode:#o} lacks owner read-write (0o600): the creator could not open "
                "its own heap; use 0o600, or 0o660 to share it with the group")
        try:
            seg = segments.create(control_name(name), control.SIZE, mode, keep_fd=True)
        except HeapExistsError:
            raise HeapExistsError(
                f"heap {name!r} already exists; attach to it, or remove it with "
                f"`shmheap destroy {name}`") from None
        assert seg.fd is not None
        if not liveness.try_lock(seg.fd, control.INIT_LOCK_BYTE):
            raise AssertionError("a fresh control segment cannot be locked by anyone else")
        params = control.Params(
            heap_id=secrets.randbits(63) | 1, arena_size=arena_size, max_arenas=max_arenas,
            first_cap=PAGE_SIZE // 4, mode=mode, reserve=reserve, created_ns=time.time_ns(),
            page_size=page_size)
        try:
            control.write_params(seg.buf, params)
            words = seg.buf.cast("Q")
            control.write_state(seg.buf, control.INITIALISING)
            crash.reach("create.control_created")
            _remove_leftovers(name)
            open_semaphore(semaphore_name(name), create=True, mode=mode).close()
            liveness.create(name, mode)
            arenas.create_map(name, max_arenas, mode)
            words[control.HEADER_OFFSET // 8] = control.make_header(0, 0)
            words[control.HINT_OFFSET // 8] = 1
            words.release()
            heap = cls(name, seg, params, readonly=False)
            heap._index.create_first()
            crash.reach("create.initialised")
            control.write_state(seg.buf, control.READY)
        except BaseException:
            destroy(name)
            seg.close()
            raise
        liveness.unlock(seg.fd, control.INIT_LOCK_BYTE)
        os.close(seg.fd)
        seg.fd = None
        return heap

    @classmethod
    def attach(cls, name: str, readonly: bool = False,
               timeout: float = ATTACH_TIMEOUT) -> Heap:
        """Attach existing heap ``name``; HeapNotFoundError if there is none.

        Waits up to ``timeout`` seconds for a heap that is still being created.
        """
        check_name(name)
        seg = _open_ready_control(name, readonly, timeout)
        try:
            params, _state = control.read_params(seg.buf, f"/dev/shm/{control_name(name)}")
        except BaseException:
            seg.close()
            raise
        return cls(name, seg, params, readonly)

    @classmethod
    def open(cls, name: str, create: bool = True, readonly: bool = False,
             **create_args: Any) -> Heap:
        """Attach heap ``name``, creating it first if it does not exist and ``create``.

        Any number of processes may race this on one name: exactly one creates,
        all end attached to the same heap.
        """
        if not create:
            return cls.attach(name, readonly=readonly)
        for _ in range(100):
            try:
                heap = cls.create(name, **create_args)
            except HeapExistsError:
                pass
            else:
                if readonly:
                    heap.close()
                    return cls.attach(name, readonly=True)
                return heap
            try:
                return cls.attach(name, readonly=readonly)
            except HeapNotFoundError:
                continue  # destroyed between our create and attach: try again
        raise HeapCorruptError(f"heap {name!r} keeps appearing and vanishing; is something "
                               "destroying it in a loop?")

    def close(self) -> None:
        """Unmap this process's view and release its slot.  The heap lives on."""
        if isinstance(self._lock, _ClosedLock):
            return
        self._lock = _ClosedLock(self.name)
        self._release_resources()

    def _release_resources(self) -> None:
        for arena in self._arenas.values():
            arena.close()
        self._arenas.clear()
        self._index.close()
        if self._map is not None:
            self._map.close()
        if self._live is not None:
            self._live.close()
        if self._sem is not None:
            with contextlib.suppress(Exception):
                self._sem.close()
        self._header.release()
        self._words.release()
        self._control.close()

    def destroy(self) -> None:
        """Unlink every object of this heap, then close this handle.

        Processes that have arenas or snapshots mapped keep reading them; new
        attaches get HeapNotFoundError.
        """
        self._check_open()
        self.close()
        destroy(self.name)

    @property
    def closed(self) -> bool:
        return isinstance(self._lock, _ClosedLock)

    def __enter__(self) -> Heap:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("readonly" if self.readonly else "attached")
        return f"<Heap {self.name!r} arena_size={self.arena_size} {state}>"

    def _check_open(self) -> None:
        if self.closed:
            raise HeapClosedError(f"heap {self.name!r} is closed; attach it again to use it")

    def _check_writable(self, what: str) -> None:
        self._check_open()
        if self.readonly:
            raise ReadOnlyError(f"heap {self.name!r} is attached readonly; {what} needs a "
                                "writable attach (Heap.attach(name))")

    # -- the lock -------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the heap lock (recovering a dead holder) for the ``with`` body."""
        self._lock.acquire(timeout)
        try:
            yield
        finally:
            self._lock.release()

    # -- arenas -----------------------------------------------------------------------

    def grow(self, at: int | None = None, timeout: float | None = None) -> arenas.Arena:
        """Create one arena and record it in the index.

        Without ``at``: at the lowest free index at or above the hint (wrapping
        to 1 past ``max_arenas``), moving the hint past it.  With ``at``: at
        exactly that index, ArenaCollisionError if it is taken.
        """
        self._check_writable("grow()")
        if at is not None and (not isinstance(at, int) or isinstance(at, bool)
                               or not 1 <= at < self.max_arenas):
            raise InvalidParameterError(
                f"grow(at={at!r}): an arena index must be an int in [1, {self.max_arenas})")
        assert self._map is not None and self._live is not None
        # Building (and reserving) the segment is the slow part: do it before
        # taking the lock, under this process's own temporary name.
        seg = arenas.build(self.name, self._live.slot, self.arena_size, self.params.mode,
                           self.params.reserve, self.params.page_size)
        try:
            crash.reach("grow.segment_created")
            with self.locked(timeout):
                self._index.header()  # a broken heap fails here, before anything is linked
                index = self._link_new_arena(seg, at)
                crash.reach("grow.segment_linked")
                try:
                    self._index.append(index)
                except BaseException:
                    segments.unlink(arena_name(self.name, index))  # never published
                    raise
                self._map.add(index)
                crash.reach("grow.map_set")
                if at is None:
                    self._words[control.HINT_OFFSET // 8] = index + 1
                crash.reach("grow.hint_moved")
        except BaseException:
            seg.close()
            raise
        finally:
            segments.unlink(seg.name)
        arena = arenas.Arena(index, self.arena_size, seg)
        self._arenas[index] = arena
        return arena

    def _link_new_arena(self, seg: segments.Segment, at: int | None) -> int:
        """Link ``seg`` at ``at`` or at the next free index; return the index."""
        assert self._map is not None
        link = arenas.link
        if at is not None:
            if at in self._map or not link(self.name, seg, self.params.heap_id,
                                           self.arena_size, at):
                raise ArenaCollisionError(
                    f"heap {self.name!r}: arena index {at} is already taken; choose another "
                    "index or call grow() without at=")
            return at
        hint = self._words[control.HINT_OFFSET // 8]
        start = hint if 1 <= hint < self.max_arenas else 1
        for lo, hi in ((start, self.max_arenas), (1, start)):
            index = self._map.next_free(lo, hi)
            while index is not None:
                if link(self.name, seg, self.params.heap_id, self.arena_size, index):
                    return index
                index = self._map.next_free(index + 1, hi)
        raise AddressSpaceExhaustedError(
            f"heap {self.name!r}: all {self.max_arenas - 1} arena indices are taken; create "
            "the heap with a larger max_arenas or arena_size")

    def arena(self, index: int) -> arenas.Arena:
        """The arena at ``index``, mapped on first use; KeyError if there is none."""
        arena = self._arenas.get(index)
        if arena is not None:
            return arena
        self._check_open()
        assert self._map is not None
        if not isinstance(index, int) or index not in self._map:
            raise KeyError(index)
        arena = arenas.open_arena(self.name, self.params.heap_id, index, self.arena_size,
                                  self.readonly, self.params.page_size)
        self._arenas[index] = arena
        return arena

    def __contains__(self, index: object) -> bool:
        self._check_open()
        assert self._map is not None
        return isinstance(index, int) and index in self._map

    # -- the index ----------------------------------------------------------------------

    def snapshot(self, timeout: float | None = None) -> ArenaSnapshot:
        """Copy the index header under the lock; the snapshot is read with no lock.

        Snapshots are immutable, so while the header word is unchanged the
        previous snapshot object is returned again.
        """
        word = self._lock.read_word(self._header, timeout)
        last = self._last_snapshot
        if last[0] == word:
            return last[1]
        snap = self._index.snapshot_of(word)
        self._last_snapshot = (word, snap)
        return snap

    def arenas(self, timeout: float | None = None) -> Iterator[arenas.Arena]:
        """The arenas of a fresh snapshot, in creation order; no lock held while iterating."""
        arena = self.arena
        for index in self.snapshot(timeout):
            try:
                yield arena(index)
            except KeyError:
                raise HeapCorruptError(
                    f"heap {self.name!r}: the index lists arena {index}, which the arena map "
                    f"does not know; run `shmheap fsck {self.name}`") from None

    def check(self, repair: bool = False, timeout: float | None = None) -> list[Finding]:
        """Check every invariant (``shmheap fsck``); with ``repair``, fix what can be fixed.

        An empty list means the heap is clean.
        """
        if repair:
            self._check_writable("check(repair=True)")
        self._check_open()
        lock = self._lock
        assert isinstance(lock, HeapLock)
        adoptions = lock.adoptions
        with self.locked(timeout):
            findings = run_checks(self, repair)
        if lock.adoptions != adoptions:
            findings.insert(0, Finding(
                "dead-owner", "the heap lock was held by a process that died; it was adopted "
                "and the crash repaired (any process's next lock would have done the same)",
                fixed=True))
        return findings

    def info(self, timeout: float | None = None) -> HeapInfo:
        self._check_open()
        with self.locked(timeout):
            generation, length = self._index.header()
            hint = int(self._words[control.HINT_OFFSET // 8])
        assert self._live is not None
        recoveries, last_ns, repairs = self._live.counters()
        return HeapInfo(
            name=self.name, arenas=length, index_len=length,
            index_cap=self._index.capacity(generation), index_generations=generation + 1,
            index_bytes=self._index.bytes_through(generation), arena_size=self.arena_size,
            max_arenas=self.max_arenas,
            reserved_bytes=length * arenas.segment_size(self.arena_size, self.params.page_size),
            hint=hint,
            readonly=self.readonly, attached=len(self._live.attachments()),
            lock_owner_pid=self._live.owner_pid(), recoveries=recoveries,
            last_recovery_ns=last_ns, repairs=repairs, created_ns=self.params.created_ns)

    # -- objects (allocator.py) and heap walking (walker.py) ----------------------------

    _allocator: Allocator | None = None

    def _objects(self) -> Allocator:
        """This handle's allocator, made on first use."""
        allocator = self._allocator
        if allocator is None or type(self._lock) is _ClosedLock:
            self._check_open()
            allocator = self._allocator = Allocator(self)
        return allocator

    def alloc(self, nbytes: int) -> int:
        """A new zeroed object of at least ``nbytes`` bytes; returns its heap address.

        The address is a plain non-zero int, valid in every attached process.
        """
        return self._objects().alloc(nbytes)

    def free(self, ref: int) -> None:
        """Free the object at heap address ``ref`` (allocated by any process)."""
        self._objects().free(ref)

    def view(self, ref: int) -> memoryview:
        """A memoryview of exactly the object's ``size_of(ref)`` bytes (read-only if readonly)."""
        return self._objects().view(ref)

    def size_of(self, ref: int) -> int:
        """Bytes of the object at ``ref``: ``alloc(n)`` rounded up to its size class or pages."""
        return self._objects().size_of(ref)

    def ndarray(self, ref: int, dtype: Any, shape: int | tuple[int, ...] | None = None) -> Any:
        """A zero-copy numpy array over the object at ``ref`` (needs the numpy extra)."""
        return as_ndarray(self.view(ref), dtype, shape)

    def walk(self) -> Iterator[walker.SpanInfo]:
        """Every in-use span and its live objects, read with no lock (see walker.py)."""
        return walker.walk(self)

    def stats(self) -> walker.HeapStats:
        """Bytes in use, free, reserved and released; objects per size class."""
        return walker.stats(self)

    def start_cycle(self) -> int:
        """Begin a mark/sweep cycle (clear every mark); returns the cycle number."""
        return walker.start_cycle(self)

    def mark(self, ref: int) -> None:
        """Mark the object at ``ref`` as live for the current cycle."""
        walker.mark(self, ref)

    def sweep(self) -> walker.SweepReport:
        """Free what the current cycle left unmarked; several processes may sweep at once."""
        return walker.sweep(self)

    def scavenge(self) -> walker.ScavengeReport:
        """Return the memory of free pages to the OS."""
        return walker.scavenge(self)


def _remove_leftovers(name: str) -> None:
    """Unlink every object of ``name`` but its control segment (creator only).

    The creator holds the control segment exclusively, so anything else under
    the name is left over from a heap whose destroy did not finish.
    """
    for entry in segments.list_all():
        if owns(name, entry) and entry != control_name(name):
            _unlink_entry(name, entry)


def _unlink_entry(name: str, entry: str) -> None:
    if entry.startswith("sem."):
        unlink_semaphore(semaphore_name(name))
    else:
        segments.unlink(entry)


def _open_ready_control(name: str, readonly: bool, timeout: float) -> segments.Segment:
    """Map the control segment of ``name`` once its creator has made it READY.

    While it is not READY the creator holds an OFD lock on its first byte; a
    segment that is not READY with nobody holding that lock (seen twice, in
    case the creator has not taken it yet) was left by a creator that died.
    """
    seg_name = control_name(name)
    where = f"/dev/shm/{seg_name}"
    deadline = time.monotonic() + timeout
    creator_seen_gone = False
    while True:
        try:
            fd = segments.open_fd(seg_name, readonly)
        except HeapNotFoundError:
            raise HeapNotFoundError(
                f"no heap named {name!r}; create it with Heap.create({name!r}) or "
                f"`shmheap create {name}`") from None
        try:
            size = os.fstat(fd).st_size
            state = control.peek_state(os.pread(fd, control.SIZE, 0), where)
            # A BROKEN heap attaches (so that fsck can repair it); every use of its
            # poisoned header then raises HeapCorruptError.
            if state in (control.READY, control.BROKEN):
                if size != control.SIZE:
                    raise HeapCorruptError(f"{where} has {size} bytes, expected "
                                           f"{control.SIZE}; destroy the heap")
                owned, fd = fd, -1  # the Segment owns (and on failure closes) it now
                return segments.Segment(seg_name, owned, size, readonly, keep_fd=False)
            creator_alive = liveness.is_locked(fd, control.INIT_LOCK_BYTE)
        finally:
            if fd >= 0:
                os.close(fd)
        if not creator_alive:
            if creator_seen_gone:
                raise HeapCorruptError(
                    f"heap {name!r} is incomplete ({where} has {size} bytes, state "
                    f"{control.STATE_NAMES[state]}): its creator died while initialising it or "
                    f"the segment was damaged; remove it with `shmheap destroy {name}`")
            creator_seen_gone = True
        if time.monotonic() >= deadline:
            raise HeapCorruptError(
                f"heap {name!r} is still initialising after {timeout} s; if its creator is "
                f"gone, remove it with `shmheap destroy {name}`")
        time.sleep(0.01)


def destroy(name: str) -> list[str]:
    """Unlink every object of heap ``name`` (even a damaged one); return what was removed.

    HeapNotFoundError if there was nothing to remove.  The control segment
    goes last, so nobody can create a new heap of this name while the old
    one's objects are still being removed.
    """
    check_name(name)
    removed = []
    entries = [e for e in segments.list_all() if owns(name, e)]
    for entry in sorted(entries, key=lambda e: e == control_name(name)):
        _unlink_entry(name, entry)
        removed.append(entry)
    if not removed:
        raise HeapNotFoundError(f"no heap named {name!r} to destroy")
    return removed


