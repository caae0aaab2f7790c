"""Small builders for planner tests: synthetic profiles, inventories, raw GGUF bytes.

Synthetic profiles are for placement logic (property tests); anything about
reading models uses the recorded header fixtures instead.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from gguf import GGUF_MAGIC, GGUFValueType

from mesh_operator.planner import Inventory, ModelProfile, parse_inventory
from mesh_operator.planner.profile import LayerProfile

MIB = 1 << 20


def synthetic_profile(
    *,
    n_layer: int = 32,
    layer_mib: float = 100.0,
    output_mib: float = 400.0,
    n_embd: int = 4096,
    kv_heads: int = 8,
    head_dim: int = 128,
    swa_every: int = 0,
    window: int = 0,
    experts: int = 0,
    experts_used: int = 0,
    expert_share: float = 0.0,
    vocab: int = 128000,
    ffn: int = 14336,
    name: str = "synthetic.gguf",
) -> ModelProfile:
    """A llama-like profile; every `swa_every`-th layer is full attention when set."""
    weight = int(layer_mib * MIB)
    layers = tuple(
        LayerProfile(
            weight_bytes=weight,
            expert_bytes=int(weight * expert_share),
            n_embd_k=head_dim * kv_heads,
            n_embd_v=head_dim * kv_heads,
            is_swa=bool(swa_every) and il % swa_every < swa_every - 1,
            n_head=32,
        )
        for il in range(n_layer)
    )
    return ModelProfile(
        architecture="llama",
        name="synthetic",
        file_name=name,
        n_layer=n_layer,
        n_embd=n_embd,
        n_vocab=vocab,
        n_head=32,
        head_dim_k=head_dim,
        head_dim_v=head_dim,
        context_train=131072,
        swa_kind="standard" if swa_every else "none",
        n_swa=window if swa_every else 0,
        n_expert=experts,
        n_expert_used=experts_used,
        ffn_active_width=ffn,
        layers=layers,
        input_bytes=int(output_mib * MIB),
        output_bytes=int(output_mib * MIB),
        tied_output=False,
        file_bytes=weight * n_layer + int(2 * output_mib * MIB),
    )


def device(
    id: str = "CUDA0",
    *,
    total: int = 24576,
    free: int | None = None,
    bw: float = 936.0,
    backend: str = "cuda",
    healthy: bool = True,
) -> dict[str, Any]:
    return {
        "id": id,
        "backend": backend,
        "memoryTotalMiB": total,
        "memoryFreeMiB": total if free is None else free,
        "bandwidthGBps": bw,
        "healthy": healthy,
    }


def node(
    name: str,
    *devices: dict[str, Any],
    rtt: float | None = 0.5,
    cached: Sequence[str] = (),
    healthy: bool = True,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name,
        "devices": list(devices) or [device()],
        "cachedModels": list(cached),
        "healthy": healthy,
    }
    if rtt is not None:
        out["rttMs"] = rtt
    return out


def inventory(*nodes: dict[str, Any]) -> Inventory:
    return parse_inventory({"nodes": list(nodes)})


def cpu_nodes(*mib: int, rtt: float = 0.5) -> dict[str, Any]:
    """An inventory (as `mesh plan --inventory` reads it) of CPU-only nodes
    node-a, node-b, ... with `mib` each, their bandwidth left to the default."""
    return {
        "nodes": [
            node(
                f"node-{chr(97 + i)}",
                {"id": "CPU", "backend": "cpu", "memoryTotalMiB": m, "memoryFreeMiB": m},
                rtt=rtt,
            )
            for i, m in enumerate(mib)
        ]
    }


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def raw_gguf(
    *,
    magic: int = GGUF_MAGIC,
    version: int = 3,
    metadata: Sequence[tuple[str, str]] = (("general.architecture", "llama"),),
    tensors: Sequence[tuple[str, Sequence[int], int]] = (("blk.0.attn_q.weight", (32, 32), 0),),
) -> bytes:
    """GGUF header bytes written by hand, for the malformed cases a writer refuses."""
    out = struct.pack("<IIQQ", magic, version, len(tensors), len(metadata))
    for key, value in metadata:
        out += _string(key) + struct.pack("<I", GGUFValueType.STRING) + _string(value)
    for name, shape, type_code in tensors:
        out += _string(name) + struct.pack("<I", len(shape))
        out += b"".join(struct.pack("<Q", d) for d in shape)
        out += struct.pack("<IQ", type_code, 0)
    return out
