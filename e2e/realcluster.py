"""mesh installed on real nodes as docs/install.md says, for tests of what the real
parts enforce: image pulls, the containers' users, Pod Security admission,
NetworkPolicies, cluster DNS and Services, image volumes.

Test infrastructure. A local control plane (`e2e.cluster`) and real nodes
(`e2e.nodes`: kubelet, containerd 2, runc, CNI, kube-proxy, kube-router, CoreDNS):
one system node for the operator and gateway, two pool nodes. The chart is
installed with its default images (pulled through the nodes' registry mirror),
the release namespace enforcing Pod Security `restricted` and the agents in a
namespace the chart creates at `privileged`. The CPU pool example as shipped
(emptyDir caches) serves gemma-3-270m as two MeshModels in two namespaces that
enforce `restricted`, each on one node. The release also carries what a user
with a Prometheus gives it: scrapers in the namespace `monitoring`
(`networkPolicy.scraperNamespaces`) and the chart's PodMonitors (the Prometheus
operator's kinds stand in as bare CRDs; no operator reads them).

One installation serves a whole pytest session (`real_mesh`, a plugin that
`e2e/conftest.py` and `tests/integration/conftest.py` register): bringing it up
takes minutes. The tests that use it run one after the other at the end of the
session, those marked `real_mesh_last` (which uninstall the release) after all
others. Used by `e2e/test_real_cluster.py`, `tests/integration/test_chart_install.py`
and `tests/integration/test_dashboards.py`.

Connection probes report one verdict per target: `OK` (the TCP handshake
completed), `REFUSED` (refused or reset: kube-router rejects what no
NetworkPolicy admits, with icmp-port-unreachable) or `TIMEOUT` (no answer within
PROBE_TIMEOUT_SECONDS).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e import parts
from e2e.cluster import K8S_VERSION, LocalCluster
from e2e.fileserver import serve_directory
from e2e.nodes import RealNodes, chart_images
from e2e.nodes.images import require_real_nodes
from e2e.scenario import NAMESPACE, POOL_LABEL, REPO, SYSTEM_LABEL, SYSTEM_NODE
from e2e.waiting import WaitTimeoutError, wait_for
from mesh_operator.oci import INSECURE_ENV
from tests.conftest import require_part

Obj = dict[str, Any]

RELEASE = "mesh"
AGENT_NAMESPACE = "mesh-agent"
POOL = "cpu"
POOL_NODES = ("node-a", "node-b")
CONTEXT = 2048
ENFORCE_LABEL = "pod-security.kubernetes.io/enforce"
# The images' user (Dockerfile.*: USER 65532:65532).
IMAGE_USER = 65532
PROBE_TIMEOUT_SECONDS = 3
# Where a user's Prometheus runs, its pods labelled SCRAPER_LABEL.
SCRAPER_NAMESPACE = "monitoring"
SCRAPER_LABEL = "mesh.dev/metrics-scraper"
# The PodMonitors' interval: quick, so that tests see rates within seconds.
SCRAPE_INTERVAL = "2s"
# A pool's spec for one node per model (or replica) and one RPC thread per server
# (the nodes share two cores).
ONE_NODE_PER_MODEL: dict[str, Any] = {"maxNodesPerModel": 1, "rpcThreads": 1}


class RealClusterError(RuntimeError):
    """A step of bringing mesh up on real nodes failed."""


@dataclass(frozen=True)
class Model:
    """One MeshModel of the cluster and the namespace it serves from."""

    name: str
    namespace: str


MODEL = Model("gemma-3-270m", "ai")
# Another model (the same file) in another namespace: its host is "another
# model's host" for the first model's policy, and the other way round.
OTHER = Model("gemma-other", "ai-other")
MODELS = (MODEL, OTHER)
# A namespace that is none of mesh's: its pods are nobody mesh admits.
OUTSIDE = "outside"
# The pool's caches are emptyDir (the CPU pool example as shipped): docs/install.md
# "Model namespaces" says the models' namespaces can then enforce `restricted`.
MODEL_POD_SECURITY = "restricted"

# The Prometheus operator's PodMonitor and ServiceMonitor kinds, as stand-ins: no
# Prometheus operator runs here, and the API server needs the kinds to accept the
# chart's monitors. Their spec is not checked (tests/unit cover the fields).
MONITOR_KINDS = (("PodMonitor", "podmonitors"), ("ServiceMonitor", "servicemonitors"))


def install_monitoring_crds(cluster: LocalCluster) -> None:
    """The stand-in CRDs of MONITOR_KINDS, applied and Established."""
    for kind, plural in MONITOR_KINDS:
        crd = {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.monitoring.coreos.com"},
            "spec": {
                "group": "monitoring.coreos.com",
                "scope": "Namespaced",
                "names": {"kind": kind, "plural": plural, "listKind": f"{kind}List"},
                "versions": [
                    {
                        "name": "v1",
                        "served": True,
                        "storage": True,
                        "schema": {
                            "openAPIV3Schema": {
                                "type": "object",
                                "properties": {
                                    "spec": {
                                        "type": "object",
                                        "x-kubernetes-preserve-unknown-fields": True,
                                    }
                                },
                            }
                        },
                    }
                ],
            },
        }
        cluster.kubectl(
            "apply", "--server-side", "--force-conflicts", "-f", "-", input_text=json.dumps(crd)
        )
        cluster.kubectl(
            "wait",
            "--for=condition=Established",
            f"crd/{plural}.monitoring.coreos.com",
            "--timeout=60s",
        )


@dataclass(frozen=True)
class Target:
    """Something a probe connects to: `label` names it in the probe's output."""

    label: str
    address: str
    port: int

    @property
    def argument(self) -> str:
        return f"{self.label}={self.address}:{self.port}"


