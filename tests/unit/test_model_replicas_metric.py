"""What `mesh_operator_model_replicas` shows of a model (handlers.models.replica_counts).
That the gauge has a series for the served models on a live installation:
tests/integration/test_dashboards.py (the Models dashboard's replicas panel)."""

from __future__ import annotations

from typing import Any

import pytest

from mesh_operator.api.meshmodel import MeshModelStatus
from mesh_operator.handlers.models import replica_counts

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("spec", "status", "expected"),
    [
        ({}, {}, {"desired": 1, "planned": 0, "ready": 0}),
        (
            {"replicas": 3},
            {"replicas": 3, "readyReplicas": 2},
            {"desired": 3, "planned": 3, "ready": 2},
        ),
        (
            {"autoscaling": {"minReplicas": 1, "maxReplicas": 4}},
            {"desiredReplicas": 2, "replicas": 1, "readyReplicas": 1},
            {"desired": 2, "planned": 1, "ready": 1},
        ),
        (
            {"scaleToZeroAfter": "20s"},
            {"scaledToZeroTime": "2026-12-07T00:00:00Z", "replicas": 0},
            {"desired": 0, "planned": 0, "ready": 0},
        ),
    ],
    ids=["new", "replicas", "autoscaled", "scaled-to-zero"],
)
def test_replica_counts(
    spec: dict[str, Any], status: dict[str, Any], expected: dict[str, int]
) -> None:
    assert replica_counts(spec, MeshModelStatus.model_validate(status)) == expected
