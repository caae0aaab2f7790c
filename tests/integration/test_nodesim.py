"""The node simulator against the real control plane: pods the real scheduler and
controllers create run as real processes on simulated nodes, with their own IPs,
probes, restarts, volumes, service-account credentials, and a node that is lost
when its process is killed."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.cluster import LocalCluster
from e2e.nodesim import SimulatedCluster
from e2e.nodesim.pidrecords import live_records, process_start_time
from e2e.waiting import wait_for
from tests.integration.kube_helpers import apply

pytestmark = pytest.mark.integration

Obj = dict[str, Any]
SELECT = "nodesim.mesh.dev/test"

SERVER = """
import http.server, json, os, pathlib, sys
bind, port, data, host = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
pathlib.Path(host, "hello").write_text(os.environ["NODE_NAME"])
init = pathlib.Path(data, "init.txt").read_text()

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"env": dict(os.environ), "argv": sys.argv, "init": init,
                           "pid": os.getpid()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

print("serving on", bind, port, flush=True)
http.server.HTTPServer((bind, port), Handler).serve_forever()
"""

API_CHECK = """
import json, sys
from kubernetes import client, config
config.load_kube_config()
api = client.CoreV1Api()
ns = open(sys.argv[1]).read()
result = {"pods": len(api.list_namespaced_pod(ns).items)}
try:
    api.list_namespaced_secret(ns)
    result["secrets"] = "allowed"
except client.ApiException as exc:
    result["secrets"] = exc.status
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def sim(
    cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SimulatedCluster]:
    simulated = SimulatedCluster(
        cluster, tmp_path_factory.mktemp("nodesim"), lease_renew_seconds=5.0
    )
    tag = uuid.uuid4().hex[:6]
    try:
        for suffix in ("a", "b"):
            simulated.add_node(f"nsim-{tag}-{suffix}", labels={SELECT: tag})
        yield simulated
    finally:
        simulated.down()
        # Nothing may survive `down`: no node process and no container.
        assert not simulated.status() or not any(simulated.status().values())
        assert not live_records(simulated.state_dir / "nodes", "*/pods/*/pids/*.json")
        assert not processes_mentioning(str(simulated.state_dir))


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that contain `text`."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and process_start_time(int(proc.name)) is not None:
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                found.append(cmdline)
    return found


def tag_of(sim: SimulatedCluster) -> str:
    return sim.nodes()[0].name.split("-")[1]


def names(sim: SimulatedCluster) -> list[str]:
    return [n.name for n in sim.nodes() if n.name.endswith(("-a", "-b"))]


def pod_of(sim: SimulatedCluster, namespace: str, selector: str) -> Obj | None:
    found = sim.api_get(f"/api/v1/namespaces/{namespace}/pods?labelSelector={selector}")
    items = (found or {}).get("items") or []
    live = [p for p in items if not p["metadata"].get("deletionTimestamp")]
    return live[0] if live else None


