"""The heap lock: a POSIX named semaphore that survives the death of its holder.

Protocol (every process, readers included)::

    acquire:  sem_trywait, else timed waits of growing slices (see below)
              owner := my token; seq += 1              (liveness.py)
    ...critical section...
    release:  owner := 0
              sem_post

Dead holders
    A waiter whose timed wait expires looks at the owner record:

    * ``owner`` names a token whose slot is unlocked, or re-stamped with
      another epoch: the holder is dead.  The waiter takes the repair lock,
      re-checks that the owner record and the semaphore are unchanged and
      *adopts* the lock (writes its own token: the semaphore's count is still
      0, so it now holds it) and counts a recovery.
    * ``owner`` is 0 although the semaphore stays taken: a process died in
      the two-statement windows between ``sem_wait`` and recording itself,
      or between clearing the record and ``sem_post``.  Every acquirer bumps
      ``seq`` right after recording itself, so "nobody has taken the lock
      since" is a fact a waiter can see: it adopts only if owner stays 0
      *and* ``seq`` stays unchanged for ``UNOWNED_GRACE`` seconds *and* some
      slot belongs to a dead process.  Only a live process stopped (SIGSTOP)
      for longer than the grace in exactly that window, while another
      attached process has died, could be robbed; then the semaphore's count
      can reach 2, which ``fsck`` reports and repair sets right.
    * ``owner`` is alive: the waiter keeps waiting.  A slow or stopped holder
      is never robbed; a caller's deadline turns into LockTimeoutError.

    Adoption does not repair anything.  What a dead (or interrupted) holder
    left half-done is recorded in the control segment's journal (repair.py),
    and every *writable* lock holder that finds the journal dirty runs the
    heap's repair before its own critical section, whoever left it dirty.  A
    read-only holder never repairs: it leaves the journal for the next writer.

Exceptions at any bytecode (Ctrl-C, a signal handler that raises)
    CPython runs Python signal handlers at "eval breaker" checks: at the
    entry of a Python function, on backward jumps and after every call.  An
    exception raised there between ``sem_trywait`` returning and the caller's
    ``finally`` would leave the semaphore taken by a live process, which no
    waiter may rob.  So the pure-Python critical section is written so that
    no check falls where it would matter:

    * ``held[:] = map(sem_trywait, ZERO)`` acquires *and* records that this
      handle holds the semaphore in one STORE_SLICE instruction (the C call
      runs inside it; no check comes between the call and the store);
    * the ``finally`` of ``run`` releases with ``held[:] = releaser``, where
      ``releaser`` (built before the lock was taken) is a lazy
      ``filter(None, starmap(sem_post, ((),)))``: posting and forgetting that
      we hold it are again one instruction.  The ``finally`` makes no call.

    ``held`` (a list: empty or one element) is therefore always the truth,
    and ``run`` releases whatever it took, however it is left.  Blocking
    waits go through libc's ``sem_clockwait`` by ctypes rather than
    posix_ipc, whose wait swallows the exception a signal handler raises on
    EINTR: here the handler runs at the next check, its exception
    propagates, and a wait without an exception is retried within the
    caller's deadline.  ``locked()`` (a ``with`` block for users) is as
    safe on entry; its ``__exit__`` is Python code, so a signal landing in
    the instructions right before it can skip it: then the block object's
    ``__del__`` (run as soon as the exception has unwound it) closes it, and
    failing that, this handle's next lock operation (or ``close``) releases
    what ``held`` says is held.  Blocks nest, and operations inside a block
    run under its hold (the lock is not reentrant otherwise).

Threads
    The hold is the handle's, so threads of one handle take turns on it
    through the handle's *mutex* (a reentrant thread lock: the native core's
    ``Mutex``, a futex word, or ``threading.RLock`` in the twin), always
    taken before the semaphore and given back after it is posted.  Blocks
    nest per thread: a thread's call inside its own open ``locked()`` block
    runs under the block's hold, another thread's waits for the block to
    close (the native core keeps the mutex for the whole block; the twin
    records the block's thread and waits on a condition of the mutex, so no
    exception can land between taking the mutex and recording that it must
    be given back).  Nothing here relies on the GIL.  A deadline bounds the
    wait for another thread of the handle as it bounds the wait for other
    processes: ``take_mutex`` waits for the mutex until the deadline, and the
    twin's wait for another thread's block ends there too (LockTimeoutError,
    ``MUTEX_TIMEOUT``; the native core's Lock does the same in C).

Fork
    A child forked while some thread of the parent held the lock (inside
    ``locked()``, ``check()``, any call) inherits neither the hold nor an
    open block nor the mutex: ``after_fork`` forgets them without posting
    the semaphore the child never took, and resets the mutex.  A block
    opened before the fork does nothing when it closes in the child.

Fairness: observers yield to waiting writers
    A POSIX semaphore is not fair: ``sem_post`` wakes a waiter, but a
    process that loops (post, then at once ``sem_trywait`` again) usually
    takes the lock back before the woken waiter has run, so a looping
    observer could starve a writer.  So a process that starts waiting
    announces itself in the liveness segment's ``waiter`` word (its token;
    re-stored on every slice of its wait, cleared by itself once it holds
    the lock or gives up), and observers -- ``read_word`` (snapshots,
    ``info``) and every piece of ``check()`` (``yield_to_waiters``) --
    before taking the lock, while ``waiter`` names another live process,
    wait until somebody has taken the lock (``seq`` moved) or the word
    changed, for at most ``YIELD_LIMIT`` seconds.  The word is a hint, a
    plain store (there is no atomic read-modify-write here): with several
    waiters the last one's token stands, and one whose store was lost
    re-announces within a slice.  A dead waiter cannot wedge anyone: its
    token is seen dead and cleared, and a live one that stopped waiting
    without clearing (an exception at the wrong bytecode) costs one
    ``YIELD_LIMIT``, after which the observer clears it.  Writers do not
    yield to each other: they take turns as the semaphore grants them.

This module owns the semaphore and the acquire/adopt/release protocol.  It
does not know what the lock protects: the heap passes the journal word and
the ``repair`` function run by writable holders.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import math
import operator
import os
import struct
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import posix_ipc

from . import core, crash, segments
from .errors import (
    HeapClosedError,
    HeapExistsError,
    HeapNotFoundError,
    InvalidParameterError,
    LockTimeoutError,
    OutOfSharedMemoryError,
    ShmHeapError,
)
from .liveness import Liveness

#: Seconds between liveness checks while waiting: the first wait is 2 * FIRST_POLL,
#: each later one twice as long, up to POLL.
FIRST_POLL = 0.0005
POLL = 0.02
#: Seconds an unowned-but-taken semaphore must stay so, untaken by anyone, before it is adopted.
UNOWNED_GRACE = 0.25
#: Seconds an observer yields at most to an announced waiter; and its nap while it does.
YIELD_LIMIT = 2 * POLL
YIELD_NAP = 0.00005
#: Bytes of a named semaphore's file in /dev/shm: glibc's sizeof(sem_t), 4 words.
SEMAPHORE_FILE_SIZE = 4 * struct.calcsize("P")

_T = TypeVar("_T")
_R = TypeVar("_R")
_P = ParamSpec("_P")
_ZERO = (0,)
_NOARGS = ((),)
#: ``mutex.acquire``'s argument for a try (``take_mutex``); and for a wait
NOWAIT = (False,)
_WAIT = (True,)
#: What a call whose deadline passed while another thread held its handle says (the native
#: core's words too: _native.c MUTEX_TIMEOUT).
MUTEX_TIMEOUT = ("another thread of this process holds this heap handle (inside "
                 "`with heap.locked():` or a call on it) and did not let go in time; give a "
                 "longer timeout, or give each thread a handle of its own (Heap.attach)")
_SEQ_MASK = (1 << 64) - 1


def check_timeout(timeout: object) -> float | None:
    """``timeout`` if it is None or a finite number of seconds >= 0, else InvalidParameterError."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise InvalidParameterError(
            f"timeout={timeout!r}: give a number of seconds >= 0, or None to wait for ever")
    if not math.isfinite(timeout) or timeout < 0:
        raise InvalidParameterError(
            f"timeout={timeout!r}: give a finite number of seconds >= 0, or None to wait for ever")
    return float(timeout)


