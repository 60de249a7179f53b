"""``Heap``: the public handle on a heap: create, attach, open, destroy; objects and tools.

A heap is a set of objects in /dev/shm (see names.py) that any process on the
host can attach by name.  ``Heap`` is the facade on top of the package: an
``AttachedHeap`` (attached.py: this process's segments, lock, index, arenas,
and ``grow``) with the public calls, each delegated to the module that owns
its protocol.  Nothing below imports this module:

* attached.py  -- the attachment; control.py, liveness.py, lock.py, index.py,
                  arenas.py, pages.py and summary.py beneath it
* allocator.py -- objects inside arenas; giant.py -- objects over several arenas
* walker.py    -- walking, stats, mark/sweep, scavenging
* roots.py     -- ``heap.roots``: objects found by name
* arrays.py    -- typed arrays: ``new_array`` and ``ndarray``
* objects.py   -- Python values: ``put`` and ``get``
* owners.py    -- who owns each object: ``adopt``, ``reclaim``, bytes by owner
* coord.py     -- queues, events, counters and barriers found by name
* repair.py    -- checks and repairs (fsck); ``Heap`` gives it to the lock as the
                  journal's repair, run by the next writable holder

Creation is crash-safe: the creator makes the control segment exclusively
(the one creator wins), holds an OFD lock on its first byte while it is
``INITIALISING``, and moves it to ``READY`` last.  An attacher waits for
``READY``; if the state is not ready and nobody holds the init lock, the
creator died and the attacher raises HeapCorruptError.

Each handle makes its allocator on first use (``_objects``); the parts get
the allocator, which carries the ``AttachedHeap``, never the ``Heap``.

``import shmheap`` loads what an attach and the allocator need, and no more
(a spawned worker pays for every module it imports): walker.py, owners.py,
coord.py and repair.py (with ``dataclasses`` and ``queue``, which they use)
are imported by the first call that needs them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple

from . import (
    arenas,
    arrays,
    control,
    core,
    crash,
    liveness,
    objects,
    segments,
)
from .allocator import Allocator, size_classes
from .attached import AttachedHeap, serialised, serialised_iter
from .errors import (
    HeapCorruptError,
    HeapExistsError,
    HeapInUseError,
    HeapNotFoundError,
    HeapRemovalError,
    InvalidParameterError,
    LockTimeoutError,
    ShmHeapError,
)
from .layout import DEFAULT_PAGE_SIZE, check_page_size, layout
from .lock import (
    HeapLock,
    LockedBlock,
    check_timeout,
    deadline_of,
    expired,
    open_semaphore,
    unlink_semaphore,
)
from .names import (
    PAGE_SIZE,
    check_arena_size,
    check_max_arenas,
    check_name,
    control_name,
    coord_name,
    owns,
    semaphore_name,
)
from .roots import Roots, RootTable
from .summary import Summaries

if TYPE_CHECKING:  # (imported where first used: see the docstring)
    from . import coord, owners, walker
    from .repair import Finding, HeapParts

DEFAULT_ARENA_SIZE = 64 << 20
DEFAULT_MAX_ARENAS = 1 << 20
#: Seconds an attacher waits for a creator to finish initialising.
ATTACH_TIMEOUT = 5.0


class HeapInfo(NamedTuple):
    """What ``Heap.info()`` reports."""

    name: str
    arenas: int
    index_len: int
    index_cap: int
    index_generations: int
    index_bytes: int
    arena_size: int
    max_arenas: int
    reserved_bytes: int
    hint: int
    readonly: bool
    attached: int
    lock_owner_pid: int | None
    recoveries: int
    last_recovery_ns: int
    repairs: int
    created_ns: int
    #: roots bound (``len(heap.roots)``)
    roots: int = 0

    def as_dict(self) -> dict[str, Any]:
        return self._asdict()


class Heap(AttachedHeap):
    """A process's handle on a shared heap.  Use ``create``, ``attach`` or ``open``."""

    def __init__(self, name: str, control_seg: segments.Segment, params: control.Params,
                 readonly: bool) -> None:
        super().__init__(name, control_seg, params, readonly,
                         _class_count(params.arena_size, params.page_size), self._repair_journal)
        #: what the last journal repair of this handle fixed (for ``check``)
        self._journal_findings: list[Finding] = []
        #: the roots segment, opened on first use (``_root_table``)
        self._roots: RootTable | None = None
        #: objects found by name (roots.py)
        self.roots = Roots(self, self._root_table, self._objects)

    @serialised
    def _root_table(self) -> RootTable:
        """The roots segment, opened on first use: most workers never name an object."""
        if self._roots is None:
            self._check_open()
            self._roots = self.open_part(
                "roots segment", lambda: RootTable(self.name, self.readonly, self._mutex))
        return self._roots

    def _repair_journal(self) -> None:
        """Finish or undo the mutation the journal names (HeapLock calls it, lock held)."""
        from . import repair  # (through the package: imported whole, see __init__.py)

        self._journal_findings = repair.repair_journal(self._parts())

    # -- lifecycle ----------------------------------------------------------------

    @classmethod
    def create(cls, name: str, arena_size: int = DEFAULT_ARENA_SIZE,
               max_arenas: int = DEFAULT_MAX_ARENAS, mode: int = 0o600,
               reserve: bool = True, page_size: int = DEFAULT_PAGE_SIZE) -> Heap:
        """Create heap ``name``; HeapExistsError if the name is taken.

        ``reserve`` allocates each arena's memory when it is created, so a full
        /dev/shm is an OutOfSharedMemoryError at ``grow()`` rather than SIGBUS
        at first touch; pass False for big arenas you will touch sparsely.
        ``page_size`` is the allocator's page (pages.py).
        """
        check_name(name)
        check_arena_size(arena_size)
        check_max_arenas(max_arenas, arena_size)
        check_page_size(page_size, arena_size)
        if not isinstance(mode, int) or not 0 <= mode <= 0o777:
            raise InvalidParameterError(f"mode {mode!r} is not a file mode like 0o600")
        if mode & 0o600 != 0o600:
            raise InvalidParameterError(
                f"mode {mode:#o} lacks owner read-write (0o600): the creator could not open "
                "its own heap; use 0o600, or 0o660 to share it with the group")
        try:
            # The init lock is taken right after the exclusive create, before the
            # segment is sized: an attacher or `gc` never sees it unlocked while we live.
            seg = segments.create(control_name(name), control.SIZE, mode, keep_fd=True,
                                  on_open=control.lock_init)
        except HeapExistsError:
            st = segments.lstat(control_name(name))
            problem = segments.foreign(st) if st is not None else ""
            if problem:
                raise HeapExistsError(
                    f"heap name {name!r} is taken: /dev/shm/{control_name(name)} {problem}; "
                    "choose another name, or have it removed") from None
            raise HeapExistsError(
                f"heap {name!r} already exists; attach to it, or remove it with "
                f"`shmheap destroy {name}`") from None
        assert seg.fd is not None
        params = control.Params(
            heap_id=int.from_bytes(os.urandom(8)) >> 1 | 1, arena_size=arena_size,
            max_arenas=max_arenas, first_cap=PAGE_SIZE // 4, mode=mode, reserve=reserve,
            created_ns=time.time_ns(), page_size=page_size)
        try:
            control.write_params(seg.buf, params)
            words = seg.buf.cast("Q")
            control.write_state(seg.buf, control.INITIALISING)
            crash.reach("create.control_created")
            _remove_leftovers(name)
            open_semaphore(semaphore_name(name), create=True, mode=mode).close()
            liveness.create(name, mode)
            arenas.create_map(name, max_arenas, mode)
            Summaries.create(name, max_arenas, _class_count(arena_size, page_size), mode)
            RootTable.create(name, mode)
            words[control.HEADER_OFFSET // 8] = control.make_header(0, 0)
            words[control.HINT_OFFSET // 8] = 1
            words.release()
            heap = cls(name, seg, params, readonly=False)
            heap._index.create_first()
            crash.reach("create.initialised")
            control.write_state(seg.buf, control.READY)
        except BaseException:
            _remove_own_objects(name)
            seg.close()
            raise
        liveness.unlock(seg.fd, control.INIT_LOCK_BYTE)
        os.close(seg.fd)
        seg.fd = None
        return heap

    @classmethod
    def attach(cls, name: str, readonly: bool = False,
               timeout: float | None = ATTACH_TIMEOUT) -> Heap:
        """Attach existing heap ``name``; HeapNotFoundError if there is none.

        Waits up to ``timeout`` seconds (None: for ever) for a heap that is
        still being created.
        """
        check_name(name)
        deadline = deadline_of(timeout)
        seg = _open_ready_control(name, readonly, deadline)
        try:
            params, _state = control.read_params(seg.buf, f"/dev/shm/{control_name(name)}")
        except BaseException:
            seg.close()
            raise
        return cls(name, seg, params, readonly)

    @classmethod
    def open(cls, name: str, create: bool = False, readonly: bool = False,
             timeout: float | None = ATTACH_TIMEOUT, **create_args: Any) -> Heap:
        """Attach heap ``name``; with ``create=True``, create it first if it does not exist.

        Without ``create`` a missing heap is HeapNotFoundError (a typo does not
        leave a new heap in /dev/shm), and ``create_args`` (``arena_size=``,
        ...) are an InvalidParameterError.  With it, any number of processes
        may race this on one name: exactly one creates, all end attached to
        the same heap.  ``timeout`` as for ``attach``.
        """
        check_timeout(timeout)
        if not create:
            if create_args:
                raise InvalidParameterError(
                    f"Heap.open({name!r}, {', '.join(f'{k}=...' for k in create_args)}): "
                    "creation parameters need create=True")
            return cls.attach(name, readonly=readonly, timeout=timeout)
        for _ in range(100):
            try:
                heap = cls.create(name, **create_args)
            except HeapExistsError:
                pass
            else:
                if readonly:
                    heap.close()
                    return cls.attach(name, readonly=True, timeout=timeout)
                return heap
            try:
                return cls.attach(name, readonly=readonly, timeout=timeout)
            except HeapNotFoundError:
                continue  # destroyed between our create and attach: try again
        raise HeapCorruptError(f"heap {name!r} keeps appearing and vanishing; is something "
                               "destroying it in a loop?")

    def close(self) -> None:
        """Give back this handle's spans, unmap its view and release its slot.

        The heap lives on.  Views and ndarrays keep their mappings until the
        last of them goes; everything else of the handle (its methods saved
        before, ``roots``, ``locked()``, arenas) raises HeapClosedError.
        """
        with self._mutex:  # after any other thread's call on this handle
            for bound in ("alloc", "free"):  # the native core's, if they were bound
                self.__dict__.pop(bound, None)
            try:
                if self._allocator is not None and not self.closed:
                    # (a forked child whose heap is gone has no spans of its own to give)
                    self._allocator.close(give_back=self._gone is None)
            finally:
                super().close()

    def _release_resources(self) -> None:
        table = self.__dict__.pop("_coord", None)
        if table is not None:
            table.close()  # (the class attribute None shows through again)
        roots = self.__dict__.get("roots")
        if roots is not None:
            roots.forget()
        table = self.__dict__.get("_roots")
        if table is not None:
            table.close()
        super()._release_resources()

    @serialised
    def destroy(self, force: bool = False) -> None:
        """Unlink every object of this heap, then close this handle.

        HeapInUseError, naming them, if other live processes have the heap
        attached, unless ``force``: then they keep reading what they have
        mapped, and get HeapNotFoundError ("was destroyed") from anything
        else.  New attaches get HeapNotFoundError.  ReadOnlyError on a
        read-only handle; HeapNotFoundError if this heap is gone already (a
        heap re-created under its name since is another heap, left alone).
        """
        self._check_writable("destroy() (or the module function shmheap.destroy(name))")
        self._check_identity()
        if not force:
            _refuse_if_in_use(self.name)
        self.close()
        destroy(self.name, force=True)

    def __enter__(self) -> Heap:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("readonly" if self.readonly else "attached")
        return f"<Heap {self.name!r} arena_size={self.arena_size} {state}>"

    # -- the lock -------------------------------------------------------------------

    def locked(self, timeout: float | None = None) -> LockedBlock:
        """``with heap.locked():`` holds the heap lock for the body (recovering a dead holder).

        A writable handle first repairs what a holder stopped half-way left
        (the journal).  Blocks nest per thread, and this thread's heap calls
        inside one run under its hold; other threads' calls on this handle
        wait until it closes (or until their ``timeout``: LockTimeoutError).
        """
        self._check_open()
        lock = self._lock
        assert isinstance(lock, HeapLock)
        return LockedBlock(lock, deadline_of(timeout), write=not self.readonly)

    @serialised
    def check(self, repair: bool = False, timeout: float | None = None) -> list[Finding]:
        """Check every invariant (``shmheap fsck``); with ``repair``, fix what can be fixed.

        An empty list means the heap is clean now; a finding with ``fixed``
        set was repaired.  Recoveries made before (a dead holder's lock
        adopted: ``info().recoveries``) and slots of processes that exited
        without closing are no finding.  The check runs in pieces, each
        first with no lock and under the lock only to confirm what it
        suspects (repair.py), so it never stops writers for long.
        """
        if repair:
            self._check_writable("check(repair=True)")
            self._check_identity()
        self._check_open()
        deadline = deadline_of(timeout)
        lock = self._lock
        assert isinstance(lock, HeapLock)
        from . import repair as repair_module  # (through the package: imported whole)

        self._journal_findings = []
        findings = repair_module.check_heap(self._parts(), repair, lock, deadline)
        findings[:0] = self._journal_findings
        return findings

    @serialised
    def info(self, timeout: float | None = None) -> HeapInfo:
        """Parameters, index, lock and liveness counters (the lock held to read the header)."""
        self._check_open()
        words = self._words
        generation, length, hint = self._lock.run(
            lambda: (*self._index.header(), int(words[control.HINT_OFFSET // 8])),
            deadline_of(timeout))
        assert self._live is not None
        recoveries, last_ns, repairs = self._live.counters()
        roots = len(self.roots)
        return HeapInfo(
            name=self.name, arenas=length, index_len=length,
            index_cap=self._index.capacity(generation), index_generations=generation + 1,
            index_bytes=self._index.bytes_through(generation), arena_size=self.arena_size,
            max_arenas=self.max_arenas,
            reserved_bytes=length * arenas.segment_size(self.arena_size, self.params.page_size),
            hint=hint,
            readonly=self.readonly, attached=len(self._live.attachments()),
            lock_owner_pid=self._live.owner_pid(), recoveries=recoveries,
            last_recovery_ns=last_ns, repairs=repairs, created_ns=self.params.created_ns,
            roots=roots)

    # -- objects (allocator.py) and heap walking (walker.py) ----------------------------

    _allocator: Allocator | None = None

    def _objects(self, timeout: float | None = None) -> Allocator:
        """This handle's allocator, made on first use (``timeout``: for the mutex then).

        Once made it is returned with no mutex: its own calls take it.
        """
        allocator = self._allocator
        if allocator is None or self.closed:
            allocator = self._new_objects(timeout)
        return allocator

    @serialised
    def _new_objects(self, timeout: float | None = None) -> Allocator:
        allocator = self._allocator
        if allocator is None or self.closed:
            self._check_open()
            allocator = self._allocator = Allocator(self, self.roots.names_of,
                                                    self.roots.bind_new)
            if core.native is not None:  # the native fast paths, called directly
                self.alloc = allocator.alloc  # type: ignore[method-assign]
                self.free = allocator.free  # type: ignore[method-assign]
        return allocator

    def _parts(self) -> HeapParts:
        """What repair.py checks and repairs: the allocator and the roots table."""
        from . import repair  # (through the package: imported whole)

        # (a heap none of whose processes used a queue, event, counter or barrier has no
        # coordination segment, and nothing in it to check or repair)
        coordination = None if self._coord is None and not segments.exists(
            coord_name(self.name)) else self._coordination
        return repair.HeapParts(self._objects(), self._root_table(), coordination)

    # -- coordination (coord.py) ----------------------------------------------------------

    #: the coordination segment, opened (or made) on first use
    _coord: coord.CoordTable | None = None

    @serialised
    def _coordination(self, write: bool = False) -> coord.CoordTable:
        """This handle's view of the coordination segment; ``write``: ReadOnlyError if read-only."""
        if write:
            self._check_writable("a queue, event, counter or barrier")
        table = self._coord
        if table is None:
            self._check_open()
            from . import coord

            table = self._coord = coord.CoordTable(self, self._objects())
        return table

    @serialised
    def queue(self, name: str, capacity: int | None = None) -> coord.Queue:
        """The kill-safe FIFO ``name`` of this heap, made on first use (see coord.py).

        ``put(item, timeout)``, ``get(timeout)`` (``queue.Full``/``queue.Empty``
        as the stdlib's), ``len()``, ``close()``, and ``with q.lease() as item:``
        (the item goes back to the head if the block raises or the process
        dies).  ``capacity`` bounds the queued items (None: no bound; an
        existing queue's capacity must match, or pass None).
        """
        from . import coord

        return coord.Queue(self._coordination(write=True), name, capacity)

    @serialised
    def event(self, name: str) -> coord.Event:
        """The event ``name`` of this heap (``set``, ``clear``, ``is_set``, ``wait``).

        A read-only handle may open an existing event to look at it.
        """
        from . import coord

        return coord.Event(self._coordination(), name)

    @serialised
    def counter(self, name: str) -> coord.Counter:
        """The 64-bit counter ``name`` of this heap: ``add(k=1)`` returns the new value."""
        from . import coord

        return coord.Counter(self._coordination(write=True), name)

    @serialised
    def barrier(self, name: str, parties: int) -> coord.Barrier:
        """The barrier ``name`` of ``parties`` processes, this one registered as a party; a
        party that dies breaks it (``reset()`` mends it), as ``threading.Barrier``, and one
        that leaves (``leave()``, or the end of its ``with`` block) is needed no more."""
        from . import coord

        return coord.Barrier(self._coordination(write=True), name, parties)

    @serialised
    def structures(self) -> list[coord.StructureInfo]:
        """Every queue, event, counter and barrier of this heap (read with no lock)."""
        if self._coord is None and not segments.exists(coord_name(self.name)):
            return []
        return self._coordination().structures()

    @serialised
    def put(self, obj: object, *, root: str | None = None, timeout: float | None = None) -> int:
        """Store any picklable value in one new object; returns its heap address.

        Pickled with protocol 5; numpy arrays, ``bytearray``, ``memoryview``
        and other out-of-band buffers (and a whole ``bytes`` value) are
        written once into the object, not copied into the pickle.
        ``free(ref)`` frees the value with its buffers (objects.py).  With
        ``root``, the object is bound to that root as one step (``alloc``).
        """
        allocator = self._objects()
        if root is not None:
            return self.roots.bind_new(root, lambda: objects.put(allocator, obj, timeout),
                                       timeout)
        return objects.put(allocator, obj, timeout)

    @serialised
    def get(self, ref: int, *, writable: bool = False, timeout: float | None = None) -> Any:
        """The value ``put`` stored at ``ref``, in any process.

        Its numpy arrays and memoryviews are zero-copy views of the heap,
        read-only unless ``writable``; they keep the memory mapped, and after
        ``free(ref)`` show whatever reuses it.
        """
        return objects.get(self._objects(), ref, writable, timeout)

    def alloc(self, nbytes: int, timeout: float | None = None, *,
              root: str | None = None) -> int:
        """A new zeroed object of ``nbytes`` bytes (0 or more); returns its heap address.

        The address is a plain non-zero int, valid in every attached process.
        ``timeout`` bounds the wait for the heap lock (most calls take none) and for
        another thread's hold of this handle (LockTimeoutError either way).
        With ``root``, the object is bound to that root as one step: a process
        interrupted anywhere leaves it bound or freed, one killed anywhere
        leaves it bound or its dead maker's, which ``reclaim()`` frees (an
        object bound to ``root`` before is unbound and becomes the caller's).
        """
        return self._objects(timeout).alloc(nbytes, timeout, root=root)

    def free(self, ref: int, timeout: float | None = None) -> None:
        """Free the object at heap address ``ref`` (allocated by any process).

        A ref carries no heap identity: a ref of another heap (or a stale one)
        that equals the address of a live object here frees that object, and
        a ``view()`` kept after a free shows whatever object reuses the memory.
        """
        self._objects(timeout).free(ref, timeout)

    def view(self, ref: int, timeout: float | None = None) -> memoryview:
        """A memoryview of exactly the object's ``nbytes(ref)`` bytes (read-only if readonly).

        An object larger than an arena is one contiguous view too: its arenas
        mapped back to back, for as long as a view of them lives (giant.py).
        """
        return self._objects(timeout).view(ref, timeout)

    def size_of(self, ref: int, timeout: float | None = None) -> int:
        """Capacity of the object at ``ref``: ``alloc(n)`` rounded up to its size class or pages."""
        return self._objects(timeout).size_of(ref, timeout)

    def nbytes(self, ref: int, timeout: float | None = None) -> int:
        """Length of the object at ``ref``: the ``n`` of the ``alloc(n)`` that made it."""
        return self._objects(timeout).nbytes(ref, timeout)

    @serialised
    def new_array(self, shape: int | tuple[int, ...], dtype: Any = "float64",
                  timeout: float | None = None, *, root: str | None = None) -> int:
        """A new zeroed array object that records its ``shape`` and ``dtype`` (numpy extra).

        Any numpy dtype without Python objects, structured ones included;
        ``ndarray(ref)`` returns it in any process.  Returns its heap address.
        With ``root``, the object is bound to that root as one step (``alloc``).
        """
        allocator = self._objects()
        if root is not None:
            return self.roots.bind_new(
                root, lambda: arrays.new_array(allocator, shape, dtype, timeout), timeout)
        return arrays.new_array(allocator, shape, dtype, timeout)

    def ndarray(self, ref: int, dtype: Any = None, shape: int | tuple[int, ...] | None = None,
                timeout: float | None = None) -> Any:
        """A zero-copy numpy array over the object at ``ref`` (needs the numpy extra).

        An object made by ``new_array`` comes with its own shape and dtype
        (passing others is InvalidParameterError); any other object needs
        ``dtype`` (and is all of it, or its first ``shape`` items).
        """
        return arrays.ndarray(self.view(ref, timeout), ref, dtype, shape)

    @serialised
    def adopt(self, ref: int, timeout: float | None = None) -> None:
        """Make this process the owner of the object at ``ref`` (see ``reclaim``)."""
        from . import owners

        owners.adopt(self._objects(), ref, timeout)

    @serialised
    def reclaim(self, timeout: float | None = None) -> owners.ReclaimReport:
        """Free every object whose owner process is dead and that no root binds.

        An object is owned by the process that allocated it until a root is
        bound to it (or a queue of the heap takes it) or another process
        ``adopt``s it; one pass over the heap, no other process's help.
        Objects of live processes are never touched (owners.py).
        """
        from . import owners

        return owners.reclaim(self._objects(), timeout)

    @serialised
    def bytes_by_owner(self, timeout: float | None = None) -> dict[str, owners.OwnerBytes]:
        """Live objects and bytes per owner ("slot S epoch E", "held", "orphan"), alive or not."""
        from . import owners

        return owners.owner_bytes(self._objects(), timeout)

    def walk(self, timeout: float | None = None) -> Iterator[walker.SpanInfo]:
        """Every in-use span and its live objects, read with no lock (see walker.py)."""
        from . import walker

        deadline = deadline_of(timeout)
        return serialised_iter(self._mutex, walker.walk(self._objects(), deadline), deadline)

    @serialised
    def stats(self, timeout: float | None = None) -> walker.HeapStats:
        """Bytes in use, free, reserved and released; objects per size class."""
        from . import walker

        return walker.stats(self._objects(), deadline_of(timeout))

    @serialised
    def arena_usage(self, timeout: float | None = None) -> list[dict[str, int]]:
        """Per arena, in index order: pages in use and released, spans, objects, live bytes."""
        from . import walker

        return walker.arena_usage(self._objects(), deadline_of(timeout))

    @serialised
    def start_cycle(self, timeout: float | None = None) -> int:
        """Begin a mark/sweep cycle (clear every mark); returns the cycle number."""
        from . import walker

        return walker.start_cycle(self._objects(), deadline_of(timeout))

    @serialised
    def mark(self, ref: int, timeout: float | None = None) -> None:
        """Mark the object at ``ref`` as live for the current cycle."""
        from . import walker

        walker.mark(self._objects(), ref, deadline_of(timeout))

    @serialised
    def sweep(self, timeout: float | None = None) -> walker.SweepReport:
        """Free what the current cycle left unmarked; several processes may sweep at once."""
        from . import walker

        return walker.sweep(self._objects(), deadline_of(timeout))

    @serialised
    def scavenge(self, timeout: float | None = None) -> walker.ScavengeReport:
        """Return the memory of free pages to the OS."""
        from . import walker

        return walker.scavenge(self._objects(), deadline_of(timeout))


@functools.cache
def _class_count(arena_size: int, page_size: int) -> int:
    """How many size classes (the summaries' partial trees) a heap of these sizes has."""
    return len(size_classes(page_size, layout(arena_size, page_size).pages))


def _entries(name: str) -> list[str]:
    """The entries of /dev/shm under heap ``name``'s names, its control segment last."""
    entries = [e for e in segments.list_all() if owns(name, e)]
    return sorted(entries, key=lambda e: e == control_name(name))


def _remove_leftovers(name: str) -> None:
    """Unlink every object of ``name`` but its control segment (creator only).

    The creator holds the control segment exclusively, so anything else of
    this user under the name is left over from a heap whose destroy did not
    finish.  Anything else (another user's file, a FIFO, ...) is not ours to
    remove: ForeignObjectError, before anything is removed.
    """
    leftovers = [e for e in _entries(name) if e != control_name(name)]
    for entry in leftovers:
        segments.check_own(entry)
    for entry in leftovers:
        _unlink_entry(name, entry)


def _remove_own_objects(name: str) -> None:
    """After a failed create: remove what this user has under ``name``, as far as it can."""
    for entry in _entries(name):
        with contextlib.suppress(ShmHeapError):
            if segments.check_own(entry):
                _unlink_entry(name, entry)


def _mark_destroyed(name: str) -> None:
    """Say so in the control segment before anything is unlinked: the handles still attached
    read it where a path lookup would cost too much (a root bind; control.py)."""
    with contextlib.suppress(ShmHeapError, OSError):
        fd, _st = segments.open_fd(control_name(name), readonly=False)
        try:
            control.mark_destroyed(fd)
        finally:
            os.close(fd)


def _unlink_entry(name: str, entry: str) -> None:
    if entry.startswith("sem."):
        unlink_semaphore(semaphore_name(name))
    else:
        segments.unlink(entry)


def _open_ready_control(name: str, readonly: bool,
                        deadline: float | None) -> segments.Segment:
    """Map the control segment of ``name`` once its creator has made it READY.

    While it is not READY the creator holds an OFD lock on its first byte
    (control.creator_active); a segment that is not READY, with nobody
    holding that lock, seen twice, was left by a creator that died.
    """
    seg_name = control_name(name)
    where = f"/dev/shm/{seg_name}"
    creator_seen_gone = False
    while True:
        try:
            fd, st = segments.open_fd(seg_name, readonly)
        except HeapNotFoundError:
            raise HeapNotFoundError(
                f"no heap named {name!r}; create it with Heap.create({name!r}) or "
                f"`shmheap create {name}`") from None
        try:
            size = st.st_size
            state = control.peek_state(os.pread(fd, control.SIZE, 0), where)
            # A BROKEN heap attaches (so that fsck can repair it); every use of its
            # poisoned header then raises HeapCorruptError.
            if state in (control.READY, control.BROKEN):
                if size != control.SIZE:
                    raise HeapCorruptError(f"{where} has {size} bytes, expected "
                                           f"{control.SIZE}; destroy the heap")
                owned, fd = fd, -1  # the Segment owns (and on failure closes) it now
                return segments.Segment(seg_name, owned, size, readonly, keep_fd=False,
                                        identity=(st.st_dev, st.st_ino))
            creator_alive = control.creator_active(fd)
        finally:
            if fd >= 0:
                os.close(fd)
        if not creator_alive:
            if creator_seen_gone:
                raise HeapCorruptError(
                    f"heap {name!r} is incomplete ({where} has {size} bytes, state "
                    f"{control.STATE_NAMES[state]}): its creator died while initialising it or "
                    f"the segment was damaged; remove it with `shmheap destroy {name}`")
            creator_seen_gone = True
        if expired(deadline):
            raise LockTimeoutError(
                f"heap {name!r} is still being created (its creator holds the init lock); "
                "attach with a longer timeout, or if its creator is gone, remove it with "
                f"`shmheap destroy {name}`")
        time.sleep(0.01)


def _refuse_if_in_use(name: str) -> None:
    """HeapInUseError if live processes other than this one have heap ``name`` attached.

    Read from the liveness slots without attaching (a slot is alive while its
    holder's OFD lock is held); a damaged or missing liveness segment names
    nobody.  A process that attaches right after this look is not seen: it
    gets HeapNotFoundError ("was destroyed") from its next call that needs
    more than it has mapped.
    """
    try:
        attached = liveness.probe_attachments(name)
    except ShmHeapError:
        return
    pids = sorted({a.pid for a in attached if a.pid != os.getpid()})
    if pids:
        shown = ", ".join(map(str, pids[:10])) + (", ..." if len(pids) > 10 else "")
        raise HeapInUseError(
            f"heap {name!r} is in use by {len(pids)} live process{'es' * (len(pids) > 1)} "
            f"(pid {shown}); close it there first, or destroy it anyway with force=True "
            f"(`shmheap destroy --force {name}`): those processes then get "
            "HeapNotFoundError", pids)


def destroy(name: str, force: bool = False) -> list[str]:
    """Unlink every object of heap ``name`` (even a damaged one); return what was removed.

    HeapInUseError, naming them, if live processes other than this one have
    it attached, unless ``force``.  HeapNotFoundError if there was nothing to
    remove.  The control segment
    goes last, so nobody can create a new heap of this name while the old
    one's objects are still being removed.  What cannot be removed (a
    directory, another user's file) is skipped; after removing the rest,
    HeapRemovalError lists it.
    """
    check_name(name)
    if not force:
        _refuse_if_in_use(name)
    _mark_destroyed(name)
    removed: list[str] = []
    failed: dict[str, str] = {}
    for entry in _entries(name):
        try:
            _unlink_entry(name, entry)
        except ShmHeapError as exc:
            failed[entry] = str(exc)
        else:
            removed.append(entry)
    if failed:
        raise HeapRemovalError(
            f"heap {name!r}: removed {len(removed)} objects; could not remove: "
            + "; ".join(failed.values()), removed, list(failed))
    if not removed:
        raise HeapNotFoundError(f"no heap named {name!r} to destroy")
    return removed


