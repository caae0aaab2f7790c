"""The compute buffers llama.cpp reserves on each device, by replaying its allocator.

Owns the third buffer of the memory estimate. llama.cpp sizes a device's compute
buffer by building the graph of one worst-case ubatch (`n_ubatch` tokens, one
output per slot) and letting ggml's graph allocator place every intermediate
tensor: best-fit free blocks, a tensor freed after its last consumer, an
element-wise op writing over its only input. The scheduler cuts the graph where
the device changes and gives each device a copy of the tensors it reads from
elsewhere (the graph inputs — masks, positions, cache indices — live on the host
CPU); with several devices (pipeline parallelism) it keeps four copies of each,
never freed. The buffer is the allocator's high-water mark.

This module builds the same graph at the level of tensor sizes — per layer the
attention of a llama-like, gemma-like or MLA (deepseek2) layer with flash
attention on or off and the Hadamard rotations of a quantized cache, then a
dense, routed-expert or shared-expert FFN; the output layer on `n_outputs` rows
— splits it over the devices and replays the allocator. Tensors of a few
kilobytes (router weights, positions of a few tokens) are left out when they do
not change the peak; every tensor that scales with the ubatch is in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from gguf import GGML_QUANT_SIZES

from mesh_operator.planner.profile import LayerProfile, ModelProfile

F32 = 4
F16 = 2
I32 = 4
I64 = 8
SCHED_COPIES = 4  # GGML_SCHED_MAX_COPIES: input copies with pipeline parallelism
_ALIGN = 32  # the CPU backend's buffer alignment (RPC servers report their device's)


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass(eq=False)
class _Tensor:
    """A node or leaf of the graph, as the allocator sees it."""

    name: str
    nbytes: int
    backend: int
    srcs: list[_Tensor] = field(default_factory=list)
    inplace: bool = False  # the op may write over a parent of the same layout
    view_of: _Tensor | None = None  # a view: no memory of its own
    is_input: bool = False
    is_output: bool = False
    external: bool = False  # memory the allocator does not own (KV cache)
    # Allocator state.
    children: int = 0
    views: int = 0
    allocated: bool = False
    offset: int = -1
    owner: int = -1  # backend whose buffer holds it


class _Blocks:
    """ggml's dynamic allocator for one buffer: free blocks, best fit, one tail."""

    def __init__(self) -> None:
        self.free: list[list[int]] = [[0, 1 << 62]]  # [offset, size], sorted; last is the tail
        self.high = 0

    def alloc(self, size: int) -> int:
        size = _aligned(size)
        best = -1
        for i, (_, block_size) in enumerate(self.free[:-1]):
            if block_size >= size and (best < 0 or block_size <= self.free[best][1]):
                best = i
        if best < 0:
            best = len(self.free) - 1
        offset = self.free[best][0]
        self.free[best][0] += size
        self.free[best][1] -= size
        if self.free[best][1] == 0:
            del self.free[best]
        self.high = max(self.high, offset + size)
        return offset

    def release(self, offset: int, size: int) -> None:
        size = _aligned(size)
        for i, block in enumerate(self.free):
            if block[0] + block[1] == offset:
                block[1] += size
                if i + 1 < len(self.free) and block[0] + block[1] == self.free[i + 1][0]:
                    block[1] += self.free[i + 1][1]
                    del self.free[i + 1]
                return
            if offset + size == block[0]:
                block[0] = offset
                block[1] += size
                return
        index = next((i for i, b in enumerate(self.free) if b[0] > offset), len(self.free))
        self.free.insert(index, [offset, size])


class _Graph:
    """Nodes in execution order plus the leaves (graph inputs) on the host CPU."""

    def __init__(self, cpu: int) -> None:
        self.cpu = cpu
        self.nodes: list[_Tensor] = []
        self.inputs: list[_Tensor] = []

    def input(self, name: str, nbytes: int) -> _Tensor:
        t = _Tensor(name, nbytes, self.cpu, is_input=True)
        self.inputs.append(t)
        return t

    def op(
        self, name: str, nbytes: int, backend: int, *srcs: _Tensor, inplace: bool = False
    ) -> _Tensor:
        t = _Tensor(name, nbytes, backend, list(srcs), inplace=inplace)
        self.nodes.append(t)
        return t

    def view(self, base: _Tensor) -> _Tensor:
        """A reshape, permute or slice: it keeps its source alive, and no op ever
        writes in place through it (ggml-alloc does not own a view's memory)."""
        # A view of a view views the same memory (ggml keeps the first source).
        t = _Tensor(base.name + "(view)", base.nbytes, base.backend, [base], view_of=_base(base))
        self.nodes.append(t)
        return t

    def store(self, backend: int, *srcs: _Tensor) -> None:
        """A write into the KV cache: a view of memory the allocator does not own."""
        cache = _Tensor("cache", 0, backend, external=True)
        self.nodes.append(_Tensor("set_rows", 0, backend, list(srcs), view_of=cache))


