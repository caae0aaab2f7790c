"""A node's share of a model's tokens: the layers its devices serve in the plan.

Pure. Every token of a request passes through every layer of the model, so the
work a node does for it follows the number of layers its devices hold. The plan
(MeshModel `status.plan`, written by the operator) lists each device's layer
range `[first, lastExclusive)`, and the layers the host keeps on its CPU
(`hostTier.cpuLayers`, on `hostTier.node`) come before the devices' first. A
node's share is its layers over all of the plan's layers; a model without a
usable plan has no shares, and its tokens are then counted per node nowhere.

A model with replicas (`status.replicaPlans` beside `status.plan`) has one plan
per replica, each with its own host node: a request's tokens follow the plan of
the replica whose host answered it, found by the node its endpoint runs on
(`host_shares`).

The plan is read from the raw object, leniently: a field this gateway cannot read
drops the plan, it never fails the snapshot.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Shares = tuple[tuple[str, float], ...]


def _layers(value: object) -> int:
    """Layers in a `[first, lastExclusive]` pair; 0 for anything else."""
    if not isinstance(value, list | tuple) or len(value) != 2:
        return 0
    first, last = value
    if not isinstance(first, int) or not isinstance(last, int) or isinstance(first, bool):
        return 0
    return max(0, last - first)


def node_layers(plan: Mapping[str, Any] | None) -> dict[str, int]:
    """Layers per node in a plan (devices' ranges plus the host's CPU layers)."""
    counts: dict[str, int] = {}
    if not isinstance(plan, Mapping):
        return counts
    for device in plan.get("devices") or ():
        if not isinstance(device, Mapping):
            continue
        node = device.get("node")
        layers = _layers(device.get("layers"))
        if isinstance(node, str) and node and layers:
            counts[node] = counts.get(node, 0) + layers
    tier = plan.get("hostTier")
    if isinstance(tier, Mapping):
        node = tier.get("node")
        cpu = tier.get("cpuLayers")
        if isinstance(node, str) and node and isinstance(cpu, int) and cpu > 0:
            counts[node] = counts.get(node, 0) + cpu
    return counts


def layer_shares(plan: Mapping[str, Any] | None) -> Shares:
    """(node, fraction of the plan's layers) sorted by node; the fractions sum to 1.

    Empty when there is no plan or it holds no layer.
    """
    counts = node_layers(plan)
    total = sum(counts.values())
    if total <= 0:
        return ()
    return tuple((node, counts[node] / total) for node in sorted(counts))


def replica_plans(status: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    """Every replica's plan in a MeshModel status: `plan`, then `replicaPlans`."""
    if not isinstance(status, Mapping):
        return []
    plans = [status.get("plan"), *(status.get("replicaPlans") or ())]
    return [p for p in plans if isinstance(p, Mapping)]


def host_shares(status: Mapping[str, Any] | None) -> dict[str, Shares]:
    """Each replica's layer shares, by the node its host runs on."""
    out: dict[str, Shares] = {}
    for plan in replica_plans(status):
        host = plan.get("hostNode")
        shares = layer_shares(plan)
        if isinstance(host, str) and host and shares:
            out[host] = shares
    return out
