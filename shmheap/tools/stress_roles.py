"""The worker side of ``shmheap stress``: the roles a worker process plays, and its main loop.

Each worker is a process forked from a warm ``multiprocessing`` forkserver
that has imported shmheap (stress.py) and started with ``worker_main``; it
attaches the run's heap and plays one role:

``writer``
    loops ``heap.grow()`` (one time in ``1/AT_EVERY`` it asks for a random
    index with ``grow(at=...)``, as Go's hints land anywhere, and counts the
    collisions) and reports the indices it made.  It then *claims* an arena:
    ``heap.alloc(arena_size)``, an object that takes a whole arena, so it can
    only start at the base of an arena with every page free (usually the one
    just grown).  It stamps the object's first 16 bytes with ``STAMP_MAGIC``
    and the arena's index (two aligned u64 stores, the index first, so a
    reader that sees the magic sees the index) and keeps it for the whole
    run.  The stamp lives in an object because arena memory belongs to the
    allocator: a stamp written into a bare arena would be taken for span
    metadata, or overwritten by objects, once churners allocate there.
    Writers are paced by default: together they fill the heap's ``max_arenas``
    evenly over the run, so growth (and kills in the middle of it) lasts the
    whole run; ``paced=False`` (``--flat-out``) grows as fast as it can.  The
    cap exists because every reader maps every arena, and each mapping costs a
    file descriptor (Python's mmap keeps one) and one of vm.max_map_count; it
    is ``DEFAULT_ARENAS`` unless given, because a claim (and a churner's
    span refill) looks for free pages arena by arena under the heap lock.
``churner``
    loops over the allocator (mimalloc's test-stress): allocates objects of
    mixed sizes (mostly 16 B-4 KiB, ``LARGE_SHARE`` of them up to a quarter
    of an arena), checks each new object reads zero, fills it with
    ``pattern(ref)`` (its address, repeated), holds at most ``MAX_HELD`` and
    gives up random ones, checking the pattern first.  A share of those is
    handed to another churner through the parent (``Handoff``), which adopts
    it (``heap.adopt``: a ref passed as a plain int is still its maker's, and
    a reclaim after its maker's death would free it), checks and frees it;
    the rest it frees itself.
``reader``
    attached ``readonly=True``, loops ``heap.snapshot()`` and walks every
    entry: each snapshot must extend the previous one (published entries never
    change) and hold no duplicate, and an arena that carries the stamp's magic
    must carry its own index (it maps ``MAP_STEP`` new arenas per step, so a
    new reader of a big heap checks their stamps over its first steps).  An
    arena without the magic is not checked (no writer claimed it, or its
    writer has not stamped it yet).  It also walks
    the heap, ``WALK_STEP`` spans per step (a whole walk of a big heap takes
    longer than a reader lives under a kill loop), and after each whole walk
    runs ``heap.stats()``; it checks what concurrent churn cannot break: every
    walked span and object lies inside its arena and span, and the stats'
    totals agree with each other and with the snapshots around them.  A new
    walk starts ``WALK_INTERVAL`` seconds after the last one began.

``mover``
    moves work items through the heap's queues (coord.py): a step either puts
    a new item, its id ``wid << 32 | seq``, on queue ``WORK_QUEUE`` (reporting
    the id to the parent once the put returned), or leases the head item of
    ``WORK_QUEUE`` and puts it on ``DONE_QUEUE`` inside the lease.  Killed
    anywhere, it loses nothing: a half-done put never happened, a leased item
    goes back to the head, and an item it put on ``DONE_QUEUE`` before its
    lease ended is delivered again (``DONE_QUEUE`` then holds it twice).  The
    parent accounts for every id at the end (stress.py).

A worker counts its operations and checks in its slot of the run's tally
(stress_tally.py) as it does them, so a worker killed after a few
operations still counts what it did and verified.  The stop signal is an
event of the heap itself (``STOP_EVENT``, coord.py): the parent sets it and
every worker looks at it after each step (the parent also says stop on the
pipes, to wake a worker that pauses).  Everything else goes over its pipe:
workers talk to the parent over one pipe each rather than a
shared queue: a worker SIGKILLed while writing to a shared queue would
corrupt it for all, while a torn message on its own pipe only ends that pipe.  The parent sends
``Go``, ``Handoff`` (to churners) and ``"stop"``; a worker sends ``"ready"``,
then the indices of the arenas it made after every step that made one (so a
SIGKILL loses at most the arena of the step it interrupts), the objects a
churner hands on (``Handoff``, in batches), a ``WorkerReport`` (latency
samples, violation examples) every ``REPORT_INTERVAL`` seconds, and a final
one (with the objects it holds).  The
parent relays each handoff to a random other running churner (back to the
sender if it is the only one); handoffs it cannot deliver (the run is
stopping, or every churner is ``MAX_IN_FLIGHT`` objects behind) it keeps,
and checks and frees at the end.  A handoff relayed to a churner that is
then killed is lost in flight: its objects stay allocated until the parent's
next ``heap.reclaim()`` (stress.py).

Test hook: with ``SHMHEAP_STRESS_BREAK_CHECK=1`` in the environment, readers
expect the stamp ``index + 1`` and churners the pattern of ``ref + 1``, so
every stamp and pattern check fails and the run must exit 1.  It proves that
both checkers can fail.

Adding a role: a ``Role`` subclass (``kind``, ``readonly``, ``COUNTERS``,
``step()``, and ``outgoing()``/``receive()``/``finish()`` if it sends or
takes messages or holds objects), an entry in ``ROLES``, a count in
``StressConfig.roles()`` (plus its option) and its coverage floors in
stress.py's ``FLOORS``.

This module owns the roles, what each one checks, the statistics a worker
keeps (``Reservoir``, ``WorkerReport``) and the worker's side of the pipe.  It
uses the heap only through the public API (``Heap``, ``grow``, ``alloc``/
``free``/``adopt``/``view``/``walk``/``stats``; from allocator.py only ``ALIGN``).
"""