def _base(t: _Tensor) -> _Tensor:
    return t.view_of if t.view_of is not None else t


def _split_and_allocate(graph: _Graph, n_backends: int, copies: int) -> list[int]:
    """ggml_backend_sched's split (copies of foreign inputs) + ggml-alloc's replay."""
    # The scheduler: where the backend changes a split starts, and every tensor a
    # split reads from another backend gets copies on the split's backend (one
    # set per tensor and backend), put at the split's start after a view of the
    # source that keeps the source alive.
    copy_of: dict[tuple[int, int], list[_Tensor]] = {}
    ordered: list[_Tensor] = []
    split_copies: list[_Tensor] = []
    current = -1
    pending: list[tuple[_Tensor, _Tensor]] = []
    split_start = 0
    for node in [*graph.nodes, None]:
        if node is None or node.backend != current:
            ordered[split_start:split_start] = _split_header(pending)
            pending = []
            split_start = len(ordered)
            if node is None:
                break
            current = node.backend
        for i, src in enumerate(node.srcs):
            if src.backend == node.backend or src.external:
                continue
            key = (id(src), node.backend)
            if key not in copy_of:
                made = [_Tensor(f"{src.name}#{c}", src.nbytes, node.backend) for c in range(copies)]
                for c in made:
                    c.is_input = c.is_output = copies > 1
                copy_of[key] = made
                split_copies.extend(made)
                pending.append((src, made[0]))
            node.srcs[i] = copy_of[key][0]
        ordered.append(node)

    # With copies the graph inputs and every copy are leaves allocated first and
    # never freed (the scheduler marks them outputs).
    leaves: list[_Tensor] = list(graph.inputs)
    if copies > 1:
        for t in graph.inputs:
            t.is_output = True
            leaves.extend(
                _Tensor(t.name, t.nbytes, t.backend, is_input=True, is_output=True)
                for _ in range(copies - 1)
            )
        leaves.extend(split_copies)

    for node in ordered:
        if node.view_of is not None:
            node.view_of.views += 1
        for src in node.srcs:
            src.children += 1

    buffers = [_Blocks() for _ in range(n_backends)]

    def allocate(t: _Tensor, backend: int) -> None:
        if t.allocated or t.offset >= 0 or t.view_of is not None or t.external:
            return
        t.allocated = True
        if t.inplace:
            for parent in t.srcs:
                # A view is never the allocator's own: no in-place write through one.
                if parent.view_of is not None or not parent.allocated or parent.is_output:
                    continue
                if parent.nbytes != t.nbytes or parent.children != 1 or parent.views != 0:
                    continue
                t.offset, t.owner = parent.offset, parent.owner
                parent.allocated = False
                return
        t.owner = backend
        t.offset = buffers[backend].alloc(t.nbytes)

    def free(t: _Tensor) -> None:
        if t.is_output or not t.allocated:
            return
        buffers[t.owner].release(t.offset, t.nbytes)
        t.allocated = False

    for leaf in leaves:
        allocate(leaf, leaf.backend)
    for node in ordered:
        for src in node.srcs:
            allocate(src, node.backend)
        allocate(node, node.backend)
        for src in node.srcs:
            src.children -= 1
            if src.children == 0 and src.views == 0:
                if src.view_of is not None:
                    base = src.view_of
                    base.views -= 1
                    if base.views == 0 and base.children == 0:
                        free(base)
                else:
                    free(src)
    return [b.high for b in buffers]


def _split_header(pending: list[tuple[_Tensor, _Tensor]]) -> list[_Tensor]:
    """The nodes ggml puts at a split's start: a view of each source, then its copy."""
    out: list[_Tensor] = []
    for src, made in pending:
        out.append(_Tensor(src.name + "(dep)", src.nbytes, src.backend, [src], view_of=src))
        out.append(made)
    return out


