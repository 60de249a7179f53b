"""Finding heaps in /dev/shm and collecting abandoned ones (``shmheap ls``, ``shmheap gc``).

``survey()`` groups every ``shmheap.*`` segment in /dev/shm (the shared-memory
segments and the ``sem.shmheap.NAME.lock`` semaphores' files) by heap name and says what shape each
group is in:

================  ============================================================
``ready``         a valid heap
``initialising``  its creator is alive and holds the init lock (or has just
                  made it and not yet locked it): never garbage, however
                  long it takes
``broken``        marked broken by a repair that failed
``corrupt``       ``Heap.attach`` would raise HeapCorruptError/HeapVersionError:
                  an unreadable control segment, another layout version, a
                  creator that died while initialising, or a missing part
``no-control``    segments left without a control segment (a destroy that did
                  not finish, a crash while creating)
``inaccessible``  this user may not read it; left alone
================  ============================================================

A group is judged without attaching it: the control segment is read through a
read-only mapping (the index header is one aligned word, read with one load),
the creator's init lock is tested with ``F_OFD_GETLK``, and the other parts
that ``Heap.attach`` needs are looked up by name.  Attaching would claim a
process slot in every heap on the host (``info().attached`` would count the
tool) and could take the lock of a heap in use.

``collect()`` removes, with ``shmheap.destroy(name)``, every group that is
broken, corrupt or without a control segment and that no live process has
attached; with ``stale=True`` also every ready heap that no live process has
attached.  Each candidate is judged again ``GRACE`` seconds later, right
before it is removed, so a creator between its first two system calls (before
it can hold the init lock) or a process that has just attached keeps its heap.

This module only reads heap segments; the one change it makes is removing whole
heaps by name.
"""

from __future__ import annotations

import mmap
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from .. import arenas, control, coord, liveness, roots, segments
from ..errors import (
    HeapCorruptError,
    HeapInUseError,
    HeapNotFoundError,
    HeapRemovalError,
    ShmHeapError,
)
from ..heap import destroy
from ..names import (
    check_name,
    control_name,
    heap_of,
    index_name,
    live_name,
    map_name,
    roots_name,
    semaphore_file,
)

#: Seconds between the two looks ``collect`` takes at a heap before removing it.
GRACE = 0.1
#: States whose group is garbage once no live process has it attached.
INVALID_STATES = frozenset({"broken", "corrupt", "no-control"})


@dataclass(frozen=True)
class HeapStatus:
    """One heap name found in /dev/shm, and what shape it is in."""

    name: str
    state: str
    #: why the state is not ``ready``; "" if it is
    problem: str = ""
    #: the group's entries of /dev/shm
    entries: tuple[str, ...] = ()
    #: bytes of memory those entries take in /dev/shm now (their allocated blocks)
    shm_bytes: int = 0
    #: pids of the live processes attached to the heap
    pids: tuple[int, ...] = ()
    #: read from the control segment when it is valid, else None
    arenas: int | None = None
    arena_size: int | None = None
    max_arenas: int | None = None
    #: whether arenas are reserved (fallocated) when grown, else sparse
    reserve: bool | None = None
    #: the size of the arenas' segments (memory only if ``reserve``; see ``shm_bytes``)
    reserved_bytes: int | None = None
    index_generations: int | None = None
    created_ns: int | None = None
    #: queues, events, counters and barriers (coord.py), None if unreadable
    structures: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "problem": self.problem,
                "segments": len(self.entries), "shm_bytes": self.shm_bytes,
                "pids": list(self.pids), "arenas": self.arenas, "arena_size": self.arena_size,
                "max_arenas": self.max_arenas, "reserve": self.reserve,
                "reserved_bytes": self.reserved_bytes,
                "index_generations": self.index_generations, "created_ns": self.created_ns,
                "structures": self.structures}


@dataclass(frozen=True)
class Collected:
    """A heap that ``collect`` removed (or, in a dry run, would remove)."""

    name: str
    state: str
    reason: str
    removed: list[str] = field(default_factory=list)
    shm_bytes: int = 0
    #: entries it could not remove (a directory, another user's file)
    left: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "reason": self.reason,
                "removed": self.removed, "shm_bytes": self.shm_bytes, "left": self.left}


def groups(names: Iterable[str] = ()) -> dict[str, list[str]]:
    """Heap name -> its entries of /dev/shm, for every heap (or only those in ``names``)."""
    wanted = set(names)
    found: dict[str, list[str]] = {}
    for entry in segments.list_all():
        name = heap_of(entry)
        if name is not None and (not wanted or name in wanted):
            found.setdefault(name, []).append(entry)
    return found


def shm_bytes(name: str) -> int:
    """Bytes of memory every segment of heap ``name`` takes in /dev/shm now."""
    return _used_bytes(groups([name]).get(name, []))


def _used_bytes(entries: Iterable[str]) -> int:
    return sum(segments.allocated_bytes(entry) for entry in entries)


