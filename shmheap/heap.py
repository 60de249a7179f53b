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
* giant.py     -- objects larger than an arena, over consecutive arenas
* roots.py     -- ``heap.roots``: objects found by name
* arrays.py    -- typed arrays: ``new_array`` and ``ndarray``

Creation is crash-safe: the creator makes the control segment exclusively
(the one creator wins), holds an OFD lock on its first byte while it is
``INITIALISING``, and moves it to ``READY`` last.  An attacher waits for
``READY``; if the state is not ready and nobody holds the init lock, the
creator died and the attacher raises HeapCorruptError.

``grow``: build and reserve the arena under this process's temporary name
(no lock: only the holder of our liveness slot uses that name; the slot's
``building`` byte says so, so the arena of a grower that dies is removed by
the next ``grow`` or attach); then, under the heap lock and in this order
(invariant 4): journal ``GROW(i)`` -> link it under its final name (a taken
name is a collision: clear the journal, try the next free index) -> append
its index (publication) -> set its map bit -> move the hint -> clear the
journal.  Stopped anywhere in between, the journal tells the next writable
lock holder what to finish or undo (repair.py).

Every lock hold goes through ``HeapLock.run`` (lock.py), which releases the
lock however the body is left; every call that can wait takes ``timeout=``
(seconds, None for ever).

The methods at the end of ``Heap`` (alloc ... scavenge) delegate to the
allocator and walker, made lazily per handle.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, TypeVar

from . import arenas, arrays, control, core, crash, liveness, segments, walker
from .allocator import Allocator, size_classes
from .errors import (
    AddressSpaceExhaustedError,
    ArenaCollisionError,
    ArenaNotFoundError,
    HeapClosedError,
    HeapCorruptError,
    HeapExistsError,
    HeapNotFoundError,
    HeapRemovalError,
    InvalidParameterError,
    LockTimeoutError,
    ReadOnlyError,
    ShmHeapError,
)
from .index import ArenaIndex, ArenaSnapshot
from .liveness import Liveness
from .lock import (
    HeapLock,
    LockedBlock,
    check_timeout,
    deadline_of,
    open_semaphore,
    unlink_semaphore,
)
from .names import (
    PAGE_SIZE,
    check_arena_size,
    check_max_arenas,
    check_name,
    control_name,
    owns,
    semaphore_name,
    temp_arena_name,
)
from .pages import DEFAULT_PAGE_SIZE, ArenaPages, check_page_size, layout
from .repair import Finding, repair_journal, run_checks
from .roots import Roots, RootTable
from .summary import Summaries