def ready(pod: Obj | None) -> bool:
    for cond in ((pod or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == "Ready":
            return bool(cond["status"] == "True")
    return False


def describe(sim: SimulatedCluster, namespace: str) -> str:
    """Pods' states and recent events of the namespace, for a failure message."""
    pods = (sim.api_get(f"/api/v1/namespaces/{namespace}/pods") or {}).get("items") or []
    events = (sim.api_get(f"/api/v1/namespaces/{namespace}/events") or {}).get("items") or []
    lines = [
        f"pod {p['metadata']['name']} on {p['spec'].get('nodeName')}: "
        f"{json.dumps((p.get('status') or {}).get('containerStatuses'))}"
        for p in pods
    ]
    lines += [f"event {e['reason']}: {e['message']}" for e in events[-15:]]
    return "\n".join(lines)


def wait(sim: SimulatedCluster, namespace: str, what: str, probe: Any, timeout: float = 60) -> Any:
    try:
        return wait_for(what, probe, timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{describe(sim, namespace)}") from None


def fetch_json(url: str) -> Obj:
    with urllib.request.urlopen(url, timeout=10) as resp:
        result: Obj = json.loads(resp.read())
        return result


def gone(pid: int, start_time: int | None) -> bool:
    return process_start_time(pid) != start_time


def test_deployment_runs_with_its_ip_env_volumes_and_readiness(
    sim: SimulatedCluster, cluster: LocalCluster, namespace: str
) -> None:
    tag = tag_of(sim)
    apply(cluster, {
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "creds", "namespace": namespace},
        "stringData": {"password": "s3cret"},
    })  # fmt: skip
    apply(cluster, {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "app", "namespace": namespace},
        "data": {"server.py": SERVER},
    })  # fmt: skip
    container = {
        "name": "web",
        "image": "python:3.11-slim",
        "command": ["python3"],
        "args": ["/app/server.py", "$(POD_IP)", "8080", "/data", "/host"],
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {
                "name": "PASSWORD",
                "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}},
            },
            {"name": "DATA_DIR", "value": "/data/sub"},
            {"name": "GREETING", "value": "hello from $(NODE_NAME)"},
        ],
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
        "livenessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 5},
        "volumeMounts": [
            {"name": "app", "mountPath": "/app"},
            {"name": "data", "mountPath": "/data"},
            {"name": "host", "mountPath": "/host"},
        ],
    }
    init = {
        "name": "prepare",
        "image": "python:3.11-slim",
        "command": ["python", "-c", "import sys; open(sys.argv[1], 'w').write('ok')"],
        "args": ["/data/init.txt"],
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    labels = {"app": "web"}
    apply(cluster, {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": {SELECT: tag},
                    "terminationGracePeriodSeconds": 5,
                    "initContainers": [init],
                    "containers": [container],
                    "volumes": [
                        {"name": "app", "configMap": {"name": "app"}},
                        {"name": "data", "emptyDir": {}},
                        {"name": "host", "hostPath": {"path": "/var/lib/nodesim-test",
                                                      "type": "DirectoryOrCreate"}},
                    ],
                },
            },
        },
    })  # fmt: skip
    pod = wait(
        sim,
        namespace,
        "web pod Ready",
        lambda: (p := pod_of(sim, namespace, "app=web")) and ready(p) and p,
        60,
    )
    ip, node = pod["status"]["podIP"], pod["spec"]["nodeName"]
    assert node in names(sim)
    assert ip != sim.node(node).address and ip.startswith(sim.node(node).address.rsplit(".", 1)[0])

    # A Service's EndpointSlice (which the gateway reads) lists the pod's own IP.
    apply(cluster, {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": "http"}]},
    })  # fmt: skip

    def endpoints() -> list[str] | None:
        found = sim.api_get(
            f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
            "?labelSelector=kubernetes.io/service-name=web"
        )
        ready_ips = [
            address
            for item in (found or {}).get("items") or []
            for endpoint in item.get("endpoints") or []
            if (endpoint.get("conditions") or {}).get("ready")
            for address in endpoint["addresses"]
        ]
        return ready_ips or None

    assert wait(sim, namespace, "the Service's endpoints", endpoints, 30) == [ip]

    seen = fetch_json(f"http://{ip}:8080/")
    env = seen["env"]
    assert env["POD_IP"] == ip and env["NODE_NAME"] == node and env["PASSWORD"] == "s3cret"
    assert env["GREETING"] == f"hello from {node}"
    assert seen["argv"][1:3] == [ip, "8080"]
    assert seen["init"] == "ok"
    # Container paths point into the pod's and the node's own folders.
    data_dir = Path(env["DATA_DIR"])
    assert data_dir.name == "sub" and data_dir.parent.name == "data"
    assert str(data_dir).startswith(str(sim.state_dir))
    host_file = sim.node(node).state_dir / "host/var/lib/nodesim-test/hello"
    assert host_file.read_text() == node
    assert "serving on" in sim.pod_log(namespace, pod["metadata"]["name"], "web")
    assert "KUBERNETES_SERVICE_HOST" not in env

    pid = sim.container_pids(namespace, pod["metadata"]["name"])["web"]
    assert pid == seen["pid"]
    started = process_start_time(pid)
    cluster.kubectl("delete", "pod", "-n", namespace, pod["metadata"]["name"], "--wait=true")
    assert gone(pid, started), "the container outlived its pod"
    replaced = wait(
        sim,
        namespace,
        "a replacement pod Ready",
        lambda: (p := pod_of(sim, namespace, "app=web")) and ready(p) and p,
        60,
    )
    assert replaced["metadata"]["uid"] != pod["metadata"]["uid"]


