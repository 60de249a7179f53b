"""``shmheap bench``: every benchmark runs, one JSON holds all their figures, one image plots them.

The suite runs in its hidden ``--tiny`` mode (each benchmark's test-sized
run, seconds in all); its figures are not judged, only that each one is
present and positive.  Speed belongs to the benchmarks' own output.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from test_bench import check_latency, leaves, my_shm_entries

from shmheap.tools.bench.index import SNAPSHOT_KINDS
from shmheap.tools.bench.suite import BENCHES, panels
from shmheap.tools.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: Benchmarks whose every figure must be positive (the others: some figure must be).
ALL_POSITIVE = {"index", "recovery"}


def numbers(figures: dict[str, Any]) -> list[tuple[str, float]]:
    """(path, value) of every number in a benchmark's figures, its environment left out."""
    return [(path, value) for path, value in
            leaves({key: item for key, item in figures.items() if key != "environment"})
            if isinstance(value, (int, float)) and not isinstance(value, bool)]


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line a failed command wrote to stderr (and nothing on stdout)."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shmheap: error: "), captured.err
    assert "===" not in captured.out, "a benchmark ran before the error"
    return lines[0]


def test_tiny_run_of_every_benchmark_writes_every_figure(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = my_shm_entries()
    json_path = tmp_path / "bench.json"

    assert main(["bench", "--tiny", "--json", str(json_path)]) == 0

    assert my_shm_entries() <= before, "the benchmarks left objects in /dev/shm"
    results = json.loads(json_path.read_text())
    available = {bench.name for bench in BENCHES if bench.exists()}
    assert set(results) == available and available >= ALL_POSITIVE
    for name, figures in results.items():
        found = numbers(figures)
        assert any(value > 0 for _path, value in found), f"{name} reported no figure"
        if name in ALL_POSITIVE:
            for path, value in found:
                assert value > 0, f"{name}{path} = {value}"
    for row in results["index"]["sizes"]:
        for kind in SNAPSHOT_KINDS:
            check_latency(row["latency"][kind], f"{kind} at {row['entries']}")
    for death in ("owner_recorded", "died_before_recording"):
        assert results["recovery"][death]["p50_ms"] > 0
    assert results["recovery"]["findings_after"] == []
    coord = results["coord"]
    assert coord["findings_after"] == []
    assert [count for label, count in coord["survived"].items() if "shmheap" in label] == [
        coord["trials"]], "a shmheap queue's peer must survive a SIGKILLed participant"
    for panel in panels(list(BENCHES), results):  # one comparison each: peers over one x
        xs = [sorted(x for x, _y in points) for points in panel.series.values()]
        assert len(xs) >= 2 and len(xs[0]) >= 3 and all(x == xs[0] for x in xs), panel
        assert all(y > 0 for points in panel.series.values() for _x, y in points)
    out = capsys.readouterr().out
    assert "=== shmheap bench index --tiny ===" in out
    assert "1. Snapshot latency" in out and "Recovery latency" in out
    assert "shmheap bench: summary" in out


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                    reason="matplotlib (the plot extra) is not installed")
def test_plot_draws_the_figures(tmp_path: Path) -> None:
    png = tmp_path / "bench.png"

    assert main(["bench", "index", "--tiny", "--plot", str(png)]) == 0

    assert png.read_bytes().startswith(PNG_MAGIC)


def test_plot_without_matplotlib_is_a_one_line_error_before_any_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an absent package looks like

    assert main(["bench", "--tiny", "--plot", str(tmp_path / "x.png")]) == 1

    assert "pip install 'shmheap[plot]'" in error_line(capsys)
    assert not (tmp_path / "x.png").exists()


def test_json_into_a_missing_directory_fails_before_any_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--tiny", "--json", str(tmp_path / "no" / "x.json")]) == 1

    assert "its directory does not exist" in error_line(capsys)
