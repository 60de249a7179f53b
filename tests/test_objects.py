"""``heap.put(obj)`` / ``heap.get(ref)``: any picklable value, its buffers stored once and got
back as zero-copy views, across spawned processes and in both cores."""

from __future__ import annotations

import multiprocessing
import pickle
import threading
from collections.abc import Callable
from typing import Any

import numpy
import objects_workers as workers
import pytest

import shmheap
from shmheap import objects
from shmheap.pytest_plugin import HeapFactory

ARENA = 1 << 20
SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture
def heap(shm_heap_factory: HeapFactory) -> shmheap.Heap:
    return shm_heap_factory(arena_size=ARENA, reserve=False)


def in_child(target: Callable[..., None], *args: Any) -> Any:
    """Run ``target(*args, conn)`` in a spawned interpreter; what it sent."""
    parent, child = SPAWN.Pipe()
    proc = SPAWN.Process(target=target, args=(*args, child))
    proc.start()
    child.close()
    try:
        if not parent.poll(120):
            raise AssertionError("the child sent nothing in 120 s")
        return parent.recv()
    finally:
        parent.close()
        proc.join(60)
        code = proc.exitcode
        if code is None:
            proc.kill()
            proc.join()
        proc.close()
    assert code == 0, f"the child failed with exit code {code}"


def test_values_put_here_are_equal_in_another_process(heap: shmheap.Heap) -> None:
    refs = {key: heap.put(value) for key, value in workers.values().items()}
    assert in_child(workers.check_values, heap.name, refs) == []
    for key, value in workers.values().items():
        assert workers.same(heap.get(refs[key]), value), key
        heap.free(refs[key])
    assert heap.stats().live_objects == 0


def test_values_and_arrays_put_elsewhere_are_equal_here(heap: shmheap.Heap) -> None:
    refs = in_child(workers.put_values, heap.name)
    expected = {**workers.values(), **workers.arrays()}
    assert [key for key, ref in refs.items() if not workers.same(heap.get(ref), expected[key])
            ] == []
    for ref in refs.values():
        heap.free(ref)


def test_arrays_are_views_of_the_heap_in_every_process(heap: shmheap.Heap) -> None:
    arrays = workers.arrays()
    refs = {key: heap.put(array) for key, array in arrays.items()}
    assert in_child(workers.check_arrays, heap.name, refs) == []
    for key, array in arrays.items():
        got = heap.get(refs[key])
        assert workers.same(got, array) is not workers.shared(array), (
            f"{key}: the other process's write through get(writable=True) is seen here")
        if workers.shared(array):
            assert workers.first_byte(got)[0] == workers.first_byte(array)[0] ^ 0xFF, key
        del got
        heap.free(refs[key])


def test_an_array_is_stored_once_beside_its_pickle(heap: shmheap.Heap) -> None:
    array = numpy.arange(100_000, dtype="f8")
    ref = heap.put(array)
    assert heap.nbytes(ref) < array.nbytes + 512, "the data is not in the pickle stream too"
    got = heap.get(ref)
    start = got.ctypes.data - heap.ndarray(ref, "u1").ctypes.data
    assert 0 < start < 512 and (ref + start) % objects.ALIGN == 0, "aligned in heap addresses"
    del got
    heap.free(ref)


def test_writable_views_and_memoryviews(heap: shmheap.Heap) -> None:
    ref = heap.put({"m": memoryview(bytearray(b"abcd" * 500)).cast("I", (10, 50)),
                    "a": numpy.zeros(3)})
    value = heap.get(ref, writable=True)
    assert value["m"].format == "I" and value["m"].shape == (10, 50) and not value["m"].readonly
    value["a"][1] = 5.0
    value["m"][0, 0] = 7
    again = heap.get(ref)
    assert again["a"][1] == 5.0 and again["m"][0, 0] == 7 and again["m"].readonly
    del value, again
    heap.free(ref)


def test_a_value_larger_than_an_arena_is_one_giant_object(heap: shmheap.Heap) -> None:
    array = numpy.arange(3 * ARENA // 8, dtype="u8")
    ref = heap.put(array)
    assert heap.size_of(ref) > 3 * ARENA
    got = heap.get(ref)
    assert (got == array).all() and numpy.shares_memory(got, heap.ndarray(ref, "u1"))
    del got
    heap.free(ref)


def test_bad_values_and_refs_are_typed_errors(heap: shmheap.Heap) -> None:
    with pytest.raises(shmheap.InvalidParameterError, match="cannot be pickled"):
        heap.put(lambda: None)
    with pytest.raises(shmheap.InvalidParameterError, match="cannot be pickled"):
        heap.put({"lock": threading.Lock()})
    plain = heap.alloc(100)
    with pytest.raises(shmheap.InvalidRefError, match="not made by put"):
        heap.get(plain)
    ref = heap.put([1, 2, 3])
    copy = heap.alloc(heap.nbytes(ref))
    heap.view(copy)[:] = heap.view(ref)  # the record names its own address, not this one
    with pytest.raises(shmheap.InvalidRefError, match="not made by put"):
        heap.get(copy)
    heap.view(ref)[objects.HEADER.size] ^= 0xFF  # the stream, which the crc does not cover
    with pytest.raises((shmheap.HeapCorruptError, pickle.UnpicklingError)):
        heap.get(ref)
    heap.free(ref)
    with pytest.raises(shmheap.InvalidRefError):
        heap.get(ref)
    ro = shmheap.Heap.attach(heap.name, readonly=True)
    try:
        mine = heap.put(numpy.ones(4))
        assert not ro.get(mine).flags.writeable
        with pytest.raises(shmheap.ReadOnlyError):
            ro.get(mine, writable=True)
        with pytest.raises(shmheap.ReadOnlyError):
            ro.put(1)
        heap.free(mine)
    finally:
        ro.close()
    for other in (plain, copy):
        heap.free(other)
