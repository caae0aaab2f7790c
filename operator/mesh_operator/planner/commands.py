"""Command lines of a plan: `llama-server` on the host, `ggml-rpc-server` per node.

Owns the flags. Pure builders shared by the operator (container args) and the
tests (processes on this machine), so what is tested is what is deployed. The
lists hold arguments only, not the binary. The llama-server flags set here are
the ones a MeshModel's extraArgs may not set (`mesh_operator.api.owned_flags`,
regenerated from these builders); `-fit off` stops recent llama-server from
rewriting the computed split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mesh_operator.api.contract import DEFAULT_RPC_PORT, HOST_PORT
from mesh_operator.api.meshmodel import Plan
from mesh_operator.planner.errors import PlannerInputError
from mesh_operator.planner.memory import ServingParams
from mesh_operator.planner.placement import PlacementResult

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_RPC_PORT",
    "DEFAULT_UBATCH",
    "DraftSettings",
    "NgramSettings",
    "ServerSettings",
    "build_llama_server_args",
    "build_rpc_server_args",
    "build_rpc_server_commands",
    "chat_template_args",
    "rpc_devices_by_node",
]

DEFAULT_UBATCH = 512
DEFAULT_BATCH = 2048


@dataclass(frozen=True)
class DraftSettings:
    """A draft model for speculative decoding, loaded by the host.

    It runs on the host's CPU (`-devd none`): the host pod has no accelerator of
    its own, and without `-devd` llama.cpp would offload the draft onto the RPC
    devices, in memory no plan holds and with round trips for every drafted token.
    """

    model_path: str
    max_tokens: int = 16
    gpu_layers: int | None = None


@dataclass(frozen=True)
class NgramSettings:
    """Draft-free speculative decoding: llama.cpp drafts from n-grams of the context.

    `type` is one of llama.cpp's `ngram-*` speculation types; the sizes are its own
    (`--spec-<type>-<size>`): n_match, n_min, n_max for ngram-mod, size_n, size_m,
    min_hits for the others. Unset sizes keep llama.cpp's defaults.
    """

    type: str
    n_match: int | None = None
    n_min: int | None = None
    n_max: int | None = None
    size_n: int | None = None
    size_m: int | None = None
    min_hits: int | None = None

    def args(self) -> list[str]:
        out: list[str] = []
        for name in ("n_match", "n_min", "n_max", "size_n", "size_m", "min_hits"):
            value = getattr(self, name)
            if value is not None:
                out += [f"--spec-{self.type}-{name.replace('_', '-')}", str(value)]
        return out


@dataclass(frozen=True)
class ServerSettings:
    """Everything about the host's llama-server that is not in the plan."""

    serving: ServingParams = field(default_factory=ServingParams)
    host: str = "0.0.0.0"
    port: int = HOST_PORT
    aliases: tuple[str, ...] = ()
    metrics: bool = True
    api_key_file: str | None = None
    draft: DraftSettings | None = None
    ngram: NgramSettings | None = None
    threads: int | None = None
    embeddings: bool = False
    # A llama.cpp built-in chat template by name (`mesh_operator.api.chat_templates`).
    chat_template: str | None = None
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Layout:
    nodes: list[str]  # --rpc order
    split: list[int]
    gpu_layers: int  # layers on devices: the last ones
    cpu_layers: int  # whole layers [0, cpu_layers) on the host's CPU
    moe_layers: int  # routed experts of layers [0, moe_layers) in the host's RAM


def _layout(plan: Plan | PlacementResult) -> _Layout:
    if isinstance(plan, PlacementResult):
        if not plan.feasible:
            raise PlannerInputError(f"no command line for an infeasible plan: {plan.reason}")
        tier = plan.host_tier
        return _Layout(
            list(plan.rpc),
            list(plan.tensor_split),
            plan.n_device_layers - (tier.cpu_layers if tier else 0),
            tier.cpu_layers if tier else 0,
            tier.moe_layers if tier else 0,
        )
    planned = plan.host_tier
    if not plan.devices and planned is not None and planned.device is not None:
        # The host runs every layer on its own node's CPU: no RPC device at all.
        return _Layout([], [], 0, planned.cpu_layers, 0)
    if not plan.rpc or not plan.tensor_split or not plan.devices:
        raise PlannerInputError("the plan has no devices")
    first = min(d.layers[0] for d in plan.devices)
    last = max(d.layers[1] for d in plan.devices)
    cpu = planned.cpu_layers if planned else 0
    if first != cpu:
        raise PlannerInputError(
            f"the plan's devices start at layer {first}, but {cpu} layers are on the CPU"
        )
    return _Layout(
        list(plan.rpc),
        list(plan.tensor_split),
        last - first,
        cpu,
        planned.moe_layers if planned else 0,
    )


