"""Every public call of the Heap API, on real segments in /dev/shm."""

from __future__ import annotations

import os
import stat

import numpy
import pytest

import shmheap
from shmheap import control, names
from shmheap.pytest_plugin import HeapFactory, assert_no_shm_leftovers, shm_leftovers

KIB = 1024
ARENA = 64 * KIB
FIRST_CAP = names.PAGE_SIZE // 4


def stamp(arena: shmheap.Arena) -> None:
    """Write the arena's index into its first 8 bytes."""
    arena.buf[:8] = arena.index.to_bytes(8, "little")


def stamp_of(arena: shmheap.Arena) -> int:
    return int.from_bytes(arena.buf[:8], "little")


def file_mode(entry: str) -> int:
    return stat.S_IMODE(os.stat(f"{names.SHM_DIR}/{entry}").st_mode)


# -- create, attach, open, close, destroy ------------------------------------------------


def test_create_makes_an_empty_heap(shm_heap_factory: HeapFactory) -> None:
    heap = shm_heap_factory(max_arenas=1000)
    assert not heap.readonly and not heap.closed
    assert heap.arena_size == ARENA and heap.max_arenas == 1000
    info = heap.info()
    assert (info.name, info.arenas, info.index_len) == (heap.name, 0, 0)
    assert (info.index_cap, info.index_generations) == (FIRST_CAP, 1)
    assert info.index_bytes == FIRST_CAP * 4
    assert (info.arena_size, info.max_arenas, info.recoveries) == (ARENA, 1000, 0)
    assert info.attached == 1
    assert len(heap.snapshot()) == 0
    assert list(heap.arenas()) == []
    base = names.control_name(heap.name)
    assert shm_leftovers(heap.name) == sorted(
        [base, f"{base}.live", f"{base}.map", f"{base}.sum", f"{base}.roots", f"{base}.i0",
         names.semaphore_file(heap.name)])


def test_segments_are_created_mode_0600(shm_heap: shmheap.Heap) -> None:
    shm_heap.grow()
    entries = shm_leftovers(shm_heap.name)
    assert any(e.endswith(".a1") for e in entries)
    assert {e: file_mode(e) for e in entries} == {e: 0o600 for e in entries}


def test_mode_is_applied_to_every_segment(shm_heap_factory: HeapFactory) -> None:
    heap = shm_heap_factory(mode=0o660)  # group-writable: the umask must not narrow it
    for _ in range(FIRST_CAP + 1):  # one index doubling: generation 1 too
        heap.grow()
    entries = [e for e in shm_leftovers(heap.name) if not e.startswith("sem.")]
    assert {f".i{g}" for g in (0, 1)} | {".a1", ".live", ".map", ".sum", ".roots"} <= {
        e[e.rfind("."):] for e in entries}
    assert {e: file_mode(e) for e in entries} == {e: 0o660 for e in entries}


def test_mode_is_applied_to_the_semaphore(shm_heap_factory: HeapFactory) -> None:
    heap = shm_heap_factory(mode=0o660)
    assert file_mode(names.semaphore_file(heap.name)) == 0o660


def test_attach_sees_the_same_heap(shm_heap: shmheap.Heap) -> None:
    first = shm_heap.grow()
    first.buf[:5] = b"hello"
    other = shmheap.Heap.attach(shm_heap.name)
    try:
        assert other.params == shm_heap.params
        assert not other.readonly
        assert list(other.snapshot()) == [1]
        assert bytes(other.arena(1).buf[:5]) == b"hello"
        second = other.grow()
        second.buf[-3:] = b"end"
        assert list(shm_heap.snapshot()) == [1, 2]
        assert bytes(shm_heap.arena(2).buf[-3:]) == b"end"
        assert shm_heap.info().attached == 2
    finally:
        other.close()
    assert shm_heap.info().attached == 1


def test_attach_readonly_maps_everything_readonly(shm_heap: shmheap.Heap) -> None:
    stamp(shm_heap.grow())
    ro = shmheap.Heap.attach(shm_heap.name, readonly=True)
    try:
        assert ro.readonly
        arena = ro.arena(1)
        assert arena.buf.readonly and stamp_of(arena) == 1
        assert list(ro.snapshot()) == [1]
        stamp(shm_heap.grow())
        assert [stamp_of(a) for a in ro.arenas()] == [1, 2]
        assert ro.info().readonly and ro.info().arenas == 2
        assert ro.check() == []
    finally:
        ro.close()


def test_context_manager_closes_but_does_not_destroy(shm_heap_factory: HeapFactory) -> None:
    with shm_heap_factory() as heap:
        stamp(heap.grow())
    assert heap.closed
    with shmheap.Heap.attach(heap.name) as again:
        assert list(again.snapshot()) == [1]
        assert stamp_of(again.arena(1)) == 1
    assert again.closed


