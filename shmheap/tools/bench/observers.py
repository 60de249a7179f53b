"""Observers benchmark: how much does a looping observer slow a writer down?

A *writer* process allocates and frees in a loop (a large object each time,
so that every operation takes the heap lock twice, then a small one) and
times each operation.  It runs for the same time alone and then beside an
*observer* process, attached read-only, that loops one of ``check()``,
``walk()`` or ``snapshot()`` as fast as it can.  For heaps of 100 and
10,000 arenas of 64 KiB (each with objects bound to roots in its arenas),
the table gives the writer's p99 and worst operation latency in each case,
and the ratio to the writer alone: an observer that stopped the writer
(held the lock for long, or took it back before a waiting writer could)
shows as a worst latency of its own run's length.

Both processes are fresh interpreters started by this one (the writer
attached read-write, the observer read-only), so they compete for the lock
and the cores as two programs would.  Run as ``shmheap bench observers``.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from typing import Any

from ...heap import Heap
from ..display import print_table
from .children import Child
from .common import BenchError, bench_heap, environment, percentile, write_json

ARENA_SIZE = 64 * 1024
OBSERVERS = ("check", "walk", "snapshot")
#: (heap sizes in arenas, seconds each writer runs) per mode
MODES = {"full": ((100, 10_000), 3.0), "quick": ((100, 10_000), 1.0), "tiny": ((10, 100), 0.3)}
#: how many objects bound to roots a heap gets, at most (one per arena below that)
MAX_ROOTS = 5_000

_WRITER = textwrap.dedent("""
    import json, sys, time, shmheap
    h = shmheap.Heap.attach(sys.argv[1])
    seconds = float(sys.argv[2])
    large = 5 * h._objects().page_size
    h.free(h.alloc(large))
    print("ready", flush=True)
    sys.stdin.readline()
    clock = time.perf_counter_ns
    times = []
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        start = clock()
        h.free(h.alloc(large))
        h.free(h.alloc(16 + (i % 64) * 40))
        times.append(clock() - start)
        i += 1
    print(json.dumps(times), flush=True)
    """)

_OBSERVER = textwrap.dedent("""
    import select, sys, time, shmheap
    h = shmheap.Heap.attach(sys.argv[1], readonly=True)
    what = sys.argv[2]
    observe = {"check": h.check, "walk": lambda: sum(1 for _ in h.walk()),
               "snapshot": h.snapshot}[what]
    observe()
    print("ready", flush=True)
    sys.stdin.readline()
    poller = select.poll()
    poller.register(sys.stdin, select.POLLIN)
    runs = 0
    longest = 0
    print("running", flush=True)
    while not poller.poll(0):
        start = time.perf_counter_ns()
        found = observe()
        longest = max(longest, time.perf_counter_ns() - start)
        runs += 1
        if what == "check" and found:
            print("findings", found, flush=True)
            break
    print(runs, longest, flush=True)
    """)


def _populate(heap: Heap, arenas: int) -> None:
    """``arenas`` arenas with objects bound to roots spread over them."""
    for _ in range(arenas):
        heap.grow()
    per = heap.arena_size // 8  # three pages of eight: objects spread over the arenas
    for i in range(min(arenas * 3, MAX_ROOTS)):
        heap.roots[f"o{i}"] = heap.alloc(per - 64 * (i % 8))


def _writer_run(heap: Heap, seconds: float, observer: str | None) -> dict[str, Any]:
    """One writer run of ``seconds``, beside a looping ``observer`` (None: alone)."""
    with Child(_WRITER.replace("sys.argv[1]", repr(heap.name))
               .replace("float(sys.argv[2])", repr(seconds))) as writer:
        if writer.line() != "ready":
            raise BenchError("observers bench: the writer did not start")
        watcher = None
        if observer is not None:
            watcher = Child(_OBSERVER.replace("sys.argv[1]", repr(heap.name))
                            .replace("sys.argv[2]", repr(observer)))
        try:
            if watcher is not None:
                if watcher.line(600) != "ready":
                    raise BenchError(f"observers bench: the {observer} observer did not start")
                watcher.send()
                if watcher.line() != "running":
                    raise BenchError(f"observers bench: the {observer} observer stopped")
            writer.send()
            times = json.loads(writer.line(seconds + 600))
            row: dict[str, Any] = {"ops": len(times), "p99_us": percentile(times, 0.99) / 1e3,
                                   "worst_us": max(times) / 1e3}
            if watcher is not None:
                watcher.send()
                report = watcher.line(600)
                if report.startswith("findings"):
                    raise BenchError(f"observers bench: check() beside a writer: {report}")
                runs, longest = map(int, report.split())
                row.update(observer_runs=runs, observer_longest_ms=longest / 1e6)
        finally:
            if watcher is not None:
                watcher.kill()
    if not row["ops"]:
        raise BenchError("observers bench: the writer completed no operation")
    return row


def run(mode: str, log: Any = print) -> dict[str, Any]:
    sizes, seconds = MODES[mode]
    results: dict[str, Any] = {"environment": environment(), "mode": mode,
                               "seconds": seconds, "arena_size": ARENA_SIZE, "heaps": []}
    for arenas in sizes:
        log(f"heap of {arenas} arenas")
        with bench_heap("benchobs", arena_size=ARENA_SIZE, max_arenas=2 * arenas + 64,
                        reserve=False) as heap:
            _populate(heap, arenas)
            _writer_run(heap, seconds / 3, None)  # warm-up: the heap's first refills and grows
            alone = _writer_run(heap, seconds, None)
            row: dict[str, Any] = {"arenas": arenas, "roots": len(heap.roots), "alone": alone}
            for observer in OBSERVERS:
                log(f"  beside a looping {observer}()")
                beside = _writer_run(heap, seconds, observer)
                beside["p99_ratio"] = beside["p99_us"] / alone["p99_us"]
                beside["worst_ratio"] = beside["worst_us"] / alone["worst_us"]
                row[observer] = beside
            row["findings_after"] = [f.as_dict() for f in heap.check()]
            results["heaps"].append(row)
    return results


def report(results: dict[str, Any]) -> None:
    rows = []
    for heap in results["heaps"]:
        alone = heap["alone"]
        rows.append([str(heap["arenas"]), "alone", str(alone["ops"]),
                     f"{alone['p99_us']:.0f} us", f"{alone['worst_us'] / 1e3:.1f} ms", "", "", ""])
        for observer in OBSERVERS:
            row = heap[observer]
            rows.append([str(heap["arenas"]), f"{observer}()", str(row["ops"]),
                         f"{row['p99_us']:.0f} us", f"{row['worst_us'] / 1e3:.1f} ms",
                         f"{row['p99_ratio']:.1f}x / {row['worst_ratio']:.1f}x",
                         str(row["observer_runs"]), f"{row['observer_longest_ms']:.1f} ms"])
    print_table(["arenas", "writer beside", "writer ops", "p99", "worst",
                 "ratio p99 / worst", "observer runs", "longest run"], rows,
                title=f"Writer latency beside a looping observer ({results['seconds']:g} s per "
                      f"run, arenas of {results['arena_size'] // 1024} KiB)")
    findings = sum(len(heap["findings_after"]) for heap in results["heaps"])
    print(f"findings after: {findings}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shmheap bench observers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--quick", action="store_true", help="1 s runs instead of 3 s")
    length.add_argument("--tiny", action="store_true",
                        help="a run of seconds for tests; its figures mean little")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    results = run(mode)
    report(results)
    if args.json:
        write_json(args.json, results)
    return 0 if not any(heap["findings_after"] for heap in results["heaps"]) else 1
