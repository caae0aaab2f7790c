"""MeshPool: a set of nodes whose devices serve models, and how.

Cluster-scoped. The spec says which nodes (selector, tolerations), which backend
and images, how GPUs are shared and how much memory to hold back; the status is
the pool's memory ledger as the operator sees it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from mesh_operator import __version__
from mesh_operator.api.base import ApiModel, cel_rule, cel_rules
from mesh_operator.api.conditions import CONDITIONS_SCHEMA, Condition
from mesh_operator.api.contract import DEFAULT_RPC_PORT, MAX_RTT_MS, RTT_ANNOTATION
from mesh_operator.api.meshnode import Backend
from mesh_operator.api.quantity import Quantity

SharingMode = Literal["exclusive", "shared"]

# Where the project publishes its images (the chart's `registry` value).
DEFAULT_REGISTRY = "ghcr.io/mesh-dev"
# The llama.cpp build of the project's llama.cpp image: LLAMA_CPP_PYTHON_VERSION of
# scripts/llama-cpp.pin, which the chart records as annotation `mesh.dev/llama-cpp`
# (tests check all three agree).
LLAMA_CPP_VERSION = "0.3.36"
# In spec.images.rpcServer and llamaServer: replaced per node by the image variant
# that node's devices need, so one pool can mix GPU and CPU-only nodes.
VARIANT_PLACEHOLDER = "{variant}"
ImageVariant = Literal["cuda", "cpu"]
# One image holds both /app/ggml-rpc-server and /app/llama-server: a host and its
# workers always speak the same RPC protocol.
DEFAULT_LLAMA_CPP_IMAGE = f"{DEFAULT_REGISTRY}/llama.cpp:{LLAMA_CPP_VERSION}-{VARIANT_PLACEHOLDER}"
DEFAULT_RPC_IMAGE = DEFAULT_LLAMA_CPP_IMAGE
DEFAULT_SERVER_IMAGE = DEFAULT_LLAMA_CPP_IMAGE
DEFAULT_MESH_IMAGE = f"{DEFAULT_REGISTRY}/mesh:{__version__}"

CacheVolume = Literal["hostPath", "emptyDir", "pvc"]
_CLAIM_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"


def with_variant(image: str, variant: ImageVariant) -> str:
    """The image a node of this variant runs; an image without the placeholder as given."""
    return image.replace(VARIANT_PLACEHOLDER, variant)


class Toleration(ApiModel):
    """A Pod's toleration, refused where a Pod would refuse it."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            {
                "rule": "!has(self.operator) || self.operator != 'Exists' || !has(self.value) "
                "|| self.value == ''",
                "message": "value must be empty when operator is Exists",
                "fieldPath": ".value",
            },
            {
                "rule": "(has(self.key) && self.key != '') "
                "|| (has(self.operator) && self.operator == 'Exists')",
                "message": "operator must be Exists when key is empty",
                "fieldPath": ".operator",
            },
            {
                "rule": "!has(self.tolerationSeconds) "
                "|| (has(self.effect) && self.effect == 'NoExecute')",
                "message": "tolerationSeconds needs effect NoExecute",
                "fieldPath": ".tolerationSeconds",
            },
        )
    )

    key: str | None = Field(default=None, max_length=316)
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = Field(default=None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _as_a_pod_takes_it(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError("value must be empty when operator is Exists")
        if not self.key and self.operator != "Exists":
            raise ValueError("operator must be Exists when key is empty")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds needs effect NoExecute")
        return self


class Images(ApiModel):
    rpc_server: str = Field(
        default=DEFAULT_RPC_IMAGE,
        min_length=1,
        description="Image with ggml-rpc-server. {variant} is replaced per node: cuda "
        "on a node whose agent reports CUDA devices, cpu on the others.",
    )
    llama_server: str = Field(
        default=DEFAULT_SERVER_IMAGE,
        min_length=1,
        description="Image with llama-server (same llama.cpp build as rpcServer). "
        "{variant} is replaced by the variant of the node the host runs on.",
    )
    mesh: str = Field(
        default=DEFAULT_MESH_IMAGE,
        min_length=1,
        description="Image with `mesh fetch` (init container).",
    )
    rpc_server_command: list[str] = Field(
        default_factory=lambda: ["/app/ggml-rpc-server"],
        min_length=1,
        max_length=8,
        description="Entrypoint of ggml-rpc-server in the rpcServer image.",
    )
    llama_server_command: list[str] = Field(
        default_factory=lambda: ["/app/llama-server"],
        min_length=1,
        max_length=8,
        description="Entrypoint of llama-server in the llamaServer image.",
    )
    mesh_command: list[str] = Field(
        default_factory=lambda: ["mesh"],
        min_length=1,
        max_length=8,
        description="Entrypoint of the mesh CLI in the mesh image.",
    )
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"


class CacheVolumeSpec(ApiModel):
    """Where a cache lives. hostPath persists per node but needs Pod Security
    `privileged` in the model's namespace; emptyDir and pvc run at `restricted`."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            {
                "rule": "self.volume != 'pvc' || has(self.claimName)",
                "message": "claimName is required with volume: pvc",
                "fieldPath": ".claimName",
            },
            {
                "rule": "self.volume == 'pvc' || !has(self.claimName)",
                "message": "claimName is only for volume: pvc",
                "fieldPath": ".claimName",
            },
            {
                "rule": "self.volume == 'emptyDir' || !has(self.sizeLimit)",
                "message": "sizeLimit is only for volume: emptyDir",
                "fieldPath": ".sizeLimit",
            },
        )
    )

    volume: CacheVolume = Field(
        default="hostPath",
        description="hostPath: a folder on each node, kept across restarts and re-plans "
        "(Pod Security privileged); emptyDir: per pod, gone when the pod is replaced; "
        "pvc: the PersistentVolumeClaim claimName in the model's namespace.",
    )
    claim_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=_CLAIM_NAME,
        description="PersistentVolumeClaim with volume: pvc (ReadWriteMany when several "
        "nodes use it); it must be writable by group 65532 (fsGroup).",
    )
    size_limit: Quantity | None = Field(
        default=None, description="sizeLimit of the emptyDir volume."
    )

    @model_validator(mode="after")
    def _fields_of_its_volume(self) -> CacheVolumeSpec:
        if self.volume == "pvc" and not self.claim_name:
            raise ValueError("claimName is required with volume: pvc")
        if self.volume != "pvc" and self.claim_name is not None:
            raise ValueError("claimName is only for volume: pvc")
        if self.volume != "emptyDir" and self.size_limit is not None:
            raise ValueError("sizeLimit is only for volume: emptyDir")
        return self


class RpcCache(CacheVolumeSpec):
    enabled: bool = Field(
        default=True, description="Run ggml-rpc-server with -c so restarts reuse tensors."
    )
    host_path: str = Field(
        default="/var/lib/mesh/rpc-cache",
        pattern=r"^/.*",
        description="Per-node directory for the RPC tensor cache (LLAMA_CACHE).",
    )


class ModelCache(CacheVolumeSpec):
    host_path: str = Field(
        default="/var/lib/mesh/models",
        pattern=r"^/.*",
        description="Per-node directory where host pods keep downloaded models.",
    )


class MeshPoolSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            {
                "rule": "!has(self.hostUsesOwnNode) || !self.hostUsesOwnNode "
                "|| (has(self.backend) && self.backend == 'cpu')",
                "message": "hostUsesOwnNode needs backend cpu",
                "fieldPath": ".hostUsesOwnNode",
            },
        )
    )

    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    backend: Backend = Field(
        default="cuda",
        json_schema_extra=cel_rule("self == oldSelf", "backend is immutable"),
    )
    images: Images = Field(default_factory=Images)
    sharing: SharingMode = Field(
        default="exclusive",
        description="exclusive: RPC server pods request nvidia.com/gpu; "
        "shared: several models share a GPU, kept apart by the memory ledger.",
    )
    runtime_class_name: str | None = Field(
        default=None,
        max_length=253,
        description="RuntimeClass (e.g. nvidia) of the pods on nodes that run the cuda "
        "image variant (every pod in a pool of another backend), if not the default.",
    )
    reserve_percent: int = Field(default=10, ge=0, le=90)
    device_memory_cap_mib: int | None = Field(
        default=None,
        ge=64,
        alias="deviceMemoryCapMiB",
        description="Plan with at most this much memory per device (e.g. to keep CPU pools small).",
    )
    rpc_cache: RpcCache = Field(default_factory=RpcCache)
    model_cache: ModelCache = Field(default_factory=ModelCache)
    max_nodes_per_model: int = Field(default=16, ge=1, le=16)
    max_rtt_ms: int | None = Field(
        default=None,
        ge=1,
        le=MAX_RTT_MS,
        alias="maxRttMs",
        description="Leave out nodes whose declared round trip (Node annotation "
        f"{RTT_ANNOTATION}) is above this many milliseconds.",
    )
    rpc_port: int = Field(default=DEFAULT_RPC_PORT, ge=1024, le=65535)
    rpc_threads: int | None = Field(
        default=None, ge=1, le=1024, description="CPU threads of each RPC server (-t)."
    )
    host_uses_own_node: bool = Field(
        default=False,
        description="The host's llama-server runs the layers planned on its own node's "
        "CPU itself (-ngl lowered) instead of through an RPC server there: no worker "
        "on the host's node. Backend cpu only.",
    )

    @model_validator(mode="after")
    def _own_node_on_cpu(self) -> MeshPoolSpec:
        if self.host_uses_own_node and self.backend != "cpu":
            raise ValueError("hostUsesOwnNode needs backend cpu")
        return self


class NodeLedger(ApiModel):
    node: str
    devices: int = Field(ge=0)
    memory_total_mib: int = Field(ge=0, alias="memoryTotalMiB")
    memory_free_mib: int = Field(ge=0, alias="memoryFreeMiB")
    memory_claimed_mib: int = Field(ge=0, alias="memoryClaimedMiB")
    healthy: bool
    stale: bool


class MeshPoolStatus(ApiModel):
    nodes: int = 0
    ready_nodes: int = 0
    devices: int = 0
    memory_total_mib: int = Field(default=0, alias="memoryTotalMiB")
    memory_free_mib: int = Field(default=0, alias="memoryFreeMiB")
    memory_claimed_mib: int = Field(default=0, alias="memoryClaimedMiB")
    ledger: list[NodeLedger] = Field(default_factory=list)
    observed_generation: int | None = None
    conditions: list[Condition] = Field(
        default_factory=list, max_length=16, json_schema_extra=CONDITIONS_SCHEMA
    )
