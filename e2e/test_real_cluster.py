"""What the real parts enforce once mesh is installed as docs/install.md says, on
real nodes (`e2e.realcluster`): the chart's default images are pulled, every
container's main process runs as the images' user, the API server's Pod Security
admission refuses what `restricted` forbids, kube-router enforces the models'
NetworkPolicies, and CoreDNS and kube-proxy carry a pod to the gateway's Service.
"""

from __future__ import annotations

import json
import math
import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

from e2e.nodes.images import chart_images
from e2e.realcluster import (
    AGENT_NAMESPACE,
    ENFORCE_LABEL,
    IMAGE_USER,
    MODEL,
    MODEL_POD_SECURITY,
    MODELS,
    OTHER,
    OUTSIDE,
    POOL,
    RELEASE,
    Model,
    RealCluster,
    Target,
    mesh_image,
    parse_probe_output,
    restricted_pod,
)
from e2e.scenario import NAMESPACE
from e2e.waiting import wait_for

pytestmark = pytest.mark.e2e

Obj = dict[str, Any]

AGENT_LABELS = {"app.kubernetes.io/name": "mesh", "app.kubernetes.io/component": "agent"}
# kube-router refuses what no NetworkPolicy admits (REJECT with
# icmp-port-unreachable). A TIMEOUT is a handshake nobody answered, as when a
# listen queue is full: a failure, never counted as blocked.
BLOCKED = "REFUSED"


def host_labels(model: Model) -> dict[str, str]:
    """What the model's NetworkPolicy admits to its RPC port: its host pods' labels
    (`mesh_operator.api.contract.build_selector`)."""
    return {
        "app.kubernetes.io/name": "mesh",
        "app.kubernetes.io/component": "host",
        "mesh.dev/model": model.name,
    }


@pytest.fixture(scope="module")
def mesh(real_mesh: RealCluster) -> Iterator[RealCluster]:
    """The session's installation on real nodes (`e2e.realcluster`), left without
    the probe pods of this module."""
    try:
        yield real_mesh
    finally:
        real_mesh.delete_started_pods()


# -- 1. images ------------------------------------------------------------------


def test_the_charts_default_images_were_pulled(mesh: RealCluster) -> None:
    # A kubelet says "Successfully pulled image" only for an image it pulled
    # (through the nodes' mirror of ghcr.io), not one it found on the node.
    assert set(chart_images()) <= set(mesh.pulled_images()), mesh.pulled_images()


# -- 2. users -------------------------------------------------------------------

Pods = Callable[[RealCluster], list[Obj]]
COMPONENTS: dict[str, tuple[Pods, str]] = {
    "operator": (lambda m: m.release_pods("operator"), "operator"),
    "gateway": (lambda m: m.release_pods("gateway"), "gateway"),
    # The agent runs as 65532 too (docs/install.md); only its state folder's
    # init container is root, with CHOWN alone.
    "agent": (lambda m: m.release_pods("agent"), "agent"),
    "model host": (
        lambda m: [p for model in MODELS for p in m.model_pods(model, "host")],
        "llama-server",
    ),
    "rpc worker": (
        lambda m: [p for model in MODELS for p in m.model_pods(model, "rpc-server")],
        "rpc-server",
    ),
}


@pytest.mark.parametrize("component", list(COMPONENTS))
def test_main_processes_run_as_the_images_user(mesh: RealCluster, component: str) -> None:
    pods_of, container = COMPONENTS[component]
    pods = pods_of(mesh)
    assert pods, f"no running {component} pod"
    for pod in pods:
        # The process containerd started, seen from the machine: the llama.cpp
        # image has no Python and the agent's /proc/1 is the node's (hostPID).
        ids = mesh.main_process_ids(pod, container)
        name = pod["metadata"]["name"]
        assert ids["Uid"] == [IMAGE_USER] * 4, (name, ids)
        assert ids["Gid"] == [IMAGE_USER] * 4, (name, ids)


# -- 3. Pod Security ----------------------------------------------------------------


