"""``shmheap stress``: many processes grow and read one heap at once and check every entry.

A run creates a fresh heap and starts worker processes (fresh interpreters,
``multiprocessing`` spawn context), each in one role:

``writer``
    loops ``heap.grow()`` (one time in ``1/AT_EVERY`` it asks for a random
    index with ``grow(at=...)``, as Go's hints land anywhere, and counts the
    collisions), stamps the first 8 bytes of each new arena with its index
    (one aligned little-endian u64 store) and reports the indices it made.
    Writers are paced by default: together they fill the heap's ``max_arenas``
    evenly over the run, so growth (and kills in the middle of it) lasts the
    whole run; ``paced=False`` (``--flat-out``) grows as fast as it can.  The
    cap exists because every reader maps every arena, and each mapping costs a
    file descriptor (Python's mmap keeps one) and one of vm.max_map_count.
``reader``
    attached ``readonly=True``, loops ``heap.snapshot()`` and walks every
    entry: each snapshot must extend the previous one (published entries never
    change), hold no duplicate, and name arenas whose stamp is their index.  A
    stamp of 0 is allowed (its writer has not stamped it yet); any other wrong
    stamp is a violation.

With ``kill_rate`` the parent SIGKILLs a random worker that often and starts
a replacement; the heap lock adopts a dead holder's lock on its own.  After a
kill the parent runs ``heap.check()`` (at most once per ``CHECK_INTERVAL``,
and always at the end), counting every finding except what a kill
legitimately leaves before repair (``TOLERATED_AFTER_KILL``) as a violation.
A check holds the heap lock while it opens every arena, which shows in the
maximum latencies of such runs.

At the end the parent stops the workers, checks the heap once more, verifies
that the final snapshot holds every arena the writers reported (none lost)
with the right stamp, destroys the heap (always, in a ``finally``, even on
Ctrl-C), verifies that nothing of it is left in /dev/shm, and reports.  The
run fails (exit 1) on any violation, lost arena or leak.

Workers talk to the parent over one pipe each rather than a shared queue: a
worker SIGKILLed while writing to a shared queue would corrupt it for all,
while a torn message on its own pipe only ends that pipe.  The parent sends
``Go`` and ``"stop"``; a worker sends ``"ready"``, then the indices of the
arenas it made after every step that made one (so a SIGKILL loses at most the
arena of the step it interrupts), a ``WorkerReport`` with its cumulative
counters every ``REPORT_INTERVAL`` seconds, and a final one.

Test hook: with ``SHMHEAP_STRESS_BREAK_CHECK=1`` in the environment, readers
expect the stamp ``index + 1``, so every check of a stamped arena fails and
the run must exit 1.  It proves that the checker can fail.

Adding a role: a ``Role`` subclass (``kind``, ``readonly``, ``step()``), an
entry in ``ROLES`` and a count in ``StressConfig.roles()`` (plus its option).

This module owns the run: the roles, the parent's kill/respawn loop, the
statistics and the report.  It uses the heap only through the public API
(``Heap``, ``check()``, ``shmheap.destroy``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import resource
import secrets
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, ClassVar, TextIO

from . import segments
from .errors import (
    AddressSpaceExhaustedError,
    ArenaCollisionError,
    HeapNotFoundError,
    InvalidParameterError,
    OutOfSharedMemoryError,
    ShmHeapError,
)
from .heap import Heap, destroy
from .names import check_name, format_size, owns

if TYPE_CHECKING:
    from .cli import Subparsers

BREAK_ENV = "SHMHEAP_STRESS_BREAK_CHECK"
#: Seconds between a worker's reports.
REPORT_INTERVAL = 0.5
#: Seconds between refreshes of the live display (a plain line every PLAIN_EVERY).
REFRESH = 0.25
PLAIN_EVERY = 1.0
#: Least seconds between two mid-run checks after kills.
CHECK_INTERVAL = 1.0
#: Seconds to wait for workers to start, and to stop before they are killed.
START_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0
#: A writer asks for a random index once in this many grows.
AT_EVERY = 32
MAX_EXAMPLES = 5
RESERVOIR_SIZE = 1024
#: Cap on arenas: every reader maps each arena, and a process may have at most
#: vm.max_map_count (65530) mappings.
MAX_ARENAS_CAP = 32768
#: File descriptors a worker needs besides one per mapped arena (Python's mmap
#: keeps a duplicate descriptor for every mapping).
SPARE_FDS = 512
#: Findings that a SIGKILL legitimately leaves behind until the next repair.
TOLERATED_AFTER_KILL = frozenset({"dead-slots", "orphan-arena", "unpublished"})


# -- statistics ---------------------------------------------------------------------------


@dataclass
class Reservoir:
    """Latency samples: every ``stride``-th one, at most ``capacity``, plus count and max.

    When full, every other sample is dropped and the stride doubles, so the
    kept samples stay spread evenly over the whole run.
    """

    capacity: int = RESERVOIR_SIZE
    stride: int = 1
    count: int = 0
    maximum: int = 0
    samples: list[int] = field(default_factory=list)

    def add(self, value: int) -> None:
        self.count += 1
        self.maximum = max(self.maximum, value)
        if self.count % self.stride:
            return
        self.samples.append(value)
        if len(self.samples) >= self.capacity:
            self.samples = self.samples[1::2]
            self.stride *= 2


def latency_summary(reservoirs: Iterable[Reservoir]) -> dict[str, float | None]:
    """p50/p99/max in microseconds over several reservoirs (None if no samples).

    Each kept sample stands for ``stride`` samples, so it weighs that much.
    """
    reservoirs = list(reservoirs)
    weighted = sorted((v, r.stride) for r in reservoirs for v in r.samples)
    total = sum(weight for _, weight in weighted)

    def quantile(q: float) -> float | None:
        seen = 0
        for value, weight in weighted:
            seen += weight
            if seen >= q * total:
                return value / 1000
        return None

    maximum = max((r.maximum for r in reservoirs), default=0)
    return {"p50_us": quantile(0.50), "p99_us": quantile(0.99),
            "max_us": maximum / 1000 if weighted else None, "samples": len(weighted)}


@dataclass
class WorkerReport:
    """What a worker tells the parent.  Counters are cumulative; ``created`` is new arenas."""

    kind: str
    wid: int
    pid: int
    ops: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    violations: int = 0
    examples: list[str] = field(default_factory=list)
    latency: Reservoir = field(default_factory=Reservoir)
    #: arena indices created since the last step; sent and cleared after every step
    created: list[int] = field(default_factory=list)
    #: writer: why and when (time.monotonic) the heap stopped taking arenas
    full: str = ""
    full_at: float = 0.0
    #: the exception that ended the worker, "" if none
    error: str = ""
    final: bool = False

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def violate(self, text: str) -> None:
        self.violations += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(text)


# -- roles --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Go:
    """The parent's start signal: when the run started and how long it lasts."""

    started: float
    duration: float
    #: writers spread the heap's arenas evenly over the run instead of growing flat out
    paced: bool


