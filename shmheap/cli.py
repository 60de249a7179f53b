"""The ``shmheap`` command-line tool (also ``python -m shmheap``).

Each subcommand is one ``add_<command>(subparsers)`` function that declares
its arguments and sets ``run`` to the function doing the work; the
``COMMANDS`` tuple registers it.  A run function returns the exit status.
Adding a subcommand is one such function (here or in its own module) and
one line in ``COMMANDS``.

Exit status: 0 success, 1 a ``ShmHeapError`` (printed as one line
``shmheap: error: <message>`` on stderr) or a check that found problems,
2 a usage error, 130 interrupted.  A usage error is a command line that no
state of the heaps could make work: a value the argparse types below
refuse (a bad size, name, count or number of seconds), or a combination a
command refuses with ``UsageError``; argparse prints it with the
command's usage.  Everything that depends on the heaps, /dev/shm or the
machine (a missing heap, an index the heap has no room for, a full heap) is
a runtime error.

A heap's ``max_arenas`` bounds its arena indices: arenas take indices 1 to
``max_arenas - 1`` (0 is never used), so it holds at most ``max_arenas - 1``
arenas.  Every command says that number (``names.usable_arenas``).

This module owns argument parsing and output formatting.  It does its work
through the public ``Heap`` API, ``shmheap.destroy``, ``collect.py``,
``stress.py``, ``top.py`` and ``bench/suite.py``; it keeps no state.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeAlias, TypeVar

from . import __version__, collect, roots, stress, top, walker
from .bench import suite
from .errors import HeapCorruptError, InvalidParameterError, ShmHeapError
from .heap import Heap, destroy
from .names import (
    MAX_ARENAS_LIMIT,
    check_arena_size,
    check_max_arenas,
    check_name,
    format_size,
    parse_size,
    usable_arenas,
)
from .repair import Finding

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
#: Seconds a command waits for the heap lock before it reports who holds it.
LOCK_TIMEOUT = 10.0
#: The default max_arenas of ``shmheap create``: at most 1,048,575 arenas.
DEFAULT_MAX_ARENAS = 1 << 20

T = TypeVar("T")


class UsageError(InvalidParameterError):
    """A combination of arguments that no heap could make work: exit 2 with the usage."""


def argument_type(check: Callable[[str], T], name: str) -> Callable[[str], T]:
    """An argparse type that runs ``check``; its ShmHeapError becomes a usage error."""

    def convert(text: str) -> T:
        try:
            return check(text)
        except ShmHeapError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name
    return convert


def _number(text: str, kind: Callable[[str], T], what: str) -> T:
    try:
        return kind(text)
    except ValueError:
        raise InvalidParameterError(f"{text!r} is not {what}") from None


def at_least(minimum: int, most: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum`` (and <= ``most``)."""

    def check(text: str) -> int:
        value = _number(text, int, "an integer")
        if value < minimum or (most is not None and value > most):
            bound = f"from {minimum} to {most:,}" if most is not None else f">= {minimum}"
            raise InvalidParameterError(f"{value} is out of range: give an integer {bound}")
        return value

    return argument_type(check, "integer")


def _seconds(text: str) -> float:
    value = _number(text, float, "a number of seconds")
    if not 0 < value < math.inf:
        raise InvalidParameterError(f"{text}: give a positive number of seconds")
    return value


def _rate(text: str) -> float:
    value = _number(text, float, "a rate")
    if not 0 <= value < math.inf:
        raise InvalidParameterError(f"{text}: give a number >= 0 per second")
    return value


#: argparse types shared by the commands (stress.py and top.py use them too).
heap_name = argument_type(check_name, "heap name")
arena_size_arg = argument_type(lambda text: check_arena_size(parse_size(text)), "arena size")
seconds_arg = argument_type(_seconds, "seconds")
rate_arg = argument_type(_rate, "rate")


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def print_table(header: Sequence[str], rows: Iterable[Sequence[object]],
                show_header: bool = True) -> None:
    """Print rows in left-aligned columns under ``header`` (shown if ``show_header``)."""
    cells = [list(header)] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells[0 if show_header else 1:]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())


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
    others = [a for a in sample.attachments if a.pid != os.getpid()]
    if args.json:
        print_json(info_json(sample, [a.pid for a in others]))
        return 0
    info = sample.info
    rows = [
        ("heap", f"{info.name}, created {top.when(info.created_ns)}"),
        ("arenas", f"{top.arenas_line(info)}; indices 1 to {usable_arenas(info.max_arenas):,}, "
                   f"the next grow tries {info.hint:,}"),
        *top.state_rows(sample, others),
    ]
    print_table(("field", "value"), rows, show_header=False)
    return 0


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
    parser.add_argument("--at", type=at_least(1), default=None,
                        help="place the (single) new arena at this index")
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
    parser = sub.add_parser("destroy", help="remove every object of a heap, even a damaged one")
    parser.add_argument("name", type=heap_name)
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
    print_table(("name", "state", "arenas", "arena size", "used", "reserved", "pids"),
                ((s.name, s.state, _arenas_of(s), _or_dash(s.arena_size, format_size),
                  format_size(s.shm_bytes), _reserved(s),
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
        prog="shmheap", description="Inspect, check and stress shared-memory heaps.",
        epilog="Exit status: 0 success, 1 an error or a check's findings, 2 a usage error, "
        "130 interrupted.")
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
