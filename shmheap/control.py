"""The control segment ``shmheap.NAME``: parameters, init state, index header, hint.

Layout (little-endian, one page, every field naturally aligned)::

    off  size  field         who writes it, and when
    ---  ----  ------------  ---------------------------------------------------
      0     8  magic         creator, once (b"shmheap\\0")
      8     4  version       creator, once (LAYOUT_VERSION)
     12     4  state         creator: UNINIT -> INITIALISING -> READY; repair may
                             set BROKEN under the heap lock
     16     8  heap_id       creator, once: random; every arena trailer repeats it
     24     8  arena_size    creator, once
     32     8  max_arenas    creator, once
     40     8  first_cap     creator, once: entries in index generation 0
     48     4  mode          creator, once: file mode of every segment
     52     4  reserve       creator, once: 1 if segments are fallocated at creation
     56     8  created_ns    creator, once: wall-clock time of creation
     64     8  header        heap lock holder only: (generation << 32) | len
     72     8  hint          heap lock holder only: next arena index grow() tries
     80     8  saved_header  repair.py, under the heap lock: the real header of a BROKEN heap
     88     8  page_size     creator, once: bytes of an allocator page (pages.py)
     96     8  gc_cycle      heap lock holder only: mark/sweep cycle number (walker.py)
    104     8  sweep_cursor  heap lock holder only: pages of the cycle's arenas claimed by
                             sweepers so far (walker.py)
    112     8  cycle_arenas  heap lock holder only: index len when the cycle started
    120     8  journal       writable heap-lock holder only: ``op << 56 | arena + 1`` of
                             the mutation in progress, 0 when none (see below)
    128     8  journal_arg   writable heap-lock holder only: the op's argument, written
                             before ``journal``
    136     8  destroyed     ``destroy``, once, before it unlinks anything: 1 (no lock;
                             ``mark_destroyed``).  A handle's root bind reads it
                             instead of looking its control segment's path up

``header`` is the all-arenas index header, kept in one aligned 64-bit word so
that it is written as one unit (a single store: it can never be torn, not even
by SIGKILL) and read as one unit under the heap lock (invariant 3).  The
index capacity is derived: ``cap = first_cap << generation``.

The journal
    A mutation that takes more than one store says what it is doing in
    ``journal`` before its first store and clears it after its last.  It is
    cleared only on success: an exception (Ctrl-C at any bytecode), a failing
    system call or SIGKILL leaves it naming the unfinished mutation, and every
    writable lock holder that finds it non-zero runs the repair for that op
    (repair.py) before anything else, whoever left it.  The ops:

    ``GROW`` (arena i)     linking, appending and mapping arena i (attached.py, index.py)
    ``PAGES`` (arena i)    changing arena i's page metadata (pages.py)
    ``DISOWN`` (arena i,   giving up the cached span at page ``arg`` of arena i
    start page)            (allocator.py)
    ``ROOTS`` (none)       binding, rebinding or unbinding a root; what and how
                           far is in the roots segment's intent record (roots.py)
    ``GIANT`` (arena s,    claiming, growing, completing or freeing parts of the
    arenas k)              giant object over arenas s .. s + k - 1 (giant.py)
    ``COORD`` (record r,   a change to queue, event, counter or barrier r; what it
    coord op)              saved to undo is in the coordination intent (coord.py)

A heap attached ``readonly=True`` maps this segment read-only.  Nothing a
reader must write lives here (see liveness.py).

This module owns the byte layout of the control segment and its checks; it
does not take the lock and decides nothing about when fields change.
"""

from __future__ import annotations

import functools
import os
import struct
import time
from typing import NamedTuple

from . import liveness
from .errors import HeapCorruptError, HeapVersionError
from .layout import DEFAULT_PAGE_SIZE, check_page_size
from .names import MAX_ARENAS_LIMIT, PAGE_SIZE, check_arena_size, check_max_arenas

MAGIC = b"shmheap\0"
LAYOUT_VERSION = 4
SIZE = PAGE_SIZE

