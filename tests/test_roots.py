"""heap.roots: objects found by name, shared by every process of a heap.

Real heaps and fresh interpreters: roots bound in one process are seen in all,
lookups stay right while another process rebuilds the table under them, sweep
keeps bound objects, free refuses them, a Hypothesis model of the table
against a dict, every roots crash point killed (SHMHEAP_CRASH_AT; the raised
twin is in test_faults.py), and fsck's checks of the table and root counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from children import Child, assert_killed, run_child
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmheap
from shmheap import roots
from shmheap.allocator import MAX_ROOTS_PER_OBJECT
from shmheap.pytest_plugin import HeapFactory, discard, unique_heap_name

ARENA = 256 * 1024
#: generous bound so that a broken recovery fails instead of hanging the suite
RECOVERY_TIMEOUT = 30.0


@pytest.fixture
def heap(shm_heap_factory: HeapFactory) -> shmheap.Heap:
    return shm_heap_factory(arena_size=ARENA, reserve=False)


def attach_and(name: str, code: str) -> str:
    """Run ``code`` with ``h`` attached to heap ``name`` in a fresh interpreter; its stdout."""
    proc = run_child(f"import json, shmheap\nh = shmheap.Heap.attach({name!r})\n{code}\n"
                     "h.close()\n")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# -- the mapping -------------------------------------------------------------------------------


def test_bind_look_up_rebind_unbind(heap: shmheap.Heap) -> None:
    small, large = heap.alloc(100), heap.alloc(20000)
    heap.roots["weights"] = small
    heap.roots["ünïcode ✓"] = large
    assert heap.roots["weights"] == small and heap.roots["ünïcode ✓"] == large
    assert "weights" in heap.roots and "other" not in heap.roots
    assert len(heap.roots) == 2 and sorted(heap.roots) == ["weights", "ünïcode ✓"]
    assert dict(heap.roots.items()) == {"weights": small, "ünïcode ✓": large}
    heap.roots["weights"] = large                      # rebind
    assert heap.roots["weights"] == large and len(heap.roots) == 2
    assert heap.roots.names_of(large) == ["weights", "ünïcode ✓"]
    del heap.roots["weights"]
    assert "weights" not in heap.roots and heap.roots.get("weights") is None
    heap.roots["weights"] = small                      # bound again: its old slot again
    assert heap.roots.pop("weights") == small
    with pytest.raises(shmheap.RootNotFoundError) as caught:
        heap.roots["weights"]
    assert isinstance(caught.value, KeyError) and "weights" in str(caught.value)
    with pytest.raises(shmheap.RootNotFoundError, match="to unbind"):
        del heap.roots["weights"]
    assert heap.info().roots == 1
    assert heap.check() == []


@pytest.mark.parametrize("name", ["", "x" * 256, "é" * 128, "\ud800", 7, None, b"bytes"])
def test_bad_names_are_invalid_name_errors(heap: shmheap.Heap, name: object) -> None:
    ref = heap.alloc(16)
    for call in (lambda: heap.roots.bind(name, ref),  # type: ignore[arg-type]
                 lambda: heap.roots[name],  # type: ignore[index]
                 lambda: name in heap.roots,
                 lambda: heap.roots.unbind(name)):  # type: ignore[arg-type]
        with pytest.raises(shmheap.InvalidNameError) as caught:
            call()
        assert isinstance(caught.value, ValueError)
    heap.roots["x" * 255] = ref  # 255 bytes is the most
    heap.roots["é" * 127] = ref
    assert heap.roots["x" * 255] == heap.roots["é" * 127] == ref


def test_only_a_live_object_can_be_bound(heap: shmheap.Heap) -> None:
    ref = heap.alloc(100)
    freed = heap.alloc(100)
    heap.free(freed)
    for bad in (freed, ref + 16, 0, -5, 1 << 62, "0x10", 1.0, True):
        with pytest.raises(shmheap.InvalidRefError):
            heap.roots["x"] = bad  # type: ignore[assignment]
    assert "x" not in heap.roots and len(heap.roots) == 0
    assert heap.check() == []


def test_readonly_and_closed_handles(heap: shmheap.Heap) -> None:
    ref = heap.alloc(100)
    heap.roots["x"] = ref
    with shmheap.Heap.attach(heap.name, readonly=True) as reader:
        assert reader.roots["x"] == ref and len(reader.roots) == 1
        with pytest.raises(shmheap.ReadOnlyError):
            reader.roots["y"] = ref
        with pytest.raises(shmheap.ReadOnlyError):
            del reader.roots["x"]
    with pytest.raises(shmheap.HeapClosedError):
        reader.roots["x"]
    with pytest.raises(shmheap.HeapClosedError):
        len(reader.roots)


def test_binding_in_a_destroyed_heap_is_heap_not_found(heap: shmheap.Heap) -> None:
    ref = heap.alloc(16)
    heap.roots["before"] = ref  # (the native core's bind is made by the first one)
    heap.roots["again"] = ref
    assert (heap.roots._writer is not None) == shmheap.NATIVE
    with shmheap.Heap.attach(heap.name) as other:
        other.destroy(force=True)  # says so in the control segment before it unlinks
    with pytest.raises(shmheap.HeapNotFoundError, match="was destroyed"):
        heap.roots["after"] = ref
    with pytest.raises(shmheap.HeapNotFoundError, match="was destroyed"):
        del heap.roots["before"]
    assert heap.roots["before"] == ref  # what it has mapped still reads


def test_one_object_bound_to_many_names(heap: shmheap.Heap) -> None:
    ref = heap.alloc(100)
    limit = MAX_ROOTS_PER_OBJECT
    for i in range(limit):
        heap.roots[f"n{i}"] = ref
    with pytest.raises(shmheap.InvalidParameterError, match=f"bound to {limit} roots"):
        heap.roots["one more"] = ref
    for i in range(limit - 1):
        del heap.roots[f"n{i}"]
    with pytest.raises(shmheap.BoundObjectError, match=f"'n{limit - 1}'"):
        heap.free(ref)
    del heap.roots[f"n{limit - 1}"]
    heap.free(ref)
    assert heap.check() == []


# -- across processes ----------------------------------------------------------------------------


def test_roots_bound_in_one_process_are_seen_in_all(heap: shmheap.Heap) -> None:
    ref = heap.alloc(64)
    heap.view(ref)[:5] = b"hello"
    heap.roots["greeting"] = ref
    reader = """
