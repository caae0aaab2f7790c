"""Reading llama.cpp's buffer sizes from a llama-server log, and the recorded logs.

Test support for the planner. llama.cpp logs (at `-lv 4`) one line per device
and buffer: `load_tensors: <buf> model buffer size = X MiB`, `llama_kv_cache:
<buf> KV buffer size = X MiB` (once per cache, SWA and full) and
`sched_reserve: <buf> compute buffer size = X MiB`, where an RPC device's buffer
is named `RPC<i>[host:port]`; the host's are `CPU_Mapped` (the input layer's
weights), `CPU` (`llama_context: CPU output buffer`, its compute buffer).
Recorded logs start with `# config: {json}`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "planner"
LOG_DIR = FIXTURES / "llama-logs"
MODEL_HEADERS = FIXTURES / "models"
GEMMA_HEADER = MODEL_HEADERS / "gemma-3-270m-q4_k_m.header.gguf"


def header_fixture(model: Path) -> Path:
    """Where the header-only copy of a real model file is kept."""
    return MODEL_HEADERS / model.name.replace(".gguf", ".header.gguf")


def recorded_header(config: dict[str, Any]) -> Path:
    """The header of the model a recording was made with."""
    return MODEL_HEADERS / f"{config['model']}.header.gguf"


_LINE = re.compile(
    r"(?P<who>load_tensors|llama_kv_cache|llama_context|sched_reserve):\s+(?P<buf>\S+)\s+"
    r"(?P<kind>model|KV|compute|output) buffer size =\s+(?P<mib>[\d.]+) MiB"
)
_ENDPOINT = re.compile(r"^RPC\d+\[(?P<endpoint>[^\]]+)\]$")
# Lines worth keeping in a recorded fixture (no paths, no prompts).
KEEP = re.compile(
    r"load_tensors: .*buffer size|llama_kv_cache|sched_reserve|llama_context: |"
    r"llama_prepare_model_devices|offload"
)


@dataclass
class LoggedBuffers:
    """MiB per buffer name and kind ("model", "KV", "compute"), summed per device."""

    sizes: dict[str, dict[str, float]] = field(default_factory=dict)

    def host(self) -> dict[str, float]:
        """The host CPU's buffers: model (input layer), output, compute."""
        out: dict[str, float] = {}
        for name, kinds in self.sizes.items():
            if name.startswith("CPU"):
                for kind, mib in kinds.items():
                    out[kind] = out.get(kind, 0.0) + mib
        return out

    def by_endpoint(self) -> dict[str, dict[str, float]]:
        """Buffers of RPC devices, keyed by the server's host:port."""
        out: dict[str, dict[str, float]] = {}
        for name, kinds in self.sizes.items():
            match = _ENDPOINT.match(name)
            if match:
                out[match["endpoint"]] = kinds
        return out


def parse_buffers(text: str) -> LoggedBuffers:
    buffers = LoggedBuffers()
    for match in _LINE.finditer(text):
        kinds = buffers.sizes.setdefault(match["buf"], {})
        kinds[match["kind"]] = kinds.get(match["kind"], 0.0) + float(match["mib"])
    return buffers


def trim_log(text: str) -> str:
    """The lines of a llama-server log a fixture keeps, without timestamps."""
    lines = []
    for line in text.splitlines():
        if KEEP.search(line):
            lines.append(re.sub(r"^[\d.]+ [IWE] ", "", line))
    return "\n".join(lines) + "\n"


def write_recording(path: Path, config: dict[str, Any], log_text: str) -> None:
    header = (
        "# recorded from a real llama-server by tests/integration/test_planner_llama.py\n"
        f"# config: {json.dumps(config, sort_keys=True)}\n"
    )
    path.write_text(header + trim_log(log_text))


def read_recording(path: Path) -> tuple[dict[str, Any], str]:
    text = path.read_text()
    match = re.search(r"^# config: (.*)$", text, re.MULTILINE)
    if match is None:
        raise ValueError(f"{path}: no '# config:' line")
    config: dict[str, Any] = json.loads(match.group(1))
    return config, text
