"""The Grafana dashboards are well formed: every panel has a query, its description
names every metric it reads, those metrics exist (in the agent's and gateway's
docs, the operator's registry or llama-server's list), and panels do not overlap.
Whether each query returns data on a live system: tests/integration/test_dashboards.py.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest

from mesh_operator.handlers import metrics as operator_metrics

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "charts" / "mesh" / "dashboards"
# llama-server --metrics (DESIGN.md, "Health and metrics").
LLAMACPP_METRICS = {
    "llamacpp:prompt_tokens_total",
    "llamacpp:tokens_predicted_total",
    "llamacpp:prompt_seconds_total",
    "llamacpp:tokens_predicted_seconds_total",
    "llamacpp:requests_processing",
    "llamacpp:requests_deferred",
    "llamacpp:n_decode_total",
    "llamacpp:n_busy_slots_per_decode",
}
# prometheus_client's process collector, exported by the operator.
PROCESS_METRICS = {"process_resident_memory_bytes", "process_cpu_seconds_total"}
METRIC_RE = re.compile(r"\b(mesh_[a-z0-9_]+|llamacpp:[a-z_]+|process_[a-z_]+)")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def documented(doc: str, prefix: str) -> set[str]:
    text = (REPO / "docs" / doc).read_text()
    return set(re.findall(rf"^\| `({prefix}[a-z0-9_]+)`", text, flags=re.MULTILINE))


def known_metrics() -> set[str]:
    operator = set()
    for value in vars(operator_metrics).values():
        name = getattr(value, "_name", None)
        kind = getattr(value, "_type", None)
        if isinstance(name, str) and kind is not None:
            operator.add(name + ("_total" if kind == "counter" else ""))
    return (
        documented("agent.md", "mesh_")
        | documented("gateway.md", "mesh_gateway_")
        | operator
        | LLAMACPP_METRICS
        | PROCESS_METRICS
    )


def base_name(metric: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if metric.endswith(suffix):
            return metric[: -len(suffix)]
    return metric


def load(name: str) -> dict[str, Any]:
    board: dict[str, Any] = json.loads((DASHBOARDS / f"{name}.json").read_text())
    return board


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


BOARDS = ["fleet", "models", "operator"]


def test_known_metrics_are_read_from_the_sources() -> None:
    known = known_metrics()
    assert "mesh_gpu_memory_free_bytes" in known
    assert "mesh_gateway_time_to_first_token_seconds" in known
    assert "mesh_operator_plans_total" in known
    assert "mesh_operator_plan_duration_seconds" in known


@pytest.mark.parametrize("name", BOARDS)
def test_dashboard_identity(name: str) -> None:
    board = load(name)
    assert board["uid"] == f"mesh-{name}"
    assert board["title"] == f"mesh / {name.capitalize()}"
    assert "mesh" in board["tags"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("name", BOARDS)
def test_every_panel_queries_known_metrics_its_description_names(name: str) -> None:
    known = known_metrics()
    problems = []
    for panel in panels(load(name)):
        title = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        assert panel["targets"], f"{title}: no query"
        used: set[str] = set()
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{title}: empty query"
            used |= {base_name(m) for m in METRIC_RE.findall(target["expr"])}
        if not used:
            problems.append(f"{title}: reads no mesh, llama.cpp or process metric")
        for metric in sorted(used - known):
            problems.append(f"{title}: {metric} is not a metric any component exports")
        for metric in sorted(used):
            if metric not in panel.get("description", ""):
                problems.append(f"{title}: description does not name {metric}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", BOARDS)
def test_panels_fit_the_grid_without_overlapping(name: str) -> None:
    boxes = []
    for panel in load(name)["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        boxes.append((panel["title"], pos["x"], pos["y"], pos["x"] + pos["w"], pos["y"] + pos["h"]))
    for a, b in itertools.combinations(boxes, 2):
        overlap = a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]
        assert not overlap, f"{a[0]!r} overlaps {b[0]!r}"


def test_models_dashboard_covers_the_issue() -> None:
    exprs = " ".join(t["expr"] for p in panels(load("models")) for t in p["targets"])
    for metric in (
        "mesh_gateway_requests_total",
        "mesh_gateway_time_to_first_token_seconds_bucket",
        "mesh_gateway_inter_token_latency_seconds_bucket",
        "mesh_gateway_request_duration_seconds_bucket",
        "llamacpp:prompt_tokens_total",
        "llamacpp:tokens_predicted_total",
        "llamacpp:requests_processing",
        "llamacpp:requests_deferred",
        "mesh_operator_plans_total",
    ):
        assert metric in exprs, metric
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}" in exprs


def test_fleet_and_operator_dashboards_cover_the_issue() -> None:
    fleet = " ".join(t["expr"] for p in panels(load("fleet")) for t in p["targets"])
    for metric in (
        "mesh_gpu_info",
        "mesh_gpu_memory_free_bytes",
        "mesh_node_health_state",
        "mesh_node_heartbeat_age_seconds",
        "mesh_gpu_memory_used_by_mesh_bytes",
    ):
        assert metric in fleet, metric
    operator = " ".join(t["expr"] for p in panels(load("operator")) for t in p["targets"])
    for metric in (
        "mesh_operator_reconciles_total",
        'outcome="error"',
        "mesh_operator_plan_duration_seconds_bucket",
    ):
        assert metric in operator, metric
