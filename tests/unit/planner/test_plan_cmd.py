"""`mesh plan`: flags, JSON and table output, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh_operator.cli.main import main
from tests.unit.planner.builders import cpu_nodes, raw_gguf
from tests.unit.planner.llama_log import GEMMA_HEADER, MODEL_HEADERS

pytestmark = pytest.mark.unit

INVENTORY = {
    "nodes": [
        {
            "name": "gpu-a",
            "rttMs": 0.4,
            "cachedModels": [],
            "devices": [
                {"id": "CUDA0", "backend": "cuda", "memoryTotalMiB": 24576,
                 "memoryFreeMiB": 23800, "bandwidthGBps": 936}
            ],
        },
        {
            "name": "gpu-b",
            "rttMs": 2.0,
            "devices": [
                {"id": "CUDA0", "backend": "cuda", "memoryTotalMiB": 8192,
                 "memoryFreeMiB": 8000, "bandwidthGBps": 300},
                {"id": "CUDA1", "backend": "cuda", "memoryTotalMiB": 8192,
                 "memoryFreeMiB": 8000, "bandwidthGBps": 300},
            ],
        },
    ]
}  # fmt: skip
KEYS = {
    "feasible", "reason", "strategy", "devices", "tensorSplit", "rpc", "hostNode",
    "predictedTokenMs", "args",
}  # fmt: skip
DEVICE_KEYS = {
    "node", "device", "layers", "weightsMiB", "kvMiB", "computeMiB", "totalMiB", "freeMiB"
}  # fmt: skip


def _write(tmp_path: Path, doc: Any, name: str = "nodes.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def _plan(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any] | str, str]:
    code = main(["plan", *args])
    out, err = capsys.readouterr()
    try:
        return code, json.loads(out), err
    except json.JSONDecodeError:
        return code, out, err


def test_feasible_plan_prints_the_documented_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inv = _write(tmp_path, INVENTORY)
    model = str(MODEL_HEADERS / "llama-3.1-8b.header.gguf")
    code, report, err = _plan(capsys, "--model", model, "--inventory", str(inv), "--ctx", "8192")
    assert code == 0 and err == "" and isinstance(report, dict)
    assert set(report) >= KEYS
    assert report["feasible"] is True and report["strategy"] == "latency"
    assert report["rpc"] == ["gpu-a"] and report["hostNode"] == "gpu-a"
    assert [set(d) for d in report["devices"]] == [DEVICE_KEYS]
    assert report["devices"][0]["layers"] == [0, 33] and report["tensorSplit"] == [33]
    assert isinstance(report["predictedTokenMs"], float)
    server = report["args"]["llama-server"]
    assert server[server.index("--rpc") + 1] == "gpu-a:50052"
    assert report["args"]["ggml-rpc-server"] == {
        "gpu-a": ["-H", "$(POD_IP)", "-p", "50052", "-d", "CUDA0", "-c"]
    }


def test_infeasible_plan_exits_3_and_still_prints_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = {
        "nodes": [
            {
                "name": "a",
                "devices": [{"id": "CUDA0", "memoryTotalMiB": 4096, "memoryFreeMiB": 4096}],
            }
        ]
    }
    inv = _write(tmp_path, small)
    model = str(MODEL_HEADERS / "qwen3-30b-a3b.header.gguf")
    code, report, _ = _plan(capsys, "--model", model, "--inventory", str(inv))
    assert code == 3 and isinstance(report, dict)
    assert report["feasible"] is False and report["reason"].startswith("VRAM: needs ")
    assert report["devices"] == [] and report["args"]["llama-server"] == []


def test_table_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inv = _write(tmp_path, INVENTORY)
    model = str(MODEL_HEADERS / "qwen3-30b-a3b.header.gguf")
    code, text, _ = _plan(
        capsys, "--model", model, "--inventory", str(inv), "--strategy", "balanced",
        "--cache-type-k", "q8_0", "--cache-type-v", "q8_0", "--output", "table",
    )  # fmt: skip
    assert code == 0 and isinstance(text, str)
    assert "NODE" in text and "TOTAL" in text and "strategy balanced" in text
    assert "llama-server -m " in text and "-ctk q8_0" in text


def test_current_plan_is_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inv = _write(tmp_path, INVENTORY)
    model = str(GEMMA_HEADER)
    code, report, _ = _plan(capsys, "--model", model, "--inventory", str(inv))
    assert code == 0
    current = tmp_path / "plan.json"
    current.write_text(json.dumps(report))
    code, again, _ = _plan(
        capsys, "--model", model, "--inventory", str(inv), "--current", str(current)
    )
    assert code == 0 and isinstance(again, dict) and isinstance(report, dict)
    assert again["reason"].startswith("kept the current plan")
    assert again["devices"] == report["devices"]


def _bad_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    inv = str(_write(tmp_path, INVENTORY))
    good = str(GEMMA_HEADER)

    def model_file(name: str, data: bytes) -> str:
        (tmp_path / name).write_bytes(data)
        return str(tmp_path / name)

    def inventory_with(**device: Any) -> str:
        doc = json.loads(json.dumps(INVENTORY))
        doc["nodes"][1]["devices"][0].update(device)
        return str(_write(tmp_path, doc, "bad.yaml"))

    missing = json.loads(json.dumps(INVENTORY))
    del missing["nodes"][0]["devices"][0]["memoryFreeMiB"]
    header = GEMMA_HEADER.read_bytes()
    ctx = ["--model", good, "--inventory", inv, "--ctx"]
    gemma = ["--model", good, "--inventory", inv]
    unknown_arch = raw_gguf(metadata=[("general.architecture", "rwkv7")])
    unknown_type = raw_gguf(tensors=[("blk.0.x", (32,), 77)])
    return {
        "not-gguf": (
            ["--model", model_file("x.gguf", b"hello world, not a model"), "--inventory", inv],
            "not a GGUF file",
        ),
        "truncated": (
            ["--model", model_file("t.gguf", header[:2000]), "--inventory", inv],
            "truncated at byte",
        ),
        "unknown-arch": (
            ["--model", model_file("a.gguf", unknown_arch), "--inventory", inv],
            "unknown architecture 'rwkv7'",
        ),
        "unknown-type": (
            ["--model", model_file("u.gguf", unknown_type), "--inventory", inv],
            "unknown tensor type 77",
        ),
        "no-model": (["--model", str(tmp_path / "absent.gguf"), "--inventory", inv], "cannot read"),
        "negative-memory": (
            ["--model", good, "--inventory", inventory_with(memoryFreeMiB=-1)],
            "nodes[1].devices[0].memoryFreeMiB",
        ),
        "missing-memory": (
            ["--model", good, "--inventory", str(_write(tmp_path, missing, "m.yaml"))],
            "memoryFreeMiB: missing",
        ),
        "ctx-zero": ([*ctx, "0"], "--ctx: must be > 0"),
        "ctx-negative": ([*ctx, "-4096"], "--ctx: must be > 0"),
        "ctx-text": ([*ctx, "big"], "--ctx: expected an integer"),
        "bad-yaml": (
            ["--model", good, "--inventory", model_file("y.yaml", b"nodes: [\n  - {name: a")],
            "line",
        ),
        "no-inventory": (
            ["--model", good, "--inventory", str(tmp_path / "none.yaml")],
            "cannot read",
        ),
        "bad-cache": ([*gemma, "--cache-type-k", "q2"], "invalid choice"),
        "reserve": ([*gemma, "--reserve-percent", "120"], "must be in [0, 100)"),
        "v-cache-without-fa": (
            [*gemma, "--flash-attn", "off", "--cache-type-v", "q4_0"],
            "needs flash attention",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "not-gguf", "truncated", "unknown-arch", "unknown-type", "no-model", "negative-memory",
        "missing-memory", "ctx-zero", "ctx-negative", "ctx-text", "bad-yaml", "no-inventory",
        "bad-cache", "reserve", "v-cache-without-fa",
    ],
)  # fmt: skip
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    args, message = _bad_cases(tmp_path)[case]
    try:
        code = main(["plan", *args])
    except SystemExit as exc:  # argparse rejects some flags itself, also with 2
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("mesh plan: error: "), err
    assert message in err


def test_no_traceback_from_the_console_script(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(GEMMA_HEADER.read_bytes()[:50])
    inv = _write(tmp_path, INVENTORY)
    argv = [sys.executable, "-m", "mesh_operator.cli.main", "plan"]
    argv += ["--model", str(bad), "--inventory", str(inv)]
    run = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.count("\n") == 1


def test_a_draft_model_is_planned_in_the_host_nodes_ram(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with_ram = yaml.safe_load(yaml.safe_dump(INVENTORY))
    with_ram["nodes"][0]["hostMemoryFreeMiB"] = 8192
    inv = _write(tmp_path, with_ram)
    model = str(MODEL_HEADERS / "llama-3.1-8b.header.gguf")
    draft = str(GEMMA_HEADER)
    code, report, err = _plan(capsys, "--model", model, "--inventory", str(inv), "--draft", draft)
    assert code == 0 and err == "" and isinstance(report, dict)
    assert report["hostNode"] == "gpu-a"
    planned = report["draft"]
    assert planned["node"] == "gpu-a" and 0 < planned["memoryMiB"] < 8192
    assert planned["memoryMiB"] >= planned["weightsMiB"] + planned["kvMiB"]
    server = report["args"]["llama-server"]
    assert server[server.index("-md") + 1] == draft
    assert server[server.index("-devd") + 1] == "none"
    code, text, _ = _plan(
        capsys, "--model", model, "--inventory", str(inv), "--draft", draft, "--output", "table"
    )
    assert code == 0 and f"draft model on gpu-a: {planned['memoryMiB']} MiB of RAM" in str(text)


def test_a_draft_without_room_on_the_host_node_is_infeasible(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inv = _write(tmp_path, INVENTORY)  # GPU nodes offering no RAM
    model = str(MODEL_HEADERS / "llama-3.1-8b.header.gguf")
    code, report, _ = _plan(
        capsys, "--model", model, "--inventory", str(inv), "--draft", str(GEMMA_HEADER)
    )
    assert code == 3 and isinstance(report, dict) and report["feasible"] is False
    assert report["reason"].startswith("the draft model needs "), report["reason"]
    assert (
        "on the host's node gpu-a; its RAM (hostMemoryFreeMiB) has 0 MiB free" in (report["reason"])
    )


def test_a_draft_moves_the_host_to_the_node_of_the_plan_with_room(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def gpu(name: str, ram: int) -> dict[str, Any]:
        return {
            "name": name,
            "rttMs": 0.5,
            "hostMemoryFreeMiB": ram,
            "devices": [
                {"id": "CUDA0", "backend": "cuda", "memoryTotalMiB": 12288,
                 "memoryFreeMiB": 12000, "bandwidthGBps": 600}
            ],
        }  # fmt: skip

    model = str(MODEL_HEADERS / "qwen3-30b-a3b.header.gguf")
    alone = _write(tmp_path, {"nodes": [gpu("gpu-a", 0), gpu("gpu-b", 0)]}, "alone.yaml")
    code, plain, _ = _plan(capsys, "--model", model, "--inventory", str(alone))
    assert code == 0 and isinstance(plain, dict) and len(plain["rpc"]) == 2
    other = next(n for n in plain["rpc"] if n != plain["hostNode"])
    roomy = {"nodes": [gpu(n, 8192 if n == other else 0) for n in ("gpu-a", "gpu-b")]}
    inv = _write(tmp_path, roomy)
    code, report, _ = _plan(
        capsys, "--model", model, "--inventory", str(inv), "--draft", str(GEMMA_HEADER)
    )
    assert code == 0 and isinstance(report, dict), report
    assert report["hostNode"] == other and report["draft"]["node"] == other
    assert report["devices"] == plain["devices"] and report["rpc"] == plain["rpc"]


@pytest.mark.parametrize("output", ["json", "table"])
def test_host_uses_own_node_runs_its_layers_in_the_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], output: str
) -> None:
    """Two CPU nodes of 261 MiB, neither holding gemma alone (after the reserve)."""
    inv = str(_write(tmp_path, cpu_nodes(261, 261)))
    model = str(GEMMA_HEADER)
    code, plain, _ = _plan(capsys, "--model", model, "--inventory", inv, "--ctx", "2048")
    code_own, own, _ = _plan(
        capsys, "--model", model, "--inventory", inv, "--ctx", "2048", "--host-uses-own-node",
        "--output", output,
    )  # fmt: skip
    assert code == code_own == 0 and isinstance(plain, dict)
    assert len(plain["rpc"]) == 2
    # The host moves to the node of the first layers, the ones llama.cpp gives its CPU.
    first = plain["devices"][0]
    host = first["node"]
    if output == "table":
        assert isinstance(own, str)
        assert f"host's own CPU on {host}: layers 0-{first['layers'][1] - 1}" in own
        other = plain["devices"][1]["node"]
        assert "--rpc" in own and f"ggml-rpc-server ({other})" in own
        assert f"ggml-rpc-server ({host})" not in own
        return
    assert isinstance(own, dict)
    assert own["devices"] == plain["devices"][1:] and own["rpc"] == plain["rpc"][1:]
    assert own["hostNode"] == host
    tier = own["nodes"][0]
    assert tier == {
        "node": host, "vramMiB": 0, "hostTierMiB": tier["hostTierMiB"], "moeLayers": 0,
        "cpuLayers": first["layers"][1], "hostTierDevice": "CPU",
    }  # fmt: skip
    # The same layers and KV; the host's CPU compute buffer instead of the device's.
    assert 0 < tier["hostTierMiB"] <= first["totalMiB"]
    assert list(own["args"]["ggml-rpc-server"]) == own["rpc"]
    server = own["args"]["llama-server"]
    assert server[server.index("-ngl") + 1] == str(19 - first["layers"][1])
    assert own["predictedTokenMs"] <= plain["predictedTokenMs"]
    # A previous output with the option comes back as the plan it was made from.
    current = tmp_path / "plan.json"
    current.write_text(json.dumps(own))
    code, again, _ = _plan(
        capsys, "--model", model, "--inventory", inv, "--ctx", "2048", "--host-uses-own-node",
        "--current", str(current),
    )  # fmt: skip
    assert code == 0 and isinstance(again, dict)
    assert again["reason"].startswith("kept the current plan")
    assert again["nodes"] == own["nodes"] and again["devices"] == own["devices"]


def test_host_uses_own_node_on_one_node_has_no_rpc(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inv = str(_write(tmp_path, cpu_nodes(2048, 261)))
    code, own, _ = _plan(
        capsys, "--model", str(GEMMA_HEADER), "--inventory", inv, "--host-uses-own-node"
    )
    assert code == 0 and isinstance(own, dict)
    assert own["devices"] == [] and own["rpc"] == [] and own["args"]["ggml-rpc-server"] == {}
    server = own["args"]["llama-server"]
    assert "--rpc" not in server and server[server.index("-ngl") + 1] == "0"
    assert own["nodes"][0]["cpuLayers"] == 19


def test_host_uses_own_node_is_the_pools_with_pool(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", "--model", "m.gguf", "--pool", "p", "--host-uses-own-node"])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "hostUsesOwnNode" in err
