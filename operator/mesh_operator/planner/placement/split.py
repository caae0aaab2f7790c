"""The layer split: contiguous layer ranges over devices in a fixed order.

Dynamic programs over the layers, given each device's capacity, fixed cost per
token and cost per byte read: `_split_latency` minimizes the summed time,
`_split_balanced` the slowest stage (then the summed time). Each range is
charged the compute buffer its own layers need (`_Problem.range_bytes`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

from mesh_operator.planner.placement.problem import _Problem


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
