"""`mesh plan --pool`: the SOURCE syntax, and the plan of a model on a pool read
as the operator reads it (other models' plans held, its own not), case by case.
The command against a real API server is tests/integration/test_plan_live.py."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pytest

from mesh_operator.api.meshmodel import MeshModelSpec, ModelSource, Plan
from mesh_operator.api.meshpool import MeshPoolSpec
from mesh_operator.cli.main import main
from mesh_operator.cli.plan_live import (
    LiveInputError,
    LivePool,
    build_holdings,
    model_identity,
    parse_source,
    plan_on_pool,
)
from mesh_operator.ledger import NodeInfo
from mesh_operator.planner import read_model_profile
from tests.unit.meshnodes import one_gpu_status
from tests.unit.planner.llama_log import GEMMA_HEADER

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("text", "wire"),
    [
        ("https://m.example/a/b.gguf", {"url": "https://m.example/a/b.gguf"}),
        ("file:///models/b.gguf", {"url": "file:///models/b.gguf"}),
        (
            "hf://unsloth/gemma-3-270m-it-GGUF/gemma-3-270m-it-Q4_K_M.gguf",
            {
                "huggingface": {
                    "repo": "unsloth/gemma-3-270m-it-GGUF",
                    "file": "gemma-3-270m-it-Q4_K_M.gguf",
                    "revision": "main",
                }
            },
        ),
        (
            "hf://org/repo/sub/dir/m.gguf@v1.2",
            {"huggingface": {"repo": "org/repo", "file": "sub/dir/m.gguf", "revision": "v1.2"}},
        ),
    ],
)
def test_sources_name_what_a_meshmodel_would(text: str, wire: dict[str, object]) -> None:
    assert parse_source(text) == ModelSource.model_validate(wire)


def test_a_local_path_is_read_as_a_file_url() -> None:
    source = parse_source(str(GEMMA_HEADER))
    assert source.url == GEMMA_HEADER.resolve().as_uri()


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("hf://org/repo", "expected hf://OWNER/REPO/PATH.gguf[@REVISION]"),
        ("hf://org/repo/m.bin", "file"),
        ("s3://bucket/m.gguf", "unknown scheme s3://"),
        ("/no/such/model.gguf", "/no/such/model.gguf: no such file"),
    ],
)
def test_bad_sources_are_refused_naming_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(LiveInputError) as caught:
        parse_source(text)
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_the_model_defaults_to_its_file_name_in_default() -> None:
    source = parse_source("https://m.example/Gemma-3.gguf")
    assert model_identity(None, source) == ("default", "gemma-3")
    assert model_identity("ai/gemma", source) == ("ai", "gemma")
    assert model_identity("gemma", source) == ("default", "gemma")
    with pytest.raises(LiveInputError, match="--name: "):
        model_identity("ai/Not_A_Name", source)


def _plan_on(node: str, device: str, mib: int) -> Plan:
    return Plan.model_validate(
        {
            "devices": [
                {"node": node, "device": device, "layers": [0, 19], "weightsMiB": mib,
                 "kvMiB": 0, "computeMiB": 0, "totalMiB": mib}
            ],
            "tensorSplit": [19], "rpc": [node], "hostNode": node,
        }
    )  # fmt: skip


def _pool(plans: dict[str, tuple[str, Plan]]) -> LivePool:
    selector = {"pool": "gpu"}
    nodes = tuple(NodeInfo(name=n, labels=selector) for n in ("a", "b"))
    return LivePool(
        name="gpu",
        spec=MeshPoolSpec.model_validate({"backend": "cuda", "nodeSelector": selector}),
        nodes=(*nodes, NodeInfo(name="elsewhere", labels={})),
        meshnodes={
            "a": one_gpu_status(NOW, 900, total=1000),
            "b": one_gpu_status(NOW, 900, total=1000),
        },
        plans=plans,
    )


def _spec() -> MeshModelSpec:
    return MeshModelSpec.model_validate(
        {"source": {"url": "https://m.example/gemma.gguf"}, "poolRef": "gpu", "contextSize": 1024}
    )


def test_other_models_hold_memory_and_the_plan_goes_around_them() -> None:
    profile = read_model_profile(GEMMA_HEADER)
    live = _pool(
        {
            "ai/big": ("gpu", _plan_on("a", "CUDA0", 800)),
            "ai/mine": ("gpu", _plan_on("b", "CUDA0", 300)),
            "ai/other-pool": ("cpu", _plan_on("a", "CUDA0", 999)),
        }
    )
    planned = plan_on_pool(live, _spec(), profile, "ai/mine", reserve_percent=None, now=NOW)
    result, held, unusable = planned.result, planned.holdings, planned.unusable
    assert planned.draft is None and planned.draft_problem is None
    assert result.feasible, result.reason
    # a keeps 1000 - 800 - 10% reserve: too little; the model's own claim on b is free.
    assert result.rpc == ("b",)
    assert [h.to_wire() for h in held] == [
        {"model": "ai/big", "node": "a", "device": "CUDA0", "MiB": 800}
    ]
    assert unusable == []


def test_with_every_device_held_the_plan_is_infeasible_and_says_who_holds() -> None:
    profile = read_model_profile(GEMMA_HEADER)
    live = _pool({f"ai/m{n}": ("gpu", _plan_on(n, "CUDA0", 900)) for n in ("a", "b")})
    planned = plan_on_pool(live, _spec(), profile, "ai/new", reserve_percent=0, now=NOW)
    assert not planned.result.feasible
    assert {h.model for h in planned.holdings} == {"ai/ma", "ai/mb"}


def test_holdings_only_count_the_pools_nodes() -> None:
    claims = {"x/y": _plan_on("gone", "CUDA0", 5), "x/z": _plan_on("a", "CUDA0", 7)}
    assert [h.model for h in build_holdings(claims, {"a"})] == ["x/z"]


def test_pool_and_inventory_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["plan", "--model", "m.gguf", "--pool", "p", "--inventory", "n.yaml"])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err == "mesh plan: error: argument --inventory: not allowed with argument --pool\n"


def test_a_bad_source_exits_2_before_any_cluster_is_read(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "nothing.gguf"
    code = main(["plan", "--model", str(missing), "--pool", "p", "--kubeconfig", "/nonexistent"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"mesh plan: error: {missing}: no such file\n"


def test_nodes_the_pool_cannot_use_are_named_with_why() -> None:
    profile = read_model_profile(GEMMA_HEADER)
    live = _pool({})
    stale = dict(live.meshnodes, a=one_gpu_status(NOW, 900, total=1000, age=600))
    live = dataclasses.replace(live, meshnodes=stale)
    planned = plan_on_pool(live, _spec(), profile, "ai/new", reserve_percent=None, now=NOW)
    assert planned.result.rpc == ("b",)
    assert [u["node"] for u in planned.unusable] == ["a"]
    assert planned.unusable[0]["problem"].startswith("heartbeat stale")


def test_current_is_for_an_inventory(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", "--model", str(GEMMA_HEADER), "--pool", "p", "--current", "x.json"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mesh plan: error: --current is for --inventory")
