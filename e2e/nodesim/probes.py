"""Startup, readiness and liveness probes, run the way the kubelet runs them.

Test infrastructure. httpGet connects to the pod IP (or the probe's host) with
named ports resolved from the container's ports, and 200-399 is success
(redirects are not followed); tcpSocket succeeds when a connection opens; exec
runs the command (mapped like container commands) inside the pod's network
with the container's environment and is killed at timeoutSeconds. grpc probes
are not supported and always fail, with a message saying so. Thresholds count
consecutive results, as in the kubelet.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from e2e.nodesim.images import ImageError

Obj = dict[str, Any]


@dataclass(frozen=True)
class ProbeSpec:
    handler: Obj
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3
    termination_grace: int | None = None

    @classmethod
    def parse(cls, probe: Obj | None) -> ProbeSpec | None:
        if not probe:
            return None
        grace = probe.get("terminationGracePeriodSeconds")
        return cls(
            handler=probe,
            initial_delay=float(probe.get("initialDelaySeconds") or 0),
            period=float(probe.get("periodSeconds") or 10),
            timeout=float(probe.get("timeoutSeconds") or 1),
            success_threshold=int(probe.get("successThreshold") or 1),
            failure_threshold=int(probe.get("failureThreshold") or 3),
            termination_grace=int(grace) if grace is not None else None,
        )


class ProbeResult:
    """Consecutive successes and failures of one probe, and the verdict."""

    def __init__(self, spec: ProbeSpec, initial: bool) -> None:
        self.spec = spec
        self.ok = initial
        self.successes = 0
        self.failures = 0

    def record(self, success: bool) -> bool:
        """Count one result; return whether the verdict flipped."""
        before = self.ok
        if success:
            self.successes += 1
            self.failures = 0
            if self.successes >= self.spec.success_threshold:
                self.ok = True
        else:
            self.failures += 1
            self.successes = 0
            if self.failures >= self.spec.failure_threshold:
                self.ok = False
        return before != self.ok


@dataclass(frozen=True)
class ProbeTarget:
    """What a probe needs to know about the container it checks."""

    pod_ip: str
    ports: Mapping[str, int]
    env: Mapping[str, str]
    cwd: Path
    # Maps an exec probe's command to the argv to run (raises if unknown).
    exec_argv: Callable[[list[str]], list[str]]
    session: aiohttp.ClientSession


def _port(value: Any, ports: Mapping[str, int]) -> int:
    if isinstance(value, int):
        return value
    if str(value).isdigit():
        return int(value)
    if value in ports:
        return ports[value]
    raise ValueError(f"unknown named port {value!r}")


async def _http(handler: Obj, target: ProbeTarget, timeout: float) -> tuple[bool, str]:
    host = handler.get("host") or target.pod_ip
    port = _port(handler.get("port"), target.ports)
    scheme = str(handler.get("scheme") or "HTTP").lower()
    path = handler.get("path") or "/"
    if not path.startswith("/"):
        path = "/" + path
    headers = {h["name"]: h.get("value", "") for h in handler.get("httpHeaders") or []}
    url = f"{scheme}://{host}:{port}{path}"
    async with target.session.get(
        url,
        headers=headers,
        allow_redirects=False,
        ssl=False,
        timeout=aiohttp.ClientTimeout(total=timeout),
    ) as resp:
        if 200 <= resp.status < 400:
            return True, ""
        return False, f"HTTP probe failed with statuscode: {resp.status}"


async def _tcp(handler: Obj, target: ProbeTarget, timeout: float) -> tuple[bool, str]:
    host = handler.get("host") or target.pod_ip
    port = _port(handler.get("port"), target.ports)
    _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True, ""


async def _exec(handler: Obj, target: ProbeTarget, timeout: float) -> tuple[bool, str]:
    argv = target.exec_argv([str(c) for c in handler.get("command") or []])
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=dict(target.env),
        cwd=target.cwd,
        start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        return False, f"command timed out after {timeout:.0f}s"
    except asyncio.CancelledError:
        # The container stopped mid-probe: leave no probe process behind.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    if proc.returncode == 0:
        return True, ""
    text = out.decode(errors="replace").strip()[-200:]
    return False, f"command exited with {proc.returncode}: {text}"


async def run_probe(spec: ProbeSpec, target: ProbeTarget) -> tuple[bool, str]:
    """Run one probe once: (success, message when it failed)."""
    handler = spec.handler
    try:
        if "httpGet" in handler:
            return await _http(handler["httpGet"], target, spec.timeout)
        if "tcpSocket" in handler:
            return await _tcp(handler["tcpSocket"], target, spec.timeout)
        if "exec" in handler:
            return await _exec(handler["exec"], target, spec.timeout)
        if "grpc" in handler:
            return False, "grpc probes are not supported by the node simulator"
        return False, "probe has no handler"
    except TimeoutError:
        return False, f"timeout after {spec.timeout:.0f}s"
    except (aiohttp.ClientError, OSError, ValueError, ImageError) as exc:
        return False, f"{type(exc).__name__}: {exc}"
