"""Placement: which devices serve a model, in which order, with which layers.

Owns the search. For a set of nodes, an output node and a host node, the
devices are laid out in llama.cpp's order (each node's RPC server exposes its
devices together; the output node last, its fastest device last, so that device
holds the output layer) and a dynamic program over contiguous layer ranges finds
the split that minimizes the predicted time per token (`latency`) — or the
slowest stage, for prefill pipelines (`balanced`) — with every device's weights
+ KV + compute buffer (the one its own range needs) within its free memory minus
the reserve. Every set of nodes, output node and host is in scope; a branch and
bound (`_Search`, with the lower bounds of `bounds`) finds the same plan as
planning them all (`_search_every_set`) while planning only a handful. Among
plans within 2% of the best, fewer nodes, then nodes that cache the model, win.

Stability: given the plan a model is served with, the planner keeps it while
it still fits (allowing the free memory it was planned on to have dropped by
`stability_percent`) unless a plan that fits with that much margin is
`improvement_percent` faster or uses fewer nodes at no cost.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from mesh_operator.planner.bounds import (
    Envelope,
    ReadCurve,
    StageCurve,
    StageDevice,
    bucket_of,
    devices_needed,
    fixed_lower_bound,
    least_fixed,
    reads_lower_bound,
    speed_buckets,
    stage_lower_bound,
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
# Work one pass of the search may do, in units of about 5 us of this Python:
# bounding a partial node set is one, a bound on the slowest stage one per layer,
# a plan one per device and layer (three for `balanced`, which bisects). Latency
# plans of 500-node pools need a few thousand to some 80 000. The budget stops
# the search (once it holds a plan) where very many node sets are nearly as
# good, as happens for `balanced` on pools of many equal or near-equal nodes.
_WORK_BUDGET = 200_000
_SEED_PLANS = 2  # hosts and output nodes tried per seed set, most promising first
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
        (with `worst_case`, the largest buffer any range can need, as the previous
        search budgeted)."""
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
    *,
    worst_case: bool = False,
) -> list[tuple[int, int]] | None:
    """Contiguous ranges minimizing the summed time, or None if nothing fits.

    dp[j] is the least time to place layers [0, j) on the devices so far; a
    device either is skipped or takes [s, j) with s in a window bounded below by
    its memory (and by `time_cap`), kept as a sliding minimum. `caps` are the
    devices' capacities; each range is charged its own compute buffer, which
    only grows with the range, so the window stays a window.
    """
    n = problem.n
    needs = problem.range_bytes(len(caps) > 1, worst_case)
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
                while lo < j and (needs(lo, j) > cap or rd[j] - rd[lo] > budget):
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
    *,
    worst_case: bool = False,
) -> bool:
    """Whether every layer fits with no device's stage above `limit` ms."""
    needs = problem.range_bytes(len(caps) > 1, worst_case)
    rd = problem.read_prefix
    pos = 0
    for cap, f, m in zip(caps, fixed, per_byte, strict=True):
        if cap <= 0 or f > limit:
            continue
        j = pos
        while j < problem.n and needs(pos, j + 1) <= cap and f + (rd[j + 1] - rd[pos]) * m <= limit:
            j += 1
        pos = j
        if pos == problem.n:
            return True
    return pos == problem.n


def _split_balanced(
    problem: _Problem,
    caps: Sequence[int],
    fixed: Sequence[float],
    per_byte: Sequence[float],
    *,
    worst_case: bool = False,
) -> list[tuple[int, int]] | None:
    """Ranges minimizing the slowest stage, then the summed time."""

    def fits(limit: float) -> bool:
        return _fill(problem, caps, fixed, per_byte, limit, worst_case=worst_case)

    if not fits(math.inf):
        return None
    lo = 0.0
    hi = sum(fixed) + problem.read_prefix[-1] * max(per_byte)
    while not fits(hi):
        hi *= 2
    for _ in range(48):
        mid = (lo + hi) / 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return _split_latency(
        problem, caps, fixed, per_byte, time_cap=hi * (1 + 1e-9), worst_case=worst_case
    )


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
    # Bytes it can hold at each speed bucket or faster: alone (a lone device
    # budgets the smaller compute buffer), and in a set of several devices.
    alone: tuple[float, ...]
    shared: tuple[float, ...]
    alone_caps: tuple[float, ...]  # device budgets, as alone
    shared_caps: tuple[float, ...]  # device budgets, as shared
    # (ms per byte, budget, how many) of its devices, for the slowest-stage bound.
    alone_kinds: tuple[tuple[float, float, int], ...]
    shared_kinds: tuple[tuple[float, float, int], ...]


