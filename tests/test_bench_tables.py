"""README's benchmark tables are those of the last recorded run (docs/bench.json).

``tools/bench_tables.py`` makes them; this test fails when README.md says
anything else between its ``bench-table`` markers (run the script to fix it).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def bench_tables() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_tables",
                                                  ROOT / "tools" / "bench_tables.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_are_the_recorded_run() -> None:
    tables = bench_tables()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    run = json.loads((ROOT / "docs" / "bench.json").read_text(encoding="utf-8"))
    assert tables.render(readme, run) == readme, (
        "README.md's benchmark tables differ from docs/bench.json: run "
        "`python tools/bench_tables.py`")
    assert {m["name"] for m in tables.BLOCK.finditer(readme)} == set(tables.TABLES)


def test_a_changed_figure_is_caught() -> None:
    tables = bench_tables()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    run = json.loads((ROOT / "docs" / "bench.json").read_text(encoding="utf-8"))
    run["cores"]["cores"]["native"]["alloc_free_64"] *= 2
    assert tables.render(readme, run) != readme
