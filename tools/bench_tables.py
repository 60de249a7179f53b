#!/usr/bin/env python3
"""README's benchmark tables, made from the last recorded run (``docs/bench.json``).

Each table sits in README.md between ``<!-- bench-table NAME -->`` and
``<!-- /bench-table -->``; this script renders every one from the JSON that
``shmheap bench all --json docs/bench.json`` wrote, so that the figures users
read are those of that run and no other.

    python tools/bench_tables.py            # rewrite README.md's tables
    python tools/bench_tables.py --check    # exit 1 (and say which) if they differ

``tests/test_bench_tables.py`` runs the check.  The prose around the tables
(why a target was missed) is written by hand: update it with the tables.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from shmheap.tools.display import fmt_ns, fmt_rate, fmt_ratio, format_size

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "bench.json"
BLOCK = re.compile(r"(<!-- bench-table (?P<name>[a-z]+) -->\n)(?P<body>.*?)(<!-- /bench-table -->)",
                   re.DOTALL)

Figures = dict[str, Any]


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "".join("| " + " | ".join(row) + " |\n" for row in lines)


def verdicts(results: Figures) -> dict[str, str]:
    """Target name -> 'rule: met' / 'rule: **missed**' of a benchmark's recorded targets."""
    return {target["name"]: f"{target['rule']}: {'met' if target['ok'] else '**missed**'}"
            for target in results.get("targets", [])}


def slash(values: Iterable[float], fmt: Callable[[float], str]) -> str:
    return " / ".join(fmt(value) for value in values)


def cores(results: Figures) -> str:
    native, pure = results["cores"]["native"], results["cores"]["pure"]
    labels = {"bare_posix_ipc": "bare `posix_ipc` acquire + release (the floor)",
              "lock_round_trip": "heap lock round trip with the owner record",
              "snapshot_cached": "`snapshot()`, header unchanged",
              "snapshot_changed": "`snapshot()`, header changed",
              "alloc_free_64": "`alloc(64)` + `free`",
              "buffer_wrapper_64": "`multiprocessing.heap.BufferWrapper(64)` (the peer)"}
    rows = [[label, fmt_ns(native[key]), fmt_ns(pure[key]), fmt_ratio(pure[key] / native[key])]
            for key, label in labels.items()]
    rows.append(["`shmheap stress`, operations per second", f"{native['stress_ops_per_s']:,.0f}",
                 f"{pure['stress_ops_per_s']:,.0f}",
                 fmt_ratio(native["stress_ops_per_s"] / pure["stress_ops_per_s"])])
    return table(["figure", "native", "pure-Python twin", "twin / native"], rows)


def index(results: Figures) -> str:
    checks = verdicts(results)
    sizes = results["sizes"]

    def p50(kind: str) -> str:
        return slash((size["latency"][kind]["p50_ns"] for size in sizes), fmt_ns)

    entries = " / ".join(f"{size['entries']:,}" for size in sizes)
    def rules(unchanged: bool) -> str:  # each rule once, and whether every size met it
        found: dict[str, bool] = {}
        for target in results["targets"]:
            name = target["name"]
            if "snapshot" in name and ("unchanged" in name) == unchanged:
                found[target["rule"]] = found.get(target["rule"], True) and target["ok"]
        return "; ".join(f"{rule}: {'met' if ok else '**missed**'}" for rule, ok in found.items())

    rows = [[f"snapshot p50, header unchanged, {entries} entries", p50("shmheap_unchanged"),
             rules(True)],
            [f"snapshot p50, header changed, {entries} entries", p50("shmheap_changed"),
             rules(False)]]
    for case in results["grow"]:
        kind = "reserved" if case["reserve"] else "sparse"
        size = format_size(case["arena_size"])
        rows.append([f"`grow()` p50, {kind} {size} arenas (floor: bare create + map)",
                     f"{fmt_ns(case['grow']['p50_ns'])} (floor {fmt_ns(case['floor']['p50_ns'])},"
                     f" {fmt_ratio(case['grow']['p50_ns'] / case['floor']['p50_ns'])})",
                     "; ".join(checks[name] for name in (f"grow() {size} {kind}, p50",
                                                         f"grow() {size} {kind} / floor, p50")
                               if name in checks)])
    rows += [[target["name"], target["shown"], checks[target["name"]]]
             for target in results["targets"]
             if "snapshot" not in target["name"] and not target["name"].startswith("grow()")]
    return table(["figure", "measured", "target"], rows)


