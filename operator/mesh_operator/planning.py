"""The operator's use of the planner: from a MeshModel and its pool to a plan and
the command lines of its pods.

Pure: the model's profile comes from `mesh_operator.source.ProfileCache`.

`operator_llama_flags` says which llama-server flags these command lines set;
`python -m mesh_operator.planning --write-flags [--llama-server PATH]` records
them, with the options of the pinned llama-server's `--help`, in
`mesh_operator.api.llama_server_options`, which the MeshModel schema refuses in
extraArgs (`--check-flags` exits 1 when that record is stale).
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Final

from mesh_operator.api import llama_server_options
from mesh_operator.api.chat_templates import parse_chat_templates
from mesh_operator.api.contract import HOST_PORT
from mesh_operator.api.meshmodel import (
    NGRAM_TYPES,
    DraftModel,
    MeshModelSpec,
    ModelSource,
    Plan,
    PlannedDevice,
    PlannedDraft,
    PlannedHostTier,
    SecretKeyRef,
)
from mesh_operator.api.meshpool import ImageVariant, MeshPoolSpec
from mesh_operator.api.owned_flags import parse_help, render_options_module
from mesh_operator.ledger import ModelClaim
from mesh_operator.manifests.workloads import API_KEY_MOUNT
from mesh_operator.planner import (
    DraftSettings,
    NgramSettings,
    PlacementRequest,
    PlacementResult,
    ReplicaPlan,
    ServerSettings,
    ServingParams,
    build_llama_server_args,
    build_rpc_server_args,
    chat_template_args,
    current_plan_from_api,
    evaluate_layout,
    host_on_own_node,
    plan_placement,
    plan_replicas,
    rpc_devices_by_node,
    to_api_plan,
)
from mesh_operator.planner.draft import estimate_draft_memory
from mesh_operator.planner.inventory import Inventory
from mesh_operator.planner.memory import MIB
from mesh_operator.planner.profile import ModelProfile
from mesh_operator.planner.speculation import DEFAULT_DRAFT_MAX, MEASURED_NGRAM, NgramSpeculation
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
    *,
    speculation: NgramSpeculation | None = None,
) -> PlacementResult:
    """Place the model; a result using more nodes than the pool allows is refused.

    In a pool with `hostUsesOwnNode` the host then runs its own node's layers
    itself (`own_node`). With n-gram `speculation` the predicted time per token is
    the placement's time per step over the tokens a step yields
    (`planner.speculation`); every placement gains alike, so the choice of
    devices does not change.
    """
    limited = limit_inventory(inventory, pool)
    result = plan_placement(profile, limited, request, current_plan_from_api(current))
    if result.feasible and len(result.rpc) > pool.max_nodes_per_model:
        return PlacementResult(
            feasible=False,
            reason=(
                f"needs {len(result.rpc)} nodes; the pool allows {pool.max_nodes_per_model} "
                f"per model (maxNodesPerModel)"
            ),
            strategy=result.strategy,
        )
    result = own_node(result, profile, limited, request, pool)
    if result.feasible and speculation is not None:
        result = dataclasses.replace(
            result, predicted_token_ms=speculation.token_ms(result.predicted_token_ms)
        )
    return result


def own_node(
    result: PlacementResult,
    profile: ModelProfile,
    inventory: Inventory,
    request: PlacementRequest,
    pool: MeshPoolSpec,
) -> PlacementResult:
    """The plan with the host running its own node's layers, in a pool that says so
    (`hostUsesOwnNode`); as it is elsewhere."""
    if not pool.host_uses_own_node:
        return result
    return host_on_own_node(result, profile, inventory, request)


def replicas(
    profile: ModelProfile,
    inventory: Inventory,
    request: PlacementRequest,
    current: Sequence[Plan | None],
    pool: MeshPoolSpec,
    *,
    speculation: NgramSpeculation | None = None,
) -> ReplicaPlan:
    """Place `len(current)` replicas on disjoint nodes, `current[i]` the serving
    plan of the i-th (None: a new one, or one to move).

    One replica is placed by `plan`, exactly as a model without replicas. More
    are placed by the planner's `plan_replicas`, which keeps each serving one on
    its own nodes while it fits; a replica needing more nodes than the pool
    allows per model does not fit, nor do the new ones after it.
    """
    count = len(current)
    if count == 1:
        one = plan(profile, inventory, request, current[0], pool, speculation=speculation)
        if not one.feasible:
            return ReplicaPlan(False, one.reason, (), 0, (), cause=one.reason)
        return ReplicaPlan(True, one.reason, (one,), 1, (0,))
    limited = limit_inventory(inventory, pool)
    result = plan_replicas(
        profile,
        limited,
        request,
        count,
        [current_plan_from_api(c) if c is not None else None for c in current],
    )
    placed: list[PlacementResult] = []
    slots: list[int] = []
    # Why the next replica did not fit, without the planner's ordinal of it (a
    # replica's number is its index, which names its children).
    reason = result.cause
    for slot, one in zip(result.slots, result.replicas, strict=True):
        if len(one.rpc) > pool.max_nodes_per_model:
            reason = (
                f"needs {len(one.rpc)} nodes; the pool allows {pool.max_nodes_per_model} "
                f"per model (maxNodesPerModel)"
            )
            if current[slot] is None:
                break  # the new replicas after it were placed on what it left
            continue
        hosted = own_node(one, profile, limited, request, pool)
        placed.append(
            hosted
            if speculation is None
            else dataclasses.replace(
                hosted, predicted_token_ms=speculation.token_ms(hosted.predicted_token_ms)
            )
        )
        slots.append(slot)
    if len(placed) == count:
        return ReplicaPlan(True, result.reason, tuple(placed), count, tuple(slots))
    return ReplicaPlan(
        False,
        f"{len(placed)} of {count} replicas fit: {reason}",
        tuple(placed),
        len(placed),
        tuple(slots),
        cause=reason,
    )


def combined_claim(plans: Sequence[Plan]) -> Plan | None:
    """What a model's replicas hold in its pool's ledger, as one plan: a model of
    one replica holds its plan; of more, a `ModelClaim` with every replica's
    devices (they are disjoint) and their plans, whose RAM tiers and draft models
    the ledger counts each. None without a planned replica."""
    held = [p for p in plans if p.placed()]
    if not held:
        return None
    if len(held) == 1:
        return held[0]
    fields = {name: getattr(held[0], name) for name in Plan.model_fields}
    fields.update(
        devices=[d for p in held for d in p.devices], host_tier=None, draft=None, replicas=held
    )
    return ModelClaim(**fields)


def status_plans(plan: Plan | None, others: Sequence[Plan]) -> list[Plan]:
    """A model's planned replicas as its status holds them (`plan`, then
    `replicaPlans`), by replica."""
    out = [p for p in ([plan] if plan is not None else []) + list(others) if p.placed()]
    return sorted(out, key=lambda p: p.replica)


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


def ngram_settings(spec: MeshModelSpec) -> NgramSettings | None:
    """The host's n-gram speculation, from `spec.speculative`."""
    s = spec.speculative
    if s is None:
        return None
    return NgramSettings(
        type=s.type,
        n_match=s.n_match,
        n_min=s.n_min,
        n_max=s.n_max,
        size_n=s.size_n,
        size_m=s.size_m,
        min_hits=s.min_hits,
    )


