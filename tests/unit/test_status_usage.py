"""`mesh status`'s usage: the gateways' token counters read, summed and shown.

The expositions are made by the gateway's own metrics (`GatewayMetrics`), so the
parser reads what a gateway serves; the API is a stand-in that answers the two
calls `read_gateway_usage` makes (list the gateway pods, GET a pod's /metrics
through the pod proxy).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from types import SimpleNamespace
from typing import Any, ClassVar

import kubernetes
import pytest
from kubernetes.client.exceptions import ApiException

from mesh_operator.fleet import Fleet, StatusReport, build_status_report, build_status_table
from mesh_operator.gateway.metrics import GatewayMetrics
from mesh_operator.usage import GATEWAY_SELECTOR, GatewayUsage, parse_usage, read_gateway_usage

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)


def exposition(
    model: dict[tuple[str, str], float],
    key: dict[tuple[str, str, str], float],
    node: dict[tuple[str, str, str], float],
) -> str:
    """What one gateway serves after the given counts (labels in the metrics' order)."""
    metrics = GatewayMetrics()
    for labels, count in model.items():
        metrics.tokens.labels(*labels).inc(count)
    for labels3, count in key.items():
        metrics.key_tokens.labels(*labels3).inc(count)
    for labels3, count in node.items():
        metrics.node_tokens.labels(*labels3).inc(count)
    # Other families of the same gateway must be left alone.
    metrics.requests.labels("ai/gemma", "/v1/chat/completions", "200").inc()
    return metrics.exposition().decode()


FIRST = exposition(
    {("ai/gemma", "prompt"): 100, ("ai/gemma", "completion"): 40, ("ml/qwen", "prompt"): 7},
    {
        ("alice", "ai/gemma", "prompt"): 60,
        ("bob", "ai/gemma", "prompt"): 40,
        ("alice", "ai/gemma", "completion"): 40,
        ("alice", "ml/qwen", "prompt"): 7,
    },
    {
        ("ai/gemma", "node-a", "prompt"): 100 * 12 / 19,
        ("ai/gemma", "node-b", "prompt"): 100 * 7 / 19,
        ("ai/gemma", "node-a", "completion"): 40 * 12 / 19,
        ("ai/gemma", "node-b", "completion"): 40 * 7 / 19,
        ("ml/qwen", "node-b", "prompt"): 7,
    },
)
SECOND = exposition(
    {("ai/gemma", "prompt"): 19, ("ai/gemma", "completion"): 1},
    {("bob", "ai/gemma", "prompt"): 19, ("bob", "ai/gemma", "completion"): 1},
    {
        ("ai/gemma", "node-a", "prompt"): 12,
        ("ai/gemma", "node-b", "prompt"): 7,
        ("ai/gemma", "node-a", "completion"): 12 / 19,
        ("ai/gemma", "node-b", "completion"): 7 / 19,
    },
)


def read_both(namespace: str | None = None) -> GatewayUsage:
    total = GatewayUsage(gateways=2, read=2)
    for text in (FIRST, SECOND):
        one = GatewayUsage()
        parse_usage(text, one, namespace)
        total.merge(one)
    return total


def test_replicas_add_up_per_model_key_and_node() -> None:
    total = read_both()
    gemma = total.models["ai/gemma"]
    assert (gemma.prompt, gemma.completion) == (119, 41)
    assert (total.models["ml/qwen"].prompt, total.models["ml/qwen"].completion) == (7, 0)
    assert {k: (t.prompt, t.completion) for k, t in total.keys.items()} == {
        "alice": (67, 40),
        "bob": (59, 1),
    }
    a, b = total.nodes["node-a"], total.nodes["node-b"]
    assert a.prompt == pytest.approx(100 * 12 / 19 + 12)
    assert b.prompt == pytest.approx(100 * 7 / 19 + 7 + 7)
    # The nodes' shares add up to the models' tokens.
    assert a.prompt + b.prompt == pytest.approx(119 + 7)
    assert a.completion + b.completion == pytest.approx(41)


def test_a_namespace_keeps_its_models_keys_and_nodes_only() -> None:
    total = read_both("ml")
    assert list(total.models) == ["ml/qwen"]
    assert {k: t.prompt for k, t in total.keys.items()} == {"alice": 7}
    assert {k: t.prompt for k, t in total.nodes.items()} == {"node-b": 7}


def test_report_json_and_table() -> None:
    report = build_status_report(Fleet(), NOW, read_both())
    again = StatusReport.model_validate_json(report.model_dump_json(by_alias=True))
    assert again == report
    wire = json.loads(report.model_dump_json(by_alias=True))["usage"]
    assert wire["available"] is True
    assert (wire["gateways"], wire["gatewaysRead"], wire["problems"]) == (2, 2, [])
    assert wire["models"][0] == {"name": "ai/gemma", "promptTokens": 119, "completionTokens": 41}
    assert [k["name"] for k in wire["keys"]] == ["alice", "bob"]
    assert [n["name"] for n in wire["nodes"]] == ["node-a", "node-b"]
    table = build_status_table(report)
    assert "usage: tokens counted by 2 of 2 gateway replicas since they started" in table
    assert re.search(r"^USAGE BY +NAME +PROMPT TOKENS +COMPLETION TOKENS$", table, re.M), table
    assert re.search(r"^model +ai/gemma +119 +41$", table, re.M), table
    assert re.search(r"^key +bob +59 +1$", table, re.M), table
    # 100 * 12/19 + 12 = 75.2 prompt, 40 * 12/19 + 12/19 = 25.9 completion
    assert re.search(r"^node +node-a +75\.2 +25\.9$", table, re.M), table


def test_no_tokens_yet() -> None:
    table = build_status_table(build_status_report(Fleet(), NOW, GatewayUsage(gateways=2, read=2)))
    assert table.endswith("usage: tokens counted by 2 of 2 gateway replicas since they started\n"
                          "no tokens counted yet")  # fmt: skip


class FakeCore:
    """The two CoreV1Api calls of `read_gateway_usage`, answered from the test's data."""

    calls: ClassVar[list[tuple[str, ...]]] = []

    def __init__(self, pods: list[Any] | Exception, answers: dict[str, str | Exception]) -> None:
        self._pods = pods
        self._answers = answers

    def list_pod_for_all_namespaces(self, *, label_selector: str, **_: Any) -> Any:
        assert label_selector == GATEWAY_SELECTOR
        if isinstance(self._pods, Exception):
            raise self._pods
        return SimpleNamespace(items=self._pods)

    def connect_get_namespaced_pod_proxy_with_path(
        self, name: str, namespace: str, path: str, **_: Any
    ) -> str:
        FakeCore.calls.append((name, namespace, path))
        answer = self._answers[name]
        if isinstance(answer, Exception):
            raise answer
        return answer


def pod(name: str, phase: str = "Running", port: int = 8000) -> Any:
    container = SimpleNamespace(ports=[SimpleNamespace(name="http", container_port=port)])
    return SimpleNamespace(
        metadata=SimpleNamespace(name=name, namespace="mesh"),
        spec=SimpleNamespace(containers=[container]),
        status=SimpleNamespace(phase=phase, pod_ip="10.0.0.9" if phase == "Running" else None),
    )


def with_api(monkeypatch: pytest.MonkeyPatch, core: FakeCore) -> None:
    monkeypatch.setattr(kubernetes.client, "CoreV1Api", lambda api: core)
    FakeCore.calls = []


def test_every_running_gateway_is_read_through_the_pod_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pods = [pod("gw-1"), pod("gw-2", port=9000), pod("gw-old", phase="Succeeded")]
    with_api(monkeypatch, FakeCore(pods, {"gw-1:8000": FIRST, "gw-2:9000": SECOND}))
    read = read_gateway_usage(object())  # type: ignore[arg-type]
    assert FakeCore.calls == [("gw-1:8000", "mesh", "metrics"), ("gw-2:9000", "mesh", "metrics")]
    assert (read.gateways, read.read, read.problems) == (2, 2, [])
    assert read.models["ai/gemma"].prompt == 119


def test_a_gateway_that_does_not_answer_is_named_and_the_rest_still_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    down = ApiException(status=503, reason="Service Unavailable")
    with_api(monkeypatch, FakeCore([pod("gw-1"), pod("gw-2")], {"gw-1:8000": down,
                                                                 "gw-2:8000": SECOND}))  # fmt: skip
    read = read_gateway_usage(object())  # type: ignore[arg-type]
    assert (read.gateways, read.read) == (2, 1)
    assert read.problems == ["gateway mesh/gw-1: 503 Service Unavailable"]
    assert read.models["ai/gemma"].prompt == 19
    table = build_status_table(build_status_report(Fleet(), NOW, read))
    assert "usage: tokens counted by 1 of 2 gateway replicas since they started\n" in table
    assert "  gateway mesh/gw-1: 503 Service Unavailable\n" in table


def test_status_still_prints_when_no_gateway_can_be_read(monkeypatch: pytest.MonkeyPatch) -> None:
    forbidden = ApiException(status=403, reason="Forbidden")
    with_api(monkeypatch, FakeCore(forbidden, {}))
    read = read_gateway_usage(object())  # type: ignore[arg-type]
    assert not read.available
    report = build_status_report(Fleet(), NOW, read)
    assert report.usage.models == [] and report.usage.available is False
    table = build_status_table(report)
    assert table.endswith("usage unavailable: cannot list the gateway pods: 403 Forbidden")
    # Garbage instead of metrics: that gateway is not counted.
    with_api(monkeypatch, FakeCore([pod("gw-1")], {"gw-1:8000": "<html>not metrics</html>"}))
    read = read_gateway_usage(object())  # type: ignore[arg-type]
    assert (read.read, read.models) == (0, {})
    assert read.problems and read.problems[0].startswith("gateway mesh/gw-1:")
    with_api(monkeypatch, FakeCore([], {}))
    assert read_gateway_usage(object()).problems == ["no gateway pod is running"]  # type: ignore[arg-type]
