"""Worker functions for the allocator's multi-process tests, run in spawned interpreters.

Every object a worker allocates is filled with ``pattern(ref, size)``, derived
from its address, and checked against it before it is freed or handed on (as
mimalloc's test-stress.c does).  Workers report through queues and never wait
longer than ``PATIENCE`` seconds for another process.

This module touches only the heaps whose names the tests pass in.
"""

from __future__ import annotations

import queue
import random
import traceback
from dataclasses import asdict
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

import shmheap
from shmheap import walker
from shmheap.allocator import SizeClass

PATIENCE = 60.0
DONE = -1


def pattern(ref: int, size: int) -> bytes:
    """The contents every object at ``ref`` must hold while it is live."""
    word = ((ref * 0x9E3779B97F4A7C15) & (2**64 - 1)).to_bytes(8, "little")
    return (word * (size // 8 + 1))[:size]


def size_class(heap: shmheap.Heap, nbytes: int) -> SizeClass:
    """The size class a small ``alloc(nbytes)`` takes its slot from."""
    allocator = heap._objects()
    return allocator.classes[allocator.lookup[(nbytes + 15) >> 4]]


def check_pattern(heap: shmheap.Heap, ref: int) -> int:
    """The object's size, after checking it still holds its pattern."""
    size = heap.nbytes(ref)
    if bytes(heap.view(ref)) != pattern(ref, size):
        raise AssertionError(f"object {ref:#x} of {size} bytes lost its contents")
    return size


def new_object(heap: shmheap.Heap, nbytes: int) -> tuple[int, int]:
    ref = heap.alloc(nbytes)
    size = heap.nbytes(ref)
    view = heap.view(ref)
    if bytes(view) != bytes(size):
        raise AssertionError(f"new object {ref:#x} of {size} bytes is not zeroed")
    view[:] = pattern(ref, size)
    return ref, size


def random_size(rng: random.Random, large: int) -> int:
    """Mostly small sizes, some medium, about 2% large (mimalloc's test-stress mix)."""
    draw = rng.random()
    if draw < 0.02:
        return rng.randint(large, 3 * large)
    if draw < 0.12:
        return rng.randint(600, 30000)
    return rng.randint(1, 512)


def churn(name: str, me: int, inboxes: list[Queue[int]], results: Queue[Any], seed: int,
          steps: int, large: int) -> None:
    """Allocate, check, free and pass objects to the other workers; report what is left.

    Reports ``("ok", me, {ref: size}, allocated, freed)`` for the objects it
    still holds at the end (half of them are freed first), or ``("error", me,
    traceback)``.
    """
    try:
        held, counts = _churn(name, me, inboxes, seed, steps, large)
        results.put(("ok", me, held, *counts))
    except BaseException:
        results.put(("error", me, traceback.format_exc()))
        raise


def _churn(name: str, me: int, inboxes: list[Queue[int]], seed: int, steps: int,
           large: int) -> tuple[dict[int, int], tuple[int, int]]:
    rng = random.Random(seed)
    others = [i for i in range(len(inboxes)) if i != me]
    held: dict[int, int] = {}
    allocated = freed = done = 0
    with shmheap.Heap.attach(name) as heap:
        for _ in range(steps):
            draw = rng.random()
            if draw < 0.5 or not held:
                ref, size = new_object(heap, random_size(rng, large))
                held[ref] = size
                allocated += 1
            elif draw < 0.85:
                ref = rng.choice(list(held))
                check_pattern(heap, ref)
                heap.free(ref)
                del held[ref]
                freed += 1
            elif draw < 0.95:
                ref = rng.choice(list(held))
                check_pattern(heap, ref)
                del held[ref]
                inboxes[rng.choice(others)].put(ref)
            else:
                done += _receive(heap, inboxes[me], held, block=False)
        for other in others:
            inboxes[other].put(DONE)
        while done < len(others):
            done += _receive(heap, inboxes[me], held, block=True)
        for ref in list(held)[: len(held) // 2]:
            check_pattern(heap, ref)
            heap.free(ref)
            del held[ref]
            freed += 1
    return held, (allocated, freed)


def _receive(heap: shmheap.Heap, inbox: Queue[int], held: dict[int, int], block: bool) -> int:
    """Take objects from ``inbox`` (all that are there, or one item); return DONEs seen."""
    done = 0
    while True:
        try:
            ref = inbox.get(timeout=PATIENCE) if block else inbox.get_nowait()
        except queue.Empty:
            if block:
                raise AssertionError("another worker stopped answering") from None
            return done
        if ref == DONE:
            done += 1
        else:
            held[ref] = check_pattern(heap, ref)
        if block:
            return done


def allocate_then_wait_to_die(name: str, results: Queue[Any], never: Event) -> None:
    """Hold some objects and cached spans, report them, and wait to be SIGKILLed."""
    heap = shmheap.Heap.attach(name)
    rng = random.Random(7)
    held = dict(new_object(heap, rng.randint(1, 3000)) for _ in range(300))
    for ref in list(held)[::2]:
        heap.free(ref)
        del held[ref]
    results.put(("ok", -1, held, 0, 0))
    never.wait(PATIENCE * 10)


def churn_until_stopped(name: str, ready: Queue[Any], stop: Event) -> None:
    """Hold a stable set of objects, churn others until ``stop``, then free everything."""
    rng = random.Random(3)
    with shmheap.Heap.attach(name) as heap:
        stable = [heap.alloc(n) for n in (16, 64, 64, 500, 3000, 60000)]
        ready.put(stable)
        held: list[int] = []
        while not stop.is_set():
            for _ in range(50):
                if held and rng.random() < 0.5:
                    heap.free(held.pop(rng.randrange(len(held))))
                else:
                    held.append(heap.alloc(rng.choice((16, 64, 200, 3000, 60000))))
        for ref in held + stable:
            heap.free(ref)
    ready.put("done")


def sweep_in_chunks_of_one_arena(name: str, start: Event, results: Queue[Any]) -> None:
    """Sweep the current cycle alongside other sweepers, one arena per claimed chunk."""
    walker.SWEEP_CHUNK_PAGES = 1
    with shmheap.Heap.attach(name) as heap:
        start.wait(PATIENCE)
        results.put(asdict(heap.sweep()))
