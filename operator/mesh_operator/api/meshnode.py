"""MeshNode: what one node's agent reports about its devices, health and caches.

Cluster-scoped, one per pool node, named after the Kubernetes Node. Written only by
that node's agent (status subresource, server-side apply); read by the operator's
planner and by dashboards. Memory is in MiB, integers.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mesh_operator.api.base import ApiModel
from mesh_operator.api.conditions import CONDITIONS_SCHEMA, Condition

Backend = Literal["cuda", "rocm", "vulkan", "cpu"]
HealthState = Literal["Healthy", "Degraded", "Unhealthy"]

# Reasons the agent gives for a state other than Healthy.
HEALTH_REASONS = (
    "XidError",
    "EccUncorrectable",
    "Overheating",
    "NvmlUnavailable",
    "GpuLost",
    "RpcServerDown",
    "ApiServerUnreachable",
)


class MeshNodeSpec(ApiModel):
    node_name: str = Field(
        min_length=1, max_length=253, description="The Kubernetes Node this reports on."
    )


class Health(ApiModel):
    state: HealthState = "Healthy"
    reason: str = Field(default="AsExpected", max_length=64)
    message: str = Field(default="", max_length=1024)


class PcieLink(ApiModel):
    generation: int = Field(ge=0)
    width: int = Field(ge=0)


class Device(ApiModel):
    id: str = Field(
        min_length=1,
        max_length=32,
        description="llama.cpp device name on this node, e.g. CUDA0 or CPU.",
    )
    index: int = Field(ge=0)
    backend: Backend
    name: str = Field(default="", max_length=128)
    uuid: str = Field(default="", max_length=128)
    memory_total_mib: int = Field(ge=0, alias="memoryTotalMiB")
    memory_free_mib: int = Field(ge=0, alias="memoryFreeMiB")
    memory_used_by_mesh_mib: int = Field(default=0, ge=0, alias="memoryUsedByMeshMiB")
    memory_used_by_others_mib: int = Field(default=0, ge=0, alias="memoryUsedByOthersMiB")
    bandwidth_gbps: float = Field(
        default=0.0, ge=0, alias="bandwidthGBps", description="Memory bandwidth, GB/s."
    )
    health: Health = Field(default_factory=Health)
    utilization_percent: int | None = Field(default=None, ge=0, le=100)
    temperature_c: int | None = Field(default=None, alias="temperatureC")
    power_w: int | None = Field(default=None, ge=0, alias="powerW")
    ecc_uncorrectable: int | None = Field(default=None, ge=0)
    retired_pages: int | None = Field(default=None, ge=0)
    xid_errors: int | None = Field(default=None, ge=0)
    last_xid: int | None = Field(default=None, ge=0)
    pcie: PcieLink | None = None


class CachedModel(ApiModel):
    file: str = Field(min_length=1, max_length=512)
    size_bytes: int = Field(ge=0)
    sha256: str | None = Field(default=None, pattern=r"^[a-f0-9]{64}$")


class RpcServer(ApiModel):
    model: str = Field(description="namespace/name of the MeshModel the server belongs to.")
    port: int = Field(ge=1, le=65535)
    answering: bool


# Round trips a MeshNode lists at most (the peers probed most recently).
MAX_ROUND_TRIPS = 32


class RoundTrip(ApiModel):
    node: str = Field(min_length=1, max_length=253, description="The peer node measured.")
    ms: float = Field(
        ge=0, le=60000, description="Median application-level round trip to its agent, ms."
    )
    samples: int = Field(ge=1, description="Probes the median is taken over.")


class SystemInfo(ApiModel):
    cpu_cores: int = Field(ge=0)
    memory_total_mib: int = Field(ge=0, alias="memoryTotalMiB")
    driver_version: str | None = None
    cuda_version: str | None = None
    nvml: bool = False


class MeshNodeStatus(ApiModel):
    heartbeat_time: str | None = Field(
        default=None, description="RFC 3339 time of the last report."
    )
    interval_seconds: int = Field(default=10, ge=1, le=3600)
    agent_version: str | None = None
    address: str | None = Field(
        default=None, description="The node's address as the agent sees it."
    )
    health: Health = Field(default_factory=Health)
    devices: list[Device] = Field(default_factory=list, max_length=64)
    cached_models: list[CachedModel] = Field(default_factory=list, max_length=256)
    rpc_servers: list[RpcServer] = Field(default_factory=list, max_length=64)
    system: SystemInfo | None = None
    host_memory_free_mib: int = Field(
        default=0,
        ge=0,
        alias="hostMemoryFreeMiB",
        description="System RAM llama.cpp may use beyond the node's devices (the RAM tier): "
        "memory not used by others less the agent's reserve; 0 on a CPU-only node.",
    )
    host_memory_bandwidth_gbps: float = Field(
        default=0.0,
        ge=0,
        alias="hostMemoryBandwidthGBps",
        description="Bandwidth of that RAM, GB/s (0: unknown).",
    )
    probe_endpoint: str | None = Field(
        default=None,
        max_length=300,
        description="host:port where this node's agent answers other agents' round-trip probes.",
    )
    round_trips: list[RoundTrip] = Field(
        default_factory=list,
        max_length=MAX_ROUND_TRIPS,
        description="Measured round trips to other nodes' agents (docs/agent.md).",
    )
    round_trip_ms: float | None = Field(
        default=None,
        ge=0,
        le=60000,
        alias="roundTripMs",
        description="Lower median of roundTrips: this node's round trip to the pool as it sees it.",
    )
    conditions: list[Condition] = Field(
        default_factory=list, max_length=16, json_schema_extra=CONDITIONS_SCHEMA
    )
