"""The RAM tier against real llama.cpp: a plan that keeps experts or layers in RAM.

The project's tiny models (e2e.tinymodels, random weights) on one local
ggml-rpc-server whose device the inventory declares too small for the whole
model, the node offering RAM beside it (`hostMemoryFreeMiB`). The planner puts
the routed experts of the first layers (qwen3moe; deepseek2, whose first layer
is dense and whose shared experts stay on the device) or whole first layers (llama)
in the host's RAM; llama-server started with the planner's own arguments must
answer a chat, and the buffers it logs must match the estimate: the RPC device's
model and KV buffers, and the host CPU's buffers holding the tier (experts,
whole layers, their KV) within 5%; what the host's CPU holds in all stays within
the RAM the plan claims.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from e2e.llama import post_json, running, start_rpc_server
from e2e.waiting import free_port
from mesh_operator.planner import (
    PlacementRequest,
    PlacementResult,
    ServingParams,
    build_rpc_server_args,
    parse_inventory,
    plan_placement,
    read_model_profile,
)
from mesh_operator.planner.memory import MIB
from mesh_operator.planner.profile import ModelProfile
from tests.integration.logged_host import HELLO, start_logging_host
from tests.unit.planner.llama_log import parse_buffers

pytestmark = pytest.mark.integration

TOLERANCE = 0.05
SERVING = ServingParams(ctx=512)
REQUEST = PlacementRequest(serving=SERVING, reserve_percent=10)


def _inventory(device_mib: int) -> dict[str, Any]:
    cpu = {"id": "CPU", "backend": "cpu", "memoryTotalMiB": device_mib}
    return {
        "nodes": [
            {
                "name": "node-a",
                "rttMs": 0.1,
                # The device stands for a GPU: the planner sees only its numbers.
                "devices": [cpu | {"memoryFreeMiB": device_mib}],
                "hostMemoryFreeMiB": 1024,
            }
        ]
    }


def _tight_plan(profile: ModelProfile, short_bytes: int) -> PlacementResult:
    """A plan on a device `short_bytes` smaller than the model needs whole."""
    roomy = plan_placement(profile, parse_inventory(_inventory(4096)), REQUEST)
    assert roomy.feasible and roomy.host_tier is None, roomy.reason
    need = roomy.devices[0].total_bytes - short_bytes
    device_mib = math.floor(need / MIB / (1 - REQUEST.reserve_percent / 100))
    return plan_placement(profile, parse_inventory(_inventory(device_mib)), REQUEST)


def _close(logged: float, estimated_bytes: int) -> bool:
    return abs(estimated_bytes / MIB - logged) <= TOLERANCE * logged


def _host_cpu(sizes: dict[str, dict[str, float]], kind: str) -> float:
    """The host's CPU buffers of a kind (`CPU`, `CPU_REPACK`, `CPU_Mapped`)."""
    return sum(k.get(kind, 0.0) for name, k in sizes.items() if name.startswith("CPU"))


@pytest.mark.parametrize("arch", ["qwen3moe", "deepseek2", "llama"])
def test_planned_ram_tier_matches_llama_cpp(
    arch: str,
    tiny_model: Callable[..., Path],
    llama_server_bin: Path,
    rpc_server_bin: Path,
    tmp_path: Path,
) -> None:
    model = tiny_model(arch)
    profile = read_model_profile(model)
    moe = arch != "llama"
    if moe:
        # Short by half the experts: some layers' experts must go to RAM.
        short = sum(layer.expert_bytes for layer in profile.layers) // 2
    else:
        short = 3 * profile.layers[0].weight_bytes
    plan = _tight_plan(profile, short)
    assert plan.feasible and plan.host_tier is not None, plan.reason
    tier = plan.host_tier
    if moe:
        assert tier.cpu_layers == 0 and 0 < tier.moe_layers < profile.n_layer
    else:
        assert tier.moe_layers == 0 and 0 < tier.cpu_layers < profile.n_layer
    (device,) = plan.devices

    rpc_port = free_port()
    rpc_args = build_rpc_server_args([device.device], host="127.0.0.1", port=rpc_port, cache=False)
    worker = start_rpc_server(tmp_path, port=rpc_port, extra=rpc_args[rpc_args.index("-d") :])
    with running(worker):
        host = start_logging_host(plan, model, SERVING, {"node-a": worker.address}, tmp_path)
        with running(host):
            chat = post_json(f"{host.url}/v1/chat/completions", HELLO)
            log = host.log_text()

    usage = chat["usage"]
    assert isinstance(usage, dict) and usage["completion_tokens"] == 4, chat
    on_devices = profile.n_device_layers - tier.cpu_layers
    assert f"offloaded {on_devices}/{profile.n_device_layers} layers" in log, log[-3000:]
    sizes = parse_buffers(log).sizes
    worker_sizes = parse_buffers(log).by_endpoint()[worker.address]
    report = (
        f"plan {plan.reason}; estimate: device weights {device.weights_bytes / MIB:.2f} "
        f"KV {device.kv_bytes / MIB:.2f}, RAM tier weights {tier.weights_bytes / MIB:.2f} "
        f"KV {tier.kv_bytes / MIB:.2f} + input {profile.input_bytes / MIB:.2f}; logged {sizes}"
    )
    assert _close(worker_sizes["model"], device.weights_bytes), report
    assert _close(worker_sizes["KV"], device.kv_bytes), report
    # The host's CPU holds the input layer and the tier, nothing else.
    assert _close(_host_cpu(sizes, "model"), profile.input_bytes + tier.weights_bytes), report
    if tier.kv_bytes:
        assert _close(_host_cpu(sizes, "KV"), tier.kv_bytes), report
    else:
        assert _host_cpu(sizes, "KV") == 0, report
    # Everything llama.cpp put in the host's RAM fits in what the plan claims there.
    held = sum(_host_cpu(sizes, kind) for kind in ("model", "KV", "compute"))
    assert held * MIB <= tier.total_bytes + plan.host_memory_bytes, report
