"""Workers for the coordination tests (module-level so spawn can import them).

Each attaches the heap by name, works through its structures and reports
through other structures of the same heap, so nothing a test checks passes
through a ``multiprocessing`` pipe that a kill could cut.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import shmheap


def produce(name: str, first: int, count: int) -> None:
    """Put the ints ``first .. first + count - 1`` on queue ``work``."""
    with shmheap.Heap.attach(name) as heap:
        work = heap.queue("work")
        for item in range(first, first + count):
            work.put(item)


def consume_leased(name: str) -> None:
    """Lease items of ``work`` and put each on ``done`` until ``work`` is closed and empty."""
    with shmheap.Heap.attach(name) as heap:
        work, done, results = heap.queue("work"), heap.queue("done"), heap.counter("results")
        while True:
            try:
                with work.lease() as item:
                    done.put(item)
                    results.add()
            except queue.Empty:
                return


def consume(name: str) -> None:
    """``get`` items of ``work`` and put each on ``done`` until ``work`` is closed and empty."""
    with shmheap.Heap.attach(name) as heap:
        work, done = heap.queue("work"), heap.queue("done")
        while True:
            try:
                item = work.get()
            except queue.Empty:
                return
            done.put(item)


def hold_a_lease(name: str) -> None:
    """Lease one item of ``work``, say so on event ``leased``, then wait to be killed."""
    with shmheap.Heap.attach(name) as heap, heap.queue("work").lease() as item:
        heap.queue("held").put(item)
        heap.event("leased").set()
        heap.event("never").wait()


def add(name: str, times: int) -> None:
    """Add 1 to counter ``n`` ``times`` times; put every value returned on queue ``values``."""
    with shmheap.Heap.attach(name) as heap:
        counter, values = heap.counter("n"), heap.queue("values")
        for _ in range(times):
            values.put(counter.add())


def wait_for_event(name: str) -> None:
    """Say ``ready`` on queue ``report``, wait for event ``go``, then say ``woken``."""
    with shmheap.Heap.attach(name) as heap:
        report, go = heap.queue("report"), heap.event("go")
        report.put("ready")
        report.put("woken" if go.wait(timeout=60) else "timed out")


def wait_for_event_readonly(name: str) -> None:
    """Wait for event ``go`` through a read-only handle (which can report on no structure):
    exit 0 if it was set, 3 if the wait timed out."""
    with shmheap.Heap.attach(name, readonly=True) as heap:
        woken = heap.event("go").wait(timeout=60)
    raise SystemExit(0 if woken else 3)


def barrier_party(name: str, parties: int, rounds: int = 1) -> None:
    """Wait at barrier ``b`` ``rounds`` times; report each outcome on queue ``report``."""
    with shmheap.Heap.attach(name) as heap:
        report, barrier = heap.queue("report"), heap.barrier("b", parties)
        for _ in range(rounds):
            try:
                report.put(barrier.wait(timeout=60))
            except threading.BrokenBarrierError:
                report.put("broken")
                return


def leave_after_a_round(name: str, parties: int) -> None:
    """Pass one round of barrier ``b`` as a party of its ``with`` block, which leaves it;
    report the round's index, then ``left``, on queue ``report``."""
    with shmheap.Heap.attach(name) as heap:
        report = heap.queue("report")
        with heap.barrier("b", parties) as barrier:
            report.put(barrier.wait(timeout=60))
        report.put("left")


def register_and_park(name: str, parties: int) -> None:
    """Become a party of barrier ``b``, say ``registered`` on queue ``report``, never wait
    at the barrier: wait for event ``never`` until killed."""
    with shmheap.Heap.attach(name) as heap:
        heap.barrier("b", parties)
        heap.queue("report").put("registered")
        heap.event("never").wait()


def get_arrays(name: str, count: int) -> None:
    """Get ``count`` numpy arrays from queue ``arrays``; check each is a writable view of
    the heap (no copy), write into it, report its sum on queue ``report``, then let it go."""
    with shmheap.Heap.attach(name) as heap:
        arrays, report = heap.queue("arrays"), heap.queue("report")
        for _ in range(count):
            array: Any = arrays.get(timeout=60)
            assert array.flags.writeable and not array.flags.owndata
            array[0] = -1.0
            report.put(float(array.sum()))
            del array