@dataclass(frozen=True)
class GraphShape:
    """The settings of one reserve: tokens, outputs, cells, cache and attention."""

    n_tokens: int
    n_outputs: int
    n_stream: int
    cells_full: int
    cells_swa: int
    flash: bool
    cache_type_k: int  # GGMLQuantizationType value
    cache_type_v: int


def _row(qtype: int, elements: int) -> int:
    block, size = GGML_QUANT_SIZES[qtype]  # type: ignore[index]
    return elements // block * size


@dataclass(frozen=True)
class _Slot:
    """One repeating layer as the graph sees it (equal slots build equal subgraphs)."""

    layer: LayerProfile
    last: bool  # the model's last repeating layer: only the output rows go on
    first: bool  # the model's first layer: gemma scales the input before it


class _Builder:
    """The graph of the layers one device holds, fed from and feeding elsewhere.

    Backends: 0 the device, 1 the device before it, 2 the one after it, 3 the
    host CPU (where llama.cpp keeps the graph inputs and the token embedding).
    """

    DEVICE, BEFORE, AFTER, CPU = 0, 1, 2, 3

    def __init__(self, profile: ModelProfile, shape: GraphShape) -> None:
        self.p = profile
        self.s = shape
        self.graph = _Graph(cpu=self.CPU)
        g, t = self.graph, shape.n_tokens
        self.tokens = g.input("inp_tokens", t * I32)
        self.embd_in = g.input("inp_embd", profile.n_embd * t * F32)
        self.pos = g.input("inp_pos", t * I32)
        self.masks: dict[bool, _Tensor] = {}
        self.k_idxs: dict[bool, _Tensor] = {}
        self.v_idxs: dict[bool, _Tensor] = {}
        self.k_rot: dict[bool, _Tensor | None] = {}
        self.v_rot: dict[bool, _Tensor | None] = {}
        mask_elem = F16 if shape.flash else F32
        v_dim = max((layer.n_embd_v for layer in profile.layers), default=0)
        quantized_k = GGML_QUANT_SIZES[shape.cache_type_k][0] > 1  # type: ignore[index]
        quantized_v = GGML_QUANT_SIZES[shape.cache_type_v][0] > 1  # type: ignore[index]
        for swa in (False, True):
            if not any(layer.is_swa == swa for layer in profile.layers):
                continue
            cells = shape.cells_swa if swa else shape.cells_full
            self.masks[swa] = g.input("kq_mask", cells * t * mask_elem)
            self.k_idxs[swa] = g.input("k_idxs", t * I64)
            if v_dim:
                # Without flash attention V is stored transposed: one index per element.
                self.v_idxs[swa] = g.input("v_idxs", t * I64 * (1 if shape.flash else v_dim))
            head_k, head_v = profile.head_dim_k, profile.head_dim_v if v_dim else 0
            self.k_rot[swa] = None
            self.v_rot[swa] = None
            if quantized_k and head_k % 64 == 0:
                n = 64
                while head_k % (n * 2) == 0:
                    n *= 2
                self.k_rot[swa] = g.input("k_rot", n * n * F32)
            if quantized_v and head_v and head_v % 64 == 0:
                self.v_rot[swa] = g.input("v_rot", 64 * 64 * F32)
        self.out_ids = g.input("out_ids", shape.n_outputs * I32)

    def build(
        self, slots: Sequence[_Slot], *, first: bool, has_next: bool, holds_output: bool
    ) -> _Graph:
        g, p, s = self.graph, self.p, self.s
        dev = self.DEVICE
        if first:
            x = g.op("embd", p.n_embd * s.n_tokens * F32, g.cpu, self.tokens)
        else:
            # What the device before hands over: the output rows only once the
            # last repeating layer is behind.
            rows = s.n_outputs if not slots and holds_output else s.n_tokens
            x = g.op("prev", p.n_embd * rows * F32, self.BEFORE)
        if slots and slots[0].first and p.architecture in _SCALED_INPUT:
            x = g.op("inp_scaled", x.nbytes, dev, x, inplace=True)
        for slot in slots:
            x = self._layer(slot, x, dev)
        if holds_output:
            rows = p.n_embd * s.n_outputs * F32
            norm = g.op("norm", rows, dev, x, inplace=True)
            norm = g.op("result_norm", rows, dev, norm, inplace=True)
            logits = g.op("result_output", p.n_vocab * s.n_outputs * F32, dev, norm)
            logits.is_output = True
        elif has_next:
            g.op("next", 0, self.AFTER, x)
        return g

    def _layer(self, slot: _Slot, x: _Tensor, dev: int) -> _Tensor:
        g, p, s = self.graph, self.p, self.s
        e = p.n_embd * s.n_tokens * F32
        cur = g.op("attn_norm", e, dev, x, inplace=True)
        cur = g.op("attn_norm_w", e, dev, cur, inplace=True)
        if p.mla_rank:
            cur = self._mla_attention(slot.layer, cur, dev)
        else:
            cur = self._attention(slot.layer, cur, dev)
        rows = s.n_tokens
        if slot.last:
            # Only the rows that give logits go on (always gathered, even all of them).
            rows = s.n_outputs
            cur = g.op("out_rows", p.n_embd * rows * F32, dev, cur, self.out_ids)
            x = g.op("inp_rows", p.n_embd * rows * F32, dev, x, self.out_ids)
        e = p.n_embd * rows * F32
        if p.architecture in _POST_NORM:
            cur = g.op("attn_post_norm", e, dev, cur, inplace=True)
            cur = g.op("attn_post_norm_w", e, dev, cur, inplace=True)
        ffn_inp = g.op("ffn_inp", e, dev, cur, x, inplace=True)
        cur = g.op("ffn_norm", e, dev, ffn_inp, inplace=True)
        cur = g.op("ffn_norm_w", e, dev, cur, inplace=True)
        cur = self._ffn(slot.layer, cur, dev, rows)
        if p.architecture in _POST_NORM:
            cur = g.op("ffn_post_norm", e, dev, cur, inplace=True)
            cur = g.op("ffn_post_norm_w", e, dev, cur, inplace=True)
        return g.op("l_out", e, dev, cur, ffn_inp, inplace=True)

    def _rotate(self, t: _Tensor, rot: _Tensor | None, dev: int) -> _Tensor:
        if rot is None:
            return t
        return self.graph.op("rot", t.nbytes, dev, rot, self.graph.view(t))

    def _attention(self, layer: LayerProfile, cur: _Tensor, dev: int) -> _Tensor:
        g, p, s = self.graph, self.p, self.s
        swa = layer.is_swa
        t = s.n_tokens
        q_bytes = layer.n_head * p.head_dim_k * t * F32

        def q_chain() -> _Tensor:
            q = g.op("Qcur", q_bytes, dev, cur)
            q = g.view(q)
            if p.qk_norm:
                q = g.op("q_norm", q_bytes, dev, q, inplace=True)
                q = g.op("q_norm_w", q_bytes, dev, q, inplace=True)
            q = g.op("q_rope", q_bytes, dev, q, self.pos, inplace=True)
            return self._rotate(q, self.k_rot[swa], dev)

        def k_chain() -> _Tensor:
            k = g.view(g.op("Kcur", layer.n_embd_k * t * F32, dev, cur))
            if p.qk_norm:
                k = g.op("k_norm", k.nbytes, dev, k, inplace=True)
                k = g.op("k_norm_w", k.nbytes, dev, k, inplace=True)
            k = g.op("k_rope", k.nbytes, dev, k, self.pos, inplace=True)
            return self._rotate(k, self.k_rot[swa], dev)

        def v_chain() -> _Tensor:
            v = g.view(g.op("Vcur", layer.n_embd_v * t * F32, dev, cur))
            return self._rotate(v, self.v_rot[swa], dev)

        if p.architecture in _QKV_ORDER:
            q, k, v = q_chain(), k_chain(), v_chain()
        else:
            q = q_chain()
            v = v_chain()
            k = k_chain()
        g.store(dev, g.view(k), self.k_idxs[swa])
        if swa in self.v_idxs:
            g.store(dev, g.view(v), self.v_idxs[swa])
        mask = self.masks[swa]
        cells = s.cells_swa if swa else s.cells_full
        out_bytes = layer.n_head * p.head_dim_v * t * F32
        if s.flash:
            cur = g.op("fattn", out_bytes, dev, g.view(q), mask)
        else:
            kq = g.op("kq", cells * t * layer.n_head * F32, dev, g.view(q))
            kq = g.op("kq_soft_max", kq.nbytes, dev, kq, mask, inplace=True)
            kqv = g.op("kqv", out_bytes, dev, kq)
            cur = g.op("kqv_out", out_bytes, dev, g.view(kqv))
        cur = self._rotate(cur, self.v_rot[swa], dev)
        return g.op("attn_out", p.n_embd * t * F32, dev, g.view(cur))

    def _mla_attention(self, layer: LayerProfile, cur: _Tensor, dev: int) -> _Tensor:
        g, p, s = self.graph, self.p, self.s
        t, heads = s.n_tokens, layer.n_head
        rank, rope = p.mla_rank, p.n_rot
        q = g.op("q", heads * p.head_dim_q * t * F32, dev, cur)
        q_absorbed = g.op("q_nope_absorbed", rank * t * heads * F32, dev, g.view(q))
        q_pe = g.op("q_pe", rope * heads * t * F32, dev, g.view(q), self.pos)
        q_cur = g.op("Qcur", (rank + rope) * heads * t * F32, dev, g.view(q_absorbed), q_pe)
        kv = g.op("kv_cmpr_pe", (rank + rope) * t * F32, dev, cur)
        kv_cmpr = g.op("kv_norm", rank * t * F32, dev, g.view(kv))
        kv_cmpr = g.op("kv_norm_w", rank * t * F32, dev, kv_cmpr, inplace=True)
        k_pe = g.op("k_pe", rope * t * F32, dev, g.view(kv), self.pos)
        k_cur = g.op("Kcur", (rank + rope) * t * F32, dev, kv_cmpr, k_pe)
        g.store(dev, g.view(k_cur), self.k_idxs[False])
        mask = self.masks[False]
        v_dim = p.head_dim_v_mla
        if s.flash:
            att = g.op("fattn", rank * heads * t * F32, dev, g.view(q_cur), mask)
            mla = g.op("fattn_mla", v_dim * t * heads * F32, dev, g.view(att))
        else:
            v_cont = g.op("v_cont", _row(s.cache_type_k, rank) * s.cells_full * s.n_stream, dev)
            kq = g.op("kq", s.cells_full * t * heads * F32, dev, g.view(q_cur))
            kq = g.op("kq_soft_max", kq.nbytes, dev, kq, mask, inplace=True)
            kqv = g.op("kqv", rank * t * heads * F32, dev, v_cont, kq)
            mla = g.op("kqv_mla", v_dim * t * heads * F32, dev, kqv)
        cur = g.op("kqv_out", v_dim * heads * t * F32, dev, g.view(mla))
        return g.op("attn_out", p.n_embd * t * F32, dev, g.view(cur))

    def _ffn(self, layer: LayerProfile, cur: _Tensor, dev: int, rows: int) -> _Tensor:
        g, p = self.graph, self.p
        e = p.n_embd * rows * F32
        if not layer.ffn_expert:
            # A profile without per-layer widths: the widest FFN a token goes through.
            return self._dense(cur, dev, rows, layer.ffn_dense or p.ffn_active_width)
        n_used = p.n_expert_used
        logits = g.op("moe_logits", p.n_expert * rows * F32, dev, cur)
        probs = g.op("moe_probs", logits.nbytes, dev, logits, inplace=True)
        order = g.op("moe_argsort", p.n_expert * rows * I32, dev, probs)
        top = g.view(order)
        weights = g.op("moe_weights", n_used * rows * F32, dev, g.view(probs), top)
        flat = g.view(cur)
        width = layer.ffn_expert * n_used * rows * F32
        gate = g.op("moe_gate", width, dev, flat, top)
        up = g.op("moe_up", width, dev, flat, top)
        act = g.op("moe_act", width, dev, gate, up)
        down = g.op("moe_down", p.n_embd * n_used * rows * F32, dev, act, top)
        weighted = g.op("moe_weighted", down.nbytes, dev, down, weights, inplace=True)
        out = g.op(
            "moe_sum",
            e,
            dev,
            g.view(weighted),
            g.view(weighted),
        )
        for _ in range(n_used - 2):
            out = g.op("moe_sum", e, dev, out, g.view(weighted), inplace=True)
        if layer.ffn_shared:
            shared = self._dense(cur, dev, rows, layer.ffn_shared)
            out = g.op("ffn_out", e, dev, out, shared, inplace=True)
        return out

    def _dense(self, cur: _Tensor, dev: int, rows: int, width: int) -> _Tensor:
        g, p = self.graph, self.p
        gate = g.op("ffn_gate", width * rows * F32, dev, cur)
        up = g.op("ffn_up", width * rows * F32, dev, cur)
        act = g.op("ffn_act", width * rows * F32, dev, gate, up)
        return g.op("ffn_down", p.n_embd * rows * F32, dev, act)