def _ram_tier_args(layout: _Layout) -> list[str]:
    """The flags that put the plan's RAM tier in the host's RAM.

    Whole layers need none beyond `-ngl` (llama.cpp keeps the first layers past
    `-ngl` on the CPU). `--n-cpu-moe k` puts the routed experts of layers < k
    (`blk.<i>.ffn_(up|down|gate|gate_up)_exps`) in the CPU buffer, and
    `--load-mode none` makes the CPU's weights memory of their own rather than a
    mapping of the file's range from the first such tensor to the last, so RAM
    holds exactly what the plan counted (llama.cpp advises it with overrides).
    """
    args = ["--n-cpu-moe", str(layout.moe_layers)] if layout.moe_layers else []
    if layout.moe_layers or layout.cpu_layers:
        args += ["-lm", "none"]
    return args


def build_llama_server_args(
    plan: Plan | PlacementResult,
    model_path: str,
    settings: ServerSettings,
    rpc_endpoints: Mapping[str, str],
) -> list[str]:
    """Arguments of the host's llama-server; `rpc_endpoints` maps node -> host:port."""
    layout = _layout(plan)
    nodes, split, gpu_layers = layout.nodes, layout.split, layout.gpu_layers
    missing = [n for n in nodes if n not in rpc_endpoints]
    if missing:
        raise PlannerInputError(f"no RPC endpoint for node(s) {', '.join(missing)}")
    serving = settings.serving
    args = ["-m", model_path]
    if nodes:
        # None when the host runs every layer on its own node's CPU (`-ngl 0`).
        args += ["--rpc", ",".join(rpc_endpoints[n] for n in nodes)]
        args += ["-ts", ",".join(str(s) for s in split)]
    args += [
        "-ngl", str(gpu_layers),
        "-fit", "off",
        "-c", str(serving.ctx),
        "-np", str(serving.parallel),
        "-ctk", serving.cache_type_k,
        "-ctv", serving.cache_type_v,
        "-fa", serving.flash_attention,
        "--host", settings.host,
        "--port", str(settings.port),
    ]  # fmt: skip
    args += _ram_tier_args(layout)
    if serving.ubatch != DEFAULT_UBATCH:
        args += ["-ub", str(serving.ubatch)]
    if serving.batch != DEFAULT_BATCH:
        args += ["-b", str(serving.batch)]
    if settings.aliases:
        args += ["--alias", ",".join(settings.aliases)]
    if settings.metrics:
        args.append("--metrics")
    if settings.api_key_file:
        args += ["--api-key-file", settings.api_key_file]
    if settings.embeddings:
        args.append("--embeddings")
    if settings.threads:
        args += ["-t", str(settings.threads)]
    if settings.draft is not None:
        args += ["-md", settings.draft.model_path]
        args += ["--spec-draft-n-max", str(settings.draft.max_tokens), "-devd", "none"]
        if settings.draft.gpu_layers is not None:
            args += ["-ngld", str(settings.draft.gpu_layers)]
    args += _speculation_args(settings)
    if settings.chat_template:
        args += chat_template_args(settings.chat_template)
    args += list(settings.extra_args)
    return args


def _speculation_args(settings: ServerSettings) -> list[str]:
    """`--spec-type` and the n-gram's sizes. llama.cpp loads a `-md` model but drafts
    with it only when `draft-simple` is among the types; with an n-gram too, it tries
    the n-gram first and the draft model when the n-gram finds no match."""
    types = []
    if settings.ngram is not None:
        types.append(settings.ngram.type)
    if settings.draft is not None:
        types.append("draft-simple")
    if not types:
        return []
    ngram = settings.ngram.args() if settings.ngram is not None else []
    return ["--spec-type", ",".join(types), *ngram]


def chat_template_args(name: str) -> list[str]:
    """llama-server's arguments for a built-in chat template: llama.cpp's own
    formatter reads the name, Jinja (on by default) would take it for the text."""
    return ["--no-jinja", "--chat-template", name]


def build_rpc_server_args(
    devices: Sequence[str],
    *,
    host: str,
    port: int = DEFAULT_RPC_PORT,
    cache: bool = True,
    threads: int | None = None,
) -> list[str]:
    """Arguments of one node's ggml-rpc-server exposing `devices` in plan order.

    `cache` turns on the server's tensor cache (`-c`, in `$LLAMA_CACHE`), which
    makes restarts and re-plans load from the node's disk instead of the network.
    """
    if not devices:
        raise PlannerInputError("an RPC server needs at least one device")
    args = ["-H", host, "-p", str(port), "-d", ",".join(devices)]
    if cache:
        args.append("-c")
    if threads:
        args += ["-t", str(threads)]
    return args


def rpc_devices_by_node(plan: Plan | PlacementResult) -> dict[str, list[str]]:
    """Device ids each planned node's server exposes, in llama.cpp order."""
    if isinstance(plan, PlacementResult):
        return plan.rpc_devices()
    out: dict[str, list[str]] = {}
    for d in plan.devices:
        out.setdefault(d.node, []).append(d.device)
    return out


def build_rpc_server_commands(
    plan: Plan | PlacementResult,
    *,
    host: str,
    port: int = DEFAULT_RPC_PORT,
    cache: bool = True,
    threads: int | None = None,
) -> dict[str, list[str]]:
    """ggml-rpc-server arguments for every planned node."""
    return {
        node: build_rpc_server_args(devices, host=host, port=port, cache=cache, threads=threads)
        for node, devices in rpc_devices_by_node(plan).items()
    }
