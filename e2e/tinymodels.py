"""Small GGUF models made here, with random weights, that llama.cpp really loads.

Test infrastructure. One model per architecture family the planner must get
right: `llama` (dense), `qwen3moe` (routed experts), `gemma3` (sliding-window
layers, tied embeddings) and `deepseek2` (MLA, shared and routed experts, a
leading dense layer). Each file carries every metadata key and tensor llama.cpp
requires for its architecture and a small SentencePiece-style vocabulary (byte
fallback tokens plus generated pieces), so `llama-server` loads it and answers a
completion with nonsense text. Weights are seeded random numbers, quantized with
the `gguf` package (Q8_0 for attention and embeddings, Q4_0 for the FFN), so the
same parameters always give the same bytes.

Made files are cached under `$MESH_CACHE/tiny-models/`, named after the model and
a hash of everything that shapes the file, so a rerun finds them at once:

    python -m e2e.tinymodels --out DIR [--arch llama ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quantize

from e2e import parts

Q = GGMLQuantizationType

# Bumped whenever the bytes written for the same spec change.
MAKER_VERSION = 1

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """The shape of a tiny model; every field goes into the cache key."""

    name: str
    arch: str
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    vocab: int = 4096
    context: int = 32768
    tied: bool = False
    qk_norm: bool = False
    experts: int = 0
    experts_used: int = 0
    expert_ff: int = 0
    shared_experts: int = 0
    dense_lead: int = 0
    sliding_window: int = 0
    mla: tuple[int, int, int, int] | None = None  # kv_lora_rank, rope, nope, v head dim
    attn_type: int = int(Q.Q8_0)
    ffn_type: int = int(Q.Q4_0)
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({"maker": MAKER_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def file_name(self) -> str:
        return f"tiny-{self.name}-{self.key()}.gguf"


SPECS: dict[str, TinySpec] = {
    "llama": TinySpec("llama", "llama", 512, 8, 8, 4, 64, 1536),
    "qwen3moe": TinySpec(
        "qwen3moe", "qwen3moe", 512, 6, 8, 4, 64, 1536,
        qk_norm=True, experts=16, experts_used=4, expert_ff=384,
    ),
    "gemma3": TinySpec(
        "gemma3", "gemma3", 512, 12, 4, 2, 128, 1536,
        tied=True, qk_norm=True, sliding_window=256,
    ),
    "deepseek2": TinySpec(
        "deepseek2", "deepseek2", 512, 6, 8, 1, 0, 1536,
        experts=16, experts_used=4, expert_ff=256, shared_experts=2, dense_lead=1,
        mla=(256, 32, 64, 64),
    ),
}  # fmt: skip

ARCHS = tuple(SPECS)


def cache_root() -> Path:
    return parts.cache_dir() / "tiny-models"


def _vocab(size: int) -> tuple[list[str], list[float], list[int]]:
    """An SPM vocabulary: unknown, BOS, EOS, 256 byte tokens, then generated pieces."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [int(TokenType.UNKNOWN), int(TokenType.CONTROL), int(TokenType.CONTROL)]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [int(TokenType.BYTE)] * 256
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    pieces: list[str] = ["\u2581"]
    pieces += list(letters + letters.upper() + "0123456789.,!?'-:;()")
    pieces += ["\u2581" + c for c in letters + letters.upper()]
    for first in letters:
        for second in letters:
            pieces.append("\u2581" + first + second)
            pieces.append(first + second)
    for first in letters:
        for second in letters:
            for third in letters[:8]:
                pieces.append("\u2581" + first + second + third)
    room = size - len(tokens)
    if room > len(pieces):
        raise ValueError(f"vocabulary of {size} is larger than the {len(pieces)} pieces made")
    pieces = pieces[:room]
    tokens += pieces
    types += [int(TokenType.NORMAL)] * len(pieces)
    # Longer pieces score higher so the tokenizer prefers them, as SentencePiece does.
    scores = [0.0] * (3 + 256) + [-float(i) / len(pieces) + len(p) for i, p in enumerate(pieces)]
    return tokens, scores, types


class _Tensors:
    """Random weights in ggml's shapes (`ne`, innermost first), quantized as asked."""

    def __init__(self, writer: GGUFWriter, seed: int) -> None:
        self.writer = writer
        self.rng = np.random.default_rng(seed)

    def weight(self, name: str, ne: Sequence[int], qtype: int, scale: float = 0.05) -> None:
        shape = tuple(reversed(ne))
        data = (self.rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)
        kind = GGMLQuantizationType(qtype)
        if kind == Q.F32:
            self.writer.add_tensor(name, data)
        elif kind == Q.F16:
            self.writer.add_tensor(name, data.astype(np.float16))
        else:
            self.writer.add_tensor(name, quantize(data, kind), raw_dtype=kind)

    def norm(self, name: str, n: int) -> None:
        self.writer.add_tensor(name, np.ones((n,), dtype=np.float32))


