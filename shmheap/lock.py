"""The heap lock: a POSIX named semaphore that survives the death of its holder.

Protocol (every process, readers included)::

    acquire:  sem_trywait, else timed waits of POLL seconds (see below)
              owner := my token                      (liveness.py)
    ...critical section...
    release:  owner := 0
              sem_post

A waiter whose timed wait expires looks at the owner record:

* ``owner`` names a token whose slot is unlocked, or re-stamped with another
  epoch: the holder is dead.  The waiter takes the repair lock, re-checks
  that the owner record and the semaphore are unchanged, *adopts* the lock
  (writes its own token: the semaphore's count is still 0, so it now holds
  it), runs the heap's repair, counts a recovery and carries on as holder.
* ``owner`` is 0 although the semaphore stays taken: a process died in the
  two-statement windows between ``sem_wait`` and recording itself, or
  between clearing the record and ``sem_post``.  The waiter adopts only if
  this state lasts ``UNOWNED_GRACE`` seconds without a change *and* some
  slot belongs to a dead process.  A live process in that window writes its
  record within microseconds; only one stopped (SIGSTOP) in exactly that
  window for longer than the grace period could be robbed.
* ``owner`` is alive: the waiter keeps waiting.  A slow or stopped holder is
  never robbed; a caller's ``timeout`` turns into LockTimeoutError.

This module owns the semaphore and the acquire/adopt/release protocol.  It
does not know what the lock protects: the heap passes ``repair``, run
under the adopted lock.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import time
from collections.abc import Callable

import posix_ipc

from . import crash, segments
from .errors import (
    HeapExistsError,
    HeapNotFoundError,
    LockTimeoutError,
    OutOfSharedMemoryError,
    ShmHeapError,
)
from .liveness import Liveness

#: Seconds between liveness checks while waiting: the first wait is 2 * FIRST_POLL,
#: each later one twice as long, up to POLL.
FIRST_POLL = 0.0005
POLL = 0.02
#: Seconds an unowned-but-taken semaphore must stay so before it is adopted.
UNOWNED_GRACE = 0.25
#: Bytes of a named semaphore's file in /dev/shm: glibc's sizeof(sem_t), 4 words.
SEMAPHORE_FILE_SIZE = 4 * struct.calcsize("P")


class HeapLock:
    """This process's handle on a heap's lock.  ``acquire``/``release`` are not reentrant."""

    def __init__(self, sem: posix_ipc.Semaphore, live: Liveness, repair: Callable[[], bool],
                 heap_name: str) -> None:
        self._sem = sem
        self._sem_acquire = sem.acquire
        self._sem_release = sem.release
        self._live = live
        self._bind()
        live.on_reclaim.append(self._bind)
        self._repair = repair
        self._heap_name = heap_name
        #: how many dead holders' locks this handle has adopted
        self.adoptions = 0
        if crash.ARMED:
            self.acquire = self._acquire_at_crash_points  # type: ignore[method-assign]
            self.release = self._release_at_crash_points  # type: ignore[method-assign]
            self.read_word = self._read_word_at_crash_points  # type: ignore[method-assign]

    def _bind(self) -> None:
        """Cache the owner view and our token (again after a fork re-made them)."""
        self._owner = self._live.owner
        self._token = self._live.token

    def acquire(self, timeout: float | None = None, role: str = "lock") -> None:
        """Take the lock; waits for ever (recovering dead holders) or ``timeout`` seconds."""
        try:
            self._sem_acquire(0)
        except posix_ipc.BusyError:
            self._wait(timeout)
        self._owner[0] = self._token

    def release(self, role: str = "lock") -> None:
        self._owner[0] = 0
        self._sem_release()

    def read_word(self, view: memoryview, timeout: float | None = None) -> int:
        """``view[0]`` read under the lock: a reader's whole critical section."""
        try:
            self._sem_acquire(0)
        except posix_ipc.BusyError:
            self._wait(timeout)
        owner = self._owner
        owner[0] = self._token
        word: int = view[0]
        owner[0] = 0
        self._sem_release()
        return word

    def _read_word_at_crash_points(self, view: memoryview, timeout: float | None = None) -> int:
        self.acquire(timeout, "snapshot")
        word: int = view[0]
        self.release("snapshot")
        return word

    def _acquire_at_crash_points(self, timeout: float | None = None, role: str = "lock") -> None:
        try:
            self._sem_acquire(0)
        except posix_ipc.BusyError:
            self._wait(timeout)
        crash.reach(f"{role}.acquired")
        self._owner[0] = self._token
        crash.reach(f"{role}.owned")

    def _release_at_crash_points(self, role: str = "lock") -> None:
        self._owner[0] = 0
        crash.reach(f"{role}.releasing")
        self._sem_release()

    def _wait(self, timeout: float | None) -> None:
        """Slow path: wait in growing slices, adopting the lock of a dead holder."""
        deadline = None if timeout is None else time.monotonic() + timeout
        unowned_since: float | None = None
        slice_ = FIRST_POLL
        while True:
            slice_ = wait = min(slice_ * 2, POLL)
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    raise LockTimeoutError(self._timeout_message(timeout))
            try:
                self._sem_acquire(wait)
                return
            except posix_ipc.BusyError:
                pass
            owner = self._owner[0]
            if owner:
                unowned_since = None
                if not self._live.token_alive(owner) and self._adopt(owner, deadline):
                    return
            else:
                now = time.monotonic()
                if unowned_since is None:
                    unowned_since = now
                elif now - unowned_since >= UNOWNED_GRACE and self._adopt(0, deadline):
                    return

    def _adopt(self, dead_owner: int, deadline: float | None) -> bool:
        """Under the repair lock, take over a dead holder's lock if nothing changed."""
        with self._live.repair_lock(deadline):
            if self._owner[0] != dead_owner or self.semaphore_value() != 0:
                return False
            if dead_owner and self._live.token_alive(dead_owner):
                return False
            if not dead_owner and not self._live.dead_slots():
                return False
            self._owner[0] = self._token
            crash.reach("repair.adopted")
            self._live.clean_dead_slots()
            try:
                repaired = self._repair()
            except BaseException:
                self.release()
                raise
            self._live.count_recovery(repaired)
            self.adoptions += 1
        return True

    def semaphore_value(self) -> int:
        return int(self._sem.value)

    def _timeout_message(self, timeout: float | None) -> str:
        pid = self._live.owner_pid()
        holder = f"process {pid}" if pid else "a process that has not recorded itself yet"
        return (f"heap {self._heap_name!r}: lock not acquired within {timeout} s; it is held by "
                f"{holder}, which is alive (stopped or slow); wait longer or investigate it")

    def close(self) -> None:
        with contextlib.suppress(posix_ipc.ExistentialError):
            self._sem.close()


