"""The problem one call of the planner solves: the model side and the pool's devices.

`_Problem` holds what the model needs per layer, computed once per call (memory
and bytes read as prefix sums, the compute buffer a device needs for any range).
`_pool` turns the inventory into devices with their capacity after the reserve.
`_finish` makes a plan (`_Candidate`) from devices in llama.cpp order and their
layer ranges: it checks every device's estimate against its capacity, picks the
host when none is given and times each device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from mesh_operator.planner.inventory import Inventory
from mesh_operator.planner.memory import (
    MIB,
    compute_buffer_bytes,
    estimate_memory,
    kv_geometry,
    layer_memory_bytes,
)
from mesh_operator.planner.placement.types import (
    DevicePlacement,
    HostTier,
    PlacementRequest,
    Strategy,
)
from mesh_operator.planner.profile import ModelProfile
from mesh_operator.planner.timing import layer_read_bytes


@dataclass(frozen=True)
class _Device:
    node: str
    id: str
    backend: str
    capacity: int  # bytes usable after the reserve (may be <= 0)
    free_mib: int
    bandwidth: float  # GB/s, defaulted when unknown
    rtt: float  # the node's round trip to the host side, ms


@dataclass(frozen=True)
class _Candidate:
    devices: tuple[DevicePlacement, ...]
    host: str
    nodes: tuple[str, ...]
    total_ms: float
    bottleneck_ms: float
    host_bytes: int
    cached: int
    tier: HostTier | None = None  # what sits in the host's RAM, if anything

    def objective(self, strategy: Strategy) -> float:
        return self.total_ms if strategy == "latency" else self.bottleneck_ms

    def signature(self) -> tuple[tuple[str, str, int, int], ...]:
        return tuple((d.node, d.device, d.first_layer, d.last_layer) for d in self.devices)


class _Problem:
    """The model side of the search, computed once per call."""

    def __init__(self, profile: ModelProfile, request: PlacementRequest) -> None:
        self.profile = profile
        self.request = request
        self.serving = request.serving
        self.cost = request.cost
        self.geometry = kv_geometry(profile, self.serving)
        self.n = profile.n_device_layers
        memory = layer_memory_bytes(profile, self.serving, self.geometry)
        reads = layer_read_bytes(profile, self.serving, self.geometry)
        self.mem_prefix = [0]
        self.read_prefix = [0.0]
        for m, r in zip(memory, reads, strict=True):
            self.mem_prefix.append(self.mem_prefix[-1] + m)
            self.read_prefix.append(self.read_prefix[-1] + r)
        self.largest_layer = max(memory)
        # The most a device of this model can need, for the reasons given when
        # nothing fits.
        self.compute_multi = compute_buffer_bytes(profile, self.serving, self.geometry, n_devices=2)
        self.compute_single = compute_buffer_bytes(
            profile, self.serving, self.geometry, n_devices=1
        )
        # A device's compute buffer depends on its range: which kinds of attention
        # it holds and whether it holds the output layer (llama.cpp's logs show
        # it), and on whether the model spans several devices. Indexed by
        # 4 * has_full + 2 * has_swa + holds_output; 0 (no layer at all) never occurs.
        self.n_layer = profile.n_layer
        self.full_prefix = [0]
        self.swa_prefix = [0]
        for layer in profile.layers:
            self.full_prefix.append(self.full_prefix[-1] + (not layer.is_swa))
            self.swa_prefix.append(self.swa_prefix[-1] + layer.is_swa)
        self.compute_table = {
            several: tuple(
                compute_buffer_bytes(
                    profile,
                    self.serving,
                    self.geometry,
                    n_devices=2 if several else 1,
                    has_full=bool(code & 4),
                    has_swa=bool(code & 2),
                    holds_output=bool(code & 1),
                )
                for code in range(8)
            )
            for several in (False, True)
        }
        # The least any device needs, and any device holding the output layer.
        self.compute_floor = {k: min(t[1:]) for k, t in self.compute_table.items()}
        self.output_compute_floor = {k: min(t[1::2]) for k, t in self.compute_table.items()}
        self.model_file = request.model_file or profile.file_name

    def range_bytes(self, several: bool, worst_case: bool = False) -> Callable[[int, int], int]:
        """Bytes a device needs for layers [s, j): weights, KV and its compute buffer
        (with `worst_case`, the largest buffer any range can need, as the beam
        search of `previous` budgets)."""
        mem, table = self.mem_prefix, self.compute_table[several]
        full, swa, top, n = self.full_prefix, self.swa_prefix, self.n_layer, self.n
        if worst_case:
            largest = table[7]  # both kinds of attention and the output layer
            return lambda s, j: mem[j] - mem[s] + largest

        def needs(s: int, j: int) -> int:
            t = j if j <= top else top
            code = 4 * (full[t] > full[s]) + 2 * (swa[t] > swa[s]) + (j == n)
            return mem[j] - mem[s] + table[code]

        return needs


def _pool(inventory: Inventory, request: PlacementRequest, scale: float = 1.0) -> list[_Device]:
    """Usable devices with their capacity; `scale` shrinks free memory for margins."""
    out = []
    for node in sorted(inventory.nodes, key=lambda n: n.name):
        if not node.healthy:
            continue
        rtt = node.rtt_ms if node.rtt_ms is not None else request.cost.default_rtt_ms
        for device in node.devices:
            if not device.healthy:
                continue
            reserve = math.ceil(device.memory_total_mib * request.reserve_percent / 100)
            free = math.floor(device.memory_free_mib * scale)
            out.append(
                _Device(
                    node=node.name,
                    id=device.id,
                    backend=device.backend,
                    capacity=(free - reserve) * MIB,
                    free_mib=device.memory_free_mib,
                    bandwidth=request.cost.bandwidth(device.backend, device.bandwidth_gbps),
                    rtt=rtt,
                )
            )
    return out


def _cached_nodes(inventory: Inventory, model_file: str) -> frozenset[str]:
    return frozenset(
        n.name for n in inventory.nodes if any(c == model_file for c in n.cached_models)
    )


def _host_rtt(devices: Sequence[_Device], host: str) -> float:
    """The host node's round trip (its devices all carry it)."""
    return next((d.rtt for d in devices if d.node == host), 0.0)


