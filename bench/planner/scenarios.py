"""Pools of the planner's benchmark: mixed GPUs, 1-16 nodes, 0.2-20 ms RTT.

Owns the scenario suite. Pools are drawn from a fixed seed so every run plans
the same inputs: each node carries 1-4 GPUs of one kind (8-80 GB, with their
published memory bandwidth), some memory already used by others, and a round
trip to the host side between 0.2 and 20 ms. A homogeneous pool of each size
(one GPU kind, one RTT) is kept apart: the goal on speed is stated for mixed pools.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

# (name, memory MiB, bandwidth GB/s) of common data-center and workstation GPUs.
GPUS: tuple[tuple[str, int, float], ...] = (
    ("rtx4060", 8188, 272.0),
    ("rtx3060", 12288, 360.0),
    ("t4", 15360, 320.0),
    ("rtx4080", 16376, 717.0),
    ("a10", 24564, 600.0),
    ("l4", 23034, 300.0),
    ("rtx3090", 24576, 936.0),
    ("rtx4090", 24564, 1008.0),
    ("v100", 32768, 900.0),
    ("a6000", 49140, 768.0),
    ("l40s", 46068, 864.0),
    ("a100", 81920, 2039.0),
    ("h100", 81559, 3350.0),
)
SIZES = (1, 2, 3, 4, 6, 8, 12, 16)
MIXED_PER_SIZE = 3
SEED = 20251121


@dataclass(frozen=True)
class Pool:
    name: str
    mixed: bool
    inventory: dict[str, Any]

    @property
    def nodes(self) -> int:
        return len(self.inventory["nodes"])


def _node(rng: random.Random, name: str, gpu: tuple[str, int, float], rtt: float) -> dict[str, Any]:
    _, total, bandwidth = gpu
    count = rng.choice((1, 1, 1, 2, 2, 4))
    devices = [
        {
            "id": f"CUDA{i}",
            "backend": "cuda",
            "memoryTotalMiB": total,
            "memoryFreeMiB": int(total * rng.uniform(0.7, 1.0)),
            "bandwidthGBps": bandwidth,
        }
        for i in range(count)
    ]
    return {"name": name, "rttMs": round(rtt, 2), "devices": devices}


def build_pools(seed: int = SEED) -> list[Pool]:
    rng = random.Random(seed)
    pools = []
    for size in SIZES:
        for k in range(MIXED_PER_SIZE):
            nodes = [
                _node(
                    rng,
                    f"n{i:02d}",
                    rng.choice(GPUS),
                    math.exp(rng.uniform(math.log(0.2), math.log(20.0))),
                )
                for i in range(size)
            ]
            pools.append(Pool(f"mixed-{size}n-{k}", size > 1, {"nodes": nodes}))
        gpu = rng.choice(GPUS)
        same = [_node(rng, f"n{i:02d}", gpu, 0.5) for i in range(size)]
        pools.append(Pool(f"same-{size}n-{gpu[0]}", False, {"nodes": same}))
    return pools
