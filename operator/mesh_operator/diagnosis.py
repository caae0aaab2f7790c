"""What is wrong with an installation of mesh, and what to do: `mesh doctor`'s checks.

`read_checkup` does the I/O (the CRDs, the operator's Lease, the fleet, the
models' NetworkPolicies); `build_findings` is pure: each check turns what was read
into findings that say what is wrong (or fine) and what to do about it. The
NetworkPolicy probe, which must start a pod, lives in `policy_probe`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import kubernetes
from kubernetes.client import ApiClient, ApiException

from mesh_operator.api.base import GROUP, MESHMODEL_PLURAL, MESHNODE_PLURAL, MESHPOOL_PLURAL
from mesh_operator.api.contract import (
    APP_NAME,
    COMPONENT_LABEL,
    DEFAULT_RPC_PORT,
    NAME_LABEL,
    OPERATOR_COMPONENT,
    POLICY_COMPONENT,
    SCALED_TO_ZERO,
    VERSION_ANNOTATION,
)
from mesh_operator.api.heartbeat import heartbeat_age, is_stale
from mesh_operator.fleet import Fleet, Obj, condition, model_claims, pool_nodes, read_fleet

Level = Literal["ok", "warn", "fail"]

CRD_NAMES = tuple(f"{p}.{GROUP}" for p in (MESHPOOL_PLURAL, MESHMODEL_PLURAL, MESHNODE_PLURAL))
# A Lease not renewed for its duration and this much more has no live holder.
LEASE_SLACK_SECONDS = 5.0

SOURCE_REASONS = {
    "SourceNotFound": "check spec.source (URL, or Hugging Face repo, file and revision)",
    "SourceForbidden": "give the model a token Secret that may read it "
    "(spec.source.huggingface.tokenSecretRef), or check the one it names",
    "SourceUnreachable": "check that the operator's pod can reach the source "
    "(DNS, proxy, HF_ENDPOINT, the host's firewall)",
    "SourceInvalid": "point spec.source at a GGUF model file",
    "SourceUnreadable": "check the file on the volume: kubectl -n {ns} logs {name}-header",
}
# Ready reasons of a model on its way to serving rather than stuck.
PROGRESSING = {"WaitingForWorkers", "HostStarting", "Fetching", "Loading", "ReadingHeader"}


@dataclass(frozen=True)
class Finding:
    level: Level
    check: str  # crds, operator, agents, devices, models, network-policy
    subject: str  # what it is about, e.g. "node gpu-1" or "model ai/gemma"
    problem: str  # what is wrong (or, for ok, what was found)
    fix: str = ""  # what to do


@dataclass(frozen=True)
class OperatorLease:
    namespace: str
    name: str
    holder: str
    renewed: dt.datetime | None
    duration_seconds: int
    version: str | None

    def alive(self, now: dt.datetime) -> bool:
        if not self.holder or self.renewed is None:
            return False
        age = (now - self.renewed).total_seconds()
        return age <= self.duration_seconds + LEASE_SLACK_SECONDS


@dataclass
class Checkup:
    """Everything the checks read."""

    crds: dict[str, Obj | None] = field(default_factory=dict)
    leases: list[OperatorLease] = field(default_factory=list)
    fleet: Fleet = field(default_factory=Fleet)
    # (namespace, model) -> the model's NetworkPolicy; planned models only.
    policies: dict[tuple[str, str], Obj | None] = field(default_factory=dict)


# -- reading ------------------------------------------------------------------------


def read_checkup(api: ApiClient) -> Checkup:
    """Read what the checks need. Raises ApiException and the client's network errors."""
    ext = kubernetes.client.ApiextensionsV1Api(api)
    crds: dict[str, Obj | None] = {}
    for name in CRD_NAMES:
        try:
            raw: Any = ext.read_custom_resource_definition(name, _preload_content=False)
            crds[name] = json.loads(raw.data)
        except ApiException as exc:
            if exc.status != 404:
                raise
            crds[name] = None
    checkup = Checkup(crds=crds, leases=read_operator_leases(api))
    if not all(crds.values()):
        return checkup
    checkup.fleet = read_fleet(api)
    net = kubernetes.client.NetworkingV1Api(api)
    for model in checkup.fleet.models:
        if not (model.get("status") or {}).get("plan"):
            continue
        meta = model["metadata"]
        found: Any = net.list_namespaced_network_policy(
            meta["namespace"],
            label_selector=f"{NAME_LABEL}={APP_NAME},{COMPONENT_LABEL}={POLICY_COMPONENT},"
            f"{GROUP}/model={meta['name']}",
        )
        checkup.policies[(meta["namespace"], meta["name"])] = (
            api.sanitize_for_serialization(found.items[0])  # type: ignore[no-untyped-call]
            if found.items
            else None
        )
    return checkup


