"""The command line's shared vocabulary: argument types, usage errors, defaults.

Every subcommand (cli.py, stress.py, top.py, bench/suite.py) declares its
arguments with these types, so a size, a heap name or a number of seconds is
read, checked and refused the same way everywhere.  A type that refuses its
text raises ``argparse.ArgumentTypeError`` (argparse prints the usage and
exits 2); ``UsageError`` is the same verdict for a combination of arguments
that a command refuses after parsing.

This module owns argument parsing only; it touches no heap.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from typing import TypeAlias, TypeVar

from ..errors import InvalidParameterError, ShmHeapError
from ..names import check_arena_size, check_name

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
#: Seconds a command waits for the heap lock before it reports who holds it.
LOCK_TIMEOUT = 10.0

T = TypeVar("T")


class UsageError(InvalidParameterError):
    """A combination of arguments that no heap could make work: exit 2 with the usage."""


def argument_type(check: Callable[[str], T], name: str) -> Callable[[str], T]:
    """An argparse type that runs ``check``; its ShmHeapError becomes a usage error."""

    def convert(text: str) -> T:
        try:
            return check(text)
        except ShmHeapError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name
    return convert


def _number(text: str, kind: Callable[[str], T], what: str) -> T:
    try:
        return kind(text)
    except ValueError:
        raise InvalidParameterError(f"{text!r} is not {what}") from None


def at_least(minimum: int, most: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum`` (and <= ``most``)."""

    def check(text: str) -> int:
        value = _number(text, int, "an integer")
        if value < minimum or (most is not None and value > most):
            bound = f"from {minimum} to {most:,}" if most is not None else f">= {minimum}"
            raise InvalidParameterError(f"{value} is out of range: give an integer {bound}")
        return value

    return argument_type(check, "integer")


def parse_size(text: str) -> int:
    """Parse '64KiB', '1MiB', '65536', '2G' into bytes (binary units)."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not match:
        raise InvalidParameterError(
            f"cannot read size {text!r}: write a number with an optional unit, e.g. 64KiB or 1MiB"
        )
    return int(match.group(1)) * units[match.group(2).lower()]


def _seconds(text: str) -> float:
    value = _number(text, float, "a number of seconds")
    if not 0 < value < math.inf:
        raise InvalidParameterError(f"{text}: give a positive number of seconds")
    return value


def _rate(text: str) -> float:
    value = _number(text, float, "a rate")
    if not 0 <= value < math.inf:
        raise InvalidParameterError(f"{text}: give a number >= 0 per second")
    return value


def _factor(text: str) -> float:
    value = _number(text, float, "a factor")
    if not 0 <= value < math.inf:
        raise InvalidParameterError(f"{text}: give a factor >= 0")
    return value


def _integer(text: str) -> int:
    return _number(text, int, "an integer")


heap_name = argument_type(check_name, "heap name")
arena_size_arg = argument_type(lambda text: check_arena_size(parse_size(text)), "arena size")
seconds_arg = argument_type(_seconds, "seconds")
rate_arg = argument_type(_rate, "rate")
factor_arg = argument_type(_factor, "factor")
#: any integer: for a value whose range depends on the heap (the heap's call checks it)
integer_arg = argument_type(_integer, "integer")