r = h.roots["greeting"]
print(json.dumps([bytes(h.view(r)[:5]).decode(), len(h.roots), sorted(h.roots)]))
"""
    for _ in range(3):
        assert json.loads(attach_and(heap.name, reader)) == ["hello", 1, ["greeting"]]
    attach_and(heap.name, """
r = h.alloc(200)
h.view(r)[:3] = b"abc"
h.roots["from child"] = r
del h.roots["greeting"]
""")
    assert "greeting" not in heap.roots
    assert bytes(heap.view(heap.roots["from child"])[:3]) == b"abc"
    heap.free(ref)  # unbound by the child: free works
    assert heap.check() == []


def test_native_and_pure_processes_bind_and_unbind_the_same_names(heap: shmheap.Heap) -> None:
    # the native writer and the pure twin change one table at once, rebinding each other's
    # names (the counts of objects they take roots from, and their owners, stay right)
    code = f"""
import shmheap
h = shmheap.Heap.attach({heap.name!r})
mine = [h.alloc(16 + 16 * k) for k in range(4)]
for i in range(400):
    h.roots[f"shared-{{i % 8}}"] = mine[i % 4]
    try:
        del h.roots[f"shared-{{(i * 5 + 3) % 8}}"]
    except shmheap.RootNotFoundError:
        pass
for ref in mine:
    if not h.roots.names_of(ref):
        h.free(ref)
