"""The objects benchmark (``shmheap bench objects``): a Python value handed to another process.

One run measures, in alternating rounds (so that a busy machine's drift hits
every way alike), the time from a value in this process to the same value
usable in a spawned consumer, which answers on a ``multiprocessing.Pipe``:

* ``shmheap``: ``ref = heap.put(value)``, the ref sent, the consumer's
  ``heap.get(ref)``; then ``heap.free(ref)``;
* ``pipe``: the value itself sent through the pipe (pickled, copied through
  the kernel, unpickled);
* ``shared_memory``: a ``SharedMemory`` segment created and filled (an
  array's bytes, or a small value's pickle), its name sent, the consumer
  attaching and viewing the array (or unpickling); then close and unlink;
* ``Manager().dict()``: ``d[key] = value``, the consumer's ``d[key]`` (the
  manager's server process in between).

Every way pays the same pipe round trip for its message and answer.  The
values: a small dict, a 1 MiB and a 64 MiB float64 array (64 KiB and 1 MiB
in the tiny run).  The consumer checks what it got (the dict equal, an
array's first and last items), so nothing is timed half-done; arrays from
``shmheap`` and ``shared_memory`` are views, the others copies.  It also
times ``put + get + free`` of the small dict in one process beside
``pickle.dumps + loads`` (the floor: what pickling costs).

The heap and segments it makes have unique names and are removed in ``finally``.
"""

from __future__ import annotations

import multiprocessing
import pickle
import statistics
import sys
import time
from collections.abc import Callable
from multiprocessing import shared_memory
from typing import Any, TextIO

from ...heap import Heap
from ..display import fmt_ns, fmt_ratio, format_size, print_table
from .common import (
    BenchError,
    Figure,
    Target,
    bench_heap,
    bench_main,
    import_extra,
    measure_interleaved,
    print_heading,
    print_missed,
    recorded,
)

WAYS = ("shmheap", "pipe", "shared_memory", "manager")
SMALL = {"id": 12345, "name": "a small record", "tags": ["x", "y", "z"], "score": 0.75,
         "nested": {"ok": True, "n": None}}
#: Target: put + get + free of a small dict within this many times pickle.dumps + loads.
SMALL_RATIO = 10.0

METHOD = (
    "hand-over = from the producer's call to the consumer's answer on a multiprocessing.Pipe, "
    "the consumer (spawned, started before timing) having got the value and checked it; "
    "shmheap = put + send ref + get (+ free after the answer); pipe = send(value); "
    "shared_memory = SharedMemory(create) + copy + send name + attach + view (or loads) "
    "(+ close/unlink after); manager = Manager().dict()[key] = value + consumer's d[key]; "
    "median of alternating rounds.",
    "in one process: put + get + free of the small dict beside pickle.dumps + loads of it; "
    "median of batches.",
)


