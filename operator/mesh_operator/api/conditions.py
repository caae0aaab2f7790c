"""Status conditions, written through one pure function.

`lastTransitionTime` changes only when a condition's status flips; reason and
message follow the latest observation.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import Field
from pydantic.config import JsonDict

from mesh_operator.api.base import ApiModel

ConditionState = Literal["True", "False", "Unknown"]


class Condition(ApiModel):
    type: str = Field(min_length=1, max_length=316)
    status: ConditionState
    reason: str = Field(
        min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
    )
    message: str = Field(default="", max_length=32768)
    observed_generation: int | None = Field(default=None, ge=0)
    last_transition_time: str | None = Field(
        default=None, json_schema_extra={"format": "date-time"}
    )


def rfc3339(moment: dt.datetime) -> str:
    """RFC 3339 in UTC with whole seconds, as Kubernetes writes its own times."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: ConditionState,
    reason: str,
    message: str,
    *,
    observed_generation: int | None,
    now: dt.datetime,
) -> list[Condition]:
    """Return a new list with `type_` set; order of the other conditions is kept."""
    previous = next((c for c in conditions if c.type == type_), None)
    keep_time = previous is not None and previous.status == status
    updated = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        observed_generation=observed_generation,
        last_transition_time=(
            previous.last_transition_time
            if keep_time and previous is not None and previous.last_transition_time
            else rfc3339(now)
        ),
    )
    if previous is None:
        return [*conditions, updated]
    return [updated if c.type == type_ else c for c in conditions]


def condition_status(conditions: list[Condition], type_: str) -> ConditionState:
    for cond in conditions:
        if cond.type == type_:
            return cond.status
    return "Unknown"


# Conditions are a map keyed by `type` for server-side apply and strategic merges.
CONDITIONS_SCHEMA: JsonDict = {
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
}
