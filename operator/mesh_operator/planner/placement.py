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

import itertools
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from mesh_operator.planner.bounds import (
    Envelope,
    ReadCurve,
    bucket_of,
    devices_needed,
    fixed_lower_bound,
    reads_lower_bound,
    speed_buckets,
)
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
_TIE = 0.02  # plans within 2% of the best count as equally fast
_BOUND_SLACK = 1e-10  # relative float error a bound may carry against a plan's sum
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


def _node_devices(devices: Sequence[_Device]) -> list[_Device]:
    """A node's devices in llama.cpp order: its RPC server exposes them together,
    fastest last; among equals the roomiest last, which then holds the output layer."""
    return sorted(devices, key=lambda d: (d.bandwidth, d.capacity, d.id))


def _ns(ms: float) -> int:
    """Objectives compare in whole nanoseconds, so float noise never orders two
    plans that are equally fast; names break those ties deterministically."""
    return round(ms * 1e6)


def _bound_ns(ms: float) -> float:
    """A lower bound in the units of `_ns`, safely below despite rounding."""
    if ms == math.inf:
        return math.inf
    return float(round(ms * (1 - _BOUND_SLACK) * 1e6))


@dataclass(frozen=True)
class _Node:
    """A pool node as the search sees it."""

    name: str
    devices: tuple[_Device, ...]  # capacity > 0, in llama.cpp order
    cached: bool
    remote_ms: float  # fixed ms per device and token while not the host's node
    saving_ms: float  # how much less each device costs when the host runs here
    profile: tuple[float, ...]  # bytes it can hold at each speed bucket or faster


@dataclass(frozen=True)
class _Set:
    """A node set with its devices (at most MAX_DEVICES) and its lower bounds."""

    members: tuple[int, ...]  # node indices, ascending (= name order)
    devices: tuple[tuple[_Device, ...], ...]  # per member, in llama.cpp order
    cached: int
    latency_bound: tuple[float, ...]  # per host position: least summed ms/token
    objective_bound: tuple[float, ...]  # per host position: least objective
    fewest_devices: int


@dataclass
class _Prefix:
    """Running sums of a partial node set in the depth-first enumeration."""

    members: tuple[int, ...] = ()
    profile: tuple[float, ...] = ()
    remote_ms: float = 0.0
    max_saving: float = -math.inf
    slowest_remote: tuple[float, float] = (-math.inf, -math.inf)  # the two largest
    cached: int = 0


# (candidate, its node indices) with the rank `_Search.key` gives it.
_Ranked = tuple[tuple[object, ...], _Candidate]


