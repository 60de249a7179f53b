"""What every shmheap benchmark needs: timing, percentiles, heaps, tables, JSON, plots.

Timing
    ``latency(fn, batches, per_batch)`` calls ``fn`` ``per_batch`` times back
    to back per batch and records the mean per call of each batch
    (``time.perf_counter_ns``); p50/p99 are taken over batches.  Batching
    keeps the clock's own cost (~50 ns) out of sub-microsecond figures; the
    Python loop and call (``loop_overhead_ns``) stay in.  ``measure`` picks
    the batch size and count from a warm-up call and a time budget;
    ``measure_interleaved`` does so for several functions in alternating
    rounds, so drift of a busy machine hits all of them alike.

Heaps
    ``bench_heap`` creates a heap under a fresh ``unique_name`` and destroys it
    in ``finally``.  The names follow the test plugin's ``<tag>_p<pid>_<hex>``
    pattern, so leak checks can tell whose a leftover is.

Output
    Plain-text tables, JSON files and (with the ``plot`` extra, matplotlib)
    log-log plots: one panel (``Figure``) per comparison, shmheap and its
    peers as lines over the same x values, ticks labelled with units.  A
    missing extra is a ``MissingExtraError`` that says what to install.

This module owns no heap: it creates and destroys only the heaps it names.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import json
import math
import os
import platform
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, TextIO

from ...errors import HeapNotFoundError, ShmHeapError
from ...heap import Heap, destroy
from ..display import fmt_count, fmt_ns, print_table

#: A batch of calls lasts about this long (ns), with at most ``max_per_batch`` calls.
BATCH_NS = 50_000
#: Below this (ns), a call is timed 100 times for calibration rather than once.
CALIBRATE_REPEAT_BELOW_NS = 10_000

_counter = itertools.count()


class BenchError(ShmHeapError, RuntimeError):
    """A benchmark could not run to the end (a worker failed or did not answer)."""


class MissingExtraError(ShmHeapError, ImportError):
    """An optional dependency (numpy, matplotlib) that the requested output needs."""


def import_extra(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise MissingExtraError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"{purpose} needs {module}, which is not installed; install it with "
            f"`pip install 'shmheap[{extra}]'`") from None


def optional_numpy() -> ModuleType | None:
    """numpy if it is installed, else None (figures that need it are then left out)."""
    try:
        return importlib.import_module("numpy")
    except ImportError:
        return None


# -- heaps -------------------------------------------------------------------------


def unique_name(tag: str) -> str:
    """A heap name no other process uses: ``<tag>_p<pid>_<counter><random hex>``."""
    return f"{tag}_p{os.getpid()}_{next(_counter):x}{secrets.token_hex(3)}"


@contextlib.contextmanager
def bench_heap(tag: str, **create_args: Any) -> Iterator[Heap]:
    """A new heap (``Heap.create(unique_name(tag), **create_args)``), destroyed afterwards."""
    name = unique_name(tag)
    heap = Heap.create(name, **create_args)
    try:
        yield heap
    finally:
        heap.close()
        with contextlib.suppress(HeapNotFoundError):
            destroy(name, force=True)


# -- timing ------------------------------------------------------------------------


@dataclass(frozen=True)
class Latency:
    """Per-call latency: p50/p99 over ``batches`` batch means of ``per_batch`` calls."""

    p50_ns: float
    p99_ns: float
    batches: int
    per_batch: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-quantile (0 < q <= 1) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def batch_means(fn: Callable[[], object], batches: int, per_batch: int) -> list[float]:
    """The mean ns per call of each of ``batches`` batches of ``per_batch`` calls."""
    clock = time.perf_counter_ns
    calls = range(per_batch)
    means = []
    for _ in range(batches):
        start = clock()
        for _ in calls:
            fn()
        means.append((clock() - start) / per_batch)
    return means


def summarise(means: Sequence[float], per_batch: int) -> Latency:
    return Latency(percentile(means, 0.5), percentile(means, 0.99), len(means), per_batch)


def latency(fn: Callable[[], object], batches: int, per_batch: int = 1) -> Latency:
    """Time ``fn`` in ``batches`` batches of ``per_batch`` calls, no warm-up."""
    return summarise(batch_means(fn, batches, per_batch), per_batch)


def calibrate(fn: Callable[[], object]) -> tuple[float, float]:
    """(ns of a first, warm-up call of ``fn``; estimated ns of one call after it)."""
    start = time.perf_counter_ns()
    fn()
    first = float(time.perf_counter_ns() - start)
    if first >= CALIBRATE_REPEAT_BELOW_NS:
        return first, first
    return first, max(1.0, batch_means(fn, 1, 100)[0])


def measure_interleaved(fns: Mapping[str, Callable[[], object]], budget_s: float,
                        rounds: int = 1, min_batches: int = 3, max_batches: int = 2000,
                        max_per_batch: int = 100) -> dict[str, Latency]:
    """Time each of ``fns`` for about ``budget_s`` seconds, split into alternating rounds.

    The first call warms up and calibrates.  It is thrown away, except for a
    call so slow that ``min_batches`` of them fill the budget: then it counts
    as the first batch (of one call), so a 20-second call is not made twice
    for nothing.
    """
    budget_ns = budget_s * 1e9
    plans = {}
    means: dict[str, list[float]] = {}
    for key, fn in fns.items():
        first, once = calibrate(fn)
        slow = first * min_batches >= budget_ns
        per_batch = 1 if slow else int(min(max_per_batch, max(1, BATCH_NS // once)))
        total = max(min_batches, min(max_batches, int(budget_ns / (once * per_batch))))
        means[key] = [first] if slow else []
        plans[key] = (per_batch, total - len(means[key]))
    for round_ in range(rounds):
        for key, fn in fns.items():
            per_batch, todo = plans[key]
            batches = todo * (round_ + 1) // rounds - todo * round_ // rounds
            means[key] += batch_means(fn, batches, per_batch)
    return {key: summarise(means[key], plans[key][0]) for key in fns}


def measure(fn: Callable[[], object], budget_s: float, min_batches: int = 3,
            max_batches: int = 2000) -> Latency:
    """Time ``fn`` for about ``budget_s`` seconds (at least ``min_batches`` batches)."""
    return measure_interleaved({"fn": fn}, budget_s, 1, min_batches, max_batches)["fn"]


def loop_overhead_ns() -> float:
    """p50 ns of the batch loop calling a function that does nothing."""
    return measure(lambda: None, 0.05).p50_ns


def environment() -> dict[str, Any]:
    """Where and when a benchmark ran: host, Python, cores, load."""
    numpy = optional_numpy()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
        "numpy": None if numpy is None else str(numpy.__version__),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# -- output ------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A figure with its target: ``value op limit`` must hold (``op`` is "<=" or ">=")."""

    name: str
    value: float
    op: str
    limit: float
    #: ``value`` and the rule (e.g. "<= 500 ns") as printed
    shown: str
    rule: str

    @classmethod
    def of(cls, name: str, value: float, op: str, limit: float,
           fmt: Callable[[float], str]) -> Target:
        if op not in ("<=", ">="):
            raise ValueError(f"target operator {op!r} is not '<=' or '>='")
        return cls(name, value, op, limit, fmt(value), f"{op} {fmt(limit)}")

    @property
    def ok(self) -> bool:
        return self.value <= self.limit if self.op == "<=" else self.value >= self.limit

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def verdict(ok: bool | None) -> str:
    """'pass', 'MISS', or '' when there is no target."""
    if ok is None:
        return ""
    return "pass" if ok else "MISS"


