"""shmheap: a shared-memory heap for processes on one Linux host.

Arenas are mmap'ed POSIX shared-memory segments; an append-only index of all
arenas lives in shared memory, so a reader in any process copies the index
header under the heap lock and then walks the arenas with no lock held.
See README.md for a tour and docs/design.md for the invariants and layouts.

``Finding`` and the modules ``coord``, ``owners``, ``repair`` and ``walker``
are imported on first use (``__getattr__``): a spawned worker that only
attaches and allocates does not pay for them (heap.py).
"""

from typing import TYPE_CHECKING

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
from .roots import Roots

if TYPE_CHECKING:
    from .repair import Finding

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


#: modules of the package imported on first use, as an attribute of the package.  Every
#: first use goes through ``__getattr__`` (``from . import repair`` inside a function does,
#: ``from .repair import x`` would not), so each is imported whole: a Ctrl-C that lands inside
#: the import is raised when the import is done (lazy.py).  The first use may be a journal
#: repair with the heap lock held, and an interrupted class body is not even reported as the
#: interrupt: Python 3.11 wraps it in ``RuntimeError: Error calling __set_name__``.
_LATER = ("coord", "owners", "repair", "walker")


def __getattr__(name: str) -> object:
    """``Finding`` and the modules of ``_LATER``, imported now (first use) and whole."""
    from .lazy import import_whole

    if name == "Finding":
        return import_whole(__name__ + ".repair").Finding
    if name in _LATER:
        return import_whole(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
