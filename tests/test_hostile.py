"""Hostile shared memory: corrupt segments give HeapCorruptError, never a crash or a hang.

Hypothesis writes random bytes, truncations and impossible numbers into a heap's
segments; every public call must then either work or raise a ShmHeapError, and
must not read out of bounds or allocate without bound.  Then one test per value
that was found unchecked (issue 9), repair keeping what it cannot prove to be
garbage, and a seeded fuzz of every segment's metadata in a subprocess with a
memory limit (fuzz_worker.py), where a signal or a huge allocation fails too.
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct
import subprocess
import sys
from collections.abc import Callable

import pytest
from children import run_child
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmheap
from shmheap import control, liveness, roots
from shmheap import pages as pages_module
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
                     lambda: list(heap.arenas(timeout=2)), lambda: dict(heap.roots)):
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


@pytest.mark.parametrize("suffix", [".live", ".map", ".i0", ".roots"])
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


ROOT_NAMES = ["w", "weights", "é" * 20, "x" * 255]


def rooted_heap(factory: HeapFactory) -> str:
    """A closed heap with roots bound to a small and a large object, and one unbound."""
    heap = factory(reserve=False)
    small, large = heap.alloc(100), heap.alloc(20000)
    for number, name in enumerate(ROOT_NAMES):
        heap.roots[name] = (small, large)[number % 2]
    del heap.roots["w"]
    heap.close()
    return heap.name


def exercise_roots(name: str) -> None:
    """Every roots call on a heap whose roots table may be damaged: works or ShmHeapError."""
    try:
        heap = shmheap.Heap.attach(name, timeout=0.5)
    except shmheap.ShmHeapError:
        return
    def bind_many() -> None:
        for i in range(150):  # past a rebuild
            heap.roots.bind(f"n{i}", heap.alloc(16), timeout=2)

    try:
        calls: list[Callable[[], object]] = [
            functools.partial(heap.roots.get, n) for n in ROOT_NAMES]
        calls += [lambda: dict(heap.roots), lambda: len(heap.roots), lambda: list(heap.roots),
                  lambda: heap.info(timeout=2), lambda: heap.check(timeout=2),
                  lambda: heap.roots.bind("new", heap.alloc(16), timeout=2),
                  lambda: heap.roots.unbind("weights", timeout=2),
                  lambda: heap.check(repair=True, timeout=2), bind_many,
                  lambda: dict(heap.roots), lambda: heap.check(timeout=2)]
        for call in calls:
            with contextlib.suppress(shmheap.ShmHeapError):
                call()
    finally:
        heap.close()


@FUZZ
@given(data=st.binary(min_size=1, max_size=64),
       at=st.one_of(st.integers(0, 256),
                    st.integers(roots.region_offset(0), roots.MIN_SIZE - 1)))
def test_random_bytes_in_the_roots_table(shm_heap_factory: HeapFactory, data: bytes,
                                         at: int) -> None:
    name = rooted_heap(shm_heap_factory)
    write_at(name, ".roots", at, data)
    exercise_roots(name)


@pytest.mark.parametrize("size", [0, 100, 4096, roots.MIN_SIZE - 1, roots.MAX_SIZE + 4096])
def test_a_roots_segment_of_the_wrong_size_is_heap_corrupt(shm_heap_factory: HeapFactory,
                                                           size: int) -> None:
    name = rooted_heap(shm_heap_factory)
    os.truncate(path(name, ".roots"), size)
    heap = shmheap.Heap.attach(name)  # the roots segment is opened on first use
    try:
        with pytest.raises(shmheap.HeapCorruptError, match="roots segment"):
            len(heap.roots)
    finally:
        heap.close()


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


# -- values read from shared memory are bounds-checked (issue 9, item 6) -------------------


def shmheap_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["shmheap", *argv], capture_output=True, text=True, timeout=60)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 1, result
    assert result.stderr.startswith("shmheap: error: ") and result.stderr.count("\n") == 1, (
        result.stderr)
    for word in words:
        assert word in result.stderr


@pytest.mark.parametrize("entry", [0xDEADBEEF, 7])
def test_an_index_entry_naming_no_arena_is_heap_corrupt(shm_heap_factory: HeapFactory,
                                                       entry: int) -> None:
    name = closed_heap(shm_heap_factory)
    write_at(name, ".i0", 0, struct.pack("<I", entry))
    with shmheap.Heap.attach(name) as heap:
        # (alloc() finds free pages through the summaries, not the index: it does not
        # read the garbage entry, and is not asked to notice it.)
        for call in (lambda: list(heap.walk()), heap.stats, lambda: list(heap.arenas())):
            with pytest.raises(shmheap.HeapCorruptError, match=f"arena {entry}.*fsck"):
                call()
    assert_one_line_error(shmheap_cli("info", name), "fsck")


def test_a_huge_cycle_word_does_not_stop_mark_and_sweep(shm_heap: shmheap.Heap) -> None:
    ref = shm_heap.alloc(100)
    shm_heap._words[control.CYCLE_OFFSET // 8] = 2**64 - 1
    assert shm_heap.start_cycle() == 1
    shm_heap.mark(ref)
    assert shm_heap.sweep().objects_freed == 0
    assert shm_heap.size_of(ref) >= 100


def large_object(heap: shmheap.Heap, npages: int) -> tuple[int, pages_module.ArenaPages, int]:
    """A large object of ``npages`` (> 4) pages: (ref, its arena's pages, its first page)."""
    ref = heap.alloc(npages * heap.params.page_size)
    assert heap.size_of(ref) == npages * heap.params.page_size
    allocator = heap._objects()
    pages = allocator.pages_of(ref >> allocator.arena_shift)
    return ref, pages, (ref & allocator.arena_mask) >> allocator.page_shift


@pytest.mark.parametrize("npages", [2**31, 0xFFFFFFFF, 7])
def test_garbage_npages_of_a_large_object(shm_heap: shmheap.Heap, npages: int) -> None:
    ref, pages, start = large_object(shm_heap, 5)
    pages.npages[start] = npages
    with pytest.raises(shmheap.HeapCorruptError, match="fsck"):
        shm_heap.size_of(ref)
    with pytest.raises(shmheap.HeapCorruptError, match="fsck"):
        shm_heap.free(ref)
    assert pages.seq[0] % 2 == 0  # nothing was changed half-way
    assert all(pages.used[start:start + 5])
    pages.npages[start] = 5
    shm_heap.free(ref)
    assert shm_heap.check() == []


def test_garbage_used_bytes_are_heap_corrupt_until_repaired(shm_heap: shmheap.Heap) -> None:
    ref, pages, _start = large_object(shm_heap, 5)
    pages.used[pages.pages - 1] = 0xFF
    for call in (shm_heap.stats, shm_heap.scavenge, shm_heap.arena_usage):
        with pytest.raises(shmheap.HeapCorruptError, match="fsck"):
            call()
    assert [f.code for f in shm_heap.check(repair=True)] == ["pages-orphaned"]
    assert shm_heap.stats().pages_in_use == 5
    assert shm_heap.scavenge().pages == pages.pages - 5
    assert shm_heap.check() == []
    assert shm_heap.size_of(ref) == 5 * shm_heap.params.page_size


def test_sweep_never_frees_spans_described_by_garbage(shm_heap: shmheap.Heap) -> None:
    ref, pages, start = large_object(shm_heap, 5)
    shm_heap.view(ref)[:4] = b"live"
    shm_heap.start_cycle()
    shm_heap.mark(ref)
    pages.inuse[0] = 0xFF  # every page of the first eight looks like a span's first page
    for page in range(1, 8):
        pages.npages[page] = 1
    assert shm_heap.sweep().spans_freed == 0
    assert all(pages.used[start:start + 5])
    assert bytes(shm_heap.view(ref)[:4]) == b"live"
    assert {f.code for f in shm_heap.check(repair=True)} == {"span-overlap"}


@pytest.mark.parametrize("seq", [2**64 - 1, 2**64 - 2])
def test_a_sequence_word_at_its_limit_wraps(shm_heap: shmheap.Heap, seq: int) -> None:
    ref, pages, _start = large_object(shm_heap, 5)
    pages.seq[0] = seq
    assert [f.code for f in shm_heap.check(repair=True)] == (["span-seq-odd"] if seq % 2 else [])
    shm_heap.free(ref)  # one change of the span records: across the wrap
    assert pages.seq[0] % 2 == 0 and shm_heap.check() == []


def test_a_truncated_semaphore_file_is_an_error_not_sigbus(
        shm_heap_factory: HeapFactory) -> None:
    name = closed_heap(shm_heap_factory)
    os.truncate(f"/dev/shm/sem.shmheap.{name}.lock", 0)
    proc = run_child(f"""
        import shmheap
        try:
            shmheap.Heap.attach({name!r})
        except shmheap.HeapCorruptError as exc:
            print(exc)
        """)
    assert proc.returncode == 0 and "sem.shmheap" in proc.stdout, proc
    assert_one_line_error(shmheap_cli("info", name), "sem.shmheap")


# -- repair never destroys data on corrupt evidence (item 7) -------------------------------


@pytest.mark.parametrize("damage", ["garbage index entry", "deleted arena", "truncated arena"])
def test_repair_keeps_the_arenas_of_this_heap_and_marks_it_broken(
        shm_heap_factory: HeapFactory, damage: str) -> None:
    heap = shm_heap_factory(reserve=False)
    heap.grow()
    heap.grow()
    ref = heap.alloc(100)
    heap.view(ref)[:4] = b"live"
    name = heap.name
    heap.close()
    if damage == "garbage index entry":
        write_at(name, ".i0", 0, struct.pack("<I", 0xDEADBEEF))  # was arena 1, holding ref
    elif damage == "deleted arena":
        os.unlink(path(name, ".a2"))
    else:
        os.truncate(path(name, ".a2"), 100)
    result = shmheap_cli("fsck", "--repair", name)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result
    assert "FATAL" in result.stdout, result.stdout
    assert os.path.exists(path(name, ".a1"))
    with open(path(name, ".a1"), "rb") as arena:
        assert b"live" in arena.read(64 * 1024)
    with shmheap.Heap.attach(name) as other, pytest.raises(shmheap.HeapCorruptError,
                                                           match="broken"):
        other.snapshot()
    if damage == "garbage index entry":
        assert "arena 1" in result.stdout and "destroy" in result.stdout


# -- the seeded fuzz of every segment's metadata -------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_seeded_fuzz_of_shared_metadata(seed: int) -> None:
    worker = os.path.join(os.path.dirname(__file__), "fuzz_worker.py")
    proc = subprocess.run([sys.executable, worker, str(seed), "30"], capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stderr[-6000:]}"
