"""Observers never stop anyone: check() in pieces, fair locking, checks of the state now.

Every test uses real processes; the kills are real (SHMHEAP_CRASH_AT).  Speed is
measured by ``shmheap bench observers``, not here: these tests assert what holds
whatever the machine's speed (how many lock holds a check takes, that a writer
beside a looping observer finishes, what a check reports).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
from children import Child, assert_killed, child_env, process_state, run_child, wait_until

import shmheap
from shmheap import lock
from shmheap.allocator import SPARE_SPANS
from shmheap.pytest_plugin import HeapFactory
from shmheap.summary import ByteTree

ARENA = 64 * 1024
#: generous bound for anything that must not block
NOT_STUCK = 30.0


@pytest.fixture
def heap(shm_heap_factory: HeapFactory) -> shmheap.Heap:
    return shm_heap_factory(arena_size=ARENA, max_arenas=4096)


def populate(heap: shmheap.Heap, arenas: int, roots: int) -> None:
    """``arenas`` arenas, and ``roots`` objects spread over them, each bound to a root."""
    for _ in range(arenas):
        heap.grow()
    for i in range(roots):
        heap.roots[f"r{i}"] = heap.alloc(16 + (i % 9) * 900)


def lock_holds(heap: shmheap.Heap) -> int:
    """How many times any process has taken the heap lock (the liveness segment's seq)."""
    live = heap._live
    assert live is not None
    return int(live.lock_seq[0])


@pytest.mark.parametrize("readonly", [True, False], ids=["readonly", "writable"])
def test_a_check_of_a_healthy_heap_takes_the_lock_once(heap: shmheap.Heap,
                                                       readonly: bool) -> None:
    populate(heap, 40, 300)
    with shmheap.Heap.attach(heap.name, readonly=readonly) as observer:
        before = lock_holds(heap)
        assert observer.check() == []
        assert lock_holds(heap) == before + 1, "every piece but the head ran with no lock"


WRITER = """
import sys, shmheap
h = shmheap.Heap.attach({name!r})
print("ready", flush=True)
sys.stdin.readline()
for i in range({ops}):
    h.free(h.alloc(16 + (i % 50) * 600))
print("done", flush=True)
"""

OBSERVER = """
import sys, shmheap
h = shmheap.Heap.attach({name!r}, readonly=True)
observe = {{"check": h.check, "walk": lambda: list(h.walk()), "snapshot": h.snapshot}}[{what!r}]
print("observing", flush=True)
runs = 0
while True:
    found = observe()
    runs += 1
    if {what!r} == "check" and found:
        print("findings", found, flush=True)
        break
    if runs % 10 == 0:
        print(runs, flush=True)
"""


@pytest.mark.parametrize("what", ["check", "walk", "snapshot"])
def test_a_writer_beside_a_looping_observer_gets_its_work_done(heap: shmheap.Heap,
                                                               what: str) -> None:
    """Before the fix a looping check() let a writer do 2 operations in 6 seconds.

    The writer's 400 operations must finish while the observer keeps looping
    (a starved writer would make this test time out), and a check() beside a
    busy writer must find nothing: what a trial suspects is confirmed under the
    lock before it is reported.
    """
    populate(heap, 60, 400)
    with Child(OBSERVER.format(name=heap.name, what=what)) as observer, \
            Child(WRITER.format(name=heap.name, ops=400)) as writer:
        assert writer.line() == "ready"
        assert observer.line() == "observing"
        assert observer.line(NOT_STUCK).isdigit(), "the observer does its work"
        writer.send()
        assert writer.line(120) == "done", "the writer was starved by the observer"
        assert writer.wait() == 0
        assert observer.proc.poll() is None, f"the observer stopped: {observer.line()}"
    assert heap.check() == []


GROWER = """
import sys, shmheap
h = shmheap.Heap.attach({name!r})
print(h._live.token, flush=True)
sys.stdin.readline()
print(h.grow().index, flush=True)
"""


def test_a_waiter_announces_itself_and_an_observer_lets_it_go_first(
        heap: shmheap.Heap, monkeypatch: pytest.MonkeyPatch) -> None:
    live = heap._live
    assert live is not None
    # The observer yields for as long as it takes a busy machine to run the writer.
    monkeypatch.setattr(lock, "YIELD_LIMIT", NOT_STUCK)
    with shmheap.Heap.attach(heap.name, readonly=True) as observer, \
            Child(GROWER.format(name=heap.name)) as writer:
        token = int(writer.line())
        with heap.locked():
            writer.send()
            while live.waiter[0] != token:  # the writer waits for the lock we hold
                assert writer.proc.poll() is None, writer.line()
                os.sched_yield()
            os.kill(writer.pid, signal.SIGSTOP)  # a waiter slow to run: the lock is free first
            wait_until(lambda: process_state(writer.pid) == "T")
        going = threading.Event()

        def resume() -> None:
            going.wait()
            os.kill(writer.pid, signal.SIGCONT)

        resumer = threading.Thread(target=resume)
        resumer.start()
        going.set()
        first = observer.snapshot(timeout=NOT_STUCK)  # it yields to the announced waiter
        resumer.join()
        grown = int(writer.line())
        assert live.waiter[0] == 0, "the waiter cleared its word once it held the lock"
        assert grown in first, "the observer's snapshot came after the waiter's grow"


def test_a_dead_or_stale_waiter_wedges_no_observer(heap: shmheap.Heap) -> None:
    live = heap._live
    assert live is not None
    proc = run_child(f"""
        import shmheap
        print(shmheap.Heap.attach({heap.name!r})._live.token)
        """)
    assert proc.returncode == 0, proc.stderr
    live.waiter[0] = int(proc.stdout)  # a waiter that died waiting
    with shmheap.Heap.attach(heap.name, readonly=True) as observer:
        observer.snapshot(timeout=NOT_STUCK)
        assert live.waiter[0] == 0, "a dead waiter's word is cleared at once"
        live.waiter[0] = live.token  # a live process that is not waiting (its word left)
        assert observer.check(timeout=NOT_STUCK) == []
        assert live.waiter[0] == 0, "a stale word is cleared after one yield"


def kill_a_lock_holder(name: str) -> None:
    """A process dies holding the heap lock, with nothing half done."""
    assert_killed(run_child(f"""
        import shmheap
        shmheap.Heap.attach({name!r}).grow()
        """, "lock.owned"))


@pytest.mark.parametrize("readonly", [True, False], ids=["readonly", "writable"])
def test_check_is_clean_right_after_a_dead_holders_lock_is_adopted(heap: shmheap.Heap,
                                                                   readonly: bool) -> None:
    heap.grow()
    kill_a_lock_holder(heap.name)
    with shmheap.Heap.attach(heap.name, readonly=readonly) as observer:
        assert observer.check(timeout=NOT_STUCK) == [], "an adoption is a recovery, no finding"
        assert observer.info().recoveries == 1, "it is counted in info()"


def test_a_snapshot_by_the_first_writable_holder_repairs_a_dead_grower(
        heap: shmheap.Heap) -> None:
    published = [heap.grow().index for _ in range(3)]
    assert_killed(run_child(f"""
        import shmheap
        shmheap.Heap.attach({heap.name!r}).grow()
        """, "grow.segment_linked"))
    proc = run_child(f"""
        import shmheap
        h = shmheap.Heap.attach({heap.name!r})
        print(list(h.snapshot(timeout=30)))
        """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(published)
    with shmheap.Heap.attach(heap.name, readonly=True) as observer:
        assert observer.check() == [], "the snapshot's holder left the journal clean"
        assert observer.info().repairs == 1


def test_find_searches_on_past_an_ancestor_set_over_no_leaf() -> None:
    tree = ByteTree.in_memory(64 * 64 * 2)
    tree.mark(5)
    tree.mark(64 * 64 + 7)
    tree._levels[0][5] = 0  # a holder stopped in clear(5) between the leaf and its ancestors
    assert tree.wrong_nodes(), "the ancestors of leaf 5 are set over zeros"
    assert tree.find(1) == 64 * 64 + 7, "the set leaf further right is found"
    assert tree.find(1) == 64 * 64 + 7
    tree.rebuild()
    assert tree.wrong_nodes() == []
    tree.clear(64 * 64 + 7)
    assert tree.find(1) == -1


def test_a_holder_killed_inside_clear_leaves_nothing_check_reports(
        heap: shmheap.Heap) -> None:
    """Kill a refill between the partial leaf it cleared and the leaf's ancestors."""
    allocator = heap._objects()
    c = allocator.lookup[(3000 + 15) >> 4]
    per = allocator.classes[c].nelems
    assert_killed(run_child(f"""
        import shmheap
        h = shmheap.Heap.attach({heap.name!r})
        a = [h.alloc(3000) for _ in range({(SPARE_SPANS + 2) * per + 2})]  # X, Y given up
        for ref in a[:{per}]:
            h.free(ref)                                    # X: unowned, empty, hinted
        b = [h.alloc(3000) for _ in range({per})]          # fill Z, give it up, adopt X
        """, "summary.leaf_cleared"))
    heap.snapshot(timeout=NOT_STUCK)  # the first writable holder repairs (the journal's audit)
    assert heap.check() == []
    assert heap.check(repair=True) == []
    hints = allocator._summaries.partial(c)
    assert hints.wrong_nodes() == []
    assert heap.check() == []


def test_a_mark_lost_above_its_leaf_heals_at_the_next_refill(heap: shmheap.Heap) -> None:
    """A free whose marker died between the partial leaf and its ancestors (only SIGKILL
    can land there: the stores are one run of C calls) leaves a hint find() cannot see."""
    allocator = heap._objects()
    c = allocator.lookup[(3000 + 15) >> 4]
    per = allocator.classes[c].nelems
    refs = [heap.alloc(3000) for _ in range((SPARE_SPANS + 2) * per + 2)]  # two given up
    for ref in refs[:per]:
        heap.free(ref)                                     # the first: unowned and empty
    hints = allocator._summaries.partial(c)
    index = hints.find(1)
    assert index >= 0
    for number, level in enumerate(hints._levels[1:], 1):
        level[index // 64 ** number] = 0  # as if the marker died right after the leaf
    assert hints.find(1) == -1 and hints.wrong_nodes()
    assert heap.check() == [], "a lost mark is a hint to heal, no finding"
    more = [heap.alloc(3000) for _ in range(per)]          # the next refill heals and adopts
    assert hints.wrong_nodes() == []
    assert heap.info().arenas == len(heap.snapshot())
    assert heap.check() == []
    for ref in more + refs[per:]:
        heap.free(ref)


def test_a_stale_hint_is_no_finding_and_repair_heals_it(heap: shmheap.Heap) -> None:
    index = heap.grow().index
    hints = heap._objects()._summaries.partial(1)
    hints.mark(index)
    hints._levels[0][index] = 0  # stopped in clear: ancestors set over no leaf
    assert hints.wrong_nodes()
    assert heap.check() == []
    assert heap.check(repair=True) == []
    assert hints.wrong_nodes() == []


TOGGLER = """
import sys, shmheap
h = shmheap.Heap.attach({name!r})
ref = h.alloc(64)
h.roots["a"] = ref
print("ready", flush=True)
while True:                      # at every moment "a" or "b" (or both) is bound
    h.roots["b"] = ref
    del h.roots["a"]
    h.roots["a"] = ref
    del h.roots["b"]
"""


def test_a_roots_snapshot_is_one_instant(heap: shmheap.Heap) -> None:
    for i in range(1500):  # a snapshot reads them all: binds land while it reads
        heap.roots[f"other{i}"] = heap.alloc(16)
    table = heap._roots
    assert table is not None
    with Child(TOGGLER.format(name=heap.name)) as writer:
        assert writer.line() == "ready"
        seen = set()
        for _ in range(120):
            names = heap.roots.snapshot().keys() & {"a", "b"}
            assert names, "a snapshot showed neither name: it was not one instant"
            seen.add(frozenset(names))
            assert {"a", "b"} & {name for name, _ref in heap.roots.items()}, "items() too"
        assert len(seen) > 1, "the writer ran meanwhile"
        assert writer.proc.poll() is None, writer.line()
    heap.snapshot(timeout=NOT_STUCK)  # the writer was killed, maybe mid-bind: repaired here
    seq = table.current().head[0]
    assert seq % 2 == 0
    heap.roots["c"] = heap.alloc(16)
    assert table.current().head[0] == seq + 2, "a bind moves the table's seq word"
    heap.check(timeout=NOT_STUCK, repair=True)
    assert heap.check() == []


def test_check_stays_within_the_mapping_budget(heap: shmheap.Heap) -> None:
    code = textwrap.dedent(f"""
        import shmheap
        h = shmheap.Heap.attach({heap.name!r})
        refs = [h.alloc(ARENA * 3 // 2) for _ in range(10)]
        print(h.check())
        for ref in refs:
            h.free(ref)
        print(h.check())
        """).replace("ARENA", str(ARENA))
    env = {**child_env(), "SHMHEAP_MAX_MAPPINGS": "16"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["[]", "[]"]
    assert os.path.exists(f"/dev/shm/shmheap.{heap.name}")
