"""Token usage for `mesh status`, read from the gateways' own /metrics.

The gateway counts tokens per model, per API key and per node
(`mesh_gateway_tokens_total`, `mesh_gateway_key_tokens_total`,
`mesh_gateway_node_tokens_total`; docs/gateway.md). `read_gateway_usage` lists
the gateway pods (label `app.kubernetes.io/component=gateway` of
`app.kubernetes.io/name=mesh`, in every namespace), reads each one's /metrics
through the API server's pod proxy and adds them up: the chart runs two
replicas, each counting the requests it served. Nothing here writes to the
cluster; usage is never stored in a MeshModel's status.

Why the pods and not Prometheus: `mesh status` needs nothing but the caller's
kubeconfig, and a cluster without Prometheus still shows usage. The counters are
a gateway process's own, so they count since each replica started; history
across restarts is Prometheus' and the dashboards' part.

`parse_usage` (pure) reads one exposition; `read_gateway_usage` never raises: what
it could not read is in `problems`, and `mesh status` still prints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kubernetes
from kubernetes.client import ApiClient
from prometheus_client.parser import text_string_to_metric_families

GATEWAY_SELECTOR = "app.kubernetes.io/name=mesh,app.kubernetes.io/component=gateway"
GATEWAY_PORT_NAME = "http"
DEFAULT_GATEWAY_PORT = 8000
READ_TIMEOUT_SECONDS = 5.0

MODEL_TOKENS = "mesh_gateway_tokens_total"
KEY_TOKENS = "mesh_gateway_key_tokens_total"
NODE_TOKENS = "mesh_gateway_node_tokens_total"
KINDS = ("prompt", "completion")


@dataclass
class Tokens:
    prompt: float = 0.0
    completion: float = 0.0

    def add(self, kind: str, value: float) -> None:
        if kind == "prompt":
            self.prompt += value
        elif kind == "completion":
            self.completion += value


@dataclass
class GatewayUsage:
    """Tokens summed over the gateway replicas that answered."""

    gateways: int = 0  # running gateway pods found
    read: int = 0  # of those, how many answered with their metrics
    problems: list[str] = field(default_factory=list)
    models: dict[str, Tokens] = field(default_factory=dict)
    keys: dict[str, Tokens] = field(default_factory=dict)
    nodes: dict[str, Tokens] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.read > 0

    def merge(self, other: GatewayUsage) -> None:
        """Add another replica's counts."""
        for mine, theirs in (
            (self.models, other.models),
            (self.keys, other.keys),
            (self.nodes, other.nodes),
        ):
            for name, tokens in theirs.items():
                total = mine.setdefault(name, Tokens())
                total.prompt += tokens.prompt
                total.completion += tokens.completion


def _in_namespace(model: str, namespace: str | None) -> bool:
    return namespace is None or model.startswith(f"{namespace}/")


def parse_usage(text: str, into: GatewayUsage, namespace: str | None = None) -> None:
    """Add the token counters of one gateway's exposition to `into`.

    With `namespace`, only the models of that namespace count (also per key and
    per node). Raises ValueError on text that is not an exposition.
    """
    tables: Mapping[str, tuple[str, dict[str, Tokens]]] = {
        MODEL_TOKENS: ("model", into.models),
        KEY_TOKENS: ("key", into.keys),
        NODE_TOKENS: ("node", into.nodes),
    }
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            wanted = tables.get(sample.name)
            if wanted is None:
                continue
            label, table = wanted
            labels = sample.labels
            model, kind = labels.get("model", ""), labels.get("kind", "")
            if kind not in KINDS or not _in_namespace(model, namespace):
                continue
            name = labels.get(label, "")
            table.setdefault(name, Tokens()).add(kind, sample.value)


def _port(pod: Any) -> int:
    for container in pod.spec.containers or ():
        for port in container.ports or ():
            if port.name == GATEWAY_PORT_NAME:
                return int(port.container_port)
    return DEFAULT_GATEWAY_PORT


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    if status is not None:
        return f"{status} {reason or ''}".strip()
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def read_gateway_usage(api: ApiClient, namespace: str | None = None) -> GatewayUsage:
    """Every running gateway pod's token counters, summed (see the module's doc)."""
    usage = GatewayUsage()
    core = kubernetes.client.CoreV1Api(api)
    try:
        pods: Any = core.list_pod_for_all_namespaces(
            label_selector=GATEWAY_SELECTOR, _request_timeout=READ_TIMEOUT_SECONDS
        )
    except Exception as exc:
        usage.problems.append(f"cannot list the gateway pods: {_describe(exc)}")
        return usage
    running = [p for p in pods.items if p.status.phase == "Running" and p.status.pod_ip]
    usage.gateways = len(running)
    if not running:
        usage.problems.append("no gateway pod is running")
    for pod in sorted(running, key=lambda p: (p.metadata.namespace, p.metadata.name)):
        where = f"{pod.metadata.namespace}/{pod.metadata.name}"
        try:
            text = core.connect_get_namespaced_pod_proxy_with_path(
                f"{pod.metadata.name}:{_port(pod)}",
                pod.metadata.namespace,
                "metrics",
                _request_timeout=READ_TIMEOUT_SECONDS,
            )
            one = GatewayUsage()
            parse_usage(str(text), one, namespace)
        except Exception as exc:
            usage.problems.append(f"gateway {where}: {_describe(exc)}")
            continue
        usage.merge(one)
        usage.read += 1
    return usage
