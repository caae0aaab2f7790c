"""The chat template the operator gives the host, on the real llama-server and the
real gemma-3-270m (a base model whose file carries no chat template): the
operator's own arguments make llama-server format a chat with gemma's turn
markers, and a spec naming ChatML gets ChatML."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e.llama import post_json, running, start_llama_server, start_rpc_server
from mesh_operator import planning
from mesh_operator.api.meshmodel import MeshModelSpec, Plan, PlannedDevice
from mesh_operator.planner import read_model_profile

pytestmark = pytest.mark.integration

QUESTION = "What is the capital of France?"
GEMMA_TURNS = f"<start_of_turn>user\n{QUESTION}<end_of_turn>\n<start_of_turn>model\n"
CHATML_TURNS = f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"


def _local(args: list[str], model: Path) -> list[str]:
    """The host's arguments for a process here: this model file, and no --host or
    --port (start_llama_server binds 127.0.0.1 on a free port)."""
    out: list[str] = []
    it = iter(args)
    for arg in it:
        if arg in ("--host", "--port"):
            next(it)
        elif arg == "-m":
            out += ["-m", str(model)]
            next(it)
        else:
            out.append(arg)
    return out


@pytest.mark.parametrize(
    ("chat_template", "turns", "foreign"),
    [(None, GEMMA_TURNS, "<|im_start|>"), ("chatml", CHATML_TURNS, "<start_of_turn>")],
    ids=["architecture-default", "spec-chatml"],
)
def test_host_formats_chats_with_the_chosen_template(
    tmp_path: Path,
    rpc_server_bin: Path,
    llama_server_bin: Path,
    model_file: Path,
    chat_template: str | None,
    turns: str,
    foreign: str,
) -> None:
    profile = read_model_profile(model_file)
    assert profile.architecture == "gemma3" and not profile.has_chat_template
    spec = MeshModelSpec.model_validate(
        {
            "source": {"url": model_file.resolve().as_uri()},
            "poolRef": "p",
            "contextSize": 1024,
            **({"chatTemplate": chat_template} if chat_template else {}),
        }
    )
    device = PlannedDevice(
        node="n1",
        device="CPU",
        layers=[0, profile.n_device_layers],
        weights_mib=1,
        kv_mib=1,
        compute_mib=1,
        total_mib=3,
    )
    plan = Plan(devices=[device], tensor_split=[1], rpc=["n1"], host_node="n1")
    worker = start_rpc_server(tmp_path, threads=1)
    with running(worker):
        args = planning.llama_args(plan, spec, "gemma", [worker.address], profile)
        host = start_llama_server(tmp_path, [*_local(args, model_file), "-t", "1"])
        with running(host):
            rendered = post_json(
                f"{host.url}/apply-template",
                {"messages": [{"role": "user", "content": QUESTION}]},
            )
            reply = post_json(
                f"{host.url}/v1/chat/completions",
                {
                    "model": "gemma",
                    "messages": [{"role": "user", "content": QUESTION}],
                    "max_tokens": 16,
                    "temperature": 0,
                },
            )
    prompt = rendered["prompt"]
    assert isinstance(prompt, str)
    assert turns in prompt, prompt
    assert foreign not in prompt
    answer = reply["choices"][0]["message"]["content"]  # type: ignore[index]
    assert isinstance(answer, str)
    if chat_template is None:
        # The base model no longer echoes ChatML markers it was never trained on.
        assert "<|im_start|>" not in answer and "<|im_end|>" not in answer, answer
