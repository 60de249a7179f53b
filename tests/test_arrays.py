"""Typed arrays: ``heap.new_array(shape, dtype)`` objects that ``heap.ndarray(ref)`` returns
with their shape and dtype in any process, structured dtypes included."""

from __future__ import annotations

import json
import zlib

import numpy
import pytest
from children import run_child

import shmheap
from shmheap import arrays
from shmheap.pytest_plugin import HeapFactory

ARENA = 1 << 20

STRUCTURED = [
    numpy.dtype([("id", "<u4"), ("pos", "<f8", (3,)), ("tag", "S5"), ("ok", "?")]),
    numpy.dtype([("a", "u1"), ("b", "<f8")], align=True),       # padding between fields
    numpy.dtype({"names": ["x", "y"], "formats": ["<i4", ">f4"], "offsets": [8, 0],
                 "itemsize": 16}),                               # offsets out of order
    numpy.dtype([("outer", [("inner", "<i2", (2,)), ("c", "U3")])]),
    numpy.dtype({"names": ["lo", "all"], "formats": ["<u2", ("<u1", (4,))],
                 "offsets": [0, 0], "titles": ["low half", None]}),   # overlapping, a title
]


@pytest.fixture
def heap(shm_heap_factory: HeapFactory) -> shmheap.Heap:
    return shm_heap_factory(arena_size=ARENA, reserve=False)


@pytest.mark.parametrize("dtype", ["float64", ">i2", "c16", "M8[ns]", "U7", "V12", "?",
                                   *STRUCTURED], ids=str)
@pytest.mark.parametrize("shape", [(3, 4), 5, (), (0, 3)], ids=str)
def test_new_array_is_zeroed_aligned_and_knows_its_shape_and_dtype(
        heap: shmheap.Heap, dtype: object, shape: int | tuple[int, ...]) -> None:
    ref = heap.new_array(shape, dtype)
    array = heap.ndarray(ref)
    want = numpy.zeros(shape, dtype)  # type: ignore[call-overload]
    assert array.dtype == want.dtype and array.shape == want.shape
    assert array.tobytes() == want.tobytes()                 # zeroed
    assert array.ctypes.data % arrays.ALIGN == 0
    if array.size:                                           # a view of the object, no copy
        array.reshape(-1).view(numpy.uint8)[-1] = 7
        assert heap.ndarray(ref).reshape(-1).view(numpy.uint8)[-1] == 7
    assert heap.ndarray(ref, dtype, shape).shape == want.shape  # agreeing arguments are fine


def test_subarray_dtypes_join_the_shape_as_in_numpy(heap: shmheap.Heap) -> None:
    ref = heap.new_array((2,), "(3,)f8")
    assert list(heap.ndarray(ref).shape) == [2, 3] == list(numpy.zeros(2, "(3,)f8").shape)
    assert heap.ndarray(ref).dtype == numpy.float64


def test_structured_arrays_written_in_one_process_read_in_another(heap: shmheap.Heap) -> None:
    dtype = STRUCTURED[0]
    ref = heap.new_array((4, 2), dtype)
    heap.roots["table"] = ref
    out = run_child(f"""
import json, shmheap
h = shmheap.Heap.attach({heap.name!r})
a = h.ndarray(h.roots["table"])
a["id"] = [[1, 2], [3, 4], [5, 6], [7, 8]]
a["pos"][2, 1] = (0.5, 1.5, 2.5)
a["tag"][3, 0] = b"hello"
a["ok"][1] = True
print(json.dumps([str(a.dtype), list(a.shape)]))
h.close()
""")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [str(dtype), [4, 2]]
    array = heap.ndarray(ref)
    assert array["id"].tolist() == [[1, 2], [3, 4], [5, 6], [7, 8]]
    assert array["pos"][2, 1].tolist() == [0.5, 1.5, 2.5]
    assert array["tag"][3, 0] == b"hello" and array["ok"][1].tolist() == [True, True]
    reader = run_child(f"""
import shmheap
h = shmheap.Heap.attach({heap.name!r}, readonly=True)
a = h.ndarray(h.roots["table"])
print(a.flags.writeable, int(a["id"].sum()), a["tag"][3, 0].decode())
h.close()
""")
    assert reader.stdout.split() == ["False", "36", "hello"], reader.stderr


def test_disagreeing_dtype_or_shape_is_an_invalid_parameter(heap: shmheap.Heap) -> None:
    ref = heap.new_array((3, 4), "<f4")
    for dtype, shape in (("<f8", None), ("<i4", None), (None, (4, 3)), (None, 12),
                         ("<f4", (3, 5))):
        with pytest.raises(shmheap.InvalidParameterError, match="was made with"):
            heap.ndarray(ref, dtype, shape)
    assert heap.ndarray(ref, "<f4").shape == (3, 4)


def test_untyped_objects_keep_working_and_need_a_dtype(heap: shmheap.Heap) -> None:
    ref = heap.alloc(96)
    assert heap.ndarray(ref, "float64", 12).shape == (12,)
    assert heap.ndarray(ref, "u1").shape == (heap.nbytes(ref),)
    with pytest.raises(shmheap.InvalidParameterError, match="records no dtype"):
        heap.ndarray(ref)


