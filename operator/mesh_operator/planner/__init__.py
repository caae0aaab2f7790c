"""The planner: from a GGUF header and the pool's free memory to llama.cpp command lines.

Pure code: no Kubernetes and no I/O except reading a model's header. Used by
the operator (MeshModel reconciliation) and by `mesh plan`. Modules:
`gguf_header` (the byte format), `profile` (what a model needs per layer),
`memory` (per-device buffers), `compute` (the compute buffers, by replaying
ggml's graph allocator), `timing` (predicted ms/token), `tensor_split`
(llama.cpp's `-ts` rule), `placement` (the search), `bounds` (lower bounds that
let the search skip node sets), `commands` (argument lists), `api_plan`
(MeshModel status), `inventory` (the pool).

Public API::

    read_model_profile(source: str | PathLike | bytes | Sequence[...], *,
                       file_name: str | None = None) -> ModelProfile
        A path (split siblings `-0000k-of-0000N.gguf` are found next to it), the
        bytes of a header (possibly truncated right after the tensor infos), or
        the parts of a split model. Raises PlannerInputError.

    estimate_memory(profile, params: ServingParams,
                    layer_ranges: Sequence[tuple[int, int]]) -> MemoryEstimate
        Weights, KV and compute bytes per device for `[first, last)` ranges in
        device order (layer n_layer is the output layer), plus host RAM (total
        and `host_buffers`: input layer, output buffer, compute).

    parse_inventory(data: Mapping, source: str = "inventory") -> Inventory

    plan_placement(profile, inventory, request: PlacementRequest | None = None,
                   current: CurrentPlan | PlacementResult | None = None)
        -> PlacementResult
        `feasible`, `reason`, `devices` (node, device, layers, bytes, free),
        `tensor_split` (ints), `rpc` (nodes in --rpc order), `host_node`,
        `predicted_token_ms`. Passing `current` keeps a serving plan stable.

    plan_replicas(profile, inventory, request, count, current=()) -> ReplicaPlan
        `count` plans on disjoint nodes, serving ones (`current[i]`) kept while
        they fit; `feasible`, `reason` ("k of n replicas fit: ..."), `replicas`,
        `fitting`, `slowest_ms`.

    evaluate_layout(profile, inventory, layout, request=None, host_node=None)
        -> PlacementResult
        Estimate and time a given layout without searching (baselines, tests).

    host_on_own_node(result, profile, inventory, request) -> PlacementResult
        A pool's `hostUsesOwnNode`: the plan with its first node's CPU layers run
        by the host's llama-server itself (`host_tier` with `device` set), no
        RPC server on that node; the plan unchanged where that does not apply.

    layers_for_split(split: Sequence[float], n_device_layers: int)
        -> list[tuple[int, int]]                      llama.cpp's -ts rule

    build_llama_server_args(plan: Plan | PlacementResult, model_path: str,
                            settings: ServerSettings,
                            rpc_endpoints: Mapping[str, str]) -> list[str]
    build_rpc_server_args(devices: Sequence[str], *, host: str, port: int = 50052,
                          cache: bool = True, threads: int | None = None) -> list[str]
    build_rpc_server_commands(plan, *, host, port=50052, cache=True, threads=None)
        -> dict[str, list[str]]
    chat_template_args(name: str) -> list[str]       a built-in chat template's flags

    to_api_plan(result: PlacementResult) -> api.meshmodel.Plan
    current_plan_from_api(plan: api.meshmodel.Plan | None) -> CurrentPlan | None
"""

from mesh_operator.planner.api_plan import current_plan_from_api, to_api_plan
from mesh_operator.planner.commands import (
    DEFAULT_RPC_PORT,
    DraftSettings,
    NgramSettings,
    ServerSettings,
    build_llama_server_args,
    build_rpc_server_args,
    build_rpc_server_commands,
    chat_template_args,
    rpc_devices_by_node,
)
from mesh_operator.planner.errors import PlannerInputError
from mesh_operator.planner.inventory import (
    Inventory,
    InventoryDevice,
    InventoryNode,
    parse_inventory,
)
from mesh_operator.planner.memory import (
    CACHE_TYPES,
    DeviceMemory,
    MemoryEstimate,
    ServingParams,
    estimate_memory,
)
from mesh_operator.planner.placement import (
    MAX_DEVICES,
    MAX_RPC_SERVERS,
    STRATEGIES,
    CurrentPlan,
    DevicePlacement,
    PlacementRequest,
    PlacementResult,
    ReplicaPlan,
    Strategy,
    evaluate_layout,
    host_on_own_node,
    plan_placement,
    plan_replicas,
)
from mesh_operator.planner.profile import ARCHITECTURES, ModelProfile, read_model_profile
from mesh_operator.planner.tensor_split import layers_for_split, split_for_layers
from mesh_operator.planner.timing import CostModel

__all__ = [
    "ARCHITECTURES",
    "CACHE_TYPES",
    "DEFAULT_RPC_PORT",
    "MAX_DEVICES",
    "MAX_RPC_SERVERS",
    "STRATEGIES",
    "CostModel",
    "CurrentPlan",
    "DeviceMemory",
    "DevicePlacement",
    "DraftSettings",
    "Inventory",
    "InventoryDevice",
    "InventoryNode",
    "MemoryEstimate",
    "ModelProfile",
    "NgramSettings",
    "PlacementRequest",
    "PlacementResult",
    "PlannerInputError",
    "ReplicaPlan",
    "ServerSettings",
    "ServingParams",
    "Strategy",
    "build_llama_server_args",
    "build_rpc_server_args",
    "build_rpc_server_commands",
    "chat_template_args",
    "current_plan_from_api",
    "estimate_memory",
    "evaluate_layout",
    "host_on_own_node",
    "layers_for_split",
    "parse_inventory",
    "plan_placement",
    "plan_replicas",
    "read_model_profile",
    "rpc_devices_by_node",
    "split_for_layers",
    "to_api_plan",
]
