"""Benchmarks of shmheap, runnable as ``shmheap bench <name>``.

* index.py  -- the all-arenas index: snapshots, iteration, grow(), contention
* common.py -- timing, percentiles, self-cleaning heaps, tables, JSON, plots

Benchmarks create heaps of their own (unique names) and destroy them in
``finally``; they never touch any other heap.
"""
