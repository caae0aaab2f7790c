"""The HTTP side of the gateway: the OpenAI endpoints and how a request reaches a host.

For each inference request: check the key, read the body (bounded), find the model
by its `model` field, take a slot from admission (waiting if needed), send the
body unchanged to the host, and pass the answer back. A streamed answer is
relayed chunk by chunk as it arrives: each write waits for the client to drain
(backpressure reaches llama-server through TCP), and a client that disconnects
closes the upstream connection, which makes llama-server stop generating.

A failure before any byte reached the client is retried on a host of the same
model (connection refused, a host that closed the connection, llama-server's 503
while loading); once bytes were sent, a stream that breaks ends with an error
event instead. Every answer is counted, timed and traced here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from mesh_operator.gateway import errors, upstream
from mesh_operator.gateway.admission import (
    Backend,
    HoldTimeoutError,
    ModelGate,
    ModelGoneError,
    QueueFullError,
    Router,
)
from mesh_operator.gateway.auth import KeyRing
from mesh_operator.gateway.metrics import NO_LABEL, GatewayMetrics
from mesh_operator.gateway.routing import AmbiguousModelError, Listed, UnknownModelError
from mesh_operator.gateway.settings import GatewaySettings
from mesh_operator.gateway.sse import EventScanner, Usage, usage_in

log = logging.getLogger(__name__)

INFERENCE_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
EVENT_STREAM = "text/event-stream"
# nginx's convention for "the client closed the connection before the answer".
CLIENT_CLOSED = 499
# Bodies above this are parsed in a thread so the loop keeps serving streams.
PARSE_IN_THREAD_BYTES = 1024 * 1024
READ_CHUNK = 64 * 1024
# Non-streamed answers up to this size are held whole before the client sees a
# byte, so that a host failing mid-answer can still be retried elsewhere.
BUFFERED_ANSWER_BYTES = 4 * 1024 * 1024
USAGE_SCAN_BYTES = 64 * 1024
REQUEST_ID = "X-Request-Id"
MAX_REQUEST_ID = 128


class _RetryableError(Exception):
    """This send failed before the client saw anything; try again."""

    def __init__(self, reason: str, detail: str, *, counts: bool, host_down: bool) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        # Connection refused or "still loading" are the host's state, not this
        # request's fault; they do not use up the request's attempts.
        self.counts = counts
        # A host that closed a connection may only have timed out an idle
        # keep-alive one: the next send, on a fresh connection, tells.
        self.host_down = host_down


@dataclass
class _Exchange:
    """What one request did, for metrics, traces and the access log."""

    endpoint: str
    started: float
    request_id: str
    model: str = NO_LABEL
    key: str = NO_LABEL
    status: int = 0
    host: str = ""
    attempts: int = 0
    queue_wait: float = 0.0
    usage: Usage | None = None


class Proxy:
    """The request handlers."""

    def __init__(
        self,
        router: Router,
        client: upstream.HostClient,
        *,
        metrics: GatewayMetrics,
        tracer: trace.Tracer,
        settings: GatewaySettings,
        keys: KeyRing | None = None,
    ) -> None:
        self._router = router
        self._client = client
        self._metrics = metrics
        self._tracer = tracer
        self._traced = not isinstance(tracer, trace.NoOpTracer)
        self._settings = settings
        self._keys = keys

    # -- routes ------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model:.+}", self.get_model)
        for path in INFERENCE_PATHS:
            app.router.add_post(path, self.forward)

    async def list_models(self, request: web.Request) -> web.Response:
        try:
            self._authenticate(request)
        except errors.GatewayError as err:
            return err.response()
        data = [_model_object(entry) for entry in self._router.table.names(listed_only=True)]
        return web.json_response({"object": "list", "data": data})

    async def get_model(self, request: web.Request) -> web.Response:
        try:
            self._authenticate(request)
        except errors.GatewayError as err:
            return err.response()
        wanted = request.match_info["model"]
        listed = self._router.table.names(listed_only=True)
        for entry in listed:
            if entry.id == wanted:
                return web.json_response(_model_object(entry))
        return errors.unknown_model(wanted, [entry.id for entry in listed]).response()

    async def forward(self, request: web.Request) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        x = _Exchange(
            endpoint=request.path,
            started=loop.time(),
            request_id=_request_id(request.headers.get(REQUEST_ID)),
        )
        if not self._traced:
            # Tracing off: skip context extraction and attachment on the hot path.
            return await self._answer(request, x, trace.INVALID_SPAN)
        parent = propagate.extract(request.headers)
        with self._tracer.start_as_current_span(
            f"POST {x.endpoint}", context=parent, kind=SpanKind.SERVER
        ) as span:
            return await self._answer(request, x, span)

    async def _answer(self, request: web.Request, x: _Exchange, span: Span) -> web.StreamResponse:
        try:
            response = await self._serve(request, x, span)
        except errors.GatewayError as err:
            x.status = err.status
            response = err.response()
        except asyncio.CancelledError:
            # The client went away (aiohttp cancels the handler).
            x.status = CLIENT_CLOSED
            self._record(x, span)
            raise
        except Exception:
            log.exception("request %s failed inside the gateway", x.request_id)
            error = errors.internal_error()
            x.status = error.status
            response = error.response()
        if not response.prepared:
            response.headers[REQUEST_ID] = x.request_id
            # Send the answer before the bookkeeping (metrics, trace, access log),
            # which is then no part of the client's wait; aiohttp leaves a
            # response that was sent alone.
            try:
                await response.prepare(request)
                await response.write_eof()
            except ConnectionResetError:
                x.status = CLIENT_CLOSED
            except asyncio.CancelledError:
                x.status = CLIENT_CLOSED
                self._record(x, span)
                raise
        self._record(x, span)
        return response

    # -- one request ---------------------------------------------------------------

    async def _serve(self, request: web.Request, x: _Exchange, span: Span) -> web.StreamResponse:
        x.key = self._authenticate(request) or NO_LABEL
        body = await self._read_body(request)
        payload = await self._parse(body)
        requested = payload.get("model")
        if not isinstance(requested, str) or not requested:
            raise errors.bad_request(
                "The request must name a model in its `model` field.", "missing_model", "model"
            )
        stream = payload.get("stream") is True
        try:
            gate = self._router.resolve(requested)
        except AmbiguousModelError as exc:
            raise errors.ambiguous_model(requested, exc.candidates) from None
        except UnknownModelError as exc:
            raise errors.unknown_model(requested, exc.candidates) from None
        x.model = gate.key
        # Counted once per client request, before it waits: what /demand reports.
        gate.requests += 1
        span.set_attribute("gen_ai.request.model", requested)
        span.set_attribute("mesh.model", gate.key)
        span.set_attribute("mesh.stream", stream)

        loop = asyncio.get_running_loop()
        deadline = x.started + self._settings.hold_timeout
        affinity = self._router.affinity(request.path, payload)
        failures = 0
        while True:
            waited_from = loop.time()
            try:
                backend = await gate.acquire(deadline, affinity)
            except HoldTimeoutError as exc:
                waited = loop.time() - x.started
                retry_after = self._settings.retry_after
                raise (
                    errors.not_ready(requested, waited, retry_after)
                    if exc.not_ready
                    else errors.busy(requested, waited, retry_after)
                ) from None
            except QueueFullError:
                raise errors.queue_full(requested, self._settings.retry_after) from None
            except ModelGoneError:
                raise errors.model_gone(requested) from None
            finally:
                x.queue_wait += loop.time() - waited_from
            x.attempts += 1
            x.host = backend.url
            try:
                return await self._send(
                    request, gate=gate, backend=backend, body=body, stream=stream, x=x
                )
            except _RetryableError as retry:
                # The preferred host just failed this request: the next send goes
                # to the least busy host, as without prefix routing.
                affinity = None
                self._metrics.retries.labels(gate.key, retry.reason).inc()
                self._metrics.upstream_errors.labels(gate.key, retry.reason).inc()
                if retry.host_down:
                    self._router.mark_down(gate, backend)
                if retry.counts:
                    failures += 1
                    if failures >= self._settings.max_attempts:
                        log.warning(
                            "request %s to %s failed %d times, giving up: %s",
                            x.request_id,
                            gate.key,
                            failures,
                            retry.detail,
                        )
                        raise errors.upstream_failed(requested, retry.detail) from None
                log.info(
                    "request %s to %s via %s failed before any byte was sent (%s); retrying",
                    x.request_id,
                    gate.key,
                    backend.url,
                    retry.detail,
                )
            finally:
                gate.release(backend)

    async def _send(
        self,
        request: web.Request,
        *,
        gate: ModelGate,
        backend: Backend,
        body: bytes,
        stream: bool,
        x: _Exchange,
    ) -> web.StreamResponse:
        headers = {"Content-Type": "application/json"}
        accept = request.headers.get("Accept")
        if accept:
            headers["Accept"] = accept
        if gate.record.upstream_api_key:
            headers["Authorization"] = f"Bearer {gate.record.upstream_api_key}"
        try:
            async with _unless_retired(backend):
                answer = await self._client.send(
                    backend.url, request.path_qs, body, headers, stream=stream
                )
        except upstream.ConnectError as exc:
            raise _RetryableError("connect", str(exc), counts=False, host_down=True) from None
        except upstream.ReadTimeoutError:
            raise self._timed_out(gate, x) from None
        except upstream.UpstreamError as exc:
            raise _disconnected(exc) from None
        try:
            _refuse_loading(answer.status)
            if stream and answer.status == 200 and answer.content_type == EVENT_STREAM:
                return await self._relay(request, answer=answer, gate=gate, backend=backend, x=x)
            return await self._answer_body(
                request,
                status=answer.status,
                content_type=answer.headers.get("content-type"),
                content_length=answer.content_length,
                chunks=answer.chunks(),
                gate=gate,
                backend=backend,
                x=x,
            )
        finally:
            # Read whole: back to the pool (or closed, after a stream). Otherwise
            # aborted, which is what tells llama-server to stop working on it.
            answer.close()

    async def _answer_body(
        self,
        request: web.Request,
        *,
        status: int,
        content_type: str | None,
        content_length: int | None,
        chunks: AsyncIterator[bytes],
        gate: ModelGate,
        backend: Backend,
        x: _Exchange,
    ) -> web.StreamResponse:
        """A non-streamed answer: held whole so a failure can still be retried,
        unless it is larger than `BUFFERED_ANSWER_BYTES` (a big embeddings batch),
        which is then passed on as it comes rather than held in memory."""
        parts: list[bytes] = []

        async def read_head() -> int:
            size = 0
            async for chunk in chunks:
                parts.append(chunk)
                size += len(chunk)
                if size > BUFFERED_ANSWER_BYTES:
                    break
            return size

        try:
            async with _unless_retired(backend):
                size = await read_head()
        except upstream.ReadTimeoutError:
            raise self._timed_out(gate, x) from None
        except upstream.UpstreamError as exc:
            raise _disconnected(exc) from None
        head = b"".join(parts)
        x.status = status
        if status == 200:
            # Usage comes last in a completion, first in embeddings: scan both
            # ends of a large answer, not megabytes of it on the event loop.
            scanned = (
                head
                if len(head) <= 2 * USAGE_SCAN_BYTES
                else head[:USAGE_SCAN_BYTES] + b"," + head[-USAGE_SCAN_BYTES:]
            )
            x.usage = usage_in(scanned)
        headers = {
            "Content-Type": content_type or "application/json",
            REQUEST_ID: x.request_id,
        }
        if size <= BUFFERED_ANSWER_BYTES:
            return web.Response(status=status, body=head, headers=headers)
        response = web.StreamResponse(status=status, headers=headers)
        if content_length is not None:
            response.content_length = content_length
        await response.prepare(request)
        await response.write(head)
        tail = head[-USAGE_SCAN_BYTES:]
        try:
            async for chunk in chunks:
                await response.write(chunk)
                tail = (tail + chunk)[-USAGE_SCAN_BYTES:]
        except upstream.UpstreamError as exc:
            # Too late to retry: the client gets a short body and a closed connection.
            self._metrics.upstream_errors.labels(gate.key, "stream_broken").inc()
            x.status = 502
            log.warning("request %s: answer cut after %d bytes: %s", x.request_id, size, exc)
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        if x.status == 200 and x.usage is None:
            x.usage = usage_in(tail)
        return response

    async def _relay(
        self,
        request: web.Request,
        *,
        answer: upstream.HostAnswer,
        gate: ModelGate,
        backend: Backend,
        x: _Exchange,
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        try:
            async with _unless_retired(backend):
                first = await answer.read()
        except upstream.ReadTimeoutError:
            raise self._timed_out(gate, x) from None
        except upstream.UpstreamError as exc:
            raise _disconnected(exc) from None

        response = _RelayedStream(
            status=200,
            headers={
                "Content-Type": answer.headers.get("content-type", EVENT_STREAM),
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                REQUEST_ID: x.request_id,
            },
        )
        x.status = 200
        itl = self._metrics.itl.labels(gate.key)
        scanner = EventScanner()
        try:
            await response.prepare(request)
            now = loop.time()
            self._metrics.ttft.labels(gate.key).observe(now - x.started)
            last_event = now if scanner.feed(first) else None
            if answer.at_eof:
                # The whole stream came at once: headers, events and the end in one send.
                await response.write_eof(first)
            else:
                await response.write(first)
            while not answer.at_eof:
                try:
                    chunk = await answer.read()
                except upstream.UpstreamError as exc:
                    # Bytes already reached the client: no retry. End the stream
                    # with an error event so the client knows it was cut short.
                    self._metrics.upstream_errors.labels(gate.key, "stream_broken").inc()
                    self._router.mark_down(gate, backend)
                    x.status = 502
                    error = errors.upstream_failed(x.model, f"stream cut: {_describe(exc)}")
                    await response.write(b"data: " + json.dumps(error.body()).encode() + b"\n\n")
                    break
                if not chunk:
                    break
                events = scanner.feed(chunk)
                if events:
                    now = loop.time()
                    if last_event is not None:
                        itl.observe(now - last_event)
                    for _ in range(events - 1):
                        itl.observe(0.0)
                    last_event = now
                if answer.at_eof:
                    # The host's stream ended with this chunk: end the client's
                    # in the same send rather than in one more.
                    await response.write_eof(chunk)
                else:
                    await response.write(chunk)
            await response.write_eof()
        except ConnectionResetError:
            # The client went away: drop the upstream connection so llama-server
            # frees the slot instead of generating for nobody.
            answer.close()
            x.status = CLIENT_CLOSED
        except asyncio.CancelledError:
            answer.close()
            x.status = CLIENT_CLOSED
            raise
        finally:
            x.usage = scanner.usage()
        return response

    # -- helpers -------------------------------------------------------------------

    def _timed_out(self, gate: ModelGate, x: _Exchange) -> errors.GatewayError:
        """The host stayed silent past the read timeout: counted, and not retried."""
        self._metrics.upstream_errors.labels(gate.key, "timeout").inc()
        return errors.upstream_failed(x.model, "no answer within the read timeout")

    def _authenticate(self, request: web.Request) -> str | None:
        if self._keys is None:
            return None
        name = self._keys.identify(request.headers.get("Authorization"))
        if name is None:
            raise errors.unauthorized()
        return name

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self._settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise errors.body_too_large(limit)
        parts: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_chunked(READ_CHUNK):
            size += len(chunk)
            if size > limit:
                raise errors.body_too_large(limit)
            parts.append(chunk)
        return b"".join(parts)

    async def _parse(self, body: bytes) -> dict[str, Any]:
        if not body:
            raise errors.bad_request(
                "The request body is empty; send a JSON object.", "invalid_json"
            )
        try:
            if len(body) > PARSE_IN_THREAD_BYTES:
                payload = await asyncio.to_thread(json.loads, body)
            else:
                payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise errors.bad_request(
                f"The body is not valid JSON: {exc}.", "invalid_json"
            ) from None
        if not isinstance(payload, dict):
            raise errors.bad_request("The body must be a JSON object.", "invalid_json")
        return payload

    def _record(self, x: _Exchange, span: Span) -> None:
        loop = asyncio.get_running_loop()
        elapsed = loop.time() - x.started
        status = str(x.status)
        m = self._metrics
        m.requests.labels(x.model, x.endpoint, status).inc()
        m.duration.labels(x.model, x.endpoint).observe(elapsed)
        if x.attempts:
            m.queue_wait.labels(x.model).observe(x.queue_wait)
        if self._keys is not None:
            m.key_requests.labels(x.key, x.model, status).inc()
        if x.usage is not None:
            m.count_usage(x.model, x.key, x.usage, x.host)
        if self._traced:
            self._annotate(x, span)
        if self._settings.access_log:
            log.info(
                "%s %s model=%s key=%s status=%d host=%s attempts=%d wait=%.3fs time=%.3fs",
                x.request_id,
                x.endpoint,
                x.model,
                x.key,
                x.status,
                x.host or "-",
                x.attempts,
                x.queue_wait,
                elapsed,
            )

    @staticmethod
    def _annotate(x: _Exchange, span: Span) -> None:
        if x.usage is not None:
            span.set_attribute("gen_ai.usage.input_tokens", x.usage.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", x.usage.completion_tokens)
        span.set_attribute("http.response.status_code", x.status)
        span.set_attribute("mesh.queue_wait_ms", round(x.queue_wait * 1000, 3))
        span.set_attribute("mesh.attempts", x.attempts)
        span.set_attribute("mesh.request_id", x.request_id)
        if x.host:
            parts = urlsplit(x.host)
            span.set_attribute("server.address", parts.hostname or x.host)
            if parts.port:
                span.set_attribute("server.port", parts.port)
        if x.status >= 500:
            span.set_status(Status(StatusCode.ERROR))


def _request_id(given: str | None) -> str:
    """The client's request id if it is a sane token (it goes into logs), else a new one."""
    sane = (
        given is not None
        and 0 < len(given) <= MAX_REQUEST_ID
        and given.isascii()
        and given.isprintable()
        and " " not in given
    )
    return given if sane and given is not None else uuid.uuid4().hex


