"""Pages and per-arena page metadata: Go's ``heapArena``, shared between processes.

An arena's segment is ``arena_size`` data bytes, the 64-byte trailer
(arenas.py), then the metadata this module lays out.  The data is cut into
``P = arena_size // page_size`` pages (``page_size`` is a heap parameter,
8 KiB by default).  A *span* is a run of pages holding either one large
object or the slots of one small size class (allocator.py).

The metadata's layout (offsets, sizes, who writes each field) is in layout.py.

Which arenas have free pages, spans with owners, or unowned spans of a
class with free slots is summarised across the heap in summary.py; every
change of ``used`` here updates the arena's leaf of the "free" tree (its
longest free run) in the same journaled mutation.

A giant object's part (``part``, ``parts``, ``total``: the *giant record*)
is a span at page 0 of class 0, like a large object's; the record is
written before that span is made and cleared after it is freed, each
between two stores of ``seq``, so a record on an arena whose page 0 is free
was left by a holder stopped half-way, and the audit clears it.

That is 29.25 bytes per page plus 128: 0.36 % of an 8 KiB page, 0.71 % of a
4 KiB one (the per-object bytes of small spans live in the spans themselves,
see allocator.py).  Go keeps pageInUse/pageMarks as bitmaps and sets marks
with an atomic OR; Python has no atomic read-modify-write on shared memory,
so a bit is only ever changed under the heap lock, and every field written
without the lock (the per-object bytes; summary.py's partial hints) is a
whole byte whose concurrent writers all store the same value.

Publication order (the heap lock held, ``journal`` naming the arena):

* make a span: (zero its dirty pages, re-reserve released ones) -> span,
  npages, sclass, owner, marks bit (born marked) -> used -> inuse bit.
* free a span: state DIRTY -> marks bit, owner -> inuse bit -> used.

A holder killed anywhere leaves at worst used pages that no published span
covers (a span half made or half freed); ``audit`` finds them and returns
them to the free pages as RELEASING (may hold data, may be unreserved: the
next user zeroes and re-reserves them).  ``journal`` (a control-segment
word) names the arena a holder was changing, so crash recovery audits one
arena instead of all.

Every lock-holder method that writes a span's records (``used``, ``sclass``,
``inuse``, ``span``, ``npages``: ``publish``, ``release`` and the audit's
fixes) brackets its writes with two stores to ``seq``: ``seq + 1`` (odd;
``seq + 2`` if a dead holder left it odd) before the first write,
``seq + 1`` (even) after the last.  Each store is one aligned 8-byte word,
so it cannot tear.

Lock-free readers (allocator.free/view/size_of, walker.py) read used ->
span -> sclass -> npages between two reads of ``seq`` (``steady``): an odd
or changed ``seq`` means a span was made, freed or remade meanwhile, and
the read is retried, at most ``READ_RETRIES`` times.  So a reader never
combines one span's length with another's size class (ABA at one first
page).  If ``seq`` does not hold still (a holder is mid-way, or died
mid-way and nobody has repaired yet) the walker skips the span and the
allocator reads under the heap lock instead.  Every number is still
bounds-checked, and what a reader gets is a snapshot that may be stale by
the time it acts.

This module owns the metadata layout, the page-level mutations and their
order, and the audit.  It never takes the heap lock: the mutating methods
say "lock holder only", and allocator.py/walker.py call them with it held.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, NamedTuple, TypeVar

from . import core, crash, segments
from .errors import HeapCorruptError, OutOfSharedMemoryError
from .layout import GIANT_OFFSET, SEQ_OFFSET, layout
from .lazy import import_whole
from .names import arena_name
from .summary import CAP

if TYPE_CHECKING:
    from .arenas import Arena
    from .summary import Summaries


#: states of a free page
CLEAN, DIRTY, RELEASED, RELEASING = 0, 1, 2, 3
NEEDS_ZERO = (DIRTY, RELEASING)
NEEDS_RESERVE = (RELEASED, RELEASING)
_U64 = (1 << 64) - 1
#: How often a lock-free reader retries while ``seq`` is odd or changes under it.
READ_RETRIES = 100
#: what ``zero`` copies from (a 256 MiB ``bytes(n)`` would be a 256 MiB allocation to fault in)
_ZEROS = memoryview(bytes(1 << 20))
_T = TypeVar("_T")

#: Set to False to force the pure-Python scans (tests), True to require numpy,
#: None to use numpy when it is importable.
USE_NUMPY: bool | None = None


def numpy_or_none() -> ModuleType | None:
    """numpy for bitmap scans, honouring USE_NUMPY."""
    if USE_NUMPY is False:
        return None
    try:
        return import_whole("numpy")
    except ImportError:
        if USE_NUMPY:
            raise
        return None


def bits_set(data: bytes) -> list[int]:
    """Positions of the set bits of a little-endian bitmap, ascending."""
    np = numpy_or_none()
    if np is not None:
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
        return [int(i) for i in np.flatnonzero(bits)]
    found = []
    word = int.from_bytes(data, "little")
    while word:
        low = word & -word
        found.append(low.bit_length() - 1)
        word ^= low
    return found


def runs(data: bytes, value: int) -> Iterator[tuple[int, int]]:
    """(start, length) of each maximal run of bytes equal to ``value`` (0 or 1)."""
    other = 1 - value
    pos = data.find(value)
    while pos >= 0:
        end = data.find(other, pos)
        if end < 0:
            end = len(data)
        yield pos, end - pos
        pos = data.find(value, end)


class Giant(NamedTuple):
    """An arena's giant record: its part of an object over ``parts`` arenas (giant.py)."""

    #: this arena's place in the object, 0 for the first (whose heap address is the ref)
    part: int
    #: arenas of the object
    parts: int
    #: pages of the object: every page of each arena but the last, some of the last
    total: int

    def first(self, index: int) -> int:
        """The index of the object's first arena, if this record is arena ``index``'s."""
        return index - self.part

    def part_pages(self, pages_per_arena: int) -> int:
        """Pages of this part: all of its arena's, or what is left of ``total`` for the last."""
        return min(pages_per_arena, self.total - self.part * pages_per_arena)


