"""Giant objects: objects larger than an arena, over consecutive arenas (giant.py).

Real heaps in /dev/shm, fresh interpreters for everything that crosses a
process boundary or dies (SHMHEAP_CRASH_AT); the raised twin of every crash
point is in test_faults.py (its OPERATIONS table), the Hypothesis model of
the allocator with giant sizes in test_allocator.py.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import weakref

import numpy
import pytest
from children import Child, assert_killed, child_env, run_child
from test_faults import in_small_shm

import shmheap
from shmheap import arenas, core, pages
from shmheap.pytest_plugin import HeapFactory

ARENA = 256 * 1024
PAGE = 8192
PER = ARENA // PAGE  # pages of an arena
#: 3.5 arenas: four of them, the last half used
THREE_AND_A_HALF = 7 * ARENA // 2
RECOVERY_TIMEOUT = 30.0
GIANT_POINTS = sorted(p for p in shmheap.CRASH_POINTS if p.startswith("giant."))


@pytest.fixture
def heap(shm_heap_factory: HeapFactory) -> shmheap.Heap:
    return shm_heap_factory(arena_size=ARENA, page_size=PAGE, reserve=False)


def pattern(ref: int, size: int) -> bytes:
    word = ((ref * 0x9E3779B97F4A7C15) & (2**64 - 1)).to_bytes(8, "little")
    return (word * (size // 8 + 1))[:size]


def giants(h: shmheap.Heap) -> list[shmheap.walker.SpanInfo]:
    return [span for span in h.walk() if span.npages > PER]


def free_leaves(h: shmheap.Heap) -> dict[int, int]:
    assert h._summaries is not None
    return {index: h._summaries.free.get(index) for index in h.snapshot()}


# -- one object, every process ------------------------------------------------------------------


def test_an_object_of_3_5_arenas_written_in_one_process_is_read_in_another(
        heap: shmheap.Heap) -> None:
    writer = run_child(f"""
        import json, numpy, shmheap
        h = shmheap.Heap.attach({heap.name!r})
        ref = h.alloc({THREE_AND_A_HALF})
        view = h.view(ref)
        size = len(view)
        word = ((ref * 0x9E3779B97F4A7C15) & (2**64 - 1)).to_bytes(8, "little")
        view[:] = (word * (size // 8 + 1))[:size]
        typed = h.new_array(({THREE_AND_A_HALF} // 8, 2), "<u4")
        h.ndarray(typed)[:] = numpy.arange({THREE_AND_A_HALF} // 4).reshape(-1, 2)
        print(json.dumps([ref, size, typed]))
        """)
    assert writer.returncode == 0, writer.stderr
    ref, size, typed = json.loads(writer.stdout)
    assert ref % ARENA == 0 and size == THREE_AND_A_HALF  # 3.5 arenas are whole pages
    reader = run_child(f"""
        import numpy, shmheap
        h = shmheap.Heap.attach({heap.name!r}, readonly=True)
        view = h.view({ref})
        assert h.nbytes({ref}) == len(view) == {size} and view.readonly
        word = (({ref} * 0x9E3779B97F4A7C15) & (2**64 - 1)).to_bytes(8, "little")
        assert bytes(view) == (word * ({size} // 8 + 1))[:{size}], "the bytes differ"
        array = h.ndarray({typed})
        assert array.shape == ({THREE_AND_A_HALF} // 8, 2) and array.dtype == numpy.uint32
        assert (array.reshape(-1) == numpy.arange({THREE_AND_A_HALF} // 4)).all()
        assert not array.flags.writeable
        print("ok")
        """)
    assert reader.returncode == 0 and reader.stdout.strip() == "ok", reader.stderr
    assert bytes(heap.view(ref)) == pattern(ref, size)
    assert [(s.address, s.object_size) for s in giants(heap)] == [
        (ref, size), (typed, heap.size_of(typed))]
    assert heap.check() == []


def test_a_giant_object_freed_in_another_process_leaves_free_arenas(heap: shmheap.Heap) -> None:
    ref = heap.alloc(THREE_AND_A_HALF)
    parts = [ref // ARENA + part for part in range(4)]
    assert [free_leaves(heap)[i] for i in parts] == [0, 0, 0, PER // 2], \
        "a wholly used arena's free leaf is 0; the last one's, its free half"
    proc = run_child(f"""
        import shmheap
        h = shmheap.Heap.attach({heap.name!r})
        h.free({ref})
        """)
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(shmheap.DoubleFreeError):
        heap.free(ref)
    with pytest.raises(shmheap.InvalidRefError):
        heap.view(ref)
    assert [free_leaves(heap)[i] for i in parts] == [PER] * 4
    assert heap.stats().pages_in_use == 0
    assert heap.check() == []


def test_a_view_stays_valid_after_the_heap_is_closed(shm_heap_factory: HeapFactory) -> None:
    heap = shm_heap_factory(arena_size=ARENA, page_size=PAGE, reserve=False)
    other = shmheap.Heap.attach(heap.name)
    ref = other.alloc(3 * ARENA)
    view = other.view(ref)
    array = other.ndarray(ref, "u8")
    other.close()
    view[-8:] = b"lastword"
    array[0] = 7
    assert bytes(heap.view(ref)[-8:]) == b"lastword"
    assert heap.ndarray(ref, "u8")[0] == 7
    heap.free(ref)


def test_the_arenas_of_freed_giant_objects_are_reused(heap: shmheap.Heap) -> None:
    for _ in range(5):
        ref = heap.alloc(4 * ARENA)
        view = heap.view(ref)
        assert bytes(view) == bytes(4 * ARENA), "new objects read zero"
        view[:] = b"\xee" * len(view)  # dirty pages: the next object over them is zeroed
        del view
        heap.free(ref)
    assert list(heap.snapshot()) == [1, 2, 3, 4], "the heap grew once, then reused them"
    small = heap.alloc(100)
    assert small // ARENA == 1, "freed pages serve any allocation"
    assert heap.alloc(2 * ARENA) == 2 * ARENA, "arenas 2 and 3, wholly free"
    assert heap.alloc(3 * ARENA) == 4 * ARENA, "arena 4 and two new ones"
    assert list(heap.snapshot()) == [1, 2, 3, 4, 5, 6]
    assert heap.check() == []


@pytest.mark.parametrize("reserve", [False, True])
def test_a_freed_giant_object_leaves_its_pages_clear_for_the_next(
        shm_heap_factory: HeapFactory, reserve: bool) -> None:
    """free clears the pages (punched out of a sparse heap, zeroed in a reserving one)
    and says so in their state, so the next object over them is not zeroed again."""
    heap = shm_heap_factory(arena_size=ARENA, page_size=PAGE, reserve=reserve)
    ref = heap.alloc(THREE_AND_A_HALF)
    heap.view(ref)[:] = b"\xee" * THREE_AND_A_HALF
    other = heap.alloc(20 * PAGE)  # in the last arena's other half: left as it is
    heap.view(other)[:] = b"\x01" * (20 * PAGE)
    heap.free(ref)
    objects = heap._objects()
    cleared = pages.CLEAN if reserve else pages.RELEASED
    states = [bytes(objects.pages_of(ref // ARENA + part).state) for part in range(4)]
    assert states[:3] == [bytes([cleared]) * PER] * 3
    assert states[3][:PER // 2] == bytes([cleared]) * (PER // 2)
    assert heap.stats().pages_released == (0 if reserve else 7 * PER // 2)
    again = heap.alloc(THREE_AND_A_HALF)
    assert again == ref
    assert bytes(heap.view(again)) == bytes(THREE_AND_A_HALF), "new objects read zero"
    assert bytes(heap.view(other)) == b"\x01" * (20 * PAGE)
    heap.free(again)
    assert heap.check() == []


def test_the_last_arena_of_a_giant_object_serves_other_objects(heap: shmheap.Heap) -> None:
    ref = heap.alloc(2 * ARENA + 3 * PAGE)
    last = ref // ARENA + 2
    large = heap.alloc(20 * PAGE)
    assert large // ARENA == last and large % ARENA == 3 * PAGE
    heap.view(large)[:] = b"\x01" * (20 * PAGE)
    assert bytes(heap.view(ref)) == bytes(2 * ARENA + 3 * PAGE), "objects do not overlap"
    heap.free(ref)
    assert bytes(heap.view(large)) == b"\x01" * (20 * PAGE)
    assert heap.check() == []


def test_refs_inside_a_giant_object_are_no_objects(heap: shmheap.Heap) -> None:
    ref = heap.alloc(3 * ARENA)
    for inside in (ref + ARENA, ref + 2 * ARENA, ref + PAGE, ref + ARENA + PAGE):
        for op in (heap.free, heap.view, heap.size_of, heap.mark):
            with pytest.raises(shmheap.InvalidRefError):
                op(inside)
    assert heap.size_of(ref) == 3 * ARENA
    assert heap.check() == []


# -- walking, marking, sweeping, scavenging, fsck --------------------------------------------------


def test_walk_stats_sweep_scavenge_and_fsck_know_giant_objects(heap: shmheap.Heap) -> None:
    kept, doomed = heap.alloc(THREE_AND_A_HALF), heap.alloc(2 * ARENA + 1)
    small = heap.alloc(100)
    spans = giants(heap)
    assert [(s.address, s.npages, s.objects) for s in spans] == [
        (kept, 7 * PER // 2, (kept,)), (doomed, 2 * PER + 1, (doomed,))], "each listed once"
    stats = heap.stats()
    assert stats.live_objects == 3
    assert stats.pages_in_use == sum(span.npages for span in heap.walk())
    assert stats.pages_in_use > 7 * PER // 2 + 2 * PER + 1
    large = next(c for c in stats.classes if c.size_class == 0)
    assert large.objects == 2 and large.live_bytes == THREE_AND_A_HALF + (2 * PER + 1) * PAGE
    assert heap.check() == []
    heap.start_cycle()
    heap.mark(kept)
    heap.mark(small)
    report = heap.sweep()
    assert report.pages_freed == 2 * PER + 1 and report.spans_freed == 1
    assert [s.address for s in giants(heap)] == [kept]
    with pytest.raises(shmheap.InvalidRefError):
        heap.view(doomed)
    released = heap.scavenge()
    assert released.pages >= 2 * PER + 1, "the swept object's pages were returned"
    assert bytes(heap.view(kept)[:8]) == bytes(8)
    assert heap.check() == []
    heap.free(kept)
    assert heap.check() == []


def test_roots_pin_a_giant_object(heap: shmheap.Heap) -> None:
    ref = heap.new_array(ARENA, "f8")  # 8 arenas and a page
    heap.roots["big"] = ref
    with pytest.raises(shmheap.BoundObjectError, match="big"):
        heap.free(ref)
    heap.start_cycle()
    assert heap.sweep().spans_freed == 0, "a bound object is a root"
    assert heap.ndarray(heap.roots["big"]).shape == (ARENA,)
    assert heap.check() == []
    size = heap.size_of(ref)
    del heap.roots["big"]
    heap.start_cycle()
    assert heap.sweep().pages_freed == size // PAGE, "unbound, it is garbage"
    with pytest.raises(shmheap.InvalidRefError):
        heap.size_of(ref)
    assert heap.check() == []


def test_fsck_finds_and_frees_parts_left_without_their_object(heap: shmheap.Heap) -> None:
    ref = heap.alloc(3 * ARENA)
    objects = heap._objects()
    head = objects.pages_of(ref // ARENA)
    with heap.locked():  # as if the first part were freed and nothing else (no journal)
        head.release(0)
        head.set_giant(None)
    findings = heap.check()
    assert [(f.code, f.fatal) for f in findings] == [("giant-orphaned", False)]
    assert [(f.code, f.fixed) for f in heap.check(repair=True)] == [("giant-orphaned", True)]
    assert heap.check() == [] and heap.stats().pages_in_use == 0
    ref = heap.alloc(3 * ARENA)
    tail = objects.pages_of(ref // ARENA + 2)
    with heap.locked():  # a part of a made object lost
        tail.release(0)
        tail.set_giant(None)
    assert [(f.code, f.fatal) for f in heap.check()] == [("giant-broken", True)]


def test_a_stale_giant_record_is_cleared_and_a_false_one_is_fatal(heap: shmheap.Heap) -> None:
    ref = heap.alloc(100)
    pages = heap._objects().pages_of(ref // ARENA)
    spare = heap.grow().index
    free_pages = heap._objects().pages_of(spare)
    free_pages.set_giant(shmheap.pages.Giant(0, 2, PER + 1))  # on free pages: a leftover
    assert [f.code for f in heap.check()] == ["giant-record"]
    assert [(f.code, f.fixed) for f in heap.check(repair=True)] == [("giant-record", True)]
    assert heap.check() == []
    pages.set_giant(shmheap.pages.Giant(0, 2, PER + 1))  # over a small span: garbage
    assert [(f.code, f.fatal) for f in heap.check()] == [("giant-record", True)]


# -- what cannot be made is a typed error at once --------------------------------------------------


def test_more_arenas_than_the_heap_can_hold_is_an_invalid_parameter(
        shm_heap_factory: HeapFactory) -> None:
    h = shm_heap_factory(arena_size=ARENA, page_size=PAGE, max_arenas=4)  # arenas 1..3
    with pytest.raises(shmheap.InvalidParameterError, match="at most 3"):
        h.alloc(3 * ARENA + 1)
    with pytest.raises(shmheap.InvalidParameterError, match="max_arenas"):
        h.new_array(3 * ARENA, "u1")
    ref = h.alloc(3 * ARENA)  # exactly three fit
    assert h.size_of(ref) == 3 * ARENA
    assert h.check() == []


def test_no_free_run_is_address_space_exhausted_and_nothing_is_half_made(
        shm_heap_factory: HeapFactory) -> None:
    h = shm_heap_factory(arena_size=ARENA, page_size=PAGE, max_arenas=6, reserve=False)
    blockers = [h.alloc(ARENA) for _ in range(3)]   # arenas 1, 2, 3
    h.free(blockers[0])
    h.free(blockers[2])                              # free: 1, 3; used: 2; missing 4, 5
    pages = h.stats().pages_in_use
    with pytest.raises(shmheap.AddressSpaceExhaustedError):
        h.alloc(4 * ARENA)                           # no four in a row
    assert h.stats().pages_in_use == pages and h.check() == []
    ref = h.alloc(3 * ARENA)                         # 3, 4, 5: one reused, two grown
    assert ref == 3 * ARENA and len(h.snapshot()) == 5
    assert h.check() == []


def test_readonly_handles_cannot_make_giant_objects(heap: shmheap.Heap) -> None:
    ro = shmheap.Heap.attach(heap.name, readonly=True)
    try:
        with pytest.raises(shmheap.ReadOnlyError):
            ro.alloc(2 * ARENA)
    finally:
        ro.close()


def test_a_full_dev_shm_is_out_of_shared_memory_and_nothing_is_half_made() -> None:
    proc = in_small_shm("""
import os, shmheap
h = shmheap.Heap.create("full", arena_size=256 * 1024, reserve=True)
h.free(h.alloc(256 * 1024))            # one free arena: it would be the run's first part
stat = os.statvfs("/dev/shm")
need = shmheap.arenas.segment_size(256 * 1024)
filler = os.open("/dev/shm/filler", os.O_CREAT | os.O_RDWR)
os.posix_fallocate(filler, 0, stat.f_bavail * stat.f_frsize - 2 * need)  # room for 1 more
try:
    h.alloc(3 * 256 * 1024)
except shmheap.OutOfSharedMemoryError as exc:
    print("full")
print("arenas", len(h.snapshot()), "in use", h.stats().pages_in_use, "clean", h.check() == [])
os.close(filler)
os.unlink("/dev/shm/filler")
ref = h.alloc(3 * 256 * 1024)
print("made", h.size_of(ref), "clean", h.check() == [])
h.destroy()
print("left", os.listdir("/dev/shm"))
""", size="4m")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "full", "arenas 1 in use 0 clean True", f"made {3 * ARENA} clean True", "left []"]


# -- mappings -------------------------------------------------------------------------------------


def test_holding_giant_views_respects_the_mapping_budget(shm_heap_factory: HeapFactory) -> None:
    heap = shm_heap_factory(arena_size=ARENA, page_size=PAGE, reserve=False)
    refs = [heap.alloc(4 * ARENA) for _ in range(6)]
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import shmheap
        h = shmheap.Heap.attach({heap.name!r})
        one, two = h.view({refs[0]!r}), h.view({refs[0]!r})
        print(one.obj is two.obj)              # one object, one run of mappings
        del one, two
        held, most = [], 0
        try:
            for ref in {refs!r}:
                held.append(h.view(ref))        # four mappings each, while it lives
                most = max(most, h._pages.mapped)
        except shmheap.MappingLimitError as exc:
            print(len(held), "SHMHEAP_MAX_MAPPINGS" in str(exc))
        print(most <= 16)
        del held
        for ref in {refs!r}:                    # released: each mapped in turn
            view = h.view(ref)
            view[:4] = b"seen"
            del view
        print(h._pages.mapped <= 16)
        try:
            h.alloc(16 * {ARENA})                   # 16 arenas could never be mapped at once
        except shmheap.MappingLimitError:
            print(len(h.snapshot()) == 24)          # at once: nothing was grown
        """)], env={**child_env(), "SHMHEAP_MAX_MAPPINGS": "16"}, capture_output=True,
        text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # three views hold 12 mappings; the fourth needs its first arena's metadata (1) and 4 more
    assert proc.stdout.split() == ["True", "3", "True", "True", "True", "True"]
    assert all(bytes(heap.view(ref)[:4]) == b"seen" for ref in refs)


def mapped_at(address: int) -> bool:
    """True if some mapping of this process covers ``address``."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if start <= address < end:
                return True
    return False


def test_a_run_is_one_buffer_unmapped_with_its_last_view(heap: shmheap.Heap) -> None:
    ref = heap.alloc(3 * ARENA + PAGE)
    view = heap.view(ref)
    owner = weakref.ref(view.obj)
    assert type(view.obj).__name__ == ("Mapping" if core.NATIVE else "ArenaRun")
    array = numpy.frombuffer(view, numpy.uint8)
    first, last = array.ctypes.data, array.ctypes.data + len(array) - 1
    assert mapped_at(first) and mapped_at(last)
    del view
    gc.collect()
    assert owner() is not None, "a view's array keeps its run"
    array[-1] = 9
    del array
    gc.collect()
    assert owner() is None
    assert not mapped_at(first) and not mapped_at(last), "unmapped with its last view"
    assert heap.view(ref)[-1] == 9


def test_a_run_of_a_readonly_handle_is_read_only(heap: shmheap.Heap) -> None:
    ref = heap.alloc(2 * ARENA)
    ro = shmheap.Heap.attach(heap.name, readonly=True)
    try:
        view = ro.view(ref)
        assert view.readonly
        with pytest.raises(TypeError):
            view[0] = 1
        assert not ro.ndarray(ref, "u1").flags.writeable
        del view
    finally:
        ro.close()


@pytest.mark.skipif(not core.NATIVE, reason="the native core is not built")
def test_the_native_mapping_checks_its_parts(heap: shmheap.Heap) -> None:
    native = core.native
    assert native is not None
    fd = arenas.open_checked(heap.name, heap.params.heap_id, heap.grow().index, ARENA, False,
                             PAGE)
    try:
        with pytest.raises(ValueError, match="add up"):
            native.Mapping(2 * ARENA, [(fd, ARENA)], True)
        with pytest.raises(ValueError, match="page size"):
            native.Mapping(100, [(fd, 100)], True)
        with pytest.raises(OSError):
            native.Mapping(ARENA, [(-1, ARENA)], True)
        run = native.Mapping(2 * ARENA, [(fd, ARENA), (fd, ARENA)], True)
        memoryview(run)[:3] = b"abc"
        assert bytes(memoryview(run)[ARENA:ARENA + 3]) == b"abc", "both parts map the arena"
        assert run.size == 2 * ARENA and weakref.ref(run)() is run
    finally:
        os.close(fd)


# -- several makers at once ----------------------------------------------------------------------

MAKER = """
import json, random, sys, time, shmheap
h = shmheap.Heap.attach({name!r})
rng = random.Random({seed})
print("ready", flush=True)
sys.stdin.readline()
made = bad = 0
end = time.monotonic() + {seconds}
while time.monotonic() < end:
    ref = h.alloc(rng.choice((2, 3, 5)) * {arena} + rng.randrange(1, {arena}))
    view = h.view(ref)
    mark = (ref.to_bytes(8, "little") * (len(view) // 8 + 1))[:len(view)]
    view[:] = mark
    h.alloc(rng.choice((64, 3000)))  # small objects between them, in their last arenas
    bad += bytes(view) != mark
    del view
    h.free(ref)
    made += 1
print(json.dumps(dict(made=made, bad=bad)), flush=True)
"""

#: Only the makers' giant objects are of class 0: a walk that lists a class-0 span of an
#: arena or less saw a part of a giant object as an object.
GIANT_WALKER = """
import json, sys, time, shmheap
h = shmheap.Heap.attach({name!r}, readonly=True)
print("ready", flush=True)
sys.stdin.readline()
walks = seen = phantoms = 0
end = time.monotonic() + {seconds}
while time.monotonic() < end:
    for span in h.walk():
        if span.size_class == 0:
            seen += 1
            phantoms += span.npages <= {per} or span.address % {arena} != 0
    walks += 1
print(json.dumps(dict(walks=walks, seen=seen, phantoms=phantoms)), flush=True)
"""


def test_processes_making_giant_objects_at_once_never_share_an_arena(
        heap: shmheap.Heap) -> None:
    makers = [Child(MAKER.format(name=heap.name, seed=i, seconds=3.0, arena=ARENA))
              for i in range(3)]
    walker = Child(GIANT_WALKER.format(name=heap.name, seconds=3.0, arena=ARENA, per=PER))
    children = [*makers, walker]
    try:
        for child in children:
            assert child.line() == "ready"
        for child in children:
            child.send()
        results = [json.loads(child.line(timeout=120)) for child in makers]
        walked = json.loads(walker.line(timeout=120))
    finally:
        for child in children:
            child.kill()
    assert all(r["made"] > 3 for r in results), results
    assert sum(r["bad"] for r in results) == 0, "two objects shared memory"
    assert walked["walks"] > 3 and walked["seen"] > 0 and walked["phantoms"] == 0, walked
    assert heap.check() == []
    assert giants(heap) == []


# -- crash points, killed -------------------------------------------------------------------------

#: the steps of test_faults.py's OPERATIONS["giant"]: every giant crash point at passage 1
STEPS = """
import shmheap
h = shmheap.Heap.attach({name!r})
h.grow()
ref = h.alloc(2 * h.arena_size + 5000)
print(ref, flush=True)
h.free(ref)
raise SystemExit("the crash point was never reached")
"""


def test_every_giant_crash_point_is_passed_by_the_steps() -> None:
    assert GIANT_POINTS == ["giant.claimed", "giant.cleared", "giant.freed", "giant.made",
                            "giant.part_grown", "giant.segment_created", "giant.segment_linked",
                            "giant.tail_disowned", "giant.taken_back", "giant.unpublished"]


@pytest.mark.parametrize("point", [*GIANT_POINTS, "giant.segment_created:2",
                                   "giant.part_grown:2"])
def test_killed_at_every_giant_crash_point(heap: shmheap.Heap, point: str) -> None:
    kept = heap.alloc(20000)
    heap.view(kept)[:] = pattern(kept, heap.nbytes(kept))
    baseline = heap.stats().pages_in_use
    proc = run_child(STEPS.format(name=heap.name), point)
    assert_killed(proc)
    heap.snapshot(timeout=RECOVERY_TIMEOUT)  # adopts the lock if the child died holding it
    with heap.locked(timeout=RECOVERY_TIMEOUT):
        pass  # the next writable lock holder repairs what the journal names
    assert heap.check() == [], "a dead maker's parts are garbage, not a finding"
    heap.check(repair=True)  # the reclaim pass frees them
    made = giants(heap)
    if point == "giant.made":  # made, then the maker died: lost in flight
        assert [s.npages for s in made] == [2 * PER + 1]
        heap.start_cycle()
        heap.mark(kept)
        heap.sweep()
    else:
        assert made == [], "a half-made or half-freed object was left"
    assert heap.stats().pages_in_use == baseline, "every part was freed"
    assert bytes(heap.view(kept)) == pattern(kept, heap.nbytes(kept))
    assert not [e for e in os.listdir("/dev/shm") if e.startswith(f"shmheap.{heap.name}.new")]
    ref = heap.alloc(3 * ARENA)  # the heap goes on working, over the arenas left free
    assert bytes(heap.view(ref)) == bytes(3 * ARENA)
    assert heap.check() == []
