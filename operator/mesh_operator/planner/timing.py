"""Predicted decode time per token of a placement.

Owns the cost model. Decode runs the devices one after the other, so a token
costs the sum over used devices of the bytes that device reads (its layers'
weights — for MoE only the share of experts a token is routed to — plus the KV
of a half-full context) divided by its memory bandwidth, plus per device a
fixed overhead and round trips to the host when the device's node is not the
host's. The round trips per remote device and token are measured, not assumed:
`python -m bench planner` runs gemma-3-270m over 1-3 ggml-rpc-server processes
behind a delay proxy at 0/2/5/10 ms, fits this constant on the 0 and 10 ms runs
and judges the prediction on the others (docs/planner.md, "The time model").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from mesh_operator.planner.memory import KvGeometry, ServingParams, kv_cell_bytes
from mesh_operator.planner.profile import ModelProfile

# Memory bandwidth to assume when the inventory does not know it, GB/s.
DEFAULT_BANDWIDTH_GBPS: Mapping[str, float] = {
    "cuda": 500.0,
    "rocm": 500.0,
    "vulkan": 250.0,
    "cpu": 40.0,
}


@dataclass(frozen=True)
class CostModel:
    """Constants of the time model; all times in milliseconds."""

    bandwidth_efficiency: float = 0.7  # share of peak bandwidth decode reaches
    round_trips_per_device: float = 1.0  # per remote device and token, measured
    device_overhead_ms: float = 0.3  # launch and sync per device and token
    local_rtt_ms: float = 0.05  # round trip to a server on the host's own node
    default_rtt_ms: float = 0.5  # a node's RTT when the inventory does not say
    default_bandwidth_gbps: Mapping[str, float] = field(
        default_factory=lambda: dict(DEFAULT_BANDWIDTH_GBPS)
    )

    def bandwidth(self, backend: str, reported_gbps: float) -> float:
        if reported_gbps > 0:
            return reported_gbps
        return self.default_bandwidth_gbps.get(backend, DEFAULT_BANDWIDTH_GBPS["cpu"])

    def ms_per_byte(self, bandwidth_gbps: float) -> float:
        return 1e3 / (bandwidth_gbps * 1e9 * self.bandwidth_efficiency)

    def hop_ms(self, rtt_ms: float, local: bool) -> float:
        return self.round_trips_per_device * (self.local_rtt_ms if local else rtt_ms)

    def device_ms(
        self, read_bytes: float, bandwidth_gbps: float, rtt_ms: float, local: bool
    ) -> float:
        """One device's share of a token: its fixed overhead, its hops, its reads."""
        fixed = self.device_overhead_ms + self.hop_ms(rtt_ms, local)
        return fixed + read_bytes * self.ms_per_byte(bandwidth_gbps)


def layer_read_bytes(
    profile: ModelProfile, params: ServingParams, geometry: KvGeometry
) -> list[float]:
    """Bytes each device layer reads per decoded token (last entry: output layer)."""
    attended_full = geometry.cells_full / 2
    attended_swa = min(float(profile.n_swa), attended_full)
    out: list[float] = []
    for il, layer in enumerate(profile.layers):
        dense = layer.weight_bytes - layer.expert_bytes
        experts = layer.expert_bytes * profile.expert_fraction
        cells = attended_swa if layer.is_swa else attended_full
        out.append(dense + experts + kv_cell_bytes(profile, params, il) * cells)
    out.append(float(profile.output_bytes))
    return out
