"""Speculative decoding as the operator's command lines set it up, on real llama.cpp.

gemma-3-270m served through one local ggml-rpc-server with the builders' own
llama-server arguments: n-gram speculation from a MeshModel's `speculative`
option, and a draft model (`-md`, here the model drafting for itself). Each
completion of repetitive, code-like text must report drafted and accepted
tokens in llama-server's `timings` (`draft_n`, `draft_n_accepted`): the flags
are accepted and speculation runs. The draft's buffers, as llama.cpp logs them
(`-lv 4`), are on the host's CPU and match the planner's estimate. Speed is the benchmark's business
(`python -m bench spec`); a model drafting for itself accepts nearly
everything at no saving.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.llama import LlamaProcess, post_json, running, start_llama_server
from e2e.llama import start_rpc_server as start_worker
from e2e.waiting import free_port
from mesh_operator import planning
from mesh_operator.api.meshmodel import MeshModelSpec
from mesh_operator.planner import (
    DraftSettings,
    PlacementRequest,
    PlacementResult,
    ServerSettings,
    ServingParams,
    build_llama_server_args,
    parse_inventory,
    plan_placement,
    read_model_profile,
)
from mesh_operator.planner.draft import estimate_draft_memory
from mesh_operator.planner.memory import MIB
from tests.unit.planner.estimate_check import TOLERANCE
from tests.unit.planner.llama_log import parse_buffers

pytestmark = pytest.mark.integration

SERVING = ServingParams(ctx=2048, parallel=1)
# Text whose continuation repeats what came before: n-grams of the context predict it.
CODE_LIKE = "".join(f"def add_{i}(x):\n    return x + {i}\n\n" for i in range(6))


@pytest.fixture(scope="module")
def worker(
    tmp_path_factory: pytest.TempPathFactory, rpc_server_bin: Path, llama_server_bin: Path
) -> Iterator[LlamaProcess]:
    server = start_worker(tmp_path_factory.mktemp("spec-worker"), threads=1, extra=["-d", "CPU"])
    with running(server):
        yield server


@pytest.fixture(scope="module")
def plan(model_file: Path) -> PlacementResult:
    pool = parse_inventory(
        {
            "nodes": [
                {
                    "name": "node-a",
                    "devices": [
                        {"id": "CPU", "backend": "cpu", "memoryTotalMiB": 4096,
                         "memoryFreeMiB": 4096},
                    ],
                }
            ]
        }
    )  # fmt: skip
    result = plan_placement(read_model_profile(model_file), pool, PlacementRequest(SERVING))
    assert result.feasible, result.reason
    return result


def _complete(
    tmp_path: Path, plan: PlacementResult, worker: LlamaProcess, model: Path, **settings: Any
) -> tuple[list[str], dict[str, Any], str]:
    port = free_port()
    server_settings = ServerSettings(
        serving=SERVING, host="127.0.0.1", port=port, metrics=False, threads=1, **settings
    )
    args = build_llama_server_args(plan, str(model), server_settings, {"node-a": worker.address})
    host = start_llama_server(tmp_path, args, port=port, timeout=300)
    with running(host):
        reply = post_json(
            f"{host.url}/completion",
            {"prompt": CODE_LIKE, "n_predict": 48, "temperature": 0, "cache_prompt": False},
        )
    timings = reply["timings"]
    assert isinstance(timings, dict), reply
    return args, timings, host.log_text()


def test_ngram_speculation_drafts_from_the_context(
    tmp_path: Path, plan: PlacementResult, worker: LlamaProcess, model_file: Path
) -> None:
    spec = MeshModelSpec.model_validate(
        {
            "source": {"url": "https://models.example/gemma.gguf"},
            "poolRef": "p",
            "speculative": {"type": "ngram-map-k", "sizeN": 4, "sizeM": 8},
        }
    )
    args, timings, _ = _complete(
        tmp_path, plan, worker, model_file, ngram=planning.ngram_settings(spec)
    )
    assert args[args.index("--spec-type") + 1] == "ngram-map-k"
    assert timings.get("draft_n", 0) > 0, timings
    assert 0 < timings["draft_n_accepted"] <= timings["draft_n"], timings


def test_a_draft_model_drafts_with_the_builders_flags(
    tmp_path: Path, plan: PlacementResult, worker: LlamaProcess, model_file: Path
) -> None:
    draft = DraftSettings(str(model_file), max_tokens=4)
    args, timings, log = _complete(
        tmp_path, plan, worker, model_file, draft=draft, extra_args=("-lv", "4")
    )
    assert args[args.index("-md") + 1] == str(model_file)
    assert args[args.index("--spec-type") + 1] == "draft-simple"
    # Drafts of at most 4 tokens; the model drafting for itself agrees with itself.
    assert timings.get("draft_n", 0) > 0, timings
    assert 0 < timings["draft_n_accepted"] <= timings["draft_n"], timings

    # What llama.cpp allocated for the draft: everything on the host's CPU.
    drafted = log.split("loading draft model", 1)[1].split("slot ", 1)[0]
    logged = parse_buffers(drafted).sizes
    assert not [name for name in logged if name.startswith("RPC")], logged
    output = re.search(r"CPU\s+output buffer size =\s+([\d.]+) MiB", drafted)
    assert output is not None, drafted
    estimate = estimate_draft_memory(read_model_profile(model_file), SERVING)
    assert logged["CPU_Mapped"]["model"] == pytest.approx(estimate.weights / MIB, abs=0.01)
    assert logged["CPU"]["KV"] == pytest.approx(estimate.kv / MIB, abs=0.01)
    compute = logged["CPU"]["compute"] + float(output.group(1))
    assert compute == pytest.approx(estimate.compute / MIB, rel=TOLERANCE)
