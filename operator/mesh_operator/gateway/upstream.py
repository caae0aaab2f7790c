"""Requests to hosts, on the gateway's own HTTP/1.1 connections.

A small client of the gateway's own: it writes each request itself, reads the
answer with its own parser (status line, headers, a chunked, sized or
until-close body), keeps one read-timeout timer per connection rather than one
re-armed on every read, and keeps connections open between requests in one
pool per host. Through aiohttp's client, its machinery per request and per
chunk was most of what the gateway cost.

- **Non-streamed requests** are kept alive: a connection whose answer was read
  whole goes back to the pool for the next request.
- **Streamed requests** ask for `Connection: close`: llama-server (cpp-httplib)
  closes the connection after every streamed answer anyway, while announcing
  keep-alive. So that the next stream need not connect, a spare connection to
  the same host is opened in the background once a stream is over (not while
  its answer is awaited on the same event loop), if the pool has none.

A connection idle for `IDLE` seconds is closed and not replaced: cpp-httplib
drops a connection on which no request came within 5 s, and an idle host then
holds no connection of the gateway's. (The pinned llama-server runs `-np` + 4
HTTP threads, and more on demand, so idle connections take nothing from its
health probes.) A request sent on a kept connection that the host had closed
meanwhile (no byte came back) is sent once more on a new connection.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver

# An idle connection is closed after this long (cpp-httplib's keep-alive timeout: 5 s).
IDLE = 4.0
# An answer's status line and headers beyond this are refused.
MAX_HEAD_BYTES = 64 * 1024
# Decoded bytes held for a reader that does not keep up, before reading pauses.
HIGH_WATER = 256 * 1024

_HEAD, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _SIZED, _UNTIL_CLOSE, _DONE = range(8)


class UpstreamError(Exception):
    """A streamed exchange with a host failed."""


class ConnectError(UpstreamError):
    """The host could not be reached: nothing was sent."""


class BrokenError(UpstreamError):
    """The host was reached and the exchange broke."""


class ReadTimeoutError(UpstreamError):
    """The host stayed silent for longer than the read timeout."""


class _ClosedUnusedError(BrokenError):
    """The connection closed before any byte of the answer came."""


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class HostAnswer(asyncio.Protocol):
    """One connection to a host, and the answer being read on it.

    `head()` waits for the status line and headers (`status`, `headers` with
    lower-cased names); `read()` gives what arrived of the body since the last
    read, without its chunked framing, and b"" at its end; `close()` ends the
    exchange: a connection whose answer is complete may go back to its client's
    pool, any other is dropped, which tells llama-server to stop generating.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float) -> None:
        self._loop = loop
        self._read_timeout = read_timeout
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._state = _HEAD
        self._remaining = 0
        self._pieces: collections.deque[bytes] = collections.deque()
        self._pending = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: UpstreamError | None = None
        self._sent = False
        self._received = False
        self._lost = False
        self._activity = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._keep_alive = False
        self._close_asked = False
        # Called once when the exchange is closed; True: the client keeps the
        # connection for another request.
        self.on_close: Callable[[HostAnswer], bool] | None = None
        self.status = 0
        self.headers: dict[str, str] = {}

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream connection's transport (create_connection): asyncio's is an
        # asyncio.Transport, other loops' (uvloop's) only behave as one.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self._sent:
            # Nothing was asked on this connection: a host talking first is broken.
            self._fail(BrokenError("the host sent data before any request"))
            return
        self._received = True
        self._activity = self._loop.time()
        self._buf += data
        try:
            if self._state == _HEAD:
                self._read_head()
                if self._state == _HEAD:
                    return
            if self._state in (_SIZED, _UNTIL_CLOSE):
                self._read_plain()
            elif self._state != _DONE:
                self._read_chunked()
        except BrokenError as exc:
            self._fail(exc)

    def eof_received(self) -> bool:
        self._ended(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._ended(exc)
        self._cancel_timer()

    # -- what the proxy uses -------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Open, and nothing asked or received on it yet (a spare)."""
        transport = self._transport
        return (
            not self._sent
            and not self._lost
            and self._error is None
            and transport is not None
            and not transport.is_closing()
        )

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        return int(value) if value is not None and value.isdigit() else None

    @property
    def complete(self) -> bool:
        """The whole body has arrived (read or not)."""
        return self._state == _DONE

    @property
    def at_eof(self) -> bool:
        """The whole body has arrived and been read."""
        return self._state == _DONE and not self._pieces

    def send(self, request: bytes, *, close: bool) -> None:
        """Write `request`; `close`: it asks the host to close the connection after it."""
        assert self._transport is not None
        self._sent = True
        self._close_asked = close
        self._activity = self._loop.time()
        self._cancel_timer()
        self._arm_timer()
        self._transport.write(request)

    async def head(self) -> None:
        while self._state == _HEAD:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def read(self) -> bytes:
        while not self._pieces:
            if self._state == _DONE:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait()
        data = self._pieces.popleft() if len(self._pieces) == 1 else b"".join(self._pieces)
        self._pieces.clear()
        self._pending = 0
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return data

    async def chunks(self) -> AsyncIterator[bytes]:
        while chunk := await self.read():
            yield chunk

    @property
    def reusable(self) -> bool:
        """The answer was read whole and the host keeps the connection open."""
        transport = self._transport
        return (
            self._state == _DONE
            and self._error is None
            and not self._pieces
            and not self._buf
            and not self._lost
            and transport is not None
            and not transport.is_closing()
            and self._keep_alive
            and not self._close_asked
        )

    def reset(self) -> None:
        """Ready for the next request on this connection (`reusable` first)."""
        self._state = _HEAD
        self._sent = False
        self._received = False
        self._keep_alive = False
        self.status = 0
        self.headers = {}

    def close(self) -> None:
        """End the exchange: the connection goes back to the client's pool if
        reusable, else it is closed (aborted unless the answer is complete)."""
        self._cancel_timer()
        on_close, self.on_close = self.on_close, None
        if on_close is not None and on_close(self):
            return
        transport = self._transport
        if transport is not None and not transport.is_closing():
            if self._state == _DONE:
                transport.close()
            else:
                transport.abort()

    # -- parsing -------------------------------------------------------------------

    def _read_head(self) -> None:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_HEAD_BYTES:
                raise BrokenError(f"the answer's head is over {MAX_HEAD_BYTES} bytes")
            return
        lines = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
        del self._buf[: end + 4]
        status = lines[0].split(" ", 2)
        if len(status) < 2 or not status[0].startswith("HTTP/1.") or not status[1].isdigit():
            raise BrokenError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise BrokenError(f"malformed header line: {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
        self.status = int(status[1])
        self.headers = headers
        self._keep_alive = status[0] == "HTTP/1.1" and (
            headers.get("connection", "").lower() != "close"
        )
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._state = _CHUNK_SIZE
        elif self.content_length is not None:
            self._remaining = self.content_length
            self._state = _SIZED
            if not self._remaining:
                self._finish()
        else:
            self._state = _UNTIL_CLOSE
        self._wake()

    def _read_plain(self) -> None:
        data = bytes(self._buf)
        self._buf.clear()
        if self._state == _SIZED:
            if len(data) > self._remaining:
                raise BrokenError("the host sent more than the answer's Content-Length")
            self._remaining -= len(data)
        if data:
            self._push(data)
        if self._state == _SIZED and not self._remaining:
            self._finish()

    def _read_chunked(self) -> None:
        buf = self._buf
        pos = 0
        out: list[bytes] = []
        while self._state != _DONE:
            if self._state == _CHUNK_DATA:
                take = min(len(buf) - pos, self._remaining)
                if not take:
                    break
                out.append(bytes(buf[pos : pos + take]))
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _CHUNK_END
                continue
            if self._state == _CHUNK_END:
                if len(buf) - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise BrokenError("a chunk of the answer does not end with CRLF")
                pos += 2
                self._state = _CHUNK_SIZE
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                if len(buf) - pos > MAX_HEAD_BYTES:
                    raise BrokenError("a chunk size line of the answer is too long")
                break
            line = bytes(buf[pos:eol])
            pos = eol + 2
            if self._state == _TRAILERS:
                if not line:
                    self._state = _DONE
                continue
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise BrokenError(f"bad chunk size {size_text[:20]!r} in the answer") from None
            if size:
                self._remaining = size
                self._state = _CHUNK_DATA
            else:
                self._state = _TRAILERS
        del buf[:pos]
        if out:
            self._push(out[0] if len(out) == 1 else b"".join(out))
        if self._state == _DONE:
            self._finish()

    # -- state ---------------------------------------------------------------------

    def _finish(self) -> None:
        """The whole answer has arrived."""
        self._state = _DONE
        self._cancel_timer()
        self._wake()

    def _push(self, data: bytes) -> None:
        self._pieces.append(data)
        self._pending += len(data)
        if self._pending > HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def _ended(self, exc: BaseException | None) -> None:
        """The host closed (or lost) the connection."""
        if self._state == _DONE or self._error is not None:
            return
        if self._state == _UNTIL_CLOSE:
            self._finish()
            return
        if not self._received:
            error: UpstreamError = _ClosedUnusedError("the host closed the connection unanswered")
        elif self._state == _HEAD:
            error = BrokenError("the host closed the connection in the answer's head")
        else:
            error = BrokenError("the host closed the connection before the answer's end")
        if exc is not None:
            error = type(error)(f"{error}: {_describe(exc)}")
        self._fail(error)

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None and self._state != _DONE:
            self._error = error
        self._cancel_timer()
        if self._transport is not None:
            self._transport.abort()
        self._wake()

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the read timeout: one timer per connection, not one per read --------------

    def _arm_timer(self) -> None:
        self._timer = self._loop.call_at(self._activity + self._read_timeout, self._check_timer)

    def _check_timer(self) -> None:
        self._timer = None
        if self._state == _DONE or self._error is not None:
            return
        if self._paused:
            # The reader is the slow side, not the host.
            self._activity = self._loop.time()
        if self._loop.time() - self._activity >= self._read_timeout:
            self._fail(ReadTimeoutError(f"no answer for {self._read_timeout:g} s"))
            return
        self._arm_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


@dataclass
class _Idle:
    answer: HostAnswer
    expiry: asyncio.TimerHandle


_Key = tuple[str, str, int]


def _key_of(url: str) -> _Key:
    """A host's pool: (scheme, host, port) of its URL."""
    parts = urlsplit(url)
    scheme = parts.scheme or "http"
    return scheme, parts.hostname or "", parts.port or (443 if scheme == "https" else 80)


def request_bytes(
    netloc: str, path: str, body: bytes, headers: Mapping[str, str], *, close: bool
) -> bytes:
    """A POST with `body`; `close`: asking the host to close the connection after it."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {netloc}", f"Content-Length: {len(body)}"]
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"header {name!r} has a line break")
        lines.append(f"{name}: {value}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class HostClient:
    """Sends requests to hosts; keeps idle connections, one pool per host."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        resolver: AbstractResolver | None = None,
        idle: float = IDLE,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._resolver = resolver
        self._idle_seconds = idle
        # Idle connections by host, the most recently used last.
        self._idle: dict[_Key, list[_Idle]] = {}
        self._opening: set[_Key] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ssl: ssl.SSLContext | None = None
        self._closed = False
        # How many requests found an open connection, and how many had to connect.
        self.reused = 0
        self.connects = 0

    async def send(
        self, url: str, path: str, body: bytes, headers: Mapping[str, str], *, stream: bool
    ) -> HostAnswer:
        """Send the request to the host at `url` and wait for the answer's head;
        `stream`: a streamed request, whose connection the host closes after it.

        Raises ConnectError (nothing sent), BrokenError or ReadTimeoutError.
        """
        key = _key_of(url)
        netloc = urlsplit(url).netloc.rsplit("@", 1)[-1]
        request = request_bytes(netloc, path, body, headers, close=stream)
        while (kept := self._take(key)) is not None:
            self.reused += 1
            try:
                return await self._exchange(kept, request, key, close=stream)
            except _ClosedUnusedError:
                continue  # closed by the host while it was idle: the next, or a new one
        answer = await self._connect(key)
        self.connects += 1
        return await self._exchange(answer, request, key, close=stream)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for pool in self._idle.values():
            for idle in pool:
                idle.expiry.cancel()
                idle.answer.close()
        self._idle.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def idle_count(self, url: str | None = None) -> int:
        """Idle connections (to the host at `url`, if given)."""
        if url is None:
            return sum(len(pool) for pool in self._idle.values())
        return len(self._idle.get(_key_of(url), ()))

    # -- internals -----------------------------------------------------------------

    async def _exchange(
        self, answer: HostAnswer, request: bytes, key: _Key, *, close: bool
    ) -> HostAnswer:
        try:
            answer.send(request, close=close)
            await answer.head()
        except BaseException:
            answer.close()
            raise
        answer.on_close = lambda done: self._done(key, done)
        return answer

    def _done(self, key: _Key, answer: HostAnswer) -> bool:
        """An exchange is over: keep its connection if it can serve another
        request (True); otherwise make sure a spare will be waiting."""
        if not self._closed and answer.reusable:
            answer.reset()
            self._keep(key, answer)
            return True
        # Opened once this exchange is over, not while its answer was awaited
        # on the same event loop.
        self._refill(key)
        return False

    def _keep(self, key: _Key, answer: HostAnswer) -> None:
        loop = asyncio.get_running_loop()
        expiry = loop.call_later(self._idle_seconds, self._expire, key, answer)
        self._idle.setdefault(key, []).append(_Idle(answer, expiry))

    def _take(self, key: _Key) -> HostAnswer | None:
        pool = self._idle.get(key)
        while pool:
            idle = pool.pop()
            idle.expiry.cancel()
            if idle.answer.usable:
                return idle.answer
            idle.answer.close()
        return None

    def _refill(self, key: _Key) -> None:
        if self._closed or self._idle.get(key) or key in self._opening:
            return
        self._opening.add(key)
        task = asyncio.get_running_loop().create_task(self._open_spare(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open_spare(self, key: _Key) -> None:
        try:
            answer = await self._connect(key)
        except ConnectError:
            return  # the next request finds out and reports it
        finally:
            self._opening.discard(key)
        if self._closed:
            answer.close()
            return
        self._keep(key, answer)

    def _expire(self, key: _Key, answer: HostAnswer) -> None:
        pool = self._idle.get(key, [])
        for index, idle in enumerate(pool):
            if idle.answer is answer:
                del pool[index]
                answer.close()
                break
        if not pool:
            self._idle.pop(key, None)

    async def _connect(self, key: _Key) -> HostAnswer:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        tls = self._tls() if scheme == "https" else None
        try:
            async with asyncio.timeout(self._connect_timeout):
                address = await self._address(host, port)
                _, answer = await loop.create_connection(
                    lambda: HostAnswer(loop, self._read_timeout),
                    address,
                    port,
                    ssl=tls,
                    server_hostname=host if tls is not None else None,
                )
        except (OSError, TimeoutError) as exc:
            raise ConnectError(f"cannot connect to {host}:{port}: {_describe(exc)}") from None
        return answer

    async def _address(self, host: str, port: int) -> str:
        if self._resolver is None:
            return host  # the loop resolves it (getaddrinfo in a thread)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return host
        found = await self._resolver.resolve(host, port, family=socket.AF_UNSPEC)
        if not found:
            raise OSError(f"{host} has no address")
        return str(found[0]["host"])

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl
