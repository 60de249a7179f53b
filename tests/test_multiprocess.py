"""Real processes on one heap: readers against a writer that doubles the index,
reading after another process destroys the heap, and racing ``Heap.open``.

Workers live in ``workers.py`` and run in spawned interpreters.  Processes
meet at barriers and events; nothing here waits by sleeping.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import queue
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from types import TracebackType
from typing import Any, NoReturn

import pytest
import workers

import shmheap
from shmheap import names
from shmheap.pytest_plugin import HeapFactory, assert_no_shm_leftovers

SPAWN = multiprocessing.get_context("spawn")
FIRST_CAP = names.PAGE_SIZE // 4
ARENA = 64 * 1024


class Crew:
    """Spawned workers that all report on one queue.

    On the first failure every worker is stopped (``stop`` unblocks them) and
    the test fails with every failure reported, root causes first.  Leaving
    the ``with`` block normally waits for all workers and checks they exited
    cleanly.
    """

    def __init__(self, stop: Callable[[], None]) -> None:
        self.results: Queue[Any] = SPAWN.Queue()
        self.processes: list[BaseProcess] = []
        self._stop = stop

    def spawn(self, target: Callable[..., None], *args: Any) -> BaseProcess:
        process = SPAWN.Process(target=target, args=(*args, self.results))
        self.processes.append(process)
        process.start()
        return process

    def collect(self, count: int) -> list[Any]:
        """The next ``count`` reports; fail the test on a failed or silent worker."""
        got = []
        for _ in range(count):
            try:
                report = self.results.get(timeout=workers.PATIENCE)
            except queue.Empty:
                self.fail(f"no report from the workers in {workers.PATIENCE} s", [])
            if isinstance(report, workers.WorkerFailure):
                self.fail("a worker failed", [report])
            got.append(report)
        return got

    def fail(self, message: str, failures: list[workers.WorkerFailure]) -> NoReturn:
        self.stop()
        failures += [r for r in self.drain() if isinstance(r, workers.WorkerFailure)]
        failures.sort(key=lambda f: f.secondary)
        exitcodes = [p.exitcode for p in self.processes]
        details = "".join(f"\n--- {f.worker}{' (secondary)' if f.secondary else ''}:\n{f.trace}"
                          for f in failures)
        pytest.fail(f"{message}; worker exit codes {exitcodes}{details}", pytrace=False)

    def stop(self) -> None:
        """Unblock every worker, wait for it, terminate it if it does not exit."""
        self._stop()
        self.join()

    def join(self) -> None:
        for process in self.processes:
            process.join(timeout=workers.PATIENCE)
            if process.is_alive():
                process.terminate()
                process.join()

    def drain(self) -> list[Any]:
        """Reports still queued (the workers have exited and flushed them)."""
        left = []
        with contextlib.suppress(queue.Empty):
            while True:
                left.append(self.results.get(timeout=0.1))
        return left

    def __enter__(self) -> Crew:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.stop()
            return
        self.join()
        exitcodes = [p.exitcode for p in self.processes]
        assert exitcodes == [0] * len(self.processes), f"worker exit codes {exitcodes}"


def test_readers_see_a_consistent_index_while_a_writer_doubles_it(
        shm_heap_factory: HeapFactory) -> None:
    doublings, nreaders = 4, 4
    heap = shm_heap_factory(reserve=False)
    # The writer pauses at the start and whenever the index is full: each reader
    # then holds a snapshot of a full generation across the doubling that follows.
    pause_at = [0] + [FIRST_CAP << g for g in range(doublings)]
    count = pause_at[-1] + 200
    barrier = SPAWN.Barrier(nreaders + 1)
    writer_done = SPAWN.Event()
    orders: Queue[list[int] | None] = SPAWN.Queue()

    def stop() -> None:
        barrier.abort()
        writer_done.set()
        for _ in range(nreaders):
            orders.put(None)

    with Crew(stop) as crew:
        for r in range(nreaders):
            crew.spawn(workers.reader, heap.name, r % 2 == 0, pause_at, barrier, writer_done,
                       orders)
        writer = crew.spawn(workers.writer, heap.name, count, pause_at, 97, barrier)
        [order] = crew.collect(1)  # only the writer can report before writer_done
        writer.join(timeout=workers.PATIENCE)
        for _ in range(nreaders):
            orders.put(order)
        writer_done.set()
        stats = crew.collect(nreaders)

    assert len(order) == count and len(set(order)) == count
    assert list(heap.snapshot()) == order
    info = heap.info()
    assert (info.index_len, info.index_generations) == (count, doublings + 1)
    assert info.index_bytes <= 2 * info.index_cap * 4 + names.PAGE_SIZE
    for stat in stats:
        assert stat["generations"] == list(range(doublings + 1)), stat
        assert stat["held"] == len(pause_at), stat


def test_reader_keeps_reading_after_another_process_destroys(shm_heap: shmheap.Heap) -> None:
    for _ in range(FIRST_CAP):
        workers.stamp(shm_heap.grow())
    early = shm_heap.snapshot()
    for _ in range(8):
        workers.stamp(shm_heap.grow())
    late = shm_heap.snapshot()
    arenas = list(shm_heap.arenas())
    with Crew(stop=lambda: None) as crew:
        crew.spawn(workers.destroyer, shm_heap.name)
        assert crew.collect(1) == [None]
    assert_no_shm_leftovers(shm_heap.name)

    assert (early.generation, late.generation) == (0, 1)
    assert list(early) == list(range(1, FIRST_CAP + 1))
    assert list(late) == list(range(1, FIRST_CAP + 9))
    assert [workers.stamp_of(a) for a in arenas] == list(late)
    for arena in arenas:
        arena.buf[-8:] = arena.index.to_bytes(8, "little")
        assert int.from_bytes(arena.buf[-8:], "little") == arena.index
    with pytest.raises(shmheap.HeapNotFoundError):
        shmheap.Heap.attach(shm_heap.name)
    with pytest.raises(shmheap.HeapNotFoundError):
        shmheap.Heap.attach(shm_heap.name, readonly=True)


def test_open_raced_by_several_processes(shm_heap_name: str) -> None:
    nopeners, grows = 4, 50
    barrier = SPAWN.Barrier(nopeners)
    release = SPAWN.Event()

    def stop() -> None:
        barrier.abort()
        release.set()

    with Crew(stop) as crew:
        for _ in range(nopeners):
            crew.spawn(workers.opener, shm_heap_name, ARENA, grows, barrier, release)
        attached = crew.collect(nopeners)
        with shmheap.Heap.attach(shm_heap_name, readonly=True) as heap:
            assert heap.info().attached == nopeners + 1
            assert {heap_id for heap_id, _ in attached} == {heap.params.heap_id}
            for _, grown in attached:
                assert grown == sorted(grown)  # the hint only moves forward
            everything = sorted(i for _, grown in attached for i in grown)
            assert everything == list(range(1, nopeners * grows + 1))
            assert sorted(heap.snapshot()) == everything
            assert [workers.stamp_of(a) for a in heap.arenas()] == list(heap.snapshot())
        release.set()
        assert crew.collect(nopeners) == [None] * nopeners
