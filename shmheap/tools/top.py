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
  page metadata read with no lock; and ``heap.bytes_by_owner()``: another
  walk, reading the objects' holder words with no lock.

top attaches ``readonly=True`` and writes nothing to the heap but what every
attacher writes: its own liveness slot, and the owner record while it holds
the lock.  It shows the growth of arenas per second between two samples: the
first refresh says "n/a (one sample)", and ``--once`` takes two samples
``--interval`` apart and shows the second.  ``shmheap info`` shows the same
rows (``state_rows``) from one sample.

On a terminal with ``rich`` installed the block is redrawn in place
(``rich.live``); otherwise one plain block is printed per refresh.  Ctrl-C
ends top (exit 0); it is taken between refreshes, never inside one
(interrupt.py).  If the heap is destroyed while top runs (its control
segment is gone from /dev/shm, or belongs to a new heap of the same name),
top prints a last line and exits 0.

This module owns the sampling and the display.  It uses the heap through its
public API, plus ``heap._lock.semaphore_value()``; it never changes a heap.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import segments
from ..errors import HeapNotFoundError, LockTimeoutError
from ..heap import Heap, HeapInfo
from ..liveness import Attachment, probe_attachments
from ..lock import HeapLock
from ..names import control_name, usable_arenas
from ..owners import OwnerBytes
from . import collect
from .args import Subparsers, heap_name, seconds_arg
from .display import Live, clock, format_size, when
from .interrupt import CtrlC

if TYPE_CHECKING:
    from ..walker import HeapStats

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
    #: the heap reserves each arena's memory when it grows it (else arenas are sparse)
    reserve: bool
    #: bytes of memory the heap's objects take in /dev/shm
    shm_bytes: int
    #: live objects and bytes per owner (owners.py), None if the heap has no allocator
    owners: dict[str, OwnerBytes] | None = None


def take_sample(heap: Heap, lock_wait: float) -> Sample:
    """One look at ``heap``: one ``info()``, the semaphore, the slots, the stats, /dev/shm."""
    info = heap.info(timeout=lock_wait)
    lock = heap._lock
    assert isinstance(lock, HeapLock)  # info() succeeded: the heap is open
    lock_free = lock.semaphore_value() > 0
    attachments = probe_attachments(heap.name)
    stats = heap.stats() if hasattr(heap, "stats") else None
    owners = heap.bytes_by_owner(lock_wait) if hasattr(heap, "bytes_by_owner") else None
    return Sample(time.monotonic(), info, lock_free, attachments, stats, heap.params.reserve,
                  collect.shm_bytes(heap.name), owners)


# -- rendering (``shmheap info`` shows the same rows) ------------------------------------


def arenas_line(info: HeapInfo) -> str:
    return (f"{info.arenas:,} of at most {usable_arenas(info.max_arenas):,}, "
            f"{format_size(info.arena_size)} each")


def index_line(info: HeapInfo) -> str:
    generations = "generation" if info.index_generations == 1 else "generations"
    return (f"{info.index_len:,} entries, capacity {info.index_cap:,}; "
            f"{info.index_generations} {generations}, {format_size(info.index_bytes)} in all")


def memory_line(sample: Sample) -> str:
    """Memory used in /dev/shm beside the arenas' segments, reserved or sparse."""
    segments_size = format_size(sample.info.reserved_bytes)
    arenas = (f"{segments_size} reserved for arenas" if sample.reserve else
              f"arenas are sparse ({segments_size} if every page were touched)")
    return f"{format_size(sample.shm_bytes)} used in /dev/shm; {arenas}"


def lock_line(sample: Sample) -> str:
    if sample.lock_free:
        return "free"
    pid = sample.info.lock_owner_pid
    return f"held by pid {pid}" if pid else "held (the holder has not recorded itself yet)"


def recoveries_line(info: HeapInfo) -> str:
    if not info.recoveries:
        return f"0; repairs {info.repairs}"
    return (f"{info.recoveries}, the last at {when(info.last_recovery_ns)}; "
            f"repairs {info.repairs}")


def attached_line(attachments: list[Attachment]) -> str:
    if not attachments:
        return "none"
    shown = [f"{a.pid}{' (this top)' if a.pid == os.getpid() else ''} since "
             f"{clock(a.attached_ns)}" for a in attachments[:MAX_PIDS_SHOWN]]
    more = len(attachments) - len(shown)
    return f"{len(attachments)}: " + ", ".join(shown + ([f"and {more} more"] if more else []))


def objects_line(stats: HeapStats) -> str:
    return (f"in use {format_size(stats.in_use_bytes)}, free {format_size(stats.free_bytes)}, "
            f"released {format_size(stats.released_bytes)}; {stats.live_objects:,} objects "
            f"({format_size(stats.live_bytes)})")