from __future__ import annotations

import itertools
import math
import os
import queue
import random
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import ClassVar

from .. import core, segments
from ..allocator import ALIGN
from ..coord import Event
from ..errors import (
    AddressSpaceExhaustedError,
    ArenaCollisionError,
    OutOfSharedMemoryError,
    ShmHeapError,
)
from ..heap import Heap
from ..names import usable_arenas
from ..walker import HeapStats, SpanInfo
from .stress_tally import Counts, Tally

BREAK_ENV = "SHMHEAP_STRESS_BREAK_CHECK"
#: The movers' queues, and the share of a mover's steps that put a new item.
WORK_QUEUE = "stress.work"
#: The heap event the parent sets to stop the run (every worker looks at it after each step).
STOP_EVENT = "stress.stop"
DONE_QUEUE = "stress.done"
PUT_SHARE = 0.5
#: Seconds between a worker's reports.
REPORT_INTERVAL = 0.5
#: A writer asks for a random index once in this many grows.
AT_EVERY = 32
#: The first word of a writer's stamp (b"shmstamp"); no pattern or span header can hold it.
STAMP_MAGIC = int.from_bytes(b"shmstamp", "little")
#: Seconds from the start of a reader's walk of the heap to the next; spans it walks per step.
WALK_INTERVAL = 1.0
WALK_STEP = 64
#: Arenas a reader maps per step to check their stamps.
MAP_STEP = 64
#: A churner holds at most this many objects; a step allocates with probability
#: ALLOC_SHARE (always when it holds none), else gives up a random object, handing
#: it to another churner with probability HANDOFF_SHARE and freeing it otherwise.
MAX_HELD = 256
ALLOC_SHARE = 0.5
HANDOFF_SHARE = 0.2
#: Object sizes: small ones log-uniform in [SMALL_MIN, SMALL_MAX]; LARGE_SHARE of them
#: log-uniform from SMALL_MAX up to a quarter of an arena.
SMALL_MIN = 16
SMALL_MAX = 4096
LARGE_SHARE = 0.05
#: A churner sends its handoffs once it has this many (and with every report).
HANDOFF_BATCH = 8
#: Seconds a churner pauses when the heap can take no more memory.
FULL_PAUSE = 0.01
MAX_EXAMPLES = 5
RESERVOIR_SIZE = 1024


