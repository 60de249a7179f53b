"""The native core beside its pure-Python twin: one layout, one protocol, one heap.

The whole suite runs once per core (.ci/run has a pass with SHMHEAP_PURE_PYTHON=1);
these tests check what only the pair can show: that the C layout and the Python one
agree byte for byte, that the switch works, and that native and pure processes
share a heap at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from shmheap import (
    allocator,
    arenas,
    bytescan,
    control,
    coord,
    core,
    layout,
    liveness,
    names,
    roots,
)
from shmheap.errors import HeapClosedError, HeapCorruptError
from shmheap.pytest_plugin import HeapFactory, unique_heap_name

needs_native = pytest.mark.skipif(core.native is None,
                                  reason="the native core is not built here (no C compiler?)")


def env_for(pure: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHMHEAP_")}
    if pure:
        env[core.PURE_VAR] = "1"
    return env


@needs_native
def test_the_c_layout_is_the_python_layout() -> None:
    assert core.native is not None
    python = {
        "LIVE_OWNER_OFFSET": liveness.OWNER_OFFSET,
        "LIVE_RECOVERIES_OFFSET": 16, "LIVE_LAST_RECOVERY_OFFSET": 24, "LIVE_REPAIRS_OFFSET": 32,
        "LIVE_LOCK_SEQ_OFFSET": liveness.LOCK_SEQ_OFFSET,
        "LIVE_WAITER_OFFSET": liveness.WAITER_OFFSET,
        "LIVE_SLOTS_OFFSET": liveness.SLOTS_OFFSET, "LIVE_SLOT_SIZE": liveness.SLOT_SIZE,
        "LIVE_SLOT_PID": 0, "LIVE_SLOT_EPOCH": 4, "LIVE_REPAIR_BYTE": liveness.REPAIR_BYTE,
        "CONTROL_HEADER_OFFSET": control.HEADER_OFFSET,
        "CONTROL_JOURNAL_OFFSET": control.JOURNAL_OFFSET,
        "CONTROL_JOURNAL_ARG_OFFSET": control.JOURNAL_ARG_OFFSET,
        "CONTROL_DESTROYED_OFFSET": control.DESTROYED_OFFSET, "CONTROL_ROOTS_OP": control.ROOTS,
        "CONTROL_COORD_OP": control.COORD,
        "COORD_HEADER_WORDS": coord.HEADER_SIZE // 8, "COORD_RECORD_WORDS": coord.RECORD_SIZE // 8,
        "COORD_RECORDS": coord.RECORDS, "COORD_FUTEX": coord._FUTEX, "COORD_PARAM": coord._PARAM,
        "COORD_HEAD": coord._HEAD, "COORD_INTENT": coord._I_RECORD,
        "COORD_OP_PUT": coord.OP_PUT, "COORD_OP_TAKE": coord.OP_TAKE,
        "COORD_NODE_HEADER": coord.NODE_HEADER, "COORD_KIND_INT": coord._INT,
        "COORD_KIND_PICKLE": coord._PICKLE,
        "META_SEQ_OFFSET": layout.SEQ_OFFSET,
        "SPAN_HOLDER_SIZE": allocator.HOLDER_SIZE,
        "ROOTS_TABLE_OFFSET": 8 * roots._TABLE, "ROOTS_REGIONS": roots.REGIONS,
        "ROOTS_BUILT_OFFSET": 8 * roots._BUILT, "ROOTS_INTENT_OFFSET": 8 * roots._INTENT,
        "ROOTS_INTENT_WORDS": len(roots._FIELDS), "ROOTS_INSERT": roots.INSERT,
        "ROOTS_UPDATE": roots.UPDATE, "ROOTS_LIVE_OFFSET": 8 * roots._LIVE,
        "ROOTS_USED_OFFSET": 8 * roots._USED,
        "ROOTS_FIRST_CAP": roots.FIRST_CAP, "ROOTS_REGION_HEADER": roots.REGION_HEADER,
        "ROOTS_SEQ_OFFSET": 8 * roots._SEQ, "ROOTS_NAMES_END_OFFSET": 8 * roots._NAMES_END,
        "ROOTS_SLOT_BYTES": roots.SLOT_BYTES,
        "ROOTS_NAME_BYTES_PER_SLOT": roots.NAME_BYTES_PER_SLOT, "ROOTS_MAX_NAME": roots.MAX_NAME,
    }
    assert python == core.native.LAYOUT
    # the intent record's words, in the order _native.c writes them from COORD_INTENT
    assert (coord._I_RECORD, coord._I_OP, coord._I_SAVED.start, coord._I_NODE_A, coord._I_NEXT_A,
            coord._I_NODE_B, coord._I_NEXT_B, coord._I_FREE, coord._I_OWNER, coord._I_HOLD) == \
        (8, 9, 10, 16, 17, 18, 19, 20, 21, 22)
    assert [coord._HEAD, coord._TAIL, coord._COUNT, coord._LEASES, coord._LEASED,
            coord._CLOSED] == [10, 11, 12, 13, 14, 15]
    # the counters and the slot fields as liveness.py packs them
    assert liveness._COUNTERS.size == 24 and liveness._SLOT.format == "<IIQ"


@pytest.mark.parametrize("pure", [False, True])
def test_the_core_is_chosen_by_the_environment(pure: bool) -> None:
    if not pure and core.native is None:
        pytest.skip("the native core is not built here")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import json, shmheap
        from shmheap import core, index, lock
        print(json.dumps([shmheap.NATIVE, core.native is not None,
                          type(index.ArenaSnapshot).__module__]))
        """)], env=env_for(pure), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    native, loaded, _ = json.loads(proc.stdout)
    assert native is (not pure) and loaded is (not pure)


