"""Fault figures: what a storm of Ctrl-Cs and a crowd of careless processes leave behind.

``storm``
    A child interpreter grows (up to ``MAX_GROWS`` times), snapshots,
    allocates (16 B to 70 KB), fills and frees in a random mix while the
    parent sends it SIGINT every 0.2-3 ms.
    Its handler raises KeyboardInterrupt only while a heap call runs (so the
    interrupts land inside shmheap, at any bytecode there); the child catches
    each one and carries on.  An observer process takes the lock (snapshot
    and ``locked()``) in a loop meanwhile, with a timeout, and counts the
    times it was stuck.  At the end the child checks every object it holds
    (the walker finds it, its pattern is intact), that it owns no span it
    does not cache, and that ``check()`` is clean.  An object whose
    ``alloc`` was interrupted after it allocated is "lost in flight": the
    caller never got its ref (as when a process dies there).
``exits``
    A child interpreter forks ``count`` short-lived workers in turn; each
    attaches, allocates, grows every tenth time and exits without
    ``close()``.  Then ``shmheap fsck NAME`` must exit 0 and list nothing:
    dead processes' slots are recycled, not reported.

Run as ``shmheap bench faults``; the tests run both scenarios in short form.
The exit status is 1 if anything was stuck, lost, dirty or reported.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from typing import Any

from ..display import print_table
from .children import Child
from .common import BenchError, bench_heap, environment, write_json

#: Seconds any process may wait for the lock before it counts as stuck.
STUCK_AFTER = 5.0
#: The storm grows the heap at most this often (each arena is a mapping of the storm child).
MAX_GROWS = 1500

#: Checks a child runs on its own heap handle ``h`` after its faults.
CARRY_ON = """
import json, os, sys, shmheap

def owned_spans(h):
    a = h._objects()
    token = h._live.token
    return sorted((i, s) for i in h.snapshot() for s in a.pages_of(i).owned_starts()
                  if a.pages_of(i).owner[s] == token)

def cached_spans(h):
    return sorted(h._objects().cached_spans())

def carry_on(h):
    '''Use every kind of operation; check that the heap is clean and no span leaked.'''
    h.snapshot()
    arena = h.grow()
    refs = [h.alloc(n) for n in (16, 100, 3000, 20000)]
    per = h._objects().classes[h._objects().lookup[(3000 + 15) >> 4]].nelems
    refs += [h.alloc(3000) for _ in range(per + 1)]   # at least one refill: settles _pending
    for ref in refs:
        h.view(ref)[:8] = ref.to_bytes(8, "little")
    for ref in refs:
        assert bytes(h.view(ref)[:8]) == ref.to_bytes(8, "little"), hex(ref)
        h.free(ref)
    h.free(h.alloc(3000))
    assert owned_spans(h) == cached_spans(h), (owned_spans(h), cached_spans(h))
    findings = h.check()
    assert findings == [], findings
    return arena.index
"""

_STORM = CARRY_ON + """
import random, signal, time
ARMED = False

def interrupt(signum, frame):
    if ARMED:
        raise KeyboardInterrupt

signal.signal(signal.SIGINT, interrupt)
h = shmheap.Heap.attach({name!r})
rng = random.Random({seed})
held = {{}}                 # ref -> its size
counts = dict(interrupts=0, grows=0, snapshots=0, allocs=0, frees=0, uncertain=0)

def pattern(ref):
    return (ref * 0x9E3779B97F4A7C15 & (1 << 64) - 1).to_bytes(8, "little")

def settle(ref):
    '''After an interrupted free: the next writable lock holder decides; see what it did.'''
    with h.locked():
        pass
    try:
        h.size_of(ref)
    except shmheap.InvalidRefError:
        del held[ref]