# -- statistics ---------------------------------------------------------------------------


@dataclass
class Reservoir:
    """Latency samples: every ``stride``-th one, at most ``capacity``, plus count and max.

    When full, every other sample is dropped and the stride doubles, so the
    kept samples stay spread evenly over the whole run.
    """

    capacity: int = RESERVOIR_SIZE
    stride: int = 1
    count: int = 0
    maximum: int = 0
    samples: list[int] = field(default_factory=list)

    def add(self, value: int) -> None:
        self.count += 1
        self.maximum = max(self.maximum, value)
        if self.count % self.stride:
            return
        self.samples.append(value)
        if len(self.samples) >= self.capacity:
            self.samples = self.samples[1::2]
            self.stride *= 2


def latency_summary(reservoirs: Iterable[Reservoir]) -> dict[str, float | None]:
    """p50/p99/max in microseconds over several reservoirs (None if no samples).

    Each kept sample stands for ``stride`` samples, so it weighs that much.
    """
    reservoirs = list(reservoirs)
    weighted = sorted((v, r.stride) for r in reservoirs for v in r.samples)
    total = sum(weight for _, weight in weighted)

    def quantile(q: float) -> float | None:
        seen = 0
        for value, weight in weighted:
            seen += weight
            if seen >= q * total:
                return value / 1000
        return None

    maximum = max((r.maximum for r in reservoirs), default=0)
    return {"p50_us": quantile(0.50), "p99_us": quantile(0.99),
            "max_us": maximum / 1000 if weighted else None, "samples": len(weighted)}


@dataclass
class WorkerReport:
    """What a worker tells the parent over its pipe beside its counters (stress_tally.py)."""

    kind: str
    wid: int
    pid: int
    #: the first violations' descriptions (the tally counts them all)
    examples: list[str] = field(default_factory=list)
    latency: Reservoir = field(default_factory=Reservoir)
    #: final report only: the objects the worker holds at the end, ref -> size
    live: dict[int, int] = field(default_factory=dict)
    #: writer: why and when (time.monotonic) the heap stopped taking arenas
    full: str = ""
    full_at: float = 0.0
    #: the exception that ended the worker, "" if none
    error: str = ""
    final: bool = False


# -- roles --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Go:
    """The parent's start signal: when the run started and how long it lasts."""

    started: float
    duration: float
    #: writers spread the heap's arenas evenly over the run instead of growing flat out
    paced: bool


@dataclass(frozen=True)
class Handoff:
    """Objects (refs) a churner gives up, on their way to another churner via the parent."""

    refs: tuple[int, ...]
    #: from a churner: how many handed objects it has taken so far (so the parent knows
    #: what is still in its pipe); 0 from the parent
    received: int = 0


