"""Crash points: a test hook that kills or interrupts this process at a named place.

Set ``SHMHEAP_CRASH_AT=NAME`` (or ``NAME:K`` for the K-th time the process
reaches NAME) before the process imports shmheap, and the process sends itself
SIGKILL when it reaches crash point NAME.  ``SHMHEAP_RAISE_AT=NAME[:K]`` is its
twin: the process raises ``KeyboardInterrupt`` there instead, as Ctrl-C would,
and may catch it and carry on.  ``SHMHEAP_STOP_AT=NAME[:K]`` stops it there
(SIGSTOP to itself), for tests of processes that are merely slow; SIGCONT
lets it go on.  ``CRASH_POINTS`` lists every name; the
crash-safety tests run every operation once per point, both ways.

When neither variable is set, ``ARMED`` is False and the callers on hot paths
(the lock) do not even call ``reach``; elsewhere ``reach`` returns at once.

This module owns the crash-point table and the counter; it touches nothing
shared.
"""

from __future__ import annotations

import os
import signal

from .errors import InvalidParameterError

#: Every crash point, with where it sits.  A point between two shared writes
#: is named after the write that has just been made.
CRASH_POINTS: dict[str, str] = {
    "lock.acquired": "a writer has the semaphore, owner not yet recorded",
    "lock.owned": "a writer has the semaphore and has recorded itself as owner",
    "lock.releasing": "a writer cleared its owner record, semaphore not yet released",
    "snapshot.acquired": "a reader has the semaphore, owner not yet recorded",
    "snapshot.owned": "a reader has the semaphore and has recorded itself as owner",
    "snapshot.releasing": "a reader cleared its owner record, semaphore not yet released",
    "grow.segment_created": "new arena made under its temporary name, not yet linked",
    "grow.segment_linked": "arena linked under its final name, index entry not yet written",
    "index.entry_written": "index entry written past len, header not yet published",
    "index.generation_created": "new index generation created, entries not yet copied",
    "index.generation_copied": "entries copied into the new generation, header not switched",
    "index.published": "header switched to the new len (and generation)",
    "grow.map_set": "arena map bit set, hint not yet moved",
    "grow.hint_moved": "hint moved past the new arena, lock still held",
    "create.control_created": "control segment created, nothing initialised",
    "create.initialised": "every segment created, state not yet ready",
    "repair.adopted": "a waiter adopted a dead holder's lock and counted the recovery",
    "span.described": "span table, size class and owner written, pages not yet marked used",
    "span.pages_used": "a new span's pages marked used, its pageInUse bit not yet set",
    "span.published": "a new span's pageInUse bit set (published), journal not yet cleared",
    "span.unpublished": "a freed span's pageInUse bit cleared, its pages still marked used",
    "span.freed": "a freed span's pages marked free, journal not yet cleared",
    "cache.adopted": "an unowned span's owner set to the refilling process",
    "cache.released": "a cached span's owner cleared, partial hint not yet set",
    "scavenge.releasing": "free pages marked releasing, memory not yet returned",
    "scavenge.released": "free pages' memory returned and marked released",
    "sweep.claimed": "a sweeper moved the sweep cursor past its chunk, lock still held",
    "cycle.started": "cycle number, cycle arenas and sweep cursor written, lock still held",
    "summary.leaf_set": "an arena's leaf in a summary tree stored, the nodes above not yet",
    "summary.leaf_cleared": "an arena's leaf in a hint tree cleared, the nodes above not yet",
    "roots.rehashed": "the roots copied into a rebuilt table region, the table word not yet "
                      "switched to it",
    "roots.counted": "the newly bound object counts one root more, the table not yet changed",
    "roots.entry_written": "a new root's name and value written, its key not yet published",
    "roots.published": "a root's key or new value published, the counters and the object it "
                       "was bound to before not yet updated",
    "roots.handed_over": "a bind's objects handed over: the bound one held by its root, one "
                         "left unbound owned by the unbinder; journal not yet cleared",
    "roots.removed": "an unbound root's value cleared, the counters and its object's root "
                     "count not yet updated",
    "named.made": "an object made for root=NAME (allocated and filled, owned by its maker), "
                  "its bind not yet begun",
    "giant.claimed": "free arenas claimed as parts of a new giant object (owned by its "
                     "maker), lock still held",
    "giant.segment_created": "a giant object's new arena made under its temporary name, not "
                             "yet linked (between two lock holds of its maker)",
    "giant.segment_linked": "a giant object's new arena linked under its final name, not yet "
                            "in the index",
    "giant.part_grown": "a giant object's new arena published and claimed as one of its parts, "
                        "lock still held",
    "giant.tail_disowned": "every part of a giant object but the first given up by its maker; "
                           "the object is not made yet",
    "giant.made": "the first part of a giant object given up by its maker: the object exists, "
                  "journal not yet cleared",
    "giant.unpublished": "a giant object's first part freed, or owned again by the process "
                         "freeing it (the object is gone), its other parts not yet",
    "giant.taken_back": "every part of a giant object being freed owned again by the process "
                        "freeing it, journal not yet cleared",
    "giant.cleared": "the pages of a giant object being freed punched out or zeroed, its "
                     "parts not yet freed (between two lock holds of the process freeing it)",
    "giant.freed": "every part of a giant object freed, journal not yet cleared",
    "coord.created": "the coordination segment created and cleared, its stamp not yet written",
    "coord.described": "a new queue/event/counter/barrier record's name and state written, "
                       "its kind (which publishes it) not yet",
    "coord.linked": "a put's node linked after the queue's tail, tail and count not yet "
                    "updated",
    "coord.put_released": "a put's node linked, its journal cleared, the heap lock released and "
                          "the waiters woken; put() not yet returned (its cleanup must free "
                          "nothing: the item is the queue's, or a getter's already)",
    "coord.unlinked": "a get's or lease's node unlinked from the queue's head, the count (and "
                      "lease list) not yet updated",
    "coord.taken": "a get's node handed to the getter (its owner now) and the journal cleared, "
                   "the node not yet freed (no lock held)",
    "coord.unleased": "a leased node taken out of the lease list, not yet back at the queue's "
                      "head",
    "coord.acked": "a finished lease's node taken out of the lease list, journal not yet "
                   "cleared, node not yet freed",
    "coord.handed": "a get's or finished lease's node, and the object its item was stored in "
                    "with put, handed to the taker (its owner now), journal not yet cleared",
    "coord.flag_stored": "an event's flag stored, its futex word not yet bumped, nobody woken",
    "coord.arrived": "a barrier party arrived (or the round's generation moved on), the "
                     "arrival count not yet updated",
    "coord.reset": "a barrier's round ended by reset() (generation moved on, its reset bit "
                   "set), arrival count and broken flag not yet cleared",
    "coord.left": "a barrier party's leave() counted (and the round passed if the others "
                  "waited for it only), its token not yet cleared",
}

