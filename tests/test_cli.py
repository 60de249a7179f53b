"""The ``shmheap`` command line, run as a real subprocess: output, exit codes, ls, fsck, gc.

Every heap is named by the ``shm_heap_name`` fixture (or ``unique_heap_name``
and ``discard``), so it is removed even when a test fails.  ``gc`` is always
given the names of this test's heaps: heaps of other tests running at the same
time are none of its business.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import mmap
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import shmheap
from shmheap import control, liveness, names
from shmheap.pytest_plugin import discard, shm_leftovers, unique_heap_name
from shmheap.tools.args import parse_size
from shmheap.tools.display import format_size

ROOT = Path(shmheap.__file__).resolve().parent.parent


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m shmheap ARGS`` with this checkout of shmheap first on the path."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "shmheap", *args], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": path, **(env or {})},
                          timeout=300, check=False)


def interrupt_until_exit(process: subprocess.Popen[Any],
                         drain: Callable[[float], None] | None = None) -> int:
    """SIGINT ``process`` again and again until it exits, as an impatient user would.

    The signals land wherever the process happens to be, its cleanup
    included, whatever the machine's load: the loop ends on the process's
    exit, not after a time.  ``drain(seconds)`` reads the process's output
    between signals.  Returns the exit status.
    """
    while process.poll() is None:
        process.send_signal(signal.SIGINT)
        if drain is not None:
            drain(0.05)
        else:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=0.05)
    return process.returncode


def ok(*args: str) -> str:
    """Run the CLI, expect exit 0, return stdout."""
    result = run_cli(*args)
    assert result.returncode == 0, (result.stdout, result.stderr)
    return result.stdout


def fails(*args: str, code: int = 1) -> subprocess.CompletedProcess[str]:
    """Run the CLI, expect exit ``code`` and no traceback."""
    result = run_cli(*args)
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result


def usage_error(*args: str) -> str:
    """Run the CLI, expect a usage error (exit 2, the command's usage); return the error line."""
    result = fails(*args, code=2)
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("usage: shmheap"), result.stderr
    assert ": error: " in lines[-1], result.stderr
    return lines[-1]


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single ``shmheap: error: ...`` line of a failed command."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shmheap: error: "), result.stderr
    return lines[0]


def shm_path(entry: str) -> str:
    return f"{names.SHM_DIR}/{entry}"


def touch(entry: str, size: int = 0) -> None:
    with open(shm_path(entry), "wb") as out:
        out.truncate(size)


@pytest.fixture
def heap_name(shm_heap_name: str) -> str:
    """A unique name with a fresh heap of 64 KiB arenas under it (destroyed afterwards)."""
    ok("create", shm_heap_name, "--arena-size", "64KiB", "--max-arenas", "100")
    return shm_heap_name


# -- create / info / arenas / grow / destroy ------------------------------------------------


def test_create_info_arenas_grow_destroy_round_trip(shm_heap_name: str) -> None:
    name = shm_heap_name
    assert name in ok("create", name, "--arena-size", "64KiB", "--max-arenas", "100")
    info = json.loads(ok("info", name, "--json"))
    assert (info["name"], info["arenas"], info["arena_size"], info["max_arenas"]) == (
        name, 0, 64 * 1024, 100)
    assert ok("grow", name, "--count", "3").split() == [
        "arena", "1", "at", "0x10000", "arena", "2", "at", "0x20000", "arena", "3", "at",
        "0x30000"]
    assert "arena 10 at 0xa0000" in ok("grow", name, "--at", "10")
    assert "arena 4 at" in ok("grow", name)
    listing = json.loads(ok("arenas", name, "--json"))
    assert listing == {"name": name, "arena_size": 64 * 1024, "arenas": [1, 2, 3, 10, 4]}
    info = json.loads(ok("info", name, "--json"))
    assert (info["arenas"], info["index_len"], info["hint"]) == (5, 5, 5)
    text = ok("arenas", name).splitlines()
    assert text[0].split() == ["position", "index", "base"]
    assert text[4].split() == ["3", "10", "0xa0000"]
    assert "64 KiB each" in ok("info", name)
    removed = ok("destroy", name).splitlines()
    assert f"removed /dev/shm/{names.control_name(name)}" == removed[-1]
    assert f"removed /dev/shm/{names.arena_name(name, 10)}" in removed
    assert shm_leftovers(name) == []
    assert "no heap named" in error_line(fails("info", name))


