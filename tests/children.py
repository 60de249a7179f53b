"""Fresh child interpreters for crash tests: run code, optionally armed at a crash point."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap


def run_child(code: str, crash_at: str | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (dedented) in a new interpreter, with SHMHEAP_CRASH_AT=``crash_at`` if given."""
    env = dict(os.environ)
    env.pop("SHMHEAP_CRASH_AT", None)
    if crash_at:
        env["SHMHEAP_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_killed(proc: subprocess.CompletedProcess[str]) -> None:
    """The child must have died of SIGKILL (its crash point), not of an error."""
    assert proc.returncode == -signal.SIGKILL, (
        f"child did not die of SIGKILL (rc={proc.returncode}): {proc.stderr}")
