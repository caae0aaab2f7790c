"""The CPU device: system memory as the node's workloads can use it, and CPU facts.

Free memory comes from /proc/meminfo (MemAvailable) bounded by the memory cgroup
that limits the workloads: cgroup v2 (`memory.max`, `memory.current`) or v1
(`memory.limit_in_bytes`, `memory.usage_in_bytes`), walking from the configured
cgroup up to the root and taking the tightest limit. Memory held by mesh's own
servers is the RSS of processes named like them that this agent can see (all of
the node's with `hostPID`). Every path is a parameter so tests give a fake /proc
and /sys/fs/cgroup laid out as the kernel lays them out.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mesh_agent.inventory.nvml import MESH_SERVER_NAMES

# cgroup v1 reports "no limit" as the largest page-aligned signed 64-bit value.
_V1_UNLIMITED = 2**62


@dataclass(frozen=True)
class CgroupMemory:
    limit_bytes: int
    usage_bytes: int
    path: str


@dataclass(frozen=True)
class CpuReading:
    model: str
    cores: int
    memory_total_bytes: int
    memory_free_bytes: int
    memory_used_by_mesh_bytes: int
    cgroup: CgroupMemory | None

    @property
    def memory_used_by_others_bytes(self) -> int:
        used = self.memory_total_bytes - self.memory_free_bytes
        return max(0, used - self.memory_used_by_mesh_bytes)


@dataclass(frozen=True)
class HostPaths:
    """Where the kernel's files are; the defaults are the real ones."""

    proc: Path = Path("/proc")
    cgroup_root: Path = Path("/sys/fs/cgroup")


def read_meminfo(proc: Path) -> dict[str, int]:
    """/proc/meminfo as bytes per key."""
    values: dict[str, int] = {}
    for line in (proc / "meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if not parts:
            continue
        amount = int(parts[0])
        values[key.strip()] = amount * 1024 if len(parts) > 1 and parts[1] == "kB" else amount
    return values


def _own_cgroups(proc: Path) -> tuple[str | None, str | None]:
    """(v2 path, v1 memory path) of this process from /proc/self/cgroup."""
    v2: str | None = None
    v1: str | None = None
    try:
        text = (proc / "self" / "cgroup").read_text()
    except OSError:
        return None, None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestors(path: str) -> list[str]:
    parts = [p for p in path.strip("/").split("/") if p]
    return ["/" + "/".join(parts[:i]) if i else "/" for i in range(len(parts), -1, -1)]


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def cgroup_memory(paths: HostPaths, cgroup: str | None = None) -> CgroupMemory | None:
    """The tightest memory limit on `cgroup` (default: this process's) and its usage.

    A container usually sees its own cgroup mounted at the root of the cgroup
    filesystem while /proc/self/cgroup still names the host path: when the named
    folder does not exist, the root is read instead.
    """
    v2_path, v1_path = _own_cgroups(paths.proc)
    unified = paths.cgroup_root / "cgroup.controllers"
    if unified.exists():
        return _walk(paths.cgroup_root, cgroup or v2_path or "/", "memory.max", "memory.current")
    v1_root = paths.cgroup_root / "memory"
    if v1_root.is_dir():
        return _walk(
            v1_root, cgroup or v1_path or "/", "memory.limit_in_bytes", "memory.usage_in_bytes"
        )
    return None


def _inactive_file(folder: Path) -> int:
    """Reclaimable page cache, which the kubelet's working set also leaves out."""
    try:
        for line in (folder / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("inactive_file", "total_inactive_file"):
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _walk(root: Path, cgroup: str, limit_file: str, usage_file: str) -> CgroupMemory | None:
    best: CgroupMemory | None = None
    candidates = _ancestors(cgroup)
    if not (root / cgroup.strip("/")).is_dir():
        candidates = ["/"]
    for path in candidates:
        folder = root / path.strip("/") if path != "/" else root
        limit = _read_int(folder / limit_file)
        if limit is None or limit >= _V1_UNLIMITED:
            continue
        usage = max(0, (_read_int(folder / usage_file) or 0) - _inactive_file(folder))
        if best is None or limit - usage < best.limit_bytes - best.usage_bytes:
            best = CgroupMemory(limit_bytes=limit, usage_bytes=usage, path=path)
    return best


def usable_cores(paths: HostPaths) -> int:
    """CPUs this process may run on, bounded by a cgroup v2 CPU quota if any."""
    try:
        cores = len(os.sched_getaffinity(0))
    except OSError:
        cores = os.cpu_count() or 1
    v2_path, _ = _own_cgroups(paths.proc)
    cpu_max = paths.cgroup_root / (v2_path or "/").strip("/") / "cpu.max"
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def cpu_model(proc: Path) -> str:
    try:
        for line in (proc / "cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "cpu model"):
                return value.strip()[:128]
    except OSError:
        pass
    return "CPU"


def processes_named(proc: Path, names: Iterable[str] = MESH_SERVER_NAMES) -> list[Path]:
    """The /proc/<pid> folders of the visible processes whose name is in `names`."""
    wanted = frozenset(names)
    folders: list[Path] = []
    try:
        entries = list(proc.iterdir())
    except OSError:
        return folders
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            # comm is cut at 15 characters ("ggml-rpc-server" just fits).
            if (entry / "comm").read_text().strip() in wanted:
                folders.append(entry)
        except (OSError, ValueError):  # gone, or a name that is not UTF-8
            continue
    return folders


def mesh_server_rss(proc: Path) -> int:
    """Resident memory of the visible processes named like mesh's servers."""
    total = 0
    for entry in processes_named(proc):
        try:
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError, IndexError):
            continue
    return total


def read_cpu(paths: HostPaths, cgroup: str | None = None) -> CpuReading:
    info = read_meminfo(paths.proc)
    total = info.get("MemTotal", 0)
    free = info.get("MemAvailable", info.get("MemFree", 0))
    limit = cgroup_memory(paths, cgroup)
    if limit is not None and limit.limit_bytes < total:
        total = limit.limit_bytes
        free = min(free, max(0, limit.limit_bytes - limit.usage_bytes))
    return CpuReading(
        model=cpu_model(paths.proc),
        cores=usable_cores(paths),
        memory_total_bytes=total,
        memory_free_bytes=min(free, total),
        memory_used_by_mesh_bytes=mesh_server_rss(paths.proc),
        cgroup=limit,
    )
