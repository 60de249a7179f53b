"""The experimenter's toolkit: the ``shmheap`` command line and what it runs.

The library (``shmheap``: ``Heap``, ``destroy``, the errors) is what a
program imports to share memory.  This subpackage is what a person runs
against heaps, built on that library and never imported by it:

* cli.py          -- the ``shmheap`` command: create, info, arenas, grow,
                     destroy, ls, fsck, gc, walk, roots; it registers the rest
* args.py         -- argument types and usage errors every command shares
* display.py      -- tables, JSON, sizes, times, rates, live terminal text
* collect.py      -- ``ls`` and ``gc``: heaps in /dev/shm, judged without
                     attaching, and removing abandoned ones
* stress.py, stress_roles.py, stress_tally.py -- ``shmheap stress``: a checked
                     multi-process run (the parent, the workers' roles, their
                     shared counters) with an earned verdict
* top.py          -- ``shmheap top``: a live view of one heap
* interrupt.py    -- Ctrl-C taken between steps of a long-running command
* bench/          -- ``shmheap bench``: every figure beside a baseline of the
                     same run

Arrows point one way: the toolkit imports the library, the library never
imports the toolkit (tests/test_package.py checks it).
"""
