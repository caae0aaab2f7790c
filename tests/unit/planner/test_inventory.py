"""The inventory format: parsing, validation and its one-line errors."""

from __future__ import annotations

from typing import Any

import pytest

from mesh_operator.planner import PlannerInputError, parse_inventory

pytestmark = pytest.mark.unit


def _doc(**device: Any) -> dict[str, Any]:
    base = {"id": "CUDA0", "backend": "cuda", "memoryTotalMiB": 24576, "memoryFreeMiB": 23800}
    base.update(device)
    return {"nodes": [{"name": "gpu-a", "rttMs": 0.4, "devices": [base]}]}


def test_the_documented_example_parses() -> None:
    doc = _doc(bandwidthGBps=936)
    doc["nodes"][0]["cachedModels"] = []
    node = parse_inventory(doc).nodes[0]
    assert (node.name, node.rtt_ms, node.devices[0].memory_free_mib) == ("gpu-a", 0.4, 23800)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            _doc(memoryFreeMiB=-5),
            r"nodes\[0\]\.devices\[0\]\.memoryFreeMiB: "
            r"Input should be greater than or equal to 0 \(got -5\)",
        ),
        (
            _doc(memoryFreeMiB=None),
            r"nodes\[0\]\.devices\[0\]\.memoryFreeMiB: Input should be a valid integer",
        ),
        (
            {"nodes": [{"name": "a", "devices": [{"id": "CUDA0", "memoryTotalMiB": 1}]}]},
            r"nodes\[0\]\.devices\[0\]\.memoryFreeMiB: missing",
        ),
        (_doc(memoryFreeMiB=30000), r"memoryFreeMiB 30000 exceeds memoryTotalMiB 24576"),
        (_doc(backend="metal"), r"devices\[0\]\.backend: Input should be"),
        (_doc(speed=1), r"devices\[0\]\.speed: Extra inputs are not permitted"),
        ({"nodes": [{"name": "a"}, {"name": "a"}]}, r"node name 'a' appears twice"),
        ({}, r"nodes: missing"),
        ([], r"expected a mapping with 'nodes', got list"),
    ],
)
def test_bad_inventories_say_what_and_where(doc: Any, message: str) -> None:
    with pytest.raises(PlannerInputError, match=message) as info:
        parse_inventory(doc, source="nodes.yaml")
    assert str(info.value).startswith("nodes.yaml: ") and "\n" not in str(info.value)
