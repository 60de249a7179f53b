"""The ``shmheap`` command-line tool (also ``python -m shmheap``).

Each subcommand is one ``add_<command>(subparsers)`` function that declares
its arguments and sets ``run`` to the function doing the work; the
``COMMANDS`` tuple registers it.  A run function returns the exit status.
Adding a subcommand is one such function (here or in its own module) and
one line in ``COMMANDS``.

Exit status: 0 success, 1 a ``ShmHeapError`` (printed as one line
``shmheap: error: <message>`` on stderr) or a check that found problems,
2 a usage error, 3 a ``shmheap stress`` run INCONCLUSIVE (below a coverage
floor: it did too little to judge), 130 interrupted.  A usage error is a command line that no
state of the heaps could make work: a value the argparse types (args.py)
refuse (a bad size, name, count or number of seconds), or a combination a
command refuses with ``UsageError``; argparse prints it with the
command's usage.  Everything that depends on the heaps, /dev/shm or the
machine (a missing heap, an index out of the heap's range or taken, a full
heap) is a runtime error: ``grow --at`` takes any integer and the heap's
``grow(at=)`` says what is out of range, below 1 or above the maximum alike.

A heap's ``max_arenas`` bounds its arena indices: arenas take indices 1 to
``max_arenas - 1`` (0 is never used), so it holds at most ``max_arenas - 1``
arenas.  Every command says that number (``names.usable_arenas``).

This module owns the commands that look at or change one heap and the
parser.  It does its work through the public ``Heap`` API,
``shmheap.destroy``, ``collect.py``, ``stress.py``, ``top.py`` and
``bench/suite.py``, and prints through display.py; it keeps no state.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from .. import __version__
from ..coord import StructureInfo
from ..errors import HeapCorruptError, InvalidParameterError, InvalidRefError, ShmHeapError
from ..heap import Heap, destroy
from ..names import MAX_ARENAS_LIMIT, check_max_arenas, usable_arenas
from ..repair import Finding
from . import collect, stress, top
from .args import (
    LOCK_TIMEOUT,
    Subparsers,
    UsageError,
    arena_size_arg,
    at_least,
    heap_name,
    integer_arg,
)
from .bench import suite
from .display import format_size, print_json, print_table, when

#: The default max_arenas of ``shmheap create``: at most 1,048,575 arenas.
DEFAULT_MAX_ARENAS = 1 << 20


# -- create / info / arenas / grow / destroy ---------------------------------------------


def add_create(sub: Subparsers) -> None:
    parser = sub.add_parser("create", help="create a heap")
    parser.add_argument("name", type=heap_name)
    parser.add_argument("--arena-size", type=arena_size_arg, default=64 << 20,
                        help="bytes per arena, a power of two >= 64KiB (default 64MiB)")
    parser.add_argument("--max-arenas", type=at_least(2, MAX_ARENAS_LIMIT),
                        default=DEFAULT_MAX_ARENAS, metavar="N",
                        help="bound on arena indices: arenas take indices 1 to N-1, so the heap "
                        f"holds at most N-1 arenas (default {DEFAULT_MAX_ARENAS}: at most "
                        f"{usable_arenas(DEFAULT_MAX_ARENAS):,})")
    parser.add_argument("--no-reserve", action="store_true",
                        help="leave arenas sparse instead of reserving their memory (a write "
                        "into one when /dev/shm is full is SIGBUS)")
    parser.set_defaults(run=run_create)


def run_create(args: argparse.Namespace) -> int:
    try:
        check_max_arenas(args.max_arenas, args.arena_size)
    except InvalidParameterError as exc:
        raise UsageError(str(exc)) from None
    if args.no_reserve:
        print("shmheap: warning: --no-reserve: arenas are sparse, so a process that writes "
              "into one while /dev/shm is full is killed by SIGBUS", file=sys.stderr)
    heap = Heap.create(args.name, arena_size=args.arena_size, max_arenas=args.max_arenas,
                       reserve=not args.no_reserve)
    heap.close()
    print(f"created heap {args.name!r}: at most {usable_arenas(args.max_arenas):,} arenas of "
          f"{format_size(args.arena_size)}"
          + (", not reserved (sparse)" if args.no_reserve else ", each reserved when grown"))
    return 0


def add_info(sub: Subparsers) -> None:
    parser = sub.add_parser("info", help="show what a heap is: parameters, arenas, memory, "
                            "lock, processes, objects",
                            description="Show what a heap is.  The text gives times as dates "
                            "and ages and sizes in units; --json gives the raw numbers (bytes, "
                            "nanoseconds since the epoch).  The command's own attach is left "
                            "out of both.")
    parser.add_argument("name", type=heap_name)
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=run_info)


def run_info(args: argparse.Namespace) -> int:
    with Heap.attach(args.name, readonly=True) as heap:
        sample = top.take_sample(heap, LOCK_TIMEOUT)
        structures = heap.structures()
    others = [a for a in sample.attachments if a.pid != os.getpid()]
    if args.json:
        data = info_json(sample, [a.pid for a in others])
        data["structures"] = [asdict(s) for s in structures]
        print_json(data)
        return 0
    info = sample.info
    usable = usable_arenas(info.max_arenas)
    rows = [
        ("heap", f"{info.name}, created {when(info.created_ns)}"),
        ("arenas", f"{top.arenas_line(info)}; indices 1 to {usable:,}, "
                   + ("full: no grow can add another" if info.arenas >= usable
                      else f"the next grow tries {info.hint:,}")),
        *top.state_rows(sample, others),
        *((s.kind, f"{s.name}: {_structure_line(s)}") for s in structures),
    ]
    print_table(("field", "value"), rows, show_header=False)
    return 0


def _structure_line(s: StructureInfo) -> str:
    """What ``info`` says of one queue, event, counter or barrier."""
    if s.kind == "queue":
        bound = f", capacity {s.param:,}" if s.param else ""
        return f"{s.value:,} items queued, {s.extra:,} leased{bound}"
    if s.kind == "event":
        return "set" if s.value else "not set"
    if s.kind == "barrier":
        return f"{s.value} of {s.param} parties waiting, round {s.extra:,}"
    return f"{s.value:,}"


def info_json(sample: top.Sample, others: list[int]) -> dict[str, Any]:
    """``info --json``: HeapInfo's raw numbers, without this command's own attach."""
    data = sample.info.as_dict()
    del data["readonly"]  # how this command attached, not a property of the heap
    data.update(attached=len(others), attached_pids=others, reserve=sample.reserve,
                shm_bytes=sample.shm_bytes, lock_free=sample.lock_free)
    if sample.lock_free:
        data["lock_owner_pid"] = None
    if sample.stats is not None:
        data["allocator"] = sample.stats.as_dict()
    if sample.owners is not None:
        data["owners"] = {name: asdict(owner) for name, owner in sample.owners.items()}
    return data


def add_arenas(sub: Subparsers) -> None:
    parser = sub.add_parser("arenas", help="list a heap's arenas in creation order")
    parser.add_argument("name", type=heap_name)
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=run_arenas)


def run_arenas(args: argparse.Namespace) -> int:
    with Heap.attach(args.name, readonly=True) as heap:
        snapshot = heap.snapshot(timeout=LOCK_TIMEOUT).tolist()
        size = heap.arena_size
    if args.json:
        print_json({"name": args.name, "arena_size": size, "arenas": snapshot})
    else:
        print_table(("position", "index", "base"),
                    ((pos, index, f"{index * size:#x}") for pos, index in enumerate(snapshot)))
    return 0


def add_grow(sub: Subparsers) -> None:
    parser = sub.add_parser("grow", help="add arenas to a heap")
    parser.add_argument("name", type=heap_name)
    parser.add_argument("--count", type=at_least(1), default=1, help="arenas to add (default 1)")
    parser.add_argument("--at", type=integer_arg, default=None,
                        help="place the (single) new arena at this index (1 to max_arenas - 1)")
    parser.set_defaults(run=run_grow)


def run_grow(args: argparse.Namespace) -> int:
    if args.at is not None and args.count != 1:
        raise UsageError("--at places exactly one arena; drop --count")
    grown = 0
    with Heap.attach(args.name) as heap:
        try:
            for _ in range(args.count):
                arena = heap.grow(at=args.at, timeout=LOCK_TIMEOUT)
                grown += 1
                print(f"arena {arena.index} at {arena.base:#x}", flush=True)
        except ShmHeapError as exc:
            if args.count == 1:
                raise
            raise ShmHeapError(f"grew {grown} of {args.count} arenas, then: {exc}") from None
    return 0


def add_destroy(sub: Subparsers) -> None:
    parser = sub.add_parser("destroy", help="remove every segment of a heap from /dev/shm, even "
                            "a damaged one")
    parser.add_argument("name", type=heap_name)
    parser.add_argument("--force", action="store_true",
                        help="destroy it even if live processes have it attached (they get "
                             "HeapNotFoundError)")
    parser.set_defaults(run=run_destroy)


def run_destroy(args: argparse.Namespace) -> int:
    for entry in destroy(args.name, force=args.force):
        print(f"removed /dev/shm/{entry}")
    return 0


# -- ls / fsck / gc -----------------------------------------------------------------------


def add_ls(sub: Subparsers) -> None:
    parser = sub.add_parser("ls", help="list the heaps in /dev/shm")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=run_ls)


def run_ls(args: argparse.Namespace) -> int:
    statuses = collect.survey()
    if args.json:
        print_json([status.as_dict() for status in statuses])
        return 0
    print_table(("name", "state", "arenas", "arena size", "used", "reserved", "structures",
                 "pids"),
                ((s.name, s.state, _arenas_of(s), _or_dash(s.arena_size, format_size),
                  format_size(s.shm_bytes), _reserved(s), _or_dash(s.structures),
                  ",".join(map(str, s.pids)) or "-") for s in statuses))
    for status in statuses:
        if status.problem:
            print(f"{status.name}: {status.state}: {status.problem}")
    return 0


def _or_dash(value: int | None, show: Callable[[int], str] = str) -> str:
    return "-" if value is None else show(value)


def _arenas_of(status: collect.HeapStatus) -> str:
    if status.arenas is None or status.max_arenas is None:
        return "-"
    return f"{status.arenas:,} of {usable_arenas(status.max_arenas):,}"


def _reserved(status: collect.HeapStatus) -> str:
    """What the heap has reserved in /dev/shm: its arenas' segments, or nothing if sparse."""
    if status.reserve is None or status.reserved_bytes is None:
        return "-"
    return format_size(status.reserved_bytes) if status.reserve else "sparse"


