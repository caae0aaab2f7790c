"""The operator's use of the planner: command lines of a plan for a MeshModel."""

from __future__ import annotations

from typing import Any

import pytest

from mesh_operator import planning
from mesh_operator.api.contract import HOST_PORT, HOST_PORT_NAME
from mesh_operator.api.meshmodel import MeshModelSpec, Plan
from mesh_operator.api.meshpool import MeshPoolSpec
from mesh_operator.manifests.workloads import build_host_deployment
from mesh_operator.planner import PlacementRequest, ServingParams, parse_inventory, plan_placement
from mesh_operator.planner.speculation import MEASURED_NGRAM, NgramSpeculation, tokens_per_step
from tests.unit.planner.builders import device, inventory, node, synthetic_profile
from tests.unit.test_manifests import workload

pytestmark = pytest.mark.unit

PLAN = Plan.model_validate(
    {
        "devices": [
            {"node": "b", "device": "CUDA1", "layers": [0, 10], "weightsMiB": 1,
             "kvMiB": 1, "computeMiB": 1, "totalMiB": 3},
            {"node": "a", "device": "CUDA0", "layers": [10, 19], "weightsMiB": 1,
             "kvMiB": 1, "computeMiB": 1, "totalMiB": 3},
        ],
        "tensorSplit": [10, 9],
        "rpc": ["b", "a"],
        "hostNode": "a",
    }
)  # fmt: skip


def spec(**extra: Any) -> MeshModelSpec:
    return MeshModelSpec.model_validate(
        {"source": {"url": "https://m.example/big.gguf"}, "poolRef": "p", **extra}
    )


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_host_arguments_carry_workers_in_plan_order() -> None:
    args = planning.llama_args(PLAN, spec(), "big", ["10.0.0.2:50052", "10.0.0.1:50052"])
    assert flag(args, "--rpc") == "10.0.0.2:50052,10.0.0.1:50052"
    assert flag(args, "-ts") == "10,9"
    assert flag(args, "-fit") == "off"
    assert flag(args, "--host") == "$(POD_IP)"
    assert flag(args, "-m") == planning.model_path(spec())
    assert "--metrics" in args


def test_embeddings_model_gets_a_pooling() -> None:
    args = planning.llama_args(PLAN, spec(embeddings=True), "big", None)
    assert "--embeddings" in args and flag(args, "--pooling") == "mean"
    own = planning.llama_args(
        PLAN, spec(embeddings=True, extraArgs=["--pooling", "cls"]), "big", None
    )
    assert own.count("--pooling") == 1 and flag(own, "--pooling") == "cls"


def test_draft_model_is_fetched_and_loaded() -> None:
    s = spec(draft={"source": {"url": "https://m.example/small.gguf"}, "maxTokens": 8})
    args = planning.llama_args(PLAN, s, "big", None)
    assert flag(args, "-md").endswith("/small.gguf")
    assert flag(args, "--spec-draft-n-max") == "8"
    fetch = planning.draft_fetch_args(s)
    assert fetch[fetch.index("--dest") + 1] == flag(args, "-md")
    w = workload(spec=s.to_wire())
    w = type(w)(**{**w.__dict__, "draft_fetch_args": fetch})
    init = build_host_deployment(w)["spec"]["template"]["spec"]["initContainers"]
    assert [c["name"] for c in init] == ["cache-owner", "fetch", "fetch-draft"]


def test_a_draft_model_drafts() -> None:
    # llama-server loads a -md model but drafts with it only under --spec-type draft-simple.
    s = spec(draft={"source": {"url": "https://m.example/small.gguf"}})
    assert flag(planning.llama_args(PLAN, s, "big", None), "--spec-type") == "draft-simple"


@pytest.mark.parametrize(
    ("speculative", "draft", "expected"),
    [
        (
            {"type": "ngram-mod", "nMatch": 12, "nMax": 24},
            False,
            [
                "--spec-type",
                "ngram-mod",
                "--spec-ngram-mod-n-match",
                "12",
                "--spec-ngram-mod-n-max",
                "24",
            ],
        ),
        (
            {"type": "ngram-map-k4v", "minHits": 2},
            True,
            ["--spec-type", "ngram-map-k4v,draft-simple", "--spec-ngram-map-k4v-min-hits", "2"],
        ),
        ({"type": "ngram-simple"}, False, ["--spec-type", "ngram-simple", "--no-jinja"]),
    ],
    ids=["ngram-mod", "ngram-and-draft", "llama-defaults"],
)
def test_ngram_speculation_from_the_spec(
    speculative: dict[str, Any], draft: bool, expected: list[str]
) -> None:
    extra: dict[str, Any] = {"speculative": speculative, "chatTemplate": "chatml"}
    if draft:
        extra["draft"] = {"source": {"url": "https://m.example/small.gguf"}}
    args = planning.llama_args(PLAN, spec(**extra), "big", None)
    start = args.index("--spec-type")
    assert args[start : start + len(expected)] == expected


