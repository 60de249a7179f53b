"""Interrupted, signalled, stopped and exiting processes never leave a heap stuck or dirty.

Every fault is injected for real in fresh interpreters: KeyboardInterrupt at every
crash point (SHMHEAP_RAISE_AT) and at random bytecodes (a storm of SIGINTs), Python
signal handlers on lock waiters, processes that exit without closing, processes
stopped at a crash point (SHMHEAP_STOP_AT), a semaphore posted once too often.
After each, the interrupted process carries on, nobody else waits longer than the
lock poll, and ``check()`` is clean once a writable lock holder has come by.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import posix_ipc
import pytest
from children import Child, assert_killed, process_state, run_child, wait_until

import shmheap
from shmheap.names import semaphore_name
from shmheap.pytest_plugin import HeapFactory
from shmheap.tools import collect
from shmheap.tools.bench import faults

ARENA = 256 * 1024
PAGE = 8192
#: generous bound for anything that must not block: a stuck lock fails the test, not the run
NOT_STUCK = 5.0

#: Allocator steps that pass every span and cache crash point (see test_allocator.py).
ALLOC_STEPS = """
from shmheap.allocator import SPARE_SPANS
per = h._objects().classes[h._objects().lookup[(3000 + 15) >> 4]].nelems
a = [h.alloc(3000) for _ in range((SPARE_SPANS + 2) * per + 2)]  # (spares kept, two given up)
for ref in a[:per]:
    h.free(ref)
h.free(h.alloc(50000))
b = [h.alloc(3000) for _ in range(per)]
"""

#: Root steps that pass every roots crash point (test_roots.py's STEPS): a lookup maps the
#: table, so that the first bind and unbind of a small object are the native core's writer's
#: there; a rebind to a large object and its unbind; names past the first table's half.
ROOT_STEPS = """
small, large = h.alloc(100), h.alloc(50000)
"x" in h.roots
h.roots["x"] = small
del h.roots["x"]
h.roots["x"] = small
h.roots["x"] = large
del h.roots["x"]
for i in range(140):
    h.roots[f"n{i}"] = small
"""

#: Giant steps that pass every giant crash point: an object over a free arena and two new
#: ones (claimed, grown, made), then freed.
GIANT_STEPS = """
h.grow()
h.free(h.alloc(2 * h.arena_size + 5000))
"""

#: Named steps that pass the named crash point: an object made and bound as one step.
NAMED_STEPS = """
h.put([1, 2], root="x")
"""

#: Coordination steps that pass every coordination crash point: make a queue, put and get
#: an item stored with put(), lease and finish, lease and raise (the item goes back), set an
#: event, pass, reset and leave a barrier.
COORD_STEPS = """
q = h.queue("faults")
q.put(b"x" * 5000)
q.get()
q.put(2)
with q.lease():
    pass
q.put(3)
try:
    with q.lease():
        raise ValueError
except ValueError:
    pass
