"""Reconcile one MeshModel: gather a snapshot, decide, apply the decision.

`handlers.decision.decide` makes every choice; this module only reads what the
decision needs that the watches do not hold (Secrets, the model's header), and
applies what it says (status, children, deletions, Events) through `Kube`. It
keeps the state that only saves work or bridges the watches' lag: the plans
written but not yet seen again (`LocalClaims`), the status written last, the
model profiles, the pools' capacity and the failures for backoff. All of it can
be lost: a restarted operator rebuilds it from what the API holds.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client import ApiException
from pydantic import ValidationError

from mesh_operator import planning
from mesh_operator.api.meshmodel import MeshModelSpec, MeshModelStatus, Plan
from mesh_operator.demand import Demand
from mesh_operator.handlers import metrics
from mesh_operator.handlers.decision import (
    Decision,
    ModelRef,
    ModelSnapshot,
    decide,
    secret_refs,
)
from mesh_operator.handlers.kube import Kube, api_message
from mesh_operator.handlers.snapshot import PoolInfo, Snapshot, pool_claims
from mesh_operator.ledger import Capacity, build_pool_view, capacity_steps
from mesh_operator.manifests.workloads import PolicyPeers
from mesh_operator.planning import ModelProfile
from mesh_operator.source import ProfileCache, SourceError

log = logging.getLogger(__name__)

# How long a pool's capacity steps are shared by its models' reconciles.
POOL_CAPACITY_TTL_SECONDS = 2.0
# How long a status this operator wrote is preferred to an older one in a body.
WRITTEN_TTL_SECONDS = 60.0


@dataclass
class LocalClaims:
    """Plans written by this operator that the watch may not have delivered yet.

    Without this, two models planned within one watch round trip would both see
    the same free memory. Entries expire once the index has surely caught up.
    """

    ttl_seconds: float = 120.0
    _entries: dict[str, tuple[str, Plan | None, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, key: str, pool: str, plan: Plan | None) -> None:
        with self._lock:
            self._entries[key] = (pool, plan, time.monotonic())

    def forget(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def overlay(self, plans: Mapping[str, tuple[str, Plan]]) -> dict[str, tuple[str, Plan]]:
        now = time.monotonic()
        with self._lock:
            for key in [k for k, (_, _, t) in self._entries.items() if now - t > self.ttl_seconds]:
                del self._entries[key]
            merged = dict(plans)
            for key, (pool, plan, _) in self._entries.items():
                if plan is None:
                    merged.pop(key, None)
                else:
                    merged[key] = (pool, plan)
            return merged


@dataclass
class Failures:
    """Consecutive failures per model, for exponential retry delays."""

    _counts: dict[str, int] = field(default_factory=dict)

    def delay(self, key: str, base: float = 5.0, cap: float = 300.0) -> float:
        count = self._counts.get(key, 0)
        self._counts[key] = count + 1
        return float(min(cap, base * 2.0**count))

    def clear(self, key: str) -> None:
        self._counts.pop(key, None)


class ModelReconciler:
    """Gathers, decides and applies for every MeshModel of this operator."""

    def __init__(
        self,
        kube: Kube,
        profiles: ProfileCache,
        peers: PolicyPeers,
        interval: float = 5.0,
        demand: Callable[[str], Demand | None] | None = None,
    ) -> None:
        self.kube = kube
        self.profiles = profiles
        self.peers = peers
        self.interval = interval
        # A model's demand at the gateways (handlers.demand); None: not read.
        self.demand = demand
        self.claims = LocalClaims()
        self.failures = Failures()
        # Planning is serialized per pool: the ledger must see each plan before the next.
        self._pool_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._capacity_seen: dict[str, Capacity] = {}
        # key -> (the model's uid, the status written last, when)
        self._written: dict[str, tuple[str, MeshModelStatus, float]] = {}
        self._pool_capacity: dict[str, tuple[Capacity, float]] = {}

    def _pool_lock(self, pool: str) -> threading.Lock:
        with self._locks_guard:
            return self._pool_locks.setdefault(pool, threading.Lock())

    # -- entry point -------------------------------------------------------------------

    def reconcile(
        self, key: str, body: Mapping[str, Any] | None, snapshot: Snapshot, now: dt.datetime
    ) -> float | None:
        """Decide for the model `key` and apply; the seconds until it is looked at
        again, or None once it is gone (`body` None or being deleted)."""
        started = time.perf_counter()
        if body is None or body["metadata"].get("deletionTimestamp"):
            namespace, _, name = key.partition("/")
            gone = ModelRef(name=name, namespace=namespace, uid="", generation=0)
            decision = decide(
                ModelSnapshot(model=gone, spec={}, status=MeshModelStatus(), now=now, deleted=True)
            )
            self.claims.record(key, "", decision.claim)
            self._forget(key)
            metrics.RECONCILES.labels(kind="MeshModel", outcome=decision.outcome).inc()
            return None
        ref = ModelRef(
            name=body["metadata"]["name"],
            namespace=body["metadata"]["namespace"],
            uid=body["metadata"].get("uid", ""),
            generation=int(body["metadata"].get("generation", 1)),
        )
        try:
            original = MeshModelStatus.model_validate(body.get("status") or {})
        except ValidationError:
            original = MeshModelStatus()
        status = self._freshest(key, ref.uid, original)
        spec = _spec_or_none(body)
        secrets, profile = self._read(ref, spec, snapshot)
        draft_profile = self._read_draft(spec, secrets, profile)
        pool_name = spec.pool_ref if spec is not None else ""
        with self._pool_lock(pool_name):
            decision = decide(
                self._snapshot(
                    ref,
                    body=body,
                    status=status,
                    snapshot=snapshot,
                    now=now,
                    secrets=secrets,
                    profile=profile,
                    draft_profile=draft_profile,
                )
            )
            if decision.claim_changed:
                self.claims.record(key, pool_name, decision.claim)
                # A changed claim reaches the API before the pool's next decision:
                # memory this model leaves is taken by another only once the
                # model's status no longer holds it.
                self._write_status(ref, original, decision)
        if decision.learned_profile is not None and spec is not None:
            self.profiles.put(spec.source, spec.sha256, decision.learned_profile)
        delay = self._apply(ref, body, original, decision, written=decision.claim_changed)
        metrics.RECONCILES.labels(kind="MeshModel", outcome=decision.outcome).inc()
        metrics.RECONCILE_SECONDS.labels(kind="MeshModel").observe(time.perf_counter() - started)
        return delay

    # -- gathering ---------------------------------------------------------------------

    def _read(
        self, ref: ModelRef, spec: MeshModelSpec | None, snapshot: Snapshot
    ) -> tuple[dict[tuple[str, str], str | None], ModelProfile | SourceError | None]:
        """The Secrets the spec names and the model's profile: what the decision needs
        that no watch holds. Nothing is read that the decision would not get to."""
        secrets: dict[tuple[str, str], str | None] = {}
        if spec is None or planning.draft_problem(spec) or spec.pool_ref not in snapshot.pools:
            return secrets, None
        token = None
        for role, name, key in secret_refs(spec):
            value = self.kube.read_secret_value(ref.namespace, name, key)
            secrets[(name, key)] = value
            if value is None:
                return secrets, None
            if role == "token":
                token = value
        if spec.source.pvc is not None:
            return secrets, self.profiles.cached(spec.source, spec.sha256)
        try:
            return secrets, self.profiles.get(spec.source, spec.sha256, token)
        except SourceError as exc:
            return secrets, exc

    def _read_draft(
        self,
        spec: MeshModelSpec | None,
        secrets: Mapping[tuple[str, str], str | None],
        profile: ModelProfile | SourceError | None,
    ) -> ModelProfile | SourceError | None:
        """The draft model's profile, read once the model's own was (with its token,
        `MeshModelSpec.token_ref`)."""
        if spec is None or spec.draft is None or not isinstance(profile, ModelProfile):
            return None
        if spec.draft.source.pvc is not None:
            return self.profiles.cached(spec.draft.source, spec.draft.sha256)
        ref = spec.token_ref(spec.draft.source)
        token = secrets.get((ref.name, ref.key)) if ref is not None else None
        try:
            return self.profiles.get(spec.draft.source, spec.draft.sha256, token)
        except SourceError as exc:
            return exc

    def _snapshot(
        self,
        ref: ModelRef,
        *,
        body: Mapping[str, Any],
        status: MeshModelStatus,
        snapshot: Snapshot,
        now: dt.datetime,
        secrets: Mapping[tuple[str, str], str | None],
        profile: ModelProfile | SourceError | None,
        draft_profile: ModelProfile | SourceError | None = None,
    ) -> ModelSnapshot:
        pool_name = (body.get("spec") or {}).get("poolRef") or ""
        pool = snapshot.pools.get(pool_name)
        plans = self.claims.overlay(snapshot.plans)
        capacity = None
        if pool is not None and status.plan is not None and status.plan.devices:
            capacity = self._capacity(pool_name, pool, snapshot, plans, now)
        return ModelSnapshot(
            model=ref,
            spec=body.get("spec") or {},
            status=status,
            now=now,
            pool=pool,
            nodes=snapshot.nodes,
            meshnodes=snapshot.meshnodes,
            others=pool_claims(plans, pool_name, exclude=ref.key),
            pods=snapshot.pods.get(ref.key, ()),
            children=snapshot.children.get(ref.key, {}),
            settled=snapshot.settled.get(ref.key, frozenset()),
            secrets=secrets,
            profile=profile,
            draft_profile=draft_profile,
            capacity=capacity,
            capacity_seen=self._capacity_seen.get(ref.key),
            peers=self.peers,
            hf_endpoint=self.profiles.mirror,
            demand=self.demand(ref.key) if self.demand is not None else None,
        )

    def _capacity(
        self,
        name: str,
        pool: PoolInfo,
        snapshot: Snapshot,
        plans: Mapping[str, tuple[str, Plan]],
        now: dt.datetime,
    ) -> Capacity:
        """The pool's capacity steps with every plan held, shared by its models for
        a moment (what consolidation watches; the plan itself uses an exact view)."""
        cached = self._pool_capacity.get(name)
        if cached is not None and time.monotonic() - cached[1] < POOL_CAPACITY_TTL_SECONDS:
            return cached[0]
        claims = pool_claims(plans, name)
        steps = capacity_steps(
            build_pool_view(pool.spec, snapshot.nodes, snapshot.meshnodes, claims, now)
        )
        self._pool_capacity[name] = (steps, time.monotonic())
        return steps

    def _freshest(self, key: str, uid: str, status: MeshModelStatus) -> MeshModelStatus:
        """The status this operator wrote last, when the watch has not caught up.

        The body comes from a watch that may lag behind our own status patch by a
        moment; planning again from the older status would re-plan for nothing
        and restart the group. Only for the same object: a model deleted and made
        again under its name starts from its own (empty) status, never from the
        plan of the one before, whose memory others may hold by now.
        """
        written = self._written.get(key)
        if written is None or time.monotonic() - written[2] > WRITTEN_TTL_SECONDS:
            return status
        if written[0] != uid:
            return status
        ours = written[1]
        if (ours.plan_generation or 0) > (status.plan_generation or 0):
            return ours.model_copy(deep=True)
        return status

    # -- applying ----------------------------------------------------------------------

    def _apply(
        self,
        ref: ModelRef,
        body: Mapping[str, Any],
        original: MeshModelStatus,
        decision: Decision,
        *,
        written: bool = False,
    ) -> float:
        """Carry out `decision` (its status too unless `written`); the seconds until
        the model is looked at again."""
        key = ref.key
        if decision.capacity_seen is not None:
            self._capacity_seen[key] = decision.capacity_seen
        if decision.plan_seconds is not None:
            metrics.PLAN_SECONDS.observe(decision.plan_seconds)
        if decision.plan_outcome is not None:
            metrics.PLANS.labels(outcome=decision.plan_outcome).inc()
        if decision.scaling is not None:
            metrics.SCALINGS.labels(direction=decision.scaling).inc()
        status = decision.status
        counts = (decision.replicas_wanted, status.replicas or 0, status.ready_replicas or 0)
        for state, count in zip(REPLICA_STATES, counts, strict=True):
            metrics.MODEL_REPLICAS.labels(model=key, state=state).set(count)
        # The status first: a plan is claimed in the API before any pod of it can
        # run, so an operator dying in between leaves no workload unclaimed.
        if not written:
            self._write_status(ref, original, decision)
        error = None
        try:
            for child in decision.delete:
                self.kube.delete(child.api_version, child.kind, child.name, ref.namespace)
            for obj in decision.create:
                self.kube.create_pod(obj)
            for obj in decision.apply:
                self.kube.apply(obj)
        except ApiException as exc:
            error = f"applying children failed: {api_message(exc)}"
        if error is None:
            self._release(ref, body, decision)
        for event in decision.events:
            self.kube.event(body, event.reason, event.message, event.type)
        if error is not None:
            log.warning("MeshModel %s: %s", key, error)
            return self.failures.delay(key)
        if decision.look_again.backoff:
            return self.failures.delay(key)
        if decision.outcome == "ok":
            self.failures.clear(key)
        seconds = decision.look_again.seconds
        return self.interval if seconds is None else seconds

    def _release(self, ref: ModelRef, body: Mapping[str, Any], decision: Decision) -> None:
        for pod in decision.release:
            try:
                deleted = self.kube.force_delete_pod(ref.namespace, pod.name)
            except ApiException as exc:  # the re-plan must go on regardless
                log.warning("could not release pod %s: %s", pod.name, api_message(exc))
                continue
            if deleted:
                self.kube.event(
                    body,
                    "PodReleased",
                    f"deleted {pod.name} on {pod.node}: its node stopped reporting",
                    "Warning",
                )

    def _write_status(self, ref: ModelRef, original: MeshModelStatus, decision: Decision) -> None:
        self._written[ref.key] = (ref.uid, decision.status.model_copy(deep=True), time.monotonic())
        old, new = original.to_wire(), decision.status.to_wire()
        if new == old:
            return
        if not self.kube.replace_model_status(ref.name, ref.namespace, ref.uid, new):
            # Gone, or replaced by a new object of its name: what was decided
            # (and claimed) was for the old one; the watch tells the rest.
            self.claims.forget(ref.key)

    def _forget(self, key: str) -> None:
        """Drop what this process remembers of a model that is gone (its claim is
        the deletion decision's to drop)."""
        self._written.pop(key, None)
        self.failures.clear(key)
        self._capacity_seen.pop(key, None)
        for state in REPLICA_STATES:
            with contextlib.suppress(KeyError):
                metrics.MODEL_REPLICAS.remove(key, state)


# mesh_operator_model_replicas: what the decision serves (Decision.replicas_wanted),
# the replicas planned and those whose host answers /health.
REPLICA_STATES = ("desired", "planned", "ready")


def _spec_or_none(body: Mapping[str, Any]) -> MeshModelSpec | None:
    try:
        return MeshModelSpec.model_validate(body.get("spec") or {})
    except ValidationError:
        return None
