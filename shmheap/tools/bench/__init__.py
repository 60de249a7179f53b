"""Benchmarks of shmheap, runnable as ``shmheap bench <name>`` (``suite.py`` lists them).

* index.py    -- the all-arenas index: snapshots, iteration, grow(), contention
* alloc.py    -- objects: alloc/free against BufferWrapper, walker, sweep,
                 scavenge, roots, hand-over of an array
* recovery.py -- from a lock holder's death to the next snapshot
* faults.py   -- Ctrl-C storms and exits without close: what survives
* scale.py    -- 64 to 100,000 arenas: the costs that must not grow
* cores.py    -- the native core beside its pure-Python twin
* start.py    -- import, a worker's start to its first operation, attach
* common.py   -- timing, percentiles, self-cleaning heaps, JSON, plots
* children.py -- child interpreters with crash points armed

Every figure is measured beside a baseline of the same run.  Benchmarks
create heaps of their own (unique names) and destroy them in ``finally``;
they never touch any other heap.
"""
