"""Reading a server-sent-event stream in passing, and token usage out of responses.

Pure. The proxy writes every upstream chunk to the client unchanged; `EventScanner`
only looks at the same bytes to count events (for inter-token latency) and to keep
the last event that carries usage, wherever chunk boundaries fall. `usage_in`
reads token counts from the shapes llama-server answers with: OpenAI `usage`
(chat, completions, embeddings), the Responses API's `input_tokens` /
`output_tokens` (also nested under `response`), and llama.cpp's own `timings`
when a stream was not asked for usage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_EVENT_END = b"\n\n"
_DATA = b"data:"
_DONE = b"[DONE]"
_USAGE = b'"usage"'
_TIMINGS = b'"timings"'
_USAGE_MARKERS = (_USAGE, _TIMINGS)
_COUNT = re.compile(
    rb'"(prompt_tokens|completion_tokens|input_tokens|output_tokens|prompt_n|cache_n|predicted_n)"'
    rb"\s*:\s*(\d+)"
)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


class EventScanner:
    """Splits a byte stream into SSE events without holding more than one partial event."""

    __slots__ = ("_partial", "events", "last_usage_event")

    def __init__(self) -> None:
        self._partial = b""
        self.events = 0
        self.last_usage_event: bytes | None = None

    def feed(self, chunk: bytes) -> int:
        """Account for `chunk`; return how many data events it completed."""
        data = self._partial + chunk if self._partial else chunk
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        end = data.rfind(_EVENT_END)
        if end < 0:
            self._partial = data
            return 0
        complete = data[:end]
        self._partial = data[end + len(_EVENT_END) :]
        # Per chunk on the hot path: bytes methods only, no per-event Python work
        # unless the chunk holds something unusual (comments, [DONE], usage).
        unusual = (
            complete.startswith(b":")
            or b"\n:" in complete
            or _DONE in complete
            or _USAGE in complete
            or _TIMINGS in complete
        )
        if not unusual:
            completed = complete.count(_EVENT_END) + 1
        else:
            completed = 0
            for event in complete.split(_EVENT_END):
                payload = _data_of(event)
                if payload is None or payload == _DONE:
                    continue
                completed += 1
                if any(marker in payload for marker in _USAGE_MARKERS):
                    self.last_usage_event = payload
        self.events += completed
        return completed

    def usage(self) -> Usage | None:
        if self.last_usage_event is None:
            return None
        return usage_in(self.last_usage_event)


def _data_of(event: bytes) -> bytes | None:
    """The joined `data:` lines of one event, or None for comments and empty events."""
    lines = [line for line in event.split(b"\n") if line.startswith(_DATA)]
    if not lines:
        return None
    return b"\n".join(line[len(_DATA) :].lstrip(b" ") for line in lines)


def usage_in(body: bytes) -> Usage | None:
    """Token counts from a JSON response body or event, if it carries any.

    Scans the bytes instead of parsing them: an embeddings answer can be large
    and parsing it on the event loop for two integers would cost more than the
    proxying. Inside JSON strings quotes are escaped, so a key pattern with its
    quotes cannot match generated text.
    """
    found: dict[bytes, int] = {}
    for match in _COUNT.finditer(body):
        found.setdefault(match.group(1), int(match.group(2)))
    prompt = found.get(b"prompt_tokens", found.get(b"input_tokens"))
    completion = found.get(b"completion_tokens", found.get(b"output_tokens"))
    if prompt is not None or completion is not None:
        return Usage(prompt or 0, completion or 0)
    if b"predicted_n" in found or b"prompt_n" in found:
        # llama.cpp's prompt_n excludes the tokens it reused from its cache.
        return Usage(
            found.get(b"prompt_n", 0) + found.get(b"cache_n", 0), found.get(b"predicted_n", 0)
        )
    return None
