"""The allocator benchmark (``shmheap bench alloc``): what objects in arenas cost.

One run measures, and prints each figure next to its target:

1. small-object ``alloc`` + ``free`` pair latency (p50/p99) at 16 .. 1024 bytes,
   against ``multiprocessing.heap.BufferWrapper`` of the same sizes (its alloc,
   and its free when the wrapper is dropped), interleaved so load hits both
   alike;
2. throughput of batches of mixed small allocations followed by their frees,
   in one process and in two processes (spawned) allocating at once;
3. the walker: ``heap.walk()`` over a heap of many small objects;
4. the sweeper's scan of ``pageInUse &^ pageMarks`` over every arena of a
   sparse heap of large spans, in GB of heap per ms: with every span marked
   (the common case: one 1 KiB comparison per 64 MiB arena), with none marked
   (every span start found), and per arena with numpy for comparison; and a
   whole ``start_cycle`` + ``sweep`` of small objects, per object;
5. the scavenger: ``heap.scavenge()`` of freed, touched pages;
6. roots: lock-free lookup latency at 10 and 100,000 roots (flat in the number
   of roots), and a bind + unbind pair, against ``multiprocessing.Manager().dict()``;
7. handing an array over by name: one process allocates a float64 array
   (``new_array`` + a root) and 4 spawned processes attach, look it up and
   read it, against ``multiprocessing.shared_memory`` (create + attach by
   name) in the same run, rounds interleaved;
8. a giant object: allocate, fill and free an object over 4 arenas (after a
   first one grew them, each allocation reuses their free pages), against
   ``multiprocessing.shared_memory`` (create, fill, close + unlink) of the
   same size, rounds interleaved.

Every heap has a unique name and is destroyed in ``finally``.  The scan
figures call ``walker.unmarked_starts`` (what ``sweep`` calls per arena)
directly, to time the scan apart from the sweeping it leads to.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import queue
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import shared_memory
from multiprocessing.heap import BufferWrapper
from typing import Any, TextIO

from ...heap import Heap
from ...roots import Roots
from ...walker import unmarked_starts
from ..display import fmt_ns, fmt_rate, fmt_ratio, format_size, print_table
from .common import (
    BenchError,
    Figure,
    Latency,
    Target,
    bench_heap,
    bench_main,
    checked,
    import_extra,
    measure,
    measure_interleaved,
    optional_numpy,
    print_heading,
    print_missed,
    recorded,
)

MIB = 1 << 20
GIB = 1 << 30

# Targets.
PAIR_P50_NS = 3000.0
BUFFER_WRAPPER_RATIO = 4.0
SCAN_GB_PER_MS = 100.0
#: root lookup p50 with many roots / with 10: flat
ROOT_LOOKUP_RATIO = 1.5
ROOT_LOOKUP_NS = 300.0
ROOT_BIND_NS = 3000.0
#: hand-over time / shared_memory's, consumers attached before / attaching in the time
HANDOVER_ATTACHED = 1.0
HANDOVER_ATTACH = 2.0
#: pairs per second of 2 processes on one heap / on a heap each
SHARED_HEAP_RATIO = 0.9
GIANT_ALLOC_NS = 5e6

PAIR_SIZES = (16, 64, 256, 1024)
#: sizes of the throughput batches, cycled
BATCH_SIZES = (16, 32, 64, 100, 200, 500, 1000)
#: pages of each large span of the scan heap
SCAN_SPAN_PAGES = 128
WORKER_TIMEOUT_S = 120.0
WORKER_POLL_S = 0.5
#: the few roots a lookup is timed at; the many are the plan's
FEW_ROOTS = 10
#: objects the roots are bound to (a root count per object is at most 252)
ROOT_OBJECTS = 1000
#: processes an array is handed over to
CONSUMERS = 4

METHOD = (
    "Latency per call = the mean of a batch of back-to-back calls (time.perf_counter_ns); "
    "p50/p99 over batches, Python loop and call overhead included (loop_overhead_ns).",
    "pair = heap.free(heap.alloc(n)): the owner's cached span, no lock. BufferWrapper(n) = "
    "multiprocessing.heap.BufferWrapper(n) created and dropped (its free runs when the "
    "wrapper goes away), at the same sizes; ratio = BufferWrapper(64) p50 / shmheap 64-byte "
    "pair p50.",
    "throughput = batches of 1000 allocations of 16-1000 bytes, then their frees, for a fixed "
    "time; 2 processes = two spawned processes doing the same at once on one heap, and (the "
    "machine's own limit) on a heap each, in turn for a few rounds: the round of the median "
    "ratio.",
    "walk = list(heap.walk()) of a heap of small objects; objects and spans per second.",
    "scan = walker.unmarked_starts() over every arena of a sparse 64 MiB-arena heap filled "
    "with 1 MiB spans: pageInUse &^ pageMarks; GB of heap (arena bytes) per ms. 'all marked' "
    "is the steady case (one bytes comparison per arena); 'none marked' lists every span; "
    "numpy = np.any(inuse & ~marks) per arena on cached arrays.",
    "sweep = start_cycle() + mark half of the objects + sweep() of small objects.",
    "scavenge = heap.scavenge() of freed pages that were written (fallocate PUNCH_HOLE).",
    "roots = heap.roots[name] of 1000 names chosen at random among those bound, cycled; "
    "bind+unbind = heap.roots[new] = ref; del heap.roots[new] at that size; Manager().dict() "
    "= d[name] on a multiprocessing manager's dict of as many entries.",
    "hand-over = wall time from before the allocation until all 4 spawned processes (started "
    "before) have the array and have read its first and last items, which the allocating "
    "process wrote: shmheap = new_array(shape, float64) + a root, the consumers attach the "
    "heap, look the root up and call ndarray; shared_memory = SharedMemory(create=True) + an "
    "ndarray over it, the consumers attach it by name. The heap is new each round, with sparse "
    "arenas (reserve=False, as shared_memory's segment is sparse): its arena is grown within "
    "the time; the consumers attach the heap within the time, or attached it before. A first "
    "round of each way warms the processes up; median of the other rounds.",
    "giant = heap.alloc(4 * arena_size) (the 4 free arenas of the first such object reused: "
    "the free before punched their pages out, so the alloc zeroes nothing), heap.view(ref)[:] = "
    "a byte pattern (the view maps the 4 arenas back to back first; every page faults in), "
    "heap.free(ref) (punches the pages out: the memory goes back, as at shared_memory's "
    "unlink); sparse arenas; shared_memory = SharedMemory(create=True, size=same) + the same "
    "fill + close() + unlink(); median of the rounds.",
)


@dataclass(frozen=True)
class Plan:
    """How much of each measurement a run does."""

    mode: str
    pair_s: float
    throughput_s: float
    #: rounds of 2 processes on one heap, then on a heap each
    throughput_rounds: int
    walk_objects: int
    scan_arenas: int
    sweep_objects: int
    scavenge_bytes: int
    #: the many roots a lookup is timed at
    roots: int
    #: bytes of the array handed over, and rounds of each way
    handover_bytes: int
    handover_rounds: int
    #: arena size of the giant objects (each is 4 arenas), and rounds of each way
    giant_arena: int
    giant_rounds: int


PLANS = {
    "full": Plan("full", pair_s=1.0, throughput_s=2.0, throughput_rounds=5,
                 walk_objects=200_000, scan_arenas=64, sweep_objects=100_000,
                 scavenge_bytes=512 * MIB, roots=100_000, handover_bytes=256 * MIB,
                 handover_rounds=5, giant_arena=64 * MIB, giant_rounds=5),
    "quick": Plan("quick", pair_s=0.3, throughput_s=0.7, throughput_rounds=3,
                  walk_objects=50_000, scan_arenas=16, sweep_objects=30_000,
                  scavenge_bytes=128 * MIB, roots=100_000, handover_bytes=64 * MIB,
                  handover_rounds=3, giant_arena=16 * MIB, giant_rounds=5),
    "tiny": Plan("tiny", pair_s=0.02, throughput_s=0.05, throughput_rounds=1,
                 walk_objects=2_000, scan_arenas=2, sweep_objects=1_000,
                 scavenge_bytes=4 * MIB, roots=2_000, handover_bytes=8 * MIB,
                 handover_rounds=1, giant_arena=1 * MIB, giant_rounds=2),
}


def run(quick: bool = False, *, tiny: bool = False,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark (``tiny``: seconds, for tests) and return every figure."""
    plan = PLANS["tiny" if tiny else "quick" if quick else "full"]
    say = log or (lambda _message: None)
    steps: tuple[tuple[str, str, Callable[[Plan], dict[str, Any]]], ...] = (
        ("alloc + free pair latency", "pairs", pair_figures),
        ("throughput, 1 and 2 processes", "throughput", throughput_figures),
        ("walker", "walk", walk_figures),
        ("sweep scan", "scan", scan_figures),
        ("sweep", "sweep", sweep_figures),
        ("scavenge", "scavenge", scavenge_figures),
        ("roots", "roots", roots_figures),
        ("hand-over of an array", "handover", handover_figures),
        ("a giant object", "giant", giant_figures),
    )

    def measure_into(results: dict[str, Any]) -> None:
        for message, key, figures_of in steps:
            say(message)
            results[key] = figures_of(plan)

    return recorded("alloc", plan.mode, METHOD, measure_into, targets)


