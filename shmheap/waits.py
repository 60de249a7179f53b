"""Sleeping on a shared 32-bit word until it changes: Linux futexes across processes.

A waiter reads a word of shared memory, decides it must wait, and calls
``wait(address, seen, seconds)``: the kernel puts it to sleep only if the word
still holds ``seen`` (so a change made between the read and the call is never
missed), until ``wake(address)`` or the timeout.  The futex is keyed by the
file and offset of the shared mapping (not ``FUTEX_PRIVATE``), so a waker in
one process wakes a sleeper in another.  A process that dies leaves nothing
behind: a futex has no state outside the word.

The native core (``_native.c``: ``futex_wait``, ``futex_wake``) makes the
same system calls; this pure-Python twin makes them through ``ctypes``
(``syscall(SYS_futex, ...)``).  On an architecture whose system call number is
not known here, ``wait`` sleeps in short slices instead (correct, slower).

A word here is addressed by a ``ctypes`` object over the mapping
(``address_of``; a read-only mapping will do, as the kernel only reads the
word); whoever maps the segment drops those objects before it unmaps.
This module owns the system calls and touches no word itself.
"""

from __future__ import annotations

import errno
import functools
import os
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import ctypes

_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
#: SYS_futex per machine (asm/unistd.h)
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "riscv64": 98, "ppc64le": 221, "s390x": 238}
_NUMBER = _SYS_FUTEX.get(os.uname().machine)
#: Seconds of one sleep where no futex is known (the fallback polls).
FALLBACK_SLICE = 0.001
_WAKE_ALL = 0x7FFFFFFF


@functools.cache
def _syscall() -> Any:
    """libc's syscall(), loaded on first use: ctypes costs milliseconds of ``import shmheap``."""
    import ctypes

    syscall = ctypes.CDLL(None, use_errno=True).syscall
    syscall.restype = ctypes.c_long
    return syscall


def address_of(buffer: object, offset: int) -> ctypes.c_uint32:
    """A ctypes word at ``offset`` of ``buffer`` (a mapping); it pins the mapping.

    A read-only mapping gives its address through ``PyObject_GetBuffer``
    (ctypes' ``from_buffer`` wants a writable one); the word keeps a view of
    the mapping, so the mapping stays while the word lives.  A futex may wait
    on a read-only shared mapping (the kernel only reads the word); nothing
    here stores through it.
    """
    import ctypes

    try:
        return ctypes.c_uint32.from_buffer(buffer, offset)  # type: ignore[arg-type]
    except TypeError:  # read-only
        pass
    whole = memoryview(buffer)  # type: ignore[arg-type]
    view = whole[offset:offset + 4]
    if len(view) != 4:
        raise ValueError(f"no word at offset {offset} of a buffer of {len(whole)} bytes")
    word = ctypes.c_uint32.from_address(_address(view))
    word.pin = view  # type: ignore[attr-defined]
    return word


@functools.cache
def _buffer_api() -> tuple[Any, Any, Any]:
    """(Py_buffer, PyObject_GetBuffer, PyBuffer_Release) through ctypes."""
    import ctypes

    class PyBuffer(ctypes.Structure):  # in the limited API since 3.11: its layout is fixed
        _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p),
                    ("len", ctypes.c_ssize_t), ("itemsize", ctypes.c_ssize_t),
                    ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                    ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p),
                    ("strides", ctypes.c_void_p), ("suboffsets", ctypes.c_void_p),
                    ("internal", ctypes.c_void_p)]

    get, release = ctypes.pythonapi.PyObject_GetBuffer, ctypes.pythonapi.PyBuffer_Release
    get.argtypes = [ctypes.py_object, ctypes.POINTER(PyBuffer), ctypes.c_int]
    release.argtypes = [ctypes.POINTER(PyBuffer)]
    return PyBuffer, get, release


def _address(view: memoryview) -> int:
    """The address of the first byte of ``view`` (read-only or not)."""
    import ctypes

    py_buffer, get, release = _buffer_api()
    got = py_buffer()
    if get(view, ctypes.byref(got), 0) != 0:  # PyBUF_SIMPLE
        raise ValueError("the buffer gives no address")
    address = int(got.buf)
    release(ctypes.byref(got))
    return address


def wait(word: ctypes.c_uint32, seen: int, seconds: float) -> bool:
    """Sleep while ``word`` holds ``seen``, up to ``seconds``; False if the time ran out.

    Returns True at once if the word differs, and True when woken (or on a
    spurious wake-up: callers look again).  A signal ends the sleep early;
    its Python handler runs on return, and may raise.
    """
    if seconds <= 0:
        return word.value != seen
    if _NUMBER is None:
        time.sleep(min(seconds, FALLBACK_SLICE))
        return word.value != seen
    import ctypes

    spec = (ctypes.c_long * 2)(int(seconds), int((seconds - int(seconds)) * 1e9))  # timespec
    result = _syscall()(_NUMBER, ctypes.byref(word), _FUTEX_WAIT, ctypes.c_uint32(seen),
                      ctypes.byref(spec), None, 0)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.ETIMEDOUT:
        return False
    if err in (errno.EAGAIN, errno.EINTR):
        return True
    raise OSError(err, os.strerror(err))


def wake(word: ctypes.c_uint32) -> None:
    """Wake every process sleeping on ``word``."""
    if _NUMBER is not None:
        import ctypes

        _syscall()(_NUMBER, ctypes.byref(word), _FUTEX_WAKE, _WAKE_ALL, None, None, 0)
