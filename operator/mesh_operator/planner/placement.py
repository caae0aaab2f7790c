"""Placement: which devices serve a model, in which order, with which layers.

Owns the search. For a set of nodes, a host node and an output node, the
devices are laid out in llama.cpp's order (each node's RPC server exposes its
devices together; the output node last, its fastest device last, so that device
holds the output layer) and a dynamic program over contiguous layer ranges finds
the split that minimizes the predicted time per token (`latency`) — or the
slowest stage, for prefill pipelines (`balanced`) — with every device's weights
+ KV + compute buffer within its free memory minus the reserve. Sets of nodes are searched from one
node upwards, exhaustively while small and by beam search beyond; among plans
within 2% of the best, fewer nodes, then nodes that cache the model, win.

Stability: given the plan a model is served with, the planner keeps it while
it still fits (allowing the free memory it was planned on to have dropped by
`stability_percent`) unless a plan that fits with that much margin is
`improvement_percent` faster or uses fewer nodes at no cost.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from itertools import combinations
from typing import Literal

from mesh_operator.planner.errors import PlannerInputError
from mesh_operator.planner.inventory import Inventory
from mesh_operator.planner.memory import (
    MIB,
    ServingParams,
    compute_buffer_bytes,
    estimate_memory,
    kv_geometry,
    layer_memory_bytes,
)
from mesh_operator.planner.profile import ModelProfile
from mesh_operator.planner.tensor_split import split_for_layers
from mesh_operator.planner.timing import CostModel, layer_read_bytes

Strategy = Literal["latency", "balanced"]
STRATEGIES: tuple[Strategy, ...] = ("latency", "balanced")

MAX_RPC_SERVERS = 16  # GGML_RPC_MAX_SERVERS
MAX_DEVICES = 15  # ggml's scheduler holds 16 backends, one of them the host CPU
_EXHAUSTIVE_LIMIT = 128  # node sets per size searched exhaustively
_BEAM_WIDTH = 12
_EXTRA_NODES = 2  # sizes explored past the last that improved
_SMALL_POOL = 8  # pools this small are searched at every size
_ALL_OUTPUTS = 4  # node sets this small try every node as the output node
_TIE = 0.02  # plans within 2% of the best count as equally fast
_GIB = 1 << 30

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
        # Budget the most a device of this model can need; the exact estimate of
        # each device's range is checked afterwards.
        self.compute_multi = compute_buffer_bytes(profile, self.serving, self.geometry, n_devices=2)
        self.compute_single = compute_buffer_bytes(
            profile, self.serving, self.geometry, n_devices=1
        )
        self.model_file = request.model_file or profile.file_name


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


def _fixed_ms(problem: _Problem, device: _Device, host: str) -> float:
    return problem.cost.device_overhead_ms + problem.cost.hop_ms(device.rtt, device.node == host)


def _best_host(problem: _Problem, devices: Sequence[_Device]) -> str:
    """The used node whose hops cost most when remote: the host runs there."""
    saving: dict[str, float] = {}
    for d in devices:
        gain = problem.cost.hop_ms(d.rtt, False) - problem.cost.hop_ms(d.rtt, True)
        saving[d.node] = saving.get(d.node, 0.0) + gain
    return min(saving, key=lambda n: (-saving[n], n))


def _finish(
    problem: _Problem,
    *,
    order: Sequence[_Device],
    ranges: Sequence[tuple[int, int]],
    host: str | None,
    cached: frozenset[str],
    slack: float = 1.0,
) -> _Candidate | None:
    """A candidate from devices and their ranges, or None if a device overflows."""
    used = [(d, r) for d, r in zip(order, ranges, strict=True) if r[1] > r[0]]
    if not used:
        return None
    estimate = estimate_memory(problem.profile, problem.serving, [r for _, r in used])
    for (device, _), mem in zip(used, estimate.devices, strict=True):
        # With slack > 1 (a plan already serving), the reserve is kept but the free
        # memory may have dropped by the stability margin.
        limit = device.capacity if slack == 1.0 else _slack_capacity(device, slack)
        if mem.total > limit:
            return None
    used_devices = [d for d, _ in used]
    nodes = tuple(dict.fromkeys(d.node for d in used_devices))
    if host is None or host not in nodes:
        host = _best_host(problem, used_devices)
    placements = []
    total = 0.0
    bottleneck = 0.0
    for (device, (first, last)), mem in zip(used, estimate.devices, strict=True):
        reads = problem.read_prefix[last] - problem.read_prefix[first]
        ms = _fixed_ms(problem, device, host) + reads * problem.cost.ms_per_byte(device.bandwidth)
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


def _split_latency(
    problem: _Problem,
    caps: Sequence[int],
    fixed: Sequence[float],
    per_byte: Sequence[float],
    time_cap: float = math.inf,
) -> list[tuple[int, int]] | None:
    """Contiguous ranges minimizing the summed time, or None if nothing fits.

    dp[j] is the least time to place layers [0, j) on the devices so far; a
    device either is skipped or takes [s, j) with s in a window bounded below by
    its memory (and by `time_cap`), kept as a sliding minimum.
    """
    n = problem.n
    mem = problem.mem_prefix
    rd = problem.read_prefix
    inf = math.inf
    prev = [inf] * (n + 1)
    prev[0] = 0.0
    back: list[list[int]] = []
    for cap, f, m in zip(caps, fixed, per_byte, strict=True):
        cur = prev[:]
        arg = [-1] * (n + 1)
        if cap > 0 and f <= time_cap:
            window: deque[int] = deque()
            lo = 0
            budget = (time_cap - f) / m if time_cap < inf else inf
            for j in range(1, n + 1):
                s = j - 1
                if prev[s] < inf:
                    value = prev[s] - rd[s] * m
                    while window and prev[window[-1]] - rd[window[-1]] * m >= value:
                        window.pop()
                    window.append(s)
                while lo < j and (mem[j] - mem[lo] > cap or rd[j] - rd[lo] > budget):
                    lo += 1
                while window and window[0] < lo:
                    window.popleft()
                if window:
                    start = window[0]
                    cost = prev[start] + (rd[j] - rd[start]) * m + f
                    if cost < cur[j]:
                        cur[j] = cost
                        arg[j] = start
        back.append(arg)
        prev = cur
    if prev[n] == inf:
        return None
    ranges: list[tuple[int, int]] = [(0, 0)] * len(caps)
    j = n
    for i in range(len(caps) - 1, -1, -1):
        start = back[i][j]
        if start < 0:
            ranges[i] = (j, j)
        else:
            ranges[i] = (start, j)
            j = start
    return ranges if j == 0 else None


def _fill(
    problem: _Problem,
    caps: Sequence[int],
    fixed: Sequence[float],
    per_byte: Sequence[float],
    limit: float,
) -> bool:
    """Whether every layer fits with no device's stage above `limit` ms."""
    mem = problem.mem_prefix
    rd = problem.read_prefix
    pos = 0
    for cap, f, m in zip(caps, fixed, per_byte, strict=True):
        if cap <= 0 or f > limit:
            continue
        j = pos
        while (
            j < problem.n
            and mem[j + 1] - mem[pos] <= cap
            and f + (rd[j + 1] - rd[pos]) * m <= limit
        ):
            j += 1
        pos = j
        if pos == problem.n:
            return True
    return pos == problem.n


