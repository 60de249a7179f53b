"""The liveness segment ``shmheap.NAME.live``: who is attached, who owns the lock.

A POSIX semaphore has no owner, so if its holder dies it stays taken forever.
This segment is what lets a waiter tell a dead holder from a slow one.

Process slots
    Every attached ``Heap`` object claims one slot and holds an ``fcntl`` OFD
    write lock on that slot's first byte for as long as it is attached.  The
    kernel drops the lock when the open file description goes away, which
    happens when the process dies, however it dies.  So "slot s is alive" is
    "the byte of slot s is locked", a question the kernel answers exactly; a
    pid would not do (pids are reused, and differ between PID namespaces).
    Each claim bumps the slot's ``epoch``, so a token minted by a dead claimant
    never matches a later claimant of the same slot.

Owner record and lock sequence
    The heap-lock holder writes its token ``(slot + 1) << 32 | epoch`` into
    ``owner`` right after it takes the semaphore, then bumps ``lock_seq``;
    it writes 0 into ``owner`` right before it releases the semaphore.  Only
    the holder writes them (and a waiter that adopts a dead holder's lock,
    under the repair lock).  ``lock_seq`` lets a waiter see that nobody has
    taken the lock for a while (lock.py).

Repair lock
    An OFD lock on byte ``REPAIR_BYTE``: one waiter at a time may decide that
    the holder is dead and adopt the lock.  Being an OFD lock, it too is
    released by the kernel if the repairer dies.

Dead slots are garbage, recycled silently
    A slot stamped by a process that died without closing (its byte is no
    longer locked) is cleaned by ``recycle_dead_slots``: pid zeroed, the
    epoch kept (so its tokens stay dead), and the arena it may have been
    building under ``shmheap.NAME.new<slot>`` unlinked.  The cleaner holds
    the dead slot's own lock byte while it cleans, so an attacher cannot
    claim the slot meanwhile (``_claim`` takes that lock first).  Only a
    heap-lock holder recycles: a process that died holding the semaphore
    keeps its stamped slot until somebody has adopted its lock, which is
    the evidence an unowned semaphore is adopted on (lock.py).

Layout (little-endian)::

    off  size  field             writer
      0     8  magic             creator, once
      8     8  owner             heap-lock holder (see above)
     16     8  recoveries        repair-lock holder: count of adopted locks
     24     8  last_recovery_ns  repair-lock holder: wall clock of the last one
     32     8  repairs           heap-lock holder: journal repairs that changed state
     40     4  nslots            creator, once
     48     8  lock_seq          heap-lock holder: +1 on every acquisition (wraps)
     56     8  waiter            a hint: the token of a process waiting for the heap
                                 lock, 0 if none; stored by waiters, cleared by the
                                 waiter once it holds the lock, or by an observer
                                 that yielded to it long enough (lock.py, fairness)
     64  32*n  slots             each: pid u32, epoch u32, attached_ns u64,
                                 building u8 (1 while its holder has a new arena
                                 under its temporary name), 15 bytes reserved;
                                 written by the slot's owner, or cleaned by a
                                 heap-lock holder holding the slot's lock byte
                                 once the slot is dead

Every attacher maps this segment writable, even a ``readonly=True`` one:
taking the lock is a write.  Nothing of the heap's data lives here.

This module owns the segment's layout, slot claiming, the OFD locks and the
liveness test.  It never touches the semaphore or the heap state.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import itertools
import os
import struct
import time
from collections.abc import Callable
from typing import NamedTuple

from . import core, segments
from .bytescan import nonzero_positions
from .errors import HeapCorruptError, LockTimeoutError, ShmHeapError
from .names import live_name, temp_arena_name

MAGIC = b"shmlive\0"
NSLOTS = 1024
SLOT_SIZE = 32
SLOTS_OFFSET = 64
SIZE = SLOTS_OFFSET + NSLOTS * SLOT_SIZE
OWNER_OFFSET = 8
LOCK_SEQ_OFFSET = 48
WAITER_OFFSET = 56
REPAIR_BYTE = 1
#: offset of a slot's ``building`` byte within the slot
BUILDING_OFFSET = 16

_HEADER = struct.Struct("<8sQQQQI")
_SLOT = struct.Struct("<IIQ")
_PID = struct.Struct("<I")
_COUNTERS = struct.Struct("<QQQ")  # recoveries, last_recovery_ns, repairs at 16
# struct flock on Linux (x86-64 and aarch64): short type, short whence, off_t start,
# off_t len, pid_t pid, padding.
_FLOCK = struct.Struct("@hhqqi4x")


class TooManyProcessesError(ShmHeapError, OSError):
    """Every process slot of the heap is held by a live attachment."""


def _flock(kind: int, start: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, start, 1, 0)


def _ofd(fd: int, cmd: int, kind: int, start: int) -> int:
    """One F_OFD_* call on the byte at ``start``; returns the resulting l_type."""
    result = fcntl.fcntl(fd, cmd, _flock(kind, start))
    return int(_FLOCK.unpack(result)[0])


def try_lock(fd: int, start: int) -> bool:
    try:
        _ofd(fd, fcntl.F_OFD_SETLK, fcntl.F_WRLCK, start)
    except (BlockingIOError, PermissionError):
        return False
    return True


def unlock(fd: int, start: int) -> None:
    _ofd(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, start)


def is_locked(fd: int, start: int) -> bool:
    """True if another open file description holds a write lock on byte ``start``.

    Asks with a read lock, so a read-only descriptor can ask too.
    """
    return _ofd(fd, fcntl.F_OFD_GETLK, fcntl.F_RDLCK, start) != fcntl.F_UNLCK


def slot_offset(slot: int) -> int:
    return SLOTS_OFFSET + slot * SLOT_SIZE


class Attachment(NamedTuple):
    """A live attachment seen in the slot table."""

    slot: int
    pid: int
    attached_ns: int


def _live_attachments(buf: memoryview, nslots: int,
                      alive: Callable[[int], bool]) -> list[Attachment]:
    """The stamped slots of ``buf`` whose lock ``alive`` says is held."""
    found = []
    for slot in _stamped(buf, nslots):
        pid, _epoch, attached_ns = _SLOT.unpack_from(buf, slot_offset(slot))
        if alive(slot):
            found.append(Attachment(slot, pid, attached_ns))
    return found


def _building(buf: memoryview, nslots: int) -> list[int]:
    """Slots whose building byte is set (``_native.nonzero_every``, or its twin here: a
    contiguous copy, then a bytes stride, C loops both; a strided view copies slower)."""
    first = SLOTS_OFFSET + BUILDING_OFFSET
    if core.native is not None:
        found: list[int] = core.native.nonzero_every(buf, first, SLOT_SIZE, nslots)
        return found
    return nonzero_positions(buf[first:first + nslots * SLOT_SIZE].tobytes()[::SLOT_SIZE])


def _stamped(buf: memoryview, nslots: int) -> list[int]:
    """Slots whose pid is non-zero (attached, or dead and not yet recycled)."""
    raw = buf[SLOTS_OFFSET:SLOTS_OFFSET + nslots * SLOT_SIZE].tobytes()
    pids = 0  # byte i: the OR of slot i's four pid bytes (bytes strides and ints are C loops)
    for byte in range(4):
        pids |= int.from_bytes(raw[byte::SLOT_SIZE])
    return nonzero_positions(pids.to_bytes(nslots))


def _remove_temp_arena(name: str, slot: int) -> None:
    """Remove the new arena slot ``slot`` may have left (never a file this user did not make)."""
    with contextlib.suppress(ShmHeapError):
        segments.remove_own(temp_arena_name(name, slot))


def create(name: str, mode: int) -> None:
    """Create and format the liveness segment of a new heap."""
    seg = segments.create(live_name(name), SIZE, mode)
    try:
        _HEADER.pack_into(seg.buf, 0, MAGIC, 0, 0, 0, 0, NSLOTS)
    finally:
        seg.close()


class Liveness:
    """This process's attachment to a heap's liveness segment (one slot)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.slot = -1
        self.token = 0
        #: called in a forked child before the inherited mapping goes (drop views into it,
        #: forget what was the parent's)
        self.on_unmap: list[Callable[[], None]] = []
        #: called after a fork has given this process a new slot, token and owner view
        self.on_reclaim: list[Callable[[], None]] = []
        self._map(segments.open_existing(live_name(name), readonly=False, keep_fd=True))
        self._claim()

    def _map(self, seg: segments.Segment) -> None:
        """Use the mapped segment ``seg`` (keeping its descriptor: it carries our slot lock)."""
        self._seg = seg
        buf = self._seg.buf
        if self._seg.size < SIZE or bytes(buf[0:8]) != MAGIC:
            self._seg.close()
            raise HeapCorruptError(f"/dev/shm/{live_name(self.name)} is not a liveness segment")
        self.nslots = min(_HEADER.unpack_from(buf, 0)[5], (self._seg.size - SLOTS_OFFSET)
                          // SLOT_SIZE)
        #: the owner word and the lock sequence, one-element uint64 views (the lock's hot path)
        self.owner = buf[OWNER_OFFSET:OWNER_OFFSET + 8].cast("Q")
        self.lock_seq = buf[LOCK_SEQ_OFFSET:LOCK_SEQ_OFFSET + 8].cast("Q")
        #: the waiter hint (lock.py: observers yield the lock to the process it names)
        self.waiter = buf[WAITER_OFFSET:WAITER_OFFSET + 8].cast("Q")
        #: the building byte of every slot, a strided view
        self._building = buf[SLOTS_OFFSET + BUILDING_OFFSET:SLOTS_OFFSET + self.nslots
                             * SLOT_SIZE][::SLOT_SIZE]

    @property
    def buffer(self) -> memoryview:
        """The whole segment (the native lock reads and writes it directly)."""
        return self._seg.buf

    @property
    def fd(self) -> int:
        fd = self._seg.fd
        if fd is None:
            raise ShmHeapError("liveness segment is closed")
        return fd

    def _claim(self) -> None:
        """Lock a slot (never-used or cleanly released ones first) and stamp it.

        A dead process's slot is claimed only when no clean one is left: its
        stamp is the evidence a waiter needs to adopt a lock it died holding.
        """
        buf = self._seg.buf
        clean = (s for s in range(self.nslots) if not _PID.unpack_from(buf, slot_offset(s))[0])
        # (the stamped slots are listed only if no clean one could be locked)
        for slot in itertools.chain(clean, itertools.chain.from_iterable(
                map(_stamped, (buf,), (self.nslots,)))):
            if try_lock(self.fd, slot_offset(slot)):
                _pid, epoch, _ = _SLOT.unpack_from(buf, slot_offset(slot))
                epoch = (epoch + 1) & 0xFFFFFFFF or 1
                _SLOT.pack_into(buf, slot_offset(slot), os.getpid(), epoch, time.time_ns())
                self.slot = slot
                self.token = (slot + 1) << 32 | epoch
                #: the slot's last holder died building a new arena (it may still be there)
                self.left_building = bool(self._building[slot])
                self.set_building(False)
                return
        raise TooManyProcessesError(
            f"all {self.nslots} process slots of heap {self.name!r} are in use; "
            "close heaps you no longer need"
        )

    def after_fork(self) -> None:
        """In a forked child: drop what is shared with the parent and claim a slot anew.

        The inherited descriptor *and* the inherited mapping both refer to the
        parent's open file description, which carries the parent's slot lock:
        as long as the child kept either, a dead parent would look alive; and
        unlocking through them would release the parent's slot.  So the child
        opens the segment again -- a new open file description, checked to be
        the very file the parent had (``identity``), never another of the same
        name -- before it lets go of the inherited ones.  HeapNotFoundError
        (nothing changed) if the file under the name is not that one.
        """
        if self._seg.fd is None:
            return
        name = live_name(self.name)
        fd, st = segments.open_fd(name, readonly=False, identity=self._seg.identity)
        self.abandon()
        self._map(segments.Segment(name, fd, st.st_size, readonly=False, keep_fd=True,
                                   identity=(st.st_dev, st.st_ino)))
        self._claim()
        for callback in self.on_reclaim:
            callback()

    def abandon(self) -> None:
        """In a forked child: let go of the parent's slot without touching it.

        The slot and its lock are the parent's: nothing is written and nothing
        unlocked (closing the inherited descriptor and unmapping the inherited
        mapping drop only the child's references to the parent's open file
        description).  Afterwards this attachment is closed.
        """
        if self._seg.fd is None:
            return
        for callback in self.on_unmap:
            callback()
        self._release_views()
        self._seg.close()
        self.slot = -1
        self.token = 0

    def _release_views(self) -> None:
        self.owner.release()
        self.lock_seq.release()
        self.waiter.release()
        self._building.release()

    def close(self) -> None:
        """Remove our temporary arena, mark the slot cleanly released and drop its lock."""
        if self._seg.fd is None:
            return
        _remove_temp_arena(self.name, self.slot)
        _SLOT.pack_into(self._seg.buf, slot_offset(self.slot), 0,
                        _SLOT.unpack_from(self._seg.buf, slot_offset(self.slot))[1], 0)
        self.set_building(False)
        # Unlock explicitly: a mapping still referenced elsewhere would keep the
        # open file description, and with it the lock, alive after close.
        unlock(self._seg.fd, slot_offset(self.slot))
        self._release_views()
        self._seg.close()

    # -- liveness ---------------------------------------------------------------

    def slot_alive(self, slot: int) -> bool:
        if slot == self.slot:
            return True
        return is_locked(self.fd, slot_offset(slot))

    def token_alive(self, token: int) -> bool:
        """True if the attachment that minted ``token`` is still attached and alive."""
        return self._alive((token >> 32) - 1, token & 0xFFFFFFFF, 0xFFFFFFFF)

    def short_token_alive(self, word: int) -> bool:
        """``token_alive`` for the 32-bit form ``(slot + 1) << 16 | epoch & 0xFFFF`` of a
        token (the holder words of objects, allocator.py): a wrapped epoch may make a dead
        process's word look alive, never the reverse."""
        return self._alive((word >> 16) - 1, word & 0xFFFF, 0xFFFF)

    def _alive(self, slot: int, epoch: int, mask: int) -> bool:
        """True if ``slot`` is alive and its epoch, masked with ``mask``, is ``epoch``."""
        if not 0 <= slot < self.nslots:
            return False
        if _SLOT.unpack_from(self._seg.buf, slot_offset(slot))[1] & mask != epoch:
            return False
        return self.slot_alive(slot)

    def dead_slots(self) -> list[int]:
        """Slots stamped by a process that died without releasing them."""
        return [s for s in _stamped(self._seg.buf, self.nslots) if not self.slot_alive(s)]

    def set_building(self, building: bool) -> None:
        """Say whether this process has a new arena under its temporary name (grow)."""
        self._building[self.slot] = int(building)

    def recycle_dead_slots(self, builders_only: bool = False) -> int:
        """Clean every dead slot (heap-lock holder only); returns how many.

        With ``builders_only``, only those whose building byte is set: a
        cheap pass for ``grow`` that frees the new arenas of dead growers.
        """
        if builders_only:
            candidates = _building(self._seg.buf, self.nslots)
        else:
            candidates = _stamped(self._seg.buf, self.nslots)
        buf = self._seg.buf
        cleaned = 0
        for slot in candidates:
            if slot == self.slot or not try_lock(self.fd, slot_offset(slot)):
                continue  # alive, or being claimed right now
            try:
                epoch = _SLOT.unpack_from(buf, slot_offset(slot))[1]
                _remove_temp_arena(self.name, slot)
                _SLOT.pack_into(buf, slot_offset(slot), 0, epoch, 0)
                self._building[slot] = 0
                cleaned += 1
            finally:
                unlock(self.fd, slot_offset(slot))
        return cleaned

    def attachments(self) -> list[Attachment]:
        """The live attachments, this one included."""
        return _live_attachments(self._seg.buf, self.nslots, self.slot_alive)

    def owner_pid(self) -> int | None:
        """The pid stamped in the slot of the recorded lock owner, or None."""
        token = self.owner[0]
        slot = (token >> 32) - 1
        if not token or not 0 <= slot < self.nslots:
            return None
        return int(_SLOT.unpack_from(self._seg.buf, slot_offset(slot))[0]) or None

    # -- repair lock and counters -------------------------------------------------

    def take_repair_lock(self, deadline: float | None) -> None:
        """Take the repair lock; LockTimeoutError if ``deadline`` (monotonic) passes first.

        Release it with ``repair_unlocker()``, made *before* this call and
        called in a ``finally``: unlocking a byte we do not hold is harmless,
        so no exception at any bytecode can leave it held.
        """
        while not try_lock(self.fd, REPAIR_BYTE):
            if deadline is not None and time.monotonic() >= deadline:
                raise LockTimeoutError(
                    f"heap {self.name!r}: another process is repairing it; try again later")
            time.sleep(0.001)

    def repair_unlocker(self) -> Callable[[], object]:
        """A C-level call that releases the repair lock (no Python frame to interrupt)."""
        return functools.partial(fcntl.fcntl, self.fd, fcntl.F_OFD_SETLK,
                                 _flock(fcntl.F_UNLCK, REPAIR_BYTE))

    def counters(self) -> tuple[int, int, int]:
        """(recoveries, last_recovery_ns, repairs)."""
        recoveries, last_ns, repairs = _COUNTERS.unpack_from(self._seg.buf, 16)
        return int(recoveries), int(last_ns), int(repairs)

    def count_recovery(self) -> None:
        """Record one adopted lock (repair-lock holder only)."""
        recoveries, _last, repairs = self.counters()
        _COUNTERS.pack_into(self._seg.buf, 16, (recoveries + 1) & (2**64 - 1), time.time_ns(),
                            repairs)

    def count_repair(self) -> None:
        """Record one journal repair that changed the heap (heap-lock holder only)."""
        recoveries, last_ns, repairs = self.counters()
        _COUNTERS.pack_into(self._seg.buf, 16, recoveries, last_ns, (repairs + 1) & (2**64 - 1))


def probe_attachments(name: str) -> list[Attachment]:
    """The live attachments of heap ``name`` without attaching (for ``ls``/``gc``)."""
    seg = segments.open_existing(live_name(name), readonly=True, keep_fd=True)
    try:
        if seg.size < SIZE or bytes(seg.buf[0:8]) != MAGIC or seg.fd is None:
            raise HeapCorruptError(f"/dev/shm/{live_name(name)} is not a liveness segment")
        fd = seg.fd
        return _live_attachments(seg.buf, NSLOTS, lambda slot: is_locked(fd, slot_offset(slot)))
    finally:
        seg.close()
