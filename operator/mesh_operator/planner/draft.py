"""The memory of a draft model, which the host runs on its own CPU.

Owns the draft's estimate. llama-server runs the draft (`-md`, `-devd none`) in
the host process: all its layers on the CPU, its context as long as the main
model's with as many sequences (`-np`), its KV cache in llama.cpp's default f16
(the builders set no `-ctkd`/`-ctvd`), one compute buffer for one ubatch (a
device's holding every layer, plus the embedded input rows, which a split keeps
in the host's own buffer) and the logits of its output. On the CPU a tied
embedding is one tensor, used for input and output alike, so it counts once.
"""

from __future__ import annotations

from dataclasses import replace

from mesh_operator.planner.memory import F32, DeviceMemory, ServingParams, estimate_memory
from mesh_operator.planner.profile import ModelProfile

__all__ = ["estimate_draft_memory"]


def estimate_draft_memory(profile: ModelProfile, serving: ServingParams) -> DeviceMemory:
    """Weights, KV and compute (with the output buffer) of a draft on the host's CPU."""
    params = replace(serving, cache_type_k="f16", cache_type_v="f16")
    estimate = estimate_memory(profile, params, [(0, profile.n_device_layers)])
    device = estimate.devices[0]
    weights = device.weights + (0 if profile.tied_output else profile.input_bytes)
    inputs = profile.n_embd * estimate.geometry.ubatch * F32
    logits = profile.n_vocab * params.parallel * F32
    return DeviceMemory(weights=weights, kv=device.kv, compute=device.compute + inputs + logits)
