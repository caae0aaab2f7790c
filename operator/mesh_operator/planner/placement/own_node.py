"""The host's own node without an RPC server: a pool's `hostUsesOwnNode`.

Owns the transform of a finished plan that lets the host's llama-server run the
layers planned on its own node's CPU device itself, instead of reaching that
device through a `ggml-rpc-server` on the same node (measured 1.08x faster on
gemma-3-270m, docs/planner.md). It reuses the RAM tier's mechanism: those layers
become the plan's `HostTier` (`cpu_layers`, `-ngl` lowered by as many), the
device leaves `devices`, `--rpc` and `-ts`, and no worker runs on that node.

llama.cpp puts the first `n_layer + 1 - ngl` layers on the host's CPU and
splits the rest over the devices in `--rpc` order, so only the first device of
a plan can become the host's own: a plan hosted on another node is hosted on
its first node instead when that is no slower. A plan on the host's node alone
becomes the host with no `--rpc` and `-ngl 0` (`cpu_layers` = `n_layer + 1`:
the output layer too, where llama.cpp then keeps it).

The tier is what the host's CPU holds for those layers
(`memory.host_layers_buffers`: their weights and KV, and the CPU's one compute
buffer, which differs from the device's through RPC), which the host container
requests; it must fit the device's capacity and is claimed on that device
(`HostTier.device`). Its time loses the local round trip.

CPU devices only: llama.cpp orders RPC devices before a host's local GPUs, so
a GPU of the host's node could not take the first layers.
"""

from __future__ import annotations

from dataclasses import replace

from mesh_operator.planner.inventory import Inventory
from mesh_operator.planner.memory import MIB, host_layers_buffers
from mesh_operator.planner.placement.plan import evaluate_layout
from mesh_operator.planner.placement.types import (
    HostTier,
    PlacementRequest,
    PlacementResult,
)
from mesh_operator.planner.profile import ModelProfile
from mesh_operator.planner.tensor_split import split_for_layers


def host_on_own_node(
    result: PlacementResult,
    profile: ModelProfile,
    inventory: Inventory,
    request: PlacementRequest,
) -> PlacementResult:
    """The plan with its first node's CPU layers run by the host itself, or the
    plan as it is when that does not apply (infeasible, a RAM tier already, a
    first device that is not a node's only, CPU device, or a host that cannot
    move to the first node without being slower)."""
    if not result.feasible or result.host_tier is not None or not result.devices:
        return result
    first = result.devices[0]
    if first.backend != "cpu" or sum(d.node == first.node for d in result.devices) != 1:
        return result
    if result.host_node == first.node:
        return _own(result, profile, request) or result
    rehosted = evaluate_layout(profile, inventory, result.layout(), request, host_node=first.node)
    if not rehosted.feasible or rehosted.host_node != first.node:
        return result
    own = _own(replace(rehosted, kept_current=result.kept_current), profile, request)
    if own is None or own.predicted_token_ms > result.predicted_token_ms:
        return result
    return own


def _own(
    result: PlacementResult, profile: ModelProfile, request: PlacementRequest
) -> PlacementResult | None:
    """`result` (hosted on its first device's node) with that device's layers on
    the host's CPU; None if the device's capacity cannot hold what they need there."""
    first, rest = result.devices[0], result.devices[1:]
    memory = host_layers_buffers(profile, request.serving, first.last_layer, n_devices=len(rest))
    if memory.total > first.capacity_bytes:
        return None
    saved = request.cost.hop_ms(0.0, local=True)
    tier = HostTier(
        node=first.node,
        moe_layers=0,
        cpu_layers=first.last_layer,
        weights_bytes=memory.weights,
        kv_bytes=memory.kv,
        compute_bytes=memory.compute,
        free_mib=first.free_mib,
        bandwidth_gbps=first.bandwidth_gbps,
        time_ms=first.time_ms - saved,
        device=first.device,
    )
    total = result.predicted_token_ms - saved
    nodes = (first.node, *(n for n in result.rpc if n != first.node))
    size = tier.total_bytes / MIB
    reason = (
        f"{len(nodes)} node{'s' * (len(nodes) > 1)} ({', '.join(nodes)}), "
        f"{len(rest)} device{'s' * (len(rest) != 1)} over RPC, host on {first.node} running "
        f"layers 0-{tier.cpu_layers - 1} on its own {first.device} ({size:.0f} MiB), "
        f"{total:.1f} ms/token predicted"
    )
    if result.kept_current:
        reason = "kept the current plan: " + reason
    return replace(
        result,
        reason=reason,
        devices=rest,
        tensor_split=tuple(split_for_layers([d.n_layers for d in rest])) if rest else (),
        rpc=tuple(n for n in result.rpc if n != first.node),
        predicted_token_ms=total,
        bottleneck_ms=max([tier.time_ms, *(d.time_ms for d in rest)]),
        host_tier=tier,
    )
