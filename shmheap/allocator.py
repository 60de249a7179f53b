"""Objects in arenas: size classes, spans, per-process span caches; alloc/free/view/size_of.

A heap address (a *ref*) is ``arena.base + offset``: a plain ``int``, the same
in every process, 0 never a valid object (arena 0 is never used).  A ref
carries no heap identity: one from another heap is rejected only when it does
not name the start of a live object of this heap.

Large objects (over ``max_small`` bytes) take a span of whole pages of their
own, made under the heap lock.  Giant objects (over an arena) take
consecutive arenas, wholly but for the last (giant.py): existing arenas
whose pages are all free are reused first where they lie in a run, and the
run's missing indices are grown, each as ``grow(at=i)`` would; the heap
grows for a giant object only when no run of free arenas is there.  Every
process sees one as one contiguous buffer.  They take the slow paths: the
native core's ``free`` sends every large object here.

Small objects live in spans of one size class (like Go's: 16 bytes up to
about 32 KiB, a span of 1-8 pages; ``size_classes``).  A small span starts with a header of
per-slot arrays, then the slots::

    [alloc: nelems bytes][mark: nelems bytes][slack: nelems x wide][pad to 4]
    [holder: nelems x u32][pad to 16][slot 0][slot 1]...

``slack[k]`` is the class size minus the n of the ``alloc(n)`` that made the
object (``wide`` is 1, or 2 for a class more than 256 bytes above the one
below), ``holder[k]`` the object's holder word (``holder_of``): both written
by the span's owner before it stores ``alloc[k] = 1``, and the slack never
changed while the object lives (a large object keeps both in the page
metadata, pages.py).

``alloc[k]`` is 0 while slot k is free and ``1 + r`` while it holds an object
that ``r`` roots are bound to (roots.py), ``mark[k]`` is 1 when it is marked
(walker.py).  These are bytes, not Go's ``allocBits`` bitmaps,
because Python has no atomic read-modify-write on shared memory: two
processes doing ``b |= bit`` on one byte lose updates.  With a byte per slot
every store is a whole byte, and the writers never conflict:

* ``alloc[k]`` 0 -> 1 only by the span's owner (below), and only while it is 0;
  1 -> 0 only by whoever frees the object (one holder of a live ref, or the
  sweeper of an unmarked one): nobody else may touch a slot in that state;
  1 <-> 2 and up only by the heap-lock holder binding or unbinding a root
  (``set_root_count``).  No lock-free writer stores into a byte above 1, so
  ``free`` refuses a bound object by the byte it already reads.
* ``mark[k]`` is written 1 by the owner before it sets ``alloc[k]`` (born
  marked), 1 by ``mark()``, 0 by ``start_cycle`` (walker.py); all idempotent.

Per-process caches (Go's mcache, mimalloc's thread-local pages)
    Each process allocates from one span per size class (its cache) and
    keeps up to ``SPARE_SPANS`` more of the class (its spares): the owner
    word (pages.py) of each holds its liveness token.  Only the owner
    allocates in them, without any lock: pop a slot from a local list of
    slots it saw free, store mark=1, zero the slot, store alloc=1.  A slot
    free when the owner looked stays free until the owner takes it (frees
    only make slots free), so the list never goes stale.  When the list runs
    out the owner rescans its span; if under a quarter of it is free, the
    span becomes a spare and the spare with the most free slots the cache,
    if a quarter of it is free: still no lock (mimalloc keeps its full pages
    too, and finds them again as their objects are freed).  Else it refills
    under the heap lock (giving up its fullest spare past ``SPARE_SPANS``):
    adopt an unowned span of the class with free slots (found through the
    class's partial tree, summary.py), else make a new span from free pages
    (found through the free tree), else free its empty spares (as
    ``scavenge`` does), else grow the heap.  Neither looks at an arena the
    summaries do not point to, so a refill costs the same at 100,000 arenas
    as at 64.  A process whose
    working set fits its spares takes no lock at all; with one span per
    class, two processes allocating and freeing batches of 1000 objects took
    the lock ~14 times per 1000 pairs each, and waited for each other there
    (design.md, "Where the time goes").  Refills and large objects are the
    only allocation paths that take the lock.

    Owning a span is a fact in two places, the span's ``owner`` word and
    this process's cache or spares, and no exception may leave them disagreeing
    in the dangerous direction (a cached span that is not ours).  So a span
    enters ``_pending`` before our token is written into it, and leaves it
    in the same instruction group that stores it in the cache (consecutive
    stores: no Python signal handler can run between them); a given-up span
    enters ``_pending`` before it leaves the cache or the spares.  Each refill
    first settles ``_pending`` under the lock (one from the spares takes the
    lock only for that, when ``_pending`` is not empty): a span that still
    records our token but is in neither is disowned.  A process interrupted anywhere
    (Ctrl-C) thus loses at most the spans it holds until its next refill.

``free`` of a small object, from any process, clears ``alloc[k]`` with one
store and, if the span has no owner, marks its arena in the class's partial
tree (byte stores of 1, no lock); ``free`` of a large object frees its pages
under the lock.  An object that roots are bound to is not freed (BoundObjectError):
``alloc[k]`` above 1, or for a large object its first page's ``state`` byte
above RELEASING (pages.py: that byte means nothing else on a used page).

Dead owners (mimalloc's abandoned segments)
    A span whose owner token is no longer alive (the process died or closed
    the heap) is *reclaimed* by the lock holder: its owner is cleared, it
    gets a pageMarks bit if it holds a marked object, and it becomes an
    ordinary unowned span (or free pages, if it is empty).  The reclaim pass
    visits only the arenas of the owned tree (summary.py); it runs before
    the heap grows, every ``RECLAIM_EVERY`` span refills of a process, at the
    start of every sweep and in fsck repair (repair.py), so a
    killed allocator leaks nothing permanently.

New memory reads zero: slots are zeroed when they are allocated, pages when
they are made into a span (only pages whose state says they may hold data).

Threads: a handle's allocator is used by any thread.  Its caches, ``_pending``
and hint change only under the handle's mutex (attached.py): ``alloc``,
``free``, ``view`` and ``size_of`` take it, and so every slow path under
them.  The native fast paths keep out while another thread holds it
(_native.c ``FAST_ENTER``), so the slow paths of one thread never see the
fast path of another half-way.  Two threads never pop the same slot.

This module owns size classes, span headers, the caches, and the page-heap
mutations' use of the journal.  Page metadata layout and order are in
pages.py; walking, marking, sweeping and scavenging in walker.py.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from . import core, crash, giant
from .attached import serialised
from .bytescan import nonzero_flags, positions
from .control import DISOWN, PAGES
from .errors import (
    AddressSpaceExhaustedError,
    BoundObjectError,
    DoubleFreeError,
    HeapCorruptError,
    InvalidParameterError,
    InvalidRefError,
    ShmHeapError,
)
from .index import ArenaSnapshot
from .layout import layout
from .lock import deadline_of, time_left
from .pages import DIRTY, RELEASING, ArenaPages, Giant, longest_free_run
from .summary import CAP, ByteTree

if TYPE_CHECKING:
    from .attached import AttachedHeap

#: Largest small object; bigger ones take pages of their own.
MAX_SMALL = 32 * 1024
#: Most pages in a small span, and the slots a span should hold if it can.
MAX_SPAN_PAGES = 8
MIN_SPAN_OBJECTS = 32
#: A span is kept by its owner on rescan if at least 1/KEEP_FRACTION of it is free,
#: and adopted from the shared heap if at least 1/ADOPT_FRACTION is.
KEEP_FRACTION = 4
ADOPT_FRACTION = 8
#: Spans of one class a process keeps besides the one it allocates from (its spares).
SPARE_SPANS = 8
#: The reclaim pass runs at least every this many span refills under the lock of one process.
RECLAIM_EVERY = 64
#: How often an allocation grows the heap and retries before giving up.
GROW_ATTEMPTS = 100
#: Seconds ``close`` waits for the lock to give its spans back (else the next reclaim does).
CLOSE_TIMEOUT = 1.0
#: Most roots one object may be bound to: a small object counts them in its alloc
#: byte (1 + roots), a large one in its first page's state byte (RELEASING + roots).
MAX_ROOTS_PER_OBJECT = 0xFF - RELEASING
#: bytes an alloc array may hold without a bound object: 0 (free) and 1
_UNBOUND = b"\0\1"
ALIGN = 16
#: bytes of a small object's holder word (its owner's short token; 0 while a root or a queue
#: holds it)
HOLDER_SIZE = 4
#: holder words of no process: a structure (a root, a queue) holds the object; nobody does
HELD, ORPHAN = 0, 0xFFFF << 16
_T = TypeVar("_T")


class SizeClass(NamedTuple):
    """One size class: slot ``size``, span of ``npages`` pages holding ``nelems`` slots.

    In a span of this class the alloc bytes are at offset 0, the mark bytes at
    ``nelems``, the slack of slot k (``size`` minus the n of its ``alloc(n)``,
    ``wide`` bytes little-endian) at ``slack_at + k * wide``, its holder word
    at ``holder_at + 4 * k``, slot k at ``objects_at + k * size``.
    """

    number: int
    size: int
    npages: int
    nelems: int
    objects_at: int
    slack_at: int = 0
    wide: int = 1
    holder_at: int = 0


def _header(nelems: int, wide: int) -> tuple[int, int, int]:
    """(slack_at, holder_at, objects_at) of a span of ``nelems`` slots."""
    slack_at = 2 * nelems
    holder_at = (slack_at + wide * nelems + HOLDER_SIZE - 1) & -HOLDER_SIZE
    return slack_at, holder_at, (holder_at + HOLDER_SIZE * nelems + ALIGN - 1) & -ALIGN


def _fit(size: int, span_bytes: int, wide: int) -> int:
    """Most slots of ``size`` bytes that fit in a span with their header."""
    n = span_bytes // (size + 2 + wide + HOLDER_SIZE)
    while n > 0 and _header(n, wide)[2] + n * size > span_bytes:
        n -= 1
    return n


def _wide(size: int, below: int) -> int:
    """Bytes of a slack in a class of ``size`` above one of ``below``: 1 while it fits one."""
    return 1 if size - below <= 256 else 2


def _class_sizes(max_small: int) -> list[int]:
    sizes = list(range(ALIGN, 129, ALIGN))
    step = 32
    while sizes[-1] < max_small:
        last = sizes[-1]
        sizes.extend(last + step * i for i in range(1, 5))
        step *= 2
    return [s for s in sizes if s <= max_small]


@functools.cache
def size_classes(page_size: int, pages_per_arena: int) -> tuple[SizeClass, ...]:
    """The size classes of a heap; entry 0 stands for large objects (computed once per process
    for each page size and arena).

    Each class gets the shortest span (1..8 pages, at most half an arena) that
    holds ``MIN_SPAN_OBJECTS`` slots (or as many as the longest span can) and
    wastes at most 1/8 (bytes neither slots nor their header), else the one of
    those that wastes least.  (Go's spans are shorter; here every refill
    takes the heap lock, so fewer refills pay for a few more pages per
    process and class.)  Then its size grows to share the span's leftover
    bytes among its slots (as Go's classes do), and a class that ends up no
    larger than the one before is dropped.  A class more than 256 bytes above
    the one before keeps its slacks in two bytes, the others in one.
    """
    classes = [SizeClass(0, 0, 0, 1, 0)]
    for size in _class_sizes(min(MAX_SMALL, 4 * page_size)):
        wide = _wide(size, classes[-1].size)
        made = _size_class(size, wide, page_size, pages_per_arena)
        if made is not None and wide < _wide(made[0], classes[-1].size):
            made = _size_class(size, 2, page_size, pages_per_arena)
        if made is None:
            break
        size, npages, nelems, wide = made
        if size > classes[-1].size:
            slack_at, holder_at, objects_at = _header(nelems, wide)
            classes.append(SizeClass(len(classes), size, npages, nelems, objects_at, slack_at,
                                     wide, holder_at))
    return tuple(classes)


@functools.cache
def _lookup_table(classes: tuple[SizeClass, ...]) -> bytes:
    """The class of a small size n at [(n + 15) >> 4] (computed once per process for each
    set of classes)."""
    table = [1]
    for cls in classes[1:]:
        table.extend([cls.number] * (cls.size // ALIGN - len(table) + 1))
    return bytes(table)


@functools.cache
def _class_tables(classes: tuple[SizeClass, ...]) -> tuple[tuple[int, ...], ...]:
    """nelems, size, objects_at, holder_at and npages of every class, for the native core's
    Free (where its Queue and RootWriter find objects too)."""
    return tuple(tuple(getattr(c, field) for c in classes)
                 for field in ("nelems", "size", "objects_at", "holder_at", "npages"))


def _size_class(size: int, wide: int, page_size: int,
                pages_per_arena: int) -> tuple[int, int, int, int] | None:
    """(size, npages, nelems, wide) of the class for slots of ``size`` (see size_classes)."""
    max_pages = max(1, min(MAX_SPAN_PAGES, pages_per_arena // 2))
    best: tuple[float, int, int] | None = None
    enough = max(1, min(MIN_SPAN_OBJECTS, _fit(size, max_pages * page_size, wide)))
    for npages in range(1, max_pages + 1):
        span_bytes = npages * page_size
        nelems = _fit(size, span_bytes, wide)
        if nelems < enough:
            continue
        waste = (span_bytes - _header(nelems, wide)[2] - nelems * size) / span_bytes
        if best is None or waste < best[0]:
            best = (waste, npages, nelems)
        if waste <= 1 / 8:
            break
    if best is None:
        return None
    _, npages, nelems = best
    return (npages * page_size - _header(nelems, wide)[2]) // nelems & -ALIGN, npages, nelems, wide


class _Cache:
    """A span this process owns, and the slots it saw free in it (popped from the end).

    ``holder`` is this process's holder word (``holder_of``), which every
    object allocated from the cache records.
    """

    __slots__ = ("a0", "base", "cls", "data", "free", "h0", "holder", "m0", "o0", "pages", "s0",
                 "size", "start", "wide")

    def __init__(self, pages: ArenaPages, start: int, cls: SizeClass, fresh: bool,
                 holder: int) -> None:
        self.pages = pages
        self.start = start
        self.cls = cls
        self.data = pages.data
        self.a0 = start << pages.page_shift
        self.m0 = self.a0 + cls.nelems
        self.o0 = self.a0 + cls.objects_at
        self.size = cls.size
        self.s0 = self.a0 + cls.slack_at
        self.wide = cls.wide
        self.h0 = self.a0 + cls.holder_at
        self.holder = holder
        self.base = pages.base
        self.free: list[int] = list(range(cls.nelems - 1, -1, -1))
        if not fresh:
            self.rescan()

    def rescan(self) -> int:
        """Give out the slots free now (the span's alloc bytes) from here on; how many."""
        free = positions(bytes(self.data[self.a0:self.m0]), 0)
        free.reverse()
        self.free = free
        return len(free)


#: what makes a span cache: the native core's type (same attributes and methods), or _Cache
CacheType: Callable[..., _Cache] = core.native.Cache if core.native is not None else _Cache


class Allocator:
    """The object allocator of one heap handle (made lazily by ``Heap``).

    ``root_names(ref)`` names the roots bound to the object at ``ref``
    (roots.py), for the error of freeing a bound object;
    ``bind_new(name, make, timeout)`` makes an object bound to a root
    (roots.py ``Roots.bind_new``), for ``alloc(n, root=name)``.
    """

    def __init__(self, heap: AttachedHeap, root_names: Callable[[int], list[str]],
                 bind_new: Callable[[str, Callable[[], int], float | None], int]) -> None:
        self.heap = heap
        self.root_names = root_names
        self.bind_new = bind_new
        self.readonly = heap.readonly
        self.page_size = heap.params.page_size
        self.page_shift = self.page_size.bit_length() - 1
        self.arena_size = heap.arena_size
        self.arena_shift = self.arena_size.bit_length() - 1
        self.arena_mask = self.arena_size - 1
        self.pages_per_arena = layout(self.arena_size, self.page_size).pages
        self.classes = size_classes(self.page_size, self.pages_per_arena)
        self.max_small = self.classes[-1].size
        #: class of a small size n at [(n + 15) >> 4]
        self.lookup = _lookup_table(self.classes)
        #: the heap's mapped arenas (arenas.ArenaCache) and summaries (summary.py)
        self._mapped = heap._pages
        self._summaries = heap._summaries
        self._caches: list[_Cache | None] = [None] * len(self.classes)
        #: per class, the other spans this process owns (refilled from without the lock)
        self._spares: list[list[_Cache]] = [[] for _ in self.classes]
        #: spans whose owner word may hold our token while no cache of ours has them
        self._pending: list[tuple[ArenaPages, int]] = []
        self._journal = heap._journal
        self._lock = heap._lock
        #: the handle's thread lock (attached.py): held while any of the above changes
        self._mutex = heap._mutex
        #: giant objects' runs of arenas this process has mapped, while a view holds one
        self._runs = giant.runs()
        self._hint = 0
        self._refills = 0
        # In a forked child the parent's spans are not ours: forget them as the child lets
        # go of the parent's slot (whether or not it claims one of its own).
        live = heap._live
        assert live is not None
        live.on_unmap.append(self.forget_caches)
        if core.native is not None:
            self._bind_native(core.native)


    def forget_caches(self) -> None:
        self._caches[:] = [None] * len(self.classes)  # in place: the native Alloc reads it
        self._spares = [[] for _ in self.classes]
        self._pending = []

    def close(self, give_back: bool = True) -> None:
        """Give this handle's spans back to the heap and let go of the native fast paths.

        ``Heap.close`` calls it while the lock still works.  The spans go back
        under the lock as ``_settle_pending`` gives up any span (waiting at most
        ``CLOSE_TIMEOUT``: past it, they go back as a dead owner's do, at the next
        reclaim, since the handle's slot is released right after).  An ``alloc``
        or ``free`` saved before the close finds no span and no arena here and
        takes the slow path, which raises HeapClosedError.
        """
        try:
            for c, cache in enumerate(self._caches):
                if cache is not None:
                    self._pending.append((cache.pages, cache.start))
                    self._caches[c] = None
            for spares in self._spares:
                while spares:
                    self._pending.append((spares[-1].pages, spares[-1].start))
                    spares.pop()
            if give_back and self._pending and not self.readonly:
                with contextlib.suppress(ShmHeapError):
                    self._lock.run(self._settle_pending, deadline_of(CLOSE_TIMEOUT), write=True)
        finally:
            self.forget_caches()
            native_free = self.__dict__.pop("free", None)
            if native_free is not None:
                native_free.close()  # its mapping of the summaries
            self.__dict__.pop("alloc", None)  # (the native objects point back at us)

    def span_ok(self, sclass: int, npages: int) -> bool:
        """True if a span of ``npages`` pages may have size class ``sclass``."""
        if sclass == 0:
            return True
        return sclass < len(self.classes) and self.classes[sclass].npages == npages

    # -- arenas ------------------------------------------------------------------------

    def pages_of(self, index: int) -> ArenaPages:
        """The page view of arena ``index``, which the index lists (no map lookup)."""
        return self._mapped.get(index)

    def snapshot_locked(self) -> ArenaSnapshot:
        """The index as the lock holder sees it now."""
        heap = self.heap
        return heap._index.snapshot_of(int(heap._header[0]))

    # -- alloc -------------------------------------------------------------------------

    def alloc(self, nbytes: int, timeout: float | None = None, root: str | None = None) -> int:
        """A new zeroed object of ``nbytes`` bytes, bound to ``root`` if given; its address.

        (The native core's ``Alloc`` replaces this fast path when it runs.)
        """
        if (root is None and timeout is None and type(nbytes) is int
                and 0 <= nbytes <= self.max_small):
            with self._mutex:  # (with a timeout the slow path waits for it within that)
                cache = self._caches[self.lookup[(nbytes + 15) >> 4]]
                if cache is not None and cache.free:
                    k = cache.free.pop()
                    data = cache.data
                    data[cache.m0 + k] = 1
                    size = cache.size
                    offset = cache.o0 + k * size
                    data[offset:offset + size] = bytes(size)
                    wide = cache.wide
                    data[cache.s0 + k * wide:cache.s0 + (k + 1) * wide] = (
                        (size - nbytes).to_bytes(wide, "little"))
                    at = cache.h0 + HOLDER_SIZE * k
                    data[at:at + HOLDER_SIZE] = cache.holder.to_bytes(HOLDER_SIZE, "little")
                    data[cache.a0 + k] = 1
                    return cache.base + offset
        return self._alloc_slow(nbytes, timeout, root)

    @serialised
    def _alloc_slow(self, nbytes: int, timeout: float | None = None,
                    root: str | None = None) -> int:
        """A refill if this process's span has no free slot, then the fast path again; or
        a large object; or one bound to ``root``.

        (Also the native fast path's way on whenever another thread holds the
        handle's mutex: ``serialised`` waits for it within ``timeout``.)
        """
        if root is not None:
            return self.bind_new(root, lambda: self._alloc_slow(nbytes, timeout), timeout)
        if type(nbytes) is int and 0 <= nbytes <= self.max_small:
            c = self.lookup[(nbytes + 15) >> 4]
            cache = self._caches[c]
            if cache is None or not cache.free:
                self._refill(c, deadline_of(timeout))
            return self.alloc(nbytes)
        return self._alloc_large(nbytes, timeout)

    def _bind_native(self, native: Any) -> None:
        """Let the native core's fast paths run ``alloc`` and ``free`` (slow paths stay here)."""
        self.alloc = native.Alloc(self._caches, self.lookup,  # type: ignore[method-assign]
                                  self.max_small, self._alloc_slow, self._mutex)
        if self.readonly:
            return  # free() raises ReadOnlyError, from Python
        summaries = self._summaries
        self.free = native.Free(  # type: ignore[method-assign]
            self._mapped.records, Allocator.free.__get__(self), summaries.mapping,
            self.arena_shift, self.page_shift, *_class_tables(self.classes),
            *summaries.partial_tables(), self._mutex)

    def _token(self) -> int:
        live = self.heap._live
        assert live is not None
        return live.token

    def _holder(self) -> int:
        """This process's holder word: what the objects it allocates record as their owner."""
        return holder_of(self._token())

    def _refill(self, c: int, deadline: float | None) -> None:
        """Give this process a span of class ``c`` with free slots (slow path)."""
        self.heap._check_writable("alloc()")
        old = self._caches[c]
        if old is not None:
            free = old.rescan()
            if free * KEEP_FRACTION >= old.cls.nelems:
                return
            if self._swap_spare(c, old, free):
                if self._pending:  # (left by an interrupt) the next refill with the lock
                    self._lock.run(self._settle_pending, deadline, write=True)
                return
        self._refills += 1

        def attempt() -> _Cache | None:
            if self._refills % RECLAIM_EVERY == 0:
                self.reclaim_locked()
            return self._adopt_locked(c) or self._make_span_locked(c)

        self._with_room(attempt, self.classes[c].npages, deadline)

    def cached_spans(self) -> set[tuple[int, int]]:
        """(arena, first page) of every span this process caches: allocates from or keeps."""
        return {(cache.pages.index, cache.start)
                for cache in itertools.chain(self._caches, *self._spares) if cache}

    def _swap_spare(self, c: int, old: _Cache, free: int) -> bool:
        """Allocate from a spare of class ``c`` with enough free slots instead of ``old`` (which
        has ``free``), and make ``old`` a spare (no lock); False if none has them.

        The oldest spare that has them is taken (the one given up first, whose
        objects are likeliest freed).  Past ``SPARE_SPANS`` spares the fullest
        one is given up (to ``_pending``, disowned by the refill's lock hold).
        Every span stays in the cache or the spares (or ``_pending``) at every
        step, so an interrupt anywhere leaves no span of ours that no list of
        ours names.
        """
        spares = self._spares[c]
        spares.append(old)
        nelems = old.cls.nelems
        counts = []
        for spare in spares[:-1]:
            counts.append(spare.rescan())
            if counts[-1] * KEEP_FRACTION >= nelems:
                self._caches[c] = spare
                del spares[len(counts) - 1]
                return True
        counts.append(free)
        if len(spares) > SPARE_SPANS:
            fullest = min(range(len(spares)), key=counts.__getitem__)
            self._pending.append((spares[fullest].pages, spares[fullest].start))
            del spares[fullest]
        self._caches[c] = None
        return False

    def _release_empty_spares_locked(self) -> int:
        """Give up and free every spare of ours with no object in it (lock holder); how many.

        Only we allocate in our spares, so an empty one stays empty until it is freed.
        """
        given = 0
        for spares in self._spares:
            for spare in [spare for spare in spares
                          if spare.rescan() == spare.cls.nelems]:
                self._pending.append((spare.pages, spare.start))
                spares.remove(spare)
                given += 1
        if given:
            self._settle_pending()
        return given

    def _settle_pending(self) -> None:
        """Disown the spans we may own but cache no more (lock holder; see the docstring)."""
        token = self._token()
        cached = self.cached_spans()
        for pages, start in self._pending:
            if pages.owner[start] == token and (pages.index, start) not in cached:
                self.disown_locked(pages, start)
        self._pending[:] = ()

    def _with_room(self, attempt: Callable[[], _T | None], npages: int,
                   deadline: float | None) -> _T:
        """``attempt()`` under the lock; if no arena has room, reclaim, then grow, and retry.

        As Go's ``mheap.alloc`` reclaims before it grows the heap: spans of dead
        owners and empty unowned spans go back to the free pages first.
        """
        def locked() -> _T | None:
            self.heap._check_identity()
            if self._pending:
                self._settle_pending()
            got = attempt()
            if got is None and (self.reclaim_locked() + self.release_empty_locked()):
                got = attempt()
            return got

        for _ in range(GROW_ATTEMPTS):
            got = self._lock.run(locked, deadline, write=True)
            if got is not None:
                return got
            self._hint = self.heap.grow(timeout=time_left(deadline)).index
        raise AddressSpaceExhaustedError(
            f"heap {self.heap.name!r}: no arena could take {npages} pages even after growing "
            f"{GROW_ATTEMPTS} times; other processes are allocating faster than it grows")

    def _adopt_locked(self, c: int) -> _Cache | None:
        """Take an unowned span of class ``c`` with enough free slots (lock holder).

        The arenas to look at come from the class's partial tree (summary.py):
        a leaf is cleared before its arena is scanned and set again if the
        arena has more such spans than the one taken.  The journal names the
        arena meanwhile (``PAGES``), so a holder stopped between the clear and
        the end of the scan leaves the arena to the next holder's audit, which
        sets its hints again (``audit_arena``).
        """
        cls = self.classes[c]
        hints = self._summaries.partial(c)
        index = hints.find(1)
        if index < 0 and hints.heal_lost_marks():  # a marker died between leaf and ancestor
            index = hints.find(1)
        while index >= 0:
            pages = self.pages_of(index)
            self._journal.begin(PAGES, index)
            hints.clear(index)
            chosen = None
            for start in pages.class_starts(c):
                if pages.owner[start]:
                    continue
                a0 = start << self.page_shift
                free = bytes(pages.data[a0:a0 + cls.nelems]).count(0)
                if free * ADOPT_FRACTION < cls.nelems:
                    continue
                if chosen is None:
                    chosen = start
                else:
                    hints.mark(index)
                    break
            if chosen is not None:
                cache = CacheType(pages, chosen, cls, False, self._holder())
                token = self._token()
                self._summaries.owned.mark(index)
                self._pending.append((pages, chosen))
                pages.owner[chosen] = token
                self._caches[c] = cache
                self._pending[:] = ()
                crash.reach("cache.adopted")
                self._journal.end()
                return cache
            self._journal.end()
            index = hints.find(1, index + 1)
        return None

    def _make_span_locked(self, c: int) -> _Cache | None:
        cls = self.classes[c]
        made = self.make_span_locked(cls.npages, c, self._token(), zero_now=True)
        if made is None:
            return None
        cache = CacheType(made[0], made[1], cls, True, self._holder())
        self._caches[c] = cache
        self._pending[:] = ()
        return cache

    def make_span_locked(self, npages: int, sclass: int, owner: int, zero_now: bool,
                         slack: int = 0, holder: int = 0
                         ) -> tuple[ArenaPages, int, list[tuple[int, int]]] | None:
        """Make a span of ``npages`` free pages (lock holder); None if no arena has room.

        Returns (arena pages, first page, page runs the caller must still zero);
        with ``zero_now`` they are zeroed here, before the span is published.
        A span with an ``owner`` is left in ``_pending`` for the caller to cache.
        A large object's ``slack`` and ``holder`` word are stored before it is published.
        """
        free_runs = self._summaries.free
        index = self._hint if free_runs.get(self._hint) >= min(npages, CAP) else -1
        if index < 0:
            index = free_runs.find(npages)
        while index >= 0:
            pages = self.pages_of(index)
            start = pages.find_free_run(npages)
            if start < 0:  # a run of CAP+ pages that is too short, or a stale leaf
                pages.refresh_free()
                index = free_runs.find(npages, index + 1)
                continue
            dirty = pages.prepare(start, npages, self.heap.params.reserve)
            if owner:
                self._pending.append((pages, start))
            self._journal.begin(PAGES, index)
            if zero_now:
                for first, count in dirty:
                    pages.zero(first, count)
                dirty = []
            pages.slack[start] = slack
            pages.holder[start] = holder
            pages.publish(start, npages, sclass, owner)
            self._journal.end()
            self._hint = index
            return pages, start, dirty
        return None

    def _alloc_large(self, nbytes: int, timeout: float | None) -> int:
        if type(nbytes) is not int:
            return self.alloc(_as_int(nbytes, InvalidParameterError(
                f"alloc({nbytes!r}): the size must be an int number of bytes, 0 or more")),
                timeout)
        if nbytes < 0:
            raise InvalidParameterError(
                f"alloc({nbytes!r}): the size must be an int number of bytes, 0 or more")
        npages = -(-nbytes >> self.page_shift)
        slack = (npages << self.page_shift) - nbytes
        if npages > self.pages_per_arena:
            return giant.alloc(self, npages, deadline_of(timeout), slack)
        self.heap._check_writable("alloc()")
        pages, start, dirty = self._with_room(
            lambda: self.make_span_locked(npages, 0, 0, zero_now=False, slack=slack,
                                          holder=self._holder()), npages, deadline_of(timeout))
        for first, count in dirty:
            pages.zero(first, count)  # outside the lock: nobody else knows the span yet
        return pages.base + (start << self.page_shift)

    # -- finding an object -------------------------------------------------------------

    def locate(self, ref: object, deadline: float | None = None,
               held: bool = False) -> tuple[ArenaPages, int, int, int]:
        """(arena pages, span's first page, size class, slot) of the object at ``ref``.

        Checks everything but whether the slot is allocated: the alloc byte of
        a small object is at ``data[(start << page_shift) + slot]``.  The span
        records are read with no lock between two equal reads of the arena's
        sequence word (pages.py); if a holder keeps changing them (or died
        doing so), under the heap lock.  A caller that ``held`` the lock
        already reads them directly (the lock is not reentrant).
        """
        if type(ref) is not int:
            return self.locate(_as_int(ref, InvalidRefError(
                f"{ref!r} is not a heap address (a positive int from alloc())")), deadline, held)
        if ref <= 0:
            raise InvalidRefError(f"{ref!r} is not a heap address (a positive int from alloc())")
        index = ref >> self.arena_shift
        offset = ref & self.arena_mask
        pages = self._mapped.recent.get(index)
        if pages is None:
            if index not in self.heap:
                raise InvalidRefError(f"address {ref:#x} is in no arena of heap "
                                      f"{self.heap.name!r}")
            pages = self.pages_of(index)
        page = offset >> self.page_shift
        record = pages.page_record(page) if held else pages.steady(pages.page_record, page)
        if record is None:
            record = self._lock.run(lambda: pages.page_record(page), deadline)
        used, start, c, npages, part = record
        if not used:
            raise self._free_page_error(ref, page, start)
        if not 0 <= start <= page or not npages:
            raise HeapCorruptError(f"heap {self.heap.name!r}: arena {index} page {page} has an "
                                   f"impossible span entry; run `shmheap fsck {self.heap.name}`")
        span_offset = offset - (start << self.page_shift)
        if c == 0:
            if span_offset or part > 1:  # (a later part of a giant object: inside it)
                raise self._interior(ref)
            return pages, start, 0, 0
        if c >= len(self.classes):
            raise HeapCorruptError(f"heap {self.heap.name!r}: arena {index} page {start} has "
                                   f"unknown size class {c}; run `shmheap fsck {self.heap.name}`")
        cls = self.classes[c]
        if cls.npages != npages:
            raise HeapCorruptError(f"heap {self.heap.name!r}: arena {index} page {start} has a "
                                   f"span of {npages} pages of size class {c}; run "
                                   f"`shmheap fsck {self.heap.name}`")
        slot, rest = divmod(span_offset - cls.objects_at, cls.size)
        if rest or not 0 <= slot < cls.nelems:
            raise self._interior(ref)
        return pages, start, c, slot

    def _free_page_error(self, ref: int, page: int, start: int) -> InvalidRefError:
        if ref & (self.page_size - 1) == 0 and start == page:
            return DoubleFreeError(f"address {ref:#x} names an object that was already freed")
        return InvalidRefError(f"address {ref:#x} is in free pages of heap {self.heap.name!r}: "
                               "no object lives there")

    def _interior(self, ref: int) -> InvalidRefError:
        return InvalidRefError(f"address {ref:#x} is not the start of an object of heap "
                               f"{self.heap.name!r} (inside one, or in a span header)")

    def live(self, ref: object, deadline: float | None = None,
             held: bool = False) -> tuple[ArenaPages, int, int, int]:
        """``locate``, and InvalidRefError unless the object is allocated now."""
        pages, start, c, slot = self.locate(ref, deadline, held)
        if c and not pages.data[(start << self.page_shift) + slot]:
            raise InvalidRefError(f"address {ref:#x} names a freed object")
        if not c and pages.owner[start]:  # only a giant object's parts have owners
            raise InvalidRefError(f"address {ref:#x} names an object that is still being made")
        return pages, start, c, slot

    def object_bytes(self, pages: ArenaPages, start: int, c: int, slot: int) -> tuple[int, int]:
        """(offset in the arena, size) of a located object (past the arena for a giant one)."""
        if c == 0:
            made = None if start else pages.giant()
            npages = made.total if made is not None else pages.npages[start]
            return start << self.page_shift, npages << self.page_shift
        cls = self.classes[c]
        return (start << self.page_shift) + cls.objects_at + slot * cls.size, cls.size

    def slack_of(self, pages: ArenaPages, start: int, c: int, slot: int, size: int) -> int:
        """Bytes of a located object of ``size`` (its capacity) past the n of its ``alloc(n)``."""
        if c:
            cls = self.classes[c]
            at = (start << self.page_shift) + cls.slack_at + slot * cls.wide
            slack = int.from_bytes(pages.data[at:at + cls.wide], "little")
        else:
            slack = pages.slack[start]
        if slack > size:
            raise HeapCorruptError(
                f"heap {self.heap.name!r}: the object in arena {pages.index} at page {start} "
                f"records {slack} unused bytes of {size}; run `shmheap fsck {self.heap.name}`")
        return slack

    # -- free, view, size_of, nbytes -----------------------------------------------------

    @serialised
    def free(self, ref: int, timeout: float | None = None) -> None:
        """Free the object at ``ref``, allocated by any process (the native ``Free``'s slow
        path too)."""
        self.heap._check_writable("free()")
        self._free(ref, None if timeout is None else deadline_of(timeout), held=False)

    def free_locked(self, ref: int) -> None:
        """``free(ref)`` for a caller that holds the lock already (a journal repair)."""
        with self._mutex:
            self.heap._check_writable("free()")
            self._free(ref, None, held=True)

    def _free(self, ref: int, deadline: float | None, held: bool) -> None:
        pages, start, c, slot = self.locate(ref, deadline, held)
        if c == 0:
            done = (self._free_large_locked(pages, start, ref, at_once=True) if held else
                    self._lock.run(lambda: self._free_large_locked(pages, start, ref, False),
                                   deadline, write=True))
            if done is False:
                raise self._bound_error(ref)
            if isinstance(done, Giant):
                giant.release(self, pages, done, deadline)
            return
        at = (start << self.page_shift) + slot
        data = pages.data
        if data[at] != 1:
            if data[at]:
                raise self._bound_error(ref)
            raise DoubleFreeError(f"address {ref:#x} names an object that was already freed")
        data[at] = 0
        if not pages.owner[start]:
            self._summaries.partial(c).mark(pages.index)

    def _free_large_locked(self, pages: ArenaPages, start: int, ref: int,
                           at_once: bool) -> bool | Giant:
        """Free a located large object (lock held); False if roots are bound to it.

        A giant object is freed ``at_once``, or else taken back: its record is
        returned, and ``giant.release`` frees it after the lock hold.
        """
        self.heap._check_identity()
        if not (pages.used[start] and pages.span[start] == start + 1
                and pages.in_use(start) and pages.sclass[start] == 0):
            raise DoubleFreeError(f"address {ref:#x} names an object that was already "
                                  "freed (by another process, just now)")
        if pages.state[start] > RELEASING:
            return False
        if not start and pages.giant_ids[0]:  # a part of a giant object
            if giant.made(pages) is None:
                raise InvalidRefError(f"address {ref:#x} names no object now (a giant "
                                      "object is being made or freed there)")
            if not at_once:
                return giant.take_back_locked(self, pages)
            giant.free_locked(self, pages)
            return True
        self._journal.begin(PAGES, pages.index)
        pages.release(start)
        self._journal.end()
        return True

    def _bound_error(self, ref: int) -> BoundObjectError:
        """The error of ``free(ref)`` for a bound object, naming its roots (looked up now)."""
        names = self.root_names(ref)
        shown = ", ".join(repr(name) for name in names[:3]) + (", ..." if len(names) > 3 else "")
        first = repr(names[0]) if names else "NAME"
        return BoundObjectError(
            f"free({ref:#x}): the object is bound to root {shown or '(being bound right now)'} "
            f"of heap {self.heap.name!r}; unbind it first (del heap.roots[{first}])")

    @serialised
    def view(self, ref: int, timeout: float | None = None) -> memoryview:
        """The object's ``nbytes`` bytes (read-only when the heap is attached readonly)."""
        pages, start, c, slot = self.live(ref, None if timeout is None
                                          else deadline_of(timeout))
        offset, size = self.object_bytes(pages, start, c, slot)
        length = size - self.slack_of(pages, start, c, slot, size)
        if offset + size > self.arena_size:
            return giant.view(self, pages, size)[:length]
        return pages.data[offset:offset + length]

    @serialised
    def nbytes(self, ref: int, timeout: float | None = None) -> int:
        """The object's length: the n of its ``alloc(n)``."""
        pages, start, c, slot = self.live(ref, None if timeout is None
                                          else deadline_of(timeout))
        size = self.object_bytes(pages, start, c, slot)[1]
        return size - self.slack_of(pages, start, c, slot, size)

    @serialised
    def size_of(self, ref: int, timeout: float | None = None) -> int:
        """The object's size: its size class, or its pages for a large object."""
        pages, start, c, slot = self.live(ref, None if timeout is None
                                          else deadline_of(timeout))
        return self.object_bytes(pages, start, c, slot)[1]

    # -- roots bound to an object (roots.py; lock holder) --------------------------------

    def root_count(self, pages: ArenaPages, start: int, c: int, slot: int) -> int:
        """How many roots are bound to a located object (-1 if a small one is free)."""
        if c:
            return pages.data[(start << self.page_shift) + slot] - 1
        state = pages.state[start]
        return state - RELEASING if state > RELEASING else 0

    def set_root_count(self, pages: ArenaPages, start: int, c: int, slot: int,
                       count: int) -> None:
        """Record ``count`` roots bound to a located, allocated object; mark it (lock holder).

        The object is marked for the current cycle (its mark byte, its span's
        pageMarks bit) whatever the count: an object bound now is live, one
        unbound now was live until now, and a span holding a bound object
        must keep its pageMarks bit (a sweep frees unmarked unowned spans whole).
        """
        if c:
            a0 = start << self.page_shift
            pages.data[a0 + self.classes[c].nelems + slot] = 1
            pages.data[a0 + slot] = 1 + count
        else:
            pages.state[start] = RELEASING + count if count else DIRTY
        pages.set_mark(start)

    def holder(self, pages: ArenaPages, start: int, c: int, slot: int) -> int:
        """The holder word of a located object (see ``holder_of``)."""
        if not c:
            return pages.holder[start]
        at = (start << self.page_shift) + self.classes[c].holder_at + HOLDER_SIZE * slot
        return int.from_bytes(pages.data[at:at + HOLDER_SIZE], "little")

    def set_holder(self, pages: ArenaPages, start: int, c: int, slot: int, word: int) -> None:
        """Record ``word`` as the located object's holder (lock holder)."""
        if not c:
            pages.holder[start] = word
            return
        at = (start << self.page_shift) + self.classes[c].holder_at + HOLDER_SIZE * slot
        pages.data[at:at + HOLDER_SIZE] = word.to_bytes(HOLDER_SIZE, "little")

    def holds_roots(self, pages: ArenaPages, start: int, c: int) -> bool:
        """True if the span at ``start`` (of class ``c``) holds an object roots are bound to."""
        if not c:
            return pages.state[start] > RELEASING
        if c >= len(self.classes):
            return False
        a0 = start << self.page_shift
        return bool(bytes(pages.data[a0:a0 + self.classes[c].nelems]).translate(None, _UNBOUND))

    def holds_kept(self, pages: ArenaPages, start: int, c: int) -> bool:
        """True if the span at ``start`` (of class ``c``) holds an object that a sweep must
        keep whatever its mark: one that roots are bound to, or one that a structure of the
        heap (a queue's node, a counter's cell) holds, whose holder word is ``HELD``."""
        if self.holds_roots(pages, start, c):
            return True
        if not c:
            return pages.holder[start] == HELD
        return c < len(self.classes) and bool(self.held_slots(pages, start, self.classes[c]))

    def held_slots(self, pages: ArenaPages, start: int, cls: SizeClass) -> set[int]:
        """Slots of the small span at ``start`` whose allocated object a structure holds
        (its holder word is ``HELD``, 0): found with whole-span integer and byte operations,
        as a sweep runs this for every span under the lock."""
        a0, n = start << self.page_shift, cls.nelems
        allocated = int.from_bytes(nonzero_flags(bytes(pages.data[a0:a0 + n])), "little")
        h0 = a0 + cls.holder_at
        holders = bytes(pages.data[h0:h0 + HOLDER_SIZE * n])
        word_bits = 0  # byte k is non-zero where slot k's holder word is
        for lane in range(HOLDER_SIZE):
            word_bits |= int.from_bytes(holders[lane::HOLDER_SIZE], "little")
        owned = int.from_bytes(nonzero_flags(word_bits.to_bytes(n, "little")), "little")
        return set(positions((allocated & ~owned).to_bytes(n, "little"), 1))

    # -- ownership (lock holder) ---------------------------------------------------------

    def disown_locked(self, pages: ArenaPages, start: int) -> bool:
        """End the ownership of the span at ``start``; True if it was empty and freed.

        A span holding a marked object gets its pageMarks bit first, so a sweep
        that looks only at pageMarks cannot take it for garbage.
        """
        c = pages.sclass[start]
        if not c and not start and pages.giant_ids[0] and pages.owner[0]:
            return giant.drop_part_locked(self, pages)  # a giant object's part, never made
        found = pages.span_of(start)
        if found is None or found[1] != c or not 0 < c < len(self.classes):
            return False
        cls = self.classes[c]
        a0 = start << self.page_shift
        alloc = bytes(pages.data[a0:a0 + cls.nelems])
        self._journal.begin(DISOWN, pages.index, start)
        if alloc.count(0) == cls.nelems:
            pages.release(start)
            self._journal.end()
            return True
        marks = bytes(pages.data[a0 + cls.nelems:a0 + 2 * cls.nelems])
        if (int.from_bytes(alloc, "little") & int.from_bytes(marks, "little")
                or self.holds_kept(pages, start, c)):
            pages.set_mark(start)  # a marked object, or one that a root or a structure holds
        pages.owner[start] = 0
        crash.reach("cache.released")
        if 0 in alloc:
            self._summaries.partial(c).mark(pages.index)
        self._journal.end()
        return False

    def reclaim_locked(self) -> int:
        """Disown every span whose owner is dead (lock holder); returns how many.

        Visits only the arenas the owned tree names, and clears the leaf of
        each arena left with no owned span.
        """
        live = self.heap._live
        assert live is not None
        owned = self._summaries.owned
        alive: dict[int, bool] = {}
        reclaimed = 0
        index = owned.find(1)
        while index >= 0:
            pages = self.pages_of(index)
            still_owned = False
            for start in pages.owned_starts():
                token = pages.owner[start]
                if token not in alive:
                    alive[token] = live.token_alive(token)
                if alive[token]:
                    still_owned = True
                else:
                    self.disown_locked(pages, start)
                    reclaimed += 1
            if not still_owned:
                owned.clear(index)
            index = owned.find(1, index + 1)
        return reclaimed

    def release_empty_locked(self) -> int:
        """Free every empty unowned small span of the arenas with partial hints, and this
        handle's empty spares (lock holder, in the handle's mutex); how many."""
        released = self._release_empty_spares_locked()
        hinted = set()
        for c in self._summaries.hinted_classes():
            hints = self._summaries.partial(c)
            index = hints.find(1)
            while index >= 0:
                hinted.add(index)
                index = hints.find(1, index + 1)
        for index in sorted(hinted):
            pages = self.pages_of(index)
            for start in pages.starts():
                c = pages.sclass[start]
                if pages.owner[start] or not 0 < c < len(self.classes):
                    continue
                a0 = start << self.page_shift
                nelems = self.classes[c].nelems
                if bytes(pages.data[a0:a0 + nelems]).count(0) == nelems:
                    self._journal.begin(PAGES, index)
                    pages.release(start)
                    self._journal.end()
                    released += 1
        return released


def holder_of(token: int) -> int:
    """The holder word of liveness token ``token`` (slot + 1, epoch): its 32 bits hold
    ``(slot + 1) << 16 | epoch & 0xFFFF``.  ``HELD`` (0): a root or a queue holds the
    object; ``ORPHAN``: no process does (a slot that never exists)."""
    return (token >> 32) << 16 | token & 0xFFFF


def _as_int(value: object, error: Exception) -> int:
    """``value`` as an int if it is an integer type other than bool (numpy ints), else raise."""
    index = getattr(type(value), "__index__", None)
    if index is None or isinstance(value, bool):
        raise error
    return operator.index(value)  # type: ignore[arg-type]


Note = Callable[[str, str, bool], bool]


def audit_arena(allocator: Allocator, index: int, note: Note, journaled: bool = True,
                heal: bool = False) -> bool:
    """fsck of arena ``index``'s page metadata (lock holder); False if the arena is lost.

    ``note(code, message, fixable)`` records each problem and says whether to
    fix it now; fixes are made under the journal's ``PAGES(index)``, unless
    the caller's repair of another journal entry keeps it (``journaled=False``).
    With ``heal`` (a writable holder's repair) the arena's partial hints are
    set again for every unowned span with a free slot: a hint cleared by a
    holder that stopped is no finding, only a span nobody would adopt.
    """
    try:
        pages = allocator.pages_of(index)
    except HeapCorruptError:
        return False  # the index checks report a lost arena
    if heal and not allocator.readonly:
        _heal_partial_hints(allocator, pages)
    writable = not allocator.readonly
    unfixed = 0
    for problem in pages.audit(allocator.span_ok):
        fixable = problem.fix is not None and writable
        if note(problem.code, problem.message, fixable) and problem.fix is not None:
            if journaled:
                allocator._journal.begin(PAGES, index)
            problem.fix()
            if journaled:
                allocator._journal.end()
        else:
            unfixed += 1
    if not unfixed:  # the summary is derived from the metadata: check it once that is right
        check_summary_leaves(allocator, pages, note, heal)
    return True


def _heal_partial_hints(allocator: Allocator, pages: ArenaPages) -> None:
    """Mark the partial leaf of each class with an unowned span that has a free slot."""
    summaries = allocator._summaries
    for start in pages.starts():
        c = pages.sclass[start]
        if pages.owner[start] or not 0 < c < len(allocator.classes):
            continue
        a0 = start << allocator.page_shift
        if 0 in bytes(pages.data[a0:a0 + allocator.classes[c].nelems]) and not summaries.partial(
                c).get(pages.index):
            summaries.partial(c).mark(pages.index)


def check_summary_leaves(allocator: Allocator, pages: ArenaPages, note: Note,
                         heal: bool = False) -> None:
    """The arena's leaves in the free and owned trees against its metadata (lock holder).

    The free leaf must be the arena's longest free run (capped); the owned
    leaf must be set if a span of the arena has an owner (a set leaf with none
    is only a wasted visit, cleared by the next reclaim).
    """
    summaries = allocator._summaries
    index = pages.index
    writable = not allocator.readonly
    longest = longest_free_run(bytes(pages.used), CAP)
    if summaries.free.get(index) != longest and note(
            "summary-free", f"arena {index}: the free-page summary says "
            f"{summaries.free.get(index)} pages in a row, the arena has {longest}", writable):
        summaries.free.set(index, longest)
    if pages.owned_starts() and not summaries.owned.get(index) and note(
            "summary-owned", f"arena {index} has spans with owners that the owned summary "
            "does not list", writable):
        summaries.owned.mark(index)
    trees = [("free", summaries.free), ("owned", summaries.owned)]
    # A partial tree's path can lag only under a set leaf (a marker stopped between them).
    trees += [("partial", tree) for tree in map(summaries.partial, range(1, len(allocator.classes)))
              if tree.get(index)]
    for name, tree in trees:
        # In the hint trees (owned, partial) a node set over a row of zeros is no finding:
        # find() heals it where it meets it (summary.py).  Nor is a partial leaf's path left
        # 0 by a marker killed inside the lock-free mark (heal_lost_marks raises it).
        if tree.path_is_right(index, hint=name != "free"):
            continue
        if name == "partial":
            if heal and writable:
                tree.fix_path(index)
        elif note(f"summary-{name}", f"arena {index}: the nodes above its leaf in the {name} "
                  "summary disagree with it (a holder stopped between them)", writable):
            tree.fix_path(index)


def summary_trees(allocator: Allocator) -> list[tuple[str, ByteTree]]:
    """Every summary tree with its name for findings: free, owned, partial(c)."""
    summaries = allocator._summaries
    return [("free", summaries.free), ("owned", summaries.owned)] + [
        (f"partial({c})", summaries.partial(c)) for c in range(1, len(allocator.classes))]


def check_summary_tree(allocator: Allocator, arenas: set[int], name: str, tree: ByteTree,
                       note: Note, repair: bool) -> bool:
    """Leaves of indices that are no arena, and every node of the tree (lock holder).

    The owned and partial trees are hints that heal themselves: a node set
    over a row of zeros (a holder stopped inside ``clear``) only costs a
    look, and ``find`` lowers it where it meets it; a node left 0 over a set
    leaf (a marker killed inside ``mark``) is raised by the next holder
    whose ``find`` comes back empty (``heal_lost_marks``).  Neither is a
    finding, and a ``repair`` heals both.  Returns True if the tree has such
    nodes.
    """
    hint = name != "free"
    stray = [i for i in tree.nonzero_leaves() if i not in arenas]
    problems = [f"leaf {i} is set, but {i} is no arena" for i in stray[:3]]
    wrong = tree.wrong_nodes()
    stale = hint and bool(wrong)
    problems += [f"level {level} node {node} is {value}, its children's maximum {want}"
                 for level, node, value, want in wrong if not hint]
    reported = bool(problems) and note(f"summary-{name.split('(')[0]}", f"the {name} summary: "
                                       + "; ".join(problems[:3]), not allocator.readonly)
    if reported or (repair and not allocator.readonly and stale):
        for i in stray:
            tree.set(i, 0)
        tree.rebuild()
    return stale