def test_crash_loop_and_unknown_image(
    sim: SimulatedCluster, cluster: LocalCluster, namespace: str
) -> None:
    apply(cluster, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "crash", "namespace": namespace, "labels": {"app": "crash"}},
        "spec": {
            "nodeSelector": {SELECT: tag_of(sim)},
            "containers": [
                {"name": "crash", "image": "python:3.11",
                 "command": ["python", "-c", "print('boom'); raise SystemExit(3)"]},
                {"name": "alien", "image": "busybox:1.36", "command": ["sh", "-c", "sleep 1"]},
                {"name": "sick", "image": "python:3.11",
                 "command": ["python", "-c", "import time; time.sleep(3600)"],
                 "livenessProbe": {"exec": {"command": ["python", "-c", "raise SystemExit(1)"]},
                                   "periodSeconds": 1, "failureThreshold": 2}},
            ],
        },
    })  # fmt: skip

    def backing_off() -> Obj | None:
        pod = pod_of(sim, namespace, "app=crash")
        statuses = {
            s["name"]: s for s in ((pod or {}).get("status") or {}).get("containerStatuses") or []
        }
        crash = statuses.get("crash", {})
        waiting = crash.get("state", {}).get("waiting", {})
        sick = statuses.get("sick", {})
        if (
            crash.get("restartCount", 0) >= 1
            and waiting.get("reason") == "CrashLoopBackOff"
            and sick.get("restartCount", 0) >= 1
        ):
            return statuses
        return None

    statuses = wait(sim, namespace, "CrashLoopBackOff", backing_off, 60)
    assert statuses["crash"]["lastState"]["terminated"]["exitCode"] == 3
    alien = statuses["alien"]["state"]["waiting"]
    assert alien["reason"] == "ErrImagePull" and "'sh'" in alien["message"]
    assert "boom" in sim.pod_log(namespace, "crash", "crash", previous=True)
    # A failed liveness probe restarts the container: SIGTERM, exit 143.
    assert statuses["sick"]["lastState"]["terminated"]["exitCode"] == 143


def test_deletion_sends_sigterm_then_sigkill_to_the_group(
    sim: SimulatedCluster, cluster: LocalCluster, namespace: str
) -> None:
    stubborn = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(3600)\n"
    )
    apply(cluster, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "stubborn", "namespace": namespace, "labels": {"app": "stubborn"}},
        "spec": {
            "nodeSelector": {SELECT: tag_of(sim)},
            "terminationGracePeriodSeconds": 2,
            "containers": [{"name": "main", "image": "python:3.11",
                            "command": ["python", "-c", stubborn]}],
        },
    })  # fmt: skip
    wait(
        sim, namespace, "stubborn pod Ready", lambda: ready(pod_of(sim, namespace, "app=stubborn"))
    )
    child = int(wait(sim, namespace, "the child's pid", lambda: sim.pod_log(namespace, "stubborn")))
    parent = sim.container_pids(namespace, "stubborn")["main"]
    starts = {pid: process_start_time(pid) for pid in (parent, child)}
    began = time.monotonic()
    cluster.kubectl("delete", "pod", "-n", namespace, "stubborn", "--wait=true")
    elapsed = time.monotonic() - began
    # SIGTERM is ignored, so the grace period runs out before SIGKILL.
    assert 2 <= elapsed < 10, elapsed
    assert all(gone(pid, start) for pid, start in starts.items())


