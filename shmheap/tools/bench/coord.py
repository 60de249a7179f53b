"""The coordination benchmark (``shmheap bench coord``): the heap's queue, event, counter and
barrier beside ``multiprocessing``'s, in the same run.

1. Round trip between two processes (spawned workers), per round trip, median of batches:
   queue ping-pong (put on one queue, the other process gets it and puts it on a second)
   beside ``multiprocessing.Queue`` and ``SimpleQueue``; event ping-pong (set one event,
   the other process wakes, clears it and sets a second; a round trip is two set -> awake)
   beside ``multiprocessing.Event``; a two-party barrier round beside ``multiprocessing.Barrier``.
   Then one way: event set -> a waiter of a read-only handle awake, beside a writable
   handle's waiter timed the same way (each waiter has slept ``WAKE_GAP_S`` when it is set).
2. ``counter.add()`` in one process beside ``multiprocessing.Value('q')`` incremented under its
   lock.
3. Throughput of a queue with 1 producer and 1 consumer, and with 2 and 2 (ints), beside
   ``multiprocessing.Queue`` and ``SimpleQueue``.
4. Kill survival: a worker hammering the structure (put and get; set and clear; adds; a barrier
   wait) is SIGKILLed at a random moment; then a fresh peer makes one call (a put and a get, a
   set and a wait, an add, a barrier wait), and survives if the call returns within a few
   seconds (for a barrier: returns at all, BrokenBarrierError included).

The targets (native core) are the issue's: queue round trip <= 10 us, counter.add <= 100 ns,
event set -> awake <= 50 us.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.context import SpawnContext
from typing import Any, TextIO

from ... import core
from ...heap import Heap
from ..display import fmt_ns, fmt_rate, fmt_ratio, print_table
from .common import (
    BenchError,
    Figure,
    Target,
    bench_heap,
    bench_main,
    measure_interleaved,
    print_heading,
    print_missed,
    recorded,
)

# Targets (native core).
QUEUE_ROUND_TRIP_NS = 10_000.0
COUNTER_ADD_NS = 100.0
EVENT_WAKE_NS = 50_000.0
#: Seconds a one-way waiter sleeps before the event is set (a real waiter has slept a while).
WAKE_GAP_S = 0.02
#: Seconds a peer's call may take after a kill and still count as surviving it.
SURVIVE_S = 3.0
KINDS = ("shmheap", "mp.Queue", "mp.SimpleQueue")

METHOD = (
    "round trip = two spawned processes ping-pong N times; p50 of the round trips, each timed "
    "alone; the event round trip is two set -> awake, so set -> awake = half of it.",
    f"set -> awake one way = a spawned process waits on an event of a writable or read-only "
    f"handle; {WAKE_GAP_S * 1000:.0f} ms later the parent sets it; p50 of the waiter's clock on "
    "waking minus the parent's just before set() (CLOCK_MONOTONIC in both).",
    "counter.add p50 beside `with v.get_lock(): v.value += 1` on multiprocessing.Value('q'), "
    "alternating rounds in one process.",
    "throughput = P producers put N ints in all, C consumers get them; from a common start "
    "(a barrier) to the last consumer's exit.",
    f"kill survival = a worker hammering the structure is SIGKILLed after a random 5-50 ms; a "
    f"fresh peer then makes one call, and survives if it returns within {SURVIVE_S:.0f} s.",
)


def _ctx() -> SpawnContext:
    return multiprocessing.get_context("spawn")


# -- workers (module level: spawn imports them) ----------------------------------------------


@contextlib.contextmanager
def _worked_on(target: Any, make: Callable[[Heap], Any]) -> Iterator[Any]:
    """What a worker works on: ``make(heap)`` of the heap named ``target``, attached for the
    block, or ``target`` itself (the multiprocessing peer's objects)."""
    if not isinstance(target, str):
        yield target
        return
    with Heap.attach(target) as heap:
        yield make(heap)


def _echo_queue(a: Any, b: Any, n: int) -> None:
    for _ in range(n):
        b.put(a.get())


def _echo_event(a: Any, b: Any, n: int) -> None:
    for _ in range(n):
        a.wait()
        a.clear()
        b.set()


def _echo(kind: str, target: Any, n: int) -> None:
    """The far side of a ping-pong: ``target`` is a heap name or a pair of mp objects."""
    def pair(heap: Heap) -> tuple[Any, Any]:
        make = heap.event if kind == "event" else heap.queue
        return make(f"{kind}1"), make(f"{kind}2")

    with _worked_on(target, pair) as (a, b):
        (_echo_event if kind == "event" else _echo_queue)(a, b, n)


def _wake_one_way(name: str, readonly: bool, conn: Any) -> None:
    """The waiter of a one-way wake-up: for each token the parent sends (the event is clear
    then), wait for event ``oneway`` and send back the clock on waking; None ends it."""
    with Heap.attach(name, readonly=readonly) as heap:
        event = heap.event("oneway")
        while conn.recv() is not None:
            event.wait()
            conn.send(time.perf_counter_ns())


def _barrier_rounds(target: Any, n: int) -> None:
    with _worked_on(target, lambda heap: heap.barrier("rounds", 2)) as barrier:
        for _ in range(n):
            barrier.wait()


def _produce(target: Any, tag: str, start: Any, count: int) -> None:
    with _worked_on(target, lambda heap: heap.queue(tag)) as q:
        start.wait()
        for item in range(count):
            q.put(item)


def _consume(target: Any, tag: str, start: Any, count: int) -> None:
    with _worked_on(target, lambda heap: heap.queue(tag)) as q:
        start.wait()
        for _ in range(count):
            q.get()


def _call(kind: str, target: Any, tag: str, forever: bool, running: Any) -> None:
    """One call of ``kind`` on ``target`` (the peer), or calls for ever (the victim)."""
    makers: dict[str, Callable[[Heap], Any]] = {
        "queue": lambda heap: heap.queue(tag), "event": lambda heap: heap.event(tag),
        "counter": lambda heap: heap.counter(tag), "barrier": lambda heap: heap.barrier(tag, 2)}
    shmheap = isinstance(target, str)
    with _worked_on(target, makers[kind]) as thing:

        def once() -> None:
            if kind == "queue":
                thing.put(1)
                thing.get()
            elif kind == "event":
                thing.set()
                thing.wait()
                thing.clear()
            elif kind == "counter":
                if shmheap:
                    thing.add()
                else:
                    with thing.get_lock():
                        thing.value += 1
            else:
                with contextlib.suppress(threading.BrokenBarrierError):
                    thing.wait()

        if running is not None:
            running.set()
        while True:
            once()
            if not forever:
                return


# -- measurements ----------------------------------------------------------------------------


def _let_go(*things: Any) -> None:
    """Close processes and multiprocessing queues this bench is done with (their pipes are
    descriptors of this process); a queue's feeder is not waited for (a kill may block it)."""
    for thing in things:
        if hasattr(thing, "cancel_join_thread"):
            thing.cancel_join_thread()
        if hasattr(thing, "close"):
            thing.close()


def _timed_rounds(step: Callable[[], object], n: int) -> float:
    """p50 ns of ``n`` calls of ``step``, each timed alone (a busy machine's stalls land in
    the tail, not in every batch's mean)."""
    clock = time.perf_counter_ns
    samples = []
    for _ in range(n):
        start = clock()
        step()
        samples.append(clock() - start)
    return statistics.median(samples)


def round_trips(heap: Heap, n: int) -> dict[str, float]:
    """ns per round trip: queues, events, barriers; shmheap and multiprocessing."""
    ctx = _ctx()
    warm = max(10, n // 10)
    total = warm + n
    results: dict[str, float] = {}
    cases: dict[str, tuple[str, Any, Any, Any]] = {
        "queue shmheap": ("queue", heap.name, heap.queue("queue1"), heap.queue("queue2")),
        "queue mp.Queue": ("queue", None, ctx.Queue(), ctx.Queue()),
        "queue mp.SimpleQueue": ("queue", None, ctx.SimpleQueue(), ctx.SimpleQueue()),
        "event shmheap": ("event", heap.name, heap.event("event1"), heap.event("event2")),
        "event mp.Event": ("event", None, ctx.Event(), ctx.Event()),
    }
    for label, (kind, name, a, b) in cases.items():
        target = name if name is not None else (a, b)
        worker = ctx.Process(target=_echo, args=(kind, target, total))
        worker.start()
        if kind == "event":
            def step(a: Any = a, b: Any = b) -> None:
                a.set()
                b.wait()
                b.clear()
        else:
            def step(a: Any = a, b: Any = b) -> None:
                a.put(1)
                b.get()
        for _ in range(warm):
            step()
        results[label] = _timed_rounds(step, total - warm)
        worker.join(60)
        if worker.exitcode != 0:
            raise BenchError(f"coord bench: the {label} echo worker exited {worker.exitcode}")
        _let_go(worker, *((a, b) if name is None else ()))
    for label, barrier in (("barrier shmheap", heap.barrier("rounds", 2)),
                           ("barrier mp.Barrier", ctx.Barrier(2))):
        target = heap.name if label.endswith("shmheap") else barrier
        worker = ctx.Process(target=_barrier_rounds, args=(target, total))
        worker.start()
        for _ in range(warm):
            barrier.wait()
        results[label] = _timed_rounds(barrier.wait, total - warm)
        worker.join(60)
        if worker.exitcode != 0:
            raise BenchError(f"coord bench: the {label} worker exited {worker.exitcode}")
        _let_go(worker)
    return results


def one_way_wakes(heap: Heap, n: int) -> dict[str, float]:
    """p50 ns from set() to a waiter of another process awake: read-only and writable."""
    ctx = _ctx()
    event = heap.event("oneway")
    results: dict[str, float] = {}
    for label, readonly in (("read-only", True), ("writable", False)):
        ours, theirs = ctx.Pipe()
        worker = ctx.Process(target=_wake_one_way, args=(heap.name, readonly, theirs))
        worker.start()
        samples = []
        for _ in range(n):
            event.clear()
            ours.send(True)
            time.sleep(WAKE_GAP_S)  # (the waiter is asleep by now, as a real one would be)
            start = time.perf_counter_ns()
            event.set()
            samples.append(ours.recv() - start)
        event.clear()
        ours.send(None)
        worker.join(60)
        if worker.exitcode != 0:
            raise BenchError(f"coord bench: the {label} one-way waiter exited {worker.exitcode}")
        _let_go(worker, ours, theirs)
        results[label] = statistics.median(samples)
    return results


def counter_adds(heap: Heap, budget_s: float) -> dict[str, float]:
    counter = heap.counter("adds")
    value = _ctx().Value("q", 0)

    def locked_add() -> None:
        with value.get_lock():
            value.value += 1

    got = measure_interleaved({"shmheap": counter.add, "mp.Value": locked_add}, budget_s, 3)
    return {key: latency.p50_ns for key, latency in got.items()}


def throughput(heap: Heap, items: int, sides: int, kind: str, tag: str) -> float:
    """Items per second through one queue with ``sides`` producers and consumers."""
    ctx = _ctx()
    target: Any = {"shmheap": heap.name, "mp.Queue": ctx.Queue(),
                   "mp.SimpleQueue": ctx.SimpleQueue()}[kind]
    if kind == "shmheap":
        heap.queue(tag)
    start = ctx.Barrier(2 * sides + 1)
    each = items // sides
    workers = [ctx.Process(target=work, args=(target, tag, start, each))
               for work in (_produce, _consume) for _ in range(sides)]
    for worker in workers:
        worker.start()
    start.wait()
    began = time.perf_counter()
    for worker in workers:
        worker.join(600)
        if worker.exitcode != 0:
            raise BenchError(f"coord bench: a {kind} throughput worker exited {worker.exitcode}")
    rate = each * sides / (time.perf_counter() - began)
    _let_go(*workers, *(() if kind == "shmheap" else (target,)))
    return rate


def survives(heap: Heap, kind: str, peer: str, trial: int, rng: random.Random) -> bool:
    """Kill a worker hammering ``kind`` (of ``peer``); does a fresh peer's call return?"""
    ctx = _ctx()
    tag = f"kill{kind}{trial}"
    target: Any
    if peer == "shmheap":
        target = heap.name
    else:
        makers: dict[str, Callable[[], Any]] = {
            "queue": ctx.Queue, "simple": ctx.SimpleQueue, "event": ctx.Event,
            "barrier": lambda: ctx.Barrier(2), "counter": lambda: ctx.Value("q", 0)}
        target = makers[peer if peer == "simple" else kind]()
    call_kind = "queue" if kind == "simple" else kind
    running = ctx.Event()
    victim = ctx.Process(target=_call, args=(call_kind, target, tag, True, running))
    victim.start()
    if not running.wait(60):
        victim.kill()
        raise BenchError(f"coord bench: the {kind} victim did not start")
    time.sleep(rng.uniform(0.005, 0.05))  # a random moment inside its loop
    os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
    victim.join()
    checker = ctx.Process(target=_call, args=(call_kind, target, tag, False, None))
    checker.start()
    checker.join(SURVIVE_S + 5)  # (the checker's own start is not the structure's fault)
    alive = checker.is_alive()
    if alive:
        checker.kill()
        checker.join()
    survived = not alive and checker.exitcode == 0
    _let_go(victim, checker, *(() if peer == "shmheap" else (target,)))
    return survived


SURVIVAL_CASES = (("queue", "shmheap"), ("queue", "queue"), ("simple", "simple"),
                  ("event", "shmheap"), ("event", "event"), ("counter", "shmheap"),
                  ("counter", "counter"), ("barrier", "shmheap"), ("barrier", "barrier"))
PEER_LABELS = {"queue": "mp.Queue", "simple": "mp.SimpleQueue", "event": "mp.Event",
               "counter": "mp.Value + lock", "barrier": "mp.Barrier", "shmheap": "shmheap"}


def run(quick: bool = False, *, tiny: bool = False,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    say = log or (lambda message: None)
    trips = 50 if tiny else 1000 if quick else 5000
    items = 500 if tiny else 10_000 if quick else 50_000
    trials = 1 if tiny else 3 if quick else 10  # (tiny: the queues only, 1 x 1 only)
    budget = 0.05 if tiny else 0.5 if quick else 2.0

    def measure_into(results: dict[str, Any]) -> None:
        with bench_heap("bcoord", arena_size=16 << 20, reserve=False) as heap:
            say("round trips")
            results["round_trip_ns"] = round_trips(heap, trips)
            say("one-way wake-ups")
            results["wake_ns"] = one_way_wakes(heap, 10 if tiny else 100 if quick else 250)
            say("counter adds")
            results["add_ns"] = counter_adds(heap, budget)
            say("throughput")
            results["throughput"] = {
                f"{kind} {sides}x{sides}": throughput(heap, items, sides, kind,
                                                      f"through{sides}")
                for sides in ((1,) if tiny else (1, 2)) for kind in KINDS}
            say("kill survival")
            rng = random.Random(20)
            results["survived"] = {
                f"{'queue' if kind == 'simple' else kind}: {PEER_LABELS[peer]}": sum(
                    survives(heap, kind, peer, trial, rng) for trial in range(trials))
                for kind, peer in (SURVIVAL_CASES[:2] if tiny else SURVIVAL_CASES)}
            results["trials"] = trials
            results["findings_after"] = [f.as_dict() for f in heap.check()]

    mode = "tiny" if tiny else "quick" if quick else "full"
    results = recorded("coord", mode, METHOD, measure_into, targets)
    results["native"] = core.NATIVE
    return results


def targets(results: dict[str, Any]) -> list[Target]:
    trips, adds = results["round_trip_ns"], results["add_ns"]
    return [
        Target.of("queue round trip between two processes", trips["queue shmheap"], "<=",
                  QUEUE_ROUND_TRIP_NS, fmt_ns),
        Target.of("counter.add", adds["shmheap"], "<=", COUNTER_ADD_NS, fmt_ns),
        Target.of("event set -> waiter awake", trips["event shmheap"] / 2, "<=",
                  EVENT_WAKE_NS, fmt_ns),
    ]


def report(results: dict[str, Any], out: TextIO | None = None) -> None:
    print_heading(results, out)
    trips, adds = results["round_trip_ns"], results["add_ns"]
    rows = []
    for what, peers in (("queue", ("mp.Queue", "mp.SimpleQueue")), ("event", ("mp.Event",)),
                        ("barrier", ("mp.Barrier",))):
        ours = trips[f"{what} shmheap"]
        for peer in peers:
            theirs = trips[f"{what} {peer}"]
            rows.append([f"{what} round trip", fmt_ns(ours), peer, fmt_ns(theirs),
                         fmt_ratio(ours / theirs)])
    rows.append(["event set -> awake (half a round trip)", fmt_ns(trips["event shmheap"] / 2),
                 "mp.Event", fmt_ns(trips["event mp.Event"] / 2),
                 fmt_ratio(trips["event shmheap"] / trips["event mp.Event"])])
    wakes = results["wake_ns"]
    rows.append(["event set -> read-only waiter awake (one way)", fmt_ns(wakes["read-only"]),
                 "writable waiter", fmt_ns(wakes["writable"]),
                 fmt_ratio(wakes["read-only"] / wakes["writable"])])
    rows.append(["counter.add, p50", fmt_ns(adds["shmheap"]), "mp.Value + lock",
                 fmt_ns(adds["mp.Value"]), fmt_ratio(adds["shmheap"] / adds["mp.Value"])])
    print_table(["figure", "shmheap", "peer", "peer's", "ratio"], rows,
                title=f"Latency ({'native' if results['native'] else 'pure-Python'} core)",
                out=out)
    flow = results["throughput"]
    print_table(["producers x consumers", "shmheap", "mp.Queue", "mp.SimpleQueue"],
                [[f"{sides} x {sides}", *(fmt_rate(flow[f'{kind} {sides}x{sides}'], ' items/s')
                                          for kind in KINDS)]
                 for sides in (1, 2) if f"shmheap {sides}x{sides}" in flow],
                title="Queue throughput", out=out)
    print_table(["structure", "peer survived a SIGKILLed participant"],
                [[label, f"{count} of {results['trials']}"]
                 for label, count in results["survived"].items()],
                title="Kill survival", out=out)
    print_missed(results, out)


def figures(results: dict[str, Any]) -> list[Figure]:
    """One panel: round trips of shmheap beside multiprocessing (x: queue, event, barrier)."""
    trips = results["round_trip_ns"]
    ticks = {1.0: "queue", 10.0: "event", 100.0: "barrier"}
    ours = [(1.0, trips["queue shmheap"]), (10.0, trips["event shmheap"]),
            (100.0, trips["barrier shmheap"])]
    theirs = [(1.0, trips["queue mp.Queue"]), (10.0, trips["event mp.Event"]),
              (100.0, trips["barrier mp.Barrier"])]
    return [Figure("coord: round trip between two processes", "structure", "time",
                   {"shmheap": ours, "multiprocessing": theirs},
                   x_format=lambda x: ticks.get(x, ""))]


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, "coord", __doc__ or "", "draw the round trips",
                      sys.modules[__name__])

