"""`mesh plan`: plan a model on an inventory and print the plan as JSON or a table.

Owns the flags, reading the inventory file and the output formats; the planning
itself is `mesh_operator.planner`, and on a live pool (`--pool`) `plan_live`.
Exit codes: 0 feasible, 3 infeasible (the plan is still printed), 2 bad input
with one line on stderr, 1 (`--pool`) the API server or the source unreachable.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from mesh_operator import planning
from mesh_operator.cli import plan_live
from mesh_operator.planner import (
    CACHE_TYPES,
    DEFAULT_RPC_PORT,
    STRATEGIES,
    CurrentPlan,
    DraftSettings,
    PlacementRequest,
    PlacementResult,
    PlannerInputError,
    ServerSettings,
    ServingParams,
    build_llama_server_args,
    build_rpc_server_commands,
    host_on_own_node,
    parse_inventory,
    plan_placement,
    read_model_profile,
)
from mesh_operator.planner.api_plan import mib_ceil, planned_device
from mesh_operator.planner.profile import ModelProfile

EXIT_FEASIBLE = 0
EXIT_BAD_INPUT = 2
EXIT_INFEASIBLE = 3
# Kubernetes expands this from the pod's downward API: workers bind to the pod IP.
POD_IP = "$(POD_IP)"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < 100:
        raise argparse.ArgumentTypeError(f"must be in [0, 100), got {value:g}")
    return value


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="plan a model on a pool: devices, tensor split, command lines",
        description=(
            "Read a GGUF header and an inventory of nodes (or a live MeshPool), choose the "
            "devices, their order and the tensor split, and print the plan. Exit 0 feasible, "
            "3 infeasible, 2 bad input, 1 (--pool) API server or source unreachable."
        ),
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="FILE.gguf|SOURCE",
        help="model file; with --pool a SOURCE: https://, http:// or file:// URL, "
        "hf://OWNER/REPO/PATH.gguf[@REVISION], or a local path",
    )
    nodes = parser.add_mutually_exclusive_group(required=True)
    nodes.add_argument("--inventory", metavar="nodes.yaml", help="nodes and devices (YAML)")
    nodes.add_argument(
        "--pool",
        metavar="NAME",
        help="a MeshPool of the cluster: its MeshNodes, with what other models hold",
    )
    plan_live.add_arguments(parser)
    parser.add_argument("--ctx", type=_positive, default=4096, metavar="N", help="context size")
    parser.add_argument(
        "--parallel", type=_positive, default=1, metavar="N", help="server slots (-np)"
    )
    parser.add_argument("--cache-type-k", choices=list(CACHE_TYPES), default="f16", metavar="T")
    parser.add_argument("--cache-type-v", choices=list(CACHE_TYPES), default="f16", metavar="T")
    parser.add_argument("--flash-attn", choices=["on", "off", "auto"], default="auto")
    parser.add_argument("--strategy", choices=list(STRATEGIES), default="latency")
    parser.add_argument(
        "--reserve-percent",
        type=_percent,
        metavar="P",
        help="memory held back per device (default 10; with --pool, the pool's)",
    )
    parser.add_argument("--output", choices=["json", "table"], default="json")
    parser.add_argument(
        "--current",
        metavar="PLAN.json",
        help="a previous `mesh plan` JSON output: keep it unless a plan is clearly better",
    )
    parser.add_argument(
        "--draft",
        metavar="FILE.gguf|SOURCE",
        help="a draft model for speculative decoding (-md), planned in RAM on the host's "
        "node; with --pool a SOURCE as for --model",
    )
    parser.add_argument(
        "--host-uses-own-node",
        action="store_true",
        help="the host runs the layers of its own node's CPU device itself, no RPC server "
        "there (a MeshPool's hostUsesOwnNode; with --pool, the pool's)",
    )
    parser.add_argument("--rpc-port", type=_positive, default=DEFAULT_RPC_PORT, metavar="PORT")
    parser.add_argument("--port", type=_positive, default=8080, metavar="PORT")


def _read_inventory(path: str) -> Any:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise PlannerInputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise PlannerInputError(f"{path}: {where}{problem}") from None


def _read_current(path: str) -> CurrentPlan:
    try:
        data = json.loads(Path(path).read_text())
        layout = tuple(
            (str(d["node"]), str(d["device"]), (int(d["layers"][0]), int(d["layers"][1])))
            for d in data["devices"]
        )
        host = data.get("hostNode")
        tier = next(
            (
                (str(n["node"]), int(n["moeLayers"]), int(n["cpuLayers"]))
                for n in data.get("nodes", [])
                if n.get("hostTierMiB")
            ),
            None,
        )
        own = next((n for n in data.get("nodes", []) if n.get("hostTierDevice")), None)
        if own is not None:
            # The host ran that node's layers itself: the planner's plan has the device.
            device = (str(own["node"]), str(own["hostTierDevice"]), (0, int(own["cpuLayers"])))
            layout, tier = (device, *layout), None
    except OSError as exc:
        raise PlannerInputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise PlannerInputError(f"{path}: not a `mesh plan` JSON output ({exc})") from None
    return CurrentPlan(layout=layout, host_node=str(host) if host else None, tier=tier)


def _report(
    result: PlacementResult, profile: ModelProfile, args: argparse.Namespace
) -> dict[str, Any]:
    commands: dict[str, Any] = {"llama-server": [], "ggml-rpc-server": {}}
    if result.feasible:
        draft = DraftSettings(model_path=args.draft) if args.draft else None
        settings = ServerSettings(serving=_serving(args), port=args.port, draft=draft)
        endpoints = {n: f"{n}:{args.rpc_port}" for n in result.rpc}
        commands["llama-server"] = build_llama_server_args(result, args.model, settings, endpoints)
        commands["ggml-rpc-server"] = build_rpc_server_commands(
            result, host=POD_IP, port=args.rpc_port
        )
    return {
        "feasible": result.feasible,
        "reason": result.reason,
        "strategy": result.strategy,
        "devices": [{**planned_device(d).to_wire(), "freeMiB": d.free_mib} for d in result.devices],
        "tensorSplit": list(result.tensor_split),
        "rpc": list(result.rpc),
        "hostNode": result.host_node,
        "predictedTokenMs": round(result.predicted_token_ms, 3) if result.feasible else None,
        "hostMemoryMiB": mib_ceil(result.host_memory_bytes) if result.feasible else None,
        "nodes": _nodes(result),
        "draft": None,
        "model": {
            "file": profile.file_name,
            "architecture": profile.architecture,
            "layers": profile.n_device_layers,
            "weightsMiB": mib_ceil(profile.weight_bytes),
        },
        "args": commands,
    }


def _nodes(result: PlacementResult) -> list[dict[str, Any]]:
    """Per planned node (--rpc order, after the host's node when it runs layers
    itself): VRAM and RAM the plan takes there."""
    tier = result.host_tier
    own = [tier.node] if tier is not None and tier.device is not None else []
    out = []
    for name in dict.fromkeys([*own, *result.rpc]):
        vram = sum(mib_ceil(d.total_bytes) for d in result.devices if d.node == name)
        here = tier is not None and tier.node == name
        out.append(
            {
                "node": name,
                "vramMiB": vram,
                "hostTierMiB": mib_ceil(tier.total_bytes) if here and tier else 0,
                "moeLayers": tier.moe_layers if here and tier else 0,
                "cpuLayers": tier.cpu_layers if here and tier else 0,
                "hostTierDevice": tier.device if here and tier else None,
            }
        )
    return out


def _tier_line(node: dict[str, Any]) -> str:
    if node.get("hostTierDevice"):
        return (
            f"host's own {node['hostTierDevice']} on {node['node']}: "
            f"layers 0-{node['cpuLayers'] - 1}, {node['hostTierMiB']} MiB"
        )
    parts = []
    if node["cpuLayers"]:
        parts.append(f"layers 0-{node['cpuLayers'] - 1}")
    if node["moeLayers"] > node["cpuLayers"]:
        parts.append(f"experts of layers {node['cpuLayers']}-{node['moeLayers'] - 1}")
    return f"RAM on {node['node']}: {' and '.join(parts)}, {node['hostTierMiB']} MiB"


def _table(report: dict[str, Any], args: argparse.Namespace) -> str:
    model = report["model"]
    lines = [
        f"model {model['file']} ({model['architecture']}, {model['layers']} device layers, "
        f"{model['weightsMiB']} MiB on devices); ctx {args.ctx} x {args.parallel} slot(s), "
        f"strategy {report['strategy']}",
        ("feasible: " if report["feasible"] else "INFEASIBLE: ") + report["reason"],
    ]
    if report["devices"] or report["nodes"]:
        header = ("NODE", "DEVICE", "LAYERS", "WEIGHTS", "KV", "COMPUTE", "TOTAL", "FREE")
        rows = [
            (
                d["node"],
                d["device"],
                f"{d['layers'][0]}-{d['layers'][1] - 1}",
                *(
                    f"{d[k]} MiB"
                    for k in ("weightsMiB", "kvMiB", "computeMiB", "totalMiB", "freeMiB")
                ),
            )
            for d in report["devices"]
        ]
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        lines.append("")
        for row in [header, *rows]:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
        lines += [_tier_line(n) for n in report["nodes"] if n["hostTierMiB"]]
        if report["draft"]:
            d = report["draft"]
            lines.append(
                f"draft model on {d['node']}: {d['memoryMiB']} MiB of RAM (weights "
                f"{d['weightsMiB']}, KV {d['kvMiB']}, compute {d['computeMiB']} MiB)"
            )
        lines += [
            "",
            f"tensor split {','.join(map(str, report['tensorSplit']))}; "
            f"--rpc order {','.join(report['rpc'])}; host on {report['hostNode']}; "
            f"{report['predictedTokenMs']} ms/token; host RAM {report['hostMemoryMiB']} MiB",
            "",
            "llama-server " + shlex.join(report["args"]["llama-server"]),
        ]
        for node, node_args in report["args"]["ggml-rpc-server"].items():
            lines.append(f"ggml-rpc-server ({node}) " + shlex.join(node_args))
    return "\n".join(lines)


def _serving(args: argparse.Namespace) -> ServingParams:
    return ServingParams(
        ctx=args.ctx,
        parallel=args.parallel,
        cache_type_k=args.cache_type_k,
        cache_type_v=args.cache_type_v,
        flash_attention=args.flash_attn,
    )


def run(args: argparse.Namespace) -> int:
    if args.pool is not None:
        if args.host_uses_own_node:
            print(
                "mesh plan: error: --host-uses-own-node is for --inventory; with --pool "
                "the pool's hostUsesOwnNode applies",
                file=sys.stderr,
            )
            return EXIT_BAD_INPUT
        return plan_live.run_live(args, _report, _table)
    try:
        profile = read_model_profile(args.model)
        inventory = parse_inventory(_read_inventory(args.inventory), source=args.inventory)
        current = _read_current(args.current) if args.current else None
        request = PlacementRequest(
            serving=_serving(args),
            strategy=args.strategy,
            reserve_percent=10.0 if args.reserve_percent is None else args.reserve_percent,
        )
        draft = read_model_profile(args.draft) if args.draft else None
        result = plan_placement(profile, inventory, request, current=current)
        if args.host_uses_own_node:
            result = host_on_own_node(result, profile, inventory, request)
        planned, problem = None, None
        if draft is not None:
            result, planned, problem = planning.with_draft(
                result, profile, draft, inventory, request
            )
        report = _report(result, profile, args)
        plan_live.report_draft(report, planned, problem)
    except PlannerInputError as exc:
        print(f"mesh plan: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.output == "json":
        print(json.dumps(report, indent=2))
    else:
        print(_table(report, args))
    return EXIT_FEASIBLE if report["feasible"] else EXIT_INFEASIBLE
