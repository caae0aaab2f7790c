"""Serve a folder over HTTP, as a model mirror would. Test infrastructure."""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # Readers of a GGUF header hang up after the bytes they need: expected.
        pass


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve_directory(directory: Path, address: str = "127.0.0.1") -> Iterator[str]:
    """Serve `directory` over HTTP on loopback; yield the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = _Server((address, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{address}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
