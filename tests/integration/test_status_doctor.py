"""`mesh status` and `mesh doctor` as real processes against the real API server, with
the operator running as a real process (`mesh operator`, leader election on a
Lease) and kwok GPU nodes: each doctor check is shown a broken thing and must say
what is wrong and what to do; the status JSON must follow its documented schema;
`kubectl mesh` must run the same CLI through the real kubectl.

What only real nodes can show (a NetworkPolicy the network does not enforce) is
in e2e/test_doctor_policy.py; here the probe pod cannot run (kwok), and doctor
must say so.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e import parts
from e2e.chaos import OperatorProcess, lease_holder
from e2e.cluster import LocalCluster
from e2e.fileserver import serve_directory
from e2e.waiting import wait_for
from mesh_operator.api.contract import VERSION_ANNOTATION
from mesh_operator.fleet import StatusReport
from mesh_operator.kubeclient import api_client
from tests.conftest import REPO_ROOT, require_part
from tests.integration.kube_helpers import (
    KWOK_TOLERATION,
    apply,
    condition,
    get,
    gpu_device,
    now_rfc3339,
    put_meshnode,
)

pytestmark = pytest.mark.integration

MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
HANDSHAKE_LOG = REPO_ROOT / "tests" / "fixtures" / "handshake" / "rpc-version-mismatch.log"
# The endpoint the recorded host log names (replaced by the worker's real one).
RECORDED_ENDPOINT = "172.20.1.6:50052"


@pytest.fixture(scope="module")
def model_url(model_file: Path) -> Iterator[str]:
    with serve_directory(model_file.parent) as base:
        yield f"{base}/{MODEL_FILE}"


@pytest.fixture(scope="module")
def operator(crds: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mesh operator` as a process holding a Lease; yields the Lease's namespace."""
    ns = f"op-{uuid.uuid4().hex[:6]}"
    crds.kubectl("create", "namespace", ns)
    logs = tmp_path_factory.mktemp("operator")
    proc = OperatorProcess(crds.kubeconfig, logs, namespace=ns, identity="doc-op", lease="mesh")
    proc.start()
    api = api_client(crds.kubeconfig)
    try:
        wait_for("the operator's Lease", lambda: lease_holder(api, ns, "mesh") == "doc-op", 60)
        yield ns
    finally:
        proc.stop()
        crds.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    text = "".join(p.read_text() for p in logs.iterdir())
    assert "Traceback" not in text, text[-5000:]


@pytest.fixture
def cleanup(crds: LocalCluster) -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    if made:
        crds.kubectl("delete", *made, "--wait=false", "--ignore-not-found", check=False)


def mesh(cluster: LocalCluster, *args: str) -> tuple[int, str, str]:
    """Run the CLI as a process; (exit status, stdout, stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "mesh_operator.cli.main", *args],
        capture_output=True, text=True, timeout=180, cwd=REPO_ROOT, check=False,
        env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
    )  # fmt: skip
    return done.returncode, done.stdout, done.stderr


def doctor(cluster: LocalCluster, *args: str) -> tuple[int, list[dict[str, str]]]:
    code, out, err = mesh(cluster, "doctor", "-o", "json", *args)
    assert code in (0, 1), err
    return code, json.loads(out)


def about(
    findings: list[dict[str, str]], subject: str, check: str | None = None
) -> list[dict[str, str]]:
    return [f for f in findings if f["subject"] == subject and check in (None, f["check"])]


def gpu_pool(
    cluster: LocalCluster, cleanup: list[str], label: str, sizes: list[int], **spec: Any
) -> tuple[str, list[str]]:
    """kwok GPU nodes with fresh MeshNodes, and a cuda pool on them."""
    nodes = []
    for i, mib in enumerate(sizes):
        name = f"gpu-{label}-{i}"
        cleanup += [f"node/{name}", f"meshnode/{name}"]
        cluster.add_kwok_node(name, gpus=1, labels={"mesh-doctor-pool": label})
        put_meshnode(cluster, name, [gpu_device(0, mib, mib - 10, 900.0, f"Test GPU {i}")])
        nodes.append(name)
    pool = f"pool-{label}"
    cleanup.append(f"meshpool/{pool}")
    apply(cluster, {
        "apiVersion": "mesh.dev/v1alpha1", "kind": "MeshPool", "metadata": {"name": pool},
        "spec": {"backend": "cuda", "nodeSelector": {"mesh-doctor-pool": label},
                 "tolerations": [KWOK_TOLERATION], **spec},
    })  # fmt: skip
    return pool, nodes


def model(cluster: LocalCluster, ns: str, name: str, pool: str, url: str) -> None:
    apply(cluster, {
        "apiVersion": "mesh.dev/v1alpha1", "kind": "MeshModel",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"poolRef": pool, "contextSize": 1024, "source": {"url": url}},
    })  # fmt: skip


def ready_reason(cluster: LocalCluster, ns: str, name: str) -> str | None:
    cond = condition(get(cluster, "meshmodel", name, "-n", ns), "Ready")
    return f"{cond['status']}/{cond['reason']}" if cond else None


def wait_ready(cluster: LocalCluster, ns: str, name: str, want: str, timeout: float) -> None:
    """Wait until the model's Ready condition is `status/reason`."""
    wait_for(f"{ns}/{name} {want}", lambda: ready_reason(cluster, ns, name) == want, timeout)


