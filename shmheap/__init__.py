"""shmheap: a shared-memory heap for processes on one Linux host.

Arenas are mmap'ed POSIX shared-memory segments; an append-only index of all
arenas lives in shared memory, so a reader in any process copies the index
header under the heap lock and then walks the arenas with no lock held.
See README.md for a tour and docs/design.md for the invariants and layouts.
"""

from .arenas import Arena
from .core import NATIVE
from .crash import CRASH_POINTS
from .errors import (
    AddressSpaceExhaustedError,
    ArenaCollisionError,
    ArenaNotFoundError,
    BoundObjectError,
    DescriptorLimitError,
    DoubleFreeError,
    HeapClosedError,
    HeapCorruptError,
    HeapExistsError,
    HeapInUseError,
    HeapNotFoundError,
    HeapRemovalError,
    HeapVersionError,
    InvalidNameError,
    InvalidParameterError,
    InvalidRefError,
    LockTimeoutError,
    MappingLimitError,
    OutOfSharedMemoryError,
    QueueClosedError,
    ReadOnlyError,
    RootNotFoundError,
    RootsFullError,
    ShmHeapError,
)
from .heap import Heap, HeapInfo, destroy
from .index import ArenaSnapshot
from .repair import Finding
from .roots import Roots

__version__ = "0.1.0"

__all__ = [
    "CRASH_POINTS",
    "NATIVE",
    "AddressSpaceExhaustedError",
    "Arena",
    "ArenaCollisionError",
    "ArenaNotFoundError",
    "ArenaSnapshot",
    "BoundObjectError",
    "DescriptorLimitError",
    "DoubleFreeError",
    "Finding",
    "Heap",
    "HeapClosedError",
    "HeapCorruptError",
    "HeapExistsError",
    "HeapInUseError",
    "HeapInfo",
    "HeapNotFoundError",
    "HeapRemovalError",
    "HeapVersionError",
    "InvalidNameError",
    "InvalidParameterError",
    "InvalidRefError",
    "LockTimeoutError",
    "MappingLimitError",
    "OutOfSharedMemoryError",
    "QueueClosedError",
    "ReadOnlyError",
    "RootNotFoundError",
    "Roots",
    "RootsFullError",
    "ShmHeapError",
    "destroy",
]
