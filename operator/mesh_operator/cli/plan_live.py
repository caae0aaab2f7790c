"""`mesh plan --pool NAME --model SOURCE`: what the operator would do with a model
on a live pool.

The pool's MeshPool, its Nodes and MeshNodes and every MeshModel's plan are read
from the API server and turned into the planner's inventory by the operator's own
ledger (`ledger.build_pool_view`: other models' plans held, the pool's cap,
reserve, RTT limit and sharing mode applied); the model's header is read from its
source by the operator's reader (`source.ProfileCache`), and the plan and the
command lines come from `planning`, as for a MeshModel. The output is `mesh plan`'s,
plus the models that already hold memory on the pool's devices.

SOURCE is one of:
  https://HOST/PATH.gguf, http://..., file:///PATH.gguf   read with range requests
  hf://OWNER/REPO/PATH.gguf[@REVISION]                     a Hugging Face file
  PATH.gguf                                                a local file
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import urllib3
from kubernetes.client import ApiException
from pydantic import ValidationError

from mesh_operator import planning
from mesh_operator.api.base import GROUP, MESHMODEL_PLURAL, MESHNODE_PLURAL, MESHPOOL_PLURAL
from mesh_operator.api.base import VERSION as API_VERSION
from mesh_operator.api.contract import check_model_name
from mesh_operator.api.meshmodel import (
    HuggingFaceSource,
    MeshModelSpec,
    ModelSource,
    Plan,
    PlannedDraft,
)
from mesh_operator.api.meshnode import MeshNodeStatus
from mesh_operator.api.meshpool import MeshPoolSpec
from mesh_operator.handlers.snapshot import (
    meshnode_status,
    model_key,
    model_plan,
    node_info,
    pool_claims,
)
from mesh_operator.kubeclient import KubeconfigError, api_client, unreachable_reason
from mesh_operator.ledger import NodeInfo, PoolView, build_pool_view, to_inventory
from mesh_operator.planner import (
    PlacementResult,
    PlannerInputError,
)
from mesh_operator.planner.profile import ModelProfile
from mesh_operator.source import ProfileCache, SourceError, model_file_name

EXIT_FEASIBLE = 0
EXIT_UNREACHABLE = 1
EXIT_BAD_INPUT = 2
EXIT_INFEASIBLE = 3
# Seconds for each API request: an API server that does not answer is an error.
API_TIMEOUT = 30.0
HF_SCHEME = "hf://"
URL_SCHEMES = ("https://", "http://", "file://")


class LiveInputError(ValueError):
    """Bad input (a SOURCE, a pool that does not exist, invalid options): exit 2."""


class UnreachableError(RuntimeError):
    """The API server or the model's source could not be reached: exit 1."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--name",
        metavar="[NAMESPACE/]NAME",
        help="with --pool: the MeshModel this would be (default: default/<file name>); "
        "its own plan, if any, is not counted as held and is kept unless clearly bettered",
    )
    parser.add_argument(
        "--kubeconfig",
        help="with --pool: kubeconfig file (default: $KUBECONFIG, in a pod its service "
        "account, ~/.kube/config)",
    )


def parse_source(text: str) -> ModelSource:
    """The MeshModel source a SOURCE names (see the module). LiveInputError when bad."""
    if text.startswith(HF_SCHEME):
        rest = text[len(HF_SCHEME) :]
        body, at, revision = rest.rpartition("@")
        if not at or "/" in revision:
            body, revision = rest, "main"
        owner_repo_file = body.split("/", 2)
        if len(owner_repo_file) != 3 or not all(owner_repo_file) or not revision:
            raise LiveInputError(
                f"{text}: expected hf://OWNER/REPO/PATH.gguf[@REVISION] for a Hugging Face file"
            )
        owner, repo, file = owner_repo_file
        try:
            hf = HuggingFaceSource(repo=f"{owner}/{repo}", file=file, revision=revision)
        except ValidationError as exc:
            raise LiveInputError(f"{text}: {_first_error(exc)}") from None
        return ModelSource(huggingface=hf)
    if text.startswith(URL_SCHEMES):
        try:
            return ModelSource(url=text)
        except ValidationError as exc:
            raise LiveInputError(f"{text}: {_first_error(exc)}") from None
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise LiveInputError(
            f"{text}: unknown scheme {scheme}:// (use https://, http://, file://, hf:// "
            "or a local path)"
        )
    path = Path(text).expanduser()
    if not path.is_file():
        raise LiveInputError(f"{text}: no such file")
    return ModelSource(url=path.resolve().as_uri())


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else str(error["msg"])


@dataclass(frozen=True)
class LivePool:
    """What the operator would read of one pool: its spec, the cluster's Nodes and
    MeshNodes, and every model's current plan by `namespace/name`."""

    name: str
    spec: MeshPoolSpec
    nodes: tuple[NodeInfo, ...]
    meshnodes: Mapping[str, MeshNodeStatus]
    plans: Mapping[str, tuple[str, Plan]]


