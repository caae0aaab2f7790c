"""What the real-node tests of a served model read: the gateway's address, a
model's plans, a host's token count and one chat completion from a client pod.

Test infrastructure, shared by the real-node tests of replicas, scale to zero
and autoscaling on the session's installation (`e2e.realcluster`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from e2e.realcluster import MODELS, OUTSIDE, RealCluster, log, mesh_image, restricted_pod
from e2e.scenario import NAMESPACE as RELEASE_NAMESPACE
from e2e.scenario import REPO, SYSTEM_NODE
from e2e.waiting import wait_for
from mesh_operator.api.contract import COMPONENT_LABEL, HOST_COMPONENT, MODEL_LABEL, REPLICA_LABEL
from mesh_operator.api.meshpool import MeshPoolStatus

Obj = dict[str, Any]

# The gateway's hold timeout (e2e/values-e2e.yaml `gateway.holdTimeout`): a held
# request is answered within it or refused.
HOLD_TIMEOUT = float(
    yaml.safe_load((REPO / "e2e" / "values-e2e.yaml").read_text())["gateway"]["holdTimeout"]
)
# A client's own timeout: longer than the hold, so the gateway's answer decides.
CLIENT_TIMEOUT = HOLD_TIMEOUT + 60

# Counts the tokens a host generated: it rises with every completion it answers.
PREDICTED = "llamacpp:tokens_predicted_total"

# One chat completion through the gateway, timed from send to answer; prints one
# JSON line: HTTP status, seconds, the message's content or the error.
CHAT_SCRIPT = """
import json, sys, time, urllib.error, urllib.request
url, model, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
body = {'model': model, 'max_tokens': 8,
        'messages': [{'role': 'user', 'content': 'Say yes.'}]}
request = urllib.request.Request(url + '/v1/chat/completions', json.dumps(body).encode(),
                                 {'Content-Type': 'application/json'})
out = {'status': None, 'content': None, 'error': None}
started = time.monotonic()
try:
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        out['status'] = answer.status
        out['content'] = json.loads(answer.read())['choices'][0]['message']['content']
except urllib.error.HTTPError as exc:
    out['status'] = exc.code
    out['error'] = exc.read().decode(errors='replace')[:400]
except Exception as exc:
    out['error'] = f'{type(exc).__name__}: {exc}'
out['seconds'] = time.monotonic() - started
print(json.dumps(out), flush=True)
"""

# Chat completions through the gateway until the pod is deleted, one line per
# answer: `ok <thread> <unix time sent> <seconds>` or the same with `fail` and
# the error. Each thread sends one request after the other.
LOOP_SCRIPT = """
import json, sys, threading, time, urllib.request
url, model, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
lock = threading.Lock()
def loop(thread):
    while True:
        started = time.time()
        body = {'model': model, 'max_tokens': 4,
                'messages': [{'role': 'user', 'content': 'Say yes.'}]}
        request = urllib.request.Request(url, json.dumps(body).encode(),
                                         {'Content-Type': 'application/json'})
        try:
            with urllib.request.urlopen(request, timeout=300) as answer:
                json.loads(answer.read())['choices'][0]['message']['content']
            line = f'ok {thread} {started:.3f} {time.time() - started:.3f}'
        except Exception as exc:
            took = time.time() - started
            line = f'fail {thread} {started:.3f} {took:.3f} {type(exc).__name__}: {exc}'
        with lock:
            print(line, flush=True)
        time.sleep(0.2)
for thread in range(threads):
    threading.Thread(target=loop, args=(thread,), daemon=True).start()
while True:
    time.sleep(60)
"""

# One URL's body, fetched from inside the gateway pod: the models' NetworkPolicies
# admit the gateway to the hosts' port.
FETCH_SCRIPT = """
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=10) as answer:
    print(answer.read().decode())
"""


def gateway_base(mesh: RealCluster) -> str:
    """The gateway by its Service's cluster DNS name."""
    selector = "app.kubernetes.io/component=gateway"
    (service,) = mesh.get("services", "-n", RELEASE_NAMESPACE, "-l", selector)["items"]
    port = service["spec"]["ports"][0]["port"]
    name = service["metadata"]["name"]
    return f"http://{name}.{RELEASE_NAMESPACE}.svc.cluster.local:{port}"


def plans(status: Obj) -> dict[int, Obj]:
    """A model's plans by replica: status.plan and status.replicaPlans."""
    found = [p for p in [status.get("plan"), *(status.get("replicaPlans") or [])] if p]
    return {int(p.get("replica", 0)): p for p in found}


def plan_nodes(plan: Obj) -> set[str]:
    return {d["node"] for d in plan["devices"]} | {plan["hostNode"]}


def shared_models_serving_off(mesh: RealCluster, nodes: set[str]) -> bool:
    """The session's models Ready, each planned on nodes other than `nodes`."""
    for model in MODELS:
        obj = mesh.ready(model)
        if obj is None or any(nodes & plan_nodes(p) for p in plans(obj["status"]).values()):
            return False
    return True


