"""Walking, marking, sweeping and scavenging a heap from any attached process.

Walk (``heap.walk()``, ``heap.stats()``)
    Take an index snapshot (the lock held only to copy the header), then read
    each arena's pageInUse bitmap and span records, and each small span's
    alloc bytes, with no lock.  Guarantees, for a walk that runs while other
    processes allocate and free:

    * an object allocated before the walk began and not freed until it
      ended is reported exactly once, in a span of its size class;
    * an object freed before the walk began is not reported;
    * an object allocated or freed while the walk runs may be reported or
      not (each span is read once, at some instant during the walk); an
      arena added after the snapshot is skipped altogether, like Go's
      ``sweepArenas``: whatever it holds was born after the walk began;
    * every number read is bounds-checked, so a racing reader never reads
      out of bounds.  A span's records are read between two equal, even
      reads of its arena's sequence word (pages.py ``read_span``) and read
      again if it changed; if the word keeps changing (other processes
      making and freeing spans in the same arena) or stays odd (a holder
      stopped mid-change), the span is read under the heap lock instead.
      So a span is never reported with one span's length and another's
      size class, and a busy arena never hides a span that stays in use.
    * a giant object (giant.py) is reported once, with its size, as its
      first arena's span; its other arenas' parts, and the parts of one
      still being made, are not objects (their giant records are read in
      the same steady read as their spans).

Mark and sweep (Go's mark bits and fast free-page reclaim)
    ``start_cycle()``: under the lock, bump the cycle number, record the
    index length (the cycle's arenas) and reset the sweep cursor; then
    clear every arena's pageMarks and every small span's mark bytes (Go's
    ``gcResetMarkState``), one arena per brief lock hold: Go clears with no
    lock because no span is freed in that phase, while here any process may
    free and remake a span at any time.  A span holding an object that roots
    are bound to (roots.py: its alloc byte above 1, or a large object's state
    byte above RELEASING) or that a structure of the heap holds (coord.py: a
    queue's node, a counter's cell, whose holder word is ``HELD``) gets its
    pageMarks bit back in the same hold: such objects are the roots of every
    cycle.  ``mark(ref)`` stores 1 into the
    object's mark byte and, if its span's pageMarks bit is not yet set, sets
    it under the lock (a bit is a read-modify-write, see pages.py).
    Objects allocated after ``start_cycle()`` returns are born marked (the
    owner stores mark=1 before alloc=1) and spans made after it are born with
    their pageMarks bit.  ``sweep()`` claims chunks of the cycle's pages from
    the shared cursor (one lock hold per chunk, as ``mheap.reclaim`` claims
    with an atomic add), and in each arena of a chunk:

    * frees under the lock every unowned span found through
      ``pageInUse &^ pageMarks`` (compared as bytes first: one memcmp per
      arena when every span is marked), without reading its objects; an
      unmarked giant object, found by its first part, is freed whole (its
      other parts' marks mean nothing);
    * in every other small span, frees each object whose alloc byte is 1
      and mark byte 0 (alloc read before mark, so an object the owner is
      allocating right now is seen marked), with one store per object, and
      frees the span itself if it is unowned and left empty.  An alloc byte
      above 1 is a bound object, a ``HELD`` holder word a structure's: never
      freed.

    Spans cached by dead processes are reclaimed (allocator.py) before the
    first chunk, so they are swept like any unowned span.

    Contract, as in Go: marking is finished before ``sweep()`` starts and no
    ``start_cycle()`` runs while a sweep does; an object allocated while
    ``start_cycle()`` is still clearing marks may lose its mark, so mark it
    if it is live.  A sweeper killed mid-chunk leaves that chunk's garbage to
    the next cycle.

Scavenge (``heap.scavenge()``)
    First, empty unowned spans and dead owners' spans become free pages.
    Then per arena, under the lock: every free page not yet released becomes
    RELEASING, its memory is returned with ``madvise(MADV_REMOVE)`` on this
    process's mapping of the arena (never by name: a recycled name belongs to
    another heap), and it becomes RELEASED (reads zero, no memory).  Reuse
    re-reserves it (if the heap reserves) and skips zeroing.

This module owns walking, stats, the mark/sweep cycle and the scavenger.
It changes page metadata only through pages.py and allocator.py, under the
lock, naming the arena in the journal.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from . import crash, giant
from .bytescan import nonzero_positions, positions
from .control import CYCLE_ARENAS_OFFSET, CYCLE_OFFSET, PAGES, SWEEP_CURSOR_OFFSET
from .index import ArenaSnapshot
from .lock import time_left
from .pages import RELEASED, RELEASING, ArenaPages, Giant, bits_set, runs

if TYPE_CHECKING:
    from .allocator import Allocator, SizeClass

#: Cycle numbers run 1..MAX_CYCLE, then start at 1 again.
MAX_CYCLE = 1 << 63
#: Pages a sweeper claims at once (rounded up to whole arenas).
SWEEP_CHUNK_PAGES = 16384
#: bytes of ``state | used << 2``: 1 where a page is free and not yet released
_RELEASABLE = bytes(1 if v in (0, 1, 3) else 0 for v in range(256))
#: the same: 1 where a page is free and released
_IS_RELEASED = bytes(1 if v == RELEASED else 0 for v in range(256))


@dataclass(frozen=True)
class SpanInfo:
    """One in-use span as a walk saw it."""

    arena: int
    #: heap address of the span's first byte
    address: int
    npages: int
    #: 0 for a large object, else the size class
    size_class: int
    object_size: int
    #: object slots (1 for a large object)
    capacity: int
    #: heap addresses of its live objects, ascending
    objects: tuple[int, ...]
    #: a process's cache owns it (it allocates there without the lock)
    cached: bool
    #: its pageMarks bit is set
    marked: bool

    @property
    def live_bytes(self) -> int:
        return len(self.objects) * self.object_size


@dataclass(frozen=True)
class ClassStats:
    """Spans and objects of one size class (size 0: large objects)."""

    size_class: int
    object_size: int
    spans: int
    capacity: int
    objects: int
    live_bytes: int


@dataclass(frozen=True)
class HeapStats:
    """What ``heap.stats()`` reports: pages and bytes by state, objects by size class."""

    arenas: int
    page_size: int
    pages: int
    pages_in_use: int
    pages_free: int
    pages_released: int
    #: arena data bytes (all pages)
    reserved_bytes: int
    #: bytes of the pages in spans
    in_use_bytes: int
    #: bytes of free pages (released ones included)
    free_bytes: int
    #: bytes of free pages whose memory was returned to the OS
    released_bytes: int
    live_objects: int
    live_bytes: int
    #: bytes of free slots in small spans
    free_slot_bytes: int
    cached_spans: int
    classes: tuple[ClassStats, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SweepReport:
    """What one ``sweep()`` call freed."""

    chunks: int = 0
    #: objects freed one by one in marked or cached spans
    objects_freed: int = 0
    #: spans freed whole (unmarked, or left empty)
    spans_freed: int = 0
    pages_freed: int = 0
    bytes_freed: int = 0

    def __add__(self, other: SweepReport) -> SweepReport:
        return SweepReport(*(a + b for a, b in zip(asdict(self).values(),
                                                   asdict(other).values(), strict=True)))


@dataclass(frozen=True)
class ScavengeReport:
    """What one ``scavenge()`` call returned to the OS."""

    pages: int = 0
    released_bytes: int = 0


# -- walking -------------------------------------------------------------------------------


def walk(allocator: Allocator, deadline: float | None = None) -> Iterator[SpanInfo]:
    """Every in-use span of every arena of a fresh snapshot, in arena order (no lock)."""
    heap = allocator.heap
    for index in heap.snapshot(time_left(deadline)):
        yield from arena_spans(allocator, allocator.pages_of(index), deadline)


def read_span(allocator: Allocator, pages: ArenaPages, start: int,
              deadline: float | None) -> tuple[int, int, Giant | None] | None:
    """(npages, sclass, giant record) of the span at ``start`` (pages.py ``span_record``):
    lock-free if it holds still, else locked."""
    found = pages.read_span(start)
    if found is None:
        found = allocator._lock.run(lambda: pages.span_record(start), deadline)
    return found


def arena_spans(allocator: Allocator, pages: ArenaPages,
                deadline: float | None = None) -> Iterator[SpanInfo]:
    shift = pages.page_shift
    for start in pages.starts():
        found = read_span(allocator, pages, start, deadline)
        if found is None or not allocator.span_ok(found[1], found[0]):
            continue
        npages, c, part = found
        address = pages.base + (start << shift)
        owner = pages.owner[start]
        if c == 0:
            if part is not None:  # a part of a giant object (giant.py)
                if part.part or owner:
                    continue  # listed with its first part; or not made yet
                npages = part.total
            yield SpanInfo(pages.index, address, npages, 0, npages << shift, 1, (address,),
                           bool(owner), pages.marked(start))
            continue
        cls = allocator.classes[c]
        a0 = start << shift
        first = address + cls.objects_at
        objects = tuple(first + k * cls.size
                        for k in nonzero_positions(bytes(pages.data[a0:a0 + cls.nelems])))
        yield SpanInfo(pages.index, address, npages, c, cls.size, cls.nelems, objects,
                       bool(owner), pages.marked(start))


def stats(allocator: Allocator, deadline: float | None = None) -> HeapStats:
    """Pages, bytes and objects of a fresh snapshot, read with no lock (see ``walk``)."""
    heap = allocator.heap
    snap = heap.snapshot(time_left(deadline))
    page_size = allocator.page_size
    per_class: dict[int, list[int]] = {}
    total = in_use = released = objects = live = free_slots = cached = 0
    for index in snap:
        pages = allocator.pages_of(index)
        used = pages.used_pages()
        total += pages.pages
        in_use += used.count(1)
        released += _state_bytes(pages, used).translate(_IS_RELEASED).count(1)
        for span in arena_spans(allocator, pages, deadline):
            row = per_class.setdefault(span.size_class, [0, 0, 0, 0])
            row[0] += 1
            row[1] += span.capacity
            row[2] += len(span.objects)
            row[3] += span.live_bytes
            objects += len(span.objects)
            live += span.live_bytes
            cached += span.cached
            if span.size_class:
                free_slots += (span.capacity - len(span.objects)) * span.object_size
    classes = tuple(ClassStats(c, allocator.classes[c].size if c else 0, *row)
                    for c, row in sorted(per_class.items()))
    return HeapStats(
        arenas=len(snap), page_size=page_size, pages=total, pages_in_use=in_use,
        pages_free=total - in_use, pages_released=released, reserved_bytes=total * page_size,
        in_use_bytes=in_use * page_size, free_bytes=(total - in_use) * page_size,
        released_bytes=released * page_size, live_objects=objects, live_bytes=live,
        free_slot_bytes=free_slots, cached_spans=cached, classes=classes)


def _state_bytes(pages: ArenaPages, used: bytes) -> bytes:
    """``state | used << 2`` per page: 0-3 for a free page's state, 4 and up for a used page."""
    count = pages.pages
    state = int.from_bytes(pages.state, "little")
    return (state | int.from_bytes(used, "little") << 2).to_bytes(count, "little")