@dataclass(frozen=True)
class _Set:
    """A node set with its devices (at most MAX_DEVICES) and its lower bounds."""

    members: tuple[int, ...]  # node indices, ascending (= name order)
    devices: tuple[tuple[_Device, ...], ...]  # per member, in llama.cpp order
    cached: int
    # (objective bound, summed-time bound, host, output node) for every host and
    # output node that can hold the output layer, most promising first.
    plans: tuple[tuple[float, float, int, int], ...]
    fewest_devices: int


@dataclass(frozen=True)
class _Prefix:
    """Running sums of a partial node set in the depth-first enumeration."""

    members: tuple[int, ...] = ()
    profile: tuple[float, ...] = ()
    caps: tuple[float, ...] = ()
    remote: tuple[float, ...] = ()  # per member
    spare: tuple[int, ...] = ()  # per member: devices beyond the first
    max_saving: float = -math.inf
    slowest_remote: tuple[float, float] = (-math.inf, -math.inf)  # the two largest
    cached: int = 0
    stages: tuple[StageDevice, ...] = ()  # its devices, for the slowest-stage bound
    stage_floor: float = 0.0  # every member holds a layer: the least stage of each


class _Tails:
    """Per suffix of a node order: the best the nodes still to choose can bring."""

    def __init__(self, nodes: Sequence[_Node], order: Sequence[int], k: int) -> None:
        size = len(order)
        self.min_remote = [math.inf] * (size + 1)
        self.max_saving = [-math.inf] * (size + 1)
        self.cached = [0] * (size + 1)
        self.max_cap = [0.0] * (size + 1)
        self.max_devices = [0] * (size + 1)
        self.min_speed = [math.inf] * (size + 1)  # ms per byte of the fastest device
        # The k smallest node indices (= names) of each suffix, ascending.
        self.first_names: list[tuple[int, ...]] = [()] * (size + 1)
        for p in range(size - 1, -1, -1):
            index = order[p]
            node = nodes[index]
            caps = node.alone_caps if k == 1 else node.shared_caps
            self.min_remote[p] = min(self.min_remote[p + 1], node.remote_ms)
            self.max_saving[p] = max(self.max_saving[p + 1], node.saving_ms)
            self.cached[p] = self.cached[p + 1] + node.cached
            self.max_cap[p] = max(self.max_cap[p + 1], caps[0] if caps else 0.0)
            self.max_devices[p] = max(self.max_devices[p + 1], len(caps))
            fastest = min((speed for speed, _, _ in node.shared_kinds), default=math.inf)
            self.min_speed[p] = min(self.min_speed[p + 1], fastest)
            names = self.first_names[p + 1]
            if len(names) < k or index < names[-1]:
                cut = bisect.bisect_left(names, index)
                self.first_names[p] = (*names[:cut], index, *names[cut:])[:k]
            else:
                self.first_names[p] = names


@dataclass(frozen=True)
class _Walk:
    """One depth-first enumeration of the k-sets of a node order."""

    order: Sequence[int]
    k: int
    envelope: Envelope
    tails: _Tails
    second_pass: bool


# A plan with its rank among plans of its size (`_Search.key`).
_Ranked = tuple[tuple[object, ...], _Candidate]