class Role:
    """One worker's job: ``step()`` does one operation and records it in ``report``."""

    kind: ClassVar[str]
    readonly: ClassVar[bool]

    def __init__(self, heap: Heap, rng: random.Random, report: WorkerReport, go: Go) -> None:
        self.heap = heap
        self.rng = rng
        self.report = report
        self.go = go

    def step(self) -> float:
        """Do one operation; return seconds to pause before the next (inf: all done)."""
        raise NotImplementedError


class Writer(Role):
    kind = "writer"
    readonly = False

    def step(self) -> float:
        pause = self.ahead_of_schedule()
        if pause > 0:
            return pause
        at = None
        if self.rng.randrange(AT_EVERY) == 0:
            at = self.rng.randrange(1, self.heap.max_arenas)
        start = time.perf_counter_ns()
        try:
            arena = self.heap.grow(at=at)
        except ArenaCollisionError:
            self.report.count("collisions")
            return 0
        except (AddressSpaceExhaustedError, OutOfSharedMemoryError) as exc:
            self.report.full = str(exc)
            self.report.full_at = time.monotonic()
            return math.inf
        self.report.latency.add(time.perf_counter_ns() - start)
        stamp = arena.buf[:8].cast("Q")
        stamp[0] = arena.index
        stamp.release()
        self.report.ops += 1
        self.report.created.append(arena.index)
        return 0

    def ahead_of_schedule(self) -> float:
        """When paced: seconds until the heap is due its next arena (<= 0: grow now).

        The schedule fills the heap evenly over the run, so growth, and kills
        in the middle of it, go on for the whole run.
        """
        go = self.go
        if not go.paced:
            return 0
        due = len(self.heap.snapshot()) + 1
        return go.started + due * go.duration / (self.heap.max_arenas - 1) - time.monotonic()


