"""Resource fields take Kubernetes quantities, and a limit is never below its request."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from mesh_operator.api.meshmodel import MeshModelSpec
from mesh_operator.api.meshpool import MeshPoolSpec
from mesh_operator.api.quantity import QuantityError, parse_quantity

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (2, Decimal(2)),
        ("2", Decimal(2)),
        ("500m", Decimal("0.5")),
        ("1.5Gi", Decimal(3 * 2**29)),
        ("1Ki", Decimal(1024)),
        ("2Ei", Decimal(2 * 2**60)),
        ("1k", Decimal(1000)),
        ("1E", Decimal(10**18)),
        ("1e3", Decimal(1000)),
        ("1E3", Decimal(1000)),
        ("2.5e-3", Decimal("0.0025")),
        (".5", Decimal("0.5")),
        ("1.", Decimal(1)),
        ("+1M", Decimal(10**6)),
        ("-1n", Decimal("-1e-9")),
        ("100u", Decimal("0.0001")),
    ],
)
def test_parse_quantity(text: int | str, value: Decimal) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize(
    "text", ["", "1GB", "1.5 Gi", "Gi", "1e2.5", "1e", "0x10", "1Mi1", "e3", "1e999999999999"]
)
def test_not_a_quantity(text: str) -> None:
    with pytest.raises(QuantityError):
        parse_quantity(text)


def _host(resources: dict[str, Any]) -> MeshModelSpec:
    return MeshModelSpec.model_validate(
        {"source": {"url": "https://m/a.gguf"}, "poolRef": "p", "hostResources": resources}
    )


def test_a_pod_s_spellings_are_taken() -> None:
    spec = _host({"requests": {"cpu": 2, "memory": "1.5Gi"}, "limits": {"memory": "2Gi"}})
    assert spec.to_wire()["hostResources"] == {
        "requests": {"cpu": "2", "memory": "1.5Gi"},
        "limits": {"memory": "2Gi"},
    }


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        (
            {"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}},
            "hostResources.limits.memory (1Gi) is below hostResources.requests.memory (2Gi)",
        ),
        (
            {"requests": {"cpu": "2500m"}, "limits": {"cpu": 2}},
            "hostResources.limits.cpu (2) is below hostResources.requests.cpu (2500m)",
        ),
        ({"requests": {"cpu": 0.5}}, "hostResources.requests.cpu\n"),
        ({"requests": {"cpu": 0.5}}, "write it as a string"),
        ({"limits": {"memory": "-1Gi"}}, "-1Gi is negative"),
        ({"limits": {"memory": "1GB"}}, "'1GB' is not a Kubernetes quantity"),
        ({"limits": {"memory": True}}, "a quantity is an integer or a string"),
    ],
)
def test_refusals_name_the_field(resources: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        _host(resources)
    assert message in str(caught.value)


def test_a_limit_equal_to_its_request_is_fine() -> None:
    _host(
        {"requests": {"cpu": "1", "memory": "1024Mi"}, "limits": {"cpu": "1000m", "memory": "1Gi"}}
    )


def test_an_emptydir_size_limit_is_a_quantity() -> None:
    pool = MeshPoolSpec.model_validate(
        {"modelCache": {"volume": "emptyDir", "sizeLimit": 16 << 30}}
    )
    assert pool.model_cache.size_limit == str(16 << 30)
    with pytest.raises(ValidationError, match=r"modelCache\.sizeLimit"):
        MeshPoolSpec.model_validate({"modelCache": {"volume": "emptyDir", "sizeLimit": "16GB"}})
