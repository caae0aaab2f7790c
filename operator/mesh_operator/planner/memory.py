"""How much memory llama.cpp takes on each device for a given placement.

Owns the estimate of the three buffers llama.cpp logs per device:

- model buffer: the weights of the layers on the device (and the output layer on
  the last one), exactly as the header sizes them;
- KV buffer: llama.cpp's cache geometry — the context is padded to 256 cells, an
  explicit `--parallel N` gives N streams of `ctx/N` cells each, and layers with a
  sliding window keep only `pad256(min(ctx/N, window + ubatch))` cells per stream;
- compute buffer: the graph's working memory for one ubatch. An empirical model
  of what ggml's allocator reserves, fitted on llama.cpp's own logs: the
  attention masks and the activation arriving from the previous device (four
  copies of each when the model spans several devices, for pipeline
  parallelism), plus the widest activations of a layer (three FFN-wide and three
  embedding-wide float rows per token), the K·Q scores when flash attention is
  off, and the Hadamard rotation of Q when the cache is quantized.

Everything is in bytes; the callers round to MiB.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from mesh_operator.planner.errors import PlannerInputError
from mesh_operator.planner.profile import ModelProfile

FlashAttention = Literal["on", "off", "auto"]

# Cache types llama-server accepts for -ctk/-ctv.
CACHE_TYPES: Mapping[str, GGMLQuantizationType] = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16,
    "q8_0": GGMLQuantizationType.Q8_0,
    "q4_0": GGMLQuantizationType.Q4_0,
    "q4_1": GGMLQuantizationType.Q4_1,
    "iq4_nl": GGMLQuantizationType.IQ4_NL,
    "q5_0": GGMLQuantizationType.Q5_0,
    "q5_1": GGMLQuantizationType.Q5_1,
}
_FLOAT_CACHES = frozenset({"f32", "f16", "bf16"})

KV_PAD = 256  # llama.cpp pads the context and the SWA cache to 256 cells
SCHED_COPIES = 4  # GGML_SCHED_MAX_COPIES: input copies with pipeline parallelism
MIB = 1 << 20
F32 = 4


def pad(value: int, to: int) -> int:
    return (value + to - 1) // to * to


@dataclass(frozen=True)
class ServingParams:
    """The llama-server settings that shape memory."""

    ctx: int = 4096
    parallel: int = 1
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attention: FlashAttention = "auto"
    ubatch: int = 512
    batch: int = 2048

    def validate(self) -> None:
        if self.ctx <= 0:
            raise PlannerInputError(f"ctx must be > 0, got {self.ctx}")
        if self.parallel <= 0:
            raise PlannerInputError(f"parallel must be > 0, got {self.parallel}")
        if self.ubatch <= 0 or self.batch <= 0:
            raise PlannerInputError("ubatch and batch must be > 0")
        for flag, value in (
            ("cache-type-k", self.cache_type_k),
            ("cache-type-v", self.cache_type_v),
        ):
            if value not in CACHE_TYPES:
                raise PlannerInputError(f"{flag} {value!r} is not one of {', '.join(CACHE_TYPES)}")
        if self.flash_attention == "off" and self.cache_type_v not in _FLOAT_CACHES:
            raise PlannerInputError(
                f"cache-type-v {self.cache_type_v} needs flash attention (it is off)"
            )

    @property
    def flash(self) -> bool:
        # "auto" turns flash attention on for every backend mesh runs (CPU, CUDA, ROCm).
        return self.flash_attention != "off"

    @property
    def quantized_cache(self) -> bool:
        return self.cache_type_k not in _FLOAT_CACHES or self.cache_type_v not in _FLOAT_CACHES


@dataclass(frozen=True)
class KvGeometry:
    """llama.cpp's cache shape for a context: streams and cells per stream."""

    n_ctx: int  # total cells after padding
    n_stream: int
    cells_full: int  # per stream, full-attention layers
    cells_swa: int  # per stream, sliding-window layers
    ubatch: int


