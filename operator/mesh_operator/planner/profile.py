"""What the planner knows about a model: bytes per layer, KV shape per layer, MoE, SWA.

Owns the translation of a GGUF header into a `ModelProfile`, following what
llama.cpp does when it loads the same file: the token embedding stays on the
host CPU, repeating layer `il` is `blk.<il>.*`, and the output layer (index
`n_layer`) holds `output_norm`, `output` or, when the model ties its
embeddings, a second copy of `token_embd`. Which layers use a sliding window is
fixed per architecture in llama.cpp (e.g. 5 of every 6 layers in gemma 3)
unless the file says otherwise; the table below records those rules for the
architectures the planner supports, and any other architecture is refused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from gguf import Keys

from mesh_operator.planner.errors import PlannerInputError
from mesh_operator.planner.gguf_header import (
    GgufHeader,
    MetadataValue,
    merge_split_headers,
    read_header_bytes,
    read_header_file,
    split_siblings,
)

SwaKind = Literal["none", "standard", "chunked"]


@dataclass(frozen=True)
class _ArchRule:
    """How llama.cpp decides which layers of an architecture attend to a window.

    pattern: every `pattern`-th layer is full attention (llama.cpp's
    `set_swa_pattern`); `sliding_window` in the file switches SWA on unless
    `always` is set; `default_window` applies when the file has no window.
    """

    swa: SwaKind = "none"
    pattern: int = 0
    dense_first: bool = False
    always: bool = False
    default_window: int = 0


_DENSE = _ArchRule()
# Architectures whose KV cache is one standard attention cache per layer (or MLA),
# with their llama.cpp SWA rules. Recurrent and hybrid models are not planned.
ARCHITECTURES: Mapping[str, _ArchRule] = {
    "llama": _DENSE,
    "mistral3": _DENSE,
    "qwen2": _DENSE,
    "qwen2moe": _DENSE,
    "qwen3": _DENSE,
    "qwen3moe": _DENSE,
    "phi3": _DENSE,  # llama.cpp disables Phi's SWA
    "phimoe": _DENSE,
    "command-r": _DENSE,
    "granite": _DENSE,
    "granitemoe": _DENSE,
    "starcoder2": _DENSE,
    "internlm2": _DENSE,
    "stablelm": _DENSE,
    "falcon": _DENSE,
    "deepseek2": _DENSE,
    "olmoe": _DENSE,
    "glm4": _DENSE,
    "exaone": _DENSE,
    "smollm3": _DENSE,
    "ernie4_5": _DENSE,
    "ernie4_5-moe": _DENSE,
    "seed_oss": _DENSE,
    "hunyuan-dense": _DENSE,
    "dbrx": _DENSE,
    "grok": _DENSE,
    "gemma": _DENSE,
    "gemma2": _ArchRule("standard", 2, always=True, default_window=4096),
    "gemma3": _ArchRule("standard", 6),
    "cohere2": _ArchRule("standard", 4, always=True),
    "olmo2": _ArchRule("standard", 4),
    "gpt-oss": _ArchRule("standard", 2, always=True),
    "llama4": _ArchRule("chunked", 4, always=True, default_window=8192),
}

# Tensors llama.cpp keeps on the host CPU with the input layer.
_INPUT_PREFIXES = ("token_embd.", "token_types.", "position_embd.", "per_layer_token_embd.")


@dataclass(frozen=True)
class LayerProfile:
    """One repeating layer: its weights and the KV it keeps per cell."""

    weight_bytes: int
    expert_bytes: int  # part of weight_bytes in routed-expert tensors
    n_embd_k: int  # K elements per KV cell (head_dim_k * n_head_kv, or the MLA latent)
    n_embd_v: int  # V elements per KV cell (0 with MLA: V is a view of K)
    is_swa: bool
    n_head: int
    # FFN widths per token: a dense FFN's, or one routed expert's and the shared experts'.
    ffn_dense: int = 0
    ffn_expert: int = 0
    ffn_shared: int = 0


@dataclass(frozen=True)
class ModelProfile:
    """The planner's view of a model, built from its header alone."""

    architecture: str
    name: str
    file_name: str
    n_layer: int
    n_embd: int
    n_vocab: int
    n_head: int
    head_dim_k: int
    head_dim_v: int
    context_train: int
    swa_kind: SwaKind
    n_swa: int
    n_expert: int
    n_expert_used: int
    ffn_active_width: int  # widest FFN a token goes through (active experts for MoE)
    layers: tuple[LayerProfile, ...]
    input_bytes: int  # token embedding and other inputs, on the host CPU
    output_bytes: int  # output norm + output matrix (or the tied embedding copy)
    tied_output: bool
    file_bytes: int  # all tensors as stored
    # Whether the file carries `tokenizer.chat_template` (a profile encoded before
    # this was recorded is taken to have one: nothing is chosen in its place).
    has_chat_template: bool = True
    # Attention details that shape the compute graph.
    qk_norm: bool = False  # per-head norms of Q and K
    n_rot: int = 0  # rotary dimensions (MLA: the positional part of a key)
    mla_rank: int = 0  # MLA: the compressed KV width (kv_lora_rank); 0 without MLA
    head_dim_q: int = 0  # MLA: a query head (nope + rope)
    head_dim_v_mla: int = 0  # MLA: a value head after decompression

    def __hash__(self) -> int:
        # The planner caches per profile (compute buffers): hash its fields once.
        cached: int | None = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(tuple(getattr(self, f.name) for f in fields(self)))
            object.__setattr__(self, "_hash", cached)
        return cached

    @property
    def n_device_layers(self) -> int:
        """Layers llama.cpp places on devices: the repeating ones plus the output."""
        return self.n_layer + 1

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights placed on devices (excluding the host's input layer)."""
        return sum(layer.weight_bytes for layer in self.layers) + self.output_bytes

    @property
    def expert_fraction(self) -> float:
        """Share of routed-expert weights a token reads."""
        return self.n_expert_used / self.n_expert if self.n_expert else 1.0

    @property
    def has_swa(self) -> bool:
        return any(layer.is_swa for layer in self.layers)

    @property
    def has_full_attention(self) -> bool:
        return any(not layer.is_swa and layer.n_embd_k for layer in self.layers)


def _int(value: MetadataValue | None, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlannerInputError(f"{source}: metadata {key} missing or not an integer")
    return value


def _per_layer(
    value: MetadataValue | None, n_layer: int, key: str, source: str, default: int | None = None
) -> list[int]:
    """Scalar or per-layer array metadata as one integer per layer."""
    if value is None and default is not None:
        return [default] * n_layer
    if isinstance(value, tuple):
        items = [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
        if len(items) != len(value) or len(items) < n_layer:
            raise PlannerInputError(
                f"{source}: metadata {key} has {len(value)} items, not {n_layer}"
            )
        return items[:n_layer]
    return [_int(value, key, source)] * n_layer


def _swa_layers(
    header: GgufHeader, arch: str, rule: _ArchRule, n_layer: int
) -> tuple[list[bool], int]:
    """Which layers use a sliding window, and the window, as llama.cpp decides."""
    window_value = header.get(Keys.Attention.SLIDING_WINDOW.format(arch=arch))
    window = window_value if isinstance(window_value, int) else None
    if rule.swa == "none":
        return [False] * n_layer, 0
    if window is None:
        if not rule.always:
            return [False] * n_layer, 0
        window = rule.default_window
    if window <= 0:
        return [False] * n_layer, 0
    if rule.swa == "chunked":
        # llama4: the file's value only switches chunking on; the chunk is fixed.
        window = rule.default_window
    pattern_value = header.get(Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch))
    if isinstance(pattern_value, tuple):
        flags = [bool(v) for v in pattern_value]
        if len(flags) < n_layer:
            raise PlannerInputError(
                f"{header.source}: sliding_window_pattern has {len(flags)} items, not {n_layer}"
            )
        return flags[:n_layer], window
    pattern = pattern_value if isinstance(pattern_value, int) else rule.pattern
    if rule.dense_first:
        flags = [pattern == 0 or il % pattern != 0 for il in range(n_layer)]
    else:
        flags = [pattern == 0 or il % pattern < pattern - 1 for il in range(n_layer)]
    return flags, window


def _ffn_width(names: Mapping[str, tuple[int, ...]], il: int, n_used: int, fallback: int) -> int:
    prefix = f"blk.{il}."
    width = 0
    for kind in ("ffn_up_exps.weight", "ffn_gate_exps.weight", "ffn_gate_up_exps.weight"):
        shape = names.get(prefix + kind)
        if shape is not None and len(shape) >= 2:
            width = shape[1] * max(n_used, 1)
            break
    else:
        shape = names.get(prefix + "ffn_up.weight") or names.get(prefix + "ffn_gate.weight")
        width = shape[1] if shape is not None and len(shape) >= 2 else fallback
    shared = names.get(prefix + "ffn_up_shexp.weight")
    if shared is not None and len(shared) >= 2:
        width += shared[1]
    return width


def _opt_int(value: MetadataValue | None, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _ffn_widths(names: Mapping[str, tuple[int, ...]], il: int) -> tuple[int, int, int]:
    """(dense, one routed expert, shared experts) FFN widths of layer `il`."""

    def rows(kind: str, per: int = 1) -> int:
        shape = names.get(f"blk.{il}.{kind}.weight")
        return shape[1] // per if shape is not None and len(shape) >= 2 else 0

    expert = rows("ffn_up_exps") or rows("ffn_gate_up_exps", 2)
    dense = 0 if expert else rows("ffn_up") or rows("ffn_gate")
    return dense, expert, rows("ffn_up_shexp")


def build_model_profile(header: GgufHeader, file_name: str | None = None) -> ModelProfile:
    """The profile of a model from its (merged) header. Pure."""
    source = header.source
    arch_value = header.get(Keys.General.ARCHITECTURE)
    if not isinstance(arch_value, str):
        raise PlannerInputError(f"{source}: metadata general.architecture is missing")
    arch = arch_value
    rule = ARCHITECTURES.get(arch)
    if rule is None:
        raise PlannerInputError(
            f"{source}: unknown architecture {arch!r}"
            f" (supported: {', '.join(sorted(ARCHITECTURES))})"
        )

    def key(template: str) -> str:
        return template.format(arch=arch)

    n_layer = _int(header.get(key(Keys.LLM.BLOCK_COUNT)), key(Keys.LLM.BLOCK_COUNT), source)
    if not 0 < n_layer <= 512:
        raise PlannerInputError(f"{source}: block_count {n_layer} is out of range")
    n_embd = _int(
        header.get(key(Keys.LLM.EMBEDDING_LENGTH)), key(Keys.LLM.EMBEDDING_LENGTH), source
    )
    heads = _per_layer(
        header.get(key(Keys.Attention.HEAD_COUNT)), n_layer, key(Keys.Attention.HEAD_COUNT), source
    )
    n_head_max = max(heads)
    if n_head_max <= 0:
        raise PlannerInputError(f"{source}: {key(Keys.Attention.HEAD_COUNT)} must be positive")
    heads_kv = _per_layer(
        header.get(key(Keys.Attention.HEAD_COUNT_KV)),
        n_layer,
        key(Keys.Attention.HEAD_COUNT_KV),
        source,
        default=-1,
    )
    heads_kv = [h if kv < 0 else kv for h, kv in zip(heads, heads_kv, strict=True)]
    head_k_value = header.get(key(Keys.Attention.KEY_LENGTH))
    head_v_value = header.get(key(Keys.Attention.VALUE_LENGTH))
    head_k = head_k_value if isinstance(head_k_value, int) else n_embd // n_head_max
    head_v = head_v_value if isinstance(head_v_value, int) else n_embd // n_head_max
    # MLA (deepseek2 and kin) caches one latent per token: K only, V is a view of it.
    mla = isinstance(header.get(key(Keys.Attention.KEY_LENGTH_MLA)), int)

    n_expert_value = header.get(key(Keys.LLM.EXPERT_COUNT))
    n_expert = n_expert_value if isinstance(n_expert_value, int) else 0
    n_used_value = header.get(key(Keys.LLM.EXPERT_USED_COUNT))
    n_used = n_used_value if isinstance(n_used_value, int) else 0
    if n_expert and not 0 < n_used <= n_expert:
        raise PlannerInputError(f"{source}: expert_used_count {n_used} with {n_expert} experts")

    swa_flags, window = _swa_layers(header, arch, rule, n_layer)
    swa_kind: SwaKind = rule.swa if any(swa_flags) else "none"

    weight = [0] * n_layer
    expert = [0] * n_layer
    input_bytes = 0
    output_bytes = 0
    embd_bytes = 0
    has_output = False
    shapes: dict[str, tuple[int, ...]] = {}
    for tensor in header.tensors:
        shapes[tensor.name] = tensor.shape
        name = tensor.name
        if name.startswith("blk."):
            index_text = name.split(".", 2)[1]
            if not index_text.isdigit():
                raise PlannerInputError(f"{source}: tensor {name!r} has no layer number")
            il = int(index_text)
            if il >= n_layer:
                raise PlannerInputError(f"{source}: tensor {name!r} is past block_count {n_layer}")
            weight[il] += tensor.n_bytes
            if "_exps." in name:
                expert[il] += tensor.n_bytes
        elif name.startswith(_INPUT_PREFIXES):
            input_bytes += tensor.n_bytes
            if name == "token_embd.weight":
                embd_bytes = tensor.n_bytes
        else:
            output_bytes += tensor.n_bytes
            has_output = has_output or name == "output.weight"
    if not header.tensors:
        raise PlannerInputError(f"{source}: the header lists no tensors")
    tied = not has_output
    if tied:
        # llama.cpp loads the embedding a second time on the output layer's device.
        output_bytes += embd_bytes

    vocab_value = header.get(key(Keys.LLM.VOCAB_SIZE))
    if isinstance(vocab_value, int):
        n_vocab = vocab_value
    elif "tokenizer.ggml.tokens" in header.array_lengths:
        n_vocab = header.array_lengths["tokenizer.ggml.tokens"]
    else:
        embd_shape = shapes.get("token_embd.weight") or shapes.get("output.weight")
        n_vocab = embd_shape[1] if embd_shape and len(embd_shape) > 1 else 0

    ff_value = header.get(key(Keys.LLM.FEED_FORWARD_LENGTH))
    ff_default = max(ff_value) if isinstance(ff_value, tuple) else ff_value
    ff_fallback = ff_default if isinstance(ff_default, int) else 4 * n_embd
    ffn = max(_ffn_width(shapes, il, n_used, ff_fallback) for il in range(n_layer))

    widths = [_ffn_widths(shapes, il) for il in range(n_layer)]
    # MLA's cached key is the latent plus the rotary part: without the rope key,
    # the rotary width is what the key adds to the latent.
    mla_rank = _opt_int(header.get(key(Keys.Attention.KV_LORA_RANK)), 0) if mla else 0
    layers = tuple(
        LayerProfile(
            weight_bytes=weight[il],
            expert_bytes=expert[il],
            n_embd_k=head_k * heads_kv[il],
            n_embd_v=0 if mla else head_v * heads_kv[il],
            is_swa=swa_flags[il],
            n_head=heads[il],
            ffn_dense=widths[il][0],
            ffn_expert=widths[il][1],
            ffn_shared=widths[il][2],
        )
        for il in range(n_layer)
    )
    ctx_value = header.get(key(Keys.LLM.CONTEXT_LENGTH))
    name_value = header.get(Keys.General.NAME)
    return ModelProfile(
        architecture=arch,
        name=name_value if isinstance(name_value, str) else "",
        file_name=file_name or Path(source).name,
        n_layer=n_layer,
        n_embd=n_embd,
        n_vocab=n_vocab,
        n_head=n_head_max,
        head_dim_k=head_k,
        head_dim_v=head_v,
        context_train=ctx_value if isinstance(ctx_value, int) else 0,
        swa_kind=swa_kind,
        n_swa=window if swa_kind != "none" else 0,
        n_expert=n_expert,
        n_expert_used=n_used,
        ffn_active_width=ffn,
        layers=layers,
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        tied_output=tied,
        file_bytes=sum(t.n_bytes for t in header.tensors),
        has_chat_template=isinstance(header.get(Keys.Tokenizer.CHAT_TEMPLATE), str),
        qk_norm="blk.0.attn_q_norm.weight" in shapes,
        n_rot=_opt_int(header.get(key(Keys.Rope.DIMENSION_COUNT)), head_k - mla_rank),
        mla_rank=mla_rank,
        head_dim_q=_opt_int(header.get(key(Keys.Attention.KEY_LENGTH_MLA)), head_k),
        head_dim_v_mla=_opt_int(header.get(key(Keys.Attention.VALUE_LENGTH_MLA)), head_v),
    )


ModelSource = str | os.PathLike[str] | bytes


def read_model_profile(
    source: ModelSource | Sequence[ModelSource], *, file_name: str | None = None
) -> ModelProfile:
    """Read a model's header and build its profile.

    `source` is a path (a split model's other files are found next to it), the
    bytes of a header (a whole file or its first bytes up to the end of the
    tensor infos), or a sequence of either for the files of a split model.
    """
    single = isinstance(source, str | bytes | os.PathLike)
    items: list[ModelSource] = [source] if single else list(source)  # type: ignore[list-item,arg-type]
    headers: list[GgufHeader] = []
    for item in items:
        if isinstance(item, bytes):
            headers.append(read_header_bytes(item))
            continue
        paths = split_siblings(item) if len(items) == 1 else [Path(item)]
        headers.extend(read_header_file(p) for p in paths)
    header = merge_split_headers(headers)
    if file_name is None and not isinstance(items[0], bytes):
        file_name = Path(os.fspath(items[0])).name
    return build_model_profile(header, file_name=file_name)