def read_operator_leases(api: ApiClient) -> list[OperatorLease]:
    """Every Lease an operator replica holds or held, in any namespace."""
    leases: Any = kubernetes.client.CoordinationV1Api(api).list_lease_for_all_namespaces(
        label_selector=f"{NAME_LABEL}={APP_NAME},{COMPONENT_LABEL}={OPERATOR_COMPONENT}"
    )
    out = []
    for lease in leases.items:
        spec = lease.spec
        out.append(
            OperatorLease(
                namespace=lease.metadata.namespace,
                name=lease.metadata.name,
                holder=(spec.holder_identity if spec else None) or "",
                renewed=spec.renew_time if spec else None,
                duration_seconds=int((spec.lease_duration_seconds if spec else None) or 0),
                version=(lease.metadata.annotations or {}).get(VERSION_ANNOTATION),
            )
        )
    return sorted(out, key=lambda x: (x.namespace, x.name))


# -- the checks -----------------------------------------------------------------------


def _operator_version(leases: Sequence[OperatorLease], now: dt.datetime) -> OperatorLease | None:
    live = [x for x in leases if x.alive(now)]
    return live[0] if live else None


def check_operator(leases: Sequence[OperatorLease], now: dt.datetime) -> list[Finding]:
    live = _operator_version(leases, now)
    if live is not None:
        return [
            Finding(
                "ok",
                "operator",
                f"Lease {live.namespace}/{live.name}",
                f"held by {live.holder}, mesh {live.version or 'of unknown version'}",
            )
        ]
    if leases:
        last = leases[0]
        when = "never" if last.renewed is None else last.renewed.strftime("%Y-%m-%dT%H:%M:%SZ")
        return [
            Finding(
                "fail",
                "operator",
                f"Lease {last.namespace}/{last.name}",
                f"no operator replica holds it (last renewed {when})",
                f"check the operator's pods: kubectl -n {last.namespace} get pods "
                f"-l {COMPONENT_LABEL}={OPERATOR_COMPONENT}",
            )
        ]
    return [
        Finding(
            "warn",
            "operator",
            "operator",
            "no operator Lease found: the operator is not running, or runs with "
            "--no-leader-election; its version is unknown",
            "install or start it: helm install mesh charts/mesh",
        )
    ]


def check_crds(
    crds: Mapping[str, Obj | None], leases: Sequence[OperatorLease], now: dt.datetime
) -> list[Finding]:
    live = _operator_version(leases, now)
    want = live.version if live is not None else None
    out = []
    for name in CRD_NAMES:
        crd = crds.get(name)
        if crd is None:
            out.append(
                Finding(
                    "fail",
                    "crds",
                    f"CRD {name}",
                    "not installed",
                    "install the chart (helm install mesh charts/mesh) or kubectl apply "
                    "--server-side -f crds/",
                )
            )
            continue
        conds = (crd.get("status") or {}).get("conditions") or []
        if not any(c.get("type") == "Established" and c.get("status") == "True" for c in conds):
            out.append(Finding("fail", "crds", f"CRD {name}", "not Established"))
            continue
        have = ((crd.get("metadata") or {}).get("annotations") or {}).get(VERSION_ANNOTATION)
        if want is not None and have != want:
            made = f"mesh {have}" if have else f"a mesh without the {VERSION_ANNOTATION} stamp"
            out.append(
                Finding(
                    "fail",
                    "crds",
                    f"CRD {name}",
                    f"installed from {made}, but the running operator is mesh {want}",
                    f"install the CRDs of mesh {want}: helm upgrade with the operator's "
                    "chart (crds.install=true), or kubectl apply --server-side -f crds/ "
                    "of that release",
                )
            )
        else:
            out.append(Finding("ok", "crds", f"CRD {name}", f"mesh {have or 'unstamped'}"))
    return out


