"""The index benchmark (``shmheap bench index``): what the all-arenas index costs.

One run measures, on one heap where it can, and prints each figure next to
its target:

1. snapshot latency at 10 .. 1M index entries, with the header unchanged
   (``Heap.snapshot()`` returns its cached snapshot) and changed (the
   uncached path: lock, copy the header, unlock, build the snapshot);
2. the naive ways: copy every entry while holding the same lock (as bytes,
   as a list), and a ``multiprocessing.Manager().list()`` (``proxy[:]``,
   one request; ``list(proxy)``, one request per entry);
3. iterating a snapshot in Python and through numpy;
4. ``grow()`` latency with 1 MiB and 64 MiB arenas, reserved or sparse,
   against the bare shm create/size/map/close floor;
5. the writer's ``grow()`` rate alone and with observer processes (spawned)
   that snapshot, read every entry and sleep 1 ms, for shmheap and for the
   naive design (observers copying every entry under the lock);
6. index memory against its length and capacity;
7. the liveness machinery's cost on the uncontended snapshot path.

Big indices are synthetic: arena indices appended to the index directly
under the heap lock, with no arena segments behind them (snapshots never
look at arenas).  To time the parts alone this module uses the heap's
private ``_index``, ``_lock``, ``_sem`` and ``_header``; it changes heap
state only through ``grow()`` and ``_index.append`` under the lock.  Every
heap and bare segment it makes has a unique name and is removed in
``finally``.
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import multiprocessing
import os
import queue
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.managers import SyncManager
from types import TracebackType
from typing import Any, TextIO, TypeVar

import posix_ipc

from ... import segments
from ...arenas import segment_size
from ...heap import Heap
from ...names import PAGE_SIZE, PREFIX, index_name
from ..display import fmt_ns, fmt_rate, fmt_ratio, format_size, print_table
from .common import (
    BenchError,
    Figure,
    Target,
    batch_means,
    bench_heap,
    bench_main,
    checked,
    measure,
    measure_interleaved,
    optional_numpy,
    print_heading,
    print_missed,
    recorded,
    summarise,
    unique_name,
)

T = TypeVar("T")
MIB = 1 << 20

# Targets.
SNAPSHOT_P50_NS = 500.0
FLATNESS = 1.3
NAIVE_RATIO = 1000.0
PYTHON_RATE = 10e6
NUMPY_RATE = 500e6
GROW_P50_NS = 60_000.0
#: grow() of a sparse arena at most this many times its floor (issue 21)
GROW_FLOOR_RATIO = 3.0
OBSERVED_RATIO = 0.8
LIVENESS_RATIO = 1.10

#: Sleep of an observer between two looks at the heap.
OBSERVER_SLEEP_S = 0.001
#: Seconds to wait for an observer process to start or to report, and between checks.
OBSERVER_TIMEOUT_S = 120.0
OBSERVER_POLL_S = 0.5
#: Synthetic entries of the writer benchmark start here, clear of the real arenas' indices.
SYNTHETIC_BASE = 1 << 19
#: (arena size, reserve) of the grow() benchmark.
GROW_CASES = ((MIB, True), (MIB, False), (64 * MIB, True), (64 * MIB, False))
#: grow() and its floor are timed in this many alternating rounds
GROW_ROUNDS = 5

#: Writer runs: no observers, then observers that read a private copy (no lock: their CPU
#: cost alone), take shmheap snapshots, or copy every entry under the lock (naive).
WRITER_DESIGNS = ("alone", "private", "shmheap", "naive")
WRITER_LABELS = {"private": "private-copy observers (no lock)",
                 "shmheap": "shmheap observers", "naive": "naive observers"}

#: Figure key -> label of every snapshot-latency figure, in table and plot order.
SNAPSHOT_KINDS = {
    "shmheap_unchanged": "shmheap snapshot (header unchanged)",
    "shmheap_changed": "shmheap snapshot (header changed)",
    "naive_bytes": "naive: bytes copy under the lock",
    "naive_list": "naive: list copy under the lock",
    "manager_slice": "Manager().list(): proxy[:]",
    "manager_list": "Manager().list(): list(proxy)",
}
WRITER_TARGET = "writer grow() rate with shmheap observers / alone"
SHMHEAP_KINDS = ("shmheap_unchanged", "shmheap_changed")
NAIVE_KINDS = ("naive_bytes", "naive_list", "manager_slice", "manager_list")

METHOD = (
    "Latency per call = the mean of a batch of up to 100 back-to-back calls "
    "(time.perf_counter_ns); p50/p99 are over batches (slow calls: batches of one) and "
    "include the Python loop and call overhead (loop_overhead_ns).",
    "snapshot (header unchanged) = Heap.snapshot() called again and again: the header word "
    "is unchanged, so it returns its cached snapshot after one lock round trip.",
    "snapshot (header changed) = heap._index.snapshot_of(heap._lock.read_word(heap._header)): "
    "what Heap.snapshot() does when the header changed since its last call (lock, copy the "
    "header, unlock, build the snapshot).",
    "Index entries are synthetic arena indices appended under the lock (no arena segments).",
    "naive = lock, copy every entry (bytes(view) or view.tolist()), unlock, on the same "
    "semaphore. Manager = multiprocessing.Manager().list() (spawn): proxy[:] is one request; "
    "list(proxy) makes one request per entry. Ratios are naive p50 / shmheap (header changed) "
    "p50.",
    "grow() target (p50 <= 60 us) is for sparse arenas; reserved ones are compared with the "
    "bare create+ftruncate+fallocate+mmap+close floor (posix_fallocate zeroes the memory). "
    "grow() and its floor are timed in alternating rounds.",
    "Writer: grow() of sparse 1 MiB arenas on an index prefilled with synthetic entries; "
    "observers (spawned processes) loop: get the entries (a snapshot; a copy under the lock; "
    "or a private copy made once, which takes no lock and measures the observers' CPU cost "
    "alone), sum them (numpy; Python without it), sleep 1 ms. Rates are medians over rounds.",
)


@dataclass(frozen=True)
class Plan:
    """How much of each measurement a run does."""

    mode: str
    sizes: tuple[int, ...]
    #: seconds per latency figure and index size
    snapshot_s: float
    copy_s: float
    #: Manager().list() is measured up to this many entries
    manager_max: int
    #: seconds and least calls for list(proxy) per index size
    manager_list_s: float
    manager_list_calls: int
    #: timed grow() calls per arena case; fewer for reserved 64 MiB arenas
    grows: int
    big_reserved_grows: int
    writer_grows: int
    writer_prefill: int
    writer_rounds: int
    observers: int


PLANS = {
    "full": Plan(mode="full", sizes=(10, 1_000, 100_000, 1_000_000), snapshot_s=0.3, copy_s=0.5,
                 manager_max=1_000_000, manager_list_s=3.0, manager_list_calls=2, grows=500,
                 big_reserved_grows=10, writer_grows=5_000, writer_prefill=100_000,
                 writer_rounds=5, observers=4),
    "quick": Plan(mode="quick", sizes=(10, 1_000, 100_000, 1_000_000), snapshot_s=0.08,
                  copy_s=0.15, manager_max=100_000, manager_list_s=1.0, manager_list_calls=1,
                  grows=100, big_reserved_grows=5, writer_grows=3_000, writer_prefill=100_000,
                  writer_rounds=2, observers=4),
    "tiny": Plan(mode="tiny", sizes=(10, 1_000, 10_000), snapshot_s=0.01, copy_s=0.02,
                 manager_max=10_000, manager_list_s=0.05, manager_list_calls=1, grows=10,
                 big_reserved_grows=2, writer_grows=200, writer_prefill=1_000, writer_rounds=1,
                 observers=2),
}


def run(quick: bool = False, *, tiny: bool = False,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark (``tiny``: seconds, for tests) and return every figure."""
    plan = PLANS["tiny" if tiny else "quick" if quick else "full"]
    say = log or (lambda _message: None)

    def measure_into(results: dict[str, Any]) -> None:
        results.update(index_figures(plan, say))
        say("grow() latency")
        results["grow"] = grow_figures(plan)
        say(f"writer grow() rate with {plan.observers} observers")
        results["writer"] = writer_figures(plan)

    return recorded("index", plan.mode, METHOD, measure_into, targets)


