"""Heap names, the names of the objects a heap owns, and parameter checks.

Every object a heap called NAME owns in ``/dev/shm`` is named here and nowhere
else:

=============================  ==============================================
``shmheap.NAME``               control segment (parameters, index header)
``shmheap.NAME.live``          liveness segment (owner record, process slots)
``shmheap.NAME.map``           arena map (one bit per arena index, sparse)
``shmheap.NAME.sum``           summaries over arena indices (summary.py, sparse)
``shmheap.NAME.roots``         the roots table: objects found by name (roots.py, sparse)
``shmheap.NAME.coord``         queues, events, counters, barriers by name (coord.py)
``shmheap.NAME.i<gen>``        index backing array of generation ``gen``
``shmheap.NAME.a<hex index>``  arena ``index``
``shmheap.NAME.new<hex slot>``  a new arena being built by the process in
                               liveness slot ``slot``, before it is linked
``sem.shmheap.NAME.lock``      the heap lock (a POSIX named semaphore)
=============================  ==============================================

This module owns no state.
"""

from __future__ import annotations

import mmap
import re

from .errors import InvalidNameError, InvalidParameterError

SHM_DIR = "/dev/shm"
PREFIX = "shmheap."
MAX_NAME_LEN = 48
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,48}")

PAGE_SIZE = mmap.PAGESIZE
MIN_ARENA_SIZE = 64 * 1024
#: Index entries are uint32, so an arena index must fit in 32 bits.
MAX_ARENAS_LIMIT = (1 << 32) - 1
#: Heap addresses (index * arena_size) must fit in a signed 64-bit integer.
MAX_ADDRESS = 1 << 63


def check_name(name: object) -> str:
    """Return ``name`` if it is a valid heap name, else raise InvalidNameError."""
    if not isinstance(name, str):
        raise InvalidNameError(f"heap name must be a str, not {type(name).__name__}")
    if not _NAME_RE.fullmatch(name):
        raise InvalidNameError(
            f"invalid heap name {name!r}: use 1-{MAX_NAME_LEN} characters of [A-Za-z0-9_-]"
        )
    return name


def check_arena_size(arena_size: object) -> int:
    """Return ``arena_size`` if it is a power of two >= 64 KiB and a page multiple."""
    if not isinstance(arena_size, int) or isinstance(arena_size, bool):
        raise InvalidParameterError(f"arena_size must be an int, not {type(arena_size).__name__}")
    if arena_size < MIN_ARENA_SIZE or arena_size & (arena_size - 1):
        raise InvalidParameterError(
            f"arena_size {arena_size} is not a power of two of at least 64 KiB; "
            "use e.g. 1 << 20 (1 MiB) or 64 << 20 (64 MiB)"
        )
    if arena_size % PAGE_SIZE:
        raise InvalidParameterError(
            f"arena_size {arena_size} is not a multiple of the page size {PAGE_SIZE}"
        )
    if arena_size >= MAX_ADDRESS:
        raise InvalidParameterError(f"arena_size {arena_size} is too large")
    return arena_size


def check_max_arenas(max_arenas: object, arena_size: int) -> int:
    """Return ``max_arenas`` if arena indices and heap addresses fit their types."""
    if not isinstance(max_arenas, int) or isinstance(max_arenas, bool):
        raise InvalidParameterError(f"max_arenas must be an int, not {type(max_arenas).__name__}")
    if max_arenas < 2:
        raise InvalidParameterError(
            f"max_arenas {max_arenas} leaves no usable arena (index 0 is never used); "
            "use at least 2"
        )
    if max_arenas > MAX_ARENAS_LIMIT:
        raise InvalidParameterError(
            f"max_arenas {max_arenas} does not fit the 32-bit index entry; "
            f"use at most {MAX_ARENAS_LIMIT}"
        )
    if max_arenas * arena_size > MAX_ADDRESS:
        raise InvalidParameterError(
            f"max_arenas {max_arenas} x arena_size {arena_size} exceeds the 63-bit heap "
            "address space; lower one of them"
        )
    return max_arenas


def usable_arenas(max_arenas: int) -> int:
    """How many arenas a heap of ``max_arenas`` holds: indices 1 to max_arenas - 1 (0 is null)."""
    return max_arenas - 1


def control_name(name: str) -> str:
    return f"{PREFIX}{name}"


def live_name(name: str) -> str:
    return f"{PREFIX}{name}.live"


def map_name(name: str) -> str:
    return f"{PREFIX}{name}.map"


def summary_name(name: str) -> str:
    return f"{PREFIX}{name}.sum"


def roots_name(name: str) -> str:
    return f"{PREFIX}{name}.roots"


def coord_name(name: str) -> str:
    return f"{PREFIX}{name}.coord"


def index_name(name: str, generation: int) -> str:
    return f"{PREFIX}{name}.i{generation}"


def arena_name(name: str, index: int) -> str:
    return f"{PREFIX}{name}.a{index:x}"


def temp_arena_name(name: str, slot: int) -> str:
    """Where the process in liveness slot ``slot`` builds a new arena before linking it."""
    return f"{PREFIX}{name}.new{slot:x}"


def semaphore_name(name: str) -> str:
    """The posix_ipc name of the heap lock (it appears as /dev/shm/sem.<this>)."""
    return f"/{PREFIX}{name}.lock"


def semaphore_file(name: str) -> str:
    """The file name under /dev/shm that Linux uses for the heap lock."""
    return f"sem.{PREFIX}{name}.lock"


def owns(name: str, filename: str) -> bool:
    """True if ``filename`` (an entry of /dev/shm) is an object of heap ``name``."""
    base = control_name(name)
    return (
        filename == base
        or filename.startswith(base + ".")
        or filename == semaphore_file(name)
    )


def heap_of(filename: str) -> str | None:
    """The heap name that ``filename`` (an entry of /dev/shm) belongs to, or None."""
    if filename.startswith("sem." + PREFIX):
        filename = filename[4:]
        if not filename.endswith(".lock"):
            return None
    if not filename.startswith(PREFIX):
        return None
    name = filename[len(PREFIX):].split(".", 1)[0]
    return name if _NAME_RE.fullmatch(name) else None
