"""NVML inventory read through the seam from recorded real devices."""

from __future__ import annotations

import logging
import time
from typing import Any

import pynvml
import pytest

from mesh_agent.health import HealthRules, gpu_health, nvml_health
from mesh_agent.inventory.nvml import NvmlReader, cuda_version_string, load_nvml
from mesh_agent.transitions import TransitionLog
from tests.fixtures.nvml.double import FakeNvml, load_fixture

pytestmark = pytest.mark.unit

FIXTURES = ("a100-sxm4-40gb", "rtx-4090", "rtx-3060-12gb")


def reader_for(fake: FakeNvml, **kwargs: object) -> NvmlReader:
    return NvmlReader(lambda: fake, transitions=TransitionLog(), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", FIXTURES)
def test_reading_reproduces_the_recorded_device(name: str) -> None:
    record = load_fixture(name)
    reading = reader_for(FakeNvml.from_fixtures(name)).read()
    assert reading.available
    assert reading.driver_version == record["driverVersion"]
    (gpu,) = reading.gpus
    assert gpu.name == record["model"]
    assert gpu.uuid == record["uuid"]
    assert gpu.memory_total_bytes == record["memory"]["total"]
    assert gpu.memory_free_bytes == record["memory"]["free"]
    assert gpu.temperature_c == record["temperatureC"]
    assert gpu.power_w == record["powerMilliwatts"] / 1000
    assert (gpu.pcie_generation, gpu.pcie_width) == (
        record["pcieMax"]["generation"],
        record["pcieMax"]["width"],
    )


@pytest.mark.parametrize("name", FIXTURES)
def test_theoretical_bandwidth_matches_nvidias_published_figure(name: str) -> None:
    (gpu,) = reader_for(FakeNvml.from_fixtures(name)).read().gpus
    published = load_fixture(name)["publishedBandwidthGBps"]
    assert gpu.bandwidth_gbps == pytest.approx(published, rel=0.005)


def test_geforce_boards_report_no_ecc_instead_of_failing() -> None:
    (gpu,) = reader_for(FakeNvml.from_fixtures("rtx-4090")).read().gpus
    assert gpu.ecc_uncorrectable is None
    assert gpu.retired_pages is None
    assert gpu.error is None
    assert gpu_health(gpu, HealthRules()).state == "Healthy"


@pytest.mark.parametrize(("code", "text"), [(13000, "13.0"), (12040, "12.4"), (11080, "11.8")])
def test_cuda_version_decoding(code: int, text: str) -> None:
    assert cuda_version_string(code) == text


def test_mesh_servers_memory_is_told_apart_from_others() -> None:
    fake = FakeNvml.from_fixtures("rtx-3060-12gb")
    fake.add_process(0, 4242, "/app/ggml-rpc-server", 6 * 1024**3)
    fake.add_process(0, 4243, "/usr/bin/python3", 1 * 1024**3)
    (gpu,) = reader_for(fake).read().gpus
    assert gpu.memory_used_by_mesh_bytes == 6 * 1024**3
    recorded_used = load_fixture("rtx-3060-12gb")["memory"]["used"]
    assert gpu.memory_used_by_others_bytes == 1 * 1024**3 + recorded_used


def test_gpu_lost_mid_run_keeps_its_identity_and_the_others() -> None:
    fake = FakeNvml.from_fixtures("rtx-4090", "rtx-3060-12gb")
    reader = reader_for(fake)
    before = reader.read()
    fake.lose(0)
    after = reader.read()
    lost, other = after.gpus
    assert lost.lost
    assert (lost.uuid, lost.name) == (before.gpus[0].uuid, before.gpus[0].name)
    assert lost.memory_free_bytes == 0
    assert gpu_health(lost, HealthRules()).reason == "GpuLost"
    assert not other.lost
    assert other.memory_free_bytes == before.gpus[1].memory_free_bytes


def test_critical_xid_makes_the_gpu_unhealthy_application_xid_does_not() -> None:
    fake = FakeNvml.from_fixtures("a100-sxm4-40gb", "rtx-4090")
    reader = reader_for(fake)
    reader.read()
    fake.inject_xid(0, 13)  # graphics engine exception: the application's fault
    fake.inject_xid(1, 79)  # fallen off the bus
    a100, rtx = reader.read().gpus
    assert a100.xid_counts == {13: 1}
    assert gpu_health(a100, HealthRules()).state == "Healthy"
    assert rtx.last_xid == 79
    health = gpu_health(rtx, HealthRules())
    assert (health.state, health.reason) == ("Unhealthy", "XidError")
    assert "XID 79" in health.message


def test_ecc_and_temperature_rules_on_recorded_boards() -> None:
    fake = FakeNvml.from_fixtures("a100-sxm4-40gb", "rtx-3060-12gb")
    reader = reader_for(fake)
    fake.set_ecc(0, 2)
    fake.set_temperature(1, 93)
    a100, rtx = reader.read().gpus
    assert gpu_health(a100, HealthRules()).reason == "EccUncorrectable"
    hot = gpu_health(rtx, HealthRules(fallback_slowdown_c=90))
    assert (hot.state, hot.reason) == ("Degraded", "Overheating")


def test_missing_library_is_a_cpu_node_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    fake = FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    reader = NvmlReader(
        lambda: fake, transitions=TransitionLog(), retry_seconds=5, clock=lambda: now[0]
    )
    with caplog.at_level(logging.INFO, logger="mesh_agent"):
        for step in range(20):
            now[0] = step  # retries init every 5 "seconds"
            reading = reader.read()
    assert not reading.available
    assert reading.error_kind == "LibraryNotFound"
    assert fake.calls == 4  # init retried at t=0, 5, 10, 15, never in between
    assert len([r for r in caplog.records if "NVML" in r.getMessage()]) == 1
    assert nvml_health(reading, HealthRules()).state == "Healthy"
    assert nvml_health(reading, HealthRules(require_gpu=True)).reason == "NvmlUnavailable"


def test_driver_not_loaded_degrades_and_recovers_when_it_loads() -> None:
    now = [0.0]
    broken = FakeNvml([], init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    working = FakeNvml.from_fixtures("rtx-4090")
    libs = [broken]
    reader = NvmlReader(
        lambda: libs[0], transitions=TransitionLog(), retry_seconds=10, clock=lambda: now[0]
    )
    first = reader.read()
    assert first.error_kind == "DriverNotLoaded"
    assert nvml_health(first, HealthRules()).state == "Degraded"
    libs[0] = working
    now[0] = 11
    assert reader.read().gpus[0].name == "NVIDIA GeForce RTX 4090"


def test_calls_before_init_raise_nvmls_own_error() -> None:
    fake = FakeNvml.from_fixtures("rtx-4090")
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.nvmlDeviceGetCount()


def test_load_nvml_resolves_a_factory_spec() -> None:
    lib = load_nvml("tests.fixtures.nvml.double:from_env")
    with pytest.raises(pynvml.NVMLError_LibraryNotFound):
        lib.nvmlInit()


def test_the_double_repeats_an_xid_when_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_FAKE_NVML", "rtx-4090")
    monkeypatch.setenv("MESH_FAKE_NVML_XID_EVERY", "48@0.02")
    lib: Any = load_nvml("tests.fixtures.nvml.double:from_env")
    lib.nvmlInit()
    events = lib.nvmlEventSetCreate()
    lib.nvmlDeviceRegisterEvents(lib.nvmlDeviceGetHandleByIndex(0), 0, events)
    seen: list[int] = []
    for _ in range(500):
        try:
            seen.append(int(lib.nvmlEventSetWait_v2(events, 0).eventData))
        except pynvml.NVMLError_Timeout:
            time.sleep(0.01)
        if len(seen) >= 2:
            break
    assert seen[:2] == [48, 48]


def test_the_double_reports_the_utilisation_it_is_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_FAKE_NVML", "rtx-4090")
    monkeypatch.setenv("MESH_FAKE_NVML_UTILIZATION", "37,12")
    lib: Any = load_nvml("tests.fixtures.nvml.double:from_env")
    lib.nvmlInit()
    rates = lib.nvmlDeviceGetUtilizationRates(lib.nvmlDeviceGetHandleByIndex(0))
    assert (rates.gpu, rates.memory) == (37, 12)
    assert load_fixture("rtx-4090")["utilization"] == {"gpu": 0, "memory": 0}
