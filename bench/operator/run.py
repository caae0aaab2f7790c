"""Operator benchmark: 500 kwok GPU nodes, 100 MeshModels, time from apply to plan.

`python -m bench operator [--nodes 500] [--models 100] [--cluster-dir DIR]`

Starts a local control plane (or reuses one), registers kwok GPU nodes with
MeshNodes as their agents would write them, starts `mesh operator` as a real
process, applies the models at once and watches until every one has a plan.
Reports p50/p99 time from apply to plan written, the total, and the operator's
peak RSS. Not a test: figures only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes.client import ApiClient
from prometheus_client.parser import text_string_to_metric_families

from e2e import parts
from e2e.cluster import KWOK_NODE_ANNOTATION, cluster_with_crds
from e2e.fileserver import serve_directory
from e2e.waiting import free_port

REPO = Path(__file__).resolve().parents[2]
HEADERS = REPO / "tests" / "fixtures" / "planner" / "models"
GROUP, VERSION = "mesh.dev", "v1alpha1"
LABEL = "mesh-bench"
# (name, MiB, GB/s): a spread of data-centre and consumer GPUs.
GPUS = [
    ("A100-80GB", 81920, 2039.0),
    ("A100-40GB", 40960, 1555.0),
    ("L40S", 46068, 864.0),
    ("RTX-4090", 24564, 1008.0),
    ("RTX-3090", 24576, 936.0),
    ("RTX-4080", 16376, 716.0),
    ("RTX-3060", 12288, 360.0),
    ("T4", 15360, 320.0),
]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _nodes(api: ApiClient, count: int, rng: random.Random) -> None:
    core = kubernetes.client.CoreV1Api(api)
    custom = kubernetes.client.CustomObjectsApi(api)
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    for i in range(count):
        name = f"bench-gpu-{i:03d}"
        gpu_name, mib, bandwidth = rng.choice(GPUS)
        n_gpus = rng.choice([1, 1, 2, 4, 8])
        capacity = {"cpu": "32", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": str(n_gpus)}
        node = {
            "metadata": {
                "name": name,
                "annotations": {KWOK_NODE_ANNOTATION: "fake"},
                "labels": {"kubernetes.io/hostname": name, LABEL: "yes", "type": "kwok"},
            },
            "spec": {
                "taints": [{"key": KWOK_NODE_ANNOTATION, "value": "fake", "effect": "NoSchedule"}]
            },
            "status": {"capacity": capacity, "allocatable": capacity},
        }
        with contextlib.suppress(kubernetes.client.ApiException):
            core.create_node(node, _preload_content=False)  # type: ignore[arg-type]
        custom.create_cluster_custom_object(
            GROUP, VERSION, "meshnodes",
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MeshNode",
             "metadata": {"name": name}, "spec": {"nodeName": name}},
            _preload_content=False,
        )  # fmt: skip
        devices = [
            {"id": f"CUDA{g}", "index": g, "backend": "cuda", "name": gpu_name,
             "memoryTotalMiB": mib, "memoryFreeMiB": mib - 300, "bandwidthGBps": bandwidth}
            for g in range(n_gpus)
        ]  # fmt: skip
        status = {"heartbeatTime": now, "intervalSeconds": 3600, "devices": devices}
        custom.patch_cluster_custom_object_status(
            GROUP, VERSION, "meshnodes", name, {"status": status},
            _content_type="application/merge-patch+json", _preload_content=False,
        )  # fmt: skip


@contextlib.contextmanager
def _operator(kubeconfig: Path, log: Path, metrics: int) -> Iterator[subprocess.Popen[bytes]]:
    health = free_port()
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(parts.mesh_cli()), "operator",
             "--health-address", f"127.0.0.1:{health}",
             "--metrics-address", f"127.0.0.1:{metrics}"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=2):
                    break
            except OSError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"operator exited: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _operator_timings(port: int) -> tuple[float, float]:
    """Mean planner and MeshModel reconcile times (ms), from the operator's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("kind", "MeshModel") != "MeshModel":
                continue
            sums[sample.name] = sums.get(sample.name, 0.0) + sample.value

    def mean(prefix: str) -> float:
        count = sums.get(f"{prefix}_count", 0.0)
        return 1000 * sums.get(f"{prefix}_sum", 0.0) / count if count else 0.0

    return mean("mesh_operator_plan_duration_seconds"), mean(
        "mesh_operator_reconcile_duration_seconds"
    )


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _watch_plans(
    api: ApiClient, namespace: str, seen: dict[str, float], stop: threading.Event
) -> None:
    """Record when each model's plan first appears (polled: cheap at this scale)."""
    custom = kubernetes.client.CustomObjectsApi(api)
    while not stop.is_set():
        listing: Any = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "meshmodels")
        now = time.monotonic()
        for obj in listing.get("items", []):
            name = obj["metadata"]["name"]
            if name not in seen and (obj.get("status") or {}).get("plan"):
                seen[name] = now
        stop.wait(0.25)


