"""The operator, run by kopf's KopfRunner, against the real API server with kwok GPU
nodes: plans, children, re-plans, deletion, and every failure it must report."""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kopf.testing import KopfRunner

from e2e.cluster import LocalCluster
from e2e.fileserver import serve_directory
from e2e.nodesim import SimulatedCluster
from e2e.waiting import wait_for
from mesh_operator.planner import ServingParams, read_model_profile
from mesh_operator.planner.draft import estimate_draft_memory
from mesh_operator.planner.memory import MIB
from tests.integration.kube_helpers import (
    apply,
    condition,
    get,
    gpu_device,
    now_rfc3339,
    put_meshnode,
)

pytestmark = pytest.mark.integration

MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
KWOK_TOLERATION = {"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}


@pytest.fixture(scope="module")
def model_url(model_file: Path) -> Iterator[str]:
    with serve_directory(model_file.parent) as base:
        yield base


@pytest.fixture(scope="module")
def operator(crds: LocalCluster) -> Iterator[KopfRunner]:
    os.environ["KUBECONFIG"] = str(crds.kubeconfig)
    os.environ["MESH_MODEL_INTERVAL"] = "2"
    os.environ["MESH_POOL_INTERVAL"] = "2"
    args = ["run", "--all-namespaces", "--standalone", "-m", "mesh_operator.handlers.registration"]
    with KopfRunner(args, timeout=60) as runner:
        yield runner
    assert runner.exit_code == 0, runner.output
    assert runner.exception is None
    assert "Traceback" not in runner.output, runner.output[-5000:]


@pytest.fixture
def cleanup(crds: LocalCluster) -> Iterator[list[str]]:
    """Cluster-scoped objects a test made (`kind/name`), deleted afterwards."""
    made: list[str] = []
    yield made
    if made:
        crds.kubectl("delete", *made, "--wait=false", "--ignore-not-found", check=False)


def _pool(cluster: LocalCluster, name: str, label: str, cleanup: list[str], **spec: Any) -> None:
    cleanup.append(f"meshpool/{name}")
    apply(
        cluster,
        {
            "apiVersion": "mesh.dev/v1alpha1",
            "kind": "MeshPool",
            "metadata": {"name": name},
            "spec": {
                "backend": "cuda",
                "nodeSelector": {"mesh-test-pool": label},
                "tolerations": [KWOK_TOLERATION],
                **spec,
            },
        },
    )


def _model(cluster: LocalCluster, namespace: str, name: str, pool: str, **spec: Any) -> None:
    body: dict[str, Any] = {"poolRef": pool, "contextSize": 1024, **spec}
    apply(
        cluster,
        {
            "apiVersion": "mesh.dev/v1alpha1",
            "kind": "MeshModel",
            "metadata": {"name": name, "namespace": namespace},
            "spec": body,
        },
    )


def _gpu_nodes(
    cluster: LocalCluster, label: str, sizes: list[tuple[int, float]], cleanup: list[str]
) -> list[str]:
    names = []
    for i, (total_mib, bandwidth) in enumerate(sizes):
        name = f"gpu-{label}-{i}"
        cleanup += [f"node/{name}", f"meshnode/{name}"]
        cluster.add_kwok_node(name, gpus=1, labels={"mesh-test-pool": label})
        put_meshnode(
            cluster, name, [gpu_device(0, total_mib, total_mib - 10, bandwidth, f"Test GPU {i}")]
        )
        names.append(name)
    return names


def _model_obj(cluster: LocalCluster, namespace: str, name: str) -> dict[str, Any] | None:
    obj: dict[str, Any] | None = get(cluster, "meshmodel", name, "-n", namespace)
    return obj


def stop_heartbeat(cluster: LocalCluster, node: str) -> None:
    """The node's MeshNode as its agent left it two hours ago: the node is lost."""
    put_meshnode(
        cluster, node, [gpu_device(0, 300, 290, 900.0, "Test GPU")],
        heartbeat=now_rfc3339(-7200), interval_seconds=10,
    )  # fmt: skip


def _planned(cluster: LocalCluster, namespace: str, name: str) -> dict[str, Any] | None:
    obj = _model_obj(cluster, namespace, name)
    cond = condition(obj, "Planned")
    if obj and cond and cond["status"] == "True" and obj["status"].get("plan"):
        return obj
    return None


def _children(cluster: LocalCluster, namespace: str, name: str) -> list[str]:
    out = cluster.kubectl(
        "get", "daemonsets,deployments,services,networkpolicies,pods", "-n", namespace,
        "-l", f"mesh.dev/model={name}", "-o", "name",
    )  # fmt: skip
    return out.split()


def test_model_is_planned_across_nodes_and_replanned_when_a_node_goes_stale(
    operator: KopfRunner,
    crds: LocalCluster,
    namespace: str,
    model_url: str,
    cleanup: list[str],
) -> None:
    cluster = crds
    label = namespace
    # Three mismatched GPUs too small for the whole model alone (gemma-3-270m
    # needs about 300 MiB at this context): the plan must span two of them.
    nodes = _gpu_nodes(cluster, label, [(300, 900.0), (300, 500.0), (300, 300.0)], cleanup)
    pool = f"pool-{label}"
    _pool(cluster, pool, label, cleanup)
    _model(cluster, namespace, "gemma", pool, source={"url": f"{model_url}/{MODEL_FILE}"})

    obj = wait_for("the plan", lambda: _planned(cluster, namespace, "gemma"), timeout=90)
    plan = obj["status"]["plan"]
    planned_nodes = plan["rpc"]
    assert len(planned_nodes) == 2 and set(planned_nodes) <= set(nodes), plan
    assert plan["hostNode"] in planned_nodes
    assert obj["status"]["split"] == ",".join(str(x) for x in plan["tensorSplit"])
    assert all(d["totalMiB"] <= 300 * 0.9 for d in plan["devices"])

    # The real controller-manager and scheduler put one RPC server on each planned node.
    def rpc_pods() -> dict[str, str] | None:
        pods = get(cluster, "pods", "-n", namespace, "-l", "app.kubernetes.io/component=rpc-server")
        bound = {
            p["spec"].get("nodeName"): p["status"].get("podIP")
            for p in pods["items"]
            if p["status"].get("phase") == "Running" and p["status"].get("podIP")
        }
        return bound if set(bound) == set(planned_nodes) else None

    ips = wait_for("RPC server pods on the planned nodes", rpc_pods, timeout=90)

    def host_args() -> list[str] | None:
        dep = get(cluster, "deployment", "gemma-host", "-n", namespace)
        if not dep or dep["spec"]["replicas"] != 1:
            return None
        args: list[str] = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        return args

    args = wait_for("the host Deployment with its workers", host_args, timeout=90)
    expected_rpc = ",".join(f"{ips[n]}:50052" for n in planned_nodes)
    assert args[args.index("--rpc") + 1] == expected_rpc
    assert args[args.index("-ts") + 1] == obj["status"]["split"]
    assert args[args.index("-fit") + 1] == "off"
    dep = get(cluster, "deployment", "gemma-host", "-n", namespace)
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    assert get(cluster, "service", "gemma-host", "-n", namespace)["spec"]["type"] == "ClusterIP"
    assert get(cluster, "networkpolicy", "gemma-mesh", "-n", namespace) is not None
    for kind in ("daemonset/gemma-rpc", "deployment/gemma-host", "service/gemma-host"):
        owners = get(cluster, kind, "-n", namespace)["metadata"]["ownerReferences"]
        assert owners[0]["kind"] == "MeshModel" and owners[0]["controller"] is True

    # The MeshNode of a planned node stops heartbeating: the model moves.
    lost = planned_nodes[0]
    stop_heartbeat(cluster, lost)

    def replanned() -> dict[str, Any] | None:
        current = _planned(cluster, namespace, "gemma")
        if current and lost not in current["status"]["plan"]["rpc"]:
            return current
        return None

    moved = wait_for("a re-plan without the stale node", replanned, timeout=60)
    assert set(moved["status"]["plan"]["rpc"]) == set(nodes) - {lost}
    assert moved["status"]["planGeneration"] == obj["status"]["planGeneration"] + 1
    # The Event follows the status write (the plan is claimed first), so it may
    # land a moment after the re-plan is seen.

    def replanned_event() -> list[str] | None:
        events = get(cluster, "events", "-n", namespace, "--field-selector", "reason=Replanned")
        messages = [e["message"] for e in events["items"]]
        return messages if any(lost in m for m in messages) else None

    wait_for(f"a Replanned Event naming {lost}", replanned_event, timeout=30)

    # Pods on the silent node are released at once (its kubelet will never confirm).
    def released() -> bool:
        pods = get(cluster, "pods", "-n", namespace, "-l", "mesh.dev/model=gemma")["items"]
        return all(p["spec"].get("nodeName") != lost for p in pods)

    wait_for(f"no pod of the model left on {lost}", released, timeout=30)

    # Deleting the model leaves nothing of it behind (garbage collection).
    cluster.kubectl("delete", "meshmodel", "gemma", "-n", namespace)
    wait_for("no children left", lambda: not _children(cluster, namespace, "gemma"), timeout=90)


def test_model_that_cannot_fit_reports_the_numbers(
    operator: KopfRunner,
    crds: LocalCluster,
    namespace: str,
    model_url: str,
    cleanup: list[str],
) -> None:
    label = namespace
    _gpu_nodes(crds, label, [(120, 900.0), (100, 500.0)], cleanup)
    pool = f"pool-{label}"
    _pool(crds, pool, label, cleanup, maxNodesPerModel=2)
    _model(crds, namespace, "big", pool, source={"url": f"{model_url}/{MODEL_FILE}"})

    def refused() -> dict[str, Any] | None:
        cond = condition(_model_obj(crds, namespace, "big"), "Planned")
        return cond if cond and cond["reason"] == "NoCapacity" else None

    cond = wait_for("Planned=False NoCapacity", refused, timeout=60)
    assert cond["status"] == "False"
    assert "needs" in cond["message"] and "GiB" in cond["message"], cond["message"]
    assert not [c for c in _children(crds, namespace, "big") if "daemonset" in c]


def test_a_model_too_big_for_vram_is_planned_with_layers_in_the_hosts_ram(
    operator: KopfRunner,
    crds: LocalCluster,
    namespace: str,
    model_url: str,
    model_file: Path,
    cleanup: list[str],
) -> None:
    label = namespace
    # gemma-3-270m needs about 300 MiB here; its output layer alone fits in 260.
    (name,) = _gpu_nodes(crds, label, [(260, 900.0)], cleanup)
    # The node's agent offers 2 GiB of RAM beside its GPU (the RAM tier).
    gpu = gpu_device(0, 260, 250, 900.0, "Test GPU 0")
    put_meshnode(crds, name, [gpu], hostMemoryFreeMiB=2048, hostMemoryBandwidthGBps=50.0)
    pool = f"pool-{label}"
    _pool(crds, pool, label, cleanup)
    _model(crds, namespace, "tiered", pool, source={"url": f"{model_url}/{MODEL_FILE}"})

    obj = wait_for("the plan", lambda: _planned(crds, namespace, "tiered"), timeout=90)
    plan = obj["status"]["plan"]
    tier = plan["hostTier"]
    # gemma-3-270m is dense: whole first layers on the host's CPU, host on that node.
    assert tier["node"] == plan["hostNode"] == name, plan
    assert tier["moeLayers"] == 0 and tier["cpuLayers"] > 0 and tier["memoryMiB"] > 0
    assert plan["devices"][0]["layers"][0] == tier["cpuLayers"]
    assert "in RAM on" in condition(obj, "Planned")["message"]  # type: ignore[index]

    def host() -> dict[str, Any] | None:
        dep = get(crds, "deployment", "tiered-host", "-n", namespace)
        return dep["spec"]["template"]["spec"]["containers"][0] if dep else None

    server = wait_for("the host Deployment", host, timeout=90)
    args = server["args"]
    # The host requests the RAM its tier takes.
    assert server["resources"]["requests"]["memory"] == f"{tier['memoryMiB']}Mi"
    layers = read_model_profile(model_file).n_device_layers
    assert args[args.index("-ngl") + 1] == str(layers - tier["cpuLayers"])
    assert args[args.index("-lm") + 1] == "none" and "--n-cpu-moe" not in args


def test_a_draft_model_is_planned_on_the_host_node_and_claimed(
    operator: KopfRunner,
    crds: LocalCluster,
    namespace: str,
    model_url: str,
    model_file: Path,
    cleanup: list[str],
) -> None:
    label = namespace
    (name,) = _gpu_nodes(crds, label, [(2048, 900.0)], cleanup)
    put_meshnode(
        crds, name, [gpu_device(0, 2048, 2000, 900.0, "Test GPU 0")], hostMemoryFreeMiB=4096
    )
    pool = f"pool-{label}"
    _pool(crds, pool, label, cleanup)
    url = f"{model_url}/{MODEL_FILE}"
    _model(crds, namespace, "drafted", pool, source={"url": url}, draft={"source": {"url": url}})

    obj = wait_for("the plan", lambda: _planned(crds, namespace, "drafted"), timeout=90)
    plan = obj["status"]["plan"]
    draft = plan["draft"]
    # The draft's header is read like the model's; its memory is the planner's estimate.
    estimate = estimate_draft_memory(read_model_profile(model_file), ServingParams(ctx=1024))
    assert draft["node"] == plan["hostNode"] == name, plan
    assert draft["memoryMiB"] == -(-estimate.total // MIB), draft
    assert draft["weightsMiB"] == -(-estimate.weights // MIB), draft

    def host() -> dict[str, Any] | None:
        dep = get(crds, "deployment", "drafted-host", "-n", namespace)
        return dep["spec"]["template"]["spec"]["containers"][0] if dep else None

    server = wait_for("the host Deployment", host, timeout=90)
    args = server["args"]
    assert args[args.index("--spec-type") + 1] == "draft-simple"
    assert args[args.index("-devd") + 1] == "none"
    assert server["resources"]["requests"]["memory"] == f"{draft['memoryMiB']}Mi"


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("unknown-pool", "PoolNotFound"),
        ("missing-file", "SourceNotFound"),
        ("not-gguf", "SourceInvalid"),
        ("missing-secret", "SecretNotFound"),
    ],
)
def test_bad_references_are_reported_in_conditions(
    operator: KopfRunner,
    crds: LocalCluster,
    namespace: str,
    model_url: str,
    tmp_path: Path,
    cleanup: list[str],
    case: str,
    reason: str,
) -> None:
    label = namespace
    _gpu_nodes(crds, label, [(4096, 900.0)], cleanup)
    pool = f"pool-{label}"
    _pool(crds, pool, label, cleanup)
    source: dict[str, Any] = {"url": f"{model_url}/{MODEL_FILE}"}
    extra: dict[str, Any] = {}
    if case == "unknown-pool":
        pool = f"no-such-pool-{uuid.uuid4().hex[:6]}"
    elif case == "missing-file":
        source = {"url": f"{model_url}/absent.gguf"}
    elif case == "missing-secret":
        extra = {"apiKeySecretRef": {"name": "absent", "key": "key"}}
    with contextlib.ExitStack() as stack:
        if case == "not-gguf":
            (tmp_path / "notes.gguf").write_text("these are notes, not a model\n" * 100)
            source = {"url": f"{stack.enter_context(serve_directory(tmp_path))}/notes.gguf"}
        _model(crds, namespace, "m", pool, source=source, **extra)

        def reported() -> dict[str, Any] | None:
            cond = condition(_model_obj(crds, namespace, "m"), "Planned")
            return cond if cond and cond["reason"] == reason else None

        cond = wait_for(f"Planned=False {reason}", reported, timeout=60)
    assert cond["status"] == "False" and cond["message"]
    ready = condition(_model_obj(crds, namespace, "m"), "Ready")
    assert ready is not None and ready["status"] == "False"
    assert _children(crds, namespace, "m") == []
    assert json.dumps(cond).count("\n") == 0


def _claim(cluster: LocalCluster, namespace: str, name: str, cleanup: list[str]) -> None:
    """A PVC bound to a PV of its own (static binding; the nodesim node gives the files)."""
    volume = f"pv-{namespace}-{name}"
    cleanup.append(f"persistentvolume/{volume}")
    apply(
        cluster,
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": volume},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "hostPath": {"path": f"/srv/{volume}"},
                "claimRef": {"namespace": namespace, "name": name},
            },
        },
    )
    apply(
        cluster,
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "volumeName": volume,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )


def test_model_on_a_pvc_is_read_by_its_header_pod_and_planned(
    operator: KopfRunner,
    crds: LocalCluster,
    namespace: str,
    model_file: Path,
    tmp_path: Path,
    cleanup: list[str],
) -> None:
    """The operator cannot open a file on a PVC: a pod of its own reads the header
    (`mesh profile`, run for real on a simulated node) and the model is planned
    from what it reports; a file that is not a model is reported, not planned."""
    label = namespace
    _gpu_nodes(crds, label, [(4096, 900.0)], cleanup)
    pool = f"pool-{label}"
    # No kwok toleration: the header pod must run on the simulated node, whose
    # processes are real (kwok would only pretend).
    _pool(crds, pool, label, cleanup, tolerations=[])
    sim = SimulatedCluster(crds, tmp_path / "nodesim", lease_renew_seconds=5.0)
    try:
        sim.add_node(f"pvc-{label}", labels={"mesh-test-pool": label})
        cleanup.append(f"node/pvc-{label}")
        _claim(crds, namespace, "models", cleanup)
        files = tmp_path / "nodesim" / "pvc" / namespace / "models" / "gguf"
        files.mkdir(parents=True)
        (files / "gemma.gguf").symlink_to(model_file)
        (files / "notes.gguf").write_text("these are notes, not a model\n" * 100)
        for name in ("gemma", "notes"):
            source = {"pvc": {"claimName": "models", "path": f"gguf/{name}.gguf"}}
            _model(crds, namespace, name, pool, source=source)

        obj = wait_for("the plan", lambda: _planned(crds, namespace, "gemma"), timeout=120)
        assert obj["status"]["modelSizeBytes"] == read_model_profile(model_file).file_bytes
        reader = get(crds, "pod", "gemma-header", "-n", namespace)
        assert reader["status"]["phase"] == "Succeeded"
        (state,) = reader["status"]["containerStatuses"]
        assert state["state"]["terminated"]["message"].startswith("mesh-profile/1:")
        assert reader["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "models"

        def host() -> dict[str, Any] | None:
            found: dict[str, Any] | None = get(crds, "deployment", "gemma-host", "-n", namespace)
            return found

        pod_spec = wait_for("the host Deployment", host, timeout=60)["spec"]["template"]["spec"]
        assert pod_spec["volumes"][0]["persistentVolumeClaim"] == {
            "claimName": "models",
            "readOnly": True,
        }
        assert "initContainers" not in pod_spec  # nothing to fetch
        args = pod_spec["containers"][0]["args"]
        assert args[args.index("-m") + 1] == "/models/gguf/gemma.gguf"

        def refused() -> dict[str, Any] | None:
            cond = condition(_model_obj(crds, namespace, "notes"), "Planned")
            return cond if cond and cond["reason"] == "SourceUnreadable" else None

        cond = wait_for("Planned=False SourceUnreadable", refused, timeout=120)
        assert "gguf/notes.gguf on PVC models" in cond["message"]
        assert "not a GGUF file" in cond["message"]
        # Nothing but (at most) its header-reader pod: no workloads for a failed read.
        assert not [c for c in _children(crds, namespace, "notes") if not c.startswith("pod/")]
    finally:
        sim.down()


def test_a_node_declared_far_is_left_out_by_the_pools_rtt_limit(
    operator: KopfRunner,
    crds: LocalCluster,
    namespace: str,
    model_url: str,
    cleanup: list[str],
) -> None:
    label = namespace
    # The fastest of three GPUs sits behind a 20 ms link, declared on its Node.
    nodes = _gpu_nodes(crds, label, [(300, 900.0), (300, 500.0), (300, 300.0)], cleanup)
    crds.kubectl("annotate", "node", nodes[0], "mesh.dev/rtt-ms=20")
    pool = f"pool-{label}"
    _pool(crds, pool, label, cleanup, maxRttMs=5)
    _model(crds, namespace, "gemma", pool, source={"url": f"{model_url}/{MODEL_FILE}"})
    obj = wait_for("the plan", lambda: _planned(crds, namespace, "gemma"), timeout=90)
    assert sorted(obj["status"]["plan"]["rpc"]) == sorted(nodes[1:])


def test_a_mixed_pool_gives_each_node_its_own_devices_and_requests(
    operator: KopfRunner,
    crds: LocalCluster,
    namespace: str,
    model_url: str,
    cleanup: list[str],
) -> None:
    """A CUDA pool holding a GPU node and a CPU-only node, the model too big for either
    alone: the GPU node's worker gets `-d CUDA0`, a `nvidia.com/gpu` request and the
    cuda image; the CPU node's gets `-d CPU`, no GPU request and the cpu image."""
    cluster = crds
    label = namespace
    gpu = _gpu_nodes(cluster, label, [(250, 900.0)], cleanup)[0]
    cpu = f"cpu-{label}"
    cleanup += [f"node/{cpu}", f"meshnode/{cpu}"]
    cluster.add_kwok_node(cpu, labels={"mesh-test-pool": label})
    put_meshnode(
        cluster, cpu,
        [{"id": "CPU", "index": 0, "backend": "cpu", "name": "Test CPU",
          "memoryTotalMiB": 250, "memoryFreeMiB": 240, "bandwidthGBps": 40.0}],
    )  # fmt: skip
    pool = f"pool-{label}"
    _pool(cluster, pool, label, cleanup, sharing="exclusive")
    _model(cluster, namespace, "mixed", pool, source={"url": f"{model_url}/{MODEL_FILE}"})

    obj = wait_for("the plan", lambda: _planned(cluster, namespace, "mixed"), timeout=90)
    assert set(obj["status"]["plan"]["rpc"]) == {gpu, cpu}, obj["status"]["plan"]

    def daemonsets() -> list[dict[str, Any]] | None:
        found = get(cluster, "daemonsets", "-n", namespace, "-l", "mesh.dev/model=mixed")
        items: list[dict[str, Any]] = found["items"] if found else []
        return items if len(items) == 2 else None

    by_node: dict[str, dict[str, Any]] = {}
    for ds in wait_for("a worker DaemonSet per kind of node", daemonsets, timeout=60):
        terms = ds["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]["nodeSelectorTerms"]
        nodes = [v for t in terms for e in t["matchFields"] for v in e["values"]]
        assert len(nodes) == 1, nodes
        by_node[nodes[0]] = ds["spec"]["template"]["spec"]["containers"][0]
    gpu_worker, cpu_worker = by_node[gpu], by_node[cpu]
    assert gpu_worker["args"][gpu_worker["args"].index("-d") + 1] == "CUDA0"
    assert gpu_worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu_worker["image"].endswith("-cuda")
    assert cpu_worker["args"][cpu_worker["args"].index("-d") + 1] == "CPU"
    assert "nvidia.com/gpu" not in str(cpu_worker.get("resources", {}))
    assert cpu_worker["image"].endswith("-cpu")


def test_replicas_are_planned_on_disjoint_nodes_claimed_and_replanned_alone(
    operator: KopfRunner,
    crds: LocalCluster,
    namespace: str,
    model_url: str,
    cleanup: list[str],
) -> None:
    """Two replicas, each needing two of five 300 MiB GPUs: disjoint plans, both
    claimed (a second model finds no room), both serving; a node of one lost
    re-plans that one onto the spare node, the other's children untouched."""
    cluster = crds
    label = namespace
    sizes = [(300, 900.0), (300, 800.0), (300, 700.0), (300, 600.0), (300, 500.0)]
    nodes = _gpu_nodes(cluster, label, sizes, cleanup)
    pool = f"pool-{label}"
    # Exclusive: a device another model holds is not offered at all.
    _pool(cluster, pool, label, cleanup, sharing="exclusive")
    url = f"{model_url}/{MODEL_FILE}"
    _model(cluster, namespace, "twin", pool, source={"url": url}, replicas=2)

    def both_planned() -> dict[str, Any] | None:
        obj = _planned(cluster, namespace, "twin")
        if obj and len(obj["status"].get("replicaPlans") or []) == 1:
            return obj
        return None

    obj = wait_for("two replicas planned", both_planned, timeout=90)
    first, second = obj["status"]["plan"], obj["status"]["replicaPlans"][0]
    assert (first.get("replica", 0), second["replica"]) == (0, 1)
    assert len(first["rpc"]) == len(second["rpc"]) == 2, (first, second)
    assert not set(first["rpc"]) & set(second["rpc"]), "replicas never share a worker"
    assert obj["status"]["replicas"] == 2
    (spare,) = set(nodes) - set(first["rpc"]) - set(second["rpc"])

    # Both replicas serve: each host starts once its own workers are up.
    def serving() -> dict[str, Any] | None:
        current = _model_obj(cluster, namespace, "twin")
        ok = current and current.get("status", {}).get("readyReplicas") == 2
        return current if ok else None

    wait_for("status.readyReplicas 2", serving, timeout=120)
    assert condition(_model_obj(cluster, namespace, "twin"), "Ready")["status"] == "True"  # type: ignore[index]
    for name, replica in (("twin-host", "0"), ("twin-host-r1", "1"), ("twin-rpc-r1", "1")):
        kind = "deployment" if "host" in name else "daemonset"
        child = get(cluster, kind, name, "-n", namespace)
        assert child["spec"]["selector"]["matchLabels"]["mesh.dev/replica"] == replica
    service = get(cluster, "service", "twin-host", "-n", namespace)
    assert "mesh.dev/replica" not in service["spec"]["selector"]
    printed = cluster.kubectl("get", "meshmodel", "twin", "-n", namespace)
    assert printed.split("\n")[0].split()[:4] == ["NAME", "READY", "REPLICAS", "AVAILABLE"]
    assert printed.split("\n")[1].split()[1:4] == ["True", "2", "2"], printed

    # Every replica's memory is claimed: the pool's ledger holds both, and a second
    # model is offered the spare node alone, where it does not fit.
    held = sum(d["totalMiB"] for p in (first, second) for d in p["devices"])

    def claimed() -> int | None:
        status = (get(cluster, "meshpool", pool) or {}).get("status") or {}
        return status.get("memoryClaimedMiB") if status.get("memoryClaimedMiB") == held else None

    wait_for(f"the pool's ledger holding {held} MiB", claimed, timeout=60)
    _model(cluster, namespace, "other", pool, source={"url": url})

    def refused() -> dict[str, Any] | None:
        cond = condition(_model_obj(cluster, namespace, "other"), "Planned")
        return cond if cond and cond["reason"] == "NoCapacity" else None

    wait_for("the second model finds no room", refused, timeout=60)
    cluster.kubectl("delete", "meshmodel", "other", "-n", namespace)
    untouched = {
        name: get(cluster, kind, name, "-n", namespace)["metadata"]
        for kind, name in (("deployment", "twin-host"), ("daemonset", "twin-rpc"))
    }

    # A node of replica 1 stops heartbeating: replica 1 moves to the spare node.
    lost = second["rpc"][0]
    stop_heartbeat(cluster, lost)

    def replanned() -> dict[str, Any] | None:
        current = _planned(cluster, namespace, "twin")
        others = (current or {}).get("status", {}).get("replicaPlans") or []
        if others and lost not in others[0]["rpc"]:
            return current
        return None

    moved = wait_for("replica 1 re-planned without the stale node", replanned, timeout=60)
    assert moved["status"]["plan"]["rpc"] == first["rpc"], "replica 0 stays"
    assert moved["status"]["plan"]["generation"] == first["generation"]
    assert set(moved["status"]["replicaPlans"][0]["rpc"]) == (set(second["rpc"]) - {lost}) | {spare}
    assert condition(moved, "Ready")["status"] == "True", "replica 0 serves on"  # type: ignore[index]
    assert condition(moved, "Degraded")["status"] == "True"  # type: ignore[index]
    for kind, name in (("deployment", "twin-host"), ("daemonset", "twin-rpc")):
        meta = get(cluster, kind, name, "-n", namespace)["metadata"]
        assert (meta["uid"], meta["generation"]) == (
            untouched[name]["uid"],
            untouched[name]["generation"],
        ), f"{kind}/{name} of the serving replica changed"
    wait_for("both replicas serving again", serving, timeout=120)


def test_a_host_made_before_replicas_is_made_again_with_the_replica_in_its_selector(
    operator: KopfRunner,
    crds: LocalCluster,
    namespace: str,
    model_url: str,
    cleanup: list[str],
) -> None:
    """A Deployment an operator before replicas made selects its pods without
    mesh.dev/replica, and a selector cannot change: it is deleted and made again."""
    cluster = crds
    label = namespace
    _gpu_nodes(cluster, label, [(4096, 900.0)], cleanup)
    pool = f"pool-{label}"
    # The pool does not exist yet: the model waits (PoolNotFound) with no children.
    _model(cluster, namespace, "old", pool, source={"url": f"{model_url}/{MODEL_FILE}"})

    def waiting() -> dict[str, Any] | None:
        obj = _model_obj(cluster, namespace, "old")
        cond = condition(obj, "Planned")
        return obj if cond and cond["reason"] == "PoolNotFound" else None

    model = wait_for("Planned=False PoolNotFound", waiting, timeout=60)
    selector = {
        "app.kubernetes.io/name": "mesh",
        "app.kubernetes.io/component": "host",
        "mesh.dev/model": "old",
    }
    labels = {**selector, "app.kubernetes.io/managed-by": "mesh-operator"}
    owner = {
        "apiVersion": "mesh.dev/v1alpha1",
        "kind": "MeshModel",
        "name": "old",
        "uid": model["metadata"]["uid"],
        "controller": True,
    }
    apply(
        cluster,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": "old-host",
                "namespace": namespace,
                "labels": labels,
                "annotations": {"mesh.dev/spec-hash": "0123456789abcdef"},
                "ownerReferences": [owner],
            },
            "spec": {
                "replicas": 0,
                "selector": {"matchLabels": selector},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "llama-server", "image": "old:1"}]},
                },
            },
        },
    )
    before = get(cluster, "deployment", "old-host", "-n", namespace)["metadata"]["uid"]
    _pool(cluster, pool, label, cleanup)

    def remade() -> dict[str, Any] | None:
        dep = get(cluster, "deployment", "old-host", "-n", namespace)
        if dep and dep["metadata"]["uid"] != before:
            return dict(dep)
        return None

    dep = wait_for("the host Deployment made again", remade, timeout=90)
    assert dep["spec"]["selector"]["matchLabels"]["mesh.dev/replica"] == "0"
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] != "old:1"
    wait_for("the plan", lambda: _planned(cluster, namespace, "old"), timeout=60)