class ArenaPages:
    """This process's view of one arena's data and page metadata."""

    __slots__ = ("arena", "base", "data", "giant_ids", "giant_total", "heap_name", "holder",
                 "index", "inuse", "marks", "meta", "npages", "owner", "page_shift", "page_size",
                 "pages", "sclass", "seq", "slack", "span", "state", "summaries", "used")

    def __init__(self, heap_name: str, arena: Arena, page_size: int,
                 summaries: Summaries) -> None:
        lay = layout(arena.size, page_size)
        meta = arena.meta
        if len(meta) < lay.size:
            raise HeapCorruptError(f"arena {arena.index} of heap {heap_name!r} has no room "
                                   "for its page metadata")
        self.heap_name = heap_name
        self.arena = arena
        self.index = arena.index
        self.base = arena.base
        self.data = arena.buf
        self.page_size = page_size
        self.page_shift = page_size.bit_length() - 1
        self.pages = lay.pages
        self.meta = meta
        self.seq = meta[SEQ_OFFSET:SEQ_OFFSET + 8].cast("Q")
        #: the giant record: part + 1 and parts (uint32), then total (uint64)
        self.giant_ids = meta[GIANT_OFFSET:GIANT_OFFSET + 8].cast("I")
        self.giant_total = meta[GIANT_OFFSET + 8:GIANT_OFFSET + 16].cast("Q")
        self.used = meta[lay.used:lay.used + lay.pages]
        self.state = meta[lay.state:lay.state + lay.pages]
        self.sclass = meta[lay.sclass:lay.sclass + lay.pages]
        self.inuse = meta[lay.inuse:lay.inuse + lay.pages // 8]
        self.marks = meta[lay.marks:lay.marks + lay.pages // 8]
        self.span = meta[lay.span:lay.span + 4 * lay.pages].cast("I")
        self.npages = meta[lay.npages:lay.npages + 4 * lay.pages].cast("I")
        self.owner = meta[lay.owner:lay.owner + 8 * lay.pages].cast("Q")
        #: a large object's bytes short of its pages, and its holder word (at its first page)
        self.slack = meta[lay.slack:lay.slack + 4 * lay.pages].cast("I")
        self.holder = meta[lay.holder:lay.holder + 4 * lay.pages].cast("I")
        #: the heap's summaries: this arena is leaf ``index`` of each tree
        self.summaries = summaries

    def native_record(self) -> object | None:
        """The native core's raw view of this arena's metadata (for its free() and root
        binds), or None."""
        if core.native is None:
            return None
        lay = layout(self.arena.size, self.page_size)
        record: object = core.native.Record(self.arena.mapping, self.arena.meta_offset,
                                            lay.pages, lay.used, lay.sclass, lay.span,
                                            lay.npages, lay.owner, lay.marks)
        return record

    def close(self) -> None:
        """Release the views into the arena and unmap it (if nothing else holds it)."""
        for name in ("data", "meta", "seq", "giant_ids", "giant_total", "used", "state",
                     "sclass", "inuse", "marks", "span", "npages", "owner", "slack", "holder"):
            getattr(self, name).release()
        self.arena.close()

    # -- reading (any process, no lock) ------------------------------------------------

    def in_use(self, page: int) -> bool:
        return bool(self.inuse[page >> 3] >> (page & 7) & 1)

    def marked(self, page: int) -> bool:
        return bool(self.marks[page >> 3] >> (page & 7) & 1)

    def starts(self) -> list[int]:
        """First pages of the in-use spans (pageInUse bits), ascending."""
        return bits_set(bytes(self.inuse))

    def steady(self, read: Callable[[int], _T], arg: int) -> _T | None:
        """``read(arg)`` of span records made while ``seq`` held one even value, else None.

        None when ``seq`` stayed odd or kept changing for ``READ_RETRIES``
        tries: a holder is changing this arena's spans (or died doing so).
        (A while loop and no closure: this is on the path of every ``free``.)
        """
        seq = self.seq
        tries = READ_RETRIES
        while tries:
            before = seq[0]
            if not before & 1:
                got = read(arg)
                if seq[0] == before:
                    return got
            tries -= 1
        return None

    def span_of(self, start: int) -> tuple[int, int] | None:
        """(npages, sclass) of the span published at ``start``, bounds-checked, else None.

        The lock holder's read; lock-free readers use ``read_span``.
        """
        npages = self.npages[start]
        if (not self.in_use(start) or not 1 <= npages <= self.pages - start
                or self.span[start] != start + 1 or self.used[start] != 1):
            return None
        return npages, self.sclass[start]

    def span_record(self, start: int) -> tuple[int, int, Giant | None] | None:
        """``span_of`` and, for a span of class 0 at page 0, the giant record (or None)."""
        found = self.span_of(start)
        if found is None:
            return None
        return *found, None if start or found[1] else self.giant()

    def read_span(self, start: int) -> tuple[int, int, Giant | None] | None:
        """``span_record`` for a lock-free reader; None also if the span is changing meanwhile.

        (A giant record is written and cleared between stores of ``seq`` too.)
        """
        return self.steady(self.span_record, start)

    def page_record(self, page: int) -> tuple[int, int, int, int, int]:
        """(used, span entry - 1, sclass, npages, part) of ``page``: raw reads for ``steady``.

        sclass and npages are those of the span's first page, 0 if the entry
        names no page at or before ``page``; npages is 0 too unless the span
        it describes holds ``page`` and its last page names the same start.
        ``part`` is the giant record's ``part`` field (1 + the arena's place
        in a giant object, 0 for none) if the span starts at page 0, else 0.
        """
        used = self.used[page]
        start = self.span[page] - 1
        if not 0 <= start <= page:
            return used, start, 0, 0, 0
        npages = self.npages[start]
        if not page < start + npages <= self.pages or self.span[start + npages - 1] != start + 1:
            npages = 0
        return used, start, self.sclass[start], npages, 0 if start else self.giant_ids[0]

    def giant(self) -> Giant | None:
        """This arena's giant record if it has one that could be true, else None (no lock:
        what a reader gets is a snapshot; the lock holder's is the truth)."""
        part, parts = self.giant_ids[0] - 1, self.giant_ids[1]
        total = self.giant_total[0]
        if (not 0 <= part < min(parts, self.index) or parts < 2
                or not (parts - 1) * self.pages < total <= parts * self.pages):
            return None
        return Giant(part, parts, total)

    def set_giant(self, giant: Giant | None) -> None:
        """Write this arena's giant record, or clear it (lock holder), between ``seq`` stores.

        Written before the part's span is made, cleared after it is freed.
        """
        self.begin_change()
        ids = self.giant_ids
        if giant is None:
            ids[0] = 0
            ids[1] = 0
            self.giant_total[0] = 0
        else:
            self.giant_total[0] = giant.total
            ids[1] = giant.parts
            ids[0] = giant.part + 1
        self.end_change()

    def used_pages(self) -> bytes:
        """The ``used`` bytes; HeapCorruptError if one is neither 0 nor 1."""
        used = bytes(self.used)
        if used.translate(None, b"\0\1"):
            raise self.corrupt("some pages have a used byte that is neither 0 nor 1")
        return used

    def corrupt(self, what: str) -> HeapCorruptError:
        return HeapCorruptError(f"heap {self.heap_name!r}: arena {self.index}: {what}; run "
                                f"`shmheap fsck --repair {self.heap_name}`")

    def class_starts(self, sclass: int) -> Iterator[int]:
        """First pages of the in-use spans of size class ``sclass`` (>= 1), ascending."""
        data = bytes(self.sclass)
        key = bytes([sclass])
        pos = data.find(key)
        while pos >= 0:
            found = self.span_of(pos)
            step = 1
            if found is not None and found[1] == sclass:
                yield pos
                step = found[0]
            pos = data.find(key, pos + step)

    def owned_starts(self) -> list[int]:
        """First pages of the in-use spans that record an owner."""
        np = numpy_or_none()
        if np is not None:
            candidates = [int(p) for p in np.flatnonzero(np.frombuffer(self.owner, np.uint64))]
        else:
            candidates = [p for p in self.starts() if self.owner[p]]
        return [p for p in candidates if self.in_use(p)]

    # -- page heap (heap-lock holder only) ------------------------------------------

    def find_free_run(self, npages: int) -> int:
        """First page of a run of ``npages`` free pages, or -1.

        The first free page is tried first, with one comparison: most often the
        run starts there (always in a new arena), and a search for a long run
        of zeros costs tens of µs per 64 Ki pages.
        """
        used = bytes(self.used)
        free = bytes(npages)
        first = used.find(0)
        if first < 0 or used.startswith(free, first):
            return first
        return used.find(free, first + 1)

    def prepare(self, start: int, npages: int, reserve: bool) -> list[tuple[int, int]]:
        """Re-reserve released pages of a run about to be used; return runs needing zeroes.

        The state bytes are not changed: if reserving fails (OutOfSharedMemoryError),
        the run stays free as it was.
        """
        states = bytes(self.state[start:start + npages])
        if states == bytes(npages):  # all CLEAN (a new arena's): one comparison
            return []
        if reserve:
            for first, count in _runs_where(states, NEEDS_RESERVE):
                self.reserve(start + first, count)
        return [(start + first, count) for first, count in _runs_where(states, NEEDS_ZERO)]

    def zero(self, start: int, npages: int) -> None:
        """Zero the data of ``npages`` pages (their owner only), from one small zero buffer.

        Not by punching the run out (``punch``) at allocation: freeing populated
        pages costs the kernel O(pages) too, and the first touch of each page
        afterwards a fault; measured, both lose to this copy (docs/design.md,
        giant objects).  A giant object's pages are cleared when it is freed.
        """
        shift = self.page_shift
        first, end = start << shift, (start + npages) << shift
        data = self.data
        for at in range(first, end, len(_ZEROS)):
            data[at:min(end, at + len(_ZEROS))] = _ZEROS[:end - at]

    def begin_change(self) -> None:
        """Make ``seq`` odd before the first write to span records (``seq + 2`` if it is)."""
        self.seq[0] = ((self.seq[0] + 1) | 1) & _U64  # wraps, as a garbage word may

    def end_change(self) -> None:
        """Make ``seq`` even after the last write to span records (no-op if it is)."""
        seq = self.seq[0]
        if seq & 1:
            self.seq[0] = (seq + 1) & _U64

    def publish(self, start: int, npages: int, sclass: int, owner: int) -> None:
        """Make a span of free pages (prepared and zeroed as needed); publication is last."""
        self.begin_change()
        self.span[start:start + npages] = _u32_run(start + 1, npages)
        self.npages[start] = npages
        self.sclass[start:start + npages] = bytes([sclass]) * npages
        if owner:
            self.summaries.owned.mark(self.index)
        self.owner[start] = owner
        self.set_mark(start)  # born marked: a span made during a cycle survives it
        crash.reach("span.described")
        self.used[start:start + npages] = b"\1" * npages
        crash.reach("span.pages_used")
        self.inuse[start >> 3] |= 1 << (start & 7)
        self.end_change()
        self._used_a_run()
        crash.reach("span.published")

    def check_span(self, start: int) -> int:
        """The pages of the span published at ``start``, its records checked whole (lock holder).

        HeapCorruptError if they do not describe one span (garbage in the metadata).
        """
        found = self.span_of(start)
        npages, sclass = found if found is not None else (0, 0)
        end = start + npages
        if (found is None or self.span[start:end] != _u32_run(start + 1, npages)
                or bytes(self.used[start:end]).count(1) != npages
                or bytes(self.sclass[start:end]).count(sclass) != npages):
            raise self.corrupt(f"the records of the span at page {start} do not describe a span")
        return npages

    def release(self, start: int, state: int = DIRTY) -> int:
        """Free the span at ``start``; returns its pages.  Its data becomes DIRTY, or
        ``state`` (CLEAN, RELEASED) for a caller that zeroed or punched the pages while
        the span was still its own (giant.py).

        The records are checked first (``check_span``): garbage is never freed.
        """
        npages = self.check_span(start)
        self.begin_change()
        self.state[start:start + npages] = bytes([state]) * npages
        self.clear_mark(start)
        self.owner[start] = 0
        self.inuse[start >> 3] &= ~(1 << (start & 7)) & 0xFF
        crash.reach("span.unpublished")
        self.used[start:start + npages] = bytes(npages)
        crash.reach("span.freed")
        self.sclass[start:start + npages] = bytes(npages)
        self.end_change()
        self._freed_a_run(start, npages)
        return npages

    # -- the arena's leaf in the "free" summary (lock holder) -----------------------------

    def _used_a_run(self) -> None:
        """After pages became used: the longest free run is as long as before, or shorter."""
        tree = self.summaries.free
        longest = tree.get(self.index)
        if longest and bytes(self.used).find(bytes(longest)) < 0:
            tree.set(self.index, longest_free_run(bytes(self.used), longest))

    def _freed_a_run(self, start: int, npages: int) -> None:
        """After pages ``start``.. became free: the run they joined may be the new longest."""
        used = bytes(self.used)
        first = used.rfind(1, 0, start) + 1
        end = used.find(1, start + npages)
        run = (self.pages if end < 0 else end) - first
        tree = self.summaries.free
        if run > tree.get(self.index):
            tree.set(self.index, run)

    def refresh_free(self) -> None:
        """Recompute the arena's leaf from ``used`` (repair, fsck, a new arena)."""
        self.summaries.free.set(self.index, longest_free_run(bytes(self.used), CAP))

    def set_mark(self, start: int) -> None:
        """Set the pageMarks bit of ``start`` (lock holder: a read-modify-write)."""
        self.marks[start >> 3] |= 1 << (start & 7)

    def clear_mark(self, start: int) -> None:
        self.marks[start >> 3] &= ~(1 << (start & 7)) & 0xFF

    def reserve(self, start: int, npages: int) -> None:
        """Allocate the memory of pages whose holes were punched (posix_fallocate)."""
        shift = self.page_shift
        with self._file() as fd:
            try:
                os.posix_fallocate(fd, start << shift, npages << shift)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                    raise OutOfSharedMemoryError(
                        f"/dev/shm is full: cannot reserve {npages << shift} bytes in arena "
                        f"{self.index} of heap {self.heap_name!r}; free space there or "
                        "free objects") from None
                raise

    def punch(self, start: int, npages: int) -> None:
        """Return the memory of pages to the OS; they read zero afterwards.

        Through this process's own mapping of the arena, never by name: a
        name recycled by a new heap is not touched.
        """
        shift = self.page_shift
        self.arena.punch(start << shift, npages << shift)

    @contextlib.contextmanager
    def _file(self) -> Iterator[int]:
        """The arena's file, opened by name: it must still be the one this process mapped
        (HeapNotFoundError if its heap was destroyed and re-created since)."""
        fd, _st = segments.open_fd(arena_name(self.heap_name, self.index), readonly=False,
                                   identity=self.arena.identity)
        try:
            yield fd
        finally:
            os.close(fd)

    # -- audit (heap-lock holder; fsck and crash recovery) ---------------------------

    def audit(self, span_ok: Callable[[int, int], bool]) -> list[Problem]:
        """Everything wrong with this arena's metadata, each with its fix (None: fatal)."""
        problems: list[Problem] = []
        covered = bytearray(self.pages)
        for start in self.starts():
            npages, sclass = self.npages[start], self.sclass[start]
            if not 1 <= npages <= self.pages - start or not span_ok(sclass, npages):
                problems.append(Problem("span-bad", f"arena {self.index}: the span at page "
                                        f"{start} has {npages} pages of class {sclass}", None))
                continue
            if any(covered[start:start + npages]) or any(
                    self.span[p] != start + 1 for p in range(start, start + npages)):
                problems.append(Problem("span-overlap", f"arena {self.index}: the span at "
                                        f"page {start} overlaps another", None))
                continue
            covered[start:start + npages] = b"\1" * npages
        used = bytes(self.used)  # a garbage byte (neither 0 nor 1) counts as used
        for start, count in runs(bytes(1 if u and not c else 0 for u, c in zip(used, covered,
                                                                               strict=True)), 1):
            problems.append(Problem(
                "pages-orphaned", f"arena {self.index}: pages {start}..{start + count - 1} are "
                "marked used but no span holds them (a process died making or freeing a span)",
                functools.partial(self._free_orphans, start, count)))
        for start, count in runs(bytes(1 if c and u != 1 else 0 for u, c in zip(used, covered,
                                                                                strict=True)), 1):
            problems.append(Problem(
                "pages-unmarked", f"arena {self.index}: pages {start}..{start + count - 1} of "
                "a published span are not marked used",
                functools.partial(self._mark_used, start, count)))
        bad = [p for p, s in enumerate(bytes(self.state)) if s > RELEASING and not used[p]]
        if bad:
            problems.append(Problem(
                "page-state", f"arena {self.index}: {len(bad)} free pages have an unknown "
                "state", lambda: self._set_states(bad, RELEASING)))
        problems += self._audit_giant()
        if self.seq[0] & 1:  # last: its fix runs after the record fixes above
            problems.append(Problem(
                "span-seq-odd", f"arena {self.index}: its span sequence word is odd (a process "
                "died making or freeing a span); lock-free readers wait for it to be even",
                self.end_change))
        return problems

    def _audit_giant(self) -> list[Problem]:
        """The giant record against the span at page 0 (see the module docstring)."""
        part = self.giant_ids[0]
        if not (part or self.giant_ids[1] or self.giant_total[0]):
            return []
        if not part or not self.in_use(0):
            return [Problem("giant-record", f"arena {self.index}: a giant object's record "
                            "stayed on it, but its page 0 holds no part of one (a process died "
                            "making or freeing a giant object)",
                            functools.partial(self.set_giant, None))]
        giant = self.giant()
        if (giant is None or self.sclass[0] or self.span[0] != 1
                or self.npages[0] != giant.part_pages(self.pages)):
            return [Problem("giant-record", f"arena {self.index}: its giant record (part "
                            f"{part - 1} of {self.giant_ids[1]}, {self.giant_total[0]} pages) "
                            "does not describe the span at its page 0", None)]
        return []

    def _free_orphans(self, start: int, npages: int) -> None:
        self.begin_change()
        self.state[start:start + npages] = bytes([RELEASING]) * npages
        self.owner[start:start + npages] = memoryview(bytes(8 * npages)).cast("Q")
        self.used[start:start + npages] = bytes(npages)
        self.sclass[start:start + npages] = bytes(npages)
        self.end_change()
        self._freed_a_run(start, npages)

    def _mark_used(self, start: int, npages: int) -> None:
        self.begin_change()
        self.used[start:start + npages] = b"\1" * npages
        self.end_change()
        self._used_a_run()

    def _set_states(self, pages: list[int], state: int) -> None:
        for page in pages:
            self.state[page] = state


def longest_free_run(used: bytes, at_most: int) -> int:
    """The longest run of 0 bytes (free pages) in ``used``, or ``at_most`` if one is that long.

    A binary search over run lengths, each probe one ``bytes.find``.
    """
    found, missing = 0, min(at_most, len(used)) + 1
    while found + 1 < missing:
        mid = (found + missing) // 2
        if used.find(bytes(mid)) >= 0:
            found = mid
        else:
            missing = mid
    return found


class Problem(NamedTuple):
    """One inconsistency ``audit`` found; ``fix`` repairs it (lock holder), None if fatal."""

    code: str
    message: str
    fix: Callable[[], None] | None


def _runs_where(states: bytes, wanted: tuple[int, ...]) -> list[tuple[int, int]]:
    """(start, length) runs of ``states`` whose bytes are in ``wanted``."""
    return list(runs(states.translate(_flags(wanted)), 1))


@functools.cache
def _flags(wanted: tuple[int, ...]) -> bytes:
    """A ``bytes.translate`` table: 1 for the byte values in ``wanted``, 0 for the others."""
    return bytes(1 if value in wanted else 0 for value in range(256))


def _u32_run(value: int, count: int) -> memoryview:
    return memoryview(value.to_bytes(4, "little") * count).cast("I")
