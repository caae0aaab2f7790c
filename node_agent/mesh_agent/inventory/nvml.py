"""The NVML seam: the only code that calls NVML, and what it reads from each GPU.

`NvmlLib` names the part of the NVML Python binding (`pynvml`, from nvidia-ml-py)
the agent uses. Production passes the `pynvml` module itself; tests pass a double
that answers from recorded real devices and raises NVML's own exception types.
`NvmlReader` owns the NVML session: init (and re-init after a failure, with
backoff), reading every device into a `GpuReading`, draining XID events, and
remembering what a device was once it falls off the bus.
"""

# The seam keeps NVML's own camelCase names so pynvml itself satisfies it.
# ruff: noqa: N802

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pynvml

from mesh_agent.transitions import TransitionLog

log = logging.getLogger(__name__)

# Processes whose GPU memory counts as mesh's own (the ledger in DESIGN.md):
# llama.cpp's RPC server (old and new binary names) and the host server.
MESH_SERVER_NAMES = frozenset({"ggml-rpc-server", "rpc-server", "llama-server"})

# XIDs that report an application fault rather than a sick GPU; the same set the
# NVIDIA device plugin ignores by default (13 graphics engine exception, 31 MMU
# fault, 43 GPU stopped processing, 45 preemptive cleanup, 68 video processor
# exception, 109 context switch timeout).
APPLICATION_XIDS = frozenset({13, 31, 43, 45, 68, 109})


class NvmlLib(Protocol):
    """The NVML calls the agent makes, as nvidia-ml-py's `pynvml` spells them."""

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlSystemGetDriverVersion(self) -> str: ...
    def nvmlSystemGetCudaDriverVersion(self) -> int: ...
    def nvmlSystemGetProcessName(self, pid: int) -> str: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def nvmlDeviceGetUUID(self, handle: Any) -> str: ...
    def nvmlDeviceGetName(self, handle: Any) -> str: ...
    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any: ...
    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any: ...
    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int: ...
    def nvmlDeviceGetTemperatureThreshold(self, handle: Any, threshold: int) -> int: ...
    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int: ...
    def nvmlDeviceGetTotalEccErrors(self, handle: Any, error_type: int, counter: int) -> int: ...
    def nvmlDeviceGetRetiredPages(self, handle: Any, cause: int) -> Sequence[int]: ...
    def nvmlDeviceGetRemappedRows(self, handle: Any) -> tuple[int, int, int, int]: ...
    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle: Any) -> int: ...
    def nvmlDeviceGetMaxPcieLinkWidth(self, handle: Any) -> int: ...
    def nvmlDeviceGetMemoryBusWidth(self, handle: Any) -> int: ...
    def nvmlDeviceGetMaxClockInfo(self, handle: Any, clock: int) -> int: ...
    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> Sequence[Any]: ...
    def nvmlEventSetCreate(self) -> Any: ...
    def nvmlDeviceRegisterEvents(self, handle: Any, event_types: int, event_set: Any) -> None: ...
    def nvmlEventSetWait_v2(self, event_set: Any, timeout_ms: int) -> Any: ...
    def nvmlEventSetFree(self, event_set: Any) -> None: ...


def load_nvml(spec: str = "pynvml") -> NvmlLib:
    """Import the NVML binding named by `spec`: `module` or `module:factory`.

    The default is the real binding. Another spec is how a simulated GPU node (the
    e2e scenario) or a test plugs in an NVML double without touching the rest.
    """
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    if not attr:
        lib: NvmlLib = module
        return lib
    factory: Callable[[], NvmlLib] = getattr(module, attr)
    return factory()


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    name: str
    used_bytes: int