def shared_nodes(mesh: RealCluster) -> set[str]:
    """The nodes the session's models are planned on."""
    found: set[str] = set()
    for model in MODELS:
        obj = mesh.get("meshmodel", model.name, "-n", model.namespace) or {}
        for plan in plans(obj.get("status") or {}).values():
            found |= plan_nodes(plan)
    return found


def predicted(mesh: RealCluster, host: Obj) -> float:
    """The host's llama-server count of tokens generated, read from inside the
    gateway pod."""
    port = next(
        int(p["containerPort"])
        for c in host["spec"]["containers"]
        for p in c.get("ports") or []
        if p.get("name") == "http"
    )
    gateway = mesh.release_pods("gateway")[0]
    text = mesh.exec(
        gateway,
        "gateway",
        "python3",
        "-c",
        FETCH_SCRIPT,
        f"http://{host['status']['podIP']}:{port}/metrics",
    )
    match = re.search(rf"^{re.escape(PREDICTED)}\s+(\S+)$", text, re.MULTILINE)
    assert match, f"no {PREDICTED} in {host['metadata']['name']}'s /metrics: {text[:400]}"
    return float(match.group(1))


def every_host_answers(mesh: RealCluster, hosts: dict[int, Obj]) -> dict[int, float]:
    """Waits until each replica's host (`hosts`, by replica) has generated tokens
    since the call, the client pods' requests reaching it through the gateway;
    returns the counts then."""
    counted = {r: predicted(mesh, h) for r, h in hosts.items()}

    def all_rose() -> dict[int, float] | None:
        now = {r: predicted(mesh, h) for r, h in hosts.items()}
        return now if all(now[r] > counted[r] for r in now) else None

    rose = wait_for("every replica's host to answer through the gateway", all_rose, timeout=180)
    log(f"tokens generated by each replica's host: {counted} -> {rose}")
    return rose


def chat(mesh: RealCluster, name: str, model: str, timeout: float) -> Obj:
    """One chat completion for `model` from a pod `name` in OUTSIDE, through the
    gateway: what its client saw (CHAT_SCRIPT's line)."""
    mesh.start_pod(
        name,
        OUTSIDE,
        {"app": "probe"},
        ["python3", "-c", CHAT_SCRIPT, gateway_base(mesh), model, str(timeout)],
    )
    out = mesh.pod_output(name, OUTSIDE, timeout=timeout + 120)
    answer: Obj = json.loads(out.strip().splitlines()[-1])
    return answer


def pool_status(mesh: RealCluster, pool: str) -> MeshPoolStatus:
    obj = mesh.get("meshpool", pool) or {}
    return MeshPoolStatus.model_validate(obj.get("status") or {})


def delete_model(mesh: RealCluster, namespace: str, model: str, pool: str) -> None:
    """A test's model deleted, its pods gone, then its pool deleted."""
    mesh.kubectl("delete", "meshmodel", model, "-n", namespace, "--ignore-not-found")
    wait_for(
        "the model's pods gone",
        lambda: not mesh.pods(namespace, f"mesh.dev/model={model}"),
        timeout=180,
    )
    mesh.kubectl("delete", "meshpool", pool, "--ignore-not-found")


def model_report(mesh: RealCluster, namespace: str, model: str) -> str:
    """What a wait on the model found when it timed out: its replicas' plans and
    conditions, its pods (node, phase), its last Events in time order, every
    MeshNode's heartbeat and the operator's log lines about it (and its warnings)."""
    obj: Obj = mesh.get("meshmodel", model, "-n", namespace) or {}
    status = obj.get("status") or {}
    replicas = {r: sorted(plan_nodes(p)) for r, p in plans(status).items()}
    conditions = [
        f"{c['type']}={c['status']} {c.get('reason', '')}: {c.get('message', '')}"
        for c in status.get("conditions", [])
    ]
    pods = [
        f"{p['metadata']['name']}@{p['spec'].get('nodeName')} {p['status'].get('phase')}"
        f"{' deleting' if p['metadata'].get('deletionTimestamp') else ''}"
        for p in (mesh.get("pods", "-n", namespace) or {}).get("items", [])
    ]
    events = [
        f"{e.get('reason')}: {e.get('message')}"
        for e in sorted(
            (mesh.get("events", "-n", namespace) or {}).get("items", []),
            key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "",
        )
    ]
    heartbeats = {
        n["metadata"]["name"]: (n.get("status") or {}).get("heartbeatTime")
        for n in (mesh.get("meshnodes") or {}).get("items", [])
    }
    operator_log = mesh.kubectl(
        "logs", "-n", RELEASE_NAMESPACE, "-l", "app.kubernetes.io/component=operator",
        "--tail", "400", check=False,
    )  # fmt: skip
    about = [
        line
        for line in operator_log.splitlines()
        if model in line or (("WARNING" in line or "ERROR" in line) and "attempt #" not in line)
    ]
    return (
        f"readyReplicas={status.get('readyReplicas')} plans={replicas} "
        f"conditions={conditions} pods={pods} events={events[-15:]} "
        f"heartbeats={heartbeats} operator={about[-20:]}"
    )