h.event("faults-event").set()
h.barrier("faults-barrier", 1).wait()
h.barrier("faults-barrier", 1).reset()
h.barrier("faults-barrier", 1).leave()
"""

#: crash point prefix or name -> (parent setup, child operation, K: the passage to raise at)
OPERATIONS: dict[str, tuple[str, str, int]] = {
    "lock": ("", "h.grow()", 1),      # (attach takes the lock only to recycle dead slots)
    "snapshot": ("", "h.snapshot()", 1),
    "grow": ("", "h.grow()", 1),
    "index.entry_written": ("", "h.grow()", 1),
    "index.published": ("", "h.grow()", 1),
    "index.generation_created": ("fill", "h.grow()", 1),
    "index.generation_copied": ("fill", "h.grow()", 1),
    "create": ("", "shmheap.Heap.create(OTHER, arena_size=65536, reserve=False)", 1),
    "repair.adopted": ("dead-holder", "h.snapshot()", 1),
    "span": ("", ALLOC_STEPS, 1),
    "cache": ("", ALLOC_STEPS, 1),
    "summary": ("", ALLOC_STEPS, 2),  # (the first passage is the grow before the first span)
    "summary.leaf_cleared": ("", ALLOC_STEPS, 1),
    "scavenge": ("", "h.free(h.alloc(50000)); h.scavenge()", 1),
    "cycle.started": ("", "h.start_cycle()", 1),
    "sweep.claimed": ("", "h.free(h.alloc(100)); h.start_cycle(); h.sweep()", 1),
    "roots": ("", ROOT_STEPS, 1),
    "giant": ("", GIANT_STEPS, 1),
    "named": ("", NAMED_STEPS, 1),
    "coord": ("", COORD_STEPS, 1),
}


def operation(point: str) -> tuple[str, str, int]:
    return OPERATIONS.get(point) or OPERATIONS[point.split(".")[0]]


def test_every_crash_point_has_an_operation() -> None:
    assert all(operation(point) for point in shmheap.CRASH_POINTS)


@pytest.fixture
def heap(shm_heap_factory: HeapFactory) -> shmheap.Heap:
    return shm_heap_factory(arena_size=ARENA, page_size=PAGE, reserve=False)


def kill_a_lock_holder(name: str) -> None:
    """A process dies holding the heap lock (it dies at its grow's lock hold)."""
    assert_killed(run_child(f"""
        import shmheap
        shmheap.Heap.attach({name!r}).grow()
        """, "lock.owned"))


def assert_not_stuck(heap: shmheap.Heap) -> None:
    """Readers and writers get the lock at once; the next writer leaves the heap clean."""
    heap.snapshot(timeout=NOT_STUCK)
    with heap.locked(timeout=NOT_STUCK):
        pass
    assert heap.check(timeout=NOT_STUCK) == []


@pytest.mark.parametrize("point", sorted(shmheap.CRASH_POINTS))
def test_keyboard_interrupt_at_every_crash_point(heap: shmheap.Heap, shm_heap_name: str,
                                                 point: str) -> None:
    setup, op, passage = operation(point)
    if setup == "fill":
        for _ in range(heap.info().index_cap - len(heap.snapshot())):
            heap.grow()
    elif setup == "dead-holder":
        kill_a_lock_holder(heap.name)
    published = list(heap.snapshot(timeout=NOT_STUCK) if setup != "dead-holder" else [])
    code = faults.CARRY_ON + f"""
OTHER = {shm_heap_name!r}
h = shmheap.Heap.attach({heap.name!r})
try:
{_indent(op)}
except KeyboardInterrupt as exc:
    assert "SHMHEAP_RAISE_AT" in str(exc), exc
else:
    raise SystemExit("crash point {point} was never reached")
print("interrupted", flush=True)
sys.stdin.readline()
if {point.startswith("create")!r}:
    assert not [e for e in os.listdir("/dev/shm") if OTHER in e], "a half-made heap was left"
    shmheap.Heap.create(OTHER, arena_size=65536).destroy()
print(json.dumps(carry_on(h)), flush=True)
h.close()
"""
    with Child(code, raise_at=f"{point}:{passage}") as child:
        assert child.line() == "interrupted"
        assert_not_stuck(heap)  # the interrupted process lives on, holding nothing
        child.send()
        grown = json.loads(child.line())
        assert child.wait() == 0, child.stderr()
    snap = list(heap.snapshot())
    assert snap[:len(published)] == published, "a published arena was lost"
    assert grown in snap
    assert heap.check() == []


def _indent(code: str) -> str:
    return "\n".join("    " + line for line in code.strip().splitlines())


# -- a storm of SIGINTs ---------------------------------------------------------------------

def test_sigint_storm_leaves_nothing_stuck_lost_or_dirty(heap: shmheap.Heap) -> None:
    seed = random.randrange(1 << 30)
    counts = faults.storm(heap.name, seconds=4.0, seed=seed)
    print(f"seed {seed}: {counts}")
    assert counts["interrupts"] > 20, "the storm did not interrupt the heap calls"
    assert counts["missing"] == 0 and counts["bad_patterns"] == 0, "an object was lost"
    assert counts["observer"]["stuck"] == 0, "another process waited longer than it should"
    assert heap.check() == []


# -- Python signal handlers on lock waiters ---------------------------------------------------

WAITER = """
import json, os, signal, subprocess, sys, time, shmheap
calls = []

def counted(signum, frame):
    calls.append(signum)

class Alarm(Exception):
    pass

def raising(signum, frame):
    raise Alarm

for sig in (signal.SIGALRM, signal.SIGCHLD, signal.SIGUSR1):
    signal.signal(sig, counted)
h = shmheap.Heap.attach({name!r})
print("ready", flush=True)
sys.stdin.readline()                                          # the holder holds the lock
signal.setitimer(signal.ITIMER_REAL, 0.003, 0.003)            # SIGALRM every 3 ms
children = [subprocess.Popen(["true"]) for _ in range(3)]     # SIGCHLD
print("waiting", flush=True)
results = {{}}

def locked():
    with h.locked(timeout=60):
        pass

for what, call in (("snapshot", lambda: h.snapshot(timeout=60)),
                   ("alloc", lambda: h.alloc(100, timeout=60)), ("locked", locked)):
    try:
        call()
        results[what] = "ok"
    except BaseException as exc:
        results[what] = repr(exc)
signal.setitimer(signal.ITIMER_REAL, 0)
for child in children:
    child.wait()
results["signals"] = len(calls)
print(json.dumps(results), flush=True)
sys.stdin.readline()                                          # the holder holds again
signal.signal(signal.SIGALRM, raising)
signal.setitimer(signal.ITIMER_REAL, 0.05)
try:
    h.snapshot(timeout=60)
    print("no exception", flush=True)
except Alarm:
    print("alarm", len(h._lock.held), flush=True)
sys.stdin.readline()                                          # time a deadline under signals
signal.signal(signal.SIGALRM, counted)
signal.setitimer(signal.ITIMER_REAL, 0.002, 0.002)
start = time.monotonic()
try:
    h.grow(timeout=0.3)
    print("grew", flush=True)
except shmheap.LockTimeoutError:
    print("timeout", round(time.monotonic() - start, 3), flush=True)
signal.setitimer(signal.ITIMER_REAL, 0)
h.close()
"""

HOLDER = """
import sys, shmheap
h = shmheap.Heap.attach({name!r})
while sys.stdin.readline().strip() == "hold":
    with h.locked():
        print("holding", flush=True)
        sys.stdin.readline()
    print("released", flush=True)
"""


def test_signal_handlers_on_waiters_run_and_the_wait_goes_on(heap: shmheap.Heap) -> None:
    with Child(HOLDER.format(name=heap.name)) as holder, \
            Child(WAITER.format(name=heap.name)) as waiter:
        assert waiter.line() == "ready"
        holder.send("hold")
        assert holder.line() == "holding"
        waiter.send()
        assert waiter.line() == "waiting"
        for _ in range(20):
            os.kill(waiter.pid, signal.SIGUSR1)
        assert waiter.silent_for(0.3), "the waiter must still be waiting for the holder"
        holder.send()                       # let go: the three calls go through in turn
        assert holder.line() == "released"
        results = json.loads(waiter.line())
        assert results["snapshot"] == results["alloc"] == results["locked"] == "ok", results
        assert results["signals"] > 20, "the handlers ran while the waiter waited"
        # A handler that raises: its exception comes out of the wait, nothing stays held.
        holder.send("hold")
        assert holder.line() == "holding"
        waiter.send()
        assert waiter.line() == "alarm 0"
        # The deadline holds however many handlers run meanwhile.
        waiter.send()
        verdict = waiter.line().split()
        assert verdict[0] == "timeout" and 0.3 <= float(verdict[1]) < 0.3 + NOT_STUCK
        holder.send()
        assert holder.line() == "released"
        holder.send("stop")
        assert waiter.wait() == 0 and holder.wait() == 0, waiter.stderr() + holder.stderr()
    assert_not_stuck(heap)


QUEUE_WAITER = """
import queue, signal, sys, shmheap

class Alarm(TimeoutError):
    pass

def raising(signum, frame):
    raise Alarm

h = shmheap.Heap.attach({name!r})
q = h.queue("q")
q.put(7)
print("ready", flush=True)
sys.stdin.readline()                                          # the holder holds the lock
signal.signal(signal.SIGALRM, raising)
signal.setitimer(signal.ITIMER_REAL, 0.05)
try:
    print("got", q.get(), flush=True)
except Alarm:
    print("alarm", flush=True)
except queue.Empty:
    print("empty", flush=True)
sys.stdin.readline()                                          # the holder let go
print("left", len(q), q.get(timeout=0), flush=True)
h.close()
"""


def test_a_handlers_timeout_error_in_a_queues_lock_wait_propagates(heap: shmheap.Heap) -> None:
    """A signal handler that raises a TimeoutError while a ``get`` waits for the heap lock:
    the exception comes out and the item stays queued (the native queue once took it for its
    own deadline and waited on in Python, then returned the item; the pure one said
    queue.Empty)."""
    with Child(HOLDER.format(name=heap.name)) as holder, \
            Child(QUEUE_WAITER.format(name=heap.name)) as waiter:
        assert waiter.line() == "ready"
        holder.send("hold")
        assert holder.line() == "holding"
        waiter.send()
        assert waiter.line(timeout=NOT_STUCK) == "alarm"
        holder.send()
        assert holder.line() == "released"
        waiter.send()
        assert waiter.line() == "left 1 7"
        holder.send("stop")
        assert waiter.wait() == 0 and holder.wait() == 0, waiter.stderr() + holder.stderr()
    assert_not_stuck(heap)


# -- processes that exit without closing ---------------------------------------------------

def test_many_exits_without_close_are_no_finding(heap: shmheap.Heap) -> None:
    """Workers that attach, allocate, grow and exit without close(): fsck exits 0."""
    code = faults.EXITS.format(name=heap.name, count=150)
    for _ in range(2):  # two fresh interpreters, each forking its short-lived workers
        assert run_child(code).returncode == 0
    assert len(heap._live.dead_slots()) > 100  # type: ignore[union-attr]
    result = subprocess.run([sys.executable, "-m", "shmheap", "fsck", heap.name],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "clean" in result.stdout
    assert heap._live.dead_slots() == []  # type: ignore[union-attr]
    assert [a.pid for a in heap._live.attachments()] == [os.getpid()]  # type: ignore[union-attr]
    assert heap.stats().cached_spans > 0, "the dead workers' spans stay until reclaimed"
    assert heap.check(repair=True) == []
    assert heap.stats().cached_spans == 0


def test_fsck_exit_status_follows_what_is_left(heap: shmheap.Heap) -> None:
    heap.grow()
    assert_killed(run_child(f"""
        import shmheap
        shmheap.Heap.attach({heap.name!r}).grow()
        """, "index.entry_written"))

    def fsck(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "shmheap", "fsck", *args, heap.name],
                              capture_output=True, text=True, timeout=120)

    plain = fsck()
    assert plain.returncode == 1 and "journal" in plain.stdout, plain.stdout
    repaired = fsck("--repair")
    assert repaired.returncode == 0 and "fixed: journal" in repaired.stdout, repaired.stdout
    assert fsck().returncode == 0


def test_a_dead_growers_new_arena_goes_with_the_next_grow(heap: shmheap.Heap) -> None:
    assert_killed(run_child(f"""
        import shmheap
        shmheap.Heap.attach({heap.name!r}).grow()
        """, "grow.segment_created"))

    def new_arenas() -> list[str]:
        return [e for e in os.listdir("/dev/shm") if e.startswith(f"shmheap.{heap.name}.new")]

    assert len(new_arenas()) == 1
    heap.grow()
    assert new_arenas() == []


# -- read-only adopters, failures after publication, the semaphore's count --------------------

def segment_bytes(name: str) -> dict[str, bytes]:
    """Every segment of heap ``name`` but the liveness one and the semaphore, by name."""
    return {entry: open(f"/dev/shm/{entry}", "rb").read()
            for entry in sorted(os.listdir("/dev/shm"))
            if entry.startswith(f"shmheap.{name}") and not entry.endswith(".live")}


def test_a_readonly_adopter_writes_nothing_and_the_next_writer_repairs(
        heap: shmheap.Heap) -> None:
    keep = heap.alloc(20000)
    heap.view(keep)[:5] = b"alive"
    pages_in_use = heap.stats().pages_in_use
    assert_killed(run_child(f"""
        import shmheap
        h = shmheap.Heap.attach({heap.name!r})
        h.free(h.alloc(50000))
        """, "span.pages_used"))
    before = segment_bytes(heap.name)
    proc = run_child(f"""
        import shmheap
        h = shmheap.Heap.attach({heap.name!r}, readonly=True)
        h.snapshot(timeout=30)
        print(h.info().recoveries, len(list(h.walk())), h.stats().live_objects)
        """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "1", "1"], "adopted, and walked the one whole span"
    assert segment_bytes(heap.name) == before, "a read-only adopter wrote into the heap"
    assert [f.code for f in heap.check()][:1] == ["journal"]
    with heap.locked(timeout=NOT_STUCK):
        pass
    assert heap.check() == []
    assert bytes(heap.view(keep)[:5]) == b"alive"
    assert heap.stats().pages_in_use == pages_in_use, "the half-made span's pages are free"


def test_an_exception_after_publication_leaves_the_arena_usable(heap: shmheap.Heap) -> None:
    first = heap.grow().index
    with Child(f"""
        import sys, shmheap
        h = shmheap.Heap.attach({heap.name!r})
        try:
            h.grow()
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        sys.stdin.readline()
        """, raise_at="index.published") as child:
        assert child.line() == "interrupted"
        with shmheap.Heap.attach(heap.name, readonly=True) as reader:
            snap = list(reader.snapshot())
            assert snap[0] == first and len(snap) == 2, "the arena was published"
            new = snap[1]
            assert [a.index for a in reader.arenas()] == snap  # no map lookup for them
            assert reader.stats().arenas == 2
        assert [f.code for f in heap.check()][:1] == ["journal"]
        heap.snapshot(timeout=NOT_STUCK)  # a writable holder sets the map bit grow did not
        assert heap.arena(new).index == new
        assert heap.check() == []
        child.send()
        assert child.wait() == 0


SMALL_SHM = """
set -e
mount -t tmpfs -o size={size} shmheap-test /dev/shm
exec {python} -c "$1"
"""


def in_small_shm(code: str, size: str = "2m") -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a child with a private, small /dev/shm (a mount namespace of its own)."""
    if os.geteuid() != 0:
        pytest.skip("a private /dev/shm needs root (unshare --mount)")
    script = SMALL_SHM.format(size=size, python=sys.executable)
    proc = subprocess.run(["unshare", "--mount", "sh", "-c", script, "sh", code],
                          capture_output=True, text=True, timeout=120)
    if "unshare:" in proc.stderr or "mount:" in proc.stderr:
        pytest.skip(f"cannot make a private /dev/shm here: {proc.stderr.strip()}")
    return proc


def test_a_full_dev_shm_after_publication_is_repaired_when_room_returns() -> None:
    proc = in_small_shm("""
import os, shmheap
h = shmheap.Heap.create("full", arena_size=65536)
h.grow()
far = 8 * 4096 * 20           # an arena whose map bit lives in a page not yet allocated
h._summaries.reserve_leaves(far)  # (its summary leaves have memory: the map runs out first)
stat = os.statvfs("/dev/shm")
need = shmheap.arenas.segment_size(65536)
filler = os.open("/dev/shm/filler", os.O_CREAT | os.O_RDWR)
os.posix_fallocate(filler, 0, stat.f_bavail * stat.f_frsize - need - 4096)
try:
    h.grow(at=far)
except shmheap.OutOfSharedMemoryError as exc:
    print("full", "arena map" in str(exc))
snap = list(h.snapshot())
print("published", snap[-1] == far)
print("walk", len(list(h.walk())), len(list(h.arenas())))
print("findings", [f.code for f in h.check()][:1])
os.close(filler)
os.unlink("/dev/shm/filler")
with h.locked():
    pass
print("map", far in h, h.arena(far).index == far)
print("clean", h.check() == [])
h.destroy()
print("left", os.listdir("/dev/shm"))
""")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "full True", "published True", "walk 0 2", "findings ['journal']", "map True True",
        "clean True", "left []"], proc.stdout


def test_a_semaphore_posted_once_too_often_is_found_and_fixed(heap: shmheap.Heap) -> None:
    extra = posix_ipc.Semaphore(semaphore_name(heap.name))
    try:
        extra.release()  # as two holders that both believed they held the lock would
        assert extra.value == 2
    finally:
        extra.close()
    assert [f.code for f in heap.check()] == ["semaphore-count"]
    assert [(f.code, f.fixed) for f in heap.check(repair=True)] == [("semaphore-count", True)]
    assert heap.check() == []
    assert heap._lock.semaphore_value() == 1


# -- slow and stopped processes -------------------------------------------------------------

def test_a_slow_creator_is_waited_for_not_judged_dead(shm_heap_name: str) -> None:
    name = shm_heap_name
    with Child(f"""
        import shmheap
        shmheap.Heap.create({name!r}, arena_size=65536).close()
        print("created", flush=True)
        """, stop_at="create.control_created") as creator:
        wait_until(lambda: process_state(creator.pid) == "T")  # it stopped itself
        with pytest.raises(shmheap.LockTimeoutError, match="still being created"):
            shmheap.Heap.open(name, create=True, timeout=0.3)
        assert [s.state for s in collect.survey([name])] == ["initialising"]
        assert collect.collect(names=[name]) == [], "gc must not remove a heap being created"
        with Child(f"""
            import shmheap
            print("opening", flush=True)
            with shmheap.Heap.open({name!r}, create=True, timeout=60) as h:
                print("opened", h.arena_size, flush=True)
            """) as opener:
            assert opener.line() == "opening"
            assert opener.silent_for(0.3), "the opener must wait for the stopped creator"
            os.kill(creator.pid, signal.SIGCONT)
            assert creator.line() == "created"
            assert opener.line() == "opened 65536"
            assert opener.wait() == 0
    with shmheap.Heap.attach(name) as h:
        assert h.check() == []


def test_a_fresh_unlocked_control_segment_counts_as_being_created(shm_heap_name: str) -> None:
    """A creator preempted between its exclusive create and its init lock looks like this."""
    name = shm_heap_name
    path = f"/dev/shm/shmheap.{name}"
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
    with pytest.raises(shmheap.LockTimeoutError, match="still being created"):
        shmheap.Heap.attach(name, timeout=0.2)
    assert [s.state for s in collect.survey([name])] == ["initialising"]
    stale = time.time() - 60  # no longer fresh: its creator is gone
    os.utime(path, (stale, stale))
    with pytest.raises(shmheap.HeapCorruptError, match="died while initialising"):
        shmheap.Heap.attach(name, timeout=5)
    assert [s.state for s in collect.survey([name])] == ["corrupt"]



# -- lock hygiene under contention ------------------------------------------------------------

CHURNER = """
import sys, time, shmheap
h = shmheap.Heap.attach({name!r}, readonly={readonly})
print("ready", flush=True)
sys.stdin.readline()
end = time.monotonic() + {seconds}
while time.monotonic() < end:
    h.snapshot()
    with h.locked():
        pass
print(h._lock.adoptions, flush=True)
"""


def test_brief_holders_are_never_robbed_while_a_slot_is_dead(heap: shmheap.Heap) -> None:
    """Many brief holders and one dead slot: nobody adopts a lock held by the living."""
    assert_killed(run_child(f"""
        import os, shmheap
        shmheap.Heap.attach({heap.name!r})
        os.kill(os.getpid(), 9)
        """))
    assert heap._live.dead_slots()  # type: ignore[union-attr]
    children = [Child(CHURNER.format(name=heap.name, readonly=i % 2 == 0, seconds=3.0))
                for i in range(4)]
    try:
        for child in children:
            assert child.line() == "ready"
        for child in children:
            child.send()
        adoptions = [int(child.line()) for child in children]
    finally:
        for child in children:
            child.kill()
    assert adoptions == [0, 0, 0, 0], "a live holder was robbed"
    assert heap._lock.semaphore_value() == 1
    assert heap.info().recoveries == 0


def test_a_waiter_never_adopts_while_the_lock_keeps_changing_hands(heap: shmheap.Heap) -> None:
    """Owner 0 sampled again and again is no evidence while acquisitions go on.

    The semaphore is taken and no owner recorded (as by a process in its
    window between sem_wait and recording itself) while a slot is dead; the
    test bumps the lock sequence word as live processes passing through the
    lock would.  The waiter must not adopt: it times out.
    """
    assert_killed(run_child(f"""
        import os, shmheap
        shmheap.Heap.attach({heap.name!r})
        os.kill(os.getpid(), 9)
        """))
    sem = posix_ipc.Semaphore(semaphore_name(heap.name))
    sem.acquire(0)
    try:
        with Child(f"""
            import shmheap
            h = shmheap.Heap.attach({heap.name!r}, readonly=True)
            print("waiting", flush=True)
            try:
                h.snapshot(timeout=1.5)
                print("adopted", h._lock.adoptions, flush=True)
            except shmheap.LockTimeoutError:
                print("timeout", flush=True)
            """) as waiter:
            assert waiter.line() == "waiting"
            seq = heap._live.lock_seq  # type: ignore[union-attr]
            while waiter.silent_for(0.05):
                seq[0] += 1
            assert waiter.line() == "timeout"
    finally:
        sem.release()
        sem.close()
    assert heap.info().recoveries == 0


# -- walks and slots under contention --------------------------------------------------------

CHURN_ONE_ARENA = """
import random, sys, time, shmheap
h = shmheap.Heap.attach({name!r})
rng = random.Random({seed})
print("ready", flush=True)
sys.stdin.readline()
held = []
end = time.monotonic() + {seconds}
while time.monotonic() < end:
    if len(held) < 40 and rng.random() < 0.55:
        held.append(h.alloc(rng.choice((16, 100, 3000, 9000, 40000))))
    elif held:
        h.free(held.pop(rng.randrange(len(held))))
for ref in held:
    h.free(ref)
print("done", flush=True)
"""

WALKER = """
import json, sys, time, shmheap
h = shmheap.Heap.attach({name!r}, readonly=True)
stable = set({stable!r})
print("ready", flush=True)
sys.stdin.readline()
walks = misses = 0
end = time.monotonic() + {seconds}
while time.monotonic() < end:
    live = {{ref for span in h.walk() for ref in span.objects}}
    walks += 1
    misses += len(stable - live)
print(json.dumps(dict(walks=walks, misses=misses)), flush=True)
"""


def test_walks_list_every_object_that_stays_allocated_while_others_churn(
        heap: shmheap.Heap) -> None:
    stable = [heap.alloc(n) for n in (16, 16, 100, 3000, 9000, 40000, 70000)]
    arena = stable[0] // ARENA
    assert all(ref // ARENA == arena for ref in stable), "all in one busy arena"
    seconds = 3.0
    churners = [Child(CHURN_ONE_ARENA.format(name=heap.name, seed=i, seconds=seconds))
                for i in range(3)]
    walker = Child(WALKER.format(name=heap.name, stable=stable, seconds=seconds))
    try:
        for child in (*churners, walker):
            assert child.line() == "ready"
        for child in (*churners, walker):
            child.send()
        result = json.loads(walker.line(timeout=120))
        assert [child.line(timeout=120) for child in churners] == ["done"] * 3
    finally:
        for child in (*churners, walker):
            child.kill()
    assert result["walks"] > 10
    assert result["misses"] == 0, f"walks missed objects that stayed allocated: {result}"
    assert heap.check() == []


SLOT_CHURN = """
import os, sys, time, shmheap
observer = shmheap.Heap.attach({name!r}, readonly=True)
print("ready", flush=True)
sys.stdin.readline()
rounds = looked_dead = 0
end = time.monotonic() + {seconds}
while time.monotonic() < end:
    pid = os.fork()
    if pid == 0:                      # a process that attaches and dies without closing
        shmheap.Heap.attach({name!r})
        os._exit(0)
    h = shmheap.Heap.attach({name!r})  # recycles dead slots on the way (taking the lock)
    live = h._live
    mine = {{a.pid for a in observer._live.attachments()}}
    if os.getpid() not in mine or not observer._live.token_alive(live.token):
        looked_dead += 1
    h.close()
    os.waitpid(pid, 0)
    rounds += 1
print(rounds, looked_dead, flush=True)
"""


def test_recycling_dead_slots_never_touches_a_live_claim(heap: shmheap.Heap) -> None:
    """Attachers, dying attachers and recyclers at once: no live attachment looks dead."""
    children = [Child(SLOT_CHURN.format(name=heap.name, seconds=3.0)) for _ in range(3)]
    try:
        for child in children:
            assert child.line() == "ready"
        for child in children:
            child.send()
        reports = [child.line(timeout=120).split() for child in children]
    finally:
        for child in children:
            child.kill()
    assert all(int(rounds) > 10 for rounds, _ in reports), reports
    assert [int(dead) for _, dead in reports] == [0, 0, 0], reports
    assert heap.check() == []
