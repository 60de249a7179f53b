"""The native core beside its pure-Python twin: one layout, one protocol, one heap.

The whole suite runs once per core (.ci/run has a pass with SHMHEAP_PURE_PYTHON=1);
these tests check what only the pair can show: that the C layout and the Python one
agree byte for byte, that the switch works, and that native and pure processes
share a heap at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shmheap import allocator, control, core, layout, liveness
from shmheap.pytest_plugin import HeapFactory

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
        "META_SEQ_OFFSET": layout.SEQ_OFFSET,
        "SPAN_HOLDER_SIZE": allocator.HOLDER_SIZE,
    }
    assert python == core.native.LAYOUT
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
