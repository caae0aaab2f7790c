"""What the planner is asked to place, and the plan it answers with (or why there is none)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from mesh_operator.planner.errors import PlannerInputError
from mesh_operator.planner.memory import ServingParams
from mesh_operator.planner.timing import CostModel

Strategy = Literal["latency", "balanced"]
STRATEGIES: tuple[Strategy, ...] = ("latency", "balanced")

MAX_RPC_SERVERS = 16  # GGML_RPC_MAX_SERVERS
MAX_DEVICES = 15  # ggml's scheduler holds 16 backends, one of them the host CPU

# (node, device id, (first layer, last layer exclusive)) in llama.cpp device order.
Layout = Sequence[tuple[str, str, tuple[int, int]]]


@dataclass(frozen=True)
class PlacementRequest:
    """What to place and how; everything but the model and the pool."""

    serving: ServingParams = field(default_factory=ServingParams)
    strategy: Strategy = "latency"
    reserve_percent: float = 10.0
    model_file: str | None = None  # matched against nodes' cachedModels
    cost: CostModel = field(default_factory=CostModel)
    stability_percent: float = 5.0
    improvement_percent: float = 10.0

    def validate(self) -> None:
        self.serving.validate()
        if self.strategy not in STRATEGIES:
            raise PlannerInputError(f"strategy {self.strategy!r} is not one of latency, balanced")
        if not 0 <= self.reserve_percent < 100:
            raise PlannerInputError(
                f"reserve-percent must be in [0, 100), got {self.reserve_percent}"
            )
        if not 0 <= self.stability_percent < 50 or not 0 <= self.improvement_percent < 100:
            raise PlannerInputError("stability and improvement percentages are out of range")


@dataclass(frozen=True)
class DevicePlacement:
    """One planned device: its layers, its estimated buffers and its budget."""

    node: str
    device: str
    backend: str
    first_layer: int
    last_layer: int  # exclusive
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    free_mib: int
    capacity_bytes: int  # free minus reserve
    bandwidth_gbps: float
    time_ms: float  # this device's share of the predicted time per token

    @property
    def layers(self) -> tuple[int, int]:
        return (self.first_layer, self.last_layer)

    @property
    def n_layers(self) -> int:
        return self.last_layer - self.first_layer

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes


@dataclass(frozen=True)
class HostTier:
    """What a plan keeps in the host node's system RAM when VRAM is short.

    The routed experts of layers `[0, moe_layers)` (llama-server
    `--n-cpu-moe moe_layers`), and whole layers `[0, cpu_layers)` with their KV
    (`-ngl` short by `cpu_layers`): llama.cpp's first layers, on the host's CPU.
    Experts go first; whole layers only once every layer's experts are in RAM.

    With `device` set, the tier is the host node's own device (its CPU) whose
    layers the host runs itself (`own_node`): its memory is that device's, not
    the RAM beyond the node's devices, and `cpu_layers` may be `n_layer + 1`
    (the output layer too: no device is left).
    """

    node: str
    moe_layers: int
    cpu_layers: int
    weights_bytes: int  # expert tensors and whole layers' weights
    kv_bytes: int  # KV of the whole layers
    compute_bytes: int  # the host CPU's compute buffer for them
    free_mib: int  # the node's hostMemoryFreeMiB
    bandwidth_gbps: float
    time_ms: float  # its share of the predicted time per token
    device: str | None = None  # the host node's device holding it; None: hostMemoryFreeMiB

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes


@dataclass(frozen=True)
class PlacementResult:
    """A plan, or why there is none. Devices are in llama.cpp device order."""

    feasible: bool
    reason: str
    strategy: Strategy
    devices: tuple[DevicePlacement, ...] = ()
    tensor_split: tuple[int, ...] = ()
    rpc: tuple[str, ...] = ()  # node names in --rpc order
    host_node: str | None = None
    predicted_token_ms: float = 0.0
    bottleneck_ms: float = 0.0
    host_memory_bytes: int = 0
    kept_current: bool = False
    n_device_layers: int = 0
    host_tier: HostTier | None = None  # None: everything in VRAM

    @property
    def nodes(self) -> tuple[str, ...]:
        return self.rpc

    def rpc_devices(self) -> dict[str, list[str]]:
        """Device ids each node's RPC server must expose, in order."""
        out: dict[str, list[str]] = {}
        for d in self.devices:
            out.setdefault(d.node, []).append(d.device)
        return out

    def layout(self) -> list[tuple[str, str, tuple[int, int]]]:
        return [(d.node, d.device, d.layers) for d in self.devices]


@dataclass(frozen=True)
class CurrentPlan:
    """The plan a model is served with now, as the stability rule needs it."""

    layout: tuple[tuple[str, str, tuple[int, int]], ...]
    host_node: str | None = None
    # ((node, device), MiB) the plan holds now: the stability margin lets a kept
    # plan stay where free memory shrank, never grow past a device's capacity.
    held_mib: tuple[tuple[tuple[str, str], int], ...] = ()
    # (node, moe_layers, cpu_layers) of its RAM tier; its layout then starts at
    # layer cpu_layers.
    tier: tuple[str, int, int] | None = None
