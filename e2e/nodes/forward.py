"""A TCP forwarder: `python -m e2e.nodes.forward LISTEN_HOST:PORT TARGET_HOST:PORT`.

Test infrastructure. The API server listens on the machine's loopback only;
real nodes and their pods live in network namespaces of their own and reach it
at the machine's address on the node network, where this forwards each
connection's bytes untouched (TLS included, so certificates are checked end to
end). Started and stopped by pid like every other process of the harness.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

CHUNK = 65536


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(ConnectionError, OSError):
            writer.close()


async def _serve(listen: tuple[str, int], target: tuple[str, int]) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(handle, *listen)
    async with server:
        await server.serve_forever()


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"want HOST:PORT, got {text!r}")
    return host, int(port)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(
            "usage: python -m e2e.nodes.forward LISTEN_HOST:PORT TARGET_HOST:PORT", file=sys.stderr
        )
        return 2
    asyncio.run(_serve(_address(argv[0]), _address(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
