"""Run the `mesh gateway` command and llama-server hosts for it, for tests and benches.

Test infrastructure. `start_gateway` runs the real command line (`python -m
mesh_operator.cli.main gateway ...`) on a free port, waits for `/readyz`, and the
process is stopped by its pid with SIGTERM, as Kubernetes would stop it.
`start_host` runs llama-server with flags sized for a 2-core machine.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from e2e.llama import LlamaProcess, start_llama_server
from e2e.waiting import free_port


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as resp:
            text: str = resp.read().decode()
            return text

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        wanted = set(labels.items())
        total = 0.0
        for family in text_string_to_metric_families(self.metrics()):
            for sample in family.samples:
                if sample.name == name and wanted <= set(sample.labels.items()):
                    total += sample.value
        return total

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the exit code (graceful shutdown)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.terminate()


def start_gateway(
    log_dir: Path,
    args: Sequence[str],
    timeout: float = 60.0,
    *,
    access_log: bool = True,
    env: Mapping[str, str] | None = None,
) -> GatewayProcess:
    """`mesh gateway <args>` on a free port, once /readyz answers 200 (`env`: the
    process's environment, default this one's)."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"gateway-{port}.log"
    argv = [
        sys.executable,
        "-m",
        "mesh_operator.cli.main",
        "gateway",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *(["--access-log"] if access_log else []),
        *args,
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
        )
    gateway = GatewayProcess(proc, port, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mesh gateway exited {proc.returncode}: {gateway.log_text()}")
        try:
            with urllib.request.urlopen(f"{gateway.url}/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return gateway
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    gateway.stop()
    raise RuntimeError(f"mesh gateway not ready in {timeout:.0f}s: {gateway.log_text()}")


def llama_args(model: Path, alias: str, *, slots: int = 2, ctx: int = 2048) -> list[str]:
    """llama-server flags kept small for a 2-core machine."""
    return [
        "-m", str(model), "-c", str(ctx), "-np", str(slots), "-t", "1",
        "--metrics", "--alias", alias,
    ]  # fmt: skip


def start_host(
    log_dir: Path, model: Path, alias: str, *, slots: int = 2, extra: Sequence[str] = ()
) -> LlamaProcess:
    return start_llama_server(log_dir, [*llama_args(model, alias, slots=slots), *extra])
