"""How llama.cpp turns `--tensor-split` into layers per device, and back.

Owns the mapping both ways. llama.cpp normalizes the split into cumulative
fractions (in 32-bit floats) and gives device layer `il` (0..n_layer, the last
being the output layer) to the first device whose cumulative fraction exceeds
`il / (n_layer + 1)`. The planner writes the layer counts themselves as the
split, which that rule maps back to exactly those counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mesh_operator.planner.errors import PlannerInputError


def layers_for_split(split: Sequence[float], n_device_layers: int) -> list[tuple[int, int]]:
    """`[first, last)` layers per device that llama.cpp derives from `-ts split`.

    Assumes every layer is offloaded (`-ngl` >= n_device_layers), as mesh runs it.
    """
    if not split or any(s < 0 for s in split) or sum(split) <= 0:
        raise PlannerInputError(f"tensor split {list(split)} must be >= 0 with a positive sum")
    if n_device_layers <= 0:
        raise PlannerInputError("a model has at least one device layer")
    # Same arithmetic as llama_model::load_tensors: running float sums, normalized.
    cumulative = np.cumsum(np.asarray(split, dtype=np.float32), dtype=np.float32)
    cumulative = (cumulative / cumulative[-1]).astype(np.float32)
    positions = np.arange(n_device_layers, dtype=np.float32) / np.float32(n_device_layers)
    owners = np.searchsorted(cumulative, positions, side="right")
    ranges: list[tuple[int, int]] = []
    start = 0
    for device in range(len(split)):
        end = start + int(np.count_nonzero(owners == device))
        ranges.append((start, end))
        start = end
    return ranges


def split_for_layers(counts: Sequence[int]) -> list[int]:
    """The integer `-ts` that gives each device exactly `counts[i]` layers."""
    if not counts or any(c < 0 for c in counts) or sum(counts) <= 0:
        raise PlannerInputError(f"layer counts {list(counts)} must be >= 0 with a positive sum")
    return [int(c) for c in counts]
