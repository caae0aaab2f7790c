"""Byte forwarding from a pod's own 127.0.0.1 to the machine's 127.0.0.1.

Test infrastructure. A pod in its own network namespace cannot reach the API
server, which listens on the machine's loopback only; the node process listens
on the same port inside the pod's namespace (see `network.listen_in_netns`) and
copies bytes both ways. TLS is end to end: this never looks inside.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()


async def serve_forward(sock: socket.socket, target_host: str, target_port: int) -> asyncio.Server:
    """Serve connections accepted on `sock` by forwarding them to the target."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(target_host, target_port)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                    w.close()

    return await asyncio.start_server(handle, sock=sock)
