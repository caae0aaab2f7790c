"""Every panel of every Grafana dashboard returns data on a working installation.

Prometheus scrapes mesh installed on real nodes (`e2e.realcluster`, the
installation the end-to-end tests share): the operator, the gateway, the agents of
the two pool nodes and the llama-server hosts of two models, real pods of the
project's images. It runs as a pod too, as a user's does: in `monitoring`, the
namespace the release names in `networkPolicy.scraperNamespaces`, labelled
`mesh.dev/metrics-scraper: "true"`. Its scrape jobs are the chart's PodMonitors,
read from the cluster and written the way the Prometheus operator writes them
(pod label selector, port name, path, interval, relabelings). Debian's Prometheus
is built without Kubernetes discovery, so the test does that part: it lists the
pods of each PodMonitor's namespaces, one target per container port with the
labels Kubernetes discovery gives it (`__meta_kubernetes_*`), into a file of
targets (`file_sd_configs`); Prometheus selects and relabels them. Only the
NetworkPolicies as installed (the chart's for mesh's pods, the operator's for each
model's hosts) let it in.

One agent stays a local process on the machine: a GPU node's, answering from the
recorded NVML of an RTX 4090 (tests/fixtures/nvml) for a simulated node (kwok)
with one GPU. The real nodes have no GPU and the agent image carries no NVML
double, while the GPU panels (utilisation, temperature, power, errors) need one.
Prometheus scrapes it on the machine's bridge address with a static job. The RPC
workers serve no /metrics (ggml-rpc-server has none); the pool agents' probes of
them are the RPC panels' data.

While Prometheus watches, the test makes what each panel shows happen, for real:

- requests through the gateway's pod, plain and streamed, in two rounds (rates
  need a later sample that moves a counter): traffic, latency and tokens per
  model, per key (`-`: the release runs without keys) and per node (the plan's
  layer shares); then a burst of more streams than the hosts have slots, for
  requests waiting, in flight and being processed;
- a host that fails (a process on the machine answering /health, then closing
  the connection on a plain request and cutting a stream after its first
  event), put behind one served model by an EndpointSlice of its host Service
  for two rounds of requests: retries, upstream errors and 5xx answers;
- a MeshModel that no node can hold, planned again and again (the served models
  were planned before Prometheus started, and the plan latency panels need plans
  within their window);
- two MeshModels whose status the API server refuses to store (a
  ValidatingAdmissionPolicy): reconcile errors;
- on the GPU node, a board at work (its utilisation; the recorded answers are of
  an idle one), an XID every few seconds (Unhealthy, GPU errors), an RPC
  server to probe that is not there (not answering), and, by another
  ValidatingAdmissionPolicy, MeshNode writes refused until its heartbeat is
  older than 30 s (stale).

Each query of each panel, over the test's time range as the panel draws it, must
parse and return a series of its own with a finite value other than 0 at some
point (no query falls back to `vector(0)`); the one exception, llama.cpp's
deferred requests, is listed in ALWAYS_ZERO with why, and must be all zeros.
Each variable's query must list some label values. `mesh status` must read the same usage from the
gateway's pod.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e import parts
from e2e.nodes.images import prometheus_image
from e2e.realcluster import (
    MODEL,
    MODELS,
    RELEASE,
    SCRAPER_LABEL,
    SCRAPER_NAMESPACE,
    Model,
    RealCluster,
    SharedRealCluster,
    restricted_pod,
)
from e2e.scenario import NAMESPACE, SYSTEM_LABEL
from e2e.waiting import free_port, wait_for
from mesh_operator.api.contract import host_selector_labels, host_service_name
from tests.conftest import require_part
from tests.integration.chart_support import CHART, MeshProcess, http_ok

pytestmark = pytest.mark.e2e

Obj = dict[str, Any]

SCRAPE_SECONDS = 2
# What the panels' Grafana macros stand for here: the whole test fits in the window.
MACROS = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "5s"}
VARIABLE_RE = re.compile(r"\$\{?(node|model)\}?")
LABEL_VALUES_RE = re.compile(r"label_values\((\w+),\s*(\w+)\)")
PROMETHEUS = "prometheus"
PROMETHEUS_PORT = 9090
# Where the Prometheus pod finds its configuration and targets (a ConfigMap).
CONFIG_DIR = "/etc/prometheus"
GPU_NODE = "gpu-recorded"
GPU_JOB = "mesh-agent-recorded-gpu"
# A pool of no node, and a model in it that the operator plans (infeasible) on
# every resync.
NOWHERE_POOL = "dashboards-nowhere"
NOWHERE_MODEL = "nowhere"
NOWHERE_NAMESPACE = "dashboards"
# MeshModels whose status writes a ValidatingAdmissionPolicy refuses.
REFUSED_PREFIX = "refused"
REFUSED_POLICY = "dashboards-refuse-model-status"
# The GPU node's MeshNode writes, refused the same way once it reported.
STALE_POLICY = "dashboards-refuse-meshnode-status"
# An XID that marks a GPU Unhealthy (not an application's), repeated.
XID_EVERY = "48@4"
STALE_SECONDS = 30
# The number of panel queries of the three dashboards.
QUERIES = 73
# The burst: streams per model (its host has one slot), tokens each.
BURST_STREAMS = 4
BURST_TOKENS = 48
# A GPU at work: the recorded answers are of an idle board.
GPU_BUSY = "37,12"
# Queries that cannot have a value other than 0 here, and why. Each must still
# return its series, and all of it 0: a value would make the reason wrong.
ALWAYS_ZERO = {
    (
        "models",
        "Busy and deferred requests",
        "llamacpp:requests_deferred",
    ): "the gateway never sends a host more requests than it has slots (spec.parallel), "
    "so llama-server defers none; only a client that bypasses the gateway makes it move",
}
# PodMonitor relabelings as the Prometheus operator spells them, and Prometheus'.
RELABEL_KEYS = {
    "sourceLabels": "source_labels",
    "targetLabel": "target_label",
    "separator": "separator",
    "regex": "regex",
    "replacement": "replacement",
    "action": "action",
    "modulus": "modulus",
}


@dataclass
class Stack:
    prometheus: str
    model_label: str
    # What the chart's PodMonitors found: pod name -> its job.
    scraped_pods: dict[str, str]
    # The nodes of the served model's plan.
    planned_nodes: list[str]
    # When Prometheus started (Unix time): the panels' time range starts there.
    started: float


class FailingHost(BaseHTTPRequestHandler):
    """A llama-server that answers /health and then fails every request: a plain
    one by closing the connection without an answer (the gateway sends it again
    elsewhere), a stream by sending its headers and first event, then closing
    mid-answer (too late to retry: a 502 and a broken stream)."""

    protocol_version = "HTTP/1.1"
    health_checks = 0

    def do_GET(self) -> None:
        FailingHost.health_checks += 1
        body = b'{"status":"ok"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        request = json.loads(self.rfile.read(length) or b"{}")
        if request.get("stream") is True:
            event = b'data: {"choices":[{"index":0,"delta":{"content":"Re"}}]}\n\n'
            self.wfile.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
                + f"{len(event):x}\r\n".encode()
                + event
                + b"\r\n"
            )
            self.wfile.flush()
            time.sleep(0.2)
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, format: str, *args: Any) -> None:
        return None


def failing_host_slice(address: str, port: int) -> Obj:
    """An EndpointSlice of the served model's host Service with the failing host:
    the gateway adds it to the model's hosts. Not the EndpointSlice controller's
    (managed-by), so the controller leaves it alone."""
    service = host_service_name(MODEL.name)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service}-failing",
            "namespace": MODEL.namespace,
            "labels": {
                **host_selector_labels(MODEL.name),
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "dashboards-test",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [address], "conditions": {"ready": True}}],
    }


def refusing_policy(name: str, resource: str, expression: str) -> list[Obj]:
    """A ValidatingAdmissionPolicy (and its binding) that refuses updates of
    `resource` (a status subresource) when `expression` is false."""
    return [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": ["mesh.dev"],
                            "apiVersions": ["*"],
                            "operations": ["UPDATE"],
                            "resources": [resource],
                        }
                    ]
                },
                # Forbidden (403), not the default Invalid (422): the operator
                # takes a 422 on a status write for "the object was replaced".
                "validations": [
                    {
                        "expression": expression,
                        "message": "refused by the dashboards test",
                        "reason": "Forbidden",
                    }
                ],
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {"policyName": name, "validationActions": ["Deny"]},
        },
    ]


def refused_model(mirror: str, sha256: str, name: str) -> Obj:
    """A MeshModel of the pool of no node whose status the API server refuses."""
    _, model = nowhere_objects(mirror, sha256)
    model["metadata"]["name"] = name
    model["spec"]["servedName"] = name
    return model


def _post(url: str, body: Obj) -> bytes:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=180) as answer:
        data: bytes = answer.read()
        return data


def _api(prometheus: str, path: str, **params: str) -> Obj:
    url = f"{prometheus}/api/v1/{path}?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            result: Obj = json.loads(answer.read())
            return result
    except urllib.error.HTTPError as exc:  # 400: the query does not parse
        failed: Obj = json.loads(exc.read())
        return failed


def _query(prometheus: str, expr: str) -> Obj:
    return _api(prometheus, "query", query=expr)


def _query_range(prometheus: str, expr: str, start: float) -> Obj:
    """`expr` over the test's time range, a point per scrape, as a panel shows it."""
    return _api(
        prometheus,
        "query_range",
        query=expr,
        start=f"{start:.3f}",
        end=f"{time.time():.3f}",
        step=f"{SCRAPE_SECONDS}s",
    )


