"""Header-only GGUFs of real model shapes, written with the `gguf` package's writer.

Owns the model suite of the planner's benchmark and the GGUF fixtures of its
tests. Each shape is the published configuration of a real model (layers,
widths, heads, KV heads, experts, vocabulary, sliding window) with a Q4_K_M-like
choice of tensor types (Q6_K for attn_v, ffn_down and output; types with
256-wide blocks only where rows allow, as llama.cpp's quantizer falls back).
The files stop after the tensor infos: exactly what a range request returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

Q = GGMLQuantizationType


@dataclass(frozen=True)
class Shape:
    """A transformer's shape as its config.json states it."""

    name: str
    arch: str
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    vocab: int
    context: int = 131072
    tied: bool = False
    experts: int = 0
    experts_used: int = 0
    expert_ff: int = 0
    shared_ff: int = 0
    dense_lead: int = 0  # leading layers with a dense FFN in a MoE model
    sliding_window: int = 0
    qk_norm: bool = False
    mla: tuple[int, int, int] | None = None  # (kv_lora_rank, rope dim, nope dim)
    expert_type: GGMLQuantizationType | None = None
    extra: dict[str, int] = field(default_factory=dict)

    @property
    def is_moe(self) -> bool:
        return self.experts > 0


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("llama-3.2-1b", "llama", 2048, 16, 32, 8, 64, 8192, 128256, tied=True),
        Shape("llama-3.2-3b", "llama", 3072, 28, 24, 8, 128, 8192, 128256, tied=True),
        Shape("llama-3.1-8b", "llama", 4096, 32, 32, 8, 128, 14336, 128256),
        Shape(
            "gemma-3-12b", "gemma3", 3840, 48, 16, 8, 256, 15360, 262208,
            tied=True, sliding_window=1024, qk_norm=True,
        ),
        Shape("qwen2.5-14b", "qwen2", 5120, 48, 40, 8, 128, 13824, 152064),
        Shape(
            "gemma-3-27b", "gemma3", 5376, 62, 32, 16, 128, 21504, 262208,
            tied=True, sliding_window=1024, qk_norm=True,
        ),
        Shape("qwen2.5-32b", "qwen2", 5120, 64, 40, 8, 128, 27648, 152064),
        Shape("llama-3.3-70b", "llama", 8192, 80, 64, 8, 128, 28672, 128256),
        Shape(
            "qwen3-30b-a3b", "qwen3moe", 2048, 48, 32, 4, 128, 6144, 151936,
            experts=128, experts_used=8, expert_ff=768, qk_norm=True,
        ),
        Shape(
            "mixtral-8x7b", "llama", 4096, 32, 32, 8, 128, 14336, 32000,
            context=32768, experts=8, experts_used=2, expert_ff=14336,
        ),
        Shape(
            "gpt-oss-20b", "gpt-oss", 2880, 24, 64, 8, 64, 2880, 201088,
            experts=32, experts_used=4, expert_ff=2880, sliding_window=128,
            expert_type=Q.MXFP4,
        ),
        Shape(
            "deepseek-v2-lite", "deepseek2", 2048, 27, 16, 16, 192, 10944, 102400,
            context=163840, experts=64, experts_used=6, expert_ff=1408, shared_ff=2816,
            dense_lead=1, mla=(512, 64, 128),
        ),
    )
}  # fmt: skip


def _row_type(preferred: GGMLQuantizationType, row: int) -> GGMLQuantizationType:
    """The preferred type if rows split into its blocks, else llama.cpp's fallbacks."""
    for candidate in (preferred, Q.Q8_0, Q.F16):
        if row % GGML_QUANT_SIZES[candidate][0] == 0:
            return candidate
    return Q.F32


def _nbytes(qtype: GGMLQuantizationType, ne: Sequence[int]) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    count = int(np.prod(ne))
    return count // block * size