def test_namespaces_enforce_the_documented_levels(mesh: RealCluster) -> None:
    def level(namespace: str) -> str | None:
        labels = mesh.get("namespace", namespace)["metadata"].get("labels", {})
        return labels.get(ENFORCE_LABEL)  # type: ignore[no-any-return]

    assert level(NAMESPACE) == "restricted"
    # Created by the chart (agent.createNamespace) at the level hostPID needs.
    assert level(AGENT_NAMESPACE) == "privileged"
    for model in MODELS:
        assert level(model.namespace) == MODEL_POD_SECURITY


def test_the_releases_and_models_pods_meet_their_namespaces_levels(mesh: RealCluster) -> None:
    for component in ("operator", "gateway", "agent"):
        assert mesh.release_pods(component), component
    for model in MODELS:
        assert mesh.model_pods(model, "host"), model
        assert mesh.model_pods(model, "rpc-server"), model
    # The API server checks every running pod against the level.
    for namespace in (NAMESPACE, *(m.namespace for m in MODELS)):
        assert mesh.pod_security_warnings(namespace, "restricted") == "", namespace
    # The agents could not run in the release namespace: hostPID, hostPath.
    warnings = mesh.pod_security_warnings(AGENT_NAMESPACE, "baseline")
    assert "violate the new PodSecurity enforce level" in warnings, warnings
    assert "host namespaces, hostPath volumes" in warnings, warnings


def _pod(kind: str, namespace: str) -> Obj:
    """A `restricted_pod`, broken as `kind` says ("root", "privileged") or not ("")."""
    pod = restricted_pod(
        f"violates-{kind or 'nothing'}",
        namespace,
        {"app": "violates"},
        ["true"],
        image=mesh_image(),
    )
    security = pod["spec"]["containers"][0]["securityContext"]
    if kind == "root":
        security.update({"runAsUser": 0, "runAsNonRoot": False})
    elif kind == "privileged":
        security.pop("allowPrivilegeEscalation")
        security["privileged"] = True
    return pod


@pytest.mark.parametrize("namespace", [NAMESPACE, MODEL.namespace])
@pytest.mark.parametrize("kind", ["root", "privileged"])
def test_a_pod_breaking_restricted_is_refused(mesh: RealCluster, namespace: str, kind: str) -> None:
    pod = _pod(kind, namespace)
    refused = mesh.kubectl_run("apply", "-f", "-", input_text=json.dumps(pod))
    assert refused.returncode != 0, refused.stdout
    assert "forbidden" in refused.stderr, refused.stderr
    assert 'violates PodSecurity "restricted:' in refused.stderr, refused.stderr
    assert mesh.get("pod", pod["metadata"]["name"], "-n", namespace) is None
    # The same pod without the violation is admitted: the refusal is about it.
    admitted = mesh.kubectl_run(
        "apply", "--dry-run=server", "-f", "-", input_text=json.dumps(_pod("", namespace))
    )
    assert admitted.returncode == 0, admitted.stderr


# -- 4. NetworkPolicies -------------------------------------------------------------


@dataclass(frozen=True)
class Reachability:
    """Each probe's verdict by (source, target), and the pairs a policy admits."""

    verdicts: dict[tuple[str, str], str]
    admitted: set[tuple[str, str]]
    # Per worker: handshakes its listen queue holds after the probes, and the
    # admitted probes of it (each one stays queued behind the host's connection).
    queued: dict[str, int]

    def admitted_to(self, target: str) -> int:
        return len([1 for _, t in self.admitted if t == target])

    def mismatches(self, kind: str) -> list[str]:
        """Probes of targets of `kind` whose verdict is not what the policy says."""
        out = []
        for (source, target), verdict in sorted(self.verdicts.items()):
            if not target.startswith(f"{kind}/"):
                continue
            want = "OK" if (source, target) in self.admitted else "blocked"
            got = "OK" if verdict == "OK" else "blocked" if verdict == BLOCKED else verdict
            if want != got:
                out.append(f"{source} -> {target}: {verdict}, want {want}")
        return out

    def sources(self, kind: str) -> set[str]:
        return {s for s, t in self.verdicts if t.startswith(f"{kind}/")}


def _port(pod: Obj, name: str) -> int:
    for container in pod["spec"]["containers"]:
        for port in container.get("ports") or []:
            if port.get("name") == name:
                return int(port["containerPort"])
    raise AssertionError(f"no port {name} on {pod['metadata']['name']}")


