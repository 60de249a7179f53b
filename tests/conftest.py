"""Suite-wide leak check: the test session must leave nothing new in /dev/shm.

The fixtures of ``shmheap.pytest_plugin`` check each heap they hand out; this
checks the whole session, so a heap a test made by hand, in a child process
or under a name of its own is caught too.

Other test runs and tools may be using /dev/shm at the same time.  A new heap
is not blamed on this session if it belongs to another live process: its name
came from ``unique_heap_name`` in a live process other than this one, or
(for other names) a live process other than this one is attached to it.

This module touches no heap; it only lists /dev/shm and reads liveness slots.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from shmheap.errors import ShmHeapError
from shmheap.liveness import probe_attachments
from shmheap.names import SHM_DIR, heap_of
from shmheap.pytest_plugin import creator_pid


def heap_entries() -> dict[str, str]:
    """Every entry of /dev/shm that belongs to some heap, mapped to that heap's name."""
    found = {}
    for entry in os.listdir(SHM_DIR):
        name = heap_of(entry)
        if name is not None:
            found[entry] = name
    return found


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def used_by_another_process(name: str) -> bool:
    """True if heap ``name`` belongs to a live process other than this test session."""
    me = os.getpid()
    pid = creator_pid(name)
    if pid is not None:
        return pid != me and pid_alive(pid)
    try:
        return any(attachment.pid != me for attachment in probe_attachments(name))
    except (ShmHeapError, OSError):
        return False


@pytest.fixture(scope="session", autouse=True)
def no_shm_leaks_in_session() -> Iterator[None]:
    """Fail the session if it left any new ``shmheap.*`` object in /dev/shm."""
    before = set(heap_entries())
    yield
    leaked = sorted(entry for entry, name in heap_entries().items()
                    if entry not in before and not used_by_another_process(name))
    if leaked:
        listing = "\n".join(f"  {SHM_DIR}/{entry}" for entry in leaked)
        pytest.fail(f"the test session left {len(leaked)} object(s) in {SHM_DIR}:\n{listing}",
                    pytrace=False)
