"""Argument lists of llama-server and ggml-rpc-server, grouped by what they build."""

from __future__ import annotations

import pytest

from mesh_operator.api.meshmodel import OWNED_FLAGS
from mesh_operator.planner import (
    DraftSettings,
    NgramSettings,
    PlacementRequest,
    PlacementResult,
    PlannerInputError,
    ServerSettings,
    ServingParams,
    build_llama_server_args,
    build_rpc_server_args,
    build_rpc_server_commands,
    plan_placement,
    to_api_plan,
)
from tests.unit.planner.builders import device, inventory, node, synthetic_profile

pytestmark = pytest.mark.unit

ENDPOINTS = {"a": "10.0.0.1:50052", "b": "10.0.0.2:50052"}


@pytest.fixture(scope="module")
def plan() -> PlacementResult:
    profile = synthetic_profile(n_layer=40, layer_mib=300, output_mib=500)
    pool = inventory(
        node("a", device("CUDA0", total=6000), device("CUDA1", total=6000)),
        node("b", device("CUDA0", total=10000, bw=2000)),
    )
    result = plan_placement(profile, pool, PlacementRequest(serving=ServingParams(ctx=8192)))
    assert result.feasible and result.rpc == ("a", "b")
    return result


def _flag(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_llama_server_gets_the_plan(plan: PlacementResult) -> None:
    args = build_llama_server_args(plan, "/models/m.gguf", ServerSettings(), ENDPOINTS)
    assert _flag(args, "-m") == "/models/m.gguf"
    assert _flag(args, "--rpc") == "10.0.0.1:50052,10.0.0.2:50052"
    assert _flag(args, "-ts") == ",".join(map(str, plan.tensor_split))
    assert _flag(args, "-ngl") == "41"
    assert _flag(args, "-fit") == "off"  # never let llama-server rewrite the split


def test_the_stored_plan_builds_the_same_command(plan: PlacementResult) -> None:
    settings = ServerSettings(aliases=("gemma", "g"))
    assert build_llama_server_args(to_api_plan(plan), "m", settings, ENDPOINTS) == (
        build_llama_server_args(plan, "m", settings, ENDPOINTS)
    )


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (ServerSettings(), ["-c", "4096", "-np", "1", "-ctk", "f16", "-ctv", "f16", "-fa", "auto"]),
        (
            ServerSettings(
                serving=ServingParams(
                    ctx=32768,
                    parallel=4,
                    cache_type_k="q8_0",
                    cache_type_v="q4_0",
                    flash_attention="on",
                )
            ),
            ["-c", "32768", "-np", "4", "-ctk", "q8_0", "-ctv", "q4_0", "-fa", "on"],
        ),
        (ServerSettings(host="$(POD_IP)", port=8080), ["--host", "$(POD_IP)", "--port", "8080"]),
        (ServerSettings(aliases=("a", "b")), ["--alias", "a,b"]),
        (ServerSettings(metrics=True), ["--metrics"]),
        (ServerSettings(api_key_file="/keys/k"), ["--api-key-file", "/keys/k"]),
        (ServerSettings(embeddings=True), ["--embeddings"]),
        (ServerSettings(threads=2), ["-t", "2"]),
        (ServerSettings(serving=ServingParams(ubatch=256)), ["-ub", "256"]),
        (
            ServerSettings(draft=DraftSettings("/models/d.gguf", max_tokens=8, gpu_layers=0)),
            [
                "-md",
                "/models/d.gguf",
                "--spec-draft-n-max",
                "8",
                "-devd",
                "none",
                "-ngld",
                "0",
                "--spec-type",
                "draft-simple",
            ],
        ),
        (
            ServerSettings(ngram=NgramSettings("ngram-mod", n_match=16, n_min=2, n_max=32)),
            [
                "--spec-type",
                "ngram-mod",
                "--spec-ngram-mod-n-match",
                "16",
                "--spec-ngram-mod-n-min",
                "2",
                "--spec-ngram-mod-n-max",
                "32",
            ],
        ),
        (
            ServerSettings(ngram=NgramSettings("ngram-simple", size_n=3, size_m=8, min_hits=2)),
            [
                "--spec-type",
                "ngram-simple",
                "--spec-ngram-simple-size-n",
                "3",
                "--spec-ngram-simple-size-m",
                "8",
                "--spec-ngram-simple-min-hits",
                "2",
            ],
        ),
        (
            ServerSettings(ngram=NgramSettings("ngram-map-k4v"), extra_args=("--jinja",)),
            ["--spec-type", "ngram-map-k4v", "--jinja"],
        ),
        (
            ServerSettings(
                draft=DraftSettings("/models/d.gguf"), ngram=NgramSettings("ngram-map-k", size_n=4)
            ),
            ["--spec-type", "ngram-map-k,draft-simple", "--spec-ngram-map-k-size-n", "4"],
        ),
        (ServerSettings(extra_args=("--jinja",)), ["--jinja"]),
    ],
    ids=[
        "defaults",
        "serving",
        "listen",
        "alias",
        "metrics",
        "api-key",
        "embeddings",
        "threads",
        "ubatch",
        "draft",
        "ngram-mod",
        "ngram-simple",
        "ngram-defaults",
        "ngram-then-draft",
        "extra",
    ],
)
def test_llama_server_settings(
    plan: PlacementResult, settings: ServerSettings, expected: list[str]
) -> None:
    args = build_llama_server_args(plan, "m", settings, ENDPOINTS)
    start = args.index(expected[0])
    assert args[start : start + len(expected)] == expected


