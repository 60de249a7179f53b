"""Values and workers for the put/get tests (module-level so spawned interpreters import them)."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import fractions
from multiprocessing.connection import Connection
from typing import Any

import numpy

import shmheap


@dataclasses.dataclass
class Point:
    x: int
    y: float
    tags: list[str]


def values() -> dict[str, Any]:
    """Scalars and nested containers, the same in every process."""
    return {
        "none": None, "true": True, "int": -12345678901234567890, "float": 2.5e-300,
        "complex": 1 - 2j, "str": "héllo wörld ✓", "empty str": "", "bytes": b"\0\xff" * 10,
        "long bytes": bytes(range(256)) * 40, "bytearray": bytearray(b"abc" * 500),
        "short bytearray": bytearray(b"x"), "list": [1, [2, [3, [4]]], (5, 6)],
        "dict": {"a": {"b": {"c": [1, 2, {"d": None}]}}, 7: "seven", (1, 2): frozenset({3})},
        "set": {1, "two", (3,)}, "tuple": (), "ordered": collections.OrderedDict(z=1, a=2),
        "counter": collections.Counter("mississippi"), "decimal": decimal.Decimal("1.10"),
        "fraction": fractions.Fraction(22, 7), "date": datetime.date(2026, 12, 4),
        "dataclass": Point(3, 4.5, ["p", "q"]), "range": range(3, 30, 7),
        "bytes in a list": [b"y" * 5000, b"z"],
        "arrays in a dict": {"a": numpy.arange(5), "b": [numpy.ones((2, 2))]},
    }


def arrays() -> dict[str, numpy.ndarray]:
    """Arrays of every kind numpy shares out-of-band, the same in every process."""
    structured = numpy.dtype([("id", "<u4"), ("pos", "<f8", (3,)), ("tag", "S5"),
                              ("inner", [("a", "u1"), ("b", ">i2")])], align=True)
    rec = numpy.zeros(7, structured)
    rec["id"] = numpy.arange(7)
    rec["pos"] = numpy.arange(21.0).reshape(7, 3)
    rec["tag"] = b"tag"
    rec["inner"]["b"] = -3
    found: dict[str, numpy.ndarray] = {f"dtype {code}": numpy.arange(24).astype(code).reshape(4, 6)
             for code in ("?", "i1", "u1", ">i2", "<u2", "i4", "u4", "i8", "u8", "f2", "f4",
                          ">f8", "g", "c8", "c16", "M8[ns]", "m8[s]")}
    found.update({
        "strings": numpy.array(["alpha", "β", ""]), "bytes": numpy.array([b"a", b"bc"]),
        "void": numpy.frombuffer(bytearray(range(48)), "V12"),
        "structured": rec, "fortran": numpy.asfortranarray(numpy.arange(30.0).reshape(5, 6)),
        "3-d fortran": numpy.asfortranarray(numpy.arange(60).reshape(3, 4, 5)),
        "zero-size": numpy.zeros((0, 4)), "zero-size structured": numpy.zeros(0, structured),
        "0-d": numpy.array(7.25), "big": numpy.arange(300_000, dtype="i8"),
        "one byte": numpy.array([1], "u1"),
    })
    return found


#: arrays with at least one element come back as views of the heap
def shared(array: numpy.ndarray) -> bool:
    return array.size > 0


def same(a: Any, b: Any) -> bool:
    """Equal values of the same types (arrays: same dtype, shape, order and elements)."""
    if isinstance(a, numpy.ndarray):
        raw = a.dtype.kind == "V"  # structured or void: compare their bytes, padding too
        return (isinstance(b, numpy.ndarray) and a.dtype == b.dtype and a.shape == b.shape
                and a.flags.f_contiguous == b.flags.f_contiguous
                and (a.tobytes(order="A") == b.tobytes(order="A") if raw
                     else bool(numpy.array_equal(a, b))))
    if isinstance(a, dict):
        return (type(a) is type(b) and list(a) == list(b)
                and all(same(a[k], b[k]) for k in a))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


def first_byte(array: numpy.ndarray) -> numpy.ndarray:
    """A one-byte view of the first byte of a C- or Fortran-contiguous array's memory."""
    return array.reshape(-1, order="A").view("u1")[:1]


def check_values(name: str, refs: dict[str, int], conn: Connection) -> None:
    """Get every value of ``values()`` the parent put; send the keys that differ."""
    with shmheap.Heap.attach(name) as heap:
        expected = values()
        conn.send([key for key, ref in refs.items() if not same(heap.get(ref), expected[key])])


def put_values(name: str, conn: Connection) -> None:
    """Put every value of ``values()`` and ``arrays()``; send their refs."""
    with shmheap.Heap.attach(name) as heap:
        conn.send({key: heap.put(value) for key, value in {**values(), **arrays()}.items()})


def check_arrays(name: str, refs: dict[str, int], conn: Connection) -> None:
    """Get every array of ``arrays()`` the parent put; check it is a read-only view of the
    heap; write its first byte through a writable get; send what differed."""
    problems = []
    with shmheap.Heap.attach(name) as heap:
        for key, array in arrays().items():
            got = heap.get(refs[key])
            whole = heap.ndarray(refs[key], "u1")
            if not same(got, array):
                problems.append(f"{key}: differs")
            elif got.flags.writeable:
                problems.append(f"{key}: writable without writable=True")
            elif shared(array) and not numpy.shares_memory(got, whole):
                problems.append(f"{key}: a copy, not a view of the heap")
            if shared(array):
                writable = heap.get(refs[key], writable=True)
                first_byte(writable)[0] ^= 0xFF
            del got, whole
    conn.send(problems)
