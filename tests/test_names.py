"""Heap names, the names of the objects a heap owns, size parsing, and test names."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import shmheap
from shmheap import names
from shmheap.pytest_plugin import session_of, unique_heap_name

VALID_NAMES = ["a", "A", "0", "_", "-", "exp1", "My-Heap_2", "a" * 48]
INVALID_NAMES = ["", "a" * 49, "a.b", "a/b", "../x", "a b", "é", "a\0b", "a\n", "sem.x"]


@pytest.mark.parametrize("name", VALID_NAMES)
def test_valid_names_pass(name: str) -> None:
    assert names.check_name(name) == name


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_names_raise_with_the_name_and_the_rule(name: str) -> None:
    with pytest.raises(shmheap.InvalidNameError) as caught:
        names.check_name(name)
    assert isinstance(caught.value, ValueError)
    assert repr(name) in str(caught.value)
    assert "[A-Za-z0-9_-]" in str(caught.value)


@pytest.mark.parametrize("name", [None, 12, b"abc", ["a"]])
def test_non_str_names_raise(name: object) -> None:
    with pytest.raises(shmheap.InvalidNameError, match="must be a str"):
        names.check_name(name)


def test_object_names() -> None:
    assert names.control_name("h") == "shmheap.h"
    assert names.live_name("h") == "shmheap.h.live"
    assert names.map_name("h") == "shmheap.h.map"
    assert names.roots_name("h") == "shmheap.h.roots"
    assert names.index_name("h", 3) == "shmheap.h.i3"
    assert names.semaphore_name("h") == "/shmheap.h.lock"
    assert names.semaphore_file("h") == "sem.shmheap.h.lock"


@pytest.mark.parametrize(("index", "suffix"), [(1, "a1"), (10, "aa"), (255, "aff"),
                                               (1000, "a3e8"), ((1 << 32) - 2, "afffffffe")])
def test_arena_names_are_lowercase_hex(index: int, suffix: str) -> None:
    assert names.arena_name("h", index) == f"shmheap.h.{suffix}"


def test_owns_every_object_of_the_heap_and_nothing_else() -> None:
    mine = ["shmheap.h", "shmheap.h.live", "shmheap.h.map", "shmheap.h.sum", "shmheap.h.i0",
            "shmheap.h.roots", "shmheap.h.a1",
            "shmheap.h.new", "sem.shmheap.h.lock"]
    others = ["shmheap.hh", "shmheap.h2.a1", "shmheap.", "sem.shmheap.h.lockx",
              "sem.shmheap.hh.lock", "xshmheap.h", "h", "psm_1234"]
    assert all(names.owns("h", entry) for entry in mine)
    assert not any(names.owns("h", entry) for entry in others)


def test_heap_of() -> None:
    assert names.heap_of("shmheap.h") == "h"
    assert names.heap_of("shmheap.h.a3e8") == "h"
    assert names.heap_of("sem.shmheap.h-1.lock") == "h-1"
    assert names.heap_of("sem.shmheap.h.other") is None
    assert names.heap_of("psm_1234") is None
    assert names.heap_of("shmheap.bad name") is None


def test_real_heap_objects_are_all_owned(shm_heap: shmheap.Heap) -> None:
    shm_heap.grow()
    shm_heap.grow(at=0x3E8)
    entries = sorted(e for e in os.listdir(names.SHM_DIR) if names.owns(shm_heap.name, e))
    base = names.control_name(shm_heap.name)
    assert entries == sorted([base, f"{base}.live", f"{base}.map", f"{base}.sum", f"{base}.i0",
                              f"{base}.roots", f"{base}.a1",
                              f"{base}.a3e8", names.semaphore_file(shm_heap.name)])
    assert {names.heap_of(e) for e in entries} == {shm_heap.name}



def test_unique_heap_names_are_valid_distinct_and_carry_the_pid() -> None:
    made = {unique_heap_name() for _ in range(1000)}
    assert len(made) == 1000
    for name in made:
        assert names.check_name(name) == name
        assert session_of(name) == os.getpid()
    assert unique_heap_name("bench").startswith("bench_p")
    assert session_of("exp1") is None


def test_names_made_in_a_child_process_carry_the_session_pid() -> None:
    made = subprocess.run(
        [sys.executable, "-c",
         "from shmheap.pytest_plugin import unique_heap_name; print(unique_heap_name())"],
        check=True, capture_output=True, text=True).stdout.strip()
    assert names.check_name(made) == made
    assert session_of(made) == os.getpid()
