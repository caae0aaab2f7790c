"""A reconcile that raises is counted as `outcome="error"` (the Operator dashboard's
error panels), then handed back to the queue, which logs it and tries again."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from mesh_operator.handlers import metrics, registration

pytestmark = pytest.mark.unit

INDICES: dict[str, Any] = {
    name: {}
    for name in (
        "daemonset_index", "deployment_index", "service_index", "policy_index", "pool_index",
        "node_index", "meshnode_index", "plan_index", "pod_index", "model_index",
        "pool_body_index",
    )
}  # fmt: skip


def errors(kind: str) -> float:
    value = metrics.RECONCILES.labels(kind=kind, outcome="error")._value.get()
    return float(value)


class Refused:
    """A model reconciler whose status write the API server refuses."""

    def reconcile(self, *_: Any) -> float | None:
        raise ApiException(status=403, reason="Forbidden")


@pytest.fixture
def refusing_models() -> Iterator[None]:
    saved = registration._State.models
    registration._State.models = Refused()  # type: ignore[assignment]
    try:
        yield
    finally:
        registration._State.models = saved


def test_a_failed_model_reconcile_counts_as_an_error(refusing_models: None) -> None:
    work = registration._Work(INDICES)
    before = errors("MeshModel")
    with pytest.raises(ApiException):
        work(f"{registration.MODEL_PREFIX}ns/refused")
    assert errors("MeshModel") == before + 1


def test_a_failed_pool_reconcile_counts_as_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: Any) -> None:
        raise ApiException(status=500, reason="Internal Server Error")

    monkeypatch.setattr(registration, "reconcile_pool", refuse)
    monkeypatch.setattr(registration._State, "kube", object())
    indices = {**INDICES, "pool_body_index": {"gpu": [{"metadata": {"name": "gpu"}}]}}
    before = errors("MeshPool")
    with pytest.raises(ApiException):
        registration._Work(indices)(f"{registration.POOL_PREFIX}gpu")
    assert errors("MeshPool") == before + 1


def test_a_reconcile_that_ends_is_no_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registration, "reconcile_pool", lambda *_: None)
    monkeypatch.setattr(registration._State, "kube", object())
    indices = {**INDICES, "pool_body_index": {"gpu": [{"metadata": {"name": "gpu"}}]}}
    before = errors("MeshPool")
    assert (
        registration._Work(indices)(f"{registration.POOL_PREFIX}gpu") == registration.POOL_INTERVAL
    )
    assert errors("MeshPool") == before