# A connect-and-close probe for images with Python (mesh, mesh-agent), every
# target at once: the RPC server serves one client at a time, so nothing is sent.
PROBE_SCRIPT = f"""
import socket, sys, threading
lock = threading.Lock()
def probe(arg):
    label, _, address = arg.partition("=")
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout={PROBE_TIMEOUT_SECONDS}).close()
        verdict = "OK"
    except (socket.timeout, TimeoutError):
        verdict = "TIMEOUT"
    except (ConnectionRefusedError, ConnectionResetError):
        verdict = "REFUSED"
    except OSError as exc:
        verdict = "ERROR:" + type(exc).__name__
    with lock:
        print("probe", label, verdict, flush=True)
threads = [threading.Thread(target=probe, args=(a,)) for a in sys.argv[1:]]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""

# The same probe for the llama.cpp image, which has bash and coreutils but no
# Python: bash's /dev/tcp connects; `timeout` exits 124 when it runs out.
BASH_PROBE_SCRIPT = f"""
for arg in "$@"; do
  label="${{arg%%=*}}"; address="${{arg#*=}}"
  timeout {PROBE_TIMEOUT_SECONDS} bash -c 'exec 3<>"/dev/tcp/${{0%:*}}/${{0##*:}}"' \\
    "$address" 2>/dev/null
  case $? in 0) verdict=OK;; 124) verdict=TIMEOUT;; *) verdict=REFUSED;; esac
  echo "probe $label $verdict"
done
"""

_PROBE_LINE = re.compile(r"^probe (\S+) (\S+)$", re.MULTILINE)


def parse_probe_output(text: str) -> dict[str, str]:
    """Verdict per target label, from a probe's output."""
    return {m.group(1): m.group(2) for m in _PROBE_LINE.finditer(text)}


def restricted_pod(
    name: str,
    namespace: str,
    labels: Mapping[str, str],
    command: Sequence[str],
    *,
    image: str,
) -> Obj:
    """A one-shot pod that meets Pod Security `restricted`, so it is admitted in
    every namespace here: whatever it shows is about its labels and namespace."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 1,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": IMAGE_USER,
                "runAsGroup": IMAGE_USER,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "probe",
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": list(command),
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }


def mesh_image() -> str:
    """The chart's default mesh image (it has Python)."""
    return next(name for name in chart_images() if name.split("/")[-1].startswith("mesh:"))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class RealCluster:
    """mesh on real nodes, owned by one work folder."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir.resolve()
        self.cluster = LocalCluster(self.workdir / "cluster")
        # containerd 2: a model image is mounted as an `image` volume
        # (e2e/test_oci_model.py); the other tests run on it as well.
        self.nodes = RealNodes(self.cluster, self.workdir / "nodes", containerd2=True)
        # (namespace, name) of the one-shot pods `start_pod` made.
        self.started: set[tuple[str, str]] = set()

    # -- clients -------------------------------------------------------------------

    def kubectl(self, *args: str, input_text: str | None = None, check: bool = True) -> str:
        return self.cluster.kubectl(*args, input_text=input_text, check=check)

    def kubectl_run(
        self, *args: str, input_text: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """kubectl whose failure is an answer to look at (exit code, stderr)."""
        return subprocess.run(
            [str(parts.binary("kubectl")), "--kubeconfig", str(self.cluster.kubeconfig), *args],
            capture_output=True,
            text=True,
            input=input_text,
            timeout=120,
            check=False,
        )

    def get(self, *args: str) -> Any:
        out = self.kubectl("get", *args, "-o", "json", check=False)
        return json.loads(out) if out.strip() else None

    def helm(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(parts.binary("helm")), "--kubeconfig", str(self.cluster.kubeconfig), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def apply(self, obj: Obj) -> None:
        self.kubectl("apply", "-f", "-", input_text=json.dumps(obj))

    def pods(self, namespace: str, selector: str) -> list[Obj]:
        items: list[Obj] = (self.get("pods", "-n", namespace, "-l", selector) or {}).get(
            "items", []
        )
        return sorted(items, key=lambda p: p["metadata"]["name"])

    def running_pods(self, namespace: str, selector: str) -> list[Obj]:
        return [
            p
            for p in self.pods(namespace, selector)
            if p.get("status", {}).get("phase") == "Running"
            and p["metadata"].get("deletionTimestamp") is None
        ]

    def exec(self, pod: Obj, container: str, *command: str) -> str:
        meta = pod["metadata"]
        return self.kubectl(
            "exec", "-n", meta["namespace"], meta["name"], "-c", container, "--", *command
        )

    # -- bringing it up ----------------------------------------------------------

    def host_path(self, name: str) -> str:
        """A node folder for the agents' hostPath volumes (the nodes share this
        machine's disk, so they live in the work folder)."""
        return str(self.workdir / "hostpath" / name)

    def start(self) -> None:
        log("control plane and real nodes")
        self.cluster.up()
        nodes = {SYSTEM_NODE: {SYSTEM_LABEL: "system"}}
        nodes.update({name: {POOL_LABEL: "true"} for name in POOL_NODES})
        self.nodes.up(nodes, push=chart_images())

    def namespace(self, name: str, enforce: str | None) -> None:
        self.kubectl("create", "namespace", name, check=False)
        if enforce:
            self.kubectl("label", "--overwrite", "namespace", name, f"{ENFORCE_LABEL}={enforce}")

    def install(self) -> None:
        """helm install as docs/install.md: the release namespace `restricted`,
        agents in a namespace of their own created by the chart, metrics for the
        labelled Prometheus pods of `monitoring` and the chart's PodMonitors."""
        log(f"helm install {RELEASE} into {NAMESPACE} (restricted), agents in {AGENT_NAMESPACE}")
        self.namespace(NAMESPACE, "restricted")
        install_monitoring_crds(self.cluster)
        result = self.helm(
            "install", RELEASE, str(REPO / "charts" / "mesh"),
            "--namespace", NAMESPACE,
            "-f", str(REPO / "e2e" / "values-e2e.yaml"),
            "--set", f"agent.namespace={AGENT_NAMESPACE}",
            "--set", "agent.createNamespace=true",
            "--set", f"agent.stateDir={self.host_path('agent')}",
            "--set", f"agent.modelCache={self.host_path('models')}",
            "--set", f"networkPolicy.scraperNamespaces={{{SCRAPER_NAMESPACE}}}",
            # The nodes' registry speaks plain HTTP: the operator reads model
            # images' headers from it (source.oci).
            "--set", f"operator.extraEnv[0].name={INSECURE_ENV}",
            "--set", f"operator.extraEnv[0].value={self.nodes.registry}",
            "--set", "metrics.podMonitor.enabled=true",
            "--set", f"metrics.podMonitor.interval={SCRAPE_INTERVAL}",
            "--wait", "--timeout", "5m",
        )  # fmt: skip
        if result.returncode != 0:
            raise RealClusterError(f"helm install failed: {result.stderr.strip()[-800:]}")

    def apply_pool(self) -> None:
        """The CPU pool example as shipped (emptyDir caches), one node per model and
        one RPC thread per server (the nodes share two cores)."""
        self.apply(example_pool(POOL, **ONE_NODE_PER_MODEL))
        wait_for(
            "a MeshNode with devices for every pool node",
            lambda: (
                {
                    n["metadata"]["name"]
                    for n in (self.get("meshnodes") or {}).get("items", [])
                    if (n.get("status") or {}).get("devices")
                }
                >= set(POOL_NODES)
            ),
            timeout=120,
        )

    def apply_model(self, model: Model, mirror: str, sha256: str) -> None:
        obj = yaml.safe_load((REPO / "manifests" / "examples" / "model.yaml").read_text())
        obj["metadata"].update({"name": model.name, "namespace": model.namespace})
        obj["spec"].update(
            {
                "poolRef": POOL,
                "source": {"url": f"{mirror}/{parts.MODEL_FILE}"},
                "sha256": sha256,
                "contextSize": CONTEXT,
                "parallel": 1,
                "servedName": model.name,
                "aliases": [],
            }
        )
        log(f"MeshModel {model.namespace}/{model.name}")
        self.apply(obj)

    def bring_up(self, mirror: str, sha256: str) -> None:
        """The chart, the pool and both models Ready (applied together)."""
        self.install()
        self.apply_pool()
        for model in MODELS:
            self.namespace(model.namespace, MODEL_POD_SECURITY)
            self.apply_model(model, mirror, sha256)
        for model in MODELS:
            self.wait_ready(model)
        self.namespace(OUTSIDE, None)
        self.namespace(SCRAPER_NAMESPACE, None)

    def ready(self, model: Model) -> Obj | None:
        obj: Obj | None = self.get("meshmodel", model.name, "-n", model.namespace)
        for cond in ((obj or {}).get("status") or {}).get("conditions", []):
            if cond["type"] == "Ready" and cond["status"] == "True":
                return obj
        return None

    def wait_ready(self, model: Model, timeout: float = 420) -> Obj:
        try:
            obj = wait_for(
                f"MeshModel {model.namespace}/{model.name} Ready",
                lambda: self.ready(model),
                timeout=timeout,
            )
        except WaitTimeoutError as exc:
            raise RealClusterError(f"{exc}: {self.model_state(model)}") from exc
        log(f"{model.namespace}/{model.name} Ready on {obj['status'].get('nodes')}")
        return obj

    def unpool_node(self, node: str, label: str) -> None:
        """Take `label` off `node` (a pool's selector), wait for its agent to leave
        and delete its MeshNode: the node as it was before a test pooled it."""
        self.kubectl("label", "node", node, f"{label}-")
        wait_for(
            f"the agent on {node} gone",
            lambda: (
                not [
                    p
                    for p in self.pods(AGENT_NAMESPACE, "app.kubernetes.io/component=agent")
                    if p["spec"].get("nodeName") == node
                ]
            ),
            timeout=120,
        )
        self.kubectl("delete", "meshnode", node, "--ignore-not-found")

    def pod_security_warnings(self, namespace: str, level: str) -> str:
        """What the API server says of the namespace's existing pods at `level`:
        a server-side dry run of the enforce label, pinned to this cluster's
        version so the policy always changes (an unchanged one is not checked)."""
        version = ".".join(K8S_VERSION.split(".")[:2])
        result = self.kubectl_run(
            "label", "--dry-run=server", "--overwrite", "namespace", namespace,
            f"{ENFORCE_LABEL}={level}", f"{ENFORCE_LABEL}-version={version}",
        )  # fmt: skip
        if result.returncode != 0:
            raise RealClusterError(f"label {namespace}: {result.stderr.strip()}")
        return result.stderr.strip()

    def model_state(self, model: Model) -> str:
        """The model's conditions and its pods' phases, to say why it is not Ready."""
        obj = self.get("meshmodel", model.name, "-n", model.namespace) or {}
        conditions = [
            f"{c['type']}={c['status']} {c.get('reason', '')}: {c.get('message', '')}"
            for c in (obj.get("status") or {}).get("conditions", [])
        ]
        pods = [
            f"{p['metadata']['name']} {p.get('status', {}).get('phase')}"
            for p in self.pods(model.namespace, f"mesh.dev/model={model.name}")
        ]
        return "; ".join(conditions + pods) or "no status"

    def stop(self) -> None:
        """Stop everything this folder started, by pid."""
        try:
            self.nodes.down()
        finally:
            self.cluster.down()

    # -- what runs ---------------------------------------------------------------

    def release_pods(self, component: str) -> list[Obj]:
        namespace = AGENT_NAMESPACE if component == "agent" else NAMESPACE
        return self.running_pods(
            namespace,
            f"app.kubernetes.io/name=mesh,app.kubernetes.io/instance={RELEASE},"
            f"app.kubernetes.io/component={component}",
        )

    def model_pods(self, model: Model, component: str) -> list[Obj]:
        return self.running_pods(
            model.namespace,
            f"app.kubernetes.io/name=mesh,app.kubernetes.io/component={component},"
            f"mesh.dev/model={model.name}",
        )

    def main_pid(self, pod: Obj, container: str) -> int:
        """The machine's pid of a container's main process, as its node's
        containerd reports it (the nodes share this machine's pid namespace)."""
        status = next(s for s in pod["status"]["containerStatuses"] if s["name"] == container)
        container_id = status["containerID"].split("://", 1)[1]
        socket = self.nodes.files(pod["spec"]["nodeName"]).containerd_socket
        result = subprocess.run(
            [
                str(parts.binary("crictl")),
                "--runtime-endpoint", f"unix://{socket}",
                "inspect", "-o", "json", container_id,
            ],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RealClusterError(f"crictl inspect {container_id}: {result.stderr.strip()}")
        return int(json.loads(result.stdout)["info"]["pid"])

    def main_process_ids(self, pod: Obj, container: str) -> dict[str, list[int]]:
        """Uid and Gid (real, effective, saved, filesystem) of a container's main
        process, read from /proc on the machine: nothing inside the image is needed."""
        ids: dict[str, list[int]] = {}
        status = Path(f"/proc/{self.main_pid(pod, container)}/status").read_text()
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid"):
                ids[key] = [int(v) for v in value.split()]
        return ids

    def pulled_images(self) -> list[str]:
        """Images some kubelet pulled (not found present), from the Pulled events."""
        found = set()
        events = self.get("events", "-A", "--field-selector", "reason=Pulled") or {}
        for event in events.get("items", []):
            message = event.get("message", "")
            if message.startswith("Successfully pulled image "):
                found.add(message.split('"')[1])
        return sorted(found)

    # -- probes ------------------------------------------------------------------

    def probe_from_pod(
        self, pod: Obj, container: str, targets: Sequence[Target], *, python: bool = True
    ) -> dict[str, str]:
        """Connect from inside a running container: with Python in mesh's images,
        with bash in the llama.cpp one (`python=False`)."""
        args = [t.argument for t in targets]
        if python:
            out = self.exec(pod, container, "python3", "-c", PROBE_SCRIPT, *args)
        else:
            out = self.exec(pod, container, "bash", "-c", BASH_PROBE_SCRIPT, "probe", *args)
        return parse_probe_output(out)

    def start_pod(
        self, name: str, namespace: str, labels: Mapping[str, str], command: Sequence[str]
    ) -> None:
        """A one-shot `restricted_pod` of the mesh image; read it with `pod_output`."""
        self.kubectl("delete", "pod", name, "-n", namespace, "--ignore-not-found", "--wait=true")
        self.started.add((namespace, name))
        self.apply(restricted_pod(name, namespace, labels, command, image=mesh_image()))

    def delete_started_pods(self) -> None:
        """Delete the one-shot pods `start_pod` made (the installation is shared)."""
        for namespace, name in sorted(self.started):
            self.kubectl("delete", "pod", name, "-n", namespace, "--ignore-not-found", check=False)
        self.started.clear()

    def start_probe_pod(
        self, name: str, namespace: str, labels: Mapping[str, str], targets: Sequence[Target]
    ) -> None:
        """A pod with `labels` in `namespace` that connects to each target once."""
        self.start_pod(
            name, namespace, labels, ["python3", "-c", PROBE_SCRIPT, *(t.argument for t in targets)]
        )

    def pod_output(self, name: str, namespace: str, timeout: float = 180) -> str:
        """The logs of a one-shot pod once it has succeeded."""

        def finished() -> str | None:
            status = (self.get("pod", name, "-n", namespace) or {}).get("status") or {}
            phase = status.get("phase")
            return phase if phase in ("Succeeded", "Failed") else None

        phase = wait_for(f"pod {namespace}/{name} to finish", finished, timeout=timeout)
        out = self.kubectl("logs", "-n", namespace, name)
        if phase != "Succeeded":
            raise RealClusterError(f"pod {namespace}/{name} {phase}: {out[-400:]}")
        return out

    def listen_queue(self, pod: Obj, container: str, port: int) -> int:
        """Connections the kernel holds for a listening port that its process has
        not accept()ed yet (the listener's rx_queue in /proc/<pid>/net/tcp)."""
        table = Path(f"/proc/{self.main_pid(pod, container)}/net/tcp").read_text()
        for line in table.splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return int(fields[4].split(":")[1], 16)
        raise RealClusterError(f"nothing listens on {port} in {pod['metadata']['name']}")


# -- one installation per pytest session ------------------------------------------

PLUGIN_NAME = "mesh-real-cluster"
LAST_MARKER = "real_mesh_last"
# Leaves a handshake queued on a model's RPC server (a connection the busy server
# accepts only once its host leaves), which the reachability probes would count.
LATE_MARKER = "real_mesh_late"


@dataclass
class SharedRealCluster:
    """The session's `RealCluster` once up, with the model mirror it serves from
    and how long bringing it up took."""

    mesh: RealCluster
    mirror: str
    sha256: str
    bring_up_seconds: float


def example_pool(name: str, **spec: Any) -> dict[str, Any]:
    """The CPU pool example as shipped (manifests/examples/cpu-pool.yaml), named
    `name`, with `spec` (camelCase fields) set over its spec."""
    pool: dict[str, Any] = yaml.safe_load(
        (REPO / "manifests" / "examples" / "cpu-pool.yaml").read_text()
    )
    pool["metadata"]["name"] = name
    pool["spec"].update(spec)
    return pool


def example_model(
    shared: SharedRealCluster, name: str, namespace: str, pool: str, **spec: Any
) -> dict[str, Any]:
    """The example MeshModel (manifests/examples/model.yaml) as a test's own model
    on the shared installation: gemma from the session's mirror, `spec` added."""
    obj: dict[str, Any] = yaml.safe_load(
        (REPO / "manifests" / "examples" / "model.yaml").read_text()
    )
    obj["metadata"].update({"name": name, "namespace": namespace})
    obj["spec"].update(
        {
            "poolRef": pool,
            "source": {"url": f"{shared.mirror}/{parts.MODEL_FILE}"},
            "sha256": shared.sha256,
            "contextSize": CONTEXT,
            "parallel": 1,
            "servedName": name,
            "aliases": [],
            **spec,
        }
    )
    return obj


@pytest.fixture(scope="session")
def shared_real_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedRealCluster]:
    """mesh on three real nodes for the whole session, stopped by pid at its end."""
    for name in ("etcd", "kube-apiserver", "helm", "kubectl"):
        require_part(lambda name=name: parts.binary(name))  # type: ignore[misc]
    model_file = require_part(parts.model_path)
    require_part(require_real_nodes)
    require_part(parts.containerd2_dir)
    sha256 = Path(f"{model_file.resolve()}.sha256").read_text().strip()
    cluster = RealCluster(tmp_path_factory.mktemp("real-cluster"))
    started = time.monotonic()
    try:
        cluster.start()
        # On the nodes' bridge, which exists once the nodes do.
        with serve_directory(model_file.parent, cluster.nodes.plan.host_address) as mirror:
            cluster.bring_up(mirror, sha256)
            seconds = time.monotonic() - started
            log(f"mesh is up on real nodes after {seconds:.0f} s")
            yield SharedRealCluster(cluster, mirror, sha256, seconds)
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def real_mesh(shared_real_cluster: SharedRealCluster) -> RealCluster:
    """The session's mesh on real nodes (`shared_real_cluster`)."""
    return shared_real_cluster.mesh


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{LAST_MARKER}: runs after every other test of the shared real cluster (uninstalls it)",
    )
    config.addinivalue_line(
        "markers",
        f"{LATE_MARKER}: runs after the other tests of the shared real cluster, before the "
        f"{LAST_MARKER} ones (it leaves a connection queued on an RPC server)",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests of the shared installation go last, one after the other, so that it
    is up only while they run; the `real_mesh_late` ones after the others, and the
    `real_mesh_last` ones after all of them."""

    def group(item: pytest.Item) -> int:
        if "shared_real_cluster" not in getattr(item, "fixturenames", ()):
            return 0
        if item.get_closest_marker(LAST_MARKER):
            return 3
        return 2 if item.get_closest_marker(LATE_MARKER) else 1

    items.sort(key=group)


def register(config: pytest.Config) -> None:
    """Make this module a plugin of the session (once), so that every directory's
    tests share one `real_mesh`: a fixture of a conftest would be one per folder."""
    if not config.pluginmanager.has_plugin(PLUGIN_NAME):
        config.pluginmanager.register(sys.modules[__name__], PLUGIN_NAME)
