"""The errors shmheap raises.

Every error is a ``ShmHeapError``; where a builtin fits, the error also derives
from it, so ``except FileNotFoundError`` keeps working for callers that do not
know shmheap.  Every message says what was wrong and what to do about it.

This module owns no state and touches nothing shared.
"""

from __future__ import annotations


class ShmHeapError(Exception):
    """Base class of every error shmheap raises."""


class InvalidNameError(ShmHeapError, ValueError):
    """A heap name that is empty, too long, or has characters outside [A-Za-z0-9_-]."""


class InvalidParameterError(ShmHeapError, ValueError):
    """A size, count or index outside what the heap accepts."""


class HeapExistsError(ShmHeapError, FileExistsError):
    """``create`` on a name that already has a heap."""


class HeapNotFoundError(ShmHeapError, FileNotFoundError):
    """``attach``/``destroy``/``info`` on a name that has no heap."""


class HeapCorruptError(ShmHeapError):
    """Shared state that fails a check: bad magic, torn header, lengths past the end."""


class HeapVersionError(HeapCorruptError):
    """A control segment written by an incompatible layout version of shmheap."""


class HeapRemovalError(ShmHeapError):
    """``destroy`` removed what it could of a heap, but not everything.

    ``removed`` and ``remaining`` list the entries of /dev/shm it removed and
    those it could not (another user's file, a directory, ...).
    """

    def __init__(self, message: str, removed: list[str], remaining: list[str]) -> None:
        super().__init__(message)
        self.removed = removed
        self.remaining = remaining


class HeapInUseError(ShmHeapError):
    """``destroy`` of a heap that live processes have attached (``force=True`` overrides).

    ``pids`` lists those processes (this one excluded).
    """

    def __init__(self, message: str, pids: list[int]) -> None:
        super().__init__(message)
        self.pids = pids


class HeapClosedError(ShmHeapError, ValueError):
    """A call on a ``Heap`` after ``close()`` or ``destroy()``."""


class ArenaCollisionError(ShmHeapError, FileExistsError):
    """``grow(at=i)`` on an index that is already an arena or whose name is taken."""


class ArenaNotFoundError(ShmHeapError, KeyError):
    """``heap.arena(i)`` for an index that has no arena."""

    # KeyError would print the message quoted, as a key
    __str__ = Exception.__str__


class AddressSpaceExhaustedError(ShmHeapError, MemoryError):
    """Every arena index in ``[1, max_arenas)`` is taken."""


class OutOfSharedMemoryError(ShmHeapError, MemoryError):
    """``/dev/shm`` has no room for a new segment (tmpfs full or over its size limit)."""


class MappingLimitError(ShmHeapError, OSError):
    """The kernel refused another mapping (``vm.max_map_count``), or every mapping this
    process may keep is pinned by a live view."""


class DescriptorLimitError(ShmHeapError, OSError):
    """This process has no file descriptor left (``RLIMIT_NOFILE``)."""


class ReadOnlyError(ShmHeapError, PermissionError):
    """A mutating call on a heap attached with ``readonly=True``."""


class QueueClosedError(ShmHeapError, ValueError):
    """``put`` on a heap queue that was closed (``Queue.close()``)."""


class LockTimeoutError(ShmHeapError, TimeoutError):
    """The heap lock was not acquired within the caller's timeout (its holder is alive)."""


class InvalidRefError(ShmHeapError, ValueError):
    """A heap address that does not name the start of a live object of this heap."""


class DoubleFreeError(InvalidRefError):
    """``free`` of an object that is already free."""


class RootNotFoundError(ShmHeapError, KeyError):
    """``heap.roots[name]`` (or its deletion) for a name that no root is bound under."""

    __str__ = Exception.__str__


class BoundObjectError(ShmHeapError):
    """``free`` of an object that a root is bound to: unbind it first."""


class RootsFullError(ShmHeapError, MemoryError):
    """The roots table of a heap cannot take another root (or one more name's bytes)."""
