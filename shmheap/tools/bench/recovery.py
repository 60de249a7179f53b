"""Recovery benchmark: how long after a lock holder dies does the next process get the lock.

Two ways to die are measured, each over ``rounds`` fresh child interpreters:

``owner recorded``
    The child takes the heap lock (its owner record is written), says so, and
    waits; the parent SIGKILLs it and times from the kill to its own next
    successful ``snapshot()`` (wait slice + liveness check + adoption + repair).
``died before recording``
    The child runs ``grow()`` with ``SHMHEAP_CRASH_AT=lock.acquired``: it dies
    between taking the semaphore and writing its owner record.  The parent
    times from reaping the child to its next ``snapshot()``: the waiter must
    see the lock unowned for ``lock.UNOWNED_GRACE`` before it adopts.

Every round checks that the heap is clean afterwards and that no published
arena was lost.  Run as ``shmheap bench recovery`` or ``tools/bench_recovery.py``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

from ... import lock
from ...heap import Heap
from ..display import print_table
from .common import BenchError, bench_heap, environment, percentile, write_json

_HOLD = textwrap.dedent("""
    import sys, shmheap
    h = shmheap.Heap.attach(sys.argv[1])
    held = h.locked()
    held.__enter__()
    print("locked", flush=True)
    sys.stdin.readline()
    """)
_GROW = "import sys, shmheap; shmheap.Heap.attach(sys.argv[1]).grow()"


def _child(code: str, name: str, crash_at: str | None = None) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "SHMHEAP_CRASH_AT"}
    if crash_at:
        env["SHMHEAP_CRASH_AT"] = crash_at
    return subprocess.Popen([sys.executable, "-c", code, name], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def _reap(proc: subprocess.Popen[str]) -> None:
    proc.wait(timeout=60)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()
    if proc.returncode != -signal.SIGKILL:
        raise BenchError(f"recovery bench: child exited with {proc.returncode}, not SIGKILL")


def _recover(heap: Heap, published: int) -> float:
    """Take a snapshot (recovering the dead holder); check nothing was lost; its end time."""
    snap = heap.snapshot(timeout=60)
    end = time.perf_counter()
    if len(snap) < published:
        raise BenchError(f"recovery bench: {published - len(snap)} published arenas lost")
    return end


def owner_recorded_round(heap: Heap) -> float:
    """Kill a holder that recorded itself; seconds from the kill to our next snapshot."""
    published = len(heap.snapshot())
    proc = _child(_HOLD, heap.name)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "locked":
        proc.kill()
        _reap(proc)
        raise BenchError("recovery bench: the holder child did not take the lock")
    start = time.perf_counter()
    os.kill(proc.pid, signal.SIGKILL)
    end = _recover(heap, published)
    _reap(proc)
    return end - start


def died_before_recording_round(heap: Heap) -> float:
    """A child dies between sem_wait and its owner record; seconds from reaping to snapshot."""
    published = len(heap.snapshot())
    proc = _child(_GROW, heap.name, crash_at="lock.acquired")
    _reap(proc)
    start = time.perf_counter()
    return _recover(heap, published) - start


def run(rounds: int) -> dict[str, Any]:
    results: dict[str, Any] = {"environment": environment(), "rounds": rounds,
                               "poll_s": lock.POLL, "unowned_grace_s": lock.UNOWNED_GRACE}
    with bench_heap("benchrec", arena_size=64 * 1024, reserve=False) as heap:
        heap.grow()
        for label, one_round in (("owner_recorded", owner_recorded_round),
                                 ("died_before_recording", died_before_recording_round)):
            samples = [one_round(heap) for _ in range(rounds)]
            results[label] = {"p50_ms": percentile(samples, 0.5) * 1e3,
                              "max_ms": max(samples) * 1e3}
        findings = heap.check()
        info = heap.info()
        results["recoveries"] = info.recoveries
        results["findings_after"] = [f.as_dict() for f in findings]
    if results["recoveries"] != 2 * rounds:
        raise BenchError(f"recovery bench: {results['recoveries']} recoveries counted for "
                         f"{2 * rounds} deaths")
    return results


def report(results: dict[str, Any]) -> None:
    rows = [[label.replace("_", " "), f"{results[label]['p50_ms']:.1f} ms",
             f"{results[label]['max_ms']:.1f} ms"]
            for label in ("owner_recorded", "died_before_recording")]
    print_table(
        ["holder died", "p50", "max"],
        rows,
        title=f"Recovery latency, kill -> next successful snapshot ({results['rounds']} rounds "
              f"each; poll {results['poll_s'] * 1e3:.0f} ms, unowned grace "
              f"{results['unowned_grace_s'] * 1e3:.0f} ms)")
    print(f"recoveries counted: {results['recoveries']}; findings after: "
          f"{len(results['findings_after'])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shmheap bench recovery", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 rounds instead of 50")
    parser.add_argument("--rounds", type=int, help="rounds per kind of death")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    rounds = args.rounds or (10 if args.quick else 50)
    results = run(rounds)
    report(results)
    if args.json:
        write_json(args.json, results)
    return 0 if not results["findings_after"] else 1
