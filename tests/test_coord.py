"""Queues, events, counters and barriers of the heap: what each promises, with real kills.

Single-process tests pin the API (the stdlib's exceptions and semantics); the
multi-process ones start fresh interpreters (spawn, workers in coord_workers.py)
and kill them with SIGKILL: no queued item lost or duplicated among the living,
leased items of the dead delivered again, no acknowledged add lost, waiters
woken across processes, a dead party breaking a barrier.  Every coordination
crash point is killed here (and raised at in test_faults.py): the next lock
holder undoes the half-done change and check() is clean.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import random
import signal
import textwrap
import threading
from collections import Counter as Tally
from collections.abc import Callable
from typing import Any

import coord_workers
import pytest
from children import Child, assert_killed, process_state, run_child, wait_until

import shmheap
from shmheap.pytest_plugin import HeapFactory

#: generous bound so that a broken recovery fails instead of hanging the suite
PATIENCE = 60.0
ARENA = 1 << 20


@pytest.fixture
def heap(shm_heap_factory: HeapFactory) -> shmheap.Heap:
    return shm_heap_factory(arena_size=ARENA, reserve=False)


def spawn(target: Callable[..., object], *args: object) -> multiprocessing.process.BaseProcess:
    proc = multiprocessing.get_context("spawn").Process(target=target, args=args)
    proc.start()
    return proc


def join_all(procs: list[multiprocessing.process.BaseProcess]) -> None:
    for proc in procs:
        proc.join(PATIENCE)
        assert proc.exitcode == 0, f"worker exit code {proc.exitcode}"


def kill_consumers(consumers: list[multiprocessing.process.BaseProcess],
                   worker: Callable[..., object], heap_name: str, done: shmheap.coord.Queue,
                   busy: Callable[[], bool], most: int, rng: random.Random) -> int:
    """A kill loop: while ``busy()`` and at most ``most`` times, wait for one item to reach
    ``done`` (progress between kills), then SIGKILL a random consumer and start a fresh
    ``worker`` in its place.  Returns how many were killed."""
    kills = 0
    while busy() and kills < most:
        done.put(done.get(timeout=PATIENCE))
        victim = consumers.pop(rng.randrange(len(consumers)))
        victim.kill()
        victim.join()
        kills += 1
        consumers.append(spawn(worker, heap_name))
    return kills


def drain(q: shmheap.coord.Queue) -> list[Any]:
    items: list[Any] = []
    while True:
        try:
            items.append(q.get(timeout=0))
        except queue.Empty:
            return items


# -- queue, single process --------------------------------------------------------------


def test_a_queue_is_fifo_of_ints_and_picklable_objects(heap: shmheap.Heap) -> None:
    q = heap.queue("q")
    items = [1, -(1 << 63), (1 << 63) - 1, 1 << 70, "text", {"a": [1, 2]}, None, b"x" * 50000]
    for item in items:
        q.put(item)
    assert len(q) == len(items)
    assert [q.get() for _ in items] == items
    assert len(q) == 0
    assert heap.check() == []


def test_an_item_that_does_not_pickle_is_refused_and_nothing_is_kept(heap: shmheap.Heap) -> None:
    q = heap.queue("q")
    before = live_objects(heap)
    with pytest.raises(shmheap.InvalidParameterError, match="cannot be pickled"):
        q.put(lambda: 1)
    assert len(q) == 0 and live_objects(heap) == before
    assert heap.check() == []


def test_get_and_put_time_out_with_the_stdlib_exceptions(heap: shmheap.Heap) -> None:
    q = heap.queue("bounded", capacity=2)
    assert q.capacity == 2
    q.put(1)
    q.put_nowait(2)
    with pytest.raises(queue.Full):
        q.put(3, timeout=0.01)
    assert [q.get(), q.get_nowait()] == [1, 2]
    with pytest.raises(queue.Empty):
        q.get(timeout=0.01)
    with pytest.raises(queue.Empty):
        q.get_nowait()
    assert heap.check() == [], "an item that timed out is not left behind"


def test_a_closed_queue_refuses_puts_and_drains_then_reports_empty(heap: shmheap.Heap) -> None:
    q = heap.queue("q")
    q.put("last")
    heap.queue("q").close()
    assert q.closed
    with pytest.raises(shmheap.QueueClosedError, match="closed"):
        q.put("more")
    assert q.get() == "last"
    with pytest.raises(queue.Empty):
        q.get()  # no timeout: a closed, empty queue does not wait
    assert heap.check() == []


def test_a_lease_is_removed_when_its_block_ends_and_given_back_when_it_raises(
        heap: shmheap.Heap) -> None:
    q = heap.queue("q")
    q.put("a")
    q.put("b")
    with pytest.raises(ValueError), q.lease() as item:
        assert item == "a"
        assert (len(q), q.leased) == (1, 1)
        raise ValueError
    assert (len(q), q.leased) == (2, 0)
    with q.lease() as item:
        assert item == "a", "an item given back goes to the head"
    assert [q.get(), len(q), q.leased] == ["b", 0, 0]
    assert heap.check() == []


def test_gets_beside_a_live_lease_leave_its_item_alone(heap: shmheap.Heap) -> None:
    q = heap.queue("q")
    for item in range(5):
        q.put(item)
    with q.lease() as leased:
        assert [q.get() for _ in range(3)] == [1, 2, 3], "the leaser lives: its item stays out"
        assert q.leased == 1 and leased == 0
    assert q.get(timeout=0) == 4 and q.leased == 0
    with pytest.raises(queue.Empty):
        q.get(timeout=0)
    assert heap.check() == []


def test_structures_are_found_by_name_and_kind(heap: shmheap.Heap) -> None:
    with shmheap.Heap.attach(heap.name) as other:
        other.queue("jobs", capacity=3).put(7)
        other.counter("n").add(4)
    assert heap.queue("jobs").get() == 7
    assert heap.queue("jobs", capacity=None).capacity == 3
    assert heap.counter("n").value == 4
    with pytest.raises(shmheap.InvalidParameterError, match="capacity 3"):
        heap.queue("jobs", capacity=4)
    with pytest.raises(shmheap.InvalidParameterError, match="not an event"):
        heap.event("jobs")
    with pytest.raises(shmheap.InvalidParameterError, match="capacity"):
        heap.queue("zero", capacity=0)
    with pytest.raises(shmheap.InvalidParameterError, match="parties"):
        heap.barrier("b", 0)
    for bad in ("", "a b", "x" * 49, 5):
        with pytest.raises(shmheap.InvalidNameError):
            heap.queue(bad)  # type: ignore[arg-type]
    with pytest.raises(shmheap.InvalidParameterError):
        heap.counter("n").add(1.5)  # type: ignore[arg-type]
    assert [(s.name, s.kind) for s in heap.structures()] == [("jobs", "queue"), ("n", "counter")]
    assert heap.check() == []


def test_a_readonly_handle_only_looks_at_events(heap: shmheap.Heap) -> None:
    with shmheap.Heap.attach(heap.name, readonly=True) as ro:
        with pytest.raises(shmheap.ReadOnlyError):
            ro.queue("q")
        with pytest.raises(shmheap.ReadOnlyError):
            ro.event("e")  # it cannot make one
        heap.event("e")
        seen = ro.event("e")
        assert not seen.is_set() and seen.wait(timeout=0.01) is False
        with pytest.raises(shmheap.ReadOnlyError):
            seen.set()
        heap.event("e").set()
        assert seen.is_set() and seen.wait(timeout=PATIENCE)
        assert ro.check() == []


def test_a_closed_heap_refuses_its_structures(heap: shmheap.Heap) -> None:
    other = shmheap.Heap.attach(heap.name)
    counter, q = other.counter("n"), other.queue("q")
    other.close()
    with pytest.raises(shmheap.HeapClosedError):
        counter.add()
    with pytest.raises(shmheap.HeapClosedError):
        q.put(1)


# -- event, counter, barrier, single process -------------------------------------------------


def test_an_event_behaves_as_threading_event(heap: shmheap.Heap) -> None:
    e = heap.event("e")
    assert not e.is_set()
    assert e.wait(timeout=0.01) is False
    e.set()
    assert e.is_set() and e.wait() is True and heap.event("e").is_set()
    e.clear()
    assert not e.is_set()


def test_a_counter_adds_and_returns_the_new_value(heap: shmheap.Heap) -> None:
    c = heap.counter("c")
    assert c.value == 0
    assert [c.add(), c.add(), c.add(10), c.add(-12)] == [1, 2, 12, 0]
    assert c.add(-1) == -1 and c.value == -1


def test_a_barrier_of_one_passes_and_a_timeout_breaks_it(heap: shmheap.Heap) -> None:
    assert heap.barrier("one", 1).wait() == 0
    b = heap.barrier("two", 2)
    with pytest.raises(threading.BrokenBarrierError):
        b.wait(timeout=0.01)
    assert b.broken
    with pytest.raises(threading.BrokenBarrierError):
        heap.barrier("two", 2).wait()
    with pytest.raises(shmheap.InvalidParameterError, match="parties 2"):
        heap.barrier("two", 3)


def test_a_barrier_registers_at_most_its_parties_and_reset_mends_it(heap: shmheap.Heap) -> None:
    b = heap.barrier("b", 2)
    assert heap.barrier("b", 2).parties == 2  # (calling again registers nobody new)
    with shmheap.Heap.attach(heap.name) as second, shmheap.Heap.attach(heap.name) as third:
        second.barrier("b", 2)
        with pytest.raises(shmheap.InvalidParameterError, match="its 2 parties already"):
            third.barrier("b", 2)
    assert not b.broken  # (closing a handle is seen at the next look)
    with pytest.raises(threading.BrokenBarrierError):
        b.wait(timeout=PATIENCE)  # a party has gone: the round can never fill
    assert b.broken and b.n_waiting == 0
    b.reset()
    assert not b.broken, "reset mends a broken barrier"
    with shmheap.Heap.attach(heap.name) as second:
        assert second.barrier("b", 2).parties == 2, "the gone party's place is free again"
    b.reset()
    b.abort()
    assert b.broken
    b.reset()
    assert heap.barrier("one", 1).wait() == 0 and heap.check() == []


# -- across processes, with kills ---------------------------------------------------------------


def test_items_cross_processes_exactly_once(heap: shmheap.Heap) -> None:
    work, done = heap.queue("work", capacity=50), heap.queue("done")
    producers = [spawn(coord_workers.produce, heap.name, k * 200, 200) for k in range(2)]
    consumers = [spawn(coord_workers.consume, heap.name) for _ in range(2)]
    join_all(producers)
    work.close()
    join_all(consumers)
    got = drain(done)
    assert sorted(got) == list(range(400))
    assert heap.check() == []


def test_the_item_of_a_killed_leaser_is_delivered_again(heap: shmheap.Heap) -> None:
    work = heap.queue("work")
    for item in ("first", "second"):
        work.put(item)
    holder = spawn(coord_workers.hold_a_lease, heap.name)
    assert heap.event("leased").wait(timeout=PATIENCE)
    assert heap.queue("held").get() == "first" and work.leased == 1
    holder.kill()
    holder.join()
    assert work.get(timeout=PATIENCE) == "first", "the dead leaser's item comes back first"
    assert work.get(timeout=0) == "second"
    assert work.leased == 0
    assert heap.check() == []


def test_killed_leasing_consumers_lose_nothing(heap: shmheap.Heap) -> None:
    """A kill loop: consumers SIGKILLed at random moments; every item done at least once,
    and done twice only for a consumer killed between its report and its lease's end."""
    work, done = heap.queue("work"), heap.queue("done")
    items = list(range(300))
    for item in items:
        work.put(item)
    consumers = [spawn(coord_workers.consume_leased, heap.name) for _ in range(3)]
    kills = kill_consumers(consumers, coord_workers.consume_leased, heap.name, done,
                           lambda: len(work) + work.leased > 0, 12, random.Random(20))
    work.close()
    join_all(consumers)
    tally = Tally(drain(done))
    assert set(tally) == set(items), "an item was lost"
    assert sum(n - 1 for n in tally.values()) <= kills, "more duplicates than kills"
    assert len(work) == 0 and work.leased == 0
    assert heap.check() == []


