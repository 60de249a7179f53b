"""Worker functions for the multi-process tests, run in fresh (spawned) interpreters.

Every worker reports through a queue: ``None`` or a result when it succeeded,
a ``WorkerFailure`` with the traceback when it did not.  A failing worker
aborts the shared barrier, so no other process waits for it; the failures
that this causes in the others are marked ``secondary``.

Arenas are stamped by the process that grows them: the first 8 bytes of arena
``i`` hold ``i`` (little-endian u64), written right after ``grow()``; 0 means
"not stamped yet".

This module touches only the heaps whose names the tests pass in.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier, Event
from typing import Any

import shmheap

#: Seconds any worker waits for another process before it gives up.
PATIENCE = 60.0


@dataclass(frozen=True)
class WorkerFailure:
    """What a worker sends instead of its result when it raised."""

    worker: str
    trace: str
    #: True if the worker only failed because another one did or the test stopped it
    secondary: bool


class Stopped(Exception):
    """The test stopped this worker (because something else failed)."""


def stamp(arena: shmheap.Arena) -> None:
    arena.buf[:8] = arena.index.to_bytes(8, "little")


def stamp_of(arena: shmheap.Arena) -> int:
    return int.from_bytes(arena.buf[:8], "little")


def report(results: Queue[Any], worker: str, body: Callable[[], object],
           barrier: Barrier | None = None) -> None:
    """Run ``body`` and put its result (or the failure) on ``results``."""
    try:
        results.put(body())
    except BaseException as exc:
        if barrier is not None:
            barrier.abort()
        secondary = isinstance(exc, (threading.BrokenBarrierError, Stopped))
        results.put(WorkerFailure(worker, traceback.format_exc(), secondary))


# -- one writer, many readers --------------------------------------------------------------


def writer(name: str, count: int, pause_at: list[int], sparse_every: int, barrier: Barrier,
           results: Queue[Any]) -> None:
    """Grow ``count`` stamped arenas; wait at ``barrier`` whenever the index has a length
    in ``pause_at``.  Every ``sparse_every``-th arena is placed with ``grow(at=)``.
    Reports the creation order."""

    def body() -> list[int]:
        order: list[int] = []
        with shmheap.Heap.attach(name) as heap:
            for n in range(count):
                if n in pause_at:
                    barrier.wait(PATIENCE)
                at = 2 * count + n if n % sparse_every == sparse_every - 1 else None
                arena = heap.grow(at=at)
                stamp(arena)
                order.append(arena.index)
        return order

    report(results, "writer", body, barrier)


@dataclass
class ReaderChecks:
    """A reader's checks over the snapshots it takes, in the order it takes them."""

    heap: shmheap.Heap
    #: every entry seen so far, copied out of shared memory
    seen: bytearray = field(default_factory=bytearray)
    seen_set: set[int] = field(default_factory=set)
    last: shmheap.ArenaSnapshot | None = None
    #: snapshots held across a doubling, with a copy of their entries
    held: list[tuple[shmheap.ArenaSnapshot, bytes]] = field(default_factory=list)
    generations: set[int] = field(default_factory=set)
    snapshots: int = 0
    unstamped: int = 0

    def see(self, snap: shmheap.ArenaSnapshot) -> None:
        """Check a new snapshot: a prefix of later ones, entries naming stamped arenas."""
        if snap is self.last:
            return
        self.snapshots += 1
        self.last = snap
        entries = snap.view()
        known = len(self.seen) // 4
        assert len(snap) >= known, f"snapshot shrank from {known} to {len(snap)} entries"
        assert bytes(entries[:known]) == self.seen, "a published index entry changed"
        for index in entries[known:]:
            self.check_new_entry(index)
        self.seen += bytes(entries[known:])
        if snap.generation not in self.generations:
            self.generations.add(snap.generation)
            self.check_held(snap)

    def check_new_entry(self, index: int) -> None:
        assert 1 <= index < self.heap.max_arenas, f"index entry {index} is out of range"
        assert index not in self.seen_set, f"arena {index} is in the index twice"
        self.seen_set.add(index)
        arena = self.heap.arena(index)
        assert arena.base == index * self.heap.arena_size
        value = stamp_of(arena)
        assert value in (0, index), f"arena {index} carries stamp {value}"
        self.unstamped += value == 0

    def hold(self, snap: shmheap.ArenaSnapshot) -> None:
        self.held.append((snap, bytes(snap.view())))

    def check_held(self, current: shmheap.ArenaSnapshot) -> None:
        """Every held snapshot still iterates to what it held, a prefix of ``current``."""
        for old, copy in self.held:
            entries = list(old)
            assert len(entries) * 4 == len(copy) and bytes(old.view()) == copy
            assert entries == current[:len(entries)]

    def check_final(self, order: list[int]) -> dict[str, Any]:
        final = self.heap.snapshot()
        self.see(final)
        self.check_held(final)
        assert list(final) == order, "the final snapshot is not the writer's creation order"
        wrong = [i for i in final if stamp_of(self.heap.arena(i)) != i]
        assert not wrong, f"arenas without their stamp after the writer exited: {wrong[:10]}"
        return {"snapshots": self.snapshots, "generations": sorted(self.generations),
                "unstamped": self.unstamped, "held": len(self.held)}


def reader(name: str, readonly: bool, pause_at: list[int], barrier: Barrier,
           writer_done: Event, order_queue: Queue[list[int] | None], results: Queue[Any]) -> None:
    """Snapshot in a loop until ``writer_done``; hold a snapshot across each pause
    (the writer is then about to double the index), then check the final state
    against the writer's creation order from ``order_queue`` (None: stop)."""

    def body() -> dict[str, Any]:
        with shmheap.Heap.attach(name, readonly=readonly) as heap:
            checks = ReaderChecks(heap)
            pending = sorted(pause_at)
            while True:
                finished = writer_done.is_set()
                snap = heap.snapshot()
                checks.see(snap)
                if pending:
                    assert len(snap) <= pending[0], "the writer did not wait at its pause"
                    if len(snap) == pending[0]:
                        checks.hold(snap)
                        barrier.wait(PATIENCE)
                        pending.pop(0)
                if finished:
                    break
            assert not pending, f"the writer finished before pauses {pending}"
            order = order_queue.get(timeout=PATIENCE)
            if order is None:
                raise Stopped("the test stopped this reader")
            return checks.check_final(order)

    report(results, f"reader {'ro' if readonly else 'rw'}", body, barrier)


# -- destroy and open --------------------------------------------------------------------------


def destroyer(name: str, results: Queue[Any]) -> None:
    """Attach heap ``name`` and destroy it."""

    def body() -> None:
        shmheap.Heap.attach(name).destroy(force=True)

    report(results, "destroyer", body)


def opener(name: str, arena_size: int, grows: int, barrier: Barrier, release: Event,
           results: Queue[Any]) -> None:
    """Race ``Heap.open(create=True)`` on ``name``, grow and stamp ``grows`` arenas,
    put (heap_id, indices grown) on ``results``, stay attached until ``release``,
    then report success."""

    def body() -> None:
        barrier.wait(PATIENCE)
        with shmheap.Heap.open(name, create=True, arena_size=arena_size, reserve=False) as heap:
            grown = []
            for _ in range(grows):
                arena = heap.grow()
                stamp(arena)
                grown.append(arena.index)
            results.put((heap.params.heap_id, grown))
            assert release.wait(PATIENCE), "the test never released the openers"

    report(results, "opener", body, barrier)