def recorded(name: str, mode: str, method: Sequence[str],
             measure_into: Callable[[dict[str, Any]], None],
             targets: Callable[[dict[str, Any]], list[Target]]) -> dict[str, Any]:
    """The results of benchmark ``name``: where it ran, its method and loop overhead, what
    ``measure_into`` adds to them, its targets, the load after it and the seconds it took."""
    started = time.monotonic()
    results: dict[str, Any] = {
        "benchmark": name, "mode": mode, "environment": environment(),
        "method": list(method), "loop_overhead_ns": loop_overhead_ns(),
    }
    measure_into(results)
    results["targets"] = [target.as_dict() for target in targets(results)]
    results["environment"]["loadavg_after"] = list(os.getloadavg())
    results["seconds"] = time.monotonic() - started
    return results


def print_heading(results: Mapping[str, Any], out: TextIO | None) -> None:
    """The first lines of a report of ``recorded`` results: where it ran, and its method."""
    env = results["environment"]
    print(f"shmheap {results['benchmark']} benchmark ({results['mode']}): {env['cpus']} cpus, "
          f"load {' '.join(f'{x:.2f}' for x in env['loadavg'])}, Python {env['python']}, "
          f"{results['seconds']:.1f} s; loop overhead {fmt_ns(results['loop_overhead_ns'])}",
          file=out)
    for line in results["method"]:
        print(f"  * {line}", file=out)


def print_missed(results: Mapping[str, Any], out: TextIO | None) -> None:
    """The last lines of a report of ``recorded`` results: how many targets were met, and
    each one missed."""
    missed = [target for target in results["targets"] if not target["ok"]]
    print(f"\nTargets: {len(results['targets']) - len(missed)} of {len(results['targets'])} "
          "met" + ("; missed:" if missed else "."), file=out)
    for target in missed:
        print(f"  MISS  {target['name']}: {target['shown']} (target {target['rule']})", file=out)


def checked(checks: Mapping[str, Any], name: str) -> str:
    """'<rule> <verdict>' of target ``name`` (of the recorded targets), '' if it has none."""
    target = checks.get(name)
    return "" if target is None else f"{target['rule']} {verdict(target['ok'])}"


