"""Every panel of every Grafana dashboard returns data on a working installation.

Real processes expose real /metrics: two `mesh agent`s (a CPU node, and a GPU node
from the recorded NVML answers of an RTX 4090, probing a real ggml-rpc-server),
`mesh operator` planning a model from the node agent's report on the local
control plane, a real `llama-server --metrics` with gemma-3-270m and `mesh gateway`
in front of it, sent a few requests (streamed and not). A real Prometheus (Debian's
package) scrapes them every second; each query of each panel must parse and return
a value, and each variable's query some label values.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e import parts
from e2e.cluster import LocalCluster
from e2e.fileserver import serve_directory
from e2e.gateway import GatewayProcess, start_gateway
from e2e.llama import LlamaProcess, start_llama_server, start_rpc_server
from e2e.waiting import free_port, wait_for
from tests.conftest import require_part
from tests.integration.chart_support import (
    CHART,
    MeshProcess,
    http_ok,
)
from tests.integration.kube_helpers import apply_pool_and_model, condition, get

pytestmark = pytest.mark.integration

MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
SCRAPE_SECONDS = 1
# What the panels' Grafana macros stand for here: the whole test fits in the window.
MACROS = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "5s"}
VARIABLE_RE = re.compile(r"\$\{?(node|model)\}?")
LABEL_VALUES_RE = re.compile(r"label_values\((\w+),\s*(\w+)\)")


@dataclass
class Stack:
    prometheus: str
    gateway: GatewayProcess
    model_label: str


def _post(url: str, body: dict[str, Any]) -> bytes:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=180) as answer:
        data: bytes = answer.read()
        return data


def _query(prometheus: str, expr: str) -> dict[str, Any]:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            result: dict[str, Any] = json.loads(answer.read())
            return result
    except urllib.error.HTTPError as exc:  # 400: the query does not parse
        failed: dict[str, Any] = json.loads(exc.read())
        return failed


def _prometheus_config(targets: dict[str, list[str]], model_label: str) -> dict[str, Any]:
    jobs = []
    for job, addresses in targets.items():
        config: dict[str, Any] = {"job_name": job, "static_configs": [{"targets": addresses}]}
        if job == "llama-server":
            # As the chart's PodMonitor relabels host pods: the gateway's model label.
            config["static_configs"][0]["labels"] = {"model": model_label}
        jobs.append(config)
    return {
        "global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "scrape_timeout": "900ms"},
        "scrape_configs": jobs,
    }


@pytest.fixture(scope="module")
def stack(
    crds: LocalCluster,
    tmp_path_factory: pytest.TempPathFactory,
    llama_server_bin: Path,
    rpc_server_bin: Path,
    model_file: Path,
) -> Iterator[Stack]:
    prometheus_bin = require_part(lambda: parts.binary("prometheus"))
    promtool = require_part(lambda: parts.binary("promtool"))
    cluster = crds
    logs = tmp_path_factory.mktemp("dashboards")
    suffix = uuid.uuid4().hex[:6]
    gpu_node, cpu_node, pool = f"dash-gpu-{suffix}", f"dash-cpu-{suffix}", f"dash-{suffix}"
    namespace = f"dash-{suffix}"
    cluster.add_kwok_node(gpu_node, gpus=1, labels={"mesh-dash-pool": suffix})
    cluster.kubectl("create", "namespace", namespace)
    kube = {"KUBECONFIG": str(cluster.kubeconfig)}
    stoppers: list[Any] = []
    try:
        rpc = start_rpc_server(logs)
        stoppers.append(rpc.stop)
        ports = {name: free_port() for name in ("gpu", "cpu", "health", "metrics")}
        common = {
            **kube,
            "MESH_AGENT_INTERVAL": "2",
            # Agents find RPC servers from pods, here at kwok's made-up pod IPs
            # that no test may send packets to: only the local server is probed.
            "MESH_AGENT_DISCOVER_RPC": "false",
            "MESH_AGENT_BANDWIDTH_MIB": "16",
            "MESH_AGENT_BANDWIDTH_STREAMS": "1",
        }
        gpu_agent = MeshProcess(
            ["agent"],
            logs / "agent-gpu.log",
            {
                **common,
                "NODE_NAME": gpu_node,
                "MESH_AGENT_LISTEN": f"127.0.0.1:{ports['gpu']}",
                "MESH_AGENT_STATE_DIR": str(logs / "gpu-state"),
                "MESH_AGENT_NVML_MODULE": "tests.fixtures.nvml.double:from_env",
                "MESH_FAKE_NVML": "rtx-4090",
                "MESH_AGENT_RPC_SERVERS": f"{namespace}/gemma={rpc.address}",
                "MESH_AGENT_MODEL_CACHE": str(model_file.parent),
            },
        )
        stoppers.append(gpu_agent.stop)
        cpu_agent = MeshProcess(
            ["agent"],
            logs / "agent-cpu.log",
            {
                **common,
                "NODE_NAME": cpu_node,
                "MESH_AGENT_LISTEN": f"127.0.0.1:{ports['cpu']}",
                "MESH_AGENT_STATE_DIR": str(logs / "cpu-state"),
                "MESH_AGENT_BACKEND": "cpu",
            },
        )
        stoppers.append(cpu_agent.stop)
        operator = MeshProcess(
            [
                "operator",
                f"--health-address=127.0.0.1:{ports['health']}",
                f"--metrics-address=127.0.0.1:{ports['metrics']}",
            ],
            logs / "operator.log",
            {**kube, "MESH_MODEL_INTERVAL": "1", "MESH_POOL_INTERVAL": "1"},
        )
        stoppers.append(operator.stop)
        leftovers = [f"meshpool/{pool}", f"node/{gpu_node}", f"meshnode/{gpu_node}"]
        leftovers.append(f"meshnode/{cpu_node}")
        stoppers.append(
            lambda: cluster.kubectl(
                "delete", *leftovers, "--ignore-not-found", "--wait=false", check=False
            )
        )
        stoppers.append(
            lambda: cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        )

        host: LlamaProcess = start_llama_server(
            logs, ["-m", str(model_file), "-c", "512", "-t", "1", "--metrics"]
        )
        stoppers.append(host.stop)
        gateway = start_gateway(logs, ["--backend", f"gemma={host.url}"])
        stoppers.append(gateway.stop)

        config = logs / "prometheus.yml"
        model_label = "default/gemma"
        targets = {
            "mesh-agent": [f"127.0.0.1:{ports['gpu']}", f"127.0.0.1:{ports['cpu']}"],
            "mesh-operator": [f"127.0.0.1:{ports['metrics']}"],
            "mesh-gateway": [f"127.0.0.1:{gateway.port}"],
            "llama-server": [host.address],
        }
        config.write_text(yaml.safe_dump(_prometheus_config(targets, model_label)))
        check = subprocess.run(
            [str(promtool), "check", "config", str(config)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
        web = f"127.0.0.1:{free_port()}"
        with (logs / "prometheus.log").open("wb") as out:
            prometheus = subprocess.Popen(
                [
                    str(prometheus_bin),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={logs / 'tsdb'}",
                    f"--web.listen-address={web}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

        def stop_prometheus() -> None:
            prometheus.terminate()
            try:
                prometheus.wait(30)
            except subprocess.TimeoutExpired:
                prometheus.kill()
                prometheus.wait()

        stoppers.append(stop_prometheus)
        url = f"http://{web}"
        wait_for("Prometheus to be ready", lambda: http_ok(f"{url}/-/ready"), timeout=60)

        def all_up() -> bool:
            result = _query(url, "up")["data"]["result"]
            return len(result) == 5 and all(r["value"][1] == "1" for r in result)

        wait_for("every target scraped and up", all_up, timeout=60)
        # Everything below happens while Prometheus watches, as on a live system.
        # The operator plans a model onto the GPU node its agent reports.
        wait_for(
            "the GPU agent's MeshNode",
            lambda: (get(cluster, "meshnode", gpu_node) or {}).get("status", {}).get("devices"),
            timeout=60,
        )
        with serve_directory(model_file.parent) as base:
            apply_pool_and_model(
                cluster,
                pool=pool,
                node_selector={"mesh-dash-pool": suffix},
                namespace=namespace,
                model="gemma",
                url=f"{base}/{MODEL_FILE}",
                context_size=512,
            )

            def planned() -> bool:
                assert operator.alive(), operator.output()[-3000:]
                cond = condition(get(cluster, "meshmodel", "gemma", "-n", namespace), "Planned")
                return bool(cond and cond["status"] == "True")

            wait_for("the operator's plan", planned, timeout=120)

        # Traffic through the gateway, plain and streamed (time to first token,
        # inter-token latency), in two rounds: a series born with a request only
        # shows a rate once a later request moves it.
        chat = f"{gateway.url}/v1/chat/completions"
        for _round in range(2):
            for stream in (False, True):
                body = {
                    "model": "gemma",
                    "messages": [{"role": "user", "content": "Name a colour."}],
                    "max_tokens": 8,
                    "stream": stream,
                }
                assert _post(chat, body)
            time.sleep(3 * SCRAPE_SECONDS)

        # Rates need two samples after the last change.
        time.sleep(3 * SCRAPE_SECONDS)
        yield Stack(url, gateway, model_label)
        for process in (gpu_agent, cpu_agent, operator):
            assert process.alive(), process.output()[-3000:]
            assert "Traceback" not in process.output(), process.output()[-5000:]
    finally:
        for stop in reversed(stoppers):
            stop()


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
            url = f"{stack.prometheus}/api/v1/label/{label}/values?" + urllib.parse.urlencode(
                {"match[]": metric}
            )
            with urllib.request.urlopen(url, timeout=30) as answer:
                values = json.loads(answer.read())["data"]
            assert values, f"{path.stem}: variable {variable['name']} lists nothing"
            if variable["name"] == "model":
                assert stack.model_label in values
