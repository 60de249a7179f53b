"""Threads sharing one handle, and forks of a process that holds handles.

Real threads hammer one ``Heap`` handle (every object's contents checked,
no ref handed out twice); real forks (``os.fork`` and multiprocessing's fork
context) are made while another thread is inside the heap lock, after the
heap was destroyed, and after it was destroyed and re-created.  A forked
child always leaves through ``os._exit`` and reports on a pipe.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator

import pytest

import shmheap
from shmheap.attached import new_mutex
from shmheap.liveness import probe_attachments
from shmheap.lock import MUTEX_TIMEOUT
from shmheap.pytest_plugin import HeapFactory

ARENA = 1 << 20
THREADS = 4


@pytest.fixture
def heap(shm_heap_factory: HeapFactory) -> shmheap.Heap:
    return shm_heap_factory(arena_size=ARENA, reserve=False)


@pytest.fixture(autouse=True)
def quick_switches() -> Iterator[None]:
    """Make the GIL change hands every few bytecodes, so threads interleave everywhere."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    with warnings.catch_warnings():
        # 3.12+ warns that fork() in a process with threads may deadlock: that is the case
        # under test (the warning is about locks of other libraries).
        warnings.simplefilter("ignore", DeprecationWarning)
        yield
    sys.setswitchinterval(before)


