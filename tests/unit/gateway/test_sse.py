"""Counting SSE events across chunk boundaries and reading token usage."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh_operator.gateway.sse import EventScanner, Usage, usage_in
from tests.unit.gateway.fakes import (
    RECORDED_CHAT,
    RECORDED_CHAT_STREAM,
    RECORDED_CHAT_USAGE,
    RECORDED_STREAM_USAGE,
)

pytestmark = pytest.mark.unit

STREAM = b"".join(RECORDED_CHAT_STREAM)
# Data events in the recording, [DONE] excluded.
STREAM_EVENTS = len(RECORDED_CHAT_STREAM) - 1

# Recorded: /v1/completions, stream with usage in the last chunk.
COMPLETION_LAST_EVENT = (
    b'data: {"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"length"}],'
    b'"created":1795303936,"model":"gemma","object":"text_completion","usage":'
    b'{"completion_tokens":4,"prompt_tokens":3,"total_tokens":7,"prompt_tokens_details":'
    b'{"cached_tokens":0}},"id":"chatcmpl-LvBa","timings":{"cache_n":0,"prompt_n":3,'
    b'"predicted_n":4}}\n\n'
)
# Recorded: /v1/responses, non-streaming.
RESPONSES_BODY = (
    b'{"completed_at":1795303483,"id":"resp_LcH6","model":"gemma","object":"response",'
    b'"output":[{"content":[{"type":"output_text","text":"user@<|im"}],"role":"assistant"}],'
    b'"status":"completed","usage":{"input_tokens":25,"output_tokens":5,"total_tokens":30,'
    b'"input_tokens_details":{"cached_tokens":20}}}'
)
# Recorded: /v1/embeddings (vector shortened).
EMBEDDINGS_BODY = (
    b'{"model":"x","object":"list","usage":{"prompt_tokens":2,"total_tokens":2},'
    b'"data":[{"embedding":[-0.0107,-0.0637],"index":0,"object":"embedding"}]}'
)


@given(st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), max_size=40))
def test_events_are_counted_wherever_chunks_split(cuts: list[int]) -> None:
    bounds = [0, *sorted(set(cuts)), len(STREAM)]
    scanner = EventScanner()
    total = sum(scanner.feed(STREAM[a:b]) for a, b in itertools.pairwise(bounds))
    assert total == STREAM_EVENTS
    assert scanner.usage() == Usage(*RECORDED_STREAM_USAGE)


def test_crlf_delimited_events() -> None:
    scanner = EventScanner()
    assert scanner.feed(b"data: a\r\n\r\ndata: b\r\n") == 1
    assert scanner.feed(b"\r\n: comment\r\n\r\n") == 1


def test_comments_and_done_are_not_events() -> None:
    scanner = EventScanner()
    assert scanner.feed(b": keep-alive\n\ndata: [DONE]\n\n") == 0
    assert scanner.feed(b"data: a\n\n: ping\n\nevent: x\ndata: b\n\n") == 2


@pytest.mark.parametrize(
    ("body", "usage"),
    [
        (RECORDED_CHAT, Usage(*RECORDED_CHAT_USAGE)),
        (RESPONSES_BODY, Usage(25, 5)),
        (EMBEDDINGS_BODY, Usage(2, 0)),
        (COMPLETION_LAST_EVENT, Usage(3, 4)),
        (b'{"timings":{"cache_n":20,"prompt_n":5,"predicted_n":3}}', Usage(25, 3)),
        (b'{"choices":[]}', None),
    ],
)
def test_usage_in(body: bytes, usage: Usage | None) -> None:
    assert usage_in(body) == usage


def test_usage_keys_inside_generated_text_are_ignored() -> None:
    body = (
        b'{"choices":[{"message":{"content":"say \\"prompt_tokens\\": 999"}}],'
        b'"usage":{"prompt_tokens":7,"completion_tokens":2}}'
    )
    assert usage_in(body) == Usage(7, 2)