class Reader(Role):
    kind = "reader"
    readonly = True

    def __init__(self, heap: Heap, rng: random.Random, report: WorkerReport, go: Go) -> None:
        super().__init__(heap, rng, report, go)
        self.previous = memoryview(b"").cast("I")
        #: arena index -> a one-element u64 view of its stamp
        self.stamps: dict[int, memoryview] = {}
        self.offset = 1 if os.environ.get(BREAK_ENV) == "1" else 0

    def step(self) -> float:
        start = time.perf_counter_ns()
        snapshot = self.heap.snapshot()
        self.report.latency.add(time.perf_counter_ns() - start)
        self.report.ops += 1
        entries = snapshot.view()
        previous = self.previous
        if len(entries) < len(previous) or entries[:len(previous)] != previous:
            self.report.violate(f"a snapshot of {len(entries)} entries does not extend the "
                                f"previous one of {len(previous)}")
        if len(set(entries)) != len(entries):
            self.report.violate(f"a snapshot of {len(entries)} entries has duplicates")
        self.check_stamps(entries)
        self.previous = entries
        self.report.count("entries", len(entries))
        return 0

    def check_stamps(self, entries: memoryview) -> None:
        stamps = self.stamps
        offset = self.offset
        unstamped = 0
        for index in entries:
            stamp = stamps.get(index)
            if stamp is None:
                stamp = self.map_stamp(index)
                if stamp is None:
                    continue
            value = stamp[0]
            if value == 0:
                unstamped += 1
            elif value != index + offset:
                self.report.violate(f"arena {index} is stamped {value}, expected "
                                    f"{index + offset}")
        self.report.count("unstamped", unstamped)

    def map_stamp(self, index: int) -> memoryview | None:
        try:
            stamp = self.heap.arena(index).buf[:8].cast("Q")
        except (KeyError, ShmHeapError) as exc:
            self.report.violate(f"arena {index} is in a snapshot but heap.arena({index}) "
                                f"raised {type(exc).__name__}: {exc}")
            return None
        self.stamps[index] = stamp
        return stamp


ROLES: dict[str, type[Role]] = {role.kind: role for role in (Writer, Reader)}


def arena_limit() -> int:
    """The most arenas a run can map in every process (its default ``max_arenas``)."""
    fds = segments.raise_descriptor_limit()
    if fds == resource.RLIM_INFINITY:
        return MAX_ARENAS_CAP
    return max(1, min(MAX_ARENAS_CAP, fds - SPARE_FDS))


