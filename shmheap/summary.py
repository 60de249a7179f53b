"""Summaries over every arena index: where to find free pages without looking at every arena.

Go's page allocator keeps a radix tree of summaries over the address space
(``runtime/mpagealloc.go``) so that finding ``npages`` free pages is a walk of
a few levels, not a scan.  shmheap's spans never cross an arena, so one number
per arena is enough at the bottom: its longest run of free pages.  Above it,
each level holds the maximum of 64 entries of the level below, up to a top
row of at most 64 entries.  Finding the first arena with a run of ``n`` free
pages is one 64-entry row per level.

The same shape (``ByteTree``) answers three questions, all in the segment
``shmheap.NAME.sum`` (a sparse file; only the pages of rows in use take
memory)::

    off            what
    0              header: magic b"shmsumm\\0", version, max_arenas, nclasses, and
                   at 28 (u32) 1 if the creator reserved leaf row 0's pages (below)
    64             tree "free": leaf i = min(longest free page run of arena i, 255)
    .              tree "owned": leaf i = 1 if a span of arena i may have an owner
    .              trees "partial(c)", one per size class c >= 1: leaf i = 1 if an
                   unowned span of class c in arena i may have free slots

Each level is padded to 64 entries; the segment holds the levels level by
level (every tree's leaves, then every tree's first nodes, ...).  Who writes
them:

* ``free`` and ``owned``: the heap-lock holder only, inside the journaled
  mutation that changes what they summarise (pages.py, allocator.py); repair
  recomputes the leaf of the journaled arena, fsck every leaf and node.
* ``partial[c]``: any process, without the lock, raises leaf then ancestors to
  1 after it frees into an unowned span (``mark``: byte stores of 1 that
  concurrent writers agree on); the lock holder clears a leaf before it scans
  the arena (``clear``) and clears an ancestor only after seeing its whole row
  zero, re-checking the row afterwards, so a concurrent mark is never lost.

Leaves of arena indices that are not (yet) arenas are 0.  Values are bytes:
a run of 255 pages or more reads 255 and is verified in the arena itself.

The segment is sparse, and a store into a page that has no memory yet would
be SIGBUS on a full /dev/shm.  So levels 2 and up of every tree (a few pages
in all) are reserved when the heap is created, and the pages of an arena's
leaves and first-level nodes in every tree before the arena is published
(``reserve_leaves``, by the grower, before its journal opens: a full
/dev/shm is OutOfSharedMemoryError then, and the arena is not made).  The
pages of the first 64 arena indices' paths (leaf row 0: 2 pages a tree,
scattered, one ``fallocate`` each) are reserved by the heap's creator, and
the header says so, so that no process's first ``grow`` pays for them (the
producer of a hand-over over a new heap did, ~0.4 ms).
Stores of 0 into a leaf are skipped when it already reads 0, so nothing ever
writes into a page nobody reserved.

This module owns the layout of the summary segment and the tree operations.
It reads no arena: callers pass the values.
"""

from __future__ import annotations

import collections
import functools
import itertools
import mmap
import os
import struct
from collections.abc import Callable, Iterator, Sequence

from . import crash, segments
from .bytescan import nonzero_positions
from .errors import HeapCorruptError
from .names import PAGE_SIZE, summary_name

MAGIC = b"shmsumm\0"
VERSION = 2
HEADER = struct.Struct("<8sIIQII")
#: the header's last field when the creator reserved leaf row 0 (any other value: it did not)
ROW_0_RESERVED = 1
HEADER_SIZE = 64
FANOUT = 64
#: leaf and node values are bytes: longer runs than this read as this
CAP = 255
_ZERO_ROW = bytes(FANOUT)
#: ``ByteTree._descend``'s answer for a hit past the last leaf
_PAST_END = -1
#: _AT_LEAST[v]: a 256-byte table that maps every byte >= v to 1, every other to 0
_AT_LEAST = [bytes(v) + bytes([1]) * (256 - v) for v in range(CAP + 1)]


def _row(level: bytes, row: int) -> bytes:
    return level[row * FANOUT:(row + 1) * FANOUT]