def test_killed_getters_never_duplicate_an_item(heap: shmheap.Heap) -> None:
    work, done = heap.queue("work"), heap.queue("done")
    for item in range(300):
        work.put(item)
    consumers = [spawn(coord_workers.consume, heap.name) for _ in range(2)]
    kills = kill_consumers(consumers, coord_workers.consume, heap.name, done,
                           lambda: len(work) > 0, 6, random.Random(7))
    work.close()
    join_all(consumers)
    got = drain(done)
    assert len(got) == len(set(got)), "an item was delivered twice"
    assert 300 - kills <= len(got) <= 300, "each killed getter holds at most one item"
    assert heap.check() == []


def test_adds_from_many_processes_are_all_counted_once(heap: shmheap.Heap) -> None:
    workers = [spawn(coord_workers.add, heap.name, 200) for _ in range(3)]
    join_all(workers)
    assert heap.counter("n").value == 600
    assert sorted(drain(heap.queue("values"))) == list(range(1, 601)), \
        "every add returned its own new value"


def test_an_event_set_wakes_a_waiter_in_another_process(heap: shmheap.Heap) -> None:
    report = heap.queue("report")
    waiter = spawn(coord_workers.wait_for_event, heap.name)
    assert report.get(timeout=PATIENCE) == "ready"
    heap.event("go").set()
    assert report.get(timeout=PATIENCE) == "woken"
    join_all([waiter])


