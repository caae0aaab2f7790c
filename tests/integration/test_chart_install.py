"""`helm install` of the chart as docs/install.md says, on real nodes (the
installation `e2e.realcluster` brings up once per session and the end-to-end tests
share): the release namespace enforces Pod Security `restricted` and the agents
run in a privileged namespace of their own. The operator, gateway and agents are
pods of the project's images on real kubelets, with the tokens of their service
accounts that the kubelet mounts. They are admitted; each service account can do
exactly what the RBAC matrix of docs/install.md says (`kubectl auth can-i`,
including what it must not do); each component does its job (the agents write
their nodes' MeshNodes and not another's, the operator plans the models and
creates their children, the gateway lists them) with nothing refused; and `helm
uninstall`, after every other test of the installation, leaves no workload of the
release behind (the CRDs, and with them the MeshModels, stay).
"""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import pytest

from e2e.realcluster import (
    AGENT_NAMESPACE,
    ENFORCE_LABEL,
    MODELS,
    POOL,
    POOL_NODES,
    RELEASE,
    RealCluster,
)
from e2e.scenario import NAMESPACE

pytestmark = pytest.mark.e2e

Obj = dict[str, Any]
COMPONENTS = ("operator", "gateway", "agent")
# The chart's `helm test` pod.
TEST_POD = f"pod/{RELEASE}-test-gateway"
# Where the kubelet mounts a pod's service account token.
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def service_account(component: str) -> str:
    namespace = AGENT_NAMESPACE if component == "agent" else NAMESPACE
    return f"system:serviceaccount:{namespace}:{RELEASE}-{component}"


def _values(mesh: RealCluster) -> Obj:
    result = mesh.helm("get", "values", RELEASE, "-n", NAMESPACE, "--all", "-o", "json")
    assert result.returncode == 0, result.stderr
    values: Obj = json.loads(result.stdout)
    return values


def test_operator_gateway_and_agents_are_admitted(real_mesh: RealCluster) -> None:
    mesh = real_mesh
    labels = mesh.get("namespace", NAMESPACE)["metadata"]["labels"]
    assert labels[ENFORCE_LABEL] == "restricted"
    replicas = {"operator": 1, "gateway": _values(mesh)["gateway"]["replicas"]}
    for component, count in replicas.items():
        running = mesh.release_pods(component)
        assert len(running) == count, f"{component}: {len(running)} running pods"
    # Nothing was refused on the way (a refused pod leaves a FailedCreate event).
    for namespace in (NAMESPACE, AGENT_NAMESPACE):
        events = mesh.get("events", "-n", namespace)["items"]
        refused = [e["message"] for e in events if e.get("reason") == "FailedCreate"]
        assert not refused, refused
    agents = mesh.release_pods("agent")
    assert sorted(a["spec"]["nodeName"] for a in agents) == sorted(POOL_NODES)
    assert all(a["spec"]["hostPID"] is True for a in agents)
    agent_ns = mesh.get("namespace", AGENT_NAMESPACE)["metadata"]["labels"]
    assert agent_ns[ENFORCE_LABEL] == "privileged"


def test_crds_are_installed_and_kept(real_mesh: RealCluster) -> None:
    for plural in ("meshpools", "meshmodels", "meshnodes"):
        crd = real_mesh.get("crd", f"{plural}.mesh.dev")
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert crd["metadata"]["annotations"]["meta.helm.sh/release-name"] == RELEASE


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
    ("agent", "list", "meshnodes.mesh.dev", False, True),
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


def test_rbac_matrix(real_mesh: RealCluster) -> None:
    wrong = []
    for component, verb, resource, namespaced, allowed in MATRIX:
        what, _, sub = resource.partition("/")
        args = ["auth", "can-i", verb, what, f"--as={service_account(component)}"]
        if sub:
            args.append(f"--subresource={sub}")
        # A namespace the release does not own: cluster-wide rules are what count.
        args += ["-n", "default"] if namespaced else ["--all-namespaces"]
        answer = real_mesh.kubectl(*args, check=False).strip()
        if answer != ("yes" if allowed else "no"):
            wrong.append(f"{component} {verb} {resource}: {answer!r}, want {allowed}")
    assert not wrong, "\n".join(wrong)


