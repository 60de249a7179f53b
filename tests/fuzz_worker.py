"""Seeded fuzz of a heap's shared metadata, run as ``python fuzz_worker.py SEED ROUNDS``.

Each round makes a small heap with arenas, objects, marks and roots, overwrites a
few bytes of one metadata region (control words, index entries, the arena
map, liveness, an arena trailer, page metadata, span headers, the roots
table) and then calls every public
call, through the damaged handle, a fresh attach, a read-only attach and the
CLI.  Each call must work or raise a ShmHeapError.  Any other exception
prints the seed, round and region and exits 1; a signal (SIGBUS) or a hang
is seen by the parent, and RLIMIT_AS turns a huge allocation into a
MemoryError, which fails too.  Every heap is destroyed, also on failure.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import random
import resource
import sys
import traceback
from collections.abc import Callable

import shmheap
from shmheap import layout, roots
from shmheap.arenas import TRAILER_SIZE
from shmheap.pytest_plugin import unique_heap_name
from shmheap.tools import cli

ARENA = 64 * 1024
PAGE = 4096
#: Bytes of address space the worker may add to what it has after its imports.
HEADROOM = 768 << 20


def region_of(rng: random.Random, heap: shmheap.Heap) -> tuple[str, str, int, int]:
    """(label, segment suffix, first offset, end offset) of one metadata region."""
    lay = layout.layout(ARENA, PAGE)
    meta = ARENA + TRAILER_SIZE
    fields = {"owned+seq": (0, 16), "partial": (64, 128), "used": (lay.used, lay.state),
              "state": (lay.state, lay.sclass), "sclass": (lay.sclass, lay.inuse),
              "inuse+marks": (lay.inuse, lay.span), "span": (lay.span, lay.npages),
              "npages": (lay.npages, lay.owner), "owner": (lay.owner, lay.size)}
    arena = f".a{rng.choice(list(heap.snapshot())):x}"
    choices: list[tuple[str, str, int, int]] = [
        ("control words", "", 0, 128), ("control words", "", 64, 128),
        ("index entries", ".i0", 0, 16), ("arena map", ".map", 0, 8),
        ("liveness header", ".live", 0, 48), ("liveness slots", ".live", 64, 64 + 32 * 4),
        ("arena trailer", arena, ARENA, ARENA + 32),
        ("span headers", arena, 0, 2 * PAGE),
        ("roots header", ".roots", 0, 160),
        ("roots table", ".roots", roots.region_offset(0), roots.region_offset(0) + 64 + 16 * 256),
        ("roots names", ".roots", roots.region_offset(0) + 64 + 16 * 256, roots.MIN_SIZE),
    ]
    choices += [(f"page metadata {field}", arena, meta + lo, meta + hi)
                for field, (lo, hi) in fields.items()]
    choices += [c for c in choices if c[0].startswith("page metadata")]  # weigh them up
    return rng.choice(choices)


def damage(rng: random.Random, name: str, suffix: str, lo: int, hi: int) -> None:
    """Overwrite 1-6 spots in [lo, hi) of segment ``shmheap.NAME<suffix>``."""
    fd = os.open(f"/dev/shm/shmheap.{name}{suffix}", os.O_RDWR)
    try:
        for _ in range(rng.randint(1, 6)):
            width = rng.choice((1, 1, 4, 8))
            at = rng.randrange(lo, max(lo + 1, hi - width + 1)) & -width
            value = rng.choice((0, 1, 2, 3, 0xFF, 0x7F, 1 << (8 * width - 1),
                                (1 << 8 * width) - 1, rng.getrandbits(8 * width)))
            os.pwrite(fd, value.to_bytes(width, "little"), at)
    finally:
        os.close(fd)


def populate(rng: random.Random, heap: shmheap.Heap) -> list[int]:
    """Objects of several classes and a large one, some freed, a cycle with marks."""
    heap.grow()
    heap.grow()
    refs = [heap.alloc(rng.choice((16, 48, 100, 500, 3000))) for _ in range(rng.randint(5, 40))]
    refs += [heap.alloc(3 * PAGE), heap.alloc(PAGE + 1)]
    for ref in refs[::3]:
        heap.free(ref)
    live = [r for i, r in enumerate(refs) if i % 3]
    for number, ref in enumerate(live[:4] + live[-2:]):
        heap.roots[f"root{number}"] = ref
    heap.start_cycle()
    for ref in live[::2]:
        heap.mark(ref)
    heap.scavenge()
    return [*live, refs[0]]


def calls(heap: shmheap.Heap, refs: list[int]) -> list[tuple[str, Callable[[], object]]]:
    """Every public call on ``heap``, with the refs it had before the damage."""
    got: list[tuple[str, Callable[[], object]]] = [
        ("snapshot", lambda: list(heap.snapshot(timeout=2))),
        ("arenas", lambda: list(heap.arenas(timeout=2))),
        ("arena", lambda: [heap.arena(i) for i in range(4) if i in heap]),
        ("info", lambda: heap.info(timeout=2)), ("stats", heap.stats),
        ("walk", lambda: list(heap.walk())), ("check", lambda: heap.check(timeout=2)),
        ("roots", lambda: (dict(heap.roots), len(heap.roots), heap.roots.get("root1"))),
        ("ndarray", lambda: [heap.ndarray(ref) for ref in refs[:3]]),
    ]
    for ref in refs[:6]:
        got += [("view", functools.partial(heap.view, ref)),
                ("size_of", functools.partial(heap.size_of, ref))]
    if heap.readonly:
        return got
    got += [("alloc", lambda: [heap.alloc(n) for n in (16, 100, 3000, 5 * PAGE)])]
    got += [("bind", lambda: heap.roots.bind("new", heap.alloc(16), timeout=2)),
            ("unbind", lambda: heap.roots.unbind("root2", timeout=2)),
            ("new_array", lambda: heap.ndarray(heap.new_array((4, 3), "f4")))]
    got += [("free", functools.partial(heap.free, ref)) for ref in refs[:6]]
    got += [("mark", lambda: [*map(heap.mark, refs[6:10])]), ("sweep", heap.sweep),
            ("scavenge", heap.scavenge), ("start_cycle", heap.start_cycle),
            ("repair", lambda: heap.check(repair=True, timeout=2)),
            ("grow", lambda: heap.grow(timeout=2)), ("stats again", heap.stats),
            ("alloc again", lambda: [heap.alloc(n) for n in (16, 2 * PAGE)])]
    return got


def cli_calls(name: str) -> list[tuple[str, Callable[[], object]]]:
    def run(*argv: str) -> Callable[[], object]:
        def call() -> object:
            with contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                return cli.main(list(argv))
        return call
    return [(f"cli {' '.join(argv)}", run(*argv)) for argv in (
        ("info", name), ("arenas", name), ("walk", name), ("fsck", name), ("ls",),
        ("roots", name),
        ("fsck", "--repair", name))]


def attempt(label: str, call: Callable[[], object]) -> None:
    try:
        call()
    except shmheap.ShmHeapError:
        pass
    except BaseException:
        print(f"failing call: {label}", file=sys.stderr)
        raise


def one_round(rng: random.Random) -> str:
    name = unique_heap_name("fz")
    heaps: list[shmheap.Heap] = []
    try:
        heap = shmheap.Heap.create(name, arena_size=ARENA, max_arenas=64, reserve=False,
                                   page_size=PAGE)
        heaps.append(heap)
        refs = populate(rng, heap)
        label, suffix, lo, hi = region_of(rng, heap)
        damage(rng, name, suffix, lo, hi)
        for what, call in calls(heap, refs):
            attempt(f"{label}: {what}", call)
        for readonly in (False, True):
            try:
                other = shmheap.Heap.attach(name, readonly=readonly, timeout=0.5)
            except shmheap.ShmHeapError:
                continue
            heaps.append(other)
            for what, call in calls(other, refs):
                attempt(f"{label}: attached readonly={readonly}: {what}", call)
        for what, call in cli_calls(name):
            attempt(f"{label}: {what}", call)
        return label
    finally:
        for heap in heaps:
            heap.close()
        with contextlib.suppress(shmheap.HeapNotFoundError):
            shmheap.destroy(name)


def limit_address_space() -> None:
    with open("/proc/self/status") as status:
        vm_kib = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    limit = (vm_kib << 10) + HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main(seed: int, rounds: int) -> int:
    import numpy  # noqa: F401  (imported before the limit, as the heap's scans use it)

    limit_address_space()
    rng = random.Random(seed)
    for number in range(rounds):
        state = rng.getstate()
        try:
            one_round(rng)
        except BaseException:
            rng.setstate(state)
            print(f"seed {seed} round {number}: a call raised something other than a "
                  f"ShmHeapError:\n{traceback.format_exc()}", file=sys.stderr)
            return 1
    print(f"{rounds} rounds ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2])))