def test_an_event_set_wakes_a_readonly_waiter_in_another_process(heap: shmheap.Heap) -> None:
    go = heap.event("go")  # (a read-only handle makes none)
    waiter = spawn(coord_workers.wait_for_event_readonly, heap.name)
    # The waiter has attached; it looks up the event and sleeps.
    wait_until(lambda: heap.info().attached >= 2)
    go.set()
    join_all([waiter])  # exit 0: its wait returned True


def test_a_barrier_lets_its_parties_through_together(heap: shmheap.Heap) -> None:
    parties = [spawn(coord_workers.barrier_party, heap.name, 3, 2) for _ in range(2)]
    mine = [heap.barrier("b", 3).wait(timeout=PATIENCE) for _ in range(2)]  # two rounds
    join_all(parties)
    reports = drain(heap.queue("report"))
    assert sorted(reports + mine) == [0, 0, 1, 1, 2, 2], "each round numbers its 3 arrivals"
    assert heap.check() == []


def test_a_party_killed_before_it_waits_breaks_the_barrier_and_reset_mends_it(
        heap: shmheap.Heap) -> None:
    b = heap.barrier("b", 3)
    report = heap.queue("report")
    doomed = spawn(coord_workers.register_and_park, heap.name, 3)
    assert report.get(timeout=PATIENCE) == "registered"
    waiter = spawn(coord_workers.barrier_party, heap.name, 3)
    wait_until(lambda: b.n_waiting >= 1)  # the other party has arrived and waits
    doomed.kill()
    doomed.join()
    assert report.get(timeout=PATIENCE) == "broken", "the waiter saw the registered party die"
    join_all([waiter])
    with pytest.raises(threading.BrokenBarrierError):
        b.wait(timeout=PATIENCE)
    b.reset()  # drops both gone parties
    assert not b.broken and b.n_waiting == 0
    parties = [spawn(coord_workers.barrier_party, heap.name, 3) for _ in range(2)]
    indices: list[Any] = [b.wait(timeout=PATIENCE)]
    indices += [report.get(timeout=PATIENCE) for _ in range(2)]
    assert sorted(indices) == [0, 1, 2], "a reset barrier takes new parties and passes"
    join_all(parties)
    assert heap.check() == []