def pattern(ref: int, size: int) -> bytes:
    """What a churner's object at ``ref`` holds while it lives: its address, repeated."""
    word = ref.to_bytes(8, "little")
    return (word * (size // 8 + 1))[:size]


def check_object(heap: Heap, ref: int, size: int | None = None,
                 offset: int = 0) -> tuple[int, str]:
    """(the object's size, "" or what is wrong with it).

    The object must be live, hold ``pattern(ref + offset)`` and, if ``size``
    is given, have that size.  Size 0 means it could not be read at all.
    """
    try:
        view = heap.view(ref)
    except ShmHeapError as exc:
        return 0, f"object {ref:#x} cannot be read: {type(exc).__name__}: {exc}"
    with view:
        actual = len(view)
        if size is not None and actual != size:
            return actual, f"object {ref:#x} has {actual} bytes, it was allocated with {size}"
        if bytes(view) != pattern(ref + offset, actual):
            return actual, f"object {ref:#x} of {actual} bytes does not hold its pattern"
    return actual, ""


def break_offset() -> int:
    """1 under the test hook (every stamp and pattern check then fails), else 0."""
    return 1 if os.environ.get(BREAK_ENV) == "1" else 0


class Role:
    """One worker's job: ``step()`` does one operation and counts it in ``counts``.

    ``counts`` (its slot of the tally) holds ``ops``, ``violations`` and the
    role's ``COUNTERS``; ``report`` what goes over the pipe (latency samples,
    violation examples, the objects held at the end).
    """

    kind: ClassVar[str]
    readonly: ClassVar[bool]
    COUNTERS: ClassVar[tuple[str, ...]]

    def __init__(self, heap: Heap, rng: random.Random, report: WorkerReport, counts: Counts,
                 go: Go) -> None:
        self.heap = heap
        self.rng = rng
        self.report = report
        self.counts = counts
        self.go = go

    def count(self, name: str, n: int = 1) -> None:
        self.counts.add(name, n)

    def violate(self, text: str) -> None:
        self.counts.add("violations")
        if len(self.report.examples) < MAX_EXAMPLES:
            self.report.examples.append(text)

    def step(self) -> float:
        """Do one operation; return seconds to pause before the next (inf: all done)."""
        raise NotImplementedError

    def outgoing(self, flush: bool) -> list[object]:
        """Messages for the parent after a step (``flush``: send what is batched, too)."""
        return []

    def receive(self, message: Handoff) -> None:
        """Take a message the parent sent while the run goes on."""
        raise ShmHeapError(f"a {self.kind} takes no {type(message).__name__}")

    def finish(self) -> None:
        """The run is over: put what the final report needs into ``report``."""


class Writer(Role):
    """Grows the heap and claims and stamps an arena per grow.

    ``ops`` counts grows, ``latency`` is grow latency; counters: collisions,
    claims, claimed_other (the claim landed in another arena than the grown one).
    """

    kind = "writer"
    readonly = False
    COUNTERS = ("collisions", "claims", "claimed_other")

    def __init__(self, heap: Heap, rng: random.Random, report: WorkerReport, counts: Counts,
                 go: Go) -> None:
        super().__init__(heap, rng, report, counts, go)
        #: arena indices created since the last step
        self.created: list[int] = []
        #: the whole-arena objects it claimed and stamped, ref -> size
        self.claimed: dict[int, int] = {}

    def step(self) -> float:
        pause = self.ahead_of_schedule()
        if pause > 0:
            return pause
        at = None
        if self.rng.randrange(AT_EVERY) == 0:
            at = self.rng.randrange(1, self.heap.max_arenas)
        start = time.perf_counter_ns()
        try:
            arena = self.heap.grow(at=at)
        except ArenaCollisionError:
            self.count("collisions")
            return 0
        except (AddressSpaceExhaustedError, OutOfSharedMemoryError) as exc:
            return self.heap_full(exc)
        self.report.latency.add(time.perf_counter_ns() - start)
        self.count("ops")
        self.created.append(arena.index)
        return self.claim(arena.index)

    def claim(self, grown: int) -> float:
        """Allocate a whole arena (usually ``grown``) and stamp it."""
        size = self.heap.arena_size
        try:
            ref = self.heap.alloc(size)
        except (AddressSpaceExhaustedError, OutOfSharedMemoryError) as exc:
            return self.heap_full(exc)
        index, offset = divmod(ref, size)
        if offset:
            self.violate(f"a whole-arena object starts at {ref:#x}, inside arena {index}")
        with self.heap.view(ref) as view, view[:16].cast("Q") as stamp:
            stamp[1] = index
            stamp[0] = STAMP_MAGIC
        self.claimed[ref] = size
        self.count("claims")
        if index != grown:
            self.count("claimed_other")
        return 0

    def heap_full(self, exc: ShmHeapError) -> float:
        self.report.full = str(exc)
        self.report.full_at = time.monotonic()
        return math.inf

    def ahead_of_schedule(self) -> float:
        """When paced: seconds until the heap is due its next arena (<= 0: grow now).

        The schedule fills the heap evenly over the run, so growth, and kills
        in the middle of it, go on for the whole run.
        """
        go = self.go
        if not go.paced:
            return 0
        due = len(self.heap.snapshot()) + 1
        arenas = usable_arenas(self.heap.max_arenas)
        return go.started + due * go.duration / arenas - time.monotonic()

    def outgoing(self, flush: bool) -> list[object]:
        if not self.created:
            return []
        created, self.created = self.created, []
        return [created]

    def finish(self) -> None:
        self.report.live = dict(self.claimed)


class Churner(Role):
    """Allocates, checks, hands on and frees objects.

    ``ops`` counts allocs and frees, ``latency`` is alloc latency; counters:
    allocs, alloc_bytes, frees, freed_bytes, verified (patterns checked),
    handed, received, full (allocs refused for want of memory).
    """

    kind = "churner"
    readonly = False
    COUNTERS = ("allocs", "alloc_bytes", "frees", "freed_bytes", "verified", "handed",
                "received", "full")

    def __init__(self, heap: Heap, rng: random.Random, report: WorkerReport, counts: Counts,
                 go: Go) -> None:
        super().__init__(heap, rng, report, counts, go)
        #: the objects it holds, (ref, size), in no order
        self.held: list[tuple[int, int]] = []
        #: objects given up for another churner, not yet sent
        self.handing: list[tuple[int, int]] = []
        self.offset = break_offset()
        self.large = max(SMALL_MAX, heap.arena_size // 4)

    def step(self) -> float:
        held = self.held
        if not held or (len(held) < MAX_HELD and self.rng.random() < ALLOC_SHARE):
            return self.allocate()
        self.give_up(hand_on=self.rng.random() < HANDOFF_SHARE)
        return 0

    def give_up(self, hand_on: bool) -> None:
        """Check a random held object's pattern, then hand it on or free it."""
        ref, size = self.take()
        if not self.check(ref, size):
            return
        if hand_on:
            self.handing.append((ref, size))
            self.count("handed")
        else:
            self.free(ref, size)

    def draw_size(self) -> int:
        """Mostly small, LARGE_SHARE large, both log-uniform."""
        if self.rng.random() < LARGE_SHARE:
            low, high = SMALL_MAX, self.large
        else:
            low, high = SMALL_MIN, SMALL_MAX
        return int(low * (high / low) ** self.rng.random())

    def allocate(self) -> float:
        report = self.report
        start = time.perf_counter_ns()
        try:
            ref = self.heap.alloc(self.draw_size())
        except (AddressSpaceExhaustedError, OutOfSharedMemoryError):
            self.count("full")
            if self.held:
                self.give_up(hand_on=False)
            return FULL_PAUSE
        report.latency.add(time.perf_counter_ns() - start)
        with self.heap.view(ref) as view:
            size = len(view)
            if bytes(view) != bytes(size):
                self.violate(f"new object {ref:#x} of {size} bytes does not read zero")
            view[:] = pattern(ref, size)
        self.held.append((ref, size))
        self.count("ops")
        self.count("allocs")
        self.count("alloc_bytes", size)
        return 0

    def take(self) -> tuple[int, int]:
        """Remove a random object from the held ones."""
        held = self.held
        i = self.rng.randrange(len(held))
        held[i], held[-1] = held[-1], held[i]
        return held.pop()

    def check(self, ref: int, size: int | None) -> int:
        """The object's size after checking its pattern (0: it cannot be read)."""
        actual, problem = check_object(self.heap, ref, size, self.offset)
        if problem:
            self.violate(problem)
        self.count("verified")
        return actual

    def free(self, ref: int, size: int) -> None:
        try:
            self.heap.free(ref)
        except ShmHeapError as exc:
            self.violate(f"free({ref:#x}) raised {type(exc).__name__}: {exc}")
            return
        self.count("ops")
        self.count("frees")
        self.count("freed_bytes", size)

    def receive(self, message: Handoff) -> None:
        """Objects another churner handed on: adopt each, check it and free it.

        A handed ref is a plain int, still its maker's: adopting it first keeps
        a reclaim from freeing it under us if its maker is killed.  The parent
        adopts the refs in flight from dead makers before it reclaims
        (stress.py), so a relayed object is never gone when it arrives: a
        failed adopt is a violation whoever made it.
        """
        for ref in message.refs:
            try:
                self.heap.adopt(ref)
            except ShmHeapError as exc:
                self.violate(f"adopt({ref:#x}) of a handed-on object raised "
                             f"{type(exc).__name__}: {exc}")
            else:
                size = self.check(ref, None)
                if size:
                    self.free(ref, size)
            self.count("received")

    def outgoing(self, flush: bool) -> list[object]:
        if len(self.handing) < HANDOFF_BATCH and not (flush and self.handing):
            return []
        refs = tuple(ref for ref, _ in self.handing)
        self.handing = []
        return [Handoff(refs, self.counts["received"])]

    def finish(self) -> None:
        self.report.live = dict(self.held + self.handing)


class Reader(Role):
    """Checks snapshots, stamps, and now and then the walker.

    ``ops`` counts snapshots, ``latency`` is snapshot latency; counters:
    entries, stamps (stamped entries checked), walks, spans_walked,
    objects_walked.
    """

    kind = "reader"
    readonly = True
    COUNTERS = ("entries", "stamps", "walks", "spans_walked", "objects_walked")

    def __init__(self, heap: Heap, rng: random.Random, report: WorkerReport, counts: Counts,
                 go: Go) -> None:
        super().__init__(heap, rng, report, counts, go)
        self.previous = memoryview(b"").cast("I")
        #: arena index -> a two-element u64 view of its first 16 bytes (magic, index)
        self.stamps: dict[int, memoryview] = {}
        self.offset = break_offset()
        #: the walk under way (None between walks), its start, and the arenas its spans may be in
        self.walking: Iterator[SpanInfo] | None = None
        self.walk_started = -math.inf
        self.arenas: set[int] = set()

    def step(self) -> float:
        start = time.perf_counter_ns()
        snapshot = self.heap.snapshot()
        self.report.latency.add(time.perf_counter_ns() - start)
        self.count("ops")
        entries = snapshot.view()
        previous = self.previous
        if len(entries) < len(previous) or entries[:len(previous)] != previous:
            self.violate(f"a snapshot of {len(entries)} entries does not extend the "
                                f"previous one of {len(previous)}")
        if len(set(entries)) != len(entries):
            self.violate(f"a snapshot of {len(entries)} entries has duplicates")
        self.count("entries", len(entries))
        self.check_stamps(entries)
        self.previous = entries
        self.walk_some()
        return 0

    def check_stamps(self, entries: memoryview) -> None:
        """Check the stamp of every entry whose arena it has mapped; map MAP_STEP more.

        A new reader of a big heap maps its arenas over its first steps
        rather than all in its first one, so its snapshots go on meanwhile.
        """
        stamps = self.stamps
        offset = self.offset
        stamped = 0
        budget = MAP_STEP
        for index in entries:
            stamp = stamps.get(index)
            if stamp is None:
                if not budget:
                    continue
                budget -= 1
                stamp = self.map_stamp(index)
                if stamp is None:
                    continue
            if stamp[0] != STAMP_MAGIC:
                continue
            stamped += 1
            value = stamp[1]
            # the magic again: a killed writer's claim may have been reclaimed and its
            # memory reused since the first look (the first word is then no magic)
            if value != index + offset and stamp[0] == STAMP_MAGIC:
                self.violate(f"arena {index} is stamped {value}, expected "
                                    f"{index + offset}")
        self.count("stamps", stamped)

    def map_stamp(self, index: int) -> memoryview | None:
        try:
            stamp = self.heap.arena(index).buf[:16].cast("Q")
        except (KeyError, ShmHeapError) as exc:
            self.violate(f"arena {index} is in a snapshot but heap.arena({index}) "
                                f"raised {type(exc).__name__}: {exc}")
            return None
        self.stamps[index] = stamp
        return stamp

    def walk_some(self) -> None:
        """Walk and check up to WALK_STEP more spans; after a whole walk, check heap.stats().

        A span's arena must be in a snapshot taken after it was walked
        (arenas only grow, so the set is refreshed when it lacks one).
        """
        heap = self.heap
        if self.walking is None:
            if time.monotonic() < self.walk_started + WALK_INTERVAL:
                return
            self.walk_started = time.monotonic()
            self.walking = iter(heap.walk())
        walked = 0
        for span in itertools.islice(self.walking, WALK_STEP):
            walked += 1
            if span.arena not in self.arenas:
                self.arenas = set(heap.snapshot())
            problem = span_problem(span, self.arenas, heap.arena_size, heap.params.page_size)
            if problem:
                self.violate(f"heap.walk(): the span at {span.address:#x} {problem}")
            self.count("spans_walked")
            self.count("objects_walked", len(span.objects))
        if walked == WALK_STEP:
            return
        self.walking = None
        self.count("walks")
        before = len(heap.snapshot())
        stats = heap.stats()
        self.arenas = set(heap.snapshot())
        for problem in stats_problems(stats, heap.arena_size, before, len(self.arenas)):
            self.violate(f"heap.stats(): {problem}")


def stats_problems(stats: HeapStats, arena_size: int, before: int, after: int) -> list[str]:
    """What is wrong with ``stats``, taken between snapshots of ``before`` and ``after`` arenas.

    Every rule compares numbers computed from the same reads, or arena counts
    that only grow, so concurrent allocation cannot break any of them.
    """
    classes = stats.classes
    rules = (
        (before <= stats.arenas <= after,
         f"{stats.arenas} arenas, outside the snapshots around it ({before}, {after})"),
        (stats.pages == stats.arenas * (arena_size // stats.page_size),
         f"{stats.pages} pages in {stats.arenas} arenas"),
        (stats.pages_in_use + stats.pages_free == stats.pages,
         f"{stats.pages_in_use} pages in use + {stats.pages_free} free != {stats.pages}"),
        (stats.reserved_bytes == stats.pages * stats.page_size
         and stats.in_use_bytes + stats.free_bytes == stats.reserved_bytes,
         f"in use {stats.in_use_bytes} + free {stats.free_bytes} bytes != reserved "
         f"{stats.reserved_bytes}"),
        (stats.pages_released <= stats.pages_free,
         f"{stats.pages_released} pages released, only {stats.pages_free} free"),
        (stats.live_objects == sum(c.objects for c in classes)
         and stats.live_bytes == sum(c.live_bytes for c in classes),
         "the size classes do not add up to the live objects and bytes"),
        (all(c.objects <= c.capacity for c in classes),
         "a size class has more objects than slots"),
    )
    return [problem for ok, problem in rules if not ok]


def span_problem(span: SpanInfo, arenas: set[int], arena_size: int, page_size: int) -> str:
    """What is wrong with a walked span ("" if nothing): it and its objects must fit."""
    base = span.arena * arena_size
    end = span.address + span.npages * page_size
    if span.arena not in arenas:
        return f"is in arena {span.arena}, which no snapshot lists"
    if not base <= span.address < end <= base + arena_size or (span.address - base) % page_size:
        return f"of {span.npages} pages does not lie on pages of its arena {span.arena}"
    objects = span.objects
    if span.size_class == 0:
        if (objects, span.capacity, span.object_size) != ((span.address,), 1, end - span.address):
            return "is a large object but does not hold exactly one object of its pages"
        return ""
    size = span.object_size
    # a small span holds a header of at least two bytes per slot, then the slots (allocator.py)
    if (size <= 0 or size % ALIGN or span.capacity * (size + 2) > end - span.address
            or len(objects) > span.capacity):
        return (f"has {span.capacity} slots of {size} bytes ({len(objects)} live) in "
                f"{span.npages} pages")
    steps = [b - a for a, b in itertools.pairwise(objects)]
    if objects and not (span.address < objects[0] and (objects[0] - span.address) % ALIGN == 0
                        and objects[-1] + size <= end
                        and all(step > 0 and step % size == 0 for step in steps)):
        return f"lists objects outside its slots of {size} bytes"
    return ""


class Mover(Role):
    """Puts new items on the work queue, or moves one from it to the done queue (leased)."""

    kind = "mover"
    readonly = False
    COUNTERS = ("puts", "moved", "empty")

    def __init__(self, heap: Heap, rng: random.Random, report: WorkerReport, counts: Counts,
                 go: Go) -> None:
        super().__init__(heap, rng, report, counts, go)
        self.work, self.done = heap.queue(WORK_QUEUE), heap.queue(DONE_QUEUE)
        self.seq = 0
        #: ids put since the last message to the parent
        self.made: list[int] = []

    def step(self) -> float:
        start = time.perf_counter_ns()
        if self.rng.random() < PUT_SHARE or not len(self.work):
            self.seq += 1
            item = self.report.wid << 32 | self.seq
            self.work.put(item)
            self.made.append(item)
            self.count("puts")
        else:
            try:
                with self.work.lease(timeout=0) as leased:
                    self.done.put(leased)
            except queue.Empty:
                self.count("empty")
            else:
                self.count("moved")
        self.report.latency.add(time.perf_counter_ns() - start)
        self.count("ops")
        return 0.0

    def outgoing(self, flush: bool) -> list[object]:
        made, self.made = self.made, []
        return [made] if made else []


ROLES: dict[str, type[Role]] = {role.kind: role
                                for role in (Writer, Churner, Reader, Mover)}


def worker_main(kind: str, name: str, wid: int, seed: int, conn: Connection, tally: Tally,
                slot: int, go: Go | None) -> None:
    """A worker process: attach, say ready, wait for go, step until told to stop.

    A replacement started while the run goes on is given ``go`` with its
    arguments and starts right after it attached.  It counts in slot
    ``slot`` of ``tally`` (stress_tally.py) from its first operation on.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    segments.raise_descriptor_limit()
    report = WorkerReport(kind, wid, os.getpid())
    try:
        role_class = ROLES[kind]
        counts = Counts(tally.slot(slot), role_class.COUNTERS)
        counts.started(core.NATIVE)
        with Heap.attach(name, readonly=role_class.readonly) as heap:
            conn.send("ready")
            if go is None:
                go = conn.recv()
            if isinstance(go, Go):
                role = role_class(heap, random.Random(seed), report, counts, go)
                counts.working(time.monotonic_ns())
                _work(role, report, conn, heap.event(STOP_EVENT))
                role.finish()
    except Exception as exc:  # the worker's boundary: whatever ended it goes to the parent
        report.error = f"{type(exc).__name__}: {exc}"
    report.final = True
    conn.send(report)
    conn.close()


def _work(role: Role, report: WorkerReport, conn: Connection, stop: Event) -> None:
    """Step until the parent sets the heap's event ``stop`` (or says stop on the pipe, which
    also wakes a worker that pauses), reporting every REPORT_INTERVAL (and at once after
    a violation with an example, so that a worker killed right after one says what it was).

    A role's messages are sent after every step (new arenas as a list of
    indices, so a SIGKILL can lose at most the arena made in the step it
    interrupts); handoffs from the parent are taken between steps.
    """
    next_report = time.monotonic() + REPORT_INTERVAL
    examples = 0
    while True:
        pause = role.step()
        now = time.monotonic()
        due = now >= next_report or pause == math.inf
        for message in role.outgoing(flush=due):
            conn.send(message)
        if due or len(report.examples) > examples:  # a new violation's example goes at once
            conn.send(report)
            examples = len(report.examples)
            next_report = now + REPORT_INTERVAL
        if stop.is_set():
            _inbox(role, conn, None)  # the handoffs relayed before the pipe's stop are ours
            return
        if _inbox(role, conn, None if pause == math.inf else max(pause, 0)):
            return


def _inbox(role: Role, conn: Connection, timeout: float | None) -> bool:
    """Take the parent's messages, waiting up to ``timeout`` for the first; True on stop."""
    while conn.poll(timeout):
        message = conn.recv()
        if not isinstance(message, Handoff):
            return True
        role.receive(message)
        timeout = 0
    return False