def test_create_without_reserve_leaves_arenas_sparse(shm_heap_name: str) -> None:
    assert "not reserved" in ok("create", shm_heap_name, "--arena-size", "1MiB", "--no-reserve")
    ok("grow", shm_heap_name)
    assert os.stat(shm_path(names.arena_name(shm_heap_name, 1))).st_blocks * 512 < 1 << 20


@pytest.mark.parametrize("bad", ["a b", "a" * 49, "a.b", "../x"])
def test_bad_names_are_usage_errors(bad: str) -> None:
    for command in ("create", "info", "arenas", "grow", "destroy", "fsck", "top", "gc"):
        assert "invalid heap name" in usage_error(command, bad)


def test_missing_heap_is_an_error(shm_heap_name: str) -> None:
    for command in (["info"], ["arenas"], ["grow"], ["destroy"], ["fsck"], ["fsck", "--repair"]):
        line = error_line(fails(*command, shm_heap_name))
        assert "no heap named" in line and shm_heap_name in line


def test_existing_heap_is_an_error(heap_name: str) -> None:
    assert "already exists" in error_line(fails("create", heap_name))
    assert json.loads(ok("info", heap_name, "--json"))["arenas"] == 0


def test_bad_sizes_are_usage_errors(shm_heap_name: str) -> None:
    for size, words in (("12XB", "cannot read size '12XB'"), ("-1", "cannot read size '-1'"),
                        ("0", "arena_size 0 is not a power of two"),
                        ("1000", "not a power of two")):
        assert words in usage_error("create", shm_heap_name, "--arena-size", size)
    assert "from 2 to" in usage_error("create", shm_heap_name, "--max-arenas", "1")
    assert "63-bit heap address space" in usage_error(
        "create", shm_heap_name, "--arena-size", "4GiB", "--max-arenas", str((1 << 32) - 1))
    assert shm_leftovers(shm_heap_name) == []


def test_usage_errors_exit_2_and_runtime_errors_exit_1(heap_name: str) -> None:
    assert fails(code=2).stderr.startswith("usage: shmheap")
    fails("frobnicate", code=2)
    assert "'many' is not an integer" in usage_error("grow", heap_name, "--count", "many")
    assert "give an integer >= 1" in usage_error("grow", heap_name, "--count", "0")
    assert "'one' is not an integer" in usage_error("grow", heap_name, "--at", "one")
    assert "exactly one arena" in usage_error("grow", heap_name, "--at", "5", "--count", "2")
    # what depends on the heap is a runtime error
    assert "arena index" in error_line(fails("grow", heap_name, "--at", "100"))
    ok("grow", heap_name, "--at", "7")
    assert "already taken" in error_line(fails("grow", heap_name, "--at", "7"))
    assert "no heap named" in error_line(fails("info", unique_heap_name()))


def test_grow_at_out_of_range_is_one_error_below_and_above(heap_name: str) -> None:
    """Below 1 or past the maximum: the same error class through the API, exit 1 through
    the CLI, with the range in the message."""
    out_of_range = ("0", "-1", "100", "101", str(2**40))
    with shmheap.Heap.attach(heap_name) as heap:
        for at in out_of_range:
            with pytest.raises(shmheap.InvalidParameterError) as raised:
                heap.grow(at=int(at))
            assert raised.type is shmheap.InvalidParameterError
            assert f"grow(at={at}): an arena index must be an int in [1, 100)" in str(raised.value)
    for at in out_of_range:
        line = error_line(fails("grow", heap_name, "--at", at))
        assert line == (f"shmheap: error: grow(at={at}): an arena index must be an int in "
                        "[1, 100)"), line
    assert json.loads(ok("info", heap_name, "--json"))["arenas"] == 0


def test_info_of_a_full_heap_says_full(shm_heap_name: str) -> None:
    ok("create", shm_heap_name, "--arena-size", "64KiB", "--max-arenas", "3")
    ok("grow", shm_heap_name)
    rows = dict(line.split(None, 1) for line in ok("info", shm_heap_name).splitlines())
    assert rows["arenas"].endswith("indices 1 to 2, the next grow tries 2"), rows["arenas"]
    ok("grow", shm_heap_name)
    rows = dict(line.split(None, 1) for line in ok("info", shm_heap_name).splitlines())
    assert rows["arenas"] == ("2 of at most 2, 64 KiB each; indices 1 to 2, full: no grow can "
                              "add another"), rows["arenas"]


def test_grow_says_how_many_it_grew_when_the_heap_fills(shm_heap_name: str) -> None:
    ok("create", shm_heap_name, "--arena-size", "64KiB", "--max-arenas", "10")
    ok("grow", shm_heap_name, "--count", "3")
    result = fails("grow", shm_heap_name, "--count", "20")
    assert result.stdout.split("\n")[:6] == [f"arena {i} at {i << 16:#x}" for i in range(4, 10)]
    line = error_line(result)
    assert "grew 6 of 20 arenas, then: " in line and "all 9 arena indices are taken" in line
    assert json.loads(ok("info", shm_heap_name, "--json"))["arenas"] == 9


