"""Placement: which devices serve a model, in which order, with which layers.

Owns the search. For a set of nodes, an output node and a host node, the
devices are laid out in llama.cpp's order (each node's RPC server exposes its
devices together; the output node last, its fastest device last, so that device
holds the output layer) and a dynamic program over contiguous layer ranges finds
the split that minimizes the predicted time per token (`latency`) — or the
slowest stage, for prefill pipelines (`balanced`) — with every device's weights
+ KV + compute buffer (the one its own range needs) within its free memory minus
the reserve. Every set of nodes, output node and host is in scope; a branch and
bound (with the lower bounds of `bounds`) finds the same plan as planning them
all while planning only a handful. Among plans within 2% of the best, fewer
nodes, then nodes that cache the model, win.

Stability: given the plan a model is served with, the planner keeps it while
it still fits (allowing the free memory it was planned on to have dropped by
`stability_percent`) unless a plan that fits with that much margin is
`improvement_percent` faster or uses fewer nodes at no cost.

RAM: when nothing fits in VRAM, a host node's system RAM (`hostMemoryFreeMiB`)
takes the routed experts of the first layers, then whole first layers
(`ram_tier`); a model that fits in VRAM never uses it.

Modules: `types` (the request and the result), `problem` (the model side of a
call, the pool's devices, a plan from devices and ranges), `split` (the layer
dynamic programs), `search` (the branch and bound), `previous` (the beam search
the branch and bound falls back on when out of budget), `ranking` (the one rule
between plans, and the stability rule), `ram_tier` (plans with part of the
model in a host's RAM), `own_node` (the host running its own node's CPU
layers itself, a pool's `hostUsesOwnNode`), `replicas` (several copies of a model on disjoint
nodes), `explain` (the reasons), `plan` (the entry points).
"""

from mesh_operator.planner.placement.own_node import host_on_own_node
from mesh_operator.planner.placement.plan import evaluate_layout, plan_placement
from mesh_operator.planner.placement.replicas import ReplicaPlan, plan_replicas
from mesh_operator.planner.placement.types import (
    MAX_DEVICES,
    MAX_RPC_SERVERS,
    STRATEGIES,
    CurrentPlan,
    DevicePlacement,
    HostTier,
    Layout,
    PlacementRequest,
    PlacementResult,
    Strategy,
)

__all__ = [
    "MAX_DEVICES",
    "MAX_RPC_SERVERS",
    "STRATEGIES",
    "CurrentPlan",
    "DevicePlacement",
    "HostTier",
    "Layout",
    "PlacementRequest",
    "PlacementResult",
    "ReplicaPlan",
    "Strategy",
    "evaluate_layout",
    "host_on_own_node",
    "plan_placement",
    "plan_replicas",
]
