"""Run every benchmark and print the figures: ``python bench/run.py``.

Each benchmark starts a redis-server of its own (the redis-server binary must be on the
PATH) and real prefork Celery workers; nothing is left behind. Extra arguments go to the
throughput benchmark (e.g. ``--rounds 5``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_store
import bench_throughput

if __name__ == "__main__":
    print("== store: cost per step and memory ==", flush=True)
    bench_store.main()
    print("\n== workers: throughput and sequential latency ==", flush=True)
    bench_throughput.main(sys.argv[1:])
