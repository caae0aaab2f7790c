"""Health rules: from what the agent read to a state and a reason, per device and node.

Pure. States are `Healthy`, `Degraded` (usable, but the operator should know) and
`Unhealthy` (do not plan onto it); reasons are the CamelCase words of the API
(`GpuLost`, `XidError`, `EccUncorrectable`, `Overheating`, `NvmlUnavailable`,
`RpcServerDown`). A node is as healthy as its sickest device; RPC servers that do
not answer degrade the node without making it unschedulable, since the node itself
may be fine and the operator restarts the group.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mesh_agent.inventory.nvml import GpuReading, NvmlReading
from mesh_agent.rpc_liveness import RpcProbe, RpcState
from mesh_operator.api.meshnode import Health

_SEVERITY = {"Healthy": 0, "Degraded": 1, "Unhealthy": 2}
# Among problems of equal severity the node reports the one most likely to be the
# root cause: a lost GPU explains its XIDs, an XID explains a failing RPC server.
_REASON_ORDER = (
    "GpuLost",
    "XidError",
    "EccUncorrectable",
    "Overheating",
    "NvmlUnavailable",
    "RpcServerDown",
)
HEALTHY = Health(state="Healthy", reason="AsExpected", message="")
MESSAGE_LIMIT = 1024


@dataclass(frozen=True)
class HealthRules:
    # When NVML gives no slowdown threshold, this temperature degrades a GPU.
    fallback_slowdown_c: int = 90
    # A node configured for GPUs is unhealthy without NVML; otherwise a missing
    # NVML library just means a CPU node.
    require_gpu: bool = False


def gpu_health(gpu: GpuReading, rules: HealthRules) -> Health:
    if gpu.lost:
        return Health(
            state="Unhealthy",
            reason="GpuLost",
            message=f"GPU {gpu.index} fell off the bus: {gpu.error}"[:MESSAGE_LIMIT],
        )
    if gpu.error:
        return Health(
            state="Unhealthy",
            reason="NvmlUnavailable",
            message=f"GPU {gpu.index}: {gpu.error}"[:MESSAGE_LIMIT],
        )
    critical = gpu.critical_xids
    if critical:
        listed = ", ".join(f"XID {x} x{n}" for x, n in sorted(critical.items()))
        return Health(
            state="Unhealthy",
            reason="XidError",
            message=f"GPU {gpu.index}: {listed}"[:MESSAGE_LIMIT],
        )
    if gpu.remap_failed or gpu.remap_pending or (gpu.ecc_uncorrectable or 0) > 0:
        what = []
        if gpu.ecc_uncorrectable:
            what.append(f"{gpu.ecc_uncorrectable} uncorrectable ECC errors since driver load")
        if gpu.remap_pending:
            what.append("row remapping pending (needs a GPU reset)")
        if gpu.remap_failed:
            what.append("row remapping failed")
        return Health(
            state="Unhealthy",
            reason="EccUncorrectable",
            message=f"GPU {gpu.index}: {'; '.join(what)}"[:MESSAGE_LIMIT],
        )
    if gpu.temperature_c is not None:
        shutdown = gpu.shutdown_temperature_c
        slowdown = gpu.slowdown_temperature_c or rules.fallback_slowdown_c
        if shutdown is not None and gpu.temperature_c >= shutdown:
            return Health(
                state="Unhealthy",
                reason="Overheating",
                message=f"GPU {gpu.index} at {gpu.temperature_c} C, shutdown at {shutdown} C",
            )
        if gpu.temperature_c >= slowdown:
            return Health(
                state="Degraded",
                reason="Overheating",
                message=f"GPU {gpu.index} at {gpu.temperature_c} C, slows down at {slowdown} C",
            )
    return HEALTHY


def nvml_health(nvml: NvmlReading, rules: HealthRules) -> Health:
    if nvml.available:
        if rules.require_gpu and not nvml.gpus:
            return Health(
                state="Unhealthy",
                reason="NvmlUnavailable",
                message="NVML answers but reports no GPU",
            )
        return HEALTHY
    if nvml.error_kind in ("LibraryNotFound", "Disabled") and not rules.require_gpu:
        return HEALTHY  # a CPU node (or one told to be): no driver, nothing wrong
    state = "Unhealthy" if rules.require_gpu else "Degraded"
    return Health(
        state=state,
        reason="NvmlUnavailable",
        message=f"NVML: {nvml.error or nvml.error_kind}"[:MESSAGE_LIMIT],
    )


def rpc_health(probes: Iterable[RpcProbe]) -> Health:
    down = [p for p in probes if p.state in (RpcState.DOWN, RpcState.HUNG)]
    if not down:
        return HEALTHY
    listed = "; ".join(
        f"{p.target.model or '-'} {p.target.host}:{p.target.port} {p.state.value}: {p.detail}"
        for p in down
    )
    return Health(state="Degraded", reason="RpcServerDown", message=listed[:MESSAGE_LIMIT])


def combine(healths: Sequence[Health]) -> Health:
    """The node's health: the most severe, then the most root-cause-like reason;
    the message lists every problem so none is hidden behind the first."""
    problems = [h for h in healths if h.state != "Healthy"]
    if not problems:
        return HEALTHY

    def rank(h: Health) -> tuple[int, int]:
        order = _REASON_ORDER.index(h.reason) if h.reason in _REASON_ORDER else len(_REASON_ORDER)
        return (-_SEVERITY[h.state], order)

    worst = min(problems, key=rank)
    message = "; ".join(dict.fromkeys(h.message for h in sorted(problems, key=rank) if h.message))
    return Health(state=worst.state, reason=worst.reason, message=message[:MESSAGE_LIMIT])