def planned_draft(
    draft: ModelProfile, spec: MeshModelSpec, host_node: str | None
) -> PlannedDraft | None:
    """The draft model's memory on the plan's host node, as the plan records it."""
    return draft_on_host(draft, serving_params(spec), host_node)


def draft_on_host(
    draft: ModelProfile, serving: ServingParams, host_node: str | None
) -> PlannedDraft | None:
    """The draft model's memory on `host_node` for these serving parameters."""
    if host_node is None:
        return None
    memory = estimate_draft_memory(draft, serving)

    def mib(n: int) -> int:
        return -(-n // MIB)

    return PlannedDraft(
        node=host_node,
        weights_mib=mib(memory.weights),
        kv_mib=mib(memory.kv),
        compute_mib=mib(memory.compute),
        memory_mib=mib(memory.total),
    )


def draft_room_problem(plan: Plan, inventory: Inventory, reserve_percent: float) -> str | None:
    """Why the host's node has no room for the plan's draft model, if it has none.

    On a node whose device is its CPU, the draft shares that device's memory with
    the layers planned there (less the reserve); elsewhere it takes the node's
    system RAM (hostMemoryFreeMiB) beside the plan's RAM tier.
    """
    draft = plan.draft
    node = inventory.node(draft.node) if draft is not None else None
    if draft is None or node is None:
        return None
    cpu = next((d for d in node.devices if d.backend == "cpu"), None)
    if cpu is not None:
        reserve = int(cpu.memory_total_mib * reserve_percent / 100)
        used = sum(d.total_mib for d in plan.devices if (d.node, d.device) == (node.name, cpu.id))
        own = plan.own_node_tier()
        if own is not None and (own.node, own.device) == (node.name, cpu.id):
            used += own.memory_mib
        free, where = cpu.memory_free_mib - reserve - used, f"its {cpu.id} device"
    else:
        tier = plan.host_tier
        held = tier.memory_mib if tier is not None and tier.node == node.name else 0
        free, where = node.host_memory_free_mib - held, "its RAM (hostMemoryFreeMiB)"
    if draft.memory_mib <= free:
        return None
    return (
        f"the draft model needs {draft.memory_mib} MiB on the host's node {node.name}; "
        f"{where} has {max(free, 0)} MiB free"
    )


def rehost_for_draft(
    result: PlacementResult,
    profile: ModelProfile,
    draft: ModelProfile,
    inventory: Inventory,
    request: PlacementRequest,
    *,
    speculation: NgramSpeculation | None = None,
) -> PlacementResult | None:
    """The same layout hosted on another of its nodes that has room for the draft
    model (the fastest such), or None. A plan with a RAM tier keeps its host: the
    tier is that node's RAM."""
    if not result.feasible or result.host_tier is not None:
        return None
    moved: list[PlacementResult] = []
    for node in result.nodes:
        if node == result.host_node:
            continue
        candidate = evaluate_layout(profile, inventory, result.layout(), request, host_node=node)
        if not candidate.feasible or candidate.host_node != node:
            continue
        plan = to_plan(candidate)
        plan.draft = draft_on_host(draft, request.serving, node)
        if draft_room_problem(plan, inventory, request.reserve_percent) is None:
            moved.append(candidate)
    if not moved:
        return None
    best = min(moved, key=lambda r: (r.predicted_token_ms, r.host_node or ""))
    if speculation is not None:
        best = dataclasses.replace(
            best, predicted_token_ms=speculation.token_ms(best.predicted_token_ms)
        )
    return best


def with_draft(
    result: PlacementResult,
    profile: ModelProfile,
    draft: ModelProfile,
    inventory: Inventory,
    request: PlacementRequest,
    *,
    speculation: NgramSpeculation | None = None,
) -> tuple[PlacementResult, PlannedDraft | None, str | None]:
    """A plan with its draft model: the draft's memory on the host's node, the host
    moved to another node of the layout when only there is room (its time counted
    with `speculation`, as `plan` counts it), and why the draft fits nowhere (None
    when it fits)."""
    if not result.feasible:
        return result, None, None
    plan = to_plan(result)
    plan.draft = draft_on_host(draft, request.serving, result.host_node)
    problem = draft_room_problem(plan, inventory, request.reserve_percent)
    if problem is None:
        return result, plan.draft, None
    moved = rehost_for_draft(result, profile, draft, inventory, request, speculation=speculation)
    if moved is None:
        return result, plan.draft, problem
    return moved, draft_on_host(draft, request.serving, moved.host_node), None


def ngram_speculation(spec: MeshModelSpec) -> NgramSpeculation | None:
    """What the time model assumes of the spec's n-gram speculation: its declared
    acceptance, else the measured one, and its longest draft."""
    s = spec.speculative
    if s is None:
        return None
    declared = s.size_m if s.type != "ngram-mod" else s.n_max
    acceptance = MEASURED_NGRAM.acceptance
    if s.acceptance_percent is not None:
        acceptance = s.acceptance_percent / 100
    return NgramSpeculation(
        acceptance=acceptance,
        draft_max=DEFAULT_DRAFT_MAX[s.type] if declared is None else declared,
        share=MEASURED_NGRAM.share,
    )


def _pooling(spec: MeshModelSpec) -> tuple[str, ...]:
    # Models like gemma default to no pooling, which /v1/embeddings refuses.
    if spec.embeddings and not any(a.split("=")[0] == "--pooling" for a in spec.extra_args):
        return ("--pooling", "mean")
    return ()


# The built-in chat template of architectures whose files may come without one:
# the base gemma models are published with no `tokenizer.chat_template`, and
# llama-server's fallback (ChatML) uses markers they do not know.
ARCHITECTURE_CHAT_TEMPLATES: Final[Mapping[str, str]] = {
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
}


def chat_template(spec: MeshModelSpec, profile: ModelProfile | None) -> str | None:
    """The built-in chat template the host is started with, if any: the spec's, else
    the architecture's for a file without a template of its own, unless extraArgs
    choose the template themselves."""
    if spec.chat_template is not None:
        return spec.chat_template
    if profile is None or profile.has_chat_template or spec.template_in_extra_args():
        return None
    return ARCHITECTURE_CHAT_TEMPLATES.get(profile.architecture)


def llama_args(
    plan: Plan,
    spec: MeshModelSpec,
    name: str,
    worker_addresses: list[str] | None,
    profile: ModelProfile | None = None,
) -> list[str]:
    """llama-server arguments of the host, workers in --rpc order; `profile`, the
    model file's, says whether the file has a chat template."""
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
        ngram=ngram_settings(spec),
        chat_template=chat_template(spec, profile),
        extra_args=tuple(spec.extra_args) + _pooling(spec),
    )
    endpoints = dict(zip(plan.rpc, addresses, strict=True))
    return build_llama_server_args(plan, model_path(spec), settings, endpoints)


