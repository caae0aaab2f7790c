"""The pool as the planner sees it: nodes, their devices, free memory, RTT, caches.

Owns the inventory format of `mesh plan --inventory` (YAML, camelCase, the same
field names as MeshNode's devices), the type the operator and the CLI both feed
the planner. Validation errors are one line naming the field, e.g.
`nodes[1].devices[0].memoryFreeMiB: ...`.

`memoryFreeMiB` is what the planner may use before the reserve: the operator
passes free memory with this model's own current servers counted as free and
other models' plans counted as used (the ledger).

`hostMemoryFreeMiB` (per node, absent = 0) is the system RAM llama.cpp may use on
that node beyond what its devices already offer (a CPU-only node's CPU device
already is its RAM: 0 there), the RAM tier the planner falls back on when VRAM is
short; `hostMemoryBandwidthGBps` is that RAM's bandwidth (0 = the CPU default).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from mesh_operator.planner.errors import PlannerInputError

Backend = Literal["cuda", "rocm", "vulkan", "cpu"]


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class InventoryDevice(_Model):
    id: str = Field(min_length=1, max_length=32)
    backend: Backend = "cuda"
    memory_total_mib: int = Field(ge=0, alias="memoryTotalMiB")
    memory_free_mib: int = Field(ge=0, alias="memoryFreeMiB")
    bandwidth_gbps: float = Field(default=0.0, ge=0, alias="bandwidthGBps")
    healthy: bool = True

    @model_validator(mode="after")
    def _free_within_total(self) -> InventoryDevice:
        if self.memory_free_mib > self.memory_total_mib:
            raise ValueError(
                f"memoryFreeMiB {self.memory_free_mib} exceeds memoryTotalMiB "
                f"{self.memory_total_mib}"
            )
        return self


class InventoryNode(_Model):
    name: str = Field(min_length=1, max_length=253)
    rtt_ms: float | None = Field(default=None, ge=0, alias="rttMs")
    cached_models: tuple[str, ...] = ()
    healthy: bool = True
    devices: tuple[InventoryDevice, ...] = ()
    host_memory_free_mib: int = Field(default=0, ge=0, alias="hostMemoryFreeMiB")
    host_memory_bandwidth_gbps: float = Field(default=0.0, ge=0, alias="hostMemoryBandwidthGBps")

    @model_validator(mode="after")
    def _unique_devices(self) -> InventoryNode:
        seen: set[str] = set()
        for device in self.devices:
            if device.id in seen:
                raise ValueError(f"device id {device.id!r} appears twice")
            seen.add(device.id)
        return self


class Inventory(_Model):
    nodes: tuple[InventoryNode, ...]

    @model_validator(mode="after")
    def _unique_nodes(self) -> Inventory:
        seen: set[str] = set()
        for node in self.nodes:
            if node.name in seen:
                raise ValueError(f"node name {node.name!r} appears twice")
            seen.add(node.name)
        return self

    def node(self, name: str) -> InventoryNode | None:
        return next((n for n in self.nodes if n.name == name), None)


def _location(loc: Iterable[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_inventory(data: Any, source: str = "inventory") -> Inventory:
    """Validate an inventory document (already parsed from YAML or JSON)."""
    if not isinstance(data, Mapping):
        raise PlannerInputError(
            f"{source}: expected a mapping with 'nodes', got {type(data).__name__}"
        )
    try:
        return Inventory.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = _location(first["loc"])
        message = first["msg"]
        if first["type"] == "missing":
            message = "missing"
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        got = first.get("input")
        suffix = (
            f" (got {got!r})"
            if first["type"] not in ("missing", "value_error")
            and not isinstance(got, Mapping | list)
            else ""
        )
        raise PlannerInputError(f"{source}: {where or 'document'}: {message}{suffix}") from None
