"""The start benchmark (``shmheap bench start``): what a worker pays before its first operation.

One run measures, in alternating rounds so that a busy machine's drift hits
shmheap and its peers alike, and prints each figure next to its peer and target:

1. ``import shmheap`` in a fresh interpreter (numpy not imported), timed inside
   the child around the import statement, beside ``import
   multiprocessing.shared_memory`` timed the same way;
2. a spawned worker, from before ``Popen`` to its first heap operation done
   (``import shmheap``, ``Heap.attach``, ``free(alloc(64))``), beside a bare
   interpreter that reports as soon as it runs (the floor of any worker);
3. ``Heap.attach(name)`` of an existing heap, p50 (``close`` outside the timed
   part), beside ``SharedMemory(name=...)`` of an existing segment.

The children run with bytecode caching allowed (a first round, thrown away,
writes the caches, as ``pip install`` would have): the import figure is then
that of an installed package.  The clock is ``time.monotonic`` (one clock for
every process of the host), so a child reports the instant it is ready and the
parent subtracts the instant before it started the child.

The heap and segment it makes have unique names and are removed in ``finally``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from multiprocessing import shared_memory
from typing import Any, TextIO

from ...heap import Heap
from ..display import fmt_ns, fmt_ratio, print_table
from .common import (
    BenchError,
    Figure,
    Target,
    bench_heap,
    bench_main,
    percentile,
    print_heading,
    print_missed,
    recorded,
)

# Targets.
IMPORT_S = 0.030
ATTACH_P50_NS = 100_000.0

_IMPORT = textwrap.dedent("""
    import time
    start = time.monotonic()
    import {module}
    print(time.monotonic() - start)
    """)
_BARE = "import time; print(time.monotonic())"
_WORKER = textwrap.dedent("""
    import time, sys
    import shmheap
    heap = shmheap.Heap.attach(sys.argv[1])
    heap.free(heap.alloc(64))
    print(time.monotonic())
    """)

METHOD = (
    "import = time.monotonic() around `import shmheap` inside a fresh interpreter (no numpy), "
    "beside `import multiprocessing.shared_memory` timed alike; bytecode cached (a first round "
    "writes it); median of the rounds.",
    "worker start = from before subprocess.Popen to the child's report that it has imported "
    "shmheap, attached the heap and done free(alloc(64)); bare = a child that reports as "
    "soon as it runs; median of the rounds, alternating.",
    "attach = Heap.attach(name) of a heap with one arena (close() outside the time), beside "
    "SharedMemory(name=...) of an existing 1 MiB segment (close() outside the time); p50 "
    "over alternating rounds.",
)


def run(quick: bool = False, *, tiny: bool = False,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    say = log or (lambda message: None)
    rounds = 3 if tiny else 10 if quick else 30
    attaches = 20 if tiny else 300 if quick else 2000

    def measure_into(results: dict[str, Any]) -> None:
        with bench_heap("bstart", arena_size=1 << 20, reserve=False) as heap:
            heap.grow()
            say("import and worker start")
            results["import"], results["worker"] = start_figures(heap.name, rounds)
            say("attach")
            results["attach"] = attach_figures(heap.name, attaches)

    mode = "tiny" if tiny else "quick" if quick else "full"
    return recorded("start", mode, METHOD, measure_into, targets)


def child_env() -> dict[str, str]:
    """This environment with bytecode caching allowed and no crash points."""
    return {key: value for key, value in os.environ.items()
            if key != "PYTHONDONTWRITEBYTECODE" and not key.startswith("SHMHEAP_")}


def child_output(argv: list[str]) -> str:
    proc = subprocess.run([sys.executable, *argv], env=child_env(), capture_output=True,
                          text=True, timeout=120)
    if proc.returncode != 0:
        raise BenchError(f"start bench: a child failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout.strip()


def import_s(module: str) -> float:
    return float(child_output(["-c", _IMPORT.format(module=module)]))


def started_s(argv: list[str]) -> float:
    """Seconds from before the child's start to the instant it reports."""
    before = time.monotonic()
    return float(child_output(argv)) - before