def _flags(args: Iterable[str]) -> set[str]:
    # A value never starts with "-" unless it is a negative number.
    return {a for a in args if a.startswith("-") and not a[1:].replace(".", "").isdigit()}


def operator_llama_flags() -> frozenset[str]:
    """Every llama-server flag the operator's command lines set, as they spell it.

    Found by calling the builders with settings that turn every optional flag on:
    `llama_args` for a MeshModel using every field that shapes the command line,
    and `build_llama_server_args` with every setting. Defaults that extraArgs may
    override (`--pooling` of an embeddings model, a chat template) are not the
    operator's.
    """
    device = PlannedDevice(
        node="n", device="CPU", layers=[0, 2], weights_mib=1, kv_mib=1, compute_mib=1, total_mib=3
    )
    # With a RAM tier, so its flags (--n-cpu-moe, -lm) are the operator's too.
    tier = PlannedHostTier(node="n", moe_layers=1, cpu_layers=0, memory_mib=1)
    plan = Plan(devices=[device], tensor_split=[1], rpc=["n"], host_node="n", host_tier=tier)
    source = ModelSource(url="https://models.example/m.gguf")
    spec = MeshModelSpec(
        source=source,
        pool_ref="p",
        served_name="s",
        aliases=["a"],
        embeddings=True,
        api_key_secret_ref=SecretKeyRef(name="k"),
        draft=DraftModel(source=source),
        chat_template="chatml",
    )
    from_spec = (
        _flags(llama_args(plan, spec, "m", None))
        - _flags(_pooling(spec))
        - _flags(chat_template_args("chatml"))
    )
    settings = ServerSettings(
        serving=ServingParams(ubatch=256, batch=1024),
        aliases=("a",),
        api_key_file="k",
        draft=DraftSettings("d", gpu_layers=1),
        threads=1,
        embeddings=True,
    )
    from_settings = _flags(build_llama_server_args(plan, "m", settings, {"n": PENDING_ENDPOINT}))
    # Every n-gram type with every size it reads.
    sizes = {"ngram-mod": ("n_match", "n_min", "n_max")}
    from_ngram: set[str] = set()
    for kind in NGRAM_TYPES:
        fields = sizes.get(kind, ("size_n", "size_m", "min_hits"))
        ngram = NgramSettings(kind, **dict.fromkeys(fields, 1))
        built = build_llama_server_args(
            plan, "m", ServerSettings(ngram=ngram), {"n": PENDING_ENDPOINT}
        )
        from_ngram |= _flags(built)
    return frozenset(from_spec | from_settings | from_ngram)