WORKER = """
import json, random, sys
import shmheap
h = shmheap.Heap.attach(sys.argv[1])
rng = random.Random(int(sys.argv[2]))
held = {}
for step in range(4000):
    if held and rng.random() < 0.45:
        ref = rng.choice(list(held))
        assert bytes(h.view(ref)[:8]) == held.pop(ref), hex(ref)
        h.free(ref)
    else:
        ref = h.alloc(rng.choice((16, 100, 700, 3000, 20000, 70000)))
        mark = ref.to_bytes(8, "little")
        h.view(ref)[:8] = mark
        held[ref] = mark
    if step % 500 == 0:
        h.grow()
        h.snapshot()
print(json.dumps({"native": shmheap.NATIVE, "held": sorted(held)}))
h.close()
"""


@needs_native
def test_native_and_pure_processes_share_one_heap(shm_heap_factory: HeapFactory) -> None:
    heap = shm_heap_factory(arena_size=1 << 20, reserve=False)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, heap.name, str(seed)],
                              env=env_for(pure=seed % 2 == 1), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for seed in range(4)]
    try:
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
            results.append(json.loads(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert sorted(r["native"] for r in results) == [False, False, True, True]
    held = sorted(ref for r in results for ref in r["held"])
    assert len(set(held)) == len(held), "two processes were given one object"
    live = sorted(ref for span in heap.walk() for ref in span.objects)
    assert live == held
    for ref in held:
        assert bytes(heap.view(ref)[:8]) == ref.to_bytes(8, "little")
        heap.free(ref)
    assert heap.check(repair=True) == [] and heap.check() == []


@needs_native
def test_stress_mixes_the_cores_with_kills(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "shmheap", "stress", "--mix", "--duration", "4",
                           "--kill-rate", "3", "--seed", "7", "--no-progress", "--floor", "0",
                           "--json", str(out)], env=env_for(pure=False), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["violations"] == 0 and not report["leaks"]
    assert report["cores"]["native"] > 0 and report["cores"]["pure"] > 0


QUEUE_ECHO = """
import sys
import shmheap
h = shmheap.Heap.attach(sys.argv[1])
inbox, outbox = h.queue("in", capacity=3), h.queue("out", capacity=3)
while True:
    item = inbox.get()
    outbox.put(item)
    if item is None:
        break
h.close()
"""


@needs_native
@pytest.mark.parametrize("pure_echo", [False, True])
def test_native_and_pure_processes_share_one_queue(shm_heap_factory: HeapFactory,
                                                   pure_echo: bool) -> None:
    """Items pass a native process and a pure one both ways, through small queues that make
    either side wait for the other."""
    heap = shm_heap_factory(arena_size=1 << 20, reserve=False)
    inbox, outbox = heap.queue("in", capacity=3), heap.queue("out", capacity=3)
    assert core.native is not None and isinstance(getattr(inbox.put, "__self__", None),
                                                  core.native.Queue), \
        "this process puts and gets through the native core"
    echo = subprocess.Popen([sys.executable, "-c", QUEUE_ECHO, heap.name],
                            env=env_for(pure=pure_echo), stderr=subprocess.PIPE, text=True)
    try:
        items: list[object] = [*range(-5, 200), "text", (1, 2.5, None), 1 << 70, True, None]
        got = []
        for item in items:
            inbox.put(item)
            while len(outbox):
                got.append(outbox.get())
        while len(got) < len(items):
            got.append(outbox.get(timeout=60))
        assert echo.wait(timeout=60) == 0, echo.stderr.read() if echo.stderr else ""
    finally:
        if echo.poll() is None:
            echo.kill()
            echo.wait()
    assert got == items
    assert heap.check() == [] and heap.stats().live_objects == 0

ROOTS_WRITER = """
import json, sys
import shmheap
h = shmheap.Heap.attach(sys.argv[1])
refs = [h.alloc(16) for _ in range(4)]
bound = {}
for i in range(700):  # past the first region: rebuilds into larger ones
    name = f"root-{i}" if i % 3 else f"r\u00e9cine-{i}-" + "x" * (i % 200)
    h.roots[name] = bound[name] = refs[i % 4]
for i, name in enumerate(sorted(bound)):
    if i % 5 == 0:
        del h.roots[name]  # a tombstone
        del bound[name]
    elif i % 5 == 1:
        h.roots[name] = bound[name] = refs[(i + 1) % 4]  # rebound in place
print(json.dumps({"native": shmheap.NATIVE, "bound": bound, "refs": refs}))
h.close()
"""

ROOTS_READER = """
import json, sys
import shmheap
h = shmheap.Heap.attach(sys.argv[1], readonly=True)
names = json.loads(sys.stdin.read())
print(json.dumps({"native": shmheap.NATIVE,
                  "got": {name: h.roots.get(name, 0) for name in names},
                  "in": [name for name in names if name in h.roots]}))
h.close()
"""


def run_core(code: str, pure: bool, *args: str, given: str = "") -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", code, *args], input=given, env=env_for(pure),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    assert result["native"] is (not pure)
    return result


@needs_native
@pytest.mark.parametrize("writer_pure", [True, False])
def test_native_and_pure_processes_agree_on_roots(shm_heap_factory: HeapFactory,
                                                   writer_pure: bool) -> None:
    """One core binds, rebinds and unbinds (rebuilding the table), the other looks up."""
    heap = shm_heap_factory(arena_size=1 << 20, reserve=False)
    wrote = run_core(ROOTS_WRITER, writer_pure, heap.name)
    bound = wrote["bound"]
    assert isinstance(bound, dict)
    unbound = [f"root-{i}" for i in range(700, 900)] + ["root-0", "r\u00e9cine-never"]
    names = sorted(bound) + unbound
    read = run_core(ROOTS_READER, not writer_pure, heap.name, given=json.dumps(names))
    assert read["got"] == {**bound, **dict.fromkeys(unbound, 0)}
    assert read["in"] == sorted(bound)
    assert heap.roots.snapshot() == bound
    for name in bound:
        del heap.roots[name]
    assert isinstance(wrote["refs"], list)
    for ref in wrote["refs"]:
        heap.free(ref)


@needs_native
def test_the_native_root_lookup_leaves_every_doubt_to_python(
        shm_heap_factory: HeapFactory) -> None:
    heap = shm_heap_factory(arena_size=1 << 20, reserve=False)
    ref = heap.alloc(16)
    heap.roots["x"] = ref
    table = heap.roots.table()
    fast = table.native
    assert fast("x") == ref and fast("y") == 0
    for name in (b"x", "", "x" * 256, "\udc80", 7):
        assert fast(name) is None
    region = table.current()
    region.begin()  # a bind or rebuild under way: seq is odd
    assert fast("x") is None and heap.roots["x"] == ref  # (the Python path took the lock)
    region.end()
    assert fast("x") == ref
    slot = next(i for i in range(region.cap) if region.slots[2 * i])
    key = region.slots[2 * slot]
    region.slots[2 * slot] = key | 0xFFFFFF  # points past the names: garbage
    assert fast("x") is None
    with pytest.raises(HeapCorruptError, match="roots table"):
        heap.roots["x"]
    region.slots[2 * slot] = key
    lookup = heap.roots.__getitem__
    heap.close()
    assert fast("x") is None  # it let go of the mappings
    with pytest.raises(HeapClosedError):
        lookup("x")
    with pytest.raises(HeapClosedError):
        "x" in heap.roots  # noqa: B015


RENAMES = [pytest.param(arenas._rename_noreplace_twin, id="twin")] + (
    [] if core.native is None else [pytest.param(core.native.rename_noreplace, id="native")])


@pytest.mark.parametrize("rename", RENAMES)
def test_an_arena_is_moved_to_its_final_name_never_over_another_file(rename: Any) -> None:
    stem = f"{names.SHM_DIR}/{names.PREFIX}{unique_heap_name('rn')}"
    old, new, taken = f"{stem}.new0", f"{stem}.a1", f"{stem}.a2"
    try:
        for path, data in ((old, b"arena"), (taken, b"foreign")):
            with open(path, "wb") as out:
                out.write(data)
        assert rename(old, taken) is False
        with open(taken, "rb") as back:
            assert back.read() == b"foreign"
        assert rename(old, new) is True
        assert not os.path.exists(old) and os.stat(new).st_nlink == 1
        with open(new, "rb") as back:
            assert back.read() == b"arena"
        with pytest.raises(FileNotFoundError):
            rename(old, f"{stem}.a3")
    finally:
        for path in (old, new, taken):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


@needs_native
def test_the_building_scan_is_its_twins_and_stays_in_its_buffer() -> None:
    assert core.native is not None
    nslots = 40
    buf = memoryview(bytearray(liveness.SLOTS_OFFSET + nslots * liveness.SLOT_SIZE))
    for slot in (0, 7, nslots - 1):
        buf[liveness.slot_offset(slot) + liveness.BUILDING_OFFSET] = 1
    buf[liveness.slot_offset(3)] = 1  # a pid byte: not a building byte
    twin = bytescan.nonzero_positions(bytes(buf[liveness.SLOTS_OFFSET + liveness.BUILDING_OFFSET:])
                                      [::liveness.SLOT_SIZE])
    assert liveness._building(buf, nslots) == twin == [0, 7, nslots - 1]
    first = liveness.SLOTS_OFFSET + liveness.BUILDING_OFFSET
    for start, stride, count in ((first, liveness.SLOT_SIZE, nslots + 1), (-1, 1, 1),
                                 (0, 0, 1), (len(buf), 1, 1), (0, 1 << 62, 3)):
        with pytest.raises(ValueError, match="outside the buffer"):
            core.native.nonzero_every(buf, start, stride, count)
    assert core.native.nonzero_every(buf, 0, 1, 0) == []
