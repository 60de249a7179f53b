"""Crash safety: a process SIGKILLed at every crash point leaves a heap that recovers.

Each test runs the operation in a fresh interpreter with SHMHEAP_CRASH_AT set, checks
that it really died of SIGKILL, then recovers from the parent: the next snapshot adopts
the dead holder's lock, the next writable lock hold repairs what the journal names,
check() is clean, every arena published before the kill is still listed, and destroy()
leaves nothing in /dev/shm.
"""

from __future__ import annotations

import os

import pytest
from children import assert_killed, run_child

import shmheap
from shmheap.pytest_plugin import HeapFactory

#: generous bound so that a broken recovery fails instead of hanging the suite
RECOVERY_TIMEOUT = 30.0

#: the operation a child runs to reach each crash point
OPERATIONS = {
    "lock": "h.grow()",
    "snapshot": "h.snapshot()",
    "grow": "h.grow()",
    "index": "h.grow()",
}


@pytest.fixture
def heap(shm_heap_factory: HeapFactory) -> shmheap.Heap:
    return shm_heap_factory(reserve=False)


def fill_to_capacity(h: shmheap.Heap) -> list[int]:
    """Grow until the index's current generation is full, so the next append doubles."""
    cap = h.info().index_cap
    return [h.grow().index for _ in range(cap)]


def recover_and_check(h: shmheap.Heap, published: list[int]) -> None:
    snap = h.snapshot(timeout=RECOVERY_TIMEOUT)
    assert list(snap[: len(published)]) == published, "an arena published before the kill was lost"
    assert len(snap) - len(published) in (0, 1)
    with h.locked(timeout=RECOVERY_TIMEOUT):
        pass  # a writable lock holder repairs what the journal names
    assert h.check() == [], "check() must be clean after recovery"
    assert not [e for e in os.listdir("/dev/shm") if e.startswith(f"shmheap.{h.name}.new")], \
        "the dead grower's new arena was not removed"
    h.grow(timeout=RECOVERY_TIMEOUT)  # the heap goes on working
    assert h.check() == []


LOCKED_POINTS = [p for p in shmheap.CRASH_POINTS
                 if p.split(".")[0] in OPERATIONS and p not in ("index.generation_created",
                                                                 "index.generation_copied")]


#: crash points reached without the heap lock: nobody has to adopt anything
UNLOCKED_POINTS = {"grow.segment_created"}


@pytest.mark.parametrize("point", LOCKED_POINTS)
def test_kill_at_crash_point_recovers(heap: shmheap.Heap, point: str) -> None:
    published = [heap.grow().index for _ in range(3)]
    op = OPERATIONS[point.split(".")[0]]
    proc = run_child(f"""
        import shmheap
        h = shmheap.Heap.attach({heap.name!r})
        {op}
        """, point)
    assert_killed(proc)
    if point in UNLOCKED_POINTS:
        # The dead process left its new arena under its temporary name, and its slot:
        # garbage that the next lock holder (here check()) recycles without a finding.
        assert [e for e in os.listdir("/dev/shm") if e.startswith(f"shmheap.{heap.name}.new")]
    recover_and_check(heap, published)
    assert heap.info().recoveries == (0 if point in UNLOCKED_POINTS else 1)


@pytest.mark.parametrize("point", ["index.generation_created", "index.generation_copied",
                                   "index.published"])
def test_kill_during_index_doubling_recovers(heap: shmheap.Heap, point: str) -> None:
    published = fill_to_capacity(heap)
    before = heap.snapshot()
    proc = run_child(f"""
        import shmheap
        h = shmheap.Heap.attach({heap.name!r})
        h.grow()
        """, point)
    assert_killed(proc)
    recover_and_check(heap, published)
    assert list(before) == published, "a snapshot taken before the kill must stay readable"
    info = heap.info()
    assert info.index_generations == 2
    assert info.index_bytes <= 2 * info.index_cap * 4 + 4096


def test_kill_on_the_kth_hit(heap: shmheap.Heap) -> None:
    proc = run_child(f"""
        import shmheap
        h = shmheap.Heap.attach({heap.name!r})
        for _ in range(5):
            h.grow()
        """, "index.published:3")
    assert_killed(proc)
    snap = heap.snapshot(timeout=RECOVERY_TIMEOUT)
    assert len(snap) == 3, "the third append was published, the fourth never started"
    with heap.locked(timeout=RECOVERY_TIMEOUT):
        pass
    assert heap.check() == []


def test_waiter_killed_while_adopting_is_recovered_by_the_next(heap: shmheap.Heap) -> None:
    published = [heap.grow().index for _ in range(2)]
    holder = run_child(f"""
        import shmheap
        shmheap.Heap.attach({heap.name!r}).grow()
        """, "lock.owned")
    assert_killed(holder)
    adopter = run_child(f"""
        import shmheap
        shmheap.Heap.attach({heap.name!r}).snapshot()
        """, "repair.adopted")
    assert_killed(adopter)
    recover_and_check(heap, published)
    assert heap.info().recoveries == 2, "each adoption counts, the dead adopter's too"


@pytest.mark.parametrize("point", ["create.control_created", "create.initialised"])
def test_creator_killed_while_initialising(shm_heap_name: str, point: str) -> None:
    name = shm_heap_name
    proc = run_child(f"""
        import shmheap
        shmheap.Heap.create({name!r}, arena_size=64 * 1024)
        """, point)
    assert_killed(proc)
    with pytest.raises(shmheap.HeapCorruptError, match="died while initialising"):
        shmheap.Heap.attach(name, timeout=10)
    removed = shmheap.destroy(name)
    assert f"shmheap.{name}" in removed
    with pytest.raises(shmheap.HeapNotFoundError):
        shmheap.Heap.attach(name)


def test_every_crash_point_is_exercised() -> None:
    covered = set(LOCKED_POINTS) | {"index.generation_created", "index.generation_copied",
                                    "index.published", "repair.adopted", "create.control_created",
                                    "create.initialised"}
    missing = set(shmheap.CRASH_POINTS) - covered
    # Points added by the allocator are exercised in its own tests.
    assert not {p for p in missing if p.split(".")[0] in ("lock", "snapshot", "grow", "index",
                                                           "create", "repair")}


def test_unknown_crash_point_is_a_clear_error() -> None:
    proc = run_child("import shmheap", "no.such.point")
    assert proc.returncode == 1
    assert "names no crash point" in proc.stderr