def add_fsck(sub: Subparsers) -> None:
    parser = sub.add_parser("fsck", help="check a heap's invariants (exit 1 on findings not "
                            "fixed)")
    parser.add_argument("name", type=heap_name)
    parser.add_argument("--repair", action="store_true", help="fix what can be fixed")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=run_fsck)


def run_fsck(args: argparse.Namespace) -> int:
    try:
        with Heap.attach(args.name, readonly=not args.repair) as heap:
            findings = heap.check(repair=args.repair, timeout=LOCK_TIMEOUT)
    except HeapCorruptError as exc:
        findings = [Finding("attach", f"the heap cannot be attached: {exc}", fatal=True)]
    if args.json:
        print_json({"name": args.name, "clean": not findings,
                    "findings": [f.as_dict() for f in findings]})
    elif not findings:
        print(f"heap {args.name!r} is clean")
    else:
        for finding in findings:
            status = "fixed" if finding.fixed else ("FATAL" if finding.fatal else "found")
            print(f"{status}: {finding.code}: {finding.message}")
    return 0 if all(finding.fixed for finding in findings) else 1


def add_gc(sub: Subparsers) -> None:
    parser = sub.add_parser("gc", help="remove abandoned heaps from /dev/shm")
    parser.add_argument("names", nargs="*", metavar="NAME", type=heap_name,
                        help="only consider these heaps (default: every heap)")
    parser.add_argument("--dry-run", action="store_true",
                        help="only say what would be removed")
    parser.add_argument("--stale", action="store_true",
                        help="also remove valid heaps that no live process has attached")
    parser.add_argument("--objects", action="store_true",
                        help="instead, free the objects of dead processes inside the named "
                             "heaps that no root binds and no queue holds (heap.reclaim())")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=run_gc)


