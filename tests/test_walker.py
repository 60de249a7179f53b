"""The walker: walk/stats, mark/sweep cycles, scavenging; numpy and pure-Python scans.

Every test that scans bitmaps runs twice, with numpy and with the pure-Python
fallback.  Processes that walk, sweep or churn at the same time are fresh
interpreters (spawn), synchronised through queues and events.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import re
from collections.abc import Iterator

import alloc_workers
import pytest
from children import assert_killed, run_child

import shmheap
from shmheap import pages as pages_mod
from shmheap import walker
from shmheap.allocator import SPARE_SPANS
from shmheap.names import arena_name
from shmheap.pytest_plugin import HeapFactory
from shmheap.segments import allocated_bytes
from shmheap.tools import cli

ARENA = 256 * 1024
PAGE = 8192
LARGE = 6 * PAGE + 1  # over the largest size class: 7 pages of its own
RECOVERY_TIMEOUT = 30.0


@pytest.fixture(params=["numpy", "python"])
def scans(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "numpy":
        pytest.importorskip("numpy")
        monkeypatch.setattr(pages_mod, "USE_NUMPY", True)
    else:
        monkeypatch.setattr(pages_mod, "USE_NUMPY", False)
    yield request.param


@pytest.fixture
def heap(shm_heap_factory: HeapFactory, scans: str) -> shmheap.Heap:
    return shm_heap_factory(arena_size=ARENA)


def live_objects(h: shmheap.Heap) -> list[int]:
    return [ref for span in h.walk() for ref in span.objects]


def fill(h: shmheap.Heap, ref: int) -> None:
    size = h.nbytes(ref)
    h.view(ref)[:] = (ref.to_bytes(8, "little") * (size // 8 + 1))[:size]


def intact(h: shmheap.Heap, ref: int) -> bool:
    size = h.nbytes(ref)
    return bytes(h.view(ref)) == (ref.to_bytes(8, "little") * (size // 8 + 1))[:size]


# -- walk and stats ------------------------------------------------------------------------


def test_walk_reports_every_live_object_once(heap: shmheap.Heap) -> None:
    refs = [heap.alloc(n) for n in (8, 8, 100, 100, 3000, 30000, LARGE, 2 * LARGE)]
    heap.free(refs[1])
    live = set(refs) - {refs[1]}
    reported = live_objects(heap)
    assert sorted(reported) == sorted(live)
    for span in heap.walk():
        assert span.npages >= 1 and span.capacity >= len(span.objects)
        for ref in span.objects:
            assert heap.size_of(ref) == span.object_size
            assert span.address <= ref < span.address + span.npages * PAGE
        assert span.cached == (span.size_class != 0)
        assert span.marked, "spans are born marked"


def test_stats_add_up(heap: shmheap.Heap) -> None:
    refs = [heap.alloc(n) for n in (16,) * 10 + (1000,) * 3 + (LARGE,)]
    stats = heap.stats()
    assert stats.arenas == 1 and stats.pages == ARENA // PAGE
    assert stats.pages_in_use + stats.pages_free == stats.pages
    assert stats.reserved_bytes == ARENA
    assert stats.live_objects == len(refs)
    assert stats.live_bytes == sum(heap.size_of(r) for r in refs)
    by_size = {c.object_size: c for c in stats.classes}
    assert by_size[16].objects == 10 and by_size[16].spans == 1
    large = [c for c in stats.classes if c.size_class == 0]
    assert large[0].objects == 1 and large[0].live_bytes == 7 * PAGE
    assert stats.cached_spans == 2
    assert stats.released_bytes == 0
    assert stats.in_use_bytes == stats.pages_in_use * PAGE


def test_another_process_walks_the_same_heap_readonly(heap: shmheap.Heap) -> None:
    refs = sorted(heap.alloc(n) for n in (24, 24, 500, LARGE))
    proc = run_child(f"""
        import json, shmheap
        with shmheap.Heap.attach({heap.name!r}, readonly=True) as h:
            print(json.dumps(sorted(r for s in h.walk() for r in s.objects)))
        """)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == refs


def test_walk_while_another_process_churns(heap: shmheap.Heap) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    stop = ctx.Event()
    child = ctx.Process(target=alloc_workers.churn_until_stopped,
                        args=(heap.name, ready, stop))
    child.start()
    try:
        stable = ready.get(timeout=60)
        for _ in range(20):
            reported = live_objects(heap)
            assert len(reported) == len(set(reported)), "an object was reported twice"
            assert set(stable) <= set(reported), "an object live throughout was missed"
        stop.set()
        assert ready.get(timeout=60) == "done"
    finally:
        stop.set()
        child.join(60)
    assert child.exitcode == 0
    assert heap.check() == []


# -- mark and sweep -------------------------------------------------------------------------


def test_marked_objects_survive_and_unmarked_ones_are_freed(heap: shmheap.Heap) -> None:
    keep = [heap.alloc(n) for n in (16, 200, 3000, LARGE)]
    drop = [heap.alloc(n) for n in (16, 200, 3000, LARGE, LARGE)]
    for ref in keep + drop:
        fill(heap, ref)
    cycle = heap.start_cycle()
    assert heap.start_cycle() == cycle + 1
    for ref in keep:
        heap.mark(ref)
    report = heap.sweep()
    assert report.chunks == 1
    assert sorted(live_objects(heap)) == sorted(keep)
    assert all(intact(heap, ref) for ref in keep)
    assert report.objects_freed == 3, "the small garbage shares spans with marked objects"
    assert report.spans_freed == 2 and report.pages_freed == 14, "the large garbage"
    for ref in drop:
        with pytest.raises(shmheap.InvalidRefError):
            heap.view(ref)
    assert heap.sweep() == walker.SweepReport(), "a cycle is swept once"
    assert heap.check() == []


def test_unmarked_spans_are_freed_whole_through_the_bitmaps(
        shm_heap_factory: HeapFactory, scans: str) -> None:
    h = shm_heap_factory(arena_size=ARENA)
    other = shmheap.Heap.attach(h.name)
    try:
        per = alloc_workers.size_class(other, 3000).nelems
        garbage = [other.alloc(3000) for _ in range(2 * per)]  # two full spans
    finally:
        other.close()
    assert h.stats().cached_spans == 0, "close() gave the handle's span back"
    assert h.check() == []
    kept = h.alloc(3000)
    h.start_cycle()
    h.mark(kept)
    pages = h._objects().pages_of(kept // ARENA)
    unmarked = walker.unmarked_starts(pages)
    assert len(unmarked) == 2, "the two unowned spans of garbage"
    report = h.sweep()
    assert report.spans_freed == 2 and report.objects_freed == 0
    assert live_objects(h) == [kept]
    assert all(g not in live_objects(h) for g in garbage)


def test_objects_allocated_during_a_cycle_survive_it(heap: shmheap.Heap) -> None:
    old = [heap.alloc(64) for _ in range(5)] + [heap.alloc(LARGE)]
    heap.start_cycle()
    new = [heap.alloc(64) for _ in range(5)] + [heap.alloc(LARGE), heap.alloc(3000)]
    for ref in new:
        fill(heap, ref)
    report = heap.sweep()
    assert sorted(live_objects(heap)) == sorted(new)
    assert all(intact(heap, ref) for ref in new)
    assert report.objects_freed == 5 and report.spans_freed == 1
    assert old[0] not in live_objects(heap)


def test_sweep_before_any_cycle_frees_nothing(heap: shmheap.Heap) -> None:
    refs = [heap.alloc(64), heap.alloc(LARGE)]
    assert heap.sweep() == walker.SweepReport()
    assert sorted(live_objects(heap)) == sorted(refs)


def test_empty_unowned_spans_are_returned_by_sweep(heap: shmheap.Heap) -> None:
    cls = alloc_workers.size_class(heap, 3000)
    refs = [heap.alloc(3000) for _ in range((SPARE_SPANS + 2) * cls.nelems + 2)]  # 2 given up
    heap.start_cycle()
    for ref in refs:
        heap.mark(ref)
    for ref in refs[:2 * cls.nelems]:
        heap.free(ref)  # marked, then freed by hand: the spans stay in use, empty
    in_use = heap.stats().pages_in_use
    report = heap.sweep()
    assert report.spans_freed == 2 and report.objects_freed == 0
    assert heap.stats().pages_in_use == in_use - 2 * cls.npages


def test_several_processes_sweep_one_cycle_together(shm_heap_factory: HeapFactory,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    h = shm_heap_factory(arena_size=64 * 1024)
    keep, drop = [], []
    while h.info().arenas < 12:
        keep.append(h.alloc(64 * 1024 // 2 - 10))
        drop.append(h.alloc(64 * 1024 // 2 - 10))
    h.start_cycle()
    for ref in keep:
        h.mark(ref)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    start = ctx.Event()
    sweepers = [ctx.Process(target=alloc_workers.sweep_in_chunks_of_one_arena,
                            args=(h.name, start, results)) for _ in range(2)]
    for proc in sweepers:
        proc.start()
    monkeypatch.setattr(walker, "SWEEP_CHUNK_PAGES", 1)
    try:
        start.set()
        mine = h.sweep()
    finally:
        theirs = [results.get(timeout=60) for _ in sweepers]
        for proc in sweepers:
            proc.join(60)
    reports = [mine, *(walker.SweepReport(**r) for r in theirs)]
    assert sum(r.chunks for r in reports) == h.info().arenas
    assert sum(r.spans_freed for r in reports) == len(drop)
    assert sorted(live_objects(h)) == sorted(keep)
    assert h.check() == []


def test_mark_needs_a_live_object(heap: shmheap.Heap) -> None:
    ref = heap.alloc(64)
    heap.free(ref)
    for bad in (ref, 0, ref + 8, -1):
        with pytest.raises(shmheap.InvalidRefError):
            heap.mark(bad)


# -- scavenge -------------------------------------------------------------------------------


def arena_blocks(h: shmheap.Heap, index: int) -> int:
    return allocated_bytes(arena_name(h.name, index))


@pytest.mark.parametrize("reserve", [True, False])
def test_scavenge_returns_free_pages_and_reuse_reads_zero(
        shm_heap_factory: HeapFactory, scans: str, reserve: bool) -> None:
    h = shm_heap_factory(arena_size=ARENA, reserve=reserve)
    refs = [h.alloc(7 * PAGE) for _ in range(4)]
    for ref in refs:
        h.view(ref)[:] = b"\xa5" * h.nbytes(ref)
    index = refs[0] // ARENA
    touched = arena_blocks(h, index)
    for ref in refs:
        h.free(ref)
    report = h.scavenge()
    free_pages = h.stats().pages_free
    assert report.pages == free_pages and report.released_bytes == free_pages * PAGE
    assert h.stats().released_bytes == report.released_bytes
    after = arena_blocks(h, index)
    assert touched - after >= 4 * 7 * PAGE, "the freed pages left /dev/shm"
    assert h.scavenge() == walker.ScavengeReport(), "nothing left to release"
    again = h.alloc(7 * PAGE)
    assert again == refs[0]
    assert bytes(h.view(again)) == bytes(7 * PAGE), "reused pages read zero"
    if reserve:
        assert arena_blocks(h, index) >= after + 7 * PAGE, "reused pages are reserved again"
    assert h.check() == []


SCAVENGE_AND_CYCLE_POINTS = {
    "scavenge.releasing": "h.scavenge()",
    "scavenge.released": "h.scavenge()",
    "cycle.started": "h.start_cycle()",
    "sweep.claimed": "h.start_cycle(); h.sweep()",
}


@pytest.mark.parametrize("point", sorted(SCAVENGE_AND_CYCLE_POINTS))
def test_kill_at_walker_crash_point_recovers(heap: shmheap.Heap, point: str) -> None:
    keep = [heap.alloc(LARGE), heap.alloc(64)]
    for ref in keep:
        fill(heap, ref)
    heap.free(heap.alloc(LARGE))
    proc = run_child(f"""
        import shmheap
        h = shmheap.Heap.attach({heap.name!r})
        {SCAVENGE_AND_CYCLE_POINTS[point]}
        raise SystemExit("crash point {point} was never reached")
        """, point)
    assert_killed(proc)
    heap.snapshot(timeout=RECOVERY_TIMEOUT)
    assert heap.info().recoveries >= 1
    with heap.locked(timeout=RECOVERY_TIMEOUT):
        pass  # the next writable lock holder repairs what the journal names
    assert heap.check() == []
    assert all(intact(heap, ref) for ref in keep)
    again = heap.alloc(LARGE)
    assert bytes(heap.view(again)) == bytes(heap.nbytes(again)), "reused pages read zero"
    heap.scavenge()
    heap.start_cycle()
    for ref in keep:
        heap.mark(ref)
    heap.sweep()
    assert sorted(live_objects(heap)) == sorted(keep)
    assert heap.check() == []


# -- the command line -----------------------------------------------------------------------


def run_cli(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(list(argv)) == 0
    return out.getvalue()


def test_walk_command_prints_per_arena_usage(heap: shmheap.Heap) -> None:
    refs = [heap.alloc(64), heap.alloc(LARGE)]
    assert "live_bytes" in run_cli("walk", heap.name)
    rows = json.loads(run_cli("walk", heap.name, "--json"))
    assert [row["arena"] for row in rows] == list(heap.snapshot())
    assert rows[0]["objects"] == len(refs)
    assert rows[0]["live_bytes"] == sum(heap.size_of(r) for r in refs)


def test_info_command_shows_allocator_stats(heap: shmheap.Heap) -> None:
    heap.alloc(64)
    info = json.loads(run_cli("info", heap.name, "--json"))
    assert info["allocator"]["live_objects"] == 1
    assert re.search(r"^objects +in use .*; 1 objects", run_cli("info", heap.name), re.M)


def test_scavenge_returns_empty_spans_too(heap: shmheap.Heap) -> None:
    cls = alloc_workers.size_class(heap, 3000)
    refs = [heap.alloc(3000) for _ in range((SPARE_SPANS + 2) * cls.nelems + 1)]  # 2 given up
    for ref in refs[:2 * cls.nelems]:
        heap.free(ref)
    in_use = heap.stats().pages_in_use
    heap.scavenge()
    stats = heap.stats()
    assert stats.pages_in_use == in_use - 2 * cls.npages
    assert stats.pages_released == stats.pages_free
    assert sorted(live_objects(heap)) == sorted(refs[2 * cls.nelems:])
