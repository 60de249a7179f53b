"""Suite-wide leak check: the test session must leave nothing new in /dev/shm.

The fixtures of ``shmheap.pytest_plugin`` check each heap they hand out; this
checks the whole session, so a heap a test made by hand, in a child process
or under a name of its own is caught too.

Other test runs and tools may be using /dev/shm at the same time, so a new
heap is blamed on this session only if

* its name came from ``unique_heap_name`` in this session (the name carries
  the session's pid, also when a worker process made it), or
* its name is not from ``unique_heap_name``, no live process other than this
  one is attached to it, and it is still there after a grace period (a
  concurrent tool may be between creating and attaching, or closing and
  destroying, its heap).

This module touches no heap; it only lists /dev/shm and reads liveness slots.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from shmheap.errors import ShmHeapError
from shmheap.liveness import probe_attachments
from shmheap.names import SHM_DIR, heap_of
from shmheap.pytest_plugin import session_of

#: Seconds an untagged new heap may take to be claimed or removed by its owner.
GRACE = 3.0


def heap_entries() -> dict[str, str]:
    """Every entry of /dev/shm that belongs to some heap, mapped to that heap's name."""
    found = {}
    for entry in os.listdir(SHM_DIR):
        name = heap_of(entry)
        if name is not None:
            found[entry] = name
    return found


def attached_elsewhere(name: str) -> bool:
    """True if a live process other than this one is attached to heap ``name``."""
    try:
        return any(a.pid != os.getpid() for a in probe_attachments(name))
    except (ShmHeapError, OSError):
        return False


def may_be_ours(name: str) -> bool:
    """False if heap ``name`` surely belongs to another test session or a live process."""
    session = session_of(name)
    if session is not None:
        return session == os.getpid()
    return not attached_elsewhere(name)


def suspects(before: set[str]) -> dict[str, str]:
    """New entries (with their heap names) that this session may have left."""
    return {entry: name for entry, name in heap_entries().items()
            if entry not in before and may_be_ours(name)}


def leaked(before: set[str]) -> list[str]:
    """The new entries this session left, after giving untagged ones their grace."""
    found = suspects(before)
    deadline = time.monotonic() + GRACE
    while time.monotonic() < deadline and any(session_of(n) is None for n in found.values()):
        time.sleep(0.1)  # waiting on processes we cannot synchronise with
        found = suspects(before)
    return sorted(found)


@pytest.fixture(scope="session", autouse=True)
def no_shm_leaks_in_session() -> Iterator[None]:
    """Fail the session if it left any new ``shmheap.*`` object in /dev/shm."""
    before = set(heap_entries())
    yield
    left = leaked(before)
    if left:
        listing = "\n".join(f"  {SHM_DIR}/{entry}" for entry in left)
        pytest.fail(f"the test session left {len(left)} object(s) in {SHM_DIR}:\n{listing}",
                    pytrace=False)
