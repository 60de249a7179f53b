"""Heaps of many arenas: summaries that agree with the arenas, mappings that stay bounded.

The summaries (summary.py) are checked against a brute-force scan of every
arena's page metadata under random allocation and freeing (Hypothesis); child
interpreters with a small mapping budget and a low descriptor limit work on a
heap of thousands of arenas; the limits of the kernel and of the process come
back as typed errors that name them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from types import CodeType, FrameType
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmheap
from shmheap.control import PAGES
from shmheap.pages import longest_free_run
from shmheap.pytest_plugin import HeapFactory
from shmheap.summary import CAP, ByteTree

ARENA = 64 * 1024
PAGE = 8192
#: sizes that make small spans of several classes and large objects of 2..7 pages
SIZES = (16, 100, 700, 3000, 9000, 20000, 40000, 57344)


def _env() -> dict[str, str]:
    """This environment without any SHMHEAP_ variable (the tests set what they need)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SHMHEAP_")}


def brute_force_summaries(heap: shmheap.Heap) -> dict[str, dict[int, int]]:
    """What the free and owned trees must say, read from every arena's metadata."""
    allocator = heap._objects()
    free, owned = {}, {}
    for index in heap.snapshot():
        pages = allocator.pages_of(index)
        free[index] = longest_free_run(bytes(pages.used), CAP)
        owned[index] = int(bool(pages.owned_starts()))
    return {"free": free, "owned": owned}


def assert_summaries_agree(heap: shmheap.Heap) -> None:
    summaries = heap._summaries
    assert summaries is not None
    want = brute_force_summaries(heap)
    assert {i: summaries.free.get(i) for i in want["free"]} == want["free"]
    for index, has_owner in want["owned"].items():
        assert summaries.owned.get(index) >= has_owner, f"arena {index}'s owner is not summarised"
    assert set(summaries.free.nonzero_leaves()) <= set(want["free"]), "a leaf of no arena"
    assert summaries.free.check() == [] and summaries.owned.check() == []
    for size in (1, 2, 3, 5, 8):
        first = next((i for i in sorted(want["free"]) if want["free"][i] >= size), -1)
        assert summaries.free.find(size) == first


@settings(max_examples=25, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(st.booleans(), st.sampled_from(SIZES), st.integers(0, 10**6)),
                      min_size=1, max_size=120))
def test_summaries_match_a_brute_force_scan(shm_heap_factory: HeapFactory,
                                            steps: list[tuple[bool, int, int]]) -> None:
    heap = shm_heap_factory(arena_size=ARENA, page_size=PAGE, reserve=False)
    held: list[int] = []
    for allocate, size, pick in steps:
        if allocate or not held:
            held.append(heap.alloc(size))
        else:
            heap.free(held.pop(pick % len(held)))
    assert_summaries_agree(heap)
    for ref in held:
        heap.free(ref)
    with shmheap.Heap.attach(heap.name) as other:  # another process's view of the same trees
        other.check(repair=True)  # reclaims this handle's spans only once it is closed
    assert_summaries_agree(heap)
    assert heap.check() == []


def test_fsck_finds_and_repairs_a_damaged_summary(shm_heap_factory: HeapFactory) -> None:
    heap = shm_heap_factory(arena_size=ARENA, page_size=PAGE, reserve=False)
    refs = [heap.alloc(40000) for _ in range(5)]
    summaries = heap._summaries
    assert summaries is not None
    index = refs[2] // ARENA
    summaries.free._levels[0][index] = 7  # as if a holder died after the leaf, before the nodes
    summaries.free._levels[0][900] = 3    # and garbage under an index that is no arena
    codes = {f.code for f in heap.check()}
    assert codes == {"summary-free"}
    assert {(f.code, f.fixed) for f in heap.check(repair=True)} == {("summary-free", True)}
    assert heap.check() == []
    assert_summaries_agree(heap)


class Interrupted(Exception):
    """Raised by a trace function at one line, as a signal handler's exception would be."""


def interrupted_at(code: CodeType, line: int) -> Any:
    """A trace function that raises Interrupted before the ``line``-th line run in ``code``
    (lines, not opcodes: Python 3.12's trace hooks miss opcode events set from a call event)."""
    seen = 0

    def local(_frame: FrameType, event: str, _arg: Any) -> Any:
        nonlocal seen
        if event == "line":
            seen += 1
            if seen == line:
                raise Interrupted
        return local

    def tracer(frame: FrameType, _event: str, _arg: Any) -> Any:
        return local if frame.f_code is code else None

    return tracer


def test_an_exception_at_any_line_never_stops_a_partial_mark_half_way(
        shm_heap: shmheap.Heap) -> None:
    """A lock-free mark of a partial tree (after a free into an unowned span) interrupted at
    each of its lines in turn: its leaf is never left set below a clear ancestor."""
    summaries = shm_heap._summaries
    assert summaries is not None
    tree = summaries.partial(1)
    leaf = shm_heap.grow().index
    interrupted = 0
    for line in range(1, 1000):
        sys.settrace(interrupted_at(ByteTree.mark.__code__, line))
        try:
            tree.mark(leaf)
        except Interrupted:
            interrupted += 1
        else:
            break  # the mark ran to its end: it has been interrupted at every line once
        finally:
            sys.settrace(None)
        assert not tree.get(leaf) or tree.path_is_right(leaf), f"interrupted at line {line}"
        tree.clear(leaf)
    assert interrupted > 1
    assert tree.get(leaf) and tree.path_is_right(leaf)