def run_gc(args: argparse.Namespace) -> int:
    if args.objects:
        return run_gc_objects(args)
    collected = collect.collect(dry_run=args.dry_run, stale=args.stale, names=args.names)
    if args.json:
        print_json({"dry_run": args.dry_run, "collected": [c.as_dict() for c in collected]})
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for item in collected:
        print(f"{verb} heap {item.name!r} ({item.reason}): {len(item.removed)} segments, "
              f"{format_size(item.shm_bytes)}")
        for entry in item.removed:
            print(f"  /dev/shm/{entry}")
        for entry in item.left:
            print(f"  could not remove /dev/shm/{entry}")
    if not collected:
        print("nothing to collect")
    return 0


def run_gc_objects(args: argparse.Namespace) -> int:
    """``gc --objects NAME...``: reclaim (or with --dry-run, count) dead owners' objects."""
    if not args.names:
        raise UsageError("--objects frees objects inside heaps: name them (shmheap gc "
                         "--objects NAME)")
    results: dict[str, dict[str, Any]] = {}
    for name in args.names:
        with Heap.attach(name, readonly=args.dry_run) as heap:
            if args.dry_run:
                dead = {owner: found for owner, found in
                        heap.bytes_by_owner(LOCK_TIMEOUT).items() if not found.alive}
                results[name] = {"objects": sum(o.objects for o in dead.values()),
                                 "bytes": sum(o.bytes for o in dead.values()),
                                 "by_owner": {k: asdict(v) for k, v in dead.items()}}
            else:
                results[name] = asdict(heap.reclaim(LOCK_TIMEOUT))
    if args.json:
        print_json({"dry_run": args.dry_run, "reclaimed": results})
        return 0
    verb = "would free" if args.dry_run else "freed"
    for name, found in results.items():
        owners = ", ".join(f"{owner}: {o['objects']:,} ({format_size(o['bytes'])})"
                           for owner, o in found["by_owner"].items())
        print(f"heap {name!r}: {verb} {found['objects']:,} objects of dead processes, "
              f"{format_size(found['bytes'])}" + (f" ({owners})" if owners else ""))
    return 0