def alloc(results: Figures) -> str:
    checks = verdicts(results)
    lat = results["pairs"]["latency"]
    sizes = sorted(int(key.split("_")[1]) for key in lat if key.startswith("shmheap_"))
    through, roots = results["throughput"], results["roots"]
    many, few = roots["rows"][str(roots["many"])], roots["rows"][str(roots["few"])]
    hand, giant = results["handover"]["median_s"], results["giant"]
    gm = giant["median_s"]
    rows = [
        [f"alloc+free pair p50, {' / '.join(map(str, sizes))} B",
         slash((lat[f"shmheap_{n}"]["p50_ns"] for n in sizes), fmt_ns),
         checks.get("alloc+free pair, 64 bytes, p50", "")],
        ["`BufferWrapper(64)` / shmheap 64 B pair p50", fmt_ratio(results["pairs"]["ratio"]),
         checks.get("BufferWrapper(64) / shmheap pair p50", "")],
        ["alloc+free pairs/s: 1 process / 2 on one heap / 2 on a heap each",
         slash((through["one_process_pairs_per_s"], through["two_processes_pairs_per_s"],
                through["two_separate_heaps_pairs_per_s"]), fmt_rate),
         _rule(checks, "2 processes on one heap")],
        [f"root lookup p50, {roots['few']} / {roots['many']:,} roots (`Manager().dict()`: "
         f"{fmt_ns(many['manager_lookup']['p50_ns'])})",
         slash((few["lookup"]["p50_ns"], many["lookup"]["p50_ns"]), fmt_ns),
         "; ".join(filter(None, (_rule(checks, "root lookup p50,"),
                                 checks.get("root lookup p50", ""))))],
        ["root bind + unbind p50", fmt_ns(many["bind_unbind"]["p50_ns"]),
         _rule(checks, "root bind+unbind")],
        [f"hand a {format_size(results['handover']['bytes'])} array to "
         f"{results['handover']['consumers']} processes: consumers attach / attached before / "
         "`shared_memory`",
         slash((hand["shmheap_attach"] * 1e9, hand["shmheap_attached"] * 1e9,
                hand["shared_memory"] * 1e9), fmt_ns),
         "; ".join(filter(None, (_rule(checks, "hand-over, consumers attach /"),
                                 _rule(checks, "hand-over, consumers attached"))))],
        [f"a {format_size(giant['bytes'])} object over {giant['arenas']} arenas, reusing them: "
         "`alloc` / `view` + fill / `free`; `shared_memory` create + fill + unlink",
         f"{slash((gm['alloc'] * 1e9, gm['fill'] * 1e9, gm['free'] * 1e9), fmt_ns)}; "
         f"{fmt_ns(gm['shared_memory'] * 1e9)}", _rule(checks, "giant alloc")],
    ]
    return table(["figure", "measured", "target"], rows)


def _rule(checks: dict[str, str], prefix: str) -> str:
    return next((rule for name, rule in checks.items() if name.startswith(prefix)), "")


def scale(results: Figures) -> str:
    rows = [[f"{row['arenas']:,}", fmt_ns(row["grow_p50_us"] * 1e3), fmt_ns(row["small_pair_ns"]),
             fmt_ns(row["large_pair_ns"]),
             f"{fmt_ns(row['attach_ms'] * 1e6)} / {fmt_ns(row['first_alloc_ms'] * 1e6)}",
             f"{fmt_ns(row['walk_s'] * 1e9 / row['arenas'])} / "
             f"{fmt_ns(row['fsck_s'] * 1e9 / row['arenas'])}",
             format_size(row["rss_kb"] * 1024)] for row in results["rows"]]
    return table(["arenas", "grow p50", "small alloc+free", "large alloc+free",
                  "a new process: attach / first alloc", "walk / fsck per arena",
                  "walker's peak RSS"], rows)


def crashes(results: Figures) -> str:
    recovery, faults = results["recovery"], results["faults"]
    storm, exits = faults["storm"], faults["exits"]
    rows = [
        [f"kill -> next snapshot by another process, holder died with its owner recorded / "
         f"before recording it ({recovery['rounds']} rounds each)",
         f"p50 {fmt_ns(recovery['owner_recorded']['p50_ms'] * 1e6)} / "
         f"{fmt_ns(recovery['died_before_recording']['p50_ms'] * 1e6)}"],
        ["SIGINTs at random bytecodes: `KeyboardInterrupt`s in heap calls; objects missing; "
         "patterns changed; observer stuck",
         f"{storm['interrupts']:,}; {storm['missing']}; {storm['bad_patterns']}; "
         f"{storm['observer']['stuck']} (worst wait {storm['observer']['worst_ms']:.0f} ms)"],
        [f"{exits['exits']:,} processes exit without `close()`, then `shmheap fsck`",
         f"exit {exits['fsck_exit']}"],
    ]
    return table(["figure", "measured"], rows)