print("ready", flush=True)
deadline = time.monotonic() + {seconds}
while time.monotonic() < deadline:
    op = rng.choice("ggsaaaaffff")
    ref = 0
    try:
        if op == "f" and held:
            ref = rng.choice(list(held))
            ARMED = True
            h.free(ref)
            ARMED = False
            del held[ref]
            counts["frees"] += 1
        elif op == "a":
            size = rng.choice((16, 48, 100, 700, 3000, 20000, 70000))
            ARMED = True
            new = h.alloc(size)
            ARMED = False
            h.view(new)[:8] = pattern(new)
            held[new] = size
            counts["allocs"] += 1
        elif op == "g" and counts["grows"] < {max_grows}:
            ARMED = True
            h.grow()
            ARMED = False
            counts["grows"] += 1
        else:
            ARMED = True
            h.snapshot()
            ARMED = False
            counts["snapshots"] += 1
    except KeyboardInterrupt:
        ARMED = False
        counts["interrupts"] += 1
        if ref:
            counts["uncertain"] += 1
            settle(ref)
ARMED = False
signal.signal(signal.SIGINT, signal.SIG_IGN)
print("storm over", flush=True)
with h.locked():
    pass
bad = [hex(r) for r in held if bytes(h.view(r)[:8]) != pattern(r)]
live = {{ref for span in h.walk() for ref in span.objects}}
counts["held"] = len(held)
counts["lost_in_flight"] = len(live - set(held))
counts["missing"] = len(set(held) - live)
counts["bad_patterns"] = len(bad)
for ref in held:
    h.free(ref)
counts["carry_on"] = carry_on(h)
print(json.dumps(counts), flush=True)
h.close()
"""

_OBSERVER = """
import json, sys, time, shmheap
h = shmheap.Heap.attach({name!r}, readonly=True)
worst = 0.0
stuck = rounds = 0
print("ready", flush=True)
while not sys.stdin.readline().strip():
    for _ in range(200):
        start = time.monotonic()
        try:
            h.snapshot(timeout={limit})
            with h.locked(timeout={limit}):
                pass
        except shmheap.LockTimeoutError:
            stuck += 1
        worst = max(worst, time.monotonic() - start)
        rounds += 1
    print("more", flush=True)
print(json.dumps(dict(stuck=stuck, rounds=rounds, worst_ms=worst * 1e3)), flush=True)
"""

EXITS = """
import os, shmheap
h = shmheap.Heap.attach({name!r})
for n in range({count}):
    pid = os.fork()
    if pid == 0:
        h.alloc(100 + n % 1000)
        if n % 10 == 0:
            h.grow()
        os._exit(0)
    os.waitpid(pid, 0)