def host_pods(mesh: RealCluster, namespace: str, model: str, replica: int) -> list[Obj]:
    """The running host pods of one replica of a model."""
    return mesh.running_pods(
        namespace,
        f"{COMPONENT_LABEL}={HOST_COMPONENT},{MODEL_LABEL}={model},{REPLICA_LABEL}={replica}",
    )


@dataclass(frozen=True)
class Answer:
    """One request of a client pod and how it ended."""

    ok: bool
    thread: int
    sent: float  # unix time
    seconds: float
    detail: str  # the error, or what the client noted of the answer

    @property
    def answered(self) -> float:
        return self.sent + self.seconds


@dataclass(frozen=True)
class ChatLoop:
    """A client pod on the system node (never a lost one) that sends chat
    completions for `model` through the gateway's Service, `threads` at a time,
    until it is stopped (LOOP_SCRIPT)."""

    mesh: RealCluster
    name: str
    model: str
    threads: int

    def start(self) -> None:
        pod = restricted_pod(
            self.name,
            OUTSIDE,
            {"app": "probe"},
            [
                "python3", "-c", LOOP_SCRIPT, f"{gateway_base(self.mesh)}/v1/chat/completions",
                self.model, str(self.threads),
            ],
            image=mesh_image(),
        )  # fmt: skip
        pod["spec"]["nodeName"] = SYSTEM_NODE
        self.stop(wait=True)
        self.mesh.apply(pod)

    def stop(self, wait: bool = False) -> None:
        self.mesh.kubectl(
            "delete", "pod", self.name, "-n", OUTSIDE, "--ignore-not-found", f"--wait={wait}",
            check=False,
        )  # fmt: skip

    def answers(self) -> list[Answer]:
        out = self.mesh.kubectl("logs", "-n", OUTSIDE, self.name, check=False)
        found = []
        for line in out.splitlines():
            fields = line.split(" ", 4)
            if fields[0] in ("ok", "fail") and len(fields) >= 4:
                detail = fields[4] if len(fields) > 4 else ""
                ok, thread, sent, seconds = fields[0] == "ok", fields[1], fields[2], fields[3]
                found.append(Answer(ok, int(thread), float(sent), float(seconds), detail))
        return found

    def answered_since(self, since: float) -> list[Answer] | None:
        """The answers once each thread has one to a request sent after `since`
        (unix time): every request a thread sent before then has been answered."""
        answers = self.answers()
        latest = {a.thread: a.sent for a in answers}
        if len(latest) < self.threads or min(latest.values()) < since:
            return None
        return answers

    def all_answered(
        self, answers: list[Answer], start: float, end: float, what: str
    ) -> list[Answer]:
        """Checks that every request was answered and that each thread sent some
        between `start` and `end` (unix times); returns those."""
        failed = [a for a in answers if not a.ok]
        during = [a for a in answers if start <= a.sent < end]
        assert not failed, f"{len(failed)} of {len(answers)} requests failed: {failed[:5]}"
        assert len(during) >= self.threads, f"{len(during)} requests sent during {what}"
        return during


@dataclass(frozen=True)
class Loss:
    """What `lose_node_while_serving` saw."""

    after: Obj  # the model once the replica serves again without the node
    outage: float  # seconds from the loss to then
    during: list[Answer]  # the requests sent meanwhile, every one answered


def lose_node_while_serving(
    mesh: RealCluster,
    client: ChatLoop,
    node: str,
    replica: int,
    *,
    serving: Callable[[], Obj | None],
    explain: Callable[[], str],
    check: Callable[[Obj], None],
) -> Loss:
    """Cuts `node`'s link (`RealNodes.lose`) while `client` sends requests, and
    waits for `replica` to serve again without it (`serving`: the model once every
    replica is ready, else None); `check` then looks at the model while the node
    is still lost. Afterwards the client is stopped and the node given back, and
    every request sent meanwhile must have been answered."""
    lost_at_wall = time.time()
    lost_at = time.monotonic()
    mesh.nodes.lose(node)
    try:

        def replanned() -> Obj | None:
            obj = serving()
            if obj is None or node in plan_nodes(plans(obj["status"])[replica]):
                return None
            return obj

        after = wait_for(
            f"replica {replica} serving again without {node}",
            replanned,
            timeout=600,
            explain=explain,
        )
        outage = time.monotonic() - lost_at
        back_wall = time.time()
        log(f"replica {replica} serving again {outage:.1f} s after {node} was lost")
        check(after)
        answers = wait_for(
            "an answer to every request sent during the loss",
            lambda: client.answered_since(back_wall),
            timeout=360,
        )
    finally:
        client.stop()
        log(f"giving {node} back")
        mesh.nodes.restore(node)
    during = client.all_answered(answers, lost_at_wall, back_wall, "the loss")
    slowest = max(a.seconds for a in during)
    log(f"{len(during)} requests while {node} was lost, none failed, slowest {slowest:.1f} s")
    return Loss(after, outage, during)
