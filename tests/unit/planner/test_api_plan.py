"""The plan as MeshModel status stores it, and back."""

from __future__ import annotations

import pytest

from mesh_operator.api.meshmodel import Plan
from mesh_operator.planner import (
    PlacementResult,
    current_plan_from_api,
    plan_placement,
    to_api_plan,
)
from tests.unit.planner.builders import device, inventory, node, synthetic_profile

pytestmark = pytest.mark.unit


def test_round_trip_keeps_the_layout_and_stays_stable() -> None:
    profile = synthetic_profile(n_layer=30, layer_mib=500)
    pool = inventory(node("a", device(total=10000)), node("b", device(total=10000)))
    result = plan_placement(profile, pool)
    stored = Plan.model_validate(to_api_plan(result).to_wire())
    assert stored.rpc == list(result.rpc) and stored.tensor_split == list(result.tensor_split)
    assert stored.predicted_token_us == round(result.predicted_token_ms * 1000)
    assert all(isinstance(d.total_mib, int) for d in stored.devices)
    assert stored.devices[0].total_mib * 2**20 >= result.devices[0].total_bytes  # rounded up
    current = current_plan_from_api(stored)
    assert current is not None and current.layout == tuple(result.layout())
    again = plan_placement(profile, pool, current=current)
    assert again.kept_current and again.layout() == result.layout()


def test_an_infeasible_plan_keeps_its_reason() -> None:
    stored = to_api_plan(PlacementResult(False, "needs 9.0 GiB", "balanced"))
    assert stored.devices == [] and stored.reason == "needs 9.0 GiB"
    assert stored.strategy == "balanced"
    assert current_plan_from_api(stored) is None
    assert current_plan_from_api(None) is None