def worker_main(kind: str, name: str, wid: int, seed: int, conn: Connection) -> None:
    """A worker process: attach, say ready, wait for go, step until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    segments.raise_descriptor_limit()
    report = WorkerReport(kind, wid, os.getpid())
    try:
        role_class = ROLES[kind]
        with Heap.attach(name, readonly=role_class.readonly) as heap:
            conn.send("ready")
            go = conn.recv()
            if isinstance(go, Go):
                _work(role_class(heap, random.Random(seed), report, go), report, conn)
    except Exception as exc:  # the worker's boundary: whatever ended it goes to the parent
        report.error = f"{type(exc).__name__}: {exc}"
    report.final = True
    conn.send(report)
    conn.close()


def _work(role: Role, report: WorkerReport, conn: Connection) -> None:
    """Step until the parent says stop (any message), reporting every REPORT_INTERVAL.

    New arenas are sent after every step, as a list of indices: a SIGKILL
    can then lose at most the one arena made in the step it interrupts.
    """
    next_report = time.monotonic() + REPORT_INTERVAL
    while True:
        pause = role.step()
        if report.created:
            conn.send(report.created)
            report.created.clear()
        now = time.monotonic()
        if now >= next_report or pause == math.inf:
            conn.send(report)
            next_report = now + REPORT_INTERVAL
        if conn.poll(None if pause == math.inf else max(pause, 0)):
            return


# -- the parent's side ----------------------------------------------------------------------


@dataclass
class Worker:
    """One worker process as the parent tracks it."""

    kind: str
    wid: int
    process: BaseProcess
    conn: Connection
    pid: int
    #: starting -> ready -> running -> done | killed | straggler | died
    state: str = "starting"
    report: WorkerReport | None = None
    created: list[int] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.state in ("starting", "ready", "running")

    def summary(self) -> dict[str, Any]:
        report = self.report
        return {"kind": self.kind, "wid": self.wid, "pid": self.pid,
                "state": self.state, "ops": report.ops if report else 0,
                "counters": dict(report.counters) if report else {},
                "arenas_created": len(self.created),
                "violations": report.violations if report else 0,
                "error": report.error if report else ""}


class Fleet:
    """The worker processes of a run: spawn, message, kill, stop."""

    def __init__(self, name: str, seed: int) -> None:
        self.name = name
        self.seed = seed
        self.context = get_context("spawn")
        self.workers: list[Worker] = []
        #: set once the run has started: a worker that becomes ready is sent it
        self.go: Go | None = None
        #: problems the parent saw with workers (they count as violations)
        self.problems: list[str] = []

    def spawn(self, kind: str) -> Worker:
        wid = len(self.workers)
        seed = random.Random(f"{self.seed}/{wid}").getrandbits(64)
        parent_end, child_end = self.context.Pipe()
        process = self.context.Process(target=worker_main, name=f"shmheap-stress-{kind}-{wid}",
                                       args=(kind, self.name, wid, seed, child_end), daemon=True)
        process.start()
        child_end.close()
        assert process.pid is not None
        worker = Worker(kind, wid, process, parent_end, process.pid)
        self.workers.append(worker)
        return worker

    def live(self) -> list[Worker]:
        return [w for w in self.workers if w.alive]

    def of_kind(self, kind: str) -> list[Worker]:
        return [w for w in self.workers if w.kind == kind]

    def poll(self, timeout: float) -> None:
        """Handle every message that arrives within ``timeout`` seconds."""
        by_conn = {w.conn: w for w in self.live()}
        if not by_conn:
            time.sleep(max(timeout, 0))
            return
        for conn in wait(list(by_conn), max(timeout, 0)):
            self._receive(by_conn[conn])  # type: ignore[index]

    def _receive(self, worker: Worker) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            self._ended(worker, "died")
            return
        if message == "ready":
            worker.state = "ready"
            if self.go is not None:
                self.send(worker, self.go)
            return
        self._record(worker, message)

    def _record(self, worker: Worker, message: WorkerReport | list[int]) -> None:
        if isinstance(message, list):
            worker.created.extend(message)
            return
        report = worker.report = message
        if report.error:
            self.problems.append(f"{worker.kind} {worker.wid} failed: {report.error}")
        if report.final:
            self._ended(worker, "done")

    def _ended(self, worker: Worker, state: str) -> None:
        worker.process.join(STOP_TIMEOUT)
        if state == "died":
            self.problems.append(f"{worker.kind} {worker.wid} died unexpectedly (exit code "
                                 f"{worker.process.exitcode})")
        worker.state = state
        self._release(worker)

    @staticmethod
    def _release(worker: Worker) -> None:
        """Close the pipe and, once the process is reaped, its process object.

        A run kills and respawns workers by the thousand: each would otherwise
        keep two descriptors (pipe end, process sentinel) in the parent.
        """
        worker.conn.close()
        if worker.process.exitcode is not None:
            worker.process.close()

    def send(self, worker: Worker, message: Go | str) -> None:
        try:
            worker.conn.send(message)
        except OSError:
            return  # it died; its EOF is handled when it is polled
        if isinstance(message, Go):
            worker.state = "running"

    def start(self, roles: dict[str, int], duration: float, paced: bool) -> float:
        """Spawn the first workers, wait until every one is ready, send go; return the start."""
        for kind, count in roles.items():
            for _ in range(count):
                self.spawn(kind)
        deadline = time.monotonic() + START_TIMEOUT
        while any(w.state == "starting" for w in self.workers):
            if time.monotonic() >= deadline:
                raise ShmHeapError(f"stress workers did not start within {START_TIMEOUT} s")
            self.poll(deadline - time.monotonic())
        self.go = Go(time.monotonic(), duration, paced)
        for worker in self.live():
            self.send(worker, self.go)
        return self.go.started

    def kill(self, worker: Worker, state: str = "killed") -> None:
        """SIGKILL ``worker``, keep every complete report it had sent."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGKILL)
        worker.process.join()
        while not worker.conn.closed and worker.conn.poll():
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):
                break
            if message != "ready":
                self._record(worker, message)
        if worker.alive:
            worker.state = state
            self._release(worker)

    def stop(self) -> None:
        """Tell every worker to stop, collect final reports, kill those that do not stop."""
        self.go = None
        for worker in self.live():
            self.send(worker, "stop")
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.live() and time.monotonic() < deadline:
            self.poll(deadline - time.monotonic())
        for worker in self.live():
            self.kill(worker, "straggler")

    def shutdown(self) -> None:
        """Kill whatever is still running (after an error or Ctrl-C)."""
        for worker in self.live():
            self.kill(worker, "straggler")


