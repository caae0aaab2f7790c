"""The speculation term of the time model."""

from __future__ import annotations

import pytest

from mesh_operator.planner.speculation import MEASURED_NGRAM, NgramSpeculation, tokens_per_step

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("acceptance", "draft_max", "share", "expected"),
    [
        (0.0, 8, 1.0, 1.0),  # nothing accepted: one token per step, as without
        (1.0, 8, 1.0, 9.0),  # every draft accepted: the draft and the step's own token
        (0.5, 1, 1.0, 1.5),
        (0.5, 2, 1.0, 1.75),  # 1 + 0.5 + 0.25
        (0.8, 4, 0.5, 1 + 0.5 * (0.8 + 0.64 + 0.512 + 0.4096)),
        (0.9, 8, 0.0, 1.0),  # an n-gram that never finds a match
    ],
)
def test_tokens_per_step(acceptance: float, draft_max: int, share: float, expected: float) -> None:
    assert tokens_per_step(acceptance, draft_max, share) == pytest.approx(expected)


def test_longer_drafts_and_better_acceptance_never_cost() -> None:
    for a in (0.1, 0.5, 0.9):
        steps = [tokens_per_step(a, k) for k in range(16)]
        assert steps == sorted(steps)
    assert tokens_per_step(0.6, 8) < tokens_per_step(0.7, 8)


@pytest.mark.parametrize(
    ("acceptance", "draft_max", "share"),
    [(-0.1, 8, 1.0), (1.1, 8, 1.0), (0.5, -1, 1.0), (0.5, 8, 2.0)],
)
def test_out_of_range_is_refused(acceptance: float, draft_max: int, share: float) -> None:
    with pytest.raises(ValueError, match="must be in"):
        tokens_per_step(acceptance, draft_max, share)


def test_a_step_s_time_is_shared_by_its_tokens() -> None:
    spec = NgramSpeculation(acceptance=1.0, draft_max=3, share=1.0)
    assert spec.token_ms(80.0) == pytest.approx(20.0)
    assert MEASURED_NGRAM.token_ms(80.0) < 80.0