def start(results: Figures) -> str:
    imports, worker, attach = results["import"], results["worker"], results["attach"]
    checks = verdicts(results)
    rows = [["`import shmheap` (fresh interpreter, no numpy) / `import "
             "multiprocessing.shared_memory`",
             f"{fmt_ns(imports['shmheap_s'] * 1e9)} / {fmt_ns(imports['shared_memory_s'] * 1e9)}",
             checks.get("import shmheap (no numpy)", "")],
            ["a spawned worker's start to its first heap operation / a bare interpreter's start",
             f"{fmt_ns(worker['shmheap_s'] * 1e9)} / {fmt_ns(worker['bare_s'] * 1e9)}", ""],
            ["`Heap.attach` p50 / `SharedMemory(name=...)` p50",
             f"{fmt_ns(attach['shmheap_p50_ns'])} / {fmt_ns(attach['shared_memory_p50_ns'])}",
             checks.get("attach p50", "")]]
    return table(["figure", "measured", "target"], rows)


def coord(results: Figures) -> str:
    trips, rates, survived = results["round_trip_ns"], results["throughput"], results["survived"]
    checks = verdicts(results)
    trials = results["trials"]

    def kept(*labels: str) -> str:
        return " / ".join(f"{survived[label]} of {trials}" for label in labels)

    rows = [["queue put + get round trip, two processes (mp.Queue / mp.SimpleQueue)",
             fmt_ns(trips["queue shmheap"]),
             f"{fmt_ns(trips['queue mp.Queue'])} / {fmt_ns(trips['queue mp.SimpleQueue'])}",
             checks.get("queue round trip between two processes", "")],
            ["event set -> waiter awake, half a round trip (mp.Event)",
             fmt_ns(trips["event shmheap"] / 2), fmt_ns(trips["event mp.Event"] / 2),
             checks.get("event set -> waiter awake", "")],
            ["barrier round trip, two parties (mp.Barrier)", fmt_ns(trips["barrier shmheap"]),
             fmt_ns(trips["barrier mp.Barrier"]), ""],
            ["`counter.add` p50 (mp.Value + its lock)", fmt_ns(results["add_ns"]["shmheap"]),
             fmt_ns(results["add_ns"]["mp.Value"]), checks.get("counter.add", "")]]
    rows += [[f"queue throughput, {sides} producers x consumers (mp.Queue / mp.SimpleQueue)",
              fmt_rate(rates[f"shmheap {sides}"]),
              f"{fmt_rate(rates[f'mp.Queue {sides}'])} / "
              f"{fmt_rate(rates[f'mp.SimpleQueue {sides}'])}", ""] for sides in ("1x1", "2x2")]
    rows += [["a fresh peer's call returns after a participant's SIGKILL: queue (mp.Queue / "
              "mp.SimpleQueue)", kept("queue: shmheap"),
              kept("queue: mp.Queue", "queue: mp.SimpleQueue"), ""],
             ["... event (mp.Event) / counter (mp.Value + lock) / barrier (mp.Barrier)",
              kept("event: shmheap", "counter: shmheap", "barrier: shmheap"),
              kept("event: mp.Event", "counter: mp.Value + lock", "barrier: mp.Barrier"), ""]]
    return table(["figure", "shmheap", "peers", "target"], rows)


#: table name -> (the benchmarks it needs, its renderer)
TABLES: dict[str, tuple[tuple[str, ...], Callable[[Figures], str]]] = {
    "cores": (("cores",), lambda run: cores(run["cores"])),
    "index": (("index",), lambda run: index(run["index"])),
    "alloc": (("alloc",), lambda run: alloc(run["alloc"])),
    "scale": (("scale",), lambda run: scale(run["scale"])),
    "crashes": (("recovery", "faults"), lambda run: crashes(
        {"recovery": run["recovery"], "faults": run["faults"]})),
    "start": (("start",), lambda run: start(run["start"])),
    "coord": (("coord",), lambda run: coord(run["coord"])),
}


def render(readme: str, run: Figures) -> str:
    """``readme`` with every bench-table block made from ``run`` (a docs/bench.json)."""

    def body(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in TABLES:
            raise SystemExit(f"README.md has a bench-table {name!r}; known: {', '.join(TABLES)}")
        needs, make = TABLES[name]
        missing = [bench for bench in needs if bench not in run]
        made = (f"(not in the last recorded run: `shmheap bench {' '.join(missing)}`)\n"
                if missing else make(run))
        return f"{match[1]}{made}{match[4]}"

    return BLOCK.sub(body, readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if README.md's tables differ")
    args = parser.parse_args(argv)
    readme = README.read_text(encoding="utf-8")
    made = render(readme, json.loads(RESULTS.read_text(encoding="utf-8")))
    if made == readme:
        return 0
    if args.check:
        stale = [m["name"] for m, n in zip(BLOCK.finditer(readme), BLOCK.finditer(made),
                                           strict=True) if m["body"] != n["body"]]
        print(f"README.md's benchmark tables {', '.join(stale)} differ from docs/bench.json; "
              "run `python tools/bench_tables.py`", file=sys.stderr)
        return 1
    README.write_text(made, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