def _target(kind: str, pod: Obj, port: str) -> Target:
    return Target(f"{kind}/{pod['metadata']['name']}", pod["status"]["podIP"], _port(pod, port))


def _source(kind: str, pod: Obj) -> str:
    return f"{kind}/{pod['metadata']['namespace']}/{pod['metadata']['name']}"


def probe_everything(mesh: RealCluster) -> Reachability:
    """Connect to every model's RPC port (the worker pod's containerPort `rpc`,
    the pool's rpcPort) and host port from every kind of peer.

    ggml-rpc-server serves one client at a time and listens with a backlog of one
    (ggml-rpc transport.cpp `listen(sockfd, 1)`): beside the host it serves, the
    kernel queues two more handshakes and drops the next ones. So each worker
    gets exactly two admitted connections, its own host's and one agent's; a
    refused one never reaches its queue.
    """
    worker_pods = {m: mesh.model_pods(m, "rpc-server") for m in MODELS}
    host_pods = {m: mesh.model_pods(m, "host") for m in MODELS}
    workers = {m: [_target("rpc", p, "rpc") for p in worker_pods[m]] for m in MODELS}
    all_rpc = [t for m in MODELS for t in workers[m]]
    all_http = [_target("http", p, "http") for m in MODELS for p in host_pods[m]]
    gateways = mesh.release_pods("gateway")
    agents = mesh.release_pods("agent")
    assert all_rpc and all_http and gateways and agents
    assert len(agents) <= len(all_rpc), "every agent probes a worker of its own"
    for model_workers in worker_pods.values():
        for pod in model_workers:
            waiting = mesh.listen_queue(pod, "rpc-server", _port(pod, "rpc"))
            assert waiting == 0, f"{pod['metadata']['name']} has {waiting} queued connections"
    # Open to everyone (networkPolicy.gatewayFrom empty): a probe pod that
    # reaches it has a working network, so what else it cannot reach is refused.
    control = _target("control", gateways[0], "http")

    probe_pods: dict[str, tuple[str, dict[str, str], list[Target]]] = {
        # (a) a pod of another namespace
        f"pod/{OUTSIDE}/plain": (OUTSIDE, {"app": "probe"}, [*all_rpc, *all_http, control]),
        # (c) labelled like an agent outside the agents' namespace: in a namespace
        # of no one, and in the release namespace (the agents' namespace only
        # when agent.namespace is empty)
        f"pod/{OUTSIDE}/agent-lookalike": (OUTSIDE, AGENT_LABELS, [*all_rpc, control]),
        f"pod/{NAMESPACE}/agent-lookalike": (
            NAMESPACE,
            {**AGENT_LABELS, "app.kubernetes.io/instance": RELEASE},
            [*all_rpc, control],
        ),
    }
    for model, other in ((MODEL, OTHER), (OTHER, MODEL)):
        # The labels of a model's host in the other model's namespace: a model of
        # the same name elsewhere.
        probe_pods[f"pod/{other.namespace}/host-lookalike"] = (
            other.namespace,
            host_labels(model),
            [*workers[model], control],
        )
    for source, (namespace, labels, targets) in probe_pods.items():
        mesh.start_probe_pod(source.rsplit("/", 1)[1], namespace, labels, targets)

    admitted = {(source, control.label) for source in probe_pods}
    execs: list[tuple[str, Obj, str, bool, list[Target]]] = []
    for gateway in gateways:
        source = _source("gateway", gateway)
        execs.append((source, gateway, "gateway", True, [*all_rpc, *all_http]))
        admitted |= {(source, t.label) for t in all_http}
    for model in MODELS:
        for host in host_pods[model]:
            # (b) another model's host and (e) the model's own host: the real
            # llama-server container, through bash (its image has no Python).
            source = _source("host", host)
            execs.append((source, host, "llama-server", False, all_rpc))
            admitted |= {(source, t.label) for t in workers[model]}
    # (d) the release's agents: each worker gets one of them.
    for index, worker in enumerate(all_rpc):
        agent = agents[index % len(agents)]
        source = _source("agent", agent)
        execs.append((source, agent, "agent", True, [worker]))
        admitted.add((source, worker.label))

    verdicts: dict[tuple[str, str], str] = {}
    with ThreadPoolExecutor(max_workers=len(execs)) as pool:
        futures = [
            (source, pool.submit(mesh.probe_from_pod, pod, container, targets, python=python))
            for source, pod, container, python, targets in execs
        ]
        for source, future in futures:
            for label, verdict in future.result().items():
                verdicts[(source, label)] = verdict
    for source, (namespace, _, targets) in probe_pods.items():
        found = parse_probe_output(mesh.pod_output(source.rsplit("/", 1)[1], namespace))
        assert set(found) == {t.label for t in targets}, (source, found)
        for label, verdict in found.items():
            verdicts[(source, label)] = verdict
    queued = {
        _target("rpc", pod, "rpc").label: mesh.listen_queue(pod, "rpc-server", _port(pod, "rpc"))
        for m in MODELS
        for pod in worker_pods[m]
    }
    return Reachability(verdicts, admitted, queued)