def test_close_keeps_the_heap_and_is_idempotent(shm_heap: shmheap.Heap) -> None:
    shm_heap.grow()
    before = shm_leftovers(shm_heap.name)
    shm_heap.close()
    shm_heap.close()
    assert shm_heap.closed
    assert shm_leftovers(shm_heap.name) == before
    with shmheap.Heap.attach(shm_heap.name) as again:
        assert again.info().attached == 1


def test_destroy_removes_every_object(shm_heap: shmheap.Heap) -> None:
    for _ in range(3):
        shm_heap.grow()
    shm_heap.destroy()
    assert shm_heap.closed
    assert_no_shm_leftovers(shm_heap.name)
    with pytest.raises(shmheap.HeapNotFoundError):
        shmheap.Heap.attach(shm_heap.name)



def test_a_grow_that_meets_a_destroy_removes_its_arena_again(shm_heap: shmheap.Heap) -> None:
    shm_heap.grow()
    before = shm_leftovers(shm_heap.name)
    # A destroy has begun (its first step: the word) and listed the files before the grow's
    # link: the grow must remove what it linked, or the destroy would leave it behind.
    fd = os.open(f"{names.SHM_DIR}/{names.control_name(shm_heap.name)}", os.O_RDWR)
    try:
        control.mark_destroyed(fd)
    finally:
        os.close(fd)
    with pytest.raises(shmheap.HeapNotFoundError, match="was destroyed"):
        shm_heap.grow()
    assert shm_leftovers(shm_heap.name) == before  # neither its final nor its temporary name

def test_module_destroy_by_name_reports_what_it_removed(shm_heap: shmheap.Heap) -> None:
    shm_heap.grow()
    expected = shm_leftovers(shm_heap.name)
    shm_heap.close()
    assert sorted(shmheap.destroy(shm_heap.name)) == expected
    assert_no_shm_leftovers(shm_heap.name)


def test_module_destroy_removes_a_heap_others_have_attached(shm_heap: shmheap.Heap) -> None:
    shm_heap.grow()
    shmheap.destroy(shm_heap.name)
    assert_no_shm_leftovers(shm_heap.name)
    assert stamp_of(shm_heap.arena(1)) == 0  # the mapping stays valid


def test_open_creates_then_attaches(shm_heap_name: str) -> None:
    with shmheap.Heap.open(shm_heap_name, create=True, arena_size=ARENA) as first:
        assert first.arena_size == ARENA
        first.grow()
        with shmheap.Heap.open(shm_heap_name, create=True, arena_size=ARENA) as second:
            assert second.params.heap_id == first.params.heap_id
            assert list(second.snapshot()) == [1]
        with shmheap.Heap.open(shm_heap_name, create=False, readonly=True) as ro:
            assert ro.readonly and ro.params.heap_id == first.params.heap_id
        with shmheap.Heap.open(shm_heap_name, readonly=True) as ro:
            assert ro.readonly


def test_open_creates_only_when_asked(shm_heap_name: str) -> None:
    with pytest.raises(shmheap.HeapNotFoundError, match=shm_heap_name):
        shmheap.Heap.open(shm_heap_name)
    with pytest.raises(shmheap.HeapNotFoundError):
        shmheap.Heap.open(shm_heap_name, readonly=True)
    with pytest.raises(shmheap.InvalidParameterError, match="create=True"):
        shmheap.Heap.open(shm_heap_name, arena_size=ARENA)
    assert shm_leftovers(shm_heap_name) == [], "a missing heap is not created"


def test_open_readonly_creates_then_attaches_readonly(shm_heap_name: str) -> None:
    with shmheap.Heap.open(shm_heap_name, create=True, readonly=True, arena_size=ARENA) as ro:
        assert ro.readonly and ro.arena_size == ARENA
        assert ro.info().attached == 1


# -- grow and arena ----------------------------------------------------------------------


def test_grow_returns_a_mapped_arena(shm_heap: shmheap.Heap) -> None:
    arena = shm_heap.grow()
    assert (arena.index, arena.base, arena.size) == (1, ARENA, ARENA)
    assert len(arena.buf) == ARENA and not arena.buf.readonly
    assert bytes(arena.buf[:16]) == bytes(16)
    arena.buf[:] = b"\xab" * ARENA
    assert shm_heap.arena(1) is arena
    with shmheap.Heap.attach(shm_heap.name) as other:
        assert bytes(other.arena(1).buf) == b"\xab" * ARENA
    second = shm_heap.grow()
    assert (second.index, second.base) == (2, 2 * ARENA)
    assert 1 in shm_heap and 2 in shm_heap and 3 not in shm_heap