def test_a_party_that_leaves_is_waited_for_no_more_and_breaks_nothing(
        heap: shmheap.Heap) -> None:
    b = heap.barrier("b", 3)
    leaver = spawn(coord_workers.leave_after_a_round, heap.name, 3)
    party = spawn(coord_workers.barrier_party, heap.name, 3, 2)
    mine = [b.wait(timeout=PATIENCE), b.wait(timeout=PATIENCE)]  # (3 parties, then 2)
    join_all([leaver, party])  # gone, but it left first: nothing is broken
    reports = drain(heap.queue("report"))
    assert reports.count("left") == 1 and "broken" not in reports
    rounds = [r for r in reports if r != "left"] + mine
    assert sorted(rounds) == [0, 0, 1, 1, 2], "3 parties passed the first round, 2 the second"
    assert b.parties == 2 and not b.broken
    assert heap.check() == []


def test_leaving_lets_the_parties_that_waited_for_it_through(heap: shmheap.Heap) -> None:
    b = heap.barrier("b", 2)
    waiter = spawn(coord_workers.barrier_party, heap.name, 2)
    wait_until(lambda: b.n_waiting >= 1)  # the other party has arrived and waits for this one
    b.leave()
    assert heap.queue("report").get(timeout=PATIENCE) == 0, "its round passed"
    join_all([waiter])
    assert b.parties == 1 and not b.broken
    b.leave()  # (no party any more: nothing happens)
    assert b.parties == 1
    b.reset()  # drops the waiter (it closed its handle a party), makes this process one again
    assert b.parties == 1 and b.wait(timeout=PATIENCE) == 0, "the party that left stays gone"
    with shmheap.Heap.attach(heap.name) as second, pytest.raises(shmheap.InvalidParameterError):
        second.barrier("b", 2)  # no room: it needs one party, and has it
    assert heap.check() == []


def test_check_bounds_a_barriers_parties_left_and_arrivals(heap: shmheap.Heap) -> None:
    b = heap.barrier("b", 3)
    words, base = b._table.words, b._b
    words[base + shmheap.coord._LEFT] = 7  # (more than it was made with: damage)
    with pytest.raises(shmheap.HeapCorruptError):
        b.parties  # noqa: B018
    words[base + shmheap.coord._ARRIVED] = 1
    assert {f.code for f in heap.check()} == {"coord-barrier"}
    assert all(f.fixed for f in heap.check(repair=True))
    assert b.parties == 0 and b.broken and heap.check() == []