class _RelayedStream(web.StreamResponse):
    """A relayed stream whose headers leave with its first chunk, in one send.

    aiohttp sends a prepared StreamResponse's headers at once by default (its
    `web.Response` holds them for the body); the relay prepares only once the
    host's first chunk is in hand, so holding them costs nothing and saves the
    client a wake-up and the gateway a system call on every stream.
    """

    _send_headers_immediately = False


@contextlib.asynccontextmanager
async def _unless_retired(backend: Backend) -> AsyncIterator[None]:
    """Give up the awaits inside when discovery retires `backend`.

    Used only while nothing has reached the client: a host whose node was lost
    (a cut link, a partition) may hold the connection open and never answer, and
    its replacement is already known, so the request is sent again there. The
    awaits run in the request's own task (a second task would change when the
    answer's first bytes are read), which the retirement cancels.
    """
    task = asyncio.current_task()
    assert task is not None
    abandoned = False

    def abandon() -> None:
        nonlocal abandoned
        abandoned = True
        task.cancel()

    if backend.removed:
        raise _retired()
    backend.on_retire.add(abandon)
    try:
        yield
    except asyncio.CancelledError:
        if abandoned and task.uncancel() == 0:
            raise _retired() from None
        raise
    finally:
        backend.on_retire.discard(abandon)


def _retired() -> _RetryableError:
    return _RetryableError(
        "retired",
        "the host was removed while its answer was awaited",
        counts=False,
        host_down=False,
    )


def _refuse_loading(status: int) -> None:
    """llama-server answers 503 while it loads the model: try another host."""
    if status == web.HTTPServiceUnavailable.status_code:
        raise _RetryableError("unavailable", "host answered 503", counts=False, host_down=True)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _disconnected(exc: BaseException) -> _RetryableError:
    """The host broke the exchange before the client saw a byte: worth another send."""
    return _RetryableError("disconnected", _describe(exc), counts=True, host_down=False)


def _model_object(entry: Listed) -> dict[str, Any]:
    """One model in OpenAI's `/v1/models` shape."""
    return {"id": entry.id, "object": "model", "created": entry.created, "owned_by": entry.owned_by}


def error_middleware() -> Any:
    """Answer unknown paths and methods in OpenAI's shape instead of aiohttp's text."""

    @web.middleware
    async def openai_errors(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            response: web.StreamResponse = await handler(request)
        except web.HTTPNotFound:
            return errors.not_found(request.path).response()
        except web.HTTPMethodNotAllowed:
            return errors.method_not_allowed(request.method, request.path).response()
        return response

    return openai_errors
