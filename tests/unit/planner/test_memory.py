"""The per-device memory estimate: llama.cpp's cache geometry and recorded buffers."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e.tinymodels import ARCHS, SPECS
from mesh_operator.planner import (
    PlannerInputError,
    ServingParams,
    estimate_memory,
    read_model_profile,
)
from mesh_operator.planner.memory import kv_geometry
from mesh_operator.planner.profile import ModelProfile
from tests.unit.planner.estimate_check import TOLERANCE, check_buffers
from tests.unit.planner.llama_log import GEMMA_HEADER, LOG_DIR, read_recording, recorded_header

pytestmark = pytest.mark.unit

RECORDINGS = sorted(LOG_DIR.glob("*.log"))


@pytest.fixture(scope="module")
def gemma() -> ModelProfile:
    return read_model_profile(GEMMA_HEADER)


# The replay of llama.cpp's allocator lands on the logged bytes: the recorded
# logs hold it to 1%, well inside the 5% the live runs are held to.
EXACT = 0.01


def test_recordings_cover_every_model_on_one_two_and_three_servers() -> None:
    models: dict[str, set[int]] = {}
    for path in RECORDINGS:
        config = read_recording(path)[0]
        models.setdefault(config["model"], set()).add(len(config["layout"]))
    tiny = {f"tiny-{arch}-{SPECS[arch].key()}" for arch in ARCHS}
    assert set(models) == tiny | {GEMMA_HEADER.name.removesuffix(".header.gguf")}
    assert all(counts == {1, 2, 3} for counts in models.values()), models


@pytest.mark.parametrize("recording", RECORDINGS, ids=lambda p: p.stem)
def test_estimate_matches_recorded_llama_cpp_buffers(recording: Path) -> None:
    config, text = read_recording(recording)
    profile = read_model_profile(recorded_header(config))
    checks = check_buffers(profile, config, text)
    assert len(checks) == 3 * len(config["layout"]) + 3
    for check in checks:
        assert check.logged_mib > 0 or check.kind == "KV", str(check)  # every buffer was logged
        assert check.error <= min(EXACT, TOLERANCE), str(check)


@pytest.mark.parametrize(
    ("ctx", "parallel", "ubatch", "expected"),
    [
        (2048, 1, 512, (2048, 1, 2048, 1024)),  # window 512 + ubatch 512
        (2000, 1, 512, (2048, 1, 2048, 1024)),  # context padded to 256
        (4096, 4, 512, (4096, 4, 1024, 1024)),  # one stream per slot
        (4096, 3, 512, (4608, 3, 1536, 1024)),  # 4096/3 padded up per stream
        (2048, 1, 256, (2048, 1, 2048, 768)),
        (512, 1, 512, (512, 1, 512, 512)),  # the window cache never exceeds the context
    ],
)
def test_kv_geometry_follows_llama_cpp(
    gemma: ModelProfile, ctx: int, parallel: int, ubatch: int, expected: tuple[int, ...]
) -> None:
    g = kv_geometry(gemma, ServingParams(ctx=ctx, parallel=parallel, ubatch=ubatch))
    assert (g.n_ctx, g.n_stream, g.cells_full, g.cells_swa) == expected


def test_one_device_needs_no_pipeline_copies(gemma: ModelProfile) -> None:
    params = ServingParams(ctx=8192)
    one = estimate_memory(gemma, params, [(0, 19)]).devices[0]
    two = estimate_memory(gemma, params, [(0, 10), (10, 19)]).devices
    assert two[0].compute > one.compute  # four copies of the masks and inputs


def test_kv_grows_with_context_but_not_for_window_layers(gemma: ModelProfile) -> None:
    small = estimate_memory(gemma, ServingParams(ctx=4096), [(0, 19)]).devices[0].kv
    large = estimate_memory(gemma, ServingParams(ctx=8192), [(0, 19)]).devices[0].kv
    # 3 full-attention layers of 2 KiB per cell grow; 15 window layers stay at 1024 cells.
    assert large - small == 3 * 4096 * 1024


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (ServingParams(ctx=0), "ctx must be > 0"),
        (ServingParams(ctx=-5), "ctx must be > 0"),
        (ServingParams(parallel=0), "parallel must be > 0"),
        (ServingParams(cache_type_k="q3_k"), "cache-type-k 'q3_k' is not one of"),
        (ServingParams(cache_type_v="q8_0", flash_attention="off"), "needs flash attention"),
    ],
)
def test_bad_serving_params(gemma: ModelProfile, params: ServingParams, message: str) -> None:
    with pytest.raises(PlannerInputError, match=message):
        estimate_memory(gemma, params, [(0, 19)])


@pytest.mark.parametrize("ranges", [[(0, 10)], [(0, 10), (11, 19)], [(1, 19)], [(0, 20)]])
def test_ranges_must_tile_the_device_layers(
    gemma: ModelProfile, ranges: list[tuple[int, int]]
) -> None:
    with pytest.raises(PlannerInputError, match="do not"):
        estimate_memory(gemma, ServingParams(), ranges)