# gemma-like layers: the input scaled by sqrt(n_embd), norms after attention and FFN.
_SCALED_INPUT = frozenset({"gemma", "gemma2", "gemma3"})
_POST_NORM = frozenset({"gemma2", "gemma3"})
# Architectures whose graph computes K before V (the others: Q, V, K).
_QKV_ORDER = frozenset({"gemma", "gemma2", "gemma3"})


@lru_cache(maxsize=64)
def _kinds(profile: ModelProfile) -> tuple[int, ...]:
    """Each repeating layer's kind: equal layers build equal subgraphs."""
    index: dict[LayerProfile, int] = {}
    return tuple(index.setdefault(layer, len(index)) for layer in profile.layers)


@lru_cache(maxsize=65536)
def _slots(profile: ModelProfile, first: int, last: int) -> tuple[_Slot, ...]:
    """The repeating layers of [first, last) that shape the device's buffer.

    The allocator settles into the same pattern for equal layers, so a long run
    of them is replayed as its first few: the range's first three layers, the
    first two of each kind and the two after each, and its last two.
    """
    kinds = _kinds(profile)
    ids = range(first, min(last, profile.n_layer))
    keep: set[int] = set(ids[:3]) | set(ids[-2:])
    seen: dict[int, int] = {}
    for il in ids:
        count = seen.get(kinds[il], 0)
        if count < 2:
            keep.update(i for i in (il, il + 1, il + 2) if i in ids)
        seen[kinds[il]] = count + 1
    return tuple(
        _Slot(profile.layers[il], il == profile.n_layer - 1, il == 0) for il in sorted(keep)
    )


