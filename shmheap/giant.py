"""Giant objects: objects larger than an arena, over consecutive arenas.

Layout
    An object of ``N`` pages, more than an arena holds (``P`` pages), takes
    ``k = ceil(N / P)`` arenas at consecutive indices ``s .. s + k - 1``: every
    page of the first ``k - 1`` and the first ``N - (k - 1) * P`` pages of the
    last, whose other pages stay free pages for any other object.  Its ref
    is ``s * arena_size``, and since heap addresses run on from one arena to
    the next, ``[ref, ref + N * page_size)`` is the object.  Each arena holds
    its *part*: a span at page 0 of class 0 (like a large object's) and a
    giant record in its page metadata (pages.py): its place ``j``, ``k`` and
    ``N``.  Every process sees the object as one contiguous buffer: the data
    of its arenas mapped back to back into one reserved range
    (arenas.map_run), one per object and size in a process, shared by its
    views while any lives and counted against the process's mapping budget
    (``k`` mappings: an object over more arenas than the budget allows is a
    MappingLimitError before anything is made).

Which arenas
    The lowest run of ``k`` indices each of which is either an arena whose
    pages the part needs are free (all of them; the first ``N - (k-1) * P``
    for the last) or an index that has no arena yet.  The missing ones are
    grown, each as ``grow(at=i)`` grows one (made and reserved under this
    process's temporary name without the lock, then linked, appended and
    mapped under it); existing wholly free arenas are reused, so the arenas of
    freed giant objects, which stay in the index (it is append-only), serve
    the next ones as they serve any allocation.

Making one takes several lock holds, each journaled ``GIANT(s, k)``
    1. *claim*: find the run; for each of its existing arenas, re-reserve
       released pages, write the record, then make the part's span with
       this process's liveness token as its owner (entering the allocator's
       ``_pending`` list first); move the hint past the run if it has
       missing indices (so that ``grow()`` takes other ones).  Then, no lock
       held: zero the dirty pages of the claimed parts.
    2. *grow*, once per missing index: link the new arena there (taken
       meanwhile: give up, start over elsewhere), append it, set its map bit,
       claim it as in 1.
    3. *make*: check that every part is still ours; clear the owner of every
       part, the last first and the first last (marking it first: born
       marked).  The first part's owner becoming 0 is the object's
       publication.
    Why several holds: a new arena is built (and reserved, milliseconds for
    a big one) without the lock, and one at a time, since a process has one
    temporary name (the one liveness.py removes when its holder dies).
    Between the holds the parts are the maker's, as the spans a process
    caches are: nobody else allocates in them, walkers skip them, ``free``
    and ``view`` of the ref say it is being made.  If the maker dies, each
    part is reclaimed (freed: it never was an object) by the next reclaim
    pass (allocator.py); if it is interrupted, it gives them up at once, or
    failing that at its next slow path (``_settle_pending``).

Freeing one (any process; two lock holds, each journaled ``GIANT(s, k)``)
    1. *take back*: every part gets this process's token as its owner again
       (entering ``_pending`` first), the first first: the object is gone,
       its parts are the freeing process's as a maker's are.
    2. no lock held: clear every part's pages, so that the next object over
       them need not zero them (an O(1) ``alloc``): a sparse heap punches
       them out (``madvise(MADV_REMOVE)``: the memory goes back to the OS,
       as a ``shared_memory`` segment's does at its unlink, and the pages
       read zero); a reserving heap zeroes them (its memory stays reserved).
    3. *free*: every part still ours is freed, its pages marked RELEASED
       (punched) or CLEAN (zeroed), and its record cleared after its span;
       the arenas' "free" leaves say so.
    A state says "zero" only once the pages are: it is written in step 3,
    after step 2.  A freeing process that dies or is interrupted between
    the holds leaves parts that are freed as a dead or interrupted maker's
    are (as DIRTY pages).  The cost is the kernel's, in ``free``: punching
    populated tmpfs pages out is O(pages) (docs/design.md, "Where the time
    goes"), and the next object's first touch of each page faults it in.
    A lock holder's free (a sweep, ``owners.py``) frees the object in one
    hold, the first part first, its pages DIRTY.

Repair of ``GIANT(s, k)`` (repair.py)
    An arena of the run linked but not published is removed, one published
    but not in the map gets its map bit (as for ``GROW``); every arena of the
    run has its page metadata audited; then if the first part is *made* (its
    span published, unowned, with the run's record) the object is finished
    (every part of it disowned), else it is undone (every part of the run
    freed, DIRTY): it was half made, half taken back or half freed.

fsck (``check``): the parts of every made object are all there and agree,
and no part of an object that is not made is left without a maker.

This module owns the giant objects' protocol.  It changes page metadata only
through pages.py, grows arenas only through ``AttachedHeap.build_arena``, and is
called by allocator.py with or without the lock as each function says.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from typing import TYPE_CHECKING, Protocol

from . import arenas, control, crash, segments
from .control import DISOWN, GIANT
from .errors import (
    AddressSpaceExhaustedError,
    HeapCorruptError,
    InvalidParameterError,
    MappingLimitError,
    ShmHeapError,
)
from .names import arena_name
from .pages import CLEAN, DIRTY, RELEASED, ArenaPages, Giant
from .summary import CAP

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from .attached import AttachedHeap
    from .lock import ClosedLock, HeapLock
    from .summary import Summaries

class PageHeap(Protocol):
    """What this module needs of the allocator (``allocator.Allocator`` is one): the heap,
    its journal and lock, the arenas' page views, and the spans this process has claimed.

    The allocator calls this module and this module calls the allocator back;
    the protocol keeps the import one way (allocator.py imports giant.py).
    """

    heap: AttachedHeap
    readonly: bool
    arena_size: int
    page_shift: int
    pages_per_arena: int
    _journal: control.Journal
    _lock: HeapLock | ClosedLock
    _mapped: arenas.ArenaCache[ArenaPages]
    _summaries: Summaries
    #: spans whose owner word may hold our token while no cache of ours has them
    _pending: list[tuple[ArenaPages, int]]
    #: the runs of arenas this process has mapped, while a view holds one (``runs()``)
    _runs: weakref.WeakValueDictionary[tuple[int, int], object]

    def pages_of(self, index: int) -> ArenaPages: ...

    def _token(self) -> int: ...

    def _holder(self) -> int: ...

    def _settle_pending(self) -> None: ...

    def reclaim_locked(self) -> int: ...

    def release_empty_locked(self) -> int: ...


#: How often an allocation starts over after other processes took an index of its run.
ATTEMPTS = 100


class _Taken(Exception):
    """An index of the run was taken between two holds (the caller starts over)."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


