"""What the agent publishes: the MeshNode status built from one cycle's readings.

Pure: takes the inventory, the RPC probes and the health rules and returns the
`MeshNodeStatus` model, plus the two server-side-apply bodies (the object with its
spec, and its status). Memory goes out in MiB, rounded down, as the API says.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from mesh_agent.health import HealthRules, combine, gpu_health, nvml_health, rpc_health
from mesh_agent.inventory import Inventory
from mesh_agent.inventory.nvml import GpuReading
from mesh_agent.rpc_liveness import RpcProbe
from mesh_operator.api.base import API_VERSION
from mesh_operator.api.heartbeat import format_time
from mesh_operator.api.meshnode import (
    CachedModel,
    Device,
    Health,
    MeshNodeStatus,
    PcieLink,
    RoundTrip,
    RpcServer,
    SystemInfo,
)

MIB = 1024 * 1024
KIND = "MeshNode"
MAX_DEVICES = 64
MAX_CACHED = 256
MAX_RPC = 64


def _mib(value: int) -> int:
    return max(0, value // MIB)


def build_gpu_device(gpu: GpuReading, health: Health) -> Device:
    pcie = None
    if gpu.pcie_generation is not None and gpu.pcie_width is not None:
        pcie = PcieLink(generation=gpu.pcie_generation, width=gpu.pcie_width)
    utilization = gpu.utilization_percent
    return Device(
        id=f"CUDA{gpu.index}",
        index=gpu.index,
        backend="cuda",
        name=gpu.name[:128],
        uuid=gpu.uuid[:128],
        memory_total_mib=_mib(gpu.memory_total_bytes),
        memory_free_mib=_mib(gpu.memory_free_bytes),
        memory_used_by_mesh_mib=_mib(gpu.memory_used_by_mesh_bytes),
        memory_used_by_others_mib=_mib(gpu.memory_used_by_others_bytes),
        bandwidth_gbps=round(gpu.bandwidth_gbps, 1),
        health=health,
        utilization_percent=min(100, max(0, utilization)) if utilization is not None else None,
        temperature_c=gpu.temperature_c,
        power_w=round(gpu.power_w) if gpu.power_w is not None else None,
        ecc_uncorrectable=gpu.ecc_uncorrectable,
        retired_pages=gpu.retired_pages,
        xid_errors=sum(gpu.xid_counts.values()),
        last_xid=gpu.last_xid,
        pcie=pcie,
    )


def build_cpu_device(inventory: Inventory) -> Device:
    cpu = inventory.cpu
    return Device(
        id="CPU",
        index=0,
        backend="cpu",
        name=cpu.model,
        memory_total_mib=_mib(cpu.memory_total_bytes),
        memory_free_mib=_mib(cpu.memory_free_bytes),
        memory_used_by_mesh_mib=_mib(cpu.memory_used_by_mesh_bytes),
        memory_used_by_others_mib=_mib(cpu.memory_used_by_others_bytes),
        bandwidth_gbps=inventory.cpu_bandwidth_gbps or 0.0,
    )


def build_status(
    inventory: Inventory,
    probes: Sequence[RpcProbe],
    *,
    now: dt.datetime,
    interval_seconds: int,
    rules: HealthRules,
    agent_version: str | None = None,
    address: str | None = None,
    probe_endpoint: str | None = None,
    round_trips: Sequence[RoundTrip] = (),
    round_trip_ms: float | None = None,
) -> MeshNodeStatus:
    gpu_healths = [gpu_health(gpu, rules) for gpu in inventory.nvml.gpus]
    devices = [
        build_gpu_device(gpu, health)
        for gpu, health in zip(inventory.nvml.gpus, gpu_healths, strict=True)
    ]
    if inventory.cpu_device:
        devices.append(build_cpu_device(inventory))
    health = combine([nvml_health(inventory.nvml, rules), *gpu_healths, rpc_health(probes)])
    return MeshNodeStatus(
        heartbeat_time=format_time(now),
        interval_seconds=interval_seconds,
        agent_version=agent_version,
        address=address,
        health=health,
        devices=devices[:MAX_DEVICES],
        cached_models=[
            CachedModel(file=f.file, size_bytes=f.size_bytes, sha256=f.sha256)
            for f in inventory.cached[:MAX_CACHED]
        ],
        rpc_servers=[
            RpcServer(model=p.target.model, port=p.target.port, answering=p.answering)
            for p in probes[:MAX_RPC]
        ],
        host_memory_free_mib=_mib(inventory.host_memory_free_bytes),
        host_memory_bandwidth_gbps=inventory.host_bandwidth_gbps,
        system=SystemInfo(
            cpu_cores=inventory.cpu.cores,
            memory_total_mib=_mib(inventory.cpu.memory_total_bytes),
            driver_version=inventory.nvml.driver_version,
            cuda_version=inventory.nvml.cuda_version,
            nvml=inventory.nvml.available,
        ),
        probe_endpoint=probe_endpoint,
        round_trips=list(round_trips),
        round_trip_ms=round_trip_ms,
    )


def build_object_body(node_name: str) -> dict[str, object]:
    """Apply body of the MeshNode itself (creates it; owns only spec.nodeName)."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": node_name},
        "spec": {"nodeName": node_name},
    }


def build_status_body(node_name: str, status: MeshNodeStatus) -> dict[str, object]:
    """Apply body of the status subresource.

    Conditions are left out: they belong to the operator, and applying an empty
    list would claim them for the agent's field manager.
    """
    wire = status.to_wire()
    wire.pop("conditions", None)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": node_name},
        "status": wire,
    }
