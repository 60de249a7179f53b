"""Bad input gets a typed error with a helpful message and leaves nothing behind.

Damaged heaps are made by hand in /dev/shm: a control segment with a foreign
magic, a future layout version, a truncated one; a heap missing one of its
objects.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy
import pytest

import shmheap
from shmheap import names
from shmheap.control import LAYOUT_VERSION
from shmheap.pytest_plugin import HeapFactory, shm_leftovers

ARENA = 64 * 1024
INVALID_NAMES: list[Any] = ["", "a" * 49, "a.b", "a/b", "../x", "a b", "é", "a\0b", 7, None]


def shm_path(entry: str) -> str:
    return f"{names.SHM_DIR}/{entry}"


def write_shm(entry: str, data: bytes) -> None:
    with open(shm_path(entry), "wb") as out:
        out.write(data)


def control_bytes(heap: shmheap.Heap) -> bytes:
    with open(shm_path(names.control_name(heap.name)), "rb") as seg:
        return seg.read()


def no_temp_arena(heap: shmheap.Heap) -> bool:
    return not os.path.lexists(shm_path(f"{names.control_name(heap.name)}.new"))


# -- names ---------------------------------------------------------------------------------


CALLS_TAKING_A_NAME: dict[str, Callable[[Any], object]] = {
    "create": lambda name: shmheap.Heap.create(name, arena_size=ARENA),
    "attach": shmheap.Heap.attach,
    "attach_readonly": lambda name: shmheap.Heap.attach(name, readonly=True),
    "open": lambda name: shmheap.Heap.open(name, create=True, arena_size=ARENA),
    "open_no_create": lambda name: shmheap.Heap.open(name, create=False),
    "destroy": shmheap.destroy,
}


@pytest.mark.parametrize("call", sorted(CALLS_TAKING_A_NAME))
@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_names_raise_invalid_name_error(call: str, name: Any) -> None:
    with pytest.raises(shmheap.InvalidNameError) as caught:
        CALLS_TAKING_A_NAME[call](name)
    assert isinstance(caught.value, ValueError)
    if isinstance(name, str):
        assert repr(name) in str(caught.value)
        assert "[A-Za-z0-9_-]" in str(caught.value)
        assert not os.path.lexists(shm_path(f"shmheap.{name}".replace("\0", "")))


def test_longest_name_is_accepted(shm_heap_factory: HeapFactory) -> None:
    name = "n" + str(os.getpid()).rjust(47, "0")
    heap = shm_heap_factory(name)
    assert heap.name == name and len(name) == 48


# -- parameters ----------------------------------------------------------------------------


@pytest.mark.parametrize(("arena_size", "words"), [
    (3 * ARENA, "power of two"), (ARENA // 2, "at least 64 KiB"), (0, "power of two"),
    (-ARENA, "power of two"), (1 << 63, "too large"), (float(ARENA), "must be an int"),
    ("64KiB", "must be an int"), (True, "must be an int"), (None, "must be an int"),
])
def test_bad_arena_size(shm_heap_name: str, arena_size: Any, words: str) -> None:
    with pytest.raises(shmheap.InvalidParameterError, match=words) as caught:
        shmheap.Heap.create(shm_heap_name, arena_size=arena_size)
    assert isinstance(caught.value, ValueError)
    assert "arena_size" in str(caught.value)
    assert shm_leftovers(shm_heap_name) == []


@pytest.mark.parametrize(("max_arenas", "arena_size", "words"), [
    (1, ARENA, "at least 2"), (0, ARENA, "at least 2"), (-5, ARENA, "at least 2"),
    (1 << 32, ARENA, "32-bit"), (1 << 24, 1 << 40, "63-bit"), (2.0, ARENA, "must be an int"),
    ("8", ARENA, "must be an int"), (True, ARENA, "must be an int"),
])
def test_bad_max_arenas(shm_heap_name: str, max_arenas: Any, arena_size: int,
                        words: str) -> None:
    with pytest.raises(shmheap.InvalidParameterError, match=words) as caught:
        shmheap.Heap.create(shm_heap_name, arena_size=arena_size, max_arenas=max_arenas)
    assert "max_arenas" in str(caught.value)
    assert shm_leftovers(shm_heap_name) == []


@pytest.mark.parametrize("mode", [-1, 0o1000, 0o4700, "0600", 1.5])
def test_bad_mode(shm_heap_name: str, mode: Any) -> None:
    with pytest.raises(shmheap.InvalidParameterError, match="mode"):
        shmheap.Heap.create(shm_heap_name, arena_size=ARENA, mode=mode)
    assert shm_leftovers(shm_heap_name) == []


@pytest.mark.parametrize("mode", [0o000, 0o400, 0o200, 0o066, 0o177])
def test_mode_without_owner_read_write_is_refused(shm_heap_name: str, mode: int) -> None:
    with pytest.raises(shmheap.InvalidParameterError, match="lacks owner read-write"):
        shmheap.Heap.create(shm_heap_name, arena_size=ARENA, mode=mode)
    assert shm_leftovers(shm_heap_name) == []


def test_smallest_heap_is_accepted(shm_heap_factory: HeapFactory) -> None:
    heap = shm_heap_factory(arena_size=ARENA, max_arenas=2)
    assert heap.grow().index == 1
    with pytest.raises(shmheap.AddressSpaceExhaustedError):
        heap.grow()


# -- existing and missing heaps ----------------------------------------------------------


def test_create_on_an_existing_name(shm_heap: shmheap.Heap) -> None:
    shm_heap.grow()
    before = shm_leftovers(shm_heap.name)
    with pytest.raises(shmheap.HeapExistsError) as caught:
        shmheap.Heap.create(shm_heap.name, arena_size=2 * ARENA)
    assert isinstance(caught.value, FileExistsError)
    assert repr(shm_heap.name) in str(caught.value) and "attach" in str(caught.value)
    assert shm_leftovers(shm_heap.name) == before
    with shmheap.Heap.attach(shm_heap.name) as again:
        assert again.params == shm_heap.params
        assert list(again.snapshot()) == [1]


@pytest.mark.parametrize("call", ["attach", "attach_readonly", "open_no_create", "destroy"])
def test_missing_heap(shm_heap_name: str, call: str) -> None:
    with pytest.raises(shmheap.HeapNotFoundError) as caught:
        CALLS_TAKING_A_NAME[call](shm_heap_name)
    assert isinstance(caught.value, FileNotFoundError)
    assert repr(shm_heap_name) in str(caught.value)
    assert shm_leftovers(shm_heap_name) == []


# -- damaged control segments ------------------------------------------------------------


def with_field(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value):]


DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "wrong magic": lambda real: with_field(real, 0, b"notheap\0"),
    "garbage": lambda real: b"\xa5" * len(real),
    "future version": lambda real: with_field(real, 8, (LAYOUT_VERSION + 1).to_bytes(4, "little")),
    "unknown state": lambda real: with_field(real, 12, (77).to_bytes(4, "little")),
    "impossible arena_size": lambda real: with_field(real, 24, (12345).to_bytes(8, "little")),
    "never initialised": lambda real: bytes(len(real)),
    "truncated to a few bytes": lambda real: real[:10],
    "truncated to the parameters": lambda real: real[:100],
    "too long": lambda real: real + bytes(64),
    "empty": lambda real: b"",
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_attach_to_a_damaged_control_segment(shm_heap_factory: HeapFactory, shm_heap_name: str,
                                             damage: str) -> None:
    real = control_bytes(shm_heap_factory())
    control = names.control_name(shm_heap_name)
    write_shm(control, DAMAGE[damage](real))
    if damage == "empty":  # an empty one may be a creator's that has not locked it yet
        stale = time.time() - 60
        os.utime(f"/dev/shm/{control}", (stale, stale))
    attaches: list[Callable[[], shmheap.Heap]] = [
        lambda: shmheap.Heap.attach(shm_heap_name, timeout=1.0),
        lambda: shmheap.Heap.attach(shm_heap_name, readonly=True, timeout=1.0),
        lambda: shmheap.Heap.open(shm_heap_name, create=True, arena_size=ARENA),
    ]
    for attach in attaches:
        with pytest.raises(shmheap.HeapCorruptError) as caught:
            attach()
        assert shm_heap_name in str(caught.value)
        assert shm_leftovers(shm_heap_name) == [control]
    assert shmheap.destroy(shm_heap_name) == [control]


def test_future_version_is_a_version_error(shm_heap_factory: HeapFactory,
                                           shm_heap_name: str) -> None:
    write_shm(names.control_name(shm_heap_name),
              DAMAGE["future version"](control_bytes(shm_heap_factory())))
    with pytest.raises(shmheap.HeapVersionError, match=f"layout version {LAYOUT_VERSION + 1}"):
        shmheap.Heap.attach(shm_heap_name)


@pytest.mark.parametrize("part", ["live", "map", "i0", "sem", "a1"])
def test_heap_missing_one_of_its_objects(shm_heap: shmheap.Heap, part: str) -> None:
    shm_heap.grow()
    shm_heap.close()
    missing = (names.semaphore_file(shm_heap.name) if part == "sem"
               else f"{names.control_name(shm_heap.name)}.{part}")
    os.unlink(shm_path(missing))
    before = shm_leftovers(shm_heap.name)
    with pytest.raises(shmheap.HeapCorruptError) as caught, \
            shmheap.Heap.attach(shm_heap.name) as heap:
        list(heap.arenas())
    assert shm_heap.name in str(caught.value)
    assert shm_leftovers(shm_heap.name) == before
    assert sorted(shmheap.destroy(shm_heap.name)) == before


# -- grow ------------------------------------------------------------------------------------


@pytest.mark.parametrize("at", [0, -1, 16, 17, 1 << 40, "3", 2.0, True])
def test_grow_at_out_of_range(shm_heap_factory: HeapFactory, at: Any) -> None:
    heap = shm_heap_factory(max_arenas=16)
    before = shm_leftovers(heap.name)
    with pytest.raises(shmheap.InvalidParameterError, match=r"grow\(at=") as caught:
        heap.grow(at=at)
    assert "[1, 16)" in str(caught.value)
    assert shm_leftovers(heap.name) == before
    assert len(heap.snapshot()) == 0


def test_grow_at_a_taken_index(shm_heap: shmheap.Heap) -> None:
    shm_heap.grow(at=3)
    with pytest.raises(shmheap.ArenaCollisionError) as caught:
        shm_heap.grow(at=3)
    assert isinstance(caught.value, FileExistsError)
    assert repr(shm_heap.name) in str(caught.value) and " 3 " in str(caught.value)
    assert list(shm_heap.snapshot()) == [3]
    assert no_temp_arena(shm_heap) and shm_heap.check() == []


def test_grow_at_an_index_whose_name_is_taken(shm_heap: shmheap.Heap) -> None:
    foreign = names.arena_name(shm_heap.name, 4)
    write_shm(foreign, b"foreign")
    with pytest.raises(shmheap.ArenaCollisionError, match="already taken"):
        shm_heap.grow(at=4)
    with open(shm_path(foreign), "rb") as back:
        assert back.read() == b"foreign"
    assert len(shm_heap.snapshot()) == 0
    assert no_temp_arena(shm_heap)


def test_grow_when_every_arena_is_used(shm_heap_factory: HeapFactory) -> None:
    heap = shm_heap_factory(max_arenas=4)
    assert [heap.grow().index for _ in range(3)] == [1, 2, 3]
    before = shm_leftovers(heap.name)
    with pytest.raises(shmheap.AddressSpaceExhaustedError) as caught:
        heap.grow()
    assert isinstance(caught.value, MemoryError)
    assert repr(heap.name) in str(caught.value) and "max_arenas" in str(caught.value)
    with pytest.raises(shmheap.ArenaCollisionError):
        heap.grow(at=2)
    assert shm_leftovers(heap.name) == before
    assert list(heap.snapshot()) == [1, 2, 3]
    assert heap.check() == []


def test_grow_times_out_while_a_live_process_holds_the_lock(shm_heap: shmheap.Heap) -> None:
    with shmheap.Heap.attach(shm_heap.name) as other, other.locked():
        with pytest.raises(shmheap.LockTimeoutError) as caught:
            shm_heap.grow(timeout=0.05)
        assert isinstance(caught.value, TimeoutError)
        with pytest.raises(shmheap.LockTimeoutError):
            shm_heap.snapshot(timeout=0.05)
    assert len(shm_heap.snapshot()) == 0
    assert no_temp_arena(shm_heap)


#: an object too big for any size class (whose free takes the lock)
LARGE = 100_000
#: every call that can wait for the heap lock, as ``call(heap, large_ref, timeout)``
WAITING_CALLS: dict[str, Callable[[shmheap.Heap, int, Any], object]] = {
    "snapshot": lambda h, ref, t: h.snapshot(timeout=t),
    "arenas": lambda h, ref, t: list(h.arenas(timeout=t)),
    "grow": lambda h, ref, t: h.grow(timeout=t),
    "check": lambda h, ref, t: h.check(timeout=t),
    "info": lambda h, ref, t: h.info(timeout=t),
    "locked": lambda h, ref, t: h.locked(timeout=t).__enter__(),
    "alloc": lambda h, ref, t: h.alloc(64, timeout=t),
    "alloc_large": lambda h, ref, t: h.alloc(LARGE, timeout=t),
    "free_large": lambda h, ref, t: h.free(ref, timeout=t),
    "walk": lambda h, ref, t: list(h.walk(timeout=t)),
    "stats": lambda h, ref, t: h.stats(timeout=t),
    "start_cycle": lambda h, ref, t: h.start_cycle(timeout=t),
    "mark": lambda h, ref, t: h.mark(ref, timeout=t),
    "sweep": lambda h, ref, t: h.sweep(timeout=t),
    "scavenge": lambda h, ref, t: h.scavenge(timeout=t),
}


@pytest.mark.parametrize("call", sorted(WAITING_CALLS))
def test_every_waiting_call_honours_its_timeout(shm_heap_factory: HeapFactory,
                                                 call: str) -> None:
    heap = shm_heap_factory(arena_size=256 * 1024)
    ref = heap.alloc(LARGE)
    heap.start_cycle()  # so that mark() has a pageMarks bit to set
    with shmheap.Heap.attach(heap.name) as fresh, shmheap.Heap.attach(heap.name) as holder:
        with holder.locked(), pytest.raises(shmheap.LockTimeoutError, match="alive"):
            WAITING_CALLS[call](fresh, ref, 0.05)
        WAITING_CALLS[call](fresh, ref, 5.0)  # and it works once the lock is free
    assert heap.check() == []


@pytest.mark.parametrize("timeout", [-1, -0.5, float("nan"), float("inf"), "1", True, [1]])
@pytest.mark.parametrize("call", [*sorted(WAITING_CALLS), "attach", "open", "view", "size_of"])
def test_bad_timeouts_are_invalid_parameters(shm_heap_factory: HeapFactory, call: str,
                                              timeout: Any) -> None:
    shm_heap = shm_heap_factory(arena_size=256 * 1024)
    ref = shm_heap.alloc(100)
    more: dict[str, Callable[[shmheap.Heap, int, Any], object]] = {
        "attach": lambda h, r, t: shmheap.Heap.attach(h.name, timeout=t),
        "open": lambda h, r, t: shmheap.Heap.open(h.name, timeout=t),
        "view": lambda h, r, t: h.view(r, timeout=t),
        "size_of": lambda h, r, t: h.size_of(r, timeout=t),
    }
    with pytest.raises(shmheap.InvalidParameterError, match="timeout"):
        {**WAITING_CALLS, **more}[call](shm_heap, ref, timeout)
    assert shm_heap.size_of(ref) >= 100, "nothing was done"


# -- readonly --------------------------------------------------------------------------------


def test_writes_through_a_readonly_heap(shm_heap: shmheap.Heap) -> None:
    shm_heap.grow().buf[:4] = b"data"
    with shmheap.Heap.attach(shm_heap.name, readonly=True) as ro:
        for call in (ro.grow, lambda: ro.grow(at=9), lambda: ro.check(repair=True)):
            with pytest.raises(shmheap.ReadOnlyError) as caught:
                call()
            assert isinstance(caught.value, PermissionError)
            assert repr(shm_heap.name) in str(caught.value) and "readonly" in str(caught.value)
        arena = ro.arena(1)
        with pytest.raises(TypeError, match="cannot modify read-only memory"):
            arena.buf[0] = 1
        with pytest.raises(TypeError, match="cannot modify read-only memory"):
            arena.buf[:4] = b"evil"
        assert not numpy.asarray(arena.buf).flags.writeable
        assert bytes(arena.buf[:4]) == b"data"
        assert list(ro.snapshot()) == [1]


# -- closed heaps ----------------------------------------------------------------------------


USES_OF_A_HEAP: dict[str, Callable[[shmheap.Heap], object]] = {
    "grow": lambda heap: heap.grow(),
    "grow_at": lambda heap: heap.grow(at=2),
    "arena": lambda heap: heap.arena(1),
    "snapshot": lambda heap: heap.snapshot(),
    "arenas": lambda heap: list(heap.arenas()),
    "info": lambda heap: heap.info(),
    "check": lambda heap: heap.check(),
    "contains": lambda heap: 1 in heap,
    "destroy": lambda heap: heap.destroy(),
}


def enter_locked(heap: shmheap.Heap) -> None:
    with heap.locked():
        pass


@pytest.mark.parametrize("how", ["close", "destroy"])
@pytest.mark.parametrize("use", [*sorted(USES_OF_A_HEAP), "locked"])
def test_using_a_closed_heap(shm_heap: shmheap.Heap, how: str, use: str) -> None:
    shm_heap.grow()
    shm_heap.close() if how == "close" else shm_heap.destroy()
    with pytest.raises(shmheap.HeapClosedError) as caught:
        USES_OF_A_HEAP.get(use, enter_locked)(shm_heap)
    assert repr(shm_heap.name) in str(caught.value) and "attach" in str(caught.value)
