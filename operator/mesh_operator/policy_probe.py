"""Whether a model's NetworkPolicy holds on the network: `mesh doctor`'s probe.

The API server stores a NetworkPolicy whether or not the cluster's network plugin
enforces it. The probe starts a short-lived pod in the model's namespace, without
the labels of the model's host, that tries a TCP connection to each of the model's
RPC servers; the policy admits that port only from the host and the node agents,
so a connection that succeeds means the policy does not hold. The pod runs the
pool's `mesh` image as the same unprivileged user as every mesh pod and is deleted
afterwards. `build_probe_pod` is pure; `run_probe` does the I/O.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import kubernetes
from kubernetes.client import ApiClient, ApiException

from mesh_operator.api.contract import (
    APP_NAME,
    COMPONENT_LABEL,
    DEFAULT_RPC_PORT,
    MANAGED_BY_LABEL,
    MODEL_LABEL,
    NAME_LABEL,
    PART_OF_LABEL,
    RPC_COMPONENT,
    build_selector,
)
from mesh_operator.api.meshpool import DEFAULT_MESH_IMAGE
from mesh_operator.diagnosis import Level

PROBE_COMPONENT = "doctor-probe"
CONNECT_SECONDS = 3
# Exit status of the probe program when it reached a server.
REACHED = 3

# Argument i is `ip:port`; one line per target; exit REACHED if any connected.
PROBE_PROGRAM = f"""
import socket, sys
reached = False
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout={CONNECT_SECONDS}).close()
        print(target, "connected")
        reached = True
    except OSError as exc:
        print(target, "not connected:", type(exc).__name__, exc)
sys.exit({REACHED} if reached else 0)
"""


@dataclass(frozen=True)
class ProbeOutcome:
    level: Level
    problem: str
    fix: str = ""


def build_probe_pod(
    *,
    namespace: str,
    name: str,
    model: str,
    image: str,
    targets: Sequence[str],
    tolerations: Sequence[Mapping[str, Any]] = (),
    deadline_seconds: int = 60,
) -> dict[str, Any]:
    """The probe pod: `restricted` Pod Security, no host labels, never restarted."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                NAME_LABEL: APP_NAME,
                PART_OF_LABEL: APP_NAME,
                COMPONENT_LABEL: PROBE_COMPONENT,
                MANAGED_BY_LABEL: "mesh-doctor",
                MODEL_LABEL: model,
            },
        },
        "spec": {
            "restartPolicy": "Never",
            "activeDeadlineSeconds": deadline_seconds,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "tolerations": [dict(t) for t in tolerations],
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 65532,
                "runAsGroup": 65532,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "probe",
                    "image": image,
                    "command": ["python", "-c", PROBE_PROGRAM, *targets],
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "resources": {
                        "requests": {"cpu": "10m", "memory": "32Mi"},
                        "limits": {"memory": "64Mi"},
                    },
                }
            ],
        },
    }


def probe_image(pool: Mapping[str, Any]) -> str:
    images = (pool.get("spec") or {}).get("images") or {}
    return str(images.get("mesh") or DEFAULT_MESH_IMAGE)


def run_probe(
    api: ApiClient, model: Mapping[str, Any], pool: Mapping[str, Any], timeout: float
) -> ProbeOutcome:
    """Try the model's RPC servers from a probe pod; say what was tried and what it means."""
    core = kubernetes.client.CoreV1Api(api)
    ns, name = model["metadata"]["namespace"], model["metadata"]["name"]
    port = int((pool.get("spec") or {}).get("rpcPort", DEFAULT_RPC_PORT))
    selector = ",".join(f"{k}={v}" for k, v in build_selector(name, RPC_COMPONENT).items())
    pods: Any = core.list_namespaced_pod(ns, label_selector=selector)
    workers = [
        p for p in pods.items if p.status and p.status.pod_ip and p.status.phase == "Running"
    ]
    if not workers:
        return ProbeOutcome("warn", "probe not run: no running RPC server pod to try")
    targets = [f"{p.status.pod_ip}:{port}" for p in workers]
    pod_name = f"{name}-probe-{uuid.uuid4().hex[:6]}"
    body: Any = build_probe_pod(
        namespace=ns,
        name=pod_name,
        model=name,
        image=probe_image(pool),
        targets=targets,
        tolerations=(pool.get("spec") or {}).get("tolerations") or [],
        deadline_seconds=int(timeout) + 30,
    )
    tried = (
        f"pod {ns}/{pod_name} (no host labels) tried TCP to RPC port {port} of {', '.join(targets)}"
    )
    try:
        core.create_namespaced_pod(ns, body)
    except ApiException as exc:
        why = f"creating pod {ns}/{pod_name} answered {exc.status} {exc.reason}"
        return ProbeOutcome("warn", f"probe not run: {why}")
    try:
        return _await(core, ns, pod_name, tried, timeout)
    finally:
        try:
            core.delete_namespaced_pod(pod_name, ns, grace_period_seconds=0)
        except ApiException as exc:
            if exc.status != 404:
                raise


def _await(
    core: kubernetes.client.CoreV1Api, ns: str, pod_name: str, tried: str, timeout: float
) -> ProbeOutcome:
    deadline = time.monotonic() + timeout
    pod: Any = None
    while time.monotonic() < deadline:
        pod = core.read_namespaced_pod(pod_name, ns)
        if pod.status and pod.status.phase in ("Succeeded", "Failed"):
            break
        time.sleep(1.0)
    else:
        phase = pod.status.phase if pod is not None and pod.status else "unknown"
        waiting = _waiting_reason(pod)
        return ProbeOutcome(
            "warn",
            f"probe not finished: {tried}, but the pod was still {phase}"
            f"{' (' + waiting + ')' if waiting else ''} after {timeout:g} s: not tested",
            "run it where pods start (the pool's mesh image must be pullable), or "
            "with a longer --probe-timeout",
        )
    code = _exit_code(pod)
    log = " ".join(core.read_namespaced_pod_log(pod_name, ns).split())
    if code == 0:
        return ProbeOutcome("ok", f"{tried}: refused as the policy wants ({log})")
    if code == REACHED:
        return ProbeOutcome(
            "fail",
            f"the NetworkPolicy does not hold: {tried} and connected ({log})",
            f"policies add up: look for another one in {ns} that admits it (kubectl -n {ns} "
            "get networkpolicies); if there is none, the network plugin does not enforce "
            "NetworkPolicy: use one that does (Calico, Cilium, kube-router, ...). Until "
            "then anyone in the cluster can reach the RPC servers",
        )
    return ProbeOutcome("warn", f"probe failed: {tried}, exit status {code} ({log}): not tested")


def _waiting_reason(pod: Any) -> str:
    for status in (pod.status.container_statuses or []) if pod and pod.status else []:
        if status.state and status.state.waiting:
            return str(status.state.waiting.reason)
    for cond in (pod.status.conditions or []) if pod and pod.status else []:
        if cond.type == "PodScheduled" and cond.status != "True":
            return f"unschedulable: {cond.message}"
    return ""


def _exit_code(pod: Any) -> int | None:
    for status in pod.status.container_statuses or []:
        if status.state and status.state.terminated:
            return int(status.state.terminated.exit_code)
    return None
