"""The ``shmheap`` command-line tool (also ``python -m shmheap``).

Each subcommand is one ``add_<command>(subparsers)`` function that declares
its arguments and sets ``run`` to the function doing the work; the
``COMMANDS`` tuple registers it.  A run function returns the exit status.
Adding a subcommand is one such function (here or in its own module) and
one line in ``COMMANDS``.

Exit status: 0 success, 1 a ``ShmHeapError`` (printed as one line
``shmheap: error: <message>`` on stderr) or a check that found problems,
2 a usage error (argparse), 130 interrupted.

This module owns argument parsing and output formatting.  It does its work
through the public ``Heap`` API, ``shmheap.destroy``, ``collect.py``,
``stress.py``, ``top.py`` and ``bench/suite.py``; it keeps no state.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeAlias

from . import collect, roots, stress, top, walker
from .bench import suite
from .errors import HeapCorruptError, InvalidParameterError, ShmHeapError
from .heap import Heap, destroy
from .names import format_size, parse_size
from .repair import Finding

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
#: Seconds a command waits for the heap lock before it reports who holds it.
LOCK_TIMEOUT = 10.0


def size_arg(text: str) -> int:
    """argparse type for sizes like 64KiB or 1MiB."""
    try:
        return parse_size(text)
    except InvalidParameterError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def print_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Print rows in left-aligned columns under ``header``."""
    cells = [list(header)] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())


# -- create / info / arenas / grow / destroy ---------------------------------------------


def add_create(sub: Subparsers) -> None:
    parser = sub.add_parser("create", help="create a heap")
    parser.add_argument("name")
    parser.add_argument("--arena-size", type=size_arg, default=64 << 20,
                        help="bytes per arena, a power of two >= 64KiB (default 64MiB)")
    parser.add_argument("--max-arenas", type=int, default=1 << 20,
                        help="arena indices available (default 1048576)")
    parser.add_argument("--no-reserve", action="store_true",
                        help="leave arenas sparse instead of reserving their memory (a write "
                        "into one when /dev/shm is full is SIGBUS)")
    parser.set_defaults(run=run_create)


def run_create(args: argparse.Namespace) -> int:
    if args.no_reserve:
        print("shmheap: warning: --no-reserve: arenas are sparse, so a process that writes "
              "into one while /dev/shm is full is killed by SIGBUS", file=sys.stderr)
    heap = Heap.create(args.name, arena_size=args.arena_size, max_arenas=args.max_arenas,
                       reserve=not args.no_reserve)
    heap.close()
    print(f"created heap {args.name!r}: arenas of {format_size(args.arena_size)}, "
          f"up to {args.max_arenas - 1} of them"
          + (", not reserved" if args.no_reserve else ""))
    return 0


def add_info(sub: Subparsers) -> None:
    parser = sub.add_parser("info", help="show a heap's parameters and counters")
    parser.add_argument("name")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=run_info)


def run_info(args: argparse.Namespace) -> int:
    with Heap.attach(args.name, readonly=True) as heap:
        info = heap.info(timeout=LOCK_TIMEOUT).as_dict()
        stats = heap.stats().as_dict()
    if args.json:
        print_json({**info, "allocator": stats})
    else:
        allocator = [(f"alloc_{key}", value) for key, value in stats.items() if key != "classes"]
        print_table(("field", "value"), sorted(info.items()) + allocator)
    return 0


def add_arenas(sub: Subparsers) -> None:
    parser = sub.add_parser("arenas", help="list a heap's arenas in creation order")
    parser.add_argument("name")
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
    parser.add_argument("name")
    parser.add_argument("--count", type=int, default=1, help="arenas to add (default 1)")
    parser.add_argument("--at", type=int, default=None,
                        help="place the (single) new arena at this index")
    parser.set_defaults(run=run_grow)


def run_grow(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise InvalidParameterError(f"--count {args.count}: grow at least 1 arena")
    if args.at is not None and args.count != 1:
        raise InvalidParameterError("--at places exactly one arena; drop --count")
    with Heap.attach(args.name) as heap:
        for _ in range(args.count):
            arena = heap.grow(at=args.at, timeout=LOCK_TIMEOUT)
            print(f"arena {arena.index} at {arena.base:#x}")
    return 0


def add_destroy(sub: Subparsers) -> None:
    parser = sub.add_parser("destroy", help="remove every object of a heap, even a damaged one")
    parser.add_argument("name")
    parser.set_defaults(run=run_destroy)


def run_destroy(args: argparse.Namespace) -> int:
    for entry in destroy(args.name):
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
    print_table(("name", "state", "arenas", "arena size", "reserved", "in /dev/shm", "pids"),
                ((s.name, s.state, _or_dash(s.arenas), _or_dash(s.arena_size, format_size),
                  _or_dash(s.reserved_bytes, format_size), format_size(s.shm_bytes),
                  ",".join(map(str, s.pids)) or "-") for s in statuses))
    for status in statuses:
        if status.problem:
            print(f"{status.name}: {status.state}: {status.problem}")
    return 0


def _or_dash(value: int | None, show: Callable[[int], str] = str) -> str:
    return "-" if value is None else show(value)


def add_fsck(sub: Subparsers) -> None:
    parser = sub.add_parser("fsck", help="check a heap's invariants (exit 1 on findings not "
                            "fixed)")
    parser.add_argument("name")
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
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="only consider these heaps (default: every heap)")
    parser.add_argument("--dry-run", action="store_true",
                        help="only say what would be removed")
    parser.add_argument("--stale", action="store_true",
                        help="also remove valid heaps that no live process has attached")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=run_gc)


def run_gc(args: argparse.Namespace) -> int:
    collected = collect.collect(dry_run=args.dry_run, stale=args.stale, names=args.names)
    if args.json:
        print_json({"dry_run": args.dry_run, "collected": [c.as_dict() for c in collected]})
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for item in collected:
        print(f"{verb} heap {item.name!r} ({item.reason}): {len(item.removed)} objects, "
              f"{format_size(item.shm_bytes)}")
        for entry in item.removed:
            print(f"  /dev/shm/{entry}")
        for entry in item.left:
            print(f"  could not remove /dev/shm/{entry}")
    if not collected:
        print("nothing to collect")
    return 0


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
    walker.add_walk_command,
    suite.add_bench,
    top.add_top,
    roots.add_roots_command,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmheap", description="Inspect, check and stress shared-memory heaps.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
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
