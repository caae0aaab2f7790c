"""`python -m bench planner_speed`: time `plan_placement` on mixed pools of 10-500 nodes.

Owns the planner's speed figures. Pools are drawn from a fixed seed the way the
operator's big clusters look: eight GPU kinds (A100 80 and 40 GB, L40S, RTX
4090, 3090, 4080, 3060, T4) with their memory bandwidth, 1, 2, 4 or 8 of one kind
per node, 70-100% of memory free (exact numbers differ from node to node, as
agents report them), one RTT, nothing cached. Every model is planned on every
pool; the table gives p50 and p99 of the time per plan for each pool size, in
one process, after one warm-up plan. Figures only: the planner's tests hold the
bound that matters (a 500-node plan within a second).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.planner.shapes import SHAPES, write_header_gguf
from mesh_operator.planner import (
    Inventory,
    InventoryDevice,
    InventoryNode,
    ModelProfile,
    PlacementRequest,
    ServingParams,
    Strategy,
    plan_placement,
    read_model_profile,
)

HEADERS = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "planner" / "models"
FIXTURES = {
    "gemma-3-270m": "gemma-3-270m-q4_k_m.header.gguf",
    "llama-3.1-8b": "llama-3.1-8b.header.gguf",
    "qwen3-30b-a3b": "qwen3-30b-a3b.header.gguf",
}
LARGE = ("llama-3.3-70b",)  # shapes of bench/planner/shapes.py, written as headers
# (memory MiB, bandwidth GB/s)
GPUS: tuple[tuple[int, float], ...] = (
    (81920, 2039.0),  # A100 80 GB
    (40960, 1555.0),  # A100 40 GB
    (46068, 864.0),  # L40S
    (24564, 1008.0),  # RTX 4090
    (24576, 936.0),  # RTX 3090
    (16376, 717.0),  # RTX 4080
    (12288, 360.0),  # RTX 3060
    (15360, 320.0),  # T4
)
SIZES = (10, 50, 200, 500)
SEED = 20251122


def mixed_pool(size: int, rng: random.Random, rtt_ms: float = 0.5) -> Inventory:
    """Eight GPU kinds, 1-8 per node, free memory 70-100%, one RTT, nothing cached."""
    nodes = []
    for i in range(size):
        total, bandwidth = rng.choice(GPUS)
        devices = tuple(
            InventoryDevice(
                id=f"CUDA{j}",
                memory_total_mib=total,
                memory_free_mib=int(total * rng.uniform(0.7, 1.0)),
                bandwidth_gbps=bandwidth,
            )
            for j in range(rng.choice((1, 2, 4, 8)))
        )
        nodes.append(InventoryNode(name=f"gpu-{i:03d}", rtt_ms=rtt_ms, devices=devices))
    return Inventory(nodes=tuple(nodes))


def load_models(directory: Path) -> dict[str, ModelProfile]:
    models = {name: read_model_profile(HEADERS / file) for name, file in FIXTURES.items()}
    for name in LARGE:
        models[name] = read_model_profile(
            write_header_gguf(SHAPES[name], directory / f"{name}.gguf")[0]
        )
    return models


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile."""
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, max(0, round(share * len(ranked)) - 1))]


def measure(
    models: dict[str, ModelProfile], sizes: Sequence[int], pools: int, strategy: Strategy
) -> dict[int, dict[str, list[float]]]:
    """Milliseconds per plan, by pool size and model."""
    request = PlacementRequest(serving=ServingParams(ctx=8192), strategy=strategy)
    rng = random.Random(SEED)
    first = next(iter(models.values()))
    plan_placement(first, mixed_pool(10, random.Random(0)), request)  # warm-up
    out: dict[int, dict[str, list[float]]] = {}
    for size in sizes:
        out[size] = {name: [] for name in models}
        for _ in range(pools):
            inventory = mixed_pool(size, rng)
            for name, profile in models.items():
                started = time.perf_counter()
                result = plan_placement(profile, inventory, request)
                out[size][name].append((time.perf_counter() - started) * 1000)
                if not result.feasible:
                    raise RuntimeError(f"{name} on {size} nodes: {result.reason}")
    return out


def format_table(times: dict[int, dict[str, list[float]]], strategy: str) -> str:
    names = list(next(iter(times.values())))
    lines = [
        f"plan_placement, strategy {strategy}, ctx 8192: ms per plan, p50 / p99 "
        f"(nearest rank over every model and pool of a size)",
        f"{'nodes':>5} {'plans':>6} {'p50':>7} {'p99':>7} {'max':>7}   "
        + "  ".join(f"{n:>15}" for n in names),
    ]
    for size, by_model in times.items():
        every = [t for ts in by_model.values() for t in ts]
        per_model = "  ".join(
            f"{f'{percentile(ts, 0.5):.0f} / {percentile(ts, 0.99):.0f}':>15}"
            for ts in by_model.values()
        )
        lines.append(
            f"{size:>5} {len(every):>6} {percentile(every, 0.5):>7.1f} "
            f"{percentile(every, 0.99):>7.1f} {max(every):>7.1f}   {per_model}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench planner_speed")
    parser.add_argument(
        "--sizes", default=",".join(map(str, SIZES)), help="pool sizes, comma-separated"
    )
    parser.add_argument("--pools", type=int, default=20, help="pools per size")
    parser.add_argument("--strategy", choices=("latency", "balanced"), default="latency")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    strategy: Strategy = "balanced" if args.strategy == "balanced" else "latency"
    with tempfile.TemporaryDirectory(prefix="mesh-bench-speed-") as tmp:
        models = load_models(Path(tmp))
    started = time.monotonic()
    times = measure(models, sizes, args.pools, strategy)
    print(
        f"mixed pools: 8 GPU kinds, 1/2/4/8 per node, 70-100% free, RTT 0.5 ms, "
        f"nothing cached; {args.pools} pools per size, seed {SEED}"
    )
    print(format_table(times, strategy))
    print(f"took {time.monotonic() - started:.0f} s")
    return 0
