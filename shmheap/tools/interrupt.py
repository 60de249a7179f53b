"""Ctrl-C for the commands that run until stopped (``shmheap stress``, ``shmheap top``).

A KeyboardInterrupt raised wherever SIGINT happens to land can tear a
message half read from a worker's pipe, break off the cleanup that destroys
a stress run's heap, or turn a wait for the heap lock into a raw
``posix_ipc.SignalError``.  So inside ``with CtrlC() as ctrl_c`` SIGINT is
blocked: it stays pending until the command takes it at a point where
nothing is half done, with ``ctrl_c.check()`` or ``ctrl_c.sleep(seconds)``
(a sleep that a Ctrl-C ends at once), which raise KeyboardInterrupt.  A
command that waits on something else waits at most ``LATENCY`` seconds at a
time between checks.

Starting a ``multiprocessing`` spawn process unblocks SIGINT in the parent
(the standard library's resource tracker launcher does so), so SIGINT also
gets a handler that only notes it, and every check blocks it again.

Once a Ctrl-C has been taken the command is stopping: when the ``with``
block ends, SIGINT is ignored from then on, so a second Ctrl-C (an
impatient user) cannot break off the cleanup or the exit.  A Ctrl-C still
pending at the end of the block is raised there; if none came, the handler
and the signal mask are restored.

Outside the main thread, where Python runs no signal handler, the context
does nothing.  Processes started inside it inherit the blocked SIGINT
(stress's workers ignore SIGINT anyway).

This module owns SIGINT's handler and mask while a command runs; it touches no heap.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType
from typing import Any

#: Most seconds a command waiting on something else lets a Ctrl-C wait.
LATENCY = 0.1

_SIGINT = {signal.SIGINT}


class CtrlC:
    """``with CtrlC() as ctrl_c``: SIGINT is taken only by ``check()`` and ``sleep()``."""

    def __init__(self) -> None:
        #: a Ctrl-C has been taken (KeyboardInterrupt raised)
        self.taken = False
        #: a SIGINT reached the handler while it was not blocked
        self._noted = False
        #: the signal mask and SIGINT handler before ``__enter__``; None outside the main thread
        self._saved: tuple[set[int | signal.Signals], Any] | None = None

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():
            handler = signal.signal(signal.SIGINT, self._note)
            self._saved = (signal.pthread_sigmask(signal.SIG_BLOCK, _SIGINT), handler)
        return self

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self._noted = True

    def check(self) -> None:
        """Raise KeyboardInterrupt if a Ctrl-C is pending."""
        self.sleep(0)

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``; a Ctrl-C meanwhile ends the wait with KeyboardInterrupt."""
        if self._saved is None:
            time.sleep(max(seconds, 0))
            return
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGINT)
        if self._noted or signal.sigtimedwait(_SIGINT, max(seconds, 0)) is not None:
            self.taken = True
            raise KeyboardInterrupt

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        saved, self._saved = self._saved, None
        if saved is None:
            return
        mask, handler = saved
        pending = not self.taken and (self._noted
                                      or signal.sigtimedwait(_SIGINT, 0) is not None)
        stopping = self.taken or pending
        signal.signal(signal.SIGINT, signal.SIG_IGN if stopping else handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if pending and exc_type is None:
            self.taken = True
            raise KeyboardInterrupt
