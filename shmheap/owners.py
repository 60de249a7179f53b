"""Who owns each object, and the reclaim of what dead processes owned.

Every object records its *holder word* (allocator.py: 32 bits beside a small
object's alloc byte, in the page metadata for a large or giant one):
``(slot + 1) << 16 | epoch & 0xFFFF`` of the liveness token of the process
that owns it, ``HELD`` (0) while a structure of the heap holds it, or
``ORPHAN`` when nobody does.  Ownership moves so:

* ``alloc``/``put``/``new_array`` -- the allocating process owns the object
  (it writes its word before it publishes the object);
* binding a root to it (roots.py, under the lock, in the bind's journaled
  mutation) -- ``HELD``; unbinding its last root -- the unbinding process
  (``ORPHAN`` if that process died and the journal's repair finished it);
* a queue of the heap taking it -- ``HELD`` (``hold_locked`` below), and
  handing it out -- the taker (``adopt_locked``);
* ``heap.adopt(ref)`` -- the calling process.

A ref passed to another process as a plain int does not move ownership: the
object stays its maker's until someone adopts it.

``reclaim`` frees, in one pass over the heap and with no other process's
help, every object whose holder word names a dead process (or ``ORPHAN``)
and that no root is bound to; objects of live processes and held ones are
never touched.  It runs one arena per lock hold: binding a root and adopting
happen under the lock, so an object cannot be bound or adopted between
the look at its word and its free.  Freeing is ``free``'s own step (one
store of a small object's alloc byte; a journaled page release for a large
one; ``giant.free_locked`` for a giant one).  A holder word is trusted only
after its slot and epoch are checked against the liveness segment; a
wrapped 16-bit epoch can make a dead owner look alive (the object waits for
a later reclaim), never a live one dead.

Internal calls for the structures of the heap (queues; lock holder only,
inside the structure's own journaled mutation, so that the object moves
into or out of the structure and its holder word in one step):

``hold_locked(allocator, ref)``
    the structure now holds the object: ``HELD``; reclaim leaves it alone.
``adopt_locked(allocator, ref)``
    the calling process owns the object from now on (a queue's ``get``).
``orphan_locked(allocator, ref)``
    nobody owns the object (``ORPHAN``): the item object of a put undone for a dead putter.

This module owns the holder words' meaning and reclaim; their place in
memory is allocator.py's, its ``holder``/``set_holder`` read and write them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING

from . import giant, walker
from .allocator import HELD, ORPHAN, holder_of
from .bytescan import positions
from .control import PAGES
from .errors import InvalidRefError
from .lock import deadline_of
from .pages import RELEASING

if TYPE_CHECKING:
    from .allocator import Allocator
    from .pages import ArenaPages


@dataclasses.dataclass
class OwnerBytes:
    """Live objects and their bytes (capacities) under one holder word."""

    objects: int = 0
    bytes: int = 0
    alive: bool = False


@dataclasses.dataclass
class ReclaimReport:
    """What ``reclaim`` freed: objects, bytes, and both per dead owner (``owner_name``)."""

    objects: int = 0
    bytes: int = 0
    by_owner: dict[str, OwnerBytes] = dataclasses.field(default_factory=dict)


def owner_name(word: int) -> str:
    """A holder word as people read it: "held", "orphan", or "slot S epoch E"."""
    if word == HELD:
        return "held"
    if word == ORPHAN:
        return "orphan"
    return f"slot {(word >> 16) - 1} epoch {word & 0xFFFF}"


def _objects_of(allocator: Allocator, pages: ArenaPages
                ) -> Iterator[tuple[int, int, int, int, int, bool]]:
    """(start, class, slot, holder word, bytes, bound) of every live object of an arena
    (lock holder): a giant object once, at its first part; parts being made not at all."""
    shift = pages.page_shift
    for start in pages.starts():
        found = pages.span_of(start)
        if found is None or not allocator.span_ok(found[1], found[0]):
            continue
        npages, c = found
        if c == 0:
            if pages.owner[start]:
                continue  # a giant object's part being made: its maker's, not an object yet
            if not start and pages.giant_ids[0]:
                made = giant.made(pages)
                if made is None or made.part:
                    continue  # a later part: the object is listed at its first
                npages = made.total
            yield (start, 0, 0, pages.holder[start], npages << shift,
                   pages.state[start] > RELEASING)
            continue
        cls = allocator.classes[c]
        a0 = start << shift
        alloc = bytes(pages.data[a0:a0 + cls.nelems])
        h0 = a0 + cls.holder_at
        holders = pages.data[h0:h0 + 4 * cls.nelems].cast("I")
        for k in positions(alloc, 1):
            yield start, c, k, holders[k], cls.size, False
        if alloc.translate(None, b"\0\1"):  # some are bound to roots
            for k, byte in enumerate(alloc):
                if byte > 1:
                    yield start, c, k, holders[k], cls.size, True
        holders.release()


def _alive(allocator: Allocator, word: int, known: dict[int, bool]) -> bool:
    alive = known.get(word)
    if alive is None:
        live = allocator.heap._live
        assert live is not None
        alive = known[word] = word not in (HELD, ORPHAN) and live.short_token_alive(word)
    return alive


def owner_bytes(allocator: Allocator, timeout: float | None = None) -> dict[str, OwnerBytes]:
    """Live objects and bytes per holder (``owner_name``), read by a walk with no lock.

    A display figure (``shmheap info``, ``top``): an object allocated, freed
    or handed over during the walk may be counted either way.
    """
    known: dict[int, bool] = {}
    totals: dict[int, OwnerBytes] = {}
    for span in walker.walk(allocator, deadline_of(timeout)):
        pages = allocator.pages_of(span.arena)
        a0 = span.address - pages.base
        if not span.size_class:
            start = a0 >> pages.page_shift
            held = [(pages.holder[start], pages.state[start] > RELEASING)]
        else:
            cls = allocator.classes[span.size_class]
            data = pages.data
            slots = [(ref - pages.base - a0 - cls.objects_at) // cls.size for ref in span.objects]
            at = a0 + cls.holder_at
            held = [(int.from_bytes(data[at + 4 * k:at + 4 * k + 4], "little"), data[a0 + k] > 1)
                    for k in slots if 0 <= k < cls.nelems]
        for word, bound in held:
            total = totals.setdefault(HELD if bound else word, OwnerBytes())
            total.objects += 1
            total.bytes += span.object_size
            total.alive = bound or word == HELD or _alive(allocator, word, known)
    return {owner_name(word): total for word, total in sorted(totals.items())}


def reclaim(allocator: Allocator, timeout: float | None = None) -> ReclaimReport:
    """Free every unbound object whose owner is dead (see the module docstring)."""
    heap = allocator.heap
    heap._check_writable("reclaim()")
    deadline = deadline_of(timeout)
    known: dict[int, bool] = {}
    report = ReclaimReport()

    def arena(pages: ArenaPages) -> None:
        heap._check_identity()
        for start, c, slot, word, size, bound in list(_objects_of(allocator, pages)):
            if bound or word == HELD or _alive(allocator, word, known):
                continue
            _free_locked(allocator, pages, start, c, slot)
            report.objects += 1
            report.bytes += size
            total = report.by_owner.setdefault(owner_name(word), OwnerBytes())
            total.objects += 1
            total.bytes += size

    for index in heap.snapshot(timeout):
        pages = allocator.pages_of(index)
        allocator._lock.run(lambda pages=pages: arena(pages), deadline,  # type: ignore[misc]
                            write=True)
    return report


def _free_locked(allocator: Allocator, pages: ArenaPages, start: int, c: int,
                 slot: int) -> None:
    """Free a located, unbound object as ``free`` would (lock holder)."""
    if c:
        pages.data[(start << pages.page_shift) + slot] = 0
        if not pages.owner[start]:
            allocator._summaries.partial(c).mark(pages.index)
    elif not start and pages.giant_ids[0]:
        giant.free_locked(allocator, pages)
    else:
        allocator._journal.begin(PAGES, pages.index)
        pages.release(start)
        allocator._journal.end()


def hold_locked(allocator: Allocator, ref: int) -> None:
    """A structure of the heap holds the live object at ``ref`` now (lock holder)."""
    allocator.set_holder(*allocator.live(ref, held=True), HELD)


def adopt_locked(allocator: Allocator, ref: int, token: int | None = None) -> None:
    """The calling process (or the one of liveness token ``token``) owns the live object
    at ``ref`` from now on (lock holder)."""
    token = allocator._token() if token is None else token
    allocator.set_holder(*allocator.live(ref, held=True), holder_of(token))


def mine_locked(allocator: Allocator, ref: int) -> bool:
    """True if ``ref`` is a live object the calling process owns (lock holder)."""
    try:
        located = allocator.live(ref, held=True)
    except InvalidRefError:
        return False
    return allocator.holder(*located) == holder_of(allocator._token())


def orphan_locked(allocator: Allocator, ref: int) -> None:
    """Nobody owns the live object at ``ref`` from now on: ``reclaim`` frees it (lock holder)."""
    allocator.set_holder(*allocator.live(ref, held=True), ORPHAN)


def adopt(allocator: Allocator, ref: int, timeout: float | None = None) -> None:
    """``heap.adopt(ref)``: take the lock and ``adopt_locked``."""
    allocator.heap._check_writable("adopt()")
    allocator._lock.run(lambda: adopt_locked(allocator, ref), deadline_of(timeout), write=True)
