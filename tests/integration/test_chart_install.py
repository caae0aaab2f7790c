"""`helm install` of the chart on the real local control plane, with the release
namespace enforcing Pod Security `restricted` and the agents in a privileged
namespace of their own: the pods are admitted, each service account can do exactly
what the RBAC matrix of docs/install.md says (`kubectl auth can-i`, including what
it must not do), each component does its job with a real token of its service
account, and `helm uninstall` leaves no workload behind (the CRDs stay).

The tests of this module run in order on one release.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from e2e import parts
from e2e.cluster import LocalCluster
from e2e.fileserver import serve_directory
from e2e.gateway import start_gateway
from e2e.waiting import free_port, wait_for
from tests.integration.chart_support import (
    CHART,
    MeshProcess,
    adopt_crds,
    helm,
    http_ok,
    kwok_tolerations,
    service_account_token,
    write_token_kubeconfig,
)
from tests.integration.kube_helpers import apply_pool_and_model, condition, get

pytestmark = pytest.mark.integration

MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"


@dataclass
class Release:
    cluster: LocalCluster
    name: str
    namespace: str
    agent_namespace: str
    node: str
    pool_label: str

    def sa(self, component: str) -> str:
        namespace = self.agent_namespace if component == "agent" else self.namespace
        return f"system:serviceaccount:{namespace}:{self.name}-{component}"


@pytest.fixture(scope="module")
def release(cluster: LocalCluster) -> Iterator[Release]:
    suffix = uuid.uuid4().hex[:6]
    name = f"mesh-{suffix}"
    rel = Release(cluster, name, name, f"{name}-agent", f"chart-{suffix}", suffix)
    cluster.kubectl("create", "namespace", rel.namespace)
    cluster.kubectl(
        "label", "namespace", rel.namespace,
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/warn=restricted",
    )  # fmt: skip
    cluster.add_kwok_node(rel.node, gpus=1, labels={"mesh-chart-pool": suffix})
    adopt_crds(cluster, rel.name, rel.namespace)
    args = [
        "install", rel.name, str(CHART), "--namespace", rel.namespace,
        "--set", f"agent.namespace={rel.agent_namespace}", "--set", "agent.createNamespace=true",
        "--set-json", f'agent.nodeSelector={json.dumps({"mesh-chart-pool": suffix})}',
        "--wait", "--timeout", "180s",
    ]  # fmt: skip
    for item in kwok_tolerations():
        args += ["--set-json", item]
    try:
        helm(*args, cluster=cluster)
        yield rel
    finally:
        helm("uninstall", rel.name, "-n", rel.namespace, cluster=cluster, check=False)
        cluster.kubectl(
            "delete", f"node/{rel.node}", f"meshnode/{rel.node}",
            "--ignore-not-found", "--wait=false", check=False,
        )  # fmt: skip
        for namespace in (rel.namespace, rel.agent_namespace):
            cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def pods(cluster: LocalCluster, namespace: str, component: str) -> list[dict[str, Any]]:
    found = get(cluster, "pods", "-n", namespace, "-l", f"app.kubernetes.io/component={component}")
    return list(found["items"]) if found else []


def test_operator_and_gateway_are_admitted_under_restricted(release: Release) -> None:
    cluster = release.cluster
    labels = get(cluster, "namespace", release.namespace)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    for component, count in (("operator", 1), ("gateway", 2)):
        running = [
            p for p in pods(cluster, release.namespace, component)
            if p["status"].get("phase") == "Running"
        ]  # fmt: skip
        assert len(running) == count, f"{component}: {len(running)} running pods"
    # Nothing was refused on the way (a refused pod leaves a FailedCreate event).
    events = get(cluster, "events", "-n", release.namespace)["items"]
    refused = [e["message"] for e in events if e.get("reason") == "FailedCreate"]
    assert not refused, refused
    (agent,) = pods(cluster, release.agent_namespace, "agent")
    assert agent["spec"]["nodeName"] == release.node
    assert agent["spec"]["hostPID"] is True
    agent_ns = get(cluster, "namespace", release.agent_namespace)["metadata"]["labels"]
    assert agent_ns["pod-security.kubernetes.io/enforce"] == "privileged"


def test_crds_are_installed_and_kept(release: Release) -> None:
    for plural in ("meshpools", "meshmodels", "meshnodes"):
        crd = get(release.cluster, "crd", f"{plural}.mesh.dev")
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert crd["metadata"]["annotations"]["meta.helm.sh/release-name"] == release.name


# (component, verb, resource, namespaced, allowed)
MATRIX: list[tuple[str, str, str, bool, bool]] = [
    # operator: what it needs
    ("operator", "list", "meshmodels.mesh.dev", False, True),
    ("operator", "watch", "meshmodels.mesh.dev", True, True),
    ("operator", "patch", "meshmodels.mesh.dev", True, True),
    ("operator", "patch", "meshmodels.mesh.dev/status", True, True),
    ("operator", "update", "meshmodels.mesh.dev/finalizers", True, True),
    ("operator", "list", "meshpools.mesh.dev", False, True),
    ("operator", "patch", "meshpools.mesh.dev/status", False, True),
    ("operator", "watch", "meshnodes.mesh.dev", False, True),
    ("operator", "list", "nodes", False, True),
    ("operator", "watch", "pods", False, True),
    ("operator", "create", "daemonsets.apps", True, True),
    ("operator", "patch", "deployments.apps", True, True),
    ("operator", "delete", "daemonsets.apps", True, True),
    ("operator", "create", "services", True, True),
    ("operator", "patch", "networkpolicies.networking.k8s.io", True, True),
    ("operator", "get", "secrets", True, True),
    ("operator", "create", "events", True, True),
    ("operator", "delete", "pods", True, True),
    ("operator", "create", "pods", True, True),
    ("operator", "patch", "pods", True, False),
    # operator: what it must not do
    ("operator", "list", "secrets", True, False),
    ("operator", "watch", "secrets", False, False),
    ("operator", "create", "secrets", True, False),
    ("operator", "delete", "secrets", True, False),
    ("operator", "watch", "customresourcedefinitions.apiextensions.k8s.io", False, False),
    ("operator", "create", "pods/exec", True, False),
    ("operator", "patch", "nodes", False, False),
    ("operator", "create", "meshmodels.mesh.dev", True, False),
    ("operator", "delete", "meshmodels.mesh.dev", True, False),
    ("operator", "delete", "meshpools.mesh.dev", False, False),
    ("operator", "patch", "meshnodes.mesh.dev", False, False),
    ("operator", "patch", "meshnodes.mesh.dev/status", False, False),
    ("operator", "delete", "services", True, False),
    ("operator", "delete", "networkpolicies.networking.k8s.io", True, False),
    ("operator", "get", "configmaps", True, False),
    ("operator", "create", "clusterrolebindings.rbac.authorization.k8s.io", False, False),
    ("operator", "escalate", "clusterroles.rbac.authorization.k8s.io", False, False),
    ("operator", "impersonate", "serviceaccounts", True, False),
    ("operator", "create", "namespaces", False, False),
    ("operator", "patch", "customresourcedefinitions.apiextensions.k8s.io", False, False),
    # gateway
    ("gateway", "list", "meshmodels.mesh.dev", False, True),
    ("gateway", "watch", "meshmodels.mesh.dev", True, True),
    ("gateway", "list", "endpointslices.discovery.k8s.io", False, True),
    ("gateway", "watch", "endpointslices.discovery.k8s.io", True, True),
    ("gateway", "get", "secrets", True, True),
    ("gateway", "list", "secrets", True, False),
    ("gateway", "watch", "secrets", False, False),
    ("gateway", "patch", "meshmodels.mesh.dev", True, False),
    ("gateway", "patch", "meshmodels.mesh.dev/status", True, False),
    ("gateway", "get", "pods", True, False),
    ("gateway", "list", "services", True, False),
    ("gateway", "list", "nodes", False, False),
    ("gateway", "create", "events", True, False),
    ("gateway", "list", "meshnodes.mesh.dev", False, False),
    # agent
    ("agent", "get", "meshnodes.mesh.dev", False, True),
    ("agent", "create", "meshnodes.mesh.dev", False, True),
    ("agent", "patch", "meshnodes.mesh.dev", False, True),
    ("agent", "patch", "meshnodes.mesh.dev/status", False, True),
    ("agent", "list", "meshnodes.mesh.dev", False, False),
    ("agent", "watch", "meshnodes.mesh.dev", False, False),
    ("agent", "delete", "meshnodes.mesh.dev", False, False),
    ("agent", "get", "meshmodels.mesh.dev", True, False),
    ("agent", "list", "meshpools.mesh.dev", False, False),
    ("agent", "get", "secrets", True, False),
    ("agent", "list", "pods", False, True),
    ("agent", "get", "pods", True, False),
    ("agent", "watch", "pods", False, False),
    ("agent", "delete", "pods", True, False),
    ("agent", "get", "nodes", False, False),
    ("agent", "create", "events", True, False),
]


def test_rbac_matrix(release: Release) -> None:
    wrong = []
    for component, verb, resource, namespaced, allowed in MATRIX:
        what, _, sub = resource.partition("/")
        args = ["auth", "can-i", verb, what, f"--as={release.sa(component)}"]
        if sub:
            args.append(f"--subresource={sub}")
        # A namespace the release does not own: cluster-wide rules are what count.
        args += ["-n", "default"] if namespaced else ["--all-namespaces"]
        answer = release.cluster.kubectl(*args, check=False).strip()
        if answer != ("yes" if allowed else "no"):
            wrong.append(f"{component} {verb} {resource}: {answer!r}, want {allowed}")
    assert not wrong, "\n".join(wrong)


def test_roles_name_every_verb_and_resource(release: Release) -> None:
    roles = get(
        release.cluster, "clusterroles", "-l", f"app.kubernetes.io/instance={release.name}"
    )["items"]
    assert {r["metadata"]["name"] for r in roles} == {
        f"{release.name}-operator",
        f"{release.name}-gateway",
        f"{release.name}-agent",
    }
    for role in roles:
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], role


def _denials(log: str) -> list[str]:
    return [line for line in log.splitlines() if "403" in line or "Forbidden" in line]


def test_components_work_with_their_service_accounts(
    release: Release, tmp_path: Path, model_file: Path
) -> None:
    cluster = release.cluster
    (agent_pod,) = pods(cluster, release.agent_namespace, "agent")
    agent_token = service_account_token(
        cluster, release.agent_namespace, f"{release.name}-agent", agent_pod["metadata"]["name"]
    )
    operator_token = service_account_token(cluster, release.namespace, f"{release.name}-operator")
    gateway_token = service_account_token(cluster, release.namespace, f"{release.name}-gateway")
    model_ns = f"{release.name}-models"
    cluster.kubectl("create", "namespace", model_ns)
    processes: list[MeshProcess] = []
    try:
        # The agent, on the node its pod is bound to, writes that node's MeshNode
        # (a GPU from the recorded NVML answers of an RTX 4090) and lists the RPC
        # server pods on its node (none yet: the node is this test's own).
        agent_env = {
            "KUBECONFIG": str(write_token_kubeconfig(cluster, agent_token, tmp_path / "agent.kc")),
            "NODE_NAME": release.node,
            "MESH_AGENT_LISTEN": f"127.0.0.1:{free_port()}",
            "MESH_AGENT_INTERVAL": "2",
            "MESH_AGENT_STATE_DIR": str(tmp_path / "agent-state"),
            "MESH_AGENT_NVML_MODULE": "tests.fixtures.nvml.double:from_env",
            "MESH_FAKE_NVML": "rtx-4090",
        }
        first = MeshProcess(["agent"], tmp_path / "agent-1.log", agent_env)
        processes.append(first)
        wait_for(
            "the agent's MeshNode",
            lambda: (
                (n := get(cluster, "meshnode", release.node)) and n.get("status", {}).get("devices")
            ),
            timeout=60,
        )
        wait_for(
            "a first RPC server discovery",
            lambda: "RPC server discovery working" in first.output(),
            timeout=30,
        )
        assert first.stop() == 0
        # From here on the model's RPC server pods appear on the node, at kwok's
        # made-up pod IPs, which no test may send packets to: no discovery.
        agent = MeshProcess(
            ["agent"], tmp_path / "agent-2.log", {**agent_env, "MESH_AGENT_DISCOVER_RPC": "false"}
        )
        processes.append(agent)
        # The same token may not write another node's MeshNode (admission policy).
        denied = subprocess.run(
            [str(parts.binary("kubectl")), "--kubeconfig", str(tmp_path / "agent.kc"),
             "create", "-f", "-"],
            input=json.dumps({
                "apiVersion": "mesh.dev/v1alpha1", "kind": "MeshNode",
                "metadata": {"name": f"{release.node}-other"}, "spec": {"nodeName": "x"},
            }),
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert denied.returncode != 0
        assert "only write the MeshNode of the node it runs on" in denied.stderr, denied.stderr
        assert get(cluster, "meshnode", f"{release.node}-other") is None

        # The operator plans a model on that node and creates its children.
        operator = MeshProcess(
            [
                "operator",
                f"--health-address=127.0.0.1:{free_port()}",
                f"--metrics-address=127.0.0.1:{free_port()}",
            ],
            tmp_path / "operator.log",
            {
                "KUBECONFIG": str(
                    write_token_kubeconfig(cluster, operator_token, tmp_path / "operator.kc")
                ),
                "MESH_MODEL_INTERVAL": "1",
                "MESH_POOL_INTERVAL": "1",
            },
        )
        processes.append(operator)
        pool = f"chart-{release.pool_label}"
        with serve_directory(model_file.parent) as base:
            apply_pool_and_model(
                cluster,
                pool=pool,
                node_selector={"mesh-chart-pool": release.pool_label},
                namespace=model_ns,
                model="gemma",
                url=f"{base}/{MODEL_FILE}",
                context_size=1024,
            )

            def planned() -> dict[str, Any] | None:
                assert operator.alive(), operator.output()[-3000:]
                model = get(cluster, "meshmodel", "gemma", "-n", model_ns)
                cond = condition(model, "Planned")
                return model if cond and cond["status"] == "True" else None

            model = wait_for("the model to be planned by the operator", planned, timeout=120)
            assert model["status"]["nodes"] == release.node

            def children() -> list[str] | None:
                out = cluster.kubectl(
                    "get", "daemonsets,deployments,services,networkpolicies", "-n", model_ns,
                    "-l", "mesh.dev/model=gemma", "-o", "name",
                )  # fmt: skip
                return out.split() if len(out.split()) == 4 else None

            made = wait_for("the model's four children", children, timeout=60)
            assert {m.split("/")[0] for m in made} == {
                "daemonset.apps", "deployment.apps", "service", "networkpolicy.networking.k8s.io",
            }  # fmt: skip
            events = get(cluster, "events", "-n", model_ns)["items"]
            assert any(e["reason"] == "Planned" for e in events), [e["reason"] for e in events]
            pool_status = wait_for(
                "the pool's ledger",
                lambda: (get(cluster, "meshpool", pool) or {}).get("status", {}).get("ledger"),
                timeout=30,
            )
            assert pool_status[0]["node"] == release.node

        # The gateway lists models and EndpointSlices: ready once it saw both. In
        # the release namespace, where no model runs: a host endpoint elsewhere (a
        # kwok pod IP) would be probed, and no test may send packets there.
        gateway = start_gateway(
            tmp_path,
            [
                "--kubeconfig",
                str(write_token_kubeconfig(cluster, gateway_token, tmp_path / "gw.kc")),
                "--namespace",
                release.namespace,
            ],
        )
        try:
            assert http_ok(f"{gateway.url}/readyz")
            with_gateway = gateway.log_text()
        finally:
            gateway.stop()
        assert not _denials(with_gateway), with_gateway
        for process in processes[1:]:
            assert process.alive(), process.output()[-3000:]
        for process in processes:
            refused = _denials(process.output())
            assert not refused, "\n".join(refused)
    finally:
        for process in reversed(processes):
            process.stop()
        cluster.kubectl("delete", "namespace", model_ns, "--wait=false", check=False)
        cluster.kubectl(
            "delete", f"meshpool/chart-{release.pool_label}", "--ignore-not-found",
            "--wait=false", check=False,
        )  # fmt: skip
    for process in processes:
        assert "Traceback" not in process.output(), process.output()[-5000:]


def test_uninstall_leaves_no_workload_behind(release: Release) -> None:
    cluster = release.cluster
    helm("uninstall", release.name, "-n", release.namespace, "--wait", cluster=cluster)

    def leftovers() -> list[str]:
        out = cluster.kubectl(
            "get",
            "deployments,replicasets,daemonsets,pods,services,networkpolicies,"
            "poddisruptionbudgets,configmaps,serviceaccounts,roles,rolebindings",
            "-n", release.namespace, "-o", "name",
        )  # fmt: skip
        return [
            n for n in out.split()
            if n not in ("configmap/kube-root-ca.crt", "serviceaccount/default")
        ]  # fmt: skip

    deadline = time.monotonic() + 60
    while leftovers() and time.monotonic() < deadline:
        time.sleep(1)
    assert not leftovers(), leftovers()
    agent_ns = get(cluster, "namespace", release.agent_namespace)
    assert agent_ns is None or agent_ns["status"]["phase"] == "Terminating"
    cluster_scoped = cluster.kubectl(
        "get", "clusterroles,clusterrolebindings,validatingadmissionpolicies,"
        "validatingadmissionpolicybindings",
        "-l", f"app.kubernetes.io/instance={release.name}", "-o", "name",
    )  # fmt: skip
    assert not cluster_scoped.split(), cluster_scoped
    for plural in ("meshpools", "meshmodels", "meshnodes"):
        assert get(cluster, "crd", f"{plural}.mesh.dev"), f"{plural} CRD was not kept"