def test_reset_breaks_the_round_of_the_parties_waiting(heap: shmheap.Heap) -> None:
    b = heap.barrier("b", 2)
    waiter = spawn(coord_workers.barrier_party, heap.name, 2)
    wait_until(lambda: b.n_waiting >= 1)
    b.reset()
    report = heap.queue("report")
    assert report.get(timeout=PATIENCE) == "broken"
    join_all([waiter])
    assert not b.broken
    assert heap.check() == []


def test_a_party_killed_while_waiting_breaks_the_barrier(heap: shmheap.Heap) -> None:
    b = heap.barrier("b", 3)
    doomed = spawn(coord_workers.barrier_party, heap.name, 3)
    wait_until(lambda: b.n_waiting >= 1)  # the doomed party has arrived and waits
    doomed.kill()
    doomed.join()
    other = spawn(coord_workers.barrier_party, heap.name, 3)
    with pytest.raises(threading.BrokenBarrierError):
        b.wait(timeout=PATIENCE)
    assert heap.queue("report").get(timeout=PATIENCE) == "broken"
    join_all([other])


def test_reclaim_frees_what_dead_getters_took_never_what_a_queue_holds(
        heap: shmheap.Heap) -> None:
    putter = run_child(f"""
        import shmheap
        h = shmheap.Heap.attach({heap.name!r})
        q = h.queue("q")
        for item in ("a", "b", "c"):
            q.put(item)
        q.get()
        """)  # then it is gone: its nodes are the queue's (coord.taken: a dead getter's)
    assert putter.returncode == 0, putter.stderr
    assert heap.reclaim().objects == 0, "queued items are the queue's, whoever put them"
    assert drain(heap.queue("q")) == ["b", "c"]
    assert heap.check() == []


def test_a_lock_holder_killed_inside_a_queue_op_blocks_nobody(heap: shmheap.Heap) -> None:
    q = heap.queue("q")
    q.put("kept")
    assert_killed(run_child(f"""
        import shmheap
        shmheap.Heap.attach({heap.name!r}).queue("q").put("half")
        """, "coord.linked"))
    assert q.get(timeout=PATIENCE) == "kept"
    with pytest.raises(queue.Empty):
        q.get(timeout=0)
    assert heap.info().recoveries == 1
    assert heap.check() == []


# -- every coordination crash point, killed ------------------------------------------------------

#: point -> (what the parent sets up, what the child does, what the parent then sees)
KILLS = {
    "coord.created": ("", "h.queue('new')",
                      "h.queue('new').put(1); assert h.queue('new').get() == 1"),
    "coord.described": ("", "h.queue('new')",
                        "h.queue('new').put(1); assert h.queue('new').get() == 1"),
    "coord.linked": ("q.put('a')", "q.put(b'large' * 20000)", "assert drain(q) == ['a']"),
    "coord.put_released": ("q.put('a')", "q.put(b'large' * 20000)",
                           "assert drain(q) == ['a', b'large' * 20000]  # (the put had ended)"),
    "coord.unlinked": ("q.put('a'); q.put('b')", "q.get()", "assert drain(q) == ['a', 'b']"),
    "coord.taken": ("q.put('a'); q.put('b')", "q.get()",
                    "assert drain(q) == ['b'] and h.reclaim().objects == 1  # the dead getter's"),
    "coord.unleased": ("q.put('a')", "with q.lease():\n    raise ValueError",
                       "assert q.get(timeout=PATIENCE) == 'a'"),
    "coord.acked": ("q.put('a')", "with q.lease():\n    pass",
                    "assert q.get(timeout=PATIENCE) == 'a'  # at least once: delivered again"),
    "coord.handed": ("q.put('a'); q.put('b')", "q.get()", "assert drain(q) == ['a', 'b']"),
    "coord.flag_stored": ("", "h.event('e').set()", "assert h.event('e').wait(PATIENCE)"),
    "coord.arrived": ("h.barrier('b', 2)", "h.barrier('b', 2).wait()",
                      "assert [s.value for s in h.structures() if s.name == 'b'] == [0]\n"
                      "b = h.barrier('b', 2); assert b.broken  # (its other party died)\n"
                      "b.reset(); assert not b.broken"),
    "coord.left": ("h.barrier('b', 2)", "h.barrier('b', 2).leave()",
                   "b = h.barrier('b', 2); assert b.broken and b.parties == 2  # (died a party)\n"
                   "b.reset(); assert not b.broken and b.parties == 2"),
    "coord.reset": ("h.barrier('b', 2).abort()", "h.barrier('b', 2).reset()",
                    "b = h.barrier('b', 2); assert b.broken  # (not reset)\n"
                    "b.reset(); assert not b.broken and b.n_waiting == 0"),
}


def test_every_coordination_point_is_killed_here() -> None:
    assert set(KILLS) == {p for p in shmheap.CRASH_POINTS if p.startswith("coord.")}