def pattern(ref: int, size: int) -> bytes:
    word = ((ref * 0x9E3779B97F4A7C15) & (2**64 - 1)).to_bytes(8, "little")
    return (word * (size // 8 + 1))[:size]


def run_threads(body: Callable[[int], object], count: int = THREADS) -> list[object]:
    """``body(i)`` in ``count`` threads started together; their results; re-raises an error."""
    start = threading.Barrier(count)
    results: list[object] = [None] * count
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            start.wait()
            results[i] = body(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


# -- threads --------------------------------------------------------------------------------


def test_threads_hammering_one_handle_get_distinct_intact_objects(heap: shmheap.Heap) -> None:
    sizes = (16, 64, 200, 1000, 5000, 40000)  # small classes and a large object
    everyones: set[int] = set()  # every live object of every thread
    guard = threading.Lock()
    twice: list[int] = []

    def hammer(t: int) -> dict[int, int]:
        live: dict[int, int] = {}
        for i in range(1500):
            size = sizes[i % len(sizes)]
            ref = heap.alloc(size)
            with guard:
                if ref in everyones:
                    twice.append(ref)
                everyones.add(ref)
            heap.view(ref)[:] = pattern(ref, heap.nbytes(ref))
            live[ref] = heap.nbytes(ref)
            if i % 3 == 2:  # free the oldest, checking it first
                old = next(iter(live))
                assert bytes(heap.view(old)) == pattern(old, live.pop(old))
                with guard:
                    everyones.discard(old)
                heap.free(old)
            if i % 100 == 0:
                assert len(heap.snapshot()) >= 1
                root = heap.alloc(32)
                heap.roots[f"root{t}"] = root
                assert heap.roots[f"root{t}"] == root
                del heap.roots[f"root{t}"]
                heap.free(root)
            if i % 500 == 0:
                heap.grow()
        return live

    results = run_threads(hammer)
    assert twice == [], "live objects were handed out again"
    lives = [r for r in results if isinstance(r, dict)]
    assert len(lives) == THREADS
    everything = [ref for live in lives for ref in live]
    assert len(set(everything)) == len(everything), "an object was handed out twice"
    for live in lives:
        for ref, size in live.items():
            assert bytes(heap.view(ref)) == pattern(ref, size)
    assert heap.check() == []


def test_threads_dropping_arenas_at_once_keep_the_mapping_tally_exact(
        heap: shmheap.Heap, monkeypatch: pytest.MonkeyPatch) -> None:
    """Arenas pinned past the cache (keep 8 of a limit of 16) are let go by every thread at
    once, round after round: the weak refs' callbacks run in all of them together, and
    the tally the budget is checked against must stay what /proc/self/maps shows."""
    for _ in range(THREADS * 6):
        heap.grow()
    name = heap.name
    heap.close()  # (only the handle under test maps arenas from here on)
    monkeypatch.setenv("SHMHEAP_MAX_MAPPINGS", "16")
    rounds = 40
    start, dropped = threading.Barrier(THREADS), threading.Barrier(THREADS)
    errors: list[BaseException] = []
    most: list[int] = []

    def arena_mappings() -> int:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            return sum(f"/dev/shm/shmheap.{name}.a" in line for line in maps)

    with shmheap.Heap.attach(name) as h:
        def work(t: int) -> None:
            try:
                for r in range(rounds):
                    start.wait(timeout=60)
                    first = 1 + (t * 6 + r * 3) % (THREADS * 6)
                    held = [h.arena(1 + (first - 1 + k) % (THREADS * 6)) for k in range(3)]
                    most.append(h._pages.mapped)
                    dropped.wait(timeout=60)
                    del held  # every thread at once
            except BaseException as exc:  # (reported below)
                errors.append(exc)
                start.abort()
                dropped.abort()

        threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert max(most) > 8, "arenas were pinned past the 8 the cache keeps"
        assert h._pages.mapped == arena_mappings() == len(h._pages.recent)


def test_threads_grow_one_handle_at_once(heap: shmheap.Heap) -> None:
    results = run_threads(lambda _t: [heap.grow().index for _ in range(10)])
    indices = [i for r in results if isinstance(r, list) for i in r]
    assert len(indices) == 10 * THREADS and len(set(indices)) == len(indices)
    assert sorted(heap.snapshot()) == sorted(indices)
    assert heap.check() == []


def test_threads_snapshot_walk_and_bind_while_others_allocate(heap: shmheap.Heap) -> None:
    def body(t: int) -> int:
        if t % 2:
            refs = [heap.alloc(48) for _ in range(2000)]
            for ref in refs:
                heap.free(ref)
            return len(refs)
        done = 0
        for i in range(200):
            heap.stats()
            sum(1 for _ in heap.walk())
            heap.roots[f"r{t}.{i % 7}"] = heap.alloc(16)
            done += len(heap.roots) > 0
        return done

    assert run_threads(body) == [200, 2000, 200, 2000]
    assert len(heap.roots) == 14
    assert heap.check() == []


def test_a_locked_block_is_its_threads_alone(heap: shmheap.Heap) -> None:
    """Another thread's call waits for the block: it neither piggy-backs on its hold nor posts."""
    counter = heap.alloc(8)
    inside = threading.Event()
    other_done = threading.Event()
    seen_inside: list[bool] = []
    in_block = [False]

    def other() -> None:
        inside.wait()
        with heap.locked():
            seen_inside.append(in_block[0])
            view = heap.view(counter)
            view[:8] = (int.from_bytes(view[:8], "little") + 1).to_bytes(8, "little")
        other_done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with heap.locked():
        in_block[0] = True
        inside.set()
        # If the other thread got in now, it would see in_block; give it the chance.
        other_done.wait(timeout=0.5)
        view = heap.view(counter)
        view[:8] = (int.from_bytes(view[:8], "little") + 1).to_bytes(8, "little")
        in_block[0] = False
    thread.join()
    assert seen_inside == [False]
    assert int.from_bytes(heap.view(counter)[:8], "little") == 2
    assert heap._lock.semaphore_value() == 1


def test_close_waits_for_another_threads_block(heap: shmheap.Heap) -> None:
    """A close from another thread neither releases nor cuts short a thread's open block."""
    other = shmheap.Heap.attach(heap.name)
    entered, leave = threading.Event(), threading.Event()
    closed = threading.Event()
    timed_out: list[bool] = []

    def hold() -> None:
        with heap.locked():
            entered.set()
            leave.wait()

    def close() -> None:
        heap.close()
        closed.set()

    holder = threading.Thread(target=hold)
    holder.start()
    entered.wait()
    closer = threading.Thread(target=close)
    closer.start()
    closed.wait(timeout=0.5)  # a close that did not wait would be done by now
    assert not closed.is_set(), "close() must wait for the locked() block of another thread"
    try:
        with other.locked(timeout=0):
            timed_out.append(False)
    except shmheap.LockTimeoutError:
        timed_out.append(True)
    leave.set()
    holder.join()
    closer.join()
    assert timed_out == [True], "the block's hold was released under it"
    assert heap.closed
    assert other._lock.semaphore_value() == 1
    other.close()


# -- timeout= bounds the wait for another thread of the handle ---------------------------------

#: seconds a call waits for another thread's hold in these tests
WAIT = 0.2


class Stall:
    """Pickled by ``heap.put``, under the handle's mutex: says so, then waits to be let go."""

    def __init__(self, inside: threading.Event, leave: threading.Event) -> None:
        self.inside, self.leave = inside, leave

    def __reduce__(self) -> tuple[type[int], tuple[int]]:
        self.inside.set()
        self.leave.wait()
        return int, (0,)


def hold_in_thread(heap: shmheap.Heap, how: str) -> tuple[threading.Thread, threading.Event]:
    """A thread holding ``heap`` (a ``locked()`` block, or a call that holds the mutex), once
    this returns; set the event returned to let it go."""
    inside, leave = threading.Event(), threading.Event()

    def hold() -> None:
        if how == "locked":
            with heap.locked():
                inside.set()
                leave.wait()
        else:
            heap.free(heap.put(Stall(inside, leave)))

    thread = threading.Thread(target=hold)
    thread.start()
    inside.wait()
    return thread, leave


def calls_with_timeout(heap: shmheap.Heap, how: str) -> dict[str, Callable[[float], object]]:
    """Public calls that take ``timeout=``, each needing what the holder ``how`` holds (a
    ``locked()`` block of the pure core keeps the heap lock, not the mutex: calls that need
    no lock, a small alloc from this process's span say, go on beside it)."""
    large, bound = heap.alloc(ARENA // 4), heap.alloc(8)

    def locked(timeout: float) -> None:
        with heap.locked(timeout=timeout):
            pass

    calls: dict[str, Callable[[float], object]] = {
        "alloc large": lambda t: heap.free(heap.alloc(ARENA // 4, timeout=t)),
        "free large": lambda t: heap.free(large, timeout=t),
        "snapshot": lambda t: heap.snapshot(timeout=t),
        "grow": lambda t: heap.grow(timeout=t),
        "check": lambda t: heap.check(timeout=t),
        "info": lambda t: heap.info(timeout=t),
        "put large": lambda t: heap.free(heap.put(bytes(ARENA // 4), timeout=t)),
        "roots.bind": lambda t: heap.roots.bind("r", bound, timeout=t),
        "locked": locked,
        "reclaim": lambda t: heap.reclaim(timeout=t),
    }
    if how == "call" or shmheap.core.native is not None:  # the mutex itself is held
        small = heap.alloc(64)
        calls.update({
            "alloc": lambda t: heap.free(heap.alloc(64, timeout=t)),
            "view": lambda t: heap.view(small, timeout=t),
            "nbytes": lambda t: heap.nbytes(small, timeout=t),
            "stats": lambda t: heap.stats(timeout=t),
            "walk": lambda t: list(heap.walk(timeout=t)),
            "size_of": lambda t: heap.size_of(small, timeout=t),
            "put": lambda t: heap.free(heap.put(1, timeout=t)),
        })
    return calls


@pytest.mark.parametrize("how", ["locked", "call"])
def test_timeout_bounds_the_wait_for_another_thread(heap: shmheap.Heap, how: str) -> None:
    """While another thread holds the handle, every call with ``timeout=`` raises
    LockTimeoutError once it has passed, and the handle stays usable: the same calls go
    through once the holder has let go."""
    calls = calls_with_timeout(heap, how)
    grown = len(heap.snapshot())
    holder, leave = hold_in_thread(heap, how)
    failed: dict[str, str] = {}
    errors: list[BaseException] = []

    def other() -> None:  # (not the test's thread: the holder may be it in a later test)
        try:
            for name, call in calls.items():
                try:
                    call(WAIT)
                except shmheap.LockTimeoutError as exc:
                    failed[name] = str(exc)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    leave.set()
    holder.join()
    assert not errors
    assert failed == dict.fromkeys(calls, MUTEX_TIMEOUT)
    assert len(heap.snapshot()) == grown, "a grow that timed out published its arena"
    for call in calls.values():
        call(WAIT)
    assert heap.check() == []
    assert heap._lock.semaphore_value() == 1


@pytest.mark.parametrize("how", ["locked", "call"])
def test_a_queues_timeout_bounds_the_wait_for_another_thread(heap: shmheap.Heap,
                                                             how: str) -> None:
    """A queue's ``put``/``get`` with ``timeout=`` say ``queue.Full``/``queue.Empty`` once it
    has passed while another thread holds the handle (as for another process's hold of the
    lock), and lose nothing: after the holder has let go, every item put comes out."""
    q = heap.queue("q")
    q.put(1)
    holder, leave = hold_in_thread(heap, how)
    raised: list[type[BaseException]] = []

    def other() -> None:
        calls: list[Callable[[], object]] = [
            lambda: q.put(2, timeout=WAIT), lambda: q.put(b"x" * 8000, timeout=WAIT),
            lambda: q.get(timeout=WAIT)]
        for call in calls:
            try:
                call()
            except BaseException as exc:
                raised.append(type(exc))

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    leave.set()
    holder.join()
    assert raised == [queue.Full, queue.Full, queue.Empty]
    q.put(3, timeout=WAIT)
    assert [q.get(timeout=0), q.get(timeout=0)] == [1, 3]
    assert len(q) == 0
    assert heap.check() == []


class Alarm(TimeoutError):
    pass


def raise_alarm(signum: int, frame: object) -> None:
    raise Alarm


@pytest.mark.parametrize("call", ["get", "put"])
def test_a_handlers_timeout_error_in_a_queues_mutex_wait_propagates(heap: shmheap.Heap,
                                                                   call: str) -> None:
    """A signal handler's TimeoutError while a ``get`` or ``put`` waits for another thread's
    hold of the handle comes out as it is, the queue as it was (the native get once took it
    for the wait's deadline, went on in Python and returned the item once the holder let
    go, and the native put stored its item then; the pure get said queue.Empty)."""
    q = heap.queue("q")
    q.put(7)
    holder, leave = hold_in_thread(heap, "locked")
    rescue = threading.Timer(30, leave.set)  # (so that a call that waits on fails, not hangs)
    rescue.start()
    old = signal.signal(signal.SIGALRM, raise_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, WAIT)
        with pytest.raises(Alarm):
            q.get() if call == "get" else q.put(8)
        assert not leave.is_set(), "the call waited for the holder to let go (or the rescue)"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        leave.set()
        holder.join()
        rescue.cancel()
    assert len(q) == 1 and q.get(timeout=0) == 7
    assert heap.check() == []


@pytest.mark.parametrize("how", ["locked", "call"])
def test_no_timeout_waits_for_the_other_thread(heap: shmheap.Heap, how: str) -> None:
    """``timeout=None`` waits until the holder lets go, then goes through."""
    holder, leave = hold_in_thread(heap, how)
    done = threading.Event()
    got: list[object] = []

    def other() -> None:
        got.append(heap.alloc(ARENA // 4))
        got.append(heap.snapshot())
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    done.wait(timeout=WAIT)  # a call that did not wait would be done by now
    assert not done.is_set(), "a call without a timeout went on beside another thread's hold"
    leave.set()
    holder.join()
    thread.join()
    assert len(got) == 2
    heap.free(got[0])  # type: ignore[arg-type]


def test_timeout_zero_fails_at_once_for_another_thread_not_for_the_holder(
        heap: shmheap.Heap) -> None:
    """``timeout=0`` in another thread raises at once; in the holding thread, inside its own
    block, the same calls go through (the mutex and the hold are reentrant)."""
    inside, leave = threading.Event(), threading.Event()
    own: list[object] = []

    def hold() -> None:
        with heap.locked():
            own.append(heap.snapshot(timeout=0))
            own.append(heap.alloc(ARENA // 4, timeout=0))
            own.append(heap.info(timeout=0))
            inside.set()
            leave.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    inside.wait()
    try:
        for call in (lambda: heap.snapshot(timeout=0), lambda: heap.grow(timeout=0),
                     lambda: heap.alloc(ARENA // 4, timeout=0)):
            with pytest.raises(shmheap.LockTimeoutError, match="another thread"):
                call()
    finally:
        leave.set()
        holder.join()
    assert len(own) == 3
    heap.free(own[1])  # type: ignore[arg-type]
    assert heap.check() == []


class Interrupted(Exception):
    """What the signal handler of ``test_a_signal_handler_raising_ends_the_wait`` raises."""


@pytest.mark.parametrize("how", ["locked", "call"])
def test_signal_handlers_run_while_waiting_for_another_thread(heap: shmheap.Heap,
                                                              how: str) -> None:
    """A call waiting for another thread's hold of the handle runs this process's signal
    handlers meanwhile (the holder lets go once they have run ten times), then goes on."""
    holder, leave = hold_in_thread(heap, how)
    calls = [0]

    def counted(signum: int, frame: object) -> None:
        calls[0] += 1
        if calls[0] == 10:
            leave.set()

    previous = signal.signal(signal.SIGALRM, counted)
    signal.setitimer(signal.ITIMER_REAL, 0.005, 0.005)
    try:
        snap = heap.snapshot(timeout=None)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        leave.set()
        holder.join()
    assert calls[0] >= 10
    assert list(snap) == list(heap.snapshot(timeout=0))


@pytest.mark.parametrize("how", ["locked", "call"])
def test_a_signal_handler_raising_ends_the_wait(heap: shmheap.Heap, how: str) -> None:
    """A signal handler's exception comes out of a call waiting for another thread's hold,
    with nothing taken: once the holder lets go, another thread has the handle at once."""
    holder, leave = hold_in_thread(heap, how)

    def raising(signum: int, frame: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, raising)
    signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
    try:
        with pytest.raises(Interrupted):
            heap.snapshot(timeout=30)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        leave.set()
        holder.join()
    got: list[object] = []
    other = threading.Thread(target=lambda: got.append(heap.info(timeout=0)))
    other.start()
    other.join()
    assert len(got) == 1, "the interrupted wait left the handle taken"
    assert heap._lock.semaphore_value() == 1


def test_a_handles_mutex_takes_a_timeout() -> None:
    """``new_mutex()`` (the native core's Mutex, or threading.RLock) waits at most
    ``timeout`` for another thread, and is reentrant for its holder at any timeout."""
    mutex = new_mutex()
    inside, leave = threading.Event(), threading.Event()
    got: list[bool] = []

    def hold() -> None:
        with mutex:
            got.append(mutex.acquire(True, 0))
            mutex.release()
            inside.set()
            leave.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    inside.wait()
    got += [mutex.acquire(True, WAIT), mutex.acquire(False), mutex.acquire(True, 0)]
    leave.set()
    holder.join()
    got.append(mutex.acquire(True, WAIT))
    mutex.release()
    assert got == [True, False, False, False, True]
    for bad in ((False, 1.0), (True, -2.0)):
        with pytest.raises(ValueError):
            mutex.acquire(*bad)


# -- fork -----------------------------------------------------------------------------------


def in_child(body: Callable[[], bytes], wait_for_parent: bool = False,
             then: Callable[[], object] = lambda: None) -> tuple[int, bytes, int]:
    """Fork; the child runs ``body`` and writes its verdict.  Returns (pid, verdict, fd).

    The parent calls ``then()`` right after the fork, before it reads the
    verdict.  With ``wait_for_parent`` the child stays until the parent
    writes to the returned descriptor (else that is -1).
    """
    verdict_r, verdict_w = os.pipe()
    go_r, go_w = os.pipe() if wait_for_parent else (-1, -1)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(verdict_r)
            try:
                verdict = body()
            except BaseException as exc:
                verdict = f"raised {type(exc).__name__}: {exc}".encode()
            os.write(verdict_w, verdict + b"\n")
            if go_r >= 0:
                os.read(go_r, 1)
            status = 0
        finally:
            os._exit(status)
    os.close(verdict_w)
    if go_r >= 0:
        os.close(go_r)
    then()
    with os.fdopen(verdict_r, "rb") as f:
        line = f.readline().rstrip(b"\n")
    return pid, line, go_w


def reap(pid: int, go: int = -1) -> None:
    if go >= 0:
        os.write(go, b"x")
        os.close(go)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def add_locked(heap: shmheap.Heap, counter: int, times: int) -> None:
    """``times`` increments of the word at ``counter``, each a read and a write under the lock."""
    for _ in range(times):
        with heap.locked():
            view = heap.view(counter)
            value = int.from_bytes(view[:8], "little")
            view[:8] = (value + 1).to_bytes(8, "little")


@pytest.mark.parametrize("holder", ["another thread", "another thread's call",
                                    "the forking thread"])
def test_fork_inside_the_lock_child_inherits_no_hold(heap: shmheap.Heap, holder: str) -> None:
    """The child neither runs unlocked nor posts the parent's hold (``check()`` and every
    other call hold the lock as ``run`` does: "another thread's call")."""
    counter = heap.alloc(8)
    heap.view(counter)  # mapped before the fork
    entered, leave = threading.Event(), threading.Event()

    def inside() -> None:
        entered.set()
        leave.wait()

    def hold() -> None:
        if holder == "another thread's call":
            heap._lock.run(inside)
            return
        with heap.locked():
            inside()

    def child() -> bytes:
        if heap._lock.holding:  # type: ignore[union-attr]
            return b"child inherited the hold"
        add_locked(heap, counter, 200)
        heap.close()
        return b"ok"

    if holder != "the forking thread":
        thread = threading.Thread(target=hold)
        thread.start()
        entered.wait()
        pid, verdict, _ = in_child(child, then=leave.set)
        thread.join()
    else:
        verdict_r, verdict_w = os.pipe()
        pid = -1
        try:
            with heap.locked():
                pid = os.fork()
            if pid == 0:  # the block closed in the child without posting
                os.write(verdict_w, child() + b"\n")
        finally:
            if pid == 0:
                os._exit(0)
        os.close(verdict_w)
        with os.fdopen(verdict_r, "rb") as f:
            verdict = f.readline().rstrip(b"\n")
    assert verdict == b"ok"
    add_locked(heap, counter, 200)
    reap(pid)
    assert int.from_bytes(heap.view(counter)[:8], "little") == 400
    assert heap._lock.semaphore_value() == 1
    assert heap.check() == []


def _mp_child(heap: shmheap.Heap, counter: int) -> None:
    add_locked(heap, counter, 100)
    ref = heap.alloc(64)
    heap.view(ref)[:] = pattern(ref, 64)
    heap.roots["from-child"] = ref


def test_multiprocessing_fork_child_with_a_thread_inside_the_lock(heap: shmheap.Heap) -> None:
    counter = heap.alloc(8)
    entered, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with heap.locked():
            entered.set()
            leave.wait()

    thread = threading.Thread(target=hold)
    thread.start()
    entered.wait()
    process = multiprocessing.get_context("fork").Process(target=_mp_child, args=(heap, counter))
    process.start()
    leave.set()
    thread.join()
    add_locked(heap, counter, 100)
    process.join(timeout=120)
    assert process.exitcode == 0
    assert int.from_bytes(heap.view(counter)[:8], "little") == 200
    ref = heap.roots["from-child"]
    assert bytes(heap.view(ref)) == pattern(ref, 64)
    assert heap._lock.semaphore_value() == 1
    assert heap.check() == []


def test_fork_after_destroy_child_gets_heap_not_found(shm_heap_name: str) -> None:
    heap = shmheap.Heap.create(shm_heap_name, arena_size=ARENA, reserve=False)
    heap.free(heap.alloc(64))
    saved_alloc = heap.alloc  # (the native core's fast path, with the parent's span cached)
    try:
        shmheap.destroy(shm_heap_name)

        def child() -> bytes:
            outcomes = []
            for call in (lambda: saved_alloc(64), heap.snapshot, heap.info, heap.check,
                         lambda: heap.roots.get("x"), lambda: heap.locked().__enter__()):
                try:
                    call()
                    outcomes.append("worked")
                except shmheap.HeapNotFoundError:
                    outcomes.append("not-found")
                except Exception as exc:
                    outcomes.append(type(exc).__name__)
            return ",".join(outcomes).encode()

        pid, verdict, _ = in_child(child)
        reap(pid)
        assert verdict == b",".join([b"not-found"] * 6)
    finally:
        heap.close()


def test_fork_after_destroy_and_recreate_child_claims_no_slot(shm_heap_name: str) -> None:
    old = shmheap.Heap.create(shm_heap_name, arena_size=ARENA, reserve=False)
    try:
        shmheap.destroy(shm_heap_name)
        # The new heap, attached by nobody: any slot taken in it is the old handle's.
        shmheap.Heap.create(shm_heap_name, arena_size=ARENA, reserve=False).close()

        def child() -> bytes:
            try:
                old.snapshot()
            except shmheap.HeapNotFoundError:
                return b"not-found"
            return b"worked"

        pid, verdict, go = in_child(child, wait_for_parent=True)
        try:
            assert verdict == b"not-found"
            assert probe_attachments(shm_heap_name) == []
        finally:
            reap(pid, go)
        with shmheap.Heap.attach(shm_heap_name) as new:
            assert new.check() == []
    finally:
        old.close()
        shmheap.destroy(shm_heap_name)


def test_forked_child_handle_works_with_a_slot_of_its_own(heap: shmheap.Heap) -> None:
    parent_slot = heap._live.slot  # type: ignore[union-attr]

    def child() -> bytes:
        assert heap._live is not None
        slot = heap._live.slot
        ref = heap.alloc(100)
        heap.view(ref)[:] = pattern(ref, heap.nbytes(ref))
        heap.roots["child"] = ref
        return f"{slot} {os.getpid()}".encode()

    pid, verdict, go = in_child(child, wait_for_parent=True)
    try:
        slot, child_pid = map(int, verdict.split())
        assert slot != parent_slot
        assert heap._live is not None
        assert {a.slot for a in heap._live.attachments() if a.pid == child_pid} == {slot}
        assert parent_slot in {a.slot for a in heap._live.attachments()}
    finally:
        reap(pid, go)
    ref = heap.roots["child"]
    assert bytes(heap.view(ref)) == pattern(ref, heap.nbytes(ref))
    assert heap.check() == []