UNINIT, INITIALISING, READY, BROKEN = 0, 1, 2, 3
STATE_NAMES = {UNINIT: "uninitialised", INITIALISING: "initialising", READY: "ready",
               BROKEN: "broken"}

_PARAMS = struct.Struct("<8sIIQQQQIIQ")  # magic .. created_ns, offsets 0..63
STATE_OFFSET = 12
#: While the state is INITIALISING the creator holds an OFD write lock on this byte,
#: taken right after the exclusive create.
INIT_LOCK_BYTE = 0
#: Seconds after its creation an unlocked, still empty control segment counts as being
#: created (a creator preempted between its exclusive open and its init lock).
CREATOR_GRACE = 2.0
HEADER_OFFSET = 64
SAVED_HEADER_OFFSET = 80
HINT_OFFSET = 72
PAGE_SIZE_OFFSET = 88
CYCLE_OFFSET = 96
SWEEP_CURSOR_OFFSET = 104
CYCLE_ARENAS_OFFSET = 112
JOURNAL_OFFSET = 120
JOURNAL_ARG_OFFSET = 128
DESTROYED_OFFSET = 136
#: journal ops (see the module docstring)
GROW, PAGES, DISOWN, ROOTS, GIANT, COORD = 1, 2, 3, 4, 5, 6
#: the ops whose arena field names an arena (ROOTS and COORD name none)
ARENA_OPS = frozenset({GROW, PAGES, DISOWN, GIANT})
#: Generations are numbered 0..MAX_GENERATIONS-1; cap doubles with each.
MAX_GENERATIONS = 32


class Params(NamedTuple):
    """The parameters a creator fixes once; every attacher checks them."""

    heap_id: int
    arena_size: int
    max_arenas: int
    first_cap: int
    mode: int
    reserve: bool
    created_ns: int
    page_size: int = DEFAULT_PAGE_SIZE


def write_params(buf: memoryview, params: Params) -> None:
    """Fill a fresh control segment; state stays UNINIT (the caller moves it on)."""
    _PARAMS.pack_into(buf, 0, MAGIC, LAYOUT_VERSION, UNINIT, params.heap_id, params.arena_size,
                      params.max_arenas, params.first_cap, params.mode, int(params.reserve),
                      params.created_ns)
    buf[PAGE_SIZE_OFFSET:PAGE_SIZE_OFFSET + 8] = params.page_size.to_bytes(8, "little")


def read_params(buf: memoryview, where: str) -> tuple[Params, int]:
    """Parse and check a control segment; return its parameters and its state.

    Every number is checked before anything trusts it (invariant 6): a bad
    magic, another layout version or an impossible parameter raises
    HeapCorruptError / HeapVersionError naming the segment ``where``.
    """
    if len(buf) < SIZE:
        raise HeapCorruptError(f"{where} is truncated ({len(buf)} bytes, expected {SIZE})")
    state = peek_state(bytes(buf[:16]), where)
    params = _params_of(bytes(buf[:PAGE_SIZE_OFFSET + 8]))
    if isinstance(params, str):
        raise HeapCorruptError(f"{where} holds {params}")
    return params, state


@functools.lru_cache(maxsize=16)
def _params_of(raw: bytes) -> Params | str:
    """The parameters of a control segment's first bytes, or what is impossible about them
    (cached: every attach of a heap parses the same bytes)."""
    (_magic, _version, _state, heap_id, arena_size, max_arenas, first_cap, mode, reserve,
     created_ns) = _PARAMS.unpack_from(raw, 0)
    page_size = int.from_bytes(raw[PAGE_SIZE_OFFSET:PAGE_SIZE_OFFSET + 8], "little")
    try:
        check_arena_size(arena_size)
        check_max_arenas(max_arenas, arena_size)
        check_page_size(page_size, arena_size)
    except ValueError as exc:
        return f"impossible parameters: {exc}"
    if first_cap < 1 or first_cap & (first_cap - 1) or first_cap > MAX_ARENAS_LIMIT:
        return f"an impossible first index capacity {first_cap}"
    return Params(heap_id, arena_size, max_arenas, first_cap, mode & 0o7777, bool(reserve),
                  created_ns, page_size)


