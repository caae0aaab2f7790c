"""System RAM as a tier: when it is used, what it holds, the flags that put it there.

A model that fits in VRAM never uses RAM (a hypothesis property over the
placement generators); one that fits only with RAM is planned, with the fewest
experts in RAM, whole layers only once every expert is there (a property
against an oracle that tries every amount on one device); the flags put
exactly the planned tensors in RAM (checked with llama.cpp's own tensor name
pattern against a real model's header); NoCapacity names VRAM and RAM.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from mesh_operator.cli.main import main
from mesh_operator.planner import (
    PlacementRequest,
    PlacementResult,
    PlannerInputError,
    ServerSettings,
    ServingParams,
    build_llama_server_args,
    current_plan_from_api,
    layers_for_split,
    parse_inventory,
    plan_placement,
    read_model_profile,
    to_api_plan,
)
from mesh_operator.planner.gguf_header import read_header_file
from mesh_operator.planner.memory import MIB, estimate_memory
from mesh_operator.planner.placement.problem import _cached_nodes, _pool
from mesh_operator.planner.placement.ram_tier import _tier_memory, _TierSearch, tier_profile
from mesh_operator.planner.profile import ModelProfile
from tests.unit.planner.builders import device, inventory, node, synthetic_profile
from tests.unit.planner.llama_log import MODEL_HEADERS
from tests.unit.planner.test_placement_properties import (
    SETTINGS,
    _capacity_bytes,
    pools,
    profiles,
    requests,
)

pytestmark = pytest.mark.unit

QWEN3_MOE = MODEL_HEADERS / "qwen3-30b-a3b.header.gguf"


def _with_ram(pool: dict[str, Any], mib: int, bandwidth: float = 0.0) -> dict[str, Any]:
    out = copy.deepcopy(pool)
    for n in out["nodes"]:
        n["hostMemoryFreeMiB"] = mib
        if bandwidth:
            n["hostMemoryBandwidthGBps"] = bandwidth
    return out


def _moe(**changes: Any) -> ModelProfile:
    shape: dict[str, Any] = {
        "n_layer": 48,
        "layer_mib": 1200.0,
        "output_mib": 600.0,
        "experts": 128,
        "experts_used": 8,
        "expert_share": 0.95,
    }
    return synthetic_profile(**(shape | changes))


def _one_gpu(ram_mib: int, total: int = 24576, **extra: Any) -> dict[str, Any]:
    gpu = node("gpu-a", device(total=total), rtt=0.2)
    return {"nodes": [gpu | {"hostMemoryFreeMiB": ram_mib, **extra}]}


def _check_tiered(
    result: PlacementResult,
    profile: ModelProfile,
    pool: dict[str, Any],
    request: PlacementRequest,
) -> None:
    """A plan with a RAM tier: devices tile the rest, everything within its budget."""
    tier = result.host_tier
    assert tier is not None and result.host_node == tier.node
    ram = next(n for n in pool["nodes"] if n["name"] == tier.node)["hostMemoryFreeMiB"]
    assert tier.total_bytes + result.host_memory_bytes <= ram * MIB
    has_experts = any(layer.expert_bytes for layer in profile.layers)
    if tier.cpu_layers:
        # Whole layers only once every layer's experts are in RAM.
        assert tier.moe_layers == (profile.n_layer if has_experts else 0)
    else:
        assert has_experts and 1 <= tier.moe_layers <= profile.n_layer
    expected = tier.cpu_layers
    for d in result.devices:
        assert d.first_layer == expected and d.last_layer > d.first_layer
        expected = d.last_layer
        assert d.total_bytes <= _capacity_bytes(pool, d.node, d.device, request.reserve_percent)
    assert expected == profile.n_device_layers
    assert sum(result.tensor_split) == profile.n_device_layers - tier.cpu_layers


@SETTINGS
@given(
    profile=profiles(),
    pool=pools(),
    request=requests(),
    ram=st.sampled_from([512, 4096, 32768, 262144]),
    shrink=st.sampled_from([1.0, 0.3, 0.1]),
)
def test_a_model_that_fits_in_vram_never_uses_ram(
    profile: ModelProfile,
    pool: dict[str, Any],
    request: PlacementRequest,
    ram: int,
    shrink: float,
) -> None:
    # Smaller devices too, so that many pools need RAM.
    for n in pool["nodes"]:
        for d in n["devices"]:
            d["memoryTotalMiB"] = int(d["memoryTotalMiB"] * shrink)
            d["memoryFreeMiB"] = int(d["memoryFreeMiB"] * shrink)
    without = plan_placement(profile, parse_inventory(pool), request)
    tiered = _with_ram(pool, ram)
    result = plan_placement(profile, parse_inventory(tiered), request)
    if without.feasible:
        event("fits in VRAM")
        assert result == without and result.host_tier is None
        return
    if not result.feasible:
        event("fits nowhere")
        assert result.reason.startswith("VRAM: ") and "; RAM: " in result.reason
        return
    event("fits with RAM")
    _check_tiered(result, profile, tiered, request)
    tier = result.host_tier
    assert tier is not None
    # The least that fits: one layer less in RAM and the devices overflow.
    search = _TierSearch(
        profile,
        parse_inventory(tiered),
        request,
        _pool(parse_inventory(tiered), request),
        _cached_nodes(parse_inventory(tiered), profile.file_name),
    )
    if tier.cpu_layers:
        assert search.hosted(tier.node, tier.moe_layers, tier.cpu_layers - 1) is None
    elif tier.moe_layers > 1:
        assert search.hosted(tier.node, tier.moe_layers - 1, 0) is None


def test_experts_go_to_ram_before_whole_layers() -> None:
    moe = _moe()
    assert not plan_placement(moe, inventory(_one_gpu(0)["nodes"][0])).feasible
    result = plan_placement(moe, parse_inventory(_one_gpu(64 * 1024)))
    assert result.feasible and result.host_tier is not None, result.reason
    tier = result.host_tier
    assert (tier.node, tier.cpu_layers) == ("gpu-a", 0) and 0 < tier.moe_layers < 48
    assert tier.weights_bytes == sum(layer.expert_bytes for layer in moe.layers[: tier.moe_layers])
    assert f"experts of {tier.moe_layers} layers in RAM on gpu-a" in result.reason
    # Experts alone cannot free enough on a small card: whole layers follow.
    small = plan_placement(moe, parse_inventory(_one_gpu(64 * 1024, total=3072)))
    assert small.feasible and small.host_tier is not None, small.reason
    assert small.host_tier.moe_layers == 48 and small.host_tier.cpu_layers > 0
    assert small.devices[0].first_layer == small.host_tier.cpu_layers


def test_a_dense_model_puts_whole_layers_in_ram() -> None:
    dense = synthetic_profile(n_layer=32, layer_mib=1200.0)
    result = plan_placement(dense, parse_inventory(_one_gpu(32 * 1024)))
    assert result.feasible and result.host_tier is not None, result.reason
    tier = result.host_tier
    assert tier.moe_layers == 0 and tier.cpu_layers > 0 and tier.kv_bytes > 0
    assert f"layers 0-{tier.cpu_layers - 1} in RAM on gpu-a" in result.reason


def test_ram_is_slower_by_its_bandwidth() -> None:
    moe = _moe()
    slow = plan_placement(moe, parse_inventory(_one_gpu(64 * 1024, hostMemoryBandwidthGBps=20)))
    fast = plan_placement(moe, parse_inventory(_one_gpu(64 * 1024, hostMemoryBandwidthGBps=80)))
    assert slow.host_tier is not None and fast.host_tier is not None
    assert slow.host_tier.moe_layers == fast.host_tier.moe_layers
    # Only the RAM's share scales with its bandwidth (experts read per token / speed).
    read = sum(layer.expert_bytes for layer in moe.layers[: fast.host_tier.moe_layers])
    read_ms = read * moe.expert_fraction / (0.7 * 1e9) * 1e3
    assert slow.host_tier.time_ms - fast.host_tier.time_ms == pytest.approx(
        read_ms / 20 - read_ms / 80, rel=1e-9
    )
    assert slow.predicted_token_ms - fast.predicted_token_ms == pytest.approx(
        slow.host_tier.time_ms - fast.host_tier.time_ms, rel=1e-9
    )


def test_the_tier_lives_on_the_host_with_ram() -> None:
    moe = _moe()
    pool = {
        "nodes": [
            node("a", device(total=24576), rtt=0.2),
            node("b", device(total=24576), rtt=0.2) | {"hostMemoryFreeMiB": 64 * 1024},
        ]
    }
    result = plan_placement(moe, parse_inventory(pool))
    assert result.feasible and result.host_tier is not None, result.reason
    assert result.host_node == result.host_tier.node == "b"


def test_no_capacity_names_vram_and_ram() -> None:
    moe = _moe()
    result = plan_placement(moe, parse_inventory(_one_gpu(8 * 1024)))
    assert not result.feasible
    assert re.fullmatch(
        r"VRAM: needs [\d.]+ GiB across <=15 devices; pool has 21\.6 GiB free after the 10% "
        r"reserve in 1 device \(largest 21\.6 GiB\); RAM: 8\.0 GiB on 1 node \(largest 8\.0 "
        r"GiB on gpu-a\), not enough with any host's RAM holding experts or layers",
        result.reason,
    ), result.reason


def _llama_cpp_expert_pattern(n_cpu_moe: int) -> re.Pattern[str]:
    """What `--n-cpu-moe N` overrides to the CPU: llama.cpp's common.h builds
    `blk\\.<i>` + LLM_FFN_EXPS_REGEX for i < N, matched with regex_search."""
    exps = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
    return re.compile("|".join(rf"blk\.{i}{exps}" for i in range(n_cpu_moe)))


def _arg(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


@pytest.mark.parametrize("total_mib", [12288, 16384, 20480])
def test_the_flags_put_exactly_the_planned_tensors_in_ram(total_mib: int) -> None:
    profile = read_model_profile(QWEN3_MOE)
    header = read_header_file(QWEN3_MOE)
    pool = _one_gpu(64 * 1024, total=total_mib)
    request = PlacementRequest(serving=ServingParams(ctx=8192))
    result = plan_placement(profile, parse_inventory(pool), request)
    assert result.feasible and result.host_tier is not None, result.reason
    tier = result.host_tier
    _check_tiered(result, profile, pool, request)
    settings = ServerSettings(serving=request.serving)
    for plan in (result, to_api_plan(result)):
        args = build_llama_server_args(plan, "m.gguf", settings, {"gpu-a": "gpu-a:50052"})
        moe = _arg(args, "--n-cpu-moe")
        assert moe is not None and int(moe) == tier.moe_layers
        assert _arg(args, "-lm") == "none"
        pattern = _llama_cpp_expert_pattern(int(moe))
        in_ram = sum(t.n_bytes for t in header.tensors if pattern.search(t.name))
        assert in_ram == tier.weights_bytes > 0
        # -ngl and -ts give each device exactly its planned layers.
        ngl = int(_arg(args, "-ngl") or 0)
        split = [int(x) for x in (_arg(args, "-ts") or "").split(",")]
        ranges = [
            (a + tier.cpu_layers, b + tier.cpu_layers) for a, b in layers_for_split(split, ngl)
        ]
        assert ranges == [d.layers for d in result.devices]


def test_whole_layers_leave_the_devices_through_ngl() -> None:
    dense = synthetic_profile(n_layer=32, layer_mib=1200.0)
    result = plan_placement(dense, parse_inventory(_one_gpu(32 * 1024)))
    assert result.host_tier is not None
    args = build_llama_server_args(result, "m.gguf", ServerSettings(), {"gpu-a": "a:1"})
    assert _arg(args, "-ngl") == str(33 - result.host_tier.cpu_layers)
    assert "--n-cpu-moe" not in args and _arg(args, "-lm") == "none"
    assert args == build_llama_server_args(
        to_api_plan(result), "m.gguf", ServerSettings(), {"gpu-a": "a:1"}
    )


def test_a_plan_in_vram_sets_no_ram_flags() -> None:
    result = plan_placement(_moe(n_layer=8), parse_inventory(_one_gpu(64 * 1024)))
    assert result.feasible and result.host_tier is None
    args = build_llama_server_args(result, "m.gguf", ServerSettings(), {"gpu-a": "a:1"})
    assert "--n-cpu-moe" not in args and "-lm" not in args
    assert to_api_plan(result).host_tier is None


def test_status_and_mesh_plan_show_the_tier_per_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pool = {
        "nodes": [
            node("gpu-a", device(total=12288), rtt=0.2) | {"hostMemoryFreeMiB": 65536},
            node("gpu-b", device(total=4096), rtt=0.2),
        ]
    }
    path = tmp_path / "nodes.json"
    path.write_text(json.dumps(pool))
    code = main(["plan", "--model", str(QWEN3_MOE), "--inventory", str(path)])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["feasible"], report["reason"]
    by_node = {n["node"]: n for n in report["nodes"]}
    assert set(by_node) == set(report["rpc"])
    assert by_node["gpu-a"]["hostTierMiB"] > 0 and by_node["gpu-a"]["moeLayers"] > 0
    assert all(n["hostTierMiB"] == 0 for name, n in by_node.items() if name != "gpu-a")
    status = to_api_plan(
        plan_placement(read_model_profile(QWEN3_MOE), parse_inventory(pool))
    ).to_wire()
    assert status["hostTier"] == {
        "node": "gpu-a",
        "moeLayers": by_node["gpu-a"]["moeLayers"],
        "cpuLayers": 0,
        "memoryMiB": by_node["gpu-a"]["hostTierMiB"],
    }
    code = main(["plan", "--model", str(QWEN3_MOE), "--inventory", str(path), "--output", "table"])
    table = capsys.readouterr().out
    moe = by_node["gpu-a"]["moeLayers"]
    assert code == 0 and f"RAM on gpu-a: experts of layers 0-{moe - 1}" in table


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hostMemoryFreeMiB", -1, r"nodes\[0\]\.hostMemoryFreeMiB: Input should be greater"),
        ("hostMemoryFreeMiB", "lots", r"nodes\[0\]\.hostMemoryFreeMiB: Input should be a valid"),
        ("hostMemoryBandwidthGBps", -3, r"nodes\[0\]\.hostMemoryBandwidthGBps: Input should be"),
    ],
)
def test_bad_host_memory_is_named(field: str, value: object, message: str) -> None:
    doc = _one_gpu(0)
    doc["nodes"][0][field] = value
    with pytest.raises(PlannerInputError, match=message):
        parse_inventory(doc, source="nodes.yaml")


def test_host_memory_defaults_to_none() -> None:
    parsed = parse_inventory({"nodes": [node("a")]}).nodes[0]
    assert (parsed.host_memory_free_mib, parsed.host_memory_bandwidth_gbps) == (0, 0.0)


def test_a_plan_with_ram_is_kept_while_it_fits_and_leaves_ram_when_vram_fits() -> None:
    moe = _moe()
    first = plan_placement(moe, parse_inventory(_one_gpu(64 * 1024)))
    assert first.host_tier is not None
    # Kept as it is, also when read back from the status, with 3% less free memory.
    tighter = _one_gpu(64 * 1024)
    gpu = tighter["nodes"][0]["devices"][0]
    gpu["memoryFreeMiB"] = int(gpu["memoryFreeMiB"] * 0.97)
    for current in (first, current_plan_from_api(to_api_plan(first))):
        kept = plan_placement(moe, parse_inventory(tighter), current=current)
        assert kept.kept_current, kept.reason
        assert (kept.layout(), kept.host_tier) == (first.layout(), first.host_tier)
    # A card that holds the whole model: the plan leaves RAM.
    roomy = _one_gpu(64 * 1024, total=81920)
    moved = plan_placement(moe, parse_inventory(roomy), current=first)
    assert moved.feasible and not moved.kept_current and moved.host_tier is None
    # RAM gone: the plan is not kept.
    gone = plan_placement(moe, parse_inventory(_one_gpu(1024)), current=first)
    assert not gone.feasible and not gone.kept_current


def test_mesh_plan_keeps_a_current_plan_with_ram(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "nodes.json"
    path.write_text(json.dumps(_one_gpu(65536, total=12288)))
    args = ["plan", "--model", str(QWEN3_MOE), "--inventory", str(path)]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    current = tmp_path / "plan.json"
    current.write_text(json.dumps(report))
    assert main([*args, "--current", str(current)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["reason"].startswith("kept the current plan"), again["reason"]
    assert (again["devices"], again["nodes"]) == (report["devices"], report["nodes"])


def _oracle(
    profile: ModelProfile, pool: dict[str, Any], request: PlacementRequest
) -> tuple[int, int] | None:
    """The least in RAM on a one-device node, by trying every amount in order:
    experts of the first k layers, then (every expert in RAM) the first m layers."""
    capacity = _capacity_bytes(pool, "solo", "CUDA0", request.reserve_percent)
    room = pool["nodes"][0]["hostMemoryFreeMiB"] * MIB
    n = profile.n_layer
    has_experts = any(layer.expert_bytes for layer in profile.layers)
    amounts = [(k, 0) for k in range(n + 1)] if has_experts else [(0, 0)]
    amounts += [(n if has_experts else 0, m) for m in range(1, n)]
    for moe, cpu in amounts:
        rest = tier_profile(profile, moe, cpu)
        estimate = estimate_memory(rest, request.serving, [(0, rest.n_device_layers)])
        if estimate.devices[0].total > capacity:
            continue
        if (moe, cpu) == (0, 0):
            return 0, 0
        tier = sum(_tier_memory(profile, request, moe, cpu))
        return (moe, cpu) if tier + estimate.host <= room else None
    return None


@settings(SETTINGS, max_examples=150)
@given(
    profile=profiles(),
    request=requests(),
    device_mib=st.integers(256, 32768),
    ram=st.sampled_from([1024, 16384, 131072]),
)
def test_one_device_plans_the_least_ram_that_fits(
    profile: ModelProfile, request: PlacementRequest, device_mib: int, ram: int
) -> None:
    pool = {"nodes": [node("solo", device(total=device_mib), rtt=0.2) | {"hostMemoryFreeMiB": ram}]}
    expected = _oracle(profile, pool, request)
    result = plan_placement(profile, parse_inventory(pool), request)
    tier = result.host_tier
    got = None if not result.feasible else (tier.moe_layers, tier.cpu_layers) if tier else (0, 0)
    event("in VRAM" if got == (0, 0) else "in RAM" if got else "nowhere")
    assert got == expected, result.reason
