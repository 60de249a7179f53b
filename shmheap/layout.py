"""Where everything sits in an arena segment's page metadata, and the page-size rules.

An arena's segment is ``arena_size`` data bytes, the 64-byte trailer
(arenas.py), then the page metadata laid out here.  The data is cut into
``P = arena_size // page_size`` pages (``page_size`` is a heap parameter,
8 KiB by default).  What the fields mean and the order in which they are
written is pages.py's; this module only says where they are, so that the
arena segments (arenas.py), the heap's parameters (control.py) and the page
metadata (pages.py) agree on it without importing each other.

Metadata layout (offsets from the metadata's start; all zero is a valid empty
arena, so a new arena needs no initialisation)::

    off   size  field    who writes it
    0        8  (reserved, zero)
    8        8  seq      lock holder: the span records' sequence word (a
                         seqlock), odd while a span is being made or freed;
                         an audit that finds it odd (a holder died mid-way)
                         makes it even after fixing the records
    16       4  part     lock holder: 1 + this arena's place in a giant
                         object (an object over several arenas, giant.py), 0
                         if it holds no part of one; written last, cleared first
    20       4  parts    lock holder: how many arenas that object spans
    24       8  total    lock holder: how many pages that object has
    32      96  (reserved, zero)
    128      P  used     lock holder: 1 for every page of an in-use span
    .        P  state    lock holder: what a free page holds (CLEAN, DIRTY,
                         RELEASED, RELEASING in pages.py); on a used page, meaningless but
                         at a large object's first page: above RELEASING, it counts
                         the roots bound to the object (roots.py)
    .        P  sclass   lock holder: for every page of an in-use span, 0 for a
                         large object or the size class of its slots; 0 on free
                         pages (so ``find`` on it finds the spans of a class)
    .      P/8  inuse    pageInUse bitmap, lock holder: the bit of a span's first
                         page, set last when the span is made, cleared first
                         when it is freed
    .      P/8  marks    pageMarks bitmap: the bit of a span's first page once it
                         holds a marked object.  Set under the lock (only the
                         first mark of a span in a cycle writes, see walker.py);
                         cleared by start_cycle, which runs alone by contract
    (8-al)  4P  span     lock holder: 1 + the span's first page, for every page of
                         an in-use span; a free page keeps its last value, so
                         ``span[p] == p + 1`` on a free page says "a span
                         started here" (double-free diagnosis only)
    .       4P  npages   lock holder: at a span's first page, its length in pages
    .       8P  owner    lock holder: at a span's first page, the liveness token
                         of the process whose cache allocates in it (or that is
                         making the giant object it is a part of), or 0
    .       4P  slack    at a large object's first page (a giant object's: its
                         first part's page 0): its pages' bytes minus the n of
                         ``alloc(n)``; written by the allocating lock holder
                         before the span is published, never changed after
    .       4P  holder   at a large object's first page: the object's holder
                         word (allocator.py: its owner's short token, 0 while a
                         root or a queue holds it); written by the allocating
                         lock holder before the span is published, then by the
                         lock holder binding roots, adopting or handing it over

The native core's header (``_native.c``) repeats these offsets; a test checks
that both agree byte for byte.
"""

from __future__ import annotations

import functools
import mmap
from typing import NamedTuple

from .errors import InvalidParameterError

DEFAULT_PAGE_SIZE = 8192
MIN_PAGES_PER_ARENA = 8
HEADER_SIZE = 128
SEQ_OFFSET = 8
GIANT_OFFSET = 16


def check_page_size(page_size: object, arena_size: int) -> int:
    """Return ``page_size`` if it is a power of two, an OS-page multiple, <= arena_size / 8."""
    if not isinstance(page_size, int) or isinstance(page_size, bool):
        raise InvalidParameterError(f"page_size must be an int, not {type(page_size).__name__}")
    if page_size < mmap.PAGESIZE or page_size & (page_size - 1):
        raise InvalidParameterError(
            f"page_size {page_size} is not a power of two of at least the OS page size "
            f"{mmap.PAGESIZE}; use e.g. 8192")
    if page_size * MIN_PAGES_PER_ARENA > arena_size:
        raise InvalidParameterError(
            f"page_size {page_size} leaves fewer than {MIN_PAGES_PER_ARENA} pages in an arena "
            f"of {arena_size} bytes; use a smaller page_size or a larger arena_size")
    return page_size


class Layout(NamedTuple):
    """Offsets of the metadata fields for one (arena_size, page_size)."""

    pages: int
    used: int
    state: int
    sclass: int
    inuse: int
    marks: int
    span: int
    npages: int
    owner: int
    slack: int
    holder: int
    size: int


@functools.lru_cache(maxsize=16)
def layout(arena_size: int, page_size: int) -> Layout:
    pages = arena_size // page_size
    used = HEADER_SIZE
    state = used + pages
    sclass = state + pages
    inuse = sclass + pages
    marks = inuse + pages // 8
    span = (marks + pages // 8 + 7) & ~7
    npages = span + 4 * pages
    owner = npages + 4 * pages
    slack = owner + 8 * pages
    holder = slack + 4 * pages
    size = holder + 4 * pages
    return Layout(pages, used, state, sclass, inuse, marks, span, npages, owner, slack, holder,
                  size)


def meta_size(arena_size: int, page_size: int) -> int:
    """Bytes of metadata after an arena's trailer."""
    return layout(arena_size, page_size).size
