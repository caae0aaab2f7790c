"""llama.cpp's `-ts` rule, both ways."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh_operator.planner import PlannerInputError, layers_for_split, split_for_layers

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("split", "n", "expected"),
    [
        # Recorded: gemma-3-270m (19 device layers) with -ts 1,1,1 and 5,3,2.
        ([1, 1, 1], 19, [(0, 7), (7, 13), (13, 19)]),
        ([5, 3, 2], 19, [(0, 10), (10, 16), (16, 19)]),
        ([1, 1], 19, [(0, 10), (10, 19)]),
        ([1, 0, 1], 4, [(0, 2), (2, 2), (2, 4)]),
        ([24103.0, 24103.0, 24103.0], 19, [(0, 7), (7, 13), (13, 19)]),  # default: free MiB
        ([0.5], 33, [(0, 33)]),
    ],
)
def test_layers_for_split(split: list[float], n: int, expected: list[tuple[int, int]]) -> None:
    assert layers_for_split(split, n) == expected


@given(
    counts=st.lists(st.integers(min_value=0, max_value=130), min_size=1, max_size=16).filter(
        lambda c: sum(c) > 0
    )
)
def test_layer_counts_as_split_give_back_those_counts(counts: list[int]) -> None:
    ranges = layers_for_split(split_for_layers(counts), sum(counts))
    assert [b - a for a, b in ranges] == counts


@pytest.mark.parametrize("split", [[], [0, 0], [-1, 2]])
def test_bad_splits(split: list[float]) -> None:
    with pytest.raises(PlannerInputError):
        layers_for_split(split, 10)
