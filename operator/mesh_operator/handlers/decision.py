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
- `Deleted`: the model is gone; its claim on the pool is dropped (its children go
  with it through their ownerReferences).
- `RpcVersionMismatch` shows in the Ready condition of a kept plan whose host
  stays stopped (`handshake.decide_host`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from mesh_operator import handshake, planning
from mesh_operator.api.conditions import ConditionState, condition_status, set_condition
from mesh_operator.api.contract import (
    HEADER_COMPONENT,
    HOST_COMPONENT,
    HOST_PORT,
    RPC_COMPONENT,
    SPEC_HASH_ANNOTATION,
    host_service_name,
)
from mesh_operator.api.meshmodel import MeshModelSpec, MeshModelStatus, Plan
from mesh_operator.api.meshnode import MeshNodeStatus
from mesh_operator.handlers.snapshot import PodInfo, PoolInfo
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
    # (Secret name, key) -> value, None when missing; read for the refs in the spec.
    secrets: Mapping[tuple[str, str], str | None] = field(default_factory=dict)
    # The model file's profile, or why it could not be read; None when not read
    # (a PVC source whose header-reader pod has not reported yet).
    profile: planning.ModelProfile | SourceError | None = None
    # The pool's capacity steps with every plan held, and those the previous
    # decision saw: more room lets a serving model consolidate.
    capacity: Capacity | None = None
    capacity_seen: Capacity | None = None
    peers: PolicyPeers = field(default_factory=lambda: PolicyPeers("", ""))
    # The Hugging Face mirror the operator reads from (its HF_ENDPOINT), which
    # `mesh fetch` must download from too; None for huggingface.co.
    hf_endpoint: str | None = None


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
            claim=s.status.plan if s.status.plan and s.status.plan.devices else None,
            capacity_seen=s.capacity_seen,
        )
        self.view: PoolView | None = None
        # Nodes whose worker of the current plan failed (left out of its re-plan).
        self._failed_nodes: set[str] = set()

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
        self.status.model_size_bytes = profile.file_bytes
        plan = self._plan(spec, pool, profile)
        if plan is None:
            return self.d
        self._converge(spec, pool, plan, profile)
        return self.d

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

    def _plan(
        self, spec: MeshModelSpec, pool: PoolInfo, profile: planning.ModelProfile
    ) -> Plan | None:
        s = self.s
        current = self.status.plan if self.status.plan and self.status.plan.devices else None
        # A serving model is checked on its own nodes only, and against the pool's
        # capacity as a whole: building every node's view for every model on every
        # pass would cost more than all the planning.
        planned_nodes = {d.node for d in current.devices} if current is not None else None
        view = build_pool_view(pool.spec, s.nodes, s.meshnodes, s.others, s.now, only=planned_nodes)
        reason, message = self._replan_reason(current, view, pool)
        if reason is None:
            self.view = view
            assert current is not None
            return current
        if reason == "WorkerRestarted":
            self.view = view
            assert current is not None
            self.d.reason = reason
            self.status.group_restarts += 1
            self.note("WorkerRestarted", f"{message}: the host restarts with its group", "Warning")
            self.cond(DEGRADED, "True", reason, message)
            return current
        if planned_nodes is not None:
            view = build_pool_view(pool.spec, s.nodes, s.meshnodes, s.others, s.now)
        self.view = view
        inventory = to_inventory(view)
        keep = current
        if self._failed_nodes:
            # Their workers cannot start there: plan around them, from scratch.
            usable = [n.name for n in view.usable_nodes() if n.name not in self._failed_nodes]
            inventory, keep = to_inventory(view, only=usable), None
        request = planning.placement_request(spec, pool.spec, profile)
        started = time.perf_counter()
        result = planning.plan(profile, inventory, request, keep, pool.spec)
        self.d.plan_seconds = time.perf_counter() - started
        if not result.feasible:
            self._no_capacity(current, reason, message, result.reason)
            return None
        new_plan = planning.to_plan(result)
        changed = current is None or planning.layout_of(current) != planning.layout_of(new_plan)
        if reason == "Consolidate" and not changed:
            return current
        self.d.reason = reason
        self.status.planned_for_generation = s.model.generation
        self.status.pool_generation = pool.generation
        if changed:
            self.status.plan_generation = (self.status.plan_generation or 0) + 1
            # A new group of pods: no restart of theirs has been acted on yet.
            self.status.worker_restarts = {}
            self.d.plan_outcome = "replanned" if current else "planned"
            verb = "Replanned" if current else "Planned"
            self.note(verb, f"{reason}: {message + '; ' if message else ''}{new_plan.reason}")
        self.status.plan = new_plan
        self.status.nodes = ",".join(dict.fromkeys(d.node for d in new_plan.devices))
        self.status.split = ",".join(str(x) for x in new_plan.tensor_split)
        self.d.claim, self.d.claim_changed = new_plan, True
        if reason in LOSS_REASONS:
            self.cond(DEGRADED, "True", reason, message)
        self.cond(PLANNED, "True", reason if changed else "PlanKept", new_plan.reason)
        return new_plan

    def _no_capacity(self, current: Plan | None, reason: str, message: str, why: str) -> None:
        self.d.plan_outcome = "infeasible"
        if current is not None:
            self.note("PlanLost", f"{reason}: {message}", "Warning")
        self.status.plan = None
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
        self.cond(WORKERS_READY, "False", "NotPlanned", "")
        if reason in LOSS_REASONS:
            self.cond(DEGRADED, "True", reason, message)
        planned = next((c for c in self.status.conditions if c.type == PLANNED), None)
        if planned is None or (planned.reason, planned.message) != ("NoCapacity", why):
            # Once per change: retries must not flood the namespace with Events.
            self.note("NoCapacity", why, "Warning")
        self.blocked("NoCapacity", why, LookAgain(backoff=True))

    def _replan_reason(
        self, current: Plan | None, view: PoolView, pool: PoolInfo
    ) -> tuple[str | None, str]:
        s = self.s
        if current is None:
            return "Initial", ""
        problems = plan_problems(current, view)
        if problems:
            return "NodeLost", "; ".join(problems)
        failed = self._failed_workers(current)
        if failed:
            self._failed_nodes = {node for node, _ in failed}
            return "WorkerFailed", "; ".join(text for _, text in failed)
        if self.status.planned_for_generation != s.model.generation:
            return "SpecChanged", f"generation {s.model.generation}"
        if self.status.pool_generation != pool.generation:
            return "PoolChanged", f"pool generation {pool.generation}"
        restarted = self._restarted_workers(current)
        if restarted:
            return "WorkerRestarted", "; ".join(restarted)
        if s.capacity is not None:
            self.d.capacity_seen = s.capacity
            if capacity_grew(s.capacity_seen, s.capacity):
                return "Consolidate", "the pool has more room"
        return None, ""

    def _pods(self, component: str) -> list[PodInfo]:
        return [p for p in self.s.pods if p.component == component and not p.deleting]

    def _group_pods(self, component: str) -> list[PodInfo]:
        """The pods of `component` that belong to the current plan."""
        current = str(self.status.plan_generation)
        return [p for p in self._pods(component) if p.plan_generation == current]

    def _failed_workers(self, plan: Plan) -> list[tuple[str, str]]:
        """(node, what happened) of the plan's workers that cannot run."""
        planned = {d.node for d in plan.devices}
        return [
            (pod.node, f"{pod.node}: worker {pod.name} {pod.waiting_reason or pod.phase}")
            for pod in self._group_pods(RPC_COMPONENT)
            if pod.node in planned
            and (
                pod.phase == "Failed"
                or pod.waiting_reason in FAILED_WAITING
                or (pod.waiting_reason == CRASH_LOOP and pod.restarts >= CRASH_LOOP_RESTARTS)
            )
        ]

    def _restarted_workers(self, plan: Plan) -> list[str]:
        """Workers of the serving group that restarted since the restarts last acted
        on; records the counts seen. An RPC server that restarts loses what its host
        put in it, so the host must start again with it."""
        planned = {d.node for d in plan.devices}
        workers = [p for p in self._group_pods(RPC_COMPONENT) if p.node in planned]
        if {p.node for p in workers} != planned:
            return []  # the group is not whole yet: its host has not started
        acted = self.status.worker_restarts
        restarted = []
        for pod in workers:
            before = acted.get(pod.name)
            if before is not None and pod.restarts > before:
                restarted.append(f"worker {pod.name} on {pod.node} restarted")
            elif before is None and acted:
                # Every node's pod was acted on: this one took another's place.
                restarted.append(f"worker {pod.name} on {pod.node} replaced")
        self.status.worker_restarts = {p.name: p.restarts for p in workers}
        return restarted if self._group_pods(HOST_COMPONENT) else []

    # -- children --------------------------------------------------------------------

    def _want(self, obj: Obj) -> None:
        obj = with_hash(obj)
        self.d.children.append(obj)
        existing = self.s.children.get((obj["kind"], obj["metadata"]["name"]))
        if existing != child_digest(obj):
            self.d.apply.append(obj)

    def _converge(
        self, spec: MeshModelSpec, pool: PoolInfo, plan: Plan, profile: planning.ModelProfile
    ) -> None:
        model = self.s.model
        addresses = self._worker_addresses(plan, pool)
        workload = ModelWorkload(
            name=model.name,
            namespace=model.namespace,
            uid=model.uid,
            spec=spec,
            pool_name=spec.pool_ref,
            pool=pool.spec,
            plan_generation=self.status.plan_generation or 1,
            rpc_nodes=list(plan.rpc),
            host_node=plan.host_node or plan.rpc[-1],
            rpc_args=planning.rpc_args(plan, pool.spec),
            llama_args=planning.llama_args(plan, spec, model.name, addresses, profile),
            model_path=planning.model_path(spec),
            fetch_args=planning.fetch_args(spec),
            draft_fetch_args=planning.draft_fetch_args(spec),
            gpus_per_node=planning.gpus_per_node(plan),
            variants=planning.image_variants(plan),
            group_restarts=self.status.group_restarts,
            host_tier_mib=plan.host_tier.memory_mib if plan.host_tier else 0,
            hf_endpoint=self.s.hf_endpoint,
        )
        verdict = self._host_verdict(workload, pool)
        daemonsets = build_rpc_daemonsets(workload)
        for ds in daemonsets:
            self._want(ds)
        wanted = {ds["metadata"]["name"] for ds in daemonsets}
        self.d.delete.extend(
            ChildRef("apps/v1", "DaemonSet", name)
            for kind, name in sorted(self.s.children)
            if kind == "DaemonSet" and name not in wanted
        )
        self._want(build_service(workload))
        self._want(build_network_policy(workload, self.s.peers))
        # Until every worker of this plan is up, keep the host stopped: an RPC
        # client cannot start without all its servers (nor with refusing ones).
        running = addresses is not None and verdict.run
        self._want(build_host_deployment(workload, replicas=1 if running else 0))
        self._release_silent_nodes()
        self._report(plan, addresses, verdict)

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

    def _host_verdict(self, w: ModelWorkload, pool: PoolInfo) -> handshake.HostVerdict:
        """Whether the host may run: not while its workers refuse its protocol."""
        hosts = [
            handshake.HostExit(p.name, p.images_key, p.exits)
            for p in self._group_pods(HOST_COMPONENT)
        ]
        images = rpc_images(w)
        # Only workers running the pool's current image: a host may have talked to
        # one on its way out after the images changed.
        endpoints = {
            p.node: f"{p.ip}:{pool.spec.rpc_port}"
            for p in self._group_pods(RPC_COMPONENT)
            if p.ip and p.node in images and p.image == images[p.node]
        }
        group = handshake.Group(
            llama_server=host_image(w),
            workers=tuple(handshake.Worker(n, images[n], endpoints.get(n)) for n in w.rpc_nodes),
            generation=self.s.model.generation,
            pool_generation=pool.generation,
        )
        verdict = handshake.decide_host(self.status.version_mismatch, hosts, group)
        self.status.version_mismatch = verdict.mismatch
        if verdict.found:
            self.note(handshake.MISMATCH_REASON, verdict.message, "Warning")
        return verdict

    def _worker_addresses(self, plan: Plan, pool: PoolInfo) -> list[str] | None:
        by_node = {p.node: p for p in self._group_pods(RPC_COMPONENT) if p.ready and p.ip}
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
        model = self.s.model
        service = host_service_name(model.name)
        self.status.endpoint = f"http://{service}.{model.namespace}.svc:{HOST_PORT}/v1"
        hosts = self._group_pods(HOST_COMPONENT)
        if not verdict.run:
            self.cond(READY, "False", handshake.MISMATCH_REASON, verdict.message)
            self.d.outcome = "blocked"
        elif addresses is None:
            self.cond(
                READY, "False", "WaitingForWorkers", "the host starts once every worker is up"
            )
        elif any(p.ready for p in hosts):
            was_ready = condition_status(self.status.conditions, READY) == "True"
            self.cond(READY, "True", "Serving", f"llama-server on {plan.host_node} answers /health")
            if self.d.reason != "WorkerRestarted":
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
        self.status.observed_generation = model.generation


def secret_refs(spec: MeshModelSpec) -> list[tuple[str, str, str]]:
    """(role, Secret name, key) of every Secret the model's spec names."""
    refs = []
    hf = spec.source.huggingface
    if hf is not None and hf.token_secret_ref is not None:
        refs.append(("token", hf.token_secret_ref.name, hf.token_secret_ref.key))
    if spec.api_key_secret_ref is not None:
        refs.append(("apiKey", spec.api_key_secret_ref.name, spec.api_key_secret_ref.key))
    return refs
