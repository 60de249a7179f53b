"""Coordination in the heap: queues, events, counters and barriers that survive SIGKILL.

``heap.queue(name)``, ``heap.event(name)``, ``heap.counter(name)`` and
``heap.barrier(name, parties)`` find a *structure* by name in the heap's
coordination segment ``shmheap.NAME.coord`` (names.py), making it on first
use.  Any process attached to the heap may use it; one that is killed or
interrupted at any instruction never blocks the others for longer than the
heap lock's dead-holder recovery, and loses or duplicates no queued item.

The segment (made under the heap lock by the first process that needs it, stamped
last; all zero but its stamp when new, and a zero record is free)::

    header page   0 magic b"shmcoord", 8 version
                  64 the intent record (below), written by the lock holder
    records       RECORDS records of RECORD_SIZE bytes, as uint64 words:
                  0 kind (0 free)  1 name length  2-7 the name (48 bytes)
                  8 futex word (low 32 bits): +1 by the lock holder after every
                    change a waiter may wait for
                  9 parameter (a queue's capacity, a barrier's parties)
                  10-15 the structure's state, per kind:
                    queue    head, tail, count, lease list, leased, closed
                    event    set
                    counter  base (atomic adds, native core), pure (1 once a
                             pure-core process added), cells (ref)
                    barrier  arrived, generation, broken, tokens (ref),
                             resets (bit k: the round k rounds before the
                             current one was ended by reset(), not passed),
                             left (parties that left: it needs parameter -
                             left now)

A record is written under the heap lock and published by storing its kind
last; kind, name and parameter never change after that, so a lookup reads
them with no lock.  Records are never reused while the heap exists.

Queue items are *nodes*, heap objects (allocator.py) of 24 bytes and the item:
``next`` (ref), ``tag`` (kind << 56 | payload length: an int in 8 bytes, a
pickle of at most ``INLINE_MAX`` bytes with no out-of-band buffers, or the
8-byte ref of the object ``heap.put`` stored any other item in, objects.py),
``token`` (the liveness token of its leaser).  A queue is a singly linked list
head -> tail; leased nodes are in a second list (any order).  A node, and the
object of its item, are their queue's from the put that links them
(``owners.hold_locked``, in that put's undo record) until a get or a lease's
end hands them to the taker (``owners.adopt_locked``, the op's last stores;
its undo makes them the queue's again), and a counter's cells and a barrier's
tokens are their structure's, so ``heap.reclaim()`` leaves them alone while
they are held and frees what a taker that died had taken.  The taker frees the
node at once; an item's object is the memory of the views ``get`` returns (a
numpy array comes back zero-copy, writable for a get, read-only for a lease,
whose item may be delivered again), so it is freed once the taker owns it and
its last view is gone (``_Lent``, through objects.get's ``gone``), at the
handle's next put or get in Python if that happens while the thread is inside
a hold of the heap lock.  A lease given back leaves the leaser's views on an object that
is the queue's again: they must not be used after the block.

A barrier's parties are *registered*: ``heap.barrier(name, parties)`` (and a
``wait`` of a process that is not, e.g. a forked child) stores the caller's
liveness token in a free word of the barrier's ``tokens`` object, one word
per party, under the lock; a process whose token is there already is not
stored again, and one that finds no free word gets InvalidParameterError.
Whoever arrives, and every waiter at each ``SLICE``, looks at every
registered token: one that is dead breaks the barrier, so a party killed
before it ever reached ``wait`` breaks it within a slice, as one killed
while it waits does.  ``reset()`` drops the dead tokens (one word each, no
undo needed: a dead token never comes alive) and then, as an undo record,
ends the round: generation + 1, its ``resets`` bit set, arrived 0, broken
0.  A waiter that finds the generation moved on reads that bit of its round
to tell a pass from a reset.

A party that is done *leaves* (``leave()``, or the end of the barrier's
``with`` block): its token word is cleared and ``left`` counts it, so the
barrier needs ``parameter - left`` parties from then on, for good (``reset()``
does not bring a party back, and no more processes than that may register):
a kill experiment's worker that has done its rounds goes, and the others go
on without it, neither broken by its exit nor waiting for it.  If the
parties waiting are all it needs now, the leave passes their round.  That is
an undo record (op ``leaving``) whose saved words include the leaver's token
word (its index and value in the intent, restored only for this op), stored
last: a process killed while it leaves has not left, and dies a party.

Kill safety.  Every change of more than one word runs under the heap lock as
an *undo* record: before its first store the lock holder copies the
record's six state words and the ``next`` word of at most two nodes it will
change into the intent record, then writes the journal (control.py, op
``COORD``).  A holder stopped anywhere before the journal is cleared leaves
the journal dirty; the next writable lock holder (repair.py) restores the
saved words and frees the node a half-done ``put`` was linking if its putter
is dead, making the object of its item nobody's (``ORPHAN``: ``reclaim()``
frees it), or gives both back to a live putter, which frees them as its
exception leaves ``put``; and it makes a half-handed-over node and object the
queue's again.  A put's cleanup frees its node at once if it had not begun
the op (nobody else has seen the node), under the lock if it had begun it
and not yet marked it linked (a local mark, made just before the journal is
cleared), and not at all after the mark: from the mark on, the node is the
queue's or a taker's, and once a taker has freed it its address may be this
process's again (another thread's put), which no holder word tells apart.  An
exception between the mark and the clear leaves the node given back and
unfreed until this process is gone (then ``reclaim()``'s): a leak, never a
free of what is not the putter's.  So a half-done put never happened (the
putter got no answer), a half-done get or lease leaves the item at the head,
a half-done acknowledgement leaves the lease in place (redelivered when its
leaser is gone).  Nodes are freed only after the journal is clean: a getter
killed after that owns nothing shared.  A leased node records its leaser's
liveness token: a lock holder that finds it dead (``Queue`` looks whenever
it finds the queue empty and at least every ``SCAN_INTERVAL``) puts the node
back at the head.

Waiting never spins: a waiter reads the futex word, looks under the lock, and
if it must wait sleeps on the word (waits.py: a Linux futex, native or by
ctypes) in slices of at most ``SLICE`` seconds, so a waker killed between
its change and its wake-up delays it by one slice at most.  A waiter says so
under the lock (the word's high half, "sleepers"), and a change wakes only a
word whose sleepers flag is up: a put or a get with nobody asleep makes no
system call.  An event's waiter is the exception: a read-only handle may
sleep on the word (the kernel only reads it) but can write nothing, so
``Event.wait`` takes no lock and says nothing, in either kind of handle, and
``set()`` always wakes (one system call, and events are set rarely).

The native core puts and gets in one C call each (``_native.c`` Queue, bound
as the handle's ``put`` and ``get``) the items a node keeps itself: the same
words, intent record, journal op and holder words, in the same order, under
the heap lock taken by the native ``Lock``.  Whatever it is not sure of it
leaves, before it has changed anything, to the Python path here (the pure
core's, which stays): a closed queue, a look for dead leasers (due when leased
items wait and the queue is empty, or ``SCAN_INTERVAL`` after the handle's
last), a node in an arena the handle has not mapped, an
item stored with ``put``, a deadline that ran out.  A process started with a
crash point armed runs the Python lock and these Python paths (lock.py), so
the points are reached there.  Its waiters watch the futex word for a moment
before they sleep on it, with the GIL released: on an idle machine a sleeping
process's core halts, and waking it costs 20-30 us a hop, which no queue code
can save (a round trip of 40 us, mp.Queue's 130 us); a waiter that sees the
word move while it watches was never asleep (4 us).  The watch is bounded and
adaptive, per queue handle: it doubles, up to 50 us, after a watch that saw
the word move and halves, down to 2 us, after one that did not, so a waiter
on a queue that stays empty burns at most 2 us of a core per slice, and on a
busy machine, where a watcher takes the core the other side needs, the watch
shrinks (there round trips measured the same with it as without, 7-24 us).
The pure core's waits sleep at once.

Counters: the native core adds with one atomic instruction on ``base``
(``__atomic_add_fetch``); Python has no atomic add on shared memory, so the
pure core adds into its own liveness slot's cell (a heap object of one word
per slot, written only by that slot's holder) under the heap lock, and sets
``pure``; the value is ``base`` plus, once ``pure`` is set, every cell.  No
acknowledged add is lost either way; once ``pure`` is set the native core
adds through the same locked path, so the values ``add`` returns are exact
and distinct again (during the switch-over a native and a pure add may
return the same value).

This module owns the coordination segment's layout and the structures' protocols.
It takes the heap lock only through ``LockedBlock`` and never repairs anything but
its own journal op (``undo``, called by repair.py under the lock).
"""

