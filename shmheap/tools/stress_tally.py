"""The counters of ``shmheap stress``'s workers, shared with the parent as they count.

A worker counts each operation and each check in its own slot of a ``Tally``
(one aligned 8-byte store per count), so whatever a worker killed at any
instruction had counted is there for the parent: counting starts with the
first operation, not with a periodic report.  A slot holds the worker's core
and the moment its first operation began (``time.monotonic_ns``, one clock
for every process of the host), then the counters: ``ops``, ``violations``
and the names its role declares (stress_roles.py).

The tally is a memfd: it never appears in /dev/shm, so nothing of it can be
left behind, and it is gone once the last process that maps it exits.  The
parent creates it with one slot per worker that can run at once and passes
it to each worker with the process's arguments (the descriptor travels as a
``Connection`` does); the parent gives a slot to each worker it starts and,
once that worker has ended, copies the slot out and gives it to the next.

Every value is read as written by the one process that owns the slot, so a
read in the parent sees each counter whole (aligned 8-byte stores), possibly
one count behind.

This module owns the tally's layout; it knows nothing of roles but the
counter names they declare.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence
from multiprocessing import reduction
from typing import Any

#: Words of a slot: core, first operation, then the counters.
WORDS = 16
CORE, FIRST_OP = 0, 1
#: The counters every role has, before its own.
COMMON = ("ops", "violations")
FIRST_COUNTER = 2
MAX_COUNTERS = WORDS - FIRST_COUNTER
#: ``CORE`` word values (0: the worker has not started yet).
NATIVE_CORE, PURE_CORE = 1, 2
_ZERO = memoryview(bytes(WORDS * 8)).cast("Q")


class Tally:
    """``slots`` slots of ``WORDS`` unsigned 64-bit words in a shared memfd."""

    def __init__(self, fd: int, slots: int) -> None:
        self.fd = fd
        self.slots = slots
        self._map = mmap.mmap(fd, max(slots * WORDS * 8, mmap.PAGESIZE))
        self.words = memoryview(self._map).cast("Q")

    @classmethod
    def create(cls, slots: int) -> Tally:
        fd = os.memfd_create("shmheap-stress-tally", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, max(slots * WORDS * 8, mmap.PAGESIZE))
            return cls(fd, slots)
        except BaseException:
            os.close(fd)
            raise

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # as multiprocessing passes a Connection: the descriptor goes with the process
        return _rebuild, (reduction.DupFd(self.fd), self.slots)

    def slot(self, index: int) -> memoryview:
        """Slot ``index``'s words (a view into the shared memory)."""
        return self.words[index * WORDS:(index + 1) * WORDS]

    def clear(self, index: int) -> None:
        """Zero slot ``index`` for its next worker."""
        self.words[index * WORDS:(index + 1) * WORDS] = _ZERO

    def close(self) -> None:
        self.words.release()
        self._map.close()
        os.close(self.fd)


def _rebuild(fd: Any, slots: int) -> Tally:
    return Tally(fd.detach(), slots)


class Counts:
    """One worker's counters, by name, in its slot: the worker counts, the parent reads."""

    def __init__(self, words: memoryview, names: Sequence[str]) -> None:
        names = (*COMMON, *names)
        if len(names) > MAX_COUNTERS:
            raise ValueError(f"a tally slot holds {MAX_COUNTERS} counters, not {len(names)}")
        self.words = words
        self.index = {name: FIRST_COUNTER + i for i, name in enumerate(names)}

    def add(self, name: str, n: int = 1) -> None:
        self.words[self.index[name]] += n

    def __getitem__(self, name: str) -> int:
        return int(self.words[self.index[name]])

    def get(self, name: str) -> int:
        """The counter ``name``, 0 if the role has none of that name."""
        return self[name] if name in self.index else 0

    def as_dict(self) -> dict[str, int]:
        return {name: int(self.words[i]) for name, i in self.index.items()}

    def started(self, native: bool) -> None:
        """The worker has started, running the native core or the pure-Python one."""
        self.words[CORE] = NATIVE_CORE if native else PURE_CORE

    def working(self, now_ns: int) -> None:
        """The worker begins its first operation now (``time.monotonic_ns``)."""
        self.words[FIRST_OP] = now_ns

    @property
    def first_op_ns(self) -> int:
        """When the first operation began (0: not yet)."""
        return int(self.words[FIRST_OP])

    @property
    def core(self) -> str:
        """"native", "pure" or "" (not started)."""
        return {NATIVE_CORE: "native", PURE_CORE: "pure"}.get(int(self.words[CORE]), "")

    def frozen(self) -> Counts:
        """A copy that no longer changes (of a worker that has ended)."""
        return Counts(memoryview(bytearray(self.words.tobytes())).cast("Q"),
                      [n for n in self.index if n not in COMMON])
