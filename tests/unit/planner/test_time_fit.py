"""The bench's fit of the time model: it recovers the constants that made the runs."""

from __future__ import annotations

import pytest

from bench.planner.real import Fit, Run, fit_constants, predict_remote
from mesh_operator.planner import layers_for_split, read_model_profile
from mesh_operator.planner.profile import ModelProfile
from mesh_operator.planner.timing import CostModel
from tests.unit.planner.llama_log import MODEL_HEADERS

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def gemma() -> ModelProfile:
    return read_model_profile(MODEL_HEADERS / "gemma-3-270m-q4_k_m.header.gguf")


def _runs(profile: ModelProfile, truth: Fit, fit_rtts: tuple[float, ...]) -> list[Run]:
    runs = []
    for rtt in (0.2, 2.1, 5.1, 10.2):
        for n in (1, 2, 3):
            ranges = layers_for_split([1.0] * n, profile.n_device_layers)
            ms = predict_remote(profile, ranges, rtt, truth)
            runs.append(Run("r", n, rtt, rtt, "", ms, (ms,), fit=rtt in fit_rtts))
    return runs


def test_the_fit_recovers_round_trips_and_speed(gemma: ModelProfile) -> None:
    reads = predict_remote(gemma, [(0, gemma.n_device_layers)], 0.0, Fit(1.0, 3.0, 0.0))
    truth = Fit(round_trips_per_device=1.3, bandwidth_gbps=3.0, compute_ms=0.0)
    runs = _runs(gemma, truth, (0.2, 10.2))
    fit = fit_constants(gemma, runs, CostModel())
    assert fit.round_trips_per_device == pytest.approx(1.3, rel=1e-6)
    assert fit.bandwidth_gbps == pytest.approx(3.0, rel=1e-6)
    # compute: one device reading the whole model at that speed, without its overhead
    assert fit.compute_ms == pytest.approx(reads - CostModel().device_overhead_ms)
    for run in runs:
        ranges = layers_for_split([1.0] * run.servers, gemma.n_device_layers)
        assert predict_remote(gemma, ranges, run.measured_rtt_ms, fit) == pytest.approx(
            run.ms_per_token, rel=1e-6
        )


def test_runs_at_one_round_trip_cannot_be_fit(gemma: ModelProfile) -> None:
    truth = Fit(round_trips_per_device=1.0, bandwidth_gbps=3.0, compute_ms=0.0)
    runs = [r for r in _runs(gemma, truth, (5.1,)) if r.servers == 1]
    with pytest.raises(RuntimeError, match="do not separate"):
        fit_constants(gemma, runs, CostModel())


def test_a_judged_run_reports_its_error() -> None:
    run = Run("r", 2, 5.0, 5.1, "9/9", 40.0, (40.0,), predicted_ms=44.0)
    assert run.error == pytest.approx(0.10)
