"""The all-arenas index: an append-only array of arena indices in shared memory.

This is Go's ``mheap_.allArenas`` (commit e500ffd8) made to work across
processes.

Backing arrays ("generations")
    Generation ``g`` is the segment ``shmheap.NAME.i<g>``: ``first_cap << g``
    little-endian uint32 entries (generation 0 is one page).  When the current
    generation is full, the next one is created at twice the size, the
    entries are copied, the new entry is added and the header is switched to
    it in one store.  Older generations are never unlinked, truncated or
    reused while the heap exists (invariant 2), so a reader that copied an old
    header can go on reading its generation.  They cost at most as much
    again as the current one (Go's ``persistentalloc`` makes the same trade).

The header
    One 64-bit word in the control segment, ``generation << 32 | len``,
    written only by the heap-lock holder, read only under the heap lock
    (invariant 3).  Being one aligned word, a write can never be torn.

Publication order (invariant 1 and crash safety)
    The holder writes the entry at ``[len]`` first and publishes ``len + 1``
    last, so a reader never sees an unwritten entry, and a writer killed in
    between leaves only an unpublished slot that the next append overwrites.
    (Go writes ``len`` first because its readers always hold the lock and its
    writers cannot die half-way; ours can.)  Published entries never change.

Readers
    ``snapshot_of(header)`` turns a copied header into an ``ArenaSnapshot``:
    a read-only view of entries ``[0, len)`` of that generation, mapped once
    per process and cached, so iterating a snapshot takes no lock and makes
    no system call.

This module owns the generation segments and the entry/header protocol.  It
does not take the heap lock: ``append`` must be called by the lock holder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import overload

from . import core, crash, segments
from .control import MAX_GENERATIONS, make_header, split_header
from .errors import AddressSpaceExhaustedError, HeapCorruptError
from .names import index_name

ENTRY_SIZE = 4
#: The generation a broken heap's header is poisoned with (repair.mark_broken).
BROKEN_GENERATION = 0xFFFFFFFF


class ArenaSnapshot(Sequence[int]):
    """The arena indices of the heap at one instant, in creation order.

    A snapshot is immutable and stays valid for as long as it is referenced,
    even after the index grows or the heap is destroyed.  ``view()`` is the
    zero-copy form: a read-only ``memoryview`` of uint32 (``numpy.asarray``
    accepts it).
    """

    __slots__ = ("_entries", "generation")

    def __init__(self, entries: memoryview, generation: int) -> None:
        self._entries = entries
        #: the index generation this snapshot was taken from
        self.generation = generation

    def __len__(self) -> int:
        return len(self._entries)

    @overload
    def __getitem__(self, i: int) -> int: ...

    @overload
    def __getitem__(self, i: slice) -> list[int]: ...

    def __getitem__(self, i: int | slice) -> int | list[int]:
        if isinstance(i, slice):
            return list(self._entries[i])
        return int(self._entries[i])

    def __iter__(self) -> Iterator[int]:
        return iter(self._entries)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ArenaSnapshot):
            return self._entries == other._entries
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return list(self._entries) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def view(self) -> memoryview:
        """A read-only uint32 memoryview of the entries; no copy."""
        return self._entries

    def tolist(self) -> list[int]:
        return self._entries.tolist()

    def __repr__(self) -> str:
        head = ", ".join(str(i) for i in self._entries[:8])
        more = ", ..." if len(self._entries) > 8 else ""
        return f"ArenaSnapshot([{head}{more}], len={len(self)}, generation={self.generation})"


if core.native is not None:
    # The native core's snapshots are the ones this process makes (same interface).
    Sequence.register(core.native.ArenaSnapshot)
    ArenaSnapshot = core.native.ArenaSnapshot  # type: ignore[misc]


class ArenaIndex:
    """This process's view of a heap's all-arenas index."""

    def __init__(self, heap_name: str, header: memoryview, first_cap: int, mode: int,
                 readonly: bool, check_identity: Callable[[], None]) -> None:
        self._heap_name = heap_name
        #: raises HeapNotFoundError if the heap was destroyed since it was attached: then a
        #: missing generation is no damage to report
        self._check_identity = check_identity
        #: the header word in the control segment, a one-element uint64 view
        self._header = header
        self.first_cap = first_cap
        self._mode = mode
        self._readonly = readonly
        #: mapped generations of this process: generation -> uint32 view
        self._generations: dict[int, memoryview] = {}
        #: the same, read-only, with its capacity: what snapshots are cut from
        self._readers: dict[int, tuple[memoryview, int]] = {}
        self._segments: list[segments.Segment] = []

    # -- reading ----------------------------------------------------------------

    def header(self) -> tuple[int, int]:
        """(generation, len) from the header, bounds-checked.  Caller holds the lock."""
        return self.check_header(self._header[0])

    def check_header(self, word: int) -> tuple[int, int]:
        generation, length = split_header(word)
        if generation == BROKEN_GENERATION:
            raise HeapCorruptError(
                f"heap {self._heap_name!r} is marked broken by a repair that could not fix it; "
                f"see `shmheap fsck {self._heap_name}`, then run `shmheap fsck --repair "
                f"{self._heap_name}` or destroy the heap")
        if generation >= MAX_GENERATIONS or length > self.first_cap << generation:
            raise HeapCorruptError(
                f"heap {self._heap_name!r}: index header {word:#x} is impossible "
                f"(generation {generation}, len {length}); run `shmheap fsck --repair "
                f"{self._heap_name}` or destroy the heap"
            )
        return generation, length

    def snapshot_of(self, word: int) -> ArenaSnapshot:
        """The snapshot described by header ``word`` (copied under the lock)."""
        generation = word >> 32
        cached = self._readers.get(generation)
        if cached is None or word & 0xFFFFFFFF > cached[1]:
            self.check_header(word)
            entries = self.generation(generation).toreadonly()
            cached = self._readers[generation] = (entries, len(entries))
        return ArenaSnapshot(cached[0][:word & 0xFFFFFFFF], generation)

    def reader(self, word: int) -> tuple[memoryview, int]:
        """(a read-only view of every entry of ``word``'s generation, its capacity).

        For the native core's snapshots: the view is fresh and theirs alone.
        """
        generation, _length = self.check_header(word)
        return self.generation(generation).toreadonly(), self.capacity(generation)

    def generation(self, generation: int) -> memoryview:
        """Map generation ``generation`` (once per process) and return its entries."""
        entries = self._generations.get(generation)
        if entries is None:
            nbytes = (self.first_cap << generation) * ENTRY_SIZE
            try:
                seg = segments.open_existing(index_name(self._heap_name, generation),
                                             readonly=self._readonly, expect_size=nbytes)
            except FileNotFoundError:
                self._check_identity()
                raise HeapCorruptError(
                    f"heap {self._heap_name!r}: index generation {generation} is missing; run "
                    f"`shmheap fsck --repair {self._heap_name}` or destroy the heap") from None
            self._segments.append(seg)
            entries = seg.buf.cast("I")
            self._generations[generation] = entries
        return entries

    def capacity(self, generation: int) -> int:
        return self.first_cap << generation

    def bytes_through(self, generation: int) -> int:
        """Bytes of all backing arrays of generations 0..generation."""
        return ((self.first_cap << (generation + 1)) - self.first_cap) * ENTRY_SIZE

    # -- writing (heap-lock holder only) ----------------------------------------

    def append(self, arena_index: int) -> None:
        """Append one entry, doubling into a new generation when full.

        The caller has journaled ``GROW``: stopped anywhere here, the next
        writable lock holder removes an unpublished generation (repair.py).
        """
        generation, length = self.header()
        if length < self.capacity(generation):
            entries = self.generation(generation)
            entries[length] = arena_index
            crash.reach("index.entry_written")
            self._header[0] = make_header(generation, length + 1)
        else:
            new_generation = generation + 1
            if new_generation >= MAX_GENERATIONS:
                raise AddressSpaceExhaustedError(
                    f"heap {self._heap_name!r}: the index cannot grow past "
                    f"{self.capacity(generation)} entries"
                )
            seg = self._create_generation(new_generation)
            new_entries = seg.buf.cast("I")
            crash.reach("index.generation_created")
            new_entries[:length] = self.generation(generation)[:length]
            new_entries[length] = arena_index
            crash.reach("index.generation_copied")
            self._header[0] = make_header(new_generation, length + 1)
            # Only a published generation is cached: one this process made but did
            # not publish may be replaced by another process's before anyone reads it.
            self._segments.append(seg)
            self._generations[new_generation] = new_entries
        crash.reach("index.published")

    def _create_generation(self, generation: int) -> segments.Segment:
        """Create generation ``generation``, replacing an unpublished leftover of it.

        A leftover can only come from a holder that stopped before switching
        the header to it; it was never published, so no reader has it mapped.
        """
        seg_name = index_name(self._heap_name, generation)
        segments.remove_own(seg_name)
        return segments.create(seg_name, self.capacity(generation) * ENTRY_SIZE, self._mode)

    def create_first(self) -> None:
        """Create generation 0 (heap creation only)."""
        seg = self._create_generation(0)
        self._segments.append(seg)
        self._generations[0] = seg.buf.cast("I")

    def close(self) -> None:
        for entries, _cap in self._readers.values():
            entries.release()
        self._readers.clear()
        for entries in self._generations.values():
            entries.release()
        self._generations.clear()
        for seg in self._segments:
            seg.close()
        self._segments.clear()
