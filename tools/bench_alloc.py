"""Run the allocator benchmark: ``python tools/bench_alloc.py [--quick] [--json F] [--plot F]``.

The same as ``shmheap bench alloc``; the benchmark lives in shmheap/bench/alloc.py.
"""

import sys

from shmheap.bench.alloc import main

if __name__ == "__main__":
    sys.exit(main())