def check_agents(fleet: Fleet, now: dt.datetime) -> list[Finding]:
    """Every pool node has a fresh, healthy MeshNode with devices the pool can use."""
    meshnodes = {n["metadata"]["name"]: n for n in fleet.meshnodes}
    out: list[Finding] = []
    for pool in fleet.pools:
        pname = pool["metadata"]["name"]
        backend = (pool.get("spec") or {}).get("backend", "cuda")
        members = pool_nodes(pool, fleet.nodes)
        if not members:
            selector = (pool.get("spec") or {}).get("nodeSelector") or {}
            out.append(
                Finding(
                    "fail",
                    "agents",
                    f"pool {pname}",
                    f"no node matches its nodeSelector {selector}",
                    "label the nodes it should use, or fix spec.nodeSelector",
                )
            )
            continue
        for name in members:
            out += _node_findings(name, pname, backend, meshnodes.get(name), now)
    return out


def _node_findings(
    name: str, pool: str, backend: str, meshnode: Obj | None, now: dt.datetime
) -> list[Finding]:
    subject = f"node {name} (pool {pool})"
    agent_fix = (
        f"check the mesh agent pod on {name}: kubectl get pods -A "
        f"-l {COMPONENT_LABEL}=agent --field-selector spec.nodeName={name}"
    )
    if meshnode is None:
        return [
            Finding(
                "fail",
                "agents",
                subject,
                f"no agent has reported (no MeshNode {name}); the pool cannot plan onto it",
                agent_fix + " (the agent DaemonSet's nodeSelector and tolerations must let "
                "it onto every pool node)",
            )
        ]
    status = meshnode.get("status") or {}
    if is_stale(status, now):
        age = heartbeat_age(status, now)
        interval = status.get("intervalSeconds", 10)
        when = "never" if age is None else f"{round(age)} s ago"
        return [
            Finding(
                "fail",
                "agents",
                subject,
                f"its agent's heartbeat is stale (last {when}, every {interval} s expected); "
                "models planned on it are moved off",
                agent_fix + ", then its log",
            )
        ]
    out = []
    health = status.get("health") or {}
    state = health.get("state", "Healthy")
    if state != "Healthy":
        out.append(
            Finding(
                "fail" if state == "Unhealthy" else "warn",
                "agents",
                subject,
                f"{state}: {health.get('reason', '')} {health.get('message', '')}".rstrip(),
                "see the agent's log and the device's state (nvidia-smi)",
            )
        )
    devices = status.get("devices") or []
    if not devices:
        out.append(
            Finding(
                "fail",
                "devices",
                subject,
                "its agent reports no device at all",
                "for a GPU pool: install the NVIDIA driver and container toolkit and give "
                "the agent the GPUs (runtimeClassName); for a cpu pool: the agent's "
                "inventory must be cpu (agent.backend)",
            )
        )
    elif not any(d.get("backend") == backend for d in devices):
        have = ", ".join(sorted({f"{d.get('id')} ({d.get('backend')})" for d in devices}))
        out.append(
            Finding(
                "warn",
                "devices",
                subject,
                f"no {backend} device, the pool's backend: it reports {have}, so only "
                "layers for those devices can go there",
                f"take the node out of the pool (its label) or check its {backend} driver",
            )
        )
    if not out:
        free = sum(int(d.get("memoryFreeMiB", 0)) for d in devices)
        out.append(
            Finding(
                "ok",
                "agents",
                subject,
                f"agent reporting, {len(devices)} device(s), {free} MiB free",
            )
        )
    return out


_NEED = re.compile(r"needs (\d+(?:\.\d+)?) GiB")
_FREE = re.compile(r"pool has (\d+(?:\.\d+)?) GiB free")


def _shortfall(message: str) -> str:
    """How much is short, from the planner's sentence (planner.placement.explain)."""
    need, free = _NEED.search(message), _FREE.search(message)
    if need is None:
        return ""
    if free is None:
        return f"short by {float(need.group(1)):.1f} GiB"
    short = float(need.group(1)) - float(free.group(1))
    if short > 0:
        return f"short by {short:.1f} GiB"
    return "enough memory in total, but not in few enough devices for its layers"