@dataclass(frozen=True)
class StressConfig:
    """The parameters of a run."""

    writers: int = 2
    readers: int = 2
    duration: float = 8.0
    arena_size: int = 64 << 10
    #: 0: as many as every process can map (``arena_limit()``)
    max_arenas: int = 0
    reserve: bool = False
    paced: bool = True
    seed: int = 0
    kill_rate: float = 0.0
    name: str = ""
    json_path: str = ""
    progress: bool = True

    def __post_init__(self) -> None:
        if self.writers < 0 or self.readers < 0 or self.writers + self.readers == 0:
            raise InvalidParameterError(
                f"--writers {self.writers} --readers {self.readers}: counts must be >= 0 and "
                "at least one worker is needed")
        if not 0 < self.duration < math.inf:
            raise InvalidParameterError(f"--duration {self.duration}: give a positive number "
                                        "of seconds")
        if not 0 <= self.kill_rate < math.inf:
            raise InvalidParameterError(f"--kill-rate {self.kill_rate}: give kills per second "
                                        ">= 0")
        limit = arena_limit()
        if not 0 <= self.max_arenas <= limit:
            raise InvalidParameterError(
                f"--max-arenas {self.max_arenas}: every process maps every arena, and that "
                f"needs one file descriptor and one mapping each; use 1 to {limit} (or raise "
                "`ulimit -n`)")
        if not self.max_arenas:
            object.__setattr__(self, "max_arenas", limit)
        if self.name:
            check_name(self.name)

    def roles(self) -> dict[str, int]:
        return {"writer": self.writers, "reader": self.readers}