def print_targets(targets: Sequence[Target], out: TextIO | None) -> None:
    """A table of ``targets``: each figure, its value, its rule and whether it was met."""
    print_table(["figure", "measured", "target", "met"],
                [[t.name, t.shown, t.rule, verdict(t.ok)] for t in targets],
                title="Targets", out=out)


def write_json(path: str | Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as indented JSON, replacing ``path`` in one rename."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(target)


def require_plotting() -> None:
    """Raise MissingExtraError now (before a long run) if matplotlib is missing."""
    import_extra("matplotlib", "plot", "--plot")


@dataclass(frozen=True)
class Figure:
    """One log-log panel: a comparison of shmheap and its peers over the same x values.

    ``series`` maps a label to its (x, y) points; x values are shown with
    ``x_format`` (the panel's ticks are exactly the measured x values), y
    values with ``y_format`` (nanoseconds, with units, unless a panel says).
    """

    title: str
    xlabel: str
    ylabel: str
    series: Mapping[str, Sequence[tuple[float, float]]]
    x_format: Callable[[float], str] = fmt_count
    y_format: Callable[[float], str] = fmt_ns


def plot_figures(path: str | Path, figures: Sequence[Figure]) -> None:
    """Save ``figures`` as log-log panels, one above the other, in one image."""
    matplotlib = import_extra("matplotlib", "plot", "--plot")
    matplotlib.use("Agg")
    pyplot = importlib.import_module("matplotlib.pyplot")
    ticker = importlib.import_module("matplotlib.ticker")
    figure, panels = pyplot.subplots(len(figures), 1, figsize=(11, 5 * len(figures)),
                                     squeeze=False, layout="constrained")
    for axes, panel in zip(panels[:, 0], figures, strict=True):
        for label, points in panel.series.items():
            if points:
                xs, ys = zip(*sorted(points), strict=True)
                axes.loglog(xs, ys, marker="o", label=label)
        axes.set_xticks(sorted({x for points in panel.series.values() for x, _ in points}))
        axes.xaxis.set_major_formatter(ticker.FuncFormatter(_tick(panel.x_format)))
        axes.xaxis.set_minor_locator(ticker.NullLocator())
        values = [y for points in panel.series.values() for _, y in points if y > 0]
        axes.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=_y_steps(values)))
        axes.yaxis.set_major_formatter(ticker.FuncFormatter(_tick(panel.y_format)))
        axes.yaxis.set_minor_formatter(ticker.NullFormatter())
        axes.tick_params(labelsize=11)
        axes.set_title(panel.title, fontsize=13)
        axes.set_xlabel(panel.xlabel, fontsize=11)
        axes.set_ylabel(panel.ylabel, fontsize=11)
        axes.grid(True, which="major", alpha=0.3)
        axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=10)
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def _y_steps(values: Sequence[float]) -> tuple[float, ...]:
    """Labelled steps within a decade: more of them the fewer decades ``values`` span."""
    decades = math.log10(max(values) / min(values)) if values else 0.0
    if decades < 1:
        return tuple(float(step) for step in range(1, 10))
    return (1.0, 2.0, 5.0) if decades < 2 else (1.0,)


def _tick(show: Callable[[float], str]) -> Callable[[float, object], str]:
    """A matplotlib FuncFormatter function that labels a tick value with ``show``."""
    return lambda value, _position: show(value)


class BenchModule(Protocol):
    """What ``bench_main`` needs of a benchmark module (index.py, alloc.py)."""

    def run(self, quick: bool = False, *, tiny: bool = False,
            log: Callable[[str], None] | None = None) -> dict[str, Any]: ...

    def report(self, results: dict[str, Any], out: TextIO | None = None) -> None: ...

    def figures(self, results: dict[str, Any]) -> list[Figure]: ...


def bench_main(argv: list[str] | None, name: str, description: str, plot_help: str,
               module: BenchModule) -> int:
    """The command line of a benchmark: run, print the tables, write JSON and a plot if asked."""
    parser = argparse.ArgumentParser(prog=f"shmheap bench {name}", description=description)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--quick", action="store_true", help="a short run (under 30 s)")
    length.add_argument("--tiny", action="store_true",
                        help="a run of seconds for tests; its figures mean little")
    parser.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help=f"{plot_help} (needs matplotlib)")
    args = parser.parse_args(argv)
    try:
        if args.plot:
            require_plotting()
        results = module.run(args.quick, tiny=args.tiny, log=lambda message: print(
            f"... {message}", file=sys.stderr, flush=True))
        module.report(results)
        if args.json:
            write_json(args.json, results)
            print(f"\nwrote {args.json}")
        if args.plot:
            plot_figures(args.plot, module.figures(results))
            print(f"wrote {args.plot}")
    except MissingExtraError as exc:
        print(f"shmheap bench {name}: {exc}", file=sys.stderr)
        return 2
    return 0