def deadline_of(timeout: object) -> float | None:
    """The monotonic deadline of a (checked) ``timeout`` starting now; None for ever."""
    seconds = check_timeout(timeout)
    return None if seconds is None else time.monotonic() + seconds


def time_left(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (a timeout to pass on to a call), None for ever."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def expired(deadline: float | None) -> bool:
    """Whether the monotonic ``deadline`` has passed (never, for None): a TimeoutError
    caught then is the deadline's, not a signal handler's of the program."""
    return deadline is not None and time.monotonic() >= deadline


def take_mutex(mutex: Any, taken: list[object], deadline: float | None) -> None:
    """Take a handle's ``mutex`` (reentrant) after another thread's hold of it, waiting until
    the monotonic ``deadline`` at most (None: for ever); the caller tried it with ``NOWAIT``.

    ``taken`` gets an element in the same instruction as the mutex is taken
    (as ``held`` in the module docstring), so the caller's ``finally`` gives
    back exactly what was taken, whatever exception lands wherever: callers
    do ``taken[:] = filter(None, map(mutex.acquire, NOWAIT))`` inside their
    ``try`` first, and call this if ``taken`` stayed empty.
    LockTimeoutError (``MUTEX_TIMEOUT``) if another thread held it until the
    deadline; a signal handler's exception propagates, nothing taken.
    """
    if deadline is None:
        taken[:] = map(mutex.acquire, _WAIT)
        return
    taken[:] = filter(None, map(mutex.acquire, _WAIT, (time_left(deadline),)))
    if not taken:
        raise LockTimeoutError(MUTEX_TIMEOUT)


def with_mutex(mutex: Any, deadline: float | None, then: Callable[_P, _R], *args: _P.args,
               **kwargs: _P.kwargs) -> _R:
    """``then(*args, **kwargs)`` with a handle's ``mutex`` held, waited for until ``deadline``
    at most (``take_mutex``)."""
    taken: list[object] = []
    try:
        taken[:] = filter(None, map(mutex.acquire, NOWAIT))
        if not taken:
            take_mutex(mutex, taken, deadline)
        return then(*args, **kwargs)
    finally:
        if taken:
            mutex.release()


@functools.cache
def _libc() -> Any:
    """libc with sem_open, sem_clockwait and sem_close typed (ctypes loads on first use:
    only the pure-Python lock waits through it, and importing ctypes costs milliseconds)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.sem_open.argtypes = [ctypes.c_char_p, ctypes.c_int]
    libc.sem_open.restype = ctypes.c_void_p
    libc.sem_clockwait.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    libc.sem_clockwait.restype = ctypes.c_int
    libc.sem_close.argtypes = [ctypes.c_void_p]
    libc.sem_close.restype = ctypes.c_int
    return libc


class _LibcSemaphore:
    """The same named semaphore opened through libc, for interruptible timed waits."""

    def __init__(self, name: str) -> None:
        import ctypes

        libc = _libc()
        self._ptr = libc.sem_open(name.encode(), 0)
        self._get_errno = ctypes.get_errno
        if not self._ptr:
            err = self._get_errno()
            raise _semaphore_error(name, OSError(err, os.strerror(err)))
        self._clockwait = libc.sem_clockwait
        self._args = ((self._ptr,), (time.CLOCK_MONOTONIC,))
        #: a struct timespec: tv_sec, tv_nsec
        self._timespec = (ctypes.c_long * 2)()
        self._timespec_ref = ctypes.byref(self._timespec)

    def wait_into(self, held: list[object], seconds: float) -> int:
        """Wait up to ``seconds``; on success ``held`` becomes non-empty.  Returns 0 or errno.

        The call and the store into ``held`` are one instruction (see the
        module docstring), so an exception can never come between them.
        """
        when = time.clock_gettime(time.CLOCK_MONOTONIC) + seconds
        spec = self._timespec
        spec[0] = int(when)
        spec[1] = int((when - int(when)) * 1e9)
        ptr, clock = self._args
        held[:] = filter(operator.not_, map(self._clockwait, ptr, clock, (self._timespec_ref,)))
        return 0 if held else int(self._get_errno())

    def close(self) -> None:
        if self._ptr:
            _libc().sem_close(self._ptr)
            self._ptr = None


class HeapLock:
    """A heap handle's hold on the heap's lock; threads of the handle take turns (``mutex``)."""

    #: how many forks this lock has been carried through (a block opened before one of
    #: them does nothing when it closes)
    forks = 0

    def __init__(self, sem: posix_ipc.Semaphore, live: Liveness, heap_name: str,
                 journal: memoryview, header: memoryview, repair: Callable[[], None],
                 mutex: Any) -> None:
        #: the handle's thread lock, taken around every hold
        self._mutex = mutex
        #: (twin) notified when a locked() block closes
        self._idle = threading.Condition(mutex)
        self._sem = sem
        self._trywait = sem.acquire
        self._post = sem.release
        #: the libc handle the pure-Python lock waits through (not needed by the native one)
        self._waiter: _LibcSemaphore | None = None
        self._live = live
        self._bind()
        live.on_reclaim.append(self._bind)
        #: the control segment's journal word (a one-element uint64 view)
        self._journal = journal
        self._repair = repair
        self._heap_name = heap_name
        #: empty, or one element while this handle holds the semaphore (see the docstring)
        self.held: list[object] = []
        #: the outermost open ``locked()`` block of this handle (a weak reference) and
        #: the thread that opened it: while it lives, that thread's ``run`` runs bodies
        #: under the hold it took and the other threads' wait (written under the mutex)
        self._outer: tuple[weakref.ref[LockedBlock], int] | None = None
        self._adoptions = 0
        #: the native core's lock (shmheap/_native.c), when it runs this one
        self.native: Any = None
        if crash.ARMED:
            self.run = self._run_at_crash_points  # type: ignore[method-assign]
            self.read_word = self._read_word_at_crash_points  # type: ignore[method-assign]
        elif core.native is not None:
            try:  # it opens the semaphore again, through libc
                self.native = core.native.Lock(
                    sem.name, live.buffer, live.fd, live.nslots, live.slot, live.token,
                    journal, header, repair, heap_name,
                    (FIRST_POLL, POLL, UNOWNED_GRACE, YIELD_LIMIT, YIELD_NAP), mutex)
            except OSError as exc:
                raise _semaphore_error(sem.name, exc) from None
            for method in ("run", "read_word", "enter", "leave", "release", "semaphore_value",
                           "drain_one"):
                setattr(self, method, getattr(self.native, method))
            live.on_unmap.append(self.native.detach)
        if self.native is None:
            self._waiter = _LibcSemaphore(sem.name)

    @property
    def adoptions(self) -> int:
        """How many dead holders' locks this handle has adopted."""
        return int(self.native.adoptions) if self.native is not None else self._adoptions

    @property
    def holding(self) -> bool:
        """True while this handle holds the semaphore."""
        return bool(self.native.holding) if self.native is not None else bool(self.held)

    def _bind(self) -> None:
        """Cache the owner and seq views and our token (again after a fork re-made them)."""
        live = self._live
        self._owner = live.owner
        self._seq = live.lock_seq
        self._waiter_word = live.waiter
        self._token = live.token
        native = getattr(self, "native", None)
        if native is not None:
            native.rebind(live.buffer, live.fd, live.slot, live.token)

    # -- the critical sections ------------------------------------------------------

    def run(self, body: Callable[[], _T], deadline: float | None = None,
            write: bool = False) -> _T:
        """``body()`` with the lock held; a writer first repairs a dirty journal.

        Waits for ever (recovering dead holders) or until the monotonic
        ``deadline`` (for the handle's mutex too).  Whatever ``body`` raises,
        the lock is released.
        """
        return with_mutex(self._mutex, deadline, self._run_mutexed, body, deadline, write)

    def _run_mutexed(self, body: Callable[[], _T], deadline: float | None, write: bool) -> _T:
        if self._in_block(deadline):
            return body()
        return self._run_held(body, deadline, write)

    def _run_held(self, body: Callable[[], _T], deadline: float | None, write: bool) -> _T:
        held = self.held
        releaser = filter(None, itertools.starmap(self._post, _NOARGS))
        owner = self._owner
        try:
            if not held:
                try:
                    held[:] = map(self._trywait, _ZERO)
                except posix_ipc.BusyError:
                    self._wait(deadline)
            owner[0] = self._token
            self._seq[0] = self._seq[0] + 1 & _SEQ_MASK
            if write and self._journal[0]:
                self._repair()
            return body()
        finally:
            if held:
                owner[0] = 0
                held[:] = releaser

    def _in_block(self, deadline: float | None = None) -> bool:
        """(mutex held) True inside this thread's own open block; waits out another's, until
        ``deadline`` at most (LockTimeoutError)."""
        while True:
            outer = self._outer
            if outer is None:
                return False
            block, thread = outer
            if block() is None:  # skipped and collected: ``held`` says what to release
                self._outer = None
                return False
            if thread == threading.get_ident():
                return True
            wait = POLL if deadline is None else min(POLL, deadline - time.monotonic())
            if wait <= 0:
                raise LockTimeoutError(MUTEX_TIMEOUT)
            self._idle.wait(wait)

    def read_word(self, view: memoryview, deadline: float | None = None) -> int:
        """``view[0]`` read under the lock: a snapshot's whole critical section.

        An observer: it yields to a waiting writer first.  Like every writer,
        a writable handle repairs a dirty journal before it reads (``repair``
        does nothing for a read-only one), so the first writable holder after
        a crash leaves the journal clean whatever it came for; a repair that
        fails (a full /dev/shm) is left to the next holder, the read goes on.
        """
        return with_mutex(self._mutex, deadline, self._read_mutexed, view, deadline)

    def _read_mutexed(self, view: memoryview, deadline: float | None) -> int:
        if self._in_block(deadline):
            word: int = view[0]  # inside this thread's own locked() block
            return word
        if self._waiter_word[0]:
            self.yield_to_waiters()
        return self._read_held(view, deadline)

    def _read_held(self, view: memoryview, deadline: float | None) -> int:
        held = self.held
        releaser = filter(None, itertools.starmap(self._post, _NOARGS))
        owner = self._owner
        try:
            if not held:
                try:
                    held[:] = map(self._trywait, _ZERO)
                except posix_ipc.BusyError:
                    self._wait(deadline)
            owner[0] = self._token
            self._seq[0] = self._seq[0] + 1 & _SEQ_MASK
            if self._journal[0]:
                self._repair_for_read()
            word = view[0]
            return word
        finally:
            if held:
                owner[0] = 0
                held[:] = releaser

    def _repair_for_read(self) -> None:
        """A snapshot's repair: one that fails (a full /dev/shm) is left to the next holder."""
        with contextlib.suppress(ShmHeapError):
            self._repair()

    def enter(self, block: LockedBlock, deadline: float | None, write: bool) -> bool:
        """Open ``block``: take the lock, unless an open outer block holds it (then False).

        On any exception nothing stays taken (unless an outer block holds it).
        """
        return with_mutex(self._mutex, deadline, self._enter_mutexed, block, deadline, write)

    def _enter_mutexed(self, block: LockedBlock, deadline: float | None, write: bool) -> bool:
        if self._in_block(deadline):
            return False
        try:
            if not self.held:
                try:
                    self.held[:] = map(self._trywait, _ZERO)
                except posix_ipc.BusyError:
                    self._wait(deadline)
            self._owner[0] = self._token
            self._seq[0] = self._seq[0] + 1 & _SEQ_MASK
            if write and self._journal[0]:
                self._repair()
            self._outer = (weakref.ref(block), threading.get_ident())
        except BaseException:
            self.release()
            raise
        return True

    def leave(self) -> None:
        """Close the outermost block: release the lock."""
        with self._mutex:
            self._outer = None
            self.release()
            self._idle.notify_all()

    def after_fork(self) -> None:
        """In a forked child: forget the parent's hold, open block and mutex, posting nothing.

        Whichever thread of the parent held them does not exist here; the
        semaphore's count is the parent's to give back.
        """
        self.forks += 1
        if self.native is not None:
            self.native.after_fork()
        self.held[:] = ()
        self._outer = None
        self._mutex._at_fork_reinit()
        self._idle = threading.Condition(self._mutex)

    def release(self) -> None:
        """Release the lock if this handle holds it (a no-op otherwise)."""
        held = self.held
        if held:
            releaser = filter(None, itertools.starmap(self._post, _NOARGS))
            self._owner[0] = 0
            held[:] = releaser

    # -- the same, with crash points (only when SHMHEAP_CRASH_AT/RAISE_AT is set) ------

    def _run_at_crash_points(self, body: Callable[[], _T], deadline: float | None = None,
                             write: bool = False, role: str = "lock") -> _T:
        return with_mutex(self._mutex, deadline, self._run_mutexed_crashing, body, deadline,
                          write, role)

    def _run_mutexed_crashing(self, body: Callable[[], _T], deadline: float | None,
                              write: bool, role: str) -> _T:
        if self._in_block(deadline):
            return body()
        return self._run_crashing(body, deadline, write, role)

    def _run_crashing(self, body: Callable[[], _T], deadline: float | None, write: bool,
                      role: str) -> _T:
        held = self.held
        releaser = filter(None, itertools.starmap(self._post, _NOARGS))
        try:
            if not held:
                try:
                    held[:] = map(self._trywait, _ZERO)
                except posix_ipc.BusyError:
                    self._wait(deadline)
            crash.reach(f"{role}.acquired")
            self._owner[0] = self._token
            self._seq[0] = self._seq[0] + 1 & _SEQ_MASK
            crash.reach(f"{role}.owned")
            if write and self._journal[0]:
                self._repair()
            return body()
        finally:
            if held:
                self._owner[0] = 0
                try:
                    crash.reach(f"{role}.releasing")
                finally:
                    held[:] = releaser

    def _read_word_at_crash_points(self, view: memoryview, deadline: float | None = None) -> int:
        def body() -> int:
            if self._journal[0]:
                self._repair_for_read()
            return int(view[0])

        return self._run_at_crash_points(body, deadline, False, "snapshot")

    # -- fairness (see the module docstring) ----------------------------------------------

    def yield_to_waiters(self) -> None:
        """Before an observer takes the lock: let an announced waiter have it first.

        Returns once somebody has taken the lock since (``seq`` moved), the
        ``waiter`` word changed, the waiter is dead, or ``YIELD_LIMIT`` passed
        (then the word is stale and cleared).  Holding nothing, it delays
        nobody; a handle that holds the lock (inside a ``locked()`` block)
        does not yield.
        """
        word = self._waiter_word
        token = word[0]
        if not token or token == self._token or self.holding:
            return
        if self._live.token_alive(token):
            seq = self._seq[0]
            until = time.monotonic() + YIELD_LIMIT
            while word[0] == token and self._seq[0] == seq:
                if time.monotonic() >= until:
                    break
                time.sleep(YIELD_NAP)
            else:
                return
        if word[0] == token:
            word[0] = 0

    # -- waiting and adopting ---------------------------------------------------------

    def _wait(self, deadline: float | None) -> None:
        """Slow path: wait in growing slices, adopting the lock of a dead holder.

        Announces this process in the ``waiter`` word while it waits (fairness).
        Returns holding the semaphore (``held`` non-empty), or raises holding nothing.
        """
        word = self._waiter_word
        token = self._token
        try:
            self._wait_announced(deadline, word, token)
        finally:
            if word[0] == token:
                word[0] = 0

    def _wait_announced(self, deadline: float | None, word: memoryview, token: int) -> None:
        unowned_since: float | None = None
        unowned_seq = -1
        slice_ = FIRST_POLL
        held = self.held
        while True:
            if word[0] != token:
                word[0] = token
            slice_ = wait = min(slice_ * 2, POLL)
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    raise LockTimeoutError(self._timeout_message())
            assert self._waiter is not None
            err = self._waiter.wait_into(held, wait)
            if held:
                return
            if err not in (errno.ETIMEDOUT, errno.EINTR, errno.EAGAIN):
                raise ShmHeapError(f"heap {self._heap_name!r}: waiting for the lock failed: "
                                   f"{os.strerror(err)}")
            owner = self._owner[0]
            if owner:
                unowned_since = None
                if not self._live.token_alive(owner) and self._adopt(owner, -1, deadline):
                    return
                continue
            seq = self._seq[0]
            now = time.monotonic()
            if unowned_since is None or seq != unowned_seq:
                unowned_since, unowned_seq = now, seq
            elif now - unowned_since >= UNOWNED_GRACE and self._adopt(0, seq, deadline):
                return

    def _adopt(self, dead_owner: int, seq: int, deadline: float | None) -> bool:
        """Under the repair lock, take over a dead holder's lock if nothing changed."""
        live = self._live
        unlock = live.repair_unlocker()
        try:
            live.take_repair_lock(deadline)
            if self._owner[0] != dead_owner or self.semaphore_value() != 0:
                return False
            if dead_owner and live.token_alive(dead_owner):
                return False
            if not dead_owner and (self._seq[0] != seq or not live.dead_slots()):
                return False
            self.held[:] = _ZERO
            self._owner[0] = self._token
        finally:
            unlock()
        live.count_recovery()
        self._adoptions += 1
        crash.reach("repair.adopted")
        return True

    def semaphore_value(self) -> int:
        return int(self._sem.value)

    def drain_one(self) -> None:
        """Take one count off the semaphore while holding the lock (fsck of a count > 1)."""
        with contextlib.suppress(posix_ipc.BusyError):
            self._trywait(0)

    def _timeout_message(self) -> str:
        pid = self._live.owner_pid()
        holder = f"process {pid}" if pid else "a process that has not recorded itself yet"
        return (f"heap {self._heap_name!r}: lock not acquired in time; it is held by "
                f"{holder}, which is alive (stopped or slow); wait longer or investigate it")

    def close(self, closed: ClosedLock | None = None) -> None:
        """Release the lock if an interrupted ``locked()`` left it held, then close.

        Another thread's open block is waited out first: its hold is its own
        (the native core's block keeps the mutex, which the handle's close takes).
        Whoever still holds this object afterwards (the allocator, a ``locked()``
        block made before the close) gets ``closed``'s error (HeapClosedError)
        from every operation that would take the lock; releasing is a no-op.
        """
        with self._mutex:
            self._in_block()
            self.leave()
        if self.native is not None:
            self.native.close()  # its own operations raise HeapClosedError from now on
        closed = closed or ClosedLock(self._heap_name)
        for method in ("run", "read_word", "enter", "semaphore_value", "drain_one"):
            setattr(self, method, getattr(closed, method))
        self.leave = self.release = _nothing  # type: ignore[method-assign]
        if self._waiter is not None:
            self._waiter.close()
        with contextlib.suppress(posix_ipc.ExistentialError):
            self._sem.close()


class LockedBlock:
    """``with heap.locked():`` -- the heap lock held for the body; blocks nest."""

    def __init__(self, lock: HeapLock, deadline: float | None, write: bool) -> None:
        self._lock = lock
        self._deadline = deadline
        self._write = write
        self._outermost = False
        self._forks = 0

    def __enter__(self) -> None:
        self._forks = self._lock.forks
        self._outermost = self._lock.enter(self, self._deadline, self._write)

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._outermost:
            self._outermost = False
            if self._lock.forks == self._forks:  # not a block of the parent, in a child
                self._lock.leave()

    __del__ = close


def open_semaphore(name: str, create: bool, mode: int) -> posix_ipc.Semaphore:
    """Open (or exclusively create, with count 1) the named semaphore ``name``.

    sem_open maps the semaphore's file, so before opening an existing one its
    file is checked like a segment (segments.open_fd): a FIFO there would
    hang us, a short file would kill us with SIGBUS, another user's file is
    not our lock.
    """
    file = f"sem.{name.lstrip('/')}"
    where = segments.path_of(file)
    try:
        if create:
            sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode, 1)
            # sem_open narrows the mode by the umask; the segments get exactly ``mode``
            os.chmod(where, mode)
            return sem
        os.close(segments.open_fd(file, readonly=True, expect_size=SEMAPHORE_FILE_SIZE)[0])
        return posix_ipc.Semaphore(name)
    except ShmHeapError:
        raise  # from the file's check, already typed (some are OSErrors too)
    except posix_ipc.ExistentialError as exc:
        cls = HeapExistsError if create else HeapNotFoundError
        raise cls(f"heap lock semaphore {where}: {exc}") from None
    except posix_ipc.PermissionsError as exc:
        raise segments.SegmentPermissionError(
            f"heap lock semaphore {where}: permission denied ({exc}); it belongs to another "
            "user or its mode forbids this access") from None
    except OSError as exc:
        raise _semaphore_error(where, exc) from None