def read_live_pool(kubeconfig: str | None, pool: str) -> LivePool:
    """Read the pool and what its plans depend on from the API server."""
    try:
        api = api_client(kubeconfig, timeout=API_TIMEOUT, retries=0, user_agent="mesh-plan")
    except KubeconfigError as exc:
        raise LiveInputError(str(exc)) from None
    custom = kubernetes.client.CustomObjectsApi(api)
    core = kubernetes.client.CoreV1Api(api)
    try:
        try:
            body = custom.get_cluster_custom_object(GROUP, API_VERSION, MESHPOOL_PLURAL, pool)
        except ApiException as exc:
            if exc.status == 404:
                raise LiveInputError(f"MeshPool {pool!r} does not exist") from None
            raise
        # As the API serves them (camelCase JSON), which the operator's readers take.
        raw: Any = core.list_node(_preload_content=False)
        nodes = json.loads(raw.data)
        meshnodes = custom.list_cluster_custom_object(GROUP, API_VERSION, MESHNODE_PLURAL)
        models = custom.list_cluster_custom_object(GROUP, API_VERSION, MESHMODEL_PLURAL)
    except ApiException as exc:
        raise UnreachableError(f"the API server answered {exc.status} {exc.reason}") from None
    except (OSError, urllib3.exceptions.HTTPError) as exc:
        raise UnreachableError(f"cannot reach the API server: {unreachable_reason(exc)}") from None
    pool_body = body if isinstance(body, dict) else {}
    try:
        spec = MeshPoolSpec.model_validate(pool_body.get("spec") or {})
    except ValidationError as exc:
        raise LiveInputError(f"MeshPool {pool!r}: {_first_error(exc)}") from None
    statuses = {}
    for item in _items(meshnodes):
        status = meshnode_status(item)
        if status is not None:
            statuses[item["metadata"]["name"]] = status
    plans = {}
    for item in _items(models):
        found = model_plan(item)
        if found is not None:
            meta = item["metadata"]
            plans[model_key(meta.get("namespace", ""), meta["name"])] = found
    return LivePool(
        name=pool,
        spec=spec,
        nodes=tuple(node_info(n) for n in _items(nodes)),
        meshnodes=statuses,
        plans=plans,
    )


def _items(listing: object) -> list[dict[str, Any]]:
    items = listing.get("items", []) if isinstance(listing, dict) else []
    return [i for i in items if isinstance(i, dict)]


def model_identity(name: str | None, source: ModelSource) -> tuple[str, str]:
    """(namespace, name) of the MeshModel `--name` means; default/<file stem> unset."""
    if name:
        namespace, _, model = name.rpartition("/")
        if not model:
            raise LiveInputError(f"--name {name!r}: expected [NAMESPACE/]NAME")
        try:
            check_model_name(model)
        except ValueError as exc:
            raise LiveInputError(f"--name: {exc}") from None
        return namespace or "default", model
    return "default", model_file_name(source).removesuffix(".gguf").lower()


def build_spec(
    args: argparse.Namespace, source: ModelSource, draft: ModelSource | None = None
) -> MeshModelSpec:
    """The MeshModel spec the serving options describe, validated as the CRD would."""
    try:
        return MeshModelSpec.model_validate(
            {
                **({"draft": {"source": draft.to_wire()}} if draft is not None else {}),
                "source": source.to_wire(),
                "poolRef": args.pool,
                "contextSize": args.ctx,
                "parallel": args.parallel,
                "cacheTypeK": args.cache_type_k,
                "cacheTypeV": args.cache_type_v,
                "flashAttention": args.flash_attn,
                "strategy": args.strategy,
            }
        )
    except ValidationError as exc:
        raise LiveInputError(_first_error(exc)) from None


def read_profile(source: ModelSource) -> ModelProfile:
    """The model's profile, read from its header as the operator reads it."""
    try:
        return ProfileCache().get(source, None, os.environ.get("HF_TOKEN"))
    except SourceError as exc:
        if exc.reason == "SourceUnreachable":
            raise UnreachableError(str(exc)) from None
        raise LiveInputError(str(exc)) from None


@dataclass(frozen=True)
class Holding:
    """Memory a model's current plan holds on a device of the pool."""

    model: str
    node: str
    device: str
    mib: int

    def to_wire(self) -> dict[str, Any]:
        return {"model": self.model, "node": self.node, "device": self.device, "MiB": self.mib}


def build_holdings(claims: Mapping[str, Plan], pool_nodes: set[str]) -> list[Holding]:
    """Every device of the pool another model's plan holds memory on. Pure."""
    held = [
        Holding(model=key, node=d.node, device=d.device, mib=d.total_mib)
        for key, plan in claims.items()
        for d in plan.devices
        if d.node in pool_nodes
    ]
    return sorted(held, key=lambda h: (h.node, h.device, h.model))


def _pool_view(live: LivePool, key: str, now: dt.datetime) -> tuple[dict[str, Plan], PoolView]:
    """Other models' plans on the pool, and the pool as the model `key` sees it."""
    claims = pool_claims(live.plans, live.name, exclude=key)
    return claims, build_pool_view(live.spec, live.nodes, live.meshnodes, claims, now)