def _holders(fleet: Fleet, pool: str, model: Obj) -> str:
    """Which other models of the pool hold memory, and how much and where; in an
    exclusive pool a device a model holds is not offered to another at all."""
    me = (model["metadata"]["namespace"], model["metadata"]["name"])
    rows = []
    for other in fleet.models:
        key = (other["metadata"]["namespace"], other["metadata"]["name"])
        if key == me or (other.get("spec") or {}).get("poolRef") != pool:
            continue
        claims = model_claims(other)
        if claims:
            where = ", ".join(f"{n}/{d} {mib}" for (n, d), mib in sorted(claims.items()))
            rows.append(
                (sum(claims.values()), f"{key[0]}/{key[1]} {sum(claims.values())} MiB ({where})")
            )
    if not rows:
        return "no other model holds memory in the pool"
    spec = next((p.get("spec") or {} for p in fleet.pools if p["metadata"]["name"] == pool), {})
    whole = (
        " (an exclusive pool: a device a model holds is not offered to another)"
        if spec.get("sharing", "exclusive") == "exclusive"
        else ""
    )
    return "held by " + "; ".join(text for _, text in sorted(rows, reverse=True)) + whole


def check_models(fleet: Fleet) -> list[Finding]:
    pools = {p["metadata"]["name"]: p for p in fleet.pools}
    out = []
    for m in fleet.models:
        ns, name = m["metadata"]["namespace"], m["metadata"]["name"]
        subject = f"model {ns}/{name}"
        status = m.get("status") or {}
        pool = str((m.get("spec") or {}).get("poolRef", ""))
        ready, planned = condition(m, "Ready"), condition(m, "Planned")
        reason, message = ready.get("reason", ""), ready.get("message", "")
        mismatch = status.get("versionMismatch")
        if not ready:
            out.append(
                Finding(
                    "fail",
                    "models",
                    subject,
                    "no conditions: the operator has not reconciled it",
                    "is the operator running? (see the operator check)",
                )
            )
        elif ready.get("status") == "True":
            plan = status.get("plan") or {}
            micros = plan.get("predictedTokenMicros")
            speed = f", {micros / 1000:.1f} ms/token predicted" if micros else ""
            out.append(Finding("ok", "models", subject, f"serving on {status.get('nodes')}{speed}"))
        elif reason == "RpcVersionMismatch" or mismatch:
            mm = mismatch or {}
            workers = ", ".join(mm.get("rpcServers") or []) or "its workers' image"
            nodes = ", ".join(mm.get("nodes") or [])
            version = mm.get("workerVersion")
            out.append(
                Finding(
                    "fail",
                    "models",
                    subject,
                    f"host image {mm.get('llamaServer', '?')} and worker image(s) {workers}"
                    f"{' on ' + nodes if nodes else ''} are different llama.cpp builds "
                    f"(the worker speaks RPC protocol {version or 'another version'}); "
                    "the host is stopped",
                    f"set MeshPool {pool} spec.images.rpcServer and llamaServer to one "
                    "build (the default llama.cpp image holds both programs)",
                )
            )
        elif planned.get("reason") == "NoCapacity" or reason == "NoCapacity":
            why = planned.get("message") or message
            short = _shortfall(why)
            pool_ready = condition(pools.get(pool, {}), "Ready")
            if pool_ready and pool_ready.get("status") != "True":
                # No usable node at all: the agents' findings say why.
                short += f" (pool {pool} is not Ready: {pool_ready.get('reason')})"
            out.append(
                Finding(
                    "fail",
                    "models",
                    subject,
                    f"no capacity in pool {pool}: {why}"
                    + (f"; {short}" if short else "")
                    + f"; {_holders(fleet, pool, m)}",
                    "free memory (delete or shrink another model: contextSize, parallel), "
                    f"add nodes to pool {pool}, or lower its reservePercent",
                )
            )
        elif reason in SOURCE_REASONS:
            out.append(
                Finding(
                    "fail",
                    "models",
                    subject,
                    f"its source cannot be read ({reason}): {message}",
                    SOURCE_REASONS[reason].format(ns=ns, name=name),
                )
            )
        elif reason == "PoolNotFound" or (pool and pool not in pools and not reason):
            out.append(
                Finding(
                    "fail",
                    "models",
                    subject,
                    f"its pool {pool} does not exist",
                    f"create MeshPool {pool} or fix spec.poolRef (kubectl get meshpools)",
                )
            )
        elif reason in PROGRESSING:
            out.append(Finding("warn", "models", subject, f"{reason}: {message}".rstrip(": ")))
        elif reason == SCALED_TO_ZERO:
            # As asked (spec.scaleToZeroAfter): nothing is wrong.
            out.append(Finding("ok", "models", subject, f"scaled to zero: {message}"))
        else:
            out.append(
                Finding(
                    "fail",
                    "models",
                    subject,
                    f"{reason}: {message}".rstrip(": "),
                    f"kubectl -n {ns} describe meshmodel {name}",
                )
            )
    return out


