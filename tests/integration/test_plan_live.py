"""`mesh plan --pool` against the real API server, as a process: a CPU MeshPool on
two nodes whose MeshNodes are written as their agents write them, another model's
plan holding most of one node, and the real gemma-3-270m file as the SOURCE. The
plan goes around the held memory and names who holds it; a pool that does not
exist and an API server that does not answer are one-line errors with their exit
codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from e2e.cluster import LocalCluster
from e2e.waiting import free_port
from tests.integration.kube_helpers import KWOK_TOLERATION, apply, put_meshnode

pytestmark = pytest.mark.integration

LABEL = "mesh-plan-test"
DEVICE_MIB = 1024
HELD_MIB = 900


def cpu_device(total_mib: int) -> dict[str, object]:
    """One CPU device as the agent's CPU inventory reports it."""
    return {
        "id": "CPU",
        "index": 0,
        "backend": "cpu",
        "name": "CPU",
        "memoryTotalMiB": total_mib,
        "memoryFreeMiB": total_mib - 24,
        "bandwidthGBps": 20.0,
    }


@dataclass(frozen=True)
class LivePool:
    name: str
    nodes: tuple[str, str]
    holder: str  # namespace/name of the model holding memory on nodes[0]


@pytest.fixture
def live_pool(crds: LocalCluster, namespace: str) -> Iterator[LivePool]:
    tag = uuid.uuid4().hex[:8]
    pool = f"plan-{tag}"
    nodes = (f"plan-{tag}-a", f"plan-{tag}-b")
    try:
        for node in nodes:
            crds.add_kwok_node(node, labels={LABEL: tag})
            put_meshnode(crds, node, [cpu_device(DEVICE_MIB)])
        apply(crds, {
            "apiVersion": "mesh.dev/v1alpha1", "kind": "MeshPool", "metadata": {"name": pool},
            "spec": {"backend": "cpu", "nodeSelector": {LABEL: tag},
                     "tolerations": [KWOK_TOLERATION]},
        })  # fmt: skip
        apply(crds, {
            "apiVersion": "mesh.dev/v1alpha1", "kind": "MeshModel",
            "metadata": {"name": "holder", "namespace": namespace},
            "spec": {"poolRef": pool, "source": {"url": "https://models.example/big.gguf"}},
        })  # fmt: skip
        # The plan as the operator writes it into the model's status: its claim.
        plan = {
            "devices": [{"node": nodes[0], "device": "CPU", "layers": [0, 19],
                         "weightsMiB": 800, "kvMiB": 60, "computeMiB": 40,
                         "totalMiB": HELD_MIB}],
            "tensorSplit": [19], "rpc": [nodes[0]], "hostNode": nodes[0],
        }  # fmt: skip
        crds.kubectl(
            "patch", "meshmodel", "holder", "-n", namespace, "--subresource=status",
            "--type=merge", "-p", json.dumps({"status": {"plan": plan}}),
        )  # fmt: skip
        yield LivePool(pool, nodes, f"{namespace}/holder")
    finally:
        crds.kubectl("delete", "meshpool", pool, "--ignore-not-found", "--wait=false")
        for node in nodes:
            crds.kubectl("delete", "meshnode", node, "--ignore-not-found", "--wait=false")
            crds.kubectl("delete", "node", node, "--ignore-not-found", "--wait=false")


def mesh_plan(*args: str, kubeconfig: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh_operator.cli.main", "plan", *args],
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_plan_on_a_live_pool_goes_around_held_memory_and_names_the_holder(
    crds: LocalCluster, live_pool: LivePool, model_file: Path
) -> None:
    run = mesh_plan(
        "--pool", live_pool.name, "--model", str(model_file), "--ctx", "1024",
        "--name", "ai/gemma", "--output", "json", kubeconfig=crds.kubeconfig,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    held, free = live_pool.nodes
    assert report["feasible"] and report["pool"] == live_pool.name
    # 1024 - 900 held - the 10% reserve leaves the held node too little.
    assert report["rpc"] == [free] and report["hostNode"] == free
    assert {d["node"] for d in report["devices"]} == {free}
    assert report["heldBy"] == [
        {"model": live_pool.holder, "node": held, "device": "CPU", "MiB": HELD_MIB}
    ]
    assert report["unusableNodes"] == []
    assert report["model"]["architecture"] == "gemma3"
    # The operator's own command line: the model's path in the host pod, its served
    # name, and the template of a gemma file that carries none.
    host = report["args"]["llama-server"]
    assert host[host.index("--rpc") + 1] == f"{free}:50052"
    assert host[host.index("--alias") + 1] == "gemma"
    assert host[host.index("--chat-template") + 1] == "gemma"
    assert host[host.index("-m") + 1].endswith("/" + model_file.name)
    assert list(report["args"]["ggml-rpc-server"]) == [free]

    table = mesh_plan(
        "--pool", live_pool.name, "--model", model_file.resolve().as_uri(), "--ctx", "1024",
        "--output", "table", kubeconfig=crds.kubeconfig,
    )  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert "memory other models hold in the pool:" in table.stdout
    line = next(x for x in table.stdout.splitlines() if x.startswith(live_pool.holder))
    assert line.split() == [live_pool.holder, held, "CPU", str(HELD_MIB), "MiB"]


def test_a_draft_model_on_a_live_pool_is_planned_on_the_hosts_cpu(
    crds: LocalCluster, live_pool: LivePool, model_file: Path
) -> None:
    run = mesh_plan(
        "--pool", live_pool.name, "--model", str(model_file), "--draft", str(model_file),
        "--ctx", "1024", "--name", "ai/gemma", kubeconfig=crds.kubeconfig,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    _, free = live_pool.nodes
    # The draft shares the CPU device of the host's node with the layers there.
    assert report["hostNode"] == free and report["draft"]["node"] == free
    layers = sum(d["totalMiB"] for d in report["devices"] if d["node"] == free)
    assert layers + report["draft"]["memoryMiB"] <= DEVICE_MIB
    host = report["args"]["llama-server"]
    assert host[host.index("-md") + 1].endswith("/" + model_file.name)
    assert host[host.index("-devd") + 1] == "none"


def test_a_pool_the_cluster_lacks_is_a_one_line_error(crds: LocalCluster, model_file: Path) -> None:
    config = crds.kubeconfig
    run = mesh_plan("--pool", "no-such-pool", "--model", str(model_file), kubeconfig=config)
    assert run.returncode == 2
    assert run.stderr == "mesh plan: error: MeshPool 'no-such-pool' does not exist\n"
    assert run.stdout == ""


def test_an_api_server_that_does_not_answer_is_a_one_line_error(
    crds: LocalCluster, model_file: Path, tmp_path: Path
) -> None:
    config = yaml.safe_load(crds.kubeconfig.read_text())
    for cluster in config["clusters"]:
        cluster["cluster"]["server"] = f"https://127.0.0.1:{free_port()}"
    dead = tmp_path / "kubeconfig"
    dead.write_text(yaml.safe_dump(config))
    run = mesh_plan("--pool", "any", "--model", str(model_file), kubeconfig=dead)
    assert run.returncode == 1
    assert run.stderr.startswith("mesh plan: error: cannot reach the API server: ")
    assert run.stderr.count("\n") == 1 and run.stdout == ""