class _Search:
    """Branch and bound over node sets; the exact optimum of `_search_every_set`.

    What a node set may do: every node holds at least one device (a node left
    empty is the smaller set's plan), each node's devices are contiguous in
    llama.cpp order with the non-output nodes in name order and the output node
    last, at most MAX_DEVICES devices (the fastest, ties by node name and id),
    any member as the output node and any member as the host, and the split the
    dynamic program finds for that order. Among plans within 2% of the fastest,
    fewer nodes win, then more cached nodes, then the faster, then the smaller
    summed time, then fewer devices, then lower node names.

    Sets are enumerated by size and, within a size, depth first in order of
    promise (how fast a node could serve the model, the rest going to the
    pool's slowest device); a partial set is dropped when a lower bound
    (`bounds`) for every set it can grow into rules it out. The first pass finds
    the best objective, dropping what cannot beat the best plan found. The second
    finds the winner among plans within 2% of it, sizes from one up, dropping
    what cannot beat the best candidate so far on (cached nodes, objective,
    summed time, devices, names): for names, the smallest completion of a
    partial set is its smallest node indices still to come.
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
        # The output layer (the last) apart: it must sit on the output node.
        self.body_curve = ReadCurve(memory[:-1], reads[:-1])
        self.output_layer = (memory[-1], reads[-1])
        self.stage_curve = StageCurve(memory, reads)
        self.buckets = speed_buckets([d.bandwidth for ds in by_node.values() for d in ds])
        self.speeds = [cost.ms_per_byte(b) for b in self.buckets]
        floor = problem.compute_floor
        balanced = self.strategy == "balanced"  # only its bound needs device kinds
        nodes = []
        for name in sorted(by_node):
            devices = tuple(_node_devices(by_node[name]))
            remote = cost.device_overhead_ms + cost.hop_ms(devices[0].rtt, False)
            alone, multi = floor[len(devices) > 1], floor[True]
            nodes.append(
                _Node(
                    name=name,
                    devices=devices,
                    cached=name in cached,
                    remote_ms=remote,
                    saving_ms=remote - self.local_ms,
                    alone=self._profile(devices, alone),
                    shared=self._profile(devices, multi),
                    alone_caps=_budgets(devices, alone),
                    shared_caps=_budgets(devices, multi),
                    alone_kinds=self._kinds(devices, alone) if balanced else (),
                    shared_kinds=self._kinds(devices, multi) if balanced else (),
                )
            )
        self.nodes = nodes
        self.sets: dict[tuple[int, ...], _Set | None] = {}
        self.evaluated: dict[tuple[tuple[int, ...], int, int], _Candidate | None] = {}
        self.walks: dict[int, _Walk] = {}
        self.work = 0  # spent in this pass
        self.exhausted = False  # the budget ran out: stop enumerating
        self.stopped = False  # it ran out in some pass: the plan is not proven best
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

    def _reads_bound(self, profile: Sequence[float], curve: ReadCurve | None = None) -> float:
        return reads_lower_bound(curve or self.curve, self.speeds, profile)

    def _kinds(
        self, devices: Iterable[_Device], compute: int
    ) -> tuple[tuple[float, float, int], ...]:
        counts: dict[tuple[float, float], int] = {}
        for d in devices:
            kind = (self.problem.cost.ms_per_byte(d.bandwidth), float(d.capacity - compute))
            counts[kind] = counts.get(kind, 0) + 1
        return tuple((speed, budget, n) for (speed, budget), n in sorted(counts.items()))

    def _stages(
        self, kinds: Iterable[tuple[float, float, int]], fixed: float
    ) -> tuple[tuple[StageDevice, ...], float]:
        """Stage-bound devices of one node at this fixed cost, and the least stage
        of the node holding one layer."""
        stages = tuple((fixed, speed, budget, n) for speed, budget, n in kinds)
        one = self.stage_curve.reads[1] if self.stage_curve.layers else 0.0
        least = min((fixed + speed * one for _, speed, _, _ in stages), default=math.inf)
        return stages, least

    def _objective_from(
        self, latency: float, floor: float, stages: Sequence[StageDevice] = ()
    ) -> float:
        """The strategy's objective bound from a summed-time bound.

        The slowest stage is at least `floor` (the largest fixed cost of a used
        device, or more), at least the average of at most MAX_DEVICES stages,
        and at least what `stage_lower_bound` gives for the devices.
        """
        if self.strategy == "latency":
            return latency
        bound = max(floor, latency / MAX_DEVICES)
        if stages:
            self._spend(self.stage_curve.layers)
            bound = max(bound, stage_lower_bound(self.stage_curve, stages, bound, MAX_DEVICES))
        return bound

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
        """The set with its bounds per host, or None when it cannot hold the model."""
        if members in self.sets:
            return self.sets[members]
        result = None
        devices = self.set_devices(members)
        if devices is not None:
            flat = [d for ds in devices for d in ds]
            problem = self.problem
            compute = problem.compute_floor[len(flat) > 1]
            output_compute = problem.output_compute_floor[len(flat) > 1]
            profile = self._profile(flat, compute)
            reads = self._reads_bound(profile)
            fewest = devices_needed(_budgets(flat, compute), self.curve.total_mass)
            if reads < math.inf and fewest > 0:
                remote = [self.nodes[i].remote_ms for i in members]
                spare = [len(ds) - 1 for ds in devices]
                extra = fewest - len(members)
                # The output layer sits on the output node: its fastest device that holds it.
                body = self._reads_bound(profile, self.body_curve)
                out_memory, out_reads = self.output_layer
                out_speed = [
                    min(
                        (
                            problem.cost.ms_per_byte(d.bandwidth)
                            for d in ds
                            if d.capacity - output_compute >= out_memory
                        ),
                        default=math.inf,
                    )
                    for ds in devices
                ]
                plans = []
                for h in range(len(members)):
                    fixed_floor = fixed_lower_bound(remote, spare, self.local_ms, h, extra)
                    floor = 0.0
                    stages: list[StageDevice] = []
                    if self.strategy == "balanced":
                        for i, ds in enumerate(devices):
                            fixed = self.local_ms if i == h else remote[i]
                            node_stages, least = self._stages(self._kinds(ds, compute), fixed)
                            stages.extend(node_stages)
                            floor = max(floor, least)
                    objective = self._objective_from(reads + fixed_floor, floor, stages)
                    for o, speed in enumerate(out_speed):
                        if speed == math.inf:
                            continue
                        latency = max(reads, body + out_reads * speed) + fixed_floor
                        out_fixed = self.local_ms if o == h else remote[o]
                        out_stage = out_fixed + out_reads * speed
                        plans.append(
                            (
                                max(objective, self._objective_from(latency, out_stage)),
                                latency,
                                h,
                                o,
                            )
                        )
                plans.sort()
                if plans:
                    result = _Set(
                        members=members,
                        devices=devices,
                        cached=sum(1 for i in members if self.nodes[i].cached),
                        plans=tuple(plans),
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
            self._spend(len(order) * problem.n * (3 if self.strategy == "balanced" else 1))
            caps = [d.capacity for d in order]
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

    def _walk(self, order: Sequence[int], k: int, second_pass: bool) -> _Walk:
        if k not in self.walks:
            profiles = [(self.nodes[i].alone if k == 1 else self.nodes[i].shared) for i in order]
            self.walks[k] = _Walk(
                order=order,
                k=k,
                envelope=Envelope(profiles, k - 1),
                tails=_Tails(self.nodes, order, k),
                second_pass=second_pass,
            )
        return replace(self.walks[k], second_pass=second_pass)

    def _descend(self, walk: _Walk, start: int, prefix: _Prefix) -> None:
        """Visit the k-sets extending `prefix` with nodes of order[start:],
        dropping every branch whose bound rules it out."""
        order, k, tails = walk.order, walk.k, walk.tails
        rest = k - len(prefix.members) - 1  # nodes still to add after the next one
        mass = self.curve.total_mass
        for p in range(start, len(order) - rest):
            if self.exhausted:
                return
            self._spend(1)
            index = order[p]
            node = self.nodes[index]
            own = node.alone if k == 1 else node.shared
            own_caps = node.alone_caps if k == 1 else node.shared_caps
            if prefix.members:
                known = [a + b for a, b in zip(prefix.profile, own, strict=True)]
            else:
                known = list(own)
            if rest:
                extra = walk.envelope.at(p + 1, rest)
                reads = self._reads_bound([a + b for a, b in zip(known, extra, strict=True)])
            else:
                reads = self._reads_bound(known)
            if reads == math.inf:
                continue
            caps = (*prefix.caps, *own_caps)
            remote = (*prefix.remote, node.remote_ms)
            spare = (*prefix.spare, len(own_caps) - 1)
            saving = max(prefix.max_saving, node.saving_ms)
            if rest:
                fewest = devices_needed(
                    caps,
                    mass,
                    unknown_capacity=tails.max_cap[p + 1],
                    unknown_count=rest * tails.max_devices[p + 1],
                )
                cheapest = min(self.local_ms, *remote, tails.min_remote[p + 1])
                fixed = (
                    sum(remote)
                    + rest * tails.min_remote[p + 1]
                    - max(saving, tails.max_saving[p + 1])
                    + max(0, fewest - k) * cheapest
                )
            else:
                fewest = devices_needed(caps, mass)
                fixed = least_fixed(remote, spare, self.local_ms, fewest - k)
            if fewest == 0:
                continue
            latency = reads + fixed
            high, second = prefix.slowest_remote
            if node.remote_ms > high:
                high, second = node.remote_ms, high
            elif node.remote_ms > second:
                second = node.remote_ms
            stages = prefix.stages
            stage_floor = prefix.stage_floor
            objective = latency
            if self.strategy == "balanced":
                kinds = node.alone_kinds if k == 1 else node.shared_kinds
                own_stages, least = self._stages(kinds, min(self.local_ms, node.remote_ms))
                stages = (*stages, *own_stages)
                stage_floor = max(stage_floor, least)
                bound_stages: Sequence[StageDevice] = stages
                if rest:
                    # The nodes still to come, as copies of a device better than any of them.
                    coming = (
                        min(self.local_ms, tails.min_remote[p + 1]),
                        tails.min_speed[p + 1],
                        tails.max_cap[p + 1],
                        rest * tails.max_devices[p + 1],
                    )
                    bound_stages = (*stages, coming)
                floor = max(self.local_ms, second, stage_floor)
                objective = self._objective_from(latency, floor, bound_stages)
            members = (*prefix.members, index)
            cached = prefix.cached + node.cached
            if walk.second_pass:
                most_cached = cached + min(rest, tails.cached[p + 1])
                names = tails.first_names[p + 1][:rest]
                if self._beyond(
                    most_cached, objective, latency, max(k, fewest), members, to_come=names
                ):
                    continue
            elif _bound_ns(objective) >= self.best_ns:
                continue
            if not rest:
                self._leaf(tuple(sorted(members)), walk.second_pass)
                continue
            child = _Prefix(
                members=members,
                profile=tuple(known),
                caps=caps,
                remote=remote,
                spare=spare,
                max_saving=saving,
                slowest_remote=(high, second),
                cached=cached,
                stages=stages,
                stage_floor=stage_floor,
            )
            self._descend(walk, p + 1, child)

    def _beyond(
        self,
        most_cached: int,
        objective: float,
        latency: float,
        devices: int,
        members: tuple[int, ...],
        *,
        to_come: tuple[int, ...] = (),
    ) -> bool:
        """Whether sets with these bounds can neither be within 2% of the fastest
        nor beat the second pass's best candidate so far."""
        bound = _bound_ns(objective)
        if bound > self.window_ns:
            return True
        if self.winner is None:
            return False
        floor = (-most_cached, bound, _bound_ns(latency), devices)
        best = self.winner[0]
        if floor != best[:4]:
            return floor > best[:4]
        # Equal so far: only a set with smaller names can still win.
        smallest = tuple(sorted((*members, *to_come)))
        assert isinstance(best[4], tuple)
        return smallest > best[4]

    def _leaf(self, members: tuple[int, ...], second_pass: bool) -> None:
        node_set = self.node_set(members)
        if node_set is None:
            return
        for bound, latency, h, o in node_set.plans:
            if second_pass:
                if self._beyond(node_set.cached, bound, latency, node_set.fewest_devices, members):
                    continue
            elif _bound_ns(bound) >= self.best_ns:
                break
            candidate = self.evaluate(members, members[o], members[h])
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

    def _level_bounds(
        self, k: int, alone_top: Sequence[float], shared_top: Sequence[Sequence[float]]
    ) -> tuple[float, float]:
        """Bounds on the objective of any k-set, and of any set of k or more nodes."""
        remote = min(n.remote_ms for n in self.nodes)
        fixed = min(self.local_ms, remote) + (k - 1) * remote
        floor = max(self.local_ms, remote) if k > 1 else self.local_ms
        this = self._reads_bound(alone_top if k == 1 else shared_top[k])
        # A node alone has at least its room in a set: the widest profile of all.
        widest = [max(a, b) for a, b in zip(alone_top, shared_top[-1], strict=True)]
        beyond = self._reads_bound(widest if k == 1 else shared_top[-1])
        return (
            self._objective_from(this + fixed, floor),
            self._objective_from(beyond + fixed, floor),
        )

    def _seed(self, order: Sequence[int], largest: int) -> None:
        """Plans on the first k nodes in order of promise, for every k.

        `balanced` spreads the model over many nodes, so the first pass, which
        grows sets from one node up, would meet its best plans last; with these
        in hand from the start it drops most smaller sets at once (and, should
        the budget run out, has a good plan to return).
        """
        for k in range(1, largest + 1):
            node_set = self.node_set(tuple(sorted(order[:k])))
            if node_set is None:
                continue
            for _, _, h, o in node_set.plans[:_SEED_PLANS]:
                found = self.evaluate(node_set.members, node_set.members[o], node_set.members[h])
                if found is not None:
                    self.best_ns = min(self.best_ns, _ns(found.objective(self.strategy)))

    def _spend(self, work: int) -> None:
        self.work += work
        # Never before a plan is in hand: a pool that can serve the model gets a plan.
        if self.work > _WORK_BUDGET and self.best_ns < math.inf:
            self.exhausted = self.stopped = True

    def run(self) -> _Candidate | None:
        if not self.nodes:
            return None
        # Every node holds at least one of the model's layers.
        largest = min(MAX_RPC_SERVERS, len(self.nodes), self.problem.n)
        alone_top = _top_profiles([n.alone for n in self.nodes], 1)[1]
        shared_top = _top_profiles([n.shared for n in self.nodes], largest)

        def promise(i: int) -> tuple[float, str]:
            # As if the pool's slowest device could take whatever the node cannot.
            room = [*self.nodes[i].alone[:-1], math.inf]
            return reads_lower_bound(self.curve, self.speeds, room), self.nodes[i].name

        order = sorted(range(len(self.nodes)), key=promise)
        if self.strategy == "balanced":
            self._seed(order, largest)
        # First pass: the best objective.
        for k in range(1, largest + 1):
            this, beyond = self._level_bounds(k, alone_top, shared_top)
            if _bound_ns(beyond) >= self.best_ns or self.exhausted:
                break
            if _bound_ns(this) < self.best_ns:
                self._descend(self._walk(order, k, second_pass=False), 0, _Prefix())
        if self.best_ns == math.inf:
            return None
        # Second pass, by size: the best-ranked plan within 2% of that objective.
        # Past the budget, only among the plans made so far.
        self.window_ns = self.best_ns * (1 + _TIE) + 1e-3
        self.work = 0
        self.exhausted = False
        for k in range(1, largest + 1):
            this, _ = self._level_bounds(k, alone_top, shared_top)
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
            self._descend(self._walk(order, k, second_pass=True), 0, _Prefix())
            if self.winner is not None:
                return self.winner[1]
        return None


