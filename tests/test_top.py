"""``shmheap top``: what it shows, that it refreshes in a terminal, and how it ends.

top runs as a real subprocess.  In a pseudo-terminal (rich redraws in place
there, when installed) the test waits for the arena count in top's output,
grows the heap and waits for the new count, so the refreshing is proven by
what top prints, not by sleeping.  Heaps come from the ``shm_heap`` fixture
and are destroyed afterwards even when a test fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib.util
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator

import pytest
from test_cli import ROOT, error_line, interrupt_until_exit, run_cli

from shmheap import Heap
from shmheap.liveness import probe_attachments
from shmheap.pytest_plugin import unique_heap_name
from shmheap.tools.bench.recovery import owner_recorded_round
from shmheap.tools.top import growth, render, take_sample

#: Seconds a test waits for top to print what it expects.
PATIENCE = 60.0


def arenas_row(count: int) -> re.Pattern[str]:
    return re.compile(rf"arenas +{count} of at most ")


def top_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "TERM": "xterm-256color"}


@contextlib.contextmanager
def top_process(name: str, stdout: int) -> Iterator[subprocess.Popen[bytes]]:
    """``shmheap top NAME`` refreshing every 0.1 s, writing to ``stdout``; killed if left."""
    proc = subprocess.Popen([sys.executable, "-m", "shmheap", "top", name, "--interval", "0.1"],
                            stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.STDOUT,
                            env=top_env())
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


class Reader:
    """Collects what arrives on file descriptor ``fd`` until a pattern appears."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.text = ""

    def until(self, pattern: re.Pattern[str] | str) -> None:
        """Read until ``pattern`` occurs in the text read since the last call."""
        start = len(self.text)
        deadline = time.monotonic() + PATIENCE
        while not re.search(pattern, self.text[start:]):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"top never printed {pattern!r}; it printed:\n{self.text}"
            assert self.read(remaining), f"top stopped before printing {pattern!r}:\n{self.text}"

    def read(self, timeout: float) -> bool:
        """Add what arrives within ``timeout`` seconds; False once the writer has gone."""
        poller = select.poll()  # not select(): the test process may hold over 1024 descriptors
        poller.register(self.fd, select.POLLIN)
        if not poller.poll(timeout * 1000):
            return True
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # a pty whose other end closed
            chunk = b""
        self.text += chunk.decode(errors="replace")
        return bool(chunk)

    def drain(self, timeout: float) -> None:
        """Read for up to ``timeout`` seconds, so that a writer never blocks on a full pty."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0 and self.read(remaining):
            pass


def test_top_in_a_terminal_refreshes_until_ctrl_c(shm_heap: Heap) -> None:
    shm_heap.grow()
    shm_heap.grow()
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    try:
        with top_process(shm_heap.name, slave) as proc:
            os.close(slave)
            slave = -1
            reader = Reader(master)
            reader.until(arenas_row(2))
            shm_heap.grow()
            reader.until(arenas_row(3))
            top_pid = proc.pid
            assert top_pid in {a.pid for a in probe_attachments(shm_heap.name)}
            assert interrupt_until_exit(proc, reader.drain) == 0, reader.text
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert "Traceback" not in reader.text and "interrupted" not in reader.text, reader.text
    if importlib.util.find_spec("rich") is not None:
        assert "\x1b[" in reader.text, "rich did not redraw in place"
    # top left the heap as it found it: detached, lock free, nothing to repair
    assert top_pid not in {a.pid for a in probe_attachments(shm_heap.name)}
    assert shm_heap.info(timeout=PATIENCE).recoveries == 0
    assert shm_heap.check() == []


def test_top_once_shows_the_heap(shm_heap: Heap) -> None:
    shm_heap.grow()
    shm_heap.grow()

    result = run_cli("top", shm_heap.name, "--once", "--interval", "0.1")

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert arenas_row(2).search(out), out
    # two samples 0.1 s apart, and the heap did not grow between them
    assert re.search(r"arenas .*; growth \+0\.0/s$", out, re.M), out
    assert re.search(r"index +2 entries, capacity \d[\d,]*; 1 generation, ", out), out
    assert re.search(r"memory +\d.* used in /dev/shm; .* reserved for arenas", out), out
    assert re.search(r"lock +free", out), out
    assert re.search(r"recoveries +0;", out), out
    attached = re.search(r"attached +2: (.*)", out)
    assert attached is not None, out
    assert f"{os.getpid()} since " in attached.group(1)
    assert "(this top) since " in attached.group(1)
    assert out.count("shmheap top ") == 1


def test_top_shows_recoveries(shm_heap: Heap) -> None:
    shm_heap.grow()
    owner_recorded_round(shm_heap)  # a child holds the lock and is SIGKILLed; we recover

    result = run_cli("top", shm_heap.name, "--once", "--interval", "0.1")

    assert result.returncode == 0, result.stderr
    assert re.search(r"recoveries +1, the last at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
                     r"\(\d+\.\d s ago\)", result.stdout), result.stdout


def test_top_says_who_holds_a_busy_lock(shm_heap: Heap) -> None:
    with shm_heap.locked():
        result = run_cli("top", shm_heap.name, "--once", "--interval", "0.1")

    assert result.returncode == 0, result.stderr
    assert re.search(rf"lock +.*held by process {os.getpid()}", result.stdout), result.stdout


@pytest.mark.skipif(not hasattr(Heap, "alloc"), reason="no allocator in this shmheap")
def test_top_shows_object_bytes(shm_heap: Heap) -> None:
    shm_heap.alloc(100)

    result = run_cli("top", shm_heap.name, "--once", "--interval", "0.1")

    assert result.returncode == 0, result.stderr
    assert re.search(r"objects +in use [1-9][^,]*, free .*, released .*; 1 objects",
                     result.stdout), result.stdout


def test_top_stops_when_the_heap_is_destroyed(shm_heap: Heap) -> None:
    shm_heap.grow()
    read_end, write_end = os.pipe()
    try:
        with top_process(shm_heap.name, write_end) as proc:
            os.close(write_end)
            write_end = -1
            reader = Reader(read_end)
            reader.until(arenas_row(1))
            shm_heap.destroy(force=True)
            reader.until(rf"heap '{shm_heap.name}' was destroyed; top stops")
            assert proc.wait(timeout=PATIENCE) == 0, reader.text
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def test_top_of_a_missing_heap_is_a_one_line_error() -> None:
    name = unique_heap_name()

    result = run_cli("top", name, "--once")

    assert result.returncode == 1
    assert f"no heap named {name!r}" in error_line(result)
    assert result.stdout == ""


def test_top_rejects_a_bad_interval(shm_heap: Heap) -> None:
    for interval in ("0", "-1", "nan", "soon"):
        result = run_cli("top", shm_heap.name, "--interval", interval)

        assert result.returncode == 2
        assert result.stderr.startswith("usage: shmheap top")
        assert "argument --interval" in result.stderr.splitlines()[-1]


def test_growth_is_arenas_per_second_between_two_samples(shm_heap: Heap) -> None:
    first = take_sample(shm_heap, PATIENCE)
    for _ in range(3):
        shm_heap.grow()
    second = take_sample(shm_heap, PATIENCE)
    later = dataclasses.replace(second, at=first.at + 2.0)

    assert growth(later, first) == "+1.5/s"
    assert growth(first, None) == "n/a (one sample)"
    assert "growth n/a (one sample)" in render(first, None, 1.0)
    assert "growth +1.5/s" in render(later, first, 1.0)
