"""A node's round trip to the rest of its pool, from the round trips agents measured.

The one rule the agent (its `status.roundTripMs`) and the operator (the planner's
per-node RTT) share. Pure.

Each agent lists its medians to the peers it probed (`status.roundTrips`). A pair
measured from both ends counts once, at the mean of the two. A node's round trip
is the lower median of its pairs with the other nodes considered: a node behind a
slow link is far from most of its peers and so counts as far, while its peers,
each far from it alone, stay near; with three nodes of which one is far, the near
two see one near and one far peer, and the lower median calls them near.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from mesh_operator.api.meshnode import MeshNodeStatus


def lower_median(values: Iterable[float]) -> float:
    """The lower of the two middle values (the middle one for an odd count)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    return ordered[(len(ordered) - 1) // 2]


def pair_round_trips(
    meshnodes: Mapping[str, MeshNodeStatus], nodes: Iterable[str]
) -> dict[str, dict[str, float]]:
    """Per node of `nodes`, its measured round trip (ms) to each other node of `nodes`."""
    members = set(nodes)
    seen: dict[frozenset[str], list[float]] = {}
    for name in members:
        status = meshnodes.get(name)
        if status is None:
            continue
        for trip in status.round_trips:
            if trip.node in members and trip.node != name:
                seen.setdefault(frozenset((name, trip.node)), []).append(trip.ms)
    pairs: dict[str, dict[str, float]] = {}
    for pair, values in seen.items():
        a, b = sorted(pair)
        ms = sum(values) / len(values)
        pairs.setdefault(a, {})[b] = ms
        pairs.setdefault(b, {})[a] = ms
    return pairs


def node_round_trips(
    meshnodes: Mapping[str, MeshNodeStatus], nodes: Iterable[str]
) -> dict[str, float]:
    """Each node's round trip to the others of `nodes` (absent: nothing measured)."""
    return {
        name: round(lower_median(peers.values()), 3)
        for name, peers in pair_round_trips(meshnodes, nodes).items()
    }