def test_every_command_says_the_same_arena_limit(shm_heap_name: str) -> None:
    assert "at most 99 arenas of 64 KiB" in ok("create", shm_heap_name, "--arena-size", "64KiB",
                                                "--max-arenas", "100")
    ok("grow", shm_heap_name)
    assert "1 of at most 99," in ok("info", shm_heap_name)
    assert json.loads(ok("info", shm_heap_name, "--json"))["max_arenas"] == 100
    assert "1 of at most 99," in ok("top", shm_heap_name, "--once", "--interval", "0.1")
    row = next(line for line in ok("ls").splitlines() if line.startswith(shm_heap_name + " "))
    assert " 1 of 99 " in row
    assert "at most N-1 arenas" in ok("create", "--help")
    assert "at most N-1 arenas" in ok("stress", "--help")


def test_info_shows_the_heap_not_its_own_attach(shm_heap_name: str) -> None:
    ok("create", shm_heap_name, "--arena-size", "1MiB", "--no-reserve")
    ok("grow", shm_heap_name, "--count", "2")
    with shmheap.Heap.attach(shm_heap_name) as heap:
        heap.alloc(1000)
        text = ok("info", shm_heap_name)
        raw = json.loads(ok("info", shm_heap_name, "--json"))
    rows = dict(line.split(None, 1) for line in text.splitlines())
    assert re.fullmatch(rf"{shm_heap_name}, created \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d "
                        r"\(\d+\.\d s ago\)", rows["heap"]), rows["heap"]
    assert rows["arenas"].startswith("2 of at most 1,048,575, 1 MiB each;")
    assert re.fullmatch(r"\d+(\.\d)? KiB used in /dev/shm; arenas are sparse \(2\.0 MiB if "
                        r"every page were touched\)", rows["memory"]), rows["memory"]
    assert rows["attached"].startswith(f"1: {os.getpid()} since ")
    assert re.match(r"in use \d+ KiB, .*; 1 objects", rows["objects"]), rows["objects"]
    assert "readonly" not in text and "created_ns" not in text
    assert "readonly" not in raw
    assert isinstance(raw["created_ns"], int) and raw["arena_size"] == 1 << 20
    assert (raw["attached"], raw["attached_pids"]) == (1, [os.getpid()])
    assert raw["reserve"] is False and 0 < raw["shm_bytes"] < raw["reserved_bytes"]
    assert raw["allocator"]["live_objects"] == 1


def test_version_is_the_package_version() -> None:
    assert ok("--version") == f"shmheap {shmheap.__version__}\n"
    assert importlib.metadata.version("shmheap") == shmheap.__version__


def test_console_script_is_the_same_tool() -> None:
    script = Path(sys.executable).parent / "shmheap"
    if not script.exists():
        pytest.skip("the shmheap console script is not installed next to this python")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout == ok("--help")


# -- ls ---------------------------------------------------------------------------------------


