"""How much memory llama.cpp takes on each device for a given placement.

Owns the estimate of the three buffers llama.cpp logs per device:

- model buffer: the weights of the layers on the device (and the output layer on
  the last one), exactly as the header sizes them;
- KV buffer: llama.cpp's cache geometry — the context is padded to 256 cells, an
  explicit `--parallel N` gives N streams of `ctx/N` cells each, and layers with a
  sliding window keep only `pad256(min(ctx/N, window + ubatch))` cells per stream;
- compute buffer: the graph's working memory for the worst-case ubatch, from a
  replay of ggml's graph allocator over the layers the device holds
  (`compute`);

and the host's own: the input layer's weights, the output buffer (the logits of
one output per slot) and its compute buffer (the graph inputs and the token
embedding's rows). Everything is in bytes; the callers round to MiB.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from mesh_operator.planner.compute import (
    GraphShape,
    compute_buffers,
    device_compute_bytes,
    host_compute_bytes,
)
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


def graph_shape(profile: ModelProfile, params: ServingParams, geometry: KvGeometry) -> GraphShape:
    """The worst-case ubatch llama.cpp reserves its graphs for."""
    n_seq = geometry.n_stream
    # llama_context::graph_reserve: n_ubatch tokens (at most the context), a
    # multiple of the sequences, and one output per sequence.
    tokens = pad(geometry.ubatch, n_seq)
    return GraphShape(
        n_tokens=tokens,
        n_outputs=min(tokens, params.parallel),
        n_stream=n_seq,
        cells_full=geometry.cells_full,
        cells_swa=geometry.cells_swa,
        flash=params.flash,
        cache_type_k=int(CACHE_TYPES[params.cache_type_k]),
        cache_type_v=int(CACHE_TYPES[params.cache_type_v]),
    )


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
    """The compute buffer of a device whose layers use these kinds of attention.

    For placement, which budgets a range before knowing it exactly: the buffer
    of a representative range holding the first layer of each kind asked for
    (and everything from there to the output layer when it holds that too). The
    defaults give what a device of this model needs at most. `estimate_memory`
    replays the exact ranges.
    """
    shape = graph_shape(profile, params, geometry)
    n = profile.n_layer
    if n_devices <= 1:
        return device_compute_bytes(
            profile, shape, 0, n + 1, first_device=True, last_device=True, n_devices=1
        )
    wanted = [
        next(il for il, layer in enumerate(profile.layers) if layer.is_swa == swa)
        for swa, asked in ((False, has_full), (True, has_swa))
        if asked and any(layer.is_swa == swa for layer in profile.layers)
    ]
    if holds_output:
        # A device holding the output layer is budgeted as if it held two
        # repeating layers before it: alone, the output layer needs a few hundred
        # KiB (and the last repeating layer runs its FFN on the output rows only),
        # and the search's bounds, which take the least any device needs, would no
        # longer rule out node sets.
        first, last = min([*wanted, max(n - 2, 0)]), n + 1
    else:
        wanted = wanted or [0]
        first, last = min(wanted), max(wanted) + 1
    return device_compute_bytes(
        profile,
        shape,
        first,
        last,
        first_device=first == 0,
        last_device=holds_output,
        n_devices=n_devices,
    )


def host_memory_bytes(
    profile: ModelProfile, params: ServingParams, geometry: KvGeometry, *, n_devices: int
) -> int:
    """RAM of the host process beyond its binary: inputs, output buffer, compute."""
    return host_buffers(profile, params, geometry, n_devices=n_devices).total


def host_buffers(
    profile: ModelProfile, params: ServingParams, geometry: KvGeometry, *, n_devices: int
) -> DeviceMemory:
    """The host's CPU buffers: the input layer's weights, the logits of one
    output per slot (llama.cpp's output buffer, counted with the KV as what the
    context holds) and its compute buffer."""
    shape = graph_shape(profile, params, geometry)
    logits = profile.n_vocab * params.parallel * F32
    compute = host_compute_bytes(profile, shape, n_devices=n_devices)
    return DeviceMemory(profile.input_bytes, logits, compute)


def host_layers_buffers(
    profile: ModelProfile, params: ServingParams, cpu_layers: int, *, n_devices: int
) -> DeviceMemory:
    """What the host's CPU holds when it runs layers `[0, cpu_layers)` itself (the
    output layer too when `cpu_layers` is `n_layer + 1`), beside `n_devices`
    other devices: those layers' weights (with `-lm none` memory of their own,
    beside the input layer in the CPU's model buffer; a tied output is the input
    layer's tensor, not loaded again), their KV, and the CPU's one compute buffer,
    which the host process has anyway: a device's holding those layers alone plus
    the embedded input rows (llama.cpp's log: 20.77 MiB for gemma-3-270m with or
    without a device after it), or the host's own, whichever is larger. The input
    layer and the output buffer stay the host process's own, as in any plan
    (`host_buffers`), like a RAM tier's."""
    n = profile.n_device_layers
    if not 0 < cpu_layers <= n:
        raise PlannerInputError(f"cpu layers {cpu_layers} not in 1..{n}")
    geometry = kv_geometry(profile, params)
    repeating = range(min(cpu_layers, profile.n_layer))
    weights = sum(profile.layers[il].weight_bytes for il in repeating)
    if cpu_layers == n and not profile.tied_output:
        weights += profile.output_bytes
    kv = sum(layer_kv_bytes(profile, params, geometry)[: len(repeating)])
    shape = graph_shape(profile, params, geometry)
    layers = device_compute_bytes(
        profile, shape, 0, cpu_layers, first_device=True, last_device=cpu_layers == n, n_devices=1
    )
    rows = profile.n_embd * geometry.ubatch * F32
    own = host_compute_bytes(profile, shape, n_devices=n_devices + 1)
    return DeviceMemory(weights, kv, max(layers + rows, own))


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
    host_buffers: DeviceMemory  # weights: input layer, kv: output buffer, compute

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
    computes, _ = compute_buffers(profile, graph_shape(profile, params, geometry), layer_ranges)
    used = sum(1 for first, last in layer_ranges if last > first)
    devices = []
    for (first, last), compute in zip(layer_ranges, computes, strict=True):
        if last == first:
            devices.append(DeviceMemory(0, 0, 0))
            continue
        repeating = range(first, min(last, profile.n_layer))
        weights = sum(profile.layers[il].weight_bytes for il in repeating)
        if last == n:
            weights += profile.output_bytes
        devices.append(DeviceMemory(weights, sum(kv[il] for il in repeating), compute))
    host = host_buffers(profile, params, geometry, n_devices=used)
    return MemoryEstimate(tuple(devices), host.total, geometry, host)
