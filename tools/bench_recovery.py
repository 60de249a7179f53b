#!/usr/bin/env python3
"""Recovery latency after a lock holder dies; see shmheap/bench/recovery.py."""

import sys

from shmheap.bench.recovery import main

if __name__ == "__main__":
    sys.exit(main())
