"""``shmheap bench [index|alloc|...|all]``: run benchmarks, combine their JSON and plots.

Every benchmark is a module of this package with ``main(argv)`` that takes
``--quick`` (a short run), ``--json FILE`` (every figure, as JSON) and a
test-sized mode (``Bench.tiny_args``); it prints its own tables, with the
ratios against the peers it measures in the same run.  A module may also
have ``figures(results) -> list[Figure]``: the panels ``--plot`` draws from
its JSON.

The suite calls each ``main`` with ``--json`` pointing into a temporary
directory, reads the figures back, and then writes one JSON document keyed
by benchmark name and one image with every benchmark's panels.  ``all`` runs
every benchmark whose module exists; naming one that does not exist is an
error.  The exit status is 1 if any benchmark's was not 0.

This module runs benchmarks only through their ``main`` and ``figures``; it
creates no heap itself.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ...errors import InvalidParameterError
from ..display import print_table
from .common import BenchError, Figure, plot_figures, require_plotting, write_json

if TYPE_CHECKING:
    from ..args import Subparsers


@dataclass(frozen=True)
class Bench:
    """A benchmark of the suite: its name (and module) and its test-sized arguments."""

    name: str
    #: what replaces ``--quick`` in the hidden ``--tiny`` mode (seconds, for tests)
    tiny_args: tuple[str, ...]

    @property
    def module(self) -> str:
        return f"{__package__}.{self.name}"

    def exists(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def mode_args(self, quick: bool, tiny: bool) -> list[str]:
        """The arguments that choose the length of its run."""
        if tiny:
            return list(self.tiny_args)
        return ["--quick"] if quick else []


BENCHES = (
    Bench("index", ("--tiny",)),
    Bench("alloc", ("--tiny",)),
    Bench("recovery", ("--rounds", "2")),
    Bench("faults", ("--tiny",)),
    Bench("scale", ("--tiny",)),
    Bench("cores", ("--tiny",)),
    Bench("start", ("--tiny",)),
    Bench("objects", ("--tiny",)),
    Bench("coord", ("--tiny",)),
    Bench("observers", ("--tiny",)),
)
BY_NAME = {bench.name: bench for bench in BENCHES}


def chosen(which: str) -> list[Bench]:
    """The benchmarks ``which`` names: every existing one for ``all``."""
    if which == "all":
        return [bench for bench in BENCHES if bench.exists()]
    bench = BY_NAME[which]
    if not bench.exists():
        raise BenchError(f"the {which} benchmark is not available in this shmheap "
                         f"(no module {bench.module}); run `shmheap bench all` for the others")
    return [bench]


def run_one(bench: Bench, mode_args: list[str], json_path: Path) -> tuple[int, Any]:
    """Run ``bench``'s ``main``; (its exit status, its figures or None if it wrote none)."""
    module = importlib.import_module(bench.module)
    argv = [*mode_args, "--json", str(json_path)]
    try:
        status = int(module.main(argv) or 0)
    except SystemExit as exc:  # its argument parser refused argv
        raise BenchError(f"`shmheap bench {bench.name}` did not accept {' '.join(argv)} "
                         f"(exit {exc.code})") from None
    results = json.loads(json_path.read_text()) if json_path.exists() else None
    return status, results


def panels(benches: list[Bench], results: dict[str, Any]) -> list[Figure]:
    """Every plot panel of the benchmarks that ran and can draw one."""
    found: list[Figure] = []
    for bench in benches:
        module: ModuleType = importlib.import_module(bench.module)
        if bench.name in results and hasattr(module, "figures"):
            found += module.figures(results[bench.name])
    return found


def run_benches(benches: list[Bench], quick: bool,
                tiny: bool) -> tuple[dict[str, Any], int]:
    """Run ``benches`` one after the other; (figures by name, worst exit status)."""
    results: dict[str, Any] = {}
    rows = []
    worst = 0
    with tempfile.TemporaryDirectory(prefix="shmheap-bench-") as tmp:
        for bench in benches:
            mode_args = bench.mode_args(quick, tiny)
            print(f"\n=== shmheap bench {' '.join([bench.name, *mode_args])} ===", flush=True)
            started = time.monotonic()
            status, figures = run_one(bench, mode_args, Path(tmp, f"{bench.name}.json"))
            if figures is not None:
                results[bench.name] = figures
            worst = max(worst, status)
            rows.append([bench.name, f"{time.monotonic() - started:.1f} s", str(status),
                         "yes" if figures is not None else "no"])
    print_table(["benchmark", "time", "exit", "figures"], rows, title="shmheap bench: summary")
    return results, worst


def check_output_path(path: str | None, option: str) -> None:
    """Fail before any work if ``path``'s directory does not exist."""
    if path and not Path(path).resolve().parent.is_dir():
        raise InvalidParameterError(f"{option} {path}: its directory does not exist")


def add_bench(sub: Subparsers) -> None:
    parser = sub.add_parser("bench", help="run the benchmarks against their peers")
    parser.add_argument("which", nargs="?", default="all", choices=[*BY_NAME, "all"],
                        help="the benchmark to run (default: all that exist)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--quick", action="store_true", help="a short run of each benchmark")
    length.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", metavar="FILE",
                        help="write every figure, keyed by benchmark, to FILE")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="draw the figures into FILE.png (needs matplotlib)")
    parser.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    check_output_path(args.json, "--json")
    check_output_path(args.plot, "--plot")
    if args.plot:
        require_plotting()
    benches = chosen(args.which)
    results, worst = run_benches(benches, args.quick, args.tiny)
    if args.json:
        write_json(args.json, results)
        print(f"wrote {args.json}")
    if args.plot:
        figures = panels(benches, results)
        if not figures:
            raise BenchError("--plot: none of the benchmarks that ran has figures to draw")
        plot_figures(args.plot, figures)
        print(f"wrote {args.plot}")
    missing = [bench.name for bench in BENCHES if not bench.exists()]
    if missing and args.which == "all":
        print(f"not available here: {', '.join(missing)}", file=sys.stderr)
    return 1 if worst else 0