def _llama_server_help(binary: Path) -> tuple[str, str]:
    """The `--help` text of a llama-server and its version line."""
    shown = subprocess.run(
        [str(binary), "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    version = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=60, check=True
    )
    line = next((x for x in (version.stderr + version.stdout).splitlines() if x.strip()), "")
    return shown.stdout, line.removeprefix("version:").strip()


def options_module_text(llama_server: Path | None) -> str:
    """The source of `api.llama_server_options`: from `llama_server --help` when given,
    else with the options already recorded, and the builders' flags as they are now."""
    if llama_server is None:
        version = llama_server_options.LLAMA_SERVER_VERSION
        options = llama_server_options.OPTIONS
        templates = llama_server_options.CHAT_TEMPLATES
    else:
        text, version = _llama_server_help(llama_server)
        options = parse_help(text)
        templates = parse_chat_templates(text)
    return render_options_module(version, options, operator_llama_flags(), templates)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mesh_operator.planning")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write-flags", action="store_true")
    mode.add_argument("--check-flags", action="store_true")
    parser.add_argument("--llama-server", type=Path, metavar="PATH")
    args = parser.parse_args(argv)
    target = Path(llama_server_options.__file__)
    text = options_module_text(args.llama_server)
    if args.write_flags:
        target.write_text(text)
        return 0
    if target.read_text() != text:
        print(
            f"{target.name} is stale: run python -m mesh_operator.planning --write-flags",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