def _fixed_ms(problem: _Problem, device: _Device, host: str, host_rtt: float) -> float:
    # A hop crosses both the device's link and the host's: it costs the round trip
    # of the farther of the two nodes, so a far node is no cheaper as the host.
    return problem.cost.device_ms(
        0.0, device.bandwidth, max(device.rtt, host_rtt), device.node == host
    )


def _best_host(problem: _Problem, devices: Sequence[_Device]) -> str:
    """The used node that, as the host, makes the hops cheapest."""
    cost: dict[str, float] = {}
    for host in dict.fromkeys(d.node for d in devices):
        rtt = _host_rtt(devices, host)
        cost[host] = sum(_fixed_ms(problem, d, host, rtt) for d in devices)
    return min(cost, key=lambda n: (cost[n], n))


def _finish(
    problem: _Problem,
    *,
    order: Sequence[_Device],
    ranges: Sequence[tuple[int, int]],
    host: str | None,
    cached: frozenset[str],
    slack: float = 1.0,
    held_mib: Mapping[tuple[str, str], int] | None = None,
) -> _Candidate | None:
    """A candidate from devices and their ranges, or None if a device overflows.

    `slack` > 1 is for a plan already serving: where free memory dropped by up to
    the stability margin it may stay, as long as it holds no more on a device
    than it does now (`held_mib`); a device where it would grow gets no slack."""
    used = [(d, r) for d, r in zip(order, ranges, strict=True) if r[1] > r[0]]
    if not used:
        return None
    estimate = estimate_memory(problem.profile, problem.serving, [r for _, r in used])
    # A device fits by the same budget the search used for its range (which takes
    # a device holding the output layer as holding two repeating layers too), or by
    # the exact estimate where that is larger: the search and an exhaustive check
    # of layouts agree on what fits, and the plan reports the exact estimate.
    budget = problem.range_bytes(len(used) > 1)
    for (device, (first, last)), mem in zip(used, estimate.devices, strict=True):
        # With slack > 1 (a plan already serving), the reserve is kept but the free
        # memory may have dropped by the stability margin.
        limit = device.capacity
        if slack != 1.0:
            held = (held_mib or {}).get((device.node, device.id))
            if held is None or mem.total <= held * MIB:
                limit = _slack_capacity(device, slack)
        if max(mem.total, budget(first, last)) > limit:
            return None
    used_devices = [d for d, _ in used]
    nodes = tuple(dict.fromkeys(d.node for d in used_devices))
    if host is None or host not in nodes:
        host = _best_host(problem, used_devices)
    host_rtt = _host_rtt(used_devices, host)
    placements = []
    total = 0.0
    bottleneck = 0.0
    for (device, (first, last)), mem in zip(used, estimate.devices, strict=True):
        reads = problem.read_prefix[last] - problem.read_prefix[first]
        ms = _fixed_ms(problem, device, host, host_rtt) + reads * problem.cost.ms_per_byte(
            device.bandwidth
        )
        total += ms
        bottleneck = max(bottleneck, ms)
        placements.append(
            DevicePlacement(
                node=device.node,
                device=device.id,
                backend=device.backend,
                first_layer=first,
                last_layer=last,
                weights_bytes=mem.weights,
                kv_bytes=mem.kv,
                compute_bytes=mem.compute,
                free_mib=device.free_mib,
                capacity_bytes=device.capacity,
                bandwidth_gbps=device.bandwidth,
                time_ms=ms,
            )
        )
    return _Candidate(
        devices=tuple(placements),
        host=host,
        nodes=nodes,
        total_ms=total,
        bottleneck_ms=bottleneck,
        host_bytes=estimate.host,
        cached=sum(1 for n in nodes if n in cached),
    )


def _slack_capacity(device: _Device, slack: float) -> int:
    """Capacity with the free memory scaled up by `slack`, the reserve unchanged."""
    reserve_bytes = device.free_mib * MIB - device.capacity
    return math.floor(device.free_mib * slack) * MIB - reserve_bytes


def _node_devices(devices: Sequence[_Device]) -> list[_Device]:
    """A node's devices in llama.cpp order: its RPC server exposes them together,
    fastest last; among equals the roomiest last, which then holds the output layer."""
    return sorted(devices, key=lambda d: (d.bandwidth, d.capacity, d.id))
