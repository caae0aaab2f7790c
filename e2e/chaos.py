"""Chaos for the operator on the real API server: models applied, changed and deleted
while the operator process is killed (SIGKILL) at random points and restarted.

Three MeshModels share one pool of kwok GPU nodes (their pods are marked Ready
without running; what matters here is what the operator decides and writes). Every
cycle draws, from the seed, an action per model (apply with a drawn model file and
context, or delete) in a drawn order, and a point among them where the operator is
killed and restarted after a drawn pause. After the cycle the run waits for the end
state and checks it:

- converged: every model's conditions are of its current generation, and it
  serves (Ready) or says why not (NoCapacity);
- nothing orphaned: no child of a model that no longer exists;
- never two hosts for one model (watched all along);
- at no observed moment the plans on a device (from the models' statuses, watched
  all along) exceed its total less the pool's reserve and the memory that is not
  mesh's.

Seeded: the same seed replays the same draws. `tests/integration/
test_operator_chaos.py` runs a few cycles, `python -m bench chaos` fifty.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes.client import ApiClient, ApiException

from e2e.cluster import KWOK_NODE_ANNOTATION, LocalCluster
from e2e.fileserver import serve_directory
from e2e.waiting import free_port

REPO = Path(__file__).resolve().parent.parent
HEADERS = REPO / "tests" / "fixtures" / "planner" / "models"
GROUP, VERSION = "mesh.dev", "v1alpha1"
MODEL_LABEL = "mesh.dev/model"
COMPONENT_LABEL = "app.kubernetes.io/component"
REPLICA_LABEL = "mesh.dev/replica"
# Model files drawn from (header-only GGUFs: the operator reads no more).
FILES = ("llama-3.1-8b.header.gguf", "gpt-oss-20b.header.gguf", "qwen3-30b-a3b.header.gguf")
CONTEXTS = (2048, 8192, 32768)
MODELS = ("alpha", "beta", "gamma")
GPU_MIB = 16384
OTHERS_MIB = 1024  # memory on each GPU used by processes that are not mesh's
RESERVE_PERCENT = 10
CONVERGE_SECONDS = 180.0


class ChaosError(RuntimeError):
    """The chaos run could not be set up or carried on."""


# -- the operator process ---------------------------------------------------------


class OperatorProcess:
    """`mesh operator` as a real process, with leader election on `lease`."""

    def __init__(
        self, kubeconfig: Path, log_dir: Path, *, namespace: str, identity: str, lease: str
    ) -> None:
        self.kubeconfig = kubeconfig
        self.log_dir = log_dir
        self.namespace = namespace
        self.identity = identity
        self.lease = lease
        self.health = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = self.log_dir / f"operator-{self.identity}-{self.starts}.log"
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "POD_NAMESPACE": self.namespace,
            "POD_NAME": self.identity,
            "MESH_MODEL_INTERVAL": "1",
            "MESH_POOL_INTERVAL": "2",
        }
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mesh_operator.cli.main", "operator",
                 "--health-address", f"127.0.0.1:{self.health}",
                 "--metrics-address", f"127.0.0.1:{free_port()}",
                 "--lease", self.lease],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health}/healthz", timeout=2):
                return True
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no cleanup, no release of the Lease."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, grace: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)


def lease_holder(api: ApiClient, namespace: str, lease: str) -> str | None:
    try:
        spec = kubernetes.client.CoordinationV1Api(api).read_namespaced_lease(lease, namespace).spec
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return spec.holder_identity if spec is not None else None


# -- the pool ---------------------------------------------------------------------


def add_gpu_nodes(api: ApiClient, prefix: str, count: int, label: Mapping[str, str]) -> list[str]:
    """kwok GPU nodes with the MeshNodes their agents would write (fresh for an hour)."""
    core = kubernetes.client.CoreV1Api(api)
    custom = kubernetes.client.CustomObjectsApi(api)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    names = []
    for i in range(count):
        name = f"{prefix}-{i}"
        capacity = {"cpu": "32", "memory": "128Gi", "pods": "110", "nvidia.com/gpu": "1"}
        core.create_node(
            {  # type: ignore[arg-type]
                "metadata": {
                    "name": name,
                    "annotations": {KWOK_NODE_ANNOTATION: "fake"},
                    "labels": {"kubernetes.io/hostname": name, "type": "kwok", **label},
                },
                "spec": {
                    "taints": [
                        {"key": KWOK_NODE_ANNOTATION, "value": "fake", "effect": "NoSchedule"}
                    ]
                },
                "status": {"capacity": capacity, "allocatable": capacity},
            }
        )
        custom.create_cluster_custom_object(
            GROUP, VERSION, "meshnodes",
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MeshNode",
             "metadata": {"name": name}, "spec": {"nodeName": name}},
        )  # fmt: skip
        device = {
            "id": "CUDA0", "index": 0, "backend": "cuda", "name": "Test GPU",
            "memoryTotalMiB": GPU_MIB, "memoryFreeMiB": GPU_MIB - OTHERS_MIB,
            "memoryUsedByOthersMiB": OTHERS_MIB, "bandwidthGBps": 700.0,
        }  # fmt: skip
        custom.patch_cluster_custom_object_status(
            GROUP, VERSION, "meshnodes", name,
            {"status": {"heartbeatTime": now, "intervalSeconds": 3600, "devices": [device]}},
        )  # fmt: skip
        names.append(name)
    return names


def device_limit_mib() -> int:
    """What plans may hold on one GPU: its total less the reserve and others' use."""
    return GPU_MIB - math.ceil(GPU_MIB * RESERVE_PERCENT / 100) - OTHERS_MIB


