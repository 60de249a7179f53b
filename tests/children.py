"""Fresh child interpreters for crash and fault tests.

``run_child`` runs code to completion, optionally armed at a crash point
(``SHMHEAP_CRASH_AT``); ``Child`` (shmheap/tools/bench/children.py) starts one that
talks to the test over its stdin/stdout, in a session of its own that the test
kills (with everything the child started) however the test ends.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

from shmheap.tools.bench.children import Child, child_env

__all__ = ["Child", "assert_killed", "child_env", "process_state", "run_child", "wait_until"]


def run_child(code: str, crash_at: str | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (dedented) in a new interpreter, with SHMHEAP_CRASH_AT=``crash_at`` if given."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          env=child_env(crash_at=crash_at), capture_output=True, text=True,
                          timeout=timeout)


def assert_killed(proc: subprocess.CompletedProcess[str]) -> None:
    """The child must have died of SIGKILL (its crash point), not of an error."""
    assert proc.returncode == -signal.SIGKILL, (
        f"child did not die of SIGKILL (rc={proc.returncode}): {proc.stderr}")


def wait_until(condition: Callable[[], bool], timeout: float = 60) -> None:
    """Poll ``condition`` (a state of another process that nothing signals) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.002)


def process_state(pid: int) -> str:
    """The state letter of process ``pid`` (R, S, T for stopped, ...)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]
