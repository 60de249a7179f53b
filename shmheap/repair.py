"""Checking and repairing a heap: ``heap.check()``, ``shmheap fsck``, crash recovery.

``check()`` never holds the heap lock for long (``check_heap``).  It runs in
pieces: the heap's head (the semaphore, header, journal and hint: a few
words, and one copy of the index) under one short hold; then the index
generations, the entries, the arena map, each arena, the objects under the
heap's name, each summary tree, the giant objects, the roots table and each
arena's root counts as a piece of its own.
Such a piece first runs with no lock at all, as a *trial*: published arenas
never go away, so the worst a trial can meet is a change in progress, which
looks like a finding (or an exception).  A clean trial is the answer; a
suspect one runs again under the lock, and that answer counts.  So on a
healthy heap a check takes the lock once, for microseconds, and a piece
that must be confirmed holds it for one arena's audit (or one tree, or the
roots table).  Before every hold the checker yields to a waiting writer
(lock.py, fairness), so a looping ``check()`` cannot starve writers.  With
``repair`` the same: a trial finds what to fix, the locked run fixes it (a
confirmation fixes what it finds; a trial never writes).

A finding is the state now: a lock adopted from a dead holder is a recovery
made (``info().recoveries``), not a finding, and hints that heal themselves
(a stale node of the owned or partial summaries, summary.py) are not
reported either.

Every mutation under the lock publishes last and names itself
in the control segment's journal first (control.py), so what it can leave
is known from the journal alone, and ``repair_journal`` mends exactly that,
in time independent of the heap's size:

==============  ===========================================================
journal op      what may be left, and what repair does
==============  ===========================================================
``GROW(i)``     arena i linked but never published -> unlinked (only if its
                trailer names this heap and index i and the map lacks it);
                published but its map bit unset -> set; an index generation
                newer than the header's -> unlinked
``PAGES(i)``    arena i's page metadata half changed: used pages no span
                holds, an odd span sequence word -> ``pages.audit`` fixes
``DISOWN(i,p)`` the span at page p half given up -> audit, then disowned
``ROOTS``       a root half bound or unbound -> finished or undone from the
                roots segment's intent record (roots.py)
``GIANT(s,k)``  a giant object over arenas s..s+k-1 half claimed, grown, made
                or freed -> its arenas as for ``GROW``, their page metadata
                audited, then the object finished if its first part is made,
                else every part of it freed (giant.py)
``COORD(r)``    queue, event, counter or barrier r half changed -> the words
                it saved in the coordination intent restored, the node a
                half-done put was linking freed (coord.py)
anything else  the journal itself is garbage -> a full check with repair
==============  ===========================================================

Every writable lock holder that finds the journal dirty calls
``repair_journal`` before its own critical section (lock.py), whoever left
it dirty: a process killed, one whose Ctrl-C interrupted it, one whose
system call failed, or a read-only process that adopted a dead holder's
lock and could not write.  ``fsck --repair`` runs the same function.

``check(full=True)`` (fsck) also verifies every invariant: the header's
bounds, every generation's size and contents, every entry being a real arena
of this heap with the right size and trailer, no duplicates, the arena map
agreeing with the index, the hint's range, the page metadata of every arena,
the roots table and the root counts of objects (roots.py), and the
semaphore's count.  On the way it recycles the slots of processes
that exited without closing and (with repair) returns the spans they cached:
both are ordinary garbage, never a finding.

Repair never acts on evidence it cannot trust: a file under the heap's name
that is not a regular file of this user is only reported (foreign-object);
an arena whose trailer names this heap is removed as an unpublished orphan
only if its map bit is clear and nothing fatal was found, else it is kept,
data and all (arena-unlisted, fatal).

A finding that repair cannot fix (a published arena whose segment is gone,
an impossible header, an arena the index lost) marks the heap BROKEN: the state word says so and the
header word is replaced by a poison value (the real one is saved beside it),
so every later snapshot, grow and attach raises HeapCorruptError until
``fsck --repair`` restores it or the heap is destroyed.

This module owns the checks and fixes.  Its functions are called with the
lock held, except ``check_heap``, which takes it piece by piece through the
heap's ``HeapLock``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import arenas, control, coord, giant, roots, segments
from .allocator import Note, audit_arena, check_summary_tree, summary_trees
from .control import ARENA_OPS, COORD, DISOWN, GIANT, GROW, MAX_GENERATIONS, PAGES, ROOTS
from .errors import HeapCorruptError, ShmHeapError
from .index import BROKEN_GENERATION, ENTRY_SIZE
from .lock import HeapLock
from .names import (
    arena_name,
    control_name,
    coord_name,
    index_name,
    live_name,
    map_name,
    owns,
    roots_name,
    summary_name,
)

if TYPE_CHECKING:
    from .allocator import Allocator
    from .attached import AttachedHeap
    from .roots import RootTable
    from .summary import ByteTree



@dataclass(frozen=True)
class Finding:
    """One problem found by a check, and whether it was fixed."""

    code: str
    message: str
    fixed: bool = False
    fatal: bool = False

    def as_dict(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message, "fixed": self.fixed,
                "fatal": self.fatal}


@dataclass(frozen=True)
class HeapParts:
    """What checks and repairs work on: a heap handle's allocator, which carries the
    attached heap (attached.py), and its roots table (roots.py)."""

    allocator: Allocator
    roots: RootTable
    #: the coordination segment (coord.py), opened on first use
    coordination: Callable[[], coord.CoordTable] | None = None

    @property
    def heap(self) -> AttachedHeap:
        return self.allocator.heap


#: What a lock-free trial of a piece may raise when it meets a change in progress.
_TRIAL_ERRORS = (ShmHeapError, IndexError, ValueError, OverflowError)
#: How often the roots piece's trial runs again when the table changed under it.
ROOTS_TRIALS = 3

_Step = Callable[[], object]


class _Checker:
    """One check of a heap: ``run`` with the lock held, or ``run_in_pieces``."""

    def __init__(self, parts: HeapParts, repair: bool, full: bool) -> None:
        self.parts = parts
        self.heap = heap = parts.heap
        self.name = heap.name
        self.repair = repair
        self.full = full
        self.findings: list[Finding] = []
        self.words = heap._words
        #: the index as the head piece found it: (generation, entries); None if unusable
        self.head: tuple[int, list[int]] | None = None
        #: set while a piece runs under the lock (a confirmation); only then is anything fixed
        self.confirming = True
        #: set by a trial that found nothing to report but something a repair heals
        self.suspect = False
        #: the refs roots are bound to (None: the table is unusable, a fatal finding), and the
        #: roots table's seq word they were read under
        self._bound: tuple[set[int] | None, int] | None = None
        #: what the last trial of a piece suspected: entries of /dev/shm, giant objects
        self._suspect_entries: set[str] = set()
        self._suspect_giants: list[tuple[int, int]] = []

    def note(self, code: str, message: str, fixable: bool = True, harmless: bool = False) -> bool:
        """Record a finding; True if the caller should fix it now.

        A finding that cannot be fixed is fatal (the heap gets marked broken by
        a repair) unless it is ``harmless``: something repair must leave alone
        but the heap can live with, such as a foreign file under its name.
        """
        fix = self.repair and fixable and self.confirming
        self.findings.append(Finding(code, message, fixed=fix,
                                     fatal=not fixable and not harmless))
        return fix

    def writable(self) -> bool:
        return not self.heap.readonly

    def run(self) -> list[Finding]:
        """Every check at once; the caller holds the lock."""
        for _locked_only, step in self.steps():
            step()
        return self.findings

    def run_in_pieces(self, lock: HeapLock, deadline: float | None) -> list[Finding]:
        """Every check, piece by piece: a trial with no lock, confirmed under it if suspect."""
        def locked(step: _Step) -> None:
            lock.yield_to_waiters()
            self.confirming = True
            lock.run(step, deadline, write=self.repair)

        for locked_only, step in self.steps():
            if locked_only or self._trial(step):
                locked(step)
        if self.repair and any(f.fatal for f in self.findings):
            locked(functools.partial(mark_broken, self.heap))
        return self.findings

    def _trial(self, step: _Step) -> bool:
        """Run ``step`` with no lock; True if it is suspect (a finding, or an exception)."""
        kept, self.findings = self.findings, []
        self.confirming = self.suspect = False
        try:
            step()
        except _TRIAL_ERRORS:
            return True
        finally:
            suspect, self.findings = self.findings, kept
        return bool(suspect) or self.suspect

    def steps(self) -> Iterator[tuple[bool, _Step]]:
        """The pieces of a check, in order: (needs the lock even to look, the piece).

        The consumer runs each piece before it asks for the next: later
        pieces depend on what the head piece found.
        """
        yield True, self.check_head
        if self.head is None:
            return
        generation, entries = self.head
        yield False, functools.partial(self.check_generations, generation, len(entries))
        yield False, functools.partial(self.check_entries, entries)
        yield False, functools.partial(self.check_map, entries)
        for index in entries:
            yield False, functools.partial(self.check_arena, index)
        yield False, self.check_foreign_objects
        allocator = self.parts.allocator
        lost = any(f.code == "arena-lost" for f in self.findings)
        if self.full and not lost:
            for tree_name, tree in summary_trees(allocator):
                yield False, functools.partial(self.check_tree, tree_name, tree)
            yield False, self.check_giants
        yield False, self.check_roots
        if self.full:
            for index in entries:
                yield False, functools.partial(self.check_root_counts, index)
        if self.parts.coordination is not None:
            yield True, self.check_coordination
        if self.repair and self.writable() and not lost:
            yield True, allocator.reclaim_locked

    # -- the pieces -------------------------------------------------------------------

    def check_head(self) -> None:
        """Semaphore, header, journal and hint, and a copy of the index; dead slots recycled."""
        live = self.heap._live
        assert live is not None
        live.recycle_dead_slots()
        self.check_semaphore()
        if self.check_header() is None:
            self.head = None
            return
        self.check_journal()
        generation, length = self.heap._index.check_header(int(self.heap._header[0]))
        self.check_hint()
        self.head = generation, list(self.heap._index.generation(generation)[:length])

    def check_arena(self, index: int) -> None:
        """A published arena: its segment and trailer, then its page metadata."""
        heap = self.heap
        if self.full:
            if not 1 <= index < heap.max_arenas:
                return  # check_entries reported it
            try:
                arenas.verify_arena(self.name, heap.params.heap_id, index, heap.arena_size,
                                    heap.params.page_size)
            except ShmHeapError as exc:
                self.note("arena-lost", f"published arena {index}: {exc}", fixable=False)
                return
        audit_arena(self.parts.allocator, index, self.note, heal=self.repair and self.confirming)

    def check_tree(self, tree_name: str, tree: ByteTree) -> None:
        allocator = self.parts.allocator
        heals = check_summary_tree(allocator, set(allocator.snapshot_locked()), tree_name, tree,
                                   self.note, self.repair and self.confirming)
        self.suspect |= heals and self.repair

    def check_giants(self) -> None:
        """The giant objects: every arena in a trial, the suspect objects' when confirming."""
        allocator = self.parts.allocator
        snap = allocator.snapshot_locked()
        if self.confirming and self._suspect_giants:
            published = set(snap)
            indices: list[int] = sorted({i for first, parts in self._suspect_giants
                                         for i in range(first, first + parts) if i in published})
            giant.check(allocator, indices, self.note)
        else:
            self._suspect_giants = giant.check(allocator, snap, self.note)

    def check_roots(self) -> None:
        """The roots table, its counters, and the root counts of the objects it names.

        A trial runs again while the table changed under it (every bind and
        unbind moves its region's sequence word, roots.py).
        """
        table = self.parts.roots
        allocator = self.parts.allocator
        for _ in range(1 if self.confirming else ROOTS_TRIALS):
            kept = len(self.findings)
            seq = roots.sequence(table)
            bound = roots.check(table, allocator, self.repair, False, self.note)
            steady = seq % 2 == 0 and roots.sequence(table) == seq
            if steady:
                self._bound = bound, seq
            if self.confirming or steady or len(self.findings) == kept:
                return
            del self.findings[kept:]
        raise HeapCorruptError("the roots table kept changing")  # a suspect trial

    def check_root_counts(self, index: int) -> None:
        """Objects of arena ``index`` that count roots although none is bound to them."""
        table = self.parts.roots
        seq = roots.sequence(table)
        if self._bound is None or self._bound[1] != seq:  # read again once it changed
            self._bound = roots.bound_refs(table), seq
        bound = self._bound[0]
        if bound is not None:  # (an unusable table is the roots piece's finding)
            roots.check_unbound_counts(self.parts.allocator, bound, self.note,
                                       self.repair and self.writable(), [index])

    def check_coordination(self) -> None:
        """The queues, events, counters and barriers (coord.py): 256 records, one hold."""
        coordination = self.parts.coordination
        if coordination is not None:
            coord.check(coordination(), self.repair, self.note)

    def check_semaphore(self) -> None:
        """The lock is held by us, so the semaphore's count must be 0 (2 after a robbery)."""
        lock = self.heap._lock
        assert isinstance(lock, HeapLock)
        extra = lock.semaphore_value()
        if extra and self.note("semaphore-count", f"the lock's semaphore has count {extra} "
                               "while held: two processes could hold the lock at once"):
            for _ in range(extra):
                lock.drain_one()

    def check_journal(self) -> None:
        """A mutation left unfinished: repaired with repair (also done on any writer's lock)."""
        entry = self.heap._journal.read()
        if entry is None:
            return
        if self.repair and self.writable():
            self.findings.extend(repair_journal(self.parts))
        else:
            self.note("journal", f"{_describe(entry)} was left unfinished; the next writable "
                      "lock holder (or `shmheap fsck --repair`) repairs it", fixable=False,
                      harmless=True)

    def check_header(self) -> tuple[int, int] | None:
        heap = self.heap
        word = int(heap._header[0])
        state = control.read_state(heap._control.buf)
        if state == control.BROKEN:
            saved = int(self.words[control.SAVED_HEADER_OFFSET // 8])
            if self.note("heap-broken", "the heap is marked broken by an earlier repair",
                         fixable=self.writable()):
                word = saved
        try:
            generation, length = heap._index.check_header(word)
            heap._index.generation(generation)
        except ShmHeapError as exc:
            self.note("header", f"index header unusable: {exc}", fixable=False)
            return None
        if state == control.BROKEN and self.repair and self.writable():
            heap._header[0] = word
            control.write_state(heap._control.buf, control.READY)
        return generation, length

    def check_generations(self, generation: int, length: int) -> None:
        index = self.heap._index
        current = index.generation(generation)
        for older in range(generation):
            cap = index.capacity(older)
            seg_name = index_name(self.name, older)
            size = segments.size_of(seg_name)
            if size != cap * ENTRY_SIZE:
                replaceable = self.writable() and not self._foreign(seg_name)
                if self.note("generation-missing",
                             f"index generation {older} is missing or has {size} bytes",
                             fixable=replaceable):
                    segments.unlink(seg_name)
                    seg = segments.create(seg_name, cap * ENTRY_SIZE, self.heap.params.mode)
                    seg.buf.cast("I")[:] = current[:cap]
                    seg.close()
            elif self.full:
                entries = index.generation(older)
                if entries[:cap] != current[:cap]:
                    self.note("generation-differs",
                              f"index generation {older} disagrees with generation "
                              f"{generation} on published entries", fixable=False)

    def check_entries(self, entries: list[int]) -> None:
        """Duplicates and ranges of the index's entries (each arena is ``check_arena``'s)."""
        in_index = set(entries)
        if not self.full:
            return
        if len(in_index) != len(entries):
            self.note("duplicate-entries",
                      f"the index lists {len(entries) - len(in_index)} arenas twice",
                      fixable=False)
        for position, index in enumerate(entries):
            if not 1 <= index < self.heap.max_arenas:
                self.note("entry-range", f"index entry {position} is {index}, outside "
                          f"[1, {self.heap.max_arenas})", fixable=False)

    def check_map(self, entries: list[int]) -> None:
        """The arena map against the index (read whole: one pread per extent).

        A confirmation reads the index again: a live grower may have
        published arenas since the head piece.
        """
        heap = self.heap
        if self.confirming and self.head is not None:
            generation, length = heap._index.header()
            entries = list(heap._index.generation(generation)[:length])
        amap = arenas.ArenaMap(self.name, heap.max_arenas,
                               readonly=not (self.repair and self.confirming))
        try:
            members = set(amap.members())
            to_check = entries if self.full else entries[-1:]
            for index in to_check:
                if 1 <= index < heap.max_arenas and index not in members and self.note(
                        "map-missing", f"arena {index} is in the index but not in the map"):
                    amap.add(index)
            if self.full:
                in_index = set(entries)
                for index in sorted(members - in_index):
                    self.note("map-extra", f"the map lists arena {index}, the index does "
                              "not", fixable=False)
        finally:
            amap.close()

    def check_foreign_objects(self) -> None:
        """Objects under the heap's name that no published state refers to.

        The index is read afresh, so that under the lock (a confirmation) an
        arena a live grower published since the trial is no orphan.
        """
        generation, length = self.heap._index.header()
        in_index = set(self.heap._index.generation(generation)[:length])
        if self.confirming and self._suspect_entries:  # only what the trial suspected
            listed = [e for e in sorted(self._suspect_entries) if segments.lstat(e) is not None]
        else:
            listed = segments.list_all()
        suspects: set[str] = set()
        known = {control_name(self.name), live_name(self.name), map_name(self.name),
                 summary_name(self.name), roots_name(self.name), coord_name(self.name)}
        known.update(index_name(self.name, g) for g in range(generation + 1))
        pattern = re.compile(
            rf"shmheap\.{re.escape(self.name)}\.(a([0-9a-f]+)|i(\d+)|new([0-9a-f]+))")
        for entry in listed:
            if not owns(self.name, entry) or entry in known or entry.startswith("sem."):
                continue
            noted = len(self.findings)
            self._check_object(entry, pattern, in_index)
            if len(self.findings) != noted:
                suspects.add(entry)
        if not self.confirming:
            self._suspect_entries = suspects

    def _check_object(self, entry: str, pattern: re.Pattern[str], in_index: set[int]) -> None:
        """One entry of /dev/shm under the heap's name that is none of its known parts."""
        live = self.heap._live
        assert live is not None
        match = pattern.fullmatch(entry)
        index = int(match.group(2), 16) if match and match.group(2) else -1
        if index in in_index and arena_name(self.name, index) == entry:
            return  # a published arena: check_arena verified it
        if match is None or (index >= 0 and arena_name(self.name, index) != entry):
            self.note("foreign-object", f"/dev/shm/{entry} is not an object shmheap "
                      "makes; remove it by hand if it is not yours", fixable=False,
                      harmless=True)
        elif self._foreign(entry):
            return
        elif match.group(4) is not None:
            slot = int(match.group(4), 16)
            if slot < live.nslots and live.slot_alive(slot):
                return  # a live process is building an arena there right now
            if self.note("unpublished", f"/dev/shm/{entry} is a new arena that was never "
                         "linked (its maker died while growing the heap)"):
                segments.unlink(entry)
        elif match.group(3) is not None:
            if self.note("unpublished", f"/dev/shm/{entry} is an index generation that "
                         "was never published (its maker died while doubling the index)"):
                segments.unlink(entry)
        elif not _is_ours(self.heap, index):
            self.note("foreign-object", f"/dev/shm/{entry} occupies the name of arena "
                      f"{index} but is not this heap's; grow() skips it", fixable=False,
                      harmless=True)
        elif index in self.heap or any(f.fatal for f in self.findings):
            # Published once (its map bit is set), or the index that leaves it out is
            # not to be trusted: its data may be live.  Never delete it.
            self.note("arena-unlisted", f"/dev/shm/{entry} is arena {index} of this heap "
                      "(its trailer says so) but the index does not list it; repair keeps "
                      "it, with its data, and marks the heap broken. Copy what you need "
                      f"out of it (its first {self.heap.arena_size} bytes are the arena's "
                      f"data), then `shmheap destroy {self.name}`", fixable=False)
        elif self.note("orphan-arena", f"arena {index} was made but never published "
                       "(its maker died)"):
            segments.unlink(entry)

    def _foreign(self, entry: str) -> bool:
        """Note and return True if ``entry`` is nothing this user's shmheap can have made."""
        try:
            segments.check_own(entry)
        except ShmHeapError as exc:
            self.note("foreign-object", f"{exc}", fixable=False, harmless=True)
            return True
        return False

    def check_hint(self) -> None:
        hint = int(self.words[control.HINT_OFFSET // 8])
        if not 1 <= hint <= self.heap.max_arenas and self.note(
                "hint-range", f"the hint {hint} is outside [1, {self.heap.max_arenas}]",
                fixable=self.writable()):
            self.words[control.HINT_OFFSET // 8] = 1


def mark_broken(heap: AttachedHeap) -> None:
    """Poison the header (saving it) and set state BROKEN; lock holder, writable heap."""
    if heap.readonly:
        return
    if control.read_state(heap._control.buf) != control.BROKEN:
        heap._words[control.SAVED_HEADER_OFFSET // 8] = heap._header[0]
    control.write_state(heap._control.buf, control.BROKEN)
    heap._header[0] = control.make_header(BROKEN_GENERATION, 0)


def check_heap(parts: HeapParts, repair: bool, lock: HeapLock,
               deadline: float | None) -> list[Finding]:
    """Check (and with ``repair`` fix) the heap in pieces, taking ``lock`` only briefly."""
    return _Checker(parts, repair, True).run_in_pieces(lock, deadline)


def _describe(entry: tuple[int, int, int]) -> str:
    """What the journal entry ``(op, arena, arg)`` says was being done, in words."""
    op, arena, arg = entry
    if op == GROW:
        return f"adding arena {arena}"
    if op == PAGES:
        return f"a change to the page metadata of arena {arena}"
    if op == DISOWN:
        return f"giving up the cached span at page {arg} of arena {arena}"
    if op == ROOTS:
        return "binding or unbinding a root"
    if op == GIANT:
        return f"a change to the giant object over arenas {arena}..{arena + arg - 1}"
    if op == COORD:
        return f"{coord.OP_NAMES.get(arg, 'changing')} coordination record {arena}"
    return f"an unknown mutation (journal op {op}, arena {arena})"


def repair_journal(parts: HeapParts) -> list[Finding]:
    """Finish or undo the mutation the journal names (writable lock holder); clear it.

    Returns what was fixed.  A heap marked broken is left to ``fsck
    --repair``, which restores its header first.  An error while fixing
    (a full /dev/shm) leaves the journal dirty for the next holder; a state
    that cannot be fixed marks the heap broken and raises HeapCorruptError.
    """
    heap = parts.heap
    entry = heap._journal.read()
    if entry is None or heap.readonly or control.read_state(heap._control.buf) == control.BROKEN:
        return []
    op, arena, arg = entry
    fix = _JOURNAL_FIXES.get(op)
    if fix is None or (op in ARENA_OPS and not 1 <= arena < heap.max_arenas) or (
            op == GIANT and not 2 <= arg <= heap.max_arenas - arena):
        heap._journal.end()  # it names nothing real: check everything instead
        findings = _Checker(parts, repair=True, full=True).run()
    else:
        findings = fix(parts, arena, arg)
        heap._journal.end()
    fatal = [f.message for f in findings if f.fatal]
    if fatal:
        mark_broken(heap)
        raise HeapCorruptError(
            f"heap {heap.name!r} could not be repaired after {_describe(entry)} was left "
            f"unfinished: {'; '.join(fatal)}. Run `shmheap fsck --repair {heap.name}` or "
            "destroy the heap")
    live = heap._live
    assert live is not None
    live.count_repair()
    return [Finding("journal", f"{_describe(entry)} was left unfinished and is repaired",
                    fixed=True), *findings]


def _finish_grow(parts: HeapParts, index: int, _arg: int,
                 journaled: bool = True) -> list[Finding]:
    heap = parts.heap
    findings = []
    generation, length = heap._index.header()
    entries = heap._index.generation(generation)
    amap = heap._map
    assert amap is not None
    if length and entries[length - 1] == index:
        if index not in amap:
            amap.add(index)
            findings.append(Finding("grow-unfinished", f"arena {index} was published but "
                                    "not yet in the arena map; added", fixed=True))
        findings += _audit_pages(parts, index, 0, journaled)  # its leaf in the free summary too
    elif index not in amap and _is_ours(heap, index):
        segments.unlink(arena_name(heap.name, index))
        findings.append(Finding("grow-unfinished", f"arena {index} was linked but never "
                                "published; removed", fixed=True))
    newer = generation + 1
    if newer < MAX_GENERATIONS and _remove_own(index_name(heap.name, newer)):
        findings.append(Finding("grow-unfinished", f"index generation {newer} was made but "
                                "never published; removed", fixed=True))
    return findings


def _fixing() -> tuple[list[Finding], Note]:
    """A list of findings and the ``note`` of a repair that fixes what it can, into it."""
    findings: list[Finding] = []

    def note(code: str, message: str, fixable: bool = True) -> bool:
        findings.append(Finding(code, message, fixed=fixable, fatal=not fixable))
        return fixable

    return findings, note


def _audit_pages(parts: HeapParts, index: int, _arg: int,
                 journaled: bool = True) -> list[Finding]:
    findings, note = _fixing()
    audit_arena(parts.allocator, index, note, journaled, heal=True)
    return findings


def _finish_giant(parts: HeapParts, first: int, count: int) -> list[Finding]:
    """The journal still says ``GIANT`` until this is done (a repair stopped is run again)."""
    findings = []
    for index in range(first, first + count):
        if index in parts.heap:
            findings += _audit_pages(parts, index, 0, journaled=False)
        else:  # grown in the step stopped, or never: as GROW's repair (audited if published)
            findings += _finish_grow(parts, index, 0, journaled=False)
    done = giant.settle(parts.allocator, first, count)
    if done:
        findings.append(Finding("giant-unfinished", done, fixed=True))
    return findings


def _finish_disown(parts: HeapParts, index: int, start: int) -> list[Finding]:
    findings = _audit_pages(parts, index, start)
    allocator = parts.allocator
    pages = allocator.pages_of(index)
    if 0 <= start < pages.pages and pages.in_use(start) and pages.owner[start]:
        allocator.disown_locked(pages, start)
        findings.append(Finding("disown-unfinished", f"the span at page {start} of arena "
                                f"{index} was being given up; done", fixed=True))
    return findings


def _finish_roots(parts: HeapParts, _arena: int, _arg: int) -> list[Finding]:
    findings, note = _fixing()
    roots.finish(parts.roots, parts.allocator, note)
    return findings


def _undo_coord(parts: HeapParts, _record: int, _op: int) -> list[Finding]:
    if parts.coordination is None:
        return [Finding("coord-unfinished", "a change to a queue, event, counter or barrier "
                        "was left unfinished; a writable handle undoes it", fatal=True)]
    return [Finding("coord-unfinished", parts.coordination().undo(), fixed=True)]


_JOURNAL_FIXES: dict[int, Callable[[HeapParts, int, int], list[Finding]]] = {
    GROW: _finish_grow, PAGES: _audit_pages, DISOWN: _finish_disown,
    ROOTS: _finish_roots, GIANT: _finish_giant, COORD: _undo_coord}


def _remove_own(name: str) -> bool:
    """Remove this user's leftover ``name``; a foreign file there is left for fsck to report."""
    try:
        return segments.remove_own(name)
    except ShmHeapError:
        return False


def _is_ours(heap: AttachedHeap, index: int) -> bool:
    """True if the segment named for arena ``index`` is a complete arena of this heap."""
    try:
        arenas.verify_arena(heap.name, heap.params.heap_id, index, heap.arena_size,
                            heap.params.page_size)
    except ShmHeapError:
        return False
    return True
