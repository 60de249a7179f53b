"""Typed arrays: objects that carry their numpy dtype and shape (``heap.new_array``).

``new_array(shape, dtype)`` allocates one object holding a small header and
then the array's data, aligned to ``ALIGN`` (64) bytes of the heap address
space (so of every process's mapping), zeroed as every new object is::

    off  size  field
      0     8  magic b"shmarray"
      8     8  ref          the object's own heap address
     16     4  text_len     bytes of the description below
     20     4  data_offset  where the data starts, from the object's start
     24     8  data_bytes   itemsize * prod(shape)
     32     4  crc          crc32 of bytes 8..32 and the description
     36     4  (zero)
     40     .  description  ``repr({"descr": ..., "shape": (...)})``, ASCII:
                            numpy's own dtype description
                            (``numpy.lib.format.dtype_to_descr``, as .npy
                            files store it), read back with
                            ``ast.literal_eval`` and ``descr_to_dtype``.
                            Fields out of order or overlapping, which that
                            description cannot express, are described as
                            the dict ``numpy.dtype`` takes (names, formats,
                            offsets, itemsize, titles), formats in turn

The header is written by the allocating process before ``new_array`` returns
the ref, so nobody else can see it half-written; it is never changed after.
An object is typed if its first bytes are a header whose magic, own ref and
crc agree: an untyped object whose bytes merely start like one (or a copy of
a typed object's bytes elsewhere) does not pass.  A header that passes but
describes an impossible array is HeapCorruptError.  A subarray dtype
(``"(3,)f8"``) is stored as numpy stores it in an array: its dimensions
join the shape.  Object dtypes (Python objects in shared memory) are
refused.

numpy is imported only by these calls.  This module owns the header layout;
it touches the heap only through ``heap.alloc`` and the views it is given.
"""

from __future__ import annotations

import functools
import math
import struct
import zlib
from typing import TYPE_CHECKING, Any

from .errors import HeapCorruptError, InvalidParameterError
from .lazy import import_whole

if TYPE_CHECKING:
    from .allocator import Allocator

MAGIC = b"shmarray"
HEADER = struct.Struct("<8sQIIQI4x")
#: data alignment, in heap addresses (a cache line; numpy's own alignment needs less)
ALIGN = 64
#: longest description a header may hold (a structured dtype of many fields)
MAX_TEXT = 1 << 16


def numpy_module(what: str) -> Any:
    """numpy, imported whole (lazy.py); ModuleNotFoundError saying how to get it."""
    try:
        import_whole("numpy.lib.format")  # (what _describe and _dtype_of use)
        return import_whole("numpy")
    except ImportError:
        raise ModuleNotFoundError(f"{what} needs numpy; install it with "
                                  "`pip install 'shmheap[numpy]'`") from None


def _dims(shape: object, what: str) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, int) else shape
    if not isinstance(dims, tuple | list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise InvalidParameterError(f"{what}: shape {shape!r} must be an int >= 0 or a tuple "
                                    "of them")
    return tuple(dims)


def _dtype(numpy: Any, dtype: object, what: str) -> Any:
    try:
        dt = numpy.dtype(dtype)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"{what}: {dtype!r} is not a numpy dtype ({exc})") from None
    if dt.hasobject:
        raise InvalidParameterError(f"{what}: dtype {dt} holds Python objects, which cannot "
                                    "live in shared memory; use a dtype of plain data")
    if not dt.itemsize:
        raise InvalidParameterError(f"{what}: dtype {dt} has items of 0 bytes; give a dtype "
                                    "with a size")
    return dt


def _normalised(dt: Any, dims: tuple[int, ...]) -> tuple[Any, tuple[int, ...]]:
    """A subarray dtype's dimensions join the shape (as numpy does in an array)."""
    while dt.subdtype is not None:
        dt, sub = dt.subdtype
        dims += sub
    return dt, dims


def new_array(allocator: Allocator, shape: object, dtype: object,
              timeout: float | None) -> int:
    """A zeroed typed array object from ``allocator``'s heap (see the module docstring); its ref."""
    numpy = numpy_module("Heap.new_array")
    what = "new_array"
    dt, dims = _normalised(_dtype(numpy, dtype, what), _dims(shape, what))
    text = repr({"descr": _describe(dt), "shape": dims}).encode("ascii")
    if len(text) > MAX_TEXT:
        raise InvalidParameterError(f"{what}: dtype {dt} takes {len(text)} bytes to describe, "
                                    f"more than {MAX_TEXT}; use fewer fields")
    nbytes = math.prod(dims) * dt.itemsize
    ref = allocator.alloc(HEADER.size + len(text) + ALIGN - 1 + nbytes, timeout)
    offset = HEADER.size + len(text)
    offset += -(ref + offset) % ALIGN
    view = allocator.view(ref)
    view[HEADER.size:HEADER.size + len(text)] = text
    fields = HEADER.pack(MAGIC, ref, len(text), offset, nbytes, 0)
    crc = zlib.crc32(text, zlib.crc32(fields[8:32]))
    view[:HEADER.size] = HEADER.pack(MAGIC, ref, len(text), offset, nbytes, crc)
    return ref