class StressRun:
    """One run: create the heap, run the fleet, kill and check, verify, report."""

    def __init__(self, config: StressConfig) -> None:
        self.config = config
        self.name = config.name or f"stress-{os.getpid()}-{secrets.token_hex(3)}"
        self.rng = random.Random(config.seed)
        self.fleet = Fleet(self.name, config.seed)
        self.kills = 0
        self.checks = 0
        self.findings: list[dict[str, object]] = []
        #: violations the parent found itself
        self.violations: list[str] = []
        self.started = 0.0
        self.elapsed = 0.0

    def violate(self, text: str) -> None:
        self.violations.append(text)

    def run(self) -> dict[str, Any]:
        """Do the whole run and return the report; the heap is destroyed in any case."""
        config = self.config
        heap = Heap.create(self.name, arena_size=config.arena_size,
                           max_arenas=config.max_arenas + 1, reserve=config.reserve)
        try:
            with _Display(config.progress) as show:
                self.started = self.fleet.start(config.roles(), config.duration, config.paced)
                self._run_phase(heap, show)
                self.elapsed = time.monotonic() - self.started
                self.fleet.stop()
            final = self._verify(heap)
        finally:
            self.fleet.shutdown()
            heap.close()
            with contextlib.suppress(HeapNotFoundError):
                destroy(self.name)
        leaks = [entry for entry in segments.list_all() if owns(self.name, entry)]
        return self._report(final, leaks)

    def _run_phase(self, heap: Heap, show: _Display) -> None:
        config = self.config
        end = self.started + config.duration
        next_kill = self._next_kill(self.started)
        next_refresh = self.started
        check_pending = False
        last_check = -math.inf
        while (now := time.monotonic()) < end:
            if now >= next_kill:
                self._kill_one()
                check_pending = True
                next_kill = self._next_kill(now)
            if check_pending and now - last_check >= CHECK_INTERVAL:
                self._check(heap)
                check_pending = False
                last_check = time.monotonic()
            if now >= next_refresh:
                show(self._progress_line(heap, now))
                next_refresh = now + REFRESH
            self.fleet.poll(min(end, next_kill, next_refresh) - time.monotonic())

    def _next_kill(self, now: float) -> float:
        rate = self.config.kill_rate
        return now + self.rng.expovariate(rate) if rate > 0 else math.inf

    def _kill_one(self) -> None:
        running = [w for w in self.fleet.workers if w.state == "running"]
        if not running:
            return
        victim = self.rng.choice(running)
        self.fleet.kill(victim)
        self.kills += 1
        self.fleet.spawn(victim.kind)

    def _check(self, heap: Heap) -> None:
        """Run ``heap.check()``; findings a kill does not explain are violations."""
        self.checks += 1
        tolerated = TOLERATED_AFTER_KILL if self._anyone_killed() else frozenset()
        try:
            findings = heap.check()
        except ShmHeapError as exc:
            self.violate(f"heap.check() failed: {exc}")
            return
        for finding in findings:
            self.findings.append(finding.as_dict())
            if finding.code not in tolerated:
                self.violate(f"check: {finding.code}: {finding.message}")

    def _anyone_killed(self) -> bool:
        return any(w.state in ("killed", "straggler", "died") for w in self.fleet.workers)

    def _verify(self, heap: Heap) -> dict[str, Any]:
        """The final check: findings, lost arenas, stamps, counts."""
        self._check(heap)
        try:
            return self._verify_contents(heap)
        except ShmHeapError as exc:
            self.violate(f"final verification failed: {exc}")
            return {"final_arenas": 0, "arenas_lost": 0, "unaccounted_arenas": 0,
                    "unstamped_arenas": 0, "index_generations": 0, "index_bytes": 0,
                    "recoveries": 0, "repairs": 0}

    def _verify_contents(self, heap: Heap) -> dict[str, Any]:
        final = heap.snapshot().tolist()
        in_final = set(final)
        if len(in_final) != len(final):
            self.violate(f"the final snapshot lists {len(final) - len(in_final)} arenas twice")
        reported = [i for w in self.fleet.of_kind("writer") for i in w.created]
        if len(set(reported)) != len(reported):
            self.violate("two writers reported creating the same arena")
        lost = sorted(set(reported) - in_final)
        if lost:
            self.violate(f"{len(lost)} arenas reported created are not in the final snapshot, "
                         f"e.g. {lost[:5]}")
        unstamped = 0
        for index in final:
            stamp = int.from_bytes(heap.arena(index).buf[:8], "little")
            if stamp == 0:
                unstamped += 1
            elif stamp != index:
                self.violate(f"final walk: arena {index} is stamped {stamp}")
        grows = self._totals("writer")["ops"]
        if not self._anyone_killed() and (unstamped or not grows == len(reported) == len(final)):
            self.violate(f"no worker was killed, yet writers counted {grows} grows and reported "
                         f"{len(reported)} arenas, the final snapshot has {len(final)}, "
                         f"{unstamped} unstamped")
        info = heap.info()
        return {"final_arenas": len(final), "arenas_lost": len(lost),
                "unaccounted_arenas": len(final) - len(reported), "unstamped_arenas": unstamped,
                "index_generations": info.index_generations, "index_bytes": info.index_bytes,
                "recoveries": info.recoveries, "repairs": info.repairs}

    def _totals(self, kind: str) -> dict[str, Any]:
        workers = self.fleet.of_kind(kind)
        reports = [w.report for w in workers if w.report is not None]
        ops = sum(r.ops for r in reports)
        counters: dict[str, int] = {}
        for report in reports:
            for key, value in report.counters.items():
                counters[key] = counters.get(key, 0) + value
        seconds = self.elapsed or (time.monotonic() - self.started) or 1.0
        return {"workers": self.config.roles()[kind], "incarnations": len(workers), "ops": ops,
                "ops_per_s": ops / seconds, "counters": counters,
                "latency": latency_summary(r.latency for r in reports),
                "violations": sum(r.violations for r in reports)}

    def _arenas_reported(self) -> int:
        return sum(len(w.created) for w in self.fleet.of_kind("writer"))

    def _worker_violations(self) -> tuple[int, list[str]]:
        count = 0
        examples = []
        for worker in self.fleet.workers:
            if worker.report is not None:
                count += worker.report.violations
                examples += [f"{worker.kind} {worker.wid}: {e}" for e in worker.report.examples]
        return count, examples

    def _progress_line(self, heap: Heap, now: float) -> str:
        readers = self._totals("reader")
        violations = self._worker_violations()[0] + len(self.violations)
        grows = self._arenas_reported()
        return (f"stress {self.name}  {now - self.started:5.1f}/{self.config.duration:g} s  "
                f"arenas {len(heap.snapshot())}  grows {grows} "
                f"({grows / max(now - self.started, 1e-3):.0f}/s)  snapshots {readers['ops']} "
                f"({readers['counters'].get('entries', 0)} entries)  kills {self.kills}  "
                f"violations {violations}")

    def _report(self, final: dict[str, Any], leaks: list[str]) -> dict[str, Any]:
        worker_count, worker_examples = self._worker_violations()
        problems = self.fleet.problems
        violations = worker_count + len(self.violations) + len(problems)
        full_at = [w.report.full_at for w in self.fleet.of_kind("writer")
                   if w.report is not None and w.report.full]
        report: dict[str, Any] = {
            "name": self.name, "config": asdict(self.config), "duration_s": self.elapsed,
            "roles": {kind: self._totals(kind) for kind in self.config.roles()},
            "arenas_created": self._arenas_reported(),
            "heap_full_after_s": min(full_at) - self.started if full_at else None,
            "kills": self.kills,
            "stragglers": sum(w.state == "straggler" for w in self.fleet.workers),
            "checks": self.checks, "findings": self.findings,
            "violations": violations,
            "violation_examples": (problems + self.violations + worker_examples)[:20],
            "leaks": leaks, "workers": [w.summary() for w in self.fleet.workers],
            **final,
        }
        report["ok"] = not violations and not final["arenas_lost"] and not leaks
        return report


