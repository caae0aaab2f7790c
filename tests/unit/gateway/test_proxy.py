"""The gateway end to end in one process, in front of `FakeHost`s.

Bad input, holding and retrying, streaming, disconnects, auth, shutdown, metrics
and traces. The same behaviours against real llama-server processes are in
tests/integration/test_gateway_llama.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from mesh_operator.gateway import proxy
from mesh_operator.gateway.affinity import prefix_key
from mesh_operator.gateway.auth import KeyReloader, KeyRing
from mesh_operator.gateway.server import Gateway
from mesh_operator.gateway.tracing import configured_endpoint, setup_tracing
from tests.unit.gateway.fakes import (
    BIG_EVENT,
    RECORDED_CHAT,
    RECORDED_CHAT_STREAM,
    RECORDED_CHAT_USAGE,
    RECORDED_STREAM_USAGE,
    SettableSource,
    gateway,
    hosts,
    padded,
    record,
    run,
    settings,
    wait_for,
)

pytestmark = pytest.mark.unit

CHAT = {"model": "gemma", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
STREAM = {**CHAT, "stream": True}
STREAMED = b"".join(RECORDED_CHAT_STREAM)


def samples(gw: Gateway, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Current values of one metric, by sorted labels."""
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(gw.metrics.exposition().decode()):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(gw: Gateway, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for k, v in samples(gw, name).items() if wanted <= set(k))


async def error_of(response: aiohttp.ClientResponse) -> dict[str, Any]:
    body = await response.json()
    assert set(body) == {"error"}
    assert {"message", "type", "code"} <= set(body["error"])
    error: dict[str, Any] = body["error"]
    return error


def socket_writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """From now on, every write handed to asyncio's TCP transports in this process."""
    writes: list[bytes] = []
    # asyncio's TCP transport: private, and so not in the type stubs.
    transport: Any = asyncio.selector_events._SelectorSocketTransport  # type: ignore[attr-defined]
    write, writelines = transport.write, transport.writelines
    nested = False

    def spy_write(self: Any, data: Any) -> None:
        if not nested:
            writes.append(bytes(data))
        write(self, data)

    def spy_writelines(self: Any, chunks: Any) -> None:
        # Some Pythons' writelines calls write: note the bytes once.
        nonlocal nested
        chunks = list(chunks)
        writes.append(b"".join(bytes(c) for c in chunks))
        nested = True
        try:
            writelines(self, chunks)
        finally:
            nested = False

    monkeypatch.setattr(transport, "write", spy_write)
    monkeypatch.setattr(transport, "writelines", spy_writelines)
    return writes


# -- the happy paths ------------------------------------------------------------


def test_chat_is_forwarded_unchanged_and_counted() -> None:
    async def scenario() -> None:
        async with hosts() as [host]:
            source = SettableSource([record("gemma", [host.url], namespace="ns")])
            async with gateway(source) as (gw, client):
                sent = json.dumps(CHAT).encode()
                async with client.post(
                    "/v1/chat/completions", data=sent, headers={"X-Request-Id": "req-1"}
                ) as resp:
                    assert resp.status == 200
                    assert await resp.read() == RECORDED_CHAT
                    assert resp.headers["X-Request-Id"] == "req-1"
                assert host.bodies == [sent]
                assert host.authorizations == [None]
                labels = {"model": "ns/gemma", "endpoint": "/v1/chat/completions"}
                assert value(gw, "mesh_gateway_requests_total", status="200", **labels) == 1
                prompt, completion = RECORDED_CHAT_USAGE
                assert value(gw, "mesh_gateway_tokens_total", kind="prompt") == prompt
                assert value(gw, "mesh_gateway_tokens_total", kind="completion") == completion

    run(scenario())


@pytest.mark.parametrize(
    "path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"]
)
def test_every_inference_path_reaches_the_same_path_upstream(path: str) -> None:
    async def scenario() -> None:
        async with (
            hosts() as [host],
            gateway(SettableSource([record("gemma", [host.url])])) as (_, client),
        ):
            async with client.post(path, json=CHAT) as resp:
                assert resp.status == 200
            assert host.paths == [path]

    run(scenario())


def test_stream_is_relayed_chunk_by_chunk() -> None:
    async def scenario() -> None:
        async with (
            hosts(event_delay=0.15) as [host],
            gateway(SettableSource([record("gemma", [host.url])])) as (gw, client),
        ):
            async with client.post("/v1/chat/completions", json=STREAM) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/event-stream")
                first = await resp.content.readuntil(b"\n\n")
                # The client has the first event while the host is still generating.
                assert first == RECORDED_CHAT_STREAM[0]
                assert host.events_sent < len(RECORDED_CHAT_STREAM)
                rest = await resp.read()
            assert first + rest == STREAMED
            model = {"model": "default/gemma"}
            assert value(gw, "mesh_gateway_time_to_first_token_seconds_count", **model) == 1
            # One gap between each pair of consecutive data events.
            gaps = len(RECORDED_CHAT_STREAM) - 2
            assert value(gw, "mesh_gateway_inter_token_latency_seconds_count", **model) == gaps
            assert value(gw, "mesh_gateway_inter_token_latency_seconds_sum", **model) > 0.1
            prompt, completion = RECORDED_STREAM_USAGE
            assert value(gw, "mesh_gateway_tokens_total", kind="prompt") == prompt
            assert value(gw, "mesh_gateway_tokens_total", kind="completion") == completion

    run(scenario())