def _metadata(writer: GGUFWriter, spec: TinySpec) -> None:
    writer.add_name(f"tiny-{spec.name}")
    writer.add_file_type(int(LlamaFileType.MOSTLY_Q8_0))
    writer.add_context_length(spec.context)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    if spec.mla is not None:
        rank, rope, nope, v_dim = spec.mla
        writer.add_key_length(rank + rope)
        writer.add_value_length(rank)
        writer.add_key_length_mla(nope + rope)
        writer.add_value_length_mla(v_dim)
        writer.add_kv_lora_rank(rank)
        writer.add_q_lora_rank(0)
        writer.add_rope_dimension_count(rope)
        writer.add_leading_dense_block_count(spec.dense_lead)
        writer.add_expert_weights_scale(1.0)
    else:
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
        writer.add_rope_dimension_count(spec.head_dim)
    if spec.experts:
        writer.add_expert_count(spec.experts)
        writer.add_expert_used_count(spec.experts_used)
        writer.add_expert_feed_forward_length(spec.expert_ff)
        if spec.shared_experts:
            writer.add_expert_shared_count(spec.shared_experts)
    if spec.sliding_window:
        writer.add_sliding_window(spec.sliding_window)
    tokens, scores, types = _vocab(spec.vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def _write_tensors(t: _Tensors, spec: TinySpec) -> None:
    e, attn, ffn = spec.n_embd, spec.attn_type, spec.ffn_type
    t.weight("token_embd.weight", (e, spec.vocab), attn)
    t.norm("output_norm.weight", e)
    if not spec.tied:
        t.weight("output.weight", (e, spec.vocab), attn)
    for il in range(spec.n_layer):
        p = f"blk.{il}."
        t.norm(p + "attn_norm.weight", e)
        if spec.mla is not None:
            rank, rope, nope, v_dim = spec.mla
            t.weight(p + "attn_q.weight", (e, spec.n_head * (nope + rope)), attn)
            t.weight(p + "attn_kv_a_mqa.weight", (e, rank + rope), attn)
            t.norm(p + "attn_kv_a_norm.weight", rank)
            t.weight(p + "attn_k_b.weight", (nope, rank, spec.n_head), attn)
            t.weight(p + "attn_v_b.weight", (rank, v_dim, spec.n_head), attn)
            t.weight(p + "attn_output.weight", (spec.n_head * v_dim, e), attn)
        else:
            q_dim, kv_dim = spec.n_head * spec.head_dim, spec.n_head_kv * spec.head_dim
            t.weight(p + "attn_q.weight", (e, q_dim), attn)
            t.weight(p + "attn_k.weight", (e, kv_dim), attn)
            t.weight(p + "attn_v.weight", (e, kv_dim), attn)
            t.weight(p + "attn_output.weight", (q_dim, e), attn)
        if spec.qk_norm:
            t.norm(p + "attn_q_norm.weight", spec.head_dim)
            t.norm(p + "attn_k_norm.weight", spec.head_dim)
        if spec.arch == "gemma3":
            t.norm(p + "post_attention_norm.weight", e)
            t.norm(p + "post_ffw_norm.weight", e)
        t.norm(p + "ffn_norm.weight", e)
        if spec.experts and il >= spec.dense_lead:
            n, ff = spec.experts, spec.expert_ff
            t.weight(p + "ffn_gate_inp.weight", (e, n), int(Q.F32))
            t.weight(p + "ffn_gate_exps.weight", (e, ff, n), ffn)
            t.weight(p + "ffn_up_exps.weight", (e, ff, n), ffn)
            t.weight(p + "ffn_down_exps.weight", (ff, e, n), ffn)
            if spec.shared_experts:
                shared = ff * spec.shared_experts
                t.weight(p + "ffn_gate_shexp.weight", (e, shared), ffn)
                t.weight(p + "ffn_up_shexp.weight", (e, shared), ffn)
                t.weight(p + "ffn_down_shexp.weight", (shared, e), ffn)
        else:
            t.weight(p + "ffn_gate.weight", (e, spec.n_ff), ffn)
            t.weight(p + "ffn_up.weight", (e, spec.n_ff), ffn)
            t.weight(p + "ffn_down.weight", (spec.n_ff, e), ffn)


def write_model(spec: TinySpec, path: Path) -> Path:
    """Write `spec` as a complete GGUF (header and tensor data) at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    writer = GGUFWriter(partial, spec.arch)
    _metadata(writer, spec)
    _write_tensors(_Tensors(writer, spec.seed), spec)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    # Renamed into place whole, so a reader never sees a half-written model.
    partial.replace(path)
    return path


def make_model(arch: str, directory: Path | None = None, **overrides: object) -> Path:
    """The tiny model of `arch` (with any field of its spec overridden), made once.

    Returns the cached file when one with the same parameters exists.
    """
    if arch not in SPECS:
        raise ValueError(f"no tiny model for {arch!r}; one of {', '.join(ARCHS)}")
    spec = replace(SPECS[arch], **overrides)  # type: ignore[arg-type]
    target = (directory or cache_root()) / spec.file_name()
    if target.is_file():
        return target
    return write_model(spec, target)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.tinymodels", description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="directory (default: the cache)")
    parser.add_argument("--arch", action="append", choices=ARCHS, help="default: every one")
    args = parser.parse_args(argv)
    for arch in args.arch or ARCHS:
        path = make_model(arch, args.out)
        print(f"{arch:10s} {path.stat().st_size / 2**20:7.2f} MiB  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
