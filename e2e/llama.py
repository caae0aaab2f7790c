"""Run real llama.cpp processes (ggml-rpc-server, llama-server) for tests and benches.

Test infrastructure. Each process is a `subprocess.Popen` owned by the caller and
stopped by its pid; output goes to a log file that tests parse (buffer sizes,
device lists) and print when something fails.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from e2e import parts
from e2e.procs import stop_popen
from e2e.waiting import free_port


@dataclass
class LlamaProcess:
    """A running llama.cpp process with its log."""

    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes]
    port: int
    host: str = "127.0.0.1"
    _closed: bool = field(default=False, repr=False)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, grace: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        stop_popen(self.proc, grace)


def _spawn(argv: Sequence[str], log: Path, port: int, host: str) -> LlamaProcess:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    return LlamaProcess(list(argv), log, proc, port, host)


def start_rpc_server(
    log_dir: Path,
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    threads: int = 1,
    cache: bool = False,
    extra: Sequence[str] = (),
) -> LlamaProcess:
    """Start ggml-rpc-server and wait until it listens."""
    port = port or free_port(host)
    argv = [str(parts.binary("ggml-rpc-server")), "-H", host, "-p", str(port), "-t", str(threads)]
    if cache:
        argv.append("-c")
    argv.extend(extra)
    server = _spawn(argv, log_dir / f"rpc-{port}.log", port, host)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"ggml-rpc-server exited: {server.log_text()[-500:]}")
        # Connecting would take the server's single client slot away from
        # llama-server, and its stdout is block-buffered: ask the kernel instead.
        if listening(host, port):
            return server
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"ggml-rpc-server did not start: {server.log_text()[-500:]}")


def listening(host: str, port: int, net_tcp: Path = Path("/proc/net/tcp")) -> bool:
    """Whether a TCP socket is in LISTEN state on host:port (IPv4), per `net_tcp`
    (another network namespace's: /proc/<pid>/net/tcp of a process in it). Nothing
    connects: an RPC server's one client slot stays free."""
    want_ip = "".join(f"{int(octet):02X}" for octet in reversed(host.split(".")))
    want = f"{want_ip}:{port:04X}"
    try:
        lines = net_tcp.read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        # st 0A is TCP_LISTEN; a wildcard bind shows as 00000000.
        if fields[3] == "0A" and fields[1] in (want, f"00000000:{port:04X}"):
            return True
    return False


def start_llama_server(
    log_dir: Path,
    args: Sequence[str],
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    wait: bool = True,
    timeout: float = 180.0,
) -> LlamaProcess:
    """Start llama-server with `args` (model, split, ...) and wait for /health 200."""
    port = port or free_port(host)
    argv = [str(parts.binary("llama-server")), "--host", host, "--port", str(port), *args]
    server = _spawn(argv, log_dir / f"llama-server-{port}.log", port, host)
    if wait:
        try:
            wait_healthy(server, timeout)
        except RuntimeError:
            server.stop()
            raise
    return server


def wait_healthy(server: LlamaProcess, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"llama-server exited {server.proc.returncode}: {server.log_text()[-1500:]}"
            )
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"llama-server not healthy in {timeout:.0f}s: {server.log_text()[-1500:]}")


def post_json(url: str, body: dict[str, object], timeout: float = 120.0) -> dict[str, object]:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        result: dict[str, object] = json.loads(resp.read())
        return result


@contextlib.contextmanager
def running(*servers: LlamaProcess) -> Iterator[tuple[LlamaProcess, ...]]:
    """Stop every server on exit, in reverse order (host before workers)."""
    try:
        yield servers
    finally:
        for server in reversed(servers):
            server.stop()
