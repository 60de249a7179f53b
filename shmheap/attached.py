"""``AttachedHeap``: one process's attachment of a heap, and how the heap grows.

A heap is a set of objects in /dev/shm (see names.py) that any process on the
host can attach by name.  An ``AttachedHeap`` holds this process's part of
each: the control segment (control.py), its liveness slot (liveness.py), the
lock (lock.py), the index (index.py), the arena map and the arenas it has
mapped (arenas.py, bounded), the summaries (summary.py).  It grows the heap
by one arena and takes snapshots of the index.  It is everything the parts
of the heap (allocator.py, giant.py, walker.py, roots.py, repair.py) need of
a heap, and they get only this; ``Heap`` (heap.py) is an ``AttachedHeap``
with the public calls on top, and the only module that knows them all.

``grow``: build and reserve the arena under this process's temporary name
(no lock: only the holder of our liveness slot uses that name; the slot's
``building`` byte says so, so the arena of a grower that dies is removed by
the next ``grow`` or attach); then, under the heap lock and in this order
(invariant 4): journal ``GROW(i)`` -> move it to its final name (a taken
name is a collision: clear the journal, try the next free index) -> append
its index (publication) -> set its map bit -> move the hint -> clear the
journal.  Stopped anywhere in between, the journal tells the next writable
lock holder what to finish or undo (repair.py, through the ``repair``
callable this handle's lock is given).

Every lock hold goes through ``HeapLock.run`` (lock.py), which releases the
lock however the body is left; every call that can wait takes ``timeout=``
(seconds, None for ever).

Threads: a handle may be used by any number of threads at once.  Its
per-process state (the span caches and pending lists of allocator.py, the
arena cache, the snapshot cache, the roots table's mapped regions, the lock's
hold) changes only under the handle's ``_mutex``, a reentrant thread lock
(``new_mutex``), which the public calls take (``serialised``), the lock
takes around every hold, and the native allocator's fast paths respect.
Two threads growing one handle take turns on its temporary arena name.  A
call's ``timeout=`` bounds its wait for another thread's hold of the mutex
too, with the one deadline that bounds its wait for the heap lock
(``serialised``; LockTimeoutError says another thread holds the handle).

Fork: every open handle is in ``_HANDLES``; in a forked child
(``os.register_at_fork``) each forgets the parent's lock hold, open
``locked()`` block and mutex, then checks that its heap is still the one it
attached (the control segment's identity, never the name alone) and claims
a fresh liveness slot in that very liveness file.  A handle whose heap was
destroyed or replaced is closed without touching the parent's slot, and its
every call raises HeapNotFoundError.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from . import arenas, control, core, crash, segments
from .errors import (
    AddressSpaceExhaustedError,
    ArenaCollisionError,
    ArenaNotFoundError,
    HeapClosedError,
    HeapCorruptError,
    HeapNotFoundError,
    InvalidParameterError,
    LockTimeoutError,
    ReadOnlyError,
    ShmHeapError,
)
from .index import ArenaIndex, ArenaSnapshot
from .layout import layout
from .liveness import Liveness
from .lock import (
    NOWAIT,
    ClosedLock,
    HeapLock,
    deadline_of,
    open_semaphore,
    take_mutex,
    time_left,
    with_mutex,
)
from .names import control_name, semaphore_name, temp_arena_name
from .pages import ArenaPages
from .summary import Summaries

_T = TypeVar("_T")
_P = ParamSpec("_P")


class _Guarded(Protocol):
    """Something whose state its handle's mutex guards: the handle, its ``heap.roots``."""

    _mutex: Any


_H = TypeVar("_H", bound=_Guarded)


def new_mutex() -> Any:
    """A handle's thread lock: reentrant, with ``threading.RLock``'s methods.

    The native core's ``Mutex`` where it runs (its fast paths read it without
    a Python call), else ``threading.RLock``.
    """
    return core.native.Mutex() if core.native is not None else threading.RLock()