_T = TypeVar("_T")
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
    #: roots bound (``len(heap.roots)``)
    roots: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _ClosedLock:
    """Stands in for the lock of a closed heap: every use raises HeapClosedError."""

    adoptions = 0

    def __init__(self, name: str) -> None:
        self._message = f"heap {name!r} is closed; attach it again to use it"

    def run(self, body: Callable[[], _T], deadline: float | None = None,
            write: bool = False) -> _T:
        raise HeapClosedError(self._message)

    def read_word(self, view: memoryview, deadline: float | None = None) -> int:
        raise HeapClosedError(self._message)

    def enter(self, block: LockedBlock, deadline: float | None, write: bool) -> bool:
        raise HeapClosedError(self._message)

    def leave(self) -> None:
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
        self._live: Liveness | None = None
        self._summaries: Summaries | None = None
        self._roots: RootTable | None = None
        self.pages_per_arena = layout(params.arena_size, params.page_size).pages
        #: the arenas this process has mapped (bounded: arenas.ArenaCache)
        self._pages = arenas.ArenaCache(self._open_pages, segments.mapping_budget())
        self._map: arenas.ArenaMap | None = None
        self._index = ArenaIndex(name, self._header, params.first_cap, params.mode, readonly)
        self._lock: HeapLock | _ClosedLock = _ClosedLock(name)
        self._journal = control.Journal(self._words)
        #: what the last journal repair of this handle fixed (for ``check``)
        self._journal_findings: list[Finding] = []
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
            part = "summary segment"
            self._summaries = Summaries(name, params.max_arenas, self._class_count(), readonly)
            part = "roots segment"
            self._roots = RootTable(name, readonly)
        except HeapNotFoundError:
            self._release_resources()
            raise HeapCorruptError(
                f"heap {name!r} is damaged: its {part} is missing; remove the heap with "
                f"`shmheap destroy {name}`") from None
        except BaseException:
            self._release_resources()
            raise
        assert self._roots is not None
        #: objects found by name (roots.py)
        self.roots = Roots(self, self._roots)
        # The slot is ours alone now: a new arena its previous holder left unlinked is dead.
        # (Something foreign under that name is grow()'s error, not attach's.)
        with contextlib.suppress(ShmHeapError):
            segments.remove_own(temp_arena_name(name, self._live.slot))
        journal = control_seg.buf[control.JOURNAL_OFFSET:control.JOURNAL_OFFSET + 8].cast("Q")
        self._journal_word = journal
        self._lock = HeapLock(self._sem, self._live, name, journal, self._header,
                              self._repair_journal)
        if self._lock.native is not None and core.native is not None:
            # The native core reads the header and builds snapshots in one C call.
            self.snapshot = core.native.Snapshots(  # type: ignore[method-assign]
                self._lock.native, self._index.reader, deadline_of)
        self._recycle_dead_slots()

    def _class_count(self) -> int:
        return len(size_classes(self.params.page_size, self.pages_per_arena))

    def _open_pages(self, index: int) -> ArenaPages:
        """Map published arena ``index`` with its page views (ArenaCache calls it)."""
        self._check_open()
        assert self._summaries is not None
        arena = arenas.open_arena(self.name, self.params.heap_id, index, self.arena_size,
                                  self.readonly, self.params.page_size)
        return ArenaPages(self.name, arena, self.params.page_size, self._summaries)

    def _recycle_dead_slots(self) -> None:
        """Recycle the slots of processes that died attached, if the lock is free now.

        Slots are recycled only by a lock holder (liveness.py).  Attaching
        repairs nothing: a dirty journal waits for the first writable call.
        """
        assert self._live is not None
        live = self._live
        with contextlib.suppress(LockTimeoutError):
            self._lock.run(live.recycle_dead_slots, time.monotonic())

    def _repair_journal(self) -> None:
        """Finish or undo the mutation the journal names (HeapLock calls it, lock held)."""
        self._journal_findings = repair_journal(self)

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
            # The init lock is taken right after the exclusive create, before the
            # segment is sized: an attacher or `gc` never sees it unlocked while we live.
            seg = segments.create(control_name(name), control.SIZE, mode, keep_fd=True,
                                  on_open=control.lock_init)
        except HeapExistsError:
            st = segments.lstat(control_name(name))
            problem = segments.foreign(st) if st is not None else ""
            if problem:
                raise HeapExistsError(
                    f"heap name {name!r} is taken: /dev/shm/{control_name(name)} {problem}; "
                    "choose another name, or have it removed") from None
            raise HeapExistsError(
                f"heap {name!r} already exists; attach to it, or remove it with "
                f"`shmheap destroy {name}`") from None
        assert seg.fd is not None
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
            Summaries.create(name, max_arenas, len(size_classes(
                page_size, layout(arena_size, page_size).pages)), mode)
            RootTable.create(name, mode)
            words[control.HEADER_OFFSET // 8] = control.make_header(0, 0)
            words[control.HINT_OFFSET // 8] = 1
            words.release()
            heap = cls(name, seg, params, readonly=False)
            heap._index.create_first()
            crash.reach("create.initialised")
            control.write_state(seg.buf, control.READY)
        except BaseException:
            _remove_own_objects(name)
            seg.close()
            raise
        liveness.unlock(seg.fd, control.INIT_LOCK_BYTE)
        os.close(seg.fd)
        seg.fd = None
        return heap

    @classmethod
    def attach(cls, name: str, readonly: bool = False,
               timeout: float | None = ATTACH_TIMEOUT) -> Heap:
        """Attach existing heap ``name``; HeapNotFoundError if there is none.

        Waits up to ``timeout`` seconds (None: for ever) for a heap that is
        still being created.
        """
        check_name(name)
        deadline = deadline_of(timeout)
        seg = _open_ready_control(name, readonly, deadline)
        try:
            params, _state = control.read_params(seg.buf, f"/dev/shm/{control_name(name)}")
        except BaseException:
            seg.close()
            raise
        return cls(name, seg, params, readonly)

    @classmethod
    def open(cls, name: str, create: bool = True, readonly: bool = False,
             timeout: float | None = ATTACH_TIMEOUT, **create_args: Any) -> Heap:
        """Attach heap ``name``, creating it first if it does not exist and ``create``.

        Any number of processes may race this on one name: exactly one creates,
        all end attached to the same heap.  ``timeout`` as for ``attach``.
        """
        check_timeout(timeout)
        if not create:
            return cls.attach(name, readonly=readonly, timeout=timeout)
        for _ in range(100):
            try:
                heap = cls.create(name, **create_args)
            except HeapExistsError:
                pass
            else:
                if readonly:
                    heap.close()
                    return cls.attach(name, readonly=True, timeout=timeout)
                return heap
            try:
                return cls.attach(name, readonly=readonly, timeout=timeout)
            except HeapNotFoundError:
                continue  # destroyed between our create and attach: try again
        raise HeapCorruptError(f"heap {name!r} keeps appearing and vanishing; is something "
                               "destroying it in a loop?")

    def close(self) -> None:
        """Unmap this process's view and release its slot.  The heap lives on."""
        lock = self._lock
        if isinstance(lock, _ClosedLock):
            return
        self._lock = _ClosedLock(self.name)
        for bound in ("snapshot", "alloc", "free"):  # the native core's, if they were bound
            self.__dict__.pop(bound, None)
        lock.close()
        self._release_resources()

    def _release_resources(self) -> None:
        if hasattr(self, "roots"):
            self.roots.forget()
        if self._roots is not None:
            self._roots.close()
        self._pages.close()
        if self._summaries is not None:
            self._summaries.close()
        self._index.close()
        if self._map is not None:
            self._map.close()
        if self._live is not None:
            self._live.close()
        if self._sem is not None:
            with contextlib.suppress(Exception):
                self._sem.close()
        self._header.release()
        if hasattr(self, "_journal_word"):
            self._journal_word.release()
        self._words.release()
        self._control.close()

    def destroy(self) -> None:
        """Unlink every object of this heap, then close this handle.

        Processes that have arenas or snapshots mapped keep reading them; new
        attaches get HeapNotFoundError.  ReadOnlyError on a read-only handle;
        HeapNotFoundError if this heap is gone already (a heap re-created
        under its name since is another heap, left alone).
        """
        self._check_writable("destroy() (or the module function shmheap.destroy(name))")
        self._check_identity()
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

    def _check_identity(self) -> None:
        """HeapNotFoundError if this handle's heap was destroyed (or replaced) since it attached.

        One ``lstat``: called where a mutation is about to create or change
        something beyond the memory this handle has mapped, never on the
        allocator's fast path.
        """
        if segments.identity_of(control_name(self.name)) != self._control.identity:
            raise HeapNotFoundError(
                f"heap {self.name!r} was destroyed (and maybe re-created as another heap) "
                "since this handle attached it; close this handle and attach again")

    # -- the lock -------------------------------------------------------------------

    def locked(self, timeout: float | None = None) -> LockedBlock:
        """``with heap.locked():`` holds the heap lock for the body (recovering a dead holder).

        A writable handle first repairs what a holder stopped half-way left
        (the journal).  Blocks nest, and heap calls inside one run under its
        hold.
        """
        self._check_open()
        lock = self._lock
        assert isinstance(lock, HeapLock)
        return LockedBlock(lock, deadline_of(timeout), write=not self.readonly)

    # -- arenas -----------------------------------------------------------------------

    def grow(self, at: int | None = None, timeout: float | None = None) -> arenas.Arena:
        """Create one arena and record it in the index.

        Without ``at``: at the lowest free index at or above the hint (wrapping
        to 1 past ``max_arenas``), moving the hint past it.  With ``at``: at
        exactly that index, ArenaCollisionError if it is taken.
        """
        self._check_writable("grow()")
        deadline = deadline_of(timeout)
        if at is not None and (not isinstance(at, int) or isinstance(at, bool)
                               or not 1 <= at < self.max_arenas):
            raise InvalidParameterError(
                f"grow(at={at!r}): an arena index must be an int in [1, {self.max_arenas})")
        return self.build_arena(lambda seg: self._publish_arena(seg, at), deadline,
                                "grow.segment_created")

    def build_arena(self, publish: Callable[[segments.Segment], int], deadline: float | None,
                    built: str) -> arenas.Arena:
        """Make a new arena and ``publish(segment)`` it under the lock; return it, mapped.

        Building (and reserving) the segment is the slow part: it is done
        before taking the lock, under this process's own temporary name, and
        crash point ``built`` is reached between the two.  ``publish`` links,
        appends and maps it (journaled) and returns its index.
        """
        live = self._live
        assert live is not None
        self._check_identity()
        live.set_building(True)
        try:
            seg = arenas.build(self.name, live.slot, self.arena_size, self.params.mode,
                               self.params.reserve, self.params.page_size)
            try:
                crash.reach(built)
                index = self._lock.run(lambda: publish(seg), deadline, write=True)
            except BaseException:
                seg.close()
                raise
        finally:
            with contextlib.suppress(ShmHeapError):
                segments.remove_own(temp_arena_name(self.name, live.slot))
            live.set_building(False)
        return self.cache_new_arena(seg, index).arena

    def cache_new_arena(self, seg: segments.Segment, index: int) -> ArenaPages:
        """The page view of new arena ``seg``, published at ``index``, kept by this process's
        arena cache (once: ``publish`` may have called this already)."""
        pages = self._pages.recent.get(index)
        if pages is None or pages.arena.mapping is not seg.map:
            assert self._summaries is not None
            pages = ArenaPages(self.name, arenas.Arena(index, self.arena_size, seg),
                               self.params.page_size, self._summaries)
            self._pages.add(pages)
        return pages

    def _publish_arena(self, seg: segments.Segment, at: int | None) -> int:
        """Link, append and map the new arena ``seg`` (lock held); returns its index."""
        self.before_link()
        index = self._link_new_arena(seg, at)
        crash.reach("grow.segment_linked")
        self.add_arena(index)
        crash.reach("grow.map_set")
        if at is None:
            self._words[control.HINT_OFFSET // 8] = index + 1
        crash.reach("grow.hint_moved")
        self._journal.end()
        return index

    def before_link(self) -> None:
        """The checks before a new arena is linked (lock held); dead growers' arenas go."""
        assert self._live is not None
        self._index.header()  # a broken heap fails here, before anything is linked
        self._check_identity()  # nor is anything linked under a recycled name
        self._live.recycle_dead_slots(builders_only=True)

    def add_arena(self, index: int) -> None:
        """Append arena ``index``, linked under its final name, to the index and set its map
        bit (lock held, the journal naming it): it is published, all free pages."""
        assert self._map is not None and self._summaries is not None
        self._index.append(index)
        self._map.add(index)
        self._summaries.free.set(index, self.pages_per_arena)

    def _link_new_arena(self, seg: segments.Segment, at: int | None) -> int:
        """Link ``seg`` at ``at`` or at the next free index; return the index.

        Leaves the journal saying ``GROW(index)``: from the link on, the arena
        exists under its final name.
        """
        assert self._map is not None
        if at is not None:
            if at in self._map or not self.try_link(seg, at):
                raise ArenaCollisionError(
                    f"heap {self.name!r}: arena index {at} is already taken; choose another "
                    "index or call grow() without at=")
            return at
        hint = self._words[control.HINT_OFFSET // 8]
        start = hint if 1 <= hint < self.max_arenas else 1
        for lo, hi in ((start, self.max_arenas), (1, start)):
            index = self._map.next_free(lo, hi)
            while index is not None:
                if self.try_link(seg, index):
                    return index
                index = self._map.next_free(index + 1, hi)
        raise AddressSpaceExhaustedError(
            f"heap {self.name!r}: all {self.max_arenas - 1} arena indices are taken; create "
            "the heap with a larger max_arenas or arena_size")

    def try_link(self, seg: segments.Segment, index: int,
                 journal: tuple[int, int, int] | None = None) -> bool:
        """Journal ``GROW(index)`` (or ``journal``: op, arena, arg) and link ``seg`` at
        ``index``; on a collision clear the journal and return False.

        The summary leaves of ``index`` get their memory first (summary.py).
        """
        assert self._summaries is not None
        self._summaries.reserve_leaves(index)
        self._journal.begin(*(journal or (control.GROW, index, 0)))
        if arenas.link(self.name, seg, self.params.heap_id, self.arena_size, index):
            return True
        self._journal.end()
        return False

    def arena(self, index: int) -> arenas.Arena:
        """The arena at ``index``, mapped on first use; ArenaNotFoundError (a KeyError) if none."""
        if type(index) is not int:
            raise InvalidParameterError(
                f"arena({index!r}): an arena index is an int, not {type(index).__name__}")
        pages = self._pages.recent.get(index)
        if pages is not None:
            return pages.arena
        self._check_open()
        assert self._map is not None
        if index not in self._map:
            raise ArenaNotFoundError(
                f"heap {self.name!r} has no arena {index}; its arenas are listed by "
                "heap.snapshot()")
        return self.published_arena(index)

    def published_arena(self, index: int) -> arenas.Arena:
        """The arena at ``index``, which a snapshot lists (so no map lookup); mapped on demand."""
        return self._pages.get(index).arena

    def __contains__(self, index: object) -> bool:
        self._check_open()
        assert self._map is not None
        return type(index) is int and index in self._map

    # -- the index ----------------------------------------------------------------------

    def snapshot(self, timeout: float | None = None) -> ArenaSnapshot:
        """Copy the index header under the lock; the snapshot is read with no lock.

        Snapshots are immutable, so while the header word is unchanged the
        previous snapshot object is returned again.
        """
        word = self._lock.read_word(self._header, None if timeout is None
                                    else deadline_of(timeout))
        last = self._last_snapshot
        if last[0] == word:
            return last[1]
        snap = self._index.snapshot_of(word)
        self._last_snapshot = (word, snap)
        return snap

    def arenas(self, timeout: float | None = None) -> Iterator[arenas.Arena]:
        """The arenas of a fresh snapshot, in creation order; no lock held while iterating."""
        arena = self.published_arena
        for index in self.snapshot(timeout):
            yield arena(index)

    def check(self, repair: bool = False, timeout: float | None = None) -> list[Finding]:
        """Check every invariant (``shmheap fsck``); with ``repair``, fix what can be fixed.

        An empty list means the heap is clean; a finding with ``fixed`` set
        was repaired.  Slots of processes that exited without closing are
        recycled on the way and are no finding.
        """
        if repair:
            self._check_writable("check(repair=True)")
            self._check_identity()
        self._check_open()
        deadline = deadline_of(timeout)
        lock = self._lock
        assert isinstance(lock, HeapLock)
        adoptions = lock.adoptions
        self._journal_findings = []
        findings = lock.run(lambda: run_checks(self, repair), deadline, write=repair)
        findings[:0] = self._journal_findings
        if lock.adoptions != adoptions:
            findings.insert(0, Finding(
                "dead-owner", "the heap lock was held by a process that died; it was adopted "
                "(any process's next lock would have done the same)", fixed=True))
        return findings

    def info(self, timeout: float | None = None) -> HeapInfo:
        """Parameters, index, lock and liveness counters (the lock held to read the header)."""
        self._check_open()
        words = self._words
        generation, length, hint = self._lock.run(
            lambda: (*self._index.header(), int(words[control.HINT_OFFSET // 8])),
            deadline_of(timeout))
        assert self._live is not None
        recoveries, last_ns, repairs = self._live.counters()
        roots = len(self.roots)
        return HeapInfo(
            name=self.name, arenas=length, index_len=length,
            index_cap=self._index.capacity(generation), index_generations=generation + 1,
            index_bytes=self._index.bytes_through(generation), arena_size=self.arena_size,
            max_arenas=self.max_arenas,
            reserved_bytes=length * arenas.segment_size(self.arena_size, self.params.page_size),
            hint=hint,
            readonly=self.readonly, attached=len(self._live.attachments()),
            lock_owner_pid=self._live.owner_pid(), recoveries=recoveries,
            last_recovery_ns=last_ns, repairs=repairs, created_ns=self.params.created_ns,
            roots=roots)

    # -- objects (allocator.py) and heap walking (walker.py) ----------------------------

    _allocator: Allocator | None = None

    def _objects(self) -> Allocator:
        """This handle's allocator, made on first use."""
        allocator = self._allocator
        if allocator is None or type(self._lock) is _ClosedLock:
            self._check_open()
            allocator = self._allocator = Allocator(self)
            if core.native is not None:  # the native fast paths, called directly
                self.alloc = allocator.alloc  # type: ignore[method-assign]
                self.free = allocator.free  # type: ignore[method-assign]
        return allocator

    def alloc(self, nbytes: int, timeout: float | None = None) -> int:
        """A new zeroed object of at least ``nbytes`` bytes; returns its heap address.

        The address is a plain non-zero int, valid in every attached process.
        ``timeout`` bounds the wait for the heap lock (most calls take none).
        """
        return self._objects().alloc(nbytes, timeout)

    def free(self, ref: int, timeout: float | None = None) -> None:
        """Free the object at heap address ``ref`` (allocated by any process).

        A ref carries no heap identity: a ref of another heap (or a stale one)
        that equals the address of a live object here frees that object, and
        a ``view()`` kept after a free shows whatever object reuses the memory.
        """
        self._objects().free(ref, timeout)

    def view(self, ref: int, timeout: float | None = None) -> memoryview:
        """A memoryview of exactly the object's ``size_of(ref)`` bytes (read-only if readonly).

        An object larger than an arena is one contiguous view too: its arenas
        mapped back to back, for as long as a view of them lives (giant.py).
        """
        return self._objects().view(ref, timeout)

    def size_of(self, ref: int, timeout: float | None = None) -> int:
        """Bytes of the object at ``ref``: ``alloc(n)`` rounded up to its size class or pages."""
        return self._objects().size_of(ref, timeout)

    def new_array(self, shape: int | tuple[int, ...], dtype: Any = "float64",
                  timeout: float | None = None) -> int:
        """A new zeroed array object that records its ``shape`` and ``dtype`` (numpy extra).

        Any numpy dtype without Python objects, structured ones included;
        ``ndarray(ref)`` returns it in any process.  Returns its heap address.
        """
        return arrays.new_array(self, shape, dtype, timeout)

    def ndarray(self, ref: int, dtype: Any = None, shape: int | tuple[int, ...] | None = None,
                timeout: float | None = None) -> Any:
        """A zero-copy numpy array over the object at ``ref`` (needs the numpy extra).

        An object made by ``new_array`` comes with its own shape and dtype
        (passing others is InvalidParameterError); any other object needs
        ``dtype`` (and is all of it, or its first ``shape`` items).
        """
        return arrays.ndarray(self.view(ref, timeout), ref, dtype, shape)

    def walk(self, timeout: float | None = None) -> Iterator[walker.SpanInfo]:
        """Every in-use span and its live objects, read with no lock (see walker.py)."""
        return walker.walk(self, deadline_of(timeout))

    def stats(self, timeout: float | None = None) -> walker.HeapStats:
        """Bytes in use, free, reserved and released; objects per size class."""
        return walker.stats(self, deadline_of(timeout))

    def arena_usage(self, timeout: float | None = None) -> list[dict[str, int]]:
        """Per arena, in index order: pages in use and released, spans, objects, live bytes."""
        return walker.arena_usage(self, deadline_of(timeout))

    def start_cycle(self, timeout: float | None = None) -> int:
        """Begin a mark/sweep cycle (clear every mark); returns the cycle number."""
        return walker.start_cycle(self, deadline_of(timeout))

    def mark(self, ref: int, timeout: float | None = None) -> None:
        """Mark the object at ``ref`` as live for the current cycle."""
        walker.mark(self, ref, deadline_of(timeout))

    def sweep(self, timeout: float | None = None) -> walker.SweepReport:
        """Free what the current cycle left unmarked; several processes may sweep at once."""
        return walker.sweep(self, deadline_of(timeout))

    def scavenge(self, timeout: float | None = None) -> walker.ScavengeReport:
        """Return the memory of free pages to the OS."""
        return walker.scavenge(self, deadline_of(timeout))


def _entries(name: str) -> list[str]:
    """The entries of /dev/shm under heap ``name``'s names, its control segment last."""
    entries = [e for e in segments.list_all() if owns(name, e)]
    return sorted(entries, key=lambda e: e == control_name(name))


def _remove_leftovers(name: str) -> None:
    """Unlink every object of ``name`` but its control segment (creator only).

    The creator holds the control segment exclusively, so anything else of
    this user under the name is left over from a heap whose destroy did not
    finish.  Anything else (another user's file, a FIFO, ...) is not ours to
    remove: ForeignObjectError, before anything is removed.
    """
    leftovers = [e for e in _entries(name) if e != control_name(name)]
    for entry in leftovers:
        segments.check_own(entry)
    for entry in leftovers:
        _unlink_entry(name, entry)


def _remove_own_objects(name: str) -> None:
    """After a failed create: remove what this user has under ``name``, as far as it can."""
    for entry in _entries(name):
        with contextlib.suppress(ShmHeapError):
            if segments.check_own(entry):
                _unlink_entry(name, entry)


def _unlink_entry(name: str, entry: str) -> None:
    if entry.startswith("sem."):
        unlink_semaphore(semaphore_name(name))
    else:
        segments.unlink(entry)


def _open_ready_control(name: str, readonly: bool,
                        deadline: float | None) -> segments.Segment:
    """Map the control segment of ``name`` once its creator has made it READY.

    While it is not READY the creator holds an OFD lock on its first byte
    (control.creator_active); a segment that is not READY, with nobody
    holding that lock, seen twice, was left by a creator that died.
    """
    seg_name = control_name(name)
    where = f"/dev/shm/{seg_name}"
    creator_seen_gone = False
    while True:
        try:
            fd, st = segments.open_fd(seg_name, readonly)
        except HeapNotFoundError:
            raise HeapNotFoundError(
                f"no heap named {name!r}; create it with Heap.create({name!r}) or "
                f"`shmheap create {name}`") from None
        try:
            size = st.st_size
            state = control.peek_state(os.pread(fd, control.SIZE, 0), where)
            # A BROKEN heap attaches (so that fsck can repair it); every use of its
            # poisoned header then raises HeapCorruptError.
            if state in (control.READY, control.BROKEN):
                if size != control.SIZE:
                    raise HeapCorruptError(f"{where} has {size} bytes, expected "
                                           f"{control.SIZE}; destroy the heap")
                owned, fd = fd, -1  # the Segment owns (and on failure closes) it now
                return segments.Segment(seg_name, owned, size, readonly, keep_fd=False,
                                        identity=(st.st_dev, st.st_ino))
            creator_alive = control.creator_active(fd)
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
        if deadline is not None and time.monotonic() >= deadline:
            raise LockTimeoutError(
                f"heap {name!r} is still being created (its creator holds the init lock); "
                "attach with a longer timeout, or if its creator is gone, remove it with "
                f"`shmheap destroy {name}`")
        time.sleep(0.01)


def destroy(name: str) -> list[str]:
    """Unlink every object of heap ``name`` (even a damaged one); return what was removed.

    HeapNotFoundError if there was nothing to remove.  The control segment
    goes last, so nobody can create a new heap of this name while the old
    one's objects are still being removed.  What cannot be removed (a
    directory, another user's file) is skipped; after removing the rest,
    HeapRemovalError lists it.
    """
    check_name(name)
    removed: list[str] = []
    failed: dict[str, str] = {}
    for entry in _entries(name):
        try:
            _unlink_entry(name, entry)
        except ShmHeapError as exc:
            failed[entry] = str(exc)
        else:
            removed.append(entry)
    if failed:
        raise HeapRemovalError(
            f"heap {name!r}: removed {len(removed)} objects; could not remove: "
            + "; ".join(failed.values()), removed, list(failed))
    if not removed:
        raise HeapNotFoundError(f"no heap named {name!r} to destroy")
    return removed


