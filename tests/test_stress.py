"""``shmheap stress``, run as a real subprocess: a clean run adds up, broken checkers fail.

Each run gets its heap name from ``shm_heap_name``, so the heap is destroyed
(and checked for leftovers) even if the run or the test fails.  Runs are short
and capped at a few thousand arenas: the machine is shared.  The readers'
walk checks are also tried directly on a real heap, with spans doctored to be
wrong.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_cli import ROOT, interrupt_until_exit, run_cli

from shmheap import NATIVE, destroy
from shmheap.liveness import probe_attachments
from shmheap.pytest_plugin import HeapFactory, shm_leftovers
from shmheap.tools.display import format_size
from shmheap.tools.stress_roles import Reservoir, latency_summary, span_problem, stats_problems


def stress(name: str, report: Path, *args: str,
           env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """Run ``shmheap stress`` on heap ``name``; return its exit status and JSON report."""
    result = run_cli("stress", "--name", name, "--json", str(report), "--max-arenas", "3000",
                     *args, env=env)
    assert "Traceback" not in result.stderr, result.stderr
    assert report.exists(), (result.stdout, result.stderr)
    return result.returncode, json.loads(report.read_text())


def workers_of(report: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [w for w in report["workers"] if w["kind"] == kind]


def test_a_clean_run_reports_no_violation_and_its_counts_add_up(shm_heap_name: str,
                                                                 tmp_path: Path) -> None:
    # without floors: how much a 2 s run does depends on the machine's load (the floors have
    # tests of their own)
    status, report = stress(shm_heap_name, tmp_path / "r.json", "--duration", "2",
                            "--seed", "1", "--floor", "0")
    assert (report["violations"], report["arenas_lost"], report["leaks"]) == (0, 0, []), \
        report["violation_examples"]
    assert status == 0 and report["ok"]
    writers, churners, readers = (workers_of(report, kind)
                                  for kind in ("writer", "churner", "reader"))
    assert len(writers) == len(churners) == len(readers) == 2
    assert {w["state"] for w in report["workers"]} == {"done"}
    assert report["kills"] == report["recoveries"] == 0

    created = sum(w["arenas_created"] for w in writers)
    assert created == sum(w["ops"] for w in writers) == report["arenas_created"] > 0
    assert report["roles"]["writer"]["ops"] == created
    # every arena a writer made is in the final snapshot; churners' allocs grew the rest
    assert created + report["arenas_grown_otherwise"] == report["final_arenas"]
    claims = report["roles"]["writer"]["counters"]["claims"]
    assert claims == report["stamped_arenas"] == sum(w["live_objects"] for w in writers) > 0

    churn = report["roles"]["churner"]["counters"]
    objects = report["objects"]
    held = sum(w["live_objects"] for w in churners)
    assert churn["allocs"] - churn["frees"] - objects["undelivered_freed"] == held > 0
    assert churn["frees"] > 0 and churn["verified"] >= churn["frees"]
    assert churn["received"] == objects["handoffs_received"] == objects["handoffs_relayed"] > 0
    assert objects["handoffs_handed_on"] == (objects["handoffs_relayed"]
                                             + objects["handoffs_undelivered"])
    assert objects["handoffs_undelivered"] == objects["undelivered_freed"]
    assert objects["handoffs_in_flight"] == 0
    assert objects["live_objects"] == objects["held_objects"] == claims + held
    assert objects["live_bytes"] == objects["held_bytes"]
    assert objects["killed_objects"] == objects["killed_bytes"] == objects["handoffs_lost"] == 0
    # nobody died: the one reclaim, at the end, frees nothing
    assert report["reclaimed"] == {"passes": 1, "objects": 0, "bytes": 0, "adopted": 0,
                                   "by_owner": {}}
    assert report["roles"]["churner"]["latency"]["samples"] > 0

    reader_totals = report["roles"]["reader"]
    assert reader_totals["ops"] == sum(w["ops"] for w in readers) > 0
    assert reader_totals["counters"]["entries"] > 0
    assert reader_totals["counters"]["stamps"] > 0
    assert reader_totals["counters"]["walks"] > 0
    assert reader_totals["latency"]["samples"] > 0
    assert report["index_generations"] >= 1
    assert shm_leftovers(shm_heap_name) == []


def test_both_checkers_can_fail(shm_heap_name: str, tmp_path: Path) -> None:
    status, report = stress(shm_heap_name, tmp_path / "r.json", "--duration", "1",
                            env={"SHMHEAP_STRESS_BREAK_CHECK": "1"})
    assert status == 1 and not report["ok"]
    roles = report["roles"]
    assert roles["reader"]["violations"] > 0 and roles["churner"]["violations"] > 0
    examples = report["violation_examples"]
    assert any("stamped" in example for example in examples)
    assert any("does not hold its pattern" in example for example in examples)
    assert report["leaks"] == []


def test_killed_workers_lose_no_arena_and_leave_only_their_objects(shm_heap_name: str,
                                                                   tmp_path: Path) -> None:
    status, report = stress(shm_heap_name, tmp_path / "r.json", "--duration", "3",
                            "--kill-rate", "4", "--readers", "1", "--seed", "5", "--floor", "0")
    assert report["kills"] > 0
    assert (report["violations"], report["arenas_lost"], report["leaks"]) == (0, 0, []), \
        report["violation_examples"]
    assert status == 0
    assert report["checks"] >= 2
    assert_summary_identities(report)


def test_a_kill_loop_reclaims_what_killed_workers_owned(shm_heap_name: str,
                                                        tmp_path: Path) -> None:
    result = run_cli("stress", "--name", shm_heap_name, "--json", str(tmp_path / "r.json"),
                     "--max-arenas", "3000", "--duration", "3", "--kill-rate", "8",
                     "--readers", "1", "--seed", "11", "--no-progress", "--floor", "0")
    report = json.loads((tmp_path / "r.json").read_text())
    # no violation: no reclaim freed an object a live worker held or was handed
    assert (result.returncode, report["result"]) == (0, "OK"), (result.stdout, result.stderr)
    assert_summary_identities(report)
    reclaimed, objects = report["reclaimed"], report["objects"]
    assert report["kills"] > 0 and report["stragglers"] == 0
    # a pass with each check after kills, and the last one before the stop
    assert reclaimed["passes"] == report["checks"] >= 2
    assert reclaimed["objects"] > 0 and reclaimed["bytes"] >= 16 * reclaimed["objects"]
    # every dead owner is a killed worker (readers own nothing, live workers lose nothing)
    assert 0 < len(reclaimed["by_owner"]) <= report["kills"]
    assert all(owner.startswith("slot ") for owner in reclaimed["by_owner"])
    # what killed workers left and no reclaim freed: handoffs lost in flight to a killed
    # churner (their maker is alive, or the parent adopted them), or other objects the
    # parent adopted (a ref in flight whose object its receiver had freed and another
    # churner, killed since, got)
    assert objects["killed_objects"] <= objects["handoffs_lost"] + reclaimed["adopted"]
    rows = summary(result.stdout)
    assert rows["reclaimed"].startswith(
        f"{reclaimed['objects']:,} objects, {format_size(reclaimed['bytes'])} of "
        f"{len(reclaimed['by_owner']):,} dead owners in {reclaimed['passes']:,} passes"), \
        rows["reclaimed"]
    assert rows["live at the end"].endswith(
        f"+ {objects['killed_objects']:,} left by killed workers, not reclaimed "
        f"({format_size(objects['killed_bytes'])})"), rows["live at the end"]


def test_killed_movers_lose_no_work_item(shm_heap_name: str, tmp_path: Path) -> None:
    result = run_cli("stress", "--name", shm_heap_name, "--json", str(tmp_path / "r.json"),
                     "--max-arenas", "3000", "--duration", "3", "--writers", "1",
                     "--churners", "0", "--readers", "0", "--movers", "3", "--kill-rate", "4",
                     "--seed", "11", "--no-progress", "--floor", "0")
    report = json.loads((tmp_path / "r.json").read_text())
    assert (result.returncode, report["result"]) == (0, "OK"), report["violation_examples"]
    items, movers = report["items"], workers_of(report, "mover")
    killed = sum(w["state"] == "killed" for w in movers)
    assert killed > 0, "the kill loop must hit movers"
    assert items["items_put"] > 0 and items["items_moved"] > 0
    assert items["items_put"] + items["items_unreported"] == items["items_moved"] + \
        items["items_waiting"], "every item put is moved or still queued"
    assert items["items_moved_twice"] <= killed and items["items_unreported"] <= killed
    rows = summary(result.stdout)
    assert rows["items"].startswith(f"{items['items_put']:,} put = {items['items_moved']:,} "
                                    f"moved + {items['items_waiting']:,} still queued"), rows
    assert_rows_defined(rows)


def test_a_kill_loop_run_reaches_its_floors_and_says_the_kill_rate(shm_heap_name: str,
                                                                   tmp_path: Path) -> None:
    # a quarter of the floors: a 3 s run on a 2-core machine busy with other test runs does a
    # fraction of what `--kill-rate 25 --duration 10` does alone (which reaches them whole)
    result = run_cli("stress", "--name", shm_heap_name, "--json", str(tmp_path / "r.json"),
                     "--max-arenas", "3000", "--duration", "3", "--kill-rate", "10",
                     "--seed", "3", "--no-progress", "--floor", "0.25")
    report = json.loads((tmp_path / "r.json").read_text())
    assert (result.returncode, report["result"]) == (0, "OK"), (result.stdout, result.stderr)
    assert_summary_identities(report)
    kills = report["kills"]
    assert kills >= 0.25 * 0.5 * report["kills_due"] > 0
    assert report["kills_per_s"] == pytest.approx(kills / report["duration_s"])
    rows = summary(result.stdout)
    assert rows["kills"].startswith(f"{kills:,}, {report['kills_per_s']:.1f}/s of the 10/s "
                                    "asked"), rows["kills"]
    assert rows["coverage"].startswith("every floor met: grows "), rows["coverage"]
    assert {(row["role"], row["figure"]) for row in report["coverage"]} == {
        ("writer", "grows"), ("churner", "objects verified"), ("reader", "snapshots"),
        ("reader", "entries checked"), ("parent", "kills")}
    assert all(row["done"] >= row["floor"] > 0 for row in report["coverage"])
    # every replacement worker started and worked; killed workers' work counts
    killed = [w for w in report["workers"] if w["state"] == "killed"]
    assert len(killed) == kills
    assert report["worker_start"]["samples"] == sum(w["replacement"] for w in report["workers"])
    assert sum(w["ops"] for w in killed) > 0
    assert report["cores"] == {"native": len(report["workers"]), "pure": 0, "unstarted": 0} \
        or report["cores"]["native"] == 0  # the pure-Python core runs everything


def test_a_run_below_its_floors_is_inconclusive(shm_heap_name: str, tmp_path: Path) -> None:
    result = run_cli("stress", "--name", shm_heap_name, "--json", str(tmp_path / "r.json"),
                     "--max-arenas", "3000", "--duration", "0.5", "--floor", "1e6",
                     "--no-progress")
    report = json.loads((tmp_path / "r.json").read_text())
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert (report["result"], report["ok"], report["violations"]) == ("INCONCLUSIVE", False, 0)
    below = [row for row in report["coverage"] if row["done"] < row["floor"]]
    assert {row["figure"] for row in below} == {"grows", "objects verified", "snapshots",
                                                "entries checked"}
    rows = summary(result.stdout)
    assert rows["result"] == "INCONCLUSIVE"
    assert rows["coverage"].startswith("BELOW its floor: grows "), rows["coverage"]
    # without floors the same thin run is judged
    status, report = stress(shm_heap_name, tmp_path / "r0.json", "--duration", "0.5",
                            "--floor", "0")
    assert (status, report["result"], report["coverage"]) == (0, "OK", [])


def test_a_heap_destroyed_under_the_run_counts_its_arenas_lost(shm_heap_name: str,
                                                               tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "shmheap", "stress", "--name", shm_heap_name, "--duration", "4",
         "--max-arenas", "3000", "--json", str(tmp_path / "r.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    try:
        assert process.stdout is not None
        while "grows 0 " in (line := process.stdout.readline()):
            assert line.startswith(f"stress {shm_heap_name}"), line
        destroy(shm_heap_name, force=True)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 1, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["result"] == "FAILED"
    # a writer inside grow() when the heap went may still link its arena under the old name
    assert 0 < report["arenas_lost"] <= report["arenas_created"]
    assert summary(out)["arenas lost"] == str(report["arenas_lost"])
    assert "Traceback" not in err
    assert shm_leftovers(shm_heap_name) == []


def summary(stdout: str) -> dict[str, str]:
    """The rows of a stress summary table: metric -> value."""
    lines = stdout.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("metric "))
    column = lines[top].index("value")
    return {line[:column].strip(): line[column:] for line in lines[top + 1:]
            if not line.startswith("violation: ")}


def assert_rows_defined(rows: dict[str, str]) -> None:
    """Every figure of a summary (its row's label) has its definition in stress --help."""
    help_text = run_cli("stress", "--help").stdout
    for label in rows:
        assert label.split(" p50")[0].split(" (")[0] in help_text, label


def assert_summary_identities(report: dict[str, Any]) -> None:
    """The identities the summary's definitions (``shmheap stress --help``) promise."""
    objects = report["objects"]
    assert report["final_arenas"] == (report["arenas_created"] - report["arenas_lost"]
                                      + report["arenas_grown_otherwise"])
    assert report["final_arenas"] == report["stamped_arenas"] + report["unstamped_arenas"]
    assert report["grows_per_s"] * report["duration_s"] == pytest.approx(
        report["arenas_created"])
    assert objects["live_objects"] == objects["held_objects"] + objects["killed_objects"]
    assert objects["live_bytes"] == objects["held_bytes"] + objects["killed_bytes"]
    assert objects["handoffs_handed_on"] == (objects["handoffs_relayed"]
                                             + objects["handoffs_undelivered"])
    assert objects["handoffs_relayed"] == (objects["handoffs_received"]
                                           + objects["handoffs_in_flight"])
    assert objects["handoffs_lost"] <= min(objects["handoffs_in_flight"],
                                           objects["killed_objects"])
    assert objects["undelivered_freed"] <= objects["handoffs_undelivered"]
    assert report["kills"] == sum(w["state"] == "killed" for w in report["workers"])
    reclaimed = report["reclaimed"]
    assert reclaimed["objects"] == sum(n for n, _ in reclaimed["by_owner"].values())
    assert reclaimed["bytes"] == sum(b for _, b in reclaimed["by_owner"].values())
    for kind, totals in report["roles"].items():
        assert totals["incarnations"] == len(workers_of(report, kind))


def test_the_summary_says_what_the_report_holds(shm_heap_name: str, tmp_path: Path) -> None:
    result = run_cli("stress", "--name", shm_heap_name, "--json", str(tmp_path / "r.json"),
                     "--max-arenas", "3000", "--duration", "1", "--kill-rate", "2",
                     "--seed", "7", "--no-progress")
    report = json.loads((tmp_path / "r.json").read_text())
    assert result.returncode == {"OK": 0, "FAILED": 1, "INCONCLUSIVE": 3}[report["result"]], \
        result.stderr
    assert_summary_identities(report)
    rows = summary(result.stdout)
    objects = report["objects"]
    cores = report["cores"]
    assert rows["cores"] == f"{cores['native']} native, {cores['pure']} pure-Python processes"
    assert cores["native"] + cores["pure"] == len(report["workers"])
    assert f"at most {report['config']['max_arenas'] - 1:,} arenas" in rows["heap"]
    assert rows["grows"].startswith(f"{report['arenas_created']:,}, "
                                    f"{report['grows_per_s']:.0f}/s")
    assert rows["handoffs handed on"].startswith(
        f"{objects['handoffs_handed_on']:,} = {objects['handoffs_relayed']:,} relayed + "
        f"{objects['handoffs_undelivered']:,} undelivered")
    assert rows["handoffs relayed"].startswith(
        f"{objects['handoffs_relayed']:,} = {objects['handoffs_received']:,} received + "
        f"{objects['handoffs_in_flight']:,} in flight")
    assert rows["final snapshot"].startswith(
        f"{report['final_arenas']:,} arenas = {report['arenas_created']:,} grown by writers + "
        f"{report['arenas_grown_otherwise']:,} grown otherwise")
    assert_rows_defined(rows)


def test_walk_checks_pass_a_real_heap_and_catch_bad_spans(shm_heap_factory: HeapFactory) -> None:
    heap = shm_heap_factory(arena_size=1 << 20)
    refs = [heap.alloc(size) for size in (16, 16, 100, 5000, 300_000)]
    heap.free(refs[1])
    stats = heap.stats()
    spans = list(heap.walk())
    arenas = set(heap.snapshot())
    assert stats_problems(stats, heap.arena_size, len(arenas), len(arenas)) == []
    assert [span_problem(s, arenas, heap.arena_size, stats.page_size) for s in spans] == \
        [""] * len(spans)

    small = next(s for s in spans if s.size_class and len(s.objects) == 1)
    large = next(s for s in spans if not s.size_class)
    bad = {"which no snapshot lists": dataclasses.replace(small, arena=small.arena + 1),
           "does not lie on pages": dataclasses.replace(small, address=small.address + 4096),
           "outside its slots": dataclasses.replace(small, objects=(small.objects[0] + 8,)),
           "outside its slots ": dataclasses.replace(small, objects=(small.address - 16,)),
           "slots of": dataclasses.replace(small, capacity=10**6),
           "exactly one object": dataclasses.replace(large, objects=()),
           "does not lie on pages ": dataclasses.replace(large, npages=10**6)}
    for words, span in bad.items():
        assert words.strip() in span_problem(span, arenas, heap.arena_size, stats.page_size)
    assert stats_problems(stats, heap.arena_size, len(arenas) + 1, len(arenas) + 1)
    assert stats_problems(dataclasses.replace(stats, live_objects=stats.live_objects + 1),
                          heap.arena_size, len(arenas), len(arenas))


def test_bad_parameters_are_usage_errors(shm_heap_name: str) -> None:
    for args, words in ((["--writers", "0", "--churners", "0", "--readers", "0"],
                         "at least one worker"),
                        (["--churners", "-1"], "give an integer >= 0"),
                        (["--duration", "0"], "positive number"),
                        (["--duration", "nan"], "positive number"),
                        (["--kill-rate", "-1"], ">= 0 per second"),
                        (["--arena-size", "0"], "not a power of two"),
                        (["--arena-size", "-1"], "cannot read size"),
                        (["--max-arenas", "1"], "use at least 2"),
                        (["--max-arenas", str(2**32)], "32-bit index entry"),
                        (["--name", "bad name"], "invalid heap name")):
        result = run_cli("stress", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("usage: shmheap stress"), result.stderr
        assert words in result.stderr.splitlines()[-1], result.stderr
        assert "Traceback" not in result.stderr
    result = run_cli("stress", "--json", "/nonexistent/dir/r.json")
    assert result.returncode == 1
    assert result.stderr.startswith("shmheap: error: ") and "cannot write it" in result.stderr


def test_an_existing_heap_is_neither_used_nor_destroyed(shm_heap_name: str) -> None:
    assert run_cli("create", shm_heap_name, "--arena-size", "64KiB").returncode == 0
    result = run_cli("stress", "--name", shm_heap_name, "--duration", "1")
    assert result.returncode == 1 and "already exists" in result.stderr
    assert run_cli("info", shm_heap_name).returncode == 0


def test_ctrl_c_stops_the_run_kills_the_workers_and_destroys_the_heap(
        shm_heap_name: str) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "shmheap", "stress", "--name", shm_heap_name, "--duration", "60",
         "--max-arenas", "3000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    try:
        assert process.stdout is not None
        first = process.stdout.readline()  # the first progress line: workers are running
        assert first.startswith(f"stress {shm_heap_name}"), first
        attached = {a.pid for a in probe_attachments(shm_heap_name)}
        assert interrupt_until_exit(process) == 130
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert err.strip().splitlines()[-1] == "shmheap: interrupted", err
    assert "Traceback" not in err
    rows = summary(out)  # the partial summary: what was counted until Ctrl-C
    assert rows["result"] == "INTERRUPTED"
    assert rows["duration"].endswith("(interrupted: partial figures, no final verification)")
    assert "snapshots taken" in rows and "final snapshot" not in rows
    assert shm_leftovers(shm_heap_name) == []
    assert len(attached) == 7  # the parent and its six workers
    assert [pid for pid in attached if alive(pid)] == []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_reservoir_keeps_an_even_spread_and_the_exact_max() -> None:
    reservoir = Reservoir(capacity=8)
    for value in range(1, 1001):
        reservoir.add(value)
    assert reservoir.count == 1000 and reservoir.maximum == 1000
    stride = reservoir.stride
    assert 4 <= len(reservoir.samples) < 8 and 1000 // 8 <= stride <= 1000 // 4
    assert reservoir.samples == [stride * k for k in range(1, len(reservoir.samples) + 1)]


def test_latency_summary_weighs_samples_by_stride() -> None:
    fine = Reservoir(capacity=1000)
    for _ in range(90):
        fine.add(1000)
    coarse = Reservoir(capacity=1000, stride=10)
    for _ in range(100):
        coarse.add(5000)  # keeps 10 samples that stand for 100
    summary = latency_summary([fine, coarse])
    assert summary == pytest.approx({"p50_us": 5.0, "p99_us": 5.0, "max_us": 5.0,
                                     "samples": 100})
    assert latency_summary([]) == {"p50_us": None, "p99_us": None, "max_us": None,
                                   "samples": 0}


def test_workers_run_the_parents_shmheap_whatever_the_working_directory(
        shm_heap_name: str, tmp_path: Path) -> None:
    """Run from a source checkout whose native core is not built, the workers still run the
    parent's shmheap: the forkserver they fork from gets the parent's path, not the working
    directory first (multiprocessing's forkserver ignores the parent's path before 3.12)."""
    checkout = tmp_path / "shmheap"
    shutil.copytree(ROOT / "shmheap", checkout,
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    with open(checkout / "core.py", "a") as core:  # no native core, even if an editable
        core.write("\nnative = None\nNATIVE = False\n")  # install's finder could load one
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    # as the `shmheap` command starts: the working directory not on the parent's path
    command = "import sys; del sys.path[0]; from shmheap.tools.cli import main; sys.exit(main())"
    result = subprocess.run(
        [sys.executable, "-c", command, "stress", "--name", shm_heap_name, "--duration", "1",
         "--floor", "0", "--no-progress", "--json", str(tmp_path / "r.json")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": path})
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"]
    assert {w["core"] for w in report["workers"]} == {"native" if NATIVE else "pure"}