@pytest.mark.parametrize("point", sorted(KILLS))
def test_a_kill_at_a_coordination_point_is_undone(heap: shmheap.Heap, point: str) -> None:
    setup, op, then = KILLS[point]
    h = heap
    q = heap.queue("q") if point != "coord.created" else None  # (the child makes the segment)
    exec(setup)
    child_op = "\n".join("    " + line for line in op.splitlines())
    assert_killed(run_child(f"""
import shmheap
h = shmheap.Heap.attach({heap.name!r})
q = h.queue("q") if {point != "coord.created"!r} else None
try:
{child_op}
except ValueError:
    pass
raise SystemExit("crash point {point} was never reached")
""", point))
    with heap.locked(timeout=PATIENCE):
        pass  # adopts the dead holder's lock, undoes what the journal names
    exec(then, {"h": h, "q": q or heap.queue("q"), "drain": drain, "PATIENCE": PATIENCE})
    assert heap.check() == []


def test_a_sweep_keeps_what_the_structures_hold(heap: shmheap.Heap) -> None:
    q = heap.queue("q")
    items = ["small", b"y" * 40000, {"k": list(range(100))}]
    for item in items:
        q.put(item)
    counter = heap.counter("c")
    counter.add(5)
    garbage = heap.alloc(64)  # unmarked, unrooted, held by nothing: the sweep's
    heap.start_cycle()
    report = heap.sweep()
    assert report.objects_freed + report.spans_freed >= 1, "the unmarked object was not swept"
    with pytest.raises(shmheap.ShmHeapError):
        heap.size_of(garbage)
    assert drain(q) == items
    assert counter.value == 5
    assert heap.check() == []


# -- items stored with heap.put: zero-copy, freed when their views are gone ---------------------


def live_objects(heap: shmheap.Heap) -> list[int]:
    return sorted(ref for span in heap.walk() for ref in span.objects)


def test_an_array_item_is_stored_once_and_got_as_a_view_of_the_heap(heap: shmheap.Heap) -> None:
    np = pytest.importorskip("numpy")
    q = heap.queue("q")
    before = live_objects(heap)
    array = np.arange(20_000.0)
    q.put(array)
    assert len(live_objects(heap)) == len(before) + 2, "a node and the object put() made"
    got: Any = q.get()
    (obj,) = set(live_objects(heap)) - set(before)  # the node is freed, the object is got's
    assert np.shares_memory(got, np.frombuffer(heap.view(obj), np.uint8)), "no copy"
    assert (got == array).all() and got.flags.writeable, "a get's item is the getter's"
    part = got[10:20]
    del got
    assert obj in live_objects(heap), "a view of it is left"
    part[0] = -1.0
    del part
    assert live_objects(heap) == before, "freed with its last view"
    q.put(array)
    leased: Any
    with q.lease() as leased:
        assert not leased.flags.writeable, "a leased item may be delivered again: read-only"
        kept = leased
    assert (kept == array).all()
    del leased, kept
    assert live_objects(heap) == before
    assert heap.check() == []


def test_array_items_cross_processes_and_are_freed_by_their_taker(heap: shmheap.Heap) -> None:
    np = pytest.importorskip("numpy")
    arrays, report = heap.queue("arrays"), heap.queue("report")
    before = live_objects(heap)
    taker = spawn(coord_workers.get_arrays, heap.name, 3)
    for k in range(3):
        arrays.put(np.full(50_000, float(k)))
    sums = [report.get(timeout=PATIENCE) for _ in range(3)]
    join_all([taker])
    assert sums == [50_000.0 * k - k - 1 for k in range(3)], "the taker wrote into its item"
    assert live_objects(heap) == before, "each object freed when the taker's views went"
    assert heap.reclaim().objects == 0 and heap.check() == []


#: point -> (what the child does with queue q holding two array items, how many are then left)
ARRAY_KILLS = {
    "coord.linked": ("q.put(np.arange(1000.0))", 2),
    "coord.put_released": ("q.put(np.arange(1000.0))", 3),
    "coord.unlinked": ("q.get()", 2),
    "coord.handed": ("q.get()", 2),
    "coord.taken": ("q.get()", 1),
    "coord.acked": ("with q.lease():\n    pass", 2),
}


