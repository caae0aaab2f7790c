"""The pydantic models accept and refuse the same fixtures as the CRDs."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from mesh_operator.api import (
    MeshModelSpec,
    MeshPoolSpec,
    condition_status,
    set_condition,
)
from mesh_operator.api.meshmodel import check_model
from tests.admission_cases import CASES

pytestmark = pytest.mark.unit

SPECS: dict[str, type[BaseModel]] = {"MeshModel": MeshModelSpec, "MeshPool": MeshPoolSpec}


def _validate(obj: dict[str, Any]) -> None:
    if "spec" not in obj:
        raise ValueError("spec is required")
    spec = SPECS[obj["kind"]].model_validate(obj["spec"])
    if isinstance(spec, MeshModelSpec):
        check_model(obj["metadata"]["name"], spec)


@pytest.mark.parametrize("case", CASES["valid"], ids=lambda c: c["name"])
def test_valid_fixtures_are_accepted(case: dict[str, Any]) -> None:
    _validate(case["object"])


@pytest.mark.parametrize("case", CASES["invalid"], ids=lambda c: c["name"])
def test_invalid_fixtures_are_refused(case: dict[str, Any]) -> None:
    with pytest.raises((ValidationError, ValueError)):
        _validate(case["object"])


def test_there_are_at_least_25_bad_resources() -> None:
    assert len(CASES["invalid"]) + len(CASES["updates"]) >= 25


def test_spec_round_trips_through_the_wire_form() -> None:
    spec = MeshModelSpec.model_validate(CASES["valid"][1]["object"]["spec"])
    again = MeshModelSpec.model_validate(spec.to_wire())
    assert again == spec
    assert spec.to_wire()["cacheTypeK"] == "q8_0"
    assert spec.served_names("gemma") == ["gemma-3", "gemma", "small"]


def test_served_name_defaults_to_the_resource_name() -> None:
    spec = MeshModelSpec.model_validate(CASES["valid"][0]["object"]["spec"])
    assert spec.served_names("gemma") == ["gemma"]


T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def test_transition_time_changes_only_when_status_flips() -> None:
    conds = set_condition([], "Ready", "False", "Loading", "a", observed_generation=1, now=T0)
    later = T0 + dt.timedelta(minutes=5)
    same = set_condition(conds, "Ready", "False", "Fetching", "b", observed_generation=2, now=later)
    assert same[0].last_transition_time == "2026-01-01T00:00:00Z"
    assert (same[0].reason, same[0].message, same[0].observed_generation) == ("Fetching", "b", 2)
    flipped = set_condition(same, "Ready", "True", "Serving", "", observed_generation=2, now=later)
    assert flipped[0].last_transition_time == "2026-01-01T00:05:00Z"
    assert condition_status(flipped, "Ready") == "True"
    assert condition_status(flipped, "Planned") == "Unknown"


def test_set_condition_keeps_other_conditions_in_order() -> None:
    conds = set_condition([], "Planned", "True", "Planned", "", observed_generation=1, now=T0)
    conds = set_condition(conds, "Ready", "False", "Loading", "", observed_generation=1, now=T0)
    conds = set_condition(
        conds, "Planned", "False", "NoCapacity", "x", observed_generation=2, now=T0
    )
    assert [c.type for c in conds] == ["Planned", "Ready"]
    assert conds[0].reason == "NoCapacity"


def test_condition_reason_must_be_camel_case() -> None:
    with pytest.raises(ValidationError):
        set_condition([], "Ready", "False", "not ready", "", observed_generation=1, now=T0)
