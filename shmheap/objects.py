"""Python values in the heap: ``heap.put(obj)`` stores one, ``heap.get(ref)`` loads it.

A value is pickled with protocol 5; its *out-of-band buffers* (numpy arrays,
``bytearray``, ``memoryview``, ``pickle.PickleBuffer``, a ``bytes`` value
that is the whole object, anything whose reduction yields a PickleBuffer)
are not copied into the pickle stream but written once, straight from their
own memory, into the same heap object as the stream.  ``get`` hands
pickle those buffers as views of the heap, so a numpy array comes back as a
zero-copy view (read-only unless ``writable=True``, and read-only anyway if
it was read-only when put: pickle records that), in any process; a
``bytes`` or ``bytearray`` comes back as one (they own their memory, so that
is one copy), a ``memoryview`` as a view.  ``bytes`` inside a container are
pickled in-band (pickle dispatches on exact ``bytes`` before any hook).

One object (an ordinary ``alloc``: small, large or giant by its size)
holds the whole value, so ``heap.free(ref)`` frees it with its buffers and
a value costs one allocation::

    off   size  field
      0      8  magic b"shmpickl"
      8      8  ref        the object's own heap address
     16      4  buffers    how many out-of-band buffers there are (b)
     20      4  crc        crc32 of bytes 8..20, 24..32 and the table
     24      8  pickled    bytes of the pickle stream
     32   16 b  table      per buffer: offset from the object's start (u64), length (u64)
      .      .  the pickle stream
      .      .  each buffer, at a heap address that is a multiple of 64

The record is written by the putting process before ``put`` returns the ref
and never changed after, so nobody can see it half-written.  ``get`` checks
the magic, own ref, crc and every offset against the object's length before
it uses them: a record that fails is HeapCorruptError, an object that never
was one InvalidRefError.  The views ``get`` returns keep the object's memory
mapped (the arena, or a giant object's run) as every view does; after
``heap.free(ref)`` they show whatever reuses that memory.

This module owns the record layout; it touches the heap only through the
allocator's ``alloc``, ``view`` and ``free``.
"""

from __future__ import annotations

import io
import pickle
import struct
import threading
import weakref
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import HeapCorruptError, InvalidParameterError, InvalidRefError, ReadOnlyError

if TYPE_CHECKING:
    from .allocator import Allocator

MAGIC = b"shmpickl"
HEADER = struct.Struct("<8sQIIQ")
ENTRY = struct.Struct("<QQ")
#: buffers start at heap addresses that are multiples of this (a cache line)
ALIGN = 64
#: a whole ``bytes`` value at least this long is stored out-of-band
OUT_OF_BAND_BYTES = 1024


def restore_view(buffer: Any, fmt: str, shape: tuple[int, ...]) -> memoryview:
    """A memoryview of ``buffer`` with the format and shape of the one that was put."""
    view = memoryview(buffer)
    if fmt == "B" and len(shape) == 1:
        return view
    cast: Any = view.cast("B").cast  # (typeshed lists only some formats)
    restored: memoryview = cast(fmt, shape)
    return restored


def _reduce_memoryview(view: memoryview) -> tuple[Any, ...]:
    data = view if view.c_contiguous else memoryview(view.tobytes())  # a copy, in C order
    fmt, shape = view.format, tuple(view.shape or ())
    try:
        cast: Any = memoryview(bytes(view.itemsize)).cast
        cast(fmt)
    except (TypeError, ValueError):  # a format cast() cannot make: keep the bytes
        fmt, shape = "B", (view.nbytes,)
    return restore_view, (pickle.PickleBuffer(data), fmt, shape)


def as_dtype(array: Any, dtype: Any) -> Any:
    """``array`` (of 8-byte integers) viewed as the datetime or timedelta dtype it was put as."""
    return array.view(dtype)


class _Pickler(pickle.Pickler):
    """Protocol 5 with ``bytearray``, ``memoryview`` and datetime arrays out-of-band too."""

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind.__name__ == "ndarray" and kind.__module__ == "numpy":
            if obj.dtype.kind in "Mm":  # no buffer protocol for these: share them as integers
                return as_dtype, (obj.view(obj.dtype.str[0] + "i8"), obj.dtype)
            return NotImplemented
        if kind is bytearray:
            return bytearray, (pickle.PickleBuffer(obj),)
        if kind is memoryview:
            return _reduce_memoryview(obj)
        if kind is _WholeBytes:
            return bytes, (pickle.PickleBuffer(obj.value),)
        return NotImplemented


class _WholeBytes:
    """A ``bytes`` value put whole (exact ``bytes`` never reach ``reducer_override``)."""

    __slots__ = ("value",)

    def __init__(self, value: bytes) -> None:
        self.value = value


class _Dumper(threading.local):
    """One reusable pickler per thread (making one costs more than pickling a small dict)."""

    def __init__(self) -> None:
        self.stream = io.BytesIO()
        self.buffers: list[pickle.PickleBuffer] = []
        self.pickler = _Pickler(self.stream, pickle.HIGHEST_PROTOCOL, buffer_callback=self.keep)
        self.busy = False

    def keep(self, buffer: pickle.PickleBuffer) -> bool:
        """Out of band if its memory is contiguous (False), else in the stream (True)."""
        try:
            buffer.raw().release()
        except BufferError:
            return True
        self.buffers.append(buffer)
        return False


_dumpers = _Dumper()