# -- snapshots, naive copies, iteration, memory, liveness (one heap) ---------------------


def index_figures(plan: Plan, say: Callable[[str], None]) -> dict[str, Any]:
    """Sections 1-3, 6 and 7, all on one heap whose index grows through ``plan.sizes``."""
    context = multiprocessing.get_context("spawn")
    with bench_heap("bidx", arena_size=64 << 10, max_arenas=1 << 21, reserve=False) as heap, \
            context.Manager() as manager:
        sizes = []
        for entries in plan.sizes:
            say(f"snapshots at {entries:,} entries")
            fill(heap, entries)
            sizes.append(size_figures(heap, entries, plan, manager))
        say("iteration and liveness overhead")
        return {"sizes": sizes, "iteration": iteration_figures(heap, plan),
                "liveness": liveness_figures(heap, plan)}


def fill(heap: Heap, entries: int, first_value: int = 1) -> None:
    """Append synthetic arena indices until the index holds ``entries``."""
    index = heap._index
    with heap.locked():
        _generation, length = index.header()
        for value in range(first_value + length, first_value + entries):
            index.append(value)


def uncached_snapshot(heap: Heap) -> Callable[[], object]:
    """What ``Heap.snapshot()`` does when the header word changed since its last call."""
    read_word, header, snapshot_of = heap._lock.read_word, heap._header, heap._index.snapshot_of
    return lambda: snapshot_of(read_word(header))


