"""``shmheap stress``: many processes grow, allocate in and read one heap at once, checking it all.

A run creates a fresh heap and starts worker processes: writers, churners,
readers and movers, whose roles and checks are in stress_roles.py.  Workers fork
from a warm ``multiprocessing`` forkserver that has imported shmheap
(``warm_forkserver``), so starting a worker costs a fork, not a fresh
interpreter and shmheap's import (over 100 ms of CPU); the summary gives
each replacement's start to first operation (``--mix``'s pure-Python
workers are still spawned: the forkserver has imported the parent's core).
Each worker counts its operations and checks in its slot of a shared tally
(stress_tally.py) as it does them, so a worker killed after a few operations
still counts what it did.

With ``kill_rate`` kills fall due at the times of a Poisson process of that
rate; each SIGKILLs a random worker that has begun its first operation and
starts a replacement at once (the killed one is reaped, its last messages
read and its slot freed, when its process is gone).  A kill due while no
worker is working waits, and a late kill is made as soon as it can be, so a
run kills at the asked rate or its summary says how far short and why.  The
heap lock adopts a dead holder's lock on its own, and a dead churner's
cached spans are reclaimed by the allocator.  After kills the parent takes
the heap lock as a writer (which repairs whatever the journal says a killed
worker left unfinished, as any worker's next lock would) and then runs
``heap.check()`` (at most once per ``CHECK_INTERVAL`` and for at most
``CHECK_SHARE`` of the time, and always at the end), counting every finding
but those a kill legitimately leaves (``TOLERATED_AFTER_KILL``) as a
violation.  With each such check, and once more at the end while the
workers still run, the parent frees what killed workers owned with
``heap.reclaim()`` (``_reclaim``: churners adopt each object handed to them,
and the parent first adopts those in flight from a dead churner to a live
one, so that no reclaim frees an object a live worker is about to use).  A
check runs in pieces, each lock-free first and locked only to confirm what
looks wrong (repair.py), so it does not stall the workers.

At the end the parent stops the workers (it sets the heap's stop event, which
each worker looks at after every step, and says stop on their pipes, which
wakes those that pause), checks the heap once more, verifies
that the final snapshot holds every arena the writers reported and that
each still has its segment (none lost), that every stamp is right and that
the objects live in the heap are exactly those the workers that stopped
normally hold (their final reports list them), each with its pattern;
objects that only killed workers could hold and that no reclaim freed are
counted, not blamed.  Then it destroys the heap
(always, in a ``finally``, even on Ctrl-C), verifies that nothing of it is
left in /dev/shm, and reports.

The verdict is earned: the run FAILS (exit 1) on any violation, lost arena
or leak; else a run that did less than a coverage floor (``FLOORS``: grows,
objects verified, snapshots and entries checked, per second of the run;
with ``kill_rate`` also ``KILL_FLOOR`` of the kills due) is INCONCLUSIVE
(exit ``EXIT_INCONCLUSIVE``); else it is OK.  Ctrl-C stops the run, kills
the workers, destroys the heap and prints the figures counted so far
(INTERRUPTED, exit 130).

This module owns the run: the parent's fleet of workers and its relay of
handoffs, the kill/respawn loop, the final verification, the verdict, the
live display, the summary and the ``shmheap stress`` command.  It uses the
heap only through the public API (``Heap``, ``walk``, ``check()``,
``adopt``/``reclaim``, ``shmheap.destroy``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import queue
import random
import secrets
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from multiprocessing import forkserver, get_context
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, TextIO

from .. import core, segments
from ..coord import Queue
from ..errors import (
    HeapNotFoundError,
    InvalidParameterError,
    InvalidRefError,
    ShmHeapError,
)
from ..heap import Heap, destroy
from ..names import arena_name, check_max_arenas, check_name, owns, usable_arenas
from .args import (
    Subparsers,
    UsageError,
    arena_size_arg,
    at_least,
    factor_arg,
    heap_name,
    rate_arg,
    seconds_arg,
)
from .display import Live, format_size, print_table
from .interrupt import LATENCY, CtrlC
from .stress_roles import (
    DONE_QUEUE,
    ROLES,
    STAMP_MAGIC,
    STOP_EVENT,
    WORK_QUEUE,
    Go,
    Handoff,
    WorkerReport,
    check_object,
    latency_summary,
    worker_main,
)
from .stress_tally import Counts, Tally

#: Seconds between refreshes of the live display (a plain line every PLAIN_EVERY).
REFRESH = 0.25
PLAIN_EVERY = 1.0
#: Least seconds between two mid-run checks after kills; and the most of the run's time
#: they take (a check holds the heap lock while it reads every arena: writers wait).
CHECK_INTERVAL = 1.0
CHECK_SHARE = 0.2
#: Coverage floors: what each role must at least have done per second of the run (times
#: --floor) for the run to earn a verdict, as (figure, counter, rate); below any of them
#: the run is INCONCLUSIVE.  Set several times below what `--kill-rate 25` does on a 2-core
#: machine loaded with other work (load average 10-14), where readers' snapshots often wait
#: out the lock's 0.25 s grace for a holder killed before it recorded itself.
FLOORS: dict[str, tuple[tuple[str, str, float], ...]] = {
    "writer": (("grows", "ops", 2.0),),
    "churner": (("objects verified", "verified", 50.0),),
    "reader": (("snapshots", "ops", 3.0), ("entries checked", "entries", 500.0)),
    "mover": (("items moved", "moved", 10.0),),
}
#: With --kill-rate, the run must make this share of the kills its schedule made due (the
#: summary says the rate achieved beside the rate asked).
KILL_FLOOR = 0.5
#: Seconds between looks for a victim while a kill is due and no worker is working.
KILL_RETRY = 0.002
#: What the forkserver imports once, so that a worker forked from it starts at once.
PRELOAD = ["shmheap", "shmheap.tools.cli", "shmheap.tools.stress_roles"]
#: Exit status of a run that did too little to judge (below a coverage floor).
EXIT_INCONCLUSIVE = 3
#: Seconds to wait for workers to start, and to stop before they are killed.
START_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0
#: The parent relays nothing more to a churner with this many relayed objects its reports do
#: not yet count as received: a pipe holds only some 28 KB, and a churner that stalls must
#: not block the parent in send().
MAX_IN_FLIGHT = 1024
#: Arenas a run holds at most unless --max-arenas says otherwise (its heap's max_arenas is
#: one more: names.py).  Any number works (processes map arenas on demand, a bounded set at
#: a time, and find free pages through summaries): this only keeps a default run's /dev/shm
#: directory small.
DEFAULT_ARENAS = 4096
#: Findings that a SIGKILL legitimately leaves behind until the next repair ("unpublished": a
#: writer killed while growing left its new arena or index generation under its temporary
#: name, which repair, or the next process in its liveness slot, removes).  An adopted lock
#: is no finding: it is counted in info().recoveries.
TOLERATED_AFTER_KILL = frozenset({"unpublished"})
#: Arenas of 1 MiB (sparse: only touched pages take memory) hold a churner's large objects.
DEFAULT_ARENA_SIZE = 1 << 20
#: The final figures of a run that did not get to verify them (interrupted, or failed).
NO_FINAL: dict[str, Any] = {
    "final_arenas": 0, "arenas_lost": 0, "arenas_grown_otherwise": 0, "stamped_arenas": 0,
    "unstamped_arenas": 0, "index_generations": 0, "index_bytes": 0, "recoveries": 0,
    "repairs": 0, "objects": {}, "items": {}}


# -- the parent's side ----------------------------------------------------------------------


@dataclass
class Worker:
    """One worker process as the parent tracks it."""

    kind: str
    wid: int
    process: BaseProcess
    conn: Connection
    pid: int
    #: what it counted: a live view of its tally slot while it runs, a copy once it ended
    counts: Counts
    #: its tally slot while it runs (None once it ended and the slot went back)
    slot: int | None
    #: when the parent started it (time.monotonic_ns); replacements are started after go
    started_ns: int
    replacement: bool
    #: starting -> ready -> running -> done | killed | straggler | died
    #: ("killing" while the parent drains the pipe of a worker it has just killed)
    state: str = "starting"
    report: WorkerReport | None = None
    created: list[int] = field(default_factory=list)
    #: objects the parent relayed to it from other churners
    handed_in: int = 0
    #: the relayed objects it has not yet said it received (reports, handoffs), in the order
    #: sent: (ref, wid of the churner that handed it on)
    in_flight: deque[tuple[int, int]] = field(default_factory=deque)

    @property
    def alive(self) -> bool:
        return self.state in ("starting", "ready", "running")

    @property
    def working(self) -> bool:
        """Running and past the start of its first operation: worth a kill."""
        return self.state == "running" and self.counts.first_op_ns != 0

    def start_ms(self) -> float | None:
        """Milliseconds from its start to its first operation (None: it made none)."""
        first = self.counts.first_op_ns
        if not first:
            return None
        return max(first - self.started_ns, 0) / 1e6

    def summary(self) -> dict[str, Any]:
        report = self.report
        counters = self.counts.as_dict()
        return {"kind": self.kind, "wid": self.wid, "pid": self.pid,
                "state": self.state, "ops": counters.pop("ops"),
                "violations": counters.pop("violations"), "counters": counters,
                "core": self.counts.core, "start_ms": self.start_ms(),
                "replacement": self.replacement,
                "arenas_created": len(self.created),
                "live_objects": len(report.live) if report else 0,
                "handed_in": self.handed_in,
                "error": report.error if report else ""}


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """The environment variables ``values`` set while the block runs (a process started
    meanwhile inherits them), and as they were afterwards."""
    before = {var: os.environ.get(var) for var in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for var, value in before.items():
            if value is None:
                del os.environ[var]
            else:
                os.environ[var] = value


def _core_of_worker(pure: bool) -> contextlib.AbstractContextManager[None]:
    """A worker spawned meanwhile runs the pure-Python core if ``pure`` (spawn copies the
    environment); the parent's own is as it was afterwards."""
    return _environment(**{core.PURE_VAR: "1"}) if pure else contextlib.nullcontext()