def test_answers_reuse_one_upstream_connection_and_streams_take_their_own() -> None:
    """Non-streamed requests share a kept-alive connection to the host; a stream
    ends its connection, as llama-server closes it after every stream, and a
    spare is then opened for the next request: after the first request, every
    one finds an open connection."""

    async def scenario() -> None:
        async with (
            hosts() as [host],
            gateway(SettableSource([record("gemma", [host.url])])) as (gw, client),
        ):
            upstream = gw.client
            assert upstream is not None
            for _ in range(5):
                async with client.post("/v1/chat/completions", json=CHAT) as resp:
                    assert await resp.read() == RECORDED_CHAT
            assert len(set(host.connections)) == 1
            for _ in range(3):
                async with client.post("/v1/chat/completions", json=STREAM) as resp:
                    assert await resp.read() == STREAMED
                await wait_for(lambda: upstream.idle_count() == 1)
            streams = host.connections[5:]
            assert len(set(streams)) == 3
            # The first stream took the connection the answers had kept alive.
            assert streams[0] == host.connections[0]
            # After the streams, answers share one kept-alive connection again.
            for _ in range(3):
                async with client.post("/v1/chat/completions", json=CHAT) as resp:
                    assert await resp.read() == RECORDED_CHAT
            assert len(set(host.connections[8:])) == 1
            assert (upstream.connects, upstream.reused) == (1, 10)

    run(scenario())


def test_a_stream_starts_with_its_headers_and_first_event_in_one_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The relay holds the response headers until the host's first chunk is in hand
    and hands both to the socket at once (one send, one wake-up of the client)."""
    writes = socket_writes(monkeypatch)

    async def scenario() -> None:
        async with (
            hosts(event_delay=0.05) as [host],
            gateway(SettableSource([record("gemma", [host.url])])) as (_, client),
            client.post("/v1/chat/completions", json=STREAM) as resp,
        ):
            assert await resp.read() == STREAMED
        # The gateway's answer is the one with X-Accel-Buffering; the host's is not.
        starts = [w for w in writes if w.startswith(b"HTTP/1.1 200") and b"X-Accel" in w]
        assert len(starts) == 1
        rest = starts[0].partition(b"\r\n\r\n")[2]
        size, _, event = rest.partition(b"\r\n")
        assert int(size, 16) == len(RECORDED_CHAT_STREAM[0])
        assert event == RECORDED_CHAT_STREAM[0] + b"\r\n"

    run(scenario())


def test_a_stream_sent_at_once_reaches_the_client_in_one_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stream whose end the host had already sent when its first chunk was read
    goes to the client in one write: headers, events and the final empty chunk."""
    writes = socket_writes(monkeypatch)
    # Whatever the host does, the gateway's read sees the whole stream at once.
    original = proxy.Proxy._relay

    async def whole_stream_first(self: Any, request: Any, *, answer: Any, **kw: Any) -> Any:
        while not answer.complete:
            await asyncio.sleep(0.01)
        return await original(self, request, answer=answer, **kw)

    monkeypatch.setattr(proxy.Proxy, "_relay", whole_stream_first)

    async def scenario() -> None:
        async with (
            hosts() as [host],
            gateway(SettableSource([record("gemma", [host.url])])) as (gw, client),
        ):
            async with client.post("/v1/chat/completions", json=STREAM) as resp:
                assert await resp.read() == STREAMED
            completion = RECORDED_STREAM_USAGE[1]
            assert value(gw, "mesh_gateway_tokens_total", kind="completion") == completion
        ours = [w for w in writes if b"X-Accel" in w]
        assert len(ours) == 1
        assert ours[0].endswith(b"\r\n0\r\n\r\n")
        assert all(event in ours[0] for event in RECORDED_CHAT_STREAM)

    run(scenario())


