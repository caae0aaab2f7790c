"""MeshModel: one model to serve from a pool, and where it is served.

Namespaced. The spec names the model file (Hugging Face, URL or PVC), the pool and
the llama.cpp settings that shape memory; the status carries the plan (devices,
layers, MiB per device, integer tensor split, predicted time per token), the
conditions Planned / WorkersReady / Ready / Degraded and the endpoint.
"""

from __future__ import annotations

import re
from typing import Annotated, Final, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from mesh_operator.api import owned_flags
from mesh_operator.api.base import ApiModel, cel_rule, cel_rules
from mesh_operator.api.chat_templates import CHAT_TEMPLATES, check_chat_template
from mesh_operator.api.conditions import CONDITIONS_SCHEMA, Condition
from mesh_operator.api.contract import SERVED_NAME_MAX, SERVED_NAME_PATTERN, check_model_name
from mesh_operator.api.duration import Duration, parse_duration
from mesh_operator.api.imageref import REFERENCE_MAX, REFERENCE_PATTERN, parse_reference
from mesh_operator.api.owned_flags import extra_args_rules, owned_flag
from mesh_operator.api.quantity import Quantity, parse_quantity

CacheType = Literal["f16", "q8_0", "q4_0"]
Strategy = Literal["latency", "balanced"]
FlashAttention = Literal["on", "off", "auto"]

NAME_PATTERN: Final = SERVED_NAME_PATTERN
SHA256_PATTERN = r"^[a-f0-9]{64}$"
# Every spelling of a llama-server flag the operator sets: extraArgs may not use them.
OWNED_FLAGS: Final = owned_flags.OWNED_FLAGS
# Replicas of one model (spec.replicas), each on nodes of its own.
MAX_REPLICAS: Final = 16


class SecretKeyRef(ApiModel):
    name: str = Field(min_length=1, max_length=253)
    key: str = Field(default="token", min_length=1, max_length=253)


class HuggingFaceSource(ApiModel):
    repo: str = Field(min_length=3, max_length=256, pattern=r"^[\w.-]+/[\w.-]+$")
    file: str = Field(min_length=1, max_length=512, pattern=r"^[^/].*\.gguf$")
    revision: str = Field(default="main", min_length=1, max_length=256)
    token_secret_ref: SecretKeyRef | None = None


class PvcSource(ApiModel):
    claim_name: str = Field(min_length=1, max_length=253)
    path: str = Field(min_length=1, max_length=1024, pattern=r"^[^/].*\.gguf$")


class OciSource(ApiModel):
    """A model image in an OCI registry (`mesh push-model` makes one), mounted
    read-only into the host pod as an `image` volume: the node's runtime pulls and
    caches it (containerd >= 2.1, the ImageVolume feature gate)."""

    reference: str = Field(
        min_length=1,
        max_length=REFERENCE_MAX,
        pattern=REFERENCE_PATTERN,
        description="registry/repository:tag or registry/repository@sha256:<digest>.",
    )
    file: str = Field(
        default="model.gguf",
        min_length=1,
        max_length=512,
        pattern=r"^[^/].*\.gguf$",
        description="Path of the .gguf file inside the image.",
    )

    @field_validator("reference")
    @classmethod
    def _reference(cls, reference: str) -> str:
        parse_reference(reference)
        return reference


ExtraArg = Annotated[str, Field(min_length=1, max_length=512)]
SOURCE_KINDS: Final = ("huggingface", "url", "pvc", "oci")


class ModelSource(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=cel_rule(
            "[has(self.huggingface), has(self.url), has(self.pvc), has(self.oci)]"
            ".filter(x, x).size() == 1",
            "source must set exactly one of huggingface, url, pvc, oci",
        )
    )

    huggingface: HuggingFaceSource | None = None
    url: str | None = Field(default=None, pattern=r"^(https?|file)://.+", max_length=2048)
    pvc: PvcSource | None = None
    oci: OciSource | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        given = [n for n in SOURCE_KINDS if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                f"source must set exactly one of {', '.join(SOURCE_KINDS)}"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self


class DraftModel(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            {
                "rule": "!has(self.source.oci)",
                "message": "a draft model cannot come from an OCI image",
                "fieldPath": ".source",
            }
        )
    )

    source: ModelSource
    sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)
    max_tokens: int = Field(default=16, ge=1, le=64)


