"""Smoke test that llama.cpp is real: two ggml-rpc-server processes and a
llama-server that splits gemma-3-270m over them answer a chat completion."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from e2e.llama import post_json, running, start_llama_server, start_rpc_server

pytestmark = pytest.mark.integration


def test_two_rpc_servers_serve_a_chat_completion(
    tmp_path: Path, rpc_server_bin: Path, llama_server_bin: Path, model_file: Path
) -> None:
    workers = [start_rpc_server(tmp_path, threads=1) for _ in range(2)]
    with running(*workers):
        rpc = ",".join(w.address for w in workers)
        args = [
            "-m", str(model_file), "--rpc", rpc, "-ts", "1,1", "-ngl", "999",
            "-fit", "off", "-c", "1024", "-np", "1", "-t", "1", "--alias", "gemma",
            "-lv", "4",  # info level: llama.cpp then logs the buffer sizes per device
        ]  # fmt: skip
        host = start_llama_server(tmp_path, args)
        with running(host):
            reply = post_json(
                f"{host.url}/v1/chat/completions",
                {
                    "model": "gemma",
                    "messages": [{"role": "user", "content": "Say hello."}],
                    "max_tokens": 8,
                    "temperature": 0,
                },
            )
            log = host.log_text()
    choices = reply["choices"]
    assert isinstance(choices, list) and choices
    content = choices[0]["message"]["content"]
    assert isinstance(content, str) and content.strip()
    assert reply["usage"]["completion_tokens"] > 0  # type: ignore[index]
    # Both RPC servers held model weights: llama.cpp logs one model buffer per
    # device, named after the server's address.
    buffers = dict(re.findall(r"RPC\d+\[([\d.:]+)\] model buffer size\s*=\s*([\d.]+) MiB", log))
    assert set(buffers) == {w.address for w in workers}, log[-3000:]
    assert all(float(size) > 1 for size in buffers.values())
