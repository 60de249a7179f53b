"""Objects found by name: ``heap.roots``, a table of name -> ref that every process shares.

The table (``shmheap.NAME.roots``)
    A header page, then ``REGIONS`` regions at fixed offsets.  Region ``r`` is
    an open-addressing hash table (linear probing) of ``cap = FIRST_CAP <<
    (r >> 1)`` slots, so there are two regions of each capacity, 256 .. 2**20
    slots.  The header's ``table`` word says which region *is* the table; the
    others are older copies or unused.  The file is as long as the last
    region ever built (``ftruncate``, never shorter) and sparse: nothing is
    stored into (or read through a mapping from) a page before it has its
    memory (``posix_fallocate``; summary.py says why): a region's header and
    slots when it is first built (its ``built`` bit is set after), its name
    area up to each new name before the name is written.  Pages are never
    given back, so every byte below any ``names_end`` a region ever had has
    memory.  Each process maps the header page and, on first use, each region
    it reads (``segments.map_range``), never the whole file.

    Header page::

        off  size  field       who writes it
          0     8  magic       creator, once (b"shmroots")
          8     4  version     creator, once
         12     4  regions     creator, once (REGIONS)
         16     8  table       writable heap-lock holder: the region that is the
                               table; one aligned store publishes a rebuilt region
         24     8  built       writable heap-lock holder: bit r set once the file
                               reaches past region r and its header and slots
                               have memory
         64    88  intent      writable heap-lock holder, before it journals ROOTS:
                               op, region, slot, key, new, old, live, used,
                               names_end, new_count, old_count ("Binding" below)

    Region ``r`` (at ``region_offset(r)``, ``region_size(r)`` bytes)::

          0     8  seq         writable heap-lock holder: odd while the region is
                               rebuilt, and while a bind or unbind changes it (+2
                               per rebuild, bind and unbind)
          8     8  live        writable heap-lock holder: roots bound (``len``)
         16     8  used        writable heap-lock holder: slots with a key
         24     8  names_end   writable heap-lock holder: bytes of names in use
         64  16*cap slots      key u64, value u64 each
          .  64*cap names      names (UTF-8), each at an 8-aligned offset

    ``key = crc32(name) << 32 | len(name) << 24 | offset >> 3``, 0 in an empty
    slot; ``value`` is the bound ref, 0 once the root is unbound (a
    tombstone: its key stays).  Within a region a key goes from 0 to its final
    value once and never changes again, and a name has at most one key (a
    name bound again reuses its own tombstone).  So a reader that finds a key
    may trust the name it points to: only the value word changes under it,
    in one aligned store.  Tombstones and dead names go when the table is
    rebuilt; the table never shrinks.

    Why two regions of each capacity rather than the index's generations, each
    used once: binds and unbinds of ever new names fill a table with
    tombstones, so it must be rebuilt at the same capacity again and again; one
    region per rebuild would grow without bound.  A region is never freed,
    truncated or unmapped, so a reader holding an old one reads memory that is
    there; the rebuild that overwrites it makes its ``seq`` odd first, so the
    reader sees that and starts again.

Lookups and snapshots take no lock
    Read ``table``; read the region's ``seq`` (odd: start again); probe from
    ``crc32(name) & (cap - 1)`` to the name's key or an empty slot; read the
    value; read ``seq`` again.  Unchanged, the value is the one the table held
    at some instant of the lookup: a region stops changing when another
    replaces it, and is rebuilt (``seq`` odd) only after that.  Changed, the
    region was rebuilt under the reader, which starts again, at most
    ``READ_RETRIES`` times, then reads under the heap lock.  Every number
    read is bounds-checked (a name against ``names_end``, probes against
    ``cap``, regions against ``built``); garbage read under an unchanged
    ``seq`` is HeapCorruptError.  Every bind and unbind makes the table's
    ``seq`` odd for its stores and moves it on by 2, so ``snapshot()`` (and
    ``items()``, ``len``, iteration), read the same way, is the table at one
    instant: a writer that rebinds one of two names before it unbinds the
    other is never seen with neither.

    The native core does ``roots[name]`` (and ``in``) in one C call
    (``_native.RootReader``, the twin of ``RootTable.lookup``) on the regions
    this process has mapped, which ``RootTable.region`` hands it.  It answers
    only what it is sure of (the ref, or 0: nothing bound); anything else (a
    region not mapped yet, ``seq`` odd or moved, a number out of bounds,
    another thread of the handle in its slow paths, a bad name) is None, and
    the Python path decides, with its retries, its lock and its errors.

Binding (``roots[name] = ref``, ``del roots[name]``): the writable heap-lock holder
    Each bind and unbind is one ``HeapLock.run(..., write=True)``, so it starts
    with the journal clean, and first checks that the heap is not being
    destroyed: a load of the control segment's ``destroyed`` word, which
    ``destroy`` sets before it unlinks anything (no path lookup).  If a new
    name finds no room (one more key would fill more than half the slots, or
    its name would not fit the name area), the table is rebuilt first: the
    bound roots are copied, with the rebuilt region's ``seq`` odd, into the
    other region of the capacity they need (a quarter of the slots at most),
    and ``table`` switches to it in one store.
    A rebuild stopped anywhere leaves an unpublished region, which the next
    rebuild into it starts over: it needs no journal.  Then, publishing last:

    1. the intent record: what is about to change, with the region's
       counters and the root counts of the objects involved as they are;
       then the journal says ``ROOTS``;
    2. the new ref's object counts one root more (``set_root_count``: its
       alloc byte, or a large object's state byte; allocator.py);
    3. a new name: the name, the value, ``names_end``, then the key (one
       store: published).  A name with a slot: its value (one store);
    4. ``live``/``used``; the old ref's object counts one root fewer; the
       journal is cleared.

    Steps 2-4 run with the region's ``seq`` odd (lock-free readers wait,
    then read it whole); ``finish`` makes it even again.

    The native core makes the whole change one C call (``_native.RootWriter``,
    the twin of ``_bind_locked``): the native lock's hold, these steps with the
    same stores, crash points and records, and the release.  It takes small
    objects in arenas this process has mapped, and a new name only where the
    table has room and the name's bytes fall in a page with memory; anything
    else it leaves unchanged (None), and ``_bind_locked`` runs.  The bound
    object's root count goes up in one compare-and-swap (1 + r -> 2 + r), so a
    native ``free`` racing the bind (its own 1 -> 0 compare-and-swap) and the
    bind cannot both succeed; a bind that loses stops before its first store.
    While a crash point is armed the lock is the pure-Python one, and the
    writer's change runs under it, reaching the crash points through
    ``crash.reach``.

    An object counts its roots so that ``free`` can refuse a bound object
    by the byte it reads anyway, and sweep keeps it (walker.py).  The count
    lives in the alloc byte rather than the mark byte: ``mark()`` and
    ``start_cycle`` store mark bytes with no lock and no care for what they
    held, while no lock-free writer ever stores into an alloc byte above 1
    (allocator.py), and ``free``'s fast path reads the alloc byte already
    (a C twin of it mirrors the rule: 1 frees, 0 is a double free, more is
    BoundObjectError).  A large object counts in its first page's ``state``
    byte, which means nothing else on a used page (pages.py).  Stopped
    anywhere (SIGKILL, an exception at any bytecode), the journal says
    ``ROOTS`` and the next writable lock holder runs ``finish``: if the slot
    holds what the intent says it holds when the change is done, the counters
    and root counts are set to their values after it, else the slot, the
    counters and the root counts get their values from before it back.  A root
    count is set only while it reads one of the two: a ``free`` racing the
    bind of its object is the caller's use-after-free, not repair's business.

This module owns the roots segment's layout and protocol, the ``Roots``
mapping and their fsck checks.  It changes objects only
through the allocator's root counts, and takes the heap lock only through
``HeapLock.run`` (``Roots``); the lock holder's functions say so.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import zlib
from collections.abc import Callable, ItemsView, Iterable, Iterator, MutableMapping, ValuesView
from typing import TYPE_CHECKING, Any, TypeVar

from . import core, crash, segments
from .allocator import HELD, MAX_ROOTS_PER_OBJECT, ORPHAN, Allocator, Note
from .attached import serialised
from .control import ROOTS
from .errors import (
    HeapClosedError,
    HeapCorruptError,
    InvalidNameError,
    InvalidParameterError,
    InvalidRefError,
    RootNotFoundError,
    RootsFullError,
    ShmHeapError,
)
from .lock import deadline_of
from .names import PAGE_SIZE, roots_name

if TYPE_CHECKING:
    from .attached import AttachedHeap
    from .pages import ArenaPages

MAGIC = b"shmroots"
VERSION = 1
FIRST_CAP = 256
#: capacities FIRST_CAP << 0 .. FIRST_CAP << (CAPACITIES - 1), two regions of each
CAPACITIES = 13
REGIONS = 2 * CAPACITIES
SLOT_BYTES = 16
NAME_BYTES_PER_SLOT = 64
REGION_HEADER = 64
MAX_NAME = 255
#: Most roots a heap can hold: half the slots of the largest table.
MAX_ROOTS = (FIRST_CAP << (CAPACITIES - 1)) // 2
#: How often a lock-free reader starts again on a region rebuilt under it.
READ_RETRIES = 100

# header words
_TABLE, _BUILT, _INTENT = 2, 3, 8
#: the intent record's fields, a word each from word _INTENT
_FIELDS = ("op", "region", "slot", "key", "new", "old", "live", "used", "names_end",
           "new_count", "old_count")
#: intent ops: a new name's key is published (INSERT), or a slot's value changes (UPDATE)
INSERT, UPDATE = 1, 2
# region header words
_SEQ, _LIVE, _USED, _NAMES_END = 0, 1, 2, 3
_U64 = (1 << 64) - 1
#: the part of a key that a probe compares before it compares names: hash and length
_MATCH = _U64 & ~0xFFFFFF
_ZEROS = memoryview(bytes(1 << 20))
_T = TypeVar("_T")
Locked = Callable[[Callable[[], _T]], _T]


def region_capacity(region: int) -> int:
    return FIRST_CAP << (region >> 1)


def region_size(region: int) -> int:
    raw = REGION_HEADER + (SLOT_BYTES + NAME_BYTES_PER_SLOT) * region_capacity(region)
    return -(-raw // PAGE_SIZE) * PAGE_SIZE


def region_offset(region: int) -> int:
    return PAGE_SIZE + sum(region_size(r) for r in range(region))


#: the file's size once every region is built, and when it is created (region 0 only)
MAX_SIZE = region_offset(REGIONS)
MIN_SIZE = region_offset(1)


def record_bytes(length: int) -> int:
    """Bytes a name of ``length`` bytes takes in a name area (8-aligned)."""
    return (length + 7) & ~7


def encode_name(name: object) -> bytes:
    """The UTF-8 bytes of a root name; InvalidNameError unless 1-255 bytes of UTF-8."""
    if type(name) is not str:
        raise InvalidNameError(f"a root name is a str, not {type(name).__name__}")
    try:
        data = name.encode()
    except UnicodeEncodeError:
        raise InvalidNameError(f"root name {name!r} is not valid UTF-8 text") from None
    if not 1 <= len(data) <= MAX_NAME:
        shown = name if len(name) <= 40 else name[:40] + "..."
        raise InvalidNameError(f"root name {shown!r} has {len(data)} bytes of UTF-8; a root "
                               f"name has 1-{MAX_NAME}")
    return data


class _Garbage(Exception):
    """A region read met a number out of bounds: a rebuild under the reader, or garbage."""


class Region:
    """This process's views of one region of the roots segment."""

    __slots__ = ("_map", "cap", "head", "mask", "names", "names_cap", "number", "slots")

    def __init__(self, seg: segments.Segment, number: int) -> None:
        self.number = number
        self.cap = cap = region_capacity(number)
        self.mask = cap - 1
        self.names_cap = NAME_BYTES_PER_SLOT * cap
        self._map: mmap.mmap = segments.map_range(seg, region_offset(number),
                                                  region_size(number))
        buf = memoryview(self._map)
        self.head = buf[:REGION_HEADER].cast("Q")
        self.slots = buf[REGION_HEADER:REGION_HEADER + SLOT_BYTES * cap].cast("Q")
        names = REGION_HEADER + SLOT_BYTES * cap
        self.names = buf[names:names + self.names_cap]
        buf.release()

    def close(self) -> None:
        for view in (self.head, self.slots, self.names):
            view.release()
        with contextlib.suppress(BufferError):  # a view still held: unmapped with it
            self._map.close()

    # -- reading (any process; a lock-free reader checks ``seq`` around it) ------------

    def find(self, data: bytes, h: int) -> int:
        """The slot whose key is name ``data``'s (crc32 ``h``), or ``~slot`` of the empty
        slot where it would go; _Garbage if a number read is out of bounds."""
        slots = self.slots
        mask = self.mask
        want = h << 32 | len(data) << 24
        i = h & mask
        for _ in range(self.cap):
            key = slots[i << 1]
            if not key:
                return ~i
            if key & _MATCH == want:
                at = (key & 0xFFFFFF) << 3
                end = self.head[_NAMES_END]
                if at + len(data) > end or end > self.names_cap:
                    raise _Garbage
                if self.names[at:at + len(data)] == data:
                    return i
            i = (i + 1) & mask
        raise _Garbage  # no empty slot: a table is at most half full

    def value_of(self, data: bytes, h: int) -> int:
        """The value in name ``data``'s slot, 0 if it has none."""
        i = self.find(data, h)
        return self.slots[(i << 1) | 1] if i >= 0 else 0

    def name_at(self, key: int) -> bytes:
        """The name a key points to; _Garbage if out of bounds."""
        at = (key & 0xFFFFFF) << 3
        length = key >> 24 & 0xFF
        end = self.head[_NAMES_END]
        if not length or at + length > end or end > self.names_cap:
            raise _Garbage
        return bytes(self.names[at:at + length])

    def bound(self) -> list[tuple[int, int, int]]:
        """(slot, key, value) of every bound root."""
        words = self.slots.tolist()
        return [(i >> 1, words[i], words[i + 1]) for i in range(0, len(words), 2)
                if words[i] and words[i + 1]]

    # -- writing (writable heap-lock holder) -------------------------------------------

    def place(self, name: bytes, h: int, value: int) -> tuple[int, int]:
        """Write a new name and its value and raise ``names_end``: (slot, its key to publish).

        The name area must have memory up to the name's end.
        """
        i = self.find(name, h)
        if i >= 0:
            raise _Garbage  # the name has a key already
        i = ~i
        at = self.head[_NAMES_END]
        self.names[at:at + len(name)] = name
        self.slots[(i << 1) + 1] = value
        self.head[_NAMES_END] = at + record_bytes(len(name))
        return i, h << 32 | len(name) << 24 | at >> 3

    def begin(self) -> None:
        """Make ``seq`` odd before a rebuild (``seq + 2`` if it is odd already)."""
        self.head[_SEQ] = (self.head[_SEQ] + 1 | 1) & _U64

    def end(self) -> None:
        if self.head[_SEQ] & 1:
            self.head[_SEQ] = (self.head[_SEQ] + 1) & _U64


