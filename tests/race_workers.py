"""Workers for the create/attach race tests (module-level so spawn can import them)."""

from __future__ import annotations

from multiprocessing.synchronize import Barrier

import shmheap


def race_create(name: str, start: Barrier) -> str:
    """Wait for everyone, then try to create ``name``: 'won', or the error's class name."""
    start.wait()
    try:
        heap = shmheap.Heap.create(name, arena_size=64 * 1024)
    except shmheap.ShmHeapError as exc:
        return type(exc).__name__
    heap.close()
    return "won"


def race_open(name: str, start: Barrier, attached: Barrier) -> tuple[int, int]:
    """Create-or-attach ``name``; return (heap_id, attached processes seen while all are in)."""
    start.wait()
    heap = shmheap.Heap.open(name, create=True, arena_size=64 * 1024)
    try:
        heap.grow()
        attached.wait()
        seen = heap.info().attached
        attached.wait()
        return heap.params.heap_id, seen
    finally:
        heap.close()