def _budgets(devices: Iterable[_Device], compute: int) -> tuple[float, ...]:
    """What each device can hold besides its compute buffer, largest first."""
    return tuple(sorted((float(d.capacity - compute) for d in devices), reverse=True))


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
    search = _Search(problem, pool, cached)
    best = search.run()
    if search.stopped and len(search.nodes) <= _PREVIOUS_SEARCH_NODES:
        # Out of budget (`balanced` on some pools of 12-16 equal-ish nodes): the
        # plan is at least as good as the previous search's, which is affordable here.
        previous = _previous_search(problem, pool, cached)
        plans = [c for c in (best, previous) if c is not None]
        if plans:
            best = _choose(plans, search.strategy)
    return best


def _choose(candidates: Sequence[_Candidate], strategy: Strategy) -> _Candidate:
    """The search's rule between plans found different ways (and the previous
    search's among its own): within 2% of the fastest, fewer nodes, more cached
    nodes, faster, fewer devices, lower names."""
    fastest = min(_ns(c.objective(strategy)) for c in candidates)
    near = [c for c in candidates if _ns(c.objective(strategy)) <= fastest * (1 + _TIE) + 1e-3]
    return min(
        near,
        key=lambda c: (
            len(c.nodes),
            -c.cached,
            _ns(c.objective(strategy)),
            _ns(c.total_ms),
            len(c.devices),
            tuple(sorted(c.nodes)),
            c.nodes,
            c.signature(),
            c.host,
        ),
    )