@pytest.mark.parametrize("point", sorted(ARRAY_KILLS))
def test_an_interrupt_while_an_array_item_moves_leaks_nothing(heap: shmheap.Heap,
                                                              point: str) -> None:
    """KeyboardInterrupt at the point: the interrupted process carries on and exits; what it
    had taken is reclaim()'s once it is gone, everything else is freed or queued."""
    np = pytest.importorskip("numpy")
    q = heap.queue("q")
    before = live_objects(heap)
    q.put(np.arange(1000.0))
    q.put(np.arange(1000.0))
    op, left = ARRAY_KILLS[point]
    with Child(f"""
import numpy as np
import shmheap
h = shmheap.Heap.attach({heap.name!r})
q = h.queue("q")
try:
{textwrap.indent(op, "    ")}
except KeyboardInterrupt:
    print("interrupted", flush=True)
h.close()
""", raise_at=point) as child:
        assert child.line() == "interrupted"
        assert child.wait() == 0, child.stderr()
    heap.reclaim()
    got = drain(q)
    assert len(got) == left and all((a == np.arange(1000.0)).all() for a in got)
    del got
    assert live_objects(heap) == before, "every node and object is freed or queued"
    assert heap.check() == []


@pytest.mark.parametrize("point", sorted(ARRAY_KILLS))
def test_a_kill_while_an_array_item_moves_leaks_nothing(heap: shmheap.Heap, point: str) -> None:
    np = pytest.importorskip("numpy")
    q = heap.queue("q")
    before = live_objects(heap)
    q.put(np.arange(1000.0))
    q.put(np.arange(1000.0))
    op, left = ARRAY_KILLS[point]
    child_op = "\n".join("    " + line for line in op.splitlines())
    assert_killed(run_child(f"""
import numpy as np
import shmheap
h = shmheap.Heap.attach({heap.name!r})
q = h.queue("q")
if True:
{child_op}
raise SystemExit("crash point {point} was never reached")
""", point))
    with heap.locked(timeout=PATIENCE):
        pass  # adopts the dead holder's lock, undoes what the journal names
    heap.reclaim()  # what the dead process owned, or nobody does
    got = drain(q)
    assert len(got) == left and all((a == np.arange(1000.0)).all() for a in got)
    del got
    assert live_objects(heap) == before, "every node and object is freed or queued"
    assert heap.check() == []


#: what each item is put as, and what the getter checks it against
ENDED_PUT_ITEMS = {"array": "np.arange(1000.0)", "int": "7"}


@pytest.mark.parametrize("item", sorted(ENDED_PUT_ITEMS))
@pytest.mark.parametrize("getter", ["native", "pure", "holding the node"])
def test_a_put_interrupted_after_it_ended_frees_nothing_a_getter_took(
        heap: shmheap.Heap, monkeypatch: pytest.MonkeyPatch, item: str, getter: str) -> None:
    """Ctrl-C lands in a put that has ended (its lock released, coord.put_released) after a
    getter took the item: the put's cleanup frees neither the node nor the object under the
    getter's zero-copy views (an 8000-byte array), which its getter frees once, when its
    last view goes.  The putter stops itself there (SHMHEAP_STOP_AT) and raises once it is
    let go (SHMHEAP_RAISE_AT).  The getter runs either core (the native one gets the int
    in C; an item stored with put takes the Python path in both), or stops after the
    hand-over with the node not yet freed (coord.taken), as one the scheduler left there."""
    pytest.importorskip("numpy")
    q = heap.queue("q")
    before = live_objects(heap)
    expected = ENDED_PUT_ITEMS[item]
    with Child(f"""
import numpy as np
import shmheap
h = shmheap.Heap.attach({heap.name!r})
try:
    h.queue("q").put({expected})
except KeyboardInterrupt as exc:
    assert "coord.put_released" in str(exc), exc
    print("interrupted", flush=True)
h.close()
""", stop_at="coord.put_released", raise_at="coord.put_released") as putter:
        wait_until(lambda: process_state(putter.pid) == "T")  # its put has ended
        assert len(q) == 1
        queued = set(live_objects(heap)) - set(before)
        objects = {ref for ref in queued if heap.size_of(ref) > 32}  # (not the node)
        assert len(queued) == 1 + len(objects) == (2 if item == "array" else 1)
        if getter == "pure":
            monkeypatch.setenv("SHMHEAP_PURE_PYTHON", "1")
        else:
            monkeypatch.delenv("SHMHEAP_PURE_PYTHON", raising=False)
        with Child(f"""
import sys
import numpy as np
import shmheap
h = shmheap.Heap.attach({heap.name!r})
got = h.queue("q").get(timeout=60)
print("got", flush=True)
sys.stdin.readline()
assert np.array_equal(got, {expected}), got
print("intact", flush=True)
sys.stdin.readline()
del got
print("let go", flush=True)
h.close()
""", stop_at="coord.taken" if getter == "holding the node" else None) as taker:
            if getter == "holding the node":
                wait_until(lambda: process_state(taker.pid) == "T")
                taken = queued  # the getter's, node and object; the node is not yet freed
            else:
                assert taker.line() == "got"
                taken = objects  # the node is freed
            assert len(q) == 0
            assert set(live_objects(heap)) - set(before) == taken
            os.kill(putter.pid, signal.SIGCONT)
            assert putter.line() == "interrupted"
            assert putter.wait() == 0, putter.stderr()
            assert set(live_objects(heap)) - set(before) == taken, "the putter freed them"
            assert heap.check() == []
            if getter == "holding the node":
                os.kill(taker.pid, signal.SIGCONT)
                assert taker.line() == "got"
            taker.send()
            assert taker.line() == "intact"
            taker.send()
            assert taker.line() == "let go"
            assert taker.wait() == 0
            assert taker.stderr() == "", "its node or object was freed twice"
    assert live_objects(heap) == before, "freed once the getter let them go"
    assert heap.reclaim().objects == 0
    assert heap.check() == []