def naive_copy(heap: Heap, convert: Callable[[memoryview], T]) -> Callable[[], T]:
    """A snapshot the naive way: ``convert`` (copy) every entry while holding the heap lock."""
    lock, index = heap._lock, heap._index

    def copy_locked() -> T:
        generation, length = index.header()
        return convert(index.generation(generation)[:length])

    return lambda: lock.run(copy_locked)


def size_figures(heap: Heap, entries: int, plan: Plan, manager: SyncManager) -> dict[str, Any]:
    """Every snapshot figure at one index size, with the naive / shmheap ratios."""
    times = measure_interleaved(
        {"shmheap_unchanged": heap.snapshot, "shmheap_changed": uncached_snapshot(heap)},
        plan.snapshot_s, rounds=4)
    times |= measure_interleaved(
        {"naive_bytes": naive_copy(heap, bytes), "naive_list": naive_copy(heap, memoryview.tolist)},
        plan.copy_s)
    if entries <= plan.manager_max:
        proxy = manager.list(heap.snapshot().tolist())
        times["manager_slice"] = measure(lambda: proxy[:], plan.copy_s)
        times["manager_list"] = measure(lambda: list(proxy), plan.manager_list_s,
                                        min_batches=plan.manager_list_calls)
        del proxy
    shmheap_ns = times["shmheap_changed"].p50_ns
    return {
        "entries": entries,
        "latency": {kind: times[kind].as_dict() if kind in times else None
                    for kind in SNAPSHOT_KINDS},
        "ratio": {kind: times[kind].p50_ns / shmheap_ns if kind in times else None
                  for kind in NAIVE_KINDS},
        "memory": memory_figures(heap),
    }


def memory_figures(heap: Heap) -> dict[str, Any]:
    """Index bytes against entries and capacity; ``allocated`` is what tmpfs really holds."""
    info = heap.info()
    allocated = sum(segments.allocated_bytes(index_name(heap.name, generation))
                    for generation in range(info.index_generations))
    return {
        "index_len": info.index_len, "index_cap": info.index_cap,
        "index_generations": info.index_generations, "index_bytes": info.index_bytes,
        "allocated_bytes": allocated,
        "per_len": info.index_bytes / (info.index_len * 4),
        "per_cap": info.index_bytes / (info.index_cap * 4),
        "limit_bytes": 2 * info.index_cap * 4 + PAGE_SIZE,
    }