def test_a_spec_change_rolls_the_replicas_one_at_a_time(
    operator: KopfRunner,
    crds: LocalCluster,
    namespace: str,
    model_url: str,
    cleanup: list[str],
) -> None:
    """Two serving replicas and a change of llama-server's flags: replica 1's host
    takes the new template only once replica 0's has rolled out, and some replica
    serves throughout."""
    cluster = crds
    label = namespace
    _gpu_nodes(cluster, label, [(1000, 900.0)] * 2, cleanup)
    pool = f"pool-{label}"
    _pool(cluster, pool, label, cleanup, sharing="exclusive")
    url = f"{model_url}/{MODEL_FILE}"
    _model(cluster, namespace, "roll", pool, source={"url": url}, replicas=2)

    def serving() -> dict[str, Any] | None:
        current = _model_obj(cluster, namespace, "roll")
        ok = current and current.get("status", {}).get("readyReplicas") == 2
        return current if ok else None

    wait_for("two replicas serving", serving, timeout=120)
    hosts = ("roll-host", "roll-host-r1")
    before = {
        h: get(cluster, "deployment", h, "-n", namespace)["metadata"]["generation"] for h in hosts
    }
    _model(
        cluster,
        namespace,
        "roll",
        pool,
        source={"url": url},
        replicas=2,
        extraArgs=["--temp", "0.5"],
    )

    changed: dict[str, float] = {}  # when each host's template changed
    rolled: dict[str, float] = {}  # when it had rolled out on the new template
    least_ready = 2
    deadline = time.monotonic() + 120
    while len(rolled) < 2 and time.monotonic() < deadline:
        now = time.monotonic()
        for h in hosts:
            obj = get(cluster, "deployment", h, "-n", namespace)
            meta, st = obj["metadata"], obj.get("status") or {}
            if meta["generation"] > before[h]:
                changed.setdefault(h, now)
                done = (
                    st.get("observedGeneration") == meta["generation"]
                    and st.get("updatedReplicas") == st.get("availableReplicas") == 1
                    and st.get("replicas") == 1
                )
                if done:
                    rolled.setdefault(h, now)
        ready = (_model_obj(cluster, namespace, "roll") or {}).get("status", {})
        least_ready = min(least_ready, int(ready.get("readyReplicas") or 0))
        time.sleep(0.2)
    assert set(rolled) == set(hosts), (changed, rolled)
    assert changed["roll-host-r1"] >= rolled["roll-host"], (changed, rolled)
    assert least_ready >= 1, "a replica served all along"
    out = cluster.kubectl(
        "get", "events", "-n", namespace, "--field-selector",
        "involvedObject.name=roll,reason=RollingUpdate", "-o", "json",
    )  # fmt: skip
    messages = sorted(e["message"] for e in json.loads(out)["items"])
    assert messages == [
        "replica 0: new workloads; replicas [1] follow one at a time",
        "replica 1: new workloads",
    ], messages
    assert not (_model_obj(cluster, namespace, "roll") or {})["status"].get("rollingReplicas")