def runs() -> weakref.WeakValueDictionary[tuple[int, int], object]:
    """An allocator's cache of mapped runs: (first arena, bytes) -> the run's owner."""
    return weakref.WeakValueDictionary()


# -- making ---------------------------------------------------------------------------------


def alloc(allocator: PageHeap, npages: int, deadline: float | None, slack: int = 0) -> int:
    """A new zeroed giant object of ``npages`` pages (more than an arena), ``slack`` bytes
    of its last page unused (its length is the rest); its ref."""
    heap = allocator.heap
    parts = -(-npages // allocator.pages_per_arena)
    if parts >= heap.max_arenas:
        raise InvalidParameterError(
            f"alloc: {npages << allocator.page_shift} bytes need {parts} arenas of "
            f"{heap.arena_size} bytes; heap {heap.name!r} holds at most {heap.max_arenas - 1}: "
            "create it with a larger max_arenas or arena_size")
    heap._check_writable("alloc()")
    if parts >= allocator._mapped.budget.limit:
        raise MappingLimitError(
            f"alloc: an object over {parts} arenas needs {parts} mappings at once; this "
            f"process may have {allocator._mapped.budget.limit}: raise the limit "
            f"({segments.MAX_MAPPINGS_VAR}, vm.max_map_count) or use larger arenas")
    taken: set[int] = set()
    for _ in range(ATTEMPTS):
        ref = _attempt(allocator, Giant(0, parts, npages), taken, deadline, slack)
        if ref is not None:
            return ref
    raise AddressSpaceExhaustedError(
        f"heap {heap.name!r}: other processes kept taking the arena indices chosen for an "
        f"object over {parts} arenas ({ATTEMPTS} times)")


def _attempt(allocator: PageHeap, giant: Giant, taken: set[int],
             deadline: float | None, slack: int) -> int | None:
    """Claim, grow and make the object (see the module docstring); None to start over."""
    heap = allocator.heap
    lock = allocator._lock
    first, missing, dirty = lock.run(lambda: _claim_locked(allocator, giant, taken), deadline,
                                     write=True)
    try:
        for pages, page_runs in dirty:
            for start, count in page_runs:
                pages.zero(start, count)
        if missing:
            segments.check_free_space(arena_name(heap.name, missing[0]), len(missing) * (
                arenas.segment_size(heap.arena_size, heap.params.page_size)))
        for index in missing:
            grow = functools.partial(_grow_locked, allocator, index=index,
                                     part=giant._replace(part=index - first))
            heap.build_arena(grow, deadline, "giant.segment_created")
        if lock.run(lambda: _make_locked(allocator, first, giant, slack), deadline, write=True):
            return first * heap.arena_size
    except _Taken as exc:
        taken.add(exc.index)
    except BaseException:
        with contextlib.suppress(ShmHeapError):  # else the next slow path gives them up
            lock.run(allocator._settle_pending, deadline, write=True)
        raise
    lock.run(allocator._settle_pending, deadline, write=True)
    return None


def _claim_locked(allocator: PageHeap, giant: Giant, taken: set[int]
                  ) -> tuple[int, list[int], list[tuple[ArenaPages, list[tuple[int, int]]]]]:
    """Step 1 (lock holder): find a run and claim its arenas; (first, missing, dirty runs)."""
    heap = allocator.heap
    heap._check_identity()
    if allocator._pending:
        allocator._settle_pending()
    run = _find_run(allocator, giant, taken)
    if run is None and allocator.reclaim_locked() + allocator.release_empty_locked():
        run = _find_run(allocator, giant, taken)
    if run is None:
        raise AddressSpaceExhaustedError(
            f"heap {heap.name!r}: no {giant.parts} consecutive arena indices are free, or "
            f"arenas with the free pages an object of {giant.total} pages needs; free "
            "objects, or create the heap with a larger max_arenas or arena_size")
    first, missing = run
    members = [(index, allocator.pages_of(index)) for index in range(first, first + giant.parts)
               if index not in missing]
    per = allocator.pages_per_arena
    # Released pages get their memory back first: a full /dev/shm fails before any change.
    dirty = [(pages, pages.prepare(0, giant._replace(part=index - first).part_pages(per),
                                   heap.params.reserve)) for index, pages in members]
    words = heap._words
    if missing and words[control.HINT_OFFSET // 8] <= missing[-1]:
        words[control.HINT_OFFSET // 8] = first + giant.parts
    if members:
        allocator._journal.begin(GIANT, first, giant.parts)
        token = allocator._token()
        for index, pages in members:
            _claim(allocator, pages, giant._replace(part=index - first), token)
        crash.reach("giant.claimed")
        allocator._journal.end()
    return first, missing, dirty


def _find_run(allocator: PageHeap, giant: Giant, taken: set[int]
              ) -> tuple[int, list[int]] | None:
    """The lowest run of ``giant.parts`` indices the object fits; (first, missing indices).

    A run starts only at an index with no arena or an arena with a long
    enough free run (the summaries find both without scanning); a run that
    fails at an index is looked for again past it.
    """
    heap = allocator.heap
    amap = heap._map
    assert amap is not None
    per = allocator.pages_per_arena
    free = allocator._summaries.free
    limit = heap.max_arenas

    def fits(index: int, need: int) -> bool:
        if index in taken:
            return False
        if index not in amap:
            return True
        if free.get(index) < min(need, CAP):
            return False
        return bytes(allocator.pages_of(index).used[:need]).count(0) == need

    def next_start(index: int) -> int:
        grown = amap.next_free(index, limit)
        reused = free.find(min(per, CAP), index)
        return min(grown if grown is not None else limit, reused if reused >= 0 else limit)

    first = next_start(1)
    while first + giant.parts <= limit:
        for part in range(giant.parts):
            index = first + part
            if not fits(index, giant._replace(part=part).part_pages(per)):
                first = next_start(index + 1)
                break
        else:
            return first, [i for i in range(first, first + giant.parts) if i not in amap]
    return None


def _claim(allocator: PageHeap, pages: ArenaPages, part: Giant, token: int) -> None:
    """Make ``part`` (its pages free and prepared) this process's (lock holder, journaled)."""
    allocator._pending.append((pages, 0))
    pages.set_giant(part)
    pages.publish(0, part.part_pages(pages.pages), 0, token)


def _grow_locked(allocator: PageHeap, seg: segments.Segment, index: int, part: Giant) -> int:
    """Step 2 (lock holder): link, publish and claim new arena ``seg`` at ``index``."""
    heap = allocator.heap
    assert heap._map is not None
    first = index - part.part
    heap.before_link()
    if index in heap._map or not heap.try_link(seg, index, (GIANT, first, part.parts)):
        raise _Taken(index)
    crash.reach("giant.segment_linked")
    heap.add_arena(index)
    _claim(allocator, heap.cache_new_arena(seg, index), part, allocator._token())
    crash.reach("giant.part_grown")
    allocator._journal.end()
    return index


def _make_locked(allocator: PageHeap, first: int, giant: Giant, slack: int) -> bool:
    """Step 3 (lock holder): disown every part, the first last; False if one is not ours.

    The first part's page 0 gets the object's slack and holder word (layout.py) first.
    """
    allocator.heap._check_identity()
    token = allocator._token()
    members = [allocator.pages_of(first + part) for part in range(giant.parts)]
    for part, pages in enumerate(members):
        if (pages.giant() != giant._replace(part=part) or not pages.in_use(0)
                or pages.owner[0] != token):
            return False
    allocator._journal.begin(GIANT, first, giant.parts)
    for pages in reversed(members[1:]):
        _disown(pages)
    crash.reach("giant.tail_disowned")
    members[0].set_mark(0)  # born marked, although claimed before a cycle that began since
    members[0].slack[0] = slack
    members[0].holder[0] = allocator._holder()
    _disown(members[0])
    crash.reach("giant.made")
    allocator._journal.end()
    allocator._pending[:] = ()
    return True


def drop_part_locked(allocator: PageHeap, pages: ArenaPages) -> bool:
    """Free a part whose maker gave it up or died (lock holder): it never was an object."""
    allocator._journal.begin(DISOWN, pages.index, 0)
    _free_part(pages)
    allocator._journal.end()
    return True


# -- made objects -----------------------------------------------------------------------------


def made(pages: ArenaPages) -> Giant | None:
    """The record of the made giant object whose first part arena ``pages`` holds, else None.

    The lock holder's answer; without the lock, a snapshot.
    """
    giant = pages.giant()
    if (giant is None or giant.part or not pages.in_use(0) or pages.owner[0]
            or pages.span_of(0) != (giant.part_pages(pages.pages), 0)):
        return None
    return giant


def free_locked(allocator: PageHeap, head: ArenaPages) -> int:
    """Free the made giant object whose first part is ``head`` in this one lock hold (a
    sweep, a lock holder's free); its pages, left DIRTY."""
    giant, members = _made_parts(allocator, head)
    allocator._journal.begin(GIANT, head.index, giant.parts)
    _free_part(head)
    crash.reach("giant.unpublished")
    for pages in members[1:]:
        _free_part(pages)
    crash.reach("giant.freed")
    allocator._journal.end()
    return giant.total


def take_back_locked(allocator: PageHeap, head: ArenaPages) -> Giant:
    """Step 1 of ``free`` (lock holder): own every part of the made object at ``head``
    again, the first first (it is gone then); its record.  ``release`` does the rest."""
    giant, members = _made_parts(allocator, head)
    if allocator._pending:
        allocator._settle_pending()
    token = allocator._token()
    allocator._journal.begin(GIANT, head.index, giant.parts)
    _take(allocator, head, token)
    crash.reach("giant.unpublished")
    for pages in members[1:]:
        _take(allocator, pages, token)
    crash.reach("giant.taken_back")
    allocator._journal.end()
    return giant


def release(allocator: PageHeap, head: ArenaPages, giant: Giant,
            deadline: float | None) -> None:
    """Steps 2 and 3 of ``free`` (no lock held): clear the pages of the parts taken back,
    then free the parts, their pages marked as cleared (see the module docstring)."""
    first = head.index
    reserve = allocator.heap.params.reserve
    try:
        for part in range(giant.parts):
            npages = giant._replace(part=part).part_pages(allocator.pages_per_arena)
            pages = allocator.pages_of(first + part)
            if reserve:
                pages.zero(0, npages)
            else:
                pages.punch(0, npages)
        crash.reach("giant.cleared")
        allocator._lock.run(lambda: _free_taken_locked(allocator, first, giant,
                                                       CLEAN if reserve else RELEASED),
                            deadline, write=True)
    except BaseException:
        with contextlib.suppress(ShmHeapError):  # else the next slow path gives them up
            allocator._lock.run(allocator._settle_pending, deadline, write=True)
        raise


def _free_taken_locked(allocator: PageHeap, first: int, giant: Giant, state: int) -> None:
    """Step 3 of ``free`` (lock holder): free the parts still ours, their pages ``state``."""
    allocator.heap._check_identity()
    token = allocator._token()
    allocator._journal.begin(GIANT, first, giant.parts)
    for part in range(giant.parts):
        pages = allocator.pages_of(first + part)
        if (pages.giant() == giant._replace(part=part) and pages.in_use(0)
                and pages.owner[0] == token):
            _free_part(pages, state)
    crash.reach("giant.freed")
    allocator._journal.end()
    allocator._pending[:] = ()


def _made_parts(allocator: PageHeap, head: ArenaPages) -> tuple[Giant, list[ArenaPages]]:
    """The record and the parts of the made object at ``head``, each checked (lock holder)."""
    giant = made(head)
    assert giant is not None, "a free of no made giant object"
    members = [head, *(allocator.pages_of(head.index + part)
                       for part in range(1, giant.parts))]
    for part, pages in enumerate(members):
        if pages.giant() != giant._replace(part=part) or not pages.in_use(0):
            raise pages.corrupt(f"part {part} of the object over arenas {head.index}.."
                                f"{head.index + giant.parts - 1} is damaged")
    return giant, members


def view(allocator: PageHeap, head: ArenaPages, size: int) -> memoryview:
    """The ``size`` bytes from arena ``head``'s start, its run of arenas mapped as one."""
    heap = allocator.heap
    key = (head.index, size)
    run = allocator._runs.get(key)
    if run is None:
        count = -(-size // heap.arena_size)
        allocator._mapped.make_room(count)
        run = arenas.map_run(heap.name, heap.params.heap_id, head.index, size, heap.arena_size,
                             heap.readonly, heap.params.page_size)
        allocator._mapped.track(run, count)
        allocator._runs[key] = run
    buf = memoryview(run).cast("B")  # type: ignore[arg-type]
    return buf.toreadonly() if heap.readonly else buf


# -- repair and fsck (lock holder) -------------------------------------------------------------


def settle(allocator: PageHeap, first: int, parts: int) -> str:
    """Finish or undo the giant object over arenas ``first``.. (repair of ``GIANT``, its
    arenas published and audited); what was done, "" if nothing."""
    heap = allocator.heap
    members = [(index, allocator.pages_of(index)) for index in range(first, first + parts)
               if index in heap]
    giant = made(members[0][1]) if members and members[0][0] == first else None
    done = giant is not None and giant.parts == parts
    changed = 0
    for index, pages in members:
        part = pages.giant()
        if part is None or part.first(index) != first or part.parts != parts:
            continue
        if done and pages.owner[0]:
            _disown(pages)
            changed += 1
        elif not done and pages.in_use(0):
            _free_part(pages)
            changed += 1
    if not changed:
        return ""
    where = f"arenas {first}..{first + parts - 1}"
    if done:
        return f"the giant object over {where} was being made; finished"
    return f"{changed} parts of a giant object over {where} were left half made or freed; freed"


def check(allocator: PageHeap, indices: Iterable[int],
          note: Callable[[str, str, bool], bool]) -> list[tuple[int, int]]:
    """fsck of the giant objects in arenas ``indices`` (lock holder; see the module docstring).

    Returns (first arena, parts) of each object it noted something about, so
    that a check of ``indices`` made without the lock (a trial, repair.py) is
    confirmed under it for those arenas only.

    Parts whose maker is alive are being made; those of a dead maker are
    garbage that the reclaim pass frees (repair.py: allocator.reclaim_locked).  Arenas
    are remembered by index, never held, so a heap of giant objects is
    checked within this process's mapping budget (arenas.py).
    """
    records: dict[int, Giant] = {}
    objects: dict[Giant, list[int]] = {}
    for index in indices:
        try:
            pages = allocator.pages_of(index)
        except HeapCorruptError:
            continue  # a lost arena: the index checks report it
        giant = pages.giant()
        if giant is not None and pages.in_use(0):
            records[index] = giant
            whole = Giant(giant.first(index), giant.parts, giant.total)  # part: its first arena
            objects.setdefault(whole, []).append(index)
    writable = not allocator.readonly
    noted: list[tuple[int, int]] = []
    for whole, members in objects.items():
        first = whole.part
        giant = whole._replace(part=0)
        where = (f"the giant object at {first * allocator.arena_size:#x} (arenas {first}.."
                 f"{first + giant.parts - 1})")
        if first not in records or made(allocator.pages_of(first)) != giant:
            unowned = [i for i in members if not allocator.pages_of(i).owner[0]]
            if unowned:
                noted.append((first, giant.parts))
                if note("giant-orphaned", f"{len(unowned)} parts of {where} are left without a "
                        "maker, and its first part is not made (a holder stopped making or "
                        "freeing it)", writable):
                    _change(allocator, first, giant.parts, unowned, _free_part)
            continue
        lacking = [part for part in range(giant.parts)
                   if records.get(first + part) != giant._replace(part=part)]
        if lacking:
            noted.append((first, giant.parts))
            note("giant-broken", f"{where} lacks its parts {lacking[:5]}", False)
        owned = [i for i in members if allocator.pages_of(i).owner[0]]
        if owned:
            noted.append((first, giant.parts))
            if note("giant-unfinished", f"{where} is made, but {len(owned)} of its parts are "
                    "still owned by its maker", writable):
                _change(allocator, first, giant.parts, owned, _disown)
    return noted


def _free_part(pages: ArenaPages, state: int = DIRTY) -> None:
    pages.release(0, state)
    pages.set_giant(None)


def _take(allocator: PageHeap, pages: ArenaPages, token: int) -> None:
    """Own a part of a made object again, as its maker did (lock holder, journaled)."""
    allocator._pending.append((pages, 0))
    allocator._summaries.owned.mark(pages.index)
    pages.owner[0] = token


def _disown(pages: ArenaPages) -> None:
    pages.owner[0] = 0


def _change(allocator: PageHeap, first: int, parts: int, members: list[int],
            change: Callable[[ArenaPages], None]) -> None:
    """``change`` the arenas ``members``, parts of the object over ``first``.. (journaled)."""
    allocator._journal.begin(GIANT, first, parts)
    for index in members:
        change(allocator.pages_of(index))
    allocator._journal.end()