# -- mesh status ---------------------------------------------------------------------


def test_status_shows_the_plan_and_its_json_follows_the_schema(
    operator: str, crds: LocalCluster, namespace: str, model_url: str, cleanup: list[str]
) -> None:
    pool, nodes = gpu_pool(crds, cleanup, namespace, [300, 300, 300])
    model(crds, namespace, "gemma", pool, model_url)
    wait_ready(crds, namespace, "gemma", "True/Serving", 120)
    obj = get(crds, "meshmodel", "gemma", "-n", namespace)

    code, out, err = mesh(crds, "status", "-o", "json")
    assert code == 0, err
    report = StatusReport.model_validate_json(out)  # unknown or missing fields fail
    (m,) = [x for x in report.models if (x.namespace, x.name) == (namespace, "gemma")]
    plan = obj["status"]["plan"]
    assert m.plan is not None
    assert m.plan.nodes == plan["rpc"] and len(m.plan.nodes) >= 2
    assert m.plan.tensor_split == plan["tensorSplit"]
    assert m.plan.host_node == plan["hostNode"]
    assert m.plan.predicted_ms_per_token == round(plan["predictedTokenMicros"] / 1000, 2)
    assert (m.ready, m.replicas.desired, m.replicas.ready) == ("True", 1, 1)
    assert m.memory_claimed_mib == sum(d["totalMiB"] for d in plan["devices"])
    (p,) = [x for x in report.pools if x.name == pool]
    assert p.nodes == nodes and p.ready == "True"
    for n in (x for x in report.nodes if x.name in nodes):
        assert n.agent == "reporting" and n.pools == [pool]
        assert [(d.id, d.memory_free_mib) for d in n.devices] == [("CUDA0", 290)]

    code, table, err = mesh(crds, "status", "-n", namespace)
    assert code == 0, err
    row = next(line for line in table.splitlines() if line.startswith(f"{namespace}/gemma "))
    assert ",".join(plan["rpc"]) in row and ",".join(map(str, plan["tensorSplit"])) in row
    assert "1/1" in row


