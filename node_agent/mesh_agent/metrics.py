"""The agent's Prometheus metrics, produced through OpenTelemetry.

Every instrument is an observable one whose callback reads the latest `Snapshot`
(swapped in whole by the agent after each cycle), so a scrape never waits for
NVML and always shows the last complete picture. The OpenTelemetry Prometheus
reader writes into this agent's own `CollectorRegistry` under the prefix `mesh_`,
without scope labels, so names and labels are exactly the ones in docs/agent.md
whether or not DCGM runs beside it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest

from mesh_agent.inventory import Inventory
from mesh_agent.rpc_liveness import RpcProbe
from mesh_operator.api.meshnode import MeshNodeStatus

PREFIX = "mesh"


@dataclass(frozen=True)
class Snapshot:
    """What the last cycle saw; replaced whole, never mutated."""

    inventory: Inventory | None = None
    status: MeshNodeStatus | None = None
    probes: tuple[RpcProbe, ...] = ()
    cycle_seconds: float | None = None


@dataclass
class PublishStats:
    """Counters the publishing loop updates (under the GIL, from one task)."""

    results: dict[str, int] = field(default_factory=dict)
    last_success_monotonic: float | None = None

    def count(self, result: str) -> None:
        self.results[result] = self.results.get(result, 0) + 1


@dataclass(frozen=True)
class _DeviceRow:
    labels: dict[str, str]
    total: int
    free: int
    used: int
    mesh: int
    others: int
    bandwidth_bytes: float
    utilization: float | None
    temperature: float | None
    power: float | None
    ecc: int | None
    retired: int | None
    xids: dict[int, int]
    state: str
    reason: str
    name: str
    backend: str


class AgentMetrics:
    """OpenTelemetry meters over a private Prometheus registry."""

    def __init__(self, node: str, stats: PublishStats | None = None) -> None:
        self.node = node
        self.stats = stats or PublishStats()
        self.snapshot = Snapshot()
        # The device rows of one snapshot, built once for all the instruments
        # that read them in a scrape (scrapes run on one thread).
        self._rows_of: tuple[Snapshot, list[_DeviceRow]] = (self.snapshot, [])
        self.registry = CollectorRegistry(auto_describe=False)
        reader = PrometheusMetricReader(
            disable_target_info=True,
            prefix=PREFIX,
            scope_info_enabled=False,
            registry=self.registry,
        )
        self._provider = MeterProvider(
            metric_readers=[reader],
            resource=Resource.create({"service.name": "mesh-agent"}),
        )
        meter = self._provider.get_meter("mesh_agent")
        gauges: list[tuple[str, str, str, Callable[[], Iterable[Observation]]]] = [
            (
                "gpu_info",
                "",
                "Device identity: name and backend as labels; always 1.",
                self._per_device(lambda r: 1.0, info=True),
            ),
            (
                "gpu_memory_total_bytes",
                "By",
                "Device memory size.",
                self._per_device(lambda r: r.total),
            ),
            (
                "gpu_memory_free_bytes",
                "By",
                "Device memory free now.",
                self._per_device(lambda r: r.free),
            ),
            (
                "gpu_memory_used_bytes",
                "By",
                "Device memory in use by anyone.",
                self._per_device(lambda r: r.used),
            ),
            (
                "gpu_memory_used_by_mesh_bytes",
                "By",
                "Device memory held by mesh's own llama.cpp servers.",
                self._per_device(lambda r: r.mesh),
            ),
            (
                "gpu_memory_used_by_others_bytes",
                "By",
                "Device memory held by anything that is not mesh's.",
                self._per_device(lambda r: r.others),
            ),
            (
                "gpu_memory_bandwidth_bytes_per_second",
                "",
                "Memory bandwidth: theoretical for a GPU, measured for the CPU device.",
                self._per_device(lambda r: r.bandwidth_bytes),
            ),
            (
                "gpu_utilization_ratio",
                "",
                "GPU busy time over NVML's last sample period, 0-1.",
                self._per_device(lambda r: r.utilization),
            ),
            (
                "gpu_temperature_celsius",
                "",
                "GPU core temperature.",
                self._per_device(lambda r: r.temperature),
            ),
            ("gpu_power_watts", "", "Board power draw.", self._per_device(lambda r: r.power)),
            (
                "gpu_retired_pages",
                "",
                "Pages retired or rows remapped after uncorrectable errors.",
                self._per_device(lambda r: r.retired),
            ),
            (
                "gpu_health_state",
                "",
                "1 for the device's current health state and reason.",
                self._per_device(lambda r: 1.0, health=True),
            ),
            (
                "node_health_state",
                "",
                "1 for the node's current health state and reason.",
                self._node_health,
            ),
            (
                "node_heartbeat_age_seconds",
                "s",
                "Seconds since the agent last wrote its MeshNode heartbeat.",
                self._heartbeat_age,
            ),
            ("node_nvml_available", "", "1 when NVML answers on this node.", self._nvml_available),
            ("node_cached_models", "", "GGUF files in the node's model cache.", self._cached_count),
            (
                "node_cached_model_bytes",
                "By",
                "Bytes of GGUF files in the node's model cache.",
                self._cached_bytes,
            ),
            (
                "node_host_memory_free_bytes",
                "By",
                "System RAM offered to the RAM tier beside the node's GPUs (0 on a CPU node).",
                self._host_memory,
            ),
            (
                "rpc_server_up",
                "",
                "1 when the RPC server answers HELLO or is busy with its client.",
                self._rpc_up,
            ),
            ("rpc_server_state", "", "1 for the RPC server's probe state.", self._rpc_state),
            (
                "node_round_trip_seconds",
                "s",
                "Median measured round trip to another node's agent, by peer node.",
                self._round_trips,
            ),
            (
                "agent_cycle_duration_seconds",
                "s",
                "Time the last inventory cycle took.",
                self._cycle,
            ),
        ]
        for name, unit, description, callback in gauges:
            meter.create_observable_gauge(
                name, callbacks=[_adapt(callback)], unit=unit, description=description
            )
        counters: list[tuple[str, str, Callable[[], Iterable[Observation]]]] = [
            ("gpu_xid_errors", "XID events seen since the agent started, by XID code.", self._xids),
            (
                "gpu_ecc_uncorrectable_errors",
                "Uncorrectable ECC errors since the driver loaded (volatile counter).",
                self._per_device(lambda r: r.ecc),
            ),
            (
                "agent_publish",
                "MeshNode writes by result (ok or the failure kind).",
                self._publish_results,
            ),
        ]
        for name, description, callback in counters:
            meter.create_observable_counter(
                name, callbacks=[_adapt(callback)], description=description
            )

    # -- feeding ---------------------------------------------------------------

    def update(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (runs the callbacks)."""
        return generate_latest(self.registry)

    def shutdown(self) -> None:
        self._provider.shutdown()

    # -- rows ------------------------------------------------------------------

    def _rows(self) -> list[_DeviceRow]:
        snap = self.snapshot
        cached, rows = self._rows_of
        if cached is not snap:
            rows = self._build_rows(snap)
            self._rows_of = (snap, rows)
        return rows

    def _build_rows(self, snap: Snapshot) -> list[_DeviceRow]:
        if snap.inventory is None or snap.status is None:
            return []
        inv = snap.inventory
        health = {d.id: d.health for d in snap.status.devices}
        rows: list[_DeviceRow] = []
        for gpu in inv.nvml.gpus:
            device = f"CUDA{gpu.index}"
            h = health.get(device)
            rows.append(
                _DeviceRow(
                    labels={
                        "node": self.node,
                        "gpu": str(gpu.index),
                        "uuid": gpu.uuid,
                        "device": device,
                    },
                    total=gpu.memory_total_bytes,
                    free=gpu.memory_free_bytes,
                    used=gpu.memory_used_bytes,
                    mesh=gpu.memory_used_by_mesh_bytes,
                    others=gpu.memory_used_by_others_bytes,
                    bandwidth_bytes=gpu.bandwidth_gbps * 1e9,
                    utilization=(
                        gpu.utilization_percent / 100
                        if gpu.utilization_percent is not None
                        else None
                    ),
                    temperature=gpu.temperature_c,
                    power=gpu.power_w,
                    ecc=gpu.ecc_uncorrectable,
                    retired=gpu.retired_pages,
                    xids=gpu.xid_counts,
                    state=h.state if h else "Unknown",
                    reason=h.reason if h else "Unknown",
                    name=gpu.name,
                    backend="cuda",
                )
            )
        if inv.cpu_device:
            cpu = inv.cpu
            h = health.get("CPU")
            rows.append(
                _DeviceRow(
                    labels={"node": self.node, "gpu": "0", "uuid": "", "device": "CPU"},
                    total=cpu.memory_total_bytes,
                    free=cpu.memory_free_bytes,
                    used=cpu.memory_total_bytes - cpu.memory_free_bytes,
                    mesh=cpu.memory_used_by_mesh_bytes,
                    others=cpu.memory_used_by_others_bytes,
                    bandwidth_bytes=(inv.cpu_bandwidth_gbps or 0.0) * 1e9,
                    utilization=None,
                    temperature=None,
                    power=None,
                    ecc=None,
                    retired=None,
                    xids={},
                    state=h.state if h else "Unknown",
                    reason=h.reason if h else "Unknown",
                    name=cpu.model,
                    backend="cpu",
                )
            )
        return rows

    def _per_device(
        self,
        value: Callable[[_DeviceRow], float | int | None],
        *,
        info: bool = False,
        health: bool = False,
    ) -> Callable[[], Iterable[Observation]]:
        def observe() -> Iterable[Observation]:
            for row in self._rows():
                v = value(row)
                if v is None:
                    continue
                labels = dict(row.labels)
                if info:
                    labels.update(name=row.name, backend=row.backend)
                if health:
                    labels.update(state=row.state, reason=row.reason)
                yield Observation(v, labels)

        return observe

    def _xids(self) -> Iterable[Observation]:
        for row in self._rows():
            for xid, count in sorted(row.xids.items()):
                yield Observation(count, {**row.labels, "xid": str(xid)})

    def _node_health(self) -> Iterable[Observation]:
        status = self.snapshot.status
        if status is not None:
            yield Observation(
                1, {"node": self.node, "state": status.health.state, "reason": status.health.reason}
            )

    def _heartbeat_age(self) -> Iterable[Observation]:
        last = self.stats.last_success_monotonic
        if last is not None:
            yield Observation(time.monotonic() - last, {"node": self.node})

    def _nvml_available(self) -> Iterable[Observation]:
        inv = self.snapshot.inventory
        if inv is not None:
            yield Observation(1 if inv.nvml.available else 0, {"node": self.node})

    def _cached_count(self) -> Iterable[Observation]:
        inv = self.snapshot.inventory
        if inv is not None:
            yield Observation(len(inv.cached), {"node": self.node})

    def _cached_bytes(self) -> Iterable[Observation]:
        inv = self.snapshot.inventory
        if inv is not None:
            yield Observation(sum(f.size_bytes for f in inv.cached), {"node": self.node})

    def _host_memory(self) -> Iterable[Observation]:
        inv = self.snapshot.inventory
        if inv is not None:
            yield Observation(inv.host_memory_free_bytes, {"node": self.node})

    def _rpc_labels(self, probe: RpcProbe) -> dict[str, str]:
        return {
            "node": self.node,
            "model": probe.target.model,
            "endpoint": f"{probe.target.host}:{probe.target.port}",
        }

    def _rpc_up(self) -> Iterable[Observation]:
        for probe in self.snapshot.probes:
            yield Observation(1 if probe.answering else 0, self._rpc_labels(probe))

    def _rpc_state(self) -> Iterable[Observation]:
        for probe in self.snapshot.probes:
            yield Observation(1, {**self._rpc_labels(probe), "state": probe.state.value})

    def _round_trips(self) -> Iterable[Observation]:
        status = self.snapshot.status
        if status is not None:
            for trip in status.round_trips:
                yield Observation(trip.ms / 1000.0, {"node": self.node, "peer": trip.node})

    def _cycle(self) -> Iterable[Observation]:
        if self.snapshot.cycle_seconds is not None:
            yield Observation(self.snapshot.cycle_seconds, {"node": self.node})

    def _publish_results(self) -> Iterable[Observation]:
        for result, count in sorted(self.stats.results.items()):
            yield Observation(count, {"node": self.node, "result": result})


def _adapt(
    observe: Callable[[], Iterable[Observation]],
) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def callback(options: CallbackOptions) -> Iterable[Observation]:
        return list(observe())

    return callback
