"""The compute-buffer replay: its shortcut over long runs of equal layers, and what
the buffers depend on (the recorded logs check the bytes, test_memory.py)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from mesh_operator.planner import ServingParams, read_model_profile
from mesh_operator.planner.compute import device_compute_bytes, host_compute_bytes
from mesh_operator.planner.memory import graph_shape, kv_geometry
from mesh_operator.planner.profile import ModelProfile
from tests.unit.planner.llama_log import MODEL_HEADERS

pytestmark = pytest.mark.unit

MODELS = sorted(MODEL_HEADERS.glob("*.header.gguf"))


def _ranges(n: int, parts: int) -> list[tuple[int, int]]:
    cuts = [round(n * k / parts) for k in range(parts + 1)]
    return list(itertools.pairwise(cuts))


@pytest.mark.parametrize("header", MODELS, ids=lambda p: p.name.removesuffix(".header.gguf"))
@pytest.mark.parametrize(
    "params",
    [
        ServingParams(ctx=4096),
        ServingParams(ctx=8192, parallel=4, cache_type_k="q8_0", cache_type_v="q8_0"),
        ServingParams(ctx=2048, flash_attention="off", ubatch=256),
    ],
    ids=["f16", "q8-np4", "fa-off-ub256"],
)
def test_replaying_a_few_layers_of_a_run_gives_the_same_buffer(
    header: Path, params: ServingParams
) -> None:
    profile = read_model_profile(header)
    shape = graph_shape(profile, params, kv_geometry(profile, params))
    for parts in (1, 3):
        ranges = _ranges(profile.n_device_layers, parts)
        for k, (first, last) in enumerate(ranges):
            kwargs = {"first_device": k == 0, "last_device": k == parts - 1, "n_devices": parts}
            short = device_compute_bytes(profile, shape, first, last, **kwargs)  # type: ignore[arg-type]
            full = device_compute_bytes(profile, shape, first, last, every_layer=True, **kwargs)  # type: ignore[arg-type]
            assert short == full, (first, last)


@pytest.fixture(scope="module")
def llama8b() -> ModelProfile:
    return read_model_profile(MODEL_HEADERS / "llama-3.1-8b.header.gguf")


def test_pipeline_copies_grow_every_buffer(llama8b: ModelProfile) -> None:
    params = ServingParams(ctx=8192)
    shape = graph_shape(llama8b, params, kv_geometry(llama8b, params))
    one = device_compute_bytes(
        llama8b, shape, 0, 16, first_device=True, last_device=False, n_devices=1
    )
    two = device_compute_bytes(
        llama8b, shape, 0, 16, first_device=True, last_device=False, n_devices=2
    )
    # Four copies of what the device reads from elsewhere: the f16 mask of 8192
    # cells x 512 tokens (8 MiB) and the 4096-wide activation (8 MiB) among them.
    assert two - one >= 3 * (8 << 20) + 3 * (8 << 20)
    assert host_compute_bytes(llama8b, shape, n_devices=2) > 4 * (16 << 20)


def test_a_device_holding_only_the_output_layer_needs_the_logits_rows(
    llama8b: ModelProfile,
) -> None:
    params = ServingParams(ctx=4096, parallel=2)
    shape = graph_shape(llama8b, params, kv_geometry(llama8b, params))
    n = llama8b.n_layer
    alone = device_compute_bytes(
        llama8b, shape, n, n + 1, first_device=False, last_device=True, n_devices=3
    )
    logits = llama8b.n_vocab * 2 * 4
    assert logits <= alone < logits + (1 << 20)
    with_layers = device_compute_bytes(
        llama8b, shape, n - 4, n + 1, first_device=False, last_device=True, n_devices=3
    )
    assert with_layers > 50 * alone


def test_flash_attention_off_materializes_the_scores(llama8b: ModelProfile) -> None:
    on = ServingParams(ctx=8192)
    off = ServingParams(ctx=8192, flash_attention="off")
    sizes = []
    for params in (on, off):
        shape = graph_shape(llama8b, params, kv_geometry(llama8b, params))
        sizes.append(
            device_compute_bytes(
                llama8b, shape, 0, 33, first_device=True, last_device=True, n_devices=1
            )
        )
    # K*Q for 32 heads x 8192 cells x 512 tokens in f32 is 512 MiB.
    assert sizes[1] >= 512 << 20 > sizes[0]
