"""Comparing the planner's memory estimate with what llama.cpp logged.

Test support shared by the unit tests (recorded logs) and the integration test
(live runs): the same configuration record drives both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mesh_operator.planner import ServingParams, estimate_memory
from mesh_operator.planner.memory import MIB
from mesh_operator.planner.profile import ModelProfile
from tests.unit.planner.llama_log import parse_buffers

TOLERANCE = 0.05  # the bar: within 5% of each buffer llama.cpp logs
HOST = "host"  # the endpoint name of the host's own buffers


@dataclass(frozen=True)
class BufferCheck:
    endpoint: str
    kind: str  # "model", "KV" or "compute"
    logged_mib: float
    estimated_mib: float

    @property
    def error(self) -> float:
        """Relative error against the printed value; none when the estimate prints
        the same (llama.cpp prints MiB with two decimals)."""
        if f"{self.estimated_mib:.2f}" == f"{self.logged_mib:.2f}":
            return 0.0
        if self.logged_mib == 0:
            return 1.0
        return abs(self.estimated_mib - self.logged_mib) / self.logged_mib

    @property
    def signed_error(self) -> float:
        return self.estimated_mib / self.logged_mib - 1 if self.logged_mib else 0.0

    def __str__(self) -> str:
        return (
            f"{self.endpoint} {self.kind}: logged {self.logged_mib:.2f} MiB, "
            f"estimated {self.estimated_mib:.2f} MiB ({self.signed_error:+.1%})"
        )


def serving_of(config: dict[str, Any]) -> ServingParams:
    return ServingParams(
        ctx=int(config["ctx"]),
        parallel=int(config["parallel"]),
        cache_type_k=str(config["cache_type"]),
        cache_type_v=str(config["cache_type"]),
        flash_attention=config["flash_attention"],
        ubatch=int(config["ubatch"]),
    )


def check_buffers(
    profile: ModelProfile, config: dict[str, Any], log_text: str
) -> list[BufferCheck]:
    """One check per device and buffer kind, in device order, then the host's
    three CPU buffers (input layer, output, compute)."""
    layout = [(str(n), str(d), (int(r[0]), int(r[1]))) for n, d, r in config["layout"]]
    estimate = estimate_memory(profile, serving_of(config), [r for _, _, r in layout])
    parsed = parse_buffers(log_text)
    logged = parsed.by_endpoint()
    checks = []
    for (node, _, _), device in zip(layout, estimate.devices, strict=True):
        endpoint = str(config["endpoints"][node])
        sizes = logged.get(endpoint, {})
        for kind, value in (
            ("model", device.weights),
            ("KV", device.kv),
            ("compute", device.compute),
        ):
            checks.append(BufferCheck(endpoint, kind, sizes.get(kind, 0.0), value / MIB))
    host, logged_host = estimate.host_buffers, parsed.host()
    for kind, value in (
        ("model", host.weights),
        ("output", host.kv),
        ("compute", host.compute),
    ):
        checks.append(BufferCheck(HOST, kind, logged_host.get(kind, 0.0), value / MIB))
    return checks