def test_draft_on_a_pvc_needs_the_models_pvc() -> None:
    pvc = {"pvc": {"claimName": "models", "path": "small.gguf"}}
    assert planning.draft_problem(spec(draft={"source": pvc})) is not None
    same = spec(source={"pvc": {"claimName": "models", "path": "big.gguf"}}, draft={"source": pvc})
    assert planning.draft_problem(same) is None
    assert planning.draft_fetch_args(same) == []


@pytest.mark.parametrize(
    ("pool", "devices"),
    [
        ({"backend": "cuda", "sharing": "exclusive"}, {"b": "CUDA0", "a": "CUDA0"}),
        ({"backend": "cuda", "sharing": "shared"}, {"b": "CUDA1", "a": "CUDA0"}),
    ],
)
def test_rpc_servers_expose_the_planned_devices(
    pool: dict[str, Any], devices: dict[str, str]
) -> None:
    # The device plugin renumbers an exclusive pod's GPUs from 0.
    args = planning.rpc_args(PLAN, MeshPoolSpec.model_validate(pool))
    assert {node: flag(a, "-d") for node, a in args.items()} == devices
    assert all(flag(a, "-H") == "$(POD_IP)" for a in args.values())


MIXED = Plan.model_validate(
    {
        "devices": [
            {"node": "gpu", "device": "CUDA1", "layers": [0, 6], "weightsMiB": 1,
             "kvMiB": 1, "computeMiB": 1, "totalMiB": 3},
            {"node": "gpu", "device": "CUDA3", "layers": [6, 12], "weightsMiB": 1,
             "kvMiB": 1, "computeMiB": 1, "totalMiB": 3},
            {"node": "cpu", "device": "CPU", "layers": [12, 19], "weightsMiB": 1,
             "kvMiB": 1, "computeMiB": 1, "totalMiB": 3},
        ],
        "tensorSplit": [6, 6, 7],
        "rpc": ["gpu", "cpu"],
        "hostNode": "cpu",
    }
)  # fmt: skip


def test_per_node_facts_of_a_mixed_plan() -> None:
    assert planning.image_variants(MIXED) == {"gpu": "cuda", "cpu": "cpu"}
    assert planning.gpus_per_node(MIXED) == {"gpu": 2, "cpu": 0}


@pytest.mark.parametrize(
    ("sharing", "devices"),
    [
        ("exclusive", {"gpu": "CUDA0,CUDA1", "cpu": "CPU"}),
        ("shared", {"gpu": "CUDA1,CUDA3", "cpu": "CPU"}),
    ],
)
def test_a_cpu_node_of_a_cuda_pool_serves_its_cpu(sharing: str, devices: dict[str, str]) -> None:
    pool = MeshPoolSpec.model_validate({"backend": "cuda", "sharing": sharing})
    args = planning.rpc_args(MIXED, pool)
    assert {node: flag(a, "-d") for node, a in args.items()} == devices