@pytest.fixture(scope="module")
def reachability(mesh: RealCluster) -> Reachability:
    return probe_everything(mesh)


def test_probe_pods_had_a_network(reachability: Reachability) -> None:
    assert not reachability.mismatches("control"), reachability.mismatches("control")


def test_rpc_port_admits_only_the_models_host_and_the_releases_agents(
    reachability: Reachability,
) -> None:
    # Each worker's port is open, as the admitted probes to the same port show:
    # the refusals are kube-router's.
    assert not reachability.mismatches("rpc"), "\n".join(reachability.mismatches("rpc"))
    # The worker's kernel completed exactly the admitted handshakes, no other.
    assert reachability.queued == {
        worker: reachability.admitted_to(worker) for worker in reachability.queued
    }
    sources = {s.split("/", 1)[0] for s in reachability.sources("rpc")}
    assert sources == {"pod", "gateway", "host", "agent"}, sources


def test_host_port_admits_the_gateway_not_other_namespaces(reachability: Reachability) -> None:
    assert not reachability.mismatches("http"), "\n".join(reachability.mismatches("http"))
    sources = {s.split("/", 1)[0] for s in reachability.sources("http")}
    assert sources == {"pod", "gateway"}, sources


# -- 5. the gateway through the cluster's Service and DNS ------------------------------


def test_helm_test_passes(mesh: RealCluster) -> None:
    result = mesh.helm("test", RELEASE, "--namespace", NAMESPACE, "--logs", timeout=300)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "Phase:          Succeeded" in result.stdout, result.stdout
    # The test pod asserts the OpenAI list shape of /v1/models through the
    # gateway's Service and prints the models' names; it stays until the next
    # `helm test` (hook-delete-policy before-hook-creation), so --logs shows it.
    models = next(line for line in result.stdout.splitlines() if line.startswith("models: "))
    for model in MODELS:
        assert repr(model.name) in models, result.stdout


# A chat completion per model named on the command line, through the gateway.
CHAT = (
    "import json, sys, urllib.request\n"
    "for model in sys.argv[2:]:\n"
    "    body = {'model': model, 'max_tokens': 4,\n"
    "            'messages': [{'role': 'user', 'content': 'Say hi.'}]}\n"
    "    request = urllib.request.Request(sys.argv[1], json.dumps(body).encode(),\n"
    "                                     {'Content-Type': 'application/json'})\n"
    "    with urllib.request.urlopen(request, timeout=120) as answer:\n"
    "        reply = json.loads(answer.read())['choices'][0]['message']['content']\n"
    "        print(model, repr(reply))\n"
)


def gateway_url(mesh: RealCluster, path: str) -> str:
    """The gateway's URL by its Service's cluster DNS name."""
    selector = "app.kubernetes.io/component=gateway"
    (service,) = mesh.get("services", "-n", NAMESPACE, "-l", selector)["items"]
    port = service["spec"]["ports"][0]["port"]
    return f"http://{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{port}{path}"


