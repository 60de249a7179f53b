"""The life of a handle: close() means closed, close()/destroy() release everything, destroy()
of a heap in use, Heap.open creating only when asked, a Ctrl-C during the lazy numpy import and
during the lazy import of the package's own modules (a journal repair's first one among them).

Each fault is made real: methods saved before the close are called after it, descriptors and
mappings are counted in /proc over many attach/close cycles, other processes hold the heap
while it is destroyed, a real SIGINT lands inside numpy's import in a fresh interpreter.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy
import pytest
from children import Child, assert_killed, run_child

import shmheap
from shmheap.pytest_plugin import HeapFactory, assert_no_shm_leftovers, shm_leftovers

ARENA = 256 * 1024


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def mappings(name: str | None = None) -> list[str]:
    """Lines of /proc/self/maps (those naming heap ``name``'s segments, if given)."""
    with open("/proc/self/maps", encoding="utf-8") as maps:
        lines = maps.read().splitlines()
    if name is None:
        return lines
    return [line for line in lines if f"/dev/shm/shmheap.{name}" in line
            or f"/dev/shm/sem.shmheap.{name}." in line]


# -- close() means closed ----------------------------------------------------------------------

#: what a program may keep of a handle before closing it, and then use: name -> (keep, use)
SAVED: dict[str, tuple[Callable[[shmheap.Heap, int], Any], Callable[[Any, int], Any]]] = {
    "snapshot method": (lambda h, r: h.snapshot, lambda f, r: f()),
    "alloc method": (lambda h, r: h.alloc, lambda f, r: f(64)),
    "alloc method, large": (lambda h, r: h.alloc, lambda f, r: f(40000)),
    "free method": (lambda h, r: h.free, lambda f, r: f(r)),
    "view method": (lambda h, r: h.view, lambda f, r: f(r)),
    "grow method": (lambda h, r: h.grow, lambda f, r: f()),
    "check method": (lambda h, r: h.check, lambda f, r: f()),
    "locked() made before": (lambda h, r: h.locked(), lambda block, r: block.__enter__()),
    "locked method": (lambda h, r: h.locked, lambda f, r: f().__enter__()),
    "roots": (lambda h, r: h.roots, lambda roots, r: roots["kept"]),
    "roots binding": (lambda h, r: h.roots, lambda roots, r: roots.__setitem__("other", r)),
    "arena": (lambda h, r: h.arena(1), lambda arena, r: arena.buf[0]),
    "arena metadata": (lambda h, r: h.arena(1), lambda arena, r: arena.meta[0]),
    "arenas iterator": (lambda h, r: h.arenas(), lambda it, r: next(it)),
    "new_array method": (lambda h, r: h.new_array, lambda f, r: f(4)),
    "lock": (lambda h, r: h._lock, lambda lock, r: lock.run(lambda: None)),
    "allocator": (lambda h, r: h._objects(), lambda allocator, r: allocator.alloc(64)),
    "queue, put": (lambda h, r: h.queue("kept"), lambda q, r: q.put(1)),
    "queue, get": (lambda h, r: h.queue("kept"), lambda q, r: q.get(timeout=0)),
    "event": (lambda h, r: h.event("kept"), lambda e, r: e.wait(timeout=0)),
    "counter": (lambda h, r: h.counter("kept"), lambda c, r: c.add()),
}


@pytest.mark.parametrize("saved", sorted(SAVED))
def test_what_was_kept_of_a_closed_handle_raises_heap_closed_error(
        shm_heap_factory: HeapFactory, saved: str) -> None:
    heap = shm_heap_factory(arena_size=ARENA)
    ref = heap.alloc(64)
    heap.roots["kept"] = ref
    heap.snapshot()  # the native core's snapshot cache, bound
    keep, use = SAVED[saved]
    kept = keep(heap, ref)
    heap.close()
    with pytest.raises(shmheap.HeapClosedError, match="closed"):
        use(kept, ref)
    with shmheap.Heap.attach(heap.name) as fresh:
        assert fresh.roots["kept"] == ref, "nothing was done through the closed handle"
        assert fresh.check() == []


@pytest.mark.skipif(not shmheap.NATIVE, reason="the native core's own objects")
def test_the_native_objects_of_a_closed_handle_raise_heap_closed_error(
        shm_heap: shmheap.Heap) -> None:
    ref = shm_heap.alloc(64)
    lock = shm_heap._lock
    native = lock.native  # type: ignore[union-attr]
    snapshots = shm_heap.snapshot
    allocator = shm_heap._objects()
    alloc, free = allocator.alloc, allocator.free
    header = shm_heap._header
    shm_heap.close()
    calls: list[Callable[[], object]] = [
        lambda: native.run(lambda: None), lambda: native.run(lambda: None, None, True),
        lambda: native.read_word(header), lambda: native.read_word(memoryview(bytes(8))),
        lambda: native.enter(shm_heap.locked, None, False), native.semaphore_value,
        native.drain_one, snapshots, lambda: snapshots(timeout=1), lambda: alloc(64),
        lambda: alloc(100000), lambda: free(ref)]
    for call in calls:
        with pytest.raises(shmheap.HeapClosedError):
            call()
    native.release()  # nothing held: nothing to do
    native.leave()


CLEARED = """
import ctypes, shmheap
# The collector clears the objects of a garbage cycle (tp_clear) after their finalizers ran,
# so no Python code can reach a cleared one: the slot is called here as the collector calls
# it (PyTypeObject: tp_flags at 168, tp_clear at 192 on 64-bit CPython 3.11-3.13).
clear_slot = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object)
def clear(obj):
    assert ctypes.c_ulong.from_address(id(type(obj)) + 168).value == type(obj).__flags__
    slot = ctypes.c_void_p.from_address(id(type(obj)) + 192).value
    if slot:
        clear_slot(slot)(obj)

h = shmheap.Heap.attach({name!r})
ref = h.alloc(64)
h.roots["kept"] = ref
lock, snapshot, allocator = h._lock.native, h.snapshot, h._objects()
alloc, free, add = allocator.alloc, allocator.free, h.counter("c").add
queue = h.queue("q")
writer = h.roots._writer
natives = [lock, snapshot, alloc, free, add.__self__, queue.put.__self__, writer,
           *(cache for cache in allocator._caches if cache is not None)]
for obj in natives:
    clear(obj)
calls = [lambda: lock.run(lambda: None), lambda: lock.read_word(h._header), lock.semaphore_value,
         lock.drain_one, lock.release, lock.leave, snapshot, lambda: snapshot(timeout=1),
         lambda: alloc(64), lambda: alloc(100000), lambda: free(ref), free.close, add,
         lambda: queue.put(1), lambda: queue.get(timeout=0), lambda: writer("kept", ref, None),
         lambda: writer.held("kept", ref, 1)]
for call in calls:
    try:
        print(call())
    except shmheap.HeapClosedError:
        print("closed")
"""


@pytest.mark.skipif(not shmheap.NATIVE, reason="the native core's own objects")
def test_the_native_objects_cleared_by_the_collector_behave_as_closed(
        shm_heap_factory: HeapFactory) -> None:
    heap = shm_heap_factory(arena_size=ARENA)
    proc = run_child(CLEARED.format(name=heap.name))
    assert proc.returncode == 0, proc.stderr
    # closed, or None where the call has nothing to do or leaves it to the Python path
    assert set(proc.stdout.split()) <= {"closed", "None"}, proc.stdout
    assert proc.stdout.split().count("closed") >= 11, proc.stdout
    assert heap.check() == []


def test_an_arena_dropped_from_the_cache_is_closed_with_the_handle(
        shm_heap_factory: HeapFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    heap = shm_heap_factory(arena_size=ARENA)
    for _ in range(8):
        heap.grow()
    monkeypatch.setenv("SHMHEAP_MAX_MAPPINGS", "8")  # the cache keeps 4 arenas
    with shmheap.Heap.attach(heap.name) as handle:
        kept = handle.arena(1)
        for index in range(2, 9):
            handle.arena(index)
        assert 1 not in handle._pages.recent, "arena 1 was dropped from the cache"
        kept.buf[0] = 7  # held by the program: mapped and working until the close
        handle.close()
        with pytest.raises(shmheap.HeapClosedError, match="closed"):
            kept.buf[0]
        with pytest.raises(shmheap.HeapClosedError, match="closed"):
            kept.meta[0]
    assert heap.arena(1).buf[0] == 7


def test_a_saved_alloc_never_hands_out_what_another_handle_owns(
        shm_heap_factory: HeapFactory) -> None:
    heap = shm_heap_factory(arena_size=ARENA)
    first = shmheap.Heap.attach(heap.name)
    mine = first.alloc(64)
    alloc = first.alloc
    first.close()
    other = shmheap.Heap.attach(heap.name)
    try:
        refs = [other.alloc(64) for _ in range(200)]  # adopts the span the closed handle had
        for _ in range(40):
            with pytest.raises(shmheap.HeapClosedError):
                alloc(64)
        assert len(set(refs)) == len(refs) and mine not in refs
        assert other.stats().live_objects == len(refs) + 1
    finally:
        other.close()


LOCK_HOLDER = """
import sys, shmheap
h = shmheap.Heap.attach({name!r})
with h.locked():
    print("holding", flush=True)
    sys.stdin.readline()
h.close()
"""


def test_close_does_not_wait_for_ever_on_a_lock_another_process_holds(
        shm_heap_factory: HeapFactory) -> None:
    heap = shm_heap_factory(arena_size=ARENA)
    other = shmheap.Heap.attach(heap.name)
    kept = other.alloc(64)  # a cached span to give back
    with Child(LOCK_HOLDER.format(name=heap.name)) as holder:
        assert holder.line() == "holding"
        other.close()  # cannot give the span back now: it goes back as a dead owner's does
        assert other.closed
        holder.send()
        assert holder.wait() == 0, holder.stderr()
    assert heap.check(repair=True) == [], "the closed handle's span is garbage, no finding"
    assert heap.stats().cached_spans == 0
    heap.free(kept)
    assert heap.check() == []


def test_a_block_open_across_close_is_released_by_it(shm_heap: shmheap.Heap) -> None:
    block = shm_heap.locked()
    with block:
        shm_heap.close()
    with shmheap.Heap.attach(shm_heap.name) as other:
        with other.locked(timeout=5):
            pass
        assert other.check() == []


def test_views_outlive_close_and_destroy_and_then_let_go(shm_heap_factory: HeapFactory) -> None:
    heap = shm_heap_factory(arena_size=ARENA)
    name = heap.name
    ref = heap.alloc(100)
    arr_ref = heap.new_array(10, "int64")
    view = heap.view(ref)
    view[:5] = b"hello"
    array = heap.ndarray(arr_ref)
    array[:] = numpy.arange(10)
    snap = heap.snapshot()
    heap.destroy()
    assert_no_shm_leftovers(name)
    assert bytes(view[:5]) == b"hello" and array.sum() == 45 and list(snap) == [1]
    assert mappings(name), "the views' mappings stay while they live"
    del view, array, snap
    assert mappings(name) == [], "once the views are gone, nothing of the heap stays mapped"


def test_destroy_leaves_nothing_of_the_heap_mapped(shm_heap_factory: HeapFactory) -> None:
    heap = shm_heap_factory()  # the default arena size: 64 MiB
    name = heap.name
    heap.alloc(64)
    heap.roots["x"] = heap.alloc(1000)
    heap.check()
    list(heap.walk())
    heap.destroy()
    assert mappings(name) == []


# -- close() and destroy() release everything ------------------------------------------------

CYCLES = 500


def test_attach_close_cycles_keep_descriptors_and_mappings_flat(
        shm_heap_factory: HeapFactory) -> None:
    """A leak of one descriptor or mapping per cycle shows as +CYCLES: a handful is noise
    (the allocator of the Python process mapping its own memory)."""
    name = shm_heap_factory(arena_size=ARENA).name

    def cycle(i: int) -> None:
        heap = shmheap.Heap.attach(name)
        ref = heap.alloc(64)
        heap.view(ref)[:4] = b"abcd"
        heap.roots[f"r{i % 4}"] = ref
        assert heap.check() == []
        del heap.roots[f"r{i % 4}"]
        heap.free(ref)
        heap.close()

    for i in range(20):
        cycle(i)
    before = fds(), len(mappings()), len(mappings(name))
    for i in range(CYCLES):
        cycle(i)
    after = fds(), len(mappings()), len(mappings(name))
    assert after[0] <= before[0] + 2, f"descriptors {before[0]} -> {after[0]}"
    assert after[2] <= before[2], f"mappings of the heap {before[2]} -> {after[2]}"
    assert after[1] <= before[1] + 8, f"mappings {before[1]} -> {after[1]}"


DROPPED = """
import gc, os
import shmheap
{helpers}
name = {name!r}

def cycle(i):
    heap = shmheap.Heap.attach(name)  # never closed: dropped, in reference cycles
    ref = heap.alloc(64)
    heap.view(ref)[:4] = b"abcd"
    heap.roots[f"r{{i % 4}}"] = ref
    del heap.roots[f"r{{i % 4}}"]
    heap.free(ref)
    heap.free(heap.alloc(40000))
    heap.snapshot()
    heap.counter("c").add()
    assert heap.arena(1).buf[0] is not None

for i in range(20):
    cycle(i)
gc.collect()
before = fds(), len(mappings()), len(mappings(name))
for i in range({cycles}):
    cycle(i)
gc.collect()
after = fds(), len(mappings()), len(mappings(name))
print(*before, *after)
"""


def test_handles_dropped_without_close_are_collected(shm_heap_factory: HeapFactory) -> None:
    """A handle dropped unclosed goes with the garbage collector (the native core's objects in
    its reference cycles included): its descriptors close, its segments are unmapped, its
    liveness slot reads as dead (the next attach recycles it)."""
    heap = shm_heap_factory(arena_size=ARENA)
    helpers = inspect.getsource(fds) + inspect.getsource(mappings)
    proc = run_child(DROPPED.format(helpers=helpers, name=heap.name, cycles=CYCLES))
    assert proc.returncode == 0, proc.stderr
    assert "Exception ignored" not in proc.stderr, proc.stderr
    fds_before, maps_before, heap_before, fds_after, maps_after, heap_after = map(
        int, proc.stdout.split())
    assert fds_after <= fds_before + 2, f"descriptors {fds_before} -> {fds_after}"
    assert heap_after <= heap_before, f"mappings of the heap {heap_before} -> {heap_after}"
    assert maps_after <= maps_before + 8, f"mappings {maps_before} -> {maps_after}"
    assert heap.check() == []
    assert heap.counter("c").add(0) == 20 + CYCLES


# -- destroy() of a heap in use ---------------------------------------------------------------

HOLDER = """
import sys, shmheap
h = shmheap.Heap.attach({name!r})  # (mapping no index generation, no arena yet)
print("attached", flush=True)
sys.stdin.readline()
for what, call in (("snapshot", h.snapshot), ("arena", lambda: h.arena(1)),
                   ("alloc", lambda: h.alloc(100000)), ("grow", h.grow)):
    try:
        call()
        print(what, "worked", flush=True)
    except shmheap.ShmHeapError as exc:
        print(what, type(exc).__name__, exc, flush=True)
h.close()
"""


def test_destroy_of_a_heap_in_use_names_the_processes(shm_heap_factory: HeapFactory) -> None:
    heap = shm_heap_factory(arena_size=ARENA)
    heap.grow()
    heap.alloc(64)
    name = heap.name
    with Child(HOLDER.format(name=name)) as holder:
        assert holder.line() == "attached"
        before = shm_leftovers(name)
        with pytest.raises(shmheap.HeapInUseError, match=rf"pid {holder.pid}\b.*force=True") \
                as caught:
            shmheap.destroy(name)
        assert caught.value.pids == [holder.pid]
        with pytest.raises(shmheap.HeapInUseError, match=str(holder.pid)):
            heap.destroy()
        cli = subprocess.run([sys.executable, "-m", "shmheap", "destroy", name],
                             capture_output=True, text=True, timeout=120)
        assert cli.returncode != 0 and str(holder.pid) in cli.stderr and "--force" in cli.stderr
        assert shm_leftovers(name) == before and not heap.closed, "nothing was removed"
        assert heap.check() == []

        cli = subprocess.run([sys.executable, "-m", "shmheap", "destroy", "--force", name],
                             capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stderr
        assert_no_shm_leftovers(name)
        holder.send()
        for what in ("snapshot", "arena", "alloc", "grow"):
            line = holder.line()
            assert line.startswith(f"{what} HeapNotFoundError") and "was destroyed" in line, line
        assert holder.wait() == 0, holder.stderr()
    heap.close()


def test_destroy_force_through_a_handle_and_the_module(shm_heap_factory: HeapFactory) -> None:
    for destroy in (lambda h: h.destroy(force=True),
                    lambda h: shmheap.destroy(h.name, force=True)):
        heap = shm_heap_factory(arena_size=ARENA)
        with Child(HOLDER.format(name=heap.name)) as holder:
            assert holder.line() == "attached"
            destroy(heap)
            assert_no_shm_leftovers(heap.name)
            holder.send()
            assert "was destroyed" in holder.line()
            holder.kill()
        heap.close()


def test_handles_of_this_process_do_not_keep_it_in_use(shm_heap_factory: HeapFactory) -> None:
    heap = shm_heap_factory(arena_size=ARENA)
    with shmheap.Heap.attach(heap.name) as other:
        heap.destroy()
        with pytest.raises(shmheap.HeapNotFoundError, match="was destroyed"):
            other.arena(1) if 1 in other else other.grow()
    assert_no_shm_leftovers(heap.name)


def test_processes_that_exited_do_not_keep_it_in_use(shm_heap_factory: HeapFactory) -> None:
    heap = shm_heap_factory(arena_size=ARENA)
    proc = run_child(f"import shmheap; shmheap.Heap.attach({heap.name!r}).alloc(64)")
    assert proc.returncode == 0, proc.stderr
    heap.destroy()
    assert_no_shm_leftovers(heap.name)


# -- a Ctrl-C during the lazy numpy import ------------------------------------------------------

INTERRUPTED_IMPORT = """
import os, signal, sys
import shmheap

class Interrupter:
    '''Sends this process SIGINT (Ctrl-C) when numpy starts importing {target}.'''
    fired = False

    def find_spec(self, name, path=None, target=None):
        if name == {target!r} and not self.fired:
            self.fired = True
            os.kill(os.getpid(), signal.SIGINT)
        return None

assert "numpy" not in sys.modules, "numpy is imported lazily"
hook = Interrupter()
sys.meta_path.insert(0, hook)
h = shmheap.Heap.create({name!r}, arena_size=65536)
try:
    h.alloc(64)
    try:
        {call}
        print("not interrupted", flush=True)
    except KeyboardInterrupt:
        print("interrupted", hook.fired, flush=True)
    {call}
    import numpy
    print("numpy whole", numpy.nonzero([0, 1])[0].tolist(), numpy.matrix is not None, flush=True)
finally:
    h.destroy()
"""


@pytest.mark.parametrize(("target", "call"), [
    ("numpy.linalg", "h.stats()"),  # the bitmap scans (pages.py)
    ("numpy.lib.format", "h.stats()"),
    ("numpy.linalg", "h.new_array(3)"),  # typed arrays (arrays.py)
    ("numpy.lib.format", "h.new_array(3)"),
])
def test_ctrl_c_during_the_lazy_numpy_import_leaves_numpy_whole(
        shm_heap_name: str, target: str, call: str) -> None:
    proc = run_child(INTERRUPTED_IMPORT.format(name=shm_heap_name, target=target, call=call))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["interrupted True", "numpy whole [1] True"], proc.stdout
    assert_no_shm_leftovers(shm_heap_name)


# -- a Ctrl-C during the lazy import of the package's own modules ------------------------------

INTERRUPTED_OWN_IMPORT = """
import os, signal, sys
import shmheap

LATER = ("shmheap.walker", "shmheap.owners", "shmheap.coord", "shmheap.repair")
fired = False

def interrupter(frame, event, arg):
    '''Sends this process SIGINT (Ctrl-C) inside the first dataclass field's __set_name__.'''
    global fired
    if event == "c_call" and frame.f_code.co_name == "__set_name__" and not fired:
        fired = True
        os.kill(os.getpid(), signal.SIGINT)

assert not [m for m in LATER if m in sys.modules], "imported lazily"
h = shmheap.Heap.open({name!r})
try:
    sys.setprofile(interrupter)
    try:
        {call}
        print("not interrupted", flush=True)
    except KeyboardInterrupt:
        print("interrupted", fired, flush=True)
    sys.setprofile(None)
    print("whole", [m.rsplit(".", 1)[1] for m in LATER if m in sys.modules], flush=True)
    {call}
    print("findings", h.check(), flush=True)
finally:
    h.close()
"""


@pytest.mark.parametrize(("dirty", "call", "imported"), [
    (True, "h.alloc(64)", "walker owners coord repair"),  # the journal repair's first import
    (False, "h.stats()", "walker"),
    (False, "h.queue('q').put(7)", "walker owners coord"),
])
def test_ctrl_c_during_the_lazy_import_of_a_module_of_the_package_leaves_it_whole(
        shm_heap_factory: HeapFactory, dirty: bool, call: str, imported: str) -> None:
    """The interrupt is a KeyboardInterrupt raised once the import is done, not an import cut in
    half (Python 3.11 even reports one cut inside a class body as a RuntimeError)."""
    heap = shm_heap_factory(reserve=False)
    if dirty:  # a grower killed half-way leaves the journal for the next lock holder
        assert_killed(run_child(f"import shmheap; shmheap.Heap.open({heap.name!r}).grow()",
                                crash_at="grow.segment_linked"))
    proc = run_child(INTERRUPTED_OWN_IMPORT.format(name=heap.name, call=call))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "interrupted True", f"whole {imported.split()!r}", "findings []"], proc.stdout