def by_name(listing: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [entry for entry in listing if entry["name"] == name]
    assert len(found) == 1, listing
    return found[0]


def ls_row(name: str) -> list[str]:
    """The columns of heap ``name``'s row in ``shmheap ls`` (a size's unit joined to it)."""
    for line in ok("ls").splitlines():
        if line.startswith(name + " "):
            return re.sub(r" (B|KiB|MiB|GiB)\b", r"_\1", re.sub(r" of ", "_of_", line)).split()
    raise AssertionError(f"{name} is not listed")


def test_ls_lists_a_heap_and_its_live_processes(heap_name: str) -> None:
    ok("grow", heap_name, "--count", "2")
    entry = by_name(json.loads(ok("ls", "--json")), heap_name)
    assert (entry["state"], entry["arenas"], entry["arena_size"], entry["pids"]) == (
        "ready", 2, 64 * 1024, [])
    assert entry["reserve"] is True and entry["reserved_bytes"] >= 2 * 64 * 1024
    assert entry["shm_bytes"] >= entry["reserved_bytes"]
    with shmheap.Heap.attach(heap_name, readonly=True):
        entry = by_name(json.loads(ok("ls", "--json")), heap_name)
        assert entry["pids"] == [os.getpid()]
        assert ls_row(heap_name)[1:3] == ["ready", "2_of_99"]
        assert ls_row(heap_name)[-1] == str(os.getpid())


def test_ls_shows_used_memory_beside_reserved(shm_heap_name: str, more_names: list[str]) -> None:
    ok("create", shm_heap_name, "--arena-size", "64MiB", "--no-reserve")
    ok("grow", shm_heap_name, "--count", "4")
    reserved = unique_heap_name()
    more_names.append(reserved)
    ok("create", reserved, "--arena-size", "64KiB")
    ok("grow", reserved, "--count", "2")
    listing = json.loads(ok("ls", "--json"))
    sparse, full = by_name(listing, shm_heap_name), by_name(listing, reserved)
    assert sparse["reserve"] is False and sparse["shm_bytes"] < 1 << 20
    assert sparse["reserved_bytes"] > 4 * (64 << 20)
    assert ls_row(shm_heap_name)[3:6] == ["64_MiB", names_size(sparse["shm_bytes"]), "sparse"]
    assert ls_row(reserved)[3:6] == ["64_KiB", names_size(full["shm_bytes"]),
                                     names_size(full["reserved_bytes"])]
    assert ok("ls").splitlines()[0].split() == ["name", "state", "arenas", "arena", "size",
                                                 "used", "reserved", "structures", "pids"]


def names_size(nbytes: int) -> str:
    return format_size(nbytes).replace(" ", "_")


def test_ls_shows_a_damaged_heap(shm_heap_name: str) -> None:
    touch(names.arena_name(shm_heap_name, 1))
    entry = by_name(json.loads(ok("ls", "--json")), shm_heap_name)
    assert (entry["state"], entry["arenas"], entry["segments"]) == ("no-control", None, 1)
    assert "objects" not in entry  # objects are what alloc returns
    assert f"{shm_heap_name}: no-control: no control segment" in ok("ls")


# -- fsck -------------------------------------------------------------------------------------


def test_fsck_on_a_clean_heap_exits_0(heap_name: str) -> None:
    ok("grow", heap_name, "--count", "3")
    assert "is clean" in ok("fsck", heap_name)
    assert json.loads(ok("fsck", heap_name, "--json")) == {
        "name": heap_name, "clean": True, "findings": []}


def test_fsck_finds_an_orphan_and_repair_removes_it(heap_name: str) -> None:
    ok("grow", heap_name)
    # a new arena left unlinked by a process that died holding the last liveness slot
    orphan = f"{names.control_name(heap_name)}.new{liveness.NSLOTS - 1:x}"
    touch(orphan)
    found = fails("fsck", heap_name, "--json")
    findings = json.loads(found.stdout)["findings"]
    assert [(f["code"], f["fixed"]) for f in findings] == [("unpublished", False)]
    assert "found: unpublished" in fails("fsck", heap_name).stdout
    assert os.path.exists(shm_path(orphan))
    assert "fixed: unpublished" in ok("fsck", heap_name, "--repair")
    assert not os.path.exists(shm_path(orphan))
    assert "is clean" in ok("fsck", heap_name)


def test_fsck_reports_a_heap_that_cannot_be_attached(shm_heap_name: str) -> None:
    touch(names.control_name(shm_heap_name), control.SIZE)  # all zeros: no magic
    result = fails("fsck", shm_heap_name, "--json")
    findings = json.loads(result.stdout)["findings"]
    assert [(f["code"], f["fatal"]) for f in findings] == [("attach", True)]
    assert "cannot be attached" in fails("fsck", shm_heap_name).stdout


# -- gc ---------------------------------------------------------------------------------------


@pytest.fixture
def more_names() -> Iterator[list[str]]:
    """A list to put extra heap names in; each is destroyed afterwards."""
    made: list[str] = []
    yield made
    for name in made:
        discard(name)
    assert [shm_leftovers(name) for name in made] == [[] for _ in made]


def test_gc_removes_segments_without_a_control_segment(heap_name: str,
                                                      more_names: list[str]) -> None:
    name = unique_heap_name()
    more_names.append(name)
    touch(names.arena_name(name, 1), 4096)
    touch(f"{names.control_name(name)}.live")
    dry = ok("gc", "--dry-run", name, heap_name)
    assert f"would remove heap {name!r} (no-control" in dry and heap_name not in dry
    assert "): 2 segments, " in dry  # what gc counts in /dev/shm are segments
    assert len(shm_leftovers(name)) == 2
    report = json.loads(ok("gc", "--json", name, heap_name))
    assert [(c["name"], c["state"]) for c in report["collected"]] == [(name, "no-control")]
    assert sorted(report["collected"][0]["removed"]) == sorted(
        [names.arena_name(name, 1), f"{names.control_name(name)}.live"])
    assert shm_leftovers(name) == []
    assert json.loads(ok("info", heap_name, "--json"))["name"] == heap_name
    assert ok("gc", name, heap_name).strip() == "nothing to collect"


def test_gc_removes_a_corrupt_heap(heap_name: str) -> None:
    os.unlink(shm_path(f"{names.control_name(heap_name)}.live"))
    assert "corrupt" in ok("gc", "--dry-run", heap_name)
    assert shm_leftovers(heap_name) != []
    assert f"removed heap {heap_name!r} (corrupt" in ok("gc", heap_name)
    assert shm_leftovers(heap_name) == []


def test_gc_removes_a_heap_whose_creator_died(shm_heap_name: str) -> None:
    died = run_cli("create", shm_heap_name, env={"SHMHEAP_CRASH_AT": "create.control_created"})
    assert died.returncode == -9
    assert names.control_name(shm_heap_name) in shm_leftovers(shm_heap_name)
    assert "creator died" in ok("gc", shm_heap_name)
    assert shm_leftovers(shm_heap_name) == []


def write_initialising_control(name: str) -> int:
    """Make a control segment in state INITIALISING by hand; return its descriptor."""
    fd = os.open(shm_path(names.control_name(name)), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, control.SIZE)
    with mmap.mmap(fd, control.SIZE) as mapping:
        view = memoryview(mapping)
        control.write_params(view, control.Params(
            heap_id=1, arena_size=64 * 1024, max_arenas=16, first_cap=1024, mode=0o600,
            reserve=True, created_ns=0))
        view[control.STATE_OFFSET:control.STATE_OFFSET + 4] = control.INITIALISING.to_bytes(
            4, "little")
        view.release()
    return fd


def test_gc_keeps_a_heap_whose_creator_is_alive(shm_heap_name: str) -> None:
    fd = write_initialising_control(shm_heap_name)
    try:
        assert liveness.try_lock(fd, 0)  # what a live creator holds while it initialises
        assert by_name(json.loads(ok("ls", "--json")), shm_heap_name)["state"] == "initialising"
        assert ok("gc", shm_heap_name).strip() == "nothing to collect"
        assert shm_leftovers(shm_heap_name) == [names.control_name(shm_heap_name)]
        liveness.unlock(fd, 0)
    finally:
        os.close(fd)
    assert "creator died" in ok("gc", shm_heap_name)
    assert shm_leftovers(shm_heap_name) == []


def test_gc_stale_removes_only_heaps_nobody_has_attached(heap_name: str,
                                                         more_names: list[str]) -> None:
    other = unique_heap_name()
    more_names.append(other)
    ok("create", other, "--arena-size", "64KiB")
    assert ok("gc", heap_name, other).strip() == "nothing to collect"
    with shmheap.Heap.attach(other):
        collected = json.loads(ok("gc", "--stale", "--json", heap_name, other))["collected"]
        assert [(c["name"], c["reason"]) for c in collected] == [
            (heap_name, "stale: no live process has it attached")]
        assert shm_leftovers(heap_name) == []
        assert shm_leftovers(other) != []
    assert f"would remove heap {other!r} (stale" in ok("gc", "--stale", "--dry-run", other)
    assert shm_leftovers(other) != []
    ok("gc", "--stale", other)
    assert shm_leftovers(other) == []


@pytest.mark.parametrize(("text", "nbytes"), [
    ("65536", 65536), ("64KiB", 64 << 10), ("64k", 64 << 10), ("1MiB", 1 << 20),
    ("1M", 1 << 20), ("2G", 2 << 30), ("2GB", 2 << 30), (" 3 kib ", 3 << 10), ("1T", 1 << 40),
])
def test_parse_size(text: str, nbytes: int) -> None:
    assert parse_size(text) == nbytes


@pytest.mark.parametrize("text", ["", "k", "1.5M", "-1", "1X", "1 MiB MiB", "0x10"])
def test_parse_size_rejects_garbage(text: str) -> None:
    with pytest.raises(shmheap.InvalidParameterError, match="cannot read size"):
        parse_size(text)


@pytest.mark.parametrize(("nbytes", "text"), [
    (0, "0 B"), (1023, "1023 B"), (1024, "1 KiB"), (1536, "1.5 KiB"), (64 << 10, "64 KiB"),
    (1 << 20, "1 MiB"), (3 << 30, "3 GiB"), (5 << 40, "5 TiB"), (2048 << 40, "2048 TiB"),
])
def test_format_size(nbytes: int, text: str) -> None:
    assert format_size(nbytes) == text