# -- mark and sweep ------------------------------------------------------------------------


def start_cycle(allocator: Allocator, deadline: float | None = None) -> int:
    """Begin a mark/sweep cycle: clear every mark; returns the cycle number."""
    heap = allocator.heap
    heap._check_writable("start_cycle()")
    heap._check_identity()
    lock = allocator._lock
    words = heap._words

    def begin() -> tuple[int, ArenaSnapshot]:
        cycle = int(words[CYCLE_OFFSET // 8]) + 1
        if cycle > MAX_CYCLE:  # only garbage gets there: start again
            cycle = 1
        snap = allocator.snapshot_locked()
        words[CYCLE_OFFSET // 8] = cycle
        words[CYCLE_ARENAS_OFFSET // 8] = len(snap)
        words[SWEEP_CURSOR_OFFSET // 8] = 0
        crash.reach("cycle.started")
        return cycle, snap

    def clear(pages: ArenaPages) -> None:
        pages.marks[:] = bytes(len(pages.marks))
        for start in pages.starts():
            found = pages.span_of(start)
            if found is None:
                continue
            c = found[1]
            if 0 < c < len(allocator.classes):
                nelems = allocator.classes[c].nelems
                m0 = (start << pages.page_shift) + nelems
                pages.data[m0:m0 + nelems] = bytes(nelems)
            if allocator.holds_kept(pages, start, c):
                pages.set_mark(start)

    cycle, snap = lock.run(begin, deadline, write=True)
    for index in snap:
        pages = allocator.pages_of(index)
        # Arena by arena under the lock: a span freed and remade while its mark
        # bytes are cleared would have bytes of its objects zeroed instead, and a
        # bit of pageMarks set under the lock (a born-marked span) must not be
        # lost to a concurrent byte store.  Stopped half-way, some marks stay:
        # their objects survive one sweep more, nothing is lost.
        lock.run(functools.partial(clear, pages), deadline, write=True)
    return cycle


def mark(allocator: Allocator, ref: int, deadline: float | None = None) -> None:
    """Mark the live object at ``ref`` for the current cycle."""
    heap = allocator.heap
    heap._check_writable("mark()")
    pages, start, c, slot = allocator.live(ref, deadline)
    if c:
        pages.data[(start << pages.page_shift) + allocator.classes[c].nelems + slot] = 1
    if not pages.marked(start):
        def set_mark() -> None:
            if pages.in_use(start):
                pages.set_mark(start)

        allocator._lock.run(set_mark, deadline, write=True)


def sweep(allocator: Allocator, deadline: float | None = None) -> SweepReport:
    """Sweep chunks of the current cycle's pages until none is left; report what was freed."""
    heap = allocator.heap
    heap._check_writable("sweep()")
    heap._check_identity()
    lock = allocator._lock
    words = heap._words

    def begin() -> list[int]:
        allocator.reclaim_locked()
        return allocator.snapshot_locked()[:int(words[CYCLE_ARENAS_OFFSET // 8])]

    arenas = lock.run(begin, deadline, write=True)
    per_arena = allocator.pages_per_arena
    chunk = max(per_arena, SWEEP_CHUNK_PAGES)
    total = len(arenas) * per_arena

    def claim() -> int:
        cursor = int(words[SWEEP_CURSOR_OFFSET // 8])
        if cursor < total:
            words[SWEEP_CURSOR_OFFSET // 8] = cursor + chunk
            crash.reach("sweep.claimed")
        return cursor

    report = SweepReport()
    while (cursor := lock.run(claim, deadline, write=True)) < total:
        report += SweepReport(chunks=1)
        for position in range(cursor // per_arena, min(len(arenas), (cursor + chunk) // per_arena)):
            pages = allocator.pages_of(arenas[position])
            report += sweep_arena(allocator, pages, deadline)
    return report


def unmarked_starts(pages: ArenaPages) -> list[int]:
    """First pages of in-use spans without a mark: ``pageInUse &^ pageMarks``."""
    inuse = bytes(pages.inuse)
    marks = bytes(pages.marks)
    if inuse == marks:
        return []
    bits = int.from_bytes(inuse, "little") & ~int.from_bytes(marks, "little")
    return bits_set(bits.to_bytes(len(inuse), "little")) if bits else []


def sweep_arena(allocator: Allocator, pages: ArenaPages,
                deadline: float | None = None) -> SweepReport:
    """Sweep one arena of a claimed chunk (see the module docstring)."""
    unmarked = set(unmarked_starts(pages))
    whole: list[int] = []
    empty: list[int] = []
    freed_objects = freed_bytes = 0
    for start in pages.starts():
        found = read_span(allocator, pages, start, deadline)
        if found is None:
            continue
        unowned = not pages.owner[start]
        if found[2] is not None:  # a part of a giant object
            if start in unmarked and unowned and not found[2].part:
                whole.append(start)  # its first part: the object (its other parts: skipped)
            continue
        if start in unmarked and unowned:
            whole.append(start)
            continue
        c = found[1]
        if not 0 < c < len(allocator.classes):
            continue
        cls = allocator.classes[c]
        freed, left = _sweep_objects(allocator, pages, start, cls)
        freed_objects += freed
        freed_bytes += freed * cls.size
        if unowned and not left:
            empty.append(start)
        elif unowned and freed:
            allocator._summaries.partial(c).mark(pages.index)
    report = SweepReport(objects_freed=freed_objects, bytes_freed=freed_bytes)
    if whole or empty:
        report += allocator._lock.run(lambda: _free_spans(allocator, pages, whole, empty),
                                      deadline, write=True)
    return report


def _sweep_objects(allocator: Allocator, pages: ArenaPages, start: int,
                   cls: SizeClass) -> tuple[int, int]:
    """Free the unmarked objects of a small span that no structure holds; (objects freed,
    objects left)."""
    nelems = cls.nelems
    data = pages.data
    a0 = start << pages.page_shift
    alloc = bytes(data[a0:a0 + nelems])  # before the marks: see the module docstring
    marks = bytes(data[a0 + nelems:a0 + 2 * nelems])
    # bytewise alloc & ~mark is 1 only for alloc 1, mark 0 (a bound object's byte is >= 2)
    garbage = int.from_bytes(alloc, "little") & ~int.from_bytes(marks, "little")
    live = nelems - alloc.count(0)
    if not garbage:
        return 0, live
    doomed = positions(garbage.to_bytes(nelems, "little"), 1)
    if doomed:
        held = allocator.held_slots(pages, start, cls)
        doomed = [slot for slot in doomed if slot not in held]
    for slot in doomed:
        data[a0 + slot] = 0
    return len(doomed), live - len(doomed)


def _free_spans(allocator: Allocator, pages: ArenaPages, whole: list[int],
                empty: list[int]) -> SweepReport:
    """Lock holder: free the unmarked unowned spans and the empty unowned ones."""
    spans = npages = 0
    journal = allocator._journal
    if whole[:1] == [0] and pages.giant() is not None:  # a giant object: its own journal
        whole = whole[1:]
        if (giant.made(pages) is not None and not pages.marked(0)
                and not allocator.holds_kept(pages, 0, 0)):
            npages += giant.free_locked(allocator, pages)
            spans += 1
    journal.begin(PAGES, pages.index)
    for start in whole:
        if (pages.in_use(start) and not pages.owner[start] and not pages.marked(start)
                and not allocator.holds_kept(pages, start, pages.sclass[start])):
            npages += pages.release(start)
            spans += 1
    for start in empty:
        c = pages.sclass[start]
        if not (pages.in_use(start) and not pages.owner[start]
                and 0 < c < len(allocator.classes)):
            continue
        a0 = start << pages.page_shift
        nelems = allocator.classes[c].nelems
        if bytes(pages.data[a0:a0 + nelems]).count(0) == nelems:
            npages += pages.release(start)
            spans += 1
    journal.end()
    return SweepReport(spans_freed=spans, pages_freed=npages,
                       bytes_freed=npages * pages.page_size)


# -- scavenging ------------------------------------------------------------------------------


def scavenge(allocator: Allocator, deadline: float | None = None) -> ScavengeReport:
    """Return the memory of every free, not yet released page to the OS.

    Empty unowned spans, spans of dead owners and this handle's empty spares
    are returned to the free pages first (allocator.py), so their memory goes
    too.
    """
    heap = allocator.heap
    heap._check_writable("scavenge()")
    heap._check_identity()
    lock = allocator._lock
    journal = allocator._journal

    def reclaim() -> None:
        allocator.reclaim_locked()
        allocator.release_empty_locked()

    def release(pages: ArenaPages) -> int:
        released = 0
        journal.begin(PAGES, pages.index)
        releasable = _state_bytes(pages, pages.used_pages()).translate(_RELEASABLE)
        for start, count in runs(releasable, 1):
            pages.state[start:start + count] = bytes([RELEASING]) * count
            crash.reach("scavenge.releasing")
            pages.punch(start, count)
            pages.state[start:start + count] = bytes([RELEASED]) * count
            crash.reach("scavenge.released")
            released += count
        journal.end()
        return released

    lock.run(reclaim, deadline, write=True)
    released = 0
    for index in heap.snapshot(time_left(deadline)):
        pages = allocator.pages_of(index)
        if _state_bytes(pages, pages.used_pages()).translate(_RELEASABLE).count(1):
            released += lock.run(functools.partial(release, pages), deadline, write=True)
    return ScavengeReport(released, released * allocator.page_size)


# -- usage per arena (``shmheap walk``) --------------------------------------------------


def arena_usage(allocator: Allocator, deadline: float | None) -> list[dict[str, int]]:
    """Per arena of a fresh snapshot: pages used/free/released, spans, live objects and bytes."""
    heap = allocator.heap
    rows = []
    for index in heap.snapshot(time_left(deadline)):
        pages = allocator.pages_of(index)
        used = pages.used_pages()
        spans = list(arena_spans(allocator, pages))
        rows.append({
            "arena": index, "pages": pages.pages, "pages_in_use": used.count(1),
            "pages_released": _state_bytes(pages, used).translate(_IS_RELEASED).count(1),
            "spans": len(spans), "objects": sum(len(s.objects) for s in spans),
            "live_bytes": sum(s.live_bytes for s in spans),
        })
    return rows