def _label_name(label: str) -> str:
    """A Kubernetes label as Prometheus' pod discovery names it (meta label suffix)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def discovered_targets(pods: list[Obj]) -> list[Obj]:
    """What Prometheus' Kubernetes discovery (role pod) finds in `pods`: one target
    per container port, at the pod's IP, with its meta labels."""
    groups = []
    for pod in pods:
        meta, status = pod["metadata"], pod.get("status") or {}
        if not status.get("podIP"):
            continue
        labels = {
            "__meta_kubernetes_namespace": meta["namespace"],
            "__meta_kubernetes_pod_name": meta["name"],
            "__meta_kubernetes_pod_phase": status.get("phase", ""),
            "__meta_kubernetes_pod_node_name": pod["spec"].get("nodeName", ""),
        }
        for key, value in (meta.get("labels") or {}).items():
            labels[f"__meta_kubernetes_pod_label_{_label_name(key)}"] = value
            labels[f"__meta_kubernetes_pod_labelpresent_{_label_name(key)}"] = "true"
        for key, value in (meta.get("annotations") or {}).items():
            labels[f"__meta_kubernetes_pod_annotation_{_label_name(key)}"] = value
            labels[f"__meta_kubernetes_pod_annotationpresent_{_label_name(key)}"] = "true"
        for container in pod["spec"]["containers"]:
            for port in container.get("ports") or []:
                number = port["containerPort"]
                groups.append(
                    {
                        "targets": [f"{status['podIP']}:{number}"],
                        "labels": {
                            **labels,
                            "__meta_kubernetes_pod_container_name": container["name"],
                            "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                            "__meta_kubernetes_pod_container_port_number": str(number),
                        },
                    }
                )
    return groups