def lock_init(fd: int) -> None:
    """Take the init lock of a control segment this process has just created."""
    if not liveness.try_lock(fd, INIT_LOCK_BYTE):
        raise AssertionError("a fresh control segment cannot be locked by anyone else")


def creator_active(fd: int) -> bool:
    """True if the creator of the (not READY) control segment ``fd`` may still be at work.

    It holds the init lock from right after its exclusive open; only a segment
    still empty (not yet sized) may belong to a creator that has not taken
    it yet, for ``CREATOR_GRACE`` seconds.
    """
    if liveness.is_locked(fd, INIT_LOCK_BYTE):
        return True
    st = os.fstat(fd)
    return st.st_size == 0 and time.time() - st.st_mtime < CREATOR_GRACE


def read_state(buf: memoryview) -> int:
    """The state word of a mapped control segment."""
    return int.from_bytes(buf[STATE_OFFSET:STATE_OFFSET + 4], "little")


def write_state(buf: memoryview, state: int) -> None:
    """Store the state word (one aligned 4-byte store)."""
    buf[STATE_OFFSET:STATE_OFFSET + 4] = state.to_bytes(4, "little")


def peek_state(head: bytes, where: str) -> int:
    """The state word of a control segment's first bytes, as far as they are written.

    A segment still being sized or filled by its creator reads as UNINIT; a
    foreign magic or another layout version is an error at once.
    """
    if len(head) < 16 or head[:8] == bytes(8):
        return UNINIT
    if head[:8] != MAGIC:
        raise HeapCorruptError(f"{where} is not a shmheap control segment (bad magic "
                               f"{head[:8]!r})")
    version, state = struct.unpack_from("<II", head, 8)
    if version != LAYOUT_VERSION:
        raise HeapVersionError(
            f"{where} has layout version {version}, this shmheap reads version "
            f"{LAYOUT_VERSION}; use the matching shmheap version or destroy the heap")
    if state not in STATE_NAMES:
        raise HeapCorruptError(f"{where} has an unknown state word {state}")
    return int(state)


def mark_destroyed(fd: int) -> None:
    """Set ``destroyed`` in the control segment open (writable) at ``fd``, if it is one."""
    if os.pread(fd, len(MAGIC), 0) == MAGIC:
        os.pwrite(fd, (1).to_bytes(8, "little"), DESTROYED_OFFSET)


class Journal:
    """The journal words of a mapped control segment (writable heap-lock holder only)."""

    __slots__ = ("_words",)

    def __init__(self, words: memoryview) -> None:
        #: the control segment as uint64 words
        self._words = words

    def begin(self, op: int, arena: int, arg: int = 0) -> None:
        """Record that mutation ``op`` of ``arena`` starts (the argument first)."""
        words = self._words
        words[JOURNAL_ARG_OFFSET // 8] = arg
        words[JOURNAL_OFFSET // 8] = op << 56 | (arena + 1)

    def end(self) -> None:
        """Record that the mutation finished (never called when it raised)."""
        self._words[JOURNAL_OFFSET // 8] = 0

    def read(self) -> tuple[int, int, int] | None:
        """(op, arena, arg) of the unfinished mutation, or None when the journal is clean.

        ``op`` may be any byte (the word is shared memory): callers check it.
        """
        word = int(self._words[JOURNAL_OFFSET // 8])
        if not word:
            return None
        arena = (word & ((1 << 56) - 1)) - 1
        return word >> 56, arena, int(self._words[JOURNAL_ARG_OFFSET // 8])


def split_header(word: int) -> tuple[int, int]:
    """(generation, len) of a header word."""
    return word >> 32, word & 0xFFFFFFFF


def make_header(generation: int, length: int) -> int:
    return (generation << 32) | length
