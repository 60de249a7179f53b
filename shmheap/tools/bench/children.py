"""Child interpreters for the fault benchmark and the tests: started fresh, killed whatever happens.

``Child`` starts ``python -c CODE`` in a session of its own, with the crash-point
variables (``SHMHEAP_CRASH_AT``/``RAISE_AT``/``STOP_AT``) that the caller asks
for and none that it inherited; it reads the child's reports line by line
with a timeout, answers on its stdin, and on exit kills the child's whole
session (grandchildren included) and reaps it.

This module touches no heap.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import textwrap
from types import TracebackType

#: the crash-point variables a child must not inherit unless a test sets them
POINT_VARS = ("SHMHEAP_CRASH_AT", "SHMHEAP_RAISE_AT", "SHMHEAP_STOP_AT")


def child_env(**points: str | None) -> dict[str, str]:
    """This environment without crash points, plus ``crash_at=``/``raise_at=``/``stop_at=``."""
    env = {k: v for k, v in os.environ.items() if k not in POINT_VARS}
    for key, value in points.items():
        if value:
            env[f"SHMHEAP_{key.upper()}"] = value
    return env


class Child:
    """An interactive child interpreter: ``line()`` reads its next report, ``send()`` answers.

    Used as a context manager; on exit its whole session is killed and reaped.
    """

    def __init__(self, code: str, **points: str | None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)], env=child_env(**points),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)

    def __enter__(self) -> Child:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.kill()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def line(self, timeout: float = 60) -> str:
        """The child's next line of output; AssertionError (with its stderr) if none comes."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline() if self._readable(timeout) else ""
        if not line:
            raise AssertionError(f"the child said nothing (rc={self.proc.poll()}): "
                                 f"{self.stderr()}")
        return line.rstrip("\n")

    def silent_for(self, seconds: float) -> bool:
        """True if the child writes nothing for ``seconds`` (it is waiting, as it must)."""
        return not self._readable(seconds)

    def _readable(self, seconds: float) -> bool:
        """True if the child's stdout has data (or EOF) within ``seconds``.

        poll, not select: a test process may hold more than 1024 descriptors.
        """
        assert self.proc.stdout is not None
        poller = select.poll()
        poller.register(self.proc.stdout, select.POLLIN)
        return bool(poller.poll(seconds * 1000))

    def send(self, text: str = "") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(60)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
