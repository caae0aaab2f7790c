"""The tiny-model maker: deterministic files the planner reads as the shapes asked for."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from e2e import tinymodels
from mesh_operator.planner import read_model_profile

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("arch", tinymodels.ARCHS)
def test_planner_reads_the_shape_asked_for(arch: str, tiny_model: Callable[..., Path]) -> None:
    spec = tinymodels.SPECS[arch]
    profile = read_model_profile(tiny_model(arch))
    assert profile.architecture == arch
    assert (profile.n_layer, profile.n_embd, profile.n_vocab) == (
        spec.n_layer,
        spec.n_embd,
        spec.vocab,
    )
    assert profile.n_expert == spec.experts
    assert profile.tied_output == spec.tied
    # Experts are stored in the MoE layers only (deepseek2 keeps a dense first layer).
    with_experts = [il for il, layer in enumerate(profile.layers) if layer.expert_bytes]
    assert with_experts == (list(range(spec.dense_lead, spec.n_layer)) if spec.experts else [])


def test_gemma3_has_five_sliding_window_layers_in_six(tiny_model: Callable[..., Path]) -> None:
    profile = read_model_profile(tiny_model("gemma3"))
    assert [layer.is_swa for layer in profile.layers] == [il % 6 != 5 for il in range(12)]
    assert profile.n_swa == tinymodels.SPECS["gemma3"].sliding_window


def test_deepseek2_caches_one_mla_latent(tiny_model: Callable[..., Path]) -> None:
    rank, rope, _, _ = tinymodels.SPECS["deepseek2"].mla or (0, 0, 0, 0)
    profile = read_model_profile(tiny_model("deepseek2"))
    assert {layer.n_embd_k for layer in profile.layers} == {rank + rope}


def test_same_spec_same_bytes_and_the_cache_is_reused(tmp_path: Path) -> None:
    small = {"n_layer": 1, "vocab": 512, "n_ff": 256}
    first = tinymodels.make_model("qwen3moe", tmp_path / "a", **small)
    again = tinymodels.make_model("qwen3moe", tmp_path / "a", **small)
    spec = replace(tinymodels.SPECS["qwen3moe"], n_layer=1, vocab=512, n_ff=256)
    other = tinymodels.write_model(spec, tmp_path / "b" / first.name)
    assert again == first
    assert first.read_bytes() == other.read_bytes()
    reseeded = tinymodels.make_model("qwen3moe", tmp_path / "a", seed=1, **small)
    assert reseeded.name != first.name
    assert reseeded.read_bytes() != first.read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([first.name, reseeded.name])


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match="no tiny model for 'mamba'"):
        tinymodels.make_model("mamba")


def test_command_line_writes_into_the_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tinymodels.main(["--out", str(tmp_path), "--arch", "llama"]) == 0
    (made,) = tmp_path.glob("tiny-llama-*.gguf")
    assert str(made) in capsys.readouterr().out