os._exit(0)
"""


def storm(name: str, seconds: float, seed: int) -> dict[str, Any]:
    """The SIGINT storm against heap ``name`` (see the module docstring); its counts."""
    rng = random.Random(seed)
    storm_code = _STORM.format(name=name, seed=seed, seconds=seconds, max_grows=MAX_GROWS)
    with Child(storm_code) as child, \
            Child(_OBSERVER.format(name=name, limit=STUCK_AFTER)) as observer:
        if child.line() != "ready" or observer.line() != "ready":
            raise BenchError("faults bench: the storm's children did not start")
        sent = 0
        while child.silent_for(rng.uniform(0.0002, 0.003)):
            os.kill(child.pid, signal.SIGINT)
            sent += 1
            if sent % 50 == 0:  # keep the observer taking the lock meanwhile
                observer.send()
                observer.line()
        if child.line() != "storm over":
            raise BenchError("faults bench: the storm child did not finish its storm")
        observer.send("stop")  # before the child's final checks hold the lock for a while
        observer_counts = json.loads(observer.line())
        counts: dict[str, Any] = json.loads(child.line())
        counts["observer"] = observer_counts
        counts["sigints_sent"] = sent
        if child.wait() != 0:
            raise BenchError(f"faults bench: the storm child failed: {child.stderr()}")
    return counts


def exits(name: str, count: int) -> dict[str, Any]:
    """``count`` processes attach, allocate and exit without closing; then ``shmheap fsck``."""
    started = time.monotonic()
    worker = subprocess.run([sys.executable, "-c", EXITS.format(name=name, count=count)],
                            capture_output=True, text=True, timeout=600)
    if worker.returncode != 0:
        raise BenchError(f"faults bench: the exiting workers failed: {worker.stderr}")
    fsck = subprocess.run([sys.executable, "-m", "shmheap", "fsck", name],
                          capture_output=True, text=True, timeout=600)
    return {"exits": count, "seconds": time.monotonic() - started,
            "fsck_exit": fsck.returncode, "fsck_output": fsck.stdout.strip()}


def run(seconds: float, count: int, seed: int) -> dict[str, Any]:
    results: dict[str, Any] = {"environment": environment(), "seed": seed}
    with bench_heap("benchfault", arena_size=256 * 1024, reserve=False) as heap:
        results["storm"] = storm(heap.name, seconds, seed)
        results["storm"]["findings_after"] = [f.code for f in heap.check()]
    with bench_heap("benchexit", arena_size=64 * 1024, reserve=False) as heap:
        results["exits"] = exits(heap.name, count)
        results["exits"]["attached_after"] = heap.info().attached
    return results


def violations(results: dict[str, Any]) -> list[str]:
    """Everything in ``results`` that must not happen."""
    storm_counts, exit_counts = results["storm"], results["exits"]
    found = [f"{storm_counts[key]} {key.replace('_', ' ')}"
             for key in ("missing", "bad_patterns") if storm_counts[key]]
    if storm_counts["observer"]["stuck"]:
        found.append(f"the observer was stuck {storm_counts['observer']['stuck']} times")
    if storm_counts["findings_after"]:
        found.append(f"check() after the storm: {storm_counts['findings_after']}")
    if exit_counts["fsck_exit"] != 0:
        found.append(f"fsck after the exits: exit {exit_counts['fsck_exit']}: "
                     f"{exit_counts['fsck_output']}")
    return found


def report(results: dict[str, Any]) -> None:
    s, e = results["storm"], results["exits"]
    observer = s["observer"]
    rows = [
        ["SIGINTs sent / KeyboardInterrupts in heap calls", f"{s['sigints_sent']:,} / "
         f"{s['interrupts']:,}"],
        ["operations: grow / snapshot / alloc / free", f"{s['grows']:,} / {s['snapshots']:,} / "
         f"{s['allocs']:,} / {s['frees']:,}"],
        ["objects held at the end / missing / bad pattern", f"{s['held']:,} / {s['missing']} / "
         f"{s['bad_patterns']}"],
        ["lost in flight (alloc interrupted after it allocated)", f"{s['lost_in_flight']:,}"],
        ["observer lock rounds / stuck / worst wait", f"{observer['rounds']:,} / "
         f"{observer['stuck']} / {observer['worst_ms']:.0f} ms"],
        ["check() after the storm", "clean" if not s["findings_after"] else
         ", ".join(s["findings_after"])],
        [f"exits without close() (in {e['seconds']:.1f} s), then `shmheap fsck`",
         f"{e['exits']:,}, fsck exit {e['fsck_exit']}"],
        ["processes attached afterwards", str(e["attached_after"])],
    ]
    print_table(["figure", "value"], rows, title=f"Faults (seed {results['seed']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shmheap bench faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--quick", action="store_true",
                        help="a 10 s storm and 200 exits (default: 60 s and 1,000)")
    length.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=None, help="seed of the storm's mix")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    seconds, count = (1.0, 20) if args.tiny else (10.0, 200) if args.quick else (60.0, 1000)
    seed = random.randrange(1 << 30) if args.seed is None else args.seed
    results = run(seconds, count, seed)
    report(results)
    if args.json:
        write_json(args.json, results)
    found = violations(results)
    for problem in found:
        print(f"VIOLATION: {problem}", file=sys.stderr)
    return 1 if found else 0

