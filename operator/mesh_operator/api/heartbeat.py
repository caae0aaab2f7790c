"""The heartbeat rule shared by the agent and the operator.

The agent writes `status.heartbeatTime` (RFC 3339, UTC) and `status.intervalSeconds`
every cycle. A MeshNode is stale when its heartbeat is older than
`STALE_INTERVALS` of its own interval, or has none: the agent has stopped, lost its
node, or cannot reach the API server. The operator applies `is_stale` to decide
that the node's devices can no longer be planned onto.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from mesh_operator.api.conditions import rfc3339
from mesh_operator.api.meshnode import MeshNodeStatus

STALE_INTERVALS = 3


# RFC 3339 in UTC with whole seconds, as Kubernetes writes its own times.
format_time = rfc3339


def parse_time(text: str) -> dt.datetime:
    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment


def heartbeat_age(status: MeshNodeStatus | Mapping[str, Any], now: dt.datetime) -> float | None:
    """Seconds since the last heartbeat; None when there is none."""
    if isinstance(status, MeshNodeStatus):
        beat = status.heartbeat_time
    else:
        raw = status.get("heartbeatTime")
        beat = raw if isinstance(raw, str) else None
    if not beat:
        return None
    try:
        return (now - parse_time(beat)).total_seconds()
    except ValueError:
        return None


def is_stale(status: MeshNodeStatus | Mapping[str, Any] | None, now: dt.datetime) -> bool:
    """True when the heartbeat is missing, unreadable, or older than 3 intervals.

    `status` is the MeshNode's status as a model or as the API's dict; `now` must be
    timezone-aware. A heartbeat from the future (clock skew) is not stale.
    """
    if status is None:
        return True
    age = heartbeat_age(status, now)
    if age is None:
        return True
    if isinstance(status, MeshNodeStatus):
        interval = status.interval_seconds
    else:
        raw = status.get("intervalSeconds", 10)
        interval = raw if isinstance(raw, int) and raw > 0 else 10
    return age > STALE_INTERVALS * interval