def test_the_host_listens_where_its_service_and_probes_point() -> None:
    args = planning.llama_args(PLAN, spec(), "big", None)
    assert flag(args, "--port") == str(HOST_PORT)
    w = workload()
    w = type(w)(**{**w.__dict__, "llama_args": args})
    ports = build_host_deployment(w)["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert ports == [{"name": HOST_PORT_NAME, "containerPort": HOST_PORT, "protocol": "TCP"}]


def test_the_operator_s_flags_are_those_its_builders_set() -> None:
    flags = planning.operator_llama_flags()
    for emitted in ("-ub", "-b", "-t", "--spec-draft-n-max", "-ngld", "--rpc", "-ts", "--alias"):
        assert emitted in flags
    for emitted in ("--spec-type", "--spec-ngram-mod-n-match", "--spec-ngram-map-k4v-min-hits"):
        assert emitted in flags
    assert "--pooling" not in flags


def test_the_time_model_counts_ngram_speculation() -> None:
    profile = synthetic_profile(n_layer=8, layer_mib=10, output_mib=10)
    pool_nodes = inventory(node("a", device("CUDA0", total=4000)))
    pool = MeshPoolSpec.model_validate({"backend": "cuda"})
    s = spec(speculative={"type": "ngram-map-k", "sizeM": 8, "acceptancePercent": 50})
    request = planning.placement_request(s, pool, profile)
    without = planning.plan(profile, pool_nodes, request, None, pool)
    speculation = planning.ngram_speculation(s)
    assert speculation == NgramSpeculation(0.5, 8, MEASURED_NGRAM.share)
    with_it = planning.plan(profile, pool_nodes, request, None, pool, speculation=speculation)
    assert (with_it.devices, with_it.tensor_split) == (without.devices, without.tensor_split)
    step = tokens_per_step(0.5, 8, MEASURED_NGRAM.share)
    assert with_it.predicted_token_ms == pytest.approx(without.predicted_token_ms / step)


def test_undeclared_speculation_takes_the_measured_acceptance_and_llama_s_draft() -> None:
    assert planning.ngram_speculation(spec()) is None
    mod = planning.ngram_speculation(spec(speculative={"type": "ngram-mod"}))
    assert mod == NgramSpeculation(MEASURED_NGRAM.acceptance, 64, MEASURED_NGRAM.share)


CPU_NODE = {"name": "a", "devices": [{"id": "CPU", "backend": "cpu", "memoryTotalMiB": 4000,
                                      "memoryFreeMiB": 3000}]}  # fmt: skip
GPU_NODE = {"name": "a", "hostMemoryFreeMiB": 1000, "devices": [
    {"id": "CUDA0", "memoryTotalMiB": 8000, "memoryFreeMiB": 8000}]}  # fmt: skip


def _drafted(device: str, device_mib: int, draft_mib: int) -> Plan:
    plan = Plan.model_validate(
        {
            "devices": [{"node": "a", "device": device, "layers": [0, 19], "weightsMiB": 0,
                         "kvMiB": 0, "computeMiB": 0, "totalMiB": device_mib}],
            "tensorSplit": [19], "rpc": ["a"], "hostNode": "a",
            "draft": {"node": "a", "weightsMiB": 0, "kvMiB": 0, "computeMiB": 0,
                      "memoryMiB": draft_mib},
        }
    )  # fmt: skip
    return plan


@pytest.mark.parametrize(
    ("node", "device", "device_mib", "draft_mib", "problem"),
    [
        # 3000 free less a 10% reserve of 4000 is 2600, less the 2000 of layers: 600.
        (CPU_NODE, "CPU", 2000, 600, None),
        (CPU_NODE, "CPU", 2000, 601, "its CPU device has 600 MiB free"),
        # A GPU node's draft takes its RAM, not its GPU.
        (GPU_NODE, "CUDA0", 7000, 1000, None),
        (GPU_NODE, "CUDA0", 7000, 1001, "its RAM (hostMemoryFreeMiB) has 1000 MiB free"),
    ],
)
def test_the_draft_must_fit_on_the_host_s_node(
    node: dict[str, Any], device: str, device_mib: int, draft_mib: int, problem: str | None
) -> None:
    pool_nodes = parse_inventory({"nodes": [node]})
    found = planning.draft_room_problem(_drafted(device, device_mib, draft_mib), pool_nodes, 10.0)
    if problem is None:
        assert found is None
    else:
        assert found is not None and found.endswith(problem), found
        assert found.startswith(f"the draft model needs {draft_mib} MiB on the host's node a")


def test_a_host_moved_for_its_draft_keeps_the_speculations_time() -> None:
    """with_draft moves the host to the node with room, keeps the devices and counts
    the time per token as `plan` does, n-gram speculation included."""
    model = synthetic_profile(layer_mib=400.0)
    draft = synthetic_profile(layer_mib=50.0)
    request = PlacementRequest(serving=ServingParams(ctx=4096))
    alone = inventory(node("a", device(total=8192)), node("b", device(total=8192)))
    first = plan_placement(model, alone, request)
    assert first.feasible and len(first.rpc) == 2 and first.host_node is not None
    other = next(n for n in first.rpc if n != first.host_node)
    roomy = inventory(
        *(node(n, device(total=8192)) | {"hostMemoryFreeMiB": 4096 if n == other else 0}
          for n in ("a", "b"))
    )  # fmt: skip
    speculation = NgramSpeculation(0.5, 8, MEASURED_NGRAM.share)
    plain, _, _ = planning.with_draft(first, model, draft, roomy, request)
    moved, planned, problem = planning.with_draft(
        first, model, draft, roomy, request, speculation=speculation
    )
    assert problem is None and planned is not None and planned.node == other
    assert moved.host_node == other and moved.layout() == first.layout()
    assert plain.host_node == other
    assert moved.predicted_token_ms == pytest.approx(speculation.token_ms(plain.predicted_token_ms))
    assert moved.predicted_token_ms < plain.predicted_token_ms
    # Nowhere with room: the plan as it was, and why.
    kept, _, why = planning.with_draft(first, model, draft, alone, request)
    assert kept is first and why is not None and why.startswith("the draft model needs ")
