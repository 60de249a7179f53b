"""Atomic naming (``alloc/put/new_array(..., root=NAME)``) and owners: ``adopt`` and
``reclaim`` of what dead processes owned, under real kills and interrupts."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
from children import Child, assert_killed, run_child

import shmheap
from shmheap.allocator import HELD
from shmheap.pytest_plugin import HeapFactory

ARENA = 1 << 20
RECOVERY_TIMEOUT = 30.0

#: the calls that make a named object, and what the name must give back when it is bound
NAMED = {
    "small": ('h.alloc(100, root="x")', "len(h.view(ref)) == 100"),
    "large": ('h.alloc(50_000, root="x")', "len(h.view(ref)) == 50_000"),
    "giant": (f'h.alloc({2 * ARENA + 999}, root="x")', f"h.nbytes(ref) == {2 * ARENA + 999}"),
    "put": ('h.put({"k": list(range(50))}, root="x")', 'h.get(ref) == {"k": list(range(50))}'),
    "array": ('h.new_array((40, 40), "i4", root="x")', "h.ndarray(ref).shape == (40, 40)"),
}
#: every point a named make passes: its own, then the bind's
POINTS = ["named.made", "roots.counted", "roots.entry_written", "roots.published",
          "roots.handed_over"]


@pytest.fixture
def heap(shm_heap_factory: HeapFactory) -> shmheap.Heap:
    return shm_heap_factory(arena_size=ARENA, reserve=False)


def holder(heap: shmheap.Heap, ref: int) -> int:
    objects = heap._objects()
    return objects.holder(*objects.live(ref))


def bound_or_nothing(heap: shmheap.Heap, check: str) -> bool:
    """The name is bound to a whole object held by its root; else no object is left."""
    if "x" in heap.roots:
        ref = heap.roots["x"]
        h = heap
        assert eval(check, {"h": h, "ref": ref}), check
        assert holder(heap, ref) == HELD
        heap.roots.unbind("x")
        heap.free(ref)
        return True
    assert heap.stats().live_objects == 0, "an unnamed object was left"
    return False


def test_every_point_of_a_named_make_is_covered() -> None:
    assert {p for p in shmheap.CRASH_POINTS if p.startswith("named.")} <= set(POINTS)


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("kind", sorted(NAMED))
def test_killed_anywhere_in_a_named_make_leaves_it_bound_or_nothing(
        heap: shmheap.Heap, kind: str, point: str) -> None:
    make, check = NAMED[kind]
    proc = run_child(f"""
        import shmheap
        h = shmheap.Heap.attach({heap.name!r})
        {make}
        """, point)
    assert_killed(proc)
    heap.check(repair=True, timeout=RECOVERY_TIMEOUT)  # adopts the lock, repairs the journal
    assert heap.check() == []
    if "x" not in heap.roots:
        freed = heap.reclaim(timeout=RECOVERY_TIMEOUT)
        assert freed.objects == (point in ("named.made", "roots.counted",
                                           "roots.entry_written")), freed
    bound = bound_or_nothing(heap, check)
    assert bound == (point in ("roots.published", "roots.handed_over"))
    assert heap.check() == []


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("kind", ["small", "put", "giant"])
def test_interrupted_anywhere_in_a_named_make_leaves_it_bound_or_nothing(
        heap: shmheap.Heap, kind: str, point: str) -> None:
    make, check = NAMED[kind]
    with Child(f"""
        import shmheap, sys
        h = shmheap.Heap.attach({heap.name!r})
        try:
            {make}
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        else:
            print("never reached", flush=True)
        sys.stdin.readline()
        h.close()
        """, raise_at=point) as child:
        assert child.line() == "interrupted"
        # the interrupted process lives on: nothing waits for a reclaim
        heap.check(repair=True, timeout=RECOVERY_TIMEOUT)
        bound_or_nothing(heap, check)
        child.send()
        assert child.wait() == 0
    assert heap.check() == []


WORKER = """
import json, random, sys, shmheap
h = shmheap.Heap.attach({name!r})
rng = random.Random({seed})
made = []
print("ready", flush=True)
sys.stdin.readline()
for i in range(10**9):
    n = rng.choice((24, 700, 20_000, 90_000))
    if rng.random() < 0.3:
        h.put({{"me": {seed}, "i": i, "pad": bytes(n)}}, root=f"w{seed}.{{i}}")
    elif rng.random() < 0.5:
        h.view(h.alloc(n, root=f"w{seed}.{{i}}"))[:8] = i.to_bytes(8, "little")
    else:
        h.alloc(n)
    if i == 200:
        print("going", flush=True)