def _split_balanced(
    problem: _Problem, caps: Sequence[int], fixed: Sequence[float], per_byte: Sequence[float]
) -> list[tuple[int, int]] | None:
    """Ranges minimizing the slowest stage, then the summed time."""
    if not _fill(problem, caps, fixed, per_byte, math.inf):
        return None
    lo = 0.0
    hi = sum(fixed) + problem.read_prefix[-1] * max(per_byte)
    while not _fill(problem, caps, fixed, per_byte, hi):
        hi *= 2
    for _ in range(48):
        mid = (lo + hi) / 2
        if _fill(problem, caps, fixed, per_byte, mid):
            hi = mid
        else:
            lo = mid
    return _split_latency(problem, caps, fixed, per_byte, time_cap=hi * (1 + 1e-9))


def _device_order(devices: Sequence[_Device], output_node: str) -> list[_Device]:
    """llama.cpp order: nodes contiguous, the output node last, its fastest device last."""
    by_node: dict[str, list[_Device]] = {}
    for d in devices:
        by_node.setdefault(d.node, []).append(d)
    names = [*sorted(n for n in by_node if n != output_node), output_node]
    order: list[_Device] = []
    for name in names:
        # Fastest last; among equals the roomiest, which then holds the output layer.
        order.extend(sorted(by_node[name], key=lambda d: (d.bandwidth, d.capacity, d.id)))
    return order


