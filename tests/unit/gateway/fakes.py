"""Test doubles for the gateway's unit tests: a stand-in host and a settable source.

`FakeHost` is an in-process aiohttp server that answers like llama-server, replaying
answers recorded from a real llama-server (gemma-3-270m, build b1-0c1e570), and that
can misbehave on demand (drop connections, answer 503 while "loading", stream
slowly, cut a stream) while counting what it saw. `SettableSource` publishes
whatever records a test gives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from mesh_operator.gateway.auth import KeyReloader
from mesh_operator.gateway.discovery import Publish
from mesh_operator.gateway.routing import ModelRecord
from mesh_operator.gateway.server import Gateway
from mesh_operator.gateway.settings import GatewaySettings
from mesh_operator.gateway.tracing import Tracing

# Recorded from llama-server: POST /v1/chat/completions, stream=true, max_tokens=3.
RECORDED_CHAT_STREAM: tuple[bytes, ...] = (
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant",'
    b'"content":null}}],"created":1795303869,"id":"chatcmpl-cVQByymCfgOG7ZjnEDsBqcjxnwBDjZpL",'
    b'"model":"gemma","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}\n\n',
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"<"}}],'
    b'"created":1795303869,"id":"chatcmpl-cVQByymCfgOG7ZjnEDsBqcjxnwBDjZpL","model":"gemma",'
    b'"system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}\n\n',
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"|"}}],'
    b'"created":1795303869,"id":"chatcmpl-cVQByymCfgOG7ZjnEDsBqcjxnwBDjZpL","model":"gemma",'
    b'"system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}\n\n',
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"im"}}],'
    b'"created":1795303869,"id":"chatcmpl-cVQByymCfgOG7ZjnEDsBqcjxnwBDjZpL","model":"gemma",'
    b'"system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}\n\n',
    b'data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"created":1795303869,'
    b'"id":"chatcmpl-cVQByymCfgOG7ZjnEDsBqcjxnwBDjZpL","model":"gemma","system_fingerprint":'
    b'"b1-0c1e570","object":"chat.completion.chunk","timings":{"cache_n":20,"prompt_n":5,'
    b'"prompt_ms":144.489,"prompt_per_token_ms":28.8978,"prompt_per_second":34.60471039317872,'
    b'"predicted_n":3,"predicted_ms":95.21,"predicted_per_token_ms":47.605,'
    b'"predicted_per_second":21.00619682806428}}\n\n',
    b"data: [DONE]\n\n",
)
RECORDED_STREAM_USAGE = (25, 3)

# Recorded: POST /v1/chat/completions, max_tokens=5.
RECORDED_CHAT = (
    b'{"choices":[{"finish_reason":"length","index":0,"message":{"role":"assistant",'
    b'"content":"hi<|im_"}}],"created":1795303869,"model":"gemma","system_fingerprint":'
    b'"b1-0c1e570","object":"chat.completion","usage":{"completion_tokens":5,'
    b'"prompt_tokens":25,"total_tokens":30,"prompt_tokens_details":{"cached_tokens":0}},'
    b'"id":"chatcmpl-uUm5XXgeiqrFewQD8cLH0RUBuCj2V0xC","timings":{"cache_n":0,"prompt_n":25,'
    b'"prompt_ms":286.264,"prompt_per_token_ms":11.450560000000001,'
    b'"prompt_per_second":87.33197328340273,"predicted_n":5,"predicted_ms":157.591,'
    b'"predicted_per_token_ms":39.39775,"predicted_per_second":25.38216014873946}}'
)
RECORDED_CHAT_USAGE = (25, 5)

# Recorded: what llama-server answers to a POST and to /health while it loads.
RECORDED_LOADING = b'{"error":{"message":"Loading model","type":"unavailable_error","code":503}}'

BIG_EVENT = 64 * 1024


def padded(size: int) -> bytes:
    """The recorded answer with a `pad` field of `size` bytes before its usage."""
    if not size:
        return RECORDED_CHAT
    head, usage = RECORDED_CHAT.split(b',"usage"', 1)
    return head + b',"pad":"' + b"x" * size + b'","usage"' + usage


@dataclass
class FakeHost:
    """A llama-server stand-in. Set the public fields to change its behaviour."""

    health: int = 200
    # "ok", "drop" (close the connection without answering), "loading" (503),
    # "cut" (stream two events then close).
    behaviour: str = "ok"
    # Requests to answer with `behaviour` before behaving ("ok"); None: always.
    misbehave_times: int | None = None
    event_delay: float = 0.0
    answer_delay: float = 0.0
    # Stream this many 64 KiB events instead of the recording (backpressure tests).
    big_events: int = 0
    # Pad the recorded non-streamed answer with this many bytes.
    pad_answer: int = 0
    requests: int = 0
    completed: int = 0
    disconnected: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    events_sent: int = 0
    paths: list[str] = field(default_factory=list)
    # The client port of the connection each inference request came on.
    connections: list[int] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeHost:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_post("/{tail:.*}", self._inference)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, request: web.Request) -> web.Response:
        if self.health == 200:
            return web.json_response({"status": "ok"})
        return web.Response(
            status=self.health, body=RECORDED_LOADING, content_type="application/json"
        )

    def _current_behaviour(self) -> str:
        if self.misbehave_times is None:
            return self.behaviour
        if self.misbehave_times > 0:
            self.misbehave_times -= 1
            return self.behaviour
        return "ok"

    async def _inference(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.paths.append(request.path)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.connections.append(peer[1] if peer else 0)
        self.bodies.append(await request.read())
        self.authorizations.append(request.headers.get("Authorization"))
        behaviour = self._current_behaviour()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if behaviour == "drop":
                assert request.transport is not None
                request.transport.close()
                return web.Response()
            if behaviour == "loading":
                return web.Response(
                    status=503, body=RECORDED_LOADING, content_type="application/json"
                )
            if self.answer_delay:
                await asyncio.sleep(self.answer_delay)
            payload = json.loads(self.bodies[-1])
            if payload.get("stream") is True:
                return await self._stream(request, cut=behaviour == "cut")
            self.completed += 1
            return web.Response(body=padded(self.pad_answer), content_type="application/json")
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnected += 1
            raise
        finally:
            self.in_flight -= 1

    async def _stream(self, request: web.Request, *, cut: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        events = (
            [b"data: " + b"x" * BIG_EVENT + b"\n\n"] * self.big_events
            if self.big_events
            else RECORDED_CHAT_STREAM
        )
        for index, event in enumerate(events):
            if cut and index == 2:
                assert request.transport is not None
                request.transport.close()
                return response
            await response.write(event)
            self.events_sent += 1
            if self.event_delay:
                await asyncio.sleep(self.event_delay)
        await response.write_eof()
        self.completed += 1
        return response


class SettableSource:
    """A discovery source whose snapshots the test sets."""

    def __init__(self, records: Sequence[ModelRecord] = ()) -> None:
        self._records = list(records)
        self._publish: Publish | None = None

    async def start(self, publish: Publish) -> None:
        self._publish = publish
        publish(list(self._records))

    def synced(self) -> bool:
        return self._publish is not None

    async def stop(self) -> None:
        self._publish = None

    def set(self, records: Sequence[ModelRecord]) -> None:
        self._records = list(records)
        if self._publish is not None:
            self._publish(list(self._records))


def record(
    name: str,
    backends: Sequence[str],
    *,
    namespace: str = "default",
    aliases: Sequence[str] = (),
    slots: int = 1,
    ready: bool = True,
    upstream_api_key: str | None = None,
    node_shares: tuple[tuple[str, float], ...] = (),
    scaled_to_zero: bool = False,
) -> ModelRecord:
    return ModelRecord(
        namespace=namespace,
        name=name,
        served_names=(name, *aliases),
        slots=slots,
        ready=ready,
        backends=tuple(backends),
        created=1795303869,
        node_shares=node_shares,
        upstream_api_key=upstream_api_key,
        scaled_to_zero=scaled_to_zero,
    )


def settings(**overrides: Any) -> GatewaySettings:
    base: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "hold_timeout": 5.0}
    base.update(overrides)
    return GatewaySettings(**base)


@contextlib.asynccontextmanager
async def hosts(count: int = 1, **fields: Any) -> AsyncIterator[list[FakeHost]]:
    started = [await FakeHost(**fields).start() for _ in range(count)]
    try:
        yield started
    finally:
        for host in started:
            await host.stop()


@contextlib.asynccontextmanager
async def gateway(
    source: SettableSource,
    *,
    keys: KeyReloader | None = None,
    tracing: Tracing | None = None,
    **overrides: Any,
) -> AsyncIterator[tuple[Gateway, aiohttp.ClientSession]]:
    """A started gateway and a client session pointed at it; stopped on exit."""
    gw = Gateway(settings(**overrides), source, keys=keys, tracing=tracing)
    await gw.start()
    try:
        async with aiohttp.ClientSession(base_url=gw.url) as client:
            yield gw, client
    finally:
        await gw.stop()


async def wait_for(condition: Any, timeout: float = 5.0) -> None:
    """Poll `condition()` until true; fail the test after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met in {timeout}s")
        await asyncio.sleep(0.01)


def run(coro: Any) -> Any:
    """Run one test scenario on a fresh event loop."""
    return asyncio.run(asyncio.wait_for(coro, timeout=60))