def kv_geometry(profile: ModelProfile, params: ServingParams) -> KvGeometry:
    """Cells per stream as llama_context and llama_kv_cache_iswa size them."""
    n_ctx = pad(params.ctx, KV_PAD)
    n_seq = params.parallel
    # llama-server with an explicit --parallel keeps one stream per slot.
    n_ctx_seq = pad(n_ctx // n_seq, KV_PAD) if n_ctx // n_seq else KV_PAD
    n_ctx = n_ctx_seq * n_seq
    ubatch = min(params.ubatch, params.batch, n_ctx)
    cells_swa = 0
    if profile.has_swa:
        cells_swa = pad(min(n_ctx_seq, profile.n_swa + ubatch), KV_PAD)
    return KvGeometry(n_ctx, n_seq, n_ctx_seq, cells_swa, ubatch)


def row_bytes(cache_type: str, elements: int) -> int:
    block, size = GGML_QUANT_SIZES[CACHE_TYPES[cache_type]]
    if elements % block:
        raise PlannerInputError(
            f"cache type {cache_type} needs rows that are a multiple of {block}, got {elements}"
        )
    return elements // block * size


def kv_cell_bytes(profile: ModelProfile, params: ServingParams, il: int) -> int:
    """Bytes of K and V that layer `il` keeps per cell."""
    layer = profile.layers[il]
    k = row_bytes(params.cache_type_k, layer.n_embd_k) if layer.n_embd_k else 0
    v = row_bytes(params.cache_type_v, layer.n_embd_v) if layer.n_embd_v else 0
    return k + v


def layer_kv_bytes(profile: ModelProfile, params: ServingParams, geometry: KvGeometry) -> list[int]:
    """KV bytes of each repeating layer at this context, all streams."""
    out = []
    for il, layer in enumerate(profile.layers):
        cells = geometry.cells_swa if layer.is_swa else geometry.cells_full
        out.append(kv_cell_bytes(profile, params, il) * cells * geometry.n_stream)
    return out


def layer_memory_bytes(
    profile: ModelProfile, params: ServingParams, geometry: KvGeometry
) -> list[int]:
    """Weights + KV of each device layer (index n_layer is the output layer)."""
    kv = layer_kv_bytes(profile, params, geometry)
    per_layer = [layer.weight_bytes + kv[il] for il, layer in enumerate(profile.layers)]
    per_layer.append(profile.output_bytes)
    return per_layer


def compute_buffer_bytes(
    profile: ModelProfile,
    params: ServingParams,
    geometry: KvGeometry,
    *,
    n_devices: int,
    has_full: bool = True,
    has_swa: bool = True,
    holds_output: bool = True,
) -> int:
    """The compute buffer llama.cpp reserves on one device.

    The defaults (both kinds of attention, output layer present) give the most a
    device of this model can need, which is what placement budgets for.
    """
    ub = geometry.ubatch
    copies = SCHED_COPIES if n_devices > 1 else 1
    mask_elem = 2 if params.flash else F32
    full = geometry.cells_full if has_full and profile.has_full_attention else 0
    swa = geometry.cells_swa if has_swa and profile.has_swa else 0
    inputs = copies * ((full + swa) * ub * mask_elem + profile.n_embd * ub * F32)
    q_dim = profile.n_head * profile.head_dim_k
    kv_dim = max((layer.n_embd_k + layer.n_embd_v for layer in profile.layers), default=0)
    peak = 3 * profile.n_embd + max(3 * profile.ffn_active_width, 2 * q_dim + kv_dim)
    peak += profile.n_expert  # router logits
    work = ub * F32 * peak
    if not params.flash:
        # Without flash attention the K*Q scores are materialized per head. With
        # pipeline parallelism llama.cpp's logs show both kinds' scores live at once.
        kq_full = profile.n_head * full * ub * F32
        kq_swa = profile.n_head * swa * ub * F32
        scores = kq_full + kq_swa if copies > 1 else max(kq_full, kq_swa)
        attention = ub * F32 * (3 * profile.n_embd + q_dim + kv_dim) + scores
        work = max(work, attention)
    elif params.quantized_cache and profile.head_dim_k % 64 == 0:
        work += q_dim * ub * F32 + copies * profile.head_dim_k**2 * F32
    if holds_output:
        logits = profile.n_vocab * params.parallel * F32
        work = max(work, logits + 2 * profile.n_embd * ub * F32)
    return inputs + work


def host_memory_bytes(
    profile: ModelProfile, params: ServingParams, geometry: KvGeometry, *, n_devices: int
) -> int:
    """RAM of the host process beyond its binary: inputs, output buffer, compute."""
    ub = geometry.ubatch
    copies = SCHED_COPIES if n_devices > 1 else 1
    mask_elem = 2 if params.flash else F32
    cells = (geometry.cells_full if profile.has_full_attention else 0) + geometry.cells_swa
    logits = profile.n_vocab * params.parallel * F32
    compute = copies * (cells * ub * mask_elem + profile.n_embd * ub * F32)
    compute += profile.n_embd * ub * F32 + logits
    return profile.input_bytes + logits + compute


@dataclass(frozen=True)
class DeviceMemory:
    """One device's three buffers, in bytes."""

    weights: int
    kv: int
    compute: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute


@dataclass(frozen=True)
class MemoryEstimate:
    devices: tuple[DeviceMemory, ...]
    host: int
    geometry: KvGeometry

    @property
    def total(self) -> int:
        return sum(d.total for d in self.devices)


def estimate_memory(
    profile: ModelProfile,
    params: ServingParams,
    layer_ranges: Sequence[tuple[int, int]],
) -> MemoryEstimate:
    """Per-device memory for devices holding these `[first, last)` layer ranges.

    Ranges follow llama.cpp's device order and must tile 0..n_layer+1 (the last
    index is the output layer); a device may hold an empty range.
    """
    params.validate()
    n = profile.n_device_layers
    expected = 0
    for first, last in layer_ranges:
        if first != expected or last < first:
            raise PlannerInputError(f"layer ranges {list(layer_ranges)} do not tile 0..{n}")
        expected = last
    if expected != n:
        raise PlannerInputError(f"layer ranges {list(layer_ranges)} do not cover 0..{n}")
    geometry = kv_geometry(profile, params)
    kv = layer_kv_bytes(profile, params, geometry)
    used = sum(1 for first, last in layer_ranges if last > first)
    devices = []
    for first, last in layer_ranges:
        if last == first:
            devices.append(DeviceMemory(0, 0, 0))
            continue
        repeating = range(first, min(last, profile.n_layer))
        weights = sum(profile.layers[il].weight_bytes for il in repeating)
        holds_output = last == n
        if holds_output:
            weights += profile.output_bytes
        kinds = [profile.layers[il] for il in repeating]
        compute = compute_buffer_bytes(
            profile,
            params,
            geometry,
            n_devices=used,
            has_full=any(not k.is_swa for k in kinds),
            has_swa=any(k.is_swa for k in kinds),
            holds_output=holds_output,
        )
        devices.append(DeviceMemory(weights, sum(kv[il] for il in repeating), compute))
    host = host_memory_bytes(profile, params, geometry, n_devices=used)
    return MemoryEstimate(tuple(devices), host, geometry)