def _tensors(shape: Shape) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
    """(name, ggml ne, type) of every tensor, in llama.cpp's naming."""
    e = shape.n_embd
    out: list[tuple[str, tuple[int, ...], GGMLQuantizationType]] = []

    def weight(name: str, n_in: int, *rest: int, prefer: GGMLQuantizationType = Q.Q4_K) -> None:
        out.append((name, (n_in, *rest), _row_type(prefer, n_in)))

    def norm(name: str, n: int) -> None:
        out.append((name, (n,), Q.F32))

    weight("token_embd.weight", e, shape.vocab, prefer=Q.Q6_K if shape.tied else Q.Q4_K)
    norm("output_norm.weight", e)
    if not shape.tied:
        weight("output.weight", e, shape.vocab, prefer=Q.Q6_K)
    q_dim = shape.n_head * shape.head_dim
    kv_dim = shape.n_head_kv * shape.head_dim
    for il in range(shape.n_layer):
        p = f"blk.{il}."
        norm(p + "attn_norm.weight", e)
        if shape.mla is not None:
            rank, rope, nope = shape.mla
            weight(p + "attn_q.weight", e, shape.n_head * (nope + rope))
            weight(p + "attn_kv_a_mqa.weight", e, rank + rope)
            norm(p + "attn_kv_a_norm.weight", rank)
            weight(p + "attn_k_b.weight", nope, rank, shape.n_head)
            weight(p + "attn_v_b.weight", rank, nope, shape.n_head)
            weight(p + "attn_output.weight", shape.n_head * nope, e)
        else:
            weight(p + "attn_q.weight", e, q_dim)
            weight(p + "attn_k.weight", e, kv_dim)
            weight(p + "attn_v.weight", e, kv_dim, prefer=Q.Q6_K)
            weight(p + "attn_output.weight", q_dim, e)
        if shape.qk_norm:
            norm(p + "attn_q_norm.weight", shape.head_dim)
            norm(p + "attn_k_norm.weight", shape.head_dim)
        norm(p + "ffn_norm.weight", e)
        if shape.is_moe and il >= shape.dense_lead:
            n, ff = shape.experts, shape.expert_ff
            prefer = shape.expert_type or Q.Q4_K
            out.append((p + "ffn_gate_inp.weight", (e, n), Q.F32))
            weight(p + "ffn_gate_exps.weight", e, ff, n, prefer=prefer)
            weight(p + "ffn_up_exps.weight", e, ff, n, prefer=prefer)
            weight(p + "ffn_down_exps.weight", ff, e, n, prefer=shape.expert_type or Q.Q6_K)
            if shape.shared_ff:
                weight(p + "ffn_gate_shexp.weight", e, shape.shared_ff)
                weight(p + "ffn_up_shexp.weight", e, shape.shared_ff)
                weight(p + "ffn_down_shexp.weight", shape.shared_ff, e, prefer=Q.Q6_K)
        else:
            weight(p + "ffn_gate.weight", e, shape.n_ff)
            weight(p + "ffn_up.weight", e, shape.n_ff)
            weight(p + "ffn_down.weight", shape.n_ff, e, prefer=Q.Q6_K)
    return out


def _metadata(writer: GGUFWriter, shape: Shape) -> None:
    writer.add_name(shape.name)
    writer.add_file_type(15)  # MOSTLY_Q4_K_M
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(1 if shape.mla else shape.n_head_kv)
    writer.add_vocab_size(shape.vocab)
    if shape.mla is not None:
        rank, rope, nope = shape.mla
        writer.add_key_length(rank + rope)
        writer.add_value_length(rank)
        writer.add_key_length_mla(nope + rope)
        writer.add_value_length_mla(nope)
        writer.add_kv_lora_rank(rank)
        writer.add_leading_dense_block_count(shape.dense_lead)
    else:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    if shape.is_moe:
        writer.add_expert_count(shape.experts)
        writer.add_expert_used_count(shape.experts_used)
        writer.add_expert_feed_forward_length(shape.expert_ff)
        if shape.shared_ff:
            writer.add_expert_shared_count(shape.shared_ff // shape.expert_ff)
    if shape.sliding_window:
        writer.add_sliding_window(shape.sliding_window)


def write_header_gguf(shape: Shape, path: Path, *, split_max_tensors: int = 0) -> list[Path]:
    """Write a header-only GGUF of `shape` (split when asked); return the files."""
    writer = GGUFWriter(path, shape.arch, split_max_tensors=split_max_tensors)
    _metadata(writer, shape)
    for name, ne, qtype in _tensors(shape):
        writer.add_tensor_info(
            name, tuple(reversed(ne)), np.dtype(np.float32), _nbytes(qtype, ne), raw_dtype=qtype
        )
    files = writer.format_shard_names(path)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return files


def write_header_replica(real: Path, path: Path) -> Path:
    """A header-only copy of a real GGUF without its tokenizer arrays (kept small).

    The vocabulary size moves into `<arch>.vocab_size` so the replica describes
    the same model to the planner.
    """
    reader = GGUFReader(real)
    arch = str(reader.fields["general.architecture"].contents())
    writer = GGUFWriter(path, arch)
    skip = {"general.architecture", "GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    for key, value in reader.fields.items():
        if key in skip or key.startswith("tokenizer."):
            continue
        types = value.types
        if types[0] == GGUFValueType.ARRAY:
            writer.add_array(key, list(value.contents()))
        else:
            writer.add_key_value(key, value.contents(), types[0])
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        writer.add_vocab_size(len(tokens.data))
    for tensor in reader.tensors:
        ne = [int(d) for d in tensor.shape]
        writer.add_tensor_info(
            tensor.name,
            tuple(reversed(ne)),
            np.dtype(np.float32),
            int(tensor.n_bytes),
            raw_dtype=tensor.tensor_type,
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


FIXTURE_SHAPES = ("llama-3.1-8b", "qwen3-30b-a3b", "gpt-oss-20b", "deepseek-v2-lite")


def write_fixtures(directory: Path, real_model: Path | None = None) -> list[Path]:
    """The GGUF fixtures of the planner's tests."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in FIXTURE_SHAPES:
        written += write_header_gguf(SHAPES[name], directory / f"{name}.header.gguf")
    if real_model is not None:
        target = directory / real_model.name.replace(".gguf", ".header.gguf")
        written.append(write_header_replica(real_model, target))
    return written
