"""Finding heaps in /dev/shm and collecting abandoned ones (``shmheap ls``, ``shmheap gc``).

``survey()`` groups every ``shmheap.*`` object in /dev/shm (segments and the
``sem.shmheap.NAME.lock`` semaphores) by heap name and says what each group
is:

==============  ==============================================================
``ready``       a valid heap (``Heap.attach`` works)
``initialising`` its creator is alive and still holds the init lock: never
                garbage, however long it takes
``broken``      marked broken by a repair that failed
``corrupt``     its control segment is unreadable, of another layout version,
                or its creator died while initialising it, or parts are missing
``no-control``  objects left without a control segment (a destroy that did not
                finish, or a crash while creating)
``inaccessible`` this user may not open it; left alone
==============  ==============================================================

``collect()`` removes, with ``shmheap.destroy(name)``, every group that is
broken, corrupt or without a control segment and that no live process has
attached; with ``stale=True`` also every ready heap that no live process has
attached.  Each group is looked at again right before it is removed, so a
heap that a creator has just started (or a process has just attached) in the
meantime is kept.  A creator that starts a heap of the very same name in the
microseconds between that second look and the removal can still lose it:
nothing but the name is shared, so nothing can rule that out.

This module reads the heap's objects and attaches heaps read-only to judge
them; the only thing it ever changes is removing whole heaps by name.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

from . import control, liveness, segments
from .errors import HeapCorruptError, HeapNotFoundError, LockTimeoutError, ShmHeapError
from .heap import _INIT_LOCK_BYTE as INIT_LOCK_BYTE
from .heap import Heap, HeapInfo, destroy
from .names import control_name, heap_of

#: Seconds ``survey`` waits for a heap that is being created before judging it.
ATTACH_WAIT = 1.0
#: Seconds ``survey`` waits for a heap's lock to read its info.
LOCK_WAIT = 2.0
#: States whose group is garbage once no live process has it attached.
INVALID_STATES = frozenset({"broken", "corrupt", "no-control"})


@dataclass(frozen=True)
class HeapStatus:
    """One heap name found in /dev/shm, and what shape it is in."""

    name: str
    state: str
    #: why the state is not ``ready`` (or why info is missing); "" if nothing to say
    problem: str
    #: the group's entries of /dev/shm
    entries: tuple[str, ...]
    #: bytes those entries occupy in /dev/shm now
    shm_bytes: int
    #: pids of live processes attached to the heap
    pids: tuple[int, ...] = ()
    info: HeapInfo | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "problem": self.problem,
                "objects": len(self.entries), "shm_bytes": self.shm_bytes,
                "pids": list(self.pids),
                "info": self.info.as_dict() if self.info is not None else None}


@dataclass(frozen=True)
class Collected:
    """A heap that ``collect`` removed (or, in a dry run, would remove)."""

    name: str
    state: str
    reason: str
    removed: list[str] = field(default_factory=list)
    shm_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "reason": self.reason,
                "removed": self.removed, "shm_bytes": self.shm_bytes}


def groups() -> dict[str, list[str]]:
    """Every heap name with an object in /dev/shm, mapped to its entries."""
    found: dict[str, list[str]] = {}
    for entry in segments.list_all():
        name = heap_of(entry)
        if name is not None:
            found.setdefault(name, []).append(entry)
    return found


def survey(with_info: bool = False) -> list[HeapStatus]:
    """The status of every heap in /dev/shm, sorted by name."""
    return [status_of(name, entries, with_info) for name, entries in sorted(groups().items())]


def status_of(name: str, entries: list[str], with_info: bool = False) -> HeapStatus:
    """Judge heap ``name`` (whose objects are ``entries``); ``with_info`` reads HeapInfo."""
    state, problem, info = _judge(name, with_info)
    return HeapStatus(name=name, state=state, problem=problem, entries=tuple(entries),
                      shm_bytes=sum(segments.allocated_bytes(e) for e in entries),
                      pids=_live_pids(name), info=info)


def _judge(name: str, with_info: bool) -> tuple[str, str, HeapInfo | None]:
    if not segments.exists(control_name(name)):
        return "no-control", "no control segment", None
    try:
        heap = Heap.attach(name, readonly=True, timeout=ATTACH_WAIT)
    except segments.SegmentPermissionError as exc:
        return "inaccessible", str(exc), None
    except (HeapCorruptError, HeapNotFoundError) as exc:
        return _judge_unattachable(name), str(exc), None
    except ShmHeapError as exc:
        return "inaccessible", str(exc), None
    with heap:
        if not with_info:
            return "ready", "", None
        try:
            return "ready", "", heap.info(timeout=LOCK_WAIT)
        except LockTimeoutError as exc:
            return "ready", str(exc), None


def _judge_unattachable(name: str) -> str:
    """The state of a heap whose attach failed."""
    try:
        fd = os.open(segments.path_of(control_name(name)), os.O_RDONLY | os.O_CLOEXEC
                     | os.O_NOFOLLOW)
    except FileNotFoundError:
        return "no-control"
    except OSError:
        return "inaccessible"
    try:
        if liveness.is_locked(fd, INIT_LOCK_BYTE):
            return "initialising"  # the creator holds the init lock: it is alive
        state = os.pread(fd, 4, control.STATE_OFFSET)
    finally:
        os.close(fd)
    return "broken" if int.from_bytes(state, "little") == control.BROKEN else "corrupt"


def _live_pids(name: str) -> tuple[int, ...]:
    with contextlib.suppress(ShmHeapError):
        return tuple(sorted({a.pid for a in liveness.probe_attachments(name)}))
    return ()


def is_garbage(status: HeapStatus, stale: bool) -> str:
    """Why ``status`` is garbage, or "" if it must be kept."""
    if status.pids:
        return ""
    if status.state in INVALID_STATES:
        return f"{status.state}: {status.problem}"
    if stale and status.state == "ready":
        return "stale: no live process has it attached"
    return ""


def collect(dry_run: bool = False, stale: bool = False) -> list[Collected]:
    """Remove every garbage heap (see the module docstring); return what went."""
    collected = []
    for name, entries in sorted(groups().items()):
        if not is_garbage(status_of(name, entries), stale):
            continue
        status = status_of(name, [e for e in segments.list_all() if heap_of(e) == name])
        reason = is_garbage(status, stale)
        if not reason:
            continue  # it changed since we looked: a creator or an attacher is at work
        removed = list(status.entries)
        if not dry_run:
            try:
                removed = destroy(name)
            except HeapNotFoundError:
                continue  # someone else removed it meanwhile
        collected.append(Collected(name, status.state, reason, removed, status.shm_bytes))
    return collected