def iteration_figures(heap: Heap, plan: Plan) -> dict[str, Any]:
    """Entries per second through a snapshot: a Python loop, and numpy if installed."""
    snap = heap.snapshot()
    entries = len(snap)

    def python_loop() -> None:
        for _ in snap:
            pass

    python_ns = measure(python_loop, plan.copy_s).p50_ns
    numpy = optional_numpy()
    numpy_rate = None
    if numpy is not None:
        numpy_ns = measure(lambda: numpy.asarray(snap.view()).sum(), plan.copy_s).p50_ns
        numpy_rate = entries * 1e9 / numpy_ns
    return {"entries": entries, "python_per_s": entries * 1e9 / python_ns,
            "numpy_per_s": numpy_rate}


def bare_read_word(sem: posix_ipc.Semaphore) -> Callable[[memoryview], int]:
    """``HeapLock.read_word`` without the owner record: the liveness baseline."""
    acquire, release, busy = sem.acquire, sem.release, posix_ipc.BusyError

    def read_word(view: memoryview) -> int:
        try:
            acquire(0)
        except busy:
            acquire()
        word: int = view[0]
        release()
        return word

    return read_word


def liveness_figures(heap: Heap, plan: Plan) -> dict[str, Any]:
    """p50 of the lock's read_word (owner record written) against a bare semaphore."""
    assert heap._sem is not None
    times = measure_interleaved(
        {"read_word": functools.partial(heap._lock.read_word, heap._header),
         "baseline": functools.partial(bare_read_word(heap._sem), heap._header)},
        plan.snapshot_s, rounds=8)
    return {"read_word": times["read_word"].as_dict(), "baseline": times["baseline"].as_dict(),
            "ratio": times["read_word"].p50_ns / times["baseline"].p50_ns}


# -- grow() ------------------------------------------------------------------------------


def grow_figures(plan: Plan) -> list[dict[str, Any]]:
    """grow() latency and its floor for every (arena size, reserve) case, in alternating
    rounds (GROW_ROUNDS), so that both meet the same load."""
    rows = []
    for arena_size, reserve in GROW_CASES:
        calls = plan.big_reserved_grows if reserve and arena_size > MIB else plan.grows
        grow_ns: list[float] = []
        floor_ns: list[float] = []
        with bench_heap("bgrow", arena_size=arena_size, reserve=reserve) as heap, \
                raw_floor(arena_size, reserve, calls) as create:
            heap.grow()  # warm-up: maps the index generation
            create()
            for round_ in range(GROW_ROUNDS):
                batches = calls * (round_ + 1) // GROW_ROUNDS - calls * round_ // GROW_ROUNDS
                grow_ns += batch_means(heap.grow, batches, 1)
                floor_ns += batch_means(create, batches, 1)
        grow, floor = summarise(grow_ns, 1), summarise(floor_ns, 1)
        rows.append({"arena_size": arena_size, "reserve": reserve, "calls": calls,
                     "grow": grow.as_dict(), "floor": floor.as_dict(),
                     "above_floor_ns": grow.p50_ns - floor.p50_ns})
    return rows