"""


def test_reclaim_after_kills_frees_the_dead_unnamed_and_nothing_else(
        heap: shmheap.Heap) -> None:
    rng = random.Random(19)
    alive = [heap.alloc(n) for n in (16, 5000, 70_000)]  # this process owns these
    for ref in alive:
        heap.view(ref)[:] = b"\xab" * heap.nbytes(ref)
    kept = heap.put([1, "kept"], root="kept")
    total = 0
    for round_ in range(4):
        workers = [Child(WORKER.format(name=heap.name, seed=round_ * 10 + i)) for i in range(3)]
        try:
            for child in workers:
                assert child.line() == "ready"
            for child in workers:
                child.send()
            for child in workers:
                assert child.line(timeout=120) == "going"
            rng.shuffle(workers)
        finally:
            for child in workers:  # killed mid-way, at whatever instruction they are at
                child.kill()
        heap.check(repair=True, timeout=RECOVERY_TIMEOUT)
        before = heap.stats().live_objects
        dead = {name: owner for name, owner in heap.bytes_by_owner().items() if not owner.alive}
        report = heap.reclaim(timeout=RECOVERY_TIMEOUT)
        total += report.objects
        assert report.objects > 0 and set(report.by_owner) == set(dead), "the dead owners, all"
        assert report.objects == sum(owner.objects for owner in dead.values())
        named = dict(heap.roots)
        assert heap.stats().live_objects == before - report.objects == len(named) + len(alive)
        for name, ref in named.items():  # every named object survived, whole
            if name == "kept":
                continue
            seed, i = (int(part) for part in name[1:].split("."))
            try:
                value = heap.get(ref)
            except shmheap.InvalidRefError:  # (killed after the alloc, before its write: zero)
                assert bytes(heap.view(ref)[:8]) in (i.to_bytes(8, "little"), bytes(8)), name
            else:
                assert value["me"] == seed and value["i"] == i, name
        assert heap.check() == []
        assert heap.reclaim().objects == 0, "one pass frees everything"
    assert total > 0
    for ref in alive:  # a live owner's objects were never touched
        assert bytes(heap.view(ref)) == b"\xab" * heap.nbytes(ref)
    assert heap.get(kept) == [1, "kept"]
    by_owner = heap.bytes_by_owner()
    assert all(owner.alive for owner in by_owner.values()), by_owner
    for name in list(heap.roots):
        ref = heap.roots[name]
        heap.roots.unbind(name)
        heap.free(ref)
    for ref in alive:
        heap.free(ref)
    assert heap.stats().live_objects == 0


def test_owners_adopt_and_unbind(heap: shmheap.Heap) -> None:
    proc = run_child(f"""
        import json, shmheap
        h = shmheap.Heap.attach({heap.name!r})
        plain, adopted, unbound = h.put("plain"), h.put("adopted"), h.put("unbound")
        h.roots["to unbind"] = unbound
        h.roots["bound here"] = h.put("bound")
        print(json.dumps([plain, adopted, unbound]))
        h.close()
        """)
    assert proc.returncode == 0, proc.stderr
    plain, adopted, unbound = json.loads(proc.stdout)
    heap.adopt(adopted)
    heap.roots.unbind("to unbind")  # whoever unbinds an object owns it
    assert holder(heap, adopted) == holder(heap, unbound) != HELD
    report = heap.reclaim()
    assert (report.objects, list(report.by_owner)) == (1, ["slot 1 epoch 1"]), report
    with pytest.raises(shmheap.InvalidRefError):
        heap.get(plain)  # a plain int handed over is still its maker's
    assert (heap.get(adopted), heap.get(unbound)) == ("adopted", "unbound")
    assert heap.get(heap.roots["bound here"]) == "bound"
    with pytest.raises(shmheap.InvalidRefError):
        heap.adopt(plain)
    for ref in (adopted, unbound):
        heap.free(ref)
    ref = heap.roots["bound here"]
    del heap.roots["bound here"]
    heap.free(ref)
    assert heap.stats().live_objects == 0 and heap.check() == []


def shmheap_cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "shmheap", *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_info_shows_bytes_by_owner_and_gc_objects_reclaims(heap: shmheap.Heap) -> None:
    assert_killed(run_child(f"""
        import os, signal, shmheap
        h = shmheap.Heap.attach({heap.name!r})
        for _ in range(10):
            h.alloc(3000)
        h.alloc(100, root="kept")
        os.kill(os.getpid(), signal.SIGKILL)
        """))
    mine = heap.alloc(500)
    owners = json.loads(shmheap_cli("info", "--json", heap.name))["owners"]
    dead = [o for o in owners.values() if not o["alive"]]
    assert [(o["objects"], o["bytes"]) for o in dead] == [(10, 10 * heap.size_of(heap.alloc(3000)))]
    assert owners["held"]["objects"] == 1
    text = shmheap_cli("info", heap.name)
    assert "dead " in text and "(1 owner, 10 objects)" in text, text
    dry = json.loads(shmheap_cli("gc", "--objects", "--dry-run", "--json", heap.name))
    assert dry["reclaimed"][heap.name]["objects"] == 10
    assert "freed 10 objects of dead processes" in shmheap_cli("gc", "--objects", heap.name)
    assert heap.reclaim().objects == 0
    assert heap.nbytes(mine) == 500 and heap.nbytes(heap.roots["kept"]) == 100


def test_reclaim_leaves_what_queues_and_counters_hold(heap: shmheap.Heap) -> None:
    assert_killed(run_child(f"""
        import os, signal, shmheap
        h = shmheap.Heap.attach({heap.name!r})
        q = h.queue("jobs")
        for i in range(5):
            q.put({{"job": i}})
        h.counter("done").add(3)
        h.put("scratch")
        os.kill(os.getpid(), signal.SIGKILL)
        """))
    report = heap.reclaim(timeout=RECOVERY_TIMEOUT)
    assert report.objects == 1, report  # the scratch value only
    queue = heap.queue("jobs")
    assert [queue.get(timeout=5) for _ in range(5)] == [{"job": i} for i in range(5)]
    assert heap.counter("done").add() == 4
    assert heap.check() == []


def test_a_named_make_over_a_bound_name_hands_the_old_object_to_the_caller(
        heap: shmheap.Heap) -> None:
    old = heap.put("old", root="x")
    new = heap.alloc(10, root="x")
    assert heap.roots["x"] == new and holder(heap, new) == HELD
    assert holder(heap, old) != HELD and heap.reclaim().objects == 0
    heap.free(old)  # the caller's now: unbound, so free() may
    del heap.roots["x"]
    heap.free(new)
    with pytest.raises(shmheap.InvalidNameError):
        heap.put(1, root="")
    assert heap.stats().live_objects == 0
