"""The cores benchmark (``shmheap bench cores``): the native core beside its pure-Python twin.

Each hot path is measured in two fresh interpreters on the same machine in the
same run, one with the native core (``shmheap._native``) and one with
``SHMHEAP_PURE_PYTHON=1``, beside the peers the targets name:

* a bare ``posix_ipc`` acquire + release (the floor of any lock round trip);
* the heap lock's round trip with the owner record (``read_word``);
* ``snapshot()`` when the header is unchanged (cached), and when it changed
  (the native core measured with ``forget()`` before each call, so its figure
  includes one more C call; the last snapshot's object, which nobody else
  holds, becomes the new one, as after a ``grow()`` whose caller dropped it);
* a 64-byte ``alloc`` + ``free`` pair, and ``multiprocessing.heap``'s
  ``BufferWrapper(64)`` made and dropped;
* ``alloc(64)`` + ``free`` pairs per second on one handle shared by 1 and by
  4 threads (``pairs_per_s``): what the handle's thread lock costs when
  threads share it;
* ``shmheap stress`` operations per second (writers, churners and readers,
  flat out), once per core.

Before handles were thread-safe (main at 6ef276a, this bench's machine,
Python 3.11) the native pair cost ``BEFORE_THREAD_SAFE_PAIR_NS``; the report
prints it beside today's figure (a reference, not a same-run peer: that code
is gone).

Targets, as ratios in this run: alloc+free >= 5x faster than the twin and
>= 20x faster than BufferWrapper; snapshot (cached and changed) >= 3x faster
than the twin, the changed one <= 100 ns; the lock round trip no slower than
the bare posix_ipc pair; stress operations per second >= 3x the twin's;
4 threads on one handle >= 0.8x the pairs per second of 1 thread (native).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from ...core import PURE_VAR
from ..display import fmt_ns, fmt_ratio, print_table
from .common import BenchError, Figure, Target, bench_main, environment, print_targets

CORES = ("native", "pure")
#: p50 ns of the native alloc(64) + free pair before handles were thread-safe (see above)
BEFORE_THREAD_SAFE_PAIR_NS = 105.0
#: thread counts of the shared-handle throughput
THREAD_COUNTS = (1, 4)
FIGURES = ("bare_posix_ipc", "lock_round_trip", "snapshot_cached", "snapshot_changed",
           "alloc_free_64", "buffer_wrapper_64")
LABELS = {"bare_posix_ipc": "bare posix_ipc acquire + release",
          "lock_round_trip": "heap lock round trip (owner record)",
          "snapshot_cached": "snapshot(), header unchanged",
          "snapshot_changed": "snapshot(), header changed",
          "alloc_free_64": "alloc(64) + free",
          "buffer_wrapper_64": "multiprocessing BufferWrapper(64)"}

_CHILD = textwrap.dedent("""
    import json, sys
    from multiprocessing.heap import BufferWrapper
    import posix_ipc
    import shmheap
    from shmheap import core
    from shmheap.tools.bench.common import bench_heap, measure
    from shmheap.tools.bench.cores import THREAD_COUNTS, pairs_per_s
    budget = float(sys.argv[1])
    figures = {"native": core.NATIVE}
    sem = posix_ipc.Semaphore(None, posix_ipc.O_CREX, initial_value=1)
    try:
        def bare():
            sem.acquire(0)
            sem.release()
        figures["bare_posix_ipc"] = measure(bare, budget).p50_ns
    finally:
        sem.unlink()
        sem.close()
    with bench_heap("benchcores", arena_size=1 << 20, reserve=False) as heap:
        heap.grow()
        read_word, header = heap._lock.read_word, heap._header
        figures["lock_round_trip"] = measure(lambda: read_word(header), budget).p50_ns
        figures["snapshot_cached"] = measure(heap.snapshot, budget).p50_ns
        if core.NATIVE:
            forget, snapshot = heap.snapshot.forget, heap.snapshot
            def changed():
                forget()
                return snapshot()
        else:
            snapshot_of = heap._index.snapshot_of
            def changed():
                return snapshot_of(read_word(header))
        figures["snapshot_changed"] = measure(changed, budget).p50_ns
        heap.free(heap.alloc(64))  # (the first call binds the native fast paths)
        alloc, free = heap.alloc, heap.free
        figures["alloc_free_64"] = measure(lambda: free(alloc(64)), budget).p50_ns
        for threads in THREAD_COUNTS:
            figures[f"pairs_per_s_{threads}"] = pairs_per_s(heap, threads, budget)
    figures["buffer_wrapper_64"] = measure(lambda: BufferWrapper(64), budget).p50_ns
    print(json.dumps(figures))
    """)


def pairs_per_s(heap: Any, threads: int, seconds: float) -> float:
    """``alloc(64)`` + ``free`` pairs per second of ``threads`` threads sharing ``heap``."""
    start = threading.Barrier(threads + 1)
    stop = threading.Event()
    counts = [0] * threads

    def run(i: int) -> None:
        alloc, free = heap.alloc, heap.free
        start.wait()
        done = 0
        while not stop.is_set():
            for _ in range(1000):
                free(alloc(64))
            done += 1000
        counts[i] = done

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    began = time.perf_counter()
    stop.wait(seconds)
    stop.set()
    for worker in workers:
        worker.join()
    return sum(counts) / (time.perf_counter() - began)


def run(quick: bool = False, *, tiny: bool = False,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    say = log or (lambda message: None)
    budget = 0.05 if tiny else 0.5 if quick else 2.0
    stress_s = 1.5 if tiny else 4.0 if quick else 10.0
    results: dict[str, Any] = {"environment": environment(), "cores": {}}
    for name in CORES:
        say(f"hot paths, {name} core")
        figures = _child(name, [sys.executable, "-c", _CHILD, str(budget)])
        if figures.pop("native") != (name == "native"):
            raise BenchError(f"cores bench: the {name} core did not run (is shmheap._native "
                             "built? `pip install .` builds it where a C compiler is)")
        say(f"shmheap stress, {name} core")
        figures["stress_ops_per_s"] = _stress(name, stress_s)
        results["cores"][name] = figures
    return results


def _env(core: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHMHEAP_")}
    if core == "pure":
        env[PURE_VAR] = "1"
    return env


def _child(core: str, argv: list[str]) -> dict[str, Any]:
    proc = subprocess.run(argv, env=_env(core), capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise BenchError(f"cores bench: the {core} child failed: {proc.stderr.strip()}")
    figures: dict[str, Any] = json.loads(proc.stdout)
    return figures


def _stress(core: str, seconds: float) -> float:
    """Operations per second of every role of a flat-out ``shmheap stress`` run."""
    with tempfile.TemporaryDirectory(prefix="shmheap-bench-cores-") as tmp:
        report = os.path.join(tmp, "stress.json")
        proc = subprocess.run(
            [sys.executable, "-m", "shmheap", "stress", "--flat-out", "--no-progress",
             "--floor", "0", "--duration", str(seconds), "--json", report],
            env=_env(core), capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise BenchError(f"cores bench: shmheap stress failed on the {core} core: "
                             f"{proc.stdout[-500:]} {proc.stderr[-500:]}")
        with open(report) as f:
            data = json.load(f)
    return float(sum(role["ops"] for role in data["roles"].values()) / data["duration_s"])


def targets(results: dict[str, Any]) -> list[Target]:
    native, pure = results["cores"]["native"], results["cores"]["pure"]

    def faster(key: str) -> float:
        return float(pure[key] / native[key])

    return [
        Target.of("alloc+free pair: twin / native", faster("alloc_free_64"), ">=", 5, fmt_ratio),
        Target.of("alloc+free pair: BufferWrapper(64) / native",
                  native["buffer_wrapper_64"] / native["alloc_free_64"], ">=", 20, fmt_ratio),
        Target.of("snapshot, header unchanged: twin / native", faster("snapshot_cached"), ">=",
                  3, fmt_ratio),
        Target.of("snapshot, header changed: twin / native", faster("snapshot_changed"), ">=",
                  3, fmt_ratio),
        Target.of("snapshot, header changed, native", native["snapshot_changed"], "<=", 100,
                  fmt_ns),
        Target.of("lock round trip: native / bare posix_ipc",
                  native["lock_round_trip"] / native["bare_posix_ipc"], "<=", 1, fmt_ratio),
        Target.of("stress operations per second: native / twin",
                  native["stress_ops_per_s"] / pure["stress_ops_per_s"], ">=", 3, fmt_ratio),
        Target.of("pairs per second on one handle, native: 4 threads / 1 thread",
                  native["pairs_per_s_4"] / native["pairs_per_s_1"], ">=", 0.8, fmt_ratio),
    ]


def report(results: dict[str, Any], out: TextIO | None = None) -> None:
    native, pure = results["cores"]["native"], results["cores"]["pure"]
    rows = [[LABELS[key], fmt_ns(native[key]), fmt_ns(pure[key]),
             fmt_ratio(pure[key] / native[key])] for key in FIGURES]
    rows.append(["alloc(64) + free before thread-safe handles (recorded)",
                 fmt_ns(BEFORE_THREAD_SAFE_PAIR_NS), "-", "-"])
    for threads in THREAD_COUNTS:
        key = f"pairs_per_s_{threads}"
        rows.append([f"pairs per second, {threads} thread{'s' * (threads > 1)} on one handle",
                     f"{native[key]:,.0f}", f"{pure[key]:,.0f}",
                     fmt_ratio(native[key] / pure[key])])
    rows.append(["shmheap stress, operations per second", f"{native['stress_ops_per_s']:,.0f}",
                 f"{pure['stress_ops_per_s']:,.0f}",
                 fmt_ratio(native["stress_ops_per_s"] / pure["stress_ops_per_s"])])
    print_table(
        ["figure", "native",
         "pure-Python twin", "twin / native"],
        rows,
        title="shmheap bench cores: p50 per call, in one run",
        out=out)
    print_targets(targets(results), out)


#: Short names of the hot paths on the plot's x axis, in FIGURES order.
TICKS = ("posix_ipc", "lock", "snapshot", "snapshot*", "alloc+free", "BufferWrapper")


def figures(results: dict[str, Any]) -> list[Figure]:
    """One panel: each hot path's p50 in both cores (x: the paths, spaced a decade apart;
    snapshot* is the one after the header changed; posix_ipc and BufferWrapper are peers)."""
    cores = results["cores"]
    series = {label: [(10.0 ** i, float(cores[core][key])) for i, key in enumerate(FIGURES)]
              for core, label in (("native", "native core"), ("pure", "pure-Python twin"))}
    return [Figure("cores: each hot path, the native core beside its pure-Python twin (p50)",
                   "hot path", "per call", series,
                   x_format=lambda x: TICKS[min(round(math.log10(x)), len(TICKS) - 1)])]


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, "cores", __doc__ or "",
                      "draw each hot path for both cores", sys.modules[__name__])