@contextlib.contextmanager
def raw_floor(arena_size: int, reserve: bool, calls: int) -> Iterator[Callable[[], None]]:
    """A bare shm create + ftruncate (+ posix_fallocate) + mmap + close, callable ``calls``
    + 1 times; every file it made is removed at the exit."""
    size = segment_size(arena_size)
    stem = segments.path_of(f"{PREFIX}{unique_name('bfloor')}.f")
    paths = [f"{stem}{i}" for i in range(calls + 1)]
    maps: list[mmap.mmap] = []

    def create() -> None:
        fd = os.open(paths[len(maps)], os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            if reserve:
                os.posix_fallocate(fd, 0, size)
            maps.append(mmap.mmap(fd, size))
        finally:
            os.close(fd)

    try:
        yield create
    finally:
        for mapping in maps:
            mapping.close()
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


# -- writer with observers ---------------------------------------------------------------


def writer_figures(plan: Plan) -> dict[str, Any]:
    """Writer grow() rate alone and with each kind of observers, medians over rounds."""
    rates: dict[str, list[float]] = {design: [] for design in WRITER_DESIGNS}
    looks: dict[str, list[float]] = {design: [] for design in WRITER_DESIGNS[1:]}
    for _ in range(plan.writer_rounds):
        for design in WRITER_DESIGNS:
            rate, looks_per_s = writer_run(plan, design)
            rates[design].append(rate)
            if looks_per_s is not None:
                looks[design].append(looks_per_s)
    alone = statistics.median(rates["alone"])
    return {
        "grows": plan.writer_grows, "prefill": plan.writer_prefill,
        "observers": plan.observers, "rounds": plan.writer_rounds,
        "observer_reads": "numpy" if optional_numpy() is not None else "python",
        "alone_per_s": alone,
        "designs": {design: {"per_s": statistics.median(rates[design]),
                             "ratio": statistics.median(rates[design]) / alone,
                             "observer_looks_per_s": statistics.median(looks[design])}
                    for design in WRITER_DESIGNS[1:]},
        "rates": rates,
    }


def writer_run(plan: Plan, design: str) -> tuple[float, float | None]:
    """(grows per second, observer looks per second or None) of one writer run."""
    count = 0 if design == "alone" else plan.observers
    with bench_heap("bwriter", arena_size=MIB, reserve=False) as heap:
        fill(heap, plan.writer_prefill, SYNTHETIC_BASE)
        with Observers(heap.name, design, count) as observers:
            start = time.perf_counter_ns()
            for _ in range(plan.writer_grows):
                heap.grow()
            elapsed = time.perf_counter_ns() - start
    return plan.writer_grows * 1e9 / elapsed, observers.looks_per_s


def summer() -> Callable[[memoryview], int]:
    """Sum a uint32 view: through numpy if installed, else a Python loop."""
    numpy = optional_numpy()
    if numpy is None:
        return sum
    return lambda view: int(numpy.asarray(view).sum())


def observer_look(heap: Heap, design: str) -> Callable[[], int]:
    """One look: sum every entry of a snapshot, a naive copy, or a private copy (no lock)."""
    total = summer()
    if design == "shmheap":
        return lambda: total(heap.snapshot().view())
    if design == "private":
        private = memoryview(bytes(heap.snapshot().view())).cast("I")
        return lambda: total(private)
    copy = naive_copy(heap, bytes)
    return lambda: total(memoryview(copy()).cast("I"))


def observe(name: str, design: str, stop: Any, results: Any) -> None:
    """Observer process: look at heap ``name`` and sleep 1 ms until ``stop`` is set."""
    try:
        heap = Heap.attach(name)
    except BaseException as exc:
        results.put(("error", os.getpid(), repr(exc)))
        raise
    try:
        look = observer_look(heap, design)
        look()
        results.put(("ready", os.getpid(), 0.0))
        looks = 0
        start = time.monotonic()
        while not stop.is_set():
            look()
            looks += 1
            time.sleep(OBSERVER_SLEEP_S)
        results.put(("done", looks, time.monotonic() - start))
    except BaseException as exc:
        results.put(("error", os.getpid(), repr(exc)))
        raise
    finally:
        heap.close()


class Observers:
    """``count`` spawned observer processes of heap ``name`` for the ``with`` body.

    Entering returns once every observer has looked at the heap once; leaving
    stops them and sets ``looks_per_s`` (None without observers).
    """

    def __init__(self, name: str, design: str, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._results = context.Queue()
        self._processes = [
            context.Process(target=observe, args=(name, design, self._stop, self._results),
                            daemon=True)
            for _ in range(count)]
        self.looks_per_s: float | None = None

    def __enter__(self) -> Observers:
        try:
            for process in self._processes:
                process.start()
            for _ in self._processes:
                self._expect("ready")
        except BaseException:
            self._shut_down()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        try:
            if exc is None and self._processes:
                done = [self._expect("done") for _ in self._processes]
                self.looks_per_s = sum(looks / seconds for looks, seconds in done)
        finally:
            self._shut_down()

    def _expect(self, kind: str) -> tuple[float, float]:
        """The next message of ``kind`` from an observer; BenchError if one failed."""
        deadline = time.monotonic() + OBSERVER_TIMEOUT_S
        while True:
            try:
                message = self._results.get(timeout=OBSERVER_POLL_S)
                break
            except queue.Empty:
                self._check_alive(deadline)
        if message[0] != kind:
            raise BenchError(f"observer process {message[1]} failed: {message[2]}")
        return float(message[1]), float(message[2])

    def _check_alive(self, deadline: float) -> None:
        for process in self._processes:
            if process.exitcode:
                raise BenchError(f"observer process {process.pid} exited with code "
                                 f"{process.exitcode} before reporting")
        if time.monotonic() > deadline:
            raise BenchError(f"observer processes did not report within {OBSERVER_TIMEOUT_S} s")

    def _shut_down(self) -> None:
        self._stop.set()
        for process in self._processes:
            if process.pid is not None:
                process.join(10)
                if process.is_alive():
                    process.terminate()
                    process.join()
        self._results.close()


# -- targets, report, plot, command line -------------------------------------------------


def targets(results: dict[str, Any]) -> list[Target]:
    """Every figure that has a target, with its verdict."""
    sizes = results["sizes"]
    small, large = sizes[0], sizes[-1]
    found = []
    for row in sizes:
        for kind in SHMHEAP_KINDS:
            found.append(Target.of(f"{SNAPSHOT_KINDS[kind]} p50, {row['entries']:,} entries",
                                   row["latency"][kind]["p50_ns"], "<=", SNAPSHOT_P50_NS,
                                   fmt_ns))
    for kind in SHMHEAP_KINDS:
        flatness = large["latency"][kind]["p50_ns"] / small["latency"][kind]["p50_ns"]
        found.append(Target.of(
            f"{SNAPSHOT_KINDS[kind]} p50({large['entries']:,}) / p50({small['entries']:,})",
            flatness, "<=", FLATNESS, fmt_ratio))
    for kind in NAIVE_KINDS:
        if large["ratio"][kind] is not None:
            found.append(Target.of(f"{SNAPSHOT_KINDS[kind]} / shmheap, {large['entries']:,} "
                                   "entries", large["ratio"][kind], ">=", NAIVE_RATIO, fmt_ratio))
    found += iteration_targets(results["iteration"])
    found += grow_targets(results["grow"])
    found.append(Target.of(WRITER_TARGET, results["writer"]["designs"]["shmheap"]["ratio"], ">=",
                           OBSERVED_RATIO, fmt_ratio))
    for row in sizes:
        memory = row["memory"]
        found.append(Target.of(f"index bytes, {row['entries']:,} entries (2 x cap x 4 + page)",
                               memory["index_bytes"], "<=", memory["limit_bytes"],
                               lambda n: format_size(int(n))))
    found.append(Target.of("liveness: read_word / bare semaphore p50",
                           results["liveness"]["ratio"], "<=", LIVENESS_RATIO, fmt_ratio))
    return found


def iteration_targets(iteration: dict[str, Any]) -> list[Target]:
    entries = f"{iteration['entries']:,} entries"
    found = [Target.of(f"iterate in Python, {entries}", iteration["python_per_s"], ">=",
                       PYTHON_RATE, fmt_rate)]
    if iteration["numpy_per_s"] is not None:
        found.append(Target.of(f"iterate with numpy, {entries}", iteration["numpy_per_s"],
                               ">=", NUMPY_RATE, fmt_rate))
    return found


def grow_targets(rows: list[dict[str, Any]]) -> list[Target]:
    """grow() p50 of sparse arenas, and its ratio to the floor of the same rounds; reserved
    ones are bound by the kernel zeroing memory."""
    found = []
    for row in rows:
        if not row["reserve"]:
            found += [Target.of(grow_target_name(row), row["grow"]["p50_ns"], "<=", GROW_P50_NS,
                                fmt_ns),
                      Target.of(grow_target_name(row, ratio=True),
                                row["grow"]["p50_ns"] / row["floor"]["p50_ns"], "<=",
                                GROW_FLOOR_RATIO, fmt_ratio)]
    return found


def grow_target_name(row: dict[str, Any], ratio: bool = False) -> str:
    """The name of a sparse row's target: its p50, or (``ratio``) its p50 / the floor's."""
    return f"grow() {format_size(row['arena_size'])} sparse{' / floor' if ratio else ''}, p50"


def report(results: dict[str, Any], out: TextIO | None = None) -> None:
    """Print every figure of ``results`` as tables, each target next to its figure."""
    checks = {target["name"]: target for target in results["targets"]}
    print_heading(results, out)
    report_snapshots(results["sizes"], checks, out)
    report_naive(results["sizes"], checks, out)
    report_iteration(results["iteration"], checks, out)
    report_grow(results["grow"], checks, out)
    report_writer(results["writer"], checks, out)
    report_memory(results["sizes"], checks, out)
    report_liveness(results["liveness"], checks, out)
    print_missed(results, out)


def report_snapshots(sizes: list[dict[str, Any]], checks: dict[str, Any],
                     out: TextIO | None) -> None:
    rows = []
    for row in sizes:
        cells = [f"{row['entries']:,}"]
        for kind in SHMHEAP_KINDS:
            times = row["latency"][kind]
            cells += [fmt_ns(times["p50_ns"]), fmt_ns(times["p99_ns"]),
                      checked(checks, f"{SNAPSHOT_KINDS[kind]} p50, {row['entries']:,} entries")]
        rows.append(cells)
    small, large = sizes[0], sizes[-1]
    flat = [f"p50 {large['entries']:,} / {small['entries']:,}"]
    for kind in SHMHEAP_KINDS:
        name = (f"{SNAPSHOT_KINDS[kind]} p50({large['entries']:,}) / "
                f"p50({small['entries']:,})")
        flat += [fmt_ratio(checks[name]["value"]), "", checked(checks, name)]
    rows.append(flat)
    print_table(
        ["entries", "unchanged p50", "p99", "target", "changed p50", "p99", "target"],
        rows,
        title="1. Snapshot latency per call (p50/p99 over batches of up to 100 calls)",
        out=out)


def report_naive(sizes: list[dict[str, Any]], checks: dict[str, Any],
                 out: TextIO | None) -> None:
    rows = []
    for row in sizes:
        cells = [f"{row['entries']:,}"]
        for kind in NAIVE_KINDS:
            times, ratio = row["latency"][kind], row["ratio"][kind]
            target = checked(checks, f"{SNAPSHOT_KINDS[kind]} / shmheap, {row['entries']:,} "
                                     "entries") if row is sizes[-1] else ""
            cells += [fmt_ns(times and times["p50_ns"]), f"{fmt_ratio(ratio)} {target}".strip()]
        rows.append(cells)
    print_table(
        ["entries", "bytes copy", "ratio", "list copy", "ratio", "Manager proxy[:]",
         "ratio", "Manager list(proxy)", "ratio"],
        rows,
        title="2. Naive snapshots: p50 per call, and p50 / shmheap (header changed) p50",
        out=out)


def report_iteration(iteration: dict[str, Any], checks: dict[str, Any],
                     out: TextIO | None) -> None:
    entries = f"{iteration['entries']:,} entries"
    rows = [["Python: for x in snap", fmt_rate(iteration["python_per_s"]),
             checked(checks, f"iterate in Python, {entries}")],
            ["numpy.asarray(snap.view()).sum()", fmt_rate(iteration["numpy_per_s"]),
             checked(checks, f"iterate with numpy, {entries}") or "numpy not installed"]]
    print_table(
        ["how", "entries/s", "target"],
        rows,
        title=f"3. Iterating a snapshot of {entries} (entries/s)",
        out=out)


def report_grow(rows: list[dict[str, Any]], checks: dict[str, Any],
                out: TextIO | None) -> None:
    table = []
    for row in rows:
        table.append([format_size(row["arena_size"]), "yes" if row["reserve"] else "no",
                      str(row["calls"]), fmt_ns(row["grow"]["p50_ns"]),
                      fmt_ns(row["grow"]["p99_ns"]), fmt_ns(row["floor"]["p50_ns"]),
                      fmt_ns(row["floor"]["p99_ns"]), fmt_ns(row["above_floor_ns"]),
                      "(kernel zeroing)" if row["reserve"]
                      else "; ".join(filter(None, (checked(checks, grow_target_name(row, ratio))
                                                   for ratio in (False, True))))])
    print_table(
        ["arena", "reserve", "calls", "grow p50", "p99", "floor p50", "p99",
         "above floor", "target"],
        table,
        title="4. grow() latency per call; floor = bare create+ftruncate(+fallocate)+mmap+close",
        out=out)


def report_writer(writer: dict[str, Any], checks: dict[str, Any],
                  out: TextIO | None) -> None:
    rows = [["none", fmt_rate(writer["alone_per_s"]), "", "", ""]]
    for design, label in WRITER_LABELS.items():
        figures = writer["designs"][design]
        rows.append([f"{writer['observers']} {label}", fmt_rate(figures["per_s"]),
                     fmt_ratio(figures["ratio"]), fmt_rate(figures["observer_looks_per_s"]),
                     checked(checks, WRITER_TARGET) if design == "shmheap" else ""])
    print_table(
        ["observers", "grows/s", "vs none", "observer looks/s", "target"],
        rows,
        title=f"5. Writer grow() rate ({writer['grows']:,} grows on an index of "
              f"{writer['prefill']:,} entries, median of {writer['rounds']} rounds; observers "
              f"sum every entry with {writer['observer_reads']}, then sleep 1 ms)",
        out=out)


def report_memory(sizes: list[dict[str, Any]], checks: dict[str, Any],
                  out: TextIO | None) -> None:
    rows = []
    for row in sizes:
        memory = row["memory"]
        rows.append([f"{row['entries']:,}", f"{memory['index_cap']:,}",
                     str(memory["index_generations"]), format_size(memory["index_bytes"]),
                     format_size(memory["allocated_bytes"]), f"{memory['per_len']:.3g}",
                     f"{memory['per_cap']:.3g}",
                     checked(checks, f"index bytes, {row['entries']:,} entries "
                                     "(2 x cap x 4 + page)")])
    print_table(
        ["entries", "cap", "generations", "index_bytes", "allocated", "/ (len x 4)",
         "/ (cap x 4)", "target"],
        rows,
        title="6. Index memory (all generations; allocated = tmpfs blocks)",
        out=out)


def report_liveness(liveness: dict[str, Any], checks: dict[str, Any],
                    out: TextIO | None) -> None:
    rows = [[fmt_ns(liveness["read_word"]["p50_ns"]), fmt_ns(liveness["baseline"]["p50_ns"]),
             fmt_ratio(liveness["ratio"]),
             checked(checks, "liveness: read_word / bare semaphore p50")]]
    print_table(
        ["read_word p50", "bare p50", "ratio", "target"],
        rows,
        title="7. Liveness cost on the uncontended snapshot path: HeapLock.read_word vs "
              "sem.acquire(0); header[0]; sem.release()",
        out=out)


def figures(results: dict[str, Any]) -> list[Figure]:
    """Snapshot latency (p50) against index size: shmheap beside the naive ways and Manager."""
    series = {
        label: [(row["entries"], row["latency"][kind]["p50_ns"])
                for row in results["sizes"] if row["latency"][kind] is not None]
        for kind, label in SNAPSHOT_KINDS.items()}
    return [Figure("All-arenas index: a snapshot against copying the index (p50 per call)",
                   "index entries", "latency per call", series)]


def main(argv: list[str] | None = None) -> int:
    """``shmheap bench index``: run, print the tables, write JSON and a plot if asked."""
    return bench_main(argv, "index",
                      "Measure the all-arenas index: snapshots, naive copies, iteration, grow(), a "
                      "writer with observers, memory and liveness overhead.",
                      "plot snapshot latency against index size", sys.modules[__name__])