def warm_forkserver() -> None:
    """Start the forkserver that forks the workers, with shmheap imported, SIGINT ignored.

    A worker forked from it starts in milliseconds (spawn imports shmheap
    afresh, over 100 ms).  Python keeps an ignored SIGINT ignored when it
    starts, so the forkserver and every worker it forks ignore Ctrl-C from
    their first instruction: the parent handles it (interrupt.py).  Only in
    the main thread (the only one that may set a signal handler); elsewhere
    the forkserver is started on the first fork.
    """
    get_context("forkserver").set_forkserver_preload(PRELOAD)
    if threading.current_thread() is not threading.main_thread():
        return
    # The forkserver is `python -c`, which puts the working directory first on its path and
    # (before 3.12) ignores the parent's: run from a source checkout, it would import that
    # checkout, without its native core, instead of the parent's shmheap.  It gets exactly
    # the parent's path instead.
    path = os.pathsep.join(entry or os.getcwd() for entry in sys.path)
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with _environment(PYTHONSAFEPATH="1", PYTHONPATH=path):
            forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, handler)


class Fleet:
    """The worker processes of a run: start, message, kill, stop."""

    def __init__(self, name: str, seed: int, ctrl_c: CtrlC, slots: int,
                 mix: bool = False) -> None:
        self.name = name
        self.seed = seed
        #: every other worker (by number) runs the pure-Python core
        self.mix = mix
        #: takes a Ctrl-C in ``poll``, between messages (interrupt.py)
        self.ctrl_c = ctrl_c
        #: workers fork from a warm forkserver; --mix's pure-Python ones are spawned afresh
        #: (the forkserver has imported the parent's core)
        self.context = get_context("forkserver")
        self.spawn_context = get_context("spawn")
        #: every worker's counters; a slot per worker that can run at once
        self.tally = Tally.create(slots)
        self.free_slots = list(range(slots - 1, -1, -1))
        self.workers: list[Worker] = []
        #: set once the run has started: a worker that becomes ready is sent it
        self.go: Go | None = None
        #: problems the parent saw with workers (they count as violations)
        self.problems: list[str] = []
        #: picks the churner a handoff goes to
        self.rng = random.Random(f"{seed}/handoff")
        #: objects churners handed on to the parent (each is relayed or undelivered)
        self.handed_on = 0
        #: objects relayed from one churner to another
        self.relayed = 0
        #: handed-off objects no churner could take (the run was stopping); the parent frees them
        self.undelivered: list[int] = []
        #: seconds the parent spent in ``Process.start()`` of replacements (it waits for the
        #: forkserver to fork, which a loaded machine delays)
        self.start_call_s = 0.0

    def spawn(self, kind: str) -> Worker:
        wid = len(self.workers)
        seed = random.Random(f"{self.seed}/{wid}").getrandbits(64)
        if not self.free_slots:  # every slot's worker runs or awaits its reaping
            self.reap(self.dying()[0])
        slot = self.free_slots.pop()
        words = self.tally.slot(slot)  # zero: new, or zeroed when its last worker ended
        pure = self.mix and wid % 2 == 1
        context = self.spawn_context if pure else self.context
        parent_end, child_end = context.Pipe()
        process = context.Process(target=worker_main, name=f"shmheap-stress-{kind}-{wid}",
                                  args=(kind, self.name, wid, seed, child_end, self.tally, slot,
                                        self.go), daemon=True)
        started = time.monotonic_ns()
        with _core_of_worker(pure):
            process.start()
        if self.go is not None:
            self.start_call_s += (time.monotonic_ns() - started) / 1e9
        child_end.close()
        assert process.pid is not None
        worker = Worker(kind, wid, process, parent_end, process.pid,
                        Counts(words, ROLES[kind].COUNTERS), slot, started,
                        replacement=self.go is not None)
        self.workers.append(worker)
        return worker

    def live(self) -> list[Worker]:
        return [w for w in self.workers if w.alive]

    def of_kind(self, kind: str) -> list[Worker]:
        return [w for w in self.workers if w.kind == kind]

    def poll(self, timeout: float) -> None:
        """Handle the messages that arrive within ``timeout`` seconds (or less).

        A pending Ctrl-C is raised here, between messages; waits are capped
        at ``interrupt.LATENCY`` so that one is never kept waiting long.
        """
        timeout = min(max(timeout, 0), LATENCY)
        by_conn: dict[object, Worker] = {w.conn: w for w in self.live()}
        #: a killed worker is reaped once its process is gone (its sentinel is ready)
        dying: dict[object, Worker] = {w.process.sentinel: w for w in self.dying()}
        if not by_conn and not dying:
            self.ctrl_c.sleep(timeout)
            return
        for ready in wait([*by_conn, *dying], timeout):  # type: ignore[list-item]
            if ready in dying:
                self.reap(dying[ready])
            else:
                self._receive(by_conn[ready])
        self.ctrl_c.check()

    def dying(self) -> list[Worker]:
        """The workers killed and not yet reaped."""
        return [w for w in self.workers if w.state == "killing"]

    def _receive(self, worker: Worker) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            self._ended(worker, "died")
            return
        if message == "ready":
            worker.state = "ready"
            if worker.replacement:
                worker.state = "running"  # it was given go when it started
            elif self.go is not None:
                self.send(worker, self.go)
            return
        self._record(worker, message)

    def _record(self, worker: Worker, message: WorkerReport | Handoff | list[int]) -> None:
        if isinstance(message, list):
            worker.created.extend(message)
            return
        if isinstance(message, Handoff):
            self._taken(worker, message.received)
            self.handed_on += len(message.refs)
            self._relay(worker, message)
            return
        report = worker.report = message
        self._taken(worker, worker.counts.get("received"))
        if report.error:
            self.problems.append(f"{worker.kind} {worker.wid} failed: {report.error}")
        if report.final:
            self._ended(worker, "done")

    @staticmethod
    def _taken(worker: Worker, received: int) -> None:
        """``worker`` has taken ``received`` relayed objects: they are no longer in flight."""
        for _ in range(received - (worker.handed_in - len(worker.in_flight))):
            worker.in_flight.popleft()

    def _relay(self, sender: Worker, handoff: Handoff) -> None:
        """Send handed-off objects to a random other running churner (else back to the sender).

        While the run stops, or with no churner to take them (none runs, or
        every one has MAX_IN_FLIGHT objects on the way), they are kept in
        ``undelivered``.
        """
        targets = [w for w in self.live() if w.kind == sender.kind and w.state == "running"
                   and len(w.in_flight) < MAX_IN_FLIGHT]
        others = [w for w in targets if w is not sender]
        if self.go is None or not targets:
            self.undelivered.extend(handoff.refs)
            return
        target = self.rng.choice(others or targets)
        target.handed_in += len(handoff.refs)
        target.in_flight.extend((ref, sender.wid) for ref in handoff.refs)
        self.relayed += len(handoff.refs)
        self.send(target, Handoff(handoff.refs))

    def _ended(self, worker: Worker, state: str) -> None:
        worker.process.join(STOP_TIMEOUT)
        if state == "died":
            self.problems.append(f"{worker.kind} {worker.wid} died unexpectedly (exit code "
                                 f"{worker.process.exitcode})")
        worker.state = state
        self._release(worker)

    def _release(self, worker: Worker) -> None:
        """Keep what it counted, free its tally slot, close its pipe and process object.

        A run kills and respawns workers by the thousand: each would otherwise
        keep two descriptors (pipe end, process sentinel) in the parent.  The
        slot is zeroed for the next worker once the process is gone: one that
        is still there (it sent its final report but did not exit) is killed.
        """
        worker.conn.close()
        if worker.process.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
            worker.process.join()
        worker.process.close()
        if worker.slot is not None:
            self._taken(worker, worker.counts.get("received"))
            worker.counts = worker.counts.frozen()
            self.tally.clear(worker.slot)
            self.free_slots.append(worker.slot)
            worker.slot = None

    def send(self, worker: Worker, message: Go | Handoff | str) -> None:
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

    def kill(self, worker: Worker) -> None:
        """SIGKILL ``worker`` and go on: ``poll`` reaps it once its process is gone."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGKILL)
        if worker.alive:
            worker.state = "killing"  # no handoff and no kill goes to it any more

    def reap(self, worker: Worker, state: str = "killed") -> None:
        """Wait until killed ``worker`` is gone, keep every complete message it had sent."""
        worker.process.join()
        while not worker.conn.closed and worker.conn.poll():
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):
                break
            if message != "ready":
                self._record(worker, message)
        if worker.state == "killing":
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
        self.shutdown()

    def reap_dying(self) -> None:
        """Reap every worker killed and not yet reaped."""
        for worker in self.dying():
            self.reap(worker)

    def shutdown(self) -> None:
        """Kill whatever is still running (stragglers), reap whatever was killed."""
        self.reap_dying()
        for worker in self.live():
            self.kill(worker)
            self.reap(worker, "straggler")


@dataclass(frozen=True)
class StressConfig:
    """The parameters of a run."""

    writers: int = 2
    churners: int = 2
    readers: int = 2
    movers: int = 0
    duration: float = 8.0
    arena_size: int = DEFAULT_ARENA_SIZE
    #: the heap's max_arenas, as for ``Heap.create`` (at most max_arenas - 1 arenas); 0: room
    #: for DEFAULT_ARENAS
    max_arenas: int = 0
    #: every other worker runs the pure-Python core (native and pure processes on one heap)
    mix: bool = False
    reserve: bool = False
    paced: bool = True
    seed: int = 0
    kill_rate: float = 0.0
    name: str = ""
    json_path: str = ""
    progress: bool = True
    #: scales the coverage floors (0: none)
    floor: float = 1.0

    def __post_init__(self) -> None:
        counts = self.roles().values()
        if min(counts) < 0 or sum(counts) == 0:
            raise InvalidParameterError(
                f"--writers {self.writers} --churners {self.churners} --readers {self.readers} "
                f"--movers {self.movers}: "
                "counts must be >= 0 and at least one worker is needed")
        if not 0 < self.duration < math.inf:
            raise InvalidParameterError(f"--duration {self.duration}: give a positive number "
                                        "of seconds")
        if not 0 <= self.kill_rate < math.inf:
            raise InvalidParameterError(f"--kill-rate {self.kill_rate}: give kills per second "
                                        ">= 0")
        if not 0 <= self.floor < math.inf:
            raise InvalidParameterError(f"--floor {self.floor}: give a factor >= 0")
        if self.max_arenas:
            check_max_arenas(self.max_arenas, self.arena_size)
        else:
            object.__setattr__(self, "max_arenas", DEFAULT_ARENAS + 1)
        if self.name:
            check_name(self.name)

    def roles(self) -> dict[str, int]:
        return {"writer": self.writers, "churner": self.churners, "reader": self.readers,
                "mover": self.movers}


class StressRun:
    """One run: create the heap, run the fleet, kill and check, verify, report."""

    def __init__(self, config: StressConfig) -> None:
        self.config = config
        self.name = config.name or f"stress-{os.getpid()}-{secrets.token_hex(3)}"
        self.rng = random.Random(config.seed)
        self.ctrl_c = CtrlC()
        #: a slot for every worker, and as many for killed ones not yet reaped
        self.fleet = Fleet(self.name, config.seed, self.ctrl_c,
                           2 * sum(config.roles().values()), config.mix)
        self.kills = 0
        #: when the next kill is due; seconds kills were due with no worker working
        self.next_kill = math.inf
        self.kill_wait = 0.0
        self._waiting_since: float | None = None
        self.checks = 0
        #: seconds the parent's checks took in all
        self.check_s = 0.0
        self.findings: list[dict[str, object]] = []
        #: what the parent's ``heap.reclaim()`` passes freed, and the handed-on objects of
        #: dead churners it adopted before them (``_reclaim``); by_owner: dead owner ->
        #: [objects, bytes]
        self.reclaimed: dict[str, Any] = {"passes": 0, "objects": 0, "bytes": 0,
                                          "adopted": 0, "by_owner": {}}
        #: the undelivered handoffs (``Fleet.undelivered``) the parent has adopted so far
        self._adopted_undelivered = 0
        #: violations the parent found itself
        self.violations: list[str] = []
        self.started = 0.0
        self.elapsed = 0.0
        #: a Ctrl-C stopped the run: the report is partial
        self.interrupted = False

    def violate(self, text: str) -> None:
        self.violations.append(text)

    def run(self) -> dict[str, Any]:
        """Do the whole run and return the report; the heap is destroyed in any case.

        Ctrl-C raises KeyboardInterrupt from ``Fleet.poll`` (or at the end),
        never in the middle of a message, a lock hold or the cleanup; the run
        then stops its workers, destroys the heap and returns what it counted
        so far, with ``interrupted`` set.
        """
        config = self.config
        warm_forkserver()
        final = dict(NO_FINAL)
        fleet = self.fleet
        try:
            with self.ctrl_c:
                heap = Heap.create(self.name, arena_size=config.arena_size,
                                   max_arenas=config.max_arenas, reserve=config.reserve)
                try:
                    final = self._run_and_verify(heap)
                except KeyboardInterrupt:
                    self.interrupted = True
                finally:
                    if self.started and not self.elapsed:
                        self.elapsed = time.monotonic() - self.started
                    fleet.shutdown()
                    final["arenas_lost"] = max(final["arenas_lost"], len(self._lost(heap)))
                    heap.close()
                    with contextlib.suppress(HeapNotFoundError):
                        destroy(self.name, force=True)
                try:
                    self.ctrl_c.check()
                except KeyboardInterrupt:
                    self.interrupted = True
            leaks = [entry for entry in segments.list_all() if owns(self.name, entry)]
            return self._report(final, leaks)
        finally:
            fleet.tally.close()

    def _run_and_verify(self, heap: Heap) -> dict[str, Any]:
        config = self.config
        with Live(config.progress, line=True, plain_every=PLAIN_EVERY,
                  refresh=REFRESH) as show:
            stop = heap.event(STOP_EVENT)  # made before any worker looks for it
            self.started = self.fleet.start(config.roles(), config.duration, config.paced)
            self._run_phase(heap, show)
            self.elapsed = time.monotonic() - self.started
            self._reclaim(heap)  # the last one, while every churner that takes handoffs runs
            stop.set()
            self.fleet.stop()
        return self._verify(heap)

    def _run_phase(self, heap: Heap, show: Live) -> None:
        config = self.config
        end = self.started + config.duration
        self.next_kill = self._after(self.started)
        next_refresh = self.started if config.progress else math.inf
        checked_kills = 0  # kills before the last check
        next_check = self.started  # no check before
        while (now := time.monotonic()) < end:
            wake = self._kill_due(now)
            if self.kills > checked_kills and now >= next_check:
                checked_kills = self.kills
                took = self._check(heap) + self._reclaim(heap)
                next_check = (time.monotonic()
                              + max(CHECK_INTERVAL, took * (1 - CHECK_SHARE) / CHECK_SHARE))
            if now >= next_refresh:
                show(self._progress_line(heap, now))
                next_refresh = now + (REFRESH if show.live is not None else PLAIN_EVERY)
            self.fleet.poll(min(end, wake, next_refresh) - time.monotonic())
        self._kill_due(end)  # kills still due at the end count as not made

    def _after(self, when: float) -> float:
        rate = self.config.kill_rate
        return when + self.rng.expovariate(rate) if rate > 0 else math.inf

    def _kill_due(self, now: float) -> float:
        """Make every kill due by ``now``; return when to look again.

        Kills are due at the times of a Poisson process of the asked rate; a
        kill late (the parent was busy) is made as soon as it can be, so the
        run kills at the asked rate on average.  Its victim is a random
        worker that has begun its first operation; while there is none, the
        kill waits (``kill_wait`` adds up that time) and the next look is
        ``KILL_RETRY`` seconds later.
        """
        while self.next_kill <= now:
            victims = [w for w in self.fleet.workers if w.working]
            if not victims:
                if self._waiting_since is None:
                    self._waiting_since = now
                return now + KILL_RETRY
            if self._waiting_since is not None:
                self.kill_wait += now - self._waiting_since
                self._waiting_since = None
            victim = self.rng.choice(victims)
            self.fleet.kill(victim)
            self.kills += 1
            self.fleet.spawn(victim.kind)
            self.next_kill = self._after(self.next_kill)
        return self.next_kill

    def kills_due(self) -> int:
        """Kills the schedule made due during the run: those made + those still due at the end."""
        due = self.kills
        when = self.next_kill
        end = self.started + min(self.config.duration, self.elapsed or self.config.duration)
        schedule = random.Random(f"{self.config.seed}/due")
        while when <= end:
            due += 1
            when += schedule.expovariate(self.config.kill_rate)
        return due

    def _check(self, heap: Heap) -> float:
        """Run ``heap.check()``; findings a kill does not explain are violations.

        Returns the seconds it took.
        """
        start = time.monotonic()
        self.checks += 1
        tolerated = TOLERATED_AFTER_KILL if self._anyone_killed() else frozenset()
        try:
            with heap.locked():
                pass  # a writer's lock: the journal's repair, as a worker's next lock would
            findings = heap.check()
        except ShmHeapError as exc:
            self.violate(f"heap.check() failed: {exc}")
            findings = []
        for finding in findings:
            self.findings.append(finding.as_dict())
            if finding.code not in tolerated:
                self.violate(f"check: {finding.code}: {finding.message}")
        took = time.monotonic() - start
        self.check_s += took
        return took

    def _reclaim(self, heap: Heap) -> float:
        """Free what dead workers owned (``heap.reclaim()``); returns the seconds it took.

        A ref handed on is a plain int and stays its maker's until its
        receiver adopts it; if the maker is dead, a reclaim would free it, and
        the allocator could give its memory to another churner before the
        receiver's adopt, which would then take that churner's object.  So
        the parent first reaps the killed workers (relaying the handoffs still
        in their pipes) and adopts every object in flight from a dead churner
        to a live one, and every undelivered one (it frees those itself): the
        parent is alive, so reclaim leaves them alone.  An adopt that finds the
        object freed is no problem: its receiver has freed it and not said so
        yet.  Objects in flight to a dead churner are left to reclaim.
        """
        start = time.monotonic()
        fleet = self.fleet
        fleet.reap_dying()
        makers = fleet.workers
        guard = [ref for worker in fleet.live() for ref, maker in worker.in_flight
                 if not makers[maker].alive]
        guard += fleet.undelivered[self._adopted_undelivered:]
        self._adopted_undelivered = len(fleet.undelivered)
        totals = self.reclaimed
        try:
            for ref in guard:
                with contextlib.suppress(InvalidRefError):
                    heap.adopt(ref)
                    totals["adopted"] += 1
            freed = heap.reclaim()
        except ShmHeapError as exc:
            self.violate(f"heap.reclaim() failed: {exc}")
        else:
            totals["passes"] += 1
            totals["objects"] += freed.objects
            totals["bytes"] += freed.bytes
            for owner, of in freed.by_owner.items():
                total = totals["by_owner"].setdefault(owner, [0, 0])
                total[0] += of.objects
                total[1] += of.bytes
        return time.monotonic() - start

    def _anyone_killed(self) -> bool:
        return any(w.state in ("killing", "killed", "straggler", "died")
                   for w in self.fleet.workers)

    def _verify(self, heap: Heap) -> dict[str, Any]:
        """The final check: findings, lost arenas, stamps, live objects, counts."""
        self._check(heap)
        final = dict(NO_FINAL)
        try:
            freed = self._free_undelivered(heap)
            final["items"] = self._verify_items(heap)
            held = self._held()
            final.update(self._verify_arenas(heap, held))
            final["objects"] = self._verify_objects(heap, held, freed)
        except ShmHeapError as exc:
            self.violate(f"final verification failed: {exc}")
        return final

    def _reported(self) -> list[int]:
        """The arenas the writers reported they grew."""
        return [i for w in self.fleet.of_kind("writer") for i in w.created]

    def _lost(self, heap: Heap) -> list[int]:
        """Arenas a writer reported that the heap lacks: not in a snapshot, or their segment
        is gone from /dev/shm (the heap was destroyed under the run)."""
        try:
            listed = set(heap.snapshot().tolist())
        except ShmHeapError:
            listed = set()
        return sorted(i for i in set(self._reported())
                      if i not in listed or not segments.exists(arena_name(self.name, i)))

    def _verify_arenas(self, heap: Heap, held: dict[str, dict[int, int]]) -> dict[str, Any]:
        final = heap.snapshot().tolist()
        in_final = set(final)
        if len(in_final) != len(final):
            self.violate(f"the final snapshot lists {len(final) - len(in_final)} arenas twice")
        reported = self._reported()
        if len(set(reported)) != len(reported):
            self.violate("two writers reported creating the same arena")
        lost = self._lost(heap)
        if lost:
            self.violate(f"{len(lost)} arenas reported created are not in the final snapshot "
                         f"or have no segment, e.g. {lost[:5]}")
        stamped = self._stamped_arenas(heap, [i for i in final if i not in set(lost)])
        claimed = {ref // heap.arena_size for ref in held.get("writer", {})}
        if claimed - stamped:
            self.violate(f"{len(claimed - stamped)} arenas claimed by writers carry no stamp, "
                         f"e.g. {sorted(claimed - stamped)[:5]}")
        grows = self._totals("writer")["ops"]
        if not self._anyone_killed() and (grows != len(reported) or stamped != claimed):
            self.violate(f"no worker was killed, yet writers counted {grows} grows and reported "
                         f"{len(reported)} arenas, and {len(stamped)} arenas are stamped where "
                         f"writers claimed {len(claimed)}")
        info = heap.info()
        return {"final_arenas": len(final), "arenas_lost": len(lost),
                "arenas_grown_otherwise": len(in_final - set(reported)),
                "stamped_arenas": len(stamped), "unstamped_arenas": len(final) - len(stamped),
                "index_generations": info.index_generations, "index_bytes": info.index_bytes,
                "recoveries": info.recoveries, "repairs": info.repairs}

    def _stamped_arenas(self, heap: Heap, final: list[int]) -> set[int]:
        """The arenas that carry a stamp; a stamp naming another index is a violation."""
        stamped = set()
        for index in final:
            with heap.arena(index).buf[:16] as head, head.cast("Q") as words:
                magic, value = words.tolist()
            if magic == STAMP_MAGIC:
                stamped.add(index)
                if value != index:
                    self.violate(f"final walk: arena {index} is stamped {value}")
        return stamped

    def _verify_items(self, heap: Heap) -> dict[str, int]:
        """Every item a mover reported putting is on the done queue or back on the work queue.

        The queues are drained (a dead mover's lease comes back to the work
        queue as the drain finds it empty).  A killed mover may have put one
        item it had not reported yet, and moved one item twice (killed between
        its put on the done queue and the end of its lease); nothing else.
        """
        movers = self.fleet.of_kind("mover")
        if not movers:
            return {}
        reported = {item for worker in movers for item in worker.created}
        killed = {worker.wid for worker in movers if worker.state != "done"}
        work, done = heap.queue(WORK_QUEUE), heap.queue(DONE_QUEUE)
        waiting, moved = _drain(work), _drain(done)
        if work.leased:
            self.violate(f"{work.leased} items stay leased after every mover stopped or died")
        found = Counter(waiting + moved)
        missing = reported - found.keys()
        if missing:
            self.violate(f"{len(missing)} items movers put are in neither queue, e.g. "
                         f"{min(missing):#x}")
        unreported = [item for item in found if item not in reported]
        if len(unreported) > len(killed) or any(item >> 32 not in killed for item in unreported):
            self.violate(f"{len(unreported)} items in the queues were never reported put "
                         f"({len(killed)} movers were killed), e.g. {unreported[0]:#x}")
        twice = sum(count - 1 for count in found.values())
        if twice > len(killed):
            self.violate(f"{twice} items were moved twice, with {len(killed)} movers killed")
        return {"items_put": len(reported), "items_moved": len(set(moved)),
                "items_waiting": len(set(waiting) - set(moved)), "items_moved_twice": twice,
                "items_unreported": len(unreported)}

    def _held(self) -> dict[str, dict[int, int]]:
        """kind -> the objects (ref -> size) its workers held when they stopped normally."""
        held: dict[str, dict[int, int]] = {}
        seen: set[int] = set()
        for worker in self.fleet.workers:
            if worker.state != "done" or worker.report is None:
                continue
            live = worker.report.live
            twice = seen.intersection(live)
            if twice:
                self.violate(f"{len(twice)} objects are held by two workers, e.g. "
                             f"{min(twice):#x}")
            seen.update(live)
            held.setdefault(worker.kind, {}).update(live)
        return held

    def _verify_objects(self, heap: Heap, by_kind: dict[str, dict[int, int]],
                        freed: int) -> dict[str, Any]:
        """The live objects must be those the workers hold, plus those killed workers left.

        ``freed``: handed-off objects the parent freed itself.
        """
        held = {ref: size for objects in by_kind.values() for ref, size in objects.items()}
        walked = {ref: span.object_size for span in heap.walk() for ref in span.objects}
        stats = heap.stats()
        if (stats.live_objects, stats.live_bytes) != (len(walked), sum(walked.values())):
            self.violate(f"heap.stats() counts {stats.live_objects} objects of "
                         f"{stats.live_bytes} bytes, heap.walk() {len(walked)} of "
                         f"{sum(walked.values())}")
        missing = [ref for ref, size in held.items() if not size <= walked.get(ref, -1)]
        if missing:
            self.violate(f"{len(missing)} objects the workers hold are not live with room for "
                         f"their size, e.g. {missing[0]:#x}")
        for ref, size in by_kind.get("churner", {}).items():
            problem = check_object(heap, ref, size)[1]
            if problem:
                self.violate(f"final walk: {problem}")
        extra = walked.keys() - held.keys()
        extra_bytes = sum(walked[ref] for ref in extra)
        killed = self._anyone_killed()
        if self.reclaimed["objects"] and not killed:
            self.violate(f"no worker was killed, yet heap.reclaim() freed "
                         f"{self.reclaimed['objects']} objects")
        if extra and not killed:
            self.violate(f"no worker was killed, yet {len(extra)} objects ({extra_bytes} bytes) "
                         "are allocated that no worker holds")
        counters = self._totals("churner")["counters"]
        balance = counters.get("allocs", 0) - counters.get("frees", 0) - freed
        churned = len(by_kind.get("churner", {}))
        if not killed and balance != churned:
            self.violate(f"churners allocated {counters.get('allocs', 0)} objects and freed "
                         f"{counters.get('frees', 0)} (the parent {freed}), yet hold {churned}")
        return {"live_objects": stats.live_objects, "live_bytes": stats.live_bytes,
                "held_objects": len(held), "held_bytes": sum(walked.get(ref, 0) for ref in held),
                "claims": len(by_kind.get("writer", {})),
                "killed_objects": len(extra), "killed_bytes": extra_bytes,
                **self._handoffs(extra, freed)}

    def _free_undelivered(self, heap: Heap) -> int:
        """Check and free the handed-off objects no churner took; returns how many."""
        freed = 0
        for ref in self.fleet.undelivered:
            size, problem = check_object(heap, ref)
            if problem:
                self.violate(f"an undelivered handoff: {problem}")
            if not size:
                continue
            try:
                heap.free(ref)
            except ShmHeapError as exc:
                self.violate(f"free({ref:#x}) of an undelivered handoff raised {exc}")
                continue
            freed += 1
        return freed

    def _handoffs(self, unheld: set[int], freed: int) -> dict[str, int]:
        """What became of the objects churners handed on.

        handed on = relayed + undelivered, and relayed = received + in flight,
        where received is what the churners said they took (``Handoff``,
        reports) and in flight what was relayed to a churner killed before it
        said so.  Lost: the refs in flight still allocated with nobody
        holding them (``unheld``); the killed churner freed the others.
        """
        churners = self.fleet.of_kind("churner")
        in_flight = [ref for worker in churners for ref, _ in worker.in_flight]
        return {"handoffs_handed_on": self.fleet.handed_on,
                "handoffs_relayed": self.fleet.relayed,
                "handoffs_received": sum(w.handed_in - len(w.in_flight) for w in churners),
                "handoffs_in_flight": len(in_flight),
                "handoffs_lost": sum(ref in unheld for ref in in_flight),
                "handoffs_undelivered": len(self.fleet.undelivered),
                "undelivered_freed": freed}

    def _totals(self, kind: str) -> dict[str, Any]:
        workers = self.fleet.of_kind(kind)
        reports = [w.report for w in workers if w.report is not None]
        counters: dict[str, int] = {}
        for worker in workers:
            for key, value in worker.counts.as_dict().items():
                counters[key] = counters.get(key, 0) + value
        ops = counters.pop("ops", 0)
        seconds = self.elapsed or (time.monotonic() - self.started) or 1.0
        return {"workers": self.config.roles()[kind], "incarnations": len(workers), "ops": ops,
                "ops_per_s": ops / seconds, "counters": counters,
                "latency": latency_summary(r.latency for r in reports),
                "violations": counters.pop("violations", 0)}

    def _arenas_reported(self) -> int:
        return sum(len(w.created) for w in self.fleet.of_kind("writer"))

    def _worker_violations(self) -> tuple[int, list[str]]:
        count = 0
        examples = []
        for worker in self.fleet.workers:
            count += worker.counts["violations"]
            if worker.report is not None:
                examples += [f"{worker.kind} {worker.wid}: {e}" for e in worker.report.examples]
        return count, examples

    def _progress_line(self, heap: Heap, now: float) -> str:
        readers = self._totals("reader")
        churners = self._totals("churner")["counters"]
        violations = self._worker_violations()[0] + len(self.violations)
        grows = self._arenas_reported()
        seconds = max(now - self.started, 1e-3)
        return (f"stress {self.name}  {now - self.started:5.1f}/{self.config.duration:g} s  "
                f"arenas {len(heap.snapshot())}  grows {grows} ({grows / seconds:.0f}/s)  "
                f"verified {churners.get('verified', 0)}  snapshots {readers['ops']} "
                f"({readers['counters'].get('entries', 0)} entries)  kills {self.kills} "
                f"({self.kills / seconds:.1f}/s)  violations {violations}")

    def _cores(self) -> dict[str, int]:
        """Worker processes by the core they ran ("unstarted": killed before they said)."""
        cores = [w.counts.core for w in self.fleet.workers]
        return {"native": cores.count("native"), "pure": cores.count("pure"),
                "unstarted": cores.count("")}

    def _starts(self) -> dict[str, Any]:
        """Milliseconds from a replacement's start to its first operation (p50, max)."""
        times = sorted(t for w in self.fleet.workers if w.replacement
                       and (t := w.start_ms()) is not None)
        if not times:
            return {"p50_ms": None, "max_ms": None, "samples": 0}
        return {"p50_ms": times[len(times) // 2], "max_ms": times[-1], "samples": len(times)}

    def _kill_figures(self) -> dict[str, Any]:
        asked = self.config.kill_rate
        due = self.kills_due() if asked else 0
        return {"kills": self.kills, "kills_due": due,
                "kills_per_s": self.kills / (self.elapsed or 1.0), "kill_rate_asked": asked,
                "kill_wait_s": self.kill_wait,
                "start_call_ms": self.fleet.start_call_s * 1000 / max(self.kills, 1)}

    def coverage(self, kills: dict[str, Any], full: bool) -> list[dict[str, Any]]:
        """What the run did beside what it had to do for a verdict (``FLOORS``, ``KILL_FLOOR``).

        Each floor is a rate per second of the asked duration (of the run
        so far if interrupted), times ``--floor``; a role with no workers has
        none; writers' grows are enough once the heap is full.
        """
        config = self.config
        if not config.floor:
            return []
        seconds = min(config.duration, self.elapsed) if self.interrupted else config.duration
        rows = []
        for kind, floors in FLOORS.items():
            if not config.roles()[kind]:
                continue
            totals = self._totals(kind)
            for figure, counter, rate in floors:
                done = totals["ops"] if counter == "ops" else totals["counters"].get(counter, 0)
                floor = math.ceil(rate * seconds * config.floor)
                if kind == "writer" and full:
                    floor = min(floor, done)
                rows.append({"role": kind, "figure": figure, "done": done, "floor": floor})
        if kills["kill_rate_asked"]:
            rows.append({"role": "parent", "figure": "kills", "done": kills["kills"],
                         "floor": math.ceil(KILL_FLOOR * kills["kills_due"] * config.floor)})
        return rows

    def _report(self, final: dict[str, Any], leaks: list[str]) -> dict[str, Any]:
        worker_count, worker_examples = self._worker_violations()
        problems = self.fleet.problems
        violations = worker_count + len(self.violations) + len(problems)
        full_at = [w.report.full_at for w in self.fleet.of_kind("writer")
                   if w.report is not None and w.report.full]
        kills = self._kill_figures()
        coverage = self.coverage(kills, bool(full_at))
        below = [row for row in coverage if row["done"] < row["floor"]]
        report: dict[str, Any] = {
            "name": self.name, "config": asdict(self.config), "duration_s": self.elapsed,
            "roles": {kind: self._totals(kind) for kind in self.config.roles()},
            "arenas_created": self._arenas_reported(),
            "grows_per_s": self._arenas_reported() / (self.elapsed or 1.0),
            "heap_full_after_s": min(full_at) - self.started if full_at else None,
            **kills,
            "worker_start": self._starts(),
            "stragglers": sum(w.state == "straggler" for w in self.fleet.workers),
            "checks": self.checks, "check_s": self.check_s, "findings": self.findings,
            "violations": violations,
            "violation_examples": (problems + self.violations + worker_examples)[:20],
            "leaks": leaks, "workers": [w.summary() for w in self.fleet.workers],
            "cores": self._cores(), "coverage": coverage, "interrupted": self.interrupted,
            "reclaimed": self.reclaimed,
            **final,
        }
        if violations or final["arenas_lost"] or leaks:
            result = "FAILED"
        elif self.interrupted:
            result = "INTERRUPTED"
        elif below:
            result = "INCONCLUSIVE"
        else:
            result = "OK"
        report["result"] = result
        report["ok"] = result == "OK"
        return report


def _drain(q: Queue) -> list[int]:
    """Every item left on ``q``, taken off it."""
    items = []
    while True:
        try:
            items.append(int(q.get(timeout=0)))  # type: ignore[call-overload]
        except queue.Empty:
            return items


# -- the summary and the command --------------------------------------------------------------


def _us(latency: dict[str, float | None]) -> str:
    values = [latency[key] for key in ("p50_us", "p99_us", "max_us")]
    return " / ".join("-" if v is None else f"{v:.1f}" for v in values) + " µs"


#: The rows of figures that only the final verification makes (left out when interrupted).
VERIFIED_ROWS = frozenset({"handoffs handed on", "handoffs relayed", "final snapshot",
                           "stamped arenas", "index generations", "live at the end",
                           "lock recoveries"})


def summary_rows(report: dict[str, Any]) -> Iterator[tuple[str, object]]:
    """(metric, value) rows of the summary table; SUMMARY_HELP defines each one.

    An interrupted run's summary leaves out what only the final verification
    finds (``VERIFIED_ROWS``).
    """
    for metric, value in _rows(report):
        if not (report["interrupted"] and metric in VERIFIED_ROWS):
            yield metric, value


def _rows(report: dict[str, Any]) -> Iterator[tuple[str, object]]:
    roles = report["roles"]
    writer, churner, reader = roles["writer"], roles["churner"], roles["reader"]
    config = report["config"]
    objects = report["objects"]
    yield "heap", (f"{report['name']} (seed {config['seed']}; at most "
                   f"{usable_arenas(config['max_arenas']):,} arenas of "
                   f"{format_size(config['arena_size'])})")
    yield "duration", f"{report['duration_s']:.2f} s" + (
        " (interrupted: partial figures, no final verification)" if report["interrupted"]
        else "")
    cores = report["cores"]
    yield "cores", (f"{cores['native']:,} native, {cores['pure']:,} pure-Python processes"
                    + (f" ({cores['unstarted']:,} killed before they started)"
                       if cores["unstarted"] else ""))
    yield "writers", f"{writer['workers']} ({writer['incarnations']} processes)"
    yield "grows", (f"{report['arenas_created']:,}, {report['grows_per_s']:.0f}/s"
                    + (" (paced)" if config["paced"] else ""))
    yield "grow latency p50/p99/max", _us(writer["latency"])
    yield "grow collisions (at=)", writer["counters"].get("collisions", 0)
    yield "churners", f"{churner['workers']} ({churner['incarnations']} processes)"
    yield "churn ops/s (allocs + frees)", f"{churner['ops_per_s']:.0f}"
    yield "alloc latency p50/p99/max", _us(churner["latency"])
    counts = churner["counters"]
    yield "objects allocated / freed", f"{counts.get('allocs', 0):,} / {counts.get('frees', 0):,}"
    yield "bytes allocated", format_size(counts.get("alloc_bytes", 0))
    yield "patterns verified", f"{counts.get('verified', 0):,}"
    yield "handoffs handed on", (
        f"{objects.get('handoffs_handed_on', 0):,} = {objects.get('handoffs_relayed', 0):,} "
        f"relayed + {objects.get('handoffs_undelivered', 0):,} undelivered (the parent freed "
        f"{objects.get('undelivered_freed', 0):,})")
    yield "handoffs relayed", (
        f"{objects.get('handoffs_relayed', 0):,} = {objects.get('handoffs_received', 0):,} "
        f"received + {objects.get('handoffs_in_flight', 0):,} in flight to killed churners "
        f"({objects.get('handoffs_lost', 0):,} of them lost)")
    yield "readers", f"{reader['workers']} ({reader['incarnations']} processes)"
    yield "snapshots/s", f"{reader['ops_per_s']:.0f}"
    yield "snapshot latency p50/p99/max", _us(reader["latency"])
    yield "snapshots taken", f"{reader['ops']:,}"
    yield "entries checked", f"{reader['counters'].get('entries', 0):,}"
    yield "heap walks checked", (f"{reader['counters'].get('walks', 0):,} whole walks; "
                                 f"{reader['counters'].get('spans_walked', 0):,} spans, "
                                 f"{reader['counters'].get('objects_walked', 0):,} objects")
    items = report.get("items") or {}
    if items:
        mover = roles["mover"]
        yield "movers", f"{mover['workers']} ({mover['incarnations']} processes)"
        yield "queue op latency p50/p99/max", _us(mover["latency"])
        yield "items", (f"{items['items_put']:,} put = {items['items_moved']:,} moved + "
                        f"{items['items_waiting']:,} still queued; "
                        f"{items['items_moved_twice']:,} moved twice and "
                        f"{items['items_unreported']:,} put unreported by killed movers")
    lost = report["arenas_lost"]
    yield "final snapshot", (f"{report['final_arenas']:,} arenas = {report['arenas_created']:,} "
                             f"grown by writers + {report['arenas_grown_otherwise']:,} grown "
                             "otherwise" + (f" - {lost:,} lost" if lost else ""))
    yield "stamped arenas", (f"{report['stamped_arenas']:,} (claimed and stamped by writers); "
                             f"{report['unstamped_arenas']:,} not")
    full = report["heap_full_after_s"]
    yield "heap full after", "-" if full is None else f"{full:.2f} s"
    yield "index generations", report["index_generations"]
    yield "reclaimed", _reclaimed(report["reclaimed"])
    yield "live at the end", (
        f"{objects.get('live_objects', 0):,} objects, "
        f"{format_size(objects.get('live_bytes', 0))} = {objects.get('held_objects', 0):,} "
        f"held by workers that stopped ({objects.get('claims', 0):,} of them writers' arenas) "
        f"+ {objects.get('killed_objects', 0):,} left by killed workers, not reclaimed "
        f"({format_size(objects.get('killed_bytes', 0))})")
    yield "kills", _kills(report)
    start = report["worker_start"]
    yield "worker start p50/max", ("-" if not start["samples"] else
                                   f"{start['p50_ms']:.1f} / {start['max_ms']:.1f} ms "
                                   f"({start['samples']:,} replacements)")
    yield "stragglers", report["stragglers"]
    yield "lock recoveries", report["recoveries"]
    yield "checks run", f"{report['checks']} ({report['check_s']:.2f} s)"
    yield "violations", report["violations"]
    yield "arenas lost", report["arenas_lost"]
    yield "leaks", len(report["leaks"])
    yield "coverage", _coverage(report["coverage"])
    yield "result", report["result"]


def _reclaimed(reclaimed: dict[str, Any]) -> str:
    return (f"{reclaimed['objects']:,} objects, {format_size(reclaimed['bytes'])} of "
            f"{len(reclaimed['by_owner']):,} dead owners in {reclaimed['passes']:,} passes "
            f"(before them the parent adopted {reclaimed['adopted']:,} handoffs: in flight "
            "from dead churners, or undelivered)")


def _kills(report: dict[str, Any]) -> str:
    asked = report["kill_rate_asked"]
    if not asked:
        return "0 (no --kill-rate)"
    text = f"{report['kills']:,}, {report['kills_per_s']:.1f}/s of the {asked:g}/s asked"
    if report["kills"] < report["kills_due"]:
        text += (f" ({report['kills_due'] - report['kills']:,} due kills not made: they waited "
                 f"{report['kill_wait_s']:.2f} s in all for a worker that had begun working; "
                 f"starting a replacement held the parent {report['start_call_ms']:.1f} ms "
                 "on average)")
    return text


def _coverage(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no floors (--floor 0)"
    below = [row for row in rows if row["done"] < row["floor"]]
    shown = below or rows
    return ("BELOW its floor: " if below else "every floor met: ") + ", ".join(
        f"{row['figure']} {row['done']:,} {'<' if row in below else '>='} {row['floor']:,}"
        for row in shown)


#: The definitions of the summary's figures (``shmheap stress --help``).
SUMMARY_HELP = """\
The summary, figure by figure (--json holds the same numbers):
  heap                its seed, arena size and at most how many arenas: max_arenas - 1, the
                      number `shmheap info` says
  duration            seconds from the start signal to the stop signal (or to Ctrl-C)
  cores               the worker processes, by the core they ran: native (shmheap's C
                      core) or pure-Python (--mix makes every other worker one); killed
                      before they started: those that never got to say
  writers, churners, readers, movers
                      processes of that role at a time (in brackets: every process started
                      for the role, replacements of killed ones included)
  grows               arenas the writers grew, as each reported right after its grow (a
                      writer killed inside a grow loses at most that one); per second of the
                      duration, as on the progress line
  grow latency, alloc latency, snapshot latency
                      p50 / p99 / max of the samples in the workers' reports
  churn ops/s, objects allocated / freed, bytes allocated, patterns verified,
  snapshots/s, snapshots taken, entries checked, heap walks checked
                      counted by each worker in shared memory as it goes, from its first
                      operation: a killed worker's count is whole (the latency samples come
                      in reports every 0.5 s, so a killed worker's last half second is not
                      in those)
  heap walks checked  walks of the whole heap a reader finished (after heap.stats()), and
                      the spans and objects checked as walked (those of walks a kill cut
                      short too)
  grow collisions     grow(at=i) calls that found index i taken
  handoffs handed on  objects churners gave up for another churner, as the parent got them,
                      = relayed to a churner + undelivered (kept by the parent while the run
                      stopped or every churner was behind; it checks and frees them)
  handoffs relayed    = received (taken, as the churners said) + in flight (relayed to a
                      churner killed before it said so); lost: those in flight still
                      allocated with nobody holding them (the killed churner freed the rest)
  movers              (--movers) processes that put work items on the heap queue
                      stress.work or move its head item to stress.done under a lease
  queue op latency    p50 / p99 / max of a mover's step (one put, or a lease and a put)
  items               items movers put (as each reported right after its put) = moved +
                      still queued, every one found on one of the queues after the run (a
                      killed mover's lease comes back); moved twice: a mover killed after
                      its put on stress.done, before its lease ended; put unreported: a
                      mover killed between its put and its report
  final snapshot      arenas in the heap at the end = grown by writers + grown otherwise (by
                      allocations that found no free pages, or by a writer killed before it
                      reported its grow) - lost
  stamped arenas      after each grow a writer allocates a whole free arena (usually the one
                      it grew) and stamps it; the rest were grown by allocations, or their
                      writer was killed before it stamped them
  heap full after     seconds until a writer first found no room for another arena
  index generations   index arrays the heap has made (each doubles the last)
  reclaimed           what the parent's heap.reclaim() freed: objects and bytes that dead
                      workers owned, of how many dead owners, in how many passes (one with
                      each check after kills, one at the end before the stop).  Churners
                      adopt (heap.adopt) each object handed to them; before each pass the
                      parent adopts those still in flight from a dead churner to a live one
                      (a reclaim must not free an object a live churner is about to take),
                      and those it keeps undelivered; in brackets how many adopts (an object
                      in flight over several passes is adopted at each)
  live at the end     objects allocated at the end = held by the workers that stopped
                      normally (their final reports list them) + left by killed workers, not
                      reclaimed: handoffs lost in flight to a killed churner, which their
                      maker (alive: reclaim leaves its objects alone) or the parent (it
                      adopted them) still owns
  kills               workers SIGKILLed by --kill-rate, per second of the duration, beside
                      the rate asked; a kill falls due at random times at that rate and
                      hits a random worker that has begun its first operation (while none
                      has, it waits: the kills not made by the end are said, with how long
                      the parent waited, per replacement, for the forkserver to fork it)
  worker start        milliseconds from the start of a replacement worker to its first
                      operation (forked from a warm forkserver that has imported shmheap;
                      --mix's pure-Python workers are spawned afresh)
  stragglers          workers killed because they did not stop
  lock recoveries     dead holders' locks adopted (info().recoveries)
  checks run          heap.check() after kills (at most once a second, and at most a fifth
                      of the time) and at the end; in brackets the seconds they took
  violations          failed checks, by the workers and the parent (examples follow the table)
  arenas lost         arenas a writer reported grown that the final snapshot lacks, or whose
                      segment is gone from /dev/shm (the heap was destroyed under the run)
  leaks               segments of the heap left in /dev/shm after it was destroyed
  coverage            the floors a run must reach to earn a verdict, each a rate per second
                      of --duration times --floor (writers' grows are met once the heap is
                      full; with --kill-rate also {kill_floor:.0%} of the kills due):
                      {floors}
  result              FAILED (exit 1) on any violation, lost arena or leak; else
                      INCONCLUSIVE (exit 3) below any coverage floor; else OK (exit 0).
                      Ctrl-C stops the run, prints the figures so far (INTERRUPTED) and
                      exits 130
""".format(
    floors=", ".join(f"{figure} {rate:,g}" for floors in FLOORS.values()
                     for figure, _, rate in floors),
    kill_floor=KILL_FLOOR)


def add_stress(sub: Subparsers) -> None:

    parser = sub.add_parser("stress", help="run writers, churners and readers against one "
                            "heap and check every entry and object",
                            epilog=SUMMARY_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writers", type=at_least(0), default=2,
                        help="writer processes (default 2)")
    parser.add_argument("--churners", type=at_least(0), default=2,
                        help="processes that allocate, hand on and free objects (default 2)")
    parser.add_argument("--readers", type=at_least(0), default=2,
                        help="reader processes (default 2)")
    parser.add_argument("--movers", type=at_least(0), default=0,
                        help="processes that put work items on a heap queue and move them to "
                        "another under a lease; every item is accounted for (default 0)")
    parser.add_argument("--duration", type=seconds_arg, default=8.0,
                        help="seconds to run (default 8)")
    parser.add_argument("--arena-size", type=arena_size_arg, default=DEFAULT_ARENA_SIZE,
                        help=f"bytes per arena (default {format_size(DEFAULT_ARENA_SIZE)})")
    parser.add_argument("--max-arenas", type=at_least(0), default=0, metavar="N",
                        help="the heap's max_arenas, as for `shmheap create`: it holds at most "
                        f"N-1 arenas (default: at most {DEFAULT_ARENAS} arenas)")
    parser.add_argument("--reserve", action="store_true",
                        help="reserve each arena's memory (default: sparse arenas)")
    parser.add_argument("--flat-out", action="store_true",
                        help="writers grow as fast as they can (default: paced, filling the "
                        "heap evenly over the run, so that growth lasts the whole run)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed for every random choice (default: random, printed)")
    parser.add_argument("--kill-rate", type=rate_arg, default=0.0,
                        help="SIGKILL this many random workers per second (default 0)")
    parser.add_argument("--mix", action="store_true",
                        help="every other worker runs the pure-Python core, the rest the "
                        "native one: both kinds of process on one heap")
    parser.add_argument("--floor", type=factor_arg, default=1.0, metavar="X",
                        help="scale the coverage floors by X (default 1; 0: no floors, so "
                        "no run is INCONCLUSIVE)")
    parser.add_argument("--json", metavar="FILE", default="", help="write the report as JSON")
    parser.add_argument("--name", type=heap_name, default=None,
                        help="heap name (default: a unique one)")
    parser.add_argument("--no-progress", action="store_true", help="no live progress line")
    parser.set_defaults(run=run_stress)


def run_stress(args: argparse.Namespace) -> int:

    try:
        config = StressConfig(
            writers=args.writers, churners=args.churners, readers=args.readers,
            movers=args.movers, duration=args.duration,
            arena_size=args.arena_size, max_arenas=args.max_arenas, reserve=args.reserve,
            paced=not args.flat_out,
            seed=args.seed if args.seed is not None else secrets.randbits(32),
            kill_rate=args.kill_rate, name=args.name or "", json_path=args.json, mix=args.mix,
            progress=not args.no_progress, floor=args.floor)
    except InvalidParameterError as exc:
        raise UsageError(str(exc)) from None
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(_open_report(config.json_path)) if config.json_path else None
        report = StressRun(config).run()
        print_table(("metric", "value"), summary_rows(report))
        for example in report["violation_examples"]:
            print(f"violation: {example}")
        if out is not None:
            json.dump(report, out, indent=2, default=str)
    if report["interrupted"]:
        raise KeyboardInterrupt  # the command's exit status for Ctrl-C (cli.py)
    return {"OK": 0, "INCONCLUSIVE": EXIT_INCONCLUSIVE}.get(report["result"], 1)


def _open_report(path: str) -> TextIO:
    """Open the --json file before the run, so a bad path fails before any work."""
    try:
        return open(path, "w")
    except OSError as exc:
        raise InvalidParameterError(f"--json {path}: cannot write it ({exc.strerror})") from None