def start_figures(name: str, rounds: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(import seconds, worker start seconds): medians of ``rounds`` alternating rounds."""
    ways: dict[str, Callable[[], float]] = {
        "import_shmheap": lambda: import_s("shmheap"),
        "import_shared_memory": lambda: import_s("multiprocessing.shared_memory"),
        "worker": lambda: started_s(["-c", _WORKER, name]),
        "bare": lambda: started_s(["-c", _BARE]),
    }
    times: dict[str, list[float]] = {key: [] for key in ways}
    for round_ in range(rounds + 1):
        for key, way in ways.items():
            seconds = way()
            if round_:  # the first round writes the bytecode caches
                times[key].append(seconds)
    med = {key: statistics.median(values) for key, values in times.items()}
    imports = {"shmheap_s": med["import_shmheap"], "shared_memory_s": med["import_shared_memory"],
               "ratio": med["import_shmheap"] / med["import_shared_memory"], "rounds": rounds}
    worker = {"shmheap_s": med["worker"], "bare_s": med["bare"],
              "ratio": med["worker"] / med["bare"], "rounds": rounds}
    return imports, worker


def attach_figures(name: str, calls: int) -> dict[str, Any]:
    """p50 ns of Heap.attach and of SharedMemory(name=), alternating rounds of 10 calls."""
    clock = time.perf_counter_ns
    segment = shared_memory.SharedMemory(create=True, size=1 << 20)
    ns: dict[str, list[int]] = {"shmheap": [], "shared_memory": []}
    try:
        for _ in range(max(1, calls // 10)):
            for _ in range(10):
                start = clock()
                heap = Heap.attach(name)
                ns["shmheap"].append(clock() - start)
                heap.close()
            for _ in range(10):
                start = clock()
                other = shared_memory.SharedMemory(name=segment.name)
                ns["shared_memory"].append(clock() - start)
                other.close()
    finally:
        segment.close()
        segment.unlink()
    p50 = {key: percentile(values, 0.5) for key, values in ns.items()}
    return {"shmheap_p50_ns": p50["shmheap"], "shared_memory_p50_ns": p50["shared_memory"],
            "ratio": p50["shmheap"] / p50["shared_memory"], "calls": len(ns["shmheap"])}


def targets(results: dict[str, Any]) -> list[Target]:
    return [
        Target.of("import shmheap (no numpy)", results["import"]["shmheap_s"] * 1e9, "<=",
                  IMPORT_S * 1e9, fmt_ns),
        Target.of("attach p50", results["attach"]["shmheap_p50_ns"], "<=", ATTACH_P50_NS,
                  fmt_ns),
    ]


def report(results: dict[str, Any], out: TextIO | None = None) -> None:
    print_heading(results, out)
    imports, worker, attach = results["import"], results["worker"], results["attach"]
    print_table(
        ["figure", "shmheap", "peer / floor", "peer", "ratio"],
        [["import (fresh interpreter), median", fmt_ns(imports["shmheap_s"] * 1e9),
          "import multiprocessing.shared_memory", fmt_ns(imports["shared_memory_s"] * 1e9),
          fmt_ratio(imports["ratio"])],
         ["worker start to its first operation, median", fmt_ns(worker["shmheap_s"] * 1e9),
          "bare interpreter start", fmt_ns(worker["bare_s"] * 1e9), fmt_ratio(worker["ratio"])],
         ["Heap.attach, p50", fmt_ns(attach["shmheap_p50_ns"]), "SharedMemory(name=...)",
          fmt_ns(attach["shared_memory_p50_ns"]), fmt_ratio(attach["ratio"])]],
        title="Starting a worker", out=out)
    print_missed(results, out)


def figures(results: dict[str, Any]) -> list[Figure]:
    """One panel: each start cost beside its peer (x: import, worker start, attach)."""
    imports, worker, attach = results["import"], results["worker"], results["attach"]
    shm = [(1.0, imports["shmheap_s"] * 1e9), (10.0, worker["shmheap_s"] * 1e9),
           (100.0, attach["shmheap_p50_ns"])]
    peer = [(1.0, imports["shared_memory_s"] * 1e9), (10.0, worker["bare_s"] * 1e9),
            (100.0, attach["shared_memory_p50_ns"])]
    ticks = {1.0: "import", 10.0: "worker start", 100.0: "attach"}
    return [Figure("start: import, a worker's first operation, attach (shmheap beside its peer)",
                   "cost", "time", {"shmheap": shm, "peer (shared_memory; bare interpreter)": peer},
                   x_format=lambda x: ticks.get(x, ""))]


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, "start", __doc__ or "", "draw the start costs",
                      sys.modules[__name__])