def _plan_subset(
    problem: _Problem, devices: Sequence[_Device], cached: frozenset[str]
) -> list[_Candidate]:
    """Candidates on exactly this set of nodes' devices (some may stay unused)."""
    if len(devices) > MAX_DEVICES:
        # Orders never depend on free memory, so a small change of it cannot
        # reshuffle a plan (see the stability rule).
        devices = sorted(devices, key=lambda d: (-d.bandwidth, d.node, d.id))[:MAX_DEVICES]
    nodes = sorted({d.node for d in devices})
    potential: dict[str, float] = {}
    for d in devices:
        potential[d.node] = potential.get(d.node, 0.0) + d.rtt
    hosts = sorted(nodes, key=lambda n: (-potential[n], n))[:2]
    # The output layer (often the biggest) sits on the last device: try every node
    # there in small sets, else the fastest, the roomiest and the host candidates.
    if len(nodes) <= _ALL_OUTPUTS:
        outputs = nodes
    else:
        fastest = min(devices, key=lambda d: (-d.bandwidth, d.node, d.id))
        roomiest = min(devices, key=lambda d: (-d.capacity, d.node, d.id))
        outputs = list(dict.fromkeys([fastest.node, roomiest.node, *hosts]))
    plans = list(dict.fromkeys((o, h) for o in outputs for h in dict.fromkeys([*hosts, o])))
    out = []
    for output_node, host in plans:
        order = _device_order(devices, output_node)
        compute = problem.compute_multi if len(order) > 1 else problem.compute_single
        caps = [d.capacity - compute for d in order]
        fixed = [_fixed_ms(problem, d, host) for d in order]
        per_byte = [problem.cost.ms_per_byte(d.bandwidth) for d in order]
        if problem.request.strategy == "latency":
            ranges = _split_latency(problem, caps, fixed, per_byte)
        else:
            ranges = _split_balanced(problem, caps, fixed, per_byte)
        if ranges is None:
            continue
        candidate = _finish(problem, order=order, ranges=ranges, host=host, cached=cached)
        if candidate is not None:
            out.append(candidate)
    return out


def _choose(candidates: Iterable[_Candidate], strategy: Strategy) -> _Candidate | None:
    pool = list(candidates)
    if not pool:
        return None
    best = min(c.objective(strategy) for c in pool)
    near = [c for c in pool if c.objective(strategy) <= best * (1 + _TIE) + 1e-9]
    return min(
        near,
        key=lambda c: (
            len(c.nodes),
            -c.cached,
            c.objective(strategy),
            c.total_ms,
            len(c.devices),
            c.signature(),
        ),
    )


def _search(
    problem: _Problem, pool: Sequence[_Device], cached: frozenset[str]
) -> _Candidate | None:
    by_node: dict[str, list[_Device]] = {}
    for d in pool:
        if d.capacity > 0:
            by_node.setdefault(d.node, []).append(d)
    names = sorted(by_node)
    if not names:
        return None
    capacity = {n: sum(d.capacity for d in by_node[n]) for n in names}
    need = problem.mem_prefix[-1] + problem.compute_single
    strategy = problem.request.strategy
    found: list[_Candidate] = []
    beam: list[tuple[str, ...]] = [()]
    best = math.inf
    improved_at: int | None = None  # size of node set that last improved the best
    for k in range(1, min(MAX_RPC_SERVERS, len(names)) + 1):
        if len(names) > _SMALL_POOL and improved_at is not None and k > improved_at + _EXTRA_NODES:
            break
        if math.comb(len(names), k) <= _EXHAUSTIVE_LIMIT:
            subsets: Iterable[tuple[str, ...]] = combinations(names, k)
        else:
            subsets = sorted({tuple(sorted((*s, n))) for s in beam for n in names if n not in s})
        ranked: list[tuple[tuple[int, float, float], tuple[str, ...]]] = []
        for subset in subsets:
            total_cap = sum(capacity[n] for n in subset)
            chosen = None
            if total_cap >= need:
                devices = [d for n in subset for d in by_node[n]]
                chosen = _choose(_plan_subset(problem, devices, cached), strategy)
            if chosen is None:
                ranked.append(((1, -float(total_cap), 0.0), subset))
                continue
            found.append(chosen)
            objective = chosen.objective(strategy)
            ranked.append(((0, objective, -float(total_cap)), subset))
            if objective < best * (1 - _TIE):
                improved_at = k
            best = min(best, objective)
        ranked.sort()
        beam = [s for _, s in ranked[:_BEAM_WIDTH]]
    return _choose(found, strategy)