def monitored_pods(monitor: Obj, pods: list[Obj]) -> list[Obj]:
    """The pods of the namespaces a PodMonitor's namespaceSelector names."""
    selector = monitor["spec"].get("namespaceSelector") or {}
    if selector.get("any"):
        return pods
    names = set(selector.get("matchNames") or [monitor["metadata"]["namespace"]])
    return [p for p in pods if p["metadata"]["namespace"] in names]


def podmonitor_jobs(monitor: Obj, targets_file: str) -> list[Obj]:
    """The Prometheus scrape jobs of one PodMonitor, as the Prometheus operator
    generates them: the discovered pods (`targets_file`), kept by the pod label
    selector and the endpoint's port name, running pods only, the target labels
    namespace/pod/container/job/endpoint, then the endpoint's relabelings."""
    meta, spec = monitor["metadata"], monitor["spec"]
    selector = spec.get("selector") or {}
    unsupported = set(selector) - {"matchLabels"}
    assert not unsupported, f"{meta['name']}: selector {sorted(unsupported)} not translated"
    keep_labels = [
        {
            "action": "keep",
            "source_labels": [
                f"__meta_kubernetes_pod_label_{_label_name(key)}",
                f"__meta_kubernetes_pod_labelpresent_{_label_name(key)}",
            ],
            "regex": f"({re.escape(str(value))});true",
        }
        for key, value in sorted((selector.get("matchLabels") or {}).items())
    ]
    jobs = []
    for index, endpoint in enumerate(spec["podMetricsEndpoints"]):
        relabel = [
            *keep_labels,
            {
                "action": "drop",
                "source_labels": ["__meta_kubernetes_pod_phase"],
                "regex": "(Failed|Succeeded)",
            },
            {
                "action": "keep",
                "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                "regex": endpoint["port"],
            },
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {
                "source_labels": ["__meta_kubernetes_pod_container_name"],
                "target_label": "container",
            },
            {"target_label": "job", "replacement": f"{meta['namespace']}/{meta['name']}"},
            {"target_label": "endpoint", "replacement": endpoint["port"]},
        ]
        for step in endpoint.get("relabelings") or []:
            unknown = set(step) - set(RELABEL_KEYS)
            assert not unknown, f"{meta['name']}: relabeling {sorted(unknown)} not translated"
            relabel.append({RELABEL_KEYS[key]: value for key, value in step.items()})
        job: Obj = {
            "job_name": f"podMonitor/{meta['namespace']}/{meta['name']}/{index}",
            "file_sd_configs": [{"files": [targets_file]}],
            "metrics_path": endpoint.get("path", "/metrics"),
            "relabel_configs": relabel,
        }
        if endpoint.get("interval"):
            job["scrape_interval"] = endpoint["interval"]
            job["scrape_timeout"] = endpoint["interval"]
        jobs.append(job)
    return jobs


