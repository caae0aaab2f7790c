"""The chart rendered by the real helm: `helm lint --strict`, the schema refusing
unknown values, the rules every rendered workload follows, and every example
values file accepted by the real API server (server-side dry-run) with the release
namespace enforcing Pod Security `restricted`."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e import parts
from e2e.cluster import LocalCluster
from mesh_operator.api.contract import VERSION_ANNOTATION
from mesh_operator.api.crdgen import build_crds
from tests.integration.chart_support import (
    CHART,
    REPO,
    VALUES_FILES,
    documents,
    helm,
    helm_bin,
    install_monitoring_crds,
    template,
)

pytestmark = pytest.mark.integration

CASES = [None, *VALUES_FILES]
IDS = ["defaults", *(p.stem for p in VALUES_FILES)]
RESTRICTED_COMPONENTS = {"operator", "gateway", "test"}


def pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    """(kind/name, component, pod spec) of every workload and pod."""
    found = []
    for doc in docs:
        kind = doc["kind"]
        labels = doc["metadata"].get("labels", {})
        component = labels.get("app.kubernetes.io/component", "")
        if kind in ("Deployment", "DaemonSet", "StatefulSet", "Job"):
            found.append(
                (f"{kind}/{doc['metadata']['name']}", component, doc["spec"]["template"]["spec"])
            )
        elif kind == "Pod":
            found.append((f"Pod/{doc['metadata']['name']}", component, doc["spec"]))
    return found


@pytest.mark.parametrize("values", CASES, ids=IDS)
def test_helm_lint_strict(values: Path | None) -> None:
    args = ["lint", "--strict", str(CHART)]
    if values is not None:
        args += ["-f", str(values)]
    out = helm(*args)
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize(
    "setting",
    ["operator.replicas=0", "gateway.apiKeys.source=env", "unknown=1", "agent.backend=rocm"],
)
def test_schema_refuses_what_the_chart_does_not_know(setting: str) -> None:
    result = subprocess.run(
        [str(helm_bin()), "template", "mesh", str(CHART), "--set", setting],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr


@pytest.mark.parametrize("values", CASES, ids=IDS)
def test_rendered_workloads_follow_the_rules(values: Path | None) -> None:
    text = template("mesh", "mesh-system", [values] if values else [])
    docs = documents(text)
    # Servers bind to their pod IP (several pods share a network namespace in the
    # end-to-end harness); nothing listens on a wildcard address or a host port.
    assert "0.0.0.0" not in text
    specs = pod_specs(docs)
    assert specs
    for where, component, spec in specs:
        assert not spec.get("hostNetwork"), where
        for container in spec.get("initContainers", []) + spec["containers"]:
            # The end-to-end kubelet simulator runs `command[0]` by its basename.
            assert container.get("command"), f"{where}/{container['name']}: no explicit command"
            for port in container.get("ports", []):
                assert "hostPort" not in port, f"{where}: hostPort"
            assert container.get("resources", {}).get("requests"), f"{where}: no requests"
        if component in RESTRICTED_COMPONENTS:
            pod_sc = spec["securityContext"]
            assert pod_sc["runAsNonRoot"] is True, where
            assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", where
            for container in spec["containers"]:
                sc = container["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False, where
                assert sc["capabilities"]["drop"] == ["ALL"], where
                assert sc["readOnlyRootFilesystem"] is True, where
    by_component = {component: spec for _, component, spec in specs}
    operator = by_component["operator"]["containers"][0]
    assert operator["command"] == ["mesh", "operator"]
    addresses = [a.split("=", 1)[1] for a in operator["args"] if "-address=" in a]
    assert len(addresses) == 2
    assert all(a.startswith("$(POD_IP):") for a in addresses)
    if "gateway" in by_component:
        assert "--host=$(POD_IP)" in by_component["gateway"]["containers"][0]["args"]
    if "agent" in by_component:
        agent = by_component["agent"]
        env = {e["name"]: e for e in agent["containers"][0]["env"]}
        assert env["MESH_AGENT_LISTEN"]["value"].startswith("$(POD_IP):")
        assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
        assert agent["hostPID"] is True
        chosen = (yaml.safe_load(values.read_text()) if values else {}) or {}
        rtt = (chosen.get("agent") or {}).get("rttInterval", 20)
        assert env["MESH_AGENT_RTT_INTERVAL"]["value"] == str(rtt)
    for doc in docs:
        if doc["kind"] in ("ClusterRole", "Role"):
            for rule in doc["rules"]:
                for field in ("verbs", "resources", "apiGroups"):
                    assert "*" not in rule[field], f"{doc['metadata']['name']}: * in {field}"


def test_crds_are_kept_and_follow_the_images_in_values() -> None:
    default = [
        d
        for d in documents(template("mesh", "mesh-system"))
        if d["kind"] == "CustomResourceDefinition"
    ]
    generated = {d["metadata"]["name"]: d for d in build_crds().values()}
    assert len(default) == len(generated) == 3
    for crd in default:
        annotations = crd["metadata"].pop("annotations")
        want = dict(generated[crd["metadata"]["name"]]["metadata"])
        # The chart keeps the CRDs on uninstall; the version stamp is crdgen's.
        assert annotations == {**want.pop("annotations"), "helm.sh/resource-policy": "keep"}
        assert set(annotations) == {"helm.sh/resource-policy", VERSION_ANNOTATION}
        # Rendered through fromYaml/toYaml, still exactly the generated CRD.
        assert crd == {**generated[crd["metadata"]["name"]], "metadata": want}
    cpu = [
        d
        for d in documents(
            template("mesh", "mesh-system", [REPO / "manifests/examples/values-cpu.yaml"])
        )
        if d["kind"] == "CustomResourceDefinition" and d["spec"]["names"]["kind"] == "MeshPool"
    ]
    images = cpu[0]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]["images"]
    assert images["default"] == {}
    # One registry value moves every image, the llama.cpp one with its variant.
    for field in ("rpcServer", "llamaServer"):
        assert images["properties"][field]["default"] == (
            "registry.example.com/mesh/llama.cpp:0.3.36-{variant}"
        )
    assert images["properties"]["mesh"]["default"] == "registry.example.com/mesh/mesh:0.1.0"
    workloads = documents(
        template("mesh", "mesh-system", [REPO / "manifests/examples/values-cpu.yaml"])
    )
    for _, _, spec in pod_specs(workloads):
        for container in spec.get("initContainers", []) + spec["containers"]:
            assert container["image"].startswith("registry.example.com/mesh/"), container
    none = documents(
        template("mesh", "mesh-system", sets=["crds.install=false", "crds.keep=false"])
    )
    assert not [d for d in none if d["kind"] == "CustomResourceDefinition"]


SCRAPER = {"mesh.dev/metrics-scraper": "true"}


def scraper_peer(namespaces: list[str]) -> dict[str, Any]:
    return {
        "namespaceSelector": {
            "matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "In", "values": namespaces}
            ]
        },
        "podSelector": {"matchLabels": SCRAPER},
    }


@pytest.mark.parametrize(
    ("sets", "scrapers"),
    [
        ([], ["mesh-system"]),
        (["networkPolicy.scraperNamespaces={monitoring,obs}"], ["monitoring", "obs"]),
    ],
)
def test_network_policies_admit_only_the_named_namespaces(
    sets: list[str], scrapers: list[str]
) -> None:
    ingress = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}}
    docs = documents(
        template(
            "mesh",
            "mesh-system",
            sets=[*sets, "agent.namespace=mesh-agent"],
            set_json=[f"networkPolicy.gatewayFrom={json.dumps([ingress])}"],
        )
    )
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    assert sorted(policies) == ["mesh-agent", "mesh-gateway", "mesh-operator"]
    assert policies["mesh-agent"]["metadata"]["namespace"] == "mesh-agent"
    agents = {
        "podSelector": {
            "matchLabels": {
                "app.kubernetes.io/name": "mesh",
                "app.kubernetes.io/instance": "mesh",
                "app.kubernetes.io/component": "agent",
            }
        }
    }
    # Agents also admit each other: the round-trip probes on the same port.
    for name, peers in (("mesh-operator", []), ("mesh-agent", [agents])):
        (rule,) = policies[name]["spec"]["ingress"]
        assert rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
        assert rule["from"] == [scraper_peer(scrapers), *peers], name
    (rule,) = policies["mesh-gateway"]["spec"]["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert rule["from"] == [
        ingress,
        scraper_peer(scrapers),
        {
            "podSelector": {
                "matchLabels": {
                    "app.kubernetes.io/name": "mesh",
                    "app.kubernetes.io/instance": "mesh",
                    "app.kubernetes.io/component": "test",
                }
            }
        },
        # The operator polls each gateway's /demand.
        {
            "podSelector": {
                "matchLabels": {
                    "app.kubernetes.io/name": "mesh",
                    "app.kubernetes.io/instance": "mesh",
                    "app.kubernetes.io/component": "operator",
                }
            }
        },
    ]
    # The operator writes the models' policies from the same namespaces.
    (operator,) = [
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mesh-operator"
    ]
    # ... and its pods are the ones the gateway's policy admits.
    operator_labels = operator["spec"]["template"]["metadata"]["labels"]
    assert rule["from"][-1]["podSelector"]["matchLabels"].items() <= operator_labels.items()
    env = {
        e["name"]: e.get("value")
        for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["MESH_AGENT_NAMESPACE"] == "mesh-agent"
    assert env["MESH_GATEWAY_NAMESPACE"] == "mesh-system"
    assert env["MESH_SCRAPER_NAMESPACES"] == ",".join(scrapers)


@pytest.fixture
def render_namespaces(crds: LocalCluster) -> Iterator[tuple[LocalCluster, str, str]]:
    """A release namespace enforcing (and warning about) Pod Security `restricted`,
    and a privileged namespace for the agents."""
    suffix = uuid.uuid4().hex[:6]
    release_ns, agent_ns = f"render-{suffix}", f"render-{suffix}-agent"
    for name, level in ((release_ns, "restricted"), (agent_ns, "privileged")):
        crds.kubectl("create", "namespace", name)
        crds.kubectl(
            "label", "namespace", name,
            f"pod-security.kubernetes.io/enforce={level}",
            f"pod-security.kubernetes.io/warn={level}",
        )  # fmt: skip
    install_monitoring_crds(crds)
    crds.kubectl("create", "namespace", "monitoring", check=False)
    try:
        yield crds, release_ns, agent_ns
    finally:
        for name in (release_ns, agent_ns):
            crds.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.mark.parametrize("values", CASES, ids=IDS)
def test_templates_pass_a_server_side_dry_run_under_restricted(
    render_namespaces: tuple[LocalCluster, str, str], values: Path | None
) -> None:
    cluster, release_ns, agent_ns = render_namespaces
    # The agents (hostPID, hostPath) go to a privileged namespace, made to exist
    # here since a dry-run creates nothing; everything else must pass `restricted`.
    sets = [f"agent.namespace={agent_ns}", "agent.createNamespace=false"]
    text = template(f"mesh-{release_ns}", release_ns, [values] if values else [], sets)
    result = subprocess.run(
        [
            str(parts.binary("kubectl")), "--kubeconfig", str(cluster.kubeconfig),
            "apply", "--server-side", "--force-conflicts", "--dry-run=server",
            "--field-manager=chart-test", "-f", "-",
        ],
        input=text, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "PodSecurity" not in result.stderr, result.stderr
    applied = [line for line in result.stdout.splitlines() if "(server dry run)" in line]
    assert len(applied) == len(documents(text))


def test_install_manifest_is_rendered_from_the_current_chart() -> None:
    env = {**os.environ, "HELM": str(helm_bin())}
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "render-manifests.sh"), "--check"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    docs = documents((REPO / "manifests" / "install.yaml").read_text())
    namespaces = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Namespace"}
    labels = namespaces["mesh-system"]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    agent_ns = namespaces["mesh-agent"]["metadata"]["labels"]
    assert agent_ns["pod-security.kubernetes.io/enforce"] == "privileged"
    assert not [d for d in docs if d["kind"] == "Pod"], "helm test pods belong to the chart only"
    kinds = json.dumps(sorted({d["kind"] for d in docs}))
    for kind in ("CustomResourceDefinition", "DaemonSet", "Deployment", "NetworkPolicy"):
        assert kind in kinds
