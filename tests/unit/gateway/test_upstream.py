"""The gateway's own client for streamed requests, against scripted loopback servers.

Each server here is a real socket on 127.0.0.1 that answers bytes written by the
test, so framing (chunked, sized, until close), spare connections, a spare the
host closed, the read timeout and broken answers are checked on real
connections. The same client in front of real llama-server processes is
exercised by tests/integration/test_gateway_llama.py.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from mesh_operator.gateway import upstream
from mesh_operator.gateway.upstream import HostClient, request_bytes
from tests.unit.gateway.fakes import run, wait_for

pytestmark = pytest.mark.unit

EVENTS = [b'data: {"n": %d}\n\n' % i for i in range(12)] + [b"data: [DONE]\n\n"]
BODY = b"".join(EVENTS)


def chunked(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    b"Transfer-Encoding: chunked\r\nKeep-Alive: timeout=5, max=100\r\n\r\n"
)
STREAM_ANSWER = STREAM_HEAD + chunked(EVENTS)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A loopback server that runs `make(server)`'s handler on each connection."""

    def __init__(self, make: Callable[[Server], Handler]) -> None:
        self.handler = make(self)
        self.accepted = 0
        self.requests: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request


@asynccontextmanager
async def host(make: Callable[[Server], Handler]) -> AsyncIterator[Server]:
    server = Server(make)
    server._server = await asyncio.start_server(server._serve, "127.0.0.1", 0)
    server.port = server._server.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        server._server.close()
        await server._server.wait_closed()


@asynccontextmanager
async def client(read_timeout: float = 10.0, idle: float = 4.0) -> AsyncIterator[HostClient]:
    streams = HostClient(connect_timeout=2.0, read_timeout=read_timeout, idle=idle)
    try:
        yield streams
    finally:
        await streams.close()


def answering(answer: bytes, pieces: int = 1, seed: int = 0) -> Callable[[Server], Handler]:
    """A handler that reads one request and writes `answer` in `pieces` random cuts."""

    def make(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            rng = random.Random(seed)
            cuts = sorted(rng.sample(range(1, len(answer)), pieces - 1)) if pieces > 1 else []
            start = 0
            for cut in [*cuts, len(answer)]:
                writer.write(answer[start:cut])
                await writer.drain()
                await asyncio.sleep(0)
                start = cut

        return handle

    return make


async def body_of(answer: upstream.HostAnswer) -> bytes:
    return b"".join([chunk async for chunk in answer.chunks()])


@pytest.mark.parametrize("pieces", [1, 3, 17, len(STREAM_ANSWER)])
def test_a_chunked_stream_is_read_whatever_the_cuts(pieces: int) -> None:
    """However the host's bytes are cut into reads (down to one byte a read), the
    body comes out whole and unframed, with the status and headers."""

    async def scenario() -> None:
        async with host(answering(STREAM_ANSWER, pieces, seed=pieces)) as server, client() as c:
            answer = await c.send(server.url, "/v1/chat/completions", b"{}", {}, stream=True)
            assert answer.status == 200
            assert answer.content_type == "text/event-stream"
            assert await body_of(answer) == BODY
            assert answer.at_eof
            answer.close()

    run(scenario())


def test_sized_and_until_close_bodies() -> None:
    sized = (
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n"
    )
    until_close = b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n\r\n"

    async def scenario() -> None:
        async with host(answering(sized + b'{"e":1}', 4)) as server, client() as c:
            answer = await c.send(server.url, "/v1/completions", b"{}", {}, stream=True)
            assert (answer.status, answer.content_length) == (400, 7)
            assert await body_of(answer) == b'{"e":1}'
            answer.close()
        async with host(answering(until_close + b"oops, all of it", 3)) as server, client() as c:
            answer = await c.send(server.url, "/v1/completions", b"{}", {}, stream=True)
            assert answer.status == 500
            assert answer.content_length is None
            assert await body_of(answer) == b"oops, all of it"

    run(scenario())


def test_a_streamed_request_asks_to_close_and_a_whole_one_does_not() -> None:
    async def scenario() -> None:
        headers = {"Content-Type": "application/json", "Authorization": "Bearer k"}
        path = "/v1/chat/completions?x=1"
        async with host(answering(STREAM_ANSWER)) as server, client() as c:
            answer = await c.send(server.url, path, b'{"a": 1}', headers, stream=True)
            await body_of(answer)
            answer.close()
            netloc = f"127.0.0.1:{server.port}"
            assert server.requests == [
                request_bytes(netloc, path, b'{"a": 1}', headers, close=True)
            ]
        request = server.requests[0]
        assert request.startswith(b"POST /v1/chat/completions?x=1 HTTP/1.1\r\n")
        assert b"\r\nConnection: close\r\n" in request
        assert b"\r\nContent-Length: 8\r\n" in request
        assert request.endswith(b'\r\n\r\n{"a": 1}')
        whole = request_bytes("h:1", "/v1/completions", b"{}", headers, close=False)
        assert b"Connection:" not in whole

    run(scenario())


SIZED = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


def keeping(answer: bytes) -> Callable[[Server], Handler]:
    """A handler that answers every request on its connection with `answer`."""

    def make(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while not reader.at_eof():
                try:
                    await server.read_request(reader)
                except asyncio.IncompleteReadError:
                    return
                writer.write(answer)
                await writer.drain()

        return handle

    return make


def test_whole_answers_reuse_one_connection() -> None:
    async def scenario() -> None:
        async with host(keeping(SIZED)) as server, client() as c:
            for _ in range(4):
                answer = await c.send(server.url, "/v1/completions", b"{}", {}, stream=False)
                assert await body_of(answer) == b"{}"
                answer.close()
                assert c.idle_count(server.url) == 1
            assert (server.accepted, len(server.requests)) == (1, 4)
            assert (c.connects, c.reused) == (1, 3)

    run(scenario())


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n",
    ],
)
def test_an_answer_that_closes_is_not_reused(head: bytes) -> None:
    async def scenario() -> None:
        async with host(keeping(head + b"{}")) as server, client() as c:
            for _ in range(2):
                answer = await c.send(server.url, "/v1/completions", b"{}", {}, stream=False)
                assert await body_of(answer) == b"{}"
                answer.close()
                # The spare opened instead is the next request's.
                await wait_for(lambda: c.idle_count() == 1)
            assert server.accepted == 3
            assert c.connects == 1

    run(scenario())