h.close()
"""
    children = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE,
                                 text=True, env={**os.environ, **extra})
                for extra in ({}, {shmheap.core.PURE_VAR: "1"})]
    for child in children:
        assert child.wait(timeout=300) == 0, child.stderr.read() if child.stderr else ""
        if child.stderr:
            child.stderr.close()
    bound = dict(heap.roots)
    assert set(bound) <= {f"shared-{k}" for k in range(8)}
    assert heap.check() == []
    for name in bound:
        del heap.roots[name]
    for ref in set(bound.values()):
        heap.free(ref)  # unbound by this process: its object now
    assert heap.check() == []


def test_a_bound_object_cannot_be_freed_from_any_process(heap: shmheap.Heap) -> None:
    small, large = heap.alloc(100), heap.alloc(3 * 8192)
    heap.roots["small"], heap.roots["large"] = small, large
    out = attach_and(heap.name, f"""
for ref in ({small}, {large}):
    try:
        h.free(ref)
        print("freed")
    except shmheap.BoundObjectError as exc:
        print(type(exc).__name__, str(exc))
""")
    lines = out.splitlines()
    assert lines[0].startswith("BoundObjectError") and "'small'" in lines[0]
    assert "unbind it first" in lines[0] and "del heap.roots['small']" in lines[0]
    assert lines[1].startswith("BoundObjectError") and "'large'" in lines[1]
    assert heap.size_of(small) and heap.size_of(large)  # still there
    heap.roots.unbind("small")
    heap.roots.unbind("large")
    attach_and(heap.name, f"h.free({small}); h.free({large})")
    with pytest.raises(shmheap.InvalidRefError):
        heap.size_of(small)
    assert heap.check() == []


def test_sweep_keeps_bound_objects(heap: shmheap.Heap) -> None:
    """Bound objects survive sweeps, also in spans nobody owns that hold nothing marked."""
    out = attach_and(heap.name, """
small = [h.alloc(100) for _ in range(20)]
large = [h.alloc(20000) for _ in range(3)]
h.roots["small"], h.roots["large"] = small[7], large[1]
print(json.dumps([small, large]))
""")  # the child exits: its span becomes nobody's
    small, large = json.loads(out)
    mine = heap.alloc(100)
    heap.roots["mine"] = mine
    for _ in range(2):  # the first sweep frees the garbage, the second finds none
        heap.start_cycle()
        heap.sweep()
    survivors = {ref for span in heap.walk() for ref in span.objects}
    assert survivors == {small[7], large[1], mine}
    assert heap.check() == []
    del heap.roots["small"]                  # unbound: live for this cycle, garbage after
    heap.start_cycle()
    heap.sweep()
    assert {ref for span in heap.walk() for ref in span.objects} == {large[1], mine}
    assert heap.check() == []


def test_binding_during_a_cycle_keeps_the_object_through_its_sweep(heap: shmheap.Heap) -> None:
    ref = heap.alloc(100)
    heap.start_cycle()            # ref is not marked
    heap.roots["late"] = ref      # bound before the sweep: it is a root of this cycle
    heap.sweep()
    assert heap.size_of(ref)
    assert heap.check() == []


def test_thousands_of_roots_across_table_rebuilds_in_every_process(heap: shmheap.Heap) -> None:
    """3,000 roots: the table is rebuilt into larger regions three times; all are found."""
    refs = [heap.alloc(16) for _ in range(300)]
    expected = {f"root-{i}": refs[i % 300] for i in range(3000)}
    for name, ref in expected.items():
        heap.roots[name] = ref
    for name in list(expected)[::3]:
        del heap.roots[name]
        del expected[name]
    assert dict(heap.roots) == expected and len(heap.roots) == len(expected)
    found = json.loads(attach_and(heap.name, "print(json.dumps(dict(h.roots.items())))"))
    assert found == expected
    assert all(heap.roots[name] == ref for name, ref in expected.items())
    assert heap.check() == []


LOOKER = """
import json, sys, shmheap
h = shmheap.Heap.attach({name!r}, readonly=True)
stable = {stable!r}
print("ready", flush=True)
sys.stdin.readline()
lookups = wrong = 0
while True:
    for name, ref in stable.items():
        got = h.roots.get(name)
        lookups += 1
        wrong += got != ref
    if lookups == 1000:
        print("enough", flush=True)             # the writer may stop churning now
    if h.roots.get("done"):
        break