def _describe(dt: Any) -> object:
    """numpy's description of ``dt`` (as in .npy files), or the dict form where it has none."""
    from numpy.lib.format import dtype_to_descr

    if dt.subdtype is not None:  # a field's subarray
        base, dims = dt.subdtype
        return (_describe(base), dims)
    try:
        return dtype_to_descr(dt)
    except ValueError:  # fields out of order or overlapping
        names = list(dt.names)
        fields = [dt.fields[name] for name in names]
        return {"names": names, "formats": [_describe(field[0]) for field in fields],
                "offsets": [field[1] for field in fields], "itemsize": dt.itemsize,
                "titles": [field[2] if len(field) > 2 else None for field in fields]}


def _dtype_of(numpy: Any, descr: Any) -> Any:
    """The dtype ``_describe`` described."""
    from numpy.lib.format import descr_to_dtype

    if isinstance(descr, dict):
        return numpy.dtype({**descr, "formats": [_dtype_of(numpy, f) for f in descr["formats"]]})
    if isinstance(descr, tuple):
        return numpy.dtype((_dtype_of(numpy, descr[0]), descr[1]))
    return descr_to_dtype(descr)


def typed(view: memoryview, ref: int) -> tuple[str, int, int] | None:
    """(description, data offset, data bytes) if the object at ``ref`` is a typed array."""
    if len(view) < HEADER.size or view[:8] != MAGIC:
        return None
    _magic, own, text_len, offset, nbytes, crc = HEADER.unpack(view[:HEADER.size])
    if own != ref or text_len > min(MAX_TEXT, len(view) - HEADER.size):
        return None
    text = bytes(view[HEADER.size:HEADER.size + text_len])
    if zlib.crc32(text, zlib.crc32(bytes(view[8:32]))) != crc:
        return None
    if not HEADER.size + text_len <= offset <= offset + nbytes <= len(view):
        raise HeapCorruptError(f"the typed array at {ref:#x} has a header whose data runs past "
                               "its object; the object was overwritten")
    return text.decode("ascii", "replace"), offset, nbytes


def _described(text: str, nbytes: int, ref: int) -> tuple[Any, tuple[int, ...]]:
    """The dtype and shape a header's description gives; HeapCorruptError if impossible."""
    found = _parsed(text)
    if found is None:
        raise HeapCorruptError(f"the typed array at {ref:#x} has an unreadable description; "
                               "the object was overwritten")
    dt, dims = found
    if math.prod(dims) * dt.itemsize != nbytes:
        raise HeapCorruptError(f"the typed array at {ref:#x} describes {dt} x {dims}, which "
                               f"is not its {nbytes} bytes of data")
    return dt, dims


@functools.lru_cache(maxsize=256)
def _parsed(text: str) -> tuple[Any, tuple[int, ...]] | None:
    """(dtype, shape) of a description, None if it is not one (cached: dtypes are immutable)."""
    import ast  # (numpy needs it anyway; ``import shmheap`` does not)

    numpy = numpy_module("Heap.ndarray")
    try:
        found = ast.literal_eval(text)
        dt = _dtype_of(numpy, found["descr"])
        dims = _dims(found["shape"], "header")
    except Exception:  # literal_eval, descr_to_dtype: anything malformed text can raise
        return None
    return None if dt.hasobject else (dt, dims)


def ndarray(view: memoryview, ref: int, dtype: object, shape: object) -> Any:
    """The array over the object ``view`` at ``ref``: typed, or ``dtype``/``shape`` given."""
    numpy = numpy_module("Heap.ndarray")
    header = typed(view, ref)
    if header is None:
        if dtype is None:
            raise InvalidParameterError(
                f"ndarray({ref:#x}): the object records no dtype (it was not made by "
                "new_array); pass the dtype (and shape) to view it as")
        return as_ndarray(view, dtype, shape)
    text, offset, nbytes = header
    dt, dims = _described(text, nbytes, ref)
    what = f"ndarray({ref:#x})"
    if dtype is not None:
        given, _ = _normalised(_dtype(numpy, dtype, what), ())
        if given != dt:
            raise InvalidParameterError(f"{what}: the array was made with dtype {dt}, not "
                                        f"{given}; leave dtype out to get it as it is")
    if shape is not None and _dims(shape, what) != dims:
        raise InvalidParameterError(f"{what}: the array was made with shape {dims}, not "
                                    f"{shape!r}; leave shape out to get it as it is")
    count = math.prod(dims)
    try:
        return numpy.frombuffer(view, dt, count, offset).reshape(dims)
    except (ValueError, OverflowError) as exc:  # too many dimensions, one past intp, ...
        raise HeapCorruptError(f"the typed array at {ref:#x} describes shape {dims}, which "
                               f"numpy cannot make ({exc}); the object was overwritten") from None


def as_ndarray(view: memoryview, dtype: object, shape: object) -> Any:
    """A numpy array over ``view`` with no copy: all of it, or the first ``shape`` items."""
    numpy = numpy_module("Heap.ndarray")
    itemsize = _dtype(numpy, dtype, "ndarray").itemsize
    if shape is None:
        return numpy.frombuffer(view, dtype, len(view) // itemsize)
    dims = _dims(shape, "ndarray")
    count = math.prod(dims)
    if count * itemsize > len(view):
        raise InvalidParameterError(
            f"ndarray: shape {shape!r} of {dtype!r} needs {count * itemsize} bytes, the object "
            f"has {len(view)}")
    return numpy.frombuffer(view, dtype, count).reshape(dims)
