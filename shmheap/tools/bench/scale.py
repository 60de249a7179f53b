"""The scale benchmark (``shmheap bench scale``): what a heap of many arenas costs.

For heaps of 64, 1,000, 10,000 and 100,000 arenas of 64 KiB (sparse; 8 pages
of 8 KiB each; ``--quick`` stops at 30,000, ``--tiny`` at 500):

1. ``grow()`` p50 over the last grows that made the heap that size;
2. the cost of allocation while the heap is ~90% full (every arena but every
   tenth holds one object of all its pages): a small-object round (64 objects
   of 4,000 bytes, which refills a span every 8 objects, then their frees)
   and a large-object round (16 objects of 5 pages, each of which only an
   empty arena can take, then their frees), per alloc + free;
3. a new process (a fresh interpreter): its ``attach`` and its first
   ``alloc(100)``;
4. a fresh interpreter that walks the whole heap and then checks it
   (``check()``, fsck): time per arena, and its peak RSS.

Targets, as ratios in the same run: alloc cost at the largest size <= 1.2x
its cost at 1,000 arenas (small and large); a new process's first alloc on
the largest heap <= 5 ms; the walking process's peak RSS at the largest size
<= 2x its RSS at 1,000 arenas.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any, TextIO

from ...heap import Heap
from ..display import fmt_ns, fmt_ratio, format_size, print_table
from .common import (
    BenchError,
    Figure,
    Target,
    bench_heap,
    bench_main,
    environment,
    percentile,
    print_targets,
)

ARENA = 64 * 1024
PAGE = 8192
SIZES = {"full": (64, 1000, 10_000, 100_000), "quick": (64, 1000, 10_000, 30_000),
         "tiny": (64, 200, 500)}
#: the size the ratios are taken against
BASE = 1000
SMALL, SMALL_ROUND = 4000, 64
LARGE, LARGE_ROUND = 5 * PAGE, 16
ALLOC_RATIO, FIRST_ALLOC_MS, RSS_RATIO = 1.2, 5.0, 2.0

_NEW_PROCESS = textwrap.dedent("""
    import json, sys, time
    start = time.perf_counter()
    import shmheap
    h = shmheap.Heap.attach(sys.argv[1])
    attached = time.perf_counter()
    h.alloc(100)
    done = time.perf_counter()
    print(json.dumps(dict(attach_ms=(attached - start) * 1e3,
                          first_alloc_ms=(done - attached) * 1e3)))
    """)

# Peak RSS is VmHWM, the peak of this process's own memory: ru_maxrss would report the
# parent's peak, which Linux carries over fork and exec.
_WALKER = textwrap.dedent("""
    import json, sys, time
    import shmheap

    def peak_rss_kb():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

    h = shmheap.Heap.attach(sys.argv[1], readonly=True)
    base_kb = peak_rss_kb()
    start = time.perf_counter()
    spans = sum(1 for _ in h.walk())
    walked = time.perf_counter()
    findings = h.check()
    checked = time.perf_counter()
    rss_kb = peak_rss_kb()
    print(json.dumps(dict(spans=spans, walk_s=walked - start, fsck_s=checked - walked,
                          findings=[f.code for f in findings], rss_kb=rss_kb,
                          rss_growth_kb=rss_kb - base_kb, mapped=h._pages.mapped)))
    """)


def run(quick: bool = False, *, tiny: bool = False,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    say = log or (lambda message: None)
    sizes = SIZES["tiny" if tiny else "quick" if quick else "full"]
    rows = []
    with bench_heap("benchscale", arena_size=ARENA, page_size=PAGE, reserve=False) as heap:
        grown = 0
        for size in sizes:
            say(f"{size:,} arenas: growing")
            grow_s = [_timed(heap.grow) for _ in range(size - grown)]
            say(f"{size:,} arenas: filling to ~90%")
            _fill(heap, grown, size)
            grown = size
            say(f"{size:,} arenas: allocation rounds")
            row = {"arenas": size, "grow_p50_us": percentile(grow_s[-200:], 0.5) * 1e6}
            row.update(_alloc_rounds(heap))
            say(f"{size:,} arenas: a new process, a walker")
            row.update(_child(_NEW_PROCESS, heap.name))
            row.update(_child(_WALKER, heap.name))
            if row["findings"]:
                raise BenchError(f"scale bench: check() of {size} arenas found {row['findings']}")
            rows.append(row)
    return {"environment": environment(), "arena_size": ARENA, "page_size": PAGE,
            "rows": rows}


def _timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def _fill(heap: Heap, first: int, size: int) -> None:
    """One whole-arena object in each new arena but every tenth (made by earlier rounds)."""
    for position in range(first, size):
        if position % 10:
            heap.alloc(ARENA)


def _alloc_rounds(heap: Heap) -> dict[str, float]:
    """ns per alloc + free, median of rounds, of small (refilling) and large objects."""
    figures = {}
    for label, nbytes, count in (("small", SMALL, SMALL_ROUND), ("large", LARGE, LARGE_ROUND)):
        rounds = []
        for _ in range(15):
            start = time.perf_counter_ns()
            refs = [heap.alloc(nbytes) for _ in range(count)]
            for ref in refs:
                heap.free(ref)
            rounds.append((time.perf_counter_ns() - start) / count)
        figures[f"{label}_pair_ns"] = percentile(rounds, 0.5)
    return figures


def _child(code: str, name: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True,
                          timeout=3600)
    if proc.returncode != 0:
        raise BenchError(f"scale bench: a child process failed: {proc.stderr.strip()}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def _by_size(results: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {row["arenas"]: row for row in results["rows"]}


def targets(results: dict[str, Any]) -> list[Target]:
    rows = _by_size(results)
    largest = max(rows)
    base = rows.get(BASE) or rows[min(rows, key=lambda size: abs(size - BASE))]
    top = rows[largest]
    return [
        Target.of(f"small alloc+free at {largest:,} / at {base['arenas']:,} arenas",
                  top["small_pair_ns"] / base["small_pair_ns"], "<=", ALLOC_RATIO, fmt_ratio),
        Target.of(f"large alloc+free at {largest:,} / at {base['arenas']:,} arenas",
                  top["large_pair_ns"] / base["large_pair_ns"], "<=", ALLOC_RATIO, fmt_ratio),
        Target.of(f"a new process's first alloc at {largest:,} arenas (ms)",
                  top["first_alloc_ms"], "<=", FIRST_ALLOC_MS, lambda ms: f"{ms:.2f} ms"),
        Target.of(f"walker's peak RSS at {largest:,} / at {base['arenas']:,} arenas",
                  top["rss_kb"] / base["rss_kb"], "<=", RSS_RATIO, fmt_ratio),
    ]


def report(results: dict[str, Any], out: TextIO | None = None) -> None:
    rows = [[f"{row['arenas']:,}", f"{row['grow_p50_us']:.0f} µs", fmt_ns(row["small_pair_ns"]),
             fmt_ns(row["large_pair_ns"]), f"{row['attach_ms']:.1f} ms",
             f"{row['first_alloc_ms']:.2f} ms",
             f"{row['walk_s'] / row['arenas'] * 1e6:.0f} µs",
             f"{row['fsck_s'] / row['arenas'] * 1e6:.0f} µs",
             f"{row['rss_kb'] / 1024:.0f} MiB ({row['mapped']:,} mapped)"]
            for row in results["rows"]]
    print_table(
        ["arenas", "grow p50", "small alloc+free", "large alloc+free", "attach",
         "first alloc", "walk / arena", "fsck / arena", "walker peak RSS"],
        rows,
        title="shmheap bench scale: heaps of 64 KiB arenas, ~90% full",
        out=out)
    print_targets(targets(results), out)


def figures(results: dict[str, Any]) -> list[Figure]:
    """Each figure against the arena count: times in ns, the walker's RSS in bytes."""
    rows = results["rows"]

    def series(value: Callable[[dict[str, Any]], float]) -> list[tuple[float, float]]:
        return [(row["arenas"], value(row)) for row in rows]

    return [
        Figure("scale: alloc+free while the heap is ~90% full", "arenas", "per pair",
               {"small objects (refills)": series(lambda r: r["small_pair_ns"]),
                "large objects (5 pages)": series(lambda r: r["large_pair_ns"])}),
        Figure("scale: a new process", "arenas", "time",
               {"attach": series(lambda r: r["attach_ms"] * 1e6),
                "first alloc": series(lambda r: r["first_alloc_ms"] * 1e6)}),
        Figure("scale: grow, and walk and fsck per arena", "arenas", "time",
               {"grow p50": series(lambda r: r["grow_p50_us"] * 1e3),
                "walk per arena": series(lambda r: r["walk_s"] / r["arenas"] * 1e9),
                "fsck per arena": series(lambda r: r["fsck_s"] / r["arenas"] * 1e9)}),
        Figure("scale: the walking process's RSS", "arenas", "bytes",
               {"peak RSS": series(lambda r: r["rss_kb"] * 1024.0),
                "grown while walking and checking": series(
                    lambda r: max(r["rss_growth_kb"], 1) * 1024.0)},
               y_format=lambda nbytes: format_size(int(nbytes))),
    ]


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, "scale", __doc__ or "", "draw the figures against the arena count",
                      sys.modules[__name__])