def test_grow_at_a_chosen_index(shm_heap: shmheap.Heap) -> None:
    arena = shm_heap.grow(at=1000)
    assert (arena.index, arena.base, arena.size) == (1000, 1000 * ARENA, ARENA)
    assert f"{names.control_name(shm_heap.name)}.a3e8" in shm_leftovers(shm_heap.name)
    assert list(shm_heap.snapshot()) == [1000]
    assert shm_heap.grow().index == 1  # grow(at=) does not move the hint
    assert shm_heap.info().hint == 2



def test_grow_refuses_an_arena_dev_shm_cannot_hold_after_trusted_looks(
        shm_heap_factory: HeapFactory) -> None:
    small = shm_heap_factory(reserve=False)
    for _ in range(3):  # one look at the free space, trusted for the next small arenas
        small.grow()
    fs = os.statvfs("/dev/shm")
    too_big = 1 << max(30, (fs.f_bavail * fs.f_frsize).bit_length())
    big = shm_heap_factory(arena_size=too_big, max_arenas=2, reserve=False)
    before = shm_leftovers(big.name)
    with pytest.raises(shmheap.OutOfSharedMemoryError, match="df -h"):
        big.grow()
    assert shm_leftovers(big.name) == before and len(big.snapshot()) == 0
    assert small.grow().index == 4 and big.check() == []

def test_arena_maps_lazily_and_raises_keyerror_for_none(shm_heap: shmheap.Heap) -> None:
    for _ in range(3):
        stamp(shm_heap.grow())
    with shmheap.Heap.attach(shm_heap.name) as other:
        arena = other.arena(2)
        assert (arena.index, arena.base, stamp_of(arena)) == (2, 2 * ARENA, 2)
        assert other.arena(2) is arena
        for missing in (0, 4, -1, shm_heap.max_arenas, shm_heap.max_arenas + 5):
            with pytest.raises(KeyError):
                other.arena(missing)


def test_arenas_yields_arena_objects_in_creation_order(shm_heap: shmheap.Heap) -> None:
    for at in (7, 3, 100):
        stamp(shm_heap.grow(at=at))
    stamp(shm_heap.grow())
    arenas = list(shm_heap.arenas())
    assert [a.index for a in arenas] == [7, 3, 100, 1]
    assert [stamp_of(a) for a in arenas] == [7, 3, 100, 1]
    assert [a.base for a in arenas] == [i * ARENA for i in (7, 3, 100, 1)]


def test_info_counts_arenas_and_index(shm_heap: shmheap.Heap) -> None:
    for _ in range(5):
        shm_heap.grow()
    info = shm_heap.info()
    assert (info.arenas, info.index_len, info.index_cap) == (5, 5, FIRST_CAP)
    assert (info.index_generations, info.index_bytes) == (1, FIRST_CAP * 4)
    assert (info.arena_size, info.max_arenas, info.recoveries) == (ARENA, shm_heap.max_arenas, 0)
    assert info.hint == 6
    assert info.as_dict()["arenas"] == 5


# -- snapshots -----------------------------------------------------------------------------


def test_snapshot_is_a_sequence_of_arena_indices(shm_heap: shmheap.Heap) -> None:
    order = [9, 2, 1, 30, 3]
    for at in order:
        shm_heap.grow(at=at)
    snap = shm_heap.snapshot()
    assert isinstance(snap, shmheap.ArenaSnapshot)
    assert len(snap) == 5
    assert (snap[0], snap[4], snap[-1], snap[-5]) == (9, 3, 3, 9)
    with pytest.raises(IndexError):
        snap[5]
    assert list(snap) == order and snap.tolist() == order
    assert snap[1:3] == [2, 1] and snap[::-1] == order[::-1] and snap[:] == order
    assert snap == order and snap == tuple(order)
    assert 30 in snap and 4 not in snap
    assert snap.index(30) == 3 and snap.count(1) == 1
    assert list(reversed(snap)) == order[::-1]
    assert "9, 2, 1" in repr(snap)


def test_snapshot_view_is_zero_copy_and_read_only(shm_heap: shmheap.Heap) -> None:
    for at in (5, 1, 2):
        shm_heap.grow(at=at)
    view = shm_heap.snapshot().view()
    assert isinstance(view, memoryview)
    assert view.readonly and view.format == "I" and view.itemsize == 4
    assert view.tolist() == [5, 1, 2]
    index_segment = numpy.frombuffer(shm_heap._index.generation(0), numpy.uint32)
    assert (numpy.asarray(view).__array_interface__["data"][0]
            == index_segment.__array_interface__["data"][0]), "the index segment itself, no copy"
    with pytest.raises(TypeError):
        view[0] = 7
    array = numpy.asarray(view)
    assert array.dtype == numpy.uint32 and not array.flags.writeable
    assert array.tolist() == [5, 1, 2] and int(array.sum()) == 8


