"""Health rules and the heartbeat staleness rule."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh_agent.health import HEALTHY, combine, rpc_health
from mesh_agent.rpc_liveness import RpcProbe, RpcState, RpcTarget
from mesh_operator.api.heartbeat import STALE_INTERVALS, format_time, is_stale
from mesh_operator.api.meshnode import Health, MeshNodeStatus

pytestmark = pytest.mark.unit

NOW = dt.datetime(2025, 6, 1, 12, 0, 0, tzinfo=dt.UTC)


def status_at(age_seconds: float, interval: int) -> MeshNodeStatus:
    return MeshNodeStatus(
        heartbeat_time=format_time(NOW - dt.timedelta(seconds=age_seconds)),
        interval_seconds=interval,
    )


@given(interval=st.integers(1, 3600), fraction=st.floats(0, 1))
def test_fresh_within_three_intervals(interval: int, fraction: float) -> None:
    age = int(fraction * STALE_INTERVALS * interval)
    assert not is_stale(status_at(age, interval), NOW)


@given(interval=st.integers(1, 3600), extra=st.integers(1, 10_000))
def test_stale_past_three_intervals(interval: int, extra: int) -> None:
    assert is_stale(status_at(STALE_INTERVALS * interval + extra, interval), NOW)


@pytest.mark.parametrize(
    ("status", "stale"),
    [
        (None, True),
        ({}, True),
        ({"heartbeatTime": "not a time"}, True),
        ({"heartbeatTime": format_time(NOW), "intervalSeconds": 10}, False),
        ({"heartbeatTime": format_time(NOW - dt.timedelta(seconds=31))}, True),
        ({"heartbeatTime": format_time(NOW + dt.timedelta(seconds=300))}, False),
    ],
    ids=["none", "empty", "garbage", "now", "31s-default-interval", "clock-skew"],
)
def test_stale_on_api_dicts(status: dict[str, object] | None, stale: bool) -> None:
    assert is_stale(status, NOW) is stale


def probe(state: RpcState) -> RpcProbe:
    return RpcProbe(RpcTarget("ns/m", "10.0.0.1", 50052), state, detail=state.value)


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        (RpcState.READY, "AsExpected"),
        (RpcState.SERVING, "AsExpected"),
        (RpcState.UNKNOWN, "AsExpected"),
        (RpcState.DOWN, "RpcServerDown"),
        (RpcState.HUNG, "RpcServerDown"),
    ],
)
def test_rpc_health(state: RpcState, reason: str) -> None:
    assert rpc_health([probe(state)]).reason == reason


def test_node_takes_the_most_severe_and_root_cause_reason_and_lists_all() -> None:
    rpc = Health(state="Degraded", reason="RpcServerDown", message="rpc down")
    xid = Health(state="Unhealthy", reason="XidError", message="XID 79")
    lost = Health(state="Unhealthy", reason="GpuLost", message="lost")
    node = combine([HEALTHY, rpc, xid, lost])
    assert (node.state, node.reason) == ("Unhealthy", "GpuLost")
    assert node.message == "lost; XID 79; rpc down"
    assert combine([HEALTHY, HEALTHY]) == HEALTHY
