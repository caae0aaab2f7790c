"""The end-to-end scenario: from `helm install mesh` to a chat answer that survives
losing a node, on one machine.

Test infrastructure driving the real product. A local control plane
(`e2e.cluster`) and real nodes (`e2e.nodes`: kubelet, containerd, runc, CNI,
kube-proxy, kube-router, CoreDNS); the project's images, built from its
Dockerfiles, pushed to the local registry that the nodes' runtimes use as the
mirror of the chart's default registry, so the chart's default image names are
what gets pulled; the chart installed with helm; the CPU pool example capped so
that gemma-3-270m needs two nodes; the model served from a local mirror (no hub
access here); the official `openai` client talking to the gateway. Then one
planned node is lost (its link cut) while a client sends a request every 0.5 s,
and the model is deleted. Used by `e2e/test_scenario.py` and by the README's main
command (`make demo` -> `python -m e2e.demo`).
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import yaml
from openai import OpenAI

from e2e import parts
from e2e.cluster import LocalCluster
from e2e.fileserver import serve_directory
from e2e.llama import start_llama_server
from e2e.nodes import RealNodes, chart_images
from e2e.waiting import wait_for

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
NAMESPACE = "mesh-system"
AGENT_NAMESPACE = "mesh-agents"
MODEL_NAMESPACE = "ai"
MODEL = "gemma-3-270m"
POOL_LABEL = "mesh.dev/cpu-pool"
SYSTEM_LABEL = "mesh.dev/role"
POOL_NODES = ("node-a", "node-b", "node-c")
SYSTEM_NODE = "node-system"
# Capacity the pool may plan on each node (the nodes share this machine's memory,
# so the agents all report the same; the pool caps it). gemma-3-270m at this
# context needs about 300 MiB over its devices: two nodes, not one.
DEVICE_CAP_MIB = 280
CONTEXT = 2048
PROMPT = "What is the capital of France?"
# The model is the base gemma-3-270m, not an instruction-tuned one: the same
# question as a text to carry on (/v1/completions, no chat template) is one it answers.
COMPLETION_PROMPT = f"Question: {PROMPT}\nAnswer:"
NODE_GRACE_SECONDS = 20
# The model namespace's Pod Security level (docs/install.md): the pool's RPC and
# model caches are hostPath volumes, which only `privileged` admits.
MODEL_POD_SECURITY = "privileged"


class ScenarioError(RuntimeError):
    """A step of the scenario failed (a wait that runs out raises WaitTimeout)."""


@dataclass
class Figures:
    """What the scenario measured, written to the report and the README."""

    apply_to_ready_seconds: float = 0.0
    apply_to_first_token_seconds: float = 0.0
    node_loss_to_serving_seconds: float = 0.0
    # Where that time went, from the MeshModel's conditions (1 s resolution):
    # seconds after the loss at which the model was re-planned, its new workers
    # were Ready, and its host answered /health.
    loss_timeline: dict[str, float] = field(default_factory=dict)
    requests_during_loss: int = 0
    errors_during_loss: int = 0
    max_latency_during_loss_seconds: float = 0.0
    split_tokens_per_second: float = 0.0
    solo_tokens_per_second: float = 0.0
    # Images the kubelets pulled (Pulled events "Successfully pulled image ...").
    images_pulled: list[str] = field(default_factory=list)
    # Time the kubelets spent pulling the model's images (all its pods, summed):
    # inside apply-to-first-token, shown apart.
    model_pull_seconds: float = 0.0
    nodes_up_seconds: float = 0.0
    install_to_ready_seconds: float = 0.0
    planned_nodes: list[str] = field(default_factory=list)
    replanned_nodes: list[str] = field(default_factory=list)
    lost_node: str = ""
    # Planned nodes whose agent reported the model's RPC server answering.
    agents_saw_workers: list[str] = field(default_factory=list)
    answer: str = ""
    streamed_answer: str = ""
    completion: str = ""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Scenario:
    def __init__(self, workdir: Path, *, keep: bool = False) -> None:
        self.workdir = workdir
        self.keep = keep
        self.cluster = LocalCluster(workdir / "cluster")
        self.nodes = RealNodes(self.cluster, workdir / "nodes")
        self.figures = Figures()

    # -- helpers -------------------------------------------------------------------

    def kubectl(self, *args: str, input_text: str | None = None, check: bool = True) -> str:
        return self.cluster.kubectl(*args, input_text=input_text, check=check)

    def get(self, *args: str) -> Any:
        out = self.kubectl("get", *args, "-o", "json", check=False)
        return json.loads(out) if out.strip() else None

    def helm(self, *args: str) -> str:
        result = subprocess.run(
            [str(parts.binary("helm")), "--kubeconfig", str(self.cluster.kubeconfig), *args],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if result.returncode != 0:
            raise ScenarioError(f"helm {args[0]} failed: {result.stderr.strip()[-800:]}")
        return result.stdout

    def model(self) -> dict[str, Any] | None:
        obj: dict[str, Any] | None = self.get("meshmodel", MODEL, "-n", MODEL_NAMESPACE)
        return obj

    def ready(self) -> dict[str, Any] | None:
        obj = self.model()
        for cond in ((obj or {}).get("status") or {}).get("conditions", []):
            if cond["type"] == "Ready" and cond["status"] == "True":
                return obj
        return None

    def gateway_url(self) -> str:
        slices = self.get(
            "endpointslices", "-n", NAMESPACE, "-l", "kubernetes.io/service-name=mesh-gateway"
        )
        for item in (slices or {}).get("items", []):
            port = next((p["port"] for p in item.get("ports") or [] if p.get("port")), None)
            for ep in item.get("endpoints") or []:
                if (ep.get("conditions") or {}).get("ready") and port:
                    return f"http://{ep['addresses'][0]}:{port}"
        raise ScenarioError("the gateway has no ready endpoint")

    # -- steps -------------------------------------------------------------------------

    def start_cluster(self) -> None:
        log("starting the control plane (etcd, apiserver, controller-manager, scheduler)")
        self.cluster.up(node_monitor_grace_seconds=NODE_GRACE_SECONDS)
        log("starting real nodes (kubelet, containerd, kube-proxy, kube-router) and CoreDNS")
        started = time.monotonic()
        nodes = {SYSTEM_NODE: {SYSTEM_LABEL: "system"}}
        nodes.update({name: {POOL_LABEL: "true"} for name in POOL_NODES})
        self.nodes.up(nodes, push=chart_images())
        self.figures.nodes_up_seconds = time.monotonic() - started
        log(f"nodes Ready: {', '.join(nodes)} in {self.figures.nodes_up_seconds:.1f}s")

    def install(self) -> None:
        log("helm install mesh charts/mesh (the chart's default images)")
        # The namespaces at the Pod Security levels docs/install.md promises.
        for namespace, level in ((NAMESPACE, "restricted"), (MODEL_NAMESPACE, MODEL_POD_SECURITY)):
            self.kubectl("create", "namespace", namespace, check=False)
            self.kubectl(
                "label", "--overwrite", "namespace", namespace,
                f"pod-security.kubernetes.io/enforce={level}",
            )  # fmt: skip
        started = time.monotonic()
        self.helm(
            "install", "mesh", str(REPO / "charts" / "mesh"),
            "--namespace", NAMESPACE,
            "-f", str(REPO / "e2e" / "values-e2e.yaml"),
            "--set", f"agent.namespace={AGENT_NAMESPACE}",
            "--set", f"agent.stateDir={self.host_path('agent')}",
            "--set", f"agent.modelCache={self.host_path('models')}",
            "--wait", "--timeout", "5m",
        )  # fmt: skip
        self.figures.install_to_ready_seconds = time.monotonic() - started
        log(
            f"operator, gateway and three agents running "
            f"({self.figures.install_to_ready_seconds:.1f}s, image pulls included)"
        )

    def host_path(self, name: str) -> str:
        """A node folder for hostPath volumes: the nodes share this machine's disk,
        so the scenario keeps them in its own folder rather than under /var/lib."""
        return str(self.workdir / "hostpath" / name)

    def apply_pool(self) -> None:
        pool = yaml.safe_load((REPO / "manifests" / "examples" / "cpu-pool.yaml").read_text())
        # The example as shipped, with per-node capacity capped so the model needs
        # two of the three nodes, and one RPC thread per node (they share 2 cores).
        pool["spec"].update(
            {
                "deviceMemoryCapMiB": DEVICE_CAP_MIB,
                "rpcThreads": 1,
                "maxNodesPerModel": 3,
                "rpcCache": {"enabled": True, "hostPath": self.host_path("rpc-cache")},
                "modelCache": {"hostPath": self.host_path("models")},
            }
        )
        self.kubectl("apply", "-f", "-", input_text=json.dumps(pool))
        wait_for(
            "three fresh MeshNodes",
            lambda: (
                len(
                    [
                        n
                        for n in (self.get("meshnodes") or {}).get("items", [])
                        if (n.get("status") or {}).get("devices")
                    ]
                )
                >= len(POOL_NODES)
            ),
            timeout=120,
        )

    def apply_model(self, mirror: str, sha256: str) -> float:
        model = yaml.safe_load((REPO / "manifests" / "examples" / "model.yaml").read_text())
        model["metadata"]["namespace"] = MODEL_NAMESPACE
        spec = model["spec"]
        spec.update(
            {
                "poolRef": "cpu",
                "source": {"url": f"{mirror}/{parts.MODEL_FILE}"},
                "sha256": sha256,
                "contextSize": CONTEXT,
                "parallel": 2,
            }
        )
        self.kubectl("create", "namespace", MODEL_NAMESPACE, check=False)
        log(f"kubectl apply MeshModel {MODEL} (gemma-3-270m from the local mirror)")
        applied = time.monotonic()
        self.kubectl("apply", "-f", "-", input_text=json.dumps(model))
        obj = wait_for("the model to be Ready", self.ready, timeout=600)
        self.figures.apply_to_ready_seconds = time.monotonic() - applied
        self.figures.images_pulled = self.pulled_images()
        self.figures.model_pull_seconds = round(sum(t for _, t in self.pulls(MODEL_NAMESPACE)), 1)
        self.figures.planned_nodes = list(obj["status"]["plan"]["rpc"])
        self.figures.agents_saw_workers = wait_for(
            "the agents to report the model's RPC servers",
            lambda: self._agents_seeing_workers(self.figures.planned_nodes),
            timeout=30,
        )
        log(
            f"Ready in {self.figures.apply_to_ready_seconds:.1f}s on "
            f"{obj['status']['nodes']} (split {obj['status']['split']})"
        )
        return applied

    def pulls(self, *namespace: str) -> list[tuple[str, float]]:
        """(image, seconds) of each real pull (not an image found present), from the
        kubelets' Pulled events: "Successfully pulled image "X" in 873ms (...)"."""
        scope = ["-n", *namespace] if namespace else ["-A"]
        found = []
        for event in (self.get("events", *scope, "--field-selector", "reason=Pulled") or {}).get(
            "items", []
        ):
            match = PULLED.match(event.get("message", ""))
            if match:
                found.append((match["image"], go_duration(match["took"])))
        return found

    def pulled_images(self) -> list[str]:
        return sorted({image for image, _ in self.pulls()})

    def _agents_seeing_workers(self, nodes: list[str]) -> list[str] | None:
        seen = []
        for node in nodes:
            status = (self.get("meshnode", node) or {}).get("status") or {}
            for server in status.get("rpcServers") or []:
                if server.get("model") == f"{MODEL_NAMESPACE}/{MODEL}" and server.get("answering"):
                    seen.append(node)
        return seen if set(seen) == set(nodes) else None

    def chat(self, applied: float) -> OpenAI:
        client = OpenAI(base_url=f"{self.gateway_url()}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=24,
            temperature=0,
        )
        self.figures.apply_to_first_token_seconds = time.monotonic() - applied
        self.figures.answer = (reply.choices[0].message.content or "").strip()
        log(f"chat answer: {self.figures.answer!r}")
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=24,
            temperature=0,
            stream=True,
        )
        parts_ = [c.choices[0].delta.content or "" for c in stream if c.choices]
        self.figures.streamed_answer = "".join(parts_).strip()
        log(f"streamed answer ({len(parts_)} chunks): {self.figures.streamed_answer!r}")
        completed = client.completions.create(
            model=MODEL, prompt=COMPLETION_PROMPT, max_tokens=12, temperature=0, stop=["\n"]
        )
        self.figures.completion = completed.choices[0].text.strip()
        log(f"completion of {COMPLETION_PROMPT!r}: {self.figures.completion!r}")
        self.figures.split_tokens_per_second = self._tokens_per_second(client)
        return client

    def _tokens_per_second(self, client: OpenAI) -> float:
        rates = []
        for _ in range(3):
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Count from one to thirty in words."}],
                max_tokens=48,
                temperature=0,
            )
            body = json.loads(raw.http_response.text)
            rate = (body.get("timings") or {}).get("predicted_per_second")
            if rate:
                rates.append(float(rate))
        return statistics.median(rates) if rates else 0.0

    def lose_a_node(self, client: OpenAI) -> None:
        obj = self.model()
        assert obj is not None
        plan = obj["status"]["plan"]
        # Lose the node that hosts llama-server: the hardest case (host and a worker).
        lost = plan["hostNode"]
        self.figures.lost_node = lost
        latencies: list[float] = []
        errors: list[str] = []
        stop = threading.Event()

        def client_loop() -> None:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    client.chat.completions.create(
                        model=MODEL,
                        messages=[{"role": "user", "content": "Say yes."}],
                        max_tokens=4,
                        temperature=0,
                        timeout=180,
                    )
                    latencies.append(time.monotonic() - started)
                except Exception as exc:  # counted, not raised: the figure is the count
                    errors.append(f"{type(exc).__name__}: {exc}")
                stop.wait(max(0.0, 0.5 - (time.monotonic() - started)))

        worker = threading.Thread(target=client_loop, daemon=True)
        worker.start()
        time.sleep(2)
        log(f"losing {lost}: its network link cut, its pods unreachable, Lease left to expire")
        lost_at = time.monotonic()
        lost_wall = time.time()
        self.nodes.lose(lost)

        def moved() -> dict[str, Any] | None:
            obj = self.ready()
            if obj and lost not in obj["status"]["plan"]["rpc"]:
                return obj
            return None

        obj = wait_for("the model to serve again without the lost node", moved, timeout=600)
        self.figures.node_loss_to_serving_seconds = time.monotonic() - lost_at
        self.figures.loss_timeline = condition_times(obj, since=lost_wall)
        replanned = self.get(
            "events", "-n", MODEL_NAMESPACE,
            "--field-selector", f"involvedObject.name={MODEL},reason=Replanned",
        )  # fmt: skip
        stamps = [
            e.get("lastTimestamp") or e.get("eventTime") for e in (replanned or {}).get("items", [])
        ]
        if stamps:
            self.figures.loss_timeline["Replanned"] = round(
                parse_time(max(s for s in stamps if s)) - lost_wall, 1
            )
        self.figures.replanned_nodes = list(obj["status"]["plan"]["rpc"])
        time.sleep(3)
        stop.set()
        worker.join(200)
        self.figures.requests_during_loss = len(latencies) + len(errors)
        self.figures.errors_during_loss = len(errors)
        self.figures.max_latency_during_loss_seconds = max(latencies, default=0.0)
        log(
            f"re-planned onto {obj['status']['nodes']} in "
            f"{self.figures.node_loss_to_serving_seconds:.1f}s; "
            f"{len(latencies)} requests answered, {len(errors)} errors, "
            f"slowest {self.figures.max_latency_during_loss_seconds:.1f}s; "
            f"conditions after the loss: {self.figures.loss_timeline}"
        )
        for error in errors[:5]:
            log(f"client error: {error}")

    def delete_model(self) -> list[str]:
        log(f"kubectl delete meshmodel {MODEL}")
        self.kubectl("delete", "meshmodel", MODEL, "-n", MODEL_NAMESPACE)

        def leftovers() -> list[str]:
            out = self.kubectl(
                "get", "pods,services,networkpolicies,daemonsets,deployments",
                "-n", MODEL_NAMESPACE, "-l", f"mesh.dev/model={MODEL}", "-o", "name",
            )  # fmt: skip
            return out.split()

        wait_for("nothing of the model left", lambda: not leftovers(), timeout=180)
        log("no pod, Service, NetworkPolicy or workload of the model remains")
        return leftovers()

    def solo_baseline(self) -> None:
        """The same prompt on one llama-server with no RPC, on this machine."""
        host = start_llama_server(
            self.workdir / "solo",
            ["-m", str(parts.model_path()), "-c", str(CONTEXT), "-np", "1", "-t", "1"],
        )
        try:
            rates = []
            for _ in range(3):
                req = urllib.request.Request(
                    f"{host.url}/v1/chat/completions",
                    data=json.dumps(
                        {
                            "messages": [
                                {"role": "user", "content": "Count from one to thirty in words."}
                            ],
                            "max_tokens": 48,
                            "temperature": 0,
                        }
                    ).encode(),
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(req, timeout=120) as resp:
                    rate = (json.loads(resp.read()).get("timings") or {}).get(
                        "predicted_per_second"
                    )
                if rate:
                    rates.append(float(rate))
            self.figures.solo_tokens_per_second = statistics.median(rates) if rates else 0.0
        finally:
            host.stop()

    def teardown(self) -> None:
        if self.keep:
            log(f"kept running: KUBECONFIG={self.cluster.kubeconfig}")
            return
        self.nodes.down()
        self.cluster.down()

    # -- the whole thing ------------------------------------------------------------

    def run(self) -> Figures:
        sha256 = (REPO / ".mesh" / "models").joinpath(parts.MODEL_FILE)
        digest = Path(f"{sha256.resolve()}.sha256").read_text().strip()
        try:
            self.start_cluster()
            with serve_directory(parts.model_path().parent, self.nodes.plan.host_address) as mirror:
                self.install()
                self.apply_pool()
                applied = self.apply_model(mirror, digest)
                client = self.chat(applied)
                self.lose_a_node(client)
                self.delete_model()
            self.solo_baseline()
        finally:
            self.teardown()
        return self.figures


def condition_times(obj: dict[str, Any], *, since: float) -> dict[str, float]:
    """Seconds from `since` (epoch) to each condition's last transition."""
    out = {}
    for cond in obj.get("status", {}).get("conditions", []):
        stamp = cond.get("lastTransitionTime")
        if cond.get("status") == "True" and stamp:
            out[cond["type"]] = round(parse_time(stamp) - since, 1)
    return out


PULLED = re.compile(r'Successfully pulled image "(?P<image>[^"]+)" in (?P<took>[0-9.]+m?s)')


def go_duration(text: str) -> float:
    """Seconds of a Go duration as the kubelet prints pull times (873ms, 1.2s)."""
    return float(text[:-2]) / 1000 if text.endswith("ms") else float(text[:-1])


def parse_time(stamp: str) -> float:
    """Epoch seconds of a Kubernetes timestamp (seconds, or micro-seconds for events)."""
    stamp = stamp.split(".", maxsplit=1)[0].rstrip("Z")
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()


def write_report(figures: Figures, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(figures), indent=2) + "\n")


def clean_workdir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
