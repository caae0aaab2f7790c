"""What to do about one MeshModel, decided from a snapshot alone.

`decide(ModelSnapshot) -> Decision` is a pure function: no API call, no file, no
network, no clock but the `now` it is given. The snapshot holds the model, its
pool, the nodes' reports, the plans of the pool's other models, the model's pods
and children, and what the caller has already read for it (Secrets, the model's
profile). The decision holds the whole outcome: the status with its conditions,
the children that should exist (and which of them differ from what exists), what
to delete or create, the pods to release, the Events to record, the plan to claim
in the pool's ledger and when to look again. `handlers.models` gathers the
snapshot, calls this and applies the decision; nothing else decides.

Outcomes, by `Decision.reason`:

- `Initial`, `NodeLost`, `WorkerFailed`, `SpecChanged`, `PoolChanged`,
  `Consolidate`: why the model was (re)planned; `PlanKept` when nothing called
  for a plan (or a re-plan found the same layout).
- `WorkerRestarted`: a worker of the serving plan restarted under its host; the
  host restarts with its group (`status.groupRestarts` changes its pod template),
  the plan is kept, and the restart counts acted on stay in `status.workerRestarts`.
- `NoCapacity`, `SourceUnreadable` (and the other source reasons), `ReadingHeader`,
  `SecretNotFound`, `PoolNotFound`, `InvalidSpec`: why the model cannot progress.
- `ScaledToZero`: the model was idle at every gateway for `spec.scaleToZeroAfter`
  (or stays so): its children and claim are released and `status.scaledToZeroTime`
  says since when; `ScaleFromZero` is the reason of the plan made when a request
  (or a spec without scaleToZeroAfter) brings it back.
- `ScaleUp` (and the `ScaledDown` event): more replicas wanted, by `spec.replicas`
  or by the autoscaler (`spec.autoscaling`, from the gateways' demand).
- `Deleted`: the model is gone; its claim on the pool is dropped (its children go
  with it through their ownerReferences).
- `RpcVersionMismatch` shows in the Ready condition of a kept plan whose host
  stays stopped (`handshake.decide_host`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from mesh_operator import handshake, planning
from mesh_operator.api.conditions import ConditionState, condition_status, rfc3339, set_condition
from mesh_operator.api.contract import (
    HEADER_COMPONENT,
    HOST_COMPONENT,
    HOST_PORT,
    RPC_COMPONENT,
    SCALED_TO_ZERO,
    SPEC_HASH_ANNOTATION,
    host_service_name,
)
from mesh_operator.api.meshmodel import (
    MAX_REPLICAS,
    MeshModelSpec,
    MeshModelStatus,
    Plan,
    VersionMismatch,
)
from mesh_operator.api.meshnode import MeshNodeStatus
from mesh_operator.demand import Demand
from mesh_operator.handlers.snapshot import STALE_SELECTOR, PodInfo, PoolInfo
from mesh_operator.ledger import (
    Capacity,
    NodeInfo,
    PoolView,
    build_pool_view,
    capacity_grew,
    plan_problems,
    to_inventory,
)
from mesh_operator.manifests.workloads import (
    ModelWorkload,
    PolicyPeers,
    build_header_pod,
    build_host_deployment,
    build_network_policy,
    build_rpc_daemonsets,
    build_service,
    header_pod_name,
    host_image,
    rpc_images,
)
from mesh_operator.planner.errors import PlannerInputError
from mesh_operator.planner.profile_codec import decode_profile
from mesh_operator.source import SourceError, cache_key, container_model_path

Obj = dict[str, Any]
Outcome = Literal["ok", "blocked", "error"]

PLANNED, WORKERS_READY, READY, DEGRADED = "Planned", "WorkersReady", "Ready", "Degraded"
# How many of spec.replicas fit (set once a model has more than one).
REPLICAS_AVAILABLE = "ReplicasAvailable"
# A worker stuck in one of these is lost: re-plan without waiting for it.
FAILED_WAITING = {"ErrImagePull", "ImagePullBackOff", "CreateContainerError"}
# A worker that crashed is restarted by its kubelet (and its host with it); one
# that keeps crashing (CrashLoopBackOff after this many restarts) is lost.
CRASH_LOOP = "CrashLoopBackOff"
CRASH_LOOP_RESTARTS = 3
# Reasons that count as losing part of the serving group.
LOSS_REASONS = {"NodeLost", "WorkerFailed"}
# How often a model waiting for its header-reader pod looks again.
HEADER_POLL_SECONDS = 2.0
# Children a plan owns (a model without a plan keeps none of them).
WORKLOAD_KINDS = {"DaemonSet": "apps/v1", "Deployment": "apps/v1"}


@dataclass(frozen=True)
class ModelRef:
    name: str
    namespace: str
    uid: str
    generation: int

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ModelSnapshot:
    """Everything one decision may look at."""

    model: ModelRef
    spec: Mapping[str, Any]
    status: MeshModelStatus  # the newest status known, as the decision starts from it
    now: dt.datetime
    deleted: bool = False
    pool: PoolInfo | None = None
    nodes: Sequence[NodeInfo] = ()
    meshnodes: Mapping[str, MeshNodeStatus] = field(default_factory=dict)
    # Plans of the pool's other models, by model key: memory this model cannot use.
    others: Mapping[str, Plan] = field(default_factory=dict)
    pods: Sequence[PodInfo] = ()
    # (kind, name) -> spec hash of the children that exist
    children: Mapping[tuple[str, str], str] = field(default_factory=dict)
    # (kind, name) of the DaemonSets and Deployments that run their current
    # template on every pod, available (a rolling update waits for them)
    settled: frozenset[tuple[str, str]] = frozenset()
    # (Secret name, key) -> value, None when missing; read for the refs in the spec.
    secrets: Mapping[tuple[str, str], str | None] = field(default_factory=dict)
    # The model file's profile, or why it could not be read; None when not read
    # (a PVC source whose header-reader pod has not reported yet).
    profile: planning.ModelProfile | SourceError | None = None
    # The draft model's profile (spec.draft), or why it could not be read; None
    # when there is none or it was not read (a draft on a PVC).
    draft_profile: planning.ModelProfile | SourceError | None = None
    # The pool's capacity steps with every plan held, and those the previous
    # decision saw: more room lets a serving model consolidate.
    capacity: Capacity | None = None
    capacity_seen: Capacity | None = None
    peers: PolicyPeers = field(default_factory=lambda: PolicyPeers("", ""))
    # The Hugging Face mirror the operator reads from (its HF_ENDPOINT), which
    # `mesh fetch` must download from too; None for huggingface.co.
    hf_endpoint: str | None = None
    # The model's demand summed over the gateways; None when no gateway reports it
    # (then neither scale to zero nor the autoscaler acts).
    demand: Demand | None = None


@dataclass(frozen=True)
class Event:
    reason: str
    message: str
    type: str = "Normal"


@dataclass(frozen=True)
class ChildRef:
    api_version: str
    kind: str
    name: str


@dataclass(frozen=True)
class LookAgain:
    """When to decide again: after `seconds` (None: the regular interval), or after
    a delay growing with each consecutive failure (`backoff`)."""

    seconds: float | None = None
    backoff: bool = False


@dataclass
class Decision:
    reason: str
    outcome: Outcome
    status: MeshModelStatus
    children: list[Obj] = field(default_factory=list)  # all that should exist
    apply: list[Obj] = field(default_factory=list)  # those that differ from what exists
    # Children that stay as they are for now: a rolling update of the replicas
    # changes one serving replica at a time.
    deferred: list[ChildRef] = field(default_factory=list)
    delete: list[ChildRef] = field(default_factory=list)
    create: list[Obj] = field(default_factory=list)
    # Pods on nodes that stopped reporting: force-deleted after `apply`.
    release: list[PodInfo] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    look_again: LookAgain = field(default_factory=LookAgain)
    # The plan to hold in the pool's ledger (None: hold none). Unchanged when
    # `claim_changed` is False.
    claim: Plan | None = None
    claim_changed: bool = False
    capacity_seen: Capacity | None = None
    # A profile learnt from a header-reader pod, for the caller's cache.
    learned_profile: planning.ModelProfile | None = None
    # Set when a plan was computed: how long it took and what came of it.
    plan_seconds: float | None = None
    plan_outcome: str | None = None  # planned | replanned | infeasible
    # Set when the replica count changed: up, down, to_zero or from_zero.
    scaling: str | None = None
    # The replicas this decision serves: spec.replicas or the autoscaler's choice,
    # 0 at zero (or with a spec it cannot read).
    replicas_wanted: int = 0


def spec_hash(obj: Obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def with_hash(obj: Obj) -> Obj:
    """`obj` carrying the digest of its own content, so an unchanged child is not
    applied again."""
    digest = spec_hash(obj)
    obj["metadata"].setdefault("annotations", {})[SPEC_HASH_ANNOTATION] = digest
    return obj


def child_digest(obj: Obj) -> str:
    return str(obj["metadata"]["annotations"][SPEC_HASH_ANNOTATION])


def decide(snapshot: ModelSnapshot) -> Decision:
    """The decision for one MeshModel (see the module's docstring)."""
    return _Decider(snapshot).run()


class _Decider:
    def __init__(self, s: ModelSnapshot) -> None:
        self.s = s
        self.status = s.status.model_copy(deep=True)
        self.d = Decision(
            reason="PlanKept",
            outcome="ok",
            status=self.status,
            claim=planning.combined_claim(
                planning.status_plans(s.status.plan, s.status.replica_plans)
            ),
            capacity_seen=s.capacity_seen,
        )
        self.view: PoolView | None = None
        # Nodes whose worker of the current plan failed (left out of its re-plan).
        self._failed_nodes: set[str] = set()
        # Replicas whose worker restarted under their host (WorkerRestarted).
        self._restarted: set[int] = set()
        # Why a model scaled to zero starts again (None: it was not at zero).
        self._woken: str | None = None
        # Replicas planned anew by this decision (their children change at once).
        self._replanned: set[int] = set()
        # The replicas to serve: spec.replicas, or the autoscaler's choice.
        self.count = 1

    # -- outcome helpers -----------------------------------------------------------

    def cond(self, type_: str, state: ConditionState, reason: str, message: str = "") -> None:
        self.status.conditions = set_condition(
            self.status.conditions,
            type_,
            state,
            reason,
            message,
            observed_generation=self.s.model.generation,
            now=self.s.now,
        )

    def note(self, reason: str, message: str, type_: str = "Normal") -> None:
        self.d.events.append(Event(reason, message, type_))

    def blocked(
        self,
        reason: str,
        message: str,
        look_again: LookAgain,
        *,
        planned: bool = False,
    ) -> Decision:
        """The model cannot progress: say why, and when to look again."""
        if not planned:
            self.cond(PLANNED, "False", reason, message)
        self.cond(READY, "False", reason, message)
        self.status.observed_generation = self.s.model.generation
        self.d.reason = reason
        self.d.outcome = "blocked"
        self.d.look_again = look_again
        return self.d

    # -- the decision --------------------------------------------------------------

    def run(self) -> Decision:
        s = self.s
        if s.deleted:
            self.d.reason = "Deleted"
            self.d.claim, self.d.claim_changed = None, True
            self.d.capacity_seen = None
            return self.d
        try:
            spec = MeshModelSpec.model_validate(dict(s.spec))
        except ValidationError as exc:
            return self.blocked("InvalidSpec", str(exc.errors()[0]["msg"]), LookAgain())
        self.status.served_names = spec.served_names(s.model.name)
        problem = planning.draft_problem(spec)
        if problem is not None:
            return self.blocked("InvalidSpec", problem, LookAgain())
        if self._at_zero(spec):
            return self.d
        self.count = self._replica_count(spec)
        self.d.replicas_wanted = self.count
        pool = s.pool
        if pool is None:
            missing = f"MeshPool {spec.pool_ref!r} does not exist"
            return self.blocked("PoolNotFound", missing, LookAgain(backoff=True))
        for role, name, key in secret_refs(spec):
            if s.secrets.get((name, key)) is None:
                return self.blocked(
                    "SecretNotFound",
                    f"Secret {name!r} with key {key!r} ({role}) not found in {s.model.namespace}",
                    LookAgain(backoff=True),
                )
        if spec.source.pvc is not None and not isinstance(s.profile, planning.ModelProfile):
            profile = self._pvc_profile(spec, pool)
            if profile is None:
                return self.d
        elif isinstance(s.profile, SourceError):
            return self.blocked(s.profile.reason, str(s.profile), LookAgain(backoff=True))
        elif s.profile is None:
            return self.blocked(
                "SourceUnreadable", "the model's header was not read", LookAgain(backoff=True)
            )
        else:
            profile = s.profile
        if isinstance(s.draft_profile, SourceError):
            why = f"draft model: {s.draft_profile}"
            return self.blocked(s.draft_profile.reason, why, LookAgain(backoff=True))
        self.status.model_size_bytes = profile.file_bytes
        plans = self._plan(spec, pool, profile)
        if plans is None:
            return self.d
        self._converge(spec, pool, plans, profile)
        return self.d

    # -- scale to zero and the autoscaler ------------------------------------------

    def _at_zero(self, spec: MeshModelSpec) -> bool:
        """Whether the model is at zero after this decision: it stays there, or goes
        there after `spec.scaleToZeroAfter` without a request at any gateway. A
        model at zero that is asked for again (or may no longer be at zero) is
        planned again (`ScaleFromZero`)."""
        after = spec.zero_after_seconds()
        demand = self.s.demand
        since = self.status.scaled_to_zero_time
        if since is not None:
            woken = _wake_reason(after, demand, _parse_time(since))
            if woken is None:
                self._zero(f"idle since {since}")
                return True
            self.status.scaled_to_zero_time = None
            self._woken = woken
            self.d.scaling = "from_zero"
            return False
        if after is None or demand is None or not demand.complete:
            return False
        # Only a serving model goes, idle since it began to serve at the latest:
        # one still loading (or without room) has not been idle while it served.
        ready = next((c for c in self.status.conditions if c.type == READY), None)
        serving_since = _parse_time(ready.last_transition_time) if ready else None
        if ready is None or ready.status != "True" or serving_since is None:
            return False
        serving = (self.s.now - serving_since).total_seconds()
        idle = min(demand.idle_seconds(self.s.now), serving)
        if idle < after:
            return False
        self.d.scaling = "to_zero"
        self.status.scaled_to_zero_time = rfc3339(self.s.now)
        self.status.desired_replicas = None
        what = f"no request at any gateway for {_seconds(idle)}"
        self.note("ScaledToZero", f"{what}: workers, host and memory released")
        self._zero(what)
        return True

    def _zero(self, why: str) -> None:
        """The model at zero: nothing held, Ready=False ScaledToZero."""
        held = bool(planning.status_plans(self.status.plan, self.status.replica_plans))
        self._release_all()
        self.d.claim_changed = held
        self.status.conditions = [c for c in self.status.conditions if c.type != REPLICAS_AVAILABLE]
        reason = SCALED_TO_ZERO
        self.cond(PLANNED, "False", reason, why)
        self.cond(WORKERS_READY, "False", reason, "")
        self.cond(READY, "False", reason, f"{why}; the next request starts it again")
        self.cond(DEGRADED, "False", "AsPlanned", "")
        self.status.observed_generation = self.s.model.generation
        self.d.reason = reason

    def _replica_count(self, spec: MeshModelSpec) -> int:
        """The replicas to serve: spec.replicas, or with spec.autoscaling the count
        its demand calls for. Up at once when the load (requests in flight plus
        held, summed over the gateways) exceeds targetBusySlots per replica and
        every replica serves; down only when the load stayed low for
        scaleDownAfter, and that long after the last change."""
        auto = spec.autoscaling
        if auto is None:
            self.status.desired_replicas = None
            self.status.last_scale_time = None
            return spec.replicas
        lo, hi = auto.min_replicas, auto.max_replicas
        current = min(max(self.status.desired_replicas or lo, lo), hi)
        target = auto.target_busy_slots or spec.parallel
        demand = self.s.demand
        new = current
        if demand is not None:
            now = self.s.now
            wanted = math.ceil(demand.load / target)
            serving = self.status.ready_replicas or 0
            window = auto.down_seconds()
            start = now - dt.timedelta(seconds=window)
            last = _parse_time(self.status.last_scale_time)
            if wanted > current and serving >= current:
                new = min(wanted, hi)
                self.note(
                    "ScaledUp",
                    f"load {demand.load} ({demand.busy} in flight, {demand.waiting} held) over "
                    f"{target} busy slots per replica: {current} -> {new} replicas",
                )
            elif (
                wanted < current
                and demand.complete
                and demand.history
                and demand.history[0][0] <= start
                and (last is None or last <= start)
            ):
                peak = demand.peak_since(start)
                lower = max(math.ceil(peak / target), lo)
                if lower < current:
                    new = lower
                    self.note(
                        "ScaledDown",
                        f"peak load {peak} over the last {_seconds(window)}, "
                        f"{target} busy slots per replica: {current} -> {new} replicas",
                    )
            if new != current:
                self.status.last_scale_time = rfc3339(now)
                self.d.scaling = "up" if new > current else "down"
        self.status.desired_replicas = new
        return new

    # -- the model's header on a PVC -----------------------------------------------

    def _pvc_profile(self, spec: MeshModelSpec, pool: PoolInfo) -> planning.ModelProfile | None:
        """The profile of a model on a PVC, which only a pod mounting it can read.

        Its header-reader pod leaves the profile in its termination message and
        stays as the record of it; until it is done the model waits (ReadingHeader),
        looked at again every few seconds. A failed read is reported and retried
        with backoff by a new pod. None when the decision is made without it.
        """
        pvc = spec.source.pvc
        assert pvc is not None
        model = self.s.model
        where = f"{pvc.path} on PVC {pvc.claim_name}"
        source = cache_key(spec.source)
        name = header_pod_name(model.name)
        pod = next((p for p in self._pods(HEADER_COMPONENT) if p.name == name), None)
        header = ChildRef("v1", "Pod", name)
        if pod is not None and pod.source_key != source:
            # The source changed since: read the new one.
            self.d.delete.append(header)
            self._reading(f"{where}: replacing header-reader pod {name}")
            return None
        if pod is None:
            self.d.create.append(
                build_header_pod(
                    model.name,
                    model.namespace,
                    model.uid,
                    spec=spec,
                    pool=pool.spec,
                    source_key=source,
                    model_path=container_model_path(spec.source),
                )
            )
            self._reading(f"reading the header of {where} (pod {name})")
            return None
        if pod.phase == "Succeeded":
            try:
                profile = decode_profile(pod.message or "")
            except PlannerInputError as exc:
                self.d.delete.append(header)
                self.blocked(
                    "SourceUnreadable", f"{where}: pod {name}: {exc}", LookAgain(backoff=True)
                )
                return None
            self.d.learned_profile = profile
            return profile
        if pod.phase == "Failed":
            # Deleted so the retry reads again; the reason stays in the condition.
            self.d.delete.append(header)
            self.blocked(
                "SourceUnreadable",
                f"{where}: {pod.message or 'pod failed'}",
                LookAgain(backoff=True),
            )
            return None
        detail = f": {pod.message}" if pod.message else ""
        self._reading(f"reading the header of {where} (pod {name} {pod.phase}{detail})")
        return None

    def _reading(self, message: str) -> None:
        self.blocked("ReadingHeader", message, LookAgain(seconds=HEADER_POLL_SECONDS))

    # -- the plan ------------------------------------------------------------------

    def _serving(self) -> list[Plan]:
        """The model's planned replicas, by replica. A plan made before replicas gets
        the generation and restart count its pods already carry."""
        plans = planning.status_plans(self.status.plan, self.status.replica_plans)
        for p in plans:
            if p.generation is None:
                p.generation = self.status.plan_generation or 1
            if p.group_restarts is None:
                p.group_restarts = self.status.group_restarts
        return plans

    def _set_plans(self, plans: list[Plan]) -> None:
        """Record the replicas' plans in the status and claim them all."""
        plans = sorted(plans, key=lambda p: p.replica)
        self.status.plan = plans[0]
        self.status.replica_plans = plans[1:]
        self.status.replicas = len(plans)
        self.status.nodes = ",".join(dict.fromkeys(n for p in plans for n in p.layer_nodes()))
        self.status.split = ",".join(str(x) for x in plans[0].tensor_split)
        self.d.claim, self.d.claim_changed = planning.combined_claim(plans), True

    def _plan(
        self, spec: MeshModelSpec, pool: PoolInfo, profile: planning.ModelProfile
    ) -> list[Plan] | None:
        """The plans of the model's replicas to serve, re-planned where a reason
        calls for it; None when none can be served (the decision says why)."""
        s = self.s
        count = self.count
        serving = self._serving()
        # Scaling down drops the highest replicas (their children are not wanted).
        current, dropped = serving[:count], serving[count:]
        if dropped:
            self._drop(dropped)
        # A serving model is checked on its own nodes only, and against the pool's
        # capacity as a whole: building every node's view for every model on every
        # pass would cost more than all the planning.
        planned_nodes = {n for p in current for n in p.layer_nodes()} if current else None
        view = build_pool_view(pool.spec, s.nodes, s.meshnodes, s.others, s.now, only=planned_nodes)
        reason, message, lost = self._replan_reason(current, count, view, pool)
        if reason is None or reason == "WorkerRestarted":
            self.view = view
            if reason == "WorkerRestarted":
                self.d.reason = reason
                for p in current:
                    if p.replica in self._restarted:
                        p.group_restarts = (p.group_restarts or 0) + 1
                self.status.group_restarts += 1
                what = f"{message}: the host restarts with its group"
                self.note("WorkerRestarted", what, "Warning")
                self.cond(DEGRADED, "True", reason, message)
            if dropped:
                self._set_plans(current)
            return current
        if planned_nodes is not None:
            view = build_pool_view(pool.spec, s.nodes, s.meshnodes, s.others, s.now)
        self.view = view
        inventory = to_inventory(view)
        if self._failed_nodes:
            # Their workers cannot start there: plan around them.
            usable = [n.name for n in view.usable_nodes() if n.name not in self._failed_nodes]
            inventory = to_inventory(view, only=usable)
        by_replica = {p.replica: p for p in current}
        free = [r for r in range(MAX_REPLICAS) if r not in by_replica]
        indices = sorted([*by_replica, *free[: count - len(current)]])
        # A lost replica is planned again like a new one (one replica alone keeps
        # its plan as the planner's start when only a node left).
        keep = [
            None if r in lost and (count > 1 or reason == "WorkerFailed") else by_replica.get(r)
            for r in indices
        ]
        request = planning.placement_request(spec, pool.spec, profile)
        started = time.perf_counter()
        speculation = planning.ngram_speculation(spec)
        result = planning.replicas(
            profile, inventory, request, keep, pool.spec, speculation=speculation
        )
        self.d.plan_seconds = time.perf_counter() - started
        # Why a replica could not be placed (the next one's reason, or its draft's).
        why = result.cause
        placed: list[Plan] = []
        changed: list[Plan] = []
        for slot, one in zip(result.slots, result.replicas, strict=True):
            new_plan = planning.to_plan(one)
            new_plan.replica = indices[slot]
            if isinstance(s.draft_profile, planning.ModelProfile):
                new_plan.draft = planning.planned_draft(s.draft_profile, spec, new_plan.host_node)
            old = by_replica.get(new_plan.replica)
            if old is not None and planning.layout_of(old) == planning.layout_of(new_plan):
                # Kept: one of several replicas stays exactly as it was.
                new_plan.generation, new_plan.group_restarts = old.generation, old.group_restarts
                placed.append(new_plan if count == 1 else old)
                continue
            # Checked where a layout is new: a serving host is not stopped for a
            # small change of free RAM, as a kept plan's devices are not. Without
            # room on its node, the host may move to another node of the layout.
            no_room = None
            if isinstance(s.draft_profile, planning.ModelProfile):
                hosted, new_plan.draft, no_room = planning.with_draft(
                    one, profile, s.draft_profile, inventory, request, speculation=speculation
                )
                if hosted.host_node != one.host_node:
                    draft = new_plan.draft
                    new_plan = planning.to_plan(hosted)
                    new_plan.replica, new_plan.draft = indices[slot], draft
            if no_room is not None:
                why = no_room
                continue
            placed.append(new_plan)
            changed.append(new_plan)
        if count > 1 and len(placed) < count:
            why = f"{len(placed)} of {count} replicas fit: {why}"
        if not placed:
            self._no_capacity(current, reason, message, why)
            return None
        if reason == "Consolidate" and not changed:
            return current
        self.d.reason = reason
        self.status.planned_for_generation = s.model.generation
        self.status.pool_generation = pool.generation
        if changed:
            generation = (self.status.plan_generation or 0) + 1
            self.status.plan_generation = generation
            for p in changed:
                p.generation, p.group_restarts = generation, 0
                self._replanned.add(p.replica)
                # A new group of pods: no restart of theirs has been acted on yet.
                self._forget_restarts(p.replica)
            self.d.plan_outcome = "replanned" if current else "planned"
            verb = "Replanned" if current else "Planned"
            what = (
                changed[0].reason
                if count == 1
                else "; ".join(f"replica {p.replica}: {p.reason}" for p in changed)
            )
            self.note(verb, f"{reason}: {message + '; ' if message else ''}{what}")
        left = sorted(set(by_replica) - {p.replica for p in placed})
        if left:
            self.note("PlanLost", f"{reason}: replicas {left} could not be planned", "Warning")
        self._set_plans(placed)
        if reason in LOSS_REASONS:
            self.cond(DEGRADED, "True", reason, message)
        summary = placed[0].reason if count == 1 else result.reason
        self.cond(PLANNED, "True", reason if changed else "PlanKept", summary)
        self._replicas_available(count, len(placed), why)
        return sorted(placed, key=lambda p: p.replica)

    def _replicas_available(self, count: int, planned: int, why: str) -> None:
        """Say how many replicas fit; fewer than asked are retried with backoff."""
        had = any(c.type == REPLICAS_AVAILABLE for c in self.status.conditions)
        if planned < count:
            previous = next(
                (c for c in self.status.conditions if c.type == REPLICAS_AVAILABLE), None
            )
            if previous is None or (previous.reason, previous.message) != ("NoCapacity", why):
                self.note("NoCapacity", why, "Warning")
            self.cond(REPLICAS_AVAILABLE, "False", "NoCapacity", why)
            self.d.look_again = LookAgain(backoff=True)
        elif count > 1 or had:
            self.cond(REPLICAS_AVAILABLE, "True", "AllPlanned", f"{count} of {count} planned")

    def _drop(self, dropped: list[Plan]) -> None:
        replicas = [p.replica for p in dropped]
        if self.d.scaling != "down":  # the autoscaler's own Event says it
            self.note("ScaledDown", f"replicas {replicas} removed")
        for r in replicas:
            self._forget_restarts(r)

    def _release_all(self) -> None:
        """Hold no plan: drop every replica's plan, claim and workload."""
        self.status.plan = None
        self.status.replica_plans = []
        self.status.replicas = 0
        self.status.ready_replicas = 0
        self.status.nodes = None
        self.status.split = None
        self.status.endpoint = None
        self.status.worker_restarts = {}
        self.d.claim, self.d.claim_changed = None, True
        self.d.delete.extend(
            ChildRef(WORKLOAD_KINDS[kind], kind, name)
            for kind, name in sorted(self.s.children)
            if kind in WORKLOAD_KINDS
        )

    def _no_capacity(self, current: list[Plan], reason: str, message: str, why: str) -> None:
        self.d.plan_outcome = "infeasible"
        if current:
            self.note("PlanLost", f"{reason}: {message}", "Warning")
        self._release_all()
        self.cond(WORKERS_READY, "False", "NotPlanned", "")
        if reason in LOSS_REASONS:
            self.cond(DEGRADED, "True", reason, message)
        planned = next((c for c in self.status.conditions if c.type == PLANNED), None)
        if planned is None or (planned.reason, planned.message) != ("NoCapacity", why):
            # Once per change: retries must not flood the namespace with Events.
            self.note("NoCapacity", why, "Warning")
        if any(c.type == REPLICAS_AVAILABLE for c in self.status.conditions):
            self.cond(REPLICAS_AVAILABLE, "False", "NoCapacity", why)
        self.blocked("NoCapacity", why, LookAgain(backoff=True))

    def _replan_reason(
        self, current: list[Plan], count: int, view: PoolView, pool: PoolInfo
    ) -> tuple[str | None, str, set[int]]:
        """Why to plan again (None: no reason), what happened, and the replicas lost."""
        s = self.s
        if not current:
            if self._woken is not None:
                return "ScaleFromZero", self._woken, set()
            return "Initial", "", set()
        several = count > 1 or len(current) > 1

        def named(plan: Plan, text: str) -> str:
            return f"replica {plan.replica}: {text}" if several else text

        lost: dict[int, str] = {}
        node_lost = False
        for plan in current:
            problems = plan_problems(plan, view)
            if problems:
                lost[plan.replica] = named(plan, "; ".join(problems))
                node_lost = True
                continue
            failed = self._failed_workers(plan)
            if failed:
                self._failed_nodes |= {node for node, _ in failed}
                lost[plan.replica] = named(plan, "; ".join(text for _, text in failed))
        if lost:
            return (
                ("NodeLost" if node_lost else "WorkerFailed"),
                "; ".join(lost.values()),
                set(lost),
            )
        if self.status.planned_for_generation != s.model.generation:
            return "SpecChanged", f"generation {s.model.generation}", set()
        if self.status.pool_generation != pool.generation:
            return "PoolChanged", f"pool generation {pool.generation}", set()
        if len(current) < count:
            return "ScaleUp", f"{len(current)} of {count} replicas planned", set()
        restarted: dict[int, list[str]] = {}
        for plan in current:
            found = self._restarted_workers(plan)
            if found:
                restarted[plan.replica] = [named(plan, text) for text in found]
        if restarted:
            self._restarted = set(restarted)
            return "WorkerRestarted", "; ".join(t for v in restarted.values() for t in v), set()
        if s.capacity is not None:
            self.d.capacity_seen = s.capacity
            # Replicas stay on their nodes while they fit: more room moves none.
            if count == 1 and capacity_grew(s.capacity_seen, s.capacity):
                return "Consolidate", "the pool has more room", set()
        return None, "", set()

    def _pods(self, component: str) -> list[PodInfo]:
        return [p for p in self.s.pods if p.component == component and not p.deleting]

    def _group_pods(self, component: str, plan: Plan) -> list[PodInfo]:
        """The pods of `component` that belong to the replica's current plan."""
        current = str(plan.generation)
        return [
            p
            for p in self._pods(component)
            if p.replica == plan.replica and p.plan_generation == current
        ]

    def _failed_workers(self, plan: Plan) -> list[tuple[str, str]]:
        """(node, what happened) of the plan's workers that cannot run."""
        planned = {d.node for d in plan.devices}
        return [
            (pod.node, f"{pod.node}: worker {pod.name} {pod.waiting_reason or pod.phase}")
            for pod in self._group_pods(RPC_COMPONENT, plan)
            if pod.node in planned
            and (
                pod.phase == "Failed"
                or pod.waiting_reason in FAILED_WAITING
                or (pod.waiting_reason == CRASH_LOOP and pod.restarts >= CRASH_LOOP_RESTARTS)
            )
        ]

    def _acted(self, replica: int) -> dict[str, int]:
        """The restart counts acted on of the replica's workers, by pod name."""
        out = {}
        for key, count in self.status.worker_restarts.items():
            r, name = restart_key_replica(key)
            if r == replica:
                out[name] = count
        return out

    def _forget_restarts(self, replica: int) -> None:
        self.status.worker_restarts = {
            k: v
            for k, v in self.status.worker_restarts.items()
            if restart_key_replica(k)[0] != replica
        }

    def _restarted_workers(self, plan: Plan) -> list[str]:
        """Workers of the replica's serving group that restarted since the restarts
        last acted on; records the counts seen. An RPC server that restarts loses
        what its host put in it, so the host must start again with it."""
        planned = {d.node for d in plan.devices}
        workers = [p for p in self._group_pods(RPC_COMPONENT, plan) if p.node in planned]
        if {p.node for p in workers} != planned:
            return []  # the group is not whole yet: its host has not started
        acted = self._acted(plan.replica)
        restarted = []
        for pod in workers:
            before = acted.get(pod.name)
            if before is not None and pod.restarts > before:
                restarted.append(f"worker {pod.name} on {pod.node} restarted")
            elif before is None and acted:
                # Every node's pod was acted on: this one took another's place.
                restarted.append(f"worker {pod.name} on {pod.node} replaced")
        self._forget_restarts(plan.replica)
        self.status.worker_restarts.update(
            {restart_key(plan.replica, p.name): p.restarts for p in workers}
        )
        return restarted if self._group_pods(HOST_COMPONENT, plan) else []

    # -- children --------------------------------------------------------------------

    def _want(self, obj: Obj) -> bool:
        """Want `obj` (carrying its digest: `with_hash`) to exist; False when an
        older one must first be deleted (one whose selector lacks the replica
        label, which a selector cannot gain)."""
        self.d.children.append(obj)
        name = obj["metadata"]["name"]
        existing = self.s.children.get((obj["kind"], name))
        if existing == STALE_SELECTOR:
            self.d.delete.append(ChildRef(obj["apiVersion"], obj["kind"], name))
            return False
        if existing != child_digest(obj):
            self.d.apply.append(obj)
        return True

    def _workload(
        self, spec: MeshModelSpec, pool: PoolInfo, plan: Plan, profile: planning.ModelProfile
    ) -> tuple[ModelWorkload, list[str] | None]:
        model = self.s.model
        addresses = self._worker_addresses(plan, pool)
        workload = ModelWorkload(
            name=model.name,
            namespace=model.namespace,
            uid=model.uid,
            spec=spec,
            pool_name=spec.pool_ref,
            pool=pool.spec,
            plan_generation=plan.generation or 1,
            rpc_nodes=list(plan.rpc),
            host_node=plan.host_node or plan.rpc[-1],
            rpc_args=planning.rpc_args(plan, pool.spec),
            llama_args=planning.llama_args(plan, spec, model.name, addresses, profile),
            model_path=planning.model_path(spec),
            fetch_args=planning.fetch_args(spec),
            draft_fetch_args=planning.draft_fetch_args(spec),
            gpus_per_node=planning.gpus_per_node(plan),
            variants=planning.image_variants(plan),
            group_restarts=plan.group_restarts or 0,
            host_tier_mib=(plan.host_tier.memory_mib if plan.host_tier else 0)
            + (plan.draft.memory_mib if plan.draft else 0),
            hf_endpoint=self.s.hf_endpoint,
            replica=plan.replica,
        )
        return workload, addresses

    def _converge(
        self,
        spec: MeshModelSpec,
        pool: PoolInfo,
        plans: list[Plan],
        profile: planning.ModelProfile,
    ) -> None:
        previous = self.status.version_mismatch
        mismatches: list[VersionMismatch] = []
        states: list[_ReplicaState] = []
        wanted: set[tuple[str, str]] = set()
        missing: list[str] = []
        first: ModelWorkload | None = None
        built: list[_Built] = []
        for plan in plans:
            workload, addresses = self._workload(spec, pool, plan, profile)
            first = first or workload
            if addresses is None:
                missing.extend(self._missing_workers(plan))
            verdict = self._host_verdict(workload, pool, plan, previous)
            if verdict.mismatch is not None:
                mismatches.append(verdict.mismatch)
            # Until every worker of this plan is up, keep the host stopped: an RPC
            # client cannot start without all its servers (nor with refusing ones).
            running = addresses is not None and verdict.run
            host = build_host_deployment(workload, replicas=1 if running else 0)
            built.append(self._built(plan, [*build_rpc_daemonsets(workload), host]))
            states.append(self._replica_state(plan, addresses, verdict))
        deferred = self._rolling(built)
        for b in built:
            names = [(o["kind"], o["metadata"]["name"]) for o in b.objs]
            wanted.update(names)
            if b.plan.replica in deferred:
                self.d.deferred.extend(
                    ChildRef(WORKLOAD_KINDS[kind], kind, name) for kind, name in names
                )
                continue
            whole = True
            for obj in b.objs:
                whole = self._want(obj) and whole
            if not whole:
                # Made again with the replica in its selectors: its new pods
                # replace the old ones, which no restart count refers to.
                self._forget_restarts(b.plan.replica)
        assert first is not None
        self.status.version_mismatch = mismatches[0] if mismatches else None
        self.d.delete.extend(
            ChildRef(WORKLOAD_KINDS[kind], kind, name)
            for kind, name in sorted(self.s.children)
            if kind in WORKLOAD_KINDS and (kind, name) not in wanted
        )
        total = sum(len(p.rpc) for p in plans)
        if missing:
            waiting = f"waiting for RPC servers on {', '.join(missing)}"
            self.cond(WORKERS_READY, "False", "WorkersStarting", waiting)
        else:
            self.cond(WORKERS_READY, "True", "WorkersReady", workers_ready_message(total))
        # The Service selects every replica's host: requests go to each ready one.
        self._want(with_hash(build_service(first)))
        self._want(with_hash(build_network_policy(first, self.s.peers)))
        self._release_silent_nodes()
        self._report(self.count, states)

    def _built(self, plan: Plan, objs: list[Obj]) -> _Built:
        """One replica's workloads and how they stand against what exists."""
        existing = self.s.children
        objs = [with_hash(o) for o in objs]
        keys = [(o["kind"], o["metadata"]["name"]) for o in objs]
        pending = any(existing.get(k) != child_digest(o) for k, o in zip(keys, objs, strict=True))
        serving = any(p.ready for p in self._group_pods(HOST_COMPONENT, plan))
        settled = not pending and all(k in self.s.settled for k in keys)
        return _Built(plan, objs, pending, serving, settled)

    def _rolling(self, built: list[_Built]) -> set[int]:
        """The replicas whose changed workloads wait (a rolling update, recorded in
        `status.rollingReplicas`): a change of the model's or pool's spec that
        would restart serving replicas reaches one at a time, once every other
        replica serves on workloads that are up to date and rolled out (or not
        yet changed). A replica planned anew, restarted with its group, or not
        serving is changed at once."""
        rolling = set(self.status.rolling_replicas)
        self.status.rolling_replicas = []
        if len(built) < 2:
            return set()
        spec_change = self.d.reason in {"SpecChanged", "PoolChanged"}
        candidates = [
            b
            for b in built
            if b.pending
            and b.serving
            and (spec_change or b.plan.replica in rolling)
            and b.plan.replica not in self._replanned
            and b.plan.replica not in self._restarted
        ]
        if not candidates:
            return set()
        head = candidates[0]
        others_fine = all(b.serving and (b.settled or b.pending) for b in built if b is not head)
        waiting = {b.plan.replica for b in candidates[1:]}
        if not others_fine:
            waiting.add(head.plan.replica)
        else:
            follow = f"; replicas {sorted(waiting)} follow one at a time" if waiting else ""
            self.note("RollingUpdate", f"replica {head.plan.replica}: new workloads{follow}")
        self.status.rolling_replicas = sorted(waiting)
        return waiting

    def _release_silent_nodes(self) -> None:
        """Release this model's pods on nodes whose agent went silent.

        Their kubelet is presumably gone and will never confirm a termination: a
        Recreate host Deployment would wait for the old host pod forever. Done
        after the new plan's children are applied, so no controller recreates a
        pod there from the old template.
        """
        if self.view is None:
            return
        silent = {n.name for n in self.view.nodes if not n.fresh}
        self.d.release = [
            p
            for p in self.s.pods
            if p.node in silent and p.component in {RPC_COMPONENT, HOST_COMPONENT}
        ]

    def _host_verdict(
        self,
        w: ModelWorkload,
        pool: PoolInfo,
        plan: Plan,
        previous: VersionMismatch | None,
    ) -> handshake.HostVerdict:
        """Whether the replica's host may run: not while its workers refuse its protocol."""
        hosts = [
            handshake.HostExit(p.name, p.images_key, p.exits)
            for p in self._group_pods(HOST_COMPONENT, plan)
        ]
        images = rpc_images(w)
        # Only workers running the pool's current image: a host may have talked to
        # one on its way out after the images changed.
        endpoints = {
            p.node: f"{p.ip}:{pool.spec.rpc_port}"
            for p in self._group_pods(RPC_COMPONENT, plan)
            if p.ip and p.node in images and p.image == images[p.node]
        }
        group = handshake.Group(
            llama_server=host_image(w),
            workers=tuple(handshake.Worker(n, images[n], endpoints.get(n)) for n in w.rpc_nodes),
            generation=self.s.model.generation,
            pool_generation=pool.generation,
        )
        verdict = handshake.decide_host(previous, hosts, group)
        if verdict.found:
            self.note(handshake.MISMATCH_REASON, verdict.message, "Warning")
        return verdict

    def _ready_workers(self, plan: Plan) -> dict[str, PodInfo]:
        return {
            p.node: p for p in self._group_pods(RPC_COMPONENT, plan) if p.ready and p.ip and p.node
        }

    def _missing_workers(self, plan: Plan) -> list[str]:
        ready = self._ready_workers(plan)
        return [n for n in plan.rpc if n not in ready]

    def _worker_addresses(self, plan: Plan, pool: PoolInfo) -> list[str] | None:
        by_node = self._ready_workers(plan)
        if any(n not in by_node for n in plan.rpc):
            return None
        return [f"{by_node[n].ip}:{pool.spec.rpc_port}" for n in plan.rpc]

    def _replica_state(
        self, plan: Plan, addresses: list[str] | None, verdict: handshake.HostVerdict
    ) -> _ReplicaState:
        hosts = self._group_pods(HOST_COMPONENT, plan)
        if not verdict.run:
            return _ReplicaState(plan, False, handshake.MISMATCH_REASON, verdict.message, True)
        if addresses is None:
            why = "the host starts once every worker is up"
            return _ReplicaState(plan, False, "WaitingForWorkers", why)
        if any(p.ready for p in hosts):
            serving = f"llama-server on {plan.host_node} answers /health"
            return _ReplicaState(plan, True, "Serving", serving)
        if hosts:
            pod = hosts[0]
            reason = (
                "Fetching"
                if pod.waiting_reason == "PodInitializing" or pod.phase == "Pending"
                else "Loading"
            )
            message = f"host pod {pod.name} is {pod.waiting_reason or pod.phase}"
            return _ReplicaState(plan, False, reason, message)
        return _ReplicaState(plan, False, "HostStarting", "host pod not created yet")

    def _report(self, count: int, states: list[_ReplicaState]) -> None:
        """Ready while any replica serves; Degraded while fewer serve than asked."""
        model = self.s.model
        service = host_service_name(model.name)
        self.status.endpoint = f"http://{service}.{model.namespace}.svc:{HOST_PORT}/v1"
        serving = [st for st in states if st.ready]
        self.status.ready_replicas = len(serving)
        self.status.replicas = len(states)
        several = count > 1 or len(states) > 1
        if serving:
            was_ready = condition_status(self.status.conditions, READY) == "True"
            message = serving[0].message if not several else f"{len(serving)} of {count} serving"
            self.cond(READY, "True", "Serving", message)
            if len(serving) >= count:
                if self.d.reason != "WorkerRestarted":
                    self.cond(DEGRADED, "False", "AsPlanned", "")
            elif condition_status(self.status.conditions, DEGRADED) != "True":
                self.cond(
                    DEGRADED,
                    "True",
                    "ReplicasUnavailable",
                    f"{len(serving)} of {count} replicas serving",
                )
            if not was_ready:
                self.note("Ready", f"serving on {self.status.nodes}")
        else:
            st = states[0]
            message = st.message if not several else f"replica {st.plan.replica}: {st.message}"
            self.cond(READY, "False", st.reason, message)
            if any(x.stopped for x in states):
                self.d.outcome = "blocked"
        if condition_status(self.status.conditions, DEGRADED) == "Unknown":
            self.cond(DEGRADED, "False", "AsPlanned", "")
        self.status.observed_generation = model.generation


@dataclass(frozen=True)
class _Built:
    """A replica's workloads as the decision builds them."""

    plan: Plan
    objs: list[Obj]
    pending: bool  # some differ from what exists
    serving: bool  # its host answers /health
    settled: bool  # all up to date and rolled out


@dataclass(frozen=True)
class _ReplicaState:
    """How one replica is doing, for the model's conditions."""

    plan: Plan
    ready: bool
    reason: str
    message: str
    stopped: bool = False  # its host is kept stopped (an RPC protocol mismatch)


def _parse_time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _seconds(seconds: float) -> str:
    """`75` -> `1m15s`, as durations are written in the spec."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else ""]
    return "".join(parts) + (f"{secs}s" if secs or not (hours or minutes) else "")


def _wake_reason(
    after: float | None, demand: Demand | None, since: dt.datetime | None
) -> str | None:
    """Why a model at zero starts again; None while it stays at zero."""
    if after is None:
        return "scaleToZeroAfter was removed"
    if demand is None:
        return None
    if demand.load:
        return f"{demand.load} requests at the gateways"
    if since is not None and demand.last_active > since:
        return "requests arrived at the gateways"
    return None


def workers_ready_message(servers: int) -> str:
    """WorkersReady's message once every RPC server of every replica is up: a plan
    whose host runs every layer itself (`hostUsesOwnNode` on one node) has none."""
    if servers == 0:
        return "no RPC servers: each host runs every layer itself"
    return f"{servers} RPC server{'s' if servers > 1 else ''} ready"


def restart_key(replica: int, pod: str) -> str:
    """The key of a worker pod in status.workerRestarts: its name for replica 0 (as
    before replicas), `<replica>/<name>` for the others."""
    return pod if replica == 0 else f"{replica}/{pod}"


def restart_key_replica(key: str) -> tuple[int, str]:
    """The replica and pod name a status.workerRestarts key stands for."""
    replica, sep, pod = key.partition("/")
    if not sep or not replica.isdigit():
        return 0, key
    return int(replica), pod


def secret_refs(spec: MeshModelSpec) -> list[tuple[str, str, str]]:
    """(role, Secret name, key) of every Secret the model's spec names."""
    refs = []
    hf = spec.source.huggingface
    if hf is not None and hf.token_secret_ref is not None:
        refs.append(("token", hf.token_secret_ref.name, hf.token_secret_ref.key))
    draft_hf = spec.draft.source.huggingface if spec.draft is not None else None
    if draft_hf is not None and draft_hf.token_secret_ref is not None:
        ref = draft_hf.token_secret_ref
        refs.append(("draftToken", ref.name, ref.key))
    if spec.api_key_secret_ref is not None:
        refs.append(("apiKey", spec.api_key_secret_ref.name, spec.api_key_secret_ref.key))
    return refs
