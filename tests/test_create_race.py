"""Many processes racing to create one heap: one creator, everyone on the same heap."""

from __future__ import annotations

import multiprocessing

import race_workers

import shmheap

RACERS = 16


def test_racing_create_has_exactly_one_winner(shm_heap_name: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(RACERS) as pool:
        start = manager.Barrier(RACERS)
        results = pool.starmap(race_workers.race_create, [(shm_heap_name, start)] * RACERS,
                               chunksize=1)
    assert results.count("won") == 1
    assert sorted(set(results)) == ["HeapExistsError", "won"]
    heap = shmheap.Heap.attach(shm_heap_name)
    try:
        assert heap.check() == []
    finally:
        heap.close()


def test_racing_create_or_attach_ends_on_one_heap(shm_heap_name: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(RACERS) as pool:
        start = manager.Barrier(RACERS)
        attached = manager.Barrier(RACERS)
        results = pool.starmap(race_workers.race_open,
                               [(shm_heap_name, start, attached)] * RACERS, chunksize=1)
    heap_ids = {heap_id for heap_id, _ in results}
    assert len(heap_ids) == 1, "every racer must end on the same heap"
    assert all(seen == RACERS for _, seen in results)
    heap = shmheap.Heap.attach(shm_heap_name)
    try:
        assert heap.params.heap_id in heap_ids
        assert len(heap.snapshot()) == RACERS
        assert heap.check() == []
    finally:
        heap.close()