NgramType = Literal["ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod"]
NGRAM_TYPES: Final[tuple[str, ...]] = ("ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod")
# The sizes ngram-mod reads, and those the other n-gram types read, as llama.cpp names them.
_MOD_SIZES: Final = {"n_match": "nMatch", "n_min": "nMin", "n_max": "nMax"}
_MAP_SIZES: Final = {"size_n": "sizeN", "size_m": "sizeM", "min_hits": "minHits"}
_MOD_ONLY: Final = "nMatch, nMin and nMax apply to type ngram-mod only"
_MAP_ONLY: Final = (
    "sizeN, sizeM and minHits apply to type ngram-simple, ngram-map-k or ngram-map-k4v only"
)
_MIN_ABOVE_MAX: Final = "nMin must not exceed nMax"


def _any_of(sizes: dict[str, str]) -> str:
    return " || ".join(f"has(self.{name})" for name in sizes.values())


class Speculative(ApiModel):
    """Draft-free speculative decoding from n-grams of the context (--spec-type ngram-*)."""

    # Unset sizes keep llama.cpp's defaults.
    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            {"rule": f"self.type == 'ngram-mod' || !({_any_of(_MOD_SIZES)})", "message": _MOD_ONLY},
            {"rule": f"self.type != 'ngram-mod' || !({_any_of(_MAP_SIZES)})", "message": _MAP_ONLY},
            {
                "rule": "!has(self.nMin) || !has(self.nMax) || self.nMin <= self.nMax",
                "message": _MIN_ABOVE_MAX,
                "fieldPath": ".nMin",
            },
        )
    )

    type: NgramType = Field(
        description="llama.cpp's --spec-type: ngram-simple, ngram-map-k, ngram-map-k4v or "
        "ngram-mod. With spec.draft as well, the n-gram is tried first and the draft model "
        "drafts when it finds no match."
    )
    n_match: int | None = Field(
        default=None, ge=1, le=1024, description="ngram-mod: length of the n-gram looked up."
    )
    n_min: int | None = Field(
        default=None, ge=0, le=1024, description="ngram-mod: fewest tokens worth drafting."
    )
    n_max: int | None = Field(
        default=None, ge=0, le=1024, description="ngram-mod: most tokens drafted at once."
    )
    size_n: int | None = Field(
        default=None, ge=1, le=1024, description="The other types: length of the n-gram looked up."
    )
    size_m: int | None = Field(
        default=None, ge=1, le=1024, description="The other types: most tokens drafted at once."
    )
    min_hits: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="The other types: times an n-gram must have been seen to be drafted.",
    )
    acceptance_percent: int | None = Field(
        default=None,
        ge=0,
        le=100,
        description="Drafted tokens expected to be accepted, in percent, for the predicted "
        "time per token; unset: the acceptance measured by python -m bench spec.",
    )

    @model_validator(mode="after")
    def _sizes_of_type(self) -> Speculative:
        mod = self.type == "ngram-mod"
        if not mod and any(getattr(self, name) is not None for name in _MOD_SIZES):
            raise ValueError(f"speculative: {_MOD_ONLY}, not to {self.type}")
        if mod and any(getattr(self, name) is not None for name in _MAP_SIZES):
            raise ValueError(f"speculative: {_MAP_ONLY}, not to ngram-mod")
        if self.n_min is not None and self.n_max is not None and self.n_min > self.n_max:
            raise ValueError(f"speculative: {_MIN_ABOVE_MAX} ({self.n_min} > {self.n_max})")
        return self


# A duration field's CEL rule: the pattern lets `0s` through.
_POSITIVE_DURATION: Final = cel_rule("self.matches('[1-9]')", "must be a positive duration")