@dataclass(frozen=True)
class LivePlan:
    """What the operator would do with the model on the pool."""

    result: PlacementResult
    holdings: list[Holding]  # memory other models hold in the pool
    unusable: list[dict[str, str]]  # the pool's nodes it cannot use, and why
    draft: PlannedDraft | None = None  # its draft model's memory, if it has one
    draft_problem: str | None = None  # why the draft fits on no node of the plan


def plan_on_pool(
    live: LivePool,
    spec: MeshModelSpec,
    profile: ModelProfile,
    key: str,
    *,
    reserve_percent: float | None,
    now: dt.datetime,
    draft: ModelProfile | None = None,
) -> LivePlan:
    """The operator's plan for the model `key` on the pool, hosted where its
    `draft` model has room if it has one (`planning.with_draft`). Pure."""
    claims, view = _pool_view(live, key, now)
    own = live.plans.get(key)
    current = own[1] if own is not None and own[0] == live.name and own[1].placed() else None
    request = planning.placement_request(spec, live.spec, profile)
    if reserve_percent is not None:
        request = dataclasses.replace(request, reserve_percent=reserve_percent)
    speculation = planning.ngram_speculation(spec)
    inventory = to_inventory(view)
    result = planning.plan(profile, inventory, request, current, live.spec, speculation=speculation)
    planned, problem = None, None
    if draft is not None:
        result, planned, problem = planning.with_draft(
            result, profile, draft, inventory, request, speculation=speculation
        )
    unusable = [{"node": n.name, "problem": n.problem} for n in view.nodes if not n.usable]
    holdings = build_holdings(claims, {n.name for n in view.nodes})
    return LivePlan(result, holdings, unusable, planned, problem)


def operator_commands(
    result: PlacementResult,
    spec: MeshModelSpec,
    name: str,
    pool: MeshPoolSpec,
    profile: ModelProfile,
) -> dict[str, Any]:
    """The host's and the workers' arguments as the operator would write them; RPC
    endpoints are `<node>:<rpc port>` (pods get theirs at start)."""
    if not result.feasible:
        return {"llama-server": [], "ggml-rpc-server": {}}
    plan = planning.to_plan(result)
    endpoints = [f"{node}:{pool.rpc_port}" for node in plan.rpc]
    return {
        "llama-server": planning.llama_args(plan, spec, name, endpoints, profile),
        "ggml-rpc-server": planning.rpc_args(plan, pool),
    }


def holdings_table(holdings: list[Holding], unusable: list[dict[str, str]]) -> str:
    lines = []
    if holdings:
        rows = [("MODEL", "NODE", "DEVICE", "HELD")] + [
            (h.model, h.node, h.device, f"{h.mib} MiB") for h in holdings
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines += ["", "memory other models hold in the pool:"]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    else:
        lines += ["", "no other model holds memory in the pool"]
    for node in unusable:
        lines.append(f"not usable: {node['node']}: {node['problem']}")
    return "\n".join(line.rstrip() for line in lines)


def report_draft(report: dict[str, Any], draft: PlannedDraft | None, problem: str | None) -> None:
    """Put the draft model's memory into `report`; a draft that fits on no node of
    the plan makes it infeasible, as the operator would."""
    if draft is None:
        return
    report["draft"] = draft.to_wire()
    if problem is not None:
        report["feasible"] = False
        report["reason"] = problem


def run_live(
    args: argparse.Namespace,
    report: Callable[[PlacementResult, ModelProfile, argparse.Namespace], dict[str, Any]],
    table: Callable[[dict[str, Any], argparse.Namespace], str],
) -> int:
    """`mesh plan --pool`; `report` and `table` are `mesh plan`'s own output builders."""
    try:
        if args.current:
            raise LiveInputError(
                "--current is for --inventory: with --pool the model's plan is read from "
                "the cluster (--name)"
            )
        source = parse_source(args.model)
        draft_source = parse_source(args.draft) if args.draft else None
        namespace, name = model_identity(args.name, source)
        spec = build_spec(args, source, draft_source)
        live = read_live_pool(args.kubeconfig, args.pool)
        profile = read_profile(source)
        draft = read_profile(draft_source) if draft_source is not None else None
        key = model_key(namespace, name)
        now = dt.datetime.now(dt.UTC)
        planned = plan_on_pool(
            live, spec, profile, key, reserve_percent=args.reserve_percent, now=now, draft=draft
        )
        out = report(planned.result, profile, args)
        report_draft(out, planned.draft, planned.draft_problem)
    except (LiveInputError, PlannerInputError) as exc:
        print(f"mesh plan: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except UnreachableError as exc:
        print(f"mesh plan: error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    out["args"] = operator_commands(planned.result, spec, name, live.spec, profile)
    out["pool"] = live.name
    out["heldBy"] = [h.to_wire() for h in planned.holdings]
    out["unusableNodes"] = planned.unusable
    if args.output == "json":
        print(json.dumps(out, indent=2))
    else:
        print(table(out, args) + holdings_table(planned.holdings, planned.unusable))
    return EXIT_FEASIBLE if out["feasible"] else EXIT_INFEASIBLE
