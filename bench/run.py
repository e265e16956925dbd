"""Run every benchmark and print the figures: ``python bench/run.py``.

The store and throughput benchmarks start a redis-server of their own (the redis-server
binary must be on the PATH); the bridge benchmark uses Redis on 127.0.0.1:6379 (db 9).
All start real prefork Celery workers; nothing is left behind. Extra arguments go to the
throughput benchmark (e.g. ``--rounds 5``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_events
import bench_store
import bench_throughput

if __name__ == "__main__":
    print("== store: cost per step and memory ==", flush=True)
    bench_store.main()
    print("\n== workers: throughput and sequential latency ==", flush=True)
    bench_throughput.main(sys.argv[1:])
    print("\n== broker bridge: finish latency, hot-path cost, listener throughput ==", flush=True)
    bench_events.main([])
