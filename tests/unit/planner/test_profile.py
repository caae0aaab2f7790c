"""What a model needs per layer, from recorded headers of real model shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter

from mesh_operator.planner import ModelProfile, read_model_profile
from mesh_operator.planner.memory import ServingParams, kv_cell_bytes
from tests.unit.planner.llama_log import GEMMA_HEADER, MODEL_HEADERS

pytestmark = pytest.mark.unit

MIB = 1 << 20


def _profile(name: str) -> ModelProfile:
    return read_model_profile(MODEL_HEADERS / f"{name}.header.gguf")


def test_gemma3_layers_match_llama_cpp_buffers() -> None:
    profile = read_model_profile(GEMMA_HEADER)
    assert profile.n_device_layers == 19
    # llama.cpp logged these model buffers for -ts 1,1,1 (7, 6 and 5 + output layers).
    thirds = [(0, 7), (7, 13), (13, 18)]
    sizes = [sum(profile.layers[i].weight_bytes for i in range(a, b)) / MIB for a, b in thirds]
    sizes[-1] += profile.output_bytes / MIB
    assert [round(s, 2) for s in sizes] == [25.15, 21.34, 188.67]
    assert round(profile.input_bytes / MIB, 2) == 170.00  # CPU_Mapped, the embedding


def test_gemma3_ties_its_output_to_the_embedding() -> None:
    profile = read_model_profile(GEMMA_HEADER)
    assert profile.tied_output
    assert profile.output_bytes > profile.input_bytes  # embedding copy + output norm


def test_gemma3_uses_a_window_in_five_of_six_layers() -> None:
    profile = read_model_profile(GEMMA_HEADER)
    full = [il for il, layer in enumerate(profile.layers) if not layer.is_swa]
    assert full == [5, 11, 17]
    assert (profile.swa_kind, profile.n_swa) == ("standard", 512)


def test_gpt_oss_alternates_window_and_full_layers() -> None:
    profile = _profile("gpt-oss-20b")
    assert [layer.is_swa for layer in profile.layers[:4]] == [True, False, True, False]
    assert profile.n_swa == 128


def test_gqa_caches_only_the_kv_heads() -> None:
    profile = _profile("llama-3.1-8b")  # 32 query heads, 8 KV heads of 128
    assert profile.layers[0].n_embd_k == 8 * 128
    f16 = ServingParams(cache_type_k="f16", cache_type_v="f16")
    assert kv_cell_bytes(profile, f16, 0) == 2 * 1024 * 2


def test_moe_reads_only_the_routed_share_of_experts() -> None:
    profile = _profile("qwen3-30b-a3b")
    assert (profile.n_expert, profile.n_expert_used) == (128, 8)
    assert profile.expert_fraction == pytest.approx(8 / 128)
    layer = profile.layers[0]
    assert layer.expert_bytes > 0.9 * layer.weight_bytes
    assert profile.ffn_active_width == 8 * 768


def test_mla_caches_one_latent_and_no_v() -> None:
    profile = _profile("deepseek-v2-lite")
    layer = profile.layers[3]
    assert (layer.n_embd_k, layer.n_embd_v) == (512 + 64, 0)
    # The leading dense layer has no experts.
    assert profile.layers[0].expert_bytes == 0 < profile.layers[1].expert_bytes


@pytest.mark.parametrize(
    ("cache", "bytes_per_cell"),
    [("f16", 2 * 1024 * 2), ("q8_0", 2 * 1024 // 32 * 34), ("q4_0", 2 * 1024 // 32 * 18)],
)
def test_kv_bytes_per_cell_follow_the_cache_type(cache: str, bytes_per_cell: int) -> None:
    profile = _profile("llama-3.1-8b")
    params = ServingParams(cache_type_k=cache, cache_type_v=cache)
    assert kv_cell_bytes(profile, params, 0) == bytes_per_cell


def _header_only(path: Path, arch: str, n_layer: int, extra: dict[str, int]) -> Path:
    writer = GGUFWriter(path, arch)
    writer.add_block_count(n_layer)
    writer.add_embedding_length(256)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    for key, value in extra.items():
        writer.add_uint32(key.format(arch=arch), value)
    for il in range(n_layer):
        writer.add_tensor_info(
            f"blk.{il}.attn_q.weight", (256, 256), np.dtype(np.float32), 256 * 256 * 2,
            raw_dtype=GGMLQuantizationType.F16,
        )  # fmt: skip
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("arch", "extra", "expected_swa", "window"),
    [
        ("gemma3", {}, [False] * 6, 0),  # no window in the file: all full attention
        ("gemma3", {"{arch}.attention.sliding_window": 4}, [True] * 5 + [False], 4),
        ("gemma2", {}, [True, False] * 3, 4096),  # gemma 2 always slides, 4096 by default
        (
            "cohere2",
            {"{arch}.attention.sliding_window": 8},
            [True, True, True, False] + [True] * 2,
            8,
        ),
        (
            "llama4",
            {"{arch}.attention.sliding_window": 1},
            [True, True, True, False] + [True] * 2,
            8192,
        ),
        ("llama4", {"{arch}.attention.sliding_window": 0}, [False] * 6, 0),
        ("phi3", {"{arch}.attention.sliding_window": 2048}, [False] * 6, 0),  # disabled upstream
        (
            "gemma3",
            {"{arch}.attention.sliding_window": 4, "{arch}.attention.sliding_window_pattern": 2},
            [True, False] * 3,
            4,
        ),
    ],
    ids=[
        "gemma3-off",
        "gemma3",
        "gemma2",
        "cohere2",
        "llama4-chunked",
        "llama4-off",
        "phi3",
        "pattern-key",
    ],
)
def test_sliding_window_rules_follow_llama_cpp(
    tmp_path: Path, arch: str, extra: dict[str, int], expected_swa: list[bool], window: int
) -> None:
    profile = read_model_profile(_header_only(tmp_path / "m.gguf", arch, 6, extra))
    assert [layer.is_swa for layer in profile.layers] == expected_swa
    assert profile.n_swa == window


@pytest.mark.parametrize(
    ("name", "layer", "widths"),
    [
        ("llama-3.1-8b", 1, (14336, 0, 0)),
        ("qwen3-30b-a3b", 1, (0, 768, 0)),
        ("deepseek-v2-lite", 0, (10944, 0, 0)),  # its dense first layer
        ("deepseek-v2-lite", 1, (0, 1408, 2816)),  # routed experts of 1408, two shared
    ],
)
def test_ffn_widths_per_layer(name: str, layer: int, widths: tuple[int, int, int]) -> None:
    got = _profile(name).layers[layer]
    assert (got.ffn_dense, got.ffn_expert, got.ffn_shared) == widths


def test_mla_geometry_for_the_compute_graph() -> None:
    profile = _profile("deepseek-v2-lite")
    # Latent 512, rotary 64 (what the cached key adds to the latent), query heads
    # of 128 + 64, value heads of 128.
    assert (profile.mla_rank, profile.n_rot, profile.head_dim_q, profile.head_dim_v_mla) == (
        512,
        64,
        192,
        128,
    )
    assert not _profile("llama-3.1-8b").mla_rank
    assert read_model_profile(GEMMA_HEADER).qk_norm