class Autoscaling(ApiModel):
    """Replicas between `minReplicas` and `maxReplicas`, from the gateways' measure
    of demand: requests in flight plus requests held, summed over every gateway."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            {
                "rule": "!has(self.minReplicas) || self.minReplicas <= self.maxReplicas",
                "message": "minReplicas must not exceed maxReplicas",
                "fieldPath": ".minReplicas",
            }
        )
    )

    min_replicas: int = Field(default=1, ge=1, le=MAX_REPLICAS)
    max_replicas: int = Field(ge=1, le=MAX_REPLICAS)
    target_busy_slots: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Requests (in flight or held) one replica is meant to carry; more adds "
        "a replica. Unset: spec.parallel, every slot of a replica busy.",
    )
    scale_down_after: Duration = Field(
        default="5m",
        description="How long demand must stay low enough for fewer replicas before one "
        "is removed (and since the last change): the hysteresis that keeps it from flapping.",
        json_schema_extra=_POSITIVE_DURATION,
    )

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"autoscaling: minReplicas {self.min_replicas} exceeds "
                f"maxReplicas {self.max_replicas}"
            )
        return self

    def down_seconds(self) -> float:
        return parse_duration(self.scale_down_after)


class ResourceList(ApiModel):
    cpu: Quantity | None = None
    memory: Quantity | None = None


RESOURCE_NAMES = ("cpu", "memory")


def _limit_not_below_request(resource: str) -> dict[str, str]:
    requested, limit = f"self.requests.{resource}", f"self.limits.{resource}"
    return {
        "rule": f"!has(self.requests) || !has(self.limits) || !has({requested}) || "
        f"!has({limit}) || !isQuantity(string({requested})) || !isQuantity(string({limit})) "
        f"|| !quantity(string({limit})).isLessThan(quantity(string({requested})))",
        "messageExpression": f"'hostResources.limits.{resource} (' + string({limit}) + "
        f"') is below hostResources.requests.{resource} (' + string({requested}) + ')'",
        "fieldPath": f".limits.{resource}",
    }


class HostResources(ApiModel):
    """The llama-server container's resources, as a Pod's: Kubernetes quantities."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(*(_limit_not_below_request(r) for r in RESOURCE_NAMES))
    )

    requests: ResourceList | None = None
    limits: ResourceList | None = None

    def limit_below_request(self) -> str | None:
        """Why a limit is below its request, naming both fields; None when none is."""
        if self.requests is None or self.limits is None:
            return None
        for resource in RESOURCE_NAMES:
            requested = getattr(self.requests, resource)
            limit = getattr(self.limits, resource)
            if requested is None or limit is None:
                continue
            if parse_quantity(limit) < parse_quantity(requested):
                return (
                    f"hostResources.limits.{resource} ({limit}) is below "
                    f"hostResources.requests.{resource} ({requested})"
                )
        return None


_FLOAT_CACHE: Final = "f16"
# An extraArgs item that chooses the chat template, as llama-server reads it.
_TEMPLATE_ARG: Final = r"^--(chat[-_]template([-_]file)?|jinja|no[-_]jinja)([ =]|$)"
_TEMPLATE_ARG_CEL: Final = f"'{_TEMPLATE_ARG}'"  # no quote nor backslash in it
_DRAFT_BESIDE_PVC: Final = (
    "a model on a PVC needs its draft model on that PVC too: nothing can be downloaded beside it"
)
_TEMPLATE_TWICE: Final = (
    "chatTemplate and extraArgs (--chat-template, --chat-template-file, --jinja, "
    "--no-jinja) both choose the chat template"
)


class MeshModelSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            {
                "rule": "!has(self.servedName) || !has(self.aliases) "
                "|| !(self.servedName in self.aliases)",
                "message": "aliases must not repeat servedName",
                "fieldPath": ".aliases",
            },
            {
                # llama.cpp quantizes the V cache only inside flash attention.
                "rule": f"!has(self.flashAttention) || self.flashAttention != 'off' "
                f"|| !has(self.cacheTypeV) || self.cacheTypeV == '{_FLOAT_CACHE}'",
                "messageExpression": "'cacheTypeV ' + self.cacheTypeV + "
                "' needs flash attention (flashAttention is off)'",
                "fieldPath": ".cacheTypeV",
            },
            {
                "rule": "!has(self.chatTemplate) || !has(self.extraArgs) || "
                f"!self.extraArgs.exists(a, a.matches({_TEMPLATE_ARG_CEL}))",
                "message": _TEMPLATE_TWICE,
                "fieldPath": ".chatTemplate",
            },
            {
                # The image volume is the host's model folder, read-only.
                "rule": "!has(self.source.oci) || !has(self.draft)",
                "message": "a model from an OCI image cannot have a draft model",
                "fieldPath": ".draft",
            },
            {
                # The host mounts the model's PVC read-only where a download would go.
                "rule": "!has(self.source.pvc) || !has(self.draft) || has(self.draft.source.pvc)",
                "message": _DRAFT_BESIDE_PVC,
                "fieldPath": ".draft.source",
            },
            {
                "rule": "!has(self.source.oci) || !has(self.sha256)",
                "message": "sha256 is for downloaded files; an OCI image is checked by its digest",
                "fieldPath": ".sha256",
            },
        )
    )

    source: ModelSource
    sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)
    pool_ref: str = Field(
        min_length=1,
        max_length=253,
        json_schema_extra=cel_rule("self == oldSelf", "poolRef is immutable"),
    )
    context_size: int = Field(default=4096, ge=128, le=1048576)
    parallel: int = Field(default=1, ge=1, le=64)
    replicas: int = Field(
        default=1,
        ge=1,
        le=MAX_REPLICAS,
        description="Copies of the model, each its own plan on nodes no other copy uses; "
        "the Service sends requests to every ready one. Ignored with autoscaling.",
    )
    autoscaling: Autoscaling | None = None
    scale_to_zero_after: Duration | None = Field(
        default=None,
        description="Idle time (no request at any gateway) after which the model releases "
        "its workers, host and memory (Ready=False, ScaledToZero); the next request "
        "starts it again and is held at the gateway meanwhile. Unset: never.",
        json_schema_extra=_POSITIVE_DURATION,
    )
    cache_type_k: CacheType = "f16"
    cache_type_v: CacheType = "f16"
    flash_attention: FlashAttention = "auto"
    strategy: Strategy = "latency"
    draft: DraftModel | None = None
    speculative: Speculative | None = None
    served_name: str | None = Field(default=None, pattern=NAME_PATTERN)
    aliases: list[Annotated[str, Field(pattern=NAME_PATTERN, max_length=SERVED_NAME_MAX)]] = Field(
        default_factory=list,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    embeddings: bool = False
    chat_template: str | None = Field(
        default=None,
        description="A chat template built into llama-server, by name (e.g. gemma, llama3, "
        "chatml). Unset: the model file's own; for a file without one, the template of its "
        "architecture where llama.cpp has it (gemma), else llama-server's default.",
        json_schema_extra={"enum": list(CHAT_TEMPLATES)},
    )
    host_resources: HostResources | None = None
    api_key_secret_ref: SecretKeyRef | None = None
    extra_args: list[ExtraArg] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra={"x-kubernetes-validations": extra_args_rules()},
    )

    @field_validator("draft")
    @classmethod
    def _draft_not_oci(cls, draft: DraftModel | None) -> DraftModel | None:
        if draft is not None and draft.source.oci is not None:
            raise ValueError("a draft model cannot come from an OCI image")
        return draft

    @field_validator("extra_args")
    @classmethod
    def _extra_args_not_owned(cls, extra_args: list[str]) -> list[str]:
        for arg in extra_args:
            if owned_flag(arg) is not None:
                raise ValueError(f"extraArgs may not set {arg}: the operator computes it")
        return extra_args

    @field_validator("chat_template")
    @classmethod
    def _chat_template_built_in(cls, name: str | None) -> str | None:
        return None if name is None else check_chat_template(name)

    def template_in_extra_args(self) -> bool:
        """Whether extraArgs choose the chat template (or its engine) themselves."""
        return any(re.match(_TEMPLATE_ARG, arg) for arg in self.extra_args)

    @field_validator("aliases")
    @classmethod
    def _aliases_once(cls, aliases: list[str]) -> list[str]:
        seen: set[str] = set()
        for alias in aliases:
            if alias in seen:
                raise ValueError(f"aliases name {alias} twice")
            seen.add(alias)
        return aliases

    @model_validator(mode="after")
    def _meaningful(self) -> MeshModelSpec:
        if self.served_name is not None and self.served_name in self.aliases:
            raise ValueError("aliases must not repeat servedName")
        if self.flash_attention == "off" and self.cache_type_v != _FLOAT_CACHE:
            raise ValueError(
                f"cacheTypeV {self.cache_type_v} needs flash attention (flashAttention is off)"
            )
        if self.chat_template is not None and self.template_in_extra_args():
            raise ValueError(_TEMPLATE_TWICE)
        if self.source.oci is not None and self.draft is not None:
            raise ValueError("a model from an OCI image cannot have a draft model")
        if self.source.pvc is not None and self.draft is not None and self.draft.source.pvc is None:
            raise ValueError(_DRAFT_BESIDE_PVC)
        if self.source.oci is not None and self.sha256 is not None:
            raise ValueError(
                "sha256 is for downloaded files; an OCI image is checked by its digest"
            )
        if self.host_resources is not None:
            problem = self.host_resources.limit_below_request()
            if problem:
                raise ValueError(problem)
        return self

    def served_names(self, metadata_name: str) -> list[str]:
        return [self.served_name or metadata_name, *self.aliases]

    def token_ref(self, source: ModelSource) -> SecretKeyRef | None:
        """The Hugging Face token of `source` (the model's or its draft's): its own,
        else the model's (a draft from the model's account needs none of its own)."""
        if source.huggingface is None:
            return None
        own = source.huggingface.token_secret_ref
        model_hf = self.source.huggingface
        return own or (model_hf.token_secret_ref if model_hf is not None else None)

    def zero_after_seconds(self) -> float | None:
        """spec.scaleToZeroAfter in seconds; None: never."""
        after = self.scale_to_zero_after
        return None if after is None else parse_duration(after)