# -- 1. pair latency -------------------------------------------------------------------------


def pair_figures(plan: Plan) -> dict[str, Any]:
    with bench_heap("balloc", arena_size=64 * MIB) as heap:
        fns = {f"shmheap_{size}": pair(heap, size) for size in PAIR_SIZES}
        fns.update({f"buffer_wrapper_{size}": buffer_wrapper(size) for size in PAIR_SIZES})
        measured = measure_interleaved(fns, plan.pair_s * len(fns), rounds=3)
    ours = measured["shmheap_64"].p50_ns
    theirs = measured["buffer_wrapper_64"].p50_ns
    return {"latency": {key: value.as_dict() for key, value in measured.items()},
            "ratio": theirs / ours}


def pair(heap: Heap, size: int) -> Callable[[], object]:
    heap.free(heap.alloc(size))  # the first call binds the native core's fast paths, if any
    alloc, free = heap.alloc, heap.free
    return lambda: free(alloc(size))


def buffer_wrapper(size: int) -> Callable[[], object]:
    """The peer's pair: a BufferWrapper of ``size`` bytes, freed when it is dropped."""
    return lambda: BufferWrapper(size)


# -- 2. throughput ------------------------------------------------------------------------------


def churn_batches(heap: Heap, seconds: float) -> int:
    """Alloc a batch of 1000 mixed small objects, free them, repeat; return pairs done."""
    alloc, free = heap.alloc, heap.free
    sizes = [BATCH_SIZES[i % len(BATCH_SIZES)] for i in range(1000)]
    pairs = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        refs = [alloc(n) for n in sizes]
        for ref in refs:
            free(ref)
        pairs += len(refs)
    return pairs


