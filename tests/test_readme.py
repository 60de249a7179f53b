"""Every fenced ``python`` block of README.md runs as written and leaves nothing in /dev/shm.

Each block runs as a script of its own in a fresh interpreter (a block may
start processes, which spawn re-imports), with this checkout first on the
path.  Its heap names (the string literals ``"exp1"``, ``"exp2"``, ...) are
replaced by unique names first, so that concurrent runs cannot collide; a
heap under any other name would be left unchecked, so the test refuses it.
Whatever is left under the names is reported, then destroyed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import ROOT

from shmheap.pytest_plugin import discard, shm_leftovers, unique_heap_name

README = ROOT / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
#: How README's examples name their heaps.
EXAMPLE_NAME = re.compile(r'"(exp\d+)"')
#: Calls that name a heap with a literal.
NAMED = re.compile(r'\b(?:create|open|attach|destroy)\("([^"]*)"')


def python_blocks() -> list[str]:
    return BLOCK.findall(README.read_text(encoding="utf-8"))


def test_readme_has_python_blocks() -> None:
    assert len(python_blocks()) >= 2


@pytest.mark.parametrize("number", range(len(python_blocks())))
def test_readme_block_runs_and_leaves_nothing(number: int, tmp_path: Path) -> None:
    code = python_blocks()[number]
    assert set(NAMED.findall(code)) <= set(EXAMPLE_NAME.findall(code)), \
        "a README example names a heap other than exp<N>"
    names = {example: unique_heap_name("readme") for example in EXAMPLE_NAME.findall(code)}
    script = tmp_path / f"readme_block_{number}.py"
    script.write_text(EXAMPLE_NAME.sub(lambda m: f'"{names[m.group(1)]}"', code))
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    try:
        result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                                text=True, env={**os.environ, "PYTHONPATH": path}, timeout=120,
                                check=False)
        assert result.returncode == 0, f"README block {number} failed:\n{result.stderr}"
        assert {name: shm_leftovers(name) for name in names.values()} == {
            name: [] for name in names.values()}
    finally:
        for name in names.values():
            discard(name)