# The rule on a whole MeshModel that needs its name as well as its spec.
SERVED_NAMES_RULE: Final = {
    "rule": "has(self.spec.servedName) || !has(self.spec.aliases) "
    "|| !(self.metadata.name in self.spec.aliases)",
    "message": "aliases must not repeat metadata.name, the served name when servedName is unset",
    "fieldPath": ".spec.aliases",
}


def check_model(name: str, spec: MeshModelSpec) -> None:
    """The CRD's rules on a MeshModel that read its name; ValueError naming the field."""
    check_model_name(name)
    if spec.served_name is None and name in spec.aliases:
        raise ValueError(SERVED_NAMES_RULE["message"])


class PlannedDevice(ApiModel):
    node: str
    device: str
    layers: list[int] = Field(min_length=2, max_length=2, description="[first, lastExclusive]")
    weights_mib: int = Field(ge=0, alias="weightsMiB")
    kv_mib: int = Field(ge=0, alias="kvMiB")
    compute_mib: int = Field(ge=0, alias="computeMiB")
    total_mib: int = Field(ge=0, alias="totalMiB")


class PlannedHostTier(ApiModel):
    """What a plan keeps in the host node's RAM: because VRAM is short, or because
    the host runs its own node's layers itself (a pool's `hostUsesOwnNode`)."""

    node: str
    moe_layers: int = Field(
        ge=0, description="Routed experts of layers [0, moeLayers) in RAM (--n-cpu-moe)."
    )
    cpu_layers: int = Field(
        ge=0,
        description="Whole layers [0, cpuLayers) on the host's CPU (the output layer too "
        "when cpuLayers is the model's layer count plus one).",
    )
    memory_mib: int = Field(ge=0, alias="memoryMiB", description="RAM the plan claims there.")
    device: str | None = Field(
        default=None,
        max_length=64,
        description="The host node's device whose memory holds the tier (its CPU device, "
        "when the host runs its own node's layers); unset: the RAM beyond the node's "
        "devices (hostMemoryFreeMiB).",
    )


class PlannedDraft(ApiModel):
    """The draft model's memory on the host's CPU (`-devd none`), claimed on its node."""

    node: str
    weights_mib: int = Field(ge=0, alias="weightsMiB")
    kv_mib: int = Field(ge=0, alias="kvMiB")
    compute_mib: int = Field(ge=0, alias="computeMiB")
    memory_mib: int = Field(ge=0, alias="memoryMiB", description="RAM the draft claims there.")


