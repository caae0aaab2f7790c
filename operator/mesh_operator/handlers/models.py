"""Reconcile one MeshModel: plan, workers, host, Service, NetworkPolicy, status.

Level-based: every call computes the desired state from the whole snapshot and
converges to it with server-side apply; nothing here remembers what it did
before except the plan written in the model's status (and caches that only save
work). Called by kopf on create/update/resume and by a timer.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

import kopf
from kubernetes.client import ApiException
from pydantic import ValidationError

from mesh_operator import handshake, planning
from mesh_operator.api.base import API_VERSION
from mesh_operator.api.conditions import Condition, ConditionState, condition_status, set_condition
from mesh_operator.api.meshmodel import MeshModelSpec, MeshModelStatus, Plan
from mesh_operator.gateway.contract import HOST_PORT, host_service_name
from mesh_operator.handlers import metrics
from mesh_operator.handlers.kube import Kube, Obj, api_message
from mesh_operator.handlers.snapshot import (
    SPEC_HASH_ANNOTATION,
    PodInfo,
    PoolInfo,
    Snapshot,
    model_key,
    pool_claims,
)
from mesh_operator.ledger import (
    Capacity,
    PoolView,
    build_pool_view,
    capacity_grew,
    capacity_steps,
    plan_problems,
    to_inventory,
)
from mesh_operator.manifests.labels import HEADER_COMPONENT, HOST, RPC_COMPONENT
from mesh_operator.manifests.workloads import (
    ModelWorkload,
    PolicyPeers,
    build_header_pod,
    build_host_deployment,
    build_network_policy,
    build_rpc_daemonsets,
    build_service,
    header_pod_name,
    host_deployment_name,
    host_image,
    rpc_images,
)
from mesh_operator.planner.errors import PlannerInputError
from mesh_operator.planner.profile_codec import decode_profile
from mesh_operator.source import ProfileCache, SourceError, cache_key, container_model_path

log = logging.getLogger(__name__)

PLANNED, WORKERS_READY, READY, DEGRADED = "Planned", "WorkersReady", "Ready", "Degraded"
# A worker stuck in one of these is lost: re-plan without waiting for it.
FAILED_WAITING = {"CrashLoopBackOff", "ErrImagePull", "ImagePullBackOff", "CreateContainerError"}
# How long a pool's capacity steps are shared by its models' reconciles.
POOL_CAPACITY_TTL_SECONDS = 2.0
# How long a status this operator wrote is preferred to an older one in a body.
WRITTEN_TTL_SECONDS = 60.0
# Reasons that count as losing part of the serving group.
LOSS_REASONS = {"NodeLost", "WorkerFailed"}
# How often a model waiting for its header-reader pod looks again.
HEADER_POLL_SECONDS = 2.0


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


def spec_hash(obj: Obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _with_hash(obj: Obj) -> tuple[Obj, str]:
    digest = spec_hash(obj)
    obj["metadata"].setdefault("annotations", {})[SPEC_HASH_ANNOTATION] = digest
    return obj, digest


class ModelReconciler:
    """Everything one MeshModel reconcile needs besides the snapshot."""

    # Serialize planning per pool: the ledger must see each plan before the next.
    _pool_locks: dict[str, threading.Lock]

    def __init__(self, kube: Kube, profiles: ProfileCache, peers: PolicyPeers) -> None:
        self.kube = kube
        self.profiles = profiles
        self.peers = peers
        self.claims = LocalClaims()
        self.failures = Failures()
        self._pool_locks = {}
        self._locks_guard = threading.Lock()
        self._capacity_seen: dict[str, Capacity] = {}
        self._written: dict[str, tuple[MeshModelStatus, float]] = {}
        self._pool_capacity: dict[str, tuple[Capacity, float]] = {}

    def _pool_lock(self, pool: str) -> threading.Lock:
        with self._locks_guard:
            return self._pool_locks.setdefault(pool, threading.Lock())

    # -- entry point -------------------------------------------------------------------

    def reconcile(self, body: Mapping[str, Any], snapshot: Snapshot, now: dt.datetime) -> None:
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        key = model_key(namespace, name)
        generation = int(meta.get("generation", 1))
        started = time.perf_counter()
        try:
            status = MeshModelStatus.model_validate(body.get("status") or {})
        except ValidationError:
            status = MeshModelStatus()
        original = status.to_wire()
        status = self._freshest(key, status)
        run = _Run(
            self, body, key=key, generation=generation, status=status, snapshot=snapshot, now=now
        )
        try:
            run.execute()
        finally:
            new = run.status.to_wire()
            self._written[key] = (run.status.model_copy(deep=True), time.monotonic())
            if new != original:
                # A merge patch keeps keys it does not mention: clear removed ones.
                new.update({k: None for k in original if k not in new})
                self.kube.patch_status(API_VERSION, "MeshModel", name, namespace, new)
            for reason, message, type_ in run.events:
                self.kube.event(body, reason, message, type_)
            metrics.RECONCILES.labels(kind="MeshModel", outcome=run.outcome).inc()
            metrics.RECONCILE_SECONDS.labels(kind="MeshModel").observe(
                time.perf_counter() - started
            )

    def pool_capacity(
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

    def _freshest(self, key: str, status: MeshModelStatus) -> MeshModelStatus:
        """The status this operator wrote last, when the watch has not caught up.

        The body comes from a watch that may lag behind our own status patch by a
        moment; planning again from the older status would re-plan for nothing
        and restart the group.
        """
        written = self._written.get(key)
        if written is None or time.monotonic() - written[1] > WRITTEN_TTL_SECONDS:
            return status
        ours = written[0]
        if (ours.plan_generation or 0) > (status.plan_generation or 0):
            return ours.model_copy(deep=True)
        return status

    def forget(self, namespace: str, name: str) -> None:
        key = model_key(namespace, name)
        self._written.pop(key, None)
        self.claims.record(key, "", None)
        self.failures.clear(key)
        self._capacity_seen.pop(key, None)


class _Run:
    """One reconcile of one model (state kept on the instance for readability)."""

    def __init__(
        self,
        owner: ModelReconciler,
        body: Mapping[str, Any],
        *,
        key: str,
        generation: int,
        status: MeshModelStatus,
        snapshot: Snapshot,
        now: dt.datetime,
    ) -> None:
        self.o = owner
        self.body = body
        self.name: str = body["metadata"]["name"]
        self.namespace: str = body["metadata"]["namespace"]
        self.uid: str = body["metadata"].get("uid", "")
        self.key = key
        self.generation = generation
        self.status = status
        self.snapshot = snapshot
        self.now = now
        self.outcome = "ok"
        self.view: PoolView | None = None
        self.events: list[tuple[str, str, str]] = []

    # -- conditions ------------------------------------------------------------------

    def cond(self, type_: str, state: ConditionState, reason: str, message: str = "") -> None:
        self.status.conditions = set_condition(
            self.status.conditions,
            type_,
            state,
            reason,
            message,
            observed_generation=self.generation,
            now=self.now,
        )

    def note(self, reason: str, message: str, type_: str = "Normal") -> None:
        """An Event to record once the reconcile is done (never under the pool lock)."""
        self.events.append((reason, message, type_))

    def stop(self, reason: str, message: str, *, retry: bool, planned: bool = False) -> None:
        """Record why the model cannot progress and end this reconcile."""
        if not planned:
            self.cond(PLANNED, "False", reason, message)
        self.cond(READY, "False", reason, message)
        self.status.observed_generation = self.generation
        self.outcome = "blocked"
        if retry:
            delay = self.o.failures.delay(self.key)
            raise kopf.TemporaryError(f"{reason}: {message}", delay=delay)

    # -- steps --------------------------------------------------------------------

    def execute(self) -> None:
        try:
            spec = MeshModelSpec.model_validate(self.body.get("spec") or {})
        except ValidationError as exc:
            self.stop("InvalidSpec", str(exc.errors()[0]["msg"]), retry=False)
            return
        self.status.served_names = spec.served_names(self.name)
        problem = planning.draft_problem(spec)
        if problem is not None:
            self.stop("InvalidSpec", problem, retry=False)
            return
        pool = self.snapshot.pools.get(spec.pool_ref)
        if pool is None:
            self.stop("PoolNotFound", f"MeshPool {spec.pool_ref!r} does not exist", retry=True)
            return
        token = self._secret_value(spec)
        if spec.source.pvc is not None:
            pvc_profile = self._pvc_profile(spec, pool)
            if pvc_profile is None:
                return
            profile = pvc_profile
        else:
            try:
                profile = self.o.profiles.get(spec.source, spec.sha256, token)
            except SourceError as exc:
                self.stop(exc.reason, str(exc), retry=True)
                return
        self.status.model_size_bytes = profile.file_bytes
        with self.o._pool_lock(spec.pool_ref):
            plan = self._plan(spec, pool, profile)
        if plan is None:
            return
        self.o.failures.clear(self.key)
        self._converge(spec, pool, plan)

    def _pvc_profile(self, spec: MeshModelSpec, pool: PoolInfo) -> planning.ModelProfile | None:
        """The profile of a model on a PVC, which only a pod mounting it can read.

        Its header-reader pod leaves the profile in its termination message and
        stays as the record of it; until it is done the model waits (ReadingHeader),
        polled every few seconds. A failed read is reported and retried with backoff
        by a new pod. None when this reconcile stops here.
        """
        cached = self.o.profiles.cached(spec.source, spec.sha256)
        if cached is not None:
            return cached
        pvc = spec.source.pvc
        assert pvc is not None
        where = f"{pvc.path} on PVC {pvc.claim_name}"
        source = cache_key(spec.source)
        name = header_pod_name(self.name)
        pod = next((p for p in self._pods(HEADER_COMPONENT) if p.name == name), None)
        if pod is not None and pod.source_key != source:
            # The source changed since: read the new one.
            self.o.kube.delete("v1", "Pod", name, self.namespace)
            self._reading(f"{where}: replacing header-reader pod {name}")
        if pod is None:
            wanted = build_header_pod(
                self.name,
                self.namespace,
                self.uid,
                spec=spec,
                pool=pool.spec,
                source_key=source,
                model_path=container_model_path(spec.source),
            )
            self.o.kube.create_pod(wanted)
            self._reading(f"reading the header of {where} (pod {name})")
        if pod.phase == "Succeeded":
            try:
                profile = decode_profile(pod.message or "")
            except PlannerInputError as exc:
                self.o.kube.delete("v1", "Pod", name, self.namespace)
                self.stop("SourceUnreadable", f"{where}: pod {name}: {exc}", retry=True)
                return None
            self.o.profiles.put(spec.source, spec.sha256, profile)
            return profile
        if pod.phase == "Failed":
            # Deleted so the retry reads again; the reason stays in the condition.
            self.o.kube.delete("v1", "Pod", name, self.namespace)
            self.stop("SourceUnreadable", f"{where}: {pod.message or 'pod failed'}", retry=True)
            return None
        detail = f": {pod.message}" if pod.message else ""
        self._reading(f"reading the header of {where} (pod {name} {pod.phase}{detail})")
        return None

    def _reading(self, message: str) -> NoReturn:
        self.cond(PLANNED, "False", "ReadingHeader", message)
        self.cond(READY, "False", "ReadingHeader", message)
        self.status.observed_generation = self.generation
        self.outcome = "blocked"
        raise kopf.TemporaryError(f"ReadingHeader: {message}", delay=HEADER_POLL_SECONDS)

    def _secret_value(self, spec: MeshModelSpec) -> str | None:
        refs = []
        hf = spec.source.huggingface
        if hf is not None and hf.token_secret_ref is not None:
            refs.append(("token", hf.token_secret_ref))
        if spec.api_key_secret_ref is not None:
            refs.append(("apiKey", spec.api_key_secret_ref))
        token = None
        for role, ref in refs:
            value = self.o.kube.read_secret_value(self.namespace, ref.name, ref.key)
            if value is None:
                self.stop(
                    "SecretNotFound",
                    f"Secret {ref.name!r} with key {ref.key!r} ({role}) "
                    f"not found in {self.namespace}",
                    retry=True,
                )
            if role == "token":
                token = value
        return token

    def _plan(
        self, spec: MeshModelSpec, pool: PoolInfo, profile: planning.ModelProfile
    ) -> Plan | None:
        snap = self.snapshot
        plans = self.o.claims.overlay(snap.plans)
        others = pool_claims(plans, spec.pool_ref, exclude=self.key)
        current = self.status.plan if self.status.plan and self.status.plan.devices else None
        # A serving model is checked on its own nodes only, and against the pool's
        # capacity as a whole: building every node's view for every model on every
        # resync would cost more than all the planning.
        planned_nodes = {d.node for d in current.devices} if current is not None else None
        view = build_pool_view(
            pool.spec, snap.nodes, snap.meshnodes, others, self.now, only=planned_nodes
        )
        reason, message = self._replan_reason(current, view, pool, spec.pool_ref, plans)
        if reason is None:
            self.view = view
            assert current is not None
            return current
        if planned_nodes is not None:
            view = build_pool_view(pool.spec, snap.nodes, snap.meshnodes, others, self.now)
        self.view = view
        request = planning.placement_request(spec, pool.spec, profile)
        inventory = to_inventory(view)
        started = time.perf_counter()
        result = planning.plan(profile, inventory, request, current, pool.spec)
        metrics.PLAN_SECONDS.observe(time.perf_counter() - started)
        if not result.feasible:
            metrics.PLANS.labels(outcome="infeasible").inc()
            if current is not None:
                self.note("PlanLost", f"{reason}: {message}", "Warning")
            self.status.plan = None
            self.status.nodes = None
            self.status.split = None
            self.status.endpoint = None
            self.o.claims.record(self.key, spec.pool_ref, None)
            self._delete_workloads()
            self.cond(WORKERS_READY, "False", "NotPlanned", "")
            if reason in LOSS_REASONS:
                self.cond(DEGRADED, "True", reason, message)
            planned = next((c for c in self.status.conditions if c.type == PLANNED), None)
            if planned is None or (planned.reason, planned.message) != (
                "NoCapacity",
                result.reason,
            ):
                # Once per change: retries must not flood the namespace with Events.
                self.note("NoCapacity", result.reason, "Warning")
            self.stop("NoCapacity", result.reason, retry=True)
            return None
        new_plan = planning.to_plan(result)
        changed = current is None or planning.layout_of(current) != planning.layout_of(new_plan)
        if reason == "Consolidate" and not changed:
            return current
        self.status.planned_for_generation = self.generation
        self.status.pool_generation = pool.generation
        if changed:
            self.status.plan_generation = (self.status.plan_generation or 0) + 1
            metrics.PLANS.labels(outcome="replanned" if current else "planned").inc()
            verb = "Replanned" if current else "Planned"
            self.note(
                verb,
                f"{reason}: {message + '; ' if message else ''}{new_plan.reason}",
            )
        self.status.plan = new_plan
        self.status.nodes = ",".join(dict.fromkeys(d.node for d in new_plan.devices))
        self.status.split = ",".join(str(x) for x in new_plan.tensor_split)
        self.o.claims.record(self.key, spec.pool_ref, new_plan)
        if reason in LOSS_REASONS:
            self.cond(DEGRADED, "True", reason, message)
        self.cond(PLANNED, "True", reason if changed else "PlanKept", new_plan.reason)
        return new_plan

    def _replan_reason(
        self,
        current: Plan | None,
        view: PoolView,
        pool: PoolInfo,
        pool_name: str,
        plans: Mapping[str, tuple[str, Plan]],
    ) -> tuple[str | None, str]:
        if current is None:
            return "Initial", ""
        problems = plan_problems(current, view)
        if problems:
            return "NodeLost", "; ".join(problems)
        failed = self._failed_workers(current)
        if failed:
            return "WorkerFailed", "; ".join(failed)
        if self.status.planned_for_generation != self.generation:
            return "SpecChanged", f"generation {self.generation}"
        if self.status.pool_generation != pool.generation:
            return "PoolChanged", f"pool generation {pool.generation}"
        steps = self.o.pool_capacity(pool_name, pool, self.snapshot, plans, self.now)
        grew = capacity_grew(self.o._capacity_seen.get(self.key), steps)
        self.o._capacity_seen[self.key] = steps
        if grew:
            return "Consolidate", "the pool has more room"
        return None, ""

    def _release_silent_nodes(self) -> None:
        """Force-delete this model's pods on nodes whose agent went silent.

        Their kubelet is presumably gone and will never confirm a termination: a
        Recreate host Deployment would wait for the old host pod forever. Done
        after the new plan's children are applied, so no controller recreates a
        pod there from the old template.
        """
        if self.view is None:
            return
        silent = {n.name for n in self.view.nodes if not n.fresh}
        for pod in self.snapshot.pods.get(self.key, ()):
            if pod.node not in silent or pod.component not in {RPC_COMPONENT, HOST}:
                continue
            try:
                deleted = self.o.kube.force_delete_pod(self.namespace, pod.name)
            except ApiException as exc:  # the re-plan must go on regardless
                log.warning("could not release pod %s: %s", pod.name, api_message(exc))
                continue
            if not deleted:
                continue
            self.note(
                "PodReleased",
                f"deleted {pod.name} on {pod.node}: its node stopped reporting",
                "Warning",
            )

    def _pods(self, component: str) -> list[PodInfo]:
        return [
            p
            for p in self.snapshot.pods.get(self.key, ())
            if p.component == component and not p.deleting
        ]

    def _failed_workers(self, plan: Plan) -> list[str]:
        current = str(self.status.plan_generation)
        planned = {d.node for d in plan.devices}
        failed = []
        for pod in self._pods(RPC_COMPONENT):
            if pod.plan_generation != current or pod.node not in planned:
                continue
            if pod.phase == "Failed" or pod.waiting_reason in FAILED_WAITING:
                failed.append(f"{pod.node}: worker {pod.name} {pod.waiting_reason or pod.phase}")
        return failed

    # -- children --------------------------------------------------------------------

    def _apply(self, obj: Obj) -> None:
        obj, digest = _with_hash(obj)
        existing = self.snapshot.children.get(self.key, {})
        if existing.get((obj["kind"], obj["metadata"]["name"])) == digest:
            return
        self.o.kube.apply(obj)

    def _delete_workloads(self) -> None:
        for kind, name in self.snapshot.children.get(self.key, {}):
            if kind in ("DaemonSet", "Deployment"):
                self.o.kube.delete("apps/v1", kind, name, self.namespace)

    def _converge(self, spec: MeshModelSpec, pool: PoolInfo, plan: Plan) -> None:
        addresses = self._worker_addresses(plan, pool)
        workload = ModelWorkload(
            name=self.name,
            namespace=self.namespace,
            uid=self.uid,
            spec=spec,
            pool_name=spec.pool_ref,
            pool=pool.spec,
            plan_generation=self.status.plan_generation or 1,
            rpc_nodes=list(plan.rpc),
            host_node=plan.host_node or plan.rpc[-1],
            rpc_args=planning.rpc_args(plan, pool.spec),
            llama_args=planning.llama_args(plan, spec, self.name, addresses),
            model_path=planning.model_path(spec),
            fetch_args=planning.fetch_args(spec),
            draft_fetch_args=planning.draft_fetch_args(spec),
            gpus_per_node=planning.gpus_per_node(plan),
            variants=planning.image_variants(plan),
        )
        verdict = self._host_verdict(workload, pool)
        try:
            daemonsets = build_rpc_daemonsets(workload)
            wanted = {ds["metadata"]["name"] for ds in daemonsets}
            for ds in daemonsets:
                self._apply(ds)
            for kind, name in self.snapshot.children.get(self.key, {}):
                if kind == "DaemonSet" and name not in wanted:
                    self.o.kube.delete("apps/v1", "DaemonSet", name, self.namespace)
            self._apply(build_service(workload))
            self._apply(build_network_policy(workload, self.o.peers))
            # Until every worker of this plan is up, keep the host stopped: an RPC
            # client cannot start without all its servers (nor with refusing ones).
            running = addresses is not None and verdict.run
            self._apply(build_host_deployment(workload, replicas=1 if running else 0))
            self._release_silent_nodes()
        except ApiException as exc:
            self.outcome = "error"
            raise kopf.TemporaryError(
                f"applying children failed: {api_message(exc)}",
                delay=self.o.failures.delay(self.key),
            ) from exc
        self._report(plan, addresses, verdict)

    def _host_verdict(self, w: ModelWorkload, pool: PoolInfo) -> handshake.HostVerdict:
        """Whether the host may run: not while its workers refuse its protocol."""
        current = str(self.status.plan_generation)
        hosts = [
            handshake.HostExit(p.name, p.images_key, p.exits)
            for p in self._pods(HOST)
            if p.plan_generation == current
        ]
        images = rpc_images(w)
        # Only workers running the pool's current image: a host may have talked to
        # one on its way out after the images changed.
        endpoints = {
            p.node: f"{p.ip}:{pool.spec.rpc_port}"
            for p in self._pods(RPC_COMPONENT)
            if p.plan_generation == current and p.ip and p.node in images
            and p.image == images[p.node]
        }  # fmt: skip
        group = handshake.Group(
            llama_server=host_image(w),
            workers=tuple(handshake.Worker(n, images[n], endpoints.get(n)) for n in w.rpc_nodes),
            generation=self.generation,
            pool_generation=pool.generation,
        )
        verdict = handshake.decide_host(self.status.version_mismatch, hosts, group)
        self.status.version_mismatch = verdict.mismatch
        if verdict.found:
            self.note(handshake.MISMATCH_REASON, verdict.message, "Warning")
        return verdict

    def _worker_addresses(self, plan: Plan, pool: PoolInfo) -> list[str] | None:
        current = str(self.status.plan_generation)
        by_node = {
            p.node: p
            for p in self._pods(RPC_COMPONENT)
            if p.plan_generation == current and p.ready and p.ip
        }
        missing = [n for n in plan.rpc if n not in by_node]
        if missing:
            self.cond(
                WORKERS_READY,
                "False",
                "WorkersStarting",
                f"waiting for RPC servers on {', '.join(missing)}",
            )
            return None
        self.cond(WORKERS_READY, "True", "WorkersReady", f"{len(plan.rpc)} RPC servers ready")
        return [f"{by_node[n].ip}:{pool.spec.rpc_port}" for n in plan.rpc]

    def _report(
        self, plan: Plan, addresses: list[str] | None, verdict: handshake.HostVerdict
    ) -> None:
        current = str(self.status.plan_generation)
        service = host_service_name(self.name)
        self.status.endpoint = f"http://{service}.{self.namespace}.svc:{HOST_PORT}/v1"
        hosts = [p for p in self._pods(HOST) if p.plan_generation == current]
        if not verdict.run:
            self.cond(READY, "False", handshake.MISMATCH_REASON, verdict.message)
            self.outcome = "blocked"
        elif addresses is None:
            self.cond(
                READY, "False", "WaitingForWorkers", "the host starts once every worker is up"
            )
        elif any(p.ready for p in hosts):
            was_ready = condition_status(self.status.conditions, READY) == "True"
            self.cond(READY, "True", "Serving", f"llama-server on {plan.host_node} answers /health")
            self.cond(DEGRADED, "False", "AsPlanned", "")
            if not was_ready:
                self.note("Ready", f"serving on {self.status.nodes}")
        elif hosts:
            pod = hosts[0]
            reason = (
                "Fetching"
                if pod.waiting_reason == "PodInitializing" or pod.phase == "Pending"
                else "Loading"
            )
            self.cond(
                READY, "False", reason, f"host pod {pod.name} is {pod.waiting_reason or pod.phase}"
            )
        else:
            self.cond(READY, "False", "HostStarting", "host pod not created yet")
        if condition_status(self.status.conditions, DEGRADED) == "Unknown":
            self.cond(DEGRADED, "False", "AsPlanned", "")
        self.status.observed_generation = self.generation


def conditions_summary(conditions: list[Condition]) -> str:
    return ", ".join(f"{c.type}={c.status}({c.reason})" for c in conditions)


__all__ = ["LocalClaims", "ModelReconciler", "conditions_summary", "host_deployment_name"]
