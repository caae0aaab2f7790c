"""System RAM as a tier: where a model goes when the pool's VRAM is short.

Owns the plans that keep part of a model in the host node's RAM, which
llama-server reaches without any worker's help: the routed experts of the
first layers (`--n-cpu-moe k`: `blk.<i>.ffn_(up|down|gate|gate_up)_exps` of
layers i < k in the CPU buffer), then, once every layer's experts are there,
whole first layers with their KV (`-ngl` short by m). The devices then hold the
rest exactly as a plan without RAM would: the model the search sees is the
original with those experts and layers taken out (`tier_profile`), so the
split, the order, the bounds and the ranking are the search's own.

It runs only when nothing fits in VRAM (so a model that fits there never uses
RAM). It first finds the least any plan needs in RAM, wherever hosted; then,
for each of the (at most 16) nodes offering the most RAM (`hostMemoryFreeMiB`)
and enough of it, as the host, the fewest experts, then the fewest whole layers,
that make a plan hosted there fit, with the RAM holding them (weights, the KV of
whole layers, the CPU's compute buffer for them, and the host process itself)
within the node's `hostMemoryFreeMiB`. Among those plans the ranking's rule
picks one.

Time: RAM-resident bytes are read at the node's RAM bandwidth
(`hostMemoryBandwidthGBps`, else the CPU default) and every layer whose experts
sit in RAM sends its activations from its device to the host's CPU and back
(the device's round trips again, local when the device is on the host's node);
whole CPU layers are one more stage on the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

from mesh_operator.planner.inventory import Inventory, InventoryNode
from mesh_operator.planner.memory import (
    F32,
    MIB,
    compute_buffer_bytes,
    kv_geometry,
    layer_kv_bytes,
)
from mesh_operator.planner.placement.problem import _Candidate, _Device, _Problem
from mesh_operator.planner.placement.ranking import _choose
from mesh_operator.planner.placement.search import _search
from mesh_operator.planner.placement.types import DevicePlacement, HostTier, PlacementRequest
from mesh_operator.planner.profile import ModelProfile
from mesh_operator.planner.timing import layer_read_bytes

# Host nodes a RAM-tier plan is searched on, those offering the most RAM first:
# every one costs a few searches.
MAX_TIER_HOSTS = 16


def tier_profile(profile: ModelProfile, moe_layers: int, cpu_layers: int) -> ModelProfile:
    """The model the devices see: layers `[0, cpu_layers)` gone, and the routed
    experts of layers below `moe_layers` taken out of their weights."""
    layers = []
    for il in range(cpu_layers, profile.n_layer):
        layer = profile.layers[il]
        if il < moe_layers:
            layer = replace(
                layer, weight_bytes=layer.weight_bytes - layer.expert_bytes, expert_bytes=0
            )
        layers.append(layer)
    return replace(profile, layers=tuple(layers), n_layer=profile.n_layer - cpu_layers)


def _tier_memory(
    profile: ModelProfile, request: PlacementRequest, moe_layers: int, cpu_layers: int
) -> tuple[int, int, int]:
    """Weights, KV and compute bytes the tier holds in RAM."""
    serving = request.serving
    geometry = kv_geometry(profile, serving)
    weights = sum(layer.weight_bytes for layer in profile.layers[:cpu_layers])
    weights += sum(layer.expert_bytes for layer in profile.layers[cpu_layers:moe_layers])
    kv = sum(layer_kv_bytes(profile, serving, geometry)[:cpu_layers])
    if not weights:
        return 0, 0, 0
    if not cpu_layers:
        # The CPU runs the routed experts: their three FFN-wide rows per token of
        # a ubatch (llama.cpp's log: the host CPU's compute buffer grows by this).
        return weights, kv, 3 * profile.ffn_active_width * geometry.ubatch * F32
    whole = profile.layers[:cpu_layers]
    # The CPU runs whole layers: budget the largest buffer a device of this
    # model needs for layers without the output.
    compute = compute_buffer_bytes(
        profile,
        serving,
        geometry,
        n_devices=2,
        has_full=not whole or any(not layer.is_swa for layer in whole),
        has_swa=not whole or any(layer.is_swa for layer in whole),
        holds_output=False,
    )
    return weights, kv, compute


def _least(fits: Callable[[int], bool], low: int, high: int) -> int | None:
    """The smallest x in [low, high] with fits(x), fits being monotone; None if none."""
    if low > high or not fits(high):
        return None
    while low < high:
        middle = (low + high) // 2
        if fits(middle):
            high = middle
        else:
            low = middle + 1
    return low


def _shift(devices: Sequence[DevicePlacement], by: int) -> tuple[DevicePlacement, ...]:
    return tuple(
        replace(d, first_layer=d.first_layer + by, last_layer=d.last_layer + by) for d in devices
    )


class _TierSearch:
    """The RAM-tier plans of one call: per host node, the least in RAM that fits."""

    def __init__(
        self,
        profile: ModelProfile,
        inventory: Inventory,
        request: PlacementRequest,
        pool: Sequence[_Device],
        cached: frozenset[str],
    ) -> None:
        self.profile = profile
        self.inventory = inventory
        self.request = request
        self.pool = pool
        self.cached = cached
        self.rtts = {
            n.name: n.rtt_ms if n.rtt_ms is not None else request.cost.default_rtt_ms
            for n in inventory.nodes
        }
        self.plans: dict[tuple[str | None, int, int], _Candidate | None] = {}

    def hosted(self, host: str | None, moe_layers: int, cpu_layers: int) -> _Candidate | None:
        """The search's plan (hosted on `host`, if given) for what the devices still hold."""
        key = (host, moe_layers, cpu_layers)
        if key not in self.plans:
            devices_see = tier_profile(self.profile, moe_layers, cpu_layers)
            problem = _Problem(devices_see, self.request)
            self.plans[key] = _search(problem, self.pool, self.cached, host)
        return self.plans[key]

    def least(self, host: str | None, floor: tuple[int, int] = (0, 0)) -> tuple[int, int] | None:
        """The fewest experts, then whole layers, in RAM that let the devices of a
        plan (hosted on `host`, if given) hold the rest: (moe_layers, cpu_layers),
        no less than `floor`.

        Taking more out of the devices only ever frees VRAM, so the least that
        fits is found by bisection."""
        n_layer = self.profile.n_layer
        has_experts = any(layer.expert_bytes for layer in self.profile.layers)
        low_moe, low_cpu = floor
        if has_experts and not low_cpu:
            k = _least(lambda x: self.hosted(host, x, 0) is not None, max(1, low_moe), n_layer)
            if k is not None:
                return k, 0
        moe = n_layer if has_experts else 0
        m = _least(lambda x: self.hosted(host, moe, x) is not None, max(1, low_cpu), n_layer - 1)
        return None if m is None else (moe, m)

    def on(self, host: InventoryNode, floor: tuple[int, int]) -> _Candidate | None:
        """The plan with its tier in `host`'s RAM, if that RAM holds the least tier
        (more in RAM only needs more RAM). A plan hosted anywhere needs at least
        `floor` in RAM."""
        chosen = self.least(host.name, floor)
        if chosen is None:
            return None
        moe, cpu = chosen
        found = self.hosted(host.name, moe, cpu)
        assert found is not None  # what the bisection found
        return self.attach(found, host, moe, cpu)

    def attach(
        self, found: _Candidate, host: InventoryNode, moe: int, cpu: int, slack: float = 1.0
    ) -> _Candidate | None:
        """A plan of the devices (layers counted from `cpu`) with its tier in
        `host`'s RAM, if that RAM holds it (`slack` > 1: a plan already serving,
        whose RAM may have shrunk by the stability margin)."""
        weights, kv, compute = _tier_memory(self.profile, self.request, moe, cpu)
        room = math.floor(host.host_memory_free_mib * slack) * MIB
        if weights + kv + compute + found.host_bytes > room:
            return None
        devices = _shift(found.devices, cpu)
        bandwidth = self.request.cost.bandwidth("cpu", host.host_memory_bandwidth_gbps)
        ms = self.tier_ms(devices, host.name, bandwidth, moe, cpu)
        tier = HostTier(
            node=host.name,
            moe_layers=moe,
            cpu_layers=cpu,
            weights_bytes=weights,
            kv_bytes=kv,
            compute_bytes=compute,
            free_mib=host.host_memory_free_mib,
            bandwidth_gbps=bandwidth,
            time_ms=ms,
        )
        return replace(
            found,
            devices=devices,
            total_ms=found.total_ms + ms,
            bottleneck_ms=max(found.bottleneck_ms, ms),
            tier=tier,
        )

    def tier_ms(
        self,
        devices: Sequence[DevicePlacement],
        host: str,
        bandwidth: float,
        moe_layers: int,
        cpu_layers: int,
    ) -> float:
        """The tier's share of a token: its bytes at RAM speed, and the round trips
        of the layers whose experts it runs."""
        profile, cost, serving = self.profile, self.request.cost, self.request.serving
        reads = layer_read_bytes(profile, serving, kv_geometry(profile, serving))
        read = sum(reads[:cpu_layers])
        ms = cost.device_overhead_ms if cpu_layers else 0.0
        for il in range(cpu_layers, moe_layers):
            read += profile.layers[il].expert_bytes * profile.expert_fraction
            device = next(d for d in devices if d.first_layer <= il < d.last_layer)
            ms += cost.hop_ms(self.rtts[device.node], device.node == host)
        return ms + read * cost.ms_per_byte(bandwidth)


def ram_tier_plan(
    profile: ModelProfile,
    inventory: Inventory,
    request: PlacementRequest,
    pool: Sequence[_Device],
    cached: frozenset[str],
) -> _Candidate | None:
    """The best plan that keeps part of the model in a host's RAM, or None.

    The least any plan needs in RAM, wherever hosted, comes first: a node whose
    RAM cannot hold that is no host, and when no plan fits with it, none does.
    Of the other nodes, the `MAX_TIER_HOSTS` offering the most RAM are tried."""
    if not any(n.healthy and n.host_memory_free_mib > 0 for n in inventory.nodes):
        return None
    search = _TierSearch(profile, inventory, request, pool, cached)
    floor = search.least(None)
    if floor is None:
        return None
    need = sum(_tier_memory(profile, request, *floor))
    hosts = sorted(
        (n for n in inventory.nodes if n.healthy and n.host_memory_free_mib * MIB >= need),
        key=lambda n: (-n.host_memory_free_mib, n.name),
    )[:MAX_TIER_HOSTS]
    plans = [plan for node in hosts if (plan := search.on(node, floor)) is not None]
    return _choose(plans, request.strategy) if plans else None