# -- the previous search ------------------------------------------------------
#
# What mesh searched before the branch and bound: every node set while few, a
# beam of 12 beyond (stopping two sizes after the best last improved), output
# nodes and hosts by rules of thumb, every device budgeted for the largest
# compute buffer. Its plans are all in the branch and bound's scope, so it only
# runs as a floor when the work budget cuts the branch and bound short.

_PREVIOUS_SEARCH_NODES = 16  # pools it runs on: beyond, it took minutes
_EXHAUSTIVE_LIMIT = 128  # node sets per size searched exhaustively
_BEAM_WIDTH = 12
_EXTRA_NODES = 2  # sizes explored past the last that improved
_SMALL_POOL = 8  # pools this small are searched at every size
_ALL_OUTPUTS = 4  # node sets this small try every node as the output node


def _previous_order(devices: Sequence[_Device], output_node: str) -> list[_Device]:
    by_node: dict[str, list[_Device]] = {}
    for d in devices:
        by_node.setdefault(d.node, []).append(d)
    names = [*sorted(n for n in by_node if n != output_node), output_node]
    return [d for name in names for d in _node_devices(by_node[name])]


def _previous_plans(
    problem: _Problem, devices: Sequence[_Device], cached: frozenset[str]
) -> list[_Candidate]:
    if len(devices) > MAX_DEVICES:
        devices = sorted(devices, key=lambda d: (-d.bandwidth, d.node, d.id))[:MAX_DEVICES]
    nodes = sorted({d.node for d in devices})
    potential: dict[str, float] = {}
    for d in devices:
        potential[d.node] = potential.get(d.node, 0.0) + d.rtt
    hosts = sorted(nodes, key=lambda n: (-potential[n], n))[:2]
    if len(nodes) <= _ALL_OUTPUTS:
        outputs = nodes
    else:
        fastest = min(devices, key=lambda d: (-d.bandwidth, d.node, d.id))
        roomiest = min(devices, key=lambda d: (-d.capacity, d.node, d.id))
        outputs = list(dict.fromkeys([fastest.node, roomiest.node, *hosts]))
    plans = list(dict.fromkeys((o, h) for o in outputs for h in dict.fromkeys([*hosts, o])))
    out = []
    for output_node, host in plans:
        order = _previous_order(devices, output_node)
        caps = [d.capacity for d in order]
        fixed = [_fixed_ms(problem, d, host) for d in order]
        per_byte = [problem.cost.ms_per_byte(d.bandwidth) for d in order]
        if problem.request.strategy == "latency":
            ranges = _split_latency(problem, caps, fixed, per_byte, worst_case=True)
        else:
            ranges = _split_balanced(problem, caps, fixed, per_byte, worst_case=True)
        if ranges is None:
            continue
        candidate = _finish(problem, order=order, ranges=ranges, host=host, cached=cached)
        if candidate is not None:
            out.append(candidate)
    return out


def _previous_search(
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
    improved_at: int | None = None
    for k in range(1, min(MAX_RPC_SERVERS, len(names)) + 1):
        if len(names) > _SMALL_POOL and improved_at is not None and k > improved_at + _EXTRA_NODES:
            break
        if math.comb(len(names), k) <= _EXHAUSTIVE_LIMIT:
            subsets: Iterable[tuple[str, ...]] = itertools.combinations(names, k)
        else:
            subsets = sorted({tuple(sorted((*s, n))) for s in beam for n in names if n not in s})
        ranked: list[tuple[tuple[int, float, float], tuple[str, ...]]] = []
        for subset in subsets:
            total_cap = sum(capacity[n] for n in subset)
            chosen = None
            if total_cap >= need:
                devices = [d for n in subset for d in by_node[n]]
                plans = _previous_plans(problem, devices, cached)
                chosen = _choose(plans, strategy) if plans else None
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
    return _choose(found, strategy) if found else None


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
        margin = 1 - request.stability_percent / 100
        kept = _layout_candidate(
            problem,
            pool=pool,
            layout=current.layout,
            host=current.host_node,
            cached=cached,
            slack=1 / margin,
        )
        if kept is not None:
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