def test_kubectl_mesh_runs_the_same_cli_as_a_kubectl_plugin(
    crds: LocalCluster, tmp_path: Path
) -> None:
    # The script pip writes for the `kubectl-mesh` entry point of pyproject.toml.
    plugin = tmp_path / "kubectl-mesh"
    plugin.write_text(
        f"#!{sys.executable}\nimport sys\nfrom mesh_operator.cli.main import main\n"
        "sys.exit(main())\n"
    )
    plugin.chmod(0o755)
    kubectl = require_part(lambda: parts.binary("kubectl"))
    env = {**os.environ, "KUBECONFIG": str(crds.kubeconfig),
           "PATH": f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    listed = subprocess.run(
        [kubectl, "plugin", "list"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=60,
    )
    assert str(plugin) in listed.stdout, listed.stdout + listed.stderr
    done = subprocess.run(
        [kubectl, "mesh", "status", "-o", "json"], capture_output=True, text=True,
        check=False, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert StatusReport.model_validate_json(done.stdout).schema_version == 1
    usage = subprocess.run(
        [kubectl, "mesh", "status", "--output", "yaml"], capture_output=True, text=True,
        check=False, env=env, timeout=60,
    )  # fmt: skip
    assert usage.returncode == 2 and usage.stderr.startswith("kubectl mesh status: error:")


@pytest.mark.parametrize("command", ["status", "doctor"])
def test_an_unreachable_cluster_exits_2(crds: LocalCluster, tmp_path: Path, command: str) -> None:
    # A kubeconfig whose server refuses connections: the cluster's, on a closed port.
    config = crds.kubeconfig.read_text()
    server = next(line.split()[-1] for line in config.splitlines() if "server:" in line)
    refused = tmp_path / "refused"
    refused.write_text(config.replace(server, "https://127.0.0.1:9"))
    code, out, err = mesh(crds, command, "--kubeconfig", str(refused))
    assert (code, out) == (2, "")
    assert err.startswith(f"mesh {command}: error: cannot reach the API server:"), err
    assert err.count("\n") == 1
    code, _, err = mesh(crds, command, "--kubeconfig", str(tmp_path / "missing"))
    assert code == 2 and "does not exist" in err, err


# -- mesh doctor ---------------------------------------------------------------------


def test_doctor_finds_missing_and_stale_agents_and_nodes_without_devices(
    operator: str, crds: LocalCluster, namespace: str, cleanup: list[str]
) -> None:
    label = namespace
    pool, (fresh,) = gpu_pool(crds, cleanup, label, [4096])
    code, findings = doctor(crds, "--pool", pool, "--no-probe")
    assert code == 0, findings
    assert about(findings, f"node {fresh} (pool {pool})")[0]["level"] == "ok"

    def node(suffix: str) -> str:
        name = f"gpu-{label}-{suffix}"
        cleanup.extend([f"node/{name}", f"meshnode/{name}"])
        crds.add_kwok_node(name, gpus=1, labels={"mesh-doctor-pool": label})
        return name

    missing, stale, cpu_only, empty = node("missing"), node("stale"), node("cpu"), node("empty")
    put_meshnode(crds, stale, [gpu_device(0, 4096, 4000, 900.0, "Old GPU")],
                 heartbeat=now_rfc3339(-600), interval_seconds=10)  # fmt: skip
    cpu = {"id": "CPU", "index": 0, "backend": "cpu", "memoryTotalMiB": 8192,
           "memoryFreeMiB": 8000}  # fmt: skip
    put_meshnode(crds, cpu_only, [cpu])
    put_meshnode(crds, empty, [])

    code, findings = doctor(crds, "--pool", pool, "--no-probe")
    assert code == 1

    def one(name: str) -> dict[str, str]:
        (found,) = about(findings, f"node {name} (pool {pool})")
        return found

    assert one(missing)["level"] == "fail"
    assert f"no agent has reported (no MeshNode {missing})" in one(missing)["problem"]
    assert f"spec.nodeName={missing}" in one(missing)["fix"]
    assert one(stale)["level"] == "fail"
    assert "heartbeat is stale (last 6" in one(stale)["problem"]  # about 600 s ago
    assert "every 10 s expected" in one(stale)["problem"]
    assert (one(cpu_only)["level"], one(cpu_only)["check"]) == ("warn", "devices")
    assert "no cuda device" in one(cpu_only)["problem"] and "CPU (cpu)" in one(cpu_only)["problem"]
    assert (one(empty)["level"], one(empty)["check"]) == ("fail", "devices")
    assert "reports no device at all" in one(empty)["problem"]

    # The text form says the same, each problem followed by what to do.
    code, text, _ = mesh(crds, "doctor", "--pool", pool, "--no-probe")
    assert code == 1
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if f"node {missing} " in line)
    assert lines[at].startswith("FAIL") and lines[at + 1].strip().startswith("-> check")
    assert lines[-1] == "3 problems, 1 warning"


def test_doctor_explains_no_capacity_with_the_shortfall_and_who_holds_the_memory(
    operator: str, crds: LocalCluster, namespace: str, model_url: str, cleanup: list[str]
) -> None:
    pool, (gpu,) = gpu_pool(crds, cleanup, namespace, [500])
    model(crds, namespace, "first", pool, model_url)
    wait_ready(crds, namespace, "first", "True/Serving", 120)
    model(crds, namespace, "second", pool, model_url)
    wait_ready(crds, namespace, "second", "False/NoCapacity", 120)
    claimed = get(crds, "meshmodel", "first", "-n", namespace)["status"]["plan"]["devices"][0]

    code, findings = doctor(crds, "--pool", pool, "--no-probe")
    assert code == 1
    (found,) = about(findings, f"model {namespace}/second", "models")
    assert found["level"] == "fail"
    # The planner's numbers (what gemma-3-270m needs) are its own; the sentence is doctor's.
    assert re.search(
        rf"no capacity in pool {pool}: VRAM: needs \d+\.\d GiB.*; RAM: .*; short by \d+\.\d GiB;",
        found["problem"],
    ), found["problem"]
    assert (
        f"held by {namespace}/first {claimed['totalMiB']} MiB ({gpu}/CUDA0 {claimed['totalMiB']})"
        in found["problem"]
    )
    assert "contextSize" in found["fix"] and f"add nodes to pool {pool}" in found["fix"]
    assert about(findings, f"model {namespace}/first", "models")[0]["level"] == "ok"


def test_doctor_names_a_source_that_cannot_be_read(
    operator: str, crds: LocalCluster, namespace: str, model_url: str, cleanup: list[str]
) -> None:
    pool, _ = gpu_pool(crds, cleanup, namespace, [4096])
    missing = model_url.rsplit("/", 1)[0] + "/no-such-model.gguf"
    model(crds, namespace, "lost", pool, missing)
    wait_ready(crds, namespace, "lost", "False/SourceNotFound", 60)
    code, findings = doctor(crds, "--pool", pool, "--no-probe")
    assert code == 1
    (found,) = about(findings, f"model {namespace}/lost", "models")
    assert found["problem"].startswith("its source cannot be read (SourceNotFound):")
    assert "no-such-model.gguf answered 404" in found["problem"]
    assert found["fix"].startswith("check spec.source")


def test_doctor_reports_host_and_workers_of_different_llama_cpp_builds(
    operator: str, crds: LocalCluster, namespace: str, model_url: str, cleanup: list[str]
) -> None:
    old = "ghcr.io/mesh-dev/llama.cpp:0.3.22-cpu"
    pool, _ = gpu_pool(crds, cleanup, namespace, [4096], images={"rpcServer": old})
    model(crds, namespace, "split", pool, model_url)
    wait_ready(crds, namespace, "split", "True/Serving", 120)
    # The host's llama-server refuses its worker: its container ends with the log a
    # real host wrote (recorded), naming this worker's address.
    (worker,) = json.loads(crds.kubectl(
        "get", "pods", "-n", namespace, "-l", "mesh.dev/model=split,"
        "app.kubernetes.io/component=rpc-server", "-o", "json"))["items"]  # fmt: skip
    (host,) = json.loads(crds.kubectl(
        "get", "pods", "-n", namespace, "-l", "mesh.dev/model=split,"
        "app.kubernetes.io/component=host", "-o", "json"))["items"]  # fmt: skip
    log = HANDSHAKE_LOG.read_text().replace(RECORDED_ENDPOINT, f"{worker['status']['podIP']}:50052")
    container = host["spec"]["containers"][0]["name"]
    crds.kubectl(
        "patch", "pod", host["metadata"]["name"], "-n", namespace, "--subresource=status",
        "--type=strategic", "-p", json.dumps({"status": {"containerStatuses": [{
            "name": container, "restartCount": 1,
            "lastState": {"terminated": {"exitCode": 134, "reason": "Error", "message": log}},
        }]}}),
    )  # fmt: skip
    wait_ready(crds, namespace, "split", "False/RpcVersionMismatch", 60)

    code, findings = doctor(crds, "--pool", pool, "--no-probe")
    assert code == 1
    (found,) = about(findings, f"model {namespace}/split", "models")
    assert found["level"] == "fail"
    assert f"worker image(s) {old} on {worker['spec']['nodeName']}" in found["problem"]
    assert "different llama.cpp builds (the worker speaks RPC protocol 4.0.0)" in found["problem"]
    assert f"MeshPool {pool} spec.images.rpcServer" in found["fix"]


def test_doctor_finds_crds_of_another_version_than_the_running_operator(
    operator: str, crds: LocalCluster
) -> None:
    name = "meshmodels.mesh.dev"
    code, findings = doctor(crds, "--pool", "none-such", "--no-probe")
    (lease,) = [f for f in findings if f["check"] == "operator"]
    assert lease["level"] == "ok" and lease["subject"] == f"Lease {operator}/mesh"
    have = json.loads(crds.kubectl("get", "crd", name, "-o", "json"))["metadata"]["annotations"]
    version = have[VERSION_ANNOTATION]
    assert version in lease["problem"]
    crds.kubectl("annotate", "crd", name, f"{VERSION_ANNOTATION}=0.0.9", "--overwrite")
    try:
        code, findings = doctor(crds, "--pool", "none-such", "--no-probe")
    finally:
        crds.kubectl("annotate", "crd", name, f"{VERSION_ANNOTATION}={version}", "--overwrite")
    assert code == 1
    (found,) = about(findings, f"CRD {name}")
    assert found["level"] == "fail"
    assert (
        found["problem"] == f"installed from mesh 0.0.9, but the running operator is mesh {version}"
    )
    assert f"install the CRDs of mesh {version}" in found["fix"]
    (pool,) = about(findings, "pool none-such")
    assert pool["problem"] == "no such MeshPool"


def test_doctor_checks_the_network_policy_and_says_what_its_probe_tried(
    operator: str, crds: LocalCluster, namespace: str, model_url: str, cleanup: list[str]
) -> None:
    pool, _ = gpu_pool(crds, cleanup, namespace, [4096])
    model(crds, namespace, "guarded", pool, model_url)
    wait_ready(crds, namespace, "guarded", "True/Serving", 120)
    code, findings = doctor(crds, "--pool", pool, "--probe-timeout", "3")
    policy, probe = about(findings, f"model {namespace}/guarded", "network-policy")
    assert policy["level"] == "ok" and "admits RPC port 50052 only from" in policy["problem"]
    # kwok runs no container: the probe pod never finishes, and doctor says so.
    assert probe["level"] == "warn" and probe["problem"].startswith("probe not finished: pod")
    assert "tried TCP to RPC port 50052 of" in probe["problem"] and "not tested" in probe["problem"]
    assert code == 0, findings
    probes = crds.kubectl(
        "get", "pods", "-n", namespace, "-l", "app.kubernetes.io/component=doctor-probe",
        "-o", "name",
    )  # fmt: skip
    assert probes.strip() == "", "the probe pod is deleted"

    # A rule admitting everyone to the RPC port, as someone might add by hand.
    crds.kubectl(
        "patch", "networkpolicy", "guarded-mesh", "-n", namespace, "--type=json", "-p",
        json.dumps([{"op": "add", "path": "/spec/ingress/-",
                     "value": {"ports": [{"protocol": "TCP", "port": 50052}]}}]),
    )  # fmt: skip
    code, findings = doctor(crds, "--pool", pool, "--no-probe")
    assert code == 1
    (policy,) = about(findings, f"model {namespace}/guarded", "network-policy")
    assert policy["level"] == "fail"
    assert "a rule for RPC port 50052 admits every source (no `from`)" in policy["problem"]


def test_status_without_mesh_resources_says_so(crds: LocalCluster, tmp_path: Path) -> None:
    # The real API server answers 404 for every path under a prefix it does not serve,
    # as it does for the kinds of CRDs that are not installed.
    config = crds.kubeconfig.read_text()
    server = next(line.split()[-1] for line in config.splitlines() if "server:" in line)
    prefixed = tmp_path / "prefixed"
    prefixed.write_text(config.replace(server, f"{server}/no-such-prefix"))
    code, out, err = mesh(crds, "status", "--kubeconfig", str(prefixed))
    assert (code, out) == (1, "")
    assert err == (
        "mesh status: error: the cluster has no mesh resources (404): are the CRDs "
        "installed? (mesh doctor checks)\n"
    )