def test_a_pod_reaches_the_gateway_by_its_service_name(mesh: RealCluster) -> None:
    url = gateway_url(mesh, "/v1/models")
    script = (
        "import sys, urllib.request\n"
        "with urllib.request.urlopen(sys.argv[1], timeout=20) as answer:\n"
        "    print(answer.read().decode())\n"
    )
    mesh.start_pod("gateway-by-dns", OUTSIDE, {"app": "probe"}, ["python3", "-c", script, url])
    body = json.loads(mesh.pod_output("gateway-by-dns", OUTSIDE))
    assert body["object"] == "list", body
    assert {m["id"] for m in body["data"]} >= {m.name for m in MODELS}, body


# -- two models planned into one pool at once --------------------------------------


def test_two_models_applied_at_once_share_no_memory_and_both_serve(mesh: RealCluster) -> None:
    """Both MeshModels were applied to the pool together (`bring_up`): each has a
    plan, the plans on any device together stay within what the ledger offers
    there (its total under the pool's cap, less the reserve and others' use), and
    each answers a chat through the gateway."""
    pool = mesh.get("meshpool", POOL)["spec"]
    used: dict[tuple[str, str], int] = {}
    for model in MODELS:
        status = mesh.get("meshmodel", model.name, "-n", model.namespace)["status"]
        assert status["plan"]["devices"], status
        for device in status["plan"]["devices"]:
            key = (device["node"], device["device"])
            used[key] = used.get(key, 0) + int(device["totalMiB"])
    for (node, device_id), mib in used.items():
        devices = mesh.get("meshnode", node)["status"]["devices"]
        device = next(d for d in devices if d["id"] == device_id)
        total = device["memoryTotalMiB"]
        if pool.get("deviceMemoryCapMiB") is not None:
            total = min(total, pool["deviceMemoryCapMiB"])
        reserve = math.ceil(device["memoryTotalMiB"] * pool.get("reservePercent", 10) / 100)
        limit = total - reserve - int(device.get("memoryUsedByOthersMiB") or 0)
        assert mib <= limit, f"{node}/{device_id}: plans hold {mib} MiB of {limit}"
    url = gateway_url(mesh, "/v1/chat/completions")
    names = [m.name for m in MODELS]
    mesh.start_pod("chat-both", OUTSIDE, {"app": "probe"}, ["python3", "-c", CHAT, url, *names])
    answers = mesh.pod_output("chat-both", OUTSIDE).strip().splitlines()
    assert [line.split(" ", 1)[0] for line in answers] == names, answers


# -- a worker that restarts under its host -------------------------------------------


def test_a_killed_worker_restarts_its_host_with_it_and_the_model_serves_again(
    mesh: RealCluster,
) -> None:
    """The RPC server's process is killed (SIGKILL, as an OOM kill would): the kubelet
    restarts it empty, and its host starts again with it, by one of two paths: the
    host is stopped while the worker is not Ready and started once it is, or, when
    the worker came back between two looks of the operator, rolled because its
    restart count rose past the one last acted on (status.groupRestarts). Either
    way the plan is kept, the restart is recorded, and the model serves again."""
    before = mesh.get("meshmodel", OTHER.name, "-n", OTHER.namespace)["status"]
    (host,) = mesh.model_pods(OTHER, "host")
    (worker,) = mesh.model_pods(OTHER, "rpc-server")
    name = worker["metadata"]["name"]
    os.kill(mesh.main_pid(worker, "rpc-server"), signal.SIGKILL)

    def serving_again() -> Any:
        status = mesh.get("meshmodel", OTHER.name, "-n", OTHER.namespace)["status"]
        if status.get("workerRestarts", {}).get(name, 0) < 1 or not mesh.ready(OTHER):
            return None
        hosts = mesh.model_pods(OTHER, "host")
        fresh = [h for h in hosts if h["metadata"]["uid"] != host["metadata"]["uid"]]
        return status if fresh and len(hosts) == 1 else None

    after = wait_for("the model serving again on a new host", serving_again, timeout=300)
    assert after["planGeneration"] == before["planGeneration"], "the plan is kept"
    url = gateway_url(mesh, "/v1/chat/completions")
    mesh.start_pod(
        "chat-after-kill", OUTSIDE, {"app": "probe"}, ["python3", "-c", CHAT, url, OTHER.name]
    )
    answers = mesh.pod_output("chat-after-kill", OUTSIDE).strip().splitlines()
    assert [line.split(" ", 1)[0] for line in answers] == [OTHER.name], answers
