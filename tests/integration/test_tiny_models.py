"""The project's tiny models load in real llama.cpp and answer, through an RPC server.

Each architecture's model (e2e.tinymodels) goes whole onto one local
ggml-rpc-server; llama-server must load it, put every layer on the RPC device and
generate the tokens asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from e2e import tinymodels
from e2e.llama import post_json, running, start_llama_server, start_rpc_server
from tests.unit.planner.llama_log import parse_buffers

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("arch", tinymodels.ARCHS)
def test_tiny_model_answers_through_an_rpc_server(
    arch: str,
    tiny_model: Callable[..., Path],
    llama_server_bin: Path,
    rpc_server_bin: Path,
    tmp_path: Path,
) -> None:
    model = tiny_model(arch)
    worker = start_rpc_server(tmp_path)
    with running(worker):
        args = ["-m", str(model), "--rpc", worker.address, "-ngl", "999", "-fit", "off"]
        args += ["-c", "512", "-np", "1", "-t", "1", "--no-warmup", "-lv", "4"]
        host = start_llama_server(tmp_path, args)
        with running(host):
            answer = post_json(
                f"{host.url}/completion", {"prompt": "the cat", "n_predict": 6, "ignore_eos": True}
            )
            chat = post_json(
                f"{host.url}/v1/chat/completions",
                {
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 4,
                    "ignore_eos": True,
                },
            )
            log = host.log_text()
    n_layer = tinymodels.SPECS[arch].n_layer
    assert f"offloaded {n_layer + 1}/{n_layer + 1} layers" in log, log[-2000:]
    on_worker = parse_buffers(log).by_endpoint()[worker.address]
    assert on_worker["model"] > 1.0 and on_worker["KV"] > 0
    assert answer["tokens_predicted"] == 6
    assert isinstance(answer["content"], str) and answer["content"]
    usage = chat["usage"]
    assert isinstance(usage, dict) and usage["completion_tokens"] == 4