def _gib(n: float) -> str:
    return f"{n / _GIB:.1f} GiB"


def _explain(problem: _Problem, pool: Sequence[_Device], request: PlacementRequest) -> str:
    usable = [d for d in pool if d.capacity > 0]
    need = problem.mem_prefix[-1] + problem.compute_single
    reserve = f"{request.reserve_percent:g}% reserve"
    if not usable:
        return (
            f"needs {_gib(need)}; the pool has no healthy device with free memory "
            f"after the {reserve}"
        )
    usable.sort(key=lambda d: -d.capacity)
    top = usable[:MAX_DEVICES]
    avail = sum(d.capacity for d in top)
    largest = usable[0].capacity
    summary = (
        f"pool has {_gib(sum(d.capacity for d in usable))} free after the {reserve} in "
        f"{len(usable)} device{'s' * (len(usable) > 1)} (largest {_gib(largest)})"
    )
    if avail < need:
        return f"needs {_gib(need)} across <={MAX_DEVICES} devices; {summary}"
    if problem.largest_layer + problem.compute_multi > largest:
        return (
            f"needs {_gib(need)}; {summary}, but its largest layer with a compute buffer "
            f"needs {_gib(problem.largest_layer + problem.compute_multi)}"
        )
    return (
        f"needs {_gib(need)} plus {_gib(problem.compute_multi)} of compute buffer per device; "
        f"{summary}, and no split of {problem.n} layers over <={MAX_DEVICES} devices fits"
    )


def _result(
    problem: _Problem, candidate: _Candidate, reason: str, kept: bool = False
) -> PlacementResult:
    devices = candidate.devices
    return PlacementResult(
        feasible=True,
        reason=reason,
        strategy=problem.request.strategy,
        devices=devices,
        tensor_split=tuple(split_for_layers([d.n_layers for d in devices])),
        rpc=candidate.nodes,
        host_node=candidate.host,
        predicted_token_ms=candidate.total_ms,
        bottleneck_ms=candidate.bottleneck_ms,
        host_memory_bytes=candidate.host_bytes,
        kept_current=kept,
        n_device_layers=problem.n,
    )


def _describe(candidate: _Candidate) -> str:
    nodes = ", ".join(candidate.nodes)
    count = len(candidate.devices)
    return (
        f"{len(candidate.nodes)} node{'s' * (len(candidate.nodes) > 1)} ({nodes}), "
        f"{count} device{'s' * (count > 1)}, host on {candidate.host}, "
        f"{candidate.total_ms:.1f} ms/token predicted"
    )


def _layout_candidate(
    problem: _Problem,
    *,
    pool: Sequence[_Device],
    layout: Layout,
    host: str | None,
    cached: frozenset[str],
    slack: float = 1.0,
) -> _Candidate | None:
    index = {(d.node, d.id): d for d in pool}
    order: list[_Device] = []
    for node_name, device_id, _ in layout:
        found = index.get((node_name, device_id))
        if found is None:
            return None
        order.append(found)
    ranges = [(int(r[0]), int(r[1])) for _, _, r in layout]
    expected = 0
    for first, last in ranges:
        if first != expected or last <= first:
            return None
        expected = last
    if expected != problem.n or len({d.node for d in order}) > MAX_RPC_SERVERS:
        return None
    seen: set[str] = set()
    previous = ""
    for d in order:
        if d.node != previous and d.node in seen:
            return None  # a node's devices must be contiguous: one RPC server each
        seen.add(d.node)
        previous = d.node
    return _finish(
        problem,
        order=order,
        ranges=ranges,
        host=host,
        cached=cached,
        slack=slack,
    )