print(json.dumps([lookups, wrong]), flush=True)
"""


def test_lock_free_lookups_stay_right_while_another_process_rebuilds(
        heap: shmheap.Heap) -> None:
    """A reader never misses or misreads a root that stays bound while others churn."""
    stable = {f"stable-{i}": heap.alloc(16) for i in range(20)}
    for name, ref in stable.items():
        heap.roots[name] = ref
    churn = [heap.alloc(16) for _ in range(4)]
    with Child(LOOKER.format(name=heap.name, stable=stable)) as reader:
        assert reader.line() == "ready"
        reader.send()
        rounds = 0
        # Each round passes rebuilds (growth, then tombstones); the churn goes on until the
        # reader has made its 1,000 lookups, however fast the binds are against it.
        while rounds < 4 or reader.silent_for(0):
            assert rounds < 10_000, "the reader never made 1,000 lookups"
            for i in range(600):
                heap.roots[f"churn-{rounds}-{i}"] = churn[i % 4]
            for i in range(600):
                del heap.roots[f"churn-{rounds}-{i}"]
            rounds += 1
        heap.roots["done"] = churn[0]
        assert reader.line() == "enough"
        lookups, wrong = json.loads(reader.line(timeout=120))
    assert lookups >= 1000 and wrong == 0
    assert heap.check() == []


# -- a model of the table ---------------------------------------------------------------------

NAMES = [f"name-{i}" for i in range(300)] + ["ü" * 40, "x" * 255, "a", "b"]
OPS = st.lists(st.tuples(st.sampled_from(["bind", "unbind", "lookup", "free"]),
                         st.integers(0, len(NAMES) - 1), st.integers(0, 11)),
               max_size=400)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, prefix=st.integers(0, 200))
def test_the_table_behaves_as_a_dict(ops: list[tuple[str, int, int]], prefix: int) -> None:
    """Random binds, unbinds, lookups and frees against a dict (and counts per object); the
    first ``prefix`` names are bound first, so that many examples pass a table rebuild."""
    name = unique_heap_name("model")
    heap = shmheap.Heap.create(name, arena_size=ARENA, reserve=False)
    try:
        objects = [heap.alloc(100) for _ in range(8)] + [heap.alloc(20000) for _ in range(4)]
        model: dict[str, int] = {}
        ops = [("bind", i, i % 12) for i in range(prefix)] + ops
        for op, n, o in ops:
            key, ref = NAMES[n], objects[o]
            if op == "bind":
                heap.roots[key] = ref
                model[key] = ref
            elif op == "unbind":
                if key in model:
                    del heap.roots[key]
                    del model[key]
                else:
                    with pytest.raises(shmheap.RootNotFoundError):
                        del heap.roots[key]
            elif op == "lookup":
                assert heap.roots.get(key) == model.get(key)
            elif ref in model.values():
                with pytest.raises(shmheap.BoundObjectError):
                    heap.free(ref)
            else:
                heap.free(ref)
                objects[o] = heap.alloc(100 if o < 8 else 20000)
        assert dict(heap.roots) == model and len(heap.roots) == len(model)
        for ref in objects:
            assert heap.roots.names_of(ref) == sorted(k for k, v in model.items() if v == ref)
        assert heap.check() == []
    finally:
        discard(name, heap)


# -- crash points, killed ----------------------------------------------------------------------

ROOT_POINTS = sorted(p for p in shmheap.CRASH_POINTS if p.startswith("roots."))
#: the child's steps: every roots crash point is passed at least once (the raised twin of
#: this test, test_faults.py, runs the same steps).  The lookup first maps the table, so that
#: on the native core the small object's bind, unbind and bind again are its writer's
#: (passages 1-2 of each point); the rebind to a large object and its unbind are Python's
#: (counted:3, published:3, removed:2, handed_over:4-5), then the names past the first
#: table's half (a rebuild)
STEPS = """
import json, shmheap
h = shmheap.Heap.attach({name!r})
small, large = h.alloc(100), h.alloc(50000)
print(json.dumps([small, large]), flush=True)
"x" in h.roots
h.roots["x"] = small
del h.roots["x"]
h.roots["x"] = small
h.roots["x"] = large
del h.roots["x"]
for i in range(140):
    h.roots[f"n{{i}}"] = small