def test_the_journal_repair_of_an_arena_recomputes_its_partial_paths(
        shm_heap_factory: HeapFactory) -> None:
    heap = shm_heap_factory(arena_size=ARENA, page_size=PAGE, reserve=False)
    index = heap.grow().index
    summaries = heap._summaries
    assert summaries is not None
    tree = summaries.partial(1)
    tree._levels[0][index] = 1  # as if a marker died after the leaf, before its ancestors
    assert heap.check() == [], "a lost mark is a hint that heals itself, no finding"
    assert not tree.path_is_right(index, hint=True)
    heap._journal.begin(PAGES, index)  # and as if a holder stopped changing that arena
    with heap.locked():  # the next writable holder repairs the arena, its summaries too
        pass
    assert tree.path_is_right(index)
    assert heap.check() == []


BIG_HEAP_WORKER = """
import json, os, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))   # before shmheap can raise it
import shmheap
h = shmheap.Heap.attach(sys.argv[1])
most_mapped = most_fds = 0

def note():
    global most_mapped, most_fds
    most_mapped = max(most_mapped, h._pages.mapped)
    most_fds = max(most_fds, len(os.listdir("/proc/self/fd")))

refs = []
for n in range(int(sys.argv[2])):            # one object per arena: every arena is touched
    refs.append(h.alloc(57344))
    note()
walked = 0
for span in h.walk():
    walked += len(span.objects)
    note()
stats = h.stats()
h.start_cycle()
for ref in refs[::2]:
    h.mark(ref)
    note()
swept = h.sweep()
note()
released = h.scavenge()
note()
findings = h.check(repair=True)
note()
print(json.dumps(dict(walked=walked, live=stats.live_objects, freed=swept.spans_freed,
                      released=released.pages, findings=[f.code for f in findings],
                      most_mapped=most_mapped, most_fds=most_fds,
                      limit=h._pages.budget.limit)))
"""


def test_a_process_works_on_thousands_of_arenas_within_small_limits(
        shm_heap_factory: HeapFactory) -> None:
    """A child with a budget of 64 mappings and 256 descriptors allocates in, walks, sweeps,
    scavenges and checks a heap of 4,000 arenas, one of its objects in each."""
    arenas = 4000
    heap = shm_heap_factory(arena_size=ARENA, page_size=PAGE, reserve=False)
    for _ in range(arenas):
        heap.grow()
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(BIG_HEAP_WORKER), heap.name, str(arenas)],
        env={**_env(), "SHMHEAP_MAX_MAPPINGS": "64"}, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["walked"] == result["live"] == arenas
    assert result["freed"] == arenas // 2, "the unmarked half was swept"
    assert result["released"] > 0
    assert result["findings"] == []
    assert result["limit"] == 64 and result["most_mapped"] <= 64
    assert result["most_fds"] < 256
    assert len(heap.snapshot()) == arenas, "every object fitted an arena that existed"
    assert heap.check() == []


def test_every_mapping_pinned_is_a_mapping_limit_error(shm_heap_factory: HeapFactory) -> None:
    heap = shm_heap_factory(arena_size=ARENA, page_size=PAGE, reserve=False)
    for _ in range(12):
        heap.grow()
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import shmheap
        h = shmheap.Heap.attach({heap.name!r})
        held = []
        try:
            for index in h.snapshot():
                held.append(h.arena(index).buf)   # a live view pins its arena's mapping
        except shmheap.MappingLimitError as exc:
            print(len(held), "SHMHEAP_MAX_MAPPINGS" in str(exc))
        del held
        print(len([h.arena(i).index for i in h.snapshot()]))  # released: mapped in turn
        """)], env={**_env(), "SHMHEAP_MAX_MAPPINGS": "8"}, capture_output=True, text=True,
        timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["8", "True", "12"]


def test_running_out_of_descriptors_is_a_descriptor_limit_error(shm_heap: shmheap.Heap) -> None:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os, resource
        import shmheap
        in_use = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 1, in_use + 1))
        try:
            shmheap.Heap.attach({shm_heap.name!r})
        except shmheap.DescriptorLimitError as exc:
            print("RLIMIT_NOFILE" in str(exc), isinstance(exc, OSError))
        """)], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True"]


def test_a_mapping_the_kernel_refuses_is_a_mapping_limit_error(shm_heap: shmheap.Heap) -> None:
    """No room left in the address space (RLIMIT_AS) refuses mmap with ENOMEM, as the
    map-count limit does: a MappingLimitError naming vm.max_map_count, not a full /dev/shm."""
    for _ in range(40):
        shm_heap.grow()
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import resource
        import shmheap
        h = shmheap.Heap.attach({shm_heap.name!r})
        with open("/proc/self/statm") as statm:
            size = int(statm.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (size + (1 << 20), size + (1 << 20)))
        try:
            held = [h.arena(i).buf for i in h.snapshot()]
        except shmheap.MappingLimitError as exc:
            print("vm.max_map_count" in str(exc))
        except shmheap.OutOfSharedMemoryError:
            print("out of shared memory")
        """)], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True"]