def test_the_operator_may_hold_only_its_own_lease(real_mesh: RealCluster) -> None:
    """Leader election: create a Lease in the release's namespace, read and renew
    the one named after the release, nothing else about Leases anywhere."""
    lease = f"{RELEASE}-operator"
    cases = [
        ("create", "leases.coordination.k8s.io", NAMESPACE, True),
        ("get", f"leases.coordination.k8s.io/{lease}", NAMESPACE, True),
        ("update", f"leases.coordination.k8s.io/{lease}", NAMESPACE, True),
        ("update", "leases.coordination.k8s.io/kube-scheduler", NAMESPACE, False),
        ("delete", f"leases.coordination.k8s.io/{lease}", NAMESPACE, False),
        ("list", "leases.coordination.k8s.io", NAMESPACE, False),
        ("create", "leases.coordination.k8s.io", "default", False),
        ("update", "leases.coordination.k8s.io/kube-controller-manager", "kube-system", False),
    ]
    wrong = []
    for verb, resource, namespace, allowed in cases:
        answer = real_mesh.kubectl(
            "auth", "can-i", verb, resource, "-n", namespace,
            f"--as={service_account('operator')}", check=False,
        ).strip()  # fmt: skip
        if answer != ("yes" if allowed else "no"):
            wrong.append(f"{verb} {resource} in {namespace}: {answer!r}, want {allowed}")
    assert not wrong, "\n".join(wrong)


def test_roles_name_every_verb_and_resource(real_mesh: RealCluster) -> None:
    roles = real_mesh.get("clusterroles", "-l", f"app.kubernetes.io/instance={RELEASE}")["items"]
    assert {r["metadata"]["name"] for r in roles} == {f"{RELEASE}-{c}" for c in COMPONENTS}
    for role in roles:
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], role


def _denials(log: str) -> list[str]:
    return [line for line in log.splitlines() if "403" in line or "Forbidden" in line]


# Run in the agent's container: a request to the API server with the token the
# kubelet mounted; prints the HTTP status and the answer's message.
AS_THE_POD = f"""
import json, os, ssl, sys, urllib.error, urllib.request
env = os.environ
server = "https://%s:%s" % (env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"])
token = open("{TOKEN_DIR}/token").read().strip()
context = ssl.create_default_context(cafile="{TOKEN_DIR}/ca.crt")
request = urllib.request.Request(
    server + sys.argv[1], data=sys.argv[2].encode(), method="POST",
    headers={{"Authorization": "Bearer " + token, "Content-Type": "application/json"}},
)
try:
    with urllib.request.urlopen(request, context=context, timeout=30) as answer:
        print(answer.status, json.load(answer).get("metadata", {{}}).get("name"))
except urllib.error.HTTPError as exc:
    print(exc.code, json.load(exc).get("message"))
"""


