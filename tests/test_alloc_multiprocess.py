"""Many processes allocating at once, in the style of mimalloc's test/test-stress.c.

Spawned workers allocate objects of mixed sizes (a few large), fill each with a
pattern derived from its address, hand a share of them to the other workers
through queues, and check the pattern before every free.  One more worker holds
objects and cached spans and is SIGKILLed.  At the end the walker's live
objects and bytes must equal what the processes reported, every object must
still hold its pattern, and after everything is freed the dead worker's spans
must be reclaimed and the heap clean.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from typing import Any

import alloc_workers

from shmheap.pytest_plugin import HeapFactory

WORKERS = 3
STEPS = 4000
ARENA = 1 << 20


def collect(results: Any, count: int) -> list[tuple[Any, ...]]:
    reports = [results.get(timeout=alloc_workers.PATIENCE) for _ in range(count)]
    errors = [r[2] for r in reports if r[0] == "error"]
    assert not errors, "\n".join(errors)
    return reports


def test_churn_across_processes_keeps_every_object_intact(
        shm_heap_factory: HeapFactory) -> None:
    heap = shm_heap_factory(arena_size=ARENA)
    large = heap._objects().max_small + 1
    ctx = multiprocessing.get_context("spawn")
    inboxes = [ctx.Queue() for _ in range(WORKERS)]
    results = ctx.Queue()
    never = ctx.Event()
    victim = ctx.Process(target=alloc_workers.allocate_then_wait_to_die,
                         args=(heap.name, results, never))
    workers = [ctx.Process(target=alloc_workers.churn,
                           args=(heap.name, me, inboxes, results, 1000 + me, STEPS, large))
               for me in range(WORKERS)]
    victim.start()
    for proc in workers:
        proc.start()
    try:
        reports = collect(results, WORKERS + 1)
    finally:
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(60)
        for proc in workers:
            proc.join(60)
    assert victim.exitcode == -signal.SIGKILL
    assert all(proc.exitcode == 0 for proc in workers)

    held: dict[int, int] = {}
    for report in reports:
        held.update(report[2])
    assert len(held) == sum(len(r[2]) for r in reports), "two processes hold one object"
    assert sum(r[3] for r in reports) > WORKERS * STEPS // 3, "the workers did allocate"
    stats = heap.stats()
    assert stats.live_objects == len(held)
    assert stats.live_bytes == sum(heap.size_of(ref) for ref in held)
    assert sorted(ref for span in heap.walk() for ref in span.objects) == sorted(held)
    assert stats.cached_spans > 0, "the dead worker's spans are still cached"

    for ref in held:
        alloc_workers.check_pattern(heap, ref)
        heap.free(ref)
    assert heap.check(repair=True) == [], "the dead worker's spans are garbage, not a finding"
    stats = heap.stats()
    assert stats.live_objects == 0 and stats.cached_spans == 0
    assert heap.check() == []
    heap.start_cycle()
    heap.sweep()  # returns the emptied spans to the free pages
    assert heap.stats().pages_in_use == 0
