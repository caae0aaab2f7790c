"""CPU device memory under cgroup v1/v2 limits, the bandwidth cache, the model cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mesh_agent.inventory import bandwidth, model_cache
from mesh_agent.inventory.cpu import HostPaths, read_cpu, read_meminfo

pytestmark = pytest.mark.unit

GIB = 1024**3
MEMINFO = """\
MemTotal:       24682416 kB
MemFree:        18169980 kB
MemAvailable:   23759940 kB
Buffers:          123456 kB
"""


def fake_proc(tmp_path: Path, cgroup_line: str) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(MEMINFO)
    (proc / "self" / "cgroup").write_text(cgroup_line)
    (proc / "cpuinfo").write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\n")
    server = proc / "4242"
    server.mkdir()
    (server / "comm").write_text("ggml-rpc-server\n")
    (server / "status").write_text("Name:\tggml-rpc-server\nVmRSS:\t  204800 kB\n")
    other = proc / "4243"
    other.mkdir()
    (other / "comm").write_text("python3\n")
    (other / "status").write_text("Name:\tpython3\nVmRSS:\t  999999 kB\n")
    return proc


def test_meminfo_in_bytes(tmp_path: Path) -> None:
    info = read_meminfo(fake_proc(tmp_path, "0::/\n"))
    assert info["MemTotal"] == 24682416 * 1024


def test_no_cgroup_limit_means_system_memory(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "0::/\n")
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory\n")
    (root / "memory.max").write_text("max\n")
    cpu = read_cpu(HostPaths(proc=proc, cgroup_root=root))
    assert cpu.memory_total_bytes == 24682416 * 1024
    assert cpu.memory_free_bytes == 23759940 * 1024
    assert cpu.model == "AMD EPYC 7B13"
    assert cpu.memory_used_by_mesh_bytes == 204800 * 1024


def test_cgroup_v2_limit_of_an_ancestor_bounds_memory(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "0::/kubepods.slice/pod1/agent\n")
    root = tmp_path / "cgroup"
    (root / "kubepods.slice" / "pod1" / "agent").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory\n")
    (root / "kubepods.slice" / "memory.max").write_text(str(8 * GIB))
    (root / "kubepods.slice" / "memory.current").write_text(str(3 * GIB))
    (root / "kubepods.slice" / "memory.stat").write_text(f"anon 1\ninactive_file {GIB}\n")
    (root / "kubepods.slice" / "pod1" / "memory.max").write_text("max\n")
    cpu = read_cpu(HostPaths(proc=proc, cgroup_root=root))
    assert cpu.memory_total_bytes == 8 * GIB
    # usage 3 GiB of which 1 GiB is reclaimable page cache
    assert cpu.memory_free_bytes == 6 * GIB
    assert cpu.cgroup is not None and cpu.cgroup.path == "/kubepods.slice"


def test_cgroup_v1_limit_inside_a_container(tmp_path: Path) -> None:
    # The container sees its own cgroup at the root of the mount while
    # /proc/self/cgroup names the host path, as on this project's machines.
    proc = fake_proc(tmp_path, "4:memory:/process_api/abc\n0::/\n")
    memory = tmp_path / "cgroup" / "memory"
    memory.mkdir(parents=True)
    (memory / "memory.limit_in_bytes").write_text(str(4 * GIB))
    (memory / "memory.usage_in_bytes").write_text(str(GIB))
    cpu = read_cpu(HostPaths(proc=proc, cgroup_root=tmp_path / "cgroup"))
    assert cpu.memory_total_bytes == 4 * GIB
    assert cpu.memory_free_bytes == 3 * GIB


def test_v1_unlimited_is_ignored(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "4:memory:/\n")
    memory = tmp_path / "cgroup" / "memory"
    memory.mkdir(parents=True)
    (memory / "memory.limit_in_bytes").write_text("9223372036854771712")
    cpu = read_cpu(HostPaths(proc=proc, cgroup_root=tmp_path / "cgroup"))
    assert cpu.memory_total_bytes == 24682416 * 1024


def test_real_host_reads() -> None:
    cpu = read_cpu(HostPaths())
    assert cpu.cores >= 1
    assert 0 < cpu.memory_free_bytes <= cpu.memory_total_bytes


def test_bandwidth_is_measured_once_then_cached(tmp_path: Path) -> None:
    cache = tmp_path / "bw.json"
    key = bandwidth.BandwidthKey("cpu", 1, 1024, size_mib=16, streams=1)
    first = bandwidth.cached_bandwidth(cache, key)
    assert first > 0
    assert json.loads(cache.read_text())["gbps"] == first
    # A cached figure is returned without measuring: mark it to tell.
    data = json.loads(cache.read_text())
    data["gbps"] = first + 1000
    cache.write_text(json.dumps(data))
    assert bandwidth.cached_bandwidth(cache, key) == first + 1000
    # Another machine shape invalidates it.
    other = bandwidth.BandwidthKey("cpu", 2, 1024, size_mib=16, streams=1)
    assert bandwidth.cached_bandwidth(cache, other) < first + 1000


def test_model_cache_scan(tmp_path: Path) -> None:
    (tmp_path / "org" / "model").mkdir(parents=True)
    gguf = tmp_path / "org" / "model" / "m-q4_k_m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(96))
    digest = "ab" * 32
    (tmp_path / "org" / "model" / "m-q4_k_m.gguf.sha256").write_text(f"{digest}  m-q4_k_m.gguf\n")
    (tmp_path / "top.gguf").write_bytes(b"GGUF")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".partial").mkdir()
    (tmp_path / ".partial" / "half.gguf").write_bytes(b"G")
    files = model_cache.scan(tmp_path)
    assert [(f.file, f.size_bytes, f.sha256) for f in files] == [
        ("top.gguf", 4, None),
        ("org/model/m-q4_k_m.gguf", 100, digest),
    ]
    assert model_cache.scan(tmp_path / "absent") == []
