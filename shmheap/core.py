"""Which core runs this process: the native one (C) or its pure-Python twin.

``shmheap._native`` (``_native.c``) is built by ``pip install`` wherever a C
compiler is present; where it is missing, or ``SHMHEAP_PURE_PYTHON=1`` is set
before shmheap is imported, every hot path runs the pure-Python code that
stays beside it (as CPython keeps ``heapq`` beside ``_heapq``).  Both speak
the same protocol on the same shared memory, so native and pure processes
share a heap.  While a crash point is armed (crash.py), the lock's
instrumented Python paths run instead of the native ones.

This module owns the choice and nothing else.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

PURE_VAR = "SHMHEAP_PURE_PYTHON"


def _load() -> ModuleType | None:
    if os.environ.get(PURE_VAR, "") not in ("", "0"):
        return None
    try:
        return importlib.import_module("shmheap._native")
    except ImportError:
        return None


#: the compiled core, or None when the pure-Python twin runs
native = _load()
#: True when the compiled core is active (``shmheap.NATIVE``)
NATIVE = native is not None