# -- watching ---------------------------------------------------------------------


@dataclass
class Watched:
    """What the watches saw: violations of the invariants, and the peaks."""

    violations: list[str] = field(default_factory=list)
    peak_device_mib: int = 0
    plans: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # model -> "uid/generation/planGeneration" of the status its plan came from
    versions: dict[str, str] = field(default_factory=dict)
    hosts: dict[str, set[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def plan_sync(self, items: list[dict[str, Any]]) -> None:
        """The models as a fresh list shows them (a watch restarts from a list, so
        a model deleted between two watches is not remembered)."""
        with self.lock:
            self.plans.clear()
            for obj in items:
                self._take_plan("ADDED", obj)
            self._check_devices()

    def plan_event(self, kind: str, obj: Mapping[str, Any]) -> None:
        with self.lock:
            self._take_plan(kind, obj)
            self._check_devices()

    def _take_plan(self, kind: str, obj: Mapping[str, Any]) -> None:
        name = obj["metadata"]["name"]
        plan = (obj.get("status") or {}).get("plan") or {}
        if kind == "DELETED" or not plan:
            self.plans.pop(name, None)
            return
        self.plans[name] = list(plan.get("devices") or [])
        meta, status = obj["metadata"], obj.get("status") or {}
        self.versions[name] = (
            f"uid {str(meta.get('uid'))[:8]} generation {meta.get('generation')} "
            f"plan {status.get('planGeneration')}"
        )

    def _check_devices(self) -> None:
        used: dict[tuple[str, str], int] = {}
        for devices in self.plans.values():
            for d in devices:
                key = (d["node"], d["device"])
                used[key] = used.get(key, 0) + int(d["totalMiB"])
        limit = device_limit_mib()
        for (node, device), mib in used.items():
            self.peak_device_mib = max(self.peak_device_mib, mib)
            if mib > limit:
                holders = [
                    f"{m} ({self.versions.get(m)}: "
                    f"{sum(int(d['totalMiB']) for d in ds if d['node'] == node)} MiB)"
                    for m, ds in sorted(self.plans.items())
                    if any(d["node"] == node for d in ds)
                ]
                self.violations.append(
                    f"plans on {node}/{device} hold {mib} MiB > {limit} MiB: " + ", ".join(holders)
                )

    def pod_sync(self, items: list[dict[str, Any]]) -> None:
        with self.lock:
            self.hosts.clear()
        for obj in items:
            self.pod_event("ADDED", obj)

    def pod_event(self, kind: str, obj: Mapping[str, Any]) -> None:
        meta = obj["metadata"]
        labels = meta.get("labels") or {}
        if labels.get(COMPONENT_LABEL) != "host":
            return
        # One host per replica of a model (a pod of an older operator: replica 0).
        replica = labels.get(REPLICA_LABEL, "0")
        model = labels.get(MODEL_LABEL, "") + ("" if replica == "0" else f" replica {replica}")
        with self.lock:
            live = self.hosts.setdefault(model, set())
            if kind == "DELETED" or meta.get("deletionTimestamp"):
                live.discard(meta["name"])
            else:
                live.add(meta["name"])
            if len(live) > 1:
                self.violations.append(f"two hosts for {model}: {', '.join(sorted(live))}")


def _watch(list_call: Any, sync: Any, handle: Any, stop: threading.Event) -> None:
    """List, then watch from the list's resourceVersion; again on every end."""
    while not stop.is_set():
        watch = kubernetes.watch.Watch()  # type: ignore[no-untyped-call]
        try:
            listed = list_call()
            if isinstance(listed, dict):
                items, version = listed["items"], listed["metadata"]["resourceVersion"]
            else:
                items = [i.to_dict() for i in listed.items]
                version = listed.metadata.resource_version
            sync(items)
            stream = watch.stream(  # type: ignore[no-untyped-call]
                list_call, resource_version=version, timeout_seconds=5
            )
            for event in stream:
                obj = event["object"]
                handle(event["type"], obj if isinstance(obj, dict) else obj.to_dict())
                if stop.is_set():
                    break
        except (ApiException, OSError, ValueError):
            time.sleep(0.2)
        finally:
            watch.stop()  # type: ignore[no-untyped-call]


@contextlib.contextmanager
def watching(api: ApiClient, namespace: str) -> Iterator[Watched]:
    seen = Watched()
    stop = threading.Event()
    custom = kubernetes.client.CustomObjectsApi(api)
    core = kubernetes.client.CoreV1Api(api)

    def models(**kw: Any) -> Any:
        return custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "meshmodels", **kw)

    def pods(**kw: Any) -> Any:
        return core.list_namespaced_pod(namespace, **kw)

    def pod_sync(items: list[dict[str, Any]]) -> None:
        seen.pod_sync([_pod_dict(i) for i in items])

    threads = [
        threading.Thread(
            target=_watch, args=(models, seen.plan_sync, seen.plan_event, stop), daemon=True
        ),
        threading.Thread(
            target=_watch,
            args=(pods, pod_sync, lambda k, o: seen.pod_event(k, _pod_dict(o)), stop),
            daemon=True,
        ),
    ]
    for thread in threads:
        thread.start()
    try:
        yield seen
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)


