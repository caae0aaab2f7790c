"""What speculative decoding does to the predicted time per token.

Owns the speculation term of the time model. With speculation, one pass of the
split (a step) verifies the drafted tokens together and keeps the accepted
ones plus one token of its own. Decode is bound by reading weights and by round
trips, which a step pays once however many tokens it verifies, so

    ms/token = ms/step / tokens per step.

A drafter that proposes up to k tokens, each accepted with probability a
while the ones before it were, yields (1 - a^(k+1)) / (1 - a) tokens per step
when it drafts. An n-gram drafts only where the context holds a match, so only
a share of the steps draft at all:

    tokens per step = 1 + share * a * (1 - a^k) / (1 - a)

`python -m bench spec` measured on gemma-3-270m split over two servers behind
a delay proxy at 5 and 20 ms, `ngram-map-k` with 4-token keys and 8-token
drafts, prose and code-like text together: 402 of 524 drafted tokens accepted
(0.77) and 1280 tokens in 878 steps, which with drafts of 8 makes 16% of the
steps draft (`MEASURED_NGRAM`). Where a MeshModel declares no acceptance, those
are the prediction's. Verifying k tokens costs a CPU more compute than one,
which this model (bandwidth and round trips only) does not count: on this
project's 2-core machine the measured gain is below the predicted one.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MEASURED_NGRAM", "NgramSpeculation", "tokens_per_step"]

# llama.cpp's longest n-gram draft for each type when its size is not set
# (`--spec-ngram-<type>-size-m`, `--spec-ngram-mod-n-max`).
DEFAULT_DRAFT_MAX = {"ngram-simple": 48, "ngram-map-k": 48, "ngram-map-k4v": 48, "ngram-mod": 64}


def tokens_per_step(acceptance: float, draft_max: int, share: float = 1.0) -> float:
    """Expected tokens a step yields: its own, plus the accepted run of a draft of
    up to `draft_max` tokens in the `share` of steps that draft."""
    if not 0.0 <= acceptance <= 1.0 or not 0.0 <= share <= 1.0 or draft_max < 0:
        raise ValueError(
            f"acceptance {acceptance} and share {share} must be in [0, 1], draft_max >= 0"
        )
    if acceptance == 1.0:
        accepted = float(draft_max)
    else:
        accepted = acceptance * (1.0 - acceptance**draft_max) / (1.0 - acceptance)
    return 1.0 + share * accepted


@dataclass(frozen=True)
class NgramSpeculation:
    """An n-gram's drafting: its acceptance, longest draft and share of drafting steps."""

    acceptance: float
    draft_max: int
    share: float

    def tokens_per_step(self) -> float:
        return tokens_per_step(self.acceptance, self.draft_max, self.share)

    def token_ms(self, step_ms: float) -> float:
        return step_ms / self.tokens_per_step()


# From the benchmark's figures (see the module docstring).
MEASURED_NGRAM = NgramSpeculation(acceptance=0.77, draft_max=8, share=0.16)
