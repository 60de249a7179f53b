"""The object allocator: alloc/free/view/size_of, size classes, caches, bad input, crashes.

Real heaps in /dev/shm, real child processes (fresh interpreters) for everything
that crosses a process boundary, and a Hypothesis state machine that checks the
allocator against a dict model.
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
import pickle
from typing import Any

import pytest
from alloc_workers import size_class
from children import assert_killed, run_child
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

import shmheap
from shmheap import layout, summary
from shmheap.allocator import SPARE_SPANS, size_classes
from shmheap.names import PAGE_SIZE, summary_name
from shmheap.pytest_plugin import HeapFactory, discard, unique_heap_name

ARENA = 256 * 1024
RECOVERY_TIMEOUT = 30.0


@pytest.fixture
def heap(shm_heap_factory: HeapFactory) -> shmheap.Heap:
    return shm_heap_factory(arena_size=ARENA)


def pattern(ref: int, size: int) -> bytes:
    word = ((ref * 0x9E3779B97F4A7C15) & (2**64 - 1)).to_bytes(8, "little")
    return (word * (size // 8 + 1))[:size]


def assert_no_overlap(h: shmheap.Heap, refs: list[int]) -> None:
    spans = sorted((ref, ref + h.size_of(ref)) for ref in refs)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, "two live objects overlap"


# -- basics ------------------------------------------------------------------------------


def test_alloc_returns_zeroed_objects_of_exactly_the_size(heap: shmheap.Heap) -> None:
    sizes = [0, 1, 15, 16, 17, 100, 1000, 4000, 8000, 9000, 30000, 50000, 100000]
    refs = [heap.alloc(n) for n in sizes]
    for ref, n in zip(refs, sizes, strict=True):
        assert type(ref) is int and ref > 0
        assert heap.size_of(ref) >= n
        assert heap.nbytes(ref) == n
        view = heap.view(ref)
        assert len(view) == n
        assert bytes(view) == bytes(len(view))
        view[:] = pattern(ref, len(view))
    assert_no_overlap(heap, refs)
    for ref, n in zip(refs, sizes, strict=True):
        assert bytes(heap.view(ref)) == pattern(ref, n)
    for ref in refs:
        heap.free(ref)
    assert heap.stats().live_objects == 0
    assert heap.check() == []


def test_freed_slots_come_back_zeroed(heap: shmheap.Heap) -> None:
    refs = [heap.alloc(64) for _ in range(50)]
    for ref in refs:
        heap.view(ref)[:] = b"\xff" * 64
        heap.free(ref)
    again = [heap.alloc(64) for _ in range(200)]
    assert set(refs) <= set(again), "freed slots of the cached span are reused"
    assert all(bytes(heap.view(ref)) == bytes(64) for ref in again)


def test_large_objects_take_whole_pages_and_come_back_zeroed(heap: shmheap.Heap) -> None:
    page = heap.params.page_size
    ref = heap.alloc(6 * page + 1)  # over the largest size class
    assert ref % page == 0
    assert heap.size_of(ref) == 7 * page
    heap.view(ref)[:] = b"\xee" * (6 * page + 1)
    heap.free(ref)
    again = heap.alloc(7 * page)
    assert again == ref, "the freed pages are reused first"
    assert bytes(heap.view(again)) == bytes(7 * page)


def test_an_object_may_fill_a_whole_arena(heap: shmheap.Heap) -> None:
    ref = heap.alloc(ARENA)
    assert heap.size_of(ref) == ARENA
    assert ref % ARENA == 0
    heap.free(ref)


def test_the_heap_grows_when_its_arenas_are_full(heap: shmheap.Heap) -> None:
    refs = [heap.alloc(20000) for _ in range(60)]
    assert heap.info().arenas >= 5
    assert_no_overlap(heap, refs)
    assert {ref // ARENA for ref in refs} == set(heap.snapshot())


def test_refs_are_plain_ints_that_work_in_another_process(heap: shmheap.Heap) -> None:
    refs = [heap.alloc(n) for n in (24, 3000, 70000)]
    assert pickle.loads(pickle.dumps(refs)) == refs
    for ref in refs:
        heap.view(ref)[:8] = ref.to_bytes(8, "little")
    proc = run_child(f"""
        import shmheap
        h = shmheap.Heap.attach({heap.name!r})
        refs = {refs!r}
        for ref in refs:
            assert bytes(h.view(ref)[:8]) == ref.to_bytes(8, "little")
        h.view(refs[0])[:4] = b"back"
        h.free(refs[1])
        print(h.alloc(24))
        h.close()
        """)
    assert proc.returncode == 0, proc.stderr
    child_ref = int(proc.stdout)
    assert bytes(heap.view(refs[0])[:4]) == b"back"
    with pytest.raises(shmheap.DoubleFreeError):
        heap.free(refs[1])
    assert heap.size_of(child_ref) == 32
    heap.free(child_ref)  # an object of a process that is gone
    assert heap.check() == []


def test_size_classes_cover_every_small_size_with_little_waste() -> None:
    for page_size, pages in ((4096, 16), (8192, 32), (8192, 8192), (65536, 16)):
        classes = size_classes(page_size, pages)
        sizes = [c.size for c in classes[1:]]
        assert sizes == sorted(set(sizes)) and sizes[0] == 16
        for cls in classes[1:]:
            span = cls.npages * page_size
            assert cls.objects_at >= 2 * cls.nelems and cls.objects_at % 16 == 0
            assert cls.objects_at + cls.nelems * cls.size <= span
            assert cls.size % 16 == 0 and cls.npages <= min(8, pages // 2)


@pytest.mark.parametrize(("arena_size", "page_size"), [(64 << 10, 8192), (256 << 10, 4096),
                                                       (64 << 20, 8192), (1 << 20, 65536)])
def test_page_metadata_is_at_most_one_percent(arena_size: int, page_size: int) -> None:
    assert layout.meta_size(arena_size, page_size) <= arena_size / 100


def test_page_size_is_a_heap_parameter(shm_heap_factory: HeapFactory) -> None:
    h = shm_heap_factory(arena_size=ARENA, page_size=4096)
    ref = h.alloc(30000)  # large with 4 KiB pages (small with 8 KiB ones)
    assert h.size_of(ref) == 8 * 4096
    other = shmheap.Heap.attach(h.name)
    try:
        assert other.params.page_size == 4096
        assert other.size_of(ref) == 8 * 4096
    finally:
        other.close()


@pytest.mark.parametrize("page_size", [0, 1000, 3 * 4096, 64 << 10, "8k", True])
def test_bad_page_sizes_are_rejected(shm_heap_name: str, page_size: object) -> None:
    with pytest.raises(shmheap.InvalidParameterError, match="page_size"):
        shmheap.Heap.create(shm_heap_name, arena_size=ARENA // 2,
                            page_size=page_size)  # type: ignore[arg-type]


# -- numpy -------------------------------------------------------------------------------


def test_ndarray_is_a_zero_copy_view(heap: shmheap.Heap) -> None:
    np = pytest.importorskip("numpy")
    ref = heap.alloc(800)
    arr = heap.ndarray(ref, np.float64, (10, 10))
    assert arr.shape == (10, 10)
    arr[3, 4] = 2.5
    assert np.frombuffer(heap.view(ref), np.float64)[34] == 2.5
    whole = heap.ndarray(ref, np.uint8)
    assert len(whole) == heap.nbytes(ref)
    with pytest.raises(shmheap.InvalidParameterError, match="needs"):
        heap.ndarray(ref, np.float64, (1000,))
    with pytest.raises(shmheap.InvalidParameterError, match="dtype"):
        heap.ndarray(ref, "not a dtype")
    refs = np.array([ref, heap.alloc(np.int64(64))], dtype=np.uint64)  # refs kept in numpy
    assert heap.size_of(refs[0]) == heap.size_of(ref)
    heap.free(refs[1])
    ro = shmheap.Heap.attach(heap.name, readonly=True)
    try:
        view = ro.ndarray(ref, np.float64, 100)
        assert view[34] == 2.5
        assert not view.flags.writeable
    finally:
        del view
        ro.close()


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("nbytes", [-1, 1.5, "64", None, True, 10**30,
                                    shmheap.heap.DEFAULT_MAX_ARENAS * ARENA])  # one arena too many
def test_bad_sizes_are_typed_errors(heap: shmheap.Heap, nbytes: object) -> None:
    with pytest.raises(shmheap.InvalidParameterError):
        heap.alloc(nbytes)  # type: ignore[arg-type]
    assert heap.check() == []


def test_bad_refs_are_typed_errors(heap: shmheap.Heap, shm_heap_factory: HeapFactory) -> None:
    small = heap.alloc(100)
    large = heap.alloc(50000)
    size = heap.size_of(small)
    bad: list[object] = [0, -8, None, "x", 1.0, True, 2**70, 500 * ARENA + 16, small + 16,
                         small + 1, large + 8, large + heap.params.page_size, small - size,
                         (small // ARENA) * ARENA]
    for ref in bad:
        for op in (heap.free, heap.view, heap.size_of, heap.mark):
            with pytest.raises(shmheap.InvalidRefError):
                op(ref)  # type: ignore[arg-type]
    other = shm_heap_factory(arena_size=ARENA)
    foreign = other.alloc(100_000)
    with pytest.raises(shmheap.InvalidRefError):
        heap.free(foreign)  # an address here too, but not the start of a live object
    assert bytes(heap.view(small)) == bytes(100)
    assert heap.check() == []


def test_double_free_is_detected(heap: shmheap.Heap) -> None:
    small = heap.alloc(40)
    large = heap.alloc(3 * heap.params.page_size)
    for ref in (small, large):
        heap.free(ref)
        with pytest.raises(shmheap.DoubleFreeError):
            heap.free(ref)
        with pytest.raises(shmheap.InvalidRefError):
            heap.view(ref)
    assert heap.check() == []


def test_readonly_heap_reads_but_never_writes(heap: shmheap.Heap) -> None:
    ref = heap.alloc(64)
    heap.view(ref)[:3] = b"abc"
    ro = shmheap.Heap.attach(heap.name, readonly=True)
    try:
        view = ro.view(ref)
        assert bytes(view[:3]) == b"abc"
        assert view.readonly
        with pytest.raises(TypeError):
            view[0] = 1
        for call in (lambda: ro.alloc(8), lambda: ro.free(ref), ro.start_cycle, ro.sweep,
                     ro.scavenge, lambda: ro.mark(ref)):
            with pytest.raises(shmheap.ReadOnlyError):
                call()
        assert ro.size_of(ref) == 64
        assert ro.stats().live_objects == 1
    finally:
        del view
        ro.close()


def test_closed_heap_refuses_objects(shm_heap_factory: HeapFactory) -> None:
    h = shm_heap_factory(arena_size=ARENA)
    ref = h.alloc(64)
    h.close()
    for call in (lambda: h.alloc(64), lambda: h.free(ref), lambda: h.view(ref), h.stats):
        with pytest.raises(shmheap.HeapClosedError):
            call()


def test_address_space_exhausted_is_typed_and_recoverable(
        shm_heap_factory: HeapFactory) -> None:
    h = shm_heap_factory(arena_size=64 * 1024, max_arenas=3)  # arenas 1 and 2 only
    refs = []
    with pytest.raises(shmheap.AddressSpaceExhaustedError):
        while True:
            refs.append(h.alloc(32 * 1024))
    assert len(refs) == 4
    with pytest.raises(shmheap.AddressSpaceExhaustedError):
        h.alloc(3000)
    assert h.check() == []
    h.free(refs.pop())
    refs.append(h.alloc(3000))
    assert h.check() == []


def test_a_full_dev_shm_is_an_out_of_memory_error(shm_heap_factory: HeapFactory) -> None:
    stat = os.statvfs("/dev/shm")
    too_big = 1 << max(30, (stat.f_bavail * stat.f_frsize).bit_length())
    h = shm_heap_factory(arena_size=too_big, max_arenas=2, reserve=False)
    with pytest.raises(shmheap.OutOfSharedMemoryError):
        h.alloc(100)
    assert h.check() == []


# -- dead owners and crashes -------------------------------------------------------------


def test_spans_cached_by_a_dead_process_are_reclaimed(heap: shmheap.Heap) -> None:
    proc = run_child(f"""
        import json, os, shmheap
        h = shmheap.Heap.attach({heap.name!r})
        refs = [h.alloc(n) for n in (16, 16, 100, 1000, 5000)]
        h.free(refs[1])
        print(json.dumps(refs), flush=True)  # a pipe buffers what SIGKILL would lose
        os.kill(os.getpid(), 9)
        """)
    assert_killed(proc)
    refs = json.loads(proc.stdout)
    before = heap.stats()
    assert before.cached_spans == 4 and before.live_objects == 4
    assert heap.check() == [], "a dead process's cached spans are garbage, not a finding"
    assert heap.check(repair=True) == []
    after = heap.stats()
    assert after.cached_spans == 0 and after.live_objects == 4, "live objects stay allocated"
    for ref in (refs[0], *refs[2:]):
        heap.free(ref)
    assert heap.check() == []


def test_a_process_keeps_its_spans_and_gives_the_empty_ones_back_before_growing(
        shm_heap_factory: HeapFactory) -> None:
    h = shm_heap_factory(arena_size=256 * 1024, page_size=8192)
    cls = size_class(h, 3000)
    assert cls.npages == 8, "four spans of this class fill an arena"
    refs = [h.alloc(3000) for _ in range(3 * cls.nelems)]  # two spares and the cached span
    assert h.stats().cached_spans == 3, "full spans stay the process's own"
    for ref in refs:
        h.free(ref)
    again = [h.alloc(3000) for _ in range(3 * cls.nelems)]
    assert sorted(again) == sorted(refs), "the spares are refilled from, emptied by the frees"
    assert h.info().arenas == 1
    for ref in again:
        h.free(ref)
    large = h.alloc(16 * 8192)  # only the two empty spares' pages hold 16 pages in a row
    assert h.info().arenas == 1, "the empty spares were freed before the heap grew"
    assert h.stats().cached_spans == 1
    assert large // h.arena_size == 1
    h.free(large)
    assert h.check() == []


def test_scavenge_frees_the_empty_spares(shm_heap_factory: HeapFactory) -> None:
    h = shm_heap_factory(arena_size=256 * 1024, page_size=8192)
    cls = size_class(h, 3000)
    refs = [h.alloc(3000) for _ in range(3 * cls.nelems)]  # two spares and the cached span
    for ref in refs[cls.nelems:]:
        h.free(ref)                                       # the second spare and the cached one
    in_use = h.stats().pages_in_use
    h.scavenge()
    assert h.stats().pages_in_use == in_use - cls.npages, "the empty spare, not the cached span"
    assert h.stats().cached_spans == 2
    for ref in refs[:cls.nelems]:
        h.free(ref)
    assert h.check() == []


def test_close_gives_the_handles_spans_back(shm_heap_factory: HeapFactory) -> None:
    h = shm_heap_factory(arena_size=64 * 1024)
    other = shmheap.Heap.attach(h.name)
    ref = other.alloc(3000)
    kept = other.alloc(64)
    assert h.stats().cached_spans == 2
    other.free(ref)
    other.close()
    assert h.stats().cached_spans == 0, "close() gave both spans back"
    assert h.stats().live_objects == 1, "an object of a given-back span stays allocated"
    h.free(kept)
    whole = h.alloc(64 * 1024)  # needs every page of the one arena
    assert h.info().arenas == 1, "the given-back spans' pages were free again"
    h.free(whole)
    assert h.check() == []


ALLOC_POINTS = ["span.described", "span.pages_used", "span.published", "cache.adopted",
                "cache.released", "span.unpublished", "span.freed", "summary.leaf_set",
                "summary.leaf_cleared"]


@pytest.mark.parametrize("point", ALLOC_POINTS)
def test_kill_at_allocator_crash_point_recovers(heap: shmheap.Heap, point: str) -> None:
    keep = [heap.alloc(n) for n in (64, 64, 20000)]
    for ref in keep:
        heap.view(ref)[:] = pattern(ref, heap.nbytes(ref))
    per = size_class(heap, 3000).nelems
    proc = run_child(f"""
        import shmheap
        h = shmheap.Heap.attach({heap.name!r})
        a = [h.alloc(3000) for _ in range({(SPARE_SPANS + 2) * per + 2})]  # X, Y given up
        for ref in a[:{per}]:
            h.free(ref)                                    # X: unowned, empty, hinted
        h.free(h.alloc(50000))                             # make and free a large span
        b = [h.alloc(3000) for _ in range({per})]          # fill Z, give it up, adopt X
        raise SystemExit("crash point {point} was never reached")
        """, point)
    assert_killed(proc)
    heap.snapshot(timeout=RECOVERY_TIMEOUT)  # adopts the dead holder's lock
    assert heap.info().recoveries >= 1
    with heap.locked(timeout=RECOVERY_TIMEOUT):
        pass  # the next writable lock holder repairs what the journal names
    assert heap.check() == []
    heap.check(repair=True)
    for ref in keep:
        assert bytes(heap.view(ref)) == pattern(ref, heap.nbytes(ref))
    more = [heap.alloc(n) for n in (3000, 20000, 64)]
    assert_no_overlap(heap, keep + more)
    assert heap.check() == []


def test_orphaned_pages_are_found_by_fsck(heap: shmheap.Heap) -> None:
    ref = heap.alloc(50000)
    pages = heap._objects().pages_of(ref // ARENA)
    first = (ref % ARENA) // heap.params.page_size
    free_page = pages.used.tobytes().index(0)
    pages.used[free_page] = 1  # as if a holder died half-way through making a span there
    findings = heap.check()
    assert [f.code for f in findings] == ["pages-orphaned"]
    assert [f.code for f in heap.check(repair=True)] == ["pages-orphaned"]
    assert heap.check() == []
    pages.npages[first] = 999
    bad = [f for f in heap.check() if f.code == "span-bad"]
    assert len(bad) == 1 and bad[0].fatal
    pages.npages[first] = 7
    assert heap.check() == []


# -- the state machine -------------------------------------------------------------------


class AllocatorMachine(RuleBasedStateMachine):
    """alloc/free/write/read against a dict model of the live objects' contents, objects of
    every kind: small, large, and giant (over up to four arenas)."""

    refs = Bundle("refs")

    def __init__(self) -> None:
        super().__init__()
        self.name = unique_heap_name("sm")
        self.heap = shmheap.Heap.create(self.name, arena_size=ARENA, page_size=8192)
        self.model: dict[int, bytearray] = {}

    @rule(target=refs, nbytes=st.one_of(st.integers(1, 600), st.integers(601, 40000),
                                         st.integers(40001, ARENA),
                                         st.integers(ARENA + 1, 7 * ARENA // 2)))  # giant
    def alloc(self, nbytes: int) -> int:
        ref = self.heap.alloc(nbytes)
        assert ref not in self.model
        size = self.heap.nbytes(ref)
        assert size >= nbytes
        assert bytes(self.heap.view(ref)) == bytes(size), "new memory reads zero"
        self.model[ref] = bytearray(size)
        return ref

    @rule(ref=consumes(refs))
    def free(self, ref: int) -> None:
        self.heap.free(ref)
        del self.model[ref]
        with pytest.raises(shmheap.DoubleFreeError):
            self.heap.free(ref)

    @rule(ref=refs, data=st.data())
    def write(self, ref: int, data: st.DataObject) -> None:
        size = len(self.model[ref])
        start = data.draw(st.integers(0, size - 1))
        chunk = data.draw(st.binary(min_size=1, max_size=min(64, size - start)))
        self.heap.view(ref)[start:start + len(chunk)] = chunk
        self.model[ref][start:start + len(chunk)] = chunk

    @invariant()
    def contents_intact_and_disjoint(self) -> None:
        for ref, content in self.model.items():
            assert bytes(self.heap.view(ref)) == content
        assert_no_overlap(self.heap, list(self.model))

    def teardown(self) -> None:
        try:
            live = self.heap.stats()
            assert live.live_objects == len(self.model)
            assert live.live_bytes == sum(self.heap.size_of(r) for r in self.model)
            assert self.heap.check() == []
        finally:
            discard(self.name, self.heap)


AllocatorMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestAllocatorMachine = AllocatorMachine.TestCase


# -- the benchmark runs ------------------------------------------------------------------


def test_alloc_benchmark_tiny_run_reports_its_figures(tmp_path: Any,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from shmheap.tools.bench.alloc import main

    path = tmp_path / "alloc.json"
    segments_before = set(os.listdir("/dev/shm"))
    assert main(["--tiny", "--json", str(path)]) == 0
    results = json.loads(path.read_text())
    assert {t["name"] for t in results["targets"]} >= {"alloc+free pair, 64 bytes, p50",
                                                       "root lookup p50, 2,000 roots / 10 roots"}
    assert results["pairs"]["latency"]["shmheap_64"]["p50_ns"] > 0
    assert results["scan"]["all_marked"]["gb_per_ms"] > 0
    assert results["scavenge"]["released_bytes"] > 0
    roots = results["roots"]
    for count in ("10", "2000"):
        for figure in ("lookup", "bind_unbind", "manager_lookup"):
            assert roots["rows"][count][figure]["p50_ns"] > 0, (count, figure)
    handover = results["handover"]
    assert set(handover["median_s"]) == {"shmheap_attach", "shmheap_attached", "shared_memory"}
    assert all(seconds > 0 for seconds in handover["median_s"].values())
    assert handover["consumers"] == 4 and handover["bytes"] == 8 << 20
    big = results["giant"]
    assert big["bytes"] == 4 << 20 and big["arenas"] == 4, "every round reused the 4 arenas"
    assert all(seconds > 0 for seconds in big["median_s"].values())
    left = {e for e in set(os.listdir("/dev/shm")) - segments_before if e.startswith("psm_")}
    assert not left, f"the hand-over left shared_memory segments: {left}"
    out = capsys.readouterr().out
    assert "Targets:" in out and "6. Roots" in out and "7. Hand-over" in out
    assert "8. A giant object" in out


def test_forked_child_forgets_the_parents_span_caches(heap: shmheap.Heap) -> None:
    """After fork the child has its own token and must not allocate in the parent's spans."""
    parent_ref = heap.alloc(64)
    parent_token = heap._live.token  # type: ignore[union-attr]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        allocator = heap._objects()
        forgot = all(cache is None for cache in allocator._caches)
        child_ref = heap.alloc(64)
        verdict = forgot and heap._live.token != parent_token and child_ref != parent_ref  # type: ignore[union-attr]
        os.write(write_end, b"1" if verdict else b"0")
        os._exit(0)
    os.close(write_end)
    try:
        assert os.read(read_end, 1) == b"1"
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    assert heap.size_of(parent_ref) >= 64


