"""``shmheap top NAME``: a live view of one heap, refreshed about once a second.

Each refresh takes one ``Sample``:

* one ``heap.info()``: the heap lock is held once, briefly, as an observer's
  snapshot holds it (arenas, index generations, capacity and bytes, reserved
  bytes, the recorded lock owner, recoveries);
* the semaphore's value, to tell a free lock from a taken one (the owner
  record means something only while the semaphore is taken);
* the attached processes, read from the liveness slots without a lock
  (``liveness.probe_attachments``);
* with the allocator, ``heap.stats()``: one more snapshot, then the arenas'
  page metadata read with no lock.

top attaches ``readonly=True`` and writes nothing to the heap but what every
attacher writes: its own liveness slot, and the owner record while it holds
the lock.  Between refreshes it shows the growth of arenas per second.

On a terminal with ``rich`` installed the block is redrawn in place
(``rich.live``); otherwise one plain block is printed per refresh.  Ctrl-C
ends top (exit 0).  If the heap is destroyed while top runs (its control
segment is gone from /dev/shm, or belongs to a new heap of the same name),
top prints a last line and exits 0.

This module owns the sampling and the display.  It uses the heap through its
public API, plus ``heap._lock.semaphore_value()``; it never changes a heap.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import segments
from .errors import HeapNotFoundError, InvalidParameterError, LockTimeoutError
from .heap import Heap, HeapInfo
from .liveness import Attachment, probe_attachments
from .lock import HeapLock
from .names import control_name, format_size

if TYPE_CHECKING:
    from .cli import Subparsers
    from .walker import HeapStats

#: Default seconds between refreshes.
INTERVAL = 1.0
#: Least seconds a refresh waits for the heap lock before it shows who holds it.
MIN_LOCK_WAIT = 1.0
#: Attached processes listed by pid; the rest are counted.
MAX_PIDS_SHOWN = 8


@dataclass(frozen=True)
class Sample:
    """What one refresh saw."""

    #: time.monotonic() when the sample was taken
    at: float
    info: HeapInfo
    #: True if the semaphore was free (then ``info.lock_owner_pid`` means nothing)
    lock_free: bool
    attachments: list[Attachment]
    #: None if the heap has no allocator
    stats: HeapStats | None


def take_sample(heap: Heap, lock_wait: float) -> Sample:
    """One look at ``heap``: one ``info()``, the semaphore, the slots and the stats."""
    info = heap.info(timeout=lock_wait)
    lock = heap._lock
    assert isinstance(lock, HeapLock)  # info() succeeded: the heap is open
    lock_free = lock.semaphore_value() > 0
    attachments = probe_attachments(heap.name)
    stats = heap.stats() if hasattr(heap, "stats") else None
    return Sample(time.monotonic(), info, lock_free, attachments, stats)


# -- rendering ---------------------------------------------------------------------------


def clock(ns: int) -> str:
    """Wall-clock ``ns`` as local HH:MM:SS."""
    return time.strftime("%H:%M:%S", time.localtime(ns / 1e9))


def ago(ns: int) -> str:
    return f"{max(0.0, time.time() - ns / 1e9):.1f} s ago"


def lock_line(sample: Sample) -> str:
    if sample.lock_free:
        return "free"
    pid = sample.info.lock_owner_pid
    return f"held by pid {pid}" if pid else "held (the holder has not recorded itself yet)"


def recoveries_line(info: HeapInfo) -> str:
    if not info.recoveries:
        return f"0; repairs {info.repairs}"
    return (f"{info.recoveries}, the last at {clock(info.last_recovery_ns)} "
            f"({ago(info.last_recovery_ns)}); repairs {info.repairs}")


def attached_line(attachments: list[Attachment]) -> str:
    shown = [f"{a.pid}{' (this top)' if a.pid == os.getpid() else ''} since "
             f"{clock(a.attached_ns)}" for a in attachments[:MAX_PIDS_SHOWN]]
    more = len(attachments) - len(shown)
    return f"{len(attachments)}: " + ", ".join(shown + ([f"and {more} more"] if more else []))


def growth(sample: Sample, previous: Sample | None) -> str:
    """Arenas added per second since the previous sample."""
    if previous is None or sample.at <= previous.at:
        return "-"
    return f"{(sample.info.arenas - previous.info.arenas) / (sample.at - previous.at):+.1f}/s"


def objects_line(stats: HeapStats) -> str:
    return (f"in use {format_size(stats.in_use_bytes)}, free {format_size(stats.free_bytes)}, "
            f"released {format_size(stats.released_bytes)}; {stats.live_objects:,} objects "
            f"({format_size(stats.live_bytes)})")


def render(sample: Sample, previous: Sample | None, interval: float) -> str:
    """The block of one refresh: a title line, then aligned ``label  value`` rows."""
    info = sample.info
    rows = [
        ("arenas", f"{info.arenas:,} of {info.max_arenas - 1:,}, "
                   f"{format_size(info.arena_size)} each; growth {growth(sample, previous)}"),
        ("index", f"{info.index_len:,} entries, cap {info.index_cap:,}; generations "
                  f"{info.index_generations}, {format_size(info.index_bytes)} in all"),
        ("reserved", format_size(info.reserved_bytes)),
        ("lock", lock_line(sample)),
        ("recoveries", recoveries_line(info)),
        ("attached", attached_line(sample.attachments)),
        ("roots", f"{info.roots:,} bound"),
    ]
    if sample.stats is not None:
        rows.append(("objects", objects_line(sample.stats)))
    return "\n".join([title(info.name, interval)]
                     + [f"{label:<11} {value}" for label, value in rows])


def title(name: str, interval: float) -> str:
    return f"shmheap top {name}: {time.strftime('%H:%M:%S')}, every {interval:g} s (Ctrl-C quits)"


# -- the screen and the command ----------------------------------------------------------


class Screen:
    """``show(block)`` redraws ``block`` in place (rich on a terminal) or prints it."""

    def __init__(self, live: bool) -> None:
        self.live: Any = None
        self.text: Any = None
        if live and sys.stdout.isatty():
            try:
                from rich.live import Live
                from rich.text import Text
            except ImportError:
                return
            self.live = Live("", auto_refresh=False)
            self.text = Text
            self.live.start()

    def show(self, block: str) -> None:
        if self.live is not None:
            self.live.update(self.text(block), refresh=True)
        else:
            print(block + "\n", flush=True)

    def __enter__(self) -> Screen:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.stop()


def control_identity(name: str) -> tuple[int, int] | None:
    """(device, inode) of heap ``name``'s control segment, None if it is gone."""
    try:
        stat = os.stat(segments.path_of(control_name(name)))
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def watch(heap: Heap, interval: float, once: bool) -> None:
    """Show ``heap`` every ``interval`` seconds (once with ``once``) until it is destroyed."""
    identity = control_identity(heap.name)
    lock_wait = max(interval, MIN_LOCK_WAIT)
    previous = None
    with Screen(live=not once) as screen:
        while control_identity(heap.name) == identity:
            try:
                sample = take_sample(heap, lock_wait)
            except HeapNotFoundError:
                break
            except LockTimeoutError as exc:
                screen.show(f"{title(heap.name, interval)}\nlock        {exc}")
            else:
                screen.show(render(sample, previous, interval))
                previous = sample
            if once:
                return
            time.sleep(interval)
    print(f"heap {heap.name!r} was destroyed; top stops", flush=True)


def add_top(sub: Subparsers) -> None:
    parser = sub.add_parser("top", help="watch a heap: arenas, index, lock, processes")
    parser.add_argument("name")
    parser.add_argument("--interval", type=float, default=INTERVAL,
                        help=f"seconds between refreshes (default {INTERVAL:g})")
    parser.add_argument("--once", action="store_true", help="print one block and exit")
    parser.set_defaults(run=run_top)


def run_top(args: argparse.Namespace) -> int:
    if not args.interval > 0:
        raise InvalidParameterError(f"--interval {args.interval}: give a positive number of "
                                    "seconds")
    with Heap.attach(args.name, readonly=True) as heap, \
            contextlib.suppress(KeyboardInterrupt):
        watch(heap, args.interval, args.once)
    return 0
