"""The two rules the planner is compared with, as layouts the planner can time.

- llama.cpp default (also GPUStack v1, LocalAI): every device of every node,
  split in proportion to each device's free memory, the host on the first node.
- mesh-llm: the node with the most VRAM hosts; workers join by ascending RTT
  until the VRAM of host and workers reaches 1.1 x the model file; the split
  follows VRAM, and the host's own GPUs come last (local devices follow RPC ones).

Both are held to llama.cpp's limits (16 servers, 15 devices) and judged with
the planner's memory estimate and time model, so only the decisions differ.
"""

from __future__ import annotations

from mesh_operator.planner import (
    MAX_DEVICES,
    MAX_RPC_SERVERS,
    Inventory,
    InventoryDevice,
    InventoryNode,
    PlacementRequest,
    PlacementResult,
    evaluate_layout,
    layers_for_split,
)
from mesh_operator.planner.profile import ModelProfile

Devices = list[tuple[InventoryNode, InventoryDevice]]


def _layout(
    devices: Devices, weights: list[float], profile: ModelProfile
) -> list[tuple[str, str, tuple[int, int]]]:
    ranges = layers_for_split(weights, profile.n_device_layers)
    return [(n.name, d.id, r) for (n, d), r in zip(devices, ranges, strict=True) if r[1] > r[0]]


def _usable(node: InventoryNode) -> list[InventoryDevice]:
    return [d for d in node.devices if d.healthy] if node.healthy else []


def llama_cpp_default(
    profile: ModelProfile, inventory: Inventory, request: PlacementRequest
) -> PlacementResult:
    nodes = [n for n in inventory.nodes if _usable(n)][:MAX_RPC_SERVERS]
    devices: Devices = [(n, d) for n in nodes for d in _usable(n)][:MAX_DEVICES]
    if not devices:
        return PlacementResult(False, "no devices", request.strategy)
    weights = [float(d.memory_free_mib) for _, d in devices]
    if sum(weights) <= 0:
        return PlacementResult(False, "no free memory", request.strategy)
    layout = _layout(devices, weights, profile)
    return evaluate_layout(profile, inventory, layout, request, host_node=nodes[0].name)


def mesh_llm_rule(
    profile: ModelProfile, inventory: Inventory, request: PlacementRequest
) -> PlacementResult:
    nodes = [n for n in inventory.nodes if _usable(n)]
    if not nodes:
        return PlacementResult(False, "no devices", request.strategy)

    def vram(node: InventoryNode) -> int:
        return sum(d.memory_total_mib for d in _usable(node))

    host = max(nodes, key=lambda n: (vram(n), n.name))
    need_mib = 1.1 * profile.file_bytes / 2**20
    chosen = [host]
    total = vram(host)
    workers = sorted((n for n in nodes if n is not host), key=lambda n: (n.rtt_ms or 0, n.name))
    for worker in workers:
        if total >= need_mib or len(chosen) >= MAX_RPC_SERVERS:
            break
        chosen.append(worker)
        total += vram(worker)
    ordered = [*chosen[1:], host]  # RPC devices first, the host's own GPUs last
    devices: Devices = [(n, d) for n in ordered for d in _usable(n)][-MAX_DEVICES:]
    weights = [float(d.memory_total_mib) for _, d in devices]
    layout = _layout(devices, weights, profile)
    return evaluate_layout(profile, inventory, layout, request, host_node=host.name)
