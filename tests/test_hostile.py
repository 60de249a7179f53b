"""Hostile shared memory: corrupt segments give HeapCorruptError, never a crash or a hang.

Hypothesis writes random bytes, truncations and impossible numbers into a heap's
segments; every public call must then either work or raise a ShmHeapError, and
must not read out of bounds or allocate without bound.
"""

from __future__ import annotations

import contextlib
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmheap
from shmheap import control, liveness
from shmheap.pytest_plugin import HeapFactory

FUZZ = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def path(name: str, suffix: str = "") -> str:
    return f"/dev/shm/shmheap.{name}{suffix}"


def closed_heap(factory: HeapFactory) -> str:
    """A heap with one arena (index 1) that no handle of ours keeps attached."""
    heap = factory(reserve=False)
    heap.grow()
    heap.close()
    return heap.name


def write_at(name: str, suffix: str, offset: int, data: bytes) -> None:
    """Overwrite bytes of segment ``shmheap.<name><suffix>``, never past its end."""
    with open(path(name, suffix), "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(offset)
        f.write(data[: max(0, size - offset)])


def exercise(name: str) -> None:
    """Attach and use the heap; anything but a ShmHeapError fails the test."""
    try:
        heap = shmheap.Heap.attach(name, timeout=0.5)
    except shmheap.ShmHeapError:
        return
    try:
        for call in (lambda: list(heap.snapshot(timeout=2)), lambda: heap.info(timeout=2),
                     lambda: heap.check(timeout=2), lambda: heap.grow(timeout=2),
                     lambda: list(heap.arenas(timeout=2))):
            with contextlib.suppress(shmheap.ShmHeapError):
                call()
    finally:
        heap.close()


@FUZZ
@given(data=st.binary(max_size=2 * control.SIZE))
def test_random_control_segment(shm_heap_name: str, data: bytes) -> None:
    with open(path(shm_heap_name), "wb") as f:
        f.write(data)
    try:
        with pytest.raises(shmheap.ShmHeapError):
            shmheap.Heap.attach(shm_heap_name, timeout=0.5)
    finally:
        os.unlink(path(shm_heap_name))


@FUZZ
@given(data=st.binary(min_size=8, max_size=64), at=st.integers(0, control.SIZE // 8 - 1))
def test_random_words_in_a_real_control_segment(shm_heap_factory: HeapFactory, data: bytes,
                                                at: int) -> None:
    name = closed_heap(shm_heap_factory)
    write_at(name, "", at * 8, data)
    exercise(name)


@FUZZ
@given(generation=st.one_of(st.just(0), st.integers(0, 2**32 - 1)),
       length=st.one_of(st.integers(0, 1100), st.integers(0, 2**32 - 1)))
def test_impossible_index_header(shm_heap_factory: HeapFactory, generation: int,
                                 length: int) -> None:
    heap = shm_heap_factory(reserve=False)
    heap.grow()
    cap = heap.info().index_cap
    heap._header[0] = control.make_header(generation, length)
    if generation == 0 and length <= cap:
        # Within bounds: readable, but the index no longer matches the one real arena.
        assert len(heap.snapshot()) == length
        assert any(f.fatal for f in heap.check()) == (length != 1)
    else:
        with pytest.raises(shmheap.HeapCorruptError):
            heap.snapshot()
        with pytest.raises(shmheap.HeapCorruptError):
            heap.grow()
        assert any(f.fatal for f in heap.check())


@pytest.mark.parametrize("size", [0, 3, 4095, 8192])
def test_index_generation_of_the_wrong_size(shm_heap_factory: HeapFactory, size: int) -> None:
    name = closed_heap(shm_heap_factory)
    os.truncate(path(name, ".i0"), size)
    other = shmheap.Heap.attach(name)
    try:
        with pytest.raises(shmheap.HeapCorruptError):
            other.snapshot()
        assert any(f.code == "header" for f in other.check())
    finally:
        other.close()


@pytest.mark.parametrize("suffix", [".live", ".map", ".i0"])
def test_missing_or_truncated_segments(shm_heap_factory: HeapFactory, suffix: str) -> None:
    name = closed_heap(shm_heap_factory)
    os.truncate(path(name, suffix), 1)
    exercise(name)
    os.unlink(path(name, suffix))
    exercise(name)


@FUZZ
@given(data=st.binary(min_size=1, max_size=256), at=st.integers(0, liveness.SIZE - 1))
def test_random_bytes_in_the_liveness_segment(shm_heap_factory: HeapFactory, data: bytes,
                                              at: int) -> None:
    name = closed_heap(shm_heap_factory)
    write_at(name, ".live", at, data)
    exercise(name)


def test_arena_with_a_wrong_trailer(shm_heap_factory: HeapFactory) -> None:
    name = closed_heap(shm_heap_factory)
    write_at(name, ".a1", 64 * 1024 + 8, struct.pack("<Q", 12345))  # the trailer's heap id
    other = shmheap.Heap.attach(name)
    try:
        with pytest.raises(shmheap.HeapCorruptError, match="not arena"):
            other.arena(1)
        assert [f.code for f in other.check()] == ["arena-lost"]
    finally:
        other.close()