"""


def test_every_roots_crash_point_is_passed_by_the_steps() -> None:
    assert ROOT_POINTS == ["roots.counted", "roots.entry_written", "roots.handed_over",
                           "roots.published", "roots.rehashed", "roots.removed"]


@pytest.mark.parametrize(("point", "passage"), [
    *((point, 1) for point in ROOT_POINTS),  # the first bind and unbind, and the rebuild
    ("roots.published", 2), ("roots.handed_over", 3),  # the bind of the name unbound
    ("roots.counted", 3), ("roots.published", 3), ("roots.handed_over", 4),  # to a large one
    ("roots.removed", 2), ("roots.handed_over", 5),  # the large object's unbind
    ("roots.counted", 4), ("roots.entry_written", 2), ("roots.published", 4)])  # "n0"
def test_killed_at_every_roots_crash_point(heap: shmheap.Heap, point: str,
                                           passage: int) -> None:
    kept = heap.alloc(100)
    heap.roots["kept"] = kept
    proc = run_child(STEPS.format(name=heap.name), f"{point}:{passage}")
    assert_killed(proc)
    small, large = json.loads(proc.stdout)
    heap.snapshot(timeout=RECOVERY_TIMEOUT)           # adopts the dead holder's lock, and
    info = heap.info()                                # a writable holder repairs at once
    assert info.recoveries == 1
    # an unpublished region needs no journal; else the journal named the change
    assert info.repairs == (0 if point == "roots.rehashed" else 1)
    assert heap.check(repair=True, timeout=RECOVERY_TIMEOUT) == []
    assert heap.check() == [], "the roots table or a root count was left inconsistent"
    bound = dict(heap.roots)
    assert bound["kept"] == kept
    assert set(bound) - {"kept", "x"} <= {f"n{i}" for i in range(140)}
    assert bound.get("x") in (None, small, large)
    for ref in (small, large, kept):                  # free refuses exactly the bound ones
        if ref in bound.values():
            with pytest.raises(shmheap.BoundObjectError):
                heap.free(ref)
        else:
            heap.free(ref)
    for name in bound:
        heap.roots.unbind(name)
    assert heap.check() == []


# -- fsck ------------------------------------------------------------------------------------


def test_fsck_finds_and_repairs_wrong_root_counts(heap: shmheap.Heap) -> None:
    small, large, stray = heap.alloc(100), heap.alloc(20000), heap.alloc(100)
    heap.roots["small"], heap.roots["large"] = small, large
    objects = heap._objects()
    with heap.locked():
        objects.set_root_count(*objects.live(small, held=True), 3)   # counts 3, has 1
        objects.set_root_count(*objects.live(large, held=True), 0)   # counts 0, has 1
        objects.set_root_count(*objects.live(stray, held=True), 1)   # counts 1, has none
    assert sorted(f.code for f in heap.check()) == ["root-count"] * 3
    assert sorted(f.code for f in heap.check(repair=True)) == ["root-count"] * 3
    assert heap.check() == []
    heap.free(stray)
    with pytest.raises(shmheap.BoundObjectError):
        heap.free(large)


def test_fsck_unbinds_a_root_whose_object_is_gone(heap: shmheap.Heap) -> None:
    ref = heap.alloc(100)
    heap.roots["doomed"] = ref
    objects = heap._objects()
    with heap.locked():  # as a free racing the bind in another process could leave it
        objects.set_root_count(*objects.live(ref, held=True), 0)
    heap.free(ref)
    assert [f.code for f in heap.check()] == ["root-dangling"]
    assert [f.code for f in heap.check(repair=True)] == ["root-dangling"]
    assert "doomed" not in heap.roots and heap.check() == []


def test_fsck_of_garbage_keys_is_fatal_not_a_crash(heap: shmheap.Heap) -> None:
    heap.roots["x"] = heap.alloc(100)
    table = heap.roots.table()
    region = table.current()
    slot = next(i for i in range(region.cap) if region.slots[2 * i])
    region.slots[2 * slot] |= 0xFFFFFF   # the key points past the end of the names
    findings = heap.check()
    assert [(f.code, f.fatal) for f in findings] == [("roots-entry", True)]
    for call in (lambda: heap.roots["x"], lambda: dict(heap.roots)):
        with pytest.raises(shmheap.HeapCorruptError, match="roots table"):
            call()


def test_a_bind_under_a_garbage_names_end_writes_nothing_past_the_names(
        heap: shmheap.Heap) -> None:
    """A names_end near 2**64 must not wrap the room check of a new name's bind (the native
    writer once computed end + length, which wraps, and copied the name out of bounds)."""
    heap.roots["x"] = heap.alloc(100)
    region = heap.roots.table().current()
    region.head[roots._NAMES_END] = (1 << 64) - 8
    out = attach_and(heap.name, """
