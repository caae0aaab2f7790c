"""The gateway's Prometheus metrics.

Counters and histograms are updated per request; the gauges of live state (queue
depth, requests in flight, hosts per state) are read from the router at scrape
time, so they cost nothing per request. Each gateway has its own registry.

The `model` label is always a `namespace/name` the gateway knows (or `-` for a
request that never named one), `key` an API key's name (or `-`), and `node` a
node of the model's plan, so a client cannot create label values at will.

Usage: every answer that reports tokens adds them per model, per key and per
node; a node gets the share of the model's layers its devices hold in the plan
(`gateway.shares`), so its counter moves in fractions of a token and the nodes'
counters of a model add up to the model's. No label set exists before a request
used it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from mesh_operator.gateway.admission import Router
from mesh_operator.gateway.sse import Usage

NO_LABEL = "-"

# Seconds. TTFT on a CPU can reach tens of seconds under load; tokens come every
# few ms on a GPU and ~15-100 ms on a CPU.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
WAIT_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120)


class _LiveState(Collector):
    """Gauges computed from the router when Prometheus scrapes."""

    def __init__(self, router: Callable[[], Router | None]) -> None:
        self._router = router

    def collect(self) -> Iterator[GaugeMetricFamily]:
        queued = GaugeMetricFamily(
            "mesh_gateway_queued_requests", "Requests waiting for a host.", labels=["model"]
        )
        in_flight = GaugeMetricFamily(
            "mesh_gateway_in_flight_requests", "Requests being served by a host.", labels=["model"]
        )
        hosts = GaugeMetricFamily(
            "mesh_gateway_hosts", "Hosts known per model, by state.", labels=["model", "state"]
        )
        ready = GaugeMetricFamily(
            "mesh_gateway_model_ready",
            "1 when the model is Ready and has a healthy host.",
            labels=["model"],
        )
        router = self._router()
        if router is not None:
            for key, gate in router.gates.items():
                queued.add_metric([key], len(gate.waiters))
                in_flight.add_metric([key], gate.in_flight())
                healthy = sum(1 for b in gate.backends.values() if b.healthy)
                hosts.add_metric([key, "healthy"], healthy)
                hosts.add_metric([key, "unhealthy"], len(gate.backends) - healthy)
                ready.add_metric([key], 1 if gate.dispatchable() else 0)
        yield from (queued, in_flight, hosts, ready)


class GatewayMetrics:
    """Every metric the gateway exports, in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._router: Router | None = None
        reg = self.registry
        self.requests = Counter(
            "mesh_gateway_requests",
            "Requests answered, by model, endpoint and HTTP status.",
            ["model", "endpoint", "status"],
            registry=reg,
        )
        self.tokens = Counter(
            "mesh_gateway_tokens",
            "Tokens processed, by model and kind (prompt, completion).",
            ["model", "kind"],
            registry=reg,
        )
        self.key_requests = Counter(
            "mesh_gateway_key_requests",
            "Requests per API key name, model and HTTP status.",
            ["key", "model", "status"],
            registry=reg,
        )
        self.key_tokens = Counter(
            "mesh_gateway_key_tokens",
            "Tokens per API key name (- without keys), model and kind.",
            ["key", "model", "kind"],
            registry=reg,
        )
        self.node_tokens = Counter(
            "mesh_gateway_node_tokens",
            "Tokens per model, node and kind: each request's tokens times the node's "
            "share of the model's layers in its plan.",
            ["model", "node", "kind"],
            registry=reg,
        )
        self.ttft = Histogram(
            "mesh_gateway_time_to_first_token_seconds",
            "Streaming requests: arrival at the gateway to the first event sent to the client.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=reg,
        )
        self.itl = Histogram(
            "mesh_gateway_inter_token_latency_seconds",
            "Streaming requests: time between consecutive events sent to the client.",
            ["model"],
            buckets=ITL_BUCKETS,
            registry=reg,
        )
        self.duration = Histogram(
            "mesh_gateway_request_duration_seconds",
            "Arrival at the gateway to the last byte sent, by model and endpoint.",
            ["model", "endpoint"],
            buckets=E2E_BUCKETS,
            registry=reg,
        )
        self.queue_wait = Histogram(
            "mesh_gateway_queue_wait_seconds",
            "Time a request waited for a host (not Ready, or every slot busy).",
            ["model"],
            buckets=WAIT_BUCKETS,
            registry=reg,
        )
        self.retries = Counter(
            "mesh_gateway_retries",
            "Requests sent again because a host failed before any byte reached the client.",
            ["model", "reason"],
            registry=reg,
        )
        self.upstream_errors = Counter(
            "mesh_gateway_upstream_errors",
            "Host failures seen by the gateway, by model and kind.",
            ["model", "kind"],
            registry=reg,
        )
        reg.register(_LiveState(lambda: self._router))

    def watch(self, router: Router) -> None:
        self._router = router

    def count_usage(self, model: str, key: str, usage: Usage, host: str | None = None) -> None:
        """Add one answer's tokens per model, key and node: by the shares of the plan
        of the replica whose `host` answered (or of the model's only plan)."""
        router = self._router
        gate = router.gates.get(model) if router is not None else None
        shares: tuple[tuple[str, float], ...] = ()
        if gate is not None:
            by_host = dict(gate.record.backend_shares)
            shares = by_host.get(host, gate.record.node_shares) if host else gate.record.node_shares
        for kind, count in (
            ("prompt", usage.prompt_tokens),
            ("completion", usage.completion_tokens),
        ):
            if count <= 0:
                continue
            self.tokens.labels(model, kind).inc(count)
            self.key_tokens.labels(key, model, kind).inc(count)
            for node, share in shares:
                self.node_tokens.labels(model, node, kind).inc(count * share)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