def test_an_answer_left_unread_is_not_reused() -> None:
    """A client gone mid-answer: the connection is dropped, not handed on."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n"

    def make(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while not reader.at_eof():
                await server.read_request(reader)
                writer.write(head + b"x" * 10)
                await writer.drain()
                await asyncio.sleep(0.2)
                writer.write(b"x" * 10)
                await writer.drain()

        return handle

    async def scenario() -> None:
        async with host(make) as server, client() as c:
            answer = await c.send(server.url, "/v1/embeddings", b"{}", {}, stream=False)
            assert await answer.read() == b"x" * 10
            answer.close()
            await wait_for(lambda: c.idle_count() == 1)  # a spare, not this one
            answer = await c.send(server.url, "/v1/embeddings", b"{}", {}, stream=False)
            assert await body_of(answer) == b"x" * 20
            answer.close()
            assert server.accepted == 2

    run(scenario())


def test_an_idle_connection_the_host_closed_is_skipped() -> None:
    """cpp-httplib drops a connection idle for 5 s: the next request goes on a
    new one, without an error."""

    def make(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(SIZED)
            await writer.drain()
            if server.accepted == 1:
                await asyncio.sleep(0.05)
                return  # closes the kept connection while it idles
            await keeping(SIZED)(server)(reader, writer)

        return handle

    async def scenario() -> None:
        async with host(make) as server, client() as c:
            answer = await c.send(server.url, "/v1/completions", b"{}", {}, stream=False)
            assert await body_of(answer) == b"{}"
            answer.close()
            await asyncio.sleep(0.3)
            answer = await c.send(server.url, "/v1/completions", b"{}", {}, stream=False)
            assert await body_of(answer) == b"{}"
            answer.close()
            assert (server.accepted, c.connects) == (2, 2)

    run(scenario())


def test_a_header_with_a_line_break_is_refused() -> None:
    with pytest.raises(ValueError, match="line break"):
        request_bytes("h:1", "/", b"", {"Accept": "text/plain\r\nX-Evil: 1"}, close=False)


def test_the_next_stream_takes_a_spare_opened_after_the_last_one() -> None:
    """After a stream, a spare connection waits for the next one: three streams
    make one connect on their way and find a spare twice."""

    async def scenario() -> None:
        async with host(answering(STREAM_ANSWER)) as server, client() as c:
            for number in range(3):
                answer = await c.send(server.url, "/v1/chat/completions", b"{}", {}, stream=True)
                assert await body_of(answer) == BODY
                answer.close()
                await wait_for(lambda: c.idle_count() == 1)
                assert server.accepted == number + 2
            assert (c.connects, c.reused) == (1, 2)
            assert len(server.requests) == 3

    run(scenario())


def test_an_unused_spare_is_closed_and_not_replaced() -> None:
    closed: list[bool] = []

    def make(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if server.accepted == 1:
                await answering(STREAM_ANSWER)(server)(reader, writer)
                return
            # The spare: nothing is asked, and the gateway closes it.
            closed.append(await reader.read(1) == b"")

        return handle

    async def scenario() -> None:
        async with host(make) as server, client(idle=0.2) as c:
            answer = await c.send(server.url, "/v1/chat/completions", b"{}", {}, stream=True)
            await body_of(answer)
            answer.close()
            await wait_for(lambda: c.idle_count() == 1)
            await wait_for(lambda: closed == [True])
            assert c.idle_count() == 0
            await asyncio.sleep(0.3)
            assert server.accepted == 2

    run(scenario())


def test_a_spare_the_host_closed_unanswered_is_replaced_by_a_new_connection() -> None:
    """The host drops the spare as the request arrives (cpp-httplib's keep-alive
    timeout racing the send): the request goes again on a fresh connection,
    without an error."""

    def make(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if server.accepted == 2:
                await server.read_request(reader)
                return  # closed, unanswered
            await answering(STREAM_ANSWER)(server)(reader, writer)

        return handle

    async def scenario() -> None:
        async with host(make) as server, client() as c:
            for _ in range(2):
                answer = await c.send(server.url, "/v1/chat/completions", b"{}", {}, stream=True)
                assert await body_of(answer) == BODY
                answer.close()
                await wait_for(lambda: c.idle_count() == 1)
            assert (c.connects, c.reused) == (2, 1)
            assert len(server.requests) == 3

    run(scenario())


def test_a_host_closing_a_fresh_connection_unanswered_is_an_error() -> None:
    def make(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)

        return handle

    async def scenario() -> None:
        async with host(make) as server, client() as c:
            with pytest.raises(upstream.BrokenError, match="unanswered"):
                await c.send(server.url, "/v1/chat/completions", b"{}", {}, stream=True)

    run(scenario())


def test_a_refused_connection_is_a_connect_error() -> None:
    async def scenario() -> None:
        async with host(answering(STREAM_ANSWER)) as server:
            url = server.url
        async with client() as c:
            with pytest.raises(upstream.ConnectError, match="cannot connect"):
                await c.send(url, "/v1/chat/completions", b"{}", {}, stream=True)

    run(scenario())


def test_a_host_silent_past_the_read_timeout() -> None:
    """Before the head and between two chunks: the same timeout."""
    first_chunk = STREAM_HEAD + b"%x\r\n%s\r\n" % (len(EVENTS[0]), EVENTS[0])

    def make(stall_after: bytes) -> Callable[[Server], Handler]:
        def build(server: Server) -> Handler:
            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await server.read_request(reader)
                writer.write(stall_after)
                await writer.drain()
                await reader.read(1)  # until the client gives up

            return handle

        return build

    async def scenario() -> None:
        async with host(make(b"")) as server, client(read_timeout=0.2) as c:
            with pytest.raises(upstream.ReadTimeoutError):
                await c.send(server.url, "/v1/chat/completions", b"{}", {}, stream=True)
        async with host(make(first_chunk)) as server, client(read_timeout=0.2) as c:
            answer = await c.send(server.url, "/v1/chat/completions", b"{}", {}, stream=True)
            assert await answer.read() == EVENTS[0]
            with pytest.raises(upstream.ReadTimeoutError):
                await answer.read()

    run(scenario())


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header line"),
        (STREAM_HEAD + b"zz\r\nabc\r\n", "bad chunk size"),
        (STREAM_HEAD + b"3\r\nabcXY", "does not end with CRLF"),
        (STREAM_HEAD + b"5\r\nab", "before the answer's end"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "before the answer's end"),
    ],
)
def test_broken_answers(answer: bytes, match: str) -> None:
    async def scenario() -> None:
        async with host(answering(answer)) as server, client() as c:
            with pytest.raises(upstream.BrokenError, match=match):
                got = await c.send(server.url, "/v1/chat/completions", b"{}", {}, stream=True)
                await body_of(got)

    run(scenario())


def test_an_oversized_head_is_refused() -> None:
    answer = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (upstream.MAX_HEAD_BYTES + 10)

    async def scenario() -> None:
        async with host(answering(answer, 8)) as server, client() as c:
            with pytest.raises(upstream.BrokenError, match="head is over"):
                await c.send(server.url, "/v1/chat/completions", b"{}", {}, stream=True)

    run(scenario())


def test_closing_before_the_end_aborts_the_connection() -> None:
    """What stops llama-server's generation: the host sees the connection reset."""
    seen: list[bytes] = []

    def make(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(STREAM_HEAD + b"%x\r\n%s\r\n" % (len(EVENTS[0]), EVENTS[0]))
            await writer.drain()
            seen.append(await reader.read(1))

        return handle

    async def scenario() -> None:
        async with host(make) as server, client() as c:
            answer = await c.send(server.url, "/v1/chat/completions", b"{}", {}, stream=True)
            assert await answer.read() == EVENTS[0]
            answer.close()
            await wait_for(lambda: seen == [b""])

    run(scenario())