def open_semaphore(name: str, create: bool, mode: int) -> posix_ipc.Semaphore:
    """Open (or exclusively create, with count 1) the named semaphore ``name``.

    sem_open maps the semaphore's file, so before opening an existing one its
    file is checked like a segment (segments.open_fd): a FIFO there would
    hang us, a short file would kill us with SIGBUS, another user's file is
    not our lock.
    """
    file = f"sem.{name.lstrip('/')}"
    where = segments.path_of(file)
    try:
        if create:
            sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode, 1)
            # sem_open narrows the mode by the umask; the segments get exactly ``mode``
            os.chmod(where, mode)
            return sem
        os.close(segments.open_fd(file, readonly=True, expect_size=SEMAPHORE_FILE_SIZE)[0])
        return posix_ipc.Semaphore(name)
    except ShmHeapError:
        raise  # from the file's check, already typed (some are OSErrors too)
    except posix_ipc.ExistentialError as exc:
        cls = HeapExistsError if create else HeapNotFoundError
        raise cls(f"heap lock semaphore {where}: {exc}") from None
    except posix_ipc.PermissionsError as exc:
        raise segments.SegmentPermissionError(
            f"heap lock semaphore {where}: permission denied ({exc}); it belongs to another "
            "user or its mode forbids this access") from None
    except OSError as exc:
        raise _semaphore_error(where, exc) from None


def _semaphore_error(where: str, exc: OSError) -> ShmHeapError:
    if exc.errno in (errno.ENOSPC, errno.ENOMEM):
        return OutOfSharedMemoryError(
            f"no room in /dev/shm for the heap lock semaphore {where}: free space there "
            "(df -h /dev/shm; `shmheap gc` removes abandoned heaps)")
    return ShmHeapError(f"heap lock semaphore {where}: {exc.strerror} (errno {exc.errno})")


def unlink_semaphore(name: str) -> bool:
    where = segments.path_of(f"sem.{name.lstrip('/')}")
    try:
        posix_ipc.unlink_semaphore(name)
    except posix_ipc.ExistentialError:
        return False
    except posix_ipc.PermissionsError:
        raise segments.SegmentPermissionError(
            f"permission denied on {where}: it belongs to another user") from None
    except OSError as exc:
        raise _semaphore_error(where, exc) from None
    return True