def put(allocator: Allocator, obj: object, timeout: float | None = None) -> int:
    """Store ``obj`` in one new object (see the module docstring); its ref."""
    dumper = _dumpers if not _dumpers.busy else _Dumper()  # a reducer that puts, too
    dumper.busy = True
    try:
        stream, buffers = dumper.stream, dumper.buffers
        stream.seek(0)
        stream.truncate()
        buffers.clear()
        dumper.pickler.clear_memo()
        value = _WholeBytes(obj) if type(obj) is bytes and len(obj) >= OUT_OF_BAND_BYTES else obj
        try:
            dumper.pickler.dump(value)
        except (pickle.PicklingError, TypeError, AttributeError, RecursionError) as exc:
            raise InvalidParameterError(
                f"put(): a {type(obj).__name__} cannot be pickled ({exc}); store picklable "
                "values only") from None
        with stream.getbuffer() as pickled:
            raws = [buffer.raw() for buffer in buffers]
            try:
                return _write(allocator, pickled, raws, timeout)
            finally:
                for raw in raws:
                    raw.release()
    finally:
        buffers.clear()
        dumper.busy = False


def _write(allocator: Allocator, pickled: memoryview, raws: list[memoryview],
           timeout: float | None) -> int:
    """Allocate the record for ``pickled`` and ``raws`` and write it; its ref."""
    stream_at = HEADER.size + ENTRY.size * len(raws)
    padding = (ALIGN - 1) * len(raws)
    ref = allocator.alloc(stream_at + len(pickled) + sum(len(raw) for raw in raws) + padding,
                          timeout)
    try:
        view = allocator.view(ref)
        table = bytearray()
        at = stream_at + len(pickled)
        for raw in raws:
            at = ((ref + at + ALIGN - 1) & -ALIGN) - ref
            view[at:at + len(raw)] = raw
            table += ENTRY.pack(at, len(raw))
            at += len(raw)
        view[stream_at:stream_at + len(pickled)] = pickled
        fields = struct.pack("<QI", ref, len(raws)), struct.pack("<Q", len(pickled))
        crc = zlib.crc32(table, zlib.crc32(fields[1], zlib.crc32(fields[0])))
        view[HEADER.size:stream_at] = table
        view[:HEADER.size] = HEADER.pack(MAGIC, ref, len(raws), crc, len(pickled))
        view.release()
    except BaseException:
        allocator.free(ref)
        raise
    return ref


def get(allocator: Allocator, ref: int, writable: bool = False,
        timeout: float | None = None, gone: Callable[[], object] | None = None) -> Any:
    """The value stored at ``ref`` by ``put``; its buffers are views of the heap.

    ``gone`` (a writable handle's): called once no view of the object is left,
    the value's buffers and every view made from them (its buffers are views
    of one ctypes array over the object, whose collection calls it).
    """
    view = allocator.view(ref, timeout)
    if writable and view.readonly:
        raise ReadOnlyError(f"get({ref:#x}, writable=True): heap {allocator.heap.name!r} is "
                            "attached readonly; attach it writable, or get read-only views")
    if gone is not None:
        import ctypes  # (only here: importing it costs milliseconds)

        owner = (ctypes.c_char * len(view)).from_buffer(view)
        weakref.finalize(owner, gone).atexit = False  # (at exit: the process's, reclaim's)
        view = memoryview(owner).cast("B")  # (views of it keep the array, not the mapping)
    stream, buffers = _parts(view, ref, allocator.heap.name)
    if not writable:
        buffers = [buffer.toreadonly() for buffer in buffers]
    try:
        return pickle.loads(stream, buffers=buffers)
    except (pickle.UnpicklingError, EOFError) as exc:
        raise HeapCorruptError(f"heap {allocator.heap.name!r}: the value at {ref:#x} does not "
                               f"unpickle ({exc}); run `shmheap fsck {allocator.heap.name}`"
                               ) from None


def _parts(view: memoryview, ref: int, heap_name: str) -> tuple[memoryview, list[memoryview]]:
    """(pickle stream, buffers) of the record ``view`` at ``ref``, every number checked."""
    size = len(view)
    if size < HEADER.size or view[:8] != MAGIC:
        raise InvalidRefError(f"get({ref:#x}): the object there was not made by put() "
                              "(use view() or ndarray() for it)")
    _magic, own, count, crc, pickled = HEADER.unpack(view[:HEADER.size])
    stream_at = HEADER.size + ENTRY.size * count
    if own != ref or stream_at > size:
        raise InvalidRefError(f"get({ref:#x}): the object there was not made by put() (its "
                              "bytes merely start like a record)")
    table = bytes(view[HEADER.size:stream_at])
    if zlib.crc32(table, zlib.crc32(bytes(view[24:32]), zlib.crc32(bytes(view[8:20])))) != crc:
        raise InvalidRefError(f"get({ref:#x}): the object there was not made by put() (its "
                              "record does not check out)")
    corrupt = HeapCorruptError(f"heap {heap_name!r}: the record of the value at {ref:#x} "
                               f"points past its {size} bytes; run `shmheap fsck {heap_name}`")
    if stream_at + pickled > size:
        raise corrupt
    buffers = []
    for at, length in ENTRY.iter_unpack(table):
        if not stream_at + pickled <= at <= at + length <= size:
            raise corrupt
        buffers.append(view[at:at + length])
    return view[stream_at:stream_at + pickled], buffers