def _data_extents(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """(offset, length) of the parts of ``[start, end)`` of file ``fd`` that have memory."""
    extents = []
    offset = start
    while offset < end:
        try:
            offset = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after offset
            break
        if offset >= end:
            break
        hole = min(os.lseek(fd, offset, os.SEEK_HOLE), end)
        extents.append((offset, hole - offset))
        offset = hole
    return extents


@functools.cache
def _level_sizes(nleaves: int) -> tuple[int, ...]:
    """Entries of each level, leaves first, each a multiple of FANOUT; the last one row."""
    sizes = []
    n = nleaves
    while True:
        padded = -(-n // FANOUT) * FANOUT
        sizes.append(padded)
        if padded == FANOUT:
            return tuple(sizes)
        n = padded // FANOUT


def tree_bytes(nleaves: int) -> int:
    return sum(_level_sizes(nleaves))


def segment_size(max_arenas: int, nclasses: int) -> int:
    """Bytes of the summary segment of a heap with ``nclasses`` size classes (class 0 too).

    Trees: free, owned, and one partial tree per class >= 1.
    """
    return HEADER_SIZE + (1 + nclasses) * tree_bytes(max_arenas)


class ByteTree:
    """Byte maxima over ``nleaves`` leaves, 64 children per node (see the module docstring).

    Level ``L`` is ``level_sizes(nleaves)[L]`` bytes at ``offsets[L]`` of ``buf``.  With
    ``fd`` (the file ``buf`` maps), fsck reads whole levels with ``pread``, which
    skips holes: through the mapping, even a read of a hole would give the page
    memory (tmpfs), or SIGBUS on a full /dev/shm.
    """

    __slots__ = ("_fd", "_levels", "_offsets", "nleaves")

    def __init__(self, buf: memoryview, offsets: Sequence[int], nleaves: int,
                 fd: int | None = None) -> None:
        self.nleaves = nleaves
        self._fd = fd
        self._offsets = offsets
        self._levels = [buf[at:at + size] for at, size in zip(offsets, _level_sizes(nleaves),
                                                               strict=True)]

    @classmethod
    def in_memory(cls, nleaves: int) -> ByteTree:
        """A tree in private memory (tests, models)."""
        sizes = _level_sizes(nleaves)
        offsets = [sum(sizes[:level]) for level in range(len(sizes))]
        return cls(memoryview(bytearray(sum(sizes))), offsets, nleaves)

    @property
    def levels(self) -> list[tuple[int, int]]:
        """(offset, size) of each level in the buffer, leaves first."""
        return [(at, len(level)) for at, level in zip(self._offsets, self._levels, strict=True)]

    def get(self, leaf: int) -> int:
        return self._levels[0][leaf]

    def set(self, leaf: int, value: int) -> None:
        """Store ``value`` (clipped to CAP) at ``leaf`` and fix the nodes above (lock holder)."""
        value = min(value, CAP)
        levels = self._levels
        old = levels[0][leaf]
        if old == value:
            return
        levels[0][leaf] = value
        crash.reach("summary.leaf_set")
        index = leaf
        for level in range(1, len(levels)):
            row_start = (index // FANOUT) * FANOUT
            index //= FANOUT
            node = levels[level][index]
            if value >= node:
                new = value  # the child grew past (or to) its parent's maximum
            elif old < node:
                return  # the child was not the maximum: the parent is unchanged
            else:
                new = max(levels[level - 1][row_start:row_start + FANOUT].tobytes())
            if new == node:
                return
            levels[level][index] = new
            old, value = node, new

    def path_is_right(self, leaf: int, hint: bool = False) -> bool:
        """True if every node above ``leaf`` is the maximum of its row (fsck).

        With ``hint`` (a 0/1 tree of hints) a node above its row passes: it
        only costs ``find`` a look, and ``find`` lowers it.
        """
        return all(level[index] == want or (hint and level[index] > want)
                   for level, index, want in self._path_maxima(leaf))

    def fix_path(self, leaf: int) -> None:
        """Recompute the nodes above ``leaf`` from their rows, bottom up (repair)."""
        for number, (level, index, want) in enumerate(self._path_maxima(leaf), 1):
            if level[index] > want:
                self._lower(number, index)
            elif level[index] < want:
                level[index] = want

    def _path_maxima(self, leaf: int) -> Iterator[tuple[memoryview, int, int]]:
        """For each level above ``leaf``, bottom up: (the level, the index of ``leaf``'s
        ancestor in it, the maximum of that ancestor's row below), each maximum read once
        the caller is done with the level below."""
        levels = self._levels
        index = leaf
        for level in range(1, len(levels)):
            row_start = (index // FANOUT) * FANOUT
            index //= FANOUT
            yield levels[level], index, max(levels[level - 1][row_start:row_start + FANOUT]
                                            .tobytes())

    def heal_lost_marks(self) -> bool:
        """Raise every node below a set leaf of its subtree; True if one was (lock holder).

        A ``mark`` stopped by death between its leaf and the leaf's ancestors
        leaves a set leaf that ``find`` cannot see.  A holder whose ``find``
        came back empty calls this: it reads only the leaf pages that have
        memory and the paths of the set leaves, so it costs little while few
        leaves are set.
        """
        healed = False
        for leaf in self.nonzero_leaves():
            if not self.path_is_right(leaf, hint=True):
                self.fix_path(leaf)
                healed = True
        return healed

    def mark(self, leaf: int) -> None:
        """Set a 0/1 tree's leaf and its ancestors to 1, bottom up (any process, no lock).

        The stores are one run of C calls with no Python bytecode between them,
        so an exception from a signal handler (Ctrl-C) cannot stop a mark
        between the leaf and its ancestors.  Only death can: the hint is then
        lost until the next mark of that leaf, and an audit of the arena (the
        journal's repair, fsck) recomputes the path.
        """
        path = [leaf // FANOUT ** level for level in range(len(self._levels))]
        collections.deque(map(memoryview.__setitem__, self._levels, path, itertools.repeat(1)),
                          maxlen=0)

    def clear(self, leaf: int) -> None:
        """Clear a 0/1 tree's leaf, and each ancestor whose row is all zero (lock holder).

        An ancestor is cleared first and its row read after: a ``mark`` that
        lands meanwhile has stored its leaf before the ancestor, so either the
        re-read sees it (and the ancestor is set back) or its own store of the
        ancestor comes after ours.
        """
        levels = self._levels
        if levels[0][leaf]:
            levels[0][leaf] = 0
        crash.reach("summary.leaf_cleared")
        index = leaf
        for level in range(1, len(levels)):
            row_start = (index // FANOUT) * FANOUT
            index //= FANOUT
            if not levels[level][index]:
                return
            levels[level][index] = 0
            if levels[level - 1][row_start:row_start + FANOUT].tobytes() != _ZERO_ROW:
                levels[level][index] = 1
                return

    def find(self, at_least: int, start: int = 0) -> int:
        """The first leaf >= ``start`` whose value is >= ``at_least`` (1..CAP), or -1.

        Climbs from ``start`` while the rest of its row has no hit (then looks
        right of the parent), and descends from the first hit to its leftmost
        qualifying leaf: at most two rows per level.  A node above all of its
        children (a holder stopped inside ``clear`` between a leaf and its
        ancestor, or a stale hint) is only a hint: it is lowered on the way
        and the search goes on right of it, so no set leaf is ever missed.
        """
        table = _AT_LEAST[min(max(at_least, 1), CAP)]
        levels = self._levels
        index = start
        for level, row in enumerate(levels):
            if index >= len(row):
                return -1
            if index % FANOUT == 0 and level + 1 < len(levels):
                index //= FANOUT  # the whole row: its parent says as much, without reading it
                continue
            row_end = (index // FANOUT + 1) * FANOUT
            hit = row[index:row_end].tobytes().translate(table).find(1)
            if hit >= 0:
                found = self._descend(level, index + hit, table)
                if found >= 0 or found == _PAST_END:
                    return max(found, -1)
                # a node above its children (a holder stopped in ``clear``, healed by
                # ``_descend``): go on right of it, at its level
                index, level_of_stale = ~found >> 6, ~found & 63
                return self.find(at_least, (index + 1) * FANOUT ** level_of_stale)
            index = index // FANOUT + 1
        return -1

    def _descend(self, level: int, index: int, table: bytes) -> int:
        """The leftmost qualifying leaf under node ``index`` of ``level``; ``_PAST_END``
        if it is past the last leaf; ``~(node << 6 | its level)`` of a node found above
        its children, which is lowered to their maximum (a lock holder calls ``find``)."""
        levels = self._levels
        while level > 0:
            first = index * FANOUT
            hit = levels[level - 1][first:first + FANOUT].tobytes().translate(table).find(1)
            if hit < 0:
                self._lower(level, index)
                return ~(index << 6 | level)
            level -= 1
            index = first + hit
        return index if index < self.nleaves else _PAST_END

    def nonzero_leaves(self) -> list[int]:
        """The leaves that are not 0 (fsck), reading only the pages that have memory."""
        if self._fd is None:
            return nonzero_positions(self._levels[0][:self.nleaves].tobytes())
        base = self._offsets[0]
        found = []
        for start, length in _data_extents(self._fd, base, base + self.nleaves):
            chunk = os.pread(self._fd, length, start)
            found += [start - base + p for p in nonzero_positions(chunk)]
        return found

    def _read(self, level: int, first: int, count: int) -> bytes:
        """``count`` entries of ``level`` from ``first``, holes skipped when file-backed."""
        if self._fd is None:
            return self._levels[level][first:first + count].tobytes()
        return os.pread(self._fd, count, self._offsets[level] + first)

    def check(self) -> list[str]:
        """Every node that is not the maximum of its children (fsck); [] when consistent.

        Only rows with a non-zero child or a non-zero node can be wrong, so the
        work grows with what is set, not with the size of the tree.
        """
        return [f"level {level} node {node} is {value}, its children's maximum {want}"
                for level, node, value, want in self.wrong_nodes()]

    def rebuild(self) -> None:
        """Set every node to the maximum of its children (lock holder; fsck --repair)."""
        for level, node, value, want in self.wrong_nodes():
            if value > want:
                self._lower(level, node)
            else:
                self._levels[level][node] = want

    def _lower(self, level: int, node: int) -> None:
        """Lower a node that is above its row to the row's maximum (lock holder).

        As ``clear`` does: the node is stored first and its row read after,
        so a ``mark`` landing meanwhile is never lost.
        """
        here = self._levels[level]
        here[node] = 0
        want = max(self._levels[level - 1][node * FANOUT:(node + 1) * FANOUT].tobytes())
        if want:
            here[node] = want

    def _leaf_row(self, row: int) -> bytes:
        return self._read(0, row * FANOUT, FANOUT)

    def wrong_nodes(self) -> list[tuple[int, int, int, int]]:
        """(level, node, value, maximum of its children) of each wrong node, bottom up.

        Each level is judged against the level below as fixed, so ``rebuild``
        may store them in order.  The levels above the leaves have memory
        from the start (``Summaries.create``); leaf rows are read with pread.
        """
        wrong = []
        below_nonzero = self.nonzero_leaves()
        row_of: Callable[[int], bytes] = self._leaf_row
        for level in range(1, len(self._levels)):
            here = bytearray(self._read(level, 0, len(self._levels[level])))
            rows = {p // FANOUT for p in below_nonzero}
            rows.update(nonzero_positions(bytes(here)))
            for node in sorted(rows):
                want = max(row_of(node), default=0)
                if here[node] != want:
                    wrong.append((level, node, here[node], want))
                    here[node] = want
            below = bytes(here)
            below_nonzero = nonzero_positions(below)
            row_of = functools.partial(_row, below)
        return wrong

    def release(self) -> None:
        for level in self._levels:
            level.release()


def _reserve(seg: segments.Segment, offset: int, length: int) -> None:
    """Allocate the memory of ``length`` bytes at ``offset`` of the summary segment now."""
    assert seg.fd is not None
    first = offset // PAGE_SIZE * PAGE_SIZE
    segments.reserve(seg, first, offset + length - first)


class Summaries:
    """This process's view of a heap's summary segment: the free, owned and partial trees.

    The trees are laid out level by level: every tree's leaves, then every
    tree's first level of nodes, and so on, so that the small upper levels of
    all trees share a few pages, reserved when the heap is created.
    """

    def __init__(self, heap_name: str, max_arenas: int, nclasses: int, readonly: bool) -> None:
        name = summary_name(heap_name)
        size = segment_size(max_arenas, nclasses)
        self._seg = segments.open_existing(name, readonly=readonly, expect_size=size,
                                           keep_fd=True)
        magic, version, _, arenas, classes, row_0 = HEADER.unpack_from(self._seg.buf, 0)
        if (magic, version, arenas, classes) != (MAGIC, VERSION, max_arenas, nclasses):
            self._seg.close()
            raise HeapCorruptError(f"/dev/shm/{name} is not the summary segment of heap "
                                   f"{heap_name!r}; destroy the heap")
        #: pages this process has reserved already (reserving is idempotent)
        self._reserved: set[int] = set()
        #: leaf rows (index >> 6) whose paths' pages this process or the creator reserved
        self._reserved_rows: set[int] = {0} if row_0 == ROW_0_RESERVED else set()
        self._offsets = _tree_offsets(max_arenas, 1 + nclasses)
        self._nleaves = max_arenas
        #: the trees this process has used: a partial tree's views are made on first use
        self._trees: list[ByteTree | None] = [None] * len(self._offsets)
        #: longest free page run of each arena (capped at CAP)
        self.free = self._tree(0)
        #: 1 where an arena may have a span with an owner
        self.owned = self._tree(1)

    def _tree(self, tree: int) -> ByteTree:
        made = self._trees[tree] = ByteTree(self._seg.buf, self._offsets[tree], self._nleaves,
                                            self._seg.fd)
        return made

    @staticmethod
    def create(heap_name: str, max_arenas: int, nclasses: int, mode: int) -> None:
        """Create the summary segment of a new heap: zero, sparse but for its upper levels."""
        seg = segments.create(summary_name(heap_name), segment_size(max_arenas, nclasses), mode,
                              reserve=False, keep_fd=True)
        try:
            offsets = _tree_offsets(max_arenas, 1 + nclasses)
            _reserve(seg, 0, HEADER_SIZE)
            upper = offsets[0][2] if len(offsets[0]) > 2 else seg.size
            _reserve(seg, upper, seg.size - upper)  # levels 2 and up, of every tree
            for page in _row_pages(offsets, 0):
                _reserve(seg, page * PAGE_SIZE, PAGE_SIZE)
            HEADER.pack_into(seg.buf, 0, MAGIC, VERSION, 0, max_arenas, nclasses,
                             ROW_0_RESERVED)
        finally:
            seg.close()

    def reserve_leaves(self, index: int) -> None:
        """Give memory to every page on arena ``index``'s paths, in every tree (a grower).

        Levels are padded to 64 entries, so the 64 indices of one leaf row share
        their pages: a row already done here needs nothing (most grows).
        """
        row = index >> 6
        if row in self._reserved_rows:
            return
        for page in sorted(_row_pages(self._offsets, row) - self._reserved):
            _reserve(self._seg, page * PAGE_SIZE, PAGE_SIZE)
            self._reserved.add(page)
        self._reserved_rows.add(row)

    def partial_tables(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """The levels of the partial trees of every class >= 1, for the native core's Free,
        without making the trees' views (most classes a process never frees into): (where
        each class's levels start in the next two, offset of each level, size of each)."""
        return _partial_tables(self._nleaves, len(self._offsets))

    def hinted_classes(self) -> list[int]:
        """The classes whose partial tree's top row has an entry set, the only trees in which
        ``find(1)`` can find a leaf: one read of the top rows, which lie side by side."""
        tops = [levels[-1] for levels in self._offsets[2:]]
        rows = bytes(self._seg.buf[tops[0]:tops[-1] + FANOUT])
        return [1 + k for k, top in enumerate(tops)
                if rows[top - tops[0]:top - tops[0] + FANOUT] != _ZERO_ROW]

    def partial(self, sclass: int) -> ByteTree:
        """The partial tree of size class ``sclass`` (>= 1)."""
        return self._trees[1 + sclass] or self._tree(1 + sclass)

    @property
    def mapping(self) -> mmap.mmap:
        """The segment's mapping (the native core's Free marks partial trees through it)."""
        return self._seg.map

    def close(self) -> None:
        for tree in self._trees:
            if tree is not None:
                tree.release()
        self._seg.close()


@functools.cache
@functools.cache
def _partial_tables(nleaves: int, ntrees: int
                    ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``Summaries.partial_tables`` (computed once per process for each layout)."""
    sizes = _level_sizes(nleaves)
    firsts = [0, 0]  # class 0 (large objects) has no partial tree
    offsets: list[int] = []
    for levels in _tree_offsets(nleaves, ntrees)[2:]:
        offsets += levels
        firsts.append(len(offsets))
    return tuple(firsts), tuple(offsets), sizes * (ntrees - 2)


def _row_pages(offsets: tuple[tuple[int, ...], ...], row: int) -> set[int]:
    """The pages on the paths of leaf row ``row`` (arenas ``64 * row`` ..) in every tree:
    its leaves and their first-level node (the levels above are reserved at creation)."""
    return {(levels[level] + (row << 6 >> 6 * level)) // PAGE_SIZE
            for levels in offsets for level in range(min(2, len(levels)))}


@functools.cache
def _tree_offsets(nleaves: int, ntrees: int) -> tuple[tuple[int, ...], ...]:
    """The offset of each level of each tree in the segment (level by level, see above)."""
    sizes = _level_sizes(nleaves)
    offsets = [[0] * len(sizes) for _ in range(ntrees)]
    at = HEADER_SIZE
    for level, size in enumerate(sizes):
        for tree in range(ntrees):
            offsets[tree][level] = at
            at += size
    return tuple(map(tuple, offsets))