def test_an_answer_is_sent_before_it_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Metrics, trace and access log come after the answer left, not before."""
    writes = socket_writes(monkeypatch)
    events: list[str] = []
    sent = 0

    def note_sent() -> None:
        nonlocal sent
        for data in writes[sent:]:
            if data.startswith(b"HTTP/1.1 200") and b"X-Request-Id" in data:
                events.append("sent")
        sent = len(writes)

    record_exchange = proxy.Proxy._record

    def spy_record(self: proxy.Proxy, x: Any, span: Any) -> None:
        note_sent()
        events.append("recorded")
        record_exchange(self, x, span)

    monkeypatch.setattr(proxy.Proxy, "_record", spy_record)

    async def scenario() -> None:
        async with (
            hosts() as [host],
            gateway(SettableSource([record("gemma", [host.url])])) as (gw, client),
            client.post("/v1/chat/completions", json=CHAT) as resp,
        ):
            assert await resp.read() == RECORDED_CHAT
            assert value(gw, "mesh_gateway_requests_total", status="200") == 1
        note_sent()
        assert events == ["sent", "recorded"]

    run(scenario())


def test_a_slow_reader_slows_the_host_down() -> None:
    # 64 MiB: loopback socket buffers grow to a few MiB each, and there are
    # four of them (host, gateway in and out, client) besides aiohttp's own.
    events = 1024

    async def scenario() -> None:
        async with (
            hosts(big_events=events) as [host],
            gateway(SettableSource([record("gemma", [host.url])])) as (_, client),
        ):
            async with client.post("/v1/chat/completions", json=STREAM) as resp:
                await resp.content.readexactly(BIG_EVENT)
                # The client stops reading: once the buffers on the way are
                # full, the host cannot write any more.
                stalled = -1
                for _ in range(50):
                    if host.events_sent == stalled:
                        break
                    stalled = host.events_sent
                    await asyncio.sleep(0.2)
                assert stalled < events / 2
                await asyncio.sleep(0.5)
                assert host.events_sent == stalled
                received = BIG_EVENT
                async for chunk in resp.content.iter_any():
                    received += len(chunk)
            assert received == events * (BIG_EVENT + len(b"data: \n\n"))
            assert host.completed == 1

    run(scenario())


def test_a_large_answer_is_passed_on_as_it_comes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy, "BUFFERED_ANSWER_BYTES", 64 * 1024)
    monkeypatch.setattr(proxy, "USAGE_SCAN_BYTES", 4 * 1024)
    size = 1024 * 1024

    async def scenario() -> None:
        async with (
            hosts(pad_answer=size) as [host],
            gateway(SettableSource([record("gemma", [host.url])])) as (gw, client),
        ):
            async with client.post("/v1/chat/completions", json=CHAT) as resp:
                assert resp.status == 200
                assert await resp.read() == padded(size)
            prompt, completion = RECORDED_CHAT_USAGE
            assert value(gw, "mesh_gateway_tokens_total", kind="completion") == completion
            assert value(gw, "mesh_gateway_tokens_total", kind="prompt") == prompt

    run(scenario())


def test_models_listing_and_retrieval() -> None:
    async def scenario() -> None:
        source = SettableSource(
            [
                record("gemma", ["http://127.0.0.1:9"], namespace="a", aliases=["g3"]),
                record("llama", ["http://127.0.0.1:9"], namespace="a"),
                record("llama", ["http://127.0.0.1:9"], namespace="b"),
                record("qwen", ["http://127.0.0.1:9"], namespace="c", ready=False),
            ]
        )
        async with gateway(source) as (_, client):
            async with client.get("/v1/models") as resp:
                body = await resp.json()
            assert body["object"] == "list"
            assert {(m["id"], m["owned_by"]) for m in body["data"]} == {
                ("gemma", "a"),
                ("g3", "a"),
                ("a/llama", "a"),
                ("b/llama", "b"),
            }
            assert all(m["object"] == "model" for m in body["data"])
            async with client.get("/v1/models/b/llama") as resp:
                assert (resp.status, (await resp.json())["owned_by"]) == (200, "b")
            async with client.get("/v1/models/qwen") as resp:
                assert resp.status == 404
                assert (await error_of(resp))["code"] == "model_not_found"

    run(scenario())


# -- bad input -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{bad", 400, "invalid_json"),
        (b"", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (b"\xff\xfe", 400, "invalid_json"),
        (b'{"messages": []}', 400, "missing_model"),
        (b'{"model": 3}', 400, "missing_model"),
        (b'{"model": "mistral"}', 404, "model_not_found"),
        (b'{"model": "llama"}', 400, "model_ambiguous"),
    ],
)
def test_bad_requests(body: bytes, status: int, code: str) -> None:
    async def scenario() -> None:
        async with hosts() as [host]:
            source = SettableSource(
                [
                    record("gemma", [host.url]),
                    record("llama", [host.url], namespace="a"),
                    record("llama", [host.url], namespace="b"),
                ]
            )
            async with (
                gateway(source) as (gw, client),
                client.post("/v1/chat/completions", data=body) as resp,
            ):
                assert resp.status == status
                error = await error_of(resp)
                assert error["code"] == code
                assert host.requests == 0
                assert value(gw, "mesh_gateway_requests_total", model="-", status=str(status))

    run(scenario())


def test_unknown_model_lists_the_available_names() -> None:
    async def scenario() -> None:
        source = SettableSource(
            [record("gemma", ["http://127.0.0.1:9"], aliases=["g3"]), record("qwen", [])]
        )
        async with (
            gateway(source) as (_, client),
            client.post("/v1/completions", json={"model": "mistral"}) as resp,
        ):
            error = await error_of(resp)
            assert resp.status == 404
            assert error["param"] == "model"
            for name in ("gemma", "g3", "qwen"):
                assert f"{name}" in error["message"]

    run(scenario())


def test_qualified_name_picks_the_namespace() -> None:
    async def scenario() -> None:
        async with hosts(2) as [a, b]:
            source = SettableSource(
                [record("llama", [a.url], namespace="a"), record("llama", [b.url], namespace="b")]
            )
            async with (
                gateway(source) as (_, client),
                client.post("/v1/completions", json={"model": "b/llama"}) as resp,
            ):
                assert resp.status == 200
            assert (a.requests, b.requests) == (0, 1)

    run(scenario())


@pytest.mark.parametrize("chunked", [False, True])
def test_body_over_the_limit_is_413(chunked: bool) -> None:
    async def scenario() -> None:
        async with hosts() as [host]:
            source = SettableSource([record("gemma", [host.url])])
            async with gateway(source, max_body_bytes=1024) as (_, client):
                big = json.dumps({**CHAT, "pad": "x" * 4096}).encode()

                async def body() -> Any:
                    for start in range(0, len(big), 512):
                        yield big[start : start + 512]

                async with client.post(
                    "/v1/chat/completions", data=body() if chunked else big
                ) as resp:
                    assert resp.status == 413
                    assert (await error_of(resp))["code"] == "request_too_large"
                assert host.requests == 0

    run(scenario())


def test_unknown_paths_and_methods_answer_in_openai_shape() -> None:
    async def scenario() -> None:
        async with gateway(SettableSource()) as (_, client):
            async with client.get("/v2/nothing") as resp:
                assert (resp.status, (await error_of(resp))["code"]) == (404, "unknown_url")
            async with client.get("/v1/chat/completions") as resp:
                assert (resp.status, (await error_of(resp))["code"]) == (405, "method_not_allowed")

    run(scenario())


# -- holding, slots and retries --------------------------------------------------


def test_not_ready_after_the_wait_is_503_with_retry_after() -> None:
    async def scenario() -> None:
        async with hosts() as [host]:
            source = SettableSource([record("gemma", [host.url], ready=False)])
            async with gateway(source, hold_timeout=0.3, retry_after=7) as (_, client):
                loop = asyncio.get_running_loop()
                started = loop.time()
                async with client.post("/v1/chat/completions", json=CHAT) as resp:
                    assert resp.status == 503
                    assert resp.headers["Retry-After"] == "7"
                    assert (await error_of(resp))["code"] == "model_not_ready"
                assert loop.time() - started >= 0.3
                assert host.requests == 0

    run(scenario())


def test_held_request_is_sent_once_the_model_is_ready() -> None:
    async def scenario() -> None:
        async with hosts() as [host]:
            source = SettableSource([record("gemma", [host.url], ready=False)])
            async with gateway(source) as (gw, client):
                request = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
                await asyncio.sleep(0.3)
                assert not request.done()
                assert value(gw, "mesh_gateway_queued_requests") == 1
                source.set([record("gemma", [host.url], ready=True)])
                resp = await request
                assert resp.status == 200
                resp.release()
                assert value(gw, "mesh_gateway_queue_wait_seconds_sum") >= 0.2

    run(scenario())


def test_in_flight_per_host_never_exceeds_its_slots() -> None:
    async def scenario() -> None:
        async with hosts(answer_delay=0.2) as [host]:
            source = SettableSource([record("gemma", [host.url], slots=2)])
            async with gateway(source) as (_, client):

                async def one() -> int:
                    async with client.post("/v1/chat/completions", json=CHAT) as resp:
                        await resp.read()
                        return resp.status

                statuses = await asyncio.gather(*(one() for _ in range(7)))
            assert statuses == [200] * 7
            assert host.max_in_flight == 2

    run(scenario())


def test_every_slot_busy_past_the_wait_is_503_busy() -> None:
    async def scenario() -> None:
        async with hosts(answer_delay=1.0) as [host]:
            source = SettableSource([record("gemma", [host.url], slots=1)])
            async with gateway(source, hold_timeout=0.3) as (_, client):
                first = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
                await wait_for(lambda: host.requests == 1)
                async with client.post("/v1/chat/completions", json=CHAT) as resp:
                    assert resp.status == 503
                    assert (await error_of(resp))["code"] == "model_busy"
                    assert "Retry-After" in resp.headers
                (await first).release()

    run(scenario())


def test_a_full_queue_refuses_at_once() -> None:
    async def scenario() -> None:
        source = SettableSource([record("gemma", ["http://127.0.0.1:9"], ready=False)])
        async with gateway(source, max_queue=1) as (_, client):
            held = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
            await asyncio.sleep(0.1)
            async with client.post("/v1/chat/completions", json=CHAT) as resp:
                assert resp.status == 503
                assert (await error_of(resp))["code"] == "queue_full"
            held.cancel()

    run(scenario())


def test_connection_dropped_before_any_byte_is_retried() -> None:
    async def scenario() -> None:
        async with hosts(behaviour="drop", misbehave_times=1) as [host]:
            source = SettableSource([record("gemma", [host.url])])
            async with (
                gateway(source) as (gw, client),
                client.post("/v1/chat/completions", json=CHAT) as resp,
            ):
                assert resp.status == 200
                assert await resp.read() == RECORDED_CHAT
                assert host.requests == 2
                assert value(gw, "mesh_gateway_retries_total", reason="disconnected") == 1
                # A closed connection alone (a stale keep-alive one, say) does not
                # take the host out of rotation.
                assert value(gw, "mesh_gateway_hosts", state="unhealthy") == 0

    run(scenario())


def test_stream_dropped_before_its_first_byte_is_retried() -> None:
    async def scenario() -> None:
        async with hosts(behaviour="drop", misbehave_times=1) as [host]:
            source = SettableSource([record("gemma", [host.url])])
            async with (
                gateway(source) as (_, client),
                client.post("/v1/chat/completions", json=STREAM) as resp,
            ):
                assert (resp.status, await resp.read()) == (200, STREAMED)

    run(scenario())


@pytest.mark.parametrize("body", [CHAT, STREAM], ids=["non-streamed", "streamed"])
def test_a_silent_host_dropped_by_discovery_is_left_and_the_request_sent_again(
    body: dict[str, Any],
) -> None:
    """A host on a lost node holds the connection and never answers; once discovery
    names its replacement the request goes there, and the client sees one answer."""

    async def scenario() -> None:
        async with hosts(2) as [silent, replacement]:
            silent.answer_delay = 3600
            source = SettableSource([record("gemma", [silent.url])])
            async with gateway(source) as (gw, client):
                request = asyncio.create_task(client.post("/v1/chat/completions", json=body))
                await wait_for(lambda: silent.requests == 1)
                source.set([record("gemma", [replacement.url])])
                resp = await request
                expected = STREAMED if body.get("stream") else RECORDED_CHAT
                assert (resp.status, await resp.read()) == (200, expected)
                resp.release()
                assert replacement.requests == 1
                # The abandoned exchange was closed, so the host stops working on it.
                await wait_for(lambda: silent.disconnected == 1)
                assert value(gw, "mesh_gateway_retries_total", reason="retired") == 1

    run(scenario())


def test_a_host_loading_its_model_is_waited_for() -> None:
    async def scenario() -> None:
        async with hosts(behaviour="loading", misbehave_times=1) as [host]:
            source = SettableSource([record("gemma", [host.url])])
            async with gateway(source) as (gw, client):
                await wait_for(
                    lambda: gw.router is not None and gw.router.resolve("gemma").dispatchable()
                )
                host.health = 503
                request = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
                await wait_for(lambda: host.requests == 1)
                await asyncio.sleep(0.3)
                assert not request.done()
                host.health = 200
                resp = await request
                assert resp.status == 200
                resp.release()
                assert value(gw, "mesh_gateway_retries_total", reason="unavailable") == 1

    run(scenario())


def test_a_refused_connection_fails_over_to_another_host() -> None:
    async def scenario() -> None:
        async with hosts(2) as [dead, alive]:
            source = SettableSource([record("gemma", [dead.url, alive.url], slots=1)])
            async with gateway(source) as (gw, client):
                assert gw.router is not None
                gate = gw.router.resolve("gemma")
                await wait_for(lambda: all(b.healthy for b in gate.backends.values()))
                # Prefix routing (the default) sends a prompt to the host it hashes
                # to: use one whose preferred host is the one about to die.
                bodies = (
                    {**CHAT, "messages": [{"role": "user", "content": f"hi {n}"}]}
                    for n in range(1000)
                )
                body = next(
                    b
                    for b in bodies
                    if gate.preferred(prefix_key("/v1/chat/completions", b) or b"")
                    is gate.backends[dead.url]
                )
                await dead.stop()
                for _ in range(4):
                    async with client.post("/v1/chat/completions", json=body) as resp:
                        assert resp.status == 200
                assert alive.requests == 4
                assert value(gw, "mesh_gateway_hosts", state="unhealthy") == 1

    run(scenario())


def test_a_host_that_keeps_breaking_is_502_after_the_attempts() -> None:
    async def scenario() -> None:
        async with hosts(behaviour="drop") as [host]:
            source = SettableSource([record("gemma", [host.url])])
            async with (
                gateway(source, max_attempts=3) as (_, client),
                client.post("/v1/chat/completions", json=CHAT) as resp,
            ):
                assert resp.status == 502
                error = await error_of(resp)
                assert (error["code"], error["type"]) == ("upstream_error", "server_error")
                assert host.requests == 3

    run(scenario())


def test_a_stream_cut_after_bytes_were_sent_ends_with_an_error_event() -> None:
    async def scenario() -> None:
        async with hosts(behaviour="cut") as [host]:
            source = SettableSource([record("gemma", [host.url])])
            async with (
                gateway(source) as (gw, client),
                client.post("/v1/chat/completions", json=STREAM) as resp,
            ):
                assert resp.status == 200
                body = await resp.read()
                assert body.startswith(RECORDED_CHAT_STREAM[0] + RECORDED_CHAT_STREAM[1])
                last = body.strip().split(b"\n\n")[-1]
                assert json.loads(last.removeprefix(b"data: "))["error"]["code"] == "upstream_error"
                assert host.requests == 1
                assert value(gw, "mesh_gateway_requests_total", status="502") == 1

    run(scenario())


def test_upstream_errors_pass_through_untouched() -> None:
    async def scenario() -> None:
        upstream_error = {"error": {"code": 400, "message": "bad", "type": "invalid_request_error"}}

        async def bad(request: aiohttp.web.Request) -> aiohttp.web.Response:
            return aiohttp.web.json_response(upstream_error, status=400)

        async def health(request: aiohttp.web.Request) -> aiohttp.web.Response:
            return aiohttp.web.Response(text="ok")

        app = aiohttp.web.Application()
        app.router.add_post("/v1/chat/completions", bad)
        app.router.add_get("/health", health)
        runner = aiohttp.web.AppRunner(app)
        await runner.setup()
        await aiohttp.web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with (
                gateway(SettableSource([record("gemma", [url])])) as (_, client),
                client.post("/v1/chat/completions", json=CHAT) as resp,
            ):
                assert (resp.status, await resp.json()) == (400, upstream_error)
        finally:
            await runner.cleanup()

    run(scenario())


def test_upstream_key_is_sent_to_the_host_and_client_key_is_not() -> None:
    async def scenario() -> None:
        async with hosts() as [host]:
            source = SettableSource([record("gemma", [host.url], upstream_api_key="host-key")])
            async with (
                gateway(source) as (_, client),
                client.post(
                    "/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer client"}
                ) as resp,
            ):
                assert resp.status == 200
            assert host.authorizations == ["Bearer host-key"]

    run(scenario())


# -- disconnects and shutdown ------------------------------------------------------


def test_client_disconnect_mid_stream_closes_the_upstream() -> None:
    async def scenario() -> None:
        async with hosts(event_delay=0.3) as [host]:
            source = SettableSource([record("gemma", [host.url])])
            async with gateway(source) as (gw, client):
                resp = await client.post("/v1/chat/completions", json=STREAM)
                await resp.content.readuntil(b"\n\n")
                resp.close()
                await wait_for(lambda: host.disconnected == 1)
                assert host.completed == 0
                await wait_for(lambda: value(gw, "mesh_gateway_requests_total", status="499") == 1)
                assert gw.router is not None
                assert gw.router.resolve("gemma").in_flight() == 0

    run(scenario())


def test_client_disconnect_while_waiting_for_the_answer_closes_the_upstream() -> None:
    async def scenario() -> None:
        async with hosts(answer_delay=5) as [host]:
            source = SettableSource([record("gemma", [host.url])])
            async with gateway(source) as (gw, client):
                request = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
                await wait_for(lambda: host.requests == 1)
                request.cancel()
                await wait_for(lambda: host.disconnected == 1)
                assert gw.router is not None
                await wait_for(
                    lambda: gw.router is not None and gw.router.resolve("gemma").in_flight() == 0
                )

    run(scenario())


def test_client_disconnect_while_queued_gives_up_its_place() -> None:
    async def scenario() -> None:
        async with hosts(answer_delay=0.5) as [host]:
            source = SettableSource([record("gemma", [host.url], slots=1)])
            async with gateway(source) as (gw, client):
                assert gw.router is not None
                gate = gw.router.resolve("gemma")
                first = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
                await wait_for(lambda: host.requests == 1)
                queued = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
                await wait_for(lambda: len(gate.waiters) == 1)
                queued.cancel()
                await wait_for(lambda: not gate.waiters)
                (await first).release()
                await asyncio.sleep(0.1)
                assert host.requests == 1

    run(scenario())


def test_graceful_shutdown_finishes_streams_in_flight() -> None:
    async def scenario() -> None:
        async with hosts(event_delay=0.2) as [host]:
            source = SettableSource([record("gemma", [host.url])])
            gw = Gateway(settings(shutdown_delay=0.2, drain_timeout=10), source)
            await gw.start()
            async with aiohttp.ClientSession(base_url=gw.url) as client:
                resp = await client.post("/v1/chat/completions", json=STREAM)
                first = await resp.content.readuntil(b"\n\n")
                stopping = asyncio.create_task(gw.stop())
                await asyncio.sleep(0.05)
                async with client.get("/readyz") as ready:
                    assert ready.status == 503
                rest = await resp.read()
                await stopping
            assert first + rest == STREAMED
            assert host.completed == 1

    run(scenario())


def test_health_and_readiness() -> None:
    async def scenario() -> None:
        source = SettableSource()
        gw = Gateway(settings(), source)

        async def never_synced(publish: Any) -> None:
            return None

        source.start = never_synced  # type: ignore[method-assign]
        await gw.start()
        try:
            async with aiohttp.ClientSession(base_url=gw.url) as client:
                async with client.get("/healthz") as resp:
                    assert resp.status == 200
                async with client.get("/readyz") as resp:
                    assert resp.status == 503
                source._publish = lambda records: None
                async with client.get("/readyz") as resp:
                    assert resp.status == 200
        finally:
            await gw.stop()

    run(scenario())


# -- auth, metrics, traces ------------------------------------------------------------


def test_api_keys(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "sk-team-a-0123456789"

    async def scenario() -> None:
        keys = KeyReloader(KeyRing(), lambda: {"team-a": secret})
        async with hosts() as [host]:
            source = SettableSource([record("gemma", [host.url])])
            async with gateway(source, keys=keys, access_log=True) as (gw, client):
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": secret}):
                    async with client.post(
                        "/v1/chat/completions", json=CHAT, headers=headers
                    ) as resp:
                        assert resp.status == 401
                        assert (await error_of(resp))["code"] == "invalid_api_key"
                    async with client.get("/v1/models", headers=headers) as resp:
                        assert resp.status == 401
                good = {"Authorization": f"Bearer {secret}"}
                async with client.post("/v1/chat/completions", json=CHAT, headers=good) as resp:
                    assert resp.status == 200
                async with client.get("/v1/models", headers=good) as resp:
                    assert resp.status == 200
                assert host.requests == 1
                assert host.authorizations == [None]
                per_key = {"key": "team-a", "model": "default/gemma"}
                assert value(gw, "mesh_gateway_key_requests_total", status="200", **per_key) == 1
                assert value(gw, "mesh_gateway_key_requests_total", key="-", status="401") == 3
                prompt, _ = RECORDED_CHAT_USAGE
                assert (
                    value(gw, "mesh_gateway_key_tokens_total", kind="prompt", **per_key) == prompt
                )
                assert secret not in gw.metrics.exposition().decode()

    run(scenario())
    assert secret not in caplog.text
    assert "key=team-a" in caplog.text


def test_usage_per_model_key_and_node() -> None:
    secret = "sk-team-b-0123456789"
    shares = (("node-a", 0.75), ("node-b", 0.25))

    async def scenario() -> None:
        keys = KeyReloader(KeyRing(), lambda: {"team-b": secret})
        async with hosts(2) as [planned_host, unplanned_host]:
            source = SettableSource(
                [
                    record("gemma", [planned_host.url], namespace="ns", node_shares=shares),
                    record("other", [unplanned_host.url], namespace="ns"),
                ]
            )
            async with gateway(source, keys=keys) as (gw, client):
                # Nothing is counted before traffic: no label set born at zero.
                for name in (
                    "mesh_gateway_tokens_total",
                    "mesh_gateway_key_tokens_total",
                    "mesh_gateway_node_tokens_total",
                ):
                    assert samples(gw, name) == {}
                good = {"Authorization": f"Bearer {secret}"}
                for body in (CHAT, STREAM, {**CHAT, "model": "other"}):
                    async with client.post("/v1/chat/completions", json=body, headers=good) as resp:
                        assert resp.status == 200
                        await resp.read()
                chat_prompt, chat_completion = RECORDED_CHAT_USAGE
                stream_prompt, stream_completion = RECORDED_STREAM_USAGE
                prompt = chat_prompt + stream_prompt
                completion = chat_completion + stream_completion
                gemma = {"model": "ns/gemma"}
                assert value(gw, "mesh_gateway_tokens_total", kind="prompt", **gemma) == prompt
                per_key = {"key": "team-b", **gemma}
                assert (
                    value(gw, "mesh_gateway_key_tokens_total", kind="completion", **per_key)
                    == completion
                )
                nodes = samples(gw, "mesh_gateway_node_tokens_total")
                assert nodes == {
                    (("kind", kind), ("model", "ns/gemma"), ("node", node)): count * share
                    for kind, count in (("prompt", prompt), ("completion", completion))
                    for node, share in shares
                }
                # A model without a plan is counted per model and key, per node nowhere.
                other = {"model": "ns/other"}
                assert value(gw, "mesh_gateway_tokens_total", kind="prompt", **other) == (
                    chat_prompt
                )
                assert value(gw, "mesh_gateway_key_tokens_total", key="team-b", **other) == (
                    chat_prompt + chat_completion
                )
                assert value(gw, "mesh_gateway_node_tokens_total", **other) == 0

    run(scenario())


def test_usage_without_keys_is_counted_under_no_key() -> None:
    async def scenario() -> None:
        async with (
            hosts() as [host],
            gateway(SettableSource([record("gemma", [host.url])])) as (gw, client),
        ):
            async with client.post("/v1/chat/completions", json=CHAT) as resp:
                assert resp.status == 200
            prompt, _ = RECORDED_CHAT_USAGE
            assert (
                samples(gw, "mesh_gateway_key_tokens_total")[
                    (("key", "-"), ("kind", "prompt"), ("model", "default/gemma"))
                ]
                == prompt
            )

    run(scenario())


def test_a_span_per_request_with_model_host_and_wait() -> None:
    exporter = InMemorySpanExporter()

    async def scenario() -> None:
        tracing = setup_tracing(None, processor=SimpleSpanProcessor(exporter))
        async with hosts() as [host]:
            source = SettableSource([record("gemma", [host.url], namespace="ns")])
            async with gateway(source, tracing=tracing) as (_, client):
                parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                async with client.post(
                    "/v1/chat/completions", json=CHAT, headers={"traceparent": parent}
                ) as resp:
                    assert resp.status == 200
                async with client.post("/v1/chat/completions", json={"model": "x"}) as resp:
                    assert resp.status == 404
            [ok, missing] = exporter.get_finished_spans()
            assert ok.name == "POST /v1/chat/completions"
            assert ok.context is not None and ok.parent is not None
            assert f"{ok.context.trace_id:032x}" == "4bf92f3577b34da6a3ce929d0e0e4736"
            attrs = dict(ok.attributes or {})
            assert attrs["gen_ai.request.model"] == "gemma"
            assert attrs["mesh.model"] == "ns/gemma"
            assert (attrs["server.address"], attrs["server.port"]) == ("127.0.0.1", host.port)
            assert attrs["http.response.status_code"] == 200
            assert attrs["gen_ai.usage.input_tokens"] == RECORDED_CHAT_USAGE[0]
            assert isinstance(attrs["mesh.queue_wait_ms"], float)
            assert dict(missing.attributes or {})["http.response.status_code"] == 404

    run(scenario())


def test_metrics_endpoint_serves_the_exposition() -> None:
    async def scenario() -> None:
        async with (
            hosts() as [host],
            gateway(SettableSource([record("gemma", [host.url])])) as (_, client),
        ):
            async with client.post("/v1/chat/completions", json=CHAT) as resp:
                assert resp.status == 200
            async with client.get("/metrics") as resp:
                text = await resp.text()
        names = {f.name for f in text_string_to_metric_families(text)}
        assert {
            "mesh_gateway_requests",
            "mesh_gateway_tokens",
            "mesh_gateway_time_to_first_token_seconds",
            "mesh_gateway_inter_token_latency_seconds",
            "mesh_gateway_request_duration_seconds",
            "mesh_gateway_queue_wait_seconds",
            "mesh_gateway_queued_requests",
            "mesh_gateway_in_flight_requests",
            "mesh_gateway_hosts",
            "mesh_gateway_model_ready",
        } <= names

    run(scenario())


def test_tracing_is_off_without_an_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert configured_endpoint(None) is None
    tracing = setup_tracing(configured_endpoint(None))
    assert tracing.provider is None
    assert not tracing.tracer.start_span("x").is_recording()


@pytest.mark.parametrize(
    ("flag", "env", "url"),
    [
        ("http://collector:4318", {}, "http://collector:4318/v1/traces"),
        ("http://collector:4318/v1/traces", {}, "http://collector:4318/v1/traces"),
        (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}, "http://c:4318/v1/traces"),
        (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:1/t"}, "http://c:1/t"),
    ],
)
def test_otlp_endpoint_sources(
    monkeypatch: pytest.MonkeyPatch, flag: str | None, env: dict[str, str], url: str
) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    for name, val in env.items():
        monkeypatch.setenv(name, val)
    assert configured_endpoint(flag) == url


@pytest.mark.parametrize(
    ("given", "kept"),
    [("req-42", True), ("x" * 129, False), ("two words", False), ("line\nbreak", False)],
)
def test_client_request_ids_are_kept_only_when_sane(given: str, kept: bool) -> None:
    async def scenario() -> None:
        async with hosts() as [host]:
            source = SettableSource([record("gemma", [host.url])])
            async with gateway(source) as (_, client):
                raw = json.dumps(CHAT).encode()
                headers = {"X-Request-Id": given}
                try:
                    resp = await client.post("/v1/chat/completions", data=raw, headers=headers)
                except ValueError:
                    # aiohttp itself refuses a header with a line break.
                    assert not kept
                    return
                async with resp:
                    assert resp.status == 200
                    assert (resp.headers["X-Request-Id"] == given) is kept

    run(scenario())