def _pod_dict(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A pod from the typed client (`to_dict`: snake_case) as the checks read it."""
    meta = obj.get("metadata") or {}
    return {
        "metadata": {
            "name": meta.get("name"),
            "labels": meta.get("labels"),
            "deletionTimestamp": meta.get("deletion_timestamp"),
        }
    }


# -- the run ----------------------------------------------------------------------


@dataclass
class ChaosReport:
    seed: int
    cycles: int = 0
    kills: int = 0
    converge_seconds: list[float] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    peak_device_mib: int = 0
    limit_mib: int = field(default_factory=device_limit_mib)
    # The namespace's Events when there were violations (what each plan came from).
    events: list[str] = field(default_factory=list)

    def summary(self) -> str:
        times = sorted(self.converge_seconds)
        p50 = statistics.median(times) if times else float("nan")
        p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))] if times else math.nan
        return (
            f"seed {self.seed}: {self.cycles} cycles, {self.kills} operator kills, converged "
            f"p50 {p50:.1f} s p99 {p99:.1f} s, peak {self.peak_device_mib}/{self.limit_mib} MiB "
            f"on one GPU, {len(self.violations)} violations"
        )


class Chaos:
    def __init__(self, cluster: LocalCluster, work: Path, seed: int) -> None:
        self.cluster = cluster
        self.work = work
        self.rng = random.Random(seed)
        self.report = ChaosReport(seed=seed)
        self.api: ApiClient = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(cluster.kubeconfig)
        )
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
        tag = f"{seed:x}-{self.rng.randrange(1 << 24):06x}"
        self.namespace = f"chaos-{tag}"
        self.pool = f"chaos-{tag}"
        self.label = {"mesh-chaos": tag}

    def run(self, cycles: int) -> ChaosReport:
        kubernetes.client.CoreV1Api(self.api).create_namespace(
            kubernetes.client.V1Namespace(
                metadata=kubernetes.client.V1ObjectMeta(name=self.namespace)
            )
        )
        self.nodes = add_gpu_nodes(self.api, self.pool, 3, self.label)
        self._make_pool()
        operator = OperatorProcess(
            self.cluster.kubeconfig, self.work, namespace=self.namespace,
            identity="chaos", lease="mesh-chaos",
        )  # fmt: skip
        try:
            with serve_directory(HEADERS) as files, watching(self.api, self.namespace) as seen:
                self.files = files
                operator.start()
                for _ in range(cycles):
                    self._cycle(operator)
                    self.report.cycles += 1
                with seen.lock:
                    self.report.violations += seen.violations
                    self.report.peak_device_mib = seen.peak_device_mib
                if self.report.violations:
                    self._keep_events()
        finally:
            operator.stop()
            self._clean_up()
        return self.report

    def _keep_events(self) -> None:
        """The namespace's Events, in the work folder: what each plan was made from."""
        core = kubernetes.client.CoreV1Api(self.api)
        events = core.list_namespaced_event(self.namespace).items
        lines = [
            f"{e.last_timestamp or e.event_time} {e.involved_object.name} {e.reason}: {e.message}"
            for e in sorted(events, key=lambda e: str(e.last_timestamp or e.event_time))
        ]
        (self.work / f"events-{self.namespace}.txt").write_text("\n".join(lines) + "\n")
        self.report.events = lines

    def _make_pool(self) -> None:
        self.custom.create_cluster_custom_object(
            GROUP, VERSION, "meshpools",
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MeshPool",
             "metadata": {"name": self.pool},
             "spec": {"backend": "cuda", "sharing": "shared", "nodeSelector": self.label,
                      "reservePercent": RESERVE_PERCENT,
                      "tolerations": [{"key": KWOK_NODE_ANNOTATION, "operator": "Exists"}]}},
        )  # fmt: skip

    def _cycle(self, operator: OperatorProcess) -> None:
        rng = self.rng
        actions = [(m, rng.random() < 0.25) for m in MODELS]  # (model, delete?)
        rng.shuffle(actions)
        kill_before = rng.randrange(len(actions) + 1)
        for index, (model, delete) in enumerate(actions):
            if index == kill_before:
                self._kill_and_restart(operator)
            if delete:
                self._delete(model)
            else:
                self._apply(model, rng.choice(FILES), rng.choice(CONTEXTS))
            time.sleep(rng.uniform(0.0, 1.5))
        if kill_before == len(actions):
            self._kill_and_restart(operator)
        started = time.monotonic()
        self._converge()
        self.report.converge_seconds.append(time.monotonic() - started)

    def _kill_and_restart(self, operator: OperatorProcess) -> None:
        operator.kill()
        self.report.kills += 1
        time.sleep(self.rng.uniform(0.0, 2.0))
        operator.start()

    def _apply(self, model: str, file: str, context: int) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "MeshModel",
            "metadata": {"name": model, "namespace": self.namespace},
            "spec": {"source": {"url": f"{self.files}/{file}"}, "poolRef": self.pool,
                     "contextSize": context},
        }  # fmt: skip
        try:
            self.custom.create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, "meshmodels", body
            )
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.custom.patch_namespaced_custom_object(
                GROUP, VERSION, self.namespace, "meshmodels", model,
                {"spec": body["spec"]},
            )  # fmt: skip

    def _delete(self, model: str) -> None:
        with contextlib.suppress(ApiException):
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, "meshmodels", model
            )

    # -- the end state --------------------------------------------------------------

    def _converge(self) -> None:
        deadline = time.monotonic() + CONVERGE_SECONDS
        problems: list[str] = []
        while time.monotonic() < deadline:
            problems = self.problems()
            if not problems:
                return
            time.sleep(0.5)
        raise ChaosError(
            f"seed {self.report.seed} cycle {self.report.cycles + 1}: not converged after "
            f"{CONVERGE_SECONDS:.0f} s: {'; '.join(problems)}"
        )

    def problems(self) -> list[str]:
        """What keeps the end state from being converged (empty when it is)."""
        out = []
        listed = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "meshmodels"
        )
        models: list[dict[str, Any]] = listed["items"]  # type: ignore[index]
        existing = {m["metadata"]["name"] for m in models}
        for m in models:
            name, generation = m["metadata"]["name"], m["metadata"]["generation"]
            conditions = {c["type"]: c for c in (m.get("status") or {}).get("conditions", [])}
            planned, ready = conditions.get("Planned"), conditions.get("Ready")
            if planned is None or ready is None:
                out.append(f"{name}: no conditions yet")
                continue
            if planned.get("observedGeneration") != generation:
                out.append(f"{name}: conditions of generation {planned.get('observedGeneration')}")
            elif ready["status"] != "True" and planned["reason"] != "NoCapacity":
                out.append(f"{name}: Ready={ready['status']} ({ready['reason']})")
        for kind, items in self._children().items():
            for item in items:
                owner = (item["metadata"].get("labels") or {}).get(MODEL_LABEL)
                if owner not in existing:
                    out.append(f"orphaned {kind} {item['metadata']['name']} of {owner}")
        return out

    def _children(self) -> dict[str, list[dict[str, Any]]]:
        selector = MODEL_LABEL
        apps = kubernetes.client.AppsV1Api(self.api)
        core = kubernetes.client.CoreV1Api(self.api)
        net = kubernetes.client.NetworkingV1Api(self.api)
        out: dict[str, list[dict[str, Any]]] = {}
        for kind, call in (
            ("DaemonSet", apps.list_namespaced_daemon_set),
            ("Deployment", apps.list_namespaced_deployment),
            ("Service", core.list_namespaced_service),
            ("NetworkPolicy", net.list_namespaced_network_policy),
        ):
            items = call(self.namespace, label_selector=selector).items
            out[kind] = [
                {"metadata": {"name": m.name, "labels": m.labels}}
                for i in items
                if (m := i.metadata) is not None
            ]
        return out

    def _clean_up(self) -> None:
        with contextlib.suppress(ApiException):
            kubernetes.client.CoreV1Api(self.api).delete_namespace(self.namespace)
        with contextlib.suppress(ApiException):
            self.custom.delete_cluster_custom_object(GROUP, VERSION, "meshpools", self.pool)
        for node in getattr(self, "nodes", []):
            with contextlib.suppress(ApiException):
                kubernetes.client.CoreV1Api(self.api).delete_node(node)
            with contextlib.suppress(ApiException):
                self.custom.delete_cluster_custom_object(GROUP, VERSION, "meshnodes", node)
        self.api.close()  # type: ignore[no-untyped-call]