def consumer(conn: Any, heap_name: str, shared: Any) -> None:
    """The spawned consumer: answers each (way, payload) with what it got, None ends it."""
    numpy = import_extra("numpy", "numpy", "the objects benchmark")
    with Heap.attach(heap_name) as heap:
        conn.send("ready")
        while (task := conn.recv()) is not None:
            way, payload = task
            if way == "shmheap":
                value = heap.get(payload)
            elif way == "pipe":
                value = payload
            elif way == "manager":
                value = shared["value"]
            else:  # shared_memory: (segment name, bytes, "array" or "pickle")
                segment = shared_memory.SharedMemory(payload[0])
                buf = segment.buf
                assert buf is not None
                if payload[2] == "array":
                    value = numpy.ndarray((payload[1] // 8,), numpy.float64, buffer=buf)
                else:
                    value = pickle.loads(buf[:payload[1]])
                del buf
            conn.send(_summary(value))
            del value
            if way == "shared_memory":
                segment.close()


def _summary(value: Any) -> object:
    """What the consumer answers: the value if small, an array's first and last items."""
    if isinstance(value, dict):
        return value
    return (float(value[0]), float(value[-1]), len(value))


class Ways:
    """The producer's side of each way, over one consumer."""

    def __init__(self, heap: Heap, conn: Any, shared: Any) -> None:
        self.heap, self.conn, self.shared = heap, conn, shared

    def ask(self, way: str, payload: object, expected: object) -> None:
        self.conn.send((way, payload))
        got = self.conn.recv()
        if got != expected:
            raise BenchError(f"objects bench: the consumer got {got!r} by {way}, not "
                             f"{expected!r}")

    def shmheap(self, value: Any, expected: object) -> float:
        start = time.perf_counter()
        ref = self.heap.put(value)
        self.ask("shmheap", ref, expected)
        took = time.perf_counter() - start
        self.heap.free(ref)
        return took

    def pipe(self, value: Any, expected: object) -> float:
        start = time.perf_counter()
        self.ask("pipe", value, expected)
        return time.perf_counter() - start

    def shared_memory(self, value: Any, expected: object) -> float:
        start = time.perf_counter()
        if isinstance(value, dict):
            data: Any = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
            kind = "pickle"
        else:
            data, kind = memoryview(value).cast("B"), "array"
        segment = shared_memory.SharedMemory(create=True, size=max(1, len(data)))
        try:
            buf = segment.buf
            assert buf is not None
            buf[:len(data)] = data
            del buf
            self.ask("shared_memory", (segment.name, len(data), kind), expected)
            took = time.perf_counter() - start
        finally:
            segment.close()
            segment.unlink()
        return took

    def manager(self, value: Any, expected: object) -> float:
        start = time.perf_counter()
        self.shared["value"] = value
        self.ask("manager", None, expected)
        return time.perf_counter() - start


def hand_overs(values: dict[str, Any], rounds: int, say: Callable[[str], None]
               ) -> dict[str, Any]:
    """Median seconds of each way for each value, over ``rounds`` alternating rounds."""
    largest = max(getattr(value, "nbytes", 0) for value in values.values())
    arena = 1 << max(20, (largest + (1 << 20)).bit_length())
    context = multiprocessing.get_context("spawn")
    with bench_heap("bobj", arena_size=arena, reserve=False) as heap, \
            context.Manager() as manager:
        shared = manager.dict()
        ours, theirs = context.Pipe()
        worker = context.Process(target=consumer, args=(theirs, heap.name, shared), daemon=True)
        worker.start()
        theirs.close()
        try:
            if ours.recv() != "ready":
                raise BenchError("objects bench: the consumer did not start")
            ways = Ways(heap, ours, shared)
            seconds: dict[str, dict[str, list[float]]] = {
                label: {way: [] for way in WAYS} for label in values}
            for label, value in values.items():
                say(f"hand-over of {label}")
                expected = _summary(value)
                for round_ in range(rounds + 1):
                    for way in WAYS:
                        took = getattr(ways, way)(value, expected)
                        if round_:  # round 0 warms every way up (first mapping, first attach)
                            seconds[label][way].append(took)
            ours.send(None)
            worker.join(60)
        finally:
            if worker.is_alive():
                worker.kill()
                worker.join()
            ours.close()
    return {label: {"median_s": {way: statistics.median(times) for way, times in by_way.items()},
                    "rounds": rounds}
            for label, by_way in seconds.items()}


def in_process(budget_s: float) -> dict[str, Any]:
    """Median ns of put + get + free of SMALL, and of pickle.dumps + loads of it."""
    with bench_heap("bobjs", arena_size=1 << 20, reserve=False) as heap:
        put, get, free = heap.put, heap.get, heap.free
        dumps, loads = pickle.dumps, pickle.loads
        protocol = pickle.HIGHEST_PROTOCOL

        def ours() -> None:
            ref = put(SMALL)
            get(ref)
            free(ref)

        def floor() -> None:
            loads(dumps(SMALL, protocol))

        latency = measure_interleaved({"shmheap": ours, "pickle": floor}, budget_s, rounds=5)
    p50 = {key: value.p50_ns for key, value in latency.items()}
    return {"shmheap_p50_ns": p50["shmheap"], "pickle_p50_ns": p50["pickle"],
            "ratio": p50["shmheap"] / p50["pickle"]}


def run(quick: bool = False, *, tiny: bool = False,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    say = log or (lambda message: None)
    numpy = import_extra("numpy", "numpy", "the objects benchmark")
    sizes = (64 << 10, 1 << 20) if tiny else (1 << 20, 64 << 20)
    rounds = 2 if tiny else 5 if quick else 15

    def measure_into(results: dict[str, Any]) -> None:
        values: dict[str, Any] = {"small dict": SMALL}
        for size in sizes:
            values[f"{format_size(size)} array"] = numpy.arange(size // 8, dtype=numpy.float64)
        results["hand_over"] = hand_overs(values, rounds, say)
        results["sizes"] = list(values)
        say("put + get + free in one process")
        results["in_process"] = in_process(0.3 if tiny else 1.0 if quick else 3.0)

    mode = "tiny" if tiny else "quick" if quick else "full"
    return recorded("objects", mode, METHOD, measure_into, targets)


def targets(results: dict[str, Any]) -> list[Target]:
    local = results["in_process"]
    return [Target.of("put + get + free of a small dict / pickle.dumps + loads",
                      local["ratio"], "<=", SMALL_RATIO, fmt_ratio)]


def report(results: dict[str, Any], out: TextIO | None = None) -> None:
    print_heading(results, out)
    rows = []
    for label in results["sizes"]:
        med = results["hand_over"][label]["median_s"]
        rows.append([label, *(fmt_ns(med[way] * 1e9) for way in WAYS),
                     *(fmt_ratio(med[way] / med["shmheap"]) for way in WAYS[1:])])
    print_table(["value", *WAYS, *(f"{way} / shmheap" for way in WAYS[1:])], rows,
                title="Handing a value to another process (median)", out=out)
    local = results["in_process"]
    print_table(["figure", "shmheap", "peer", "peer's", "ratio"],
                [["small dict in one process, p50", fmt_ns(local["shmheap_p50_ns"]),
                  "pickle.dumps + loads", fmt_ns(local["pickle_p50_ns"]),
                  fmt_ratio(local["ratio"])]],
                title="put + get + free beside pickling", out=out)
    print_missed(results, out)


def figures(results: dict[str, Any]) -> list[Figure]:
    """One panel: each way's hand-over time for each value (x: the values, in order)."""
    labels = results["sizes"]
    xs = {label: 10.0 ** i for i, label in enumerate(labels)}
    series = {way: [(xs[label], results["hand_over"][label]["median_s"][way] * 1e9)
                    for label in labels] for way in WAYS}
    names = {value: label for label, value in xs.items()}
    return [Figure("objects: a value handed to another process (shmheap beside its peers)",
                   "value", "time", series, x_format=lambda x: names.get(x, ""))]


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, "objects", __doc__ or "", "draw the hand-over times",
                      sys.modules[__name__])