def prometheus_objects(
    image: str, files: dict[str, str], node_selector: dict[str, str]
) -> list[Obj]:
    """A Prometheus pod as a user runs one: its own namespace, the scraper label,
    Pod Security `restricted`; `files` (prometheus.yml and the targets) from a
    ConfigMap."""
    labels = {"app": PROMETHEUS, SCRAPER_LABEL: "true"}
    pod = restricted_pod(
        PROMETHEUS,
        SCRAPER_NAMESPACE,
        labels,
        [
            "/bin/prometheus",
            f"--config.file={CONFIG_DIR}/prometheus.yml",
            "--storage.tsdb.path=/prometheus",
            "--storage.tsdb.retention.time=1h",
            f"--web.listen-address=$(POD_IP):{PROMETHEUS_PORT}",
            "--log.level=warn",
        ],
        image=image,
    )
    spec = pod["spec"]
    spec.update(
        {
            "restartPolicy": "Always",
            "nodeSelector": node_selector,
            "volumes": [
                {"name": "config", "configMap": {"name": PROMETHEUS}},
                {"name": "data", "emptyDir": {"sizeLimit": "1Gi"}},
            ],
        }
    )
    container = spec["containers"][0]
    container.update(
        {
            "name": PROMETHEUS,
            "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
            "ports": [{"name": "web", "containerPort": PROMETHEUS_PORT}],
            "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}},
            "volumeMounts": [
                {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                {"name": "data", "mountPath": "/prometheus"},
            ],
        }
    )
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": PROMETHEUS, "namespace": SCRAPER_NAMESPACE},
            "data": files,
        },
        pod,
    ]


def nowhere_objects(mirror: str, sha256: str) -> list[Obj]:
    """A pool whose node selector matches no node, and a model in it."""
    examples = parts.REPO_ROOT / "manifests" / "examples"
    pool = yaml.safe_load((examples / "cpu-pool.yaml").read_text())
    pool["metadata"]["name"] = NOWHERE_POOL
    pool["spec"]["nodeSelector"] = {"mesh.dev/dashboards-nowhere": "true"}
    model = yaml.safe_load((examples / "model.yaml").read_text())
    model["metadata"].update({"name": NOWHERE_MODEL, "namespace": NOWHERE_NAMESPACE})
    model["spec"].update(
        {
            "poolRef": NOWHERE_POOL,
            "source": {"url": f"{mirror}/{parts.MODEL_FILE}"},
            "sha256": sha256,
            "contextSize": 512,
            "parallel": 1,
            "servedName": NOWHERE_MODEL,
            "aliases": [],
        }
    )
    return [pool, model]


