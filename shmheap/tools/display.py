"""What the toolkit shows: tables, JSON, sizes, times, rates, and live text on a terminal.

Every command, ``stress``, ``top`` and the benchmarks print through these, so
a size, a latency or a table looks the same wherever it appears.

``Live`` redraws text in place on a terminal when ``rich`` (the ``progress``
extra) is installed; elsewhere (a pipe, a file, CI, no rich) it prints plain
text, at most one line every ``plain_every`` seconds when it shows a
progress line.

This module owns formatting and terminal output only; it touches no heap.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any, TextIO


def print_json(data: Any, out: TextIO | None = None) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False), file=out)


def print_table(header: Sequence[str], rows: Iterable[Sequence[object]], *,
                title: str | None = None, show_header: bool = True,
                out: TextIO | None = None) -> None:
    """Print rows in left-aligned columns under ``header`` (shown if ``show_header``).

    With a ``title`` the table is set off by a blank line and the title, and
    a rule of dashes goes under the header.
    """
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in [list(header), *cells]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))\
            .rstrip()

    if title is not None:
        print(f"\n{title}", file=out)
    if show_header:
        print(line(header), file=out)
        if title is not None:
            print(line(["-" * width for width in widths]), file=out)
    for row in cells:
        print(line(row), file=out)


def format_size(nbytes: int) -> str:
    """Bytes with a binary unit: 65536 -> '64 KiB', 1536 -> '1.5 KiB'."""
    value = float(nbytes)
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"


def fmt_ns(ns: float | None) -> str:
    """1.5e3 -> '1.5 µs'; three significant digits, unit from ns to s; None -> '-'."""
    if ns is None:
        return "-"
    for unit, scale in (("ns", 1.0), ("µs", 1e3), ("ms", 1e6)):
        if abs(ns) < 1000 * scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns / 1e9:.3g} s"


def fmt_count(count: float) -> str:
    """1e3 -> '1k', 1e6 -> '1M', 10 -> '10'."""
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g}{prefix}"
    return f"{count:.3g}"


def fmt_rate(per_s: float | None, unit: str = "/s") -> str:
    """2.5e7 -> '25.0 M/s'; None -> '-'."""
    if per_s is None:
        return "-"
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if per_s >= scale:
            return f"{per_s / scale:.3g} {prefix}{unit}"
    return f"{per_s:.3g} {unit}"


def fmt_ratio(ratio: float | None) -> str:
    """12.5 -> '12.5x', 1234 -> '1,234x'; None -> '-'."""
    if ratio is None:
        return "-"
    return f"{ratio:,.0f}x" if ratio >= 100 else f"{ratio:.3g}x"


def clock(ns: int) -> str:
    """Wall-clock ``ns`` as local HH:MM:SS."""
    return time.strftime("%H:%M:%S", time.localtime(ns / 1e9))


def when(ns: int) -> str:
    """Wall-clock ``ns`` as local date, time and age: '2025-01-31 14:02:07 (5 min 3 s ago)'."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))
    return f"{stamp} ({age(time.time() - ns / 1e9)} ago)"


def age(seconds: float) -> str:
    """'4.2 s', '5 min 3 s', '3 h 12 min', '2 d 5 h'."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} min {int(seconds % 60)} s"
    hours = minutes // 60
    if hours < 48:
        return f"{hours} h {minutes % 60} min"
    return f"{hours // 24} d {hours % 24} h"


class Live:
    """``with Live(enabled, ...) as show: show(text)``: text redrawn in place on a terminal.

    ``line=True`` shows a one-line progress line that disappears at the end
    (plain output: at most one line every ``plain_every`` seconds);
    ``line=False`` a block that stays (plain output: every block, followed
    by a blank line).  Nothing is shown unless ``enabled``; with
    ``redraw=False`` the output is plain even on a terminal.
    """

    def __init__(self, enabled: bool, *, line: bool, plain_every: float = 0.0,
                 refresh: float = 0.25, redraw: bool = True) -> None:
        self.enabled = enabled
        self.line = line
        self.plain_every = plain_every
        self.last_plain = -math.inf
        self.live: Any = None
        self.text: Any = None
        if enabled and redraw and sys.stdout.isatty():
            try:
                from rich.live import Live as RichLive
                from rich.text import Text
            except ImportError:
                return
            self.live = (RichLive("", refresh_per_second=1 / refresh, transient=True) if line
                         else RichLive("", auto_refresh=False))
            self.text = Text
            self.live.start()

    def __call__(self, text: str) -> None:
        if not self.enabled:
            return
        if self.live is not None:
            if self.line:
                self.live.update(self.text(text, no_wrap=True, overflow="ellipsis"))
            else:
                self.live.update(self.text(text), refresh=True)
        elif time.monotonic() - self.last_plain >= self.plain_every:
            self.last_plain = time.monotonic()
            print(text if self.line else text + "\n", flush=True)

    def __enter__(self) -> Live:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.stop()
