"""Scale to zero and autoscaling end to end on the real API server: the operator
(kopf's KopfRunner) reads the demand of a real gateway (in-process, discovering
the models from the same API server) and acts on kwok GPU nodes.

Requests are held at the gateway because the kwok hosts never answer: a held
request is demand (`waiting`), which is what brings a model back from zero and
adds a replica, and it ends as the gateway's OpenAI-shaped 503 with Retry-After
when the hold times out. A held request answered by a real llama-server after a
cold start is e2e/test_real_scale_to_zero.py's, on real nodes.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from kopf.testing import KopfRunner

from e2e.cluster import LocalCluster
from e2e.waiting import wait_for
from mesh_operator.gateway.kube_discovery import KubernetesSource
from mesh_operator.gateway.server import Gateway
from mesh_operator.gateway.settings import GatewaySettings
from mesh_operator.kubeclient import api_client
from tests.integration.kube_helpers import apply, condition, get, gpu_device, put_meshnode
from tests.integration.test_operator import (  # noqa: F401 (fixtures)
    KWOK_TOLERATION,
    MODEL_FILE,
    cleanup,
    model_url,
)

pytestmark = pytest.mark.integration

HOLD_SECONDS = 15.0
MESSAGES = [{"role": "user", "content": "Say yes."}]


class GatewayThread:
    """A real gateway on loopback, on an event loop of its own thread."""

    def __init__(self, cluster: LocalCluster) -> None:
        self._loop = asyncio.new_event_loop()
        source = KubernetesSource(api_client(cluster.kubeconfig), resync_seconds=5)
        settings = GatewaySettings(host="127.0.0.1", port=0, hold_timeout=HOLD_SECONDS)
        self.gateway = Gateway(settings, source)
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> str:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.gateway.start(), self._loop).result(60)
        return self.gateway.url

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.gateway.stop(), self._loop).result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()


@pytest.fixture(scope="module")
def gateways(crds: LocalCluster) -> Iterator[list[str]]:
    """Two gateways, as the chart runs: the operator sums their demand."""
    started: list[GatewayThread] = []
    try:
        for _ in range(2):
            gateway = GatewayThread(crds)
            gateway.start()
            started.append(gateway)
        yield [g.gateway.url for g in started]
    finally:
        for gateway in started:
            gateway.stop()


@pytest.fixture(scope="module")
def gateway_url(gateways: list[str]) -> str:
    return gateways[0]


@pytest.fixture(scope="module")
def operator(crds: LocalCluster, gateways: list[str]) -> Iterator[KopfRunner]:
    env = {
        "KUBECONFIG": str(crds.kubeconfig),
        "MESH_MODEL_INTERVAL": "2",
        "MESH_POOL_INTERVAL": "2",
        "MESH_GATEWAY_URLS": ",".join(gateways),
        "MESH_DEMAND_INTERVAL": "0.5",
    }
    before = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    args = ["run", "--all-namespaces", "--standalone", "-m", "mesh_operator.handlers.registration"]
    try:
        with KopfRunner(args, timeout=60) as runner:
            yield runner
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    assert runner.exit_code == 0, runner.output
    assert runner.exception is None
    assert "Traceback" not in runner.output, runner.output[-5000:]


def pool_of_nodes(cluster: LocalCluster, label: str, count: int, made: list[str]) -> str:
    """`count` kwok nodes of one 1000 MiB GPU (gemma fits one) and their pool."""
    for i in range(count):
        name = f"gpu-{label}-{i}"
        made += [f"node/{name}", f"meshnode/{name}"]
        cluster.add_kwok_node(name, gpus=1, labels={"mesh-test-pool": label})
        put_meshnode(cluster, name, [gpu_device(0, 1000, 990, 900.0, f"Test GPU {i}")])
    pool = f"pool-{label}"
    made.append(f"meshpool/{pool}")
    apply(cluster, {
        "apiVersion": "mesh.dev/v1alpha1", "kind": "MeshPool", "metadata": {"name": pool},
        "spec": {"backend": "cuda", "nodeSelector": {"mesh-test-pool": label},
                 "tolerations": [KWOK_TOLERATION]},
    })  # fmt: skip
    return pool


def apply_model(cluster: LocalCluster, namespace: str, name: str, **spec: Any) -> None:
    apply(cluster, {
        "apiVersion": "mesh.dev/v1alpha1", "kind": "MeshModel",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"contextSize": 1024, **spec},
    })  # fmt: skip


def status(cluster: LocalCluster, namespace: str, name: str) -> dict[str, Any]:
    obj = get(cluster, "meshmodel", name, "-n", namespace) or {}
    return dict(obj.get("status") or {})


def ready(cluster: LocalCluster, namespace: str, name: str) -> dict[str, Any] | None:
    obj = get(cluster, "meshmodel", name, "-n", namespace)
    cond = condition(obj, "Ready")
    return obj if cond and cond["status"] == "True" else None


def events(cluster: LocalCluster, namespace: str, name: str) -> list[tuple[str, str]]:
    out = cluster.kubectl(
        "get", "events", "-n", namespace, "--field-selector",
        f"involvedObject.name={name},involvedObject.kind=MeshModel", "-o", "json",
    )  # fmt: skip
    return [(e["reason"], e["message"]) for e in json.loads(out)["items"]]


def workloads(cluster: LocalCluster, namespace: str, name: str) -> list[str]:
    out = cluster.kubectl(
        "get", "daemonsets,deployments", "-n", namespace, "-l", f"mesh.dev/model={name}",
        "-o", "name",
    )  # fmt: skip
    return sorted(out.split())


def fetch_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())


@dataclass
class HeldRequests:
    """Chat completions sent in threads; each ends as (HTTP status, headers, body)."""

    url: str
    model: str
    answers: list[tuple[int, dict[str, str], Any]] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)

    def send(self, count: int) -> None:
        for _ in range(count):
            thread = threading.Thread(target=self._one, daemon=True)
            thread.start()
            self._threads.append(thread)

    def wait(self) -> list[tuple[int, dict[str, str], Any]]:
        for thread in self._threads:
            thread.join(HOLD_SECONDS + 60)
        return self.answers

    def _one(self) -> None:
        body = json.dumps({"model": self.model, "messages": MESSAGES, "max_tokens": 4}).encode()
        request = urllib.request.Request(
            f"{self.url}/v1/chat/completions", body, {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=HOLD_SECONDS + 60) as answer:
                self.answers.append(
                    (answer.status, dict(answer.headers), json.loads(answer.read()))
                )
        except urllib.error.HTTPError as err:
            self.answers.append((err.code, dict(err.headers), json.loads(err.read())))


def demand_of(gateway_url: str, key: str) -> dict[str, int]:
    models = fetch_json(f"{gateway_url}/demand")["models"]
    return dict(models.get(key) or {})


def test_an_idle_model_scales_to_zero_and_a_request_brings_it_back(
    operator: KopfRunner,
    crds: LocalCluster,
    namespace: str,
    model_url: str,  # noqa: F811
    gateway_url: str,
    cleanup: list[str],  # noqa: F811
) -> None:
    cluster = crds
    pool = pool_of_nodes(cluster, namespace, 2, cleanup)
    source = {"url": f"{model_url}/{MODEL_FILE}"}
    apply_model(cluster, namespace, "idle", poolRef=pool, source=source)
    wait_for("the model serving", lambda: ready(cluster, namespace, "idle"), timeout=120)
    plan = status(cluster, namespace, "idle")["plan"]
    held = sum(d["totalMiB"] for d in plan["devices"])

    def claimed() -> int:
        pool_status = (get(cluster, "meshpool", pool) or {}).get("status") or {}
        return int(pool_status.get("memoryClaimedMiB", -1))

    wait_for(f"the ledger holding {held} MiB", lambda: claimed() == held, timeout=60)
    apply_model(cluster, namespace, "idle", poolRef=pool, source=source, scaleToZeroAfter="4s")

    # No request for 4 s: workers, host and claim released; still listed.
    def at_zero() -> dict[str, Any] | None:
        st = status(cluster, namespace, "idle")
        cond = condition({"status": st}, "Ready")
        return st if cond and cond["reason"] == "ScaledToZero" else None

    st = wait_for("the model scaled to zero", at_zero, timeout=60)
    assert "scaledToZeroTime" in st and "plan" not in st, st
    assert condition({"status": st}, "Ready")["status"] == "False"  # type: ignore[index]
    assert "no request at any gateway for" in condition({"status": st}, "Ready")["message"]  # type: ignore[index]
    wait_for("no workload left", lambda: workloads(cluster, namespace, "idle") == [], timeout=60)
    # (kopf keeps an index entry whose indexer returns None: the plan index must
    # return {} for a model without a plan, or its claim would stay.)
    wait_for("the ledger released", lambda: claimed() == 0, timeout=60)
    listed = {m["id"] for m in fetch_json(f"{gateway_url}/v1/models")["data"]}
    assert "idle" in listed, listed
    assert [r for r, _ in events(cluster, namespace, "idle")].count("ScaledToZero") == 1

    # A request: held at the gateway, seen by the operator, the model planned again.
    requests = HeldRequests(gateway_url, "idle")
    requests.send(1)

    def woken() -> dict[str, Any] | None:
        st = status(cluster, namespace, "idle")
        cond = condition({"status": st}, "Planned")
        ok = cond and cond["status"] == "True" and cond["reason"] == "ScaleFromZero"
        return st if ok and "scaledToZeroTime" not in st else None

    st = wait_for("the model planned again", woken, timeout=60)
    assert st["plan"]["devices"], st
    assert demand_of(gateway_url, f"{namespace}/idle")["requests"] >= 1
    wait_for(
        "its workloads made again",
        lambda: workloads(cluster, namespace, "idle") != [],
        timeout=60,
    )
    planned = [m for r, m in events(cluster, namespace, "idle") if r == "Planned"]
    assert any(m.startswith("ScaleFromZero: 1 requests at the gateways") for m in planned), planned
    wait_for(f"the ledger holding {held} MiB again", lambda: claimed() == held, timeout=60)
    # The kwok host never answers: the held request ends as an OpenAI-shaped 503.
    ((code, headers, body),) = requests.wait()
    assert code == 503, body
    assert body["error"]["code"] == "model_not_ready", body
    assert int(headers["Retry-After"]) > 0


def test_load_adds_a_replica_and_idleness_removes_it(
    operator: KopfRunner,
    crds: LocalCluster,
    namespace: str,
    model_url: str,  # noqa: F811
    gateways: list[str],
    cleanup: list[str],  # noqa: F811
) -> None:
    cluster = crds
    pool = pool_of_nodes(cluster, namespace, 3, cleanup)
    source = {"url": f"{model_url}/{MODEL_FILE}"}
    autoscaling = {"minReplicas": 1, "maxReplicas": 2, "scaleDownAfter": "5s"}
    apply_model(cluster, namespace, "auto", poolRef=pool, source=source, autoscaling=autoscaling)

    def replicas(count: int) -> dict[str, Any] | None:
        st = status(cluster, namespace, "auto")
        ok = st.get("desiredReplicas") == count and st.get("readyReplicas") == count
        return st if ok and len(st.get("replicaPlans") or []) == count - 1 else None

    wait_for("one replica serving", lambda: replicas(1), timeout=120)
    # Three requests held, two at one gateway and one at the other: a load of 3
    # over one busy slot per replica wants 3 (maxReplicas allows 2), which only
    # their sum shows.
    first_gateway, second_gateway = (
        HeldRequests(gateways[0], "auto"),
        HeldRequests(gateways[1], "auto"),
    )
    first_gateway.send(2)
    second_gateway.send(1)
    key = f"{namespace}/auto"
    wait_for(
        "two and one requests waiting at the two gateways",
        lambda: (
            (demand_of(gateways[0], key).get("waiting"), demand_of(gateways[1], key).get("waiting"))
            == (2, 1)
        ),
        timeout=30,
    )
    st = wait_for("two replicas serving", lambda: replicas(2), timeout=120)
    first, second = st["plan"], st["replicaPlans"][0]
    assert not set(first["rpc"]) & set(second["rpc"]), "each replica on nodes of its own"
    assert "deployment.apps/auto-host-r1" in workloads(cluster, namespace, "auto")
    scaled = [m for r, m in events(cluster, namespace, "auto") if r == "ScaledUp"]
    assert scaled and scaled[0].endswith("1 -> 2 replicas"), scaled
    # The requests time out at the gateway; with no load for 5 s, one replica goes.
    answers = first_gateway.wait() + second_gateway.wait()
    assert [code for code, _, _ in answers] == [503, 503, 503], answers
    st = wait_for("back to one replica", lambda: replicas(1), timeout=90)
    assert "deployment.apps/auto-host-r1" not in workloads(cluster, namespace, "auto")
    down = [m for r, m in events(cluster, namespace, "auto") if r == "ScaledDown"]
    assert len(down) == 1 and down[0].endswith("2 -> 1 replicas"), down