def evaluate_layout(
    profile: ModelProfile,
    inventory: Inventory,
    layout: Layout,
    request: PlacementRequest | None = None,
    host_node: str | None = None,
) -> PlacementResult:
    """Estimate and time a given layout (e.g. a baseline's split); no search.

    The result is infeasible (with the devices still filled in, when they exist)
    if a device's estimate exceeds its free memory minus the reserve.
    """
    request = request or PlacementRequest()
    request.validate()
    problem = _Problem(profile, request)
    pool = _pool(inventory, request)
    cached = _cached_nodes(inventory, problem.model_file)
    candidate = _layout_candidate(problem, pool=pool, layout=layout, host=host_node, cached=cached)
    if candidate is not None:
        return _result(problem, candidate, _describe(candidate))
    # Report what does not fit, with the capacity check relaxed to show the numbers.
    relaxed = [replace(d, capacity=1 << 62) for d in pool]
    loose = _layout_candidate(problem, pool=relaxed, layout=layout, host=host_node, cached=cached)
    if loose is None:
        return PlacementResult(
            feasible=False,
            reason="layout names unknown or unhealthy devices, or its layers do not tile the model",
            strategy=request.strategy,
            n_device_layers=problem.n,
        )
    capacity = {(d.node, d.id): d.capacity for d in pool}
    over = [d for d in loose.devices if d.total_bytes > capacity[(d.node, d.device)]]
    worst = over[0]
    devices = tuple(replace(d, capacity_bytes=capacity[(d.node, d.device)]) for d in loose.devices)
    return replace(
        _result(problem, replace(loose, devices=devices), ""),
        feasible=False,
        reason=(
            f"{worst.node}/{worst.device} needs {_gib(worst.total_bytes)}, has "
            f"{_gib(max(0, capacity[(worst.node, worst.device)]))} after the "
            f"{request.reserve_percent:g}% reserve"
        ),
    )


@dataclass(frozen=True)
class CurrentPlan:
    """The plan a model is served with now, as the stability rule needs it."""

    layout: tuple[tuple[str, str, tuple[int, int]], ...]
    host_node: str | None = None


def plan_placement(
    profile: ModelProfile,
    inventory: Inventory,
    request: PlacementRequest | None = None,
    current: CurrentPlan | PlacementResult | None = None,
) -> PlacementResult:
    """Choose devices, order, split and host for a model. Pure and deterministic."""
    request = request or PlacementRequest()
    request.validate()
    problem = _Problem(profile, request)
    pool = _pool(inventory, request)
    cached = _cached_nodes(inventory, problem.model_file)
    if isinstance(current, PlacementResult):
        current = (
            CurrentPlan(tuple(current.layout()), current.host_node) if current.feasible else None
        )
    if current is not None and current.layout:
        slack = 1 / (1 - request.stability_percent / 100)
        kept = _layout_candidate(
            problem,
            pool=pool,
            layout=current.layout,
            host=current.host_node,
            cached=cached,
            slack=slack,
        )
        if kept is not None:
            margin = 1 - request.stability_percent / 100
            challenger = _search(problem, _pool(inventory, request, margin), cached)
            if challenger is None or not _better(challenger, kept, request):
                return _result(
                    problem, kept, "kept the current plan: " + _describe(kept), kept=True
                )
            fitted = _layout_candidate(
                problem,
                pool=pool,
                layout=[(d.node, d.device, d.layers) for d in challenger.devices],
                host=challenger.host,
                cached=cached,
            )
            if fitted is not None:
                return _result(problem, fitted, _describe(fitted))
    best = _search(problem, pool, cached)
    if best is None:
        return PlacementResult(
            feasible=False,
            reason=_explain(problem, pool, request),
            strategy=request.strategy,
            n_device_layers=problem.n,
        )
    return _result(problem, best, _describe(best))


def _better(challenger: _Candidate, current: _Candidate, request: PlacementRequest) -> bool:
    strategy = request.strategy
    ours = current.objective(strategy)
    theirs = challenger.objective(strategy)
    if theirs < ours * (1 - request.improvement_percent / 100):
        return True
    return len(challenger.nodes) < len(current.nodes) and theirs <= ours
