"""Scans of byte strings at C speed: where a byte value stands, where non-zero bytes stand.

Owns nothing shared and imports nothing of shmheap: the liveness slots, the summary trees and the
page metadata all find their set bytes through these two functions (``bytes.find`` and
``bytes.translate`` run in C; a Python loop over each byte would not).
"""

from __future__ import annotations

#: maps every non-zero byte to 1 and zero to 0
_NONZERO = bytes([0] + [1] * 255)


def positions(data: bytes, value: int) -> list[int]:
    """Positions of the bytes of ``data`` equal to ``value``, ascending."""
    found = []
    pos = data.find(value)
    while pos >= 0:
        found.append(pos)
        pos = data.find(value, pos + 1)
    return found


def nonzero_flags(data: bytes) -> bytes:
    """``data`` with each non-zero byte made 1 (and each zero byte left 0)."""
    return data.translate(_NONZERO)


def nonzero_positions(data: bytes) -> list[int]:
    """Positions of the non-zero bytes of ``data``, ascending."""
    return positions(nonzero_flags(data), 1)
