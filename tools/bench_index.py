"""Run the index benchmark: ``python tools/bench_index.py [--quick] [--json F] [--plot F]``.

The same as ``shmheap bench index``; the benchmark lives in shmheap/bench/index.py.
"""

import sys

from shmheap.bench.index import main

if __name__ == "__main__":
    sys.exit(main())
