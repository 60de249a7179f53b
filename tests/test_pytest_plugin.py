"""The pytest plugin: fixtures clean up after failing tests; the leftover check names
every leftover object.  Inner test sessions run with ``pytester``."""

from __future__ import annotations

import pytest

import shmheap
from shmheap.pytest_plugin import (
    TEST_ARENA_SIZE,
    HeapFactory,
    assert_no_shm_leftovers,
    shm_leftovers,
)

pytest_plugins = ["pytester"]

INNER_TESTS = """
import pathlib
import shmheap

NAMES = pathlib.Path("names.txt")

def remember(*heaps):
    with NAMES.open("a") as out:
        out.writelines(heap.name + "\\n" for heap in heaps)

def test_fails_with_a_heap(shm_heap):
    remember(shm_heap)
    shm_heap.grow()
    assert False, "this test fails on purpose"

def test_destroys_its_heap(shm_heap):
    remember(shm_heap)
    shm_heap.destroy()

def test_closes_its_heap(shm_heap):
    remember(shm_heap)
    shm_heap.close()

def test_factory_heaps_then_fails(shm_heap_factory):
    heaps = [shm_heap_factory(), shm_heap_factory(max_arenas=8), shm_heap_factory(mode=0o640)]
    remember(*heaps)
    heaps[1].grow(at=7)
    raise RuntimeError("this test fails on purpose")

def test_name_fixture(shm_heap_name):
    remember(shmheap.Heap.create(shm_heap_name, arena_size=1 << 16))
"""


def test_fixtures_destroy_their_heaps_even_when_tests_fail(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, failed=2, errors=0)
    made = (pytester.path / "names.txt").read_text().split()
    assert len(made) == 7
    for name in made:
        assert_no_shm_leftovers(name)


def test_factory_defaults_to_small_arenas(shm_heap_factory: HeapFactory,
                                          shm_heap: shmheap.Heap) -> None:
    assert shm_heap.arena_size == TEST_ARENA_SIZE
    other = shm_heap_factory(arena_size=2 * TEST_ARENA_SIZE)
    assert other.arena_size == 2 * TEST_ARENA_SIZE and other.name != shm_heap.name


def test_leftover_check_lists_every_object(shm_heap: shmheap.Heap) -> None:
    shm_heap.grow()
    left = shm_leftovers(shm_heap.name)
    assert len(left) == 8
    with pytest.raises(AssertionError) as caught:
        assert_no_shm_leftovers(shm_heap.name)
    message = str(caught.value)
    assert f"heap {shm_heap.name!r} left 8 object(s)" in message
    assert all(f"/dev/shm/{entry}" in message for entry in left)
    assert f"shmheap destroy {shm_heap.name}" in message
