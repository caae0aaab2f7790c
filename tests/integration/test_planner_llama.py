"""The planner's memory estimate and command lines against real llama.cpp.

gemma-3-270m (sliding-window layers, tied embeddings) and the project's tiny
llama, qwen3moe (MoE), gemma3 (sliding window) and deepseek2 (MLA) models split
over 1, 2 and 3 local ggml-rpc-server processes, started with the planner's own
llama-server arguments at several contexts, slot counts, cache types, with flash
attention on and off: every buffer llama.cpp logs — each device's model, KV and
compute buffer and the host's input-layer, output and compute buffers — is
within 5% of the estimate, and a plan made for a tight pool fits in it.
Set MESH_PLANNER_RECORD=1 to refresh the recorded logs the unit tests read.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from bench.planner.shapes import write_header_replica
from e2e import tinymodels
from e2e.llama import LlamaProcess, post_json, running
from e2e.llama import start_rpc_server as start_worker
from mesh_operator.planner import (
    PlacementRequest,
    PlacementResult,
    evaluate_layout,
    layers_for_split,
    parse_inventory,
    plan_placement,
    read_model_profile,
)
from mesh_operator.planner.memory import MIB, compute_buffer_bytes, kv_geometry
from mesh_operator.planner.memory import layer_memory_bytes as layer_bytes
from mesh_operator.planner.profile import ModelProfile
from tests.integration.logged_host import start_logging_host
from tests.unit.planner.estimate_check import TOLERANCE, check_buffers, serving_of
from tests.unit.planner.llama_log import (
    LOG_DIR,
    header_fixture,
    parse_buffers,
    write_recording,
)

pytestmark = pytest.mark.integration


GEMMA = "gemma-3-270m"


@dataclass(frozen=True)
class Config:
    name: str
    servers: int
    split: tuple[int, ...] | None  # None: the planner chooses on a tight pool
    ctx: int = 2048
    parallel: int = 1
    cache_type: str = "f16"
    flash_attention: str = "auto"
    ubatch: int = 512
    model: str = GEMMA  # or the architecture of one of the project's tiny models

    @property
    def recording(self) -> str:
        return self.name if self.model == GEMMA else f"tiny-{self.model}-{self.name}"

    def record(self) -> dict[str, Any]:
        return {
            "name": self.recording,
            "ctx": self.ctx,
            "parallel": self.parallel,
            "cache_type": self.cache_type,
            "flash_attention": self.flash_attention,
            "ubatch": self.ubatch,
        }


GEMMA_CONFIGS = [
    Config("one-server", 1, (1,)),
    Config("one-server-fa-off", 1, (1,), ctx=4096, flash_attention="off"),
    Config("one-server-ub256", 1, (1,), ubatch=256),
    Config("two-servers", 2, (1, 1), ctx=4096),
    Config("two-servers-np4", 2, (1, 1), ctx=4096, parallel=4),
    Config("two-servers-q8", 2, (1, 1), ctx=4096, cache_type="q8_0"),
    Config("two-servers-fa-off", 2, (1, 1), ctx=8192, flash_attention="off"),
    Config("three-servers", 3, (1, 1, 1)),
    Config("three-servers-q4-np2", 3, (5, 3, 2), ctx=4096, parallel=2, cache_type="q4_0"),
    Config("three-servers-planned", 3, None),
]

# The same matrix for each tiny model: contexts, slots, cache types, flash
# attention off, a smaller ubatch, 1-3 servers with even and uneven splits.
_TINY_MATRIX = [
    Config("one-server", 1, (1,)),
    Config("one-server-fa-off", 1, (1,), ctx=4096, flash_attention="off"),
    Config("one-server-q4-ub256", 1, (1,), ctx=4096, cache_type="q4_0", ubatch=256),
    Config("two-servers-np4", 2, (1, 1), ctx=8192, parallel=4),
    Config("two-servers-q8", 2, (1, 1), ctx=4096, cache_type="q8_0"),
    Config("two-servers-fa-off-np2", 2, (2, 1), ctx=8192, parallel=2, flash_attention="off"),
    Config("three-servers", 3, (1, 1, 1), ctx=4096),
    # (3, 2, 1) leaves the third server only the output layer.
    Config("three-servers-q4-np3", 3, (3, 2, 1), ctx=16384, parallel=3, cache_type="q4_0"),
]
TINY_CONFIGS = [replace(c, model=arch) for arch in tinymodels.ARCHS for c in _TINY_MATRIX]

CONFIGS = GEMMA_CONFIGS + TINY_CONFIGS


@pytest.fixture(scope="module")
def workers(
    tmp_path_factory: pytest.TempPathFactory, rpc_server_bin: Path
) -> Iterator[list[LlamaProcess]]:
    """Three CPU workers, reused: a server takes the next client once one leaves."""
    log_dir = tmp_path_factory.mktemp("workers")
    started = [start_worker(log_dir, threads=1, extra=["-d", "CPU"]) for _ in range(3)]
    with running(*started):
        yield started


def _tight_inventory(profile: ModelProfile, config: Config, nodes: list[str]) -> dict[str, Any]:
    """Free memory so that no two of three nodes hold the model: the plan needs all three."""
    serving = serving_of(config.record())
    per_layer = layer_bytes(profile, serving, kv_geometry(profile, serving))
    compute = compute_buffer_bytes(profile, serving, kv_geometry(profile, serving), n_devices=3)
    six = compute + sum(per_layer[:6])
    last = compute + sum(per_layer[-8:])  # output layer and 7 repeating layers
    free = [six, six, last]

    def mib(n: int) -> int:
        return math.ceil(n / MIB / 0.9) + 1  # 10% reserve on top

    return {
        "nodes": [
            {
                "name": name,
                "rttMs": 0.1,
                "devices": [
                    {
                        "id": "CPU",
                        "backend": "cpu",
                        "memoryTotalMiB": mib(f),
                        "memoryFreeMiB": mib(f),
                    }
                ],
            }
            for name, f in zip(nodes, free, strict=True)
        ]
    }


def _plan(profile: ModelProfile, config: Config, nodes: list[str]) -> PlacementResult:
    request = PlacementRequest(serving=serving_of(config.record()), reserve_percent=10)
    if config.split is None:
        inventory = parse_inventory(_tight_inventory(profile, config, nodes))
        return plan_placement(profile, inventory, request)
    ranges = layers_for_split(config.split, profile.n_device_layers)
    layout = [(node, "CPU", r) for node, r in zip(nodes, ranges, strict=True)]
    roomy = {
        "nodes": [
            {
                "name": n,
                "devices": [
                    {"id": "CPU", "backend": "cpu", "memoryTotalMiB": 24000, "memoryFreeMiB": 24000}
                ],
            }
            for n in nodes
        ]
    }
    return evaluate_layout(profile, parse_inventory(roomy), layout, request)


def _model(config: Config, request: pytest.FixtureRequest) -> Path:
    if config.model == GEMMA:
        path: Path = request.getfixturevalue("model_file")
        return path
    return tinymodels.make_model(config.model)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.recording)
def test_estimate_within_tolerance_of_llama_cpp(
    config: Config,
    workers: list[LlamaProcess],
    llama_server_bin: Path,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    model_file = _model(config, request)
    profile = read_model_profile(model_file)
    nodes = [f"w{i}" for i in range(config.servers)]
    plan = _plan(profile, config, nodes)
    assert plan.feasible, plan.reason
    if config.split is None:
        assert plan.rpc == tuple(nodes), plan.reason  # the tight pool needs all three
    endpoints = {node: worker.address for node, worker in zip(nodes, workers, strict=False)}
    serving = serving_of(config.record())
    host = start_logging_host(plan, model_file, serving, endpoints, tmp_path)
    with running(host):
        if config.split is None:
            reply = post_json(f"{host.url}/completion", {"prompt": "Hello", "n_predict": 4})
            assert reply.get("content") is not None
        log = host.log_text()

    header = header_fixture(model_file)
    record = {
        **config.record(),
        "model": header.name.removesuffix(".header.gguf"),
        "layout": [[d.node, d.device, [d.first_layer, d.last_layer]] for d in plan.devices],
        "endpoints": {d.node: endpoints[d.node] for d in plan.devices},
    }
    if os.environ.get("MESH_PLANNER_RECORD"):
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        write_recording(LOG_DIR / f"{config.recording}.log", record, log)
        if not header.exists():
            write_header_replica(model_file, header)

    checks = check_buffers(profile, record, log)
    assert len(checks) == 3 * len(plan.devices) + 3  # and the host's three
    bad = [str(c) for c in checks if c.error > TOLERANCE]
    assert not bad, "\n".join(bad)
    # What llama.cpp allocated fits in each device's free memory.
    logged = parse_buffers(log).by_endpoint()
    for device in plan.devices:
        sizes = logged[endpoints[device.node]]
        assert sum(sizes.values()) <= device.free_mib, (device, sizes)
