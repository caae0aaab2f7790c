"""Which host a request would rather go to: a key from the start of its prompt,
mapped onto the model's hosts by rendezvous (highest random weight) hashing.

llama-server keeps each slot's last prompt in its KV cache (`cache_prompt`, on by
default) and, with several slots, gives a request the slot whose cached prompt is
most like it (`--slot-prompt-similarity`); only the common prefix is reused. So
requests whose prompts start alike are cheaper on the host that served the last
one. The key is a digest of the first `chars` characters of the prompt as the
client sent it (chat messages' text in order, a completion's `prompt`, a
response's `instructions` and `input`); embeddings have no cache worth keeping
and get no key.

Rendezvous hashing scores every (key, host) pair and prefers the host with the
highest score: a key keeps its host as long as that host is there, and a host
that leaves (or joins) moves only the keys it wins, with no table to keep.

Pure: no I/O, no state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, TypeVar, get_args

Routing = Literal["prefix", "least-busy", "round-robin"]
ROUTINGS: tuple[str, ...] = get_args(Routing)
# Characters of the prompt that make the key (see docs/gateway.md, "Routing").
PREFIX_CHARS = 256
# Endpoints whose requests have a prompt worth keeping in a host's cache.
PROMPT_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})
_DIGEST_BYTES = 8
_SEPARATOR = "\x1f"

T = TypeVar("T")


def prefix_key(path: str, payload: Mapping[str, Any], chars: int = PREFIX_CHARS) -> bytes | None:
    """The affinity key of a request to `path` with body `payload`, or None (no prompt)."""
    if path not in PROMPT_PATHS or chars <= 0:
        return None
    text = prompt_prefix(payload, chars)
    if not text:
        return None
    return hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=_DIGEST_BYTES).digest()


def prompt_prefix(payload: Mapping[str, Any], chars: int) -> str:
    """The first `chars` characters of the request's prompt text, roles included."""
    parts: list[str] = []
    size = 0
    for piece in _pieces(payload):
        parts.append(piece)
        size += len(piece) + 1
        if size >= chars:
            break
    return _SEPARATOR.join(parts)[:chars]


def _pieces(payload: Mapping[str, Any]) -> Iterable[str]:
    """The prompt's text in the order the model reads it, lazily."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, Mapping):
                yield from _message_text(message)
        return
    prompt = payload.get("prompt")
    if prompt is not None:
        yield from _prompt_text(prompt)
        return
    instructions = payload.get("instructions")
    if isinstance(instructions, str):
        yield instructions
    given = payload.get("input")
    if isinstance(given, str):
        yield given
    elif isinstance(given, list):
        for item in given:
            if isinstance(item, Mapping):
                yield from _message_text(item)
            elif isinstance(item, str):
                yield item


def _message_text(message: Mapping[str, Any]) -> Iterable[str]:
    role = message.get("role")
    if isinstance(role, str):
        yield role
    content = message.get("content")
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                yield part["text"]


def _prompt_text(prompt: object) -> Iterable[str]:
    # A string, a list of token ids, or a batch (list) of either: the first prompt.
    if isinstance(prompt, str):
        yield prompt
    elif isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, int):
            yield " ".join(str(token) for token in prompt[:PREFIX_CHARS])
        else:
            yield from _prompt_text(first)


def score(key: bytes, host: str) -> int:
    """The rendezvous weight of `host` for `key`."""
    digest = hashlib.blake2b(host.encode(), digest_size=_DIGEST_BYTES, key=key).digest()
    return int.from_bytes(digest, "big")


def preferred(key: bytes, hosts: Iterable[T], name: Callable[[T], str]) -> T | None:
    """The host of `hosts` with the highest weight for `key` (None when there is none).

    `name(host)` is what is hashed (the host's URL): the same key and the same set
    of names always give the same host, whatever the order they come in.
    """
    best: T | None = None
    best_score = -1
    for host in hosts:
        weight = score(key, name(host))
        if weight > best_score:
            best, best_score = host, weight
    return best
