"""Inventory: everything the agent reads about its node in one cycle.

`InventoryCollector.collect()` reads NVML (through the seam in `nvml`), the CPU
device when there is no GPU (`cpu`, with the cached bandwidth figure of
`bandwidth`) and the model cache (`model_cache`), and returns one `Inventory`.
It blocks (NVML calls, /proc reads, a first bandwidth measurement): the agent
runs it in a worker thread.
"""

from __future__ import annotations

import enum
import logging
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from mesh_agent.inventory import bandwidth, model_cache
from mesh_agent.inventory.cpu import CpuReading, HostPaths, read_cpu
from mesh_agent.inventory.nvml import NvmlReader, NvmlReading

log = logging.getLogger(__name__)


BANDWIDTH_RETRY_SECONDS = 600.0


class BackendMode(enum.StrEnum):
    AUTO = "auto"  # GPUs through NVML when present, else the CPU device
    CUDA = "cuda"  # a GPU node: no NVML is a fault, never a CPU device
    CPU = "cpu"  # never touch NVML


@dataclass(frozen=True)
class Inventory:
    nvml: NvmlReading
    cpu: CpuReading
    cpu_bandwidth_gbps: float | None
    cached: tuple[model_cache.CachedFile, ...]
    # The RAM tier of a node with GPUs: system RAM llama.cpp may use beyond them
    # (0 on a CPU node, whose CPU device is that RAM), and its bandwidth.
    host_memory_free_bytes: int = 0
    host_bandwidth_gbps: float = 0.0

    @property
    def cpu_device(self) -> bool:
        """Whether the node offers its CPU as the device (no usable GPU)."""
        return self.cpu_bandwidth_gbps is not None


@dataclass(frozen=True)
class CollectorConfig:
    mode: BackendMode = BackendMode.AUTO
    host: HostPaths = field(default_factory=HostPaths)
    memory_cgroup: str | None = None
    model_cache_dir: Path | None = None
    bandwidth_cache: Path | None = None
    bandwidth_size_mib: int = 64
    bandwidth_streams: int = 0  # 0: one per usable core, at most 8
    # Share of the node's RAM never offered to the RAM tier (system, kubelet, pods).
    host_memory_reserve_percent: float = 20.0


def host_memory_free(cpu: CpuReading, reserve_percent: float) -> int:
    """RAM llama.cpp may use on a node with GPUs: what processes that are not
    mesh's leave (mesh's own servers count as free, as on devices: the ledger
    subtracts what plans claim), less the reserve."""
    reserve = int(cpu.memory_total_bytes * reserve_percent / 100)
    return max(0, cpu.memory_total_bytes - cpu.memory_used_by_others_bytes - reserve)


class InventoryCollector:
    def __init__(self, config: CollectorConfig, nvml: NvmlReader | None) -> None:
        self._config = config
        self._nvml = nvml if config.mode != BackendMode.CPU else None
        self._bandwidth: float | None = None
        self._bandwidth_retry_at = 0.0

    def collect(self) -> Inventory:
        if self._nvml is not None:
            nvml = self._nvml.read()
        else:
            nvml = NvmlReading(available=False, error="backend cpu", error_kind="Disabled")
        cpu = read_cpu(self._config.host, self._config.memory_cgroup)
        use_cpu = self._config.mode != BackendMode.CUDA and not (nvml.available and nvml.gpus)
        gbps = self._cpu_bandwidth(cpu) if use_cpu else None
        cached = tuple(model_cache.scan(self._config.model_cache_dir))
        if use_cpu:
            return Inventory(nvml=nvml, cpu=cpu, cpu_bandwidth_gbps=gbps, cached=cached)
        return Inventory(
            nvml=nvml,
            cpu=cpu,
            cpu_bandwidth_gbps=None,
            cached=cached,
            host_memory_free_bytes=host_memory_free(cpu, self._config.host_memory_reserve_percent),
            host_bandwidth_gbps=self._cpu_bandwidth(cpu),
        )

    def _cpu_bandwidth(self, cpu: CpuReading) -> float:
        if self._bandwidth is not None:
            return self._bandwidth
        if time.monotonic() < self._bandwidth_retry_at:
            return 0.0
        streams = self._config.bandwidth_streams or min(cpu.cores, 8)
        key = bandwidth.BandwidthKey(
            cpu_model=cpu.model,
            cpus=cpu.cores,
            memory_total_mib=cpu.memory_total_bytes // bandwidth.MIB,
            size_mib=self._config.bandwidth_size_mib,
            streams=streams,
        )
        try:
            self._bandwidth = bandwidth.cached_bandwidth(self._config.bandwidth_cache, key)
        except (OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
            # Report 0 (unknown) and try again later, not every cycle.
            log.warning("memory bandwidth benchmark failed: %s", exc)
            self._bandwidth_retry_at = time.monotonic() + BANDWIDTH_RETRY_SECONDS
            return 0.0
        return self._bandwidth

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.close()