@lru_cache(maxsize=4096)
def _device_bytes(
    profile: ModelProfile,
    shape: GraphShape,
    slots: tuple[_Slot, ...],
    flags: tuple[bool, bool, bool, bool],
) -> int:
    first, has_next, holds_output, several = flags
    graph = _Builder(profile, shape).build(
        slots, first=first, has_next=has_next, holds_output=holds_output
    )
    copies = SCHED_COPIES if several else 1
    return _split_and_allocate(graph, 4, copies)[_Builder.DEVICE]


def device_compute_bytes(
    profile: ModelProfile,
    shape: GraphShape,
    first: int,
    last: int,
    *,
    first_device: bool,
    last_device: bool,
    n_devices: int,
    every_layer: bool = False,
) -> int:
    """The compute buffer of the device holding layers [first, last) (the output
    layer is index n_layer) among `n_devices` used devices. `every_layer` replays
    each layer of the range instead of the few that shape the buffer."""
    if last <= first:
        return 0
    holds_output = last > profile.n_layer
    flags = (first_device, not last_device, holds_output, n_devices > 1)
    if every_layer:
        ids = range(first, min(last, profile.n_layer))
        slots = tuple(_Slot(profile.layers[il], il == profile.n_layer - 1, il == 0) for il in ids)
    else:
        slots = _slots(profile, first, last)
    return _device_bytes(profile, shape, slots, flags)


def host_compute_bytes(profile: ModelProfile, shape: GraphShape, *, n_devices: int) -> int:
    """The host CPU's compute buffer: the graph inputs (four copies of each with
    several devices, none ever freed) and the token embedding's rows."""
    builder = _Builder(profile, shape)
    copies = SCHED_COPIES if n_devices > 1 else 1
    inputs = sum(_aligned(t.nbytes) for t in builder.graph.inputs)
    return copies * inputs + _aligned(profile.n_embd * shape.n_tokens * F32)


def compute_buffers(
    profile: ModelProfile, shape: GraphShape, ranges: Sequence[tuple[int, int]]
) -> tuple[list[int], int]:
    """Compute buffer bytes of each device holding `ranges` (in llama.cpp's device
    order, tiling 0..n_layer+1) and of the host CPU."""
    used = [i for i, (first, last) in enumerate(ranges) if last > first]
    out = [0] * len(ranges)
    for k, i in enumerate(used):
        first, last = ranges[i]
        out[i] = device_compute_bytes(
            profile,
            shape,
            first,
            last,
            first_device=k == 0,
            last_device=k == len(used) - 1,
            n_devices=len(used),
        )
    return out, host_compute_bytes(profile, shape, n_devices=len(used))