assert h.roots.get("absent") is None  # (maps the table: the next bind is the native one)
try:
    h.roots["new-name"] = h.alloc(16)
    print("bound")
except shmheap.HeapCorruptError:
    print("corrupt")
""")
    assert out.strip() == "corrupt"
    region.head[roots._NAMES_END] = roots.record_bytes(len("x"))


# -- the command line ------------------------------------------------------------------------


def test_shmheap_roots_lists_names_refs_and_sizes(heap: shmheap.Heap) -> None:
    small, large = heap.alloc(100), heap.alloc(20000)
    heap.roots["b-large"], heap.roots["a-small"] = large, small

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "shmheap", *args], capture_output=True,
                              text=True, timeout=120)

    listed = cli("roots", heap.name, "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == [
        {"name": "a-small", "ref": small, "bytes": heap.size_of(small)},
        {"name": "b-large", "ref": large, "bytes": heap.size_of(large)}]
    table = cli("roots", heap.name)
    assert table.stdout.split("\n")[0].split() == ["name", "ref", "bytes"]
    assert table.stdout.split("\n")[1].split() == ["a-small", hex(small),
                                                   str(heap.size_of(small))]
    info = cli("info", heap.name, "--json")
    assert json.loads(info.stdout)["roots"] == 2
    top = cli("top", heap.name, "--once")
    assert "roots       2 bound" in top.stdout, top.stdout
    missing = cli("roots", unique_heap_name())
    assert missing.returncode == 1 and missing.stderr.startswith("shmheap: error: no heap")


def test_the_roots_segment_is_sparse_and_grows_with_the_table(heap: shmheap.Heap) -> None:
    path = f"/dev/shm/shmheap.{heap.name}.roots"
    assert os.stat(path).st_size == roots.MIN_SIZE
    ref = heap.alloc(16)
    for i in range(200):
        heap.roots[f"r{i}"] = ref
    grown = os.stat(path)
    # 129 keys pass half of 256 slots: rebuilt into 1,024 slots (a quarter used at most),
    # region 5; the file reaches no further
    assert grown.st_size == roots.region_offset(6)
    assert grown.st_blocks * 512 < grown.st_size  # the name areas are not all reserved