def throughput_worker(name: str | None, seconds: float, start: Any, results: Any) -> None:
    """A spawned process: wait for ``start``, churn for ``seconds``, report pairs per second.

    It churns heap ``name``, or with ``name=None`` a heap of its own.
    """
    try:
        with contextlib.ExitStack() as stack:
            heap = stack.enter_context(
                Heap.attach(name) if name else bench_heap("bown", arena_size=64 * MIB))
            churn_batches(heap, 0.01)  # warm: map the arena, take spans
            results.put(("ready", 0.0))
            start.wait(WORKER_TIMEOUT_S)
            began = time.monotonic()
            pairs = churn_batches(heap, seconds)
            results.put(("done", pairs / (time.monotonic() - began)))
    except BaseException as exc:
        results.put(("error", repr(exc)))
        raise


def throughput_figures(plan: Plan) -> dict[str, Any]:
    """One process; then 2 processes on one heap and on a heap each, in turn for
    ``plan.throughput_rounds`` rounds: the figures of the round of the median ratio."""
    rounds = []
    with bench_heap("bthru", arena_size=64 * MIB) as heap:
        churn_batches(heap, 0.01)
        began = time.monotonic()
        one = churn_batches(heap, plan.throughput_s) / (time.monotonic() - began)
        for _ in range(plan.throughput_rounds):
            shared = in_processes(heap.name, 2, plan.throughput_s)
            separate = in_processes(None, 2, plan.throughput_s)
            rounds.append((sum(shared) / sum(separate), shared, separate))
    rounds.sort(key=lambda round_: round_[0])
    _ratio, shared, separate = rounds[len(rounds) // 2]
    return {"one_process_pairs_per_s": one, "two_processes_pairs_per_s": sum(shared),
            "per_process_pairs_per_s": shared, "two_separate_heaps_pairs_per_s": sum(separate),
            "ratios": [round_[0] for round_ in rounds]}


def in_processes(name: str | None, count: int, seconds: float) -> list[float]:
    """Pairs per second of ``count`` spawned processes churning heap ``name`` at once."""
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    results = context.Queue()
    workers = [context.Process(target=throughput_worker, args=(name, seconds, start, results),
                               daemon=True) for _ in range(count)]
    for worker in workers:
        worker.start()
    try:
        for _ in workers:
            expect(results, "ready", workers)
        start.set()
        return [expect(results, "done", workers) for _ in workers]
    finally:
        for worker in workers:
            worker.join(WORKER_TIMEOUT_S)
            if worker.is_alive():
                worker.terminate()
                worker.join()
        results.close()


def expect(results: Any, kind: str, workers: list[Any]) -> float:
    """The next throughput report of ``kind``; BenchError if a worker failed, died or went
    quiet (a worker that reported exits 0)."""
    message = next_message(results, workers, "throughput worker", kind,
                           lambda exitcode: exitcode != 0)
    return float(message[1])


def next_message(results: Any, workers: list[Any], who: str, kind: str,
                 failed: Callable[[int], bool]) -> Any:
    """The next message of spawned ``workers`` on queue ``results``, which must be of ``kind``.

    BenchError if one reported an error, if one exited with an exit code that ``failed``,
    or if none reported within WORKER_TIMEOUT_S.
    """
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    while True:
        try:
            message = results.get(timeout=WORKER_POLL_S)
            break
        except queue.Empty:
            dead = [w.exitcode for w in workers if w.exitcode is not None and failed(w.exitcode)]
            if dead:
                raise BenchError(f"a {who} exited with code {dead[0]}") from None
            if time.monotonic() > deadline:
                raise BenchError(f"a {who} did not report within {WORKER_TIMEOUT_S} s") from None
    if message[0] != kind:
        raise BenchError(f"a {who} failed: {message[1]}")
    return message


# -- 3. walker ---------------------------------------------------------------------------------


def fill_small(heap: Heap, count: int) -> list[int]:
    return [heap.alloc(BATCH_SIZES[i % len(BATCH_SIZES)]) for i in range(count)]


def walk_figures(plan: Plan) -> dict[str, Any]:
    with bench_heap("bwalk", arena_size=64 * MIB, reserve=False) as heap:
        fill_small(heap, plan.walk_objects)
        spans = list(heap.walk())
        latency = measure(lambda: list(heap.walk()), plan.pair_s * 2, min_batches=3)
    seconds = latency.p50_ns / 1e9
    objects = sum(len(span.objects) for span in spans)
    return {"objects": objects, "spans": len(spans), "latency": latency.as_dict(),
            "objects_per_s": objects / seconds, "spans_per_s": len(spans) / seconds}


# -- 4. sweep scan and sweep -------------------------------------------------------------------


def scan_figures(plan: Plan) -> dict[str, Any]:
    arena_size = 64 * MIB
    with bench_heap("bscan", arena_size=arena_size, max_arenas=1 << 16, reserve=False) as heap:
        span_bytes = SCAN_SPAN_PAGES * heap.params.page_size
        while heap.info().arenas < plan.scan_arenas:
            heap.alloc(span_bytes)
        objects = heap._objects()
        arenas = [objects.pages_of(index) for index in heap.snapshot()]
        heap_bytes = len(arenas) * arena_size

        def scan() -> int:
            return sum(len(unmarked_starts(pages)) for pages in arenas)

        marked = measure(scan, plan.pair_s, min_batches=5)
        numpy_scan = numpy_scanner(arenas)
        numpy_marked = measure(numpy_scan, plan.pair_s, min_batches=5) if numpy_scan else None
        heap.start_cycle()
        unmarked = measure(scan, plan.pair_s, min_batches=5)
        found = scan()
    return {
        "arenas": len(arenas), "arena_size": arena_size, "heap_bytes": heap_bytes,
        "spans_found_unmarked": found,
        "all_marked": scan_row(marked, heap_bytes),
        "none_marked": scan_row(unmarked, heap_bytes),
        "numpy_all_marked": scan_row(numpy_marked, heap_bytes) if numpy_marked else None,
    }


def numpy_scanner(arenas: list[Any]) -> Callable[[], int] | None:
    """np.any(inuse & ~marks) per arena over arrays made once, or None without numpy."""
    np = optional_numpy()
    if np is None:
        return None
    pairs = [(np.frombuffer(p.inuse, np.uint64), np.frombuffer(p.marks, np.uint64))
             for p in arenas]
    return lambda: sum(bool(np.any(inuse & ~marks)) for inuse, marks in pairs)


def scan_row(latency: Latency, heap_bytes: int) -> dict[str, Any]:
    return {"latency": latency.as_dict(),
            "gb_per_ms": heap_bytes / 1e9 / (latency.p50_ns / 1e6)}


def sweep_figures(plan: Plan) -> dict[str, Any]:
    with bench_heap("bsweep", arena_size=64 * MIB, reserve=False) as heap:
        refs = fill_small(heap, plan.sweep_objects)
        began = time.perf_counter_ns()
        heap.start_cycle()
        start_ns = time.perf_counter_ns() - began
        for ref in refs[::2]:
            heap.mark(ref)
        began = time.perf_counter_ns()
        report = heap.sweep()
        sweep_ns = time.perf_counter_ns() - began
    return {"objects": len(refs), "freed": report.objects_freed, "start_cycle_ns": start_ns,
            "sweep_ns": sweep_ns, "objects_per_s": len(refs) / (sweep_ns / 1e9)}


# -- 5. scavenge -------------------------------------------------------------------------------


def scavenge_figures(plan: Plan) -> dict[str, Any]:
    arena_size = 64 * MIB if plan.scavenge_bytes >= 64 * MIB else 4 * MIB
    with bench_heap("bscav", arena_size=arena_size, reserve=False) as heap:
        chunk = arena_size // 2
        refs = [heap.alloc(chunk) for _ in range(plan.scavenge_bytes // chunk)]
        for ref in refs:
            heap.view(ref)[:] = b"\x5a" * chunk
        for ref in refs:
            heap.free(ref)
        began = time.perf_counter_ns()
        report = heap.scavenge()
        seconds = (time.perf_counter_ns() - began) / 1e9
    return {"released_bytes": report.released_bytes, "written_bytes": len(refs) * chunk,
            "seconds": seconds, "gb_per_s": report.released_bytes / 1e9 / seconds}


# -- 6. roots ----------------------------------------------------------------------------------


def roots_figures(plan: Plan) -> dict[str, Any]:
    """Lookup and bind+unbind latency at FEW_ROOTS and ``plan.roots`` roots, and the peer's.

    Two heaps hold the two tables, and the sizes are timed interleaved, so that a change
    of the machine's load does not pass for a difference between them.
    """
    counts = (FEW_ROOTS, plan.roots)
    with bench_heap("broots", arena_size=64 * MIB, reserve=False) as few, \
            bench_heap("broots", arena_size=64 * MIB, reserve=False) as many:
        fns: dict[str, Callable[[], object]] = {}
        for count, heap in zip(counts, (few, many), strict=True):
            objects = [heap.alloc(16) for _ in range(ROOT_OBJECTS)]
            for i in range(count):
                heap.roots[f"root-{i}"] = objects[i % ROOT_OBJECTS]
            fns[f"lookup_{count}"] = lookup_of(heap.roots, count)
            fns[f"bind_unbind_{count}"] = bind_unbind(heap.roots, objects[0])
        measured = measure_interleaved(fns, plan.pair_s * len(fns), rounds=3)
        segment_bytes = os.stat(f"/dev/shm/shmheap.{many.name}.roots").st_blocks * 512
    with multiprocessing.Manager() as manager:
        tables = [manager.dict({f"root-{i}": i for i in range(count)}) for count in counts]
        peers = measure_interleaved(
            {f"manager_lookup_{count}": lookup_of(table, count)
             for count, table in zip(counts, tables, strict=True)}, plan.pair_s, rounds=3)
    measured.update(peers)
    rows = {str(count): {figure: measured[f"{figure}_{count}"].as_dict()
                         for figure in ("lookup", "bind_unbind", "manager_lookup")}
            for count in counts}
    return {"few": FEW_ROOTS, "many": plan.roots, "rows": rows, "segment_bytes": segment_bytes,
            "ratio": rows[str(plan.roots)]["lookup"]["p50_ns"]
            / rows[str(FEW_ROOTS)]["lookup"]["p50_ns"]}


def lookup_of(table: Roots | Any, count: int) -> Callable[[], object]:
    """``table[name]`` of 1000 bound names chosen at random, cycled."""
    names = [f"root-{i}" for i in random.Random(count).sample(range(count), min(count, 1000))]
    following = itertools.cycle(names).__next__
    get = table.__getitem__
    return lambda: get(following())


def bind_unbind(roots: Roots, ref: int) -> Callable[[], object]:
    bind, unbind = roots.__setitem__, roots.__delitem__

    def pair() -> None:
        bind("bench-new", ref)
        unbind("bench-new")

    return pair


# -- 7. handing an array over by name --------------------------------------------------------


def handover_worker(tasks: Any, results: Any) -> None:
    """A spawned consumer.  Tasks: ("attach", heap) and ("detach",) keep a heap attached
    between tasks; (way, name, key, count) gets an array by name and reports its first and
    last items; None ends it.  Every task is answered with ("done", first, last)."""
    numpy = import_extra("numpy", "numpy", "the hand-over benchmark")
    kept: Heap | None = None
    results.put(("done", 0.0, 0.0))  # started
    while (task := tasks.get()) is not None:
        try:
            got = (0.0, 0.0)
            if task[0] == "attach":
                kept = Heap.attach(task[1])
            elif task[0] == "detach" and kept is not None:
                kept.close()
                kept = None
            elif task[0] == "shared_memory":
                # Spawned, this process shares its parent's resource tracker, which this
                # attach registers the segment with again (a set: no second entry); the
                # creator's unlink unregisters it once.
                segment = shared_memory.SharedMemory(task[1])
                array = numpy.ndarray((task[3],), numpy.float64, buffer=segment.buf)
                got = (float(array[0]), float(array[-1]))
                del array
                segment.close()
            elif task[0] == "shmheap":
                with contextlib.ExitStack() as stack:
                    heap = kept or stack.enter_context(Heap.attach(task[1]))
                    array = heap.ndarray(heap.roots[task[2]])
                    got = (float(array[0]), float(array[-1]))
                    del array
            results.put(("done", *got))
        except BaseException as exc:
            results.put(("error", repr(exc)))
            raise


def handover_figures(plan: Plan) -> dict[str, Any]:
    """Seconds to allocate an array and hand it to CONSUMERS processes, each way (medians)."""
    import_extra("numpy", "numpy", "the hand-over benchmark")
    count = plan.handover_bytes // 8
    arena = 1 << (plan.handover_bytes + MIB).bit_length()
    context = multiprocessing.get_context("spawn")
    consumers = Consumers([context.Queue() for _ in range(CONSUMERS)], context.Queue(), [])
    consumers.workers += [
        context.Process(target=handover_worker, args=(task, consumers.results), daemon=True)
        for task in consumers.tasks]
    for worker in consumers.workers:
        worker.start()
    ways: dict[str, Callable[[], float]] = {
        "shmheap_attach": lambda: hand_over_heap(count, arena, consumers, attached=False),
        "shmheap_attached": lambda: hand_over_heap(count, arena, consumers, attached=True),
        "shared_memory": lambda: hand_over_shm(count, consumers)}
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    try:
        consumers.wait()  # started: spawning and imports are not timed
        for round_ in range(plan.handover_rounds + 1):
            for way, once in ways.items():
                took = once()
                if round_:  # round 0 warms every process up (first attach, first mapping)
                    seconds[way].append(took)
    finally:
        consumers.stop()
    medians = {way: statistics.median(values) for way, values in seconds.items()}
    return {"bytes": plan.handover_bytes, "arena_size": arena, "consumers": CONSUMERS,
            "rounds": plan.handover_rounds, "seconds": seconds, "median_s": medians,
            "ratio": medians["shmheap_attach"] / medians["shared_memory"]}


@dataclass
class Consumers:
    """The spawned consumers: a task queue each, one result queue."""

    tasks: list[Any]
    results: Any
    workers: list[Any]

    def send(self, *task: object) -> list[tuple[float, float]]:
        """Send ``task`` to every consumer; their (first, last) items once all answered."""
        for queue_ in self.tasks:
            queue_.put(task)
        return self.wait()

    def wait(self) -> list[tuple[float, float]]:
        return [expect_items(self.results, self.workers) for _ in self.tasks]

    def stop(self) -> None:
        for queue_ in self.tasks:
            queue_.put(None)
        for worker in self.workers:
            worker.join(WORKER_TIMEOUT_S)
            if worker.is_alive():
                worker.terminate()
                worker.join()


def check_items(items: list[tuple[float, float]]) -> None:
    if any(pair != (1.0, 2.0) for pair in items):
        raise BenchError(f"the consumers read {items} instead of the items 1.0 ... 2.0")


def hand_over_heap(count: int, arena: int, consumers: Consumers, attached: bool) -> float:
    """New heap (sparse arenas); time new_array + a root until every consumer has read it."""
    with bench_heap("bhand", arena_size=arena, reserve=False) as heap:
        if attached:
            consumers.send("attach", heap.name)
        began = time.perf_counter()
        ref = heap.new_array(count, "float64")
        heap.roots["array"] = ref
        array = heap.ndarray(ref)
        array[0], array[-1] = 1.0, 2.0
        check_items(consumers.send("shmheap", heap.name, "array", count))
        took = time.perf_counter() - began
        del array
        if attached:
            consumers.send("detach")
    return took


def hand_over_shm(count: int, consumers: Consumers) -> float:
    numpy = import_extra("numpy", "numpy", "the hand-over benchmark")
    began = time.perf_counter()
    segment = shared_memory.SharedMemory(create=True, size=count * 8)
    try:
        array = numpy.ndarray((count,), numpy.float64, buffer=segment.buf)
        array[0], array[-1] = 1.0, 2.0
        check_items(consumers.send("shared_memory", segment.name, "", count))
        took = time.perf_counter() - began
        del array
    finally:
        segment.close()
        segment.unlink()
    return took


def expect_items(results: Any, workers: list[Any]) -> tuple[float, float]:
    """The next consumer's (first, last) items; BenchError if one failed, died or went quiet
    (a consumer exits only when it is told to)."""
    message = next_message(results, workers, "hand-over consumer", "done", lambda _code: True)
    return float(message[1]), float(message[2])


# -- 8. a giant object -------------------------------------------------------------------------

#: arenas of the giant object
GIANT_ARENAS = 4


def giant_figures(plan: Plan) -> dict[str, Any]:
    """Median seconds to allocate, fill and free a 4-arena object, beside shared_memory."""
    size = GIANT_ARENAS * plan.giant_arena
    pattern = b"\x5a" * size
    times: dict[str, list[float]] = {"alloc": [], "fill": [], "free": [], "shared_memory": []}
    with bench_heap("bgiant", arena_size=plan.giant_arena, reserve=False) as heap:
        began = time.perf_counter()
        heap.free(heap.alloc(size))  # grows the 4 arenas that every round then reuses
        first = time.perf_counter() - began
        for _ in range(plan.giant_rounds):
            began = time.perf_counter()
            ref = heap.alloc(size)
            allocated = time.perf_counter()
            heap.view(ref)[:] = pattern
            filled = time.perf_counter()
            heap.free(ref)
            freed = time.perf_counter()
            times["alloc"].append(allocated - began)
            times["fill"].append(filled - allocated)
            times["free"].append(freed - filled)
            times["shared_memory"].append(shared_memory_round(pattern))
        arenas = len(heap.snapshot())
    medians = {key: statistics.median(values) for key, values in times.items()}
    ours = medians["alloc"] + medians["fill"] + medians["free"]
    return {"bytes": size, "arena_size": plan.giant_arena, "rounds": plan.giant_rounds,
            "arenas": arenas, "first_s": first, "median_s": medians, "total_s": ours,
            "ratio": ours / medians["shared_memory"]}


def shared_memory_round(pattern: bytes) -> float:
    """Seconds to create a SharedMemory of ``len(pattern)`` bytes, fill it, close and unlink it."""
    began = time.perf_counter()
    segment = shared_memory.SharedMemory(create=True, size=len(pattern))
    try:
        buf = segment.buf
        assert buf is not None
        buf[:len(pattern)] = pattern
    finally:
        segment.close()
        segment.unlink()
    return time.perf_counter() - began


# -- targets, report, plot, command line -------------------------------------------------------


def targets(results: dict[str, Any]) -> list[Target]:
    pairs = results["pairs"]
    return [
        Target.of("alloc+free pair, 64 bytes, p50", pairs["latency"]["shmheap_64"]["p50_ns"],
                  "<=", PAIR_P50_NS, fmt_ns),
        Target.of("BufferWrapper(64) / shmheap pair p50", pairs["ratio"], ">=",
                  BUFFER_WRAPPER_RATIO, fmt_ratio),
        Target.of("sweep scan, all spans marked (GB of heap per ms)",
                  results["scan"]["all_marked"]["gb_per_ms"], ">=", SCAN_GB_PER_MS,
                  lambda v: f"{v:.3g} GB/ms"),
        Target.of(f"root lookup p50, {results['roots']['many']:,} roots / "
                  f"{results['roots']['few']} roots", results["roots"]["ratio"], "<=",
                  ROOT_LOOKUP_RATIO, fmt_ratio),
        *perf_targets(results),
    ]


def perf_targets(results: dict[str, Any]) -> list[Target]:
    """The targets of issue 21: roots, hand-over, two processes on one heap, giant alloc."""
    roots = results["roots"]["rows"][str(results["roots"]["many"])]
    hand, giant = results["handover"]["median_s"], results["giant"]
    through = results["throughput"]
    return [
        Target.of("root lookup p50", roots["lookup"]["p50_ns"], "<=", ROOT_LOOKUP_NS, fmt_ns),
        Target.of("root bind+unbind p50", roots["bind_unbind"]["p50_ns"], "<=", ROOT_BIND_NS,
                  fmt_ns),
        Target.of("hand-over, consumers attached before / shared_memory",
                  hand["shmheap_attached"] / hand["shared_memory"], "<=", HANDOVER_ATTACHED,
                  fmt_ratio),
        Target.of("hand-over, consumers attach / shared_memory",
                  hand["shmheap_attach"] / hand["shared_memory"], "<=", HANDOVER_ATTACH,
                  fmt_ratio),
        Target.of("2 processes on one heap / on a heap each (pairs per second)",
                  through["two_processes_pairs_per_s"] / through["two_separate_heaps_pairs_per_s"],
                  ">=", SHARED_HEAP_RATIO, fmt_ratio),
        Target.of(f"giant alloc ({format_size(giant['bytes'])}, dirty arenas reused), median",
                  giant["median_s"]["alloc"] * 1e9, "<=", GIANT_ALLOC_NS, fmt_ns),
    ]


def report(results: dict[str, Any], out: TextIO | None = None) -> None:
    """Print every figure of ``results`` as tables, each target next to its figure."""
    checks = {target["name"]: target for target in results["targets"]}
    print_heading(results, out)
    report_pairs(results["pairs"], checks, out)
    report_rest(results, checks, out)
    print_missed(results, out)


def report_pairs(pairs: dict[str, Any], checks: dict[str, Any], out: TextIO | None) -> None:
    rows = []
    for key, figure in pairs["latency"].items():
        size = key.rsplit("_", 1)[1]
        label = (f"BufferWrapper({size})" if key.startswith("buffer_wrapper_")
                 else f"shmheap alloc+free {size} B")
        target = checked(checks, "alloc+free pair, 64 bytes, p50") if key == "shmheap_64" else ""
        rows.append([label, fmt_ns(figure["p50_ns"]), fmt_ns(figure["p99_ns"]), target])
    rows.append(["BufferWrapper / shmheap (64 B)", fmt_ratio(pairs["ratio"]), "",
                 checked(checks, "BufferWrapper(64) / shmheap pair p50")])
    print_table(["what", "p50", "p99", "target"], rows, title="1. alloc + free pair latency",
                out=out)


def report_rest(results: dict[str, Any], checks: dict[str, Any], out: TextIO | None) -> None:
    thru = results["throughput"]
    print_table(["processes", "pairs/s", "target"], [
        ["1", fmt_rate(thru["one_process_pairs_per_s"]), ""],
        ["2 at once (sum)", fmt_rate(thru["two_processes_pairs_per_s"]), ""],
        ["2 at once (each)", ", ".join(fmt_rate(r) for r in thru["per_process_pairs_per_s"]),
         ""],
        ["2 at once, a heap each (sum)", fmt_rate(thru["two_separate_heaps_pairs_per_s"]), ""],
        ["one heap / a heap each, every round", ", ".join(
            fmt_ratio(r) for r in thru["ratios"]),
         checked(checks, "2 processes on one heap / on a heap each (pairs per second)")],
    ], title="2. Throughput (alloc+free pairs of 16-1000 bytes)", out=out)
    walk = results["walk"]
    print_table(["objects", "spans", "walk p50", "objects/s", "spans/s"], [[
        f"{walk['objects']:,}", f"{walk['spans']:,}", fmt_ns(walk["latency"]["p50_ns"]),
        fmt_rate(walk["objects_per_s"]), fmt_rate(walk["spans_per_s"])]],
        title="3. Walker", out=out)
    scan = results["scan"]
    name = "sweep scan, all spans marked (GB of heap per ms)"
    rows = [[label, fmt_ns(row["latency"]["p50_ns"]), f"{row['gb_per_ms']:.3g}",
             checked(checks, name) if key == "all_marked" else ""]
            for key, label in (("all_marked", "all marked"), ("none_marked", "none marked"),
                               ("numpy_all_marked", "numpy per arena, all marked"))
            if (row := scan[key]) is not None]
    print_table(["case", "p50", "GB/ms", "target"], rows,
                title=f"4. Sweep scan of pageInUse &^ pageMarks: {scan['arenas']} arenas of "
                f"{format_size(scan['arena_size'])} ({format_size(scan['heap_bytes'])})",
                out=out)
    sweep = results["sweep"]
    print_table(["objects", "start_cycle", "sweep", "objects/s"], [[
        f"{sweep['objects']:,}", fmt_ns(sweep["start_cycle_ns"]),
        fmt_ns(sweep["sweep_ns"]), fmt_rate(sweep["objects_per_s"])]],
        title="   Sweep of small objects (half marked)", out=out)
    scav = results["scavenge"]
    print_table(["released", "time", "rate"], [[
        format_size(scav["released_bytes"]), fmt_ns(scav["seconds"] * 1e9),
        f"{scav['gb_per_s']:.3g} GB/s"]], title="5. Scavenge", out=out)
    report_roots(results, checks, out)


def report_roots(results: dict[str, Any], checks: dict[str, Any], out: TextIO | None) -> None:
    roots = results["roots"]
    rows = []
    for count in (roots["few"], roots["many"]):
        row = roots["rows"][str(count)]
        rows.append([f"{count:,}", fmt_ns(row["lookup"]["p50_ns"]),
                     fmt_ns(row["lookup"]["p99_ns"]), fmt_ns(row["bind_unbind"]["p50_ns"]),
                     fmt_ns(row["manager_lookup"]["p50_ns"])])
    name = (f"root lookup p50, {roots['many']:,} roots / {roots['few']} roots")
    rows.append(["ratio", fmt_ratio(roots["ratio"]), "", checked(checks, name), ""])
    print_table(["roots", "lookup p50", "lookup p99", "bind+unbind p50",
                 "Manager().dict() lookup p50"], rows,
                title=f"6. Roots (the table takes {format_size(roots['segment_bytes'])} "
                f"of /dev/shm at {roots['many']:,})", out=out)
    hand = results["handover"]
    medians = hand["median_s"]
    print_table(["way", "time"], [
        ["shmheap, the consumers attach the heap by name",
         fmt_ns(medians["shmheap_attach"] * 1e9)],
        ["shmheap, the consumers attached the heap before",
         fmt_ns(medians["shmheap_attached"] * 1e9)],
        ["multiprocessing.shared_memory", fmt_ns(medians["shared_memory"] * 1e9)],
        ["shmheap (attach) / shared_memory", fmt_ratio(hand["ratio"])],
    ], title=f"7. Hand-over of a {format_size(hand['bytes'])} float64 array to "
       f"{hand['consumers']} processes by name (median of {hand['rounds']})", out=out)
    big = results["giant"]
    times = big["median_s"]
    print_table(["step", "time"], [
        ["first alloc + free (grows the arenas)", fmt_ns(big["first_s"] * 1e9)],
        ["alloc (reuses them; their pages were punched out at the free)",
         fmt_ns(times["alloc"] * 1e9)],
        ["view + fill", fmt_ns(times["fill"] * 1e9)],
        ["free (punches the pages out)", fmt_ns(times["free"] * 1e9)],
        ["alloc + fill + free", fmt_ns(big["total_s"] * 1e9)],
        ["shared_memory create + fill + close + unlink", fmt_ns(times["shared_memory"] * 1e9)],
        ["shmheap / shared_memory", fmt_ratio(big["ratio"])],
    ], title=f"8. A giant object of {format_size(big['bytes'])} ({GIANT_ARENAS} arenas of "
       f"{format_size(big['arena_size'])}; median of {big['rounds']}; the heap has "
       f"{big['arenas']} arenas after)", out=out)


def figures(results: dict[str, Any]) -> list[Figure]:
    """alloc+free pair latency (p50) against object size: shmheap beside BufferWrapper."""
    latency = results["pairs"]["latency"]
    series = {label: [(size, latency[f"{key}_{size}"]["p50_ns"]) for size in PAIR_SIZES]
              for key, label in (("shmheap", "shmheap alloc + free"),
                                 ("buffer_wrapper", "multiprocessing.heap.BufferWrapper"))}
    return [Figure("Objects: an allocation and its free (p50 per pair)", "object size",
                   "latency per pair", series, x_format=lambda size: format_size(int(size)))]


def main(argv: list[str] | None = None) -> int:
    """``shmheap bench alloc``: run, print the tables, write JSON and a plot if asked."""
    return bench_main(argv, "alloc",
                      "Measure the object allocator: alloc/free latency and throughput, the "
                      "walker, the sweep scan and sweep, the scavenger.",
                      "plot pair latency against object size", sys.modules[__name__])