def _open_peers(rule: Mapping[str, Any]) -> str:
    """Why an ingress rule admits pods it should not ('' when it does not)."""
    peers = rule.get("from")
    if not peers:
        return "admits every source (no `from`)"
    for peer in peers:
        if "ipBlock" in peer:
            return f"admits the address block {peer['ipBlock'].get('cidr')}"
        pods, spaces = peer.get("podSelector"), peer.get("namespaceSelector")
        if not pods and spaces is not None and not _selects_some(spaces):
            return "admits every pod of every namespace"
    return ""


def _selects_some(selector: Mapping[str, Any]) -> bool:
    return bool(selector.get("matchLabels") or selector.get("matchExpressions"))


def _rule_ports(rule: Mapping[str, Any]) -> set[int] | None:
    ports = rule.get("ports")
    if not ports:
        return None  # every port
    return {int(p["port"]) for p in ports if isinstance(p.get("port"), int)}


def check_policies(fleet: Fleet, policies: Mapping[tuple[str, str], Obj | None]) -> list[Finding]:
    """The API side of the NetworkPolicy check: each planned model's policy exists and
    admits its RPC port only from selected pods. (Whether the network enforces it
    only a probe tells: `policy_probe`.)"""
    ports = {
        p["metadata"]["name"]: int((p.get("spec") or {}).get("rpcPort", DEFAULT_RPC_PORT))
        for p in fleet.pools
    }
    models = {(m["metadata"]["namespace"], m["metadata"]["name"]): m for m in fleet.models}
    out = []
    for (ns, name), policy in sorted(policies.items()):
        subject = f"model {ns}/{name}"
        model = models.get((ns, name), {})
        port = ports.get(str((model.get("spec") or {}).get("poolRef", "")), DEFAULT_RPC_PORT)
        if policy is None:
            out.append(
                Finding(
                    "fail",
                    "network-policy",
                    subject,
                    "its NetworkPolicy is missing: its RPC servers (no authentication) "
                    "accept anyone who can reach them",
                    "the operator recreates it within a resync; if not, see its log",
                )
            )
            continue
        spec = policy.get("spec") or {}
        types = spec.get("policyTypes") or ["Ingress"]
        problems = []
        if "Ingress" not in types:
            problems.append("it does not restrict ingress")
        for rule in spec.get("ingress") or []:
            rports = _rule_ports(rule)
            if rports is None or port in rports:
                why = _open_peers(rule)
                if why:
                    problems.append(f"a rule for RPC port {port} {why}")
        pname = policy["metadata"]["name"]
        if problems:
            out.append(
                Finding(
                    "fail",
                    "network-policy",
                    subject,
                    f"NetworkPolicy {pname}: " + "; ".join(problems),
                    f"kubectl -n {ns} delete networkpolicy {pname} (the operator writes "
                    "it anew), and find who changed it",
                )
            )
        else:
            out.append(
                Finding(
                    "ok",
                    "network-policy",
                    subject,
                    f"NetworkPolicy {pname} admits RPC port {port} only from its host "
                    "and the node agents",
                )
            )
    return out


def only_pool(checkup: Checkup, pool: str) -> Checkup:
    """The checkup narrowed to one pool: its nodes and its models (CRDs and operator
    stay whole). Pure."""
    fleet = checkup.fleet
    models = [m for m in fleet.models if (m.get("spec") or {}).get("poolRef") == pool]
    keys = {(m["metadata"]["namespace"], m["metadata"]["name"]) for m in models}
    return dataclasses.replace(
        checkup,
        fleet=dataclasses.replace(
            fleet,
            pools=[p for p in fleet.pools if p["metadata"]["name"] == pool],
            models=models,
        ),
        policies={k: v for k, v in checkup.policies.items() if k in keys},
    )


def build_findings(checkup: Checkup, now: dt.datetime) -> list[Finding]:
    """Every check's findings, in the order a person fixes things. Pure."""
    out = check_operator(checkup.leases, now) + check_crds(checkup.crds, checkup.leases, now)
    if not all(checkup.crds.get(n) for n in CRD_NAMES):
        return out
    out += check_agents(checkup.fleet, now)
    out += check_models(checkup.fleet)
    out += check_policies(checkup.fleet, checkup.policies)
    return out