@dataclass(frozen=True)
class GpuReading:
    """One GPU as NVML answered in one cycle; None where NVML said NotSupported."""

    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    memory_free_bytes: int
    memory_used_bytes: int
    memory_used_by_mesh_bytes: int = 0
    utilization_percent: int | None = None
    temperature_c: int | None = None
    slowdown_temperature_c: int | None = None
    shutdown_temperature_c: int | None = None
    power_w: float | None = None
    ecc_uncorrectable: int | None = None
    retired_pages: int | None = None
    remap_pending: bool = False
    remap_failed: bool = False
    pcie_generation: int | None = None
    pcie_width: int | None = None
    bus_width_bits: int | None = None
    max_memory_clock_mhz: int | None = None
    processes: tuple[GpuProcess, ...] = ()
    xid_counts: dict[int, int] = field(default_factory=dict)
    last_xid: int | None = None
    lost: bool = False
    error: str | None = None

    @property
    def memory_used_by_others_bytes(self) -> int:
        return max(0, self.memory_used_bytes - self.memory_used_by_mesh_bytes)

    @property
    def bandwidth_gbps(self) -> float:
        """Theoretical memory bandwidth, GB/s: bus width x max memory clock x 2.

        NVML reports the memory clock at half the data rate for GDDR6/6X and HBM2
        alike (e.g. 10501 MHz on a 384-bit RTX 4090 -> 1008 GB/s, 1215 MHz on a
        5120-bit A100 -> 1555 GB/s, NVIDIA's published figures).
        """
        if not self.bus_width_bits or not self.max_memory_clock_mhz:
            return 0.0
        return self.bus_width_bits / 8 * self.max_memory_clock_mhz * 2 / 1000

    @property
    def critical_xids(self) -> dict[int, int]:
        return {x: n for x, n in self.xid_counts.items() if x not in APPLICATION_XIDS}


@dataclass(frozen=True)
class NvmlReading:
    """What one cycle learned from NVML as a whole."""

    available: bool
    error: str | None = None
    error_kind: str | None = None
    driver_version: str | None = None
    cuda_version: str | None = None
    gpus: tuple[GpuReading, ...] = ()


def cuda_version_string(value: int) -> str:
    """NVML encodes CUDA 12.4 as 12040."""
    return f"{value // 1000}.{(value % 1000) // 10}"


def _error_kind(exc: Exception) -> str:
    # The exception class name is NVML's own error name (NVMLError_GpuIsLost ...).
    return type(exc).__name__.removeprefix("NVMLError_")


