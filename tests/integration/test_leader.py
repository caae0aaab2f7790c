"""Leader election on a real coordination Lease: one holder, renewals, expiry judged
on the observer's clock, release, and a holder that loses the Lease stopping."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import kubernetes
import pytest
from kubernetes.client import ApiClient, CoordinationV1Api, V1LeaseSpec

from e2e.cluster import LocalCluster
from mesh_operator.handlers.leader import LeaderElector

pytestmark = pytest.mark.integration


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def api(cluster: LocalCluster, namespace: str) -> Iterator[ApiClient]:
    client = kubernetes.config.new_client_from_config(config_file=str(cluster.kubeconfig))  # type: ignore[no-untyped-call]
    yield client
    client.close()


def elector(api: ApiClient, namespace: str, lease: str, who: str, clock: Clock) -> LeaderElector:
    return LeaderElector(
        api,
        namespace=namespace,
        name=lease,
        identity=who,
        lease_seconds=8,
        renew_seconds=2,
        retry_seconds=0.05,
        clock=clock,
    )


def lease_spec(api: ApiClient, namespace: str, lease: str) -> V1LeaseSpec:
    spec = CoordinationV1Api(api).read_namespaced_lease(lease, namespace).spec
    assert spec is not None
    return spec


def holder(api: ApiClient, namespace: str, lease: str) -> str | None:
    return lease_spec(api, namespace, lease).holder_identity


def test_one_holder_until_it_stops_renewing(api: ApiClient, namespace: str) -> None:
    lease = f"mesh-{uuid.uuid4().hex[:6]}"
    clock_a, clock_b = Clock(), Clock()
    a = elector(api, namespace, lease, "a", clock_a)
    b = elector(api, namespace, lease, "b", clock_b)
    assert a.try_acquire_or_renew(), "a free Lease is taken"
    assert not b.try_acquire_or_renew(), "a held Lease is not"
    assert holder(api, namespace, lease) == "a"
    # a renews while b's clock runs far past the lease: b sees the record change
    # each time, so it never judges the Lease expired.
    for _ in range(3):
        clock_a.now += 2
        clock_b.now += 20
        assert a.try_acquire_or_renew()
        assert not b.try_acquire_or_renew()
    # a stops renewing: b takes the Lease once it has seen no change for 8 s.
    clock_b.now += 7.9
    assert not b.try_acquire_or_renew()
    clock_b.now += 0.2
    assert b.try_acquire_or_renew()
    assert holder(api, namespace, lease) == "b"
    assert lease_spec(api, namespace, lease).lease_transitions == 1
    # a cannot renew a Lease b holds.
    clock_a.now += 1
    assert not a.try_acquire_or_renew()


def test_a_released_lease_is_taken_at_once(api: ApiClient, namespace: str) -> None:
    lease = f"mesh-{uuid.uuid4().hex[:6]}"
    a = elector(api, namespace, lease, "a", Clock())
    b = elector(api, namespace, lease, "b", Clock())
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    a.release()
    assert holder(api, namespace, lease) is None
    assert b.try_acquire_or_renew(), "no wait for the lease to run out"
    b.release()
    stop = threading.Event()
    assert a.wait_for_leadership(stop)


def test_a_holder_that_cannot_renew_stops(api: ApiClient, namespace: str) -> None:
    lease = f"mesh-{uuid.uuid4().hex[:6]}"
    clock_a, clock_b = Clock(), Clock()
    a = LeaderElector(
        api, namespace=namespace, name=lease, identity="a",
        lease_seconds=1, renew_seconds=0.1, clock=clock_a,
    )  # fmt: skip
    b = elector(api, namespace, lease, "b", clock_b)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    clock_b.now += 9
    assert b.try_acquire_or_renew(), "b took the Lease while a was cut off"
    lost = threading.Event()
    stop = threading.Event()
    thread = a.keep(lost.set, stop)
    try:
        # a's renewals now fail; once they have failed for its lease it gives up.
        clock_a.now += 5
        assert lost.wait(10), "a kept acting on a Lease it no longer holds"
    finally:
        stop.set()
        thread.join(5)
    assert holder(api, namespace, lease) == "b"
