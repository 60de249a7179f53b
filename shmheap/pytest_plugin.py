"""pytest plugin: fixtures that make shmheap heaps and make sure they leave no trace.

Loaded by pytest through the ``pytest11`` entry point ``shmheap``, so any test
suite of a project that has shmheap installed can use:

``shm_heap``
    A fresh heap with a unique name and small (64 KiB) arenas.  Afterwards it is
    destroyed, even when the test failed or already destroyed it itself, and
    the fixture fails if anything of it is left in /dev/shm.
``shm_heap_factory``
    ``make(name=None, **create_args) -> Heap`` for tests that need several
    heaps or other parameters; every heap it made is destroyed afterwards.
``shm_heap_name``
    A unique heap name that nothing exists under yet, for tests that create
    the heap some other way (in a child process, by ``Heap.open``, by hand);
    whatever exists under it afterwards is destroyed, and the fixture fails
    if anything of it survives that.

Helpers for tests that manage heaps themselves: ``unique_heap_name`` and
``assert_no_shm_leftovers``.  Names from ``unique_heap_name`` carry the pid of
the test session, also when a worker process of the session makes them, so
a session-wide leak check can tell its own heaps from those of other runs.

This module only creates and destroys heaps of the names it hands out; it
never touches another heap's objects.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .errors import HeapNotFoundError
from .heap import Heap, destroy
from .names import SHM_DIR, check_name, owns

#: Arena size of the fixtures' heaps unless a test asks for another.
TEST_ARENA_SIZE = 64 * 1024

_counter = itertools.count()
#: The environment variable that carries the pid of the test session into every
#: process it starts, so that names made there name the session too.
SESSION_ENV = "SHMHEAP_TEST_SESSION_PID"
#: What ``unique_heap_name`` puts after the prefix: the session's pid.
_SESSION_TAG = re.compile(r"_p(\d+)_[0-9a-f]+$")

HeapFactory = Callable[..., Heap]


def pytest_configure(config: pytest.Config) -> None:
    """Mark this process as the test session (unless a session started it)."""
    os.environ.setdefault(SESSION_ENV, str(os.getpid()))


def unique_heap_name(prefix: str = "t") -> str:
    """A heap name no other process or test will use: ``<prefix>_p<pid>_<counter><random>``.

    ``pid`` is the test session's (see SESSION_ENV), else this process's.
    """
    session = os.environ.get(SESSION_ENV, str(os.getpid()))
    return f"{prefix}_p{session}_{next(_counter):x}{secrets.token_hex(3)}"


def session_of(name: str) -> int | None:
    """The pid of the test session (or process) whose ``unique_heap_name`` made ``name``."""
    match = _SESSION_TAG.search(name)
    return int(match.group(1)) if match else None


def shm_leftovers(name: str) -> list[str]:
    """Every entry of /dev/shm that belongs to heap ``name``, sorted."""
    return sorted(entry for entry in os.listdir(SHM_DIR) if owns(name, entry))


def assert_no_shm_leftovers(name: str) -> None:
    """Fail, listing them, if any object of heap ``name`` is still in /dev/shm."""
    __tracebackhide__ = True
    left = shm_leftovers(name)
    if left:
        listing = "\n".join(f"  {SHM_DIR}/{entry}" for entry in left)
        raise AssertionError(
            f"heap {name!r} left {len(left)} object(s) in {SHM_DIR}:\n{listing}\n"
            f"remove them with `shmheap destroy {name}`"
        )


def discard(name: str, *heaps: Heap) -> None:
    """Close ``heaps`` (handles on heap ``name``) and destroy the heap if it still exists
    (``force``: a worker the test left attached does not keep it)."""
    for heap in heaps:
        heap.close()
    with contextlib.suppress(HeapNotFoundError):
        destroy(name, force=True)


@pytest.fixture
def shm_heap_factory() -> Iterator[HeapFactory]:
    """``make(name=None, **create_args)``: create heaps; all are destroyed afterwards."""
    made: dict[str, list[Heap]] = {}

    def make(name: str | None = None, **create_args: Any) -> Heap:
        name = check_name(name or unique_heap_name())
        create_args.setdefault("arena_size", TEST_ARENA_SIZE)
        made.setdefault(name, [])  # a failed create is checked for leftovers too
        heap = Heap.create(name, **create_args)
        made[name].append(heap)
        return heap

    try:
        yield make
    finally:
        for name, heaps in made.items():
            discard(name, *heaps)
    for name in made:
        assert_no_shm_leftovers(name)


@pytest.fixture
def shm_heap(shm_heap_factory: HeapFactory) -> Heap:
    """A fresh heap with 64 KiB arenas, destroyed afterwards."""
    return shm_heap_factory()


@pytest.fixture
def shm_heap_name() -> Iterator[str]:
    """A unique, unused heap name; whatever exists under it afterwards is destroyed."""
    name = unique_heap_name()
    try:
        yield name
    finally:
        discard(name)
    assert_no_shm_leftovers(name)
