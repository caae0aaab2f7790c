"""The branch and bound over node sets, output nodes and hosts.

`_search` is the planner's search: `_Search` enumerates node sets by size,
drops a partial set when a lower bound (`bounds`) for every set it can grow
into rules it out, and plans the rest with the layer split (`split`). It finds
the plan that planning every set, output node and host and ranking them by
`ranking` would choose, while planning only a handful. A work budget stops it
where very many sets are nearly equally good; on pools of up to 16 nodes, the
beam search of `previous` then runs as well and the better plan is kept.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

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
from mesh_operator.planner.placement.previous import _PREVIOUS_SEARCH_NODES, _previous_search
from mesh_operator.planner.placement.problem import (
    _Candidate,
    _Device,
    _finish,
    _fixed_ms,
    _node_devices,
    _Problem,
)
from mesh_operator.planner.placement.ranking import _choose, _ns, _rank, _window
from mesh_operator.planner.placement.split import _split_balanced, _split_latency
from mesh_operator.planner.placement.types import MAX_DEVICES, MAX_RPC_SERVERS

_BOUND_SLACK = 1e-10  # relative float error a bound may carry against a plan's sum
# Work one pass of the search may do, in units of about 5 us of this Python:
# bounding a partial node set is one, a bound on the slowest stage one per layer,
# a plan one per device and layer (three for `balanced`, which bisects). Latency
# plans of 500-node pools need a few thousand to some 80 000. The budget stops
# the search (once it holds a plan) where very many node sets are nearly as
# good, as happens for `balanced` on pools of many equal or near-equal nodes.
_WORK_BUDGET = 200_000
_SEED_PLANS = 2  # hosts and output nodes tried per seed set, most promising first


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


# A plan with its rank (`ranking._rank`).
_Ranked = tuple[tuple[object, ...], _Candidate]


class _Search:
    """Branch and bound over node sets; the exact optimum of planning them all.

    What a node set may do: every node holds at least one device (a node left
    empty is the smaller set's plan), each node's devices are contiguous in
    llama.cpp order with the non-output nodes in name order and the output node
    last, at most MAX_DEVICES devices (the fastest, ties by node name and id),
    any member as the output node and any member as the host, and the split the
    dynamic program finds for that order. Plans rank by `ranking._rank`: within
    2% of the fastest, fewer nodes, then more cached nodes, then the faster, then
    the smaller summed time, then fewer devices, then lower node names.

    Sets are enumerated by size and, within a size, depth first in order of
    promise (how fast a node could serve the model, the rest going to the
    pool's slowest device); a partial set is dropped when a lower bound
    (`bounds`) for every set it can grow into rules it out. The first pass finds
    the best objective, dropping what cannot beat the best plan found. The second
    finds the winner among plans within 2% of it, sizes from one up, dropping
    what cannot beat the best candidate so far on (cached nodes, objective,
    summed time, devices, names): for names, the smallest completion of a
    partial set takes the smallest node indices (= names) still to come.
    """

    def __init__(
        self,
        problem: _Problem,
        pool: Sequence[_Device],
        cached: frozenset[str],
        host: str | None = None,
    ) -> None:
        self.problem = problem
        # Only plans hosted on this node (the RAM tier lives in the host's RAM);
        # dropping plans leaves every bound a lower bound.
        self.host = host
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
                    if self.host is not None and self.nodes[members[h]].name != self.host:
                        continue
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
            host_rtt = self.nodes[host].devices[0].rtt
            fixed = [_fixed_ms(problem, d, host_name, host_rtt) for d in order]
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
        size = len(members) + len(to_come)
        floor = (size, -most_cached, bound, _bound_ns(latency), devices)
        best = self.winner[0]
        if floor != best[:5]:
            return floor > best[:5]
        # Equal so far: only a set with smaller names can still win.
        smallest = tuple(self.nodes[i].name for i in sorted((*members, *to_come)))
        assert isinstance(best[5], tuple)
        return smallest > best[5]

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
                self._offer(candidate)

    def _offer(self, candidate: _Candidate) -> None:
        ranked = (_rank(candidate, self.strategy), candidate)
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
        self.window_ns = _window(self.best_ns)
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
                    self._offer(c)
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
    problem: _Problem, pool: Sequence[_Device], cached: frozenset[str], host: str | None = None
) -> _Candidate | None:
    """The best plan; with `host`, the best plan hosted on that node."""
    search = _Search(problem, pool, cached, host)
    best = search.run()
    if search.stopped and len(search.nodes) <= _PREVIOUS_SEARCH_NODES:
        # Out of budget (`balanced` on pools of 8-16 equal-ish nodes): the beam
        # search, affordable here, often finds a better plan (see `previous`).
        previous = _previous_search(problem, pool, cached)
        if previous is not None and host is not None and previous.host != host:
            previous = None
        plans = [c for c in (best, previous) if c is not None]
        if plans:
            best = _choose(plans, search.strategy)
    return best
