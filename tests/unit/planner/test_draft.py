"""The draft model's memory on the host's CPU, against what llama.cpp logged.

Figures from a real llama-server (`-md` gemma-3-270m Q4_K_M drafting for itself,
`-devd none`, ctx 2048, `-np 1`, `-lv 4`): CPU_Mapped model buffer 235.16 MiB,
KV 6.00 + 15.00 MiB, compute 20.77 MiB and output 1.00 MiB (and a CPU_REPACK
buffer of 12.66 MiB that the estimate leaves out).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from mesh_operator.planner import ServingParams, read_model_profile
from mesh_operator.planner.draft import estimate_draft_memory
from mesh_operator.planner.memory import MIB
from mesh_operator.planner.profile import ModelProfile
from tests.unit.planner.llama_log import GEMMA_HEADER

pytestmark = pytest.mark.unit

SERVING = ServingParams(ctx=2048, parallel=1)


@pytest.fixture(scope="module")
def gemma() -> ModelProfile:
    return read_model_profile(GEMMA_HEADER)


def test_the_draft_is_what_llama_cpp_allocates(gemma: ModelProfile) -> None:
    draft = estimate_draft_memory(gemma, SERVING)
    assert draft.weights / MIB == pytest.approx(235.16, abs=0.01)
    assert draft.kv / MIB == pytest.approx(21.00, abs=0.01)
    assert draft.compute / MIB == pytest.approx(20.77 + 1.00, abs=0.01)


def test_the_draft_cache_is_f16_whatever_the_model_s(gemma: ModelProfile) -> None:
    quantized = replace(SERVING, cache_type_k="q8_0", cache_type_v="q8_0", flash_attention="on")
    assert estimate_draft_memory(gemma, quantized).kv == estimate_draft_memory(gemma, SERVING).kv


def test_the_draft_keeps_a_context_per_slot(gemma: ModelProfile) -> None:
    one = estimate_draft_memory(gemma, replace(SERVING, ctx=8192))
    longer = estimate_draft_memory(gemma, replace(SERVING, ctx=16384))
    assert longer.kv > one.kv
    assert longer.weights == one.weights


def test_an_untied_embedding_counts_beside_the_output(gemma: ModelProfile) -> None:
    untied = replace(gemma, tied_output=False)
    extra = (
        estimate_draft_memory(untied, SERVING).weights
        - estimate_draft_memory(gemma, SERVING).weights
    )
    assert extra == gemma.input_bytes > 0