def test_a_copy_of_a_typed_header_elsewhere_is_not_typed(heap: shmheap.Heap) -> None:
    typed = heap.new_array(4, "i8")
    other = heap.alloc(heap.nbytes(typed))
    heap.view(other)[:] = heap.view(typed)  # the header names its own address, not this one
    with pytest.raises(shmheap.InvalidParameterError, match="records no dtype"):
        heap.ndarray(other)


@pytest.mark.parametrize("dtype", ["O", [("a", "i4"), ("b", "O")], "not a dtype", "V0"])
def test_dtypes_that_cannot_live_in_shared_memory_are_refused(heap: shmheap.Heap,
                                                              dtype: object) -> None:
    with pytest.raises(shmheap.InvalidParameterError):
        heap.new_array(3, dtype)
    with pytest.raises(shmheap.InvalidParameterError):
        heap.ndarray(heap.alloc(64), dtype)


@pytest.mark.parametrize("shape", [-1, (2, -1), 2.5, "3", (True,), None])
def test_bad_shapes_are_refused(heap: shmheap.Heap, shape: object) -> None:
    with pytest.raises(shmheap.InvalidParameterError, match="shape"):
        heap.new_array(shape, "f8")  # type: ignore[arg-type]


def test_an_array_larger_than_an_arena_is_one_array_over_consecutive_arenas(
        heap: shmheap.Heap) -> None:
    count = 3 * ARENA // 8 + 1000                 # its data alone takes more than 3 arenas
    ref = heap.new_array((count // 4, 4), "f8")
    array = heap.ndarray(ref)
    assert array.shape == (count // 4, 4) and array.flags.c_contiguous
    assert heap.size_of(ref) > 3 * ARENA and ref % ARENA == 0
    array.reshape(-1)[:] = numpy.arange(count)
    again = heap.ndarray(ref).reshape(-1)
    assert again[ARENA // 8 - 1] == ARENA // 8 - 1 and again[-1] == count - 1
    assert array.ctypes.data % arrays.ALIGN == 0


def test_a_damaged_description_is_heap_corrupt(heap: shmheap.Heap) -> None:
    ref = heap.new_array(4, "i8")
    view = heap.view(ref)
    text_len = arrays.HEADER.unpack(view[:arrays.HEADER.size])[2]
    text = b"{'descr': '<q8', 'shape': (1, 2, 3)}"[:text_len].ljust(text_len)
    view[arrays.HEADER.size:arrays.HEADER.size + text_len] = text
    fields = bytearray(view[:arrays.HEADER.size])
    crc = zlib.crc32(text, zlib.crc32(bytes(fields[8:32])))
    view[32:36] = crc.to_bytes(4, "little")  # a header that checks, describing nonsense
    with pytest.raises(shmheap.HeapCorruptError, match="typed array"):
        heap.ndarray(ref)


@pytest.mark.parametrize("shape", [(1,) * 70, (0, 1 << 70)], ids=["70-dims", "past-intp"])
def test_a_forged_shape_numpy_cannot_make_is_heap_corrupt(heap: shmheap.Heap,
                                                          shape: tuple[int, ...]) -> None:
    ref = heap.alloc(1024)
    view = heap.view(ref)
    text = repr({"descr": "|u1", "shape": shape}).encode()
    nbytes = 1 if len(shape) == 70 else 0
    offset = arrays.HEADER.size + len(text)
    fields = arrays.HEADER.pack(arrays.MAGIC, ref, len(text), offset, nbytes, 0)
    crc = zlib.crc32(text, zlib.crc32(fields[8:32]))
    view[:arrays.HEADER.size] = arrays.HEADER.pack(arrays.MAGIC, ref, len(text), offset,
                                                   nbytes, crc)
    view[arrays.HEADER.size:offset] = text      # a header that checks, of a shape forged
    with pytest.raises(shmheap.HeapCorruptError, match="typed array"):
        heap.ndarray(ref)


def test_without_numpy_the_error_says_to_install_it(heap: shmheap.Heap) -> None:
    proc = run_child(f"""
import sys
sys.modules["numpy"] = None  # import numpy fails, as where it is not installed
import shmheap
h = shmheap.Heap.attach({heap.name!r})
ref = h.alloc(64)
h.roots["x"] = ref                     # roots need no numpy
for call in (lambda: h.new_array(3, "f8"), lambda: h.ndarray(ref, "f8")):
    try:
        call()
    except ModuleNotFoundError as exc:
        print(exc)
h.close()
""")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all("pip install 'shmheap[numpy]'" in line for line in lines)


def test_numpy_integers_are_refs_too(heap: shmheap.Heap) -> None:
    ref = heap.new_array(3, "f8")
    heap.roots["np"] = numpy.int64(ref)  # type: ignore[assignment]
    assert heap.roots["np"] == ref and type(heap.roots["np"]) is int
    assert heap.ndarray(numpy.uint64(ref)).shape == (3,)  # type: ignore[arg-type]
