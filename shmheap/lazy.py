"""Modules imported on first use (numpy, and the package's own), never left half-imported.

``import shmheap`` does not import numpy (it would cost more than the rest of
the import); the bitmap scans (pages.py) and typed arrays (arrays.py) import
it when first needed, inside a heap call.  The package's own ``_LATER``
modules (walker, owners, coord, repair: see ``__init__.py``) come the same
way, and their first use may be a journal repair with the heap lock held.
A Python signal handler that raises (Ctrl-C's KeyboardInterrupt) runs at
whatever bytecode the main thread is at, which may be inside numpy's
``__init__``: the exception would leave numpy in ``sys.modules``
half-initialised, and every later use, by shmheap or by the program, fails
(``module 'numpy' has no attribute ...``) for the life of the process.
Removing the half-imported modules is no way out: numpy's C core cannot be
initialised twice in one process.  Inside a class body Python 3.11 does not
even report the interrupt as itself (``RuntimeError: Error calling
__set_name__``).

So ``import_whole`` defers signals for the length of the import instead.
In the main thread (the only one that runs Python signal handlers) it
replaces every Python-level handler with one that only records the signal,
imports, puts the handlers back, and then raises each recorded signal again
(``signal.raise_signal``): the program's handler runs right after the
import, with the library whole.  Handlers are saved before they are
replaced and restored in a ``finally``, so an exception at any bytecode here
leaves every handler as it was.  In other threads the import runs as is: no
handler runs there.

This module owns that import and nothing else; it imports nothing of the
package.
"""

from __future__ import annotations

import importlib
import signal
from types import ModuleType
from typing import Any

#: modules imported whole by this process (None: not installed): name -> module
_imported: dict[str, ModuleType | None] = {}


def import_whole(name: str) -> ModuleType:
    """``importlib.import_module(name)``, with signals deferred until it is done (see above).

    ModuleNotFoundError if it is not installed (looked for once per process).
    """
    if name in _imported:
        module = _imported[name]
        if module is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return module
    import threading  # (only here: it would add a millisecond to `import shmheap`)

    try:
        if threading.current_thread() is not threading.main_thread():
            module = importlib.import_module(name)
        else:
            module = _import_deferring_signals(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            _imported[name] = None
        raise
    _imported[name] = module
    return module


def _import_deferring_signals(name: str) -> ModuleType:
    deferred: list[int] = []
    saved: dict[signal.Signals, Any] = {}

    def defer(signum: int, _frame: object) -> None:
        deferred.append(signum)

    try:
        for signum in signal.valid_signals():
            handler = signal.getsignal(signum)
            if callable(handler):
                saved[signum] = handler  # before it is replaced: the finally restores it
                signal.signal(signum, defer)
        return importlib.import_module(name)
    finally:
        for replaced, handler in saved.items():
            signal.signal(replaced, handler)
        for received in dict.fromkeys(deferred):
            signal.raise_signal(received)  # the program's own handler runs now, the import done