def owners_line(owners: dict[str, OwnerBytes]) -> str:
    """Live bytes of live owners, of dead ones (``reclaim()`` frees those), and held ones."""
    parts = []
    for what, chosen in (("alive", lambda name, o: o.alive and name != "held"),
                         ("dead", lambda name, o: not o.alive),
                         ("held by roots and queues", lambda name, o: name == "held")):
        found = [o for name, o in owners.items() if chosen(name, o)]
        count = sum(o.objects for o in found)
        owners_text = "" if what.startswith("held") else (
            f"{len(found)} owner{'s' if len(found) != 1 else ''}, ")
        parts.append(f"{what} {format_size(sum(o.bytes for o in found))} "
                     f"({owners_text}{count:,} objects)")
    return "; ".join(parts)


def state_rows(sample: Sample, attachments: list[Attachment]) -> list[tuple[str, str]]:
    """The rows top and ``shmheap info`` share, with ``attachments`` as the attached ones."""
    info = sample.info
    rows = [
        ("index", index_line(info)),
        ("memory", memory_line(sample)),
        ("lock", lock_line(sample)),
        ("recoveries", recoveries_line(info)),
        ("attached", attached_line(attachments)),
        ("roots", f"{info.roots:,} bound"),
    ]
    if sample.stats is not None:
        rows.append(("objects", objects_line(sample.stats)))
    if sample.owners is not None:
        rows.append(("owners", owners_line(sample.owners)))
    return rows


def growth(sample: Sample, previous: Sample | None) -> str:
    """Arenas added per second since the previous sample."""
    if previous is None or sample.at <= previous.at:
        return "n/a (one sample)"
    return f"{(sample.info.arenas - previous.info.arenas) / (sample.at - previous.at):+.1f}/s"


def render(sample: Sample, previous: Sample | None, interval: float) -> str:
    """The block of one refresh: a title line, then aligned ``label  value`` rows."""
    rows = [("arenas", f"{arenas_line(sample.info)}; growth {growth(sample, previous)}"),
            *state_rows(sample, sample.attachments)]
    return "\n".join([title(sample.info.name, interval)]
                     + [f"{label:<11} {value}" for label, value in rows])


def title(name: str, interval: float) -> str:
    return f"shmheap top {name}: {time.strftime('%H:%M:%S')}, every {interval:g} s (Ctrl-C quits)"


# -- the screen and the command ----------------------------------------------------------


def control_identity(name: str) -> tuple[int, int] | None:
    """(device, inode) of heap ``name``'s control segment, None if it is gone."""
    try:
        stat = os.stat(segments.path_of(control_name(name)))
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def watch(heap: Heap, interval: float, once: bool, ctrl_c: CtrlC) -> None:
    """Show ``heap`` every ``interval`` seconds (once with ``once``) until it is destroyed.

    A Ctrl-C is taken between refreshes (KeyboardInterrupt), never inside one.
    """
    identity = control_identity(heap.name)
    lock_wait = max(interval, MIN_LOCK_WAIT)
    previous = None
    if once:  # growth needs two samples: one ``interval`` before the one shown
        with contextlib.suppress(LockTimeoutError):
            previous = take_sample(heap, lock_wait)
        ctrl_c.sleep(interval)
    with Live(True, line=False, redraw=not once) as show:
        while control_identity(heap.name) == identity:
            ctrl_c.check()
            try:
                sample = take_sample(heap, lock_wait)
            except HeapNotFoundError:
                break
            except LockTimeoutError as exc:
                show(f"{title(heap.name, interval)}\nlock        {exc}")
            else:
                show(render(sample, previous, interval))
                previous = sample
            if once:
                return
            ctrl_c.sleep(interval)
    print(f"heap {heap.name!r} was destroyed; top stops", flush=True)


def add_top(sub: Subparsers) -> None:

    parser = sub.add_parser("top", help="watch a heap: arenas, index, lock, processes")
    parser.add_argument("name", type=heap_name)
    parser.add_argument("--interval", type=seconds_arg, default=INTERVAL,
                        help=f"seconds between refreshes (default {INTERVAL:g})")
    parser.add_argument("--once", action="store_true",
                        help="print one block and exit (its growth is measured over --interval)")
    parser.set_defaults(run=run_top)


def run_top(args: argparse.Namespace) -> int:
    with Heap.attach(args.name, readonly=True) as heap, CtrlC() as ctrl_c, \
            contextlib.suppress(KeyboardInterrupt):
        watch(heap, args.interval, args.once, ctrl_c)
    return 0