class _Search:
    """Branch and bound over node sets; the exact optimum of `_search_every_set`.

    What a node set may do: every node holds at least one device (a node left
    empty is the smaller set's plan), each node's devices are contiguous in
    llama.cpp order with the non-output nodes in name order and the output node
    last, at most MAX_DEVICES devices (the fastest, ties by node name and id),
    any member as the output node and any member as the host, and the split the
    dynamic program finds for that order. Among plans within 2% of the fastest,
    fewer nodes win, then more cached nodes, then the faster, then fewer
    devices, then lower node names.

    Two passes. The first finds the best objective: sets are enumerated by size
    and, within a size, depth first in order of promise; a partial set is
    dropped when a lower bound (`bounds`) for every set it can grow into is no
    better than the best plan found. The second finds the winner among plans
    within 2% of that objective: sizes from one up, sets in name order, dropping
    a partial set when its bound rules out beating the best candidate so far on
    (cached nodes, objective, summed time, devices, names).
    """

    def __init__(self, problem: _Problem, pool: Sequence[_Device], cached: frozenset[str]) -> None:
        self.problem = problem
        self.strategy = problem.request.strategy
        self.cached_names = cached
        cost = problem.cost
        self.local_ms = cost.device_overhead_ms + cost.hop_ms(0.0, True)
        by_node: dict[str, list[_Device]] = {}
        for d in pool:
            if d.capacity > 0:
                by_node.setdefault(d.node, []).append(d)
        memory = [b - a for a, b in itertools.pairwise(problem.mem_prefix)]
        reads = [b - a for a, b in itertools.pairwise(problem.read_prefix)]
        self.curve = ReadCurve(memory, reads)
        self.buckets = speed_buckets([d.bandwidth for ds in by_node.values() for d in ds])
        self.speeds = [cost.ms_per_byte(b) for b in self.buckets]
        nodes = []
        for name in sorted(by_node):
            devices = tuple(_node_devices(by_node[name]))
            rtt = devices[0].rtt
            remote = cost.device_overhead_ms + cost.hop_ms(rtt, False)
            nodes.append(
                _Node(
                    name=name,
                    devices=devices,
                    cached=name in cached,
                    remote_ms=remote,
                    saving_ms=remote - self.local_ms,
                    # A lone device needs the smaller compute buffer: the most room.
                    profile=self._profile(devices, problem.compute_single),
                )
            )
        self.nodes = nodes
        self.sets: dict[tuple[int, ...], _Set | None] = {}
        self.evaluated: dict[tuple[tuple[int, ...], int, int], _Candidate | None] = {}
        self.best_ns: float = math.inf  # best objective found (first pass)
        self.winner: _Ranked | None = None  # best candidate of this size (second pass)
        self.window_ns: float = math.inf

    # -- bounds ---------------------------------------------------------------

    def _profile(self, devices: Iterable[_Device], compute: int) -> tuple[float, ...]:
        per_bucket = [0.0] * len(self.buckets)
        for d in devices:
            room = d.capacity - compute
            if room > 0:
                per_bucket[bucket_of(self.buckets, d.bandwidth)] += room
        return tuple(itertools.accumulate(per_bucket))

    def _reads_bound(self, profile: Sequence[float]) -> float:
        return reads_lower_bound(self.curve, self.speeds, profile)

    def _objective_from(self, latency: float, fixed_floor: float) -> float:
        """The strategy's objective bound from a summed-time bound.

        The slowest stage is at least the largest fixed cost of a used device
        and at least the average of at most MAX_DEVICES stages.
        """
        if self.strategy == "latency":
            return latency
        return max(fixed_floor, latency / MAX_DEVICES)

    def set_devices(self, members: tuple[int, ...]) -> tuple[tuple[_Device, ...], ...] | None:
        """Each member's devices, keeping the MAX_DEVICES fastest; None if a member
        keeps none (the set cannot use every node)."""
        per_node = [self.nodes[i].devices for i in members]
        if sum(len(ds) for ds in per_node) <= MAX_DEVICES:
            return tuple(per_node)
        # Orders never depend on free memory, so a small change of it cannot
        # reshuffle a plan (see the stability rule).
        ranked = sorted(
            (d for ds in per_node for d in ds), key=lambda d: (-d.bandwidth, d.node, d.id)
        )
        kept = {(d.node, d.id) for d in ranked[:MAX_DEVICES]}
        out = tuple(tuple(d for d in ds if (d.node, d.id) in kept) for ds in per_node)
        return None if any(not ds for ds in out) else out

    def node_set(self, members: tuple[int, ...]) -> _Set | None:
        """The set with its bounds, or None when it cannot hold the model."""
        if members in self.sets:
            return self.sets[members]
        result = None
        devices = self.set_devices(members)
        if devices is not None:
            flat = [d for ds in devices for d in ds]
            problem = self.problem
            compute = problem.compute_multi if len(flat) > 1 else problem.compute_single
            reads = self._reads_bound(self._profile(flat, compute))
            fewest = devices_needed([d.capacity - compute for d in flat], self.curve.total_mass)
            if reads < math.inf and fewest > 0:
                remote = [self.nodes[i].remote_ms for i in members]
                spare = [len(ds) - 1 for ds in devices]
                extra = fewest - len(members)
                latency = []
                objective = []
                for h in range(len(members)):
                    bound = reads + fixed_lower_bound(remote, spare, self.local_ms, h, extra)
                    others = [ms for i, ms in enumerate(remote) if i != h]
                    latency.append(bound)
                    objective.append(self._objective_from(bound, max([self.local_ms, *others])))
                result = _Set(
                    members=members,
                    devices=devices,
                    cached=sum(1 for i in members if self.nodes[i].cached),
                    latency_bound=tuple(latency),
                    objective_bound=tuple(objective),
                    fewest_devices=max(fewest, len(members)),
                )
        self.sets[members] = result
        return result

    # -- one plan -------------------------------------------------------------

    def evaluate(self, members: tuple[int, ...], output: int, host: int) -> _Candidate | None:
        """The plan for this set, output node and host (node indices), if it uses
        every member."""
        key = (members, output, host)
        if key in self.evaluated:
            return self.evaluated[key]
        devices = self.set_devices(members)
        candidate = None
        if devices is not None:
            problem = self.problem
            position = {m: p for p, m in enumerate(members)}
            order = [d for m, ds in zip(members, devices, strict=True) if m != output for d in ds]
            order.extend(devices[position[output]])
            host_name = self.nodes[host].name
            compute = problem.compute_multi if len(order) > 1 else problem.compute_single
            caps = [d.capacity - compute for d in order]
            fixed = [_fixed_ms(problem, d, host_name) for d in order]
            per_byte = [problem.cost.ms_per_byte(d.bandwidth) for d in order]
            if self.strategy == "latency":
                ranges = _split_latency(problem, caps, fixed, per_byte)
            else:
                ranges = _split_balanced(problem, caps, fixed, per_byte)
            if ranges is not None:
                found = _finish(
                    problem, order=order, ranges=ranges, host=host_name, cached=self.cached_names
                )
                if found is not None and len(found.nodes) == len(members):
                    candidate = found
        self.evaluated[key] = candidate
        return candidate

    def key(self, members: tuple[int, ...], c: _Candidate) -> tuple[object, ...]:
        """Rank among plans of one size that are within 2% of the fastest."""
        return (
            -c.cached,
            _ns(c.objective(self.strategy)),
            _ns(c.total_ms),
            len(c.devices),
            members,
            c.nodes,
            c.signature(),
            c.host,
        )

    # -- enumeration ------------------------------------------------------------

    def _descend(self, walk: _Walk, start: int, prefix: _Prefix) -> None:
        """Visit k-sets extending `prefix` with nodes of order[start:], dropping
        branches whose bound says they cannot matter."""
        order, k, envelope, tails = walk.order, walk.k, walk.envelope, walk.tails
        second_pass = walk.second_pass
        rest = k - len(prefix.members) - 1  # nodes still to add after the next one
        local = self.local_ms
        for p in range(start, len(order) - rest):
            index = order[p]
            node = self.nodes[index]
            extra = envelope.at(p + 1, rest)
            base = prefix.profile or (0.0,) * len(node.profile)
            profile = [a + b + c for a, b, c in zip(base, node.profile, extra, strict=True)]
            reads = self._reads_bound(profile)
            if reads == math.inf:
                continue
            saving = max(prefix.max_saving, node.saving_ms)
            remote = prefix.remote_ms + node.remote_ms
            if rest:
                saving = max(saving, tails.max_saving[p + 1])
                remote += rest * tails.min_remote[p + 1]
            latency = reads + remote - saving
            high, second = prefix.slowest_remote
            if node.remote_ms > high:
                high, second = node.remote_ms, high
            elif node.remote_ms > second:
                second = node.remote_ms
            objective = self._objective_from(latency, max(local, second))
            members = (*prefix.members, index)
            cached = prefix.cached + node.cached
            if second_pass:
                most_cached = cached + min(rest, tails.cached[p + 1])
                if self._beyond(most_cached, objective, latency, k, members):
                    continue
            elif _bound_ns(objective) >= self.best_ns:
                continue
            child = _Prefix(
                members=members,
                profile=tuple(a + b for a, b in zip(base, node.profile, strict=True)),
                remote_ms=prefix.remote_ms + node.remote_ms,
                max_saving=max(prefix.max_saving, node.saving_ms),
                slowest_remote=(high, second),
                cached=cached,
            )
            if rest:
                self._descend(walk, p + 1, child)
            else:
                self._leaf(tuple(sorted(members)), second_pass)

    def _beyond(
        self, most_cached: int, objective: float, latency: float, devices: int, members: object
    ) -> bool:
        """Whether sets with these bounds can neither be within 2% of the fastest
        nor beat the second pass's best candidate."""
        bound = _bound_ns(objective)
        if bound > self.window_ns:
            return True
        if self.winner is None:
            return False
        floor = (-most_cached, bound, _bound_ns(latency), devices, members)
        return floor > self.winner[0][:5]

    def _leaf(self, members: tuple[int, ...], second_pass: bool) -> None:
        node_set = self.node_set(members)
        if node_set is None:
            return
        hosts = sorted(range(len(members)), key=lambda h: node_set.objective_bound[h])
        for h in hosts:
            bound = node_set.objective_bound[h]
            if second_pass:
                if self._beyond(
                    node_set.cached,
                    bound,
                    node_set.latency_bound[h],
                    node_set.fewest_devices,
                    members,
                ):
                    continue
            elif _bound_ns(bound) >= self.best_ns:
                break
            for output in members:
                candidate = self.evaluate(members, output, members[h])
                if candidate is None:
                    continue
                objective = _ns(candidate.objective(self.strategy))
                if not second_pass:
                    self.best_ns = min(self.best_ns, objective)
                elif objective <= self.window_ns:
                    self._offer(members, candidate)

    def _offer(self, members: tuple[int, ...], candidate: _Candidate) -> None:
        ranked = (self.key(members, candidate), candidate)
        if self.winner is None or ranked[0] < self.winner[0]:
            self.winner = ranked

    def _level(self, order: Sequence[int], k: int, second_pass: bool) -> None:
        walk = _Walk(
            order=order,
            k=k,
            envelope=Envelope([self.nodes[i].profile for i in order], k - 1),
            tails=_Tails(self.nodes, order),
            second_pass=second_pass,
        )
        self._descend(walk, 0, _Prefix())

    def _level_bounds(self, k: int, pool_top: Sequence[Sequence[float]]) -> tuple[float, float]:
        """Bounds on the objective of any k-set, and of any set of k or more nodes."""
        remote = min(n.remote_ms for n in self.nodes)
        fixed = min(self.local_ms, remote) + (k - 1) * remote
        floor = max(self.local_ms, remote) if k > 1 else self.local_ms
        this = self._reads_bound(pool_top[k]) + fixed
        beyond = self._reads_bound(pool_top[-1]) + fixed
        return self._objective_from(this, floor), self._objective_from(beyond, floor)

    def run(self) -> _Candidate | None:
        if not self.nodes:
            return None
        largest = min(MAX_RPC_SERVERS, len(self.nodes))
        pool_top = _top_profiles([n.profile for n in self.nodes], largest)
        # First pass, most promising nodes first: the best objective.
        promise = sorted(
            range(len(self.nodes)),
            key=lambda i: (self._reads_bound(self.nodes[i].profile), self.nodes[i].name),
        )
        for k in range(1, largest + 1):
            this, beyond = self._level_bounds(k, pool_top)
            if _bound_ns(beyond) >= self.best_ns:
                break
            if _bound_ns(this) < self.best_ns:
                self._level(promise, k, second_pass=False)
        if self.best_ns == math.inf:
            return None
        # Second pass, by size: the best-ranked plan within 2% of that objective.
        self.window_ns = self.best_ns * (1 + _TIE) + 1e-3
        by_name = range(len(self.nodes))
        for k in range(1, largest + 1):
            this, _ = self._level_bounds(k, pool_top)
            if _bound_ns(this) > self.window_ns:
                continue
            self.winner = None
            for (members, _, _), c in self.evaluated.items():
                if (
                    c is not None
                    and len(members) == k
                    and _ns(c.objective(self.strategy)) <= self.window_ns
                ):
                    self._offer(members, c)
            self._level(by_name, k, second_pass=True)
            if self.winner is not None:
                return self.winner[1]
        return None