def test_no_speculation_without_a_draft_or_an_ngram(plan: PlacementResult) -> None:
    args = build_llama_server_args(plan, "m", ServerSettings(), ENDPOINTS)
    assert not [a for a in args if a.startswith("--spec")]


def test_every_flag_set_is_one_the_operator_owns(plan: PlacementResult) -> None:
    settings = ServerSettings(aliases=("a",), api_key_file="k", draft=DraftSettings("d"))
    args = build_llama_server_args(plan, "m", settings, ENDPOINTS)
    flags = [a for a in args if a.startswith("-") and not a.lstrip("-").isdigit()]
    assert set(flags) - set(OWNED_FLAGS) <= {"--spec-draft-n-max"}


def test_missing_endpoint_is_refused(plan: PlacementResult) -> None:
    with pytest.raises(PlannerInputError, match="no RPC endpoint for node"):
        build_llama_server_args(plan, "m", ServerSettings(), {"a": "x:1"})


def test_infeasible_plan_has_no_command() -> None:
    with pytest.raises(PlannerInputError, match="infeasible"):
        build_llama_server_args(
            PlacementResult(False, "nope", "latency"), "m", ServerSettings(), ENDPOINTS
        )


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, ["-H", "10.1.2.3", "-p", "50052", "-d", "CUDA0,CUDA1", "-c"]),
        ({"cache": False}, ["-H", "10.1.2.3", "-p", "50052", "-d", "CUDA0,CUDA1"]),
        (
            {"port": 6000, "threads": 4},
            ["-H", "10.1.2.3", "-p", "6000", "-d", "CUDA0,CUDA1", "-c", "-t", "4"],
        ),
    ],
)
def test_rpc_server_args(kwargs: dict[str, object], expected: list[str]) -> None:
    assert build_rpc_server_args(["CUDA0", "CUDA1"], host="10.1.2.3", **kwargs) == expected  # type: ignore[arg-type]


def test_rpc_servers_expose_the_planned_devices_in_order(plan: PlacementResult) -> None:
    commands = build_rpc_server_commands(plan, host="$(POD_IP)")
    assert list(commands) == ["a", "b"]
    devices_a = [d.device for d in plan.devices if d.node == "a"]
    assert _flag(commands["a"], "-d") == ",".join(devices_a)
    assert _flag(commands["b"], "-d") == "CUDA0"


def test_rpc_server_needs_a_device() -> None:
    with pytest.raises(PlannerInputError):
        build_rpc_server_args([], host="h")
