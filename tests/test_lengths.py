"""Exact lengths: ``alloc(n)`` remembers n (``nbytes``, ``view``), ``size_of`` stays the capacity,
in this process and in another one, for lengths around every size class and page boundary."""

from __future__ import annotations

import json

import pytest
from children import run_child

import shmheap
from shmheap.allocator import size_classes
from shmheap.pytest_plugin import HeapFactory

ARENA = 1 << 20
LONGEST = 70_000


def lengths_around_boundaries(heap: shmheap.Heap) -> list[int]:
    """0..LONGEST, sampled at and next to every size class and page multiple."""
    page = heap.params.page_size
    edges = [cls.size for cls in size_classes(page, ARENA // page)[1:]]
    edges += range(0, LONGEST + page, page)
    found = {0, 1, 2, LONGEST}
    for edge in edges:
        found.update(n for n in (edge - 2, edge - 1, edge, edge + 1, edge + 2) if 0 <= n <= LONGEST)
    return sorted(found)


def pattern(ref: int, n: int) -> bytes:
    return (ref.to_bytes(8, "little") * (n // 8 + 1))[:n]


@pytest.mark.parametrize("page_size", [4096, 8192])
def test_every_length_round_trips_exactly_here_and_in_another_process(
        shm_heap_factory: HeapFactory, page_size: int) -> None:
    heap = shm_heap_factory(arena_size=ARENA, page_size=page_size, reserve=False)
    lengths = lengths_around_boundaries(heap)
    refs = {}
    for n in lengths:
        ref = heap.alloc(n)
        assert heap.nbytes(ref) == n
        assert heap.size_of(ref) >= n
        view = heap.view(ref)
        assert len(view) == n and bytes(view) == bytes(n)
        view[:] = pattern(ref, n)
        refs[ref] = n
    child = run_child(f"""
        import json, shmheap
        h = shmheap.Heap.attach({heap.name!r})
        refs = {json.dumps({str(r): n for r, n in refs.items()})}
        bad = [r for r, n in refs.items()
               if h.nbytes(int(r)) != n or len(h.view(int(r))) != n
               or bytes(h.view(int(r))) != (int(r).to_bytes(8, "little") * (n // 8 + 1))[:n]]
        print(json.dumps(bad))
        h.close()
        """)
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout) == []
    for ref in refs:
        heap.free(ref)
    assert heap.check() == []


def test_a_zero_length_object_is_a_live_object_of_no_bytes(heap_small: shmheap.Heap) -> None:
    ref = heap_small.alloc(0)
    assert heap_small.nbytes(ref) == 0 and bytes(heap_small.view(ref)) == b""
    assert heap_small.size_of(ref) == 16
    heap_small.free(ref)
    with pytest.raises(shmheap.DoubleFreeError):
        heap_small.free(ref)


def test_a_giant_object_knows_its_length(shm_heap_factory: HeapFactory) -> None:
    heap = shm_heap_factory(arena_size=ARENA, reserve=False)
    n = 2 * ARENA + 12345
    ref = heap.alloc(n)
    assert heap.nbytes(ref) == n and len(heap.view(ref)) == n
    assert heap.size_of(ref) == -(-n // heap.params.page_size) * heap.params.page_size
    heap.view(ref)[-3:] = b"end"
    assert bytes(heap.view(ref)[-3:]) == b"end"
    heap.free(ref)


@pytest.fixture
def heap_small(shm_heap_factory: HeapFactory) -> shmheap.Heap:
    return shm_heap_factory(arena_size=ARENA, reserve=False)