def test_a_put_interrupted_after_it_ended_frees_no_new_object_at_its_nodes_address(
        heap: shmheap.Heap) -> None:
    """As above, and the putter's process has made a new object where the node was, after
    the getter freed the node: a node that another thread's put of 7 has stored and not yet
    linked (here a SIGINT handler, run as the stopped putter goes on, plays that thread,
    and raises the KeyboardInterrupt).  The holder word says the address is the putter's;
    the put's cleanup must still leave it alone."""
    q = heap.queue("q")
    before = live_objects(heap)
    with Child(f"""
import signal
import sys
import shmheap
h = shmheap.Heap.attach({heap.name!r})
q = h.queue("q")
stored = []

def store_where_the_node_was(signum, frame):
    node = int(sys.stdin.readline())
    allocator = h._objects()
    cache = allocator._caches[allocator.lookup[(32 + 15) >> 4]]  # (the node's size class)
    rest = [h.alloc(32) for _ in range(len(cache.free))]  # the rest of the node's span
    for ref in rest[::2]:
        h.free(ref)  # so that it is kept, rescanned, and gives its first slot first
    stored.append(q._table.store(7))
    for ref in rest[1::2]:
        h.free(ref)
    print("reused" if stored == [node] else f"{{stored[0]:#x}} is not {{node:#x}}", flush=True)
    raise KeyboardInterrupt("the other thread's put is stored")

signal.signal(signal.SIGINT, store_where_the_node_was)
try:
    q.put(5)
except KeyboardInterrupt as exc:
    print("interrupted:", exc, flush=True)
try:
    h.size_of(stored[0])
except shmheap.InvalidRefError:
    print("freed", flush=True)
else:
    print("kept", flush=True)
    q._table.free_node(stored[0])
h.close()
""", stop_at="coord.put_released") as putter:
        wait_until(lambda: process_state(putter.pid) == "T")  # its put has ended
        (node,) = set(live_objects(heap)) - set(before)
        assert q.get(timeout=0) == 5  # and its node freed
        putter.send(str(node))
        os.kill(putter.pid, signal.SIGINT)  # (delivered once it goes on)
        os.kill(putter.pid, signal.SIGCONT)
        assert putter.line() == "reused"
        assert putter.line() == "interrupted: the other thread's put is stored"
        assert putter.line() == "kept", "the put's cleanup freed the other put's node"
        assert putter.wait() == 0, putter.stderr()
    assert live_objects(heap) == before
    assert heap.reclaim().objects == 0
    assert heap.check() == []


def test_a_programs_timeout_after_a_put_ended_is_not_queue_full(heap: shmheap.Heap) -> None:
    """A signal handler of the program raises TimeoutError (a ``signal.alarm`` deadline) in a
    put that has ended: the put is done, so the TimeoutError passes as it is, not as
    ``queue.Full``, and the queued node is not freed (the getter gets the item)."""
    q = heap.queue("q")
    before = live_objects(heap)
    with Child(f"""
import queue
import signal
import shmheap
h = shmheap.Heap.attach({heap.name!r})

def deadline(signum, frame):
    raise TimeoutError("the program's own deadline")

signal.signal(signal.SIGINT, deadline)
try:
    h.queue("q").put(5)
except queue.Full:
    print("full", flush=True)
except TimeoutError as exc:
    print("timeout:", exc, flush=True)
h.close()
""", stop_at="coord.put_released") as putter:
        wait_until(lambda: process_state(putter.pid) == "T")  # its put has ended
        os.kill(putter.pid, signal.SIGINT)  # (delivered once it goes on)
        os.kill(putter.pid, signal.SIGCONT)
        assert putter.line() == "timeout: the program's own deadline"
        assert putter.wait() == 0, putter.stderr()
    assert heap.check() == [], "the queued node was freed"
    assert q.get(timeout=0) == 5
    assert live_objects(heap) == before