ENV_VAR = "SHMHEAP_CRASH_AT"
RAISE_ENV_VAR = "SHMHEAP_RAISE_AT"
STOP_ENV_VAR = "SHMHEAP_STOP_AT"


def _parse(var: str, spec: str) -> tuple[str, int]:
    name, _, count = spec.partition(":")
    if name not in CRASH_POINTS:
        raise InvalidParameterError(
            f"{var}={spec!r} names no crash point; choose one of {sorted(CRASH_POINTS)}"
        )
    try:
        times = int(count) if count else 1
    except ValueError:
        times = 0
    if times < 1:
        raise InvalidParameterError(f"{var}={spec!r}: the count must be an integer >= 1")
    return name, times


def _armed(var: str) -> tuple[str, int]:
    spec = os.environ.get(var, "")
    return _parse(var, spec) if spec else ("", 0)


_KILL_AT, _KILL_LEFT = _armed(ENV_VAR)
_RAISE_AT, _RAISE_LEFT = _armed(RAISE_ENV_VAR)
_STOP_AT, _STOP_LEFT = _armed(STOP_ENV_VAR)
#: True when this process was started with a crash point armed (any way).
ARMED = bool(_KILL_AT or _RAISE_AT or _STOP_AT)


def reach(point: str) -> None:
    """Die (SIGKILL), stop (SIGSTOP) or raise KeyboardInterrupt if ``point`` is armed now."""
    global _KILL_LEFT, _RAISE_LEFT, _STOP_LEFT
    if point == _STOP_AT:
        _STOP_LEFT -= 1
        if _STOP_LEFT == 0:
            os.kill(os.getpid(), signal.SIGSTOP)
    if point == _KILL_AT:
        _KILL_LEFT -= 1
        if _KILL_LEFT == 0:
            os.kill(os.getpid(), signal.SIGKILL)
    if point == _RAISE_AT:
        _RAISE_LEFT -= 1
        if _RAISE_LEFT == 0:
            raise KeyboardInterrupt(f"{RAISE_ENV_VAR}={point}")
