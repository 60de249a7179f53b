"""The span records' sequence word (pages.py ``seq``): lock-free readers never see ABA.

A span freed and remade at the same first page while a reader reads its
records must never give the reader one span's length with the other's size
class.  Real heaps, real writer methods under the real lock, real child
processes (fresh interpreters) for the concurrent writer and the crashes.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from children import assert_killed, run_child

import shmheap
from shmheap import pages as pages_mod
from shmheap import walker
from shmheap.allocator import Allocator
from shmheap.control import PAGES
from shmheap.pages import ArenaPages
from shmheap.pytest_plugin import HeapFactory

ARENA = 256 * 1024
PAGE = 8192
LARGE = 6 * PAGE + 1  # over the largest size class: 7 pages of its own
RECOVERY_TIMEOUT = 30.0


@pytest.fixture
def heap(shm_heap_factory: HeapFactory) -> shmheap.Heap:
    return shm_heap_factory(arena_size=ARENA, page_size=PAGE)


def multi_page_class(allocator: Allocator) -> int:
    """A size class whose spans have more than one page."""
    return next(c.number for c in allocator.classes[1:] if c.npages > 1)


def remake(heap: shmheap.Heap, pages: ArenaPages, start: int, npages: int, sclass: int) -> None:
    """Free the span at ``start`` and make one of another geometry there (as a lock holder)."""
    allocator = heap._objects()
    with heap.locked():
        heap._journal.begin(PAGES, pages.index)
        pages.release(start)
        heap._journal.end()
        made = allocator.make_span_locked(npages, sclass, 0, zero_now=True)
    assert made is not None and made[0] is pages and made[1] == start


def test_a_free_and_remake_between_two_reads_is_retried(heap: shmheap.Heap) -> None:
    ref = heap.alloc(LARGE)
    allocator = heap._objects()
    pages = allocator.pages_of(ref // ARENA)
    start = (ref % ARENA) // PAGE
    c = multi_page_class(allocator)
    new = (allocator.classes[c].npages, c)
    calls = 0

    def racing_read(start: int) -> tuple[int, int]:
        """Read npages, let another holder free and remake the span, then read sclass."""
        nonlocal calls
        calls += 1
        npages = pages.npages[start]
        if calls == 1:
            remake(heap, pages, start, *new)
        return npages, pages.sclass[start]

    assert pages.steady(racing_read, start) == new, "the torn (old length, new class) read was kept"
    assert calls == 2
    assert pages.read_span(start) == (*new, None)


def test_a_sequence_that_keeps_changing_gives_up(heap: shmheap.Heap) -> None:
    ref = heap.alloc(LARGE)
    pages = heap._objects().pages_of(ref // ARENA)
    calls = 0

    def read_during_changes(_: int) -> int:
        nonlocal calls
        calls += 1
        pages.seq[0] += 2  # a whole change by another holder between the two reads of seq
        return calls

    assert pages.steady(read_during_changes, 0) is None
    assert calls == pages_mod.READ_RETRIES


def test_an_odd_sequence_makes_walkers_and_the_allocator_read_under_the_lock(
        heap: shmheap.Heap) -> None:
    small = heap.alloc(64)
    spare = heap.alloc(64)
    large = heap.alloc(LARGE)
    index = small // ARENA
    assert large // ARENA == index
    allocator = heap._objects()
    pages = allocator.pages_of(index)
    starts = pages.starts()
    assert len(starts) == 2
    spans = [s.address for s in heap.walk()]
    assert pages.seq[0] % 2 == 0 and pages.seq[0] > 0
    pages.seq[0] += 1  # as if a holder were half-way through changing a span here
    assert [pages.read_span(start) for start in starts] == [None, None]
    walked = [s.address for s in walker.arena_spans(allocator, pages)]
    assert walked == spans, "spans are read under the lock, neither skipped nor guessed"
    assert heap.size_of(large) == 7 * PAGE  # these read the records under the lock
    assert heap.size_of(small) >= 64
    heap.free(small)
    with pytest.raises(shmheap.DoubleFreeError):
        heap.free(small)
    assert pages.seq[0] % 2 == 1, "reading under the lock changes nothing"
    assert [f.code for f in heap.check()] == ["span-seq-odd"]
    assert [f.code for f in heap.check(repair=True)] == ["span-seq-odd"]
    assert pages.seq[0] % 2 == 0
    assert heap.check() == []
    assert [s.address for s in heap.walk()] == spans, "both spans are walked again"
    heap.free(spare)
    heap.free(large)


@pytest.mark.parametrize("point", ["span.described", "span.pages_used", "span.unpublished",
                                   "span.freed"])
def test_a_holder_killed_mid_change_leaves_seq_odd_until_recovery(heap: shmheap.Heap,
                                                                   point: str) -> None:
    mine = heap.alloc(LARGE)
    allocator = heap._objects()
    pages = allocator.pages_of(mine // ARENA)
    proc = run_child(f"""
        import shmheap
        h = shmheap.Heap.attach({heap.name!r})
        h.free(h.alloc({LARGE}))
        raise SystemExit("crash point {point} was never reached")
        """, point)
    assert_killed(proc)
    assert pages.seq[0] % 2 == 1, "the dead holder's change is still open"
    # The walker reads the records under the lock: it adopts the dead holder's lock and
    # sees the one span that is whole; a reader repairs nothing.
    assert [s.address for s in walker.arena_spans(allocator, pages)] == [mine]
    assert heap.info(timeout=RECOVERY_TIMEOUT).recoveries >= 1
    assert heap.size_of(mine) == 7 * PAGE
    assert pages.seq[0] % 2 == 1, "readers leave the repair to the next writable holder"
    assert "journal" in [f.code for f in heap.check()]
    with heap.locked(timeout=RECOVERY_TIMEOUT):
        pass  # the next writable lock holder repairs
    assert pages.seq[0] % 2 == 0
    assert heap.check() == []
    assert [s.address for s in heap.walk()] == [mine]
    heap.free(mine)
    assert heap.check() == []


CHURN = """
    import sys
    import shmheap
    h = shmheap.Heap.attach({name!r})
    a = h._objects()
    pages = a.pages_of({index})
    shapes = {shapes!r}
    print("ready", flush=True)
    for i in range({rounds}):
        npages, sclass = shapes[i % 2]
        with h.locked():
            made = a.make_span_locked(npages, sclass, 0, zero_now=True)
            assert made is not None and made[1] == {start}, made
            h._journal.begin({pages_op}, {index})
            pages.release({start})
            h._journal.end()
    h.close()
"""


def test_span_reads_racing_a_free_and_remake_loop_never_mismatch(heap: shmheap.Heap) -> None:
    allocator = heap._objects()
    ref = heap.alloc(LARGE)
    index = ref // ARENA
    start = (ref % ARENA) // PAGE
    heap.free(ref)
    pages = allocator.pages_of(index)
    c = multi_page_class(allocator)
    shapes = [(1, 0), (allocator.classes[c].npages, c)]
    code = CHURN.format(name=heap.name, index=index, shapes=shapes, rounds=3000, start=start,
                        pages_op=PAGES)
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        seen: set[tuple[int, int, object] | None] = set()
        while proc.poll() is None:
            seen.add(pages.read_span(start))
        _, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert seen <= {None, *((*shape, None) for shape in shapes)}, \
        f"mismatched (npages, sclass) pairs read: {seen}"
    assert heap.check() == []