def run(n_nodes: int, n_models: int, cluster_dir: Path | None) -> int:
    rng = random.Random(7)
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mesh-bench-")))
        cluster = stack.enter_context(cluster_with_crds(cluster_dir, work))
        api: ApiClient = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(cluster.kubeconfig)
        )
        started = time.monotonic()
        _nodes(api, n_nodes, rng)
        took = time.monotonic() - started
        print(f"registered {n_nodes} kwok GPU nodes with MeshNodes in {took:.1f}s")
        base = stack.enter_context(serve_directory(HEADERS))
        headers = sorted(p.name for p in HEADERS.glob("*.gguf"))
        custom = kubernetes.client.CustomObjectsApi(api)
        custom.create_cluster_custom_object(
            GROUP, VERSION, "meshpools",
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MeshPool", "metadata": {"name": "bench"},
             "spec": {"nodeSelector": {LABEL: "yes"}, "sharing": "shared",
                      "tolerations": [{"key": KWOK_NODE_ANNOTATION, "operator": "Exists"}]}},
            _preload_content=False,
        )  # fmt: skip
        namespace = f"bench-{rng.randrange(1 << 30):x}"
        cluster.kubectl("create", "namespace", namespace)
        metrics_port = free_port()
        proc = stack.enter_context(
            _operator(cluster.kubeconfig, work / "operator.log", metrics_port)
        )
        seen: dict[str, float] = {}
        stop = threading.Event()
        watcher = threading.Thread(
            target=_watch_plans, args=(api, namespace, seen, stop), daemon=True
        )
        watcher.start()
        applied: dict[str, float] = {}
        for i in range(n_models):
            name = f"model-{i:03d}"
            header = headers[i % len(headers)]
            applied[name] = time.monotonic()
            custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, "meshmodels",
                {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MeshModel",
                 "metadata": {"name": name},
                 "spec": {"source": {"url": f"{base}/{header}"}, "poolRef": "bench",
                          "contextSize": 4096}},
                _preload_content=False,
            )  # fmt: skip
        deadline = time.monotonic() + 600
        while len(seen) < n_models and time.monotonic() < deadline:
            time.sleep(0.5)
        stop.set()
        peak = _peak_rss_mib(proc.pid)
        cpu = _cpu_seconds(proc.pid)
        plan_ms, reconcile_ms = _operator_timings(metrics_port)
        latencies = [seen[n] - applied[n] for n in applied if n in seen]
        if not latencies:
            print("no model was planned", file=sys.stderr)
            return 1
        total = max(seen.values()) - min(applied.values())
        print()
        print(
            "| nodes | models | planned | p50 apply->plan | p99 apply->plan | all planned "
            "| mean plan | mean reconcile | operator CPU | operator peak RSS |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        print(
            f"| {n_nodes} | {n_models} | {len(latencies)} | {_percentile(latencies, 0.5):.2f} s "
            f"| {_percentile(latencies, 0.99):.2f} s | {total:.1f} s | {plan_ms:.0f} ms "
            f"| {reconcile_ms:.0f} ms | {cpu:.0f} s | {peak:.0f} MiB |"
        )
        return 0 if len(latencies) == n_models else 1
    return 1


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench operator", description=__doc__)
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--cluster-dir", type=Path, help="reuse (and keep) this local cluster")
    args = parser.parse_args(argv)
    return run(args.nodes, args.models, args.cluster_dir)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