def test_daemonset_one_pod_per_node_on_host_network(
    sim: SimulatedCluster, cluster: LocalCluster, namespace: str
) -> None:
    labels = {"app": "everywhere"}
    apply(cluster, {
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "everywhere", "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": {SELECT: tag_of(sim)},
                    "hostNetwork": True,
                    "terminationGracePeriodSeconds": 2,
                    "containers": [{
                        "name": "idle", "image": "python:3.11",
                        "command": ["python", "-c", "import time; time.sleep(3600)"],
                        "readinessProbe": {"exec": {"command": ["python", "-c", "pass"]},
                                           "periodSeconds": 2},
                    }],
                },
            },
        },
    })  # fmt: skip

    def all_ready() -> list[Obj] | None:
        found = sim.api_get(f"/api/v1/namespaces/{namespace}/pods?labelSelector=app=everywhere")
        items = (found or {}).get("items") or []
        return items if len(items) == len(names(sim)) and all(ready(p) for p in items) else None

    pods = wait(sim, namespace, "one Ready pod per simulated node", all_ready, 60)
    assert sorted(p["spec"]["nodeName"] for p in pods) == sorted(names(sim))
    for pod in pods:
        node = sim.node(pod["spec"]["nodeName"])
        assert pod["status"]["podIP"] == pod["status"]["hostIP"] == node.address


def test_service_account_token_has_its_rbac(
    sim: SimulatedCluster, cluster: LocalCluster, namespace: str
) -> None:
    for obj in (
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "reader", "namespace": namespace}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "pod-reader", "namespace": namespace},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "reader", "namespace": namespace},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
         "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}]},
    ):  # fmt: skip
        apply(cluster, obj)
    apply(cluster, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "asker", "namespace": namespace, "labels": {"app": "asker"}},
        "spec": {
            "nodeSelector": {SELECT: tag_of(sim)},
            "serviceAccountName": "reader",
            "restartPolicy": "Never",
            "containers": [{"name": "ask", "image": "python:3.11",
                            "command": ["python", "-c", API_CHECK],
                            "args": ["/var/run/secrets/kubernetes.io/serviceaccount/namespace"]}],
        },
    })  # fmt: skip

    def finished() -> str | None:
        pod = pod_of(sim, namespace, "app=asker")
        phase = ((pod or {}).get("status") or {}).get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    phase = wait(sim, namespace, "the asker pod to finish", finished, 60)
    output = sim.pod_log(namespace, "asker", "ask")
    assert phase == "Succeeded", output
    answer = json.loads(output.strip().splitlines()[-1])
    assert answer == {"pods": 1, "secrets": 403}


def test_lost_node_kills_its_pods_and_turns_not_ready(
    sim: SimulatedCluster, cluster: LocalCluster, namespace: str
) -> None:
    tag = tag_of(sim)
    lost = f"nsim-{tag}-c"
    sim.add_node(lost, labels={SELECT: f"{tag}-lost"})
    previous_grace = cluster.set_node_monitor_grace(20)
    try:
        apply(cluster, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "doomed", "namespace": namespace, "labels": {"app": "doomed"}},
            "spec": {
                "nodeSelector": {SELECT: f"{tag}-lost"},
                "containers": [{"name": "idle", "image": "python:3.11",
                                "command": ["python", "-c", "import time; time.sleep(3600)"]}],
            },
        })  # fmt: skip
        wait(
            sim,
            namespace,
            "doomed pod Ready",
            lambda: ready(pod_of(sim, namespace, "app=doomed")),
            60,
        )
        pid = sim.container_pids(namespace, "doomed")["idle"]
        started = process_start_time(pid)

        killed = sim.stop_node(lost)
        assert pid in killed and gone(pid, started)
        assert sim.node(lost).pid is None
        wait(
            sim, namespace, "the lost node NotReady", lambda: sim.node_ready(lost) == "Unknown", 60
        )
        # The node lifecycle controller marks the lost node's pods not ready.
        wait(
            sim,
            namespace,
            "doomed pod not Ready",
            lambda: not ready(pod_of(sim, namespace, "app=doomed")),
            30,
        )

        # Back again: the node is Ready and runs the pod again, as a restart.
        sim.start_node(lost)
        pod = wait(
            sim,
            namespace,
            "doomed pod Ready again",
            lambda: (p := pod_of(sim, namespace, "app=doomed")) and ready(p) and p,
            60,
        )
        assert pod["status"]["containerStatuses"][0]["restartCount"] == 1
        assert sim.container_pids(namespace, "doomed")["idle"] != pid
    finally:
        cluster.set_node_monitor_grace(previous_grace)
        sim.delete_node(lost)