class RootTable:
    """This process's view of a heap's roots segment: lookups, and the lock holder's changes."""

    def __init__(self, heap_name: str, readonly: bool, mutex: object = None) -> None:
        self.heap_name = heap_name
        name = roots_name(heap_name)
        fd, st = segments.open_fd(name, readonly)
        if not MIN_SIZE <= st.st_size <= MAX_SIZE or os.pread(fd, 16, 0) != _stamp():
            os.close(fd)
            raise HeapCorruptError(f"/dev/shm/{name} ({st.st_size} bytes) is not the roots "
                                   f"segment of heap {heap_name!r}; destroy the heap")
        self._regions: list[Region | None] = [None] * REGIONS
        self._seg = segments.Segment(name, fd, PAGE_SIZE, readonly, keep_fd=True,
                                     identity=(st.st_dev, st.st_ino))
        self.head = self._seg.buf.cast("Q")
        #: the native core's lookup (module docstring), given the handle's ``mutex``; it
        #: reads the regions ``region`` maps, until ``close``
        self.native: Any = None  # _native.RootReader
        if core.native is not None and mutex is not None:
            self.native = core.native.RootReader(self._seg.buf, mutex)

    @staticmethod
    def create(heap_name: str, mode: int) -> None:
        """Create the roots segment of a new heap: region 0, empty and published."""
        seg = segments.create(roots_name(heap_name), MIN_SIZE, mode, reserve=False, keep_fd=True)
        try:
            segments.reserve(seg, 0, PAGE_SIZE)
            _reserve_region(seg, 0)
            seg.buf[:16] = _stamp()
            head = seg.buf.cast("Q")
            head[_BUILT] = 1
            head.release()
        finally:
            seg.close()

    def close(self) -> None:
        if self.native is not None:
            self.native.close()  # (before the mappings go)
            self.native = None
        for region in self._regions:
            if region is not None:
                region.close()
        self._regions = [None] * REGIONS
        self.head.release()
        self._seg.close()

    def corrupt(self, what: str) -> HeapCorruptError:
        return HeapCorruptError(f"heap {self.heap_name!r}: the roots table {what}; run "
                                f"`shmheap fsck --repair {self.heap_name}`")

    def region(self, number: int) -> Region:
        """Region ``number`` (checked against REGIONS and ``built``), mapped on first use."""
        region = self._regions[number] if number < REGIONS else None
        if region is not None:
            return region
        if number >= REGIONS or not self.head[_BUILT] >> number & 1:
            raise self.corrupt(f"names region {number}, which was never built")
        region = self._regions[number] = Region(self._seg, number)
        if self.native is not None:
            self.native.add_region(number, region._map)
        return region

    def current(self) -> Region:
        return self.region(self.head[_TABLE])

    # -- reading without the lock ----------------------------------------------------------

    def read(self, body: Callable[[Region], _T], locked: Locked[_T]) -> _T:
        """``body(the table's region)``, read while its ``seq`` held still, else under
        ``locked`` (the caller's way to hold the lock)."""
        head = self.head
        for _ in range(READ_RETRIES):
            region = self.region(head[_TABLE])
            seq = region.head[_SEQ]
            if seq & 1:
                continue
            try:
                got = body(region)
            except _Garbage:
                if region.head[_SEQ] == seq:
                    raise self.garbage() from None
                continue
            if region.head[_SEQ] == seq:
                return got
        return locked(lambda: self.read_locked(body))

    def read_locked(self, body: Callable[[Region], _T]) -> _T:
        """``body(the table's region)`` for a lock holder."""
        try:
            return body(self.current())
        except _Garbage:
            raise self.garbage() from None

    def garbage(self) -> HeapCorruptError:
        return self.corrupt("holds a number out of bounds (a key that points outside its "
                            "names, or a count larger than the table)")

    def lookup(self, data: bytes, h: int, locked: Locked[int]) -> int:
        """The ref bound to name ``data`` (crc32 ``h``), 0 if none: ``read`` made fast."""
        head = self.head
        regions = self._regions
        for _ in range(READ_RETRIES):
            number = head[_TABLE]
            region = regions[number] if number < REGIONS else None
            if region is None:
                region = self.region(number)
            seq = region.head[_SEQ]
            if seq & 1:
                continue
            try:
                i = region.find(data, h)
                value = region.slots[(i << 1) | 1] if i >= 0 else 0
            except _Garbage:
                if region.head[_SEQ] == seq:
                    raise self.garbage() from None
                continue
            if region.head[_SEQ] == seq:
                return value
        return locked(lambda: self.read_locked(lambda region: region.value_of(data, h)))

    def names_of(self, ref: int, locked: Locked[list[bytes]]) -> list[str]:
        def body(region: Region) -> list[bytes]:
            return [region.name_at(key) for _slot, key, value in region.bound() if value == ref]

        return sorted(self.decode(name) for name in self.read(body, locked))

    def decode(self, name: bytes) -> str:
        try:
            return name.decode()
        except UnicodeDecodeError:
            raise self.corrupt(f"holds a name that is not UTF-8: {name[:40]!r}") from None

    # -- changes (writable heap-lock holder) ------------------------------------------------

    def reserve_name(self, region: Region, length: int) -> None:
        """Give memory to ``region``'s name area up to a name of ``length`` bytes more."""
        segments.reserve(self._seg, _names_offset(region.number) + region.head[_NAMES_END],
                         record_bytes(length))

    def rebuild(self, extra: int) -> Region:
        """Copy the bound roots into the other region of the capacity they need with a name
        of ``extra`` bytes more, and publish it.  RootsFullError if none is large enough."""
        try:
            return self._rebuild(extra)
        except _Garbage:
            raise self.garbage() from None

    def _rebuild(self, extra: int) -> Region:
        old = self.current()
        bound = old.bound()
        names = [old.name_at(key) for _slot, key, _value in bound]
        name_bytes = sum(record_bytes(len(name)) for name in names) + record_bytes(extra)
        number = 2 * _capacity_for(len(bound) + 1, name_bytes) + (1 - (old.number & 1))
        segments.extend(self._seg, region_offset(number) + region_size(number))
        _reserve_region(self._seg, number)
        self.head[_BUILT] |= 1 << number
        new = self.region(number)
        segments.reserve(self._seg, _names_offset(number), name_bytes)
        new.begin()
        raw = new.slots.cast("B")
        for at in range(0, len(raw), len(_ZEROS)):
            raw[at:at + len(_ZEROS)] = _ZEROS[:len(raw) - at]
        raw.release()
        new.head[_NAMES_END] = 0
        for (_slot, key, value), name in zip(bound, names, strict=True):
            i, new_key = new.place(name, key >> 32, value)
            new.slots[i << 1] = new_key
        new.head[_LIVE] = new.head[_USED] = len(bound)
        new.end()
        crash.reach("roots.rehashed")
        self.head[_TABLE] = number
        return new

    def writer(self, allocator: Allocator) -> Any:
        """The native core's bind and unbind (``_native.RootWriter``) on this table, with
        ``allocator``'s lock and native ``free`` (its arenas and size classes); crash.py's
        points fire in it while armed."""
        assert core.native is not None and self.native is not None
        return core.native.RootWriter(
            self.native, getattr(allocator._lock, "native", None), allocator.heap._control.buf,
            allocator.free, MAX_ROOTS_PER_OBJECT, crash.reach if crash.ARMED else None)

    def write_intent(self, **fields: int) -> None:
        for offset, field in enumerate(_FIELDS):
            self.head[_INTENT + offset] = fields[field]

    def intent(self) -> dict[str, int]:
        return {field: int(self.head[_INTENT + offset]) for offset, field in enumerate(_FIELDS)}


def _live(region: Region) -> int:
    """The region's count of bound roots, bounds-checked (it sizes lists: ``list(roots)``)."""
    live = int(region.head[_LIVE])
    if live > region.cap // 2:
        raise _Garbage
    return live


def _stamp() -> bytes:
    return MAGIC + VERSION.to_bytes(4, "little") + REGIONS.to_bytes(4, "little")


def _names_offset(region: int) -> int:
    return region_offset(region) + REGION_HEADER + SLOT_BYTES * region_capacity(region)


def _reserve_region(seg: segments.Segment, number: int) -> None:
    """Give memory to region ``number``'s header and slots (before its ``built`` bit)."""
    segments.reserve(seg, region_offset(number),
                     REGION_HEADER + SLOT_BYTES * region_capacity(number))


def _capacity_for(count: int, name_bytes: int) -> int:
    """The capacity class a table of ``count`` roots with ``name_bytes`` of names is built in.

    At most a quarter of its slots and half its name area in use, so that many
    binds come before the next rebuild; the largest class up to the limits
    of ``needs_room``.
    """
    for k in range(CAPACITIES):
        cap = FIRST_CAP << k
        if 4 * count <= cap and 2 * name_bytes <= NAME_BYTES_PER_SLOT * cap:
            return k
    cap = FIRST_CAP << (CAPACITIES - 1)
    if 2 * count <= cap and name_bytes <= NAME_BYTES_PER_SLOT * cap:
        return CAPACITIES - 1
    raise RootsFullError(
        f"the roots table is full: {count - 1} roots with {name_bytes} bytes of names; a heap "
        f"holds at most {MAX_ROOTS} roots and {NAME_BYTES_PER_SLOT * cap} bytes of names; "
        "unbind roots you no longer need")


def needs_room(region: Region, length: int) -> bool:
    """True if a new name of ``length`` bytes does not fit ``region`` as it is."""
    return (2 * (region.head[_USED] + 1) > region.cap
            or region.head[_NAMES_END] + record_bytes(length) > region.names_cap)


# -- the mapping ----------------------------------------------------------------------------


class Roots(MutableMapping[str, int]):
    """``heap.roots``: objects found by name, shared by every process of the heap.

    ``roots[name] = ref`` binds (InvalidRefError unless ``ref`` is a live
    object), ``roots[name]`` looks up with no lock (RootNotFoundError, a
    KeyError, if nothing is bound to the name), ``del roots[name]`` unbinds.
    A bound object is a root of mark/sweep, and ``free()`` of it raises
    BoundObjectError.  ``bind``/``unbind`` take ``timeout=`` for the heap
    lock.  Iteration, ``items()`` and ``values()`` read one snapshot.
    """

    def __init__(self, heap: AttachedHeap, table: Callable[[], RootTable],
                 objects: Callable[[], Allocator]) -> None:
        self._heap = heap
        #: the handle's thread lock (attached.py): the table and its mapped regions are per
        #: handle, opened and changed under it
        self._mutex = heap._mutex
        #: the table once ``table()`` has opened it through ``_open_table``
        self._table: RootTable | None = None
        #: the table's native lookup once it is open (None on the pure core, and once closed)
        self._fast: Callable[[str], int | None] | None = None
        self._open_table: Callable[[], RootTable] | None = table
        #: the heap handle's allocator, made on first use
        self._objects = objects
        #: the native core's bind and unbind (``_native.RootWriter``), made by the first one
        #: that takes the Python path; None on the pure core, readonly, and once closed
        self._writer: Any = None

    def forget(self) -> None:
        """The heap is closing (it closes the table): every later use is HeapClosedError."""
        self._table = None
        self._fast = None
        self._open_table = None
        if self._writer is not None:
            self._writer.close()  # (before the control segment is unmapped)
            self._writer = None

    def table(self) -> RootTable:
        """The roots table, opened on first use (a worker that names nothing never opens it)."""
        table = self._table
        if table is None:
            if self._open_table is None:
                self._heap._check_open()  # HeapNotFoundError: a child's handle of a gone heap
                raise HeapClosedError(f"heap {self._heap.name!r} is closed; attach it again "
                                      "to use it")
            table = self._table = self._open_table()
            self._fast = table.native
        return table

    def _locked(self, body: Callable[[], _T]) -> _T:
        return self._heap._lock.run(body)

    # -- reading (no lock) --------------------------------------------------------------

    def __getitem__(self, name: str) -> int:
        fast = self._fast
        if fast is not None:
            ref = fast(name)
            if ref:
                return ref
            if ref is not None:
                raise self._not_found(name)
        return self._lookup(name)

    @serialised
    def _lookup(self, name: str) -> int:
        """``roots[name]`` on the Python path (the pure core's, and the native one's when
        unsure)."""
        data = encode_name(name)
        table = self._table
        if table is None:
            table = self.table()
        ref = table.lookup(data, zlib.crc32(data), self._locked)
        if not ref:
            raise self._not_found(name)
        return ref

    def _not_found(self, name: str) -> RootNotFoundError:
        return RootNotFoundError(f"no root named {name!r} in heap {self._heap.name!r}; bind "
                                 "one with heap.roots[name] = ref")

    def __contains__(self, name: object) -> bool:
        fast = self._fast
        if fast is not None and type(name) is str:
            ref = fast(name)
            if ref is not None:
                return bool(ref)
        return self._contains(name)

    @serialised
    def _contains(self, name: object) -> bool:
        data = encode_name(name)
        return bool(self.table().lookup(data, zlib.crc32(data), self._locked))

    @serialised
    def snapshot(self) -> dict[str, int]:
        """Every root and its ref, as the table held them at one instant."""
        table = self.table()

        def body(region: Region) -> list[tuple[bytes, int]]:
            return [(region.name_at(key), value) for _slot, key, value in region.bound()]

        return {table.decode(name): ref for name, ref in table.read(body, self._locked)}

    def __iter__(self) -> Iterator[str]:
        return iter(self.snapshot())

    def items(self) -> ItemsView[str, int]:
        return self.snapshot().items()

    def values(self) -> ValuesView[int]:
        return self.snapshot().values()

    @serialised
    def __len__(self) -> int:
        return self.table().read(_live, self._locked)

    @serialised
    def names_of(self, ref: int) -> list[str]:
        """The names bound to the object at ``ref``, sorted (a scan of the table)."""
        return self.table().names_of(ref, self._locked)

    def __repr__(self) -> str:
        return f"<Roots of heap {self._heap.name!r}>"

    # -- binding (the heap lock) -----------------------------------------------------------

    def __setitem__(self, name: str, ref: int) -> None:
        self.bind(name, ref)

    def __delitem__(self, name: str) -> None:
        self.unbind(name)

    def bind(self, name: str, ref: int, timeout: float | None = None) -> None:
        """Bind ``name`` to the live object at ``ref``, rebinding it if it was bound."""
        writer = self._writer
        if writer is None or writer(name, ref, timeout) is None:
            self._change(name, ref, timeout, "binding a root")

    def bind_new(self, name: str, make: Callable[[], int], timeout: float | None = None) -> int:
        """``make()`` an object and bind ``name`` to it, as one step: stopped anywhere, the
        name is bound to it, or it is not (and the object is freed, or its dead maker's).

        An exception frees the object unless the journal's repair (the next
        writable lock hold, taken here) finished the bind.  A process killed
        before the bind's journal leaves an object its dead maker owns, which
        ``reclaim()`` frees (allocator.py, "Owners").  An object bound to
        ``name`` before is unbound and becomes the caller's.
        """
        encode_name(name)
        self._heap._check_writable("binding a root")
        ref = make()
        try:
            crash.reach("named.made")
            self.bind(name, ref, timeout)
        except BaseException:
            self._drop_unnamed(name, ref, timeout)
            raise
        return ref

    def _drop_unnamed(self, name: str, ref: int, timeout: float | None) -> None:
        """Free ``ref``, made for ``name`` by a ``bind_new`` that failed, unless it is bound."""
        with contextlib.suppress(ShmHeapError):
            allocator = self._objects()
            allocator._lock.run(lambda: None, deadline_of(timeout), write=True)  # repairs
            if self.get(name) != ref:
                allocator.free(ref, timeout)

    def unbind(self, name: str, timeout: float | None = None) -> None:
        """Unbind ``name``; RootNotFoundError if nothing is bound to it."""
        writer = self._writer
        done = None if writer is None else writer(name, None, timeout)
        if done is None:
            done = self._change(name, None, timeout, "unbinding a root")
        if not done:
            raise RootNotFoundError(f"no root named {name!r} in heap {self._heap.name!r} to "
                                    "unbind")

    @serialised
    def _change(self, name: str, given: object, timeout: float | None, what: str) -> bool:
        """Bind ``name`` to the object at ``given`` (None: unbind it) on the Python path, as
        ``_bind_locked`` (the pure core's way, the native one's when its writer is unsure).
        While crash points are armed the lock is the pure one, and the native writer's
        change runs under it (crash.py's points fire in it)."""
        data = encode_name(name)
        self._heap._check_writable(what)
        table = self.table()
        allocator = self._objects()
        writer = self._writer
        if writer is None and table.native is not None:
            writer = self._writer = table.writer(allocator)

        def body() -> bool:
            if writer is not None:
                done = writer.held(name, given, allocator._holder())
                if done is not None:
                    return bool(done)
            return _bind_locked(allocator, table, data, given)

        return allocator._lock.run(body, deadline_of(timeout), write=True)


def _bind_locked(allocator: Allocator, table: RootTable, data: bytes, given: object) -> bool:
    """Bind name ``data`` to the object at ``given`` (None: unbind it) as "Binding" in the
    module docstring says (writable lock holder); False if there was nothing to unbind."""
    allocator.heap._check_destroyed()
    new = None if given is None else allocator.live(given, held=True)
    ref = new[0].base + allocator.object_bytes(*new)[0] if new else 0  # an int, as located
    new_count = allocator.root_count(*new) if new else 0
    if new_count >= MAX_ROOTS_PER_OBJECT:
        raise InvalidParameterError(
            f"the object at {ref:#x} is bound to {new_count} roots, the most one object may "
            "have; unbind one of them first")
    h = zlib.crc32(data)
    region = table.current()
    i = table.read_locked(lambda region: region.find(data, h))
    old = region.slots[(i << 1) + 1] if i >= 0 else 0
    if old == ref:
        return bool(ref)
    if i < 0:
        if needs_room(region, len(data)):
            region = table.rebuild(len(data))
            i = table.read_locked(lambda region: region.find(data, h))
        table.reserve_name(region, len(data))
    old_obj = _located(allocator, old)
    old_count = allocator.root_count(*old_obj) if old_obj else 0
    op = UPDATE if i >= 0 else INSERT
    key = region.slots[i << 1] if i >= 0 else h << 32 | len(data) << 24 | \
        region.head[_NAMES_END] >> 3
    table.write_intent(op=op, region=region.number, slot=i if i >= 0 else ~i, key=key, new=ref,
                       old=old, live=region.head[_LIVE], used=region.head[_USED],
                       names_end=region.head[_NAMES_END], new_count=new_count,
                       old_count=old_count)
    allocator._journal.begin(ROOTS, 0)
    region.begin()
    if new:
        allocator.set_root_count(*new, new_count + 1)
        crash.reach("roots.counted")
    if op == INSERT:
        slot, key = region.place(data, h, ref)
        crash.reach("roots.entry_written")
        region.slots[slot << 1] = key
        crash.reach("roots.published")
        region.head[_USED] += 1
    else:
        region.slots[(i << 1) + 1] = ref
        crash.reach("roots.published" if ref else "roots.removed")
    region.head[_LIVE] += (1 if ref else 0) - (1 if old else 0)
    if old_obj:
        allocator.set_root_count(*old_obj, max(old_count - 1, 0))
    if new and not new_count:
        allocator.set_holder(*new, HELD)  # its root holds it now, not its maker
    if old_obj and old_count == 1:
        allocator.set_holder(*old_obj, allocator._holder())  # whoever unbinds it owns it
    crash.reach("roots.handed_over")
    region.end()
    allocator._journal.end()
    return True


def _located(allocator: Allocator, ref: int) -> tuple[ArenaPages, int, int, int] | None:
    """The allocated object at ``ref``, else None (lock holder)."""
    if not ref:
        return None
    try:
        return allocator.live(ref, held=True)
    except (InvalidRefError, HeapCorruptError):
        return None


# -- repair and fsck (lock holder) -----------------------------------------------------------


def finish(table: RootTable, allocator: Allocator, note: Note) -> None:
    """The journal says ROOTS: finish or undo the change of the intent record (writable
    lock holder; see "Binding" in the module docstring)."""
    intent = table.intent()
    region = _intent_region(table, intent)
    if region is None:
        note("roots-intent", "a root was being bound or unbound, but the intent record is "
             "garbage; the roots table is checked whole instead", True)
        check(table, allocator, True, False, note)
        return
    i, key, new, old = intent["slot"], intent["key"], intent["new"], intent["old"]
    try:
        name = repr(table.decode(region.name_at(key)))
    except (_Garbage, HeapCorruptError):
        name = "(its name was not written)"
    done = region.slots[i << 1] == key and region.slots[(i << 1) + 1] == new
    live, used, names_end = intent["live"], intent["used"], intent["names_end"]
    if done:
        live += (1 if new else 0) - (1 if old else 0)
        if intent["op"] == INSERT:
            used += 1
            names_end += record_bytes(key >> 24 & 0xFF)
    else:
        region.slots[(i << 1) + 1] = old
    region.head[_LIVE], region.head[_USED], region.head[_NAMES_END] = live, used, names_end
    _settle(allocator, new, intent["new_count"], 1 if done else 0)
    _settle(allocator, old, intent["old_count"], -1 if done else 0)
    if done:
        _hand_over(allocator, new, old)
    region.end()
    note("roots-unfinished", f"{'binding' if new else 'unbinding'} root {name} was left "
         f"unfinished; {'finished' if done else 'undone'}", True)


def _intent_region(table: RootTable, intent: dict[str, int]) -> Region | None:
    """The table's region if the intent names it and every field is within bounds."""
    number = intent["region"]
    if number != table.head[_TABLE] or number >= REGIONS or not table.head[_BUILT] >> number & 1:
        return None
    region = table.current()
    op, i, key = intent["op"], intent["slot"], intent["key"]
    length = key >> 24 & 0xFF
    at = (key & 0xFFFFFF) << 3
    if (i >= region.cap or not intent["live"] <= intent["used"] <= region.cap // 2
            or intent["names_end"] > region.names_cap or not length
            or intent["new_count"] >= MAX_ROOTS_PER_OBJECT
            or intent["old_count"] > MAX_ROOTS_PER_OBJECT):
        return None
    if op == INSERT:
        fits = at == intent["names_end"] and at + record_bytes(length) <= region.names_cap
        return region if fits and not intent["old"] else None
    return region if op == UPDATE and region.slots[i << 1] == key else None


def _hand_over(allocator: Allocator, new: int, old: int) -> None:
    """The holders after a finished bind: a bound object is held by its roots; one it left
    unbound whose holder is not known (its unbinder died) is nobody's (``ORPHAN``)."""
    obj = _located(allocator, new)
    if obj is not None and allocator.root_count(*obj) > 0:
        allocator.set_holder(*obj, HELD)
    obj = _located(allocator, old)
    if obj is not None and not allocator.root_count(*obj) and allocator.holder(*obj) == HELD:
        allocator.set_holder(*obj, ORPHAN)


def _settle(allocator: Allocator, ref: int, before: int, change: int) -> None:
    """Set the root count of the object at ``ref`` to ``before + change`` if it reads
    ``before`` or one step from it (the change made, or not), and is not there yet."""
    obj = _located(allocator, ref)
    if obj is None:
        return
    now = allocator.root_count(*obj)
    target = max(before + change, 0)
    if now in (before - 1, before, before + 1) and now != target:
        allocator.set_root_count(*obj, target)


def sequence(table: RootTable) -> int:
    """The table region's sequence word now (a checker's trial compares two of them)."""
    number = table.head[_TABLE]
    if number >= REGIONS or not table.head[_BUILT] >> number & 1:
        return 1  # odd: no answer read under it counts
    return int(table.current().head[_SEQ])


def bound_refs(table: RootTable) -> set[int]:
    """The refs bound to roots now (a lock holder, or a checker's trial)."""
    return {value for _slot, _key, value in table.read_locked(Region.bound)}


def check(table: RootTable, allocator: Allocator, repair: bool, full: bool,
          note: Note) -> set[int] | None:
    """fsck of the roots table (lock holder): its keys, names and counters, and the root
    counts of the objects it names; with ``full``, every object's root count in the heap.
    Returns the refs bound to live objects, None if the table is unusable (a fatal finding)."""
    writable = repair and not allocator.readonly
    number = table.head[_TABLE]
    if number >= REGIONS or not table.head[_BUILT] >> number & 1:
        note("roots-table", f"the roots table's table word is {number}, which names no "
             "built region", False)
        return None
    region = table.current()
    if region.head[_SEQ] & 1 and note("roots-seq", "the roots table's sequence word is odd "
                                      "(lookups retry, then take the lock)", writable):
        region.end()
    bound = _check_entries(region, note)
    if bound is None:
        return None
    _check_counters(region, note, writable)
    counts: dict[int, int] = {}
    for slot, ref in bound:
        if _located(allocator, ref) is None:
            if note("root-dangling", f"root {_name_in(table, region, slot)} is bound to "
                    f"{ref:#x}, which is no live object; repair unbinds it", writable):
                region.slots[(slot << 1) + 1] = 0
                region.head[_LIVE] -= 1
            continue
        counts[ref] = counts.get(ref, 0) + 1
    for ref, count in counts.items():
        obj = allocator.live(ref, held=True)
        recorded = allocator.root_count(*obj)
        if recorded != count and note("root-count", f"the object at {ref:#x} counts "
                                      f"{recorded} roots, {count} are bound to it", writable):
            allocator.set_root_count(*obj, count)
        elif not obj[0].marked(obj[1]) and note(
                "root-unmarked", f"the span of the bound object at {ref:#x} has no pageMarks "
                "bit (a sweep would free it whole)", writable):
            obj[0].set_mark(obj[1])
    if full:
        check_unbound_counts(allocator, set(counts), note, writable,
                             allocator.snapshot_locked())
    return set(counts)


def _name_in(table: RootTable, region: Region, slot: int) -> str:
    try:
        return repr(table.decode(region.name_at(region.slots[slot << 1])))
    except (_Garbage, HeapCorruptError):
        return f"in slot {slot}"


def _check_entries(region: Region, note: Note) -> list[tuple[int, int]] | None:
    """(slot, ref) of every bound root if every key is sound, else None (a fatal finding)."""
    words = region.slots.tolist()
    mask = region.mask
    seen: set[bytes] = set()
    bound = []
    for slot in range(region.cap):
        key, value = words[2 * slot], words[2 * slot + 1]
        if not key:
            continue
        problem = ""
        try:
            name = region.name_at(key)
            name.decode()
        except (_Garbage, UnicodeDecodeError):
            problem = "points outside the names, or at bytes that are not UTF-8"
        else:
            if zlib.crc32(name) != key >> 32:
                problem = "does not hold its name's hash"
            elif name in seen:
                problem = f"repeats the name {name[:40]!r}"
            elif not _reachable(words, key >> 32 & mask, slot, mask):
                problem = "cannot be reached from its name's first slot"
            seen.add(name)
        if problem:
            note("roots-entry", f"the key in slot {slot} of the roots table {problem}", False)
            return None
        if value:
            bound.append((slot, value))
    return bound


def _reachable(words: list[int], home: int, slot: int, mask: int) -> bool:
    """True if no empty slot lies between ``home`` and ``slot`` (linear probing's rule)."""
    while home != slot:
        if not words[2 * home]:
            return False
        home = (home + 1) & mask
    return True


def _check_counters(region: Region, note: Note, writable: bool) -> None:
    words = region.slots.tolist()
    keys = [words[i] for i in range(0, len(words), 2) if words[i]]
    live = sum(1 for i in range(0, len(words), 2) if words[i] and words[i + 1])
    end = max((((k & 0xFFFFFF) << 3) + record_bytes(k >> 24 & 0xFF) for k in keys), default=0)
    head = region.head
    if ((head[_LIVE], head[_USED]) != (live, len(keys)) or not end <= head[_NAMES_END]
            <= region.names_cap) and note(
                "roots-counters", f"the roots table counts {head[_LIVE]} roots, {head[_USED]} "
                f"keys and {head[_NAMES_END]} bytes of names; it holds {live}, {len(keys)} and "
                f"at least {end}", writable):
        head[_LIVE], head[_USED] = live, len(keys)
        head[_NAMES_END] = min(max(head[_NAMES_END], end), region.names_cap)


def check_unbound_counts(allocator: Allocator, bound: set[int], note: Note,
                         writable: bool, indices: Iterable[int]) -> None:
    """Objects of arenas ``indices`` that count roots although no root is bound to them
    (lock holder)."""
    for index in indices:
        try:
            pages = allocator.pages_of(index)
        except HeapCorruptError:
            continue  # a lost arena: the index checks report it
        for start in pages.starts():
            found = pages.span_of(start)
            if found is None or not allocator.span_ok(found[1], found[0]):
                continue
            c = found[1]
            if not allocator.holds_roots(pages, start, c):
                continue
            base = pages.base + (start << pages.page_shift)
            if c:
                cls = allocator.classes[c]
                a0 = start << pages.page_shift
                objects = [(k, base + cls.objects_at + k * cls.size)
                           for k, byte in enumerate(bytes(pages.data[a0:a0 + cls.nelems]))
                           if byte > 1]
            else:
                objects = [(0, base)]
            for slot, ref in objects:
                if ref not in bound and note(
                        "root-count", f"the object at {ref:#x} counts "
                        f"{allocator.root_count(pages, start, c, slot)} roots, none is bound "
                        "to it", writable):
                    allocator.set_root_count(pages, start, c, slot, 0)
