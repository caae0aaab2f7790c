"""The `mesh gateway` process in front of real llama-server processes (gemma-3-270m),
driven by the official `openai` client: every endpoint, every bad input, a host
killed and restarted under load, graceful shutdown and OTLP export.

The client never retries by itself (`max_retries=0`): what the tests see is what
the gateway did.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from e2e.gateway import GatewayProcess, llama_args, start_gateway, start_host
from e2e.llama import LlamaProcess, start_llama_server, wait_healthy
from e2e.waiting import free_port

pytestmark = pytest.mark.integration

KEY = "sk-mesh-integration-0001"
MAX_BODY = 64 * 1024
MESSAGES: list[Any] = [{"role": "user", "content": "Name a colour."}]


def client_for(gateway: GatewayProcess, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=180.0)


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway-llama")


@pytest.fixture(scope="module")
def chat_host(logs: Path, llama_server_bin: Path, model_file: Path) -> Iterator[LlamaProcess]:
    host = start_host(logs, model_file, "gemma", slots=2)
    yield host
    host.stop()


@pytest.fixture(scope="module")
def embed_host(logs: Path, llama_server_bin: Path, model_file: Path) -> Iterator[LlamaProcess]:
    # gemma's default pooling is `none`, which llama-server refuses for
    # /v1/embeddings: an embeddings host needs a pooling type.
    host = start_host(
        logs, model_file, "gemma-embed", slots=1, extra=["--embeddings", "--pooling", "mean"]
    )
    yield host
    host.stop()


@pytest.fixture(scope="module")
def gateway(
    logs: Path, chat_host: LlamaProcess, embed_host: LlamaProcess
) -> Iterator[GatewayProcess]:
    keys = logs / "keys"
    keys.mkdir()
    (keys / "ci").write_text(KEY + "\n")
    static = logs / "models.yaml"
    static.write_text(
        json.dumps(
            {
                "models": [
                    {
                        "name": "gemma",
                        "aliases": ["gemma-3"],
                        "slots": 2,
                        "backends": [chat_host.url],
                    },
                    {"name": "gemma-embed", "slots": 1, "backends": [embed_host.url]},
                ]
            }
        )
    )
    args = ["--static", str(static), "--api-keys-dir", str(keys), "--max-body-bytes", str(MAX_BODY)]
    gw = start_gateway(logs, args)
    yield gw
    gw.stop()


@pytest.fixture
def client(gateway: GatewayProcess) -> openai.OpenAI:
    return client_for(gateway)


# -- every endpoint ------------------------------------------------------------------


def test_models_lists_names_and_aliases(client: openai.OpenAI) -> None:
    models = {m.id: m.owned_by for m in client.models.list()}
    assert models == {"gemma": "default", "gemma-3": "default", "gemma-embed": "default"}


def test_chat_completion(client: openai.OpenAI, gateway: GatewayProcess) -> None:
    before = gateway.metric("mesh_gateway_tokens_total", kind="completion")
    reply = client.chat.completions.create(model="gemma", messages=MESSAGES, max_tokens=8)
    assert reply.object == "chat.completion"
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    after = gateway.metric("mesh_gateway_tokens_total", kind="completion")
    assert after - before == reply.usage.completion_tokens


def test_completion_by_alias(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="gemma-3", prompt="Once upon a time", max_tokens=8)
    assert reply.choices[0].text
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_streaming_chat(client: openai.OpenAI, gateway: GatewayProcess) -> None:
    ttft_before = gateway.metric("mesh_gateway_time_to_first_token_seconds_count")
    stream = client.chat.completions.create(
        model="gemma", messages=MESSAGES, max_tokens=12, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) >= 3
    assert text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert gateway.metric("mesh_gateway_time_to_first_token_seconds_count") == ttft_before + 1
    assert gateway.metric("mesh_gateway_inter_token_latency_seconds_count") >= len(chunks) - 2


def test_responses_api(client: openai.OpenAI) -> None:
    reply = client.responses.create(model="gemma", input="Say hi.", max_output_tokens=8)
    assert reply.status == "completed"
    assert reply.output_text


def test_embeddings(client: openai.OpenAI, gateway: GatewayProcess) -> None:
    reply = client.embeddings.create(model="gemma-embed", input=["hello", "world"])
    vectors = [d.embedding for d in reply.data]
    assert len(vectors) == 2
    # gemma-3-270m's embedding width.
    assert {len(v) for v in vectors} == {640}
    assert vectors[0] != vectors[1]
    assert (
        gateway.metric("mesh_gateway_requests_total", endpoint="/v1/embeddings", status="200") >= 1
    )


# -- bad input ---------------------------------------------------------------------


def test_unknown_model_is_404_listing_the_names(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="mistral", messages=MESSAGES, max_tokens=4)
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "model_not_found"
    for name in ("gemma", "gemma-3", "gemma-embed"):
        assert name in error["message"]


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b'{"model": "gemma", "messages": [', "invalid_json"),
        (b'["gemma"]', "invalid_json"),
        (b'{"messages": []}', "missing_model"),
    ],
)
def test_malformed_bodies_are_400(gateway: GatewayProcess, content: bytes, code: str) -> None:
    request = urllib.request.Request(
        f"{gateway.url}/v1/chat/completions",
        data=content,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 400
    assert json.loads(caught.value.read())["error"]["code"] == code


def test_body_over_the_limit_is_413(client: openai.OpenAI) -> None:
    huge: list[Any] = [{"role": "user", "content": "x" * (MAX_BODY + 1)}]
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="gemma", messages=huge, max_tokens=4)
    assert caught.value.status_code == 413
    assert isinstance(caught.value.body, dict) and caught.value.body["code"] == "request_too_large"


def test_wrong_key_is_401(gateway: GatewayProcess) -> None:
    with pytest.raises(openai.AuthenticationError):
        client_for(gateway, key="sk-wrong").models.list()
    assert gateway.metric("mesh_gateway_key_requests_total", key="ci") >= 1
    assert KEY not in gateway.metrics()
    assert KEY not in gateway.log_text()


def test_model_not_ready_is_503_with_retry_after(logs: Path) -> None:
    # A model whose only host never comes up: nothing listens on that port.
    dead = f"http://127.0.0.1:{free_port()}"
    gw = start_gateway(
        logs, ["--backend", f"dead={dead}", "--hold-timeout", "1", "--retry-after", "3"]
    )
    try:
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as caught:
            client_for(gw).chat.completions.create(model="dead", messages=MESSAGES, max_tokens=4)
        assert time.monotonic() - started >= 1
        assert caught.value.status_code == 503
        assert caught.value.response.headers["retry-after"] == "3"
        assert (
            isinstance(caught.value.body, dict) and caught.value.body["code"] == "model_not_ready"
        )
    finally:
        gw.stop()


def test_host_killed_mid_stream_ends_it_with_a_502_error(
    logs: Path, llama_server_bin: Path, model_file: Path
) -> None:
    host = start_host(logs, model_file, "victim", slots=1)
    gw = start_gateway(logs, ["--backend", f"victim={host.url}"])
    try:
        stream = client_for(gw).chat.completions.create(
            model="victim",
            messages=MESSAGES,
            max_tokens=400,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        received = 0
        with pytest.raises(openai.APIError) as caught:
            for _ in stream:
                received += 1
                if received == 3:
                    host.proc.kill()
        assert received >= 3
        assert isinstance(caught.value.body, dict)
        assert caught.value.body["code"] == "upstream_error"
        assert gw.metric("mesh_gateway_requests_total", model="default/victim", status="502") == 1
    finally:
        gw.stop()
        host.stop()


# -- a host killed and restarted under load ------------------------------------------


def test_host_killed_and_restarted_loses_no_request(
    logs: Path, llama_server_bin: Path, model_file: Path
) -> None:
    host = start_host(logs, model_file, "phoenix", slots=2)
    gw = start_gateway(logs, ["--backend", f"phoenix={host.url}", "--slots", "2"])
    client = client_for(gw)
    errors: list[BaseException] = []
    latencies: list[float] = []
    done: list[float] = []
    stop = threading.Event()
    lock = threading.Lock()

    def worker() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                reply = client.chat.completions.create(
                    model="phoenix", messages=MESSAGES, max_tokens=8
                )
                assert reply.usage is not None and reply.usage.completion_tokens > 0
            except BaseException as exc:
                with lock:
                    errors.append(exc)
                return
            with lock:
                latencies.append(time.monotonic() - started)
                done.append(time.monotonic())

    workers = [threading.Thread(target=worker) for _ in range(4)]
    restarted: LlamaProcess | None = None
    try:
        for thread in workers:
            thread.start()
        _wait(lambda: len(done) >= 6, 120, "requests before the kill")
        # Requests are in flight on the host now (4 clients, 2 slots).
        host.proc.kill()
        host.proc.wait()
        killed_at = time.monotonic()
        time.sleep(1.0)
        restarted = start_llama_server(
            logs, llama_args(model_file, "phoenix", slots=2), port=host.port, wait=False
        )
        wait_healthy(restarted)
        back_at = time.monotonic()
        _wait(lambda: sum(1 for t in done if t > back_at) >= 8, 180, "requests after the restart")
        retried = gw.metric("mesh_gateway_retries_total", model="default/phoenix")
    finally:
        stop.set()
        for thread in workers:
            thread.join(timeout=240)
        gw.stop()
        host.stop()
        if restarted is not None:
            restarted.stop()
    assert errors == []
    # Some requests were held across the outage, longer than it lasted.
    assert max(latencies) >= back_at - killed_at
    # The requests in flight when the host died were sent again.
    assert retried >= 1, gw.log_text()[-3000:]


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- graceful shutdown and traces ----------------------------------------------------


def test_sigterm_lets_a_stream_in_flight_finish(logs: Path, chat_host: LlamaProcess) -> None:
    gw = start_gateway(logs, ["--backend", f"gemma={chat_host.url}", "--slots", "2"])
    stream = client_for(gw).chat.completions.create(
        model="gemma", messages=MESSAGES, max_tokens=40, stream=True
    )
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if len(chunks) == 2:
            gw.proc.send_signal(signal.SIGTERM)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert gw.proc.wait(60) == 0
    assert "shutting down" in gw.log_text()


class _Collector(BaseHTTPRequestHandler):
    """A minimal OTLP/HTTP receiver: keeps every export request body."""

    received: list[bytes]

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        type(self).received.append(self.rfile.read(length))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return


def test_spans_are_exported_over_otlp(logs: Path, chat_host: LlamaProcess) -> None:
    received: list[bytes] = []
    handler = type("Collector", (_Collector,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        gw = start_gateway(
            logs, ["--backend", f"gemma={chat_host.url}", "--otlp-endpoint", endpoint]
        )
        client_for(gw).chat.completions.create(model="gemma", messages=MESSAGES, max_tokens=4)
        # Shutdown flushes the batch processor.
        assert gw.terminate() == 0
    finally:
        server.shutdown()
        server.server_close()
    spans = []
    for body in received:
        request = ExportTraceServiceRequest.FromString(body)
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                spans.extend(scope.spans)
    [span] = [s for s in spans if s.name == "POST /v1/chat/completions"]
    attrs = {a.key: a.value for a in span.attributes}
    assert attrs["mesh.model"].string_value == "default/gemma"
    assert attrs["server.address"].string_value == "127.0.0.1"
    assert attrs["server.port"].int_value == chat_host.port
    assert attrs["http.response.status_code"].int_value == 200
    assert "mesh.queue_wait_ms" in attrs
