"""The operator's use of the planner: from a MeshModel and its pool to a plan and
the command lines of its pods.

Pure: the model's profile comes from `mesh_operator.source.ProfileCache`.
"""

from __future__ import annotations

from collections.abc import Mapping

from mesh_operator.api.meshmodel import MeshModelSpec, Plan
from mesh_operator.api.meshpool import ImageVariant, MeshPoolSpec
from mesh_operator.gateway.contract import HOST_PORT
from mesh_operator.manifests.workloads import API_KEY_MOUNT
from mesh_operator.planner import (
    DraftSettings,
    PlacementRequest,
    PlacementResult,
    ServerSettings,
    ServingParams,
    build_llama_server_args,
    build_rpc_server_args,
    current_plan_from_api,
    plan_placement,
    rpc_devices_by_node,
    to_api_plan,
)
from mesh_operator.planner.inventory import Inventory
from mesh_operator.planner.profile import ModelProfile
from mesh_operator.source import build_fetch_args, container_model_path, model_file_name

__all__ = ["ModelProfile"]

# Placeholder for worker addresses before the workers have pod IPs; the host is
# kept at zero replicas until they do, so it never starts with these.
PENDING_ENDPOINT = "0.0.0.0:0"


def serving_params(spec: MeshModelSpec) -> ServingParams:
    return ServingParams(
        ctx=spec.context_size,
        parallel=spec.parallel,
        cache_type_k=spec.cache_type_k,
        cache_type_v=spec.cache_type_v,
        flash_attention=spec.flash_attention,
    )


def placement_request(
    spec: MeshModelSpec, pool: MeshPoolSpec, profile: ModelProfile
) -> PlacementRequest:
    return PlacementRequest(
        serving=serving_params(spec),
        strategy=spec.strategy,
        reserve_percent=float(pool.reserve_percent),
        model_file=profile.file_name or model_file_name(spec.source),
    )


def limit_inventory(inventory: Inventory, pool: MeshPoolSpec) -> Inventory:
    """Drop nodes beyond the pool's RTT limit."""
    if pool.max_rtt_ms is None:
        return inventory
    limit = float(pool.max_rtt_ms)
    return Inventory(
        nodes=tuple(n for n in inventory.nodes if n.rtt_ms is None or n.rtt_ms <= limit)
    )


def plan(
    profile: ModelProfile,
    inventory: Inventory,
    request: PlacementRequest,
    current: Plan | None,
    pool: MeshPoolSpec,
) -> PlacementResult:
    """Place the model; a result using more nodes than the pool allows is refused."""
    result = plan_placement(
        profile, limit_inventory(inventory, pool), request, current_plan_from_api(current)
    )
    if result.feasible and len(result.rpc) > pool.max_nodes_per_model:
        return PlacementResult(
            feasible=False,
            reason=(
                f"needs {len(result.rpc)} nodes; the pool allows {pool.max_nodes_per_model} "
                f"per model (maxNodesPerModel)"
            ),
            strategy=result.strategy,
        )
    return result


def to_plan(result: PlacementResult) -> Plan:
    return to_api_plan(result)


def layout_of(plan: Plan) -> tuple[object, ...]:
    """What identifies a plan's placement (a change of it restarts the group)."""
    return (
        tuple((d.node, d.device, tuple(d.layers)) for d in plan.devices),
        tuple(plan.tensor_split),
        tuple(plan.rpc),
        plan.host_node,
    )


def model_path(spec: MeshModelSpec) -> str:
    return container_model_path(spec.source)


def fetch_args(spec: MeshModelSpec) -> list[str]:
    return build_fetch_args(spec.source, spec.sha256)


def draft_fetch_args(spec: MeshModelSpec) -> list[str]:
    """`mesh fetch` arguments of the draft model; none when it sits on the model's PVC."""
    if spec.draft is None or spec.draft.source.pvc is not None:
        return []
    return build_fetch_args(spec.draft.source, spec.draft.sha256)


def draft_problem(spec: MeshModelSpec) -> str | None:
    """Why the draft model cannot be served with this spec, if it cannot."""
    draft = spec.draft
    if draft is None or draft.source.pvc is None:
        return None
    model_pvc = spec.source.pvc
    if model_pvc is None or model_pvc.claim_name != draft.source.pvc.claim_name:
        return "a draft model on a PVC must be on the model's own PVC (spec.source.pvc)"
    return None


def _is_cuda(device: str) -> bool:
    return device.startswith("CUDA")


def gpus_per_node(plan: Plan) -> dict[str, int]:
    """CUDA devices planned per node (a CPU-only node in a cuda pool has none)."""
    return {
        node: sum(1 for d in devs if _is_cuda(d))
        for node, devs in rpc_devices_by_node(plan).items()
    }


def image_variants(plan: Plan) -> dict[str, ImageVariant]:
    """The llama.cpp image variant of each planned node: cuda where its agent
    reported CUDA devices when the plan was made, cpu elsewhere.

    Taken from the plan rather than the live MeshNode, so a node whose report
    flickers does not restart its workers; a re-plan reads it again.
    """
    return {
        node: "cuda" if any(_is_cuda(d) for d in devs) else "cpu"
        for node, devs in rpc_devices_by_node(plan).items()
    }


def rpc_args(
    plan: Plan, pool: MeshPoolSpec, threads: Mapping[str, int] | None = None
) -> dict[str, list[str]]:
    """ggml-rpc-server arguments per planned node, bound to the pod's own IP."""
    out = {}
    for node, devices in rpc_devices_by_node(plan).items():
        exposed = devices
        if pool.backend == "cuda" and pool.sharing == "exclusive":
            # The device plugin hands the container its GPUs renumbered from 0; a
            # CPU device (a CPU-only node of the pool) keeps its name.
            cuda = iter(range(len(devices)))
            exposed = [f"CUDA{next(cuda)}" if _is_cuda(d) else d for d in devices]
        out[node] = build_rpc_server_args(
            exposed,
            host="$(POD_IP)",
            port=pool.rpc_port,
            cache=pool.rpc_cache.enabled,
            threads=(threads or {}).get(node) or pool.rpc_threads,
        )
    return out


def _pooling(spec: MeshModelSpec) -> tuple[str, ...]:
    # Models like gemma default to no pooling, which /v1/embeddings refuses.
    if spec.embeddings and not any(a.split("=")[0] == "--pooling" for a in spec.extra_args):
        return ("--pooling", "mean")
    return ()


def llama_args(
    plan: Plan,
    spec: MeshModelSpec,
    name: str,
    worker_addresses: list[str] | None,
) -> list[str]:
    """llama-server arguments of the host, workers in --rpc order."""
    addresses = worker_addresses or [PENDING_ENDPOINT] * len(plan.rpc)
    settings = ServerSettings(
        serving=serving_params(spec),
        host="$(POD_IP)",
        port=HOST_PORT,
        aliases=tuple(spec.served_names(name)),
        metrics=True,
        api_key_file=(
            f"{API_KEY_MOUNT}/{spec.api_key_secret_ref.key}" if spec.api_key_secret_ref else None
        ),
        embeddings=spec.embeddings,
        draft=(
            DraftSettings(
                model_path=container_model_path(spec.draft.source),
                max_tokens=spec.draft.max_tokens,
            )
            if spec.draft is not None
            else None
        ),
        extra_args=tuple(spec.extra_args) + _pooling(spec),
    )
    endpoints = dict(zip(plan.rpc, addresses, strict=True))
    return build_llama_server_args(plan, model_path(spec), settings, endpoints)
