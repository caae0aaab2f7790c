"""The pure parts of `mesh status` and `mesh doctor`: the report and its documented
schema, the table, each check's findings one row per case, the probe pod, and the
CLI's names and exit status for bad usage. (The same run for real against the API
server in tests/integration/test_status_doctor.py.)"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import pytest

from mesh_operator.api.contract import VERSION_ANNOTATION
from mesh_operator.cli.doctor_cmd import render
from mesh_operator.cli.main import main, program_name
from mesh_operator.diagnosis import (
    CRD_NAMES,
    Checkup,
    Finding,
    OperatorLease,
    _shortfall,
    build_findings,
    check_agents,
    check_crds,
    check_models,
    check_operator,
    check_policies,
    only_pool,
)
from mesh_operator.fleet import (
    Fleet,
    StatusReport,
    build_status_report,
    build_status_table,
    status_schema,
)
from mesh_operator.planner import plan_placement, read_model_profile
from mesh_operator.policy_probe import PROBE_COMPONENT, build_probe_pod
from tests.unit.planner.builders import device, inventory, node
from tests.unit.planner.llama_log import MODEL_HEADERS

pytestmark = pytest.mark.unit

DOCS = Path(__file__).resolve().parents[2] / "docs" / "status.md"
NOW = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)


def ago(seconds: float) -> str:
    return (NOW - dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def cond(type_: str, status: str, reason: str, message: str = "") -> dict[str, str]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


def pool(name: str = "gpu", backend: str = "cuda", **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {"backend": backend, "nodeSelector": {"pool": name}},
        "status": {"conditions": [cond("Ready", "True", "NodesReady")], **status},
    }


def meshnode(name: str, devices: list[dict[str, Any]], age: float = 5, interval: int = 10) -> Any:
    return {
        "metadata": {"name": name},
        "status": {
            "heartbeatTime": ago(age),
            "intervalSeconds": interval,
            "health": {"state": "Healthy", "reason": "AsExpected", "message": ""},
            "devices": devices,
        },
    }


def gpu(mib: int = 8192, free: int = 8000) -> dict[str, Any]:
    return {"id": "CUDA0", "index": 0, "backend": "cuda", "name": "Test GPU",
            "memoryTotalMiB": mib, "memoryFreeMiB": free}  # fmt: skip


def model(name: str, ready: dict[str, str] | None, plan: Any = None, **status: Any) -> Any:
    conditions = [ready] if ready else []
    return {
        "metadata": {"namespace": "ai", "name": name},
        "spec": {"poolRef": "gpu", "source": {"url": "http://x/m.gguf"}},
        "status": {"conditions": conditions, **({"plan": plan} if plan else {}), **status},
    }


PLAN = {
    "devices": [
        {"node": "a", "device": "CUDA0", "layers": [0, 10], "weightsMiB": 100, "kvMiB": 10,
         "computeMiB": 20, "totalMiB": 130},
        {"node": "b", "device": "CUDA0", "layers": [10, 19], "weightsMiB": 90, "kvMiB": 9,
         "computeMiB": 20, "totalMiB": 119},
    ],
    "tensorSplit": [10, 9], "rpc": ["a", "b"], "hostNode": "a", "predictedTokenMicros": 1234,
}  # fmt: skip
FLEET = Fleet(
    pools=[pool(readyNodes=2, devices=2, memoryTotalMiB=16384, memoryFreeMiB=15000,
                memoryClaimedMiB=249)],
    models=[model("gemma", cond("Ready", "True", "Serving"), PLAN, nodes="a,b", split="10,9")],
    meshnodes=[meshnode("a", [gpu()]), meshnode("b", [gpu()]), meshnode("lonely", [])],
    nodes={"a": {"pool": "gpu"}, "b": {"pool": "gpu"}, "c": {"pool": "gpu"}, "lonely": {}},
)  # fmt: skip


# -- mesh status ---------------------------------------------------------------------


def documented_schema() -> Any:
    text = DOCS.read_text()
    found = re.search(r"<!-- status-schema -->\n```json\n(.*?)\n```", text, flags=re.DOTALL)
    assert found, "docs/status.md has no ```json block after <!-- status-schema -->"
    return json.loads(found.group(1))


def test_the_documented_schema_is_the_one_the_report_follows() -> None:
    assert documented_schema() == status_schema()


def test_the_report_carries_plans_nodes_and_replicas() -> None:
    report = build_status_report(FLEET, NOW)
    again = StatusReport.model_validate_json(report.model_dump_json(by_alias=True))
    assert again == report
    (m,) = report.models
    assert m.plan is not None and m.plan.nodes == ["a", "b"] and m.plan.tensor_split == [10, 9]
    assert m.plan.predicted_ms_per_token == 1.23 and m.memory_claimed_mib == 249
    assert (m.replicas.desired, m.replicas.ready) == (1, 1)
    assert [(n.name, n.agent, n.pools) for n in report.nodes] == [
        ("a", "reporting", ["gpu"]),
        ("b", "reporting", ["gpu"]),
        ("c", "missing", ["gpu"]),
        ("lonely", "reporting", []),
    ]
    assert report.pools[0].nodes == ["a", "b", "c"]
    wire = json.loads(report.model_dump_json(by_alias=True))
    assert wire["schemaVersion"] == 1 and wire["time"] == "2026-01-01T12:00:00Z"
    assert wire["models"][0]["plan"]["predictedMsPerToken"] == 1.23


def test_replicas_ready_and_desired_and_every_replicas_claim() -> None:
    first_device: dict[str, Any] = PLAN["devices"][0]  # type: ignore[index]
    second = {**PLAN, "devices": [{**first_device, "node": "c"}]}
    body = model("gemma", cond("Ready", "True", "Serving"), PLAN, replicaPlans=[second])
    body["spec"]["replicas"] = 3
    body["status"]["readyReplicas"] = 2
    report = build_status_report(dataclasses.replace(FLEET, models=[body]), NOW)
    (m,) = report.models
    assert (m.replicas.desired, m.replicas.ready) == (3, 2)
    assert m.memory_claimed_mib == 249 + 130
    assert "2/3" in build_status_table(report)


def test_the_table_has_one_line_per_device_and_model() -> None:
    table = build_status_table(build_status_report(FLEET, NOW))
    assert re.search(r"^ai/gemma +gpu +True +a,b +10,9 +a +1\.2 +1/1 +249$", table, re.M), table
    assert re.search(r"^c +gpu +Unknown +missing +-$", table, re.M), table
    assert re.search(r"^a +gpu +Healthy +5s +CUDA0 Test GPU +8000/8192 +0$", table, re.M), table


def test_a_model_not_ready_says_why_under_the_table() -> None:
    m = model("big", cond("Ready", "False", "NoCapacity", "needs 9.0 GiB"))
    table = build_status_table(build_status_report(Fleet(models=[m]), NOW))
    assert "ai/big  gpu   False NoCapacity  -      -" in table
    assert "\nai/big: needs 9.0 GiB\n\nusage unavailable: the gateways were not read" in table


# -- mesh doctor: one check at a time -----------------------------------------------


def lease(version: str | None = "0.1.0", renewed: float = 1, holder: str = "op-1") -> Any:
    return OperatorLease("mesh-system", "mesh-operator", holder,
                         NOW - dt.timedelta(seconds=renewed), 8, version)  # fmt: skip


def crd(name: str, version: str | None = "0.1.0", established: bool = True) -> Any:
    annotations = {VERSION_ANNOTATION: version} if version else {}
    return {
        "metadata": {"name": name, "annotations": annotations},
        "status": {"conditions": [cond("Established", str(established), "InitialNamesAccepted")]},
    }


@pytest.mark.parametrize(
    ("leases", "level", "says"),
    [
        ([lease()], "ok", "held by op-1, mesh 0.1.0"),
        ([lease(renewed=60)], "fail", "no operator replica holds it (last renewed"),
        ([lease(holder="")], "fail", "no operator replica holds it"),
        ([], "warn", "no operator Lease found"),
    ],
)
def test_the_operator_check(leases: list[OperatorLease], level: str, says: str) -> None:
    (f,) = check_operator(leases, NOW)
    assert f.level == level and says in f.problem


@pytest.mark.parametrize(
    ("installed", "leases", "level", "says"),
    [
        (crd("x"), [lease()], "ok", "mesh 0.1.0"),
        (crd("x", "0.0.9"), [lease()], "fail",
         "installed from mesh 0.0.9, but the running operator is mesh 0.1.0"),
        (crd("x", None), [lease()], "fail", "from a mesh without the mesh.dev/version stamp"),
        (crd("x", "0.0.9"), [], "ok", "mesh 0.0.9"),  # no operator: nothing to compare
        (crd("x", established=False), [lease()], "fail", "not Established"),
        (None, [lease()], "fail", "not installed"),
    ],
)  # fmt: skip
def test_the_crd_check(installed: Any, leases: list[OperatorLease], level: str, says: str) -> None:
    findings = check_crds(dict.fromkeys(CRD_NAMES, installed), leases, NOW)
    assert len(findings) == 3
    assert {(f.level, f.problem) for f in findings} == {(level, findings[0].problem)}
    assert says in findings[0].problem


@pytest.mark.parametrize(
    ("meshnodes", "level", "check", "says"),
    [
        ([meshnode("a", [gpu()])], "ok", "agents", "agent reporting, 1 device(s), 8000 MiB free"),
        ([], "fail", "agents", "no agent has reported (no MeshNode a)"),
        ([meshnode("a", [gpu()], age=95)], "fail", "agents",
         "heartbeat is stale (last 95 s ago, every 10 s expected)"),
        ([meshnode("a", [])], "fail", "devices", "reports no device at all"),
        ([meshnode("a", [{**gpu(), "id": "CPU", "backend": "cpu"}])], "warn", "devices",
         "no cuda device, the pool's backend: it reports CPU (cpu)"),
    ],
)  # fmt: skip
def test_the_agent_check(meshnodes: list[Any], level: str, check: str, says: str) -> None:
    fleet = Fleet(pools=[pool()], meshnodes=meshnodes, nodes={"a": {"pool": "gpu"}})
    (f,) = check_agents(fleet, NOW)
    assert (f.level, f.check, f.subject) == (level, check, "node a (pool gpu)")
    assert says in f.problem
    assert level == "ok" or f.fix


def test_a_pool_that_selects_no_node() -> None:
    (f,) = check_agents(Fleet(pools=[pool()], nodes={"x": {}}), NOW)
    assert f.level == "fail" and f.problem == "no node matches its nodeSelector {'pool': 'gpu'}"


MISMATCH = {"llamaServer": "img:new", "rpcServers": ["img:old"], "nodes": ["b"],
            "workerVersion": "4.0.0", "generation": 1, "poolGeneration": 1}  # fmt: skip
NO_ROOM = "needs 0.3 GiB; pool has 0.1 GiB free after the 10% reserve in 1 device (largest 0.1 GiB)"


@pytest.mark.parametrize(
    ("m", "level", "says", "fix"),
    [
        (model("m", cond("Ready", "True", "Serving"), PLAN, nodes="a,b"), "ok",
         "serving on a,b, 1.2 ms/token predicted", ""),
        (model("m", None), "fail", "no conditions: the operator has not reconciled it",
         "is the operator running?"),
        (model("m", cond("Ready", "False", "RpcVersionMismatch", "..."), PLAN,
               versionMismatch=MISMATCH), "fail",
         "host image img:new and worker image(s) img:old on b are different llama.cpp builds "
         "(the worker speaks RPC protocol 4.0.0)", "spec.images.rpcServer and llamaServer"),
        (model("m", cond("Ready", "False", "NoCapacity", NO_ROOM)), "fail",
         f"no capacity in pool gpu: {NO_ROOM}; short by 0.2 GiB; held by ai/gemma 249 MiB "
         "(a/CUDA0 130, b/CUDA0 119)", "add nodes to pool gpu"),
        (model("m", cond("Ready", "False", "SourceNotFound", "http://x/m.gguf answered 404")),
         "fail", "its source cannot be read (SourceNotFound): http://x/m.gguf answered 404",
         "check spec.source"),
        (model("m", cond("Ready", "False", "SourceUnreadable", "no such file")), "fail",
         "its source cannot be read (SourceUnreadable)", "kubectl -n ai logs m-header"),
        (model("m", cond("Ready", "False", "PoolNotFound", "")), "fail",
         "its pool gpu does not exist", "create MeshPool gpu"),
        (model("m", cond("Ready", "False", "WaitingForWorkers", "soon")), "warn",
         "WaitingForWorkers: soon", ""),
        (model("m", cond("Ready", "False", "ScaledToZero", "idle since 12:00; the next request "
                         "starts it again"), scaledToZeroTime="2026-12-01T12:00:00Z"), "ok",
         "scaled to zero: idle since 12:00; the next request starts it again", ""),
        (model("m", cond("Ready", "False", "SecretNotFound", "Secret hf missing")), "fail",
         "SecretNotFound: Secret hf missing", "kubectl -n ai describe meshmodel m"),
    ],
)  # fmt: skip
def test_the_model_check(m: Any, level: str, says: str, fix: str) -> None:
    holder = model("gemma", cond("Ready", "True", "Serving"), PLAN, nodes="a,b")
    findings = check_models(Fleet(pools=[pool()], models=[m, holder]))
    f = findings[0]
    assert (f.level, f.check, f.subject) == (level, "models", "model ai/m")
    assert says in f.problem, f.problem
    assert fix in f.fix


def test_the_shortfall_reads_the_planners_own_sentence() -> None:
    llama8b = read_model_profile(MODEL_HEADERS / "llama-3.1-8b.header.gguf")
    gib = 1024
    result = plan_placement(
        llama8b, inventory(node("a", device(total=2 * gib)), node("b", device(total=1 * gib)))
    )
    assert not result.feasible
    need = float(re.search(r"needs (\d+\.\d) GiB", result.reason).group(1))  # type: ignore[union-attr]
    assert _shortfall(result.reason) == f"short by {need - 2.7:.1f} GiB"
    assert _shortfall("needs 2.0 GiB; the pool has no healthy device with free memory") == (
        "short by 2.0 GiB"
    )
    assert _shortfall("needs 1.0 GiB; pool has 3.0 GiB free after ...").startswith(
        "enough memory in total"
    )
    assert _shortfall("PoolNotFound") == ""


def policy(*ingress: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "m-mesh"},
            "spec": {"policyTypes": ["Ingress"], "ingress": list(ingress)}}  # fmt: skip


HOST_ONLY = {"from": [{"podSelector": {"matchLabels": {"c": "host"}}}],
             "ports": [{"protocol": "TCP", "port": 50052}]}  # fmt: skip


@pytest.mark.parametrize(
    ("found", "level", "says"),
    [
        (policy(HOST_ONLY), "ok", "admits RPC port 50052 only from its host"),
        (None, "fail", "its NetworkPolicy is missing"),
        (policy(HOST_ONLY, {"ports": [{"port": 50052}]}), "fail",
         "a rule for RPC port 50052 admits every source (no `from`)"),
        (policy(HOST_ONLY, {"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}), "fail",
         "admits the address block 0.0.0.0/0"),
        (policy({"from": [{"namespaceSelector": {}}], "ports": [{"port": 50052}]}), "fail",
         "admits every pod of every namespace"),
        (policy(HOST_ONLY, {"from": [], "ports": [{"port": 8080}]}), "ok", "only from"),
        ({**policy(HOST_ONLY), "spec": {"policyTypes": ["Egress"]}}, "fail",
         "it does not restrict ingress"),
    ],
)  # fmt: skip
def test_the_policy_check(found: Any, level: str, says: str) -> None:
    (f,) = check_policies(Fleet(pools=[pool()], models=[model("m", None, PLAN)]),
                          {("ai", "m"): found})  # fmt: skip
    assert (f.level, f.check) == (level, "network-policy") and says in f.problem


def test_checks_stop_at_missing_crds_and_narrow_to_a_pool() -> None:
    missing = Checkup(crds=dict.fromkeys(CRD_NAMES), leases=[lease()], fleet=FLEET)
    assert {f.check for f in build_findings(missing, NOW)} == {"operator", "crds"}
    whole = Checkup(crds={n: crd(n) for n in CRD_NAMES}, leases=[lease()], fleet=FLEET)
    other = Fleet(pools=[pool("cpu")], models=[{**model("x", None), "spec": {"poolRef": "cpu"}}])
    both = Checkup(crds=whole.crds, leases=whole.leases, fleet=Fleet(
        pools=FLEET.pools + other.pools, models=FLEET.models + other.models,
        meshnodes=FLEET.meshnodes, nodes=FLEET.nodes))  # fmt: skip
    narrowed = build_findings(only_pool(both, "gpu"), NOW)
    assert "model ai/x" not in {f.subject for f in narrowed}
    assert "model ai/gemma" in {f.subject for f in narrowed}


def test_the_text_says_what_to_do_under_each_problem() -> None:
    text = render([Finding("ok", "crds", "CRD x", "fine", "never shown"),
                   Finding("fail", "agents", "node a", "broken", "fix it"),
                   Finding("warn", "devices", "node b", "odd")])  # fmt: skip
    assert text.splitlines() == [
        "ok    crds     CRD x: fine",
        "FAIL  agents   node a: broken",
        "               -> fix it",
        "warn  devices  node b: odd",
        "1 problem, 1 warning",
    ]


# -- the probe pod, the CLI ------------------------------------------------------------


def test_the_probe_pod_is_restricted_and_carries_no_host_labels() -> None:
    pod = build_probe_pod(namespace="ai", name="m-probe-1", model="m", image="img",
                          targets=["10.0.0.5:50052"])  # fmt: skip
    labels = pod["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == PROBE_COMPONENT
    (c,) = pod["spec"]["containers"]
    assert c["command"][:2] == ["python", "-c"] and c["command"][-1] == "10.0.0.5:50052"
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["restartPolicy"] == "Never"


def test_the_plugin_is_named_kubectl_mesh() -> None:
    assert program_name("/usr/local/bin/kubectl-mesh") == "kubectl mesh"
    assert program_name("/usr/bin/mesh") == "mesh"


@pytest.mark.parametrize(
    "argv", [["status", "--output", "yaml"], ["doctor", "--probe-timeout", "0"]]
)
def test_bad_usage_is_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err


def test_no_capacity_says_when_the_pool_itself_is_not_ready_or_exclusive() -> None:
    starved = model("m", cond("Ready", "False", "NoCapacity", NO_ROOM))
    holder = model("gemma", cond("Ready", "True", "Serving"), PLAN, nodes="a,b")
    down = {**pool(), "status": {"conditions": [cond("Ready", "False", "NoUsableNodes")]}}
    (f, _) = check_models(Fleet(pools=[down], models=[starved, holder]))
    assert "short by 0.2 GiB (pool gpu is not Ready: NoUsableNodes)" in f.problem
    assert "(an exclusive pool: a device a model holds is not offered to another)" in f.problem
    shared = {**pool(), "spec": {**pool()["spec"], "sharing": "shared"}}
    (f, _) = check_models(Fleet(pools=[shared], models=[starved, holder]))
    assert "exclusive" not in f.problem and "not Ready" not in f.problem