def _check_config(files: dict[str, str], folder: Path) -> None:
    """promtool's check of the configuration, with the targets where it names them."""
    promtool = require_part(lambda: parts.binary("promtool"))
    config = yaml.safe_load(files["prometheus.yml"])
    for job in config["scrape_configs"]:
        for sd in job.get("file_sd_configs", []):
            sd["files"] = [str(folder / Path(f).name) for f in sd["files"]]
    for name, text in files.items():
        (folder / name).write_text(text)
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    check = subprocess.run(
        [str(promtool), "check", "config", str(folder / "prometheus.yml")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr


def _down_targets(prometheus: str) -> list[str]:
    targets = _api(prometheus, "targets", state="active")["data"]["activeTargets"]
    return [
        f"{t['labels'].get('job')} {t['scrapeUrl']}: {t['health']} {t.get('lastError', '')}"
        for t in targets
        if t["health"] != "up"
    ]


def _deleting(mesh: RealCluster, *names: str, namespace: str | None = None) -> Callable[[], str]:
    """A step of the clean-up: delete `names` (kind/name) without waiting."""
    args = ["delete", "--ignore-not-found", *(["-n", namespace] if namespace else []), *names]
    return functools.partial(mesh.kubectl, *args, "--wait=false", check=False)


@pytest.fixture(scope="module")
def stack(
    shared_real_cluster: SharedRealCluster,
    tmp_path_factory: pytest.TempPathFactory,
    model_file: Path,
) -> Iterator[Stack]:
    require_part(lambda: parts.binary("prometheus"))
    mesh: RealCluster = shared_real_cluster.mesh
    logs = tmp_path_factory.mktemp("dashboards")
    bridge = mesh.nodes.plan.host_address
    undo: list[Callable[[], object]] = []
    try:
        # The GPU node: a simulated Node with one GPU, its agent a local process.
        mesh.cluster.add_kwok_node(GPU_NODE, gpus=1)
        undo.append(_deleting(mesh, f"node/{GPU_NODE}", f"meshnode/{GPU_NODE}"))
        gpu_port = free_port()
        gpu_agent = MeshProcess(
            ["agent"],
            logs / "agent-gpu.log",
            {
                "KUBECONFIG": str(mesh.cluster.kubeconfig),
                "NODE_NAME": GPU_NODE,
                "MESH_AGENT_LISTEN": f"{bridge}:{gpu_port}",
                "MESH_AGENT_INTERVAL": "2",
                "MESH_AGENT_STATE_DIR": str(logs / "gpu-state"),
                "MESH_AGENT_NVML_MODULE": "tests.fixtures.nvml.double:from_env",
                "MESH_FAKE_NVML": "rtx-4090",
                # A board that keeps failing: XID 48 (double-bit ECC) every 4 s.
                "MESH_FAKE_NVML_XID_EVERY": XID_EVERY,
                "MESH_FAKE_NVML_UTILIZATION": GPU_BUSY,
                # An RPC server the agent probes where none listens.
                "MESH_AGENT_RPC_SERVERS": f"{bridge}:{free_port()}",
                "MESH_AGENT_MODEL_CACHE": str(model_file.parent),
                # No pod runs on the simulated node: nothing to discover.
                "MESH_AGENT_DISCOVER_RPC": "false",
            },
        )
        undo.append(gpu_agent.stop)

        monitors = mesh.get("podmonitors", "-n", NAMESPACE)["items"]
        names = {m["metadata"]["name"] for m in monitors}
        assert names == {f"{RELEASE}-{c}" for c in ("operator", "agent", "gateway", "llama-server")}
        pods = mesh.get("pods", "-A")["items"]
        files: dict[str, str] = {}
        jobs = []
        for monitor in monitors:
            name = f"targets-{monitor['metadata']['name']}.json"
            files[name] = json.dumps(discovered_targets(monitored_pods(monitor, pods)))
            jobs += podmonitor_jobs(monitor, f"{CONFIG_DIR}/{name}")
        gpu_target = f"{bridge}:{gpu_port}"
        jobs.append({"job_name": GPU_JOB, "static_configs": [{"targets": [gpu_target]}]})
        config = {
            "global": {
                "scrape_interval": f"{SCRAPE_SECONDS}s",
                "scrape_timeout": f"{SCRAPE_SECONDS}s",
            },
            "scrape_configs": jobs,
        }
        files["prometheus.yml"] = yaml.safe_dump(config)
        _check_config(files, logs)
        image = prometheus_image(mesh.nodes.registry)
        objects = prometheus_objects(image, files, {SYSTEM_LABEL: "system"})
        undo.append(
            _deleting(
                mesh, f"pod/{PROMETHEUS}", f"configmap/{PROMETHEUS}", namespace=SCRAPER_NAMESPACE
            )
        )
        for obj in objects:
            mesh.apply(obj)

        def prometheus_url() -> str | None:
            pod = mesh.get("pod", PROMETHEUS, "-n", SCRAPER_NAMESPACE) or {}
            address = (pod.get("status") or {}).get("podIP")
            if not address:
                return None
            url = f"http://{address}:{PROMETHEUS_PORT}"
            return url if http_ok(f"{url}/-/ready") else None

        url = wait_for("Prometheus' pod to be ready", prometheus_url, timeout=180)
        started = time.time()
        # The operator, the gateway, two agents, two hosts and the GPU agent.
        wanted = 7

        def all_up() -> bool:
            result = _query(url, "up")["data"]["result"]
            return len(result) == wanted and all(r["value"][1] == "1" for r in result)

        try:
            wait_for("every target scraped and up", all_up, timeout=90)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {_down_targets(url)}") from exc
        up = _query(url, "up")["data"]["result"]
        scraped = {r["metric"].get("pod", r["metric"]["instance"]): r["metric"]["job"] for r in up}

        # Everything below happens while Prometheus watches, as on a live system.
        wait_for(
            "the GPU agent's MeshNode",
            lambda: (mesh.get("meshnode", GPU_NODE) or {}).get("status", {}).get("devices"),
            timeout=60,
        )
        mesh.namespace(NOWHERE_NAMESPACE, None)
        undo.append(_deleting(mesh, f"namespace/{NOWHERE_NAMESPACE}"))
        undo.append(_deleting(mesh, f"meshpool/{NOWHERE_POOL}"))
        for obj in nowhere_objects(shared_real_cluster.mirror, shared_real_cluster.sha256):
            mesh.apply(obj)

        def no_capacity() -> bool:
            model = mesh.get("meshmodel", NOWHERE_MODEL, "-n", NOWHERE_NAMESPACE) or {}
            return any(
                c["type"] == "Planned" and c.get("reason") == "NoCapacity"
                for c in (model.get("status") or {}).get("conditions", [])
            )

        wait_for("the operator to find no room for the model of no node", no_capacity, 120)

        # The GPU agent reported: from now on its MeshNode writes are refused,
        # and its heartbeat grows old while it keeps serving its metrics.
        undo.append(_deleting(mesh, f"validatingadmissionpolicy/{STALE_POLICY}",
                              f"validatingadmissionpolicybinding/{STALE_POLICY}"))  # fmt: skip
        for obj in refusing_policy(
            STALE_POLICY, "meshnodes/status", f"object.metadata.name != '{GPU_NODE}'"
        ):
            mesh.apply(obj)
        stale_from = time.monotonic()

        # A model whose status the API server refuses: its reconcile fails.
        undo.append(_deleting(mesh, f"validatingadmissionpolicy/{REFUSED_POLICY}",
                              f"validatingadmissionpolicybinding/{REFUSED_POLICY}"))  # fmt: skip
        for obj in refusing_policy(
            REFUSED_POLICY,
            "meshmodels/status",
            f"!(object.metadata.namespace == '{NOWHERE_NAMESPACE}' && "
            f"object.metadata.name.startsWith('{REFUSED_PREFIX}'))",
        ):
            mesh.apply(obj)
        refused = functools.partial(
            refused_model, shared_real_cluster.mirror, shared_real_cluster.sha256
        )
        # The policy takes a moment to be in force: a model reconciled before
        # would have its status stored, and no error. The first model is the probe.
        mesh.apply(refused(f"{REFUSED_PREFIX}-0"))

        def refusing() -> bool:
            run = mesh.kubectl_run(
                "patch", "meshmodel", f"{REFUSED_PREFIX}-0", "-n", NOWHERE_NAMESPACE,
                "--subresource=status", "--type=merge", "--dry-run=server",
                "-p", json.dumps({"status": {"nodes": "dry-run"}}),
            )  # fmt: skip
            return run.returncode != 0 and "refused by the dashboards test" in run.stderr

        wait_for("the API server to refuse the models' status", refusing, timeout=60)
        mesh.apply(refused(f"{REFUSED_PREFIX}-1"))

        # Traffic through the gateway's pod, plain and streamed (time to first
        # token, inter-token latency), in two rounds: a series born with a request
        # only shows a rate once a later request moves it.
        (gateway,) = mesh.release_pods("gateway")
        chat = f"http://{gateway['status']['podIP']}:8000/v1/chat/completions"

        sent = itertools.count()

        def requests(models: tuple[Model, ...], count: int = 1) -> None:
            for model in models:
                for stream in (False, True):
                    for _ in range(count):
                        # Distinct prompts: the gateway routes by prompt prefix, so
                        # one prompt would always prefer the same host.
                        body = {
                            "model": model.name,
                            "messages": [
                                {"role": "user", "content": f"Name a colour ({next(sent)})."}
                            ],
                            "max_tokens": 8,
                            "stream": stream,
                        }
                        assert _post(chat, body)

        for _round in range(2):
            requests(MODELS)
            time.sleep(3 * SCRAPE_SECONDS)

        # A burst: more streams than the hosts have slots, long enough to span
        # scrapes: requests wait in the gateway, in flight, and busy in llama-server.
        def long_stream(model: Model) -> None:
            body = {
                "model": model.name,
                "messages": [{"role": "user", "content": "Tell a long story."}],
                "max_tokens": BURST_TOKENS,
                "stream": True,
            }
            assert _post(chat, body)

        with ThreadPoolExecutor(len(MODELS) * BURST_STREAMS) as pool:
            for done in [pool.submit(long_stream, m) for m in MODELS for _ in range(BURST_STREAMS)]:
                done.result(timeout=300)
        time.sleep(2 * SCRAPE_SECONDS)

        # A failing host beside the served model's own, for two rounds: distinct
        # prompts hash to either (prefix routing), so each kind of request (plain,
        # streamed) reaches the failing host unless all 16 of that kind prefer the
        # other one (odds 2**-16).
        failing = ThreadingHTTPServer((bridge, 0), FailingHost)
        threading.Thread(target=failing.serve_forever, name="failing host", daemon=True).start()
        undo.append(failing.server_close)
        undo.append(failing.shutdown)
        failing_slice = failing_host_slice(bridge, failing.server_address[1])
        undo.append(_deleting(mesh, f"endpointslice/{failing_slice['metadata']['name']}",
                              namespace=MODEL.namespace))  # fmt: skip
        FailingHost.health_checks = 0
        mesh.apply(failing_slice)
        wait_for("the gateway to probe the failing host", lambda: FailingHost.health_checks, 60)
        time.sleep(1)
        for _round in range(2):
            requests((MODEL,), count=8)
            time.sleep(3 * SCRAPE_SECONDS)
        _deleting(mesh, f"endpointslice/{failing_slice['metadata']['name']}",
                  namespace=MODEL.namespace)()  # fmt: skip

        # A second refused model once the first one's error was scraped: the
        # error counter moves within the window.
        wait_for(
            "the first refused reconcile to be scraped",
            lambda: _query(url, 'mesh_operator_reconciles_total{outcome="error"}')["data"][
                "result"
            ],
            timeout=120,
        )
        time.sleep(2 * SCRAPE_SECONDS)
        mesh.apply(refused(f"{REFUSED_PREFIX}-2"))

        def moved(expr: str) -> bool:
            return any(float(r["value"][1]) > 0 for r in _query(url, expr)["data"]["result"])

        for what, expr in (
            (
                "reconcile errors",
                'sum(increase(mesh_operator_reconciles_total{outcome="error"}[1h]))',
            ),
            ("XIDs", f'sum(increase(mesh_gpu_xid_errors_total{{node="{GPU_NODE}"}}[1h]))'),
            ("502 answers", 'sum(increase(mesh_gateway_requests_total{status="502"}[1h]))'),
            ("retries", "sum(increase(mesh_gateway_retries_total[1h]))"),
        ):
            wait_for(f"{what} to increase in Prometheus", functools.partial(moved, expr), 120)
        # The heartbeat: older than 30 s once the last write before the policy is.
        time.sleep(max(0.0, STALE_SECONDS + 2 * SCRAPE_SECONDS - (time.monotonic() - stale_from)))
        wait_for(
            "the GPU node's heartbeat to be stale",
            lambda: moved(
                f'mesh_node_heartbeat_age_seconds{{node="{GPU_NODE}"}} > {STALE_SECONDS}'
            ),
            timeout=90,
        )
        # Rates need two samples after the last change.
        time.sleep(3 * SCRAPE_SECONDS)
        model = mesh.get("meshmodel", MODEL.name, "-n", MODEL.namespace) or {}
        planned = sorted(
            {d["node"] for d in (model.get("status") or {}).get("plan", {}).get("devices", [])}
        )
        yield Stack(url, f"{MODEL.namespace}/{MODEL.name}", scraped, planned, started)
        assert gpu_agent.alive(), gpu_agent.output()[-3000:]
        assert "Traceback" not in gpu_agent.output(), gpu_agent.output()[-5000:]
    finally:
        for step in reversed(undo):
            step()


def test_prometheus_scrapes_the_pods_the_chart_names(
    stack: Stack, shared_real_cluster: SharedRealCluster
) -> None:
    mesh = shared_real_cluster.mesh
    expected = {
        p["metadata"]["name"]: f"{NAMESPACE}/{RELEASE}-{component}"
        for component in ("operator", "gateway", "agent")
        for p in mesh.release_pods(component)
    }
    for model in MODELS:
        for pod in mesh.model_pods(model, "host"):
            expected[pod["metadata"]["name"]] = f"{NAMESPACE}/{RELEASE}-llama-server"
    pods = {name: job for name, job in stack.scraped_pods.items() if job != GPU_JOB}
    assert pods == expected
    assert list(stack.scraped_pods.values()).count(GPU_JOB) == 1


def _panels() -> list[tuple[str, str, str]]:
    found = []
    for path in sorted((CHART / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                found.append((path.stem, panel["title"], target["expr"]))
    return found


def _expand(expr: str) -> str:
    for macro, value in MACROS.items():
        expr = expr.replace(macro, value)
    return VARIABLE_RE.sub(".*", expr)


def test_every_panel_query_returns_data(stack: Stack) -> None:
    """Each query over the test's time range (as its panel draws it) returns a
    series of its own with a finite value other than 0 at some point."""
    queries = _panels()
    assert len(queries) == QUERIES
    # A fallback holds whether or not the metric exists: no query may have one.
    assert not [expr for _, _, expr in queries if "vector(" in expr]
    empty = []
    zero = set()
    for board, title, expr in queries:
        answer = _query_range(stack.prometheus, _expand(expr), stack.started)
        if answer.get("status") != "success":
            empty.append(f"{board} / {title}: {answer.get('error')}  [{expr}]")
            continue
        values = [float(v) for r in answer["data"]["result"] for _, v in r["values"]]
        exempt = [why for (b, t, part), why in ALWAYS_ZERO.items()
                  if (b, t) == (board, title) and part in expr]  # fmt: skip
        if exempt:
            zero.add((board, title))
            if not values or any(v != 0 for v in values):
                empty.append(f"{board} / {title}: expected a series of zeros ({exempt[0]}), "
                             f"got {sorted(set(values))[:5]}  [{expr}]")  # fmt: skip
            continue
        if not any(math.isfinite(v) and v != 0 for v in values):
            empty.append(f"{board} / {title}: no value other than 0 ({sorted(set(values))[:5]})"
                         f"  [{expr}]")  # fmt: skip
    assert not empty, "\n".join(empty)
    assert zero == {(b, t) for b, t, _ in ALWAYS_ZERO}


def test_usage_per_key_and_per_node_in_prometheus(stack: Stack) -> None:
    """The per-node counter follows the plan: the served model's tokens on exactly
    its plan's nodes, and the nodes' shares add up to the model's tokens."""
    assert stack.planned_nodes
    model = stack.model_label

    def by(expr: str, label: str) -> dict[str, float]:
        result = _query(stack.prometheus, expr)["data"]["result"]
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in result}

    nodes = by(f'sum by (node) (mesh_gateway_node_tokens_total{{model="{model}"}})', "node")
    assert sorted(nodes) == stack.planned_nodes
    total = by(f'sum by (model) (mesh_gateway_tokens_total{{model="{model}"}})', "model")
    assert total[model] > 0
    assert sum(nodes.values()) == pytest.approx(total[model])
    keys = by(f'sum by (key) (mesh_gateway_key_tokens_total{{model="{model}"}})', "key")
    assert keys == {"-": total[model]}


def test_mesh_status_reads_usage_from_the_gateway_pods(
    stack: Stack, shared_real_cluster: SharedRealCluster
) -> None:
    mesh = shared_real_cluster.mesh
    done = subprocess.run(
        [sys.executable, "-m", "mesh_operator.cli.main", "status", "-o", "json"],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "KUBECONFIG": str(mesh.cluster.kubeconfig)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    usage = json.loads(done.stdout)["usage"]
    gateways = len(mesh.release_pods("gateway"))
    assert usage["available"] is True, usage["problems"]
    assert (usage["gateways"], usage["gatewaysRead"], usage["problems"]) == (gateways, gateways, [])
    models = {m["name"]: m for m in usage["models"]}
    assert models[stack.model_label]["promptTokens"] > 0
    assert models[stack.model_label]["completionTokens"] > 0
    assert [k["name"] for k in usage["keys"]] == ["-"]
    assert set(stack.planned_nodes) <= {n["name"] for n in usage["nodes"]}
    # What the gateway counted, as Prometheus last scraped it: at least that much
    # (later scrapes may have seen nothing new).
    scraped = _query(
        stack.prometheus, f'sum(mesh_gateway_tokens_total{{model="{stack.model_label}"}})'
    )["data"]["result"]
    shown = models[stack.model_label]
    assert shown["promptTokens"] + shown["completionTokens"] >= float(scraped[0]["value"][1])


def test_every_variable_lists_values(stack: Stack) -> None:
    for path in sorted((CHART / "dashboards").glob("*.json")):
        for variable in json.loads(path.read_text())["templating"]["list"]:
            if variable["type"] != "query":
                continue
            metric, label = LABEL_VALUES_RE.fullmatch(variable["definition"]).groups()  # type: ignore[union-attr]
            values = _api(stack.prometheus, f"label/{label}/values", **{"match[]": metric})["data"]
            assert values, f"{path.stem}: variable {variable['name']} lists nothing"
            if variable["name"] == "model":
                assert stack.model_label in values
