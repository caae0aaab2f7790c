"""One active operator among its replicas: leader election on a coordination Lease.

Every replica runs `LeaderElector.wait_for_leadership` before it starts its
controllers; the one holding the Lease renews it every `renew_seconds` and the
others try to take it every `retry_seconds`. A holder that stops renewing (killed,
cut off) loses the Lease once `lease_seconds` pass without a change of the Lease
that another replica could observe; a holder that stops cleanly gives it up at
once. A holder that fails to renew for `lease_seconds` must stop acting: another
replica may hold the Lease by then (`keep` calls its `on_lost`).

Expiry is judged on the observer's own monotonic clock, from the moment it last
saw the Lease record change, never by comparing the holder's timestamps with the
local wall clock: replicas on nodes whose clocks disagree still agree on expiry.
(kopf's own peering does not fit: two peers of equal priority freeze each other,
and a dead peer is forgotten only after its lifetime.)
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubernetes.client import (
    ApiClient,
    ApiException,
    CoordinationV1Api,
    V1Lease,
    V1LeaseSpec,
    V1ObjectMeta,
)

from mesh_operator import __version__
from mesh_operator.api.contract import (
    APP_NAME,
    COMPONENT_LABEL,
    NAME_LABEL,
    OPERATOR_COMPONENT,
    PART_OF_LABEL,
    VERSION_ANNOTATION,
)

log = logging.getLogger(__name__)

LEASE_SECONDS = 8.0
RENEW_SECONDS = 2.0
RETRY_SECONDS = 1.0
# The Lease says which mesh the replica holding it runs: `mesh doctor` compares it
# with the CRDs' version. Found by these labels.
LEASE_LABELS = {NAME_LABEL: APP_NAME, PART_OF_LABEL: APP_NAME, COMPONENT_LABEL: OPERATOR_COMPONENT}


def _stamp(meta: V1ObjectMeta) -> V1ObjectMeta:
    """The Lease's metadata with the holder's labels and version."""
    meta.labels = {**(meta.labels or {}), **LEASE_LABELS}
    meta.annotations = {**(meta.annotations or {}), VERSION_ANNOTATION: __version__}
    return meta


@dataclass
class _Observed:
    record: tuple[Any, ...]
    at: float  # time.monotonic() when this record was first seen


class LeaderElector:
    def __init__(
        self,
        api: ApiClient,
        *,
        namespace: str,
        name: str,
        identity: str,
        lease_seconds: float = LEASE_SECONDS,
        renew_seconds: float = RENEW_SECONDS,
        retry_seconds: float = RETRY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not renew_seconds < lease_seconds:
            raise ValueError("the renew period must be shorter than the lease")
        self.leases = CoordinationV1Api(api)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_seconds = lease_seconds
        self.renew_seconds = renew_seconds
        self.retry_seconds = retry_seconds
        self.clock = clock
        self._observed: _Observed | None = None
        self._last_renewed: float | None = None

    # -- one attempt -----------------------------------------------------------------

    def try_acquire_or_renew(self) -> bool:
        """Take the Lease if it is free or expired, renew it if held; True when held."""
        now = dt.datetime.now(dt.UTC)
        try:
            lease = self.leases.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                log.warning("reading Lease %s/%s: %s", self.namespace, self.name, exc.reason)
                return False
            return self._create(now)
        spec = lease.spec = lease.spec or V1LeaseSpec()
        holder = spec.holder_identity or ""
        record = (holder, str(spec.renew_time), spec.lease_transitions)
        if self._observed is None or self._observed.record != record:
            self._observed = _Observed(record, self.clock())
        if holder and holder != self.identity:
            duration = float(spec.lease_duration_seconds or self.lease_seconds)
            if self.clock() - self._observed.at < duration:
                return False
            log.info("Lease %s/%s of %s expired: taking it", self.namespace, self.name, holder)
        if holder != self.identity:
            spec.acquire_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
        spec.holder_identity = self.identity
        lease.metadata = _stamp(lease.metadata or V1ObjectMeta())
        spec.lease_duration_seconds = int(self.lease_seconds)
        spec.renew_time = now
        try:
            # The read's resourceVersion rides along: a concurrent change wins.
            self.leases.replace_namespaced_lease(self.name, self.namespace, lease)
        except ApiException as exc:
            if exc.status != 409:
                log.warning("updating Lease %s/%s: %s", self.namespace, self.name, exc.reason)
            return False
        self._last_renewed = self.clock()
        return True

    def _create(self, now: dt.datetime) -> bool:
        body = V1Lease(
            metadata=_stamp(V1ObjectMeta(name=self.name, namespace=self.namespace)),
            spec=V1LeaseSpec(
                holder_identity=self.identity,
                lease_duration_seconds=int(self.lease_seconds),
                acquire_time=now,
                renew_time=now,
                lease_transitions=0,
            ),
        )
        try:
            self.leases.create_namespaced_lease(self.namespace, body)
        except ApiException as exc:
            if exc.status != 409:
                log.warning("creating Lease %s/%s: %s", self.namespace, self.name, exc.reason)
            return False
        self._last_renewed = self.clock()
        return True

    # -- the loops -------------------------------------------------------------------

    def wait_for_leadership(self, stop: threading.Event) -> bool:
        """Block until this replica holds the Lease (True) or `stop` is set (False)."""
        announced = False
        while not stop.is_set():
            if self.try_acquire_or_renew():
                log.info("holding Lease %s/%s as %s", self.namespace, self.name, self.identity)
                return True
            if not announced:
                holder = self._observed.record[0] if self._observed else "?"
                log.info(
                    "standing by: Lease %s/%s is held by %s", self.namespace, self.name, holder
                )
                announced = True
            stop.wait(self.retry_seconds)
        return False

    def keep(self, on_lost: Callable[[], None], stop: threading.Event) -> threading.Thread:
        """Renew the Lease in a thread until `stop`; call `on_lost` once renewing has
        failed for as long as the Lease lasts (another replica may hold it by then)."""

        def renew() -> None:
            while not stop.wait(self.renew_seconds):
                if self.try_acquire_or_renew():
                    continue
                last = self._last_renewed or 0.0
                if self.clock() - last >= self.lease_seconds - self.renew_seconds:
                    log.error("lost Lease %s/%s: stopping", self.namespace, self.name)
                    on_lost()
                    return

        thread = threading.Thread(target=renew, name="mesh-lease", daemon=True)
        thread.start()
        return thread

    def release(self) -> None:
        """Give the Lease up now, if held, so a standby takes over at once."""
        try:
            lease = self.leases.read_namespaced_lease(self.name, self.namespace)
            if lease.spec is None or lease.spec.holder_identity != self.identity:
                return
            lease.spec.holder_identity = None
            lease.spec.lease_duration_seconds = 1
            self.leases.replace_namespaced_lease(self.name, self.namespace, lease)
            log.info("released Lease %s/%s", self.namespace, self.name)
        except ApiException as exc:
            log.warning("releasing Lease %s/%s: %s", self.namespace, self.name, exc.reason)