def test_snapshot_does_not_change_when_the_heap_grows(shm_heap: shmheap.Heap) -> None:
    shm_heap.grow()
    before = shm_heap.snapshot()
    shm_heap.grow()
    after = shm_heap.snapshot()
    assert list(before) == [1] and list(after) == [1, 2]
    assert shm_heap.snapshot() == after


def test_empty_snapshot(shm_heap: shmheap.Heap) -> None:
    snap = shm_heap.snapshot()
    assert len(snap) == 0 and list(snap) == [] and snap[:] == []
    assert numpy.asarray(snap.view()).shape == (0,)


# -- the index doubles ----------------------------------------------------------------


def test_index_doubles_and_keeps_old_generations(shm_heap_factory: HeapFactory) -> None:
    heap = shm_heap_factory(reserve=False)
    for _ in range(FIRST_CAP):
        stamp(heap.grow())
    full = heap.snapshot()
    assert full.generation == 0 and len(full) == FIRST_CAP
    expect_generations = [(FIRST_CAP, 1, FIRST_CAP), (FIRST_CAP + 1, 2, 2 * FIRST_CAP),
                          (2 * FIRST_CAP + 1, 3, 4 * FIRST_CAP)]
    snapshots = [full]
    for length, generations, cap in expect_generations:
        while len(heap.snapshot()) < length:
            stamp(heap.grow())
        info = heap.info()
        assert (info.index_len, info.index_generations, info.index_cap) == (
            length, generations, cap)
        assert info.index_bytes == sum(FIRST_CAP << g for g in range(generations)) * 4
        assert info.index_bytes <= 2 * cap * 4 + names.PAGE_SIZE
        snapshots.append(heap.snapshot())
    entries = set(shm_leftovers(heap.name))
    for generation in range(3):
        seg = names.index_name(heap.name, generation)
        assert seg in entries
        assert os.stat(f"{names.SHM_DIR}/{seg}").st_size == (FIRST_CAP << generation) * 4
    final = heap.snapshot()
    assert final.generation == 2
    assert list(final) == list(range(1, 2 * FIRST_CAP + 2))
    for snap in snapshots:  # taken before later doublings, still readable after them
        assert list(snap) == list(range(1, len(snap) + 1))
        assert numpy.array_equal(numpy.asarray(snap.view()),
                                 numpy.asarray(final.view())[:len(snap)])
    with shmheap.Heap.attach(heap.name, readonly=True) as ro:
        assert [stamp_of(a) for a in ro.arenas()] == list(final)


# -- placement: hints, collisions, wrap ----------------------------------------------------


def test_grow_skips_indices_taken_by_grow_at(shm_heap: shmheap.Heap) -> None:
    shm_heap.grow(at=5)
    for _ in range(5):
        shm_heap.grow()
    assert list(shm_heap.snapshot()) == [5, 1, 2, 3, 4, 6]


def test_grow_skips_a_foreign_file_and_leaves_it_intact(shm_heap: shmheap.Heap) -> None:
    for _ in range(6):
        shm_heap.grow()
    foreign = f"{names.SHM_DIR}/{names.arena_name(shm_heap.name, 7)}"
    with open(foreign, "wb") as out:
        out.write(b"not an arena")
    assert shm_heap.grow().index == 8
    assert list(shm_heap.snapshot()) == [1, 2, 3, 4, 5, 6, 8]
    with open(foreign, "rb") as back:
        assert back.read() == b"not an arena"
    with pytest.raises(KeyError):
        shm_heap.arena(7)


def test_grow_wraps_to_a_free_low_index(shm_heap_factory: HeapFactory) -> None:
    heap = shm_heap_factory(max_arenas=8)  # arena indices 1..7
    foreign = [f"{names.SHM_DIR}/{names.arena_name(heap.name, i)}" for i in (1, 2)]
    for path in foreign:
        with open(path, "wb"):
            pass
    assert [heap.grow().index for _ in range(5)] == [3, 4, 5, 6, 7]
    assert heap.info().hint == 8
    for path in foreign:
        os.unlink(path)
    assert [heap.grow().index for _ in range(2)] == [1, 2]
    with pytest.raises(shmheap.AddressSpaceExhaustedError):
        heap.grow()
    assert list(heap.snapshot()) == [3, 4, 5, 6, 7, 1, 2]
    assert heap.check() == []


def test_snapshot_stays_readable_after_close_and_destroy(shm_heap: shmheap.Heap) -> None:
    for _ in range(FIRST_CAP + 3):  # two generations mapped
        shm_heap.grow()
    old = shm_heap.snapshot()
    shm_heap.grow()
    new = shm_heap.snapshot()
    shm_heap.destroy()
    assert list(old) == list(range(1, FIRST_CAP + 4))
    assert list(new) == list(range(1, FIRST_CAP + 5))
    assert numpy.asarray(new.view())[-1] == FIRST_CAP + 4