# -- handover between two replicas --------------------------------------------------


@dataclass
class Handover:
    """Seconds from SIGKILL of the active operator until the standby holds the Lease,
    and until it has planned a model applied right after the kill."""

    lease_seconds: float
    reconcile_seconds: float
    kept_plan: bool  # the model planned before the kill kept its plan
    released: bool  # the new leader gave the Lease up when stopped


class HandoverRun(Chaos):
    """Two operator replicas on one Lease; the active one is killed."""

    def run_handover(self) -> Handover:
        core = kubernetes.client.CoreV1Api(self.api)
        core.create_namespace(
            kubernetes.client.V1Namespace(
                metadata=kubernetes.client.V1ObjectMeta(name=self.namespace)
            )
        )
        self.nodes = add_gpu_nodes(self.api, self.pool, 3, self.label)
        self._make_pool()
        lease = "mesh-handover"
        replicas = [
            OperatorProcess(
                self.cluster.kubeconfig,
                self.work,
                namespace=self.namespace,
                identity=who,
                lease=lease,
            )
            for who in ("op-a", "op-b")
        ]
        active, standby = replicas
        try:
            with serve_directory(HEADERS) as files:
                self.files = files
                active.start()
                _wait(lambda: lease_holder(self.api, self.namespace, lease) == "op-a", "op-a leads")
                standby.start()
                _wait(standby.healthy, "the standby answers its liveness probe")
                self._apply("alpha", FILES[0], 2048)
                _wait(lambda: self._ready("alpha"), "alpha Ready")
                before = self._plan_generation("alpha")
                active.kill()
                killed = time.monotonic()
                self._apply("beta", FILES[0], 2048)
                _wait(lambda: lease_holder(self.api, self.namespace, lease) == "op-b", "op-b leads")
                leading = time.monotonic() - killed
                _wait(lambda: self._ready("beta"), "beta Ready")
                reconciled = time.monotonic() - killed
                kept = self._ready("alpha") and self._plan_generation("alpha") == before
                standby.stop()
                released = lease_holder(self.api, self.namespace, lease) is None
                return Handover(leading, reconciled, kept, released)
        finally:
            for replica in replicas:
                replica.stop()
            self._clean_up()

    def _ready(self, model: str) -> bool:
        obj: Any = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "meshmodels", model
        )
        conditions = {c["type"]: c for c in (obj.get("status") or {}).get("conditions", [])}
        ready = conditions.get("Ready")
        return bool(ready and ready["status"] == "True")

    def _plan_generation(self, model: str) -> int:
        obj: Any = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "meshmodels", model
        )
        return int((obj.get("status") or {}).get("planGeneration") or 0)


def _wait(probe: Any, what: str, timeout: float = CONVERGE_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return
        time.sleep(0.2)
    raise ChaosError(f"timed out after {timeout:.0f} s waiting for {what}")
