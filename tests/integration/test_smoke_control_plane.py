"""Smoke tests that the control plane is real: the stamped version, CRDs accepted,
and a DaemonSet whose pods the real controller-manager creates and the real
scheduler binds to kwok GPU nodes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from e2e.cluster import K8S_VERSION, LocalCluster

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_version_is_stamped(cluster: LocalCluster) -> None:
    version = json.loads(cluster.kubectl("get", "--raw", "/version"))
    assert version["gitVersion"] == K8S_VERSION
    assert (version["major"], version["minor"]) == ("1", K8S_VERSION.split(".")[1])
    client = json.loads(cluster.kubectl("version", "--client", "-o", "json"))
    assert client["clientVersion"]["gitVersion"] == K8S_VERSION


def test_crds_are_established(cluster: LocalCluster) -> None:
    cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    cluster.wait_established(*(f"{p}.mesh.dev" for p in ("meshpools", "meshmodels", "meshnodes")))
    names = cluster.kubectl("api-resources", "--api-group=mesh.dev", "-o", "name").split()
    assert sorted(names) == ["meshmodels.mesh.dev", "meshnodes.mesh.dev", "meshpools.mesh.dev"]


def test_daemonset_pods_bind_to_kwok_gpu_nodes(cluster: LocalCluster, namespace: str) -> None:
    gpu_nodes = [f"smoke-gpu-{namespace}-{i}" for i in range(2)]
    for name in gpu_nodes:
        cluster.add_kwok_node(name, gpus=1, labels={"smoke": namespace})
    cluster.add_kwok_node(f"smoke-cpu-{namespace}", labels={"smoke-cpu": namespace})
    ds = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "rpc", "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": {"app": "rpc"}},
            "template": {
                "metadata": {"labels": {"app": "rpc"}},
                "spec": {
                    "nodeSelector": {"smoke": namespace},
                    "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists"}],
                    "containers": [
                        {
                            "name": "rpc",
                            "image": "ghcr.io/ggml-org/llama.cpp:full",
                            "resources": {"limits": {"nvidia.com/gpu": "1"}},
                        }
                    ],
                },
            },
        },
    }
    cluster.kubectl("apply", "-f", "-", input_text=json.dumps(ds))
    deadline = time.monotonic() + 90
    bound: dict[str, str] = {}
    while time.monotonic() < deadline:
        pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json"))["items"]
        bound = {p["metadata"]["name"]: p["spec"].get("nodeName", "") for p in pods}
        phases = {p["status"].get("phase") for p in pods}
        if len(bound) == 2 and all(bound.values()) and phases == {"Running"}:
            break
        time.sleep(0.5)
    assert sorted(bound.values()) == sorted(gpu_nodes), bound
    # Bound by the real scheduler, and kwok reports the pods running.
    events = json.loads(
        cluster.kubectl(
            "get", "events", "-n", namespace, "--field-selector", "reason=Scheduled", "-o", "json"
        )
    )["items"]
    assert {e["involvedObject"]["name"] for e in events} == set(bound)
    assert all(
        e["source"].get("component") == "default-scheduler"
        or e.get("reportingComponent") == "default-scheduler"
        for e in events
    )
    for name in gpu_nodes:
        cluster.kubectl("delete", "node", name, "--wait=false")
    cluster.kubectl("delete", "node", f"smoke-cpu-{namespace}", "--wait=false")