def _semaphore_error(where: str, exc: OSError) -> ShmHeapError:
    """The ShmHeapError of a failed open, creation or removal of the semaphore ``where``."""
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return segments.descriptor_limit_error(f"the heap lock semaphore {where}")
    if exc.errno in (errno.ENOSPC, errno.ENOMEM):
        return OutOfSharedMemoryError(
            f"no room in /dev/shm for the heap lock semaphore {where}: free space there "
            "(df -h /dev/shm; `shmheap gc` removes abandoned heaps)")
    return ShmHeapError(f"heap lock semaphore {where}: {exc.strerror} (errno {exc.errno})")


def unlink_semaphore(name: str) -> bool:
    where = segments.path_of(f"sem.{name.lstrip('/')}")
    try:
        posix_ipc.unlink_semaphore(name)
    except posix_ipc.ExistentialError:
        return False
    except posix_ipc.PermissionsError:
        raise segments.SegmentPermissionError(
            f"permission denied on {where}: it belongs to another user") from None
    except OSError as exc:
        raise _semaphore_error(where, exc) from None
    return True


def _nothing() -> None:
    """What releasing the lock of a closed heap does."""


class ClosedLock:
    """Stands in for the lock of a closed heap: every use raises HeapClosedError."""

    adoptions = 0
    forks = 0

    def __init__(self, name: str, gone: str | None = None) -> None:
        """``gone``: why the heap is gone (HeapNotFoundError), for a handle closed after a fork."""
        self._error = HeapClosedError if gone is None else HeapNotFoundError
        self._message = gone or f"heap {name!r} is closed; attach it again to use it"

    def run(self, body: Callable[[], _T], deadline: float | None = None,
            write: bool = False) -> _T:
        raise self._error(self._message)

    def read_word(self, view: memoryview, deadline: float | None = None) -> int:
        raise self._error(self._message)

    def enter(self, block: LockedBlock, deadline: float | None, write: bool) -> bool:
        raise self._error(self._message)

    def leave(self) -> None:
        raise self._error(self._message)

    def semaphore_value(self) -> int:
        raise self._error(self._message)

    def drain_one(self) -> None:
        raise self._error(self._message)