def serialised(method: Callable[Concatenate[_H, _P], _T]) -> Callable[Concatenate[_H, _P], _T]:
    """``method`` run with the handle's mutex held (one thread of the handle at a time).

    A method with a ``timeout`` parameter (found once, here) waits for
    another thread's hold of the mutex within that timeout (LockTimeoutError,
    lock.py ``take_mutex``), and one deadline bounds the whole call: a call
    that had to wait is given the time left as its ``timeout``, from which it
    makes its own deadline for the heap lock as before (``deadline_of``).
    """
    code = method.__code__
    positional = code.co_varnames[1:code.co_argcount]  # (after self)
    if "timeout" not in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]:
        def call(self: _H, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
            with self._mutex:
                return method(self, *args, **kwargs)
        return functools.update_wrapper(call, method)
    at = positional.index("timeout") if "timeout" in positional else len(positional)
    default = _default_of(method, "timeout")

    def timed(self: _H, /, *args: Any, **kwargs: Any) -> _T:
        timeout = args[at] if at < len(args) else kwargs.get("timeout", default)
        if timeout is None:
            with self._mutex:
                return method(self, *args, **kwargs)
        mutex = self._mutex
        taken: list[object] = []
        try:
            taken[:] = filter(None, map(mutex.acquire, NOWAIT))
            if not taken:  # another thread has it: wait, and what is left is the call's
                deadline = deadline_of(timeout)
                take_mutex(mutex, taken, deadline)
                left = time_left(deadline)
                if at < len(args):
                    args = (*args[:at], left, *args[at + 1:])
                else:
                    kwargs["timeout"] = left
            return method(self, *args, **kwargs)
        finally:
            if taken:
                mutex.release()
    return functools.update_wrapper(timed, method)


def _default_of(method: Callable[..., Any], name: str) -> Any:
    """The default value of parameter ``name`` of plain function ``method`` (None if none)."""
    code = method.__code__
    values = method.__defaults__ or ()
    defaults = dict(zip(code.co_varnames[code.co_argcount - len(values):code.co_argcount],
                        values, strict=True))
    defaults.update(method.__kwdefaults__ or {})
    return defaults.get(name)


def serialised_iter(mutex: Any, items: Iterator[_T], deadline: float | None) -> Iterator[_T]:
    """``items``, each step taken with ``mutex`` held (a generator over a handle's state),
    waited for until ``deadline`` at most."""
    while True:
        item = with_mutex(mutex, deadline, next, items, _END)
        if item is _END:
            return
        yield item


_END: Any = object()
#: every open handle of this process, for the fork handler
_HANDLES: weakref.WeakSet[AttachedHeap] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for heap in list(_HANDLES):
        heap.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class AttachedHeap:
    """This process's attachment of a heap: its segments, lock, index and arenas."""

    def __init__(self, name: str, control_seg: segments.Segment, params: control.Params,
                 readonly: bool, class_count: int, repair: Callable[[], None]) -> None:
        #: the handle's thread lock (see the module docstring)
        self._mutex = new_mutex()
        #: why this handle is unusable although not closed by its user (after a fork)
        self._gone: str | None = None
        self.name = name
        self.readonly = readonly
        self.params = params
        self.arena_size = params.arena_size
        self.max_arenas = params.max_arenas
        self._control = control_seg
        self._words = control_seg.buf[:control.SIZE].cast("Q")
        self._header = control_seg.buf[control.HEADER_OFFSET:control.HEADER_OFFSET + 8].cast("Q")
        self._live: Liveness | None = None
        #: the summary segment, opened on first use (``_summaries``)
        self._summary_seg: Summaries | None = None
        self._class_count = class_count
        self.pages_per_arena = layout(params.arena_size, params.page_size).pages
        #: the arenas this process has mapped (bounded: arenas.ArenaCache)
        self._pages: arenas.ArenaCache[ArenaPages] = arenas.ArenaCache(
            self._open_pages, self._mutex)
        self._map: arenas.ArenaMap | None = None
        self._index = ArenaIndex(name, self._header, params.first_cap, params.mode, readonly,
                                 self._check_identity)
        self._lock: HeapLock | ClosedLock = ClosedLock(name)
        self._journal = control.Journal(self._words)
        #: (header word, snapshot) of this process's last snapshot
        self._last_snapshot: tuple[int, ArenaSnapshot] = (-1, ArenaSnapshot(memoryview(b""), 0))
        self._sem = None
        try:
            self._sem = self.open_part("lock semaphore", lambda: open_semaphore(
                semaphore_name(name), create=False, mode=params.mode))
            self._live = self.open_part("liveness segment", lambda: Liveness(name))
            self._map = self.open_part("arena map", lambda: arenas.ArenaMap(
                name, params.max_arenas, readonly))
        except BaseException:
            self._release_resources()
            raise
        # The slot is ours alone now: a new arena its previous holder left unlinked is dead.
        # (Something foreign under that name is grow()'s error, not attach's.)
        if self._live.left_building:
            with contextlib.suppress(ShmHeapError):
                segments.remove_own(temp_arena_name(name, self._live.slot))
        journal = control_seg.buf[control.JOURNAL_OFFSET:control.JOURNAL_OFFSET + 8].cast("Q")
        self._journal_word = journal
        self._lock = HeapLock(self._sem, self._live, name, journal, self._header, repair,
                              self._mutex)
        if self._lock.native is not None and core.native is not None:
            # The native core reads the header and builds snapshots in one C call.
            self.snapshot = core.native.Snapshots(  # type: ignore[method-assign]
                self._lock.native, self._index.reader, deadline_of)
        self._recycle_dead_slots()
        _HANDLES.add(self)

    def open_part(self, part: str, opener: Callable[[], _T]) -> _T:
        """``opener()``: open one of the heap's objects; a missing one is a damaged heap,
        unless the heap was destroyed since it was attached (then HeapNotFoundError)."""
        try:
            return opener()
        except HeapNotFoundError:
            self._check_identity()
            raise HeapCorruptError(
                f"heap {self.name!r} is damaged: its {part} is missing; remove the heap with "
                f"`shmheap destroy {self.name}`") from None

    @property
    def _summaries(self) -> Summaries:
        """The summary trees, mapped on first use: a process that only attaches, looks a
        root up or snapshots the index never maps them."""
        summaries = self._summary_seg
        if summaries is None:
            with self._mutex:  # (once, whichever thread is first)
                summaries = self._summary_seg
                if summaries is None:
                    self._check_open()
                    summaries = self._summary_seg = self.open_part(
                        "summary segment", lambda: Summaries(
                            self.name, self.max_arenas, self._class_count, self.readonly))
        return summaries

    def _open_pages(self, index: int) -> ArenaPages:
        """Map published arena ``index`` with its page views (ArenaCache calls it)."""
        self._check_open()
        try:
            arena = arenas.open_arena(self.name, self.params.heap_id, index, self.arena_size,
                                      self.readonly, self.params.page_size)
        except HeapCorruptError:
            self._check_identity()  # a heap destroyed since is no damage: HeapNotFoundError
            raise
        return ArenaPages(self.name, arena, self.params.page_size, self._summaries)

    def _recycle_dead_slots(self) -> None:
        """Recycle the slots of processes that died attached, if the lock is free now.

        Slots are recycled only by a lock holder (liveness.py).  Attaching
        repairs nothing: a dirty journal waits for the first writable call.
        """
        assert self._live is not None
        live = self._live
        if not live.dead_slots():  # one fcntl per other stamped slot: the lock only if needed
            return
        with contextlib.suppress(LockTimeoutError):
            self._lock.run(live.recycle_dead_slots, time.monotonic())

    def close(self) -> None:
        """Unmap this process's view and release its slot.  The heap lives on."""
        with self._mutex:  # after any other thread's hold of this handle
            lock = self._lock
            if isinstance(lock, ClosedLock):
                return
            _HANDLES.discard(self)
            self._lock = closed = ClosedLock(self.name, self._gone)
            self._last_snapshot = (-1, ArenaSnapshot(memoryview(b""), 0))  # (maps a generation)
            snapshots = self.__dict__.pop("snapshot", None)  # the native core's, if bound
            if snapshots is not None:
                snapshots.close()  # a saved heap.snapshot raises HeapClosedError from now on
            lock.close(closed)
            self._release_resources()

    def after_fork(self) -> None:
        """In a forked child (module docstring): keep this handle working, or close it.

        Called by the fork handler before any other code of the child runs.
        """
        lock = self._lock
        if not isinstance(lock, HeapLock) or self._live is None:
            return
        lock.after_fork()  # resets the mutex too
        why = "was destroyed (and maybe re-created as another heap)"
        if segments.identity_of(control_name(self.name)) == self._control.identity:
            try:
                self._live.after_fork()
                return
            except HeapNotFoundError:
                pass  # its liveness file is not the one we had: the heap was replaced
            except ShmHeapError as exc:  # no slot for the child, say
                why = f"could not be carried into this forked child ({exc})"
        self._gone = (f"heap {self.name!r} {why} before this process was forked from one "
                      "attached to it; attach it again")
        self._live.abandon()
        self.close()

    def _release_resources(self) -> None:
        self._pages.close()
        if self._summary_seg is not None:
            self._summary_seg.close()
        self._index.close()
        if self._map is not None:
            self._map.close()
        if self._live is not None:
            self._live.close()
        if self._sem is not None:
            with contextlib.suppress(Exception):
                self._sem.close()
        self._header.release()
        if hasattr(self, "_journal_word"):
            self._journal_word.release()
        self._words.release()
        self._control.close()

    @property
    def closed(self) -> bool:
        return isinstance(self._lock, ClosedLock)

    def _check_open(self) -> None:
        if self.closed:
            if self._gone is not None:
                raise HeapNotFoundError(self._gone)
            raise HeapClosedError(f"heap {self.name!r} is closed; attach it again to use it")

    def _check_writable(self, what: str) -> None:
        self._check_open()
        if self.readonly:
            raise ReadOnlyError(f"heap {self.name!r} is attached readonly; {what} needs a "
                                "writable attach (Heap.attach(name))")

    def _check_identity(self) -> None:
        """HeapNotFoundError if this handle's heap was destroyed (or replaced) since it attached.

        One ``lstat``: called where a mutation is about to create or change
        something beyond the memory this handle has mapped, never on the
        allocator's fast path.
        """
        if segments.identity_of(control_name(self.name)) != self._control.identity:
            raise self._destroyed()

    def _check_destroyed(self) -> None:
        """HeapNotFoundError if ``destroy`` has begun on this handle's heap: one load of the
        control segment's ``destroyed`` word, where ``_check_identity``'s path lookup costs
        too much (a root bind, a grow).  It does not see a heap whose files were removed by other
        means, nor a handle's own use after ``close`` (``_check_open``)."""
        if self._words[control.DESTROYED_OFFSET // 8]:
            raise self._destroyed()

    def _destroyed(self) -> HeapNotFoundError:
        return HeapNotFoundError(
            f"heap {self.name!r} was destroyed (and maybe re-created as another heap) since "
            "this handle attached it; close this handle and attach again")

    # -- arenas -----------------------------------------------------------------------

    @serialised
    def grow(self, at: int | None = None, timeout: float | None = None) -> arenas.Arena:
        """Create one arena and record it in the index.

        Without ``at``: at the lowest free index at or above the hint (wrapping
        to 1 past ``max_arenas``), moving the hint past it.  With ``at``: at
        exactly that index, ArenaCollisionError if it is taken.
        """
        self._check_writable("grow()")
        deadline = deadline_of(timeout)
        if at is not None and (not isinstance(at, int) or isinstance(at, bool)
                               or not 1 <= at < self.max_arenas):
            raise InvalidParameterError(
                f"grow(at={at!r}): an arena index must be an int in [1, {self.max_arenas})")
        return self.build_arena(lambda seg: self._publish_arena(seg, at), deadline,
                                "grow.segment_created")

    @serialised
    def build_arena(self, publish: Callable[[segments.Segment], int], deadline: float | None,
                    built: str) -> arenas.Arena:
        """Make a new arena and ``publish(segment)`` it under the lock; return it, mapped.

        Building (and reserving) the segment is the slow part: it is done
        before taking the lock, under this process's own temporary name, and
        crash point ``built`` is reached between the two.  ``publish`` links,
        appends and maps it (journaled) and returns its index.
        """
        live = self._live
        assert live is not None
        live.set_building(True)
        temp = temp_arena_name(self.name, live.slot)
        seg = None
        try:
            seg = arenas.build(self.name, live.slot, self.arena_size, self.params.mode,
                               self.params.reserve, self.params.page_size)
            try:
                crash.reach(built)
                index = self._lock.run(lambda: publish(seg), deadline, write=True)
            except BaseException:
                seg.close()
                raise
        finally:
            # (whether the heap is destroyed is checked under the lock, before and after the
            # link: ``before_link``, ``try_link``)
            with contextlib.suppress(ShmHeapError):
                if seg is None:  # stopped before or right after making it
                    segments.remove_own(temp)
                elif seg.name == temp:  # made, never moved to its final name (arenas.link)
                    segments.unlink(temp)
            live.set_building(False)
        return self.cache_new_arena(seg, index).arena

    def cache_new_arena(self, seg: segments.Segment, index: int) -> ArenaPages:
        """The page view of new arena ``seg``, published at ``index``, kept by this process's
        arena cache (once: ``publish`` may have called this already)."""
        pages = self._pages.recent.get(index)
        if pages is None or pages.arena.mapping is not seg.map:
            pages = ArenaPages(self.name, arenas.Arena(index, self.arena_size, seg),
                               self.params.page_size, self._summaries)
            self._pages.add(pages)
        return pages

    def _publish_arena(self, seg: segments.Segment, at: int | None) -> int:
        """Link, append and map the new arena ``seg`` (lock held); returns its index."""
        self.before_link()
        index = self._link_new_arena(seg, at)
        crash.reach("grow.segment_linked")
        self.add_arena(index)
        crash.reach("grow.map_set")
        if at is None:
            self._words[control.HINT_OFFSET // 8] = index + 1
        crash.reach("grow.hint_moved")
        self._journal.end()
        return index

    def before_link(self) -> None:
        """The checks before a new arena is linked (lock held); dead growers' arenas go."""
        assert self._live is not None
        self._index.header()  # a broken heap fails here, before anything is linked
        # nor is anything linked in a destroyed heap, whose name may be recycled (a load: the
        # path lookup of _check_identity cost a grow ~8% of its time; try_link looks again)
        self._check_destroyed()
        self._live.recycle_dead_slots(builders_only=True)

    def add_arena(self, index: int) -> None:
        """Append arena ``index``, linked under its final name, to the index and set its map
        bit (lock held, the journal naming it): it is published, all free pages."""
        assert self._map is not None
        self._index.append(index)
        self._map.add(index)
        self._summaries.free.set(index, self.pages_per_arena)

    def _link_new_arena(self, seg: segments.Segment, at: int | None) -> int:
        """Link ``seg`` at ``at`` or at the next free index; return the index.

        Leaves the journal saying ``GROW(index)``: from the link on, the arena
        exists under its final name.
        """
        assert self._map is not None
        if at is not None:
            if at in self._map or not self.try_link(seg, at):
                raise ArenaCollisionError(
                    f"heap {self.name!r}: arena index {at} is already taken; choose another "
                    "index or call grow() without at=")
            return at
        hint = self._words[control.HINT_OFFSET // 8]
        start = hint if 1 <= hint < self.max_arenas else 1
        for lo, hi in ((start, self.max_arenas), (1, start)):
            index = self._map.next_free(lo, hi)
            while index is not None:
                if self.try_link(seg, index):
                    return index
                index = self._map.next_free(index + 1, hi)
        raise AddressSpaceExhaustedError(
            f"heap {self.name!r}: all {self.max_arenas - 1} arena indices are taken; create "
            "the heap with a larger max_arenas or arena_size")

    def try_link(self, seg: segments.Segment, index: int,
                 journal: tuple[int, int, int] | None = None) -> bool:
        """Journal ``GROW(index)`` (or ``journal``: op, arena, arg) and link ``seg`` at
        ``index``; on a collision clear the journal and return False.

        The summary leaves of ``index`` get their memory first (summary.py).
        HeapNotFoundError if a ``destroy`` began before the link ended: it may
        have listed the heap's files before this one, which is removed again
        (the journal stays, naming it).
        """
        self._summaries.reserve_leaves(index)
        self._journal.begin(*(journal or (control.GROW, index, 0)))
        if arenas.link(self.name, seg, self.params.heap_id, self.arena_size, index):
            try:
                self._check_destroyed()
            except HeapNotFoundError:
                with contextlib.suppress(ShmHeapError):
                    if segments.identity_of(seg.name) == seg.identity:
                        segments.unlink(seg.name)
                raise
            return True
        self._journal.end()
        return False

    @serialised
    def arena(self, index: int) -> arenas.Arena:
        """The arena at ``index``, mapped on first use; ArenaNotFoundError (a KeyError) if none."""
        if type(index) is not int:
            raise InvalidParameterError(
                f"arena({index!r}): an arena index is an int, not {type(index).__name__}")
        pages = self._pages.recent.get(index)
        if pages is not None:
            return pages.arena
        self._check_open()
        assert self._map is not None
        if index not in self._map:
            raise ArenaNotFoundError(
                f"heap {self.name!r} has no arena {index}; its arenas are listed by "
                "heap.snapshot()")
        return self.published_arena(index)

    @serialised
    def published_arena(self, index: int) -> arenas.Arena:
        """The arena at ``index``, which a snapshot lists (so no map lookup); mapped on demand."""
        return self._pages.get(index).arena

    def __contains__(self, index: object) -> bool:
        self._check_open()
        assert self._map is not None
        return type(index) is int and index in self._map

    # -- the index ----------------------------------------------------------------------

    @serialised
    def snapshot(self, timeout: float | None = None) -> ArenaSnapshot:
        """Copy the index header under the lock; the snapshot is read with no lock.

        Snapshots are immutable, so while the header word is unchanged the
        previous snapshot object is returned again.
        """
        word = self._lock.read_word(self._header, None if timeout is None
                                    else deadline_of(timeout))
        last = self._last_snapshot
        if last[0] == word:
            return last[1]
        snap = self._index.snapshot_of(word)
        self._last_snapshot = (word, snap)
        return snap

    def arenas(self, timeout: float | None = None) -> Iterator[arenas.Arena]:
        """The arenas of a fresh snapshot, in creation order; no lock held while iterating."""
        arena = self.published_arena
        yield from map(arena, self.snapshot(timeout))