class _Tails:
    """Per suffix of a node order: what the nodes still to choose can at best bring."""

    def __init__(self, nodes: Sequence[_Node], order: Sequence[int]) -> None:
        size = len(order)
        self.min_remote = [math.inf] * (size + 1)
        self.max_saving = [-math.inf] * (size + 1)
        self.cached = [0] * (size + 1)
        for p in range(size - 1, -1, -1):
            node = nodes[order[p]]
            self.min_remote[p] = min(self.min_remote[p + 1], node.remote_ms)
            self.max_saving[p] = max(self.max_saving[p + 1], node.saving_ms)
            self.cached[p] = self.cached[p + 1] + node.cached


@dataclass(frozen=True)
class _Walk:
    """One depth-first enumeration of the k-sets of a node order."""

    order: Sequence[int]
    k: int
    envelope: Envelope
    tails: _Tails
    second_pass: bool


def _top_profiles(profiles: Sequence[Sequence[float]], r_max: int) -> list[list[float]]:
    """For r = 0..r_max, the most capacity any r nodes have at each speed or faster."""
    buckets = len(profiles[0])
    out = [[0.0] * buckets for _ in range(r_max + 1)]
    for t in range(buckets):
        column = sorted((p[t] for p in profiles), reverse=True)
        total = 0.0
        for r in range(1, r_max + 1):
            total += column[r - 1] if r <= len(column) else 0.0
            out[r][t] = total
    return out


def _search(
    problem: _Problem, pool: Sequence[_Device], cached: frozenset[str]
) -> _Candidate | None:
    return _Search(problem, pool, cached).run()


def _search_every_set(
    problem: _Problem, pool: Sequence[_Device], cached: frozenset[str]
) -> _Candidate | None:
    """What `_search` finds, by planning every node set, output node and host.

    The definition the branch and bound is tested against; exponential in the
    pool's size.
    """
    search = _Search(problem, pool, cached)
    count = len(search.nodes)
    plans: list[tuple[int, tuple[int, ...], _Candidate]] = []
    for k in range(1, min(MAX_RPC_SERVERS, count) + 1):
        for members in itertools.combinations(range(count), k):
            for output in members:
                for host in members:
                    c = search.evaluate(members, output, host)
                    if c is not None:
                        plans.append((k, members, c))
    if not plans:
        return None
    best = min(_ns(c.objective(search.strategy)) for _, _, c in plans)
    window = best * (1 + _TIE) + 1e-3
    near = [(k, m, c) for k, m, c in plans if _ns(c.objective(search.strategy)) <= window]
    return min(near, key=lambda p: (p[0], search.key(p[1], p[2])))[2]


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