def survey(names: Iterable[str] = ()) -> list[HeapStatus]:
    """The status of every heap in /dev/shm (or of those in ``names``), sorted by name."""
    return [status_of(name, entries) for name, entries in sorted(groups(names).items())]


def status_of(name: str, entries: list[str]) -> HeapStatus:
    """Judge heap ``name``, whose segments in /dev/shm are ``entries``."""
    pids: tuple[int, ...] = ()
    if segments.exists(live_name(name)):
        try:
            pids = tuple(sorted({a.pid for a in liveness.probe_attachments(name)}))
        except ShmHeapError:
            pids = ()
    return replace(_judge(name), entries=tuple(entries), pids=pids,
                   shm_bytes=_used_bytes(entries), structures=coord.count_in(name))


def _judge(name: str) -> HeapStatus:
    """State, problem and (when readable) the parameters of heap ``name``."""
    path = segments.path_of(control_name(name))
    try:
        fd, st = segments.open_fd(control_name(name), readonly=True)
    except HeapNotFoundError:
        return HeapStatus(name, "no-control", "no control segment")
    except segments.ForeignObjectError as exc:
        # another user's heap is theirs to judge; a FIFO, directory or link is no heap
        found = segments.lstat(control_name(name))
        theirs = found is not None and stat.S_ISREG(found.st_mode)
        return HeapStatus(name, "inaccessible" if theirs else "corrupt", str(exc))
    except ShmHeapError as exc:
        return HeapStatus(name, "inaccessible", str(exc))
    try:
        state = control.peek_state(os.pread(fd, 16, 0), path)
        if state not in (control.READY, control.BROKEN):
            if control.creator_active(fd):
                return HeapStatus(name, "initialising", "its creator is still creating it")
            return HeapStatus(name, "corrupt", f"its creator died while creating it ({path} "
                              f"has {st.st_size} bytes, state {control.STATE_NAMES[state]})")
        if st.st_size < control.SIZE:
            return HeapStatus(name, "corrupt", f"{path} has {st.st_size} bytes, expected "
                              f"{control.SIZE}")
        with mmap.mmap(fd, control.SIZE, mmap.MAP_SHARED, mmap.PROT_READ) as mapping:
            view = memoryview(mapping)
            try:
                params, state = control.read_params(view, path)
                header = view[control.HEADER_OFFSET:control.HEADER_OFFSET + 8].cast("Q")
                generation, length = control.split_header(header[0])
                header.release()
            finally:
                view.release()
    except HeapCorruptError as exc:
        return HeapStatus(name, "corrupt", str(exc))
    finally:
        os.close(fd)
    if state == control.BROKEN:
        return HeapStatus(name, "broken", "marked broken by a repair that failed")
    missing = _missing_part(name, params.max_arenas, generation)
    if missing:
        return HeapStatus(name, "corrupt", f"/dev/shm/{missing} is missing or too short")
    return HeapStatus(name, "ready", arenas=length, arena_size=params.arena_size,
                      max_arenas=params.max_arenas, reserve=params.reserve,
                      reserved_bytes=length * arenas.segment_size(params.arena_size),
                      index_generations=generation + 1, created_ns=params.created_ns)


def _missing_part(name: str, max_arenas: int, generation: int) -> str:
    """The first segment a ready heap needs that is absent or too short, else ""."""
    needs = ((live_name(name), liveness.SIZE), (map_name(name), arenas.map_bytes(max_arenas)),
             (index_name(name, generation), 1), (semaphore_file(name), 1),
             (roots_name(name), roots.MIN_SIZE))
    for entry, least in needs:
        if (segments.size_of(entry) or 0) < least:
            return entry
    return ""


def is_garbage(status: HeapStatus, stale: bool) -> str:
    """Why ``status`` is garbage, or "" if it must be kept."""
    if status.pids:
        return ""
    if status.state in INVALID_STATES:
        return f"{status.state}: {status.problem}"
    if stale and status.state == "ready":
        return "stale: no live process has it attached"
    return ""


def collect(dry_run: bool = False, stale: bool = False,
            names: Iterable[str] = ()) -> list[Collected]:
    """Remove every garbage heap (or only those among ``names``); return what went."""
    names = [check_name(name) for name in names]
    candidates = [s.name for s in survey(names) if is_garbage(s, stale)]
    if not candidates:
        return []
    time.sleep(GRACE)
    collected = []
    for status in survey(candidates):
        reason = is_garbage(status, stale)
        if not reason:
            continue  # it changed since the first look: a creator or an attacher is at work
        removed, left = list(status.entries), []
        if not dry_run:
            try:
                removed = destroy(status.name)
            except HeapNotFoundError:
                continue  # someone else removed it meanwhile
            except HeapInUseError:
                continue  # a process has attached it since it was judged: not garbage
            except HeapRemovalError as exc:
                removed, left = exc.removed, exc.remaining
        collected.append(Collected(status.name, status.state, reason, removed,
                                   status.shm_bytes, left))
    return collected
