"""Streamed requests to a host, on the gateway's own HTTP/1.1 connections.

llama-server (cpp-httplib) closes the connection after every streamed answer,
while announcing keep-alive, so every stream needs a new connection. Through
aiohttp's client, the connect and the client's machinery (per stream and per
chunk) were most of what a stream cost the gateway. This client writes the
request itself, reads the answer with a small parser (status line, headers, a
chunked, sized or until-close body), and keeps one spare connection per host,
opened in the background once a stream is over (not while its answer is awaited
on the same event loop), so the next stream need not connect.

A spare that stays unused for `SPARE_IDLE` seconds is closed and not replaced:
cpp-httplib drops a connection on which no request came within 5 s, and an idle
host then holds no connection of the gateway's. (The pinned llama-server runs
`-np` + 4 HTTP threads, and more on demand, so a spare takes nothing from
health probes.) A request sent on a spare that the host had closed meanwhile
(no byte came back) is sent once more on a fresh connection.

Non-streamed requests stay on aiohttp's pooled keep-alive connections, which
llama-server does keep open.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver

# An unused spare is closed after this long (cpp-httplib's keep-alive timeout: 5 s).
SPARE_IDLE = 4.0
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


class StreamAnswer(asyncio.Protocol):
    """One connection carrying one exchange: the request sent, the answer read.

    `head()` waits for the status line and headers (`status`, `headers` with
    lower-cased names); `read()` gives what arrived of the body since the last
    read, without its chunked framing, and b"" at its end; `close()` drops the
    connection, which tells llama-server to stop generating.
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
        # Called once when the exchange is closed (the client opens the next spare).
        self.on_close: Callable[[], None] | None = None
        self.status = 0
        self.headers: dict[str, str] = {}

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

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

    def send(self, request: bytes) -> None:
        assert self._transport is not None
        self._sent = True
        self._activity = self._loop.time()
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

    def close(self) -> None:
        """Drop the connection: aborted unless the answer is complete."""
        self._cancel_timer()
        transport = self._transport
        if transport is not None and not transport.is_closing():
            if self._state == _DONE:
                transport.close()
            else:
                transport.abort()
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()

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
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._state = _CHUNK_SIZE
        elif self.content_length is not None:
            self._remaining = self.content_length
            self._state = _SIZED if self._remaining else _DONE
        else:
            self._state = _UNTIL_CLOSE
        self._wake()

    def _read_plain(self) -> None:
        data = bytes(self._buf)
        self._buf.clear()
        if self._state == _SIZED:
            data = data[: self._remaining]
            self._remaining -= len(data)
            if not self._remaining:
                self._state = _DONE
        if data:
            self._push(data)
        elif self._state == _DONE:
            self._wake()

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
            self._cancel_timer()
            self._wake()

    # -- state ---------------------------------------------------------------------

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
            self._state = _DONE
            self._wake()
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
class _Spare:
    answer: StreamAnswer
    expiry: asyncio.TimerHandle


_Key = tuple[str, str, int]


def request_bytes(netloc: str, path: str, body: bytes, headers: Mapping[str, str]) -> bytes:
    """A POST with `body`, asking the host to close the connection after it."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {netloc}", f"Content-Length: {len(body)}"]
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"header {name!r} has a line break")
        lines.append(f"{name}: {value}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class StreamClient:
    """Sends streamed requests; keeps one spare connection per host."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        resolver: AbstractResolver | None = None,
        spare_idle: float = SPARE_IDLE,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._resolver = resolver
        self._spare_idle = spare_idle
        self._spares: dict[_Key, _Spare] = {}
        self._opening: set[_Key] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ssl: ssl.SSLContext | None = None
        self._closed = False
        # How many streams found a spare waiting, and how many had to connect.
        self.spares_used = 0
        self.connects = 0

    async def send(
        self, url: str, path: str, body: bytes, headers: Mapping[str, str]
    ) -> StreamAnswer:
        """Send the request to the host at `url` and wait for the answer's head.

        Raises ConnectError (nothing sent), BrokenError or ReadTimeoutError.
        """
        parts = urlsplit(url)
        scheme = parts.scheme or "http"
        host = parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        key = (scheme, host, port)
        request = request_bytes(parts.netloc.rsplit("@", 1)[-1], path, body, headers)
        spare = self._take(key)
        if spare is not None:
            self.spares_used += 1
            try:
                return await self._exchange(spare, request, key)
            except _ClosedUnusedError:
                pass  # closed by the host while it waited: once more, on a new one
        answer = await self._connect(key)
        self.connects += 1
        return await self._exchange(answer, request, key)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for spare in self._spares.values():
            spare.expiry.cancel()
            spare.answer.close()
        self._spares.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def spare_count(self) -> int:
        return len(self._spares)

    # -- internals -----------------------------------------------------------------

    async def _exchange(self, answer: StreamAnswer, request: bytes, key: _Key) -> StreamAnswer:
        try:
            answer.send(request)
            await answer.head()
        except BaseException:
            answer.close()
            raise
        # The next spare is opened once this exchange is over, not while its
        # answer is awaited on the same event loop.
        answer.on_close = lambda: self._refill(key)
        return answer

    def _take(self, key: _Key) -> StreamAnswer | None:
        spare = self._spares.pop(key, None)
        if spare is None:
            return None
        spare.expiry.cancel()
        if spare.answer.usable:
            return spare.answer
        spare.answer.close()
        return None

    def _refill(self, key: _Key) -> None:
        if self._closed or key in self._spares or key in self._opening:
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
        if self._closed or key in self._spares:
            answer.close()
            return
        loop = asyncio.get_running_loop()
        expiry = loop.call_later(self._spare_idle, self._expire, key, answer)
        self._spares[key] = _Spare(answer, expiry)

    def _expire(self, key: _Key, answer: StreamAnswer) -> None:
        spare = self._spares.get(key)
        if spare is not None and spare.answer is answer:
            del self._spares[key]
            answer.close()

    async def _connect(self, key: _Key) -> StreamAnswer:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        tls = self._tls() if scheme == "https" else None
        try:
            async with asyncio.timeout(self._connect_timeout):
                address = await self._address(host, port)
                _, answer = await loop.create_connection(
                    lambda: StreamAnswer(loop, self._read_timeout),
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