from __future__ import annotations

import os
import pickle
import queue as queue_module
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from . import control, core, crash, objects, owners, segments, waits
from .errors import (
    HeapCorruptError,
    HeapNotFoundError,
    InvalidNameError,
    InvalidParameterError,
    QueueClosedError,
    ReadOnlyError,
    ShmHeapError,
)
from .lock import LockedBlock, deadline_of, expired, time_left
from .names import PAGE_SIZE, coord_name

if TYPE_CHECKING:
    import ctypes

    from .allocator import Allocator, Note
    from .attached import AttachedHeap
    from .lock import HeapLock

MAGIC = b"shmcoord"
VERSION = 1
RECORDS = 256
RECORD_SIZE = 128
HEADER_SIZE = PAGE_SIZE
SIZE = HEADER_SIZE + RECORDS * RECORD_SIZE
#: Longest sleep of a waiter before it looks again (dead leasers, dead parties, lost wakes).
SLICE = 0.05
#: Seconds between two looks for dead leasers while a queue is not empty.
SCAN_INTERVAL = 0.05
#: Largest item payload a node may say it holds (the heap's address space bounds it anyway).
MAX_ITEM = 1 << 48
#: Most parties of a barrier (one token word each).
MAX_PARTIES = 1024

QUEUE, EVENT, COUNTER, BARRIER = 1, 2, 3, 4
KIND_NAMES = {QUEUE: "queue", EVENT: "event", COUNTER: "counter", BARRIER: "barrier"}
_A = {QUEUE: "a queue", EVENT: "an event", COUNTER: "a counter", BARRIER: "a barrier"}
_NAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,48}")

# record words
_KIND, _NAMELEN, _NAME, _FUTEX, _PARAM = 0, 1, 2, 8, 9
_STATE = slice(10, 16)
_HEAD, _TAIL, _COUNT, _LEASES, _LEASED, _CLOSED = 10, 11, 12, 13, 14, 15
_SET = 10
_BASE, _PURE, _CELLS = 10, 11, 12
_ARRIVED, _GENERATION, _BROKEN, _TOKENS, _RESETS, _LEFT = 10, 11, 12, 13, 14, 15
_U64 = (1 << 64) - 1

# intent words (header): which record, which op, its saved state words, two nodes'
# saved next words, the node a put was linking and the token of the process doing it
_I_RECORD, _I_OP, _I_SAVED = 8, 9, slice(10, 16)
_I_NODE_A, _I_NEXT_A, _I_NODE_B, _I_NEXT_B, _I_FREE, _I_OWNER = 16, 17, 18, 19, 20, 21
#: the node the queue holds again when the op is undone (a get or an acknowledgement hands
#: its node to the taker as its last step: owners.adopt_locked)
_I_HOLD = 22
#: the token word a barrier's leave() clears (its index in the tokens) and what it held;
#: written before the op is journaled, read by undo only for OP_LEAVE
_I_AT, _I_WAS = 23, 24
OP_PUT, OP_TAKE, OP_LEASE, OP_ACK, OP_RETURN, OP_BARRIER, OP_RESET = 1, 2, 3, 4, 5, 6, 7
OP_LEAVE = 8
OP_NAMES = {OP_PUT: "putting an item on", OP_TAKE: "taking an item from",
            OP_LEASE: "leasing an item of", OP_ACK: "acknowledging a lease of",
            OP_RETURN: "giving back a lease of", OP_BARRIER: "arriving at",
            OP_RESET: "resetting", OP_LEAVE: "leaving"}

# node words
_NEXT, _TAG, _TOKEN = 0, 1, 2
NODE_HEADER = 24
_INT, _PICKLE, _REF = 1, 2, 3
#: Longest pickle a node keeps itself; a longer one, or one with out-of-band buffers, is
#: stored with ``heap.put`` and the node keeps its ref (``_inline``).
INLINE_MAX = 4000
_TAG_SHIFT = 56
_INT64 = struct.Struct("<q")
_U32 = (1 << 32) - 1

#: the futex calls of this process's core (waits.py, or its native twin)
_futex_wait: Callable[[Any, int, float], bool] = (
    waits.wait if core.native is None else core.native.futex_wait)
_futex_wake: Callable[[Any], None] = waits.wake if core.native is None else core.native.futex_wake

_T = TypeVar("_T")
#: the high half of a record's futex word: 1 while some waiter may sleep on it
_SLEEPERS = 1 << 32


class _Sleep:
    """What an attempt returns when its caller must sleep: the futex value to sleep on."""

    __slots__ = ("seen",)

    def __init__(self, seen: int) -> None:
        self.seen = seen


class _Hold:
    """The heap lock held for a coordination change; wakes the changed records' sleepers."""

    __slots__ = ("block", "table")

    def __init__(self, table: CoordTable, block: LockedBlock) -> None:
        self.table = table
        self.block = block

    def __enter__(self) -> None:
        self.block.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.block.close()
        self.table.wake_due()


def check_structure_name(name: object) -> str:
    """``name`` if it is a valid structure name, else InvalidNameError."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidNameError(
            f"invalid structure name {name!r}: use 1-48 characters of [A-Za-z0-9_.:-]")
    return name


def count_in(heap_name: str) -> int | None:
    """How many structures heap ``heap_name`` has, read from its segment with no attach."""
    try:
        fd, _st = segments.open_fd(coord_name(heap_name), readonly=True, expect_size=SIZE)
    except ShmHeapError:
        return None
    try:
        for record in range(RECORDS):
            if not os.pread(fd, 8, HEADER_SIZE + record * RECORD_SIZE).strip(b"\0"):
                return record
        return RECORDS
    finally:
        os.close(fd)


def _open_or_create(heap: AttachedHeap) -> segments.Segment:
    """Map the coordination segment of ``heap``, creating it on first use (under the lock).

    The creator holds the heap lock, so a segment without its stamp found
    under the lock was left by a creator that died: it is made again.
    """
    name = coord_name(heap.name)
    try:
        seg = segments.open_existing(name, readonly=heap.readonly, expect_size=SIZE)
    except (HeapNotFoundError, HeapCorruptError) as exc:
        if isinstance(exc, HeapNotFoundError) and heap.readonly:
            raise ReadOnlyError(f"heap {heap.name!r} has no queue, event, counter or barrier "
                                "yet, and a read-only handle makes none") from None
        if heap.readonly or isinstance(exc, segments.ForeignObjectError):
            raise
    else:
        if bytes(seg.buf[:8]) == MAGIC:
            return seg
        seg.close()
        if heap.readonly:
            raise HeapCorruptError(f"/dev/shm/{name} is not the coordination segment of heap "
                                   f"{heap.name!r}; run `shmheap fsck --repair {heap.name}`")

    def made() -> segments.Segment:
        try:
            seg = segments.open_existing(name, readonly=False, expect_size=SIZE)
        except (HeapNotFoundError, HeapCorruptError) as exc:
            if isinstance(exc, segments.ForeignObjectError):
                raise
            segments.remove_own(name)  # absent, or left short by a creator that died
            seg = segments.create(name, SIZE, heap.params.mode)
        if bytes(seg.buf[:8]) != MAGIC:
            seg.buf[HEADER_SIZE:] = bytes(SIZE - HEADER_SIZE)
            seg.buf[8:12] = VERSION.to_bytes(4, "little")
            crash.reach("coord.created")
            seg.buf[:8] = MAGIC
        return seg

    lock = heap._lock
    return lock.run(made, None, write=True)


@dataclass(frozen=True)
class StructureInfo:
    """One named structure, as ``shmheap info`` lists it (read with no lock)."""

    name: str
    kind: str
    #: items queued (queue), 1/0 (event), the value (counter), parties waiting (barrier)
    value: int
    #: the capacity (queue, 0: unbounded) or parties (barrier)
    param: int
    #: leased items (queue), the generation (barrier)
    extra: int = 0


class CoordTable:
    """This handle's view of the coordination segment; the structures' shared steps."""

    def __init__(self, heap: AttachedHeap, allocator: Allocator) -> None:
        self.heap = heap
        self.allocator = allocator
        self._seg = _open_or_create(heap)
        self.words = self._seg.buf.cast("Q")
        self._futexes: dict[int, ctypes.c_uint32] = {}
        self._natives: list[Any] = []
        #: records changed (``bump``) while a waiter slept on them, to wake after the lock
        self._wake_due: set[int] = set()
        #: arena indices known to be published (queue nodes lie in them)
        self._arenas: set[int] = set()
        #: name -> record number, of the records this handle has looked up
        self._found: dict[str, int] = {}
        #: objects of items whose views are gone, to free at the next queue call (_Lent)
        self._unviewed: list[int] = []
        lock = heap._lock
        self.lock: HeapLock = lock  # type: ignore[assignment]

    def native_queue(self, record: int, slow_put: Callable[..., None],
                     slow_get: Callable[..., object]) -> Any:
        """The native core's put and get of queue ``record`` (None on the pure core, and
        while crash points are armed: the Python paths reach them)."""
        native, lock, free = core.native, self.lock.native, self.allocator.free
        if native is None or lock is None or not isinstance(free, native.Free):
            return None
        queue = native.Queue(
            lock, self._seg.buf, record, self.heap._words, self.allocator.alloc, free, _inline,
            pickle.loads, slow_put, slow_get, SLICE, SCAN_INTERVAL)
        self._natives.append(queue)
        return queue

    def close(self) -> None:
        for native in self._natives:
            native.release()
        self._natives.clear()
        self._futexes.clear()
        self.words.release()
        self._seg.close()

    # -- records ---------------------------------------------------------------------------

    def base(self, record: int) -> int:
        return (HEADER_SIZE + record * RECORD_SIZE) // 8

    def futex(self, record: int) -> ctypes.c_uint32:
        word = self._futexes.get(record)
        if word is None:
            self.heap._check_open()  # (close() forgets the words: their mapping is gone)
            word = self._futexes[record] = waits.address_of(
                self._seg.map, HEADER_SIZE + record * RECORD_SIZE + _FUTEX * 8)
        return word

    def locked(self, deadline: float | None) -> _Hold:
        """``with table.locked(deadline):`` the heap lock held; the waiters of what changed
        are woken after it is released."""
        self.heap._check_open()
        return _Hold(self, LockedBlock(self.lock, deadline, write=True))

    def name_of(self, record: int) -> str | None:
        """The published name of ``record``, or None if it is free (or garbage)."""
        b = self.base(record)
        words = self.words
        length = int(words[b + _NAMELEN])
        if not words[b + _KIND] or not 1 <= length <= 48:
            return None
        raw = bytes(self._seg.buf[(b + _NAME) * 8:(b + _NAME) * 8 + length])
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            return None

    def find(self, name: str) -> int | None:
        """The record of structure ``name``, or None (no lock: published records never change)."""
        record = self._found.get(name)
        if record is not None:
            return record
        for record in range(RECORDS):
            if not self.words[self.base(record) + _KIND]:
                break  # records are taken in order and never freed
            if self.name_of(record) == name:
                self._found[name] = record
                return record
        return None

    def open(self, name: str, kind: int, param: int,
             make_extra: Callable[[], int] | None = None) -> int:
        """The record of structure ``name`` of ``kind`` with ``param`` (None: any), made if new."""
        check_structure_name(name)
        record = self.find(name)
        if record is None:
            self.heap._check_writable(f"making the {KIND_NAMES[kind]} {name!r}")
            extra = make_extra() if make_extra is not None else 0
            try:
                record = self._make(name, kind, param, extra)
            except BaseException:
                if extra:
                    self.allocator.free(extra)
                raise
        b = self.base(record)
        words = self.words
        if words[b + _KIND] != kind:
            raise InvalidParameterError(
                f"{name!r} is {_A.get(int(words[b + _KIND]), 'a structure')} of heap "
                f"{self.heap.name!r}, not {_A[kind]}; choose another name")
        if param >= 0 and words[b + _PARAM] != param:
            what = "capacity" if kind == QUEUE else "parties"
            raise InvalidParameterError(
                f"{KIND_NAMES[kind]} {name!r} exists with {what} {int(words[b + _PARAM])}, not "
                f"{param}; pass {int(words[b + _PARAM])} (or None to take it as it is)")
        return record

    def _make(self, name: str, kind: int, param: int, extra: int) -> int:
        """Publish a new record (kind last), unless another process made it first."""
        with self.locked(None):
            self._found.pop(name, None)
            record = self.find(name)
            if record is not None:
                if extra:
                    self.allocator.free(extra)
                return record
            words = self.words
            for record in range(RECORDS):
                if not words[self.base(record) + _KIND]:
                    break
            else:
                raise InvalidParameterError(
                    f"heap {self.heap.name!r} holds {RECORDS} queues, events, counters and "
                    "barriers already, the most it can; reuse one of them")
            b = self.base(record)
            raw = name.encode("ascii").ljust(48, b"\0")
            words[b + _NAMELEN] = len(name)
            self._seg.buf[(b + _NAME) * 8:(b + _NAME) * 8 + 48] = raw
            words[b + _PARAM] = max(param, 0)
            words[b + _STATE.start:b + _STATE.stop] = _ZERO_STATE
            if kind == COUNTER:
                words[b + _CELLS] = extra
            elif kind == BARRIER:
                words[b + _TOKENS] = extra
            if extra:
                owners.hold_locked(self.allocator, extra)  # the structure's, not its maker's
            crash.reach("coord.described")
            words[b + _KIND] = kind
            self._found[name] = record
            return record

    def structures(self) -> list[StructureInfo]:
        """Every structure of the heap, read with no lock (the values may be moving)."""
        found = []
        words = self.words
        for record in range(RECORDS):
            b = self.base(record)
            kind = int(words[b + _KIND])
            name = self.name_of(record)
            if not kind or name is None:
                break
            value, extra = {
                QUEUE: (words[b + _COUNT], words[b + _LEASED]),
                EVENT: (words[b + _SET], 0),
                COUNTER: (0, 0),
                BARRIER: (words[b + _ARRIVED], words[b + _GENERATION]),
            }.get(kind, (0, 0))
            if kind == COUNTER:
                value = self.counter_value(record)
            found.append(StructureInfo(name, KIND_NAMES.get(kind, f"kind {kind}"),
                                       int(value), int(words[b + _PARAM]), int(extra)))
        return found

    # -- changes under the lock: the intent, the futex word ----------------------------------

    def begin(self, record: int, op: int, node_a: int = 0, node_b: int = 0,
              free: int = 0, hold: int = 0) -> None:
        """Save what ``op`` of ``record`` may change, then journal it (lock held)."""
        words = self.words
        b = self.base(record)
        words[_I_RECORD] = record
        words[_I_OP] = op
        words[_I_SAVED] = words[b + _STATE.start:b + _STATE.stop]
        words[_I_NODE_A] = node_a
        words[_I_NEXT_A] = self.node(node_a)[_NEXT] if node_a else 0
        words[_I_NODE_B] = node_b
        words[_I_NEXT_B] = self.node(node_b)[_NEXT] if node_b else 0
        words[_I_FREE] = free
        words[_I_HOLD] = hold
        words[_I_OWNER] = self.heap._live.token  # type: ignore[union-attr]
        self.heap._journal.begin(control.COORD, record, op)

    def end(self, record: int) -> None:
        """Bump the record's futex word and clear the journal (lock held)."""
        self.bump(record)
        self.heap._journal.end()

    def bump(self, record: int, wake: bool = False) -> None:
        """Tell the record's waiters it changed (lock held); they are woken by ``wake_due``
        if one said it sleeps (``sleep_on``), or with ``wake`` in any case."""
        at = self.base(record) + _FUTEX
        word = int(self.words[at])
        self.words[at] = (word + 1) & _U32  # (clears the sleepers flag in the high half)
        if wake or word >> 32:
            self._wake_due.add(record)

    def sleep_on(self, record: int) -> _Sleep:
        """Say that a waiter will sleep on the record (lock held): the next ``bump`` wakes it."""
        at = self.base(record) + _FUTEX
        word = int(self.words[at])
        self.words[at] = word | _SLEEPERS
        return _Sleep(word & _U32)

    def wake_due(self) -> None:
        """Wake the sleepers of every record this process changed since it last woke them."""
        due = self._wake_due
        while due:
            _futex_wake(self.futex(due.pop()))

    def undo(self) -> str:
        """Restore what the journal's unfinished op saved; free its new node (repair.py)."""
        words = self.words
        record, op = int(words[_I_RECORD]), int(words[_I_OP])
        if not 0 <= record < RECORDS or op not in OP_NAMES:
            raise HeapCorruptError(f"the coordination intent names record {record}, op {op}")
        b = self.base(record)
        words[b + _STATE.start:b + _STATE.stop] = words[_I_SAVED]
        for node, saved in ((_I_NODE_A, _I_NEXT_A), (_I_NODE_B, _I_NEXT_B)):
            if words[node]:
                self.node(int(words[node]))[_NEXT] = words[saved]
        if words[_I_HOLD]:  # back in the queue: the queue's again, whoever had taken it
            node = int(words[_I_HOLD])
            self.give_item(node, self._object_or_none(node), owners.hold_locked)
        if op == OP_LEAVE:  # the leaver is a party again (a dead one breaks the barrier)
            tokens = self.allocator.view(int(words[b + _TOKENS])).cast("Q")
            if int(words[_I_AT]) < min(len(tokens), int(words[b + _PARAM])):
                tokens[int(words[_I_AT])] = words[_I_WAS]
        orphan, putter = int(words[_I_FREE]), int(words[_I_OWNER])
        live = self.heap._live
        assert live is not None
        if orphan and live.token_alive(putter):
            # The putter's again, node and object: it frees them as its exception passes
            # put() (Queue._forget), unless it had marked the node linked (then they stay
            # its own until it is gone, and reclaim() frees them).
            self.give_item(orphan, self._object_or_none(orphan),
                           lambda allocator, ref: owners.adopt_locked(allocator, ref, putter))
        elif orphan:
            obj = self._object_or_none(orphan)
            if obj:  # nobody's: reclaim() frees it (a repair run twice makes it so twice)
                owners.orphan_locked(self.allocator, obj)
            words[_I_FREE] = 0  # cleared first: a repair stopped now leaks, never frees twice
            self.allocator.free_locked(orphan)
        self.bump(record)
        self.wake_due()
        name = self.name_of(record) or f"record {record}"
        return f"{OP_NAMES[op]} {name!r} was undone"

    # -- nodes -----------------------------------------------------------------------------

    def _bytes(self, ref: int, length: int) -> memoryview:
        """``length`` bytes at heap address ``ref`` (a node written under the lock), through
        its arena's mapping when they lie in one arena, else through the object's view."""
        allocator = self.allocator
        index, offset = ref >> allocator.arena_shift, ref & allocator.arena_mask
        if ref <= 0 or offset & 7 or not 0 < index < self.heap.max_arenas:
            raise HeapCorruptError(f"heap {self.heap.name!r}: a queue links {ref:#x}, which is "
                                   "no queue node; run `shmheap fsck --repair`")
        if index not in self._arenas:  # (map bits never clear: once in, always in)
            if index not in self.heap:
                raise HeapCorruptError(f"heap {self.heap.name!r}: a queue links {ref:#x}, "
                                       "in no arena; run `shmheap fsck --repair`")
            self._arenas.add(index)
        if offset + length <= allocator.arena_size:
            return allocator.pages_of(index).data[offset:offset + length]
        view = allocator.view(ref)  # (a giant node)
        if len(view) < length:
            raise HeapCorruptError(f"heap {self.heap.name!r}: the queue node at {ref:#x} is "
                                   "shorter than it says; run `shmheap fsck --repair`")
        return view[:length]

    def node(self, ref: int) -> memoryview:
        """The three header words of the node at ``ref``."""
        return self._bytes(ref, NODE_HEADER).cast("Q")

    def store(self, item: object, deadline: float | None = None) -> int:
        """A new node holding ``item`` (an int, its pickle, or the ref of the object
        ``heap.put`` stored it in: ``_inline``); not linked anywhere.  LockTimeoutError at
        ``deadline`` (another thread of the handle holds it)."""
        obj = 0
        if type(item) is int and -(1 << 63) <= item < 1 << 63:
            kind, payload = _INT, _INT64.pack(item)
        else:
            inline = _inline(item)
            if inline is not None:
                kind, payload = _PICKLE, inline
            else:
                # (this process's until linked)
                obj = objects.put(self.allocator, item, time_left(deadline))
                kind, payload = _REF, _INT64.pack(obj)
        try:
            ref = self.allocator.alloc(NODE_HEADER + len(payload), time_left(deadline))
        except BaseException:
            if obj:
                self.allocator.free(obj)
            raise
        view = self._bytes(ref, NODE_HEADER + len(payload))
        view[NODE_HEADER:] = payload
        view[:NODE_HEADER].cast("Q")[_TAG] = kind << _TAG_SHIFT | len(payload)
        return ref

    def _payload(self, ref: int) -> tuple[int, memoryview]:
        """(kind, payload) of the node at ``ref``, checked."""
        tag = self.node(ref)[_TAG]
        kind, length = tag >> _TAG_SHIFT, tag & ((1 << _TAG_SHIFT) - 1)
        if kind not in (_INT, _PICKLE, _REF) or length > MAX_ITEM or (
                kind != _PICKLE and length != 8):
            raise HeapCorruptError(f"heap {self.heap.name!r}: the queue node at {ref:#x} is "
                                   "damaged; run `shmheap fsck --repair`")
        return kind, self._bytes(ref, NODE_HEADER + length)[NODE_HEADER:]

    def item_object(self, ref: int) -> int:
        """The ref of the object the item of node ``ref`` is stored in, 0 if the node
        keeps its item itself."""
        kind, payload = self._payload(ref)
        return int(_INT64.unpack(payload)[0]) if kind == _REF else 0

    def load(self, ref: int, writable: bool) -> tuple[object, _Lent | None]:
        """The item the node at ``ref`` holds; for one stored with ``heap.put``, what
        decides when its object is freed (its views are the object's memory)."""
        kind, payload = self._payload(ref)
        if kind == _INT:
            return _INT64.unpack(payload)[0], None
        if kind == _PICKLE:
            return pickle.loads(payload), None
        lent = _Lent(self, int(_INT64.unpack(payload)[0]))
        return objects.get(self.allocator, lent.ref, writable, gone=lent.unviewed), lent

    def give_item(self, node: int, obj: int, give: Callable[[Allocator, int], None]) -> None:
        """``give`` (an ``owners.*_locked``) ``node`` and ``obj``, the object its item is
        stored in if any, in that order (lock holder)."""
        give(self.allocator, node)
        if obj:
            give(self.allocator, obj)

    def _object_or_none(self, node: int) -> int:
        """``item_object``, 0 if the node is damaged (a repair leaks its object then)."""
        try:
            return self.item_object(node)
        except ShmHeapError:
            return 0

    def free_node(self, node: int) -> None:
        """Free a node that is no queue's, and the object its item is stored in."""
        obj = self.item_object(node)
        self.allocator.free(node)
        if obj:
            self.allocator.free(obj)

    def free_unviewed(self, ref: int) -> None:
        """Free object ``ref`` of this process, whose item's views are all gone: now, or, if
        this thread may be inside a hold of the heap lock (a view may go anywhere, as a
        garbage collection runs), at this handle's next put or get that runs in Python (a
        get of an item stored with put always does); else reclaim() once it is gone."""
        self._unviewed.append(ref)
        if not self.heap._mutex._is_owned():
            self.flush_unviewed()

    def flush_unviewed(self) -> None:
        """Free what ``free_unviewed`` left; a closed heap's stay this process's (reclaim()
        frees them once it is gone)."""
        while self._unviewed and not self.heap.closed:
            self.allocator.free(self._unviewed.pop())

    # -- waiting -----------------------------------------------------------------------------

    def wait_for(self, record: int, attempt: Callable[[], _T], deadline: float | None,
                 on_slice: Callable[[], None] | None = None) -> _T:
        """``attempt()`` until it returns something but a ``_Sleep`` (``sleep_on``), sleeping
        on the record's futex word between tries; TimeoutError at ``deadline``."""
        word = self.futex(record)
        while True:
            got = attempt()
            if not isinstance(got, _Sleep):
                return got
            wait = SLICE
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError
            if not _futex_wait(word, got.seen, wait) and on_slice is not None:
                on_slice()

    # -- counters --------------------------------------------------------------------------

    def counter_value(self, record: int) -> int:
        b = self.base(record)
        words = self.words
        value = int(words[b + _BASE])
        if words[b + _PURE]:
            value += sum(self.allocator.view(int(words[b + _CELLS])).cast("Q"))
        return _wrap(value)


def _inline(item: object) -> bytes | None:
    """The pickle of ``item`` if its node keeps it (at most INLINE_MAX bytes and no
    out-of-band buffers), else None: it is stored with ``heap.put``, zero-copy."""
    buffers: list[pickle.PickleBuffer] = []
    try:
        payload = pickle.dumps(item, pickle.HIGHEST_PROTOCOL, buffer_callback=buffers.append)
    except (pickle.PicklingError, TypeError, AttributeError, RecursionError) as exc:
        raise InvalidParameterError(
            f"put(): a {type(item).__name__} cannot be pickled ({exc}); queue ints or "
            "picklable values only") from None
    return payload if not buffers and len(payload) <= INLINE_MAX else None


class _Lent:
    """The object an item was stored in with ``heap.put``, handed to this process as views
    (``objects.get``): freed once it is this process's (``own``: a get, a lease's end) and
    no view of it is left (``unviewed``), whichever comes last; a process that dies first
    leaves it to ``reclaim()``."""

    __slots__ = ("_gone", "_mine", "_once", "pid", "ref", "table")

    def __init__(self, table: CoordTable, ref: int) -> None:
        self.table = table
        self.ref = ref
        self.pid = os.getpid()  # (a forked child's copies of the views free nothing)
        self._mine = self._gone = False
        self._once = threading.Lock()  # (the views may go in another thread)

    def own(self) -> None:
        self._settle(mine=True)

    def unviewed(self) -> None:
        self._settle(gone=True)

    def _settle(self, mine: bool = False, gone: bool = False) -> None:
        with self._once:
            self._mine |= mine
            self._gone |= gone
            due, self.ref = (self.ref, 0) if self._mine and self._gone else (0, self.ref)
        if due and self.pid == os.getpid():
            self.table.free_unviewed(due)


def _wrap(value: int) -> int:
    """A 64-bit two's complement reading of ``value``."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


_ZERO_STATE = memoryview(bytes(48)).cast("Q")


class Queue:
    """A kill-safe multi-producer multi-consumer FIFO of the heap (``heap.queue(name)``)."""

    def __init__(self, table: CoordTable, name: str, capacity: int | None) -> None:
        if capacity is not None and (type(capacity) is not int or capacity < 1):
            raise InvalidParameterError(
                f"capacity={capacity!r}: give a positive int, or None for no bound")
        self.name = name
        self._table = table
        self._record = table.open(name, QUEUE, -1 if capacity is None else capacity)
        self._b = table.base(self._record)
        self._scanned = 0.0
        native = table.native_queue(self._record, Queue.put.__get__(self),
                                    Queue.get.__get__(self))
        if native is not None:  # one C call each (_native.c Queue); this class's methods
            self.put = native.put  # type: ignore[method-assign]  # do what it leaves them
            self.get = native.get  # type: ignore[method-assign]

    def __repr__(self) -> str:
        return f"<Queue {self.name!r} of heap {self._table.heap.name!r}, {len(self)} items>"

    @property
    def capacity(self) -> int | None:
        """The most items it holds (leased ones do not count), None if unbounded."""
        return int(self._table.words[self._b + _PARAM]) or None

    def __len__(self) -> int:
        """Items queued now (not counting leased ones)."""
        return int(self._table.words[self._b + _COUNT])

    @property
    def leased(self) -> int:
        """Items leased now and not yet done."""
        return int(self._table.words[self._b + _LEASED])

    @property
    def closed(self) -> bool:
        return bool(self._table.words[self._b + _CLOSED])

    def put(self, item: object, timeout: float | None = None) -> None:
        """Append ``item`` (an int, or any picklable object); waits while the queue is full.

        ``queue.Full`` if it stays full for ``timeout`` seconds;
        QueueClosedError once the queue is closed.
        """
        deadline = deadline_of(timeout)
        table = self._table
        table.flush_unviewed()
        try:
            node = table.store(item, deadline)
        except TimeoutError:
            if not expired(deadline):
                raise  # a signal handler's of the program
            raise queue_module.Full from None  # another thread of this handle held it throughout
        progress: list[str] = []  # what _put has done: "begun" the op, "linked" the node
        try:
            table.wait_for(self._record, lambda: self._put(node, deadline, progress), deadline)
            crash.reach("coord.put_released")
        except BaseException as exc:
            if "linked" in progress:  # (a TimeoutError too: a signal handler's, put done)
                raise
            if progress:
                self._forget(node)
            else:
                table.free_node(node)  # (nobody else has seen it: no lock, no wait)
            if isinstance(exc, TimeoutError) and expired(deadline):
                raise queue_module.Full from None
            raise  # (a TimeoutError before the deadline: the program's own)

    def _forget(self, node: int) -> None:
        """Free ``node`` (and its item's object) of a put that raised after it had begun and
        before it had linked the node, if it is still this process's: it is, unless the undo
        of that put, run by a process that judged this one dead, freed it (else the undo gave
        it back)."""
        table = self._table
        with table.locked(None):
            if owners.mine_locked(table.allocator, node):
                table.free_node(node)

    def _put(self, node: int, deadline: float | None, progress: list[str]) -> Any:
        table = self._table
        words, b = table.words, self._b
        with table.locked(deadline):
            if words[b + _CLOSED]:
                raise QueueClosedError(f"queue {self.name!r} is closed; nothing more can be put")
            count = int(words[b + _COUNT])
            if words[b + _PARAM] and count >= words[b + _PARAM]:
                return table.sleep_on(self._record)
            tail = int(words[b + _TAIL])
            obj = table.item_object(node)
            progress.append("begun")  # put() frees it under the lock from now on
            table.begin(self._record, OP_PUT, node_a=tail, free=node)
            table.give_item(node, obj, owners.hold_locked)  # the queue holds them (owners.py)
            if tail:
                table.node(tail)[_NEXT] = node
            else:
                words[b + _HEAD] = node
            crash.reach("coord.linked")
            words[b + _TAIL] = node
            words[b + _COUNT] = count + 1
            progress.append("linked")  # put() frees it no more: the queue's, or a taker's
            table.end(self._record)
        return None

    def get(self, timeout: float | None = None) -> object:
        """Remove and return the item at the head; waits while the queue is empty.

        ``queue.Empty`` if it stays empty for ``timeout`` seconds, or at once
        when it is empty and closed.  Exactly-once: the item is this
        process's once it is returned.
        """
        return self._take(timeout, lease=False)[1]

    def get_nowait(self) -> object:
        return self.get(timeout=0)

    def put_nowait(self, item: object) -> None:
        self.put(item, timeout=0)

    @contextmanager
    def lease(self, timeout: float | None = None) -> Iterator[object]:
        """``with q.lease() as item:`` the head item, done when the block ends.

        If the block raises, or this process dies before the block ends, the
        item goes back to the head of the queue: at-least-once delivery.
        ``queue.Empty`` as for ``get``.
        """
        node, item, lent = self._take(timeout, lease=True)
        try:
            yield item
        except BaseException:
            self._give_back(node)
            raise
        try:
            self._done(node)
        except BaseException:
            self._give_back(node)  # not done after all: delivered again
            raise
        if lent is not None:
            lent.own()

    def _take(self, timeout: float | None, lease: bool) -> tuple[int, object, _Lent | None]:
        deadline = deadline_of(timeout)
        table = self._table
        table.flush_unviewed()
        try:
            node, item, lent = table.wait_for(
                self._record, lambda: self._take_head(deadline, lease), deadline,
                self._scan_now)
        except TimeoutError:
            if not expired(deadline):
                raise  # a signal handler's of the program
            raise queue_module.Empty from None
        if not lease:
            crash.reach("coord.taken")
            table.allocator.free(node)
            if lent is not None:
                lent.own()
        return node, item, lent

    def _scan_now(self) -> None:
        self._scanned = 0.0

    def _take_head(self, deadline: float | None, lease: bool) -> Any:
        table = self._table
        words, b = table.words, self._b
        with table.locked(deadline):
            now = time.monotonic()
            count = int(words[b + _COUNT])
            if words[b + _LEASED] and (not count or now - self._scanned >= SCAN_INTERVAL):
                self._scanned = now
                self._return_dead_leases()
                count = int(words[b + _COUNT])
            if not count:
                if words[b + _CLOSED]:
                    raise queue_module.Empty
                return table.sleep_on(self._record)
            node = int(words[b + _HEAD])
            header = table.node(node)
            following = int(header[_NEXT])
            item, lent = table.load(node, writable=not lease)  # (a lease may come back)
            table.begin(self._record, OP_LEASE if lease else OP_TAKE,
                        node_a=node if lease else 0, hold=0 if lease else node)
            words[b + _HEAD] = following
            if not following:
                words[b + _TAIL] = 0
            crash.reach("coord.unlinked")
            if lease:
                header[_TOKEN] = table.heap._live.token  # type: ignore[union-attr]
                header[_NEXT] = words[b + _LEASES]
                words[b + _LEASES] = node
                words[b + _LEASED] += 1
            words[b + _COUNT] = count - 1
            if not lease:  # the getter's now: if it dies before it frees it, reclaim() does
                self._hand_over(node, lent.ref if lent is not None else 0)
            table.end(self._record)
        return node, item, lent

    def _hand_over(self, node: int, obj: int) -> None:
        """Make ``node`` and ``obj``, the object of its item if any, the taker's (the op's
        last stores)."""
        self._table.give_item(node, obj, owners.adopt_locked)
        crash.reach("coord.handed")

    def _return_dead_leases(self) -> None:
        """Put every leased node whose leaser is dead back at the head (lock held)."""
        table = self._table
        live = table.heap._live
        assert live is not None
        for node in self._leases():
            token = int(table.node(node)[_TOKEN])
            if not token or not live.token_alive(token):
                self._requeue(node)

    def _leases(self) -> list[int]:
        """The leased nodes (lock held), their list checked to end where ``leased`` says."""
        table = self._table
        words, b = table.words, self._b
        found = []
        ref = int(words[b + _LEASES])
        for _ in range(int(words[b + _LEASED])):
            if not ref:
                break
            found.append(ref)
            ref = int(table.node(ref)[_NEXT])
        return found

    def _unlink_lease(self, node: int, op: int) -> memoryview | None:
        """Begin ``op`` and take ``node`` out of the lease list; None if it is not in it."""
        table = self._table
        words, b = table.words, self._b
        leases = self._leases()
        if node not in leases:
            return None
        at = leases.index(node)
        prev = leases[at - 1] if at else 0
        table.begin(self._record, op, node_a=prev, node_b=node if op == OP_RETURN else 0,
                    hold=node if op == OP_ACK else 0)
        header = table.node(node)
        if prev:
            table.node(prev)[_NEXT] = header[_NEXT]
        else:
            words[b + _LEASES] = header[_NEXT]
        words[b + _LEASED] -= 1
        return header

    def _requeue(self, node: int) -> None:
        """Move a leased ``node`` back to the head (lock held)."""
        table = self._table
        words, b = table.words, self._b
        header = self._unlink_lease(node, OP_RETURN)
        if header is None:
            return
        crash.reach("coord.unleased")
        header[_TOKEN] = 0
        header[_NEXT] = words[b + _HEAD]
        words[b + _HEAD] = node
        if not words[b + _TAIL]:
            words[b + _TAIL] = node
        words[b + _COUNT] += 1
        table.end(self._record)

    def _give_back(self, node: int) -> None:
        with self._table.locked(None):
            self._requeue(node)

    def _done(self, node: int) -> None:
        table = self._table
        with table.locked(None):
            if self._unlink_lease(node, OP_ACK) is None:
                return  # given back already (this handle was closed and seen dead)
            crash.reach("coord.acked")
            self._hand_over(node, table.item_object(node))  # (as a get's: reclaim() frees it)
            table.end(self._record)
            table.allocator.free(node)

    def close(self) -> None:
        """Close the queue for every process: put raises, get drains what is left, then Empty."""
        table = self._table
        with table.locked(None):
            table.words[self._b + _CLOSED] = 1
            table.bump(self._record)


class Event:
    """A kill-safe event of the heap (``heap.event(name)``), as ``threading.Event``.

    A read-only handle may open an event that exists, to look at it
    (``is_set``, and ``wait``, which then looks in growing pauses of up to
    ``SLICE``: a read-only mapping has no word to sleep on).
    """

    def __init__(self, table: CoordTable, name: str) -> None:
        self.name = name
        self._table = table
        self._record = table.open(name, EVENT, 0)
        self._flag = table.base(self._record) + _SET

    def __repr__(self) -> str:
        state = "set" if self.is_set() else "unset"
        return f"<Event {self.name!r} of heap {self._table.heap.name!r}, {state}>"

    def is_set(self) -> bool:
        return bool(self._table.words[self._flag])

    def set(self) -> None:
        """Set the flag and wake every waiter, in every process."""
        self._store(1)

    def clear(self) -> None:
        self._store(0)

    def _store(self, value: int) -> None:
        table = self._table
        table.heap._check_writable("Event.set() and clear()")
        with table.locked(None):
            table.words[self._flag] = value
            crash.reach("coord.flag_stored")
            table.bump(self._record, wake=bool(value))  # (its waiters say nothing: see wait)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the flag is set (True) or ``timeout`` seconds pass (False).

        It takes no lock and says nothing (a read-only handle can write no
        word): it reads the futex word, then the flag, and sleeps on the word
        while it holds what was read; ``set()`` stores the flag, bumps the word
        and always wakes (one system call; events are set rarely).
        """
        deadline = deadline_of(timeout)
        table = self._table
        words, flag, at = table.words, self._flag, table.base(self._record) + _FUTEX

        def attempt() -> Any:
            seen = int(words[at]) & _U32
            return True if words[flag] else _Sleep(seen)

        try:
            return bool(table.wait_for(self._record, attempt, deadline))
        except TimeoutError:
            return False


class Counter:
    """A kill-safe 64-bit counter of the heap (``heap.counter(name)``)."""

    def __init__(self, table: CoordTable, name: str) -> None:
        self.name = name
        self._table = table
        cells = 8 * table.heap._live.nslots  # type: ignore[union-attr]
        self._record = table.open(name, COUNTER, 0, lambda: table.allocator.alloc(cells))
        b = table.base(self._record)
        self._pure = b + _PURE
        self._cells = int(table.words[b + _CELLS])
        if core.native is not None:
            native = core.native.Counter(table._seg.map, (b + _BASE) * 8, (b + _PURE) * 8,
                                         self._add_locked)
            table._natives.append(native)
            self.add = native.add  # type: ignore[method-assign]

    def __repr__(self) -> str:
        return f"<Counter {self.name!r} of heap {self._table.heap.name!r}, {self.value}>"

    def add(self, k: int = 1) -> int:
        """Add ``k`` (an int, may be negative); return the new value.  Atomic."""
        return self._add_locked(k)

    def _add_locked(self, k: int) -> int:
        if type(k) is not int or not -(1 << 63) <= k < 1 << 63:
            raise InvalidParameterError(f"k={k!r}: give an int that fits 64 bits")
        table = self._table
        words = table.words
        live = table.heap._live
        assert live is not None
        with table.locked(None):
            cells = table.allocator.view(self._cells).cast("Q")
            if not words[self._pure]:
                words[self._pure] = 1
            cells[live.slot] = (cells[live.slot] + k) & ((1 << 64) - 1)
            return table.counter_value(self._record)

    @property
    def value(self) -> int:
        return self._table.counter_value(self._record)


class Barrier:
    """A kill-safe barrier of the heap (``heap.barrier(name, parties)``), as ``threading.Barrier``.

    The process that calls ``heap.barrier`` becomes one of its ``parties``
    (once, however often it calls).  A registered party that dies, whether
    it waits or not yet, and a waiter whose wait times out or is
    interrupted, break the barrier for the others:
    ``threading.BrokenBarrierError``.  ``reset()`` makes it usable again and
    drops the dead parties, so that new processes may take their places.
    A party that is done calls ``leave()`` (or leaves its ``with`` block):
    from then on the barrier needs one party fewer, so it neither breaks
    nor waits for the process that left.
    """

    def __init__(self, table: CoordTable, name: str, parties: int) -> None:
        if type(parties) is not int or not 1 <= parties <= MAX_PARTIES:
            raise InvalidParameterError(
                f"parties={parties!r}: give an int from 1 to {MAX_PARTIES}")
        self.name = name
        self._table = table
        self._record = table.open(name, BARRIER, parties,
                                  lambda: table.allocator.alloc(8 * parties))
        self._b = table.base(self._record)
        with table.locked(None):
            self._register_locked()

    def __repr__(self) -> str:
        state = "broken" if self.broken else f"{self.n_waiting}/{self.parties} waiting"
        return f"<Barrier {self.name!r} of heap {self._table.heap.name!r}, {state}>"

    def __enter__(self) -> Barrier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.leave()

    @property
    def parties(self) -> int:
        """Parties it needs: those it was made with, less those that left."""
        words = self._table.words
        made, left = int(words[self._b + _PARAM]), int(words[self._b + _LEFT])
        if left > made:
            raise HeapCorruptError(f"barrier {self.name!r} counts {left} parties left of "
                                   f"{made}; run `shmheap fsck --repair`")
        return made - left

    @property
    def n_waiting(self) -> int:
        """Parties waiting in the current round (0 while the barrier is broken)."""
        words = self._table.words
        return 0 if words[self._b + _BROKEN] else int(words[self._b + _ARRIVED])

    @property
    def broken(self) -> bool:
        return bool(self._table.words[self._b + _BROKEN])

    def _tokens(self) -> memoryview:
        """One word per party: the liveness token of a registered process, 0 if free."""
        view = self._table.allocator.view(int(self._table.words[self._b + _TOKENS]))
        return view.cast("Q")[:int(self._table.words[self._b + _PARAM])]

    def _register_locked(self) -> None:
        """Make this process a party (lock held); break the barrier if a party is dead."""
        table = self._table
        live = table.heap._live
        assert live is not None
        tokens = self._tokens()
        mine = live.token
        registered = tokens.tolist()
        if mine not in registered:
            if len(registered) - registered.count(0) >= self.parties:
                self._break_if_a_party_died()
                raise InvalidParameterError(
                    f"barrier {self.name!r} has its {self.parties} parties already (a process "
                    "becomes one when it calls heap.barrier(), and stops being one when it "
                    "leaves); if one of them died, the barrier is broken: reset() it, which "
                    "drops dead parties, and call again")
            tokens[registered.index(0)] = mine
        self._break_if_a_party_died()

    def wait(self, timeout: float | None = None) -> int:
        """Wait until ``parties`` processes wait; return this one's arrival index (0 first)."""
        deadline = deadline_of(timeout)
        table = self._table
        words, b = table.words, self._b
        index, generation = self._arrive()
        if index == self.parties - 1:
            return index

        def attempt() -> Any:
            with table.locked(deadline):
                if words[b + _GENERATION] != generation:
                    if self._was_reset(generation):
                        raise threading.BrokenBarrierError
                    return index
                if words[b + _BROKEN]:
                    raise threading.BrokenBarrierError
                return table.sleep_on(self._record)

        try:
            return int(table.wait_for(self._record, attempt, deadline, self._look_for_dead))
        except threading.BrokenBarrierError:
            raise
        except TimeoutError:
            self._abort_round(generation)
            raise threading.BrokenBarrierError from None
        except BaseException:
            self._abort_round(generation)
            raise

    def _was_reset(self, generation: int) -> bool:
        """Whether round ``generation``, which is over, was ended by ``reset()`` (lock held).

        A round more than 64 rounds ago is not remembered: it counts as reset.
        """
        words = self._table.words
        ago = int(words[self._b + _GENERATION]) - generation - 1
        return not 0 <= ago < 64 or bool(int(words[self._b + _RESETS]) >> ago & 1)

    def _arrive(self) -> tuple[int, int]:
        table = self._table
        words, b = table.words, self._b
        with table.locked(None):
            if words[b + _BROKEN]:
                raise threading.BrokenBarrierError
            self._register_locked()  # (a process forked after heap.barrier() is not yet)
            if words[b + _BROKEN]:
                raise threading.BrokenBarrierError
            index, generation = int(words[b + _ARRIVED]), int(words[b + _GENERATION])
            if not 0 <= index < self.parties:
                raise HeapCorruptError(f"barrier {self.name!r} counts {index} arrived of "
                                       f"{self.parties}; run `shmheap fsck --repair`")
            table.begin(self._record, OP_BARRIER)
            if index == self.parties - 1:
                self._next_round(reset=False)
                crash.reach("coord.arrived")
                words[b + _ARRIVED] = 0
            else:
                crash.reach("coord.arrived")
                words[b + _ARRIVED] = index + 1
            table.end(self._record)
        return index, generation

    def _look_for_dead(self) -> None:
        with self._table.locked(None):
            self._break_if_a_party_died()

    def _break_if_a_party_died(self) -> None:
        """Break the barrier if a registered party is dead (lock held)."""
        table = self._table
        words, b = table.words, self._b
        live = table.heap._live
        assert live is not None
        if words[b + _BROKEN]:
            return
        if not all(live.token_alive(token) for token in self._tokens().tolist() if token):
            words[b + _BROKEN] = 1
            table.bump(self._record)

    def reset(self) -> None:
        """As ``threading.Barrier.reset``: the parties waiting now get BrokenBarrierError,
        then the barrier is usable again; registered parties that died are dropped."""
        table = self._table
        words, b = table.words, self._b
        live = table.heap._live
        assert live is not None
        with table.locked(None):
            tokens = self._tokens()
            for at, token in enumerate(tokens.tolist()):  # (one word each: see the docstring)
                if token and not live.token_alive(token):
                    tokens[at] = 0
            self._register_locked()
            table.begin(self._record, OP_RESET)
            self._next_round(reset=True)
            crash.reach("coord.reset")
            words[b + _ARRIVED] = 0
            words[b + _BROKEN] = 0
            table.end(self._record)

    def _next_round(self, reset: bool) -> None:
        """Move the generation on, the round's bit in ``resets`` saying how it ended (lock
        held, op begun; the caller clears ``arrived``)."""
        words, b = self._table.words, self._b
        words[b + _GENERATION] = (int(words[b + _GENERATION]) + 1) & _U64
        words[b + _RESETS] = (int(words[b + _RESETS]) << 1 | reset) & _U64

    def leave(self) -> None:
        """Stop being a party: from now on the barrier needs one party fewer (``parties``
        drops by one for good; ``reset()`` does not bring it back), and it neither breaks
        nor waits for this process.  If the parties waiting now are all it needs, their
        round passes.  Leaving a barrier this process is no party of does nothing.

        A process killed while it leaves has not left: it dies a party, which breaks
        the barrier.
        """
        table = self._table
        words, b = table.words, self._b
        live = table.heap._live
        assert live is not None
        with table.locked(None):
            tokens = self._tokens()
            registered = tokens.tolist()
            if live.token not in registered:
                return
            at = registered.index(live.token)
            left, arrived = int(words[b + _LEFT]), int(words[b + _ARRIVED])
            words[_I_AT], words[_I_WAS] = at, live.token  # (before the journal names them)
            table.begin(self._record, OP_LEAVE)
            words[b + _LEFT] = left + 1
            if arrived and arrived >= self.parties and not words[b + _BROKEN]:
                self._next_round(reset=False)  # the waiters were waiting for this one only
                words[b + _ARRIVED] = 0
            crash.reach("coord.left")
            tokens[at] = 0
            table.end(self._record)

    def abort(self) -> None:
        """Break the barrier: every waiter, now and later, gets BrokenBarrierError."""
        self._abort_round(None)

    def _abort_round(self, generation: int | None) -> None:
        """Break the barrier, unless round ``generation`` (None: any) is over already."""
        table = self._table
        words = table.words
        with table.locked(None):
            if generation is not None and words[self._b + _GENERATION] != generation:
                return
            words[self._b + _BROKEN] = 1
            table.bump(self._record)


def check(table: CoordTable, repair: bool, note: Note) -> None:
    """Check every structure (lock held): lists end where their counts say, refs are live.

    With ``repair``, a queue whose list and words disagree gets the words the
    walk found (a list cut at a damaged link loses the items past it).
    """
    words = table.words
    for record in range(RECORDS):
        b = table.base(record)
        kind = int(words[b + _KIND])
        if not kind:
            return
        name = table.name_of(record)
        if name is None or kind not in KIND_NAMES:
            note("coord-record", f"coordination record {record} is damaged (kind {kind}, name "
                 f"{name!r}); it is left alone", False)
            continue
        what = f"{KIND_NAMES[kind]} {name!r}"
        if kind == QUEUE:
            _check_list(table, what + "'s items", b + _HEAD, b + _COUNT, b + _TAIL, note)
            _check_list(table, what + "'s leases", b + _LEASES, b + _LEASED, None, note)
        elif kind in (COUNTER, BARRIER):
            ref, size = ((words[b + _CELLS], 8 * table.heap._live.nslots)  # type: ignore[union-attr]
                         if kind == COUNTER else (words[b + _TOKENS], 8 * words[b + _PARAM]))
            try:
                ok = table.allocator.size_of(int(ref)) >= size
            except ShmHeapError:
                ok = False
            if not ok:
                note("coord-record", f"{what}'s storage at {int(ref):#x} is not a live object "
                     f"of {size} bytes", False)
            if kind == BARRIER:
                _check_barrier(table, what, b, note)


def _check_barrier(table: CoordTable, what: str, b: int, note: Note) -> None:
    """Parties left no more than it was made with, arrivals fewer than it needs."""
    words = table.words
    made = int(words[b + _PARAM])
    if words[b + _LEFT] > made and note("coord-barrier", f"{what} counts "
                                        f"{int(words[b + _LEFT])} parties left of {made}", True):
        words[b + _LEFT] = made
    needed = made - int(words[b + _LEFT])
    if words[b + _ARRIVED] and words[b + _ARRIVED] >= needed and note(
            "coord-barrier", f"{what} counts {int(words[b + _ARRIVED])} arrived of {needed} "
            "parties", True):
        words[b + _ARRIVED] = 0
        words[b + _BROKEN] = 1


def _check_list(table: CoordTable, what: str, head: int, count: int, tail: int | None,
                note: Note) -> None:
    """Walk one node list from word ``head``; compare its length (and end) with the words."""
    words = table.words
    expected = int(words[count])
    ref, last, length, cut = int(words[head]), 0, 0, None
    while ref and length <= expected:
        try:
            if table.allocator.size_of(ref) < NODE_HEADER:  # (a live object, of a node's size)
                raise HeapCorruptError(f"{ref:#x} is too small for a queue node")
            following = int(table.node(ref)[_NEXT])
        except ShmHeapError:
            cut = last
            break
        try:  # the object an item was stored in with put() must be live
            obj = table.item_object(ref)
            if obj:
                table.allocator.size_of(obj)
        except ShmHeapError as exc:
            note("coord-item", f"{what}: the item of the node at {ref:#x} is damaged ({exc})",
                 False)
        last, ref, length = ref, following, length + 1
    if cut is not None:
        if note("coord-list", f"{what} link a node that is not a live queue node after "
                f"{length} of {expected}; the list is cut there", True):
            if cut:
                table.node(cut)[_NEXT] = 0
            else:
                words[head] = 0
    elif ref and note("coord-list", f"{what} hold more nodes than the {expected} counted; "
                      f"the list is cut after {expected}", True):
        table.node(last)[_NEXT] = 0
    if length != expected and note("coord-count", f"{what} count {expected}, the list holds "
                                   f"{length}", True):
        words[count] = length
    if tail is not None and words[tail] != last and note(
            "coord-tail", f"{what} end at {last:#x}, the tail word says {int(words[tail]):#x}",
            True):
        words[tail] = last