def summary_blocks(heap: shmheap.Heap) -> int:
    """Bytes of memory the heap's summary segment holds (its reserved pages)."""
    return os.stat(f"/dev/shm/{summary_name(heap.name)}").st_blocks * 512


def test_the_creator_reserves_the_summary_pages_of_the_first_64_arenas(
        shm_heap_factory: HeapFactory) -> None:
    heap = shm_heap_factory(arena_size=65536, reserve=False)
    created = summary_blocks(heap)
    with shmheap.Heap.attach(heap.name) as other:  # another process's first grow
        other.grow()
    assert summary_blocks(heap) == created, "the first grow had nothing left to reserve"
    assert heap.max_arenas > 64 * 64
    heap.grow(at=64 * 64)  # (rows 1..63 share row 0's pages)
    assert summary_blocks(heap) > created, "row 64's pages are reserved by its first grow"


def test_a_heap_whose_creator_did_not_reserve_row_0_has_it_reserved_by_a_grow(
        shm_heap_factory: HeapFactory) -> None:
    heap = shm_heap_factory(arena_size=65536, reserve=False)
    created = summary_blocks(heap)
    offsets = summary._tree_offsets(heap.max_arenas, 1 + len(heap._objects().classes))
    fd = os.open(f"/dev/shm/{summary_name(heap.name)}", os.O_RDWR)
    try:  # as an older creator left it: row 0's pages not reserved, no word saying so
        os.pwrite(fd, bytes(4), summary.HEADER.size - 4)
        with mmap.mmap(fd, os.fstat(fd).st_size) as mapping:
            for page in summary._row_pages(offsets, 0) - {0}:  # (page 0 holds the header)
                mapping.madvise(mmap.MADV_REMOVE, page * PAGE_SIZE, PAGE_SIZE)
    finally:
        os.close(fd)
    assert summary_blocks(heap) < created
    with shmheap.Heap.attach(heap.name) as other:
        other.grow()
    assert summary_blocks(heap) == created


def test_only_classes_with_partial_hints_are_searched(heap: shmheap.Heap) -> None:
    summaries = heap._objects()._summaries
    assert summaries.hinted_classes() == []
    c = size_class(heap, 3000).number
    per = heap._objects().classes[c].nelems
    refs = [heap.alloc(3000) for _ in range((SPARE_SPANS + 2) * per + 2)]  # 2 given up
    heap.free(refs[0])                                     # into an unowned span
    assert summaries.hinted_classes() == [c]
    for ref in refs[1:]:
        heap.free(ref)