def test_a_cpu_pool_whose_host_uses_its_own_node_runs_no_worker_there(
    operator: KopfRunner,
    crds: LocalCluster,
    namespace: str,
    model_url: str,
    model_file: Path,
    cleanup: list[str],
) -> None:
    """hostUsesOwnNode: of two CPU nodes neither of which holds gemma, the host's
    node's layers run in llama-server itself: one worker DaemonSet, on the other
    node; the host requests the memory of its layers; the pool's ledger claims it
    on the host node's CPU device."""
    cluster = crds
    label = namespace
    nodes = []
    for i in range(2):
        name = f"cpu-{label}-{i}"
        cleanup += [f"node/{name}", f"meshnode/{name}"]
        cluster.add_kwok_node(name, labels={"mesh-test-pool": label})
        put_meshnode(
            cluster, name,
            [{"id": "CPU", "index": 0, "backend": "cpu", "name": "Test CPU",
              "memoryTotalMiB": 261, "memoryFreeMiB": 261, "bandwidthGBps": 40.0}],
        )  # fmt: skip
        nodes.append(name)
    pool = f"pool-{label}"
    _pool(cluster, pool, label, cleanup, backend="cpu", sharing="shared", hostUsesOwnNode=True)
    _model(cluster, namespace, "own", pool, source={"url": f"{model_url}/{MODEL_FILE}"})

    obj = wait_for("the plan", lambda: _planned(cluster, namespace, "own"), timeout=90)
    plan = obj["status"]["plan"]
    tier = plan["hostTier"]
    assert tier["device"] == "CPU" and tier["node"] == plan["hostNode"], plan
    (other,) = set(nodes) - {plan["hostNode"]}
    assert plan["rpc"] == [other] and plan["devices"][0]["layers"][0] == tier["cpuLayers"]
    assert "on its own CPU" in condition(obj, "Planned")["message"]  # type: ignore[index]

    def workloads() -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
        found = get(cluster, "daemonsets", "-n", namespace, "-l", "mesh.dev/model=own")
        dep = get(cluster, "deployment", "own-host", "-n", namespace)
        return (found["items"], dep) if found and found["items"] and dep else None

    (ds,), dep = wait_for("the worker and the host", workloads, timeout=60)
    terms = ds["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    assert [v for t in terms for e in t["matchFields"] for v in e["values"]] == [other]
    server = dep["spec"]["template"]["spec"]["containers"][0]
    args = server["args"]
    layers = read_model_profile(model_file).n_device_layers
    assert args[args.index("-ngl") + 1] == str(layers - tier["cpuLayers"])
    assert server["resources"]["requests"]["memory"] == f"{tier['memoryMiB']}Mi"

    def claimed() -> dict[str, int] | None:
        status = (get(cluster, "meshpool", pool) or {}).get("status", {})
        rows = {r["node"]: r["memoryClaimedMiB"] for r in status.get("ledger", [])}
        return rows if rows.get(plan["hostNode"]) else None

    rows = wait_for("the pool's ledger", claimed, timeout=60)
    assert rows == {plan["hostNode"]: tier["memoryMiB"], other: plan["devices"][0]["totalMiB"]}