class NvmlReader:
    """One NVML session for the agent's lifetime, re-opened after failures."""

    def __init__(
        self,
        lib_factory: Callable[[], NvmlLib],
        *,
        transitions: TransitionLog,
        retry_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._factory = lib_factory
        self._lib: NvmlLib | None = None
        self._transitions = transitions
        self._retry_seconds = retry_seconds
        self._clock = clock
        self._next_init = 0.0
        self._init_error: tuple[str, str] | None = None
        self._event_set: Any = None
        self._xids: dict[str, dict[int, int]] = {}
        self._last_xid: dict[str, int] = {}
        # What each index was when last seen, so a lost GPU is still reported
        # with its identity and size instead of vanishing from the inventory.
        self._known: dict[int, GpuReading] = {}
        self._name_cache: dict[int, str] = {}
        self._static: dict[int, tuple[int | None, int | None, int | None, int | None]] = {}

    # -- session ---------------------------------------------------------------

    def _ensure_init(self) -> NvmlLib | None:
        if self._lib is not None:
            return self._lib
        if self._clock() < self._next_init:
            return None
        try:
            lib = self._factory()
            lib.nvmlInit()
        except pynvml.NVMLError as exc:
            kind = _error_kind(exc)
            self._init_error = (kind, str(exc))
            self._next_init = self._clock() + self._retry_seconds
            if kind == "LibraryNotFound":
                # The normal state of a CPU node, not a fault.
                self._transitions.record(
                    "nvml", "absent", f"no NVML library ({exc}): no GPU on this node"
                )
            else:
                self._transitions.record("nvml", f"unavailable:{kind}", f"NVML unavailable: {exc}")
            return None
        except (ImportError, OSError) as exc:
            self._init_error = ("LibraryNotFound", str(exc))
            self._next_init = self._clock() + self._retry_seconds
            self._transitions.record("nvml", "unavailable:import", f"NVML binding: {exc}")
            return None
        self._lib = lib
        self._init_error = None
        self._transitions.record("nvml", "ok", "NVML initialised")
        self._register_events(lib)
        return lib

    def _register_events(self, lib: NvmlLib) -> None:
        try:
            event_set = lib.nvmlEventSetCreate()
            count = lib.nvmlDeviceGetCount()
        except pynvml.NVMLError as exc:
            log.info("NVML events unavailable: %s", exc)
            return
        registered = 0
        for index in range(count):
            try:
                handle = lib.nvmlDeviceGetHandleByIndex(index)
                lib.nvmlDeviceRegisterEvents(
                    handle, pynvml.nvmlEventTypeXidCriticalError, event_set
                )
                registered += 1
            except pynvml.NVMLError as exc:
                # GeForce boards may refuse; XIDs then go unseen on that GPU.
                log.info("XID events not available on GPU %d: %s", index, exc)
        self._event_set = event_set if registered else None

    def close(self) -> None:
        if self._lib is None:
            return
        try:
            if self._event_set is not None:
                self._lib.nvmlEventSetFree(self._event_set)
            self._lib.nvmlShutdown()
        except pynvml.NVMLError as exc:
            log.debug("NVML shutdown: %s", exc)
        self._lib = None
        self._event_set = None

    # -- reading ---------------------------------------------------------------

    def read(self) -> NvmlReading:
        lib = self._ensure_init()
        if lib is None:
            kind, message = self._init_error or ("Uninitialized", "NVML not initialised")
            return NvmlReading(available=False, error=message, error_kind=kind)
        try:
            driver = lib.nvmlSystemGetDriverVersion()
            cuda = cuda_version_string(lib.nvmlSystemGetCudaDriverVersion())
            count = lib.nvmlDeviceGetCount()
        except pynvml.NVMLError as exc:
            # The driver went away under a live session: start over later.
            self._transitions.record(
                "nvml", f"unavailable:{_error_kind(exc)}", f"NVML failed: {exc}"
            )
            self._init_error = (_error_kind(exc), str(exc))
            self._lib = None
            self._next_init = self._clock() + self._retry_seconds
            return NvmlReading(available=False, error=str(exc), error_kind=_error_kind(exc))
        self._drain_xids(lib)
        gpus = tuple(self._read_gpu(lib, index) for index in range(count))
        # Forget names of processes that are gone: a pid can be reused.
        alive = {p.pid for gpu in gpus for p in gpu.processes}
        self._name_cache = {pid: n for pid, n in self._name_cache.items() if pid in alive}
        for gpu in gpus:
            state = "lost" if gpu.lost else ("error" if gpu.error else "ok")
            detail = gpu.error or "answering"
            self._transitions.record(f"gpu/{gpu.index}", state, f"GPU {gpu.index}: {detail}")
        return NvmlReading(available=True, driver_version=driver, cuda_version=cuda, gpus=gpus)

    def _drain_xids(self, lib: NvmlLib) -> None:
        if self._event_set is None:
            return
        while True:
            try:
                event = lib.nvmlEventSetWait_v2(self._event_set, 0)
            except pynvml.NVMLError_Timeout:
                return
            except pynvml.NVMLError as exc:
                log.debug("XID event wait: %s", exc)
                return
            if not event.eventType & pynvml.nvmlEventTypeXidCriticalError:
                continue
            try:
                uuid = lib.nvmlDeviceGetUUID(event.device)
            except pynvml.NVMLError:
                uuid = "unknown"
            xid = int(event.eventData)
            counts = self._xids.setdefault(uuid, {})
            counts[xid] = counts.get(xid, 0) + 1
            self._last_xid[uuid] = xid
            log.warning("XID %d on GPU %s", xid, uuid)

    def _lost(self, index: int, exc: Exception) -> GpuReading:
        known = self._known.get(index)
        base = known or GpuReading(
            index=index,
            uuid="",
            name="",
            memory_total_bytes=0,
            memory_free_bytes=0,
            memory_used_bytes=0,
        )
        return GpuReading(
            index=index,
            uuid=base.uuid,
            name=base.name,
            memory_total_bytes=base.memory_total_bytes,
            memory_free_bytes=0,
            memory_used_bytes=base.memory_total_bytes,
            pcie_generation=base.pcie_generation,
            pcie_width=base.pcie_width,
            bus_width_bits=base.bus_width_bits,
            max_memory_clock_mhz=base.max_memory_clock_mhz,
            xid_counts=dict(self._xids.get(base.uuid, {})),
            last_xid=self._last_xid.get(base.uuid),
            lost=True,
            error=str(exc),
        )

    def _read_gpu(self, lib: NvmlLib, index: int) -> GpuReading:
        try:
            handle = lib.nvmlDeviceGetHandleByIndex(index)
            uuid = lib.nvmlDeviceGetUUID(handle)
            name = lib.nvmlDeviceGetName(handle)
            memory = lib.nvmlDeviceGetMemoryInfo(handle)
        except pynvml.NVMLError_GpuIsLost as exc:
            return self._lost(index, exc)
        except pynvml.NVMLError as exc:
            known = self._known.get(index)
            return GpuReading(
                index=index,
                uuid=known.uuid if known else "",
                name=known.name if known else "",
                memory_total_bytes=known.memory_total_bytes if known else 0,
                memory_free_bytes=0,
                memory_used_bytes=0,
                error=f"{_error_kind(exc)}: {exc}",
            )

        def optional(call: Callable[[], Any]) -> Any:
            # Boards differ in what they support (GeForce has no ECC, older
            # drivers no remapped rows): a missing counter is None, not a failure.
            try:
                return call()
            except pynvml.NVMLError_GpuIsLost:
                raise
            except pynvml.NVMLError:
                return None

        try:
            if index not in self._static:
                self._static[index] = (
                    optional(lambda: lib.nvmlDeviceGetMaxPcieLinkGeneration(handle)),
                    optional(lambda: lib.nvmlDeviceGetMaxPcieLinkWidth(handle)),
                    optional(lambda: lib.nvmlDeviceGetMemoryBusWidth(handle)),
                    optional(lambda: lib.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)),
                )
            pcie_gen, pcie_width, bus_width, mem_clock = self._static[index]
            utilization = optional(lambda: lib.nvmlDeviceGetUtilizationRates(handle))
            temperature = optional(
                lambda: lib.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
            )
            slowdown = optional(
                lambda: lib.nvmlDeviceGetTemperatureThreshold(
                    handle, pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
                )
            )
            shutdown = optional(
                lambda: lib.nvmlDeviceGetTemperatureThreshold(
                    handle, pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN
                )
            )
            power_mw = optional(lambda: lib.nvmlDeviceGetPowerUsage(handle))
            ecc = optional(
                lambda: lib.nvmlDeviceGetTotalEccErrors(
                    handle, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC
                )
            )
            remapped = optional(lambda: lib.nvmlDeviceGetRemappedRows(handle))
            retired = None
            if remapped is None:
                pages = optional(
                    lambda: lib.nvmlDeviceGetRetiredPages(
                        handle, pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
                    )
                )
                retired = len(pages) if pages is not None else None
            processes = optional(lambda: lib.nvmlDeviceGetComputeRunningProcesses(handle)) or []
            procs = tuple(self._process(lib, p) for p in processes)
        except pynvml.NVMLError_GpuIsLost as exc:
            return self._lost(index, exc)

        mesh_bytes = sum(p.used_bytes for p in procs if _is_mesh_process(p.name))
        reading = GpuReading(
            index=index,
            uuid=uuid,
            name=name,
            memory_total_bytes=int(memory.total),
            memory_free_bytes=int(memory.free),
            memory_used_bytes=int(memory.used),
            memory_used_by_mesh_bytes=mesh_bytes,
            utilization_percent=int(utilization.gpu) if utilization is not None else None,
            temperature_c=temperature,
            slowdown_temperature_c=slowdown,
            shutdown_temperature_c=shutdown,
            power_w=power_mw / 1000 if power_mw is not None else None,
            ecc_uncorrectable=ecc,
            retired_pages=int(remapped[1]) if remapped is not None else retired,
            remap_pending=bool(remapped[2]) if remapped is not None else False,
            remap_failed=bool(remapped[3]) if remapped is not None else False,
            pcie_generation=pcie_gen,
            pcie_width=pcie_width,
            bus_width_bits=bus_width,
            max_memory_clock_mhz=mem_clock,
            processes=procs,
            xid_counts=dict(self._xids.get(uuid, {})),
            last_xid=self._last_xid.get(uuid),
        )
        self._known[index] = reading
        return reading

    def _process(self, lib: NvmlLib, info: Any) -> GpuProcess:
        pid = int(info.pid)
        name = self._name_cache.get(pid)
        if name is None:
            try:
                name = lib.nvmlSystemGetProcessName(pid)
            except pynvml.NVMLError:
                name = ""
            self._name_cache[pid] = name
        used = info.usedGpuMemory
        return GpuProcess(pid=pid, name=name, used_bytes=int(used) if used is not None else 0)


def _is_mesh_process(name: str) -> bool:
    return os.path.basename(name.split(" ", 1)[0]) in MESH_SERVER_NAMES
