"""A host llama-server for a plan, started with the builders' own arguments and
logging its buffers (`-lv 4`): what the checks of the memory estimate against
real llama.cpp run."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from e2e.llama import LlamaProcess, start_llama_server
from e2e.waiting import free_port
from mesh_operator.planner import (
    PlacementResult,
    ServerSettings,
    ServingParams,
    build_llama_server_args,
)

# Four tokens of a chat: enough to show the host computes through every device.
HELLO: dict[str, Any] = {
    "messages": [{"role": "user", "content": "hello there"}],
    "max_tokens": 4,
    "ignore_eos": True,
}


def start_logging_host(
    plan: PlacementResult,
    model_file: Path,
    serving: ServingParams,
    endpoints: Mapping[str, str],
    log_dir: Path,
) -> LlamaProcess:
    port = free_port()
    settings = ServerSettings(
        serving=serving,
        host="127.0.0.1",
        port=port,
        metrics=False,
        threads=1,
        # -lv 4 makes llama.cpp log its buffer sizes; no warmup keeps the test short.
        extra_args=("-lv", "4", "--no-warmup"),
    )
    args = build_llama_server_args(plan, str(model_file), settings, endpoints)
    return start_llama_server(log_dir, args, port=port)
