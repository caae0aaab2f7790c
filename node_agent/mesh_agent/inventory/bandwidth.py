"""Measured memory bandwidth of the CPU device: a short copy benchmark, cached on disk.

A CPU node has no spec sheet the agent can read, and the planner's cost of a token
is bytes read / bandwidth, so the agent measures it once: `streams` processes each
copy their own buffer (larger than any last-level cache) several times at the same
moment; each reports its best rate, counted as STREAM's "Copy" does (bytes read +
bytes written), and the rates are added. It runs in child processes so the agent
never holds the buffers, and the result is kept in a JSON file keyed by what would
change it (CPU model, CPU count, memory size, benchmark shape).

Run alone: `python -m mesh_agent.inventory.bandwidth --size-mib 64 --streams 2`.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MIB = 1024 * 1024


@dataclass(frozen=True)
class BandwidthKey:
    cpu_model: str
    cpus: int
    memory_total_mib: int
    size_mib: int
    streams: int


def _copy_worker(size_mib: int, repeats: int, barrier: Any, out: Any) -> None:
    size = size_mib * MIB
    src = bytearray(os.urandom(4096)) * (size // 4096)
    dst = bytearray(size)
    view_src, view_dst = memoryview(src), memoryview(dst)
    view_dst[:] = view_src  # fault every page in before timing
    barrier.wait()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        view_dst[:] = view_src
        best = min(best, time.perf_counter() - start)
    out.put(2 * size / best / 1e9)


def measure(size_mib: int = 64, streams: int = 1, repeats: int = 8) -> float:
    """Aggregate copy bandwidth in GB/s over `streams` concurrent processes."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(streams)
    out = ctx.Queue()
    workers = [
        ctx.Process(target=_copy_worker, args=(size_mib, repeats, barrier, out))
        for _ in range(streams)
    ]
    for worker in workers:
        worker.start()
    rates = [float(out.get(timeout=120)) for _ in workers]
    for worker in workers:
        worker.join(timeout=10)
    return round(sum(rates), 2)


def measure_in_child(size_mib: int, streams: int, timeout: float = 120.0) -> float:
    """Run `measure` in a fresh interpreter, so the agent's RSS never holds the buffers."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mesh_agent.inventory.bandwidth",
            "--size-mib",
            str(size_mib),
            "--streams",
            str(streams),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return float(json.loads(result.stdout)["gbps"])


def cached_bandwidth(
    cache_file: Path | None, key: BandwidthKey, *, timeout: float = 120.0
) -> float:
    """The cached figure for `key`, or a fresh measurement written to the cache."""
    if cache_file is not None:
        try:
            data = json.loads(cache_file.read_text())
            if data.get("key") == asdict(key):
                return float(data["gbps"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    started = time.monotonic()
    gbps = measure_in_child(key.size_mib, key.streams, timeout=timeout)
    log.info(
        "measured CPU memory bandwidth: %.1f GB/s (%d x %d MiB copy, %.1fs)",
        gbps,
        key.streams,
        key.size_mib,
        time.monotonic() - started,
    )
    if cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            record = {"key": asdict(key), "gbps": gbps, "measuredAt": time.time()}
            tmp.write_text(json.dumps(record))
            tmp.replace(cache_file)
        except OSError as exc:
            log.warning("cannot cache bandwidth in %s: %s", cache_file, exc)
    return gbps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mesh_agent.inventory.bandwidth")
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args(argv)
    gbps = measure(args.size_mib, args.streams, args.repeats)
    print(json.dumps({"gbps": gbps}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
