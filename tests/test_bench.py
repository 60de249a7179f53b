"""The index benchmark runs end to end, reports every figure and leaves nothing behind.

The benchmark runs in its ``--tiny`` mode (seconds); its figures are not
judged here, only that each one is present and positive.  Speed belongs to
the benchmark's own output, not to tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shmheap.names import SHM_DIR
from shmheap.tools.bench import observers
from shmheap.tools.bench.common import Target, percentile
from shmheap.tools.bench.index import GROW_CASES, NAIVE_KINDS, SNAPSHOT_KINDS, WRITER_DESIGNS, main

#: Figures that may be zero or negative: the machine's load, and differences.
NOT_POSITIVE = {"loadavg", "loadavg_after", "above_floor_ns"}


def leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(path, value) of every leaf of a JSON document."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key not in NOT_POSITIVE:
                yield from leaves(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from leaves(item, f"{path}[{i}]")
    else:
        yield path, value


def my_shm_entries() -> set[str]:
    """Entries of /dev/shm named by this process (benchmark names carry ``_p<pid>_``)."""
    return {entry for entry in os.listdir(SHM_DIR) if f"_p{os.getpid()}_" in entry}


def check_latency(figure: dict[str, Any] | None, what: str) -> None:
    assert figure is not None, f"{what} is missing"
    assert figure["p50_ns"] > 0 and figure["p99_ns"] >= figure["p50_ns"], what
    assert figure["batches"] >= 1 and figure["per_batch"] >= 1, what


def test_tiny_run_reports_every_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = my_shm_entries()
    json_path = tmp_path / "bench.json"
    argv = ["--tiny", "--json", str(json_path)]
    plotting = importlib.util.find_spec("matplotlib") is not None
    if plotting:
        argv += ["--plot", str(tmp_path / "bench.png")]

    assert main(argv) == 0

    assert my_shm_entries() <= before, "the benchmark left objects in /dev/shm"
    results = json.loads(json_path.read_text())
    for row in results["sizes"]:
        for kind in SNAPSHOT_KINDS:
            check_latency(row["latency"][kind], f"{kind} at {row['entries']}")
        for kind in NAIVE_KINDS:
            assert row["ratio"][kind] > 0
        assert row["memory"]["index_len"] == row["entries"]
    assert [row["entries"] for row in results["sizes"]] == [10, 1_000, 10_000]
    assert results["iteration"]["python_per_s"] > 0
    if importlib.util.find_spec("numpy") is not None:
        assert results["iteration"]["numpy_per_s"] > 0
    assert [(row["arena_size"], row["reserve"]) for row in results["grow"]] == list(GROW_CASES)
    for row in results["grow"]:
        check_latency(row["grow"], f"grow {row}")
        check_latency(row["floor"], f"floor {row}")
    writer = results["writer"]
    assert writer["alone_per_s"] > 0
    assert set(writer["designs"]) == set(WRITER_DESIGNS) - {"alone"}
    for design, figures in writer["designs"].items():
        for key in ("per_s", "ratio", "observer_looks_per_s"):
            assert figures[key] > 0, (design, key)
    check_latency(results["liveness"]["read_word"], "read_word")
    check_latency(results["liveness"]["baseline"], "baseline")
    assert results["targets"] and all(isinstance(t["ok"], bool) for t in results["targets"])
    for path, value in leaves({k: v for k, v in results.items() if k != "environment"}):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert value > 0, f"{path} = {value}"
    out = capsys.readouterr().out
    assert "1. Snapshot latency" in out and "Targets:" in out
    if plotting:
        assert (tmp_path / "bench.png").stat().st_size > 0


def test_plot_without_matplotlib_is_a_clear_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an absent package looks like

    assert main(["--tiny", "--plot", str(tmp_path / "x.png")]) == 2

    assert "pip install 'shmheap[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_percentile_is_nearest_rank() -> None:
    values = list(range(100, 0, -1))
    assert percentile(values, 0.5) == 50
    assert percentile(values, 0.99) == 99
    assert percentile([7.0], 0.99) == 7.0


def test_target_verdicts() -> None:
    assert Target.of("fast", 400, "<=", 500, str).ok
    assert not Target.of("fast", 600, "<=", 500, str).ok
    assert Target.of("rate", 2.0, ">=", 1.0, str).rule == ">= 1.0"
    with pytest.raises(ValueError, match="operator"):
        Target.of("bad", 1, "<", 2, str)


def test_observers_bench_runs_tiny_and_reports_every_observer(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = my_shm_entries()
    json_path = tmp_path / "observers.json"

    assert observers.main(["--tiny", "--json", str(json_path)]) == 0

    assert my_shm_entries() <= before, "the benchmark left objects in /dev/shm"
    results = json.loads(json_path.read_text())
    assert [heap["arenas"] for heap in results["heaps"]] == list(observers.MODES["tiny"][0])
    for heap in results["heaps"]:
        assert heap["findings_after"] == []
        assert heap["alone"]["ops"] > 0 and heap["alone"]["worst_us"] > 0
        for what in observers.OBSERVERS:
            row = heap[what]
            assert row["ops"] > 0 and row["observer_runs"] > 0, (what, row)
            assert row["worst_ratio"] > 0 and row["p99_ratio"] > 0
    assert "Writer latency beside a looping observer" in capsys.readouterr().out
