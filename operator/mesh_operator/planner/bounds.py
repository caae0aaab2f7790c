"""Lower bounds on the time per token of any plan on a set of nodes.

Owns the arithmetic that lets the placement search skip node sets without
planning them. Every bound here is below the predicted time of every plan the
search could make on the set, so skipping a set whose bound is already worse
than a plan in hand never changes the result.

- Reads: a relaxation in which layers may be cut anywhere. Placing the model's
  memory on devices of known capacity and speed, the cheapest fractional
  placement puts the layers that read the most per byte stored on the fastest
  devices first (the costs are a product of "ms per byte" and "reads per byte",
  so the greedy matching of the two orders is optimal). A real plan keeps whole
  layers in llama.cpp's order and within each device's budget, so it can only
  cost more. Capacity enters as a cumulative profile: the bytes available at
  each speed or faster. More capacity at every speed never costs more, so a
  profile that is at least every candidate's profile (an envelope) bounds them all.
- Fixed costs: every node of a plan holds at least one device, every used
  device pays its per-token overhead and round trips, and the model needs at
  least as many devices as it takes to hold its bytes.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections.abc import Sequence

# More distinct bandwidths than this are merged into faster buckets: merging a
# device into a faster bucket only lowers a bound, so it stays a bound.
MAX_SPEED_BUCKETS = 16


class ReadCurve:
    """The model's bytes read per token against bytes stored, densest layers first.

    `reads_within(m)` is the most a placement can read per token from `m` bytes
    of the model's memory (cutting layers where needed).
    """

    def __init__(self, memory: Sequence[int], reads: Sequence[float]) -> None:
        # Layers that read something but store nothing go first (infinite density).
        pairs = sorted(
            zip(memory, reads, strict=True),
            key=lambda p: -(p[1] / p[0]) if p[0] > 0 else -math.inf,
        )
        self.mass = [0.0]
        self.reads = [0.0]
        for m, r in pairs:
            self.mass.append(self.mass[-1] + m)
            self.reads.append(self.reads[-1] + r)
        self.total_mass = self.mass[-1]
        self.total_reads = self.reads[-1]

    def reads_within(self, mass: float) -> float:
        if mass >= self.total_mass:
            return self.total_reads
        if mass <= 0:
            return self.reads[bisect.bisect_right(self.mass, 0.0) - 1]
        i = bisect.bisect_right(self.mass, mass) - 1
        span = self.mass[i + 1] - self.mass[i]
        share = (mass - self.mass[i]) / span if span > 0 else 0.0
        return self.reads[i] + (self.reads[i + 1] - self.reads[i]) * share


def speed_buckets(bandwidths: Sequence[float]) -> list[float]:
    """Representative bandwidths, fastest first, at most MAX_SPEED_BUCKETS of them.

    Each device is counted in the slowest bucket at least as fast as it
    (`bucket_of`); the fastest bandwidth is always a bucket.
    """
    distinct = sorted(set(bandwidths), reverse=True)
    if len(distinct) <= MAX_SPEED_BUCKETS:
        return distinct
    step = math.ceil(len(distinct) / MAX_SPEED_BUCKETS)
    return distinct[::step]


def bucket_of(buckets: Sequence[float], bandwidth: float) -> int:
    """Index of the slowest bucket whose bandwidth is >= `bandwidth` (buckets descend)."""
    lo, hi = 0, len(buckets) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if buckets[mid] >= bandwidth:
            lo = mid
        else:
            hi = mid - 1
    return lo


def reads_lower_bound(
    curve: ReadCurve, ms_per_byte: Sequence[float], cumulative: Sequence[float]
) -> float:
    """Least read time of the whole model on a cumulative capacity profile.

    `ms_per_byte[t]` ascends (fastest bucket first); `cumulative[t]` is the
    capacity in buckets 0..t. Infinite when the profile cannot hold the model.
    """
    cost = 0.0
    placed_reads = 0.0
    for speed, capacity in zip(ms_per_byte, cumulative, strict=True):
        if capacity >= curve.total_mass:
            return cost + speed * (curve.total_reads - placed_reads)
        reads = curve.reads_within(capacity)
        cost += speed * (reads - placed_reads)
        placed_reads = reads
    return math.inf


def devices_needed(
    capacities: Sequence[float],
    mass: float,
    *,
    unknown_capacity: float = 0.0,
    unknown_count: int = 0,
) -> int:
    """Fewest devices whose capacities add up to `mass`, largest first; 0 if they
    cannot. Up to `unknown_count` more devices of at most `unknown_capacity`
    each may join (devices of nodes not chosen yet)."""
    if mass <= 0:
        return 1
    known = sorted((c for c in capacities if c > 0), reverse=True)
    total = 0.0
    count = 0
    i = 0
    left = unknown_count if unknown_capacity > 0 else 0
    while total < mass:
        if i < len(known) and (left == 0 or known[i] >= unknown_capacity):
            total += known[i]
            i += 1
        elif left > 0:
            total += unknown_capacity
            left -= 1
        else:
            return 0
        count += 1
    return count


def fixed_lower_bound(
    remote_ms: Sequence[float],
    spare_devices: Sequence[int],
    local_ms: float,
    host: int,
    extra_devices: int,
) -> float:
    """Least fixed time per token when every node uses one device, the host's
    devices are local, and `extra_devices` more devices are used where cheapest
    (`spare_devices[i]` more exist on node i)."""
    base = local_ms + sum(ms for i, ms in enumerate(remote_ms) if i != host)
    if extra_devices <= 0:
        return base
    slots: list[float] = []
    for i, (ms, spare) in enumerate(zip(remote_ms, spare_devices, strict=True)):
        slots.extend([local_ms if i == host else ms] * spare)
    if len(slots) < extra_devices:
        return math.inf
    slots.sort()
    return base + sum(slots[:extra_devices])


class Envelope:
    """For each suffix of a node order and each count r, the most capacity any r
    nodes of the suffix have at each speed or faster (summed per bucket
    separately, so it is at least every r-subset's profile)."""

    def __init__(self, profiles: Sequence[Sequence[float]], r_max: int) -> None:
        n = len(profiles)
        buckets = len(profiles[0]) if profiles else 0
        self.r_max = r_max
        zero = [0.0] * buckets
        # table[i][r] is the envelope of r nodes among profiles[i:].
        self.table: list[list[list[float]]] = [
            [zero] + [[0.0] * buckets for _ in range(r_max)] for _ in range(n + 1)
        ]
        for t in range(buckets if r_max else 0):
            top: list[float] = []  # ascending, the r_max largest values so far
            for i in range(n - 1, -1, -1):
                bisect.insort(top, profiles[i][t])
                if len(top) > r_max:
                    del top[0]
                row = self.table[i]
                total = 0.0
                for r in range(1, r_max + 1):
                    if r <= len(top):
                        total += top[-r]
                    row[r][t] = total

    def at(self, start: int, r: int) -> list[float]:
        if r > self.r_max:
            raise ValueError(f"envelope built for at most {self.r_max} nodes, asked for {r}")
        return self.table[start][r]


def least_fixed(
    remote_ms: Sequence[float], spare_devices: Sequence[int], local_ms: float, extra_devices: int
) -> float:
    """`fixed_lower_bound` with the best host for it."""
    if extra_devices <= 0:
        # The host saves most on the node whose remote devices cost most.
        return local_ms + sum(remote_ms) - max(remote_ms)
    return min(
        fixed_lower_bound(remote_ms, spare_devices, local_ms, h, extra_devices)
        for h in range(len(remote_ms))
    )


class StageCurve:
    """The layers in llama.cpp's order, for the bound on the slowest stage.

    A device whose stage stays within T ms holds j consecutive layers with
    `fixed + ms_per_byte * reads <= T` and their memory within its budget, so
    the j consecutive layers that read least, and the j that store least, fit
    too. Counting, for every device, how many layers can fit under T gives an
    upper bound on the layers the devices can take; T is feasible only if that
    count reaches the model's layer count.
    """

    def __init__(self, memory: Sequence[int], reads: Sequence[float]) -> None:
        self.layers = len(reads)
        read_prefix = list(itertools.accumulate(reads, initial=0.0))
        memory_prefix = list(itertools.accumulate(memory, initial=0))
        n = self.layers
        # Least reads and memory of any j consecutive layers, j = 0..n.
        self.reads = [0.0] + [
            min(read_prefix[s + j] - read_prefix[s] for s in range(n - j + 1))
            for j in range(1, n + 1)
        ]
        self.memory = [0] + [
            min(memory_prefix[s + j] - memory_prefix[s] for s in range(n - j + 1))
            for j in range(1, n + 1)
        ]
        # The last layer (the output layer) ends the last device's range.
        self.last = (reads[-1], memory[-1]) if reads else (0.0, 0)

    def most_layers(self, capacity: float) -> int:
        return bisect.bisect_right(self.memory, capacity) - 1


# A kind of device for the stage bound: fixed ms, ms per byte, budget, how many.
StageDevice = tuple[float, float, float, int]


def stage_lower_bound(
    curve: StageCurve, devices: Sequence[StageDevice], floor: float, max_devices: int
) -> float:
    """Least slowest stage of any split of the layers over at most `max_devices`
    of these devices, at least `floor`; infinite if they cannot hold every layer.

    Raising T from below, each device's count of layers steps up at its
    breakpoints `fixed + ms_per_byte * reads[j]`; the answer is the first
    breakpoint at which the `max_devices` largest counts add up to the layers.
    """
    last_reads, last_memory = curve.last
    needed = curve.layers
    limits = [curve.most_layers(capacity) for _, _, capacity, _ in devices]
    heap: list[tuple[float, int, int]] = []
    holds_last = math.inf
    for i, (fixed, speed, capacity, _) in enumerate(devices):
        if limits[i] >= 1:
            heapq.heappush(heap, (fixed + speed * curve.reads[1], i, 1))
        if capacity >= last_memory:
            holds_last = min(holds_last, fixed + speed * last_reads)
    capped = sum(n for _, _, _, n in devices) > max_devices
    counts = [0] * len(devices)
    total = 0
    while heap:
        value, i, j = heapq.heappop(heap)
        counts[i] = j
        if capped:
            left = max_devices
            total = 0
            for c, k in sorted(((counts[k], k) for k in range(len(devices))), reverse=True):
                take = min(left, devices[k][3])
                total += take * c
                left -= take
                if not left:
                    break
        else:
            total += devices[i][3]
        if total >= needed:
            return max(value, floor, holds_last)
        if j < limits[i]:
            fixed, speed, _, _ = devices[i]
            heapq.heappush(heap, (fixed + speed * curve.reads[j + 1], i, j + 1))
    return math.inf