# -- walk / roots ------------------------------------------------------------------------


#: the columns of ``shmheap walk``
USAGE_FIELDS = ("arena", "pages", "pages_in_use", "pages_released", "spans", "objects",
                "live_bytes")


def add_walk(sub: Subparsers) -> None:
    parser = sub.add_parser("walk", help="per-arena usage of a heap's pages and objects")
    parser.add_argument("name", type=heap_name)
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=run_walk)


def run_walk(args: argparse.Namespace) -> int:
    with Heap.attach(args.name, readonly=True) as heap:
        rows = heap.arena_usage(timeout=LOCK_TIMEOUT)
    if args.json:
        print_json(rows)
    else:
        print_table(USAGE_FIELDS, ([row[field] for field in USAGE_FIELDS] for row in rows))
    return 0


def add_roots(sub: Subparsers) -> None:
    parser = sub.add_parser("roots", help="list a heap's roots: names and their objects")
    parser.add_argument("name", type=heap_name)
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=run_roots)


def run_roots(args: argparse.Namespace) -> int:
    with Heap.attach(args.name, readonly=True) as heap:
        rows = [{"name": name, "ref": ref, "bytes": _size_or_none(heap, ref)}
                for name, ref in sorted(heap.roots.snapshot().items())]
    if args.json:
        print_json(rows)
    else:
        print_table(("name", "ref", "bytes"),
                    ([row["name"], f"{row['ref']:#x}", "-" if row["bytes"] is None
                      else row["bytes"]] for row in rows))
    return 0


def _size_or_none(heap: Heap, ref: int) -> int | None:
    """The object's size; None if the root names no live object (a bug of its binder)."""
    try:
        return heap.size_of(ref, timeout=LOCK_TIMEOUT)
    except InvalidRefError:
        return None


# -- the parser -----------------------------------------------------------------------------

COMMANDS: tuple[Callable[[Subparsers], None], ...] = (
    add_create,
    add_info,
    add_arenas,
    add_grow,
    add_destroy,
    add_ls,
    add_fsck,
    add_gc,
    stress.add_stress,
    add_walk,
    suite.add_bench,
    top.add_top,
    add_roots,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmheap", description="Inspect, check and stress shared-memory heaps.",
        epilog="Exit status: 0 success, 1 an error or a check's findings, 2 a usage error, "
        "3 a stress run too thin to judge (INCONCLUSIVE), 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"shmheap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    for command in sub.choices.values():
        command.set_defaults(parser=command)  # for the usage of a UsageError
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except UsageError as exc:
        args.parser.print_usage(sys.stderr)
        print(f"{args.parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except ShmHeapError as exc:
        print(f"shmheap: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("shmheap: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output went away (`shmheap arenas x | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