# -- display ----------------------------------------------------------------------------------


class _Display:
    """``with _Display(enabled) as show: show(line)``: the live progress line.

    On a terminal with rich installed the line is redrawn in place; otherwise
    a plain line is printed every PLAIN_EVERY seconds.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.live: Any = None
        self.text: Any = None
        self.last_plain = -math.inf
        if enabled and sys.stdout.isatty():
            try:
                from rich.live import Live
                from rich.text import Text
            except ImportError:
                return
            self.live = Live("", refresh_per_second=1 / REFRESH, transient=True)
            self.text = Text
            self.live.start()

    def __call__(self, line: str) -> None:
        if not self.enabled:
            return
        if self.live is not None:
            self.live.update(self.text(line, no_wrap=True, overflow="ellipsis"))
        elif time.monotonic() - self.last_plain >= PLAIN_EVERY:
            self.last_plain = time.monotonic()
            print(line, flush=True)

    def __enter__(self) -> _Display:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.stop()


# -- the summary and the command --------------------------------------------------------------


def _us(latency: dict[str, float | None]) -> str:
    values = [latency[key] for key in ("p50_us", "p99_us", "max_us")]
    return " / ".join("-" if v is None else f"{v:.1f}" for v in values) + " µs"


def summary_rows(report: dict[str, Any]) -> Iterator[tuple[str, object]]:
    """(metric, value) rows of the summary table."""
    writer, reader = report["roles"]["writer"], report["roles"]["reader"]
    config = report["config"]
    yield "heap", (f"{report['name']} (seed {config['seed']}, arenas of "
                   f"{format_size(config['arena_size'])}, at most {config['max_arenas']})")
    yield "duration", f"{report['duration_s']:.2f} s"
    yield "writers", f"{writer['workers']} ({writer['incarnations']} processes)"
    yield "grows/s", f"{writer['ops_per_s']:.0f}" + (" (paced)" if config["paced"] else "")
    yield "grow latency p50/p99/max", _us(writer["latency"])
    yield "grow collisions (at=)", writer["counters"].get("collisions", 0)
    yield "readers", f"{reader['workers']} ({reader['incarnations']} processes)"
    yield "snapshots/s", f"{reader['ops_per_s']:.0f}"
    yield "snapshot latency p50/p99/max", _us(reader["latency"])
    yield "snapshots taken", reader["ops"]
    yield "entries checked", reader["counters"].get("entries", 0)
    yield "arenas created", report["arenas_created"]
    yield "final snapshot", f"{report['final_arenas']} arenas"
    full = report["heap_full_after_s"]
    yield "heap full after", "-" if full is None else f"{full:.2f} s"
    yield "index generations", report["index_generations"]
    yield "kills / stragglers", f"{report['kills']} / {report['stragglers']}"
    yield "lock recoveries", report["recoveries"]
    yield "checks run", report["checks"]
    yield "violations", report["violations"]
    yield "arenas lost", report["arenas_lost"]
    yield "leaks", len(report["leaks"])
    yield "result", "OK" if report["ok"] else "FAILED"


def add_stress(sub: Subparsers) -> None:
    from .cli import size_arg

    parser = sub.add_parser("stress", help="run writers and readers against one heap and "
                            "check every entry")
    parser.add_argument("--writers", type=int, default=2, help="writer processes (default 2)")
    parser.add_argument("--readers", type=int, default=2, help="reader processes (default 2)")
    parser.add_argument("--duration", type=float, default=8.0,
                        help="seconds to run (default 8)")
    parser.add_argument("--arena-size", type=size_arg, default=64 << 10,
                        help="bytes per arena (default 64KiB)")
    parser.add_argument("--max-arenas", type=int, default=0,
                        help="stop growing at this many arenas (default: as many as every "
                        f"process can map, at most {MAX_ARENAS_CAP})")
    parser.add_argument("--reserve", action="store_true",
                        help="reserve each arena's memory (default: sparse arenas)")
    parser.add_argument("--flat-out", action="store_true",
                        help="writers grow as fast as they can (default: paced, filling the "
                        "heap evenly over the run, so that growth lasts the whole run)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed for every random choice (default: random, printed)")
    parser.add_argument("--kill-rate", type=float, default=0.0,
                        help="SIGKILL this many random workers per second (default 0)")
    parser.add_argument("--json", metavar="FILE", default="", help="write the report as JSON")
    parser.add_argument("--name", default="", help="heap name (default: a unique one)")
    parser.add_argument("--no-progress", action="store_true", help="no live progress line")
    parser.set_defaults(run=run_stress)


def run_stress(args: argparse.Namespace) -> int:
    from .cli import print_table

    config = StressConfig(
        writers=args.writers, readers=args.readers, duration=args.duration,
        arena_size=args.arena_size, max_arenas=args.max_arenas, reserve=args.reserve,
        paced=not args.flat_out,
        seed=args.seed if args.seed is not None else secrets.randbits(32),
        kill_rate=args.kill_rate, name=args.name, json_path=args.json,
        progress=not args.no_progress)
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(_open_report(config.json_path)) if config.json_path else None
        report = StressRun(config).run()
        print_table(("metric", "value"), summary_rows(report))
        for example in report["violation_examples"]:
            print(f"violation: {example}")
        if out is not None:
            json.dump(report, out, indent=2, default=str)
    return 0 if report["ok"] else 1


def _open_report(path: str) -> TextIO:
    """Open the --json file before the run, so a bad path fails before any work."""
    try:
        return open(path, "w")
    except OSError as exc:
        raise InvalidParameterError(f"--json {path}: cannot write it ({exc.strerror})") from None