def test_components_work_with_their_service_accounts(real_mesh: RealCluster) -> None:
    mesh = real_mesh
    for component in COMPONENTS:
        for pod in mesh.release_pods(component):
            assert pod["spec"]["serviceAccountName"] == f"{RELEASE}-{component}", pod["spec"]
    # Each agent wrote its node's MeshNode, with the node's CPU as device.
    for agent in mesh.release_pods("agent"):
        node = agent["spec"]["nodeName"]
        meshnode = mesh.get("meshnode", node)
        assert meshnode and meshnode["status"].get("devices"), (node, meshnode)
    # The same token may not write another node's MeshNode (admission policy).
    agent = mesh.release_pods("agent")[0]
    other_name = f"{agent['spec']['nodeName']}-other"
    other = {
        "apiVersion": "mesh.dev/v1alpha1",
        "kind": "MeshNode",
        "metadata": {"name": other_name},
        "spec": {"nodeName": "x"},
    }
    answer = mesh.exec(
        agent, "agent", "python3", "-c", AS_THE_POD,
        "/apis/mesh.dev/v1alpha1/meshnodes", json.dumps(other),
    )  # fmt: skip
    # A ValidatingAdmissionPolicy's denial: 422, "forbidden", the policy's message.
    assert answer.startswith("422 "), answer
    assert "is forbidden" in answer, answer
    assert "only write the MeshNode of the node it runs on" in answer, answer
    assert mesh.get("meshnode", other_name) is None
    # The operator planned each model onto the pool's nodes, created its four
    # children and said so.
    for model in MODELS:
        obj = mesh.get("meshmodel", model.name, "-n", model.namespace)
        assert set(obj["status"]["nodes"].split(",")) <= set(POOL_NODES), obj["status"]
        made = mesh.kubectl(
            "get", "daemonsets,deployments,services,networkpolicies", "-n", model.namespace,
            "-l", f"mesh.dev/model={model.name}", "-o", "name",
        ).split()  # fmt: skip
        assert sorted(m.split("/")[0] for m in made) == sorted(
            ["daemonset.apps", "deployment.apps", "service", "networkpolicy.networking.k8s.io"]
        ), made
        events = mesh.get("events", "-n", model.namespace)["items"]
        assert any(e["reason"] == "Planned" for e in events), [e["reason"] for e in events]
    ledger = mesh.get("meshpool", POOL)["status"]["ledger"]
    assert {entry["node"] for entry in ledger} <= set(POOL_NODES), ledger
    # The gateway lists the models it found (MeshModels, EndpointSlices).
    (gateway, *_) = mesh.release_pods("gateway")
    assert all(c["status"] == "True" for c in gateway["status"]["conditions"]), gateway["status"]
    url = f"http://{gateway['status']['podIP']}:{_values(mesh)['gateway']['port']}/v1/models"
    with urllib.request.urlopen(url, timeout=30) as answer:
        listed = json.load(answer)
    assert {m["id"] for m in listed["data"]} >= {m.name for m in MODELS}, listed
    # Nothing was refused to any of them, and none failed.
    for component in COMPONENTS:
        for pod in mesh.release_pods(component):
            log = mesh.kubectl("logs", "-n", pod["metadata"]["namespace"], pod["metadata"]["name"])
            assert not _denials(log), (pod["metadata"]["name"], _denials(log))
            assert "Traceback" not in log, log[-5000:]


@pytest.mark.real_mesh_last
def test_uninstall_leaves_no_workload_behind(real_mesh: RealCluster) -> None:
    mesh = real_mesh
    result = mesh.helm("uninstall", RELEASE, "-n", NAMESPACE, "--wait", "--timeout", "5m")
    assert result.returncode == 0, result.stderr

    def leftovers() -> list[str]:
        out = mesh.kubectl(
            "get",
            "deployments,replicasets,daemonsets,pods,services,networkpolicies,"
            "poddisruptionbudgets,configmaps,serviceaccounts,roles,rolebindings",
            "-n", NAMESPACE, "-o", "name",
        )  # fmt: skip
        return [
            n for n in out.split()
            if n not in ("configmap/kube-root-ca.crt", "serviceaccount/default", TEST_POD)
        ]  # fmt: skip

    deadline = time.monotonic() + 120
    while leftovers() and time.monotonic() < deadline:
        time.sleep(1)
    assert not leftovers(), leftovers()
    # The pod of the last `helm test` is a hook, which Helm never deletes with the
    # release: it stays, finished, until the next `helm test` or a kubectl delete.
    test_pod = mesh.get("pod", TEST_POD.split("/")[1], "-n", NAMESPACE)
    if test_pod is not None:
        assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        assert test_pod["status"]["phase"] in ("Succeeded", "Failed"), test_pod["status"]
    agent_ns = mesh.get("namespace", AGENT_NAMESPACE)
    assert agent_ns is None or agent_ns["status"]["phase"] == "Terminating"
    cluster_scoped = mesh.kubectl(
        "get", "clusterroles,clusterrolebindings,validatingadmissionpolicies,"
        "validatingadmissionpolicybindings",
        "-l", f"app.kubernetes.io/instance={RELEASE}", "-o", "name",
    )  # fmt: skip
    assert not cluster_scoped.split(), cluster_scoped
    for plural in ("meshpools", "meshmodels", "meshnodes"):
        assert mesh.get("crd", f"{plural}.mesh.dev"), f"{plural} CRD was not kept"
    # The MeshModels stay with their CRD (docs/install.md "Uninstall").
    for model in MODELS:
        assert mesh.get("meshmodel", model.name, "-n", model.namespace), model