class Plan(ApiModel):
    devices: list[PlannedDevice] = Field(default_factory=list)
    host_tier: PlannedHostTier | None = None
    draft: PlannedDraft | None = None
    tensor_split: list[int] = Field(default_factory=list)
    rpc: list[str] = Field(default_factory=list, description="Node names in --rpc order.")
    host_node: str | None = None
    predicted_token_us: int | None = Field(
        default=None, ge=0, alias="predictedTokenMicros", description="Predicted µs per token."
    )
    strategy: Strategy | None = None
    reason: str = ""
    replica: int = Field(
        default=0, ge=0, le=MAX_REPLICAS - 1, description="The replica this plan is for."
    )
    generation: int | None = Field(
        default=None,
        ge=0,
        description="status.planGeneration when this replica was last (re)planned; its pods "
        "carry it (unset in plans made before replicas: status.planGeneration).",
    )
    group_restarts: int | None = Field(
        default=None,
        ge=0,
        description="Times this replica's host was restarted with its group (unset in plans "
        "made before replicas: status.groupRestarts).",
    )

    def own_node_tier(self) -> PlannedHostTier | None:
        """The tier the host runs on its own node's device (`hostTier.device`), if any."""
        tier = self.host_tier
        return tier if tier is not None and tier.device is not None else None

    def placed(self) -> bool:
        """Whether the plan places the model: on devices, or on the host's own node."""
        return bool(self.devices) or self.own_node_tier() is not None

    def layer_nodes(self) -> list[str]:
        """The nodes holding the model's layers: the host's own node when it runs
        layers there itself, then the devices' nodes, in layer order."""
        own = self.own_node_tier()
        first = [own.node] if own is not None else []
        return list(dict.fromkeys([*first, *(d.node for d in self.devices)]))


class VersionMismatch(ApiModel):
    """Images of a host and its workers that speak different RPC protocols, as the
    host's log named them, and the spec generations they were seen at."""

    llama_server: str = Field(description="Image of the refused host (llama-server).")
    rpc_servers: list[str] = Field(
        default_factory=list, max_length=64, description="Images of the refusing workers."
    )
    nodes: list[str] = Field(
        default_factory=list, max_length=64, description="Nodes of the refusing workers."
    )
    worker_version: str | None = Field(
        default=None, description="The RPC protocol version the worker answered with."
    )
    generation: int = Field(ge=0, description="metadata.generation of the model then.")
    pool_generation: int = Field(ge=0, description="metadata.generation of the pool then.")


class MeshModelStatus(ApiModel):
    observed_generation: int | None = None
    conditions: list[Condition] = Field(
        default_factory=list, max_length=16, json_schema_extra=CONDITIONS_SCHEMA
    )
    plan: Plan | None = None
    plan_generation: int | None = Field(default=None, description="Bumped on every re-plan.")
    planned_for_generation: int | None = Field(
        default=None, description="metadata.generation of the spec the plan was made for."
    )
    pool_generation: int | None = Field(
        default=None, description="metadata.generation of the pool the plan was made for."
    )
    nodes: str | None = Field(default=None, description="Planned nodes, comma-separated.")
    split: str | None = Field(default=None, description="Tensor split, comma-separated.")
    endpoint: str | None = None
    model_size_bytes: int | None = Field(default=None, ge=0)
    served_names: list[str] = Field(default_factory=list)
    version_mismatch: VersionMismatch | None = Field(
        default=None,
        description="Set while the host stays stopped because its workers speak another "
        "RPC protocol; cleared by a change of the images or of the model's or pool's spec.",
    )
    worker_restarts: dict[str, int] = Field(
        default_factory=dict,
        max_length=64,
        description="Restart count of each worker pod of the current plan, as last acted "
        "on: a worker that restarts beyond it restarts its host with it.",
    )
    group_restarts: int = Field(
        default=0, ge=0, description="Times the host was restarted with its group."
    )
    replica_plans: list[Plan] = Field(
        default_factory=list,
        max_length=MAX_REPLICAS - 1,
        description="Plans of the model's other replicas (plan holds the first).",
    )
    replicas: int | None = Field(default=None, ge=0, description="Replicas planned.")
    rolling_replicas: list[int] = Field(
        default_factory=list,
        max_length=MAX_REPLICAS,
        description="Replicas whose new workloads wait their turn in a rolling update "
        "(one serving replica changes at a time).",
    )
    desired_replicas: int | None = Field(
        default=None,
        ge=0,
        description="Replicas the autoscaler wants (spec.autoscaling), between its bounds.",
    )
    last_scale_time: str | None = Field(
        default=None,
        description="When the autoscaler last changed desiredReplicas.",
        json_schema_extra={"format": "date-time"},
    )
    scaled_to_zero_time: str | None = Field(
        default=None,
        description="Set while the model is scaled to zero (spec.scaleToZeroAfter): since when.",
        json_schema_extra={"format": "date-time"},
    )
    ready_replicas: int | None = Field(
        default=None, ge=0, description="Replicas whose host answers /health."
    )
