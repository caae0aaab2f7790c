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

While Prometheus watches, requests go through the gateway's pod (plain and
streamed) and a MeshModel that no node can hold is planned again and again: the
served models were planned before Prometheus started, and the plan latency panels
need plans within their window. Each query of each panel must parse and return a
value, and each variable's query some label values.
"""

from __future__ import annotations

import functools
import json
import math
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
    RealCluster,
    SharedRealCluster,
    restricted_pod,
)
from e2e.scenario import NAMESPACE, SYSTEM_LABEL
from e2e.waiting import free_port, wait_for
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

        # Traffic through the gateway's pod, plain and streamed (time to first
        # token, inter-token latency), in two rounds: a series born with a request
        # only shows a rate once a later request moves it.
        (gateway,) = mesh.release_pods("gateway")
        chat = f"http://{gateway['status']['podIP']}:8000/v1/chat/completions"
        for _round in range(2):
            for model in MODELS:
                for stream in (False, True):
                    body = {
                        "model": model.name,
                        "messages": [{"role": "user", "content": "Name a colour."}],
                        "max_tokens": 8,
                        "stream": stream,
                    }
                    assert _post(chat, body)
            time.sleep(3 * SCRAPE_SECONDS)
        # Rates need two samples after the last change.
        time.sleep(3 * SCRAPE_SECONDS)
        yield Stack(url, f"{MODEL.namespace}/{MODEL.name}", scraped)
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
    queries = _panels()
    assert len(queries) > 50
    empty = []
    for board, title, expr in queries:
        answer = _query(stack.prometheus, _expand(expr))
        if answer.get("status") != "success":
            empty.append(f"{board} / {title}: {answer.get('error')}  [{expr}]")
            continue
        values = [float(r["value"][1]) for r in answer["data"]["result"]]
        if not any(math.isfinite(v) for v in values):
            empty.append(f"{board} / {title}: no data ({values})  [{expr}]")
    assert not empty, "\n".join(empty)


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
