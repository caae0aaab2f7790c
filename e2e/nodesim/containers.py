"""One container as a local process: start, probe, stop with grace, restart with
back-off.

Test infrastructure. Each run of a container is a process in its own session
(so the whole group is signalled), inside the pod's network namespace, with its
output in `<pod>/logs/<container>/<restartCount>.log` and its pid recorded
under `<pod>/pids/` for the harness. Restarts follow the pod's restartPolicy
(init containers: OnFailure, unless the pod says Never; sidecars: Always) with
the kubelet's back-off: the first restart at once, then 10 s doubling up to
5 min, reset after a run longer than twice the cap; `CrashLoopBackOff` while
waiting. A failed startup or liveness probe kills the container (SIGTERM, the
grace period, SIGKILL) and the restart policy decides what follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from e2e.nodesim import pidrecords
from e2e.nodesim.environment import ConfigError
from e2e.nodesim.images import ImageError
from e2e.nodesim.kubeapi import ApiError
from e2e.nodesim.probes import ProbeResult, ProbeSpec, ProbeTarget, run_probe
from e2e.nodesim.status import ContainerView, now_rfc3339
from e2e.nodesim.volumes import MountError

# The kubelet keeps at most this much of a termination message.
TERMINATION_MESSAGE_BYTES = 4096

Obj = dict[str, Any]


@dataclass
class Launch:
    """A container run, fully resolved: what to exec, where, with which env."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    executable: Path
    probe_target: ProbeTarget
    # Stands in for the container's terminationMessagePath.
    termination_file: Path | None = None


class PodHooks(Protocol):
    """What a container needs from its pod."""

    pod_name: str

    async def prepare(self, container: Obj) -> Launch: ...

    def changed(self) -> None: ...

    def event(self, kind: str, reason: str, message: str, container: str | None) -> None: ...

    def log_file(self, container: str, attempt: int) -> Path: ...

    def pid_file(self, container: str) -> Path: ...

    def grace_seconds(self) -> float: ...


class Backoff:
    """The kubelet's restart back-off for one container."""

    def __init__(self, base: float, cap: float) -> None:
        self.base = base
        self.cap = cap
        self.restarts = 0

    def next_delay(self, ran_for: float) -> float:
        if ran_for > 2 * self.cap:
            self.restarts = 0
        delay = 0.0 if self.restarts == 0 else min(self.cap, self.base * 2 ** (self.restarts - 1))
        self.restarts += 1
        return delay


def termination_message(path: Path | None) -> str | None:
    """What the program wrote to its termination message file, as the kubelet keeps
    it: at most the last 4096 bytes (FallbackToLogsOnError is not simulated)."""
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return data[-TERMINATION_MESSAGE_BYTES:].decode(errors="replace") or None


def exit_code_of(returncode: int) -> tuple[int, int | None]:
    """(exitCode, signal) the way a container runtime reports them."""
    if returncode < 0:
        return 128 - returncode, -returncode
    return returncode, None


class ContainerRunner:
    """Runs one container until it is done for good or stopped."""

    def __init__(
        self,
        pod: PodHooks,
        container: Obj,
        view: ContainerView,
        restart_policy: str,
        backoff: Backoff,
    ) -> None:
        self.pod = pod
        self.container = container
        self.view = view
        self.restart_policy = restart_policy
        self.backoff = backoff
        self.name = container["name"]
        self._stopping = False
        self._wake = asyncio.Event()
        self._proc: asyncio.subprocess.Process | None = None
        self._kill_task: asyncio.Task[None] | None = None
        self._blocked_attempts = 0
        self.started_event = asyncio.Event()

    # -- control ---------------------------------------------------------------

    async def stop(self, grace: float) -> None:
        """Stop for good: no restart after this."""
        self._stopping = True
        self._wake.set()
        if self._proc is not None and self._proc.returncode is None:
            await self._terminate(grace, None)

    @property
    def pid(self) -> int | None:
        if self._proc is not None and self._proc.returncode is None:
            return self._proc.pid
        return None

    # -- the loop ----------------------------------------------------------------

    async def run(self) -> None:
        while not self._stopping:
            try:
                launch = await self.pod.prepare(self.container)
            except ImageError as exc:
                await self._blocked("ErrImagePull", str(exc))
                continue
            except (ConfigError, MountError, ApiError, aiohttp.ClientError) as exc:
                await self._blocked("CreateContainerConfigError", str(exc))
                continue
            self._blocked_attempts = 0
            if self._stopping:
                break
            ran_for = await self._run_once(launch)
            if self._stopping:
                break
            if not self._restarts():
                self.view.done = True
                self.pod.changed()
                break
            self.view.last_state = {"terminated": self.view.terminated_state()}
            delay = self.backoff.next_delay(ran_for)
            if delay > 0:
                message = (
                    f"back-off {delay:.0f}s restarting failed container={self.name} "
                    f"pod={self.pod.pod_name}"
                )
                self._set_waiting("CrashLoopBackOff", message)
                self.pod.event(
                    "Warning",
                    "BackOff",
                    f"Back-off restarting failed container {self.name}",
                    self.name,
                )
                await self._sleep(delay)
            if not self._stopping:
                self.view.restart_count += 1
        self.started_event.set()

    def _restarts(self) -> bool:
        if self.restart_policy == "Always":
            return True
        if self.restart_policy == "OnFailure":
            return self.view.exit_code != 0
        return False

    async def _blocked(self, reason: str, message: str) -> None:
        self._set_waiting(reason, message)
        self.pod.event("Warning", "Failed", f"Error: {message}", self.name)
        # Retried soon at first (the Node authorizer may not know the pod's
        # Secrets yet), then at the back-off base, so a Secret created or a
        # part built meanwhile is picked up.
        delay = min(self.backoff.base, 2.0**self._blocked_attempts)
        self._blocked_attempts += 1
        await self._sleep(delay)

    def _set_waiting(self, reason: str, message: str | None) -> None:
        self.view.state = "waiting"
        self.view.reason = reason
        self.view.message = message
        self.view.ready = False
        self.view.started = False
        self.pod.changed()

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _run_once(self, launch: Launch) -> float:
        log = self.pod.log_file(self.name, self.view.restart_count)
        log.parent.mkdir(parents=True, exist_ok=True)
        launch.cwd.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            self._proc = await asyncio.create_subprocess_exec(
                *launch.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=launch.env,
                cwd=launch.cwd,
                start_new_session=True,
            )
        proc = self._proc
        began = time.monotonic()
        if self._stopping:
            # stop() ran while the process was being started.
            self._kill_task = asyncio.create_task(self._kill(self.pod.grace_seconds(), None))
        pid_file = self.pod.pid_file(self.name)
        # The record names the program, not nsenter, which execs into it.
        pidrecords.write_record(pid_file, proc.pid, [str(launch.executable)])
        startup = ProbeSpec.parse(self.container.get("startupProbe"))
        readiness = ProbeSpec.parse(self.container.get("readinessProbe"))
        view = self.view
        view.state = "running"
        view.reason = None
        view.message = None
        view.exit_code = None
        view.signal = None
        view.started_at = now_rfc3339()
        view.finished_at = None
        view.container_id = f"nodesim://{proc.pid}"
        view.image_id = f"nodesim://{launch.executable}"
        view.started = startup is None
        view.ready = view.started and readiness is None
        self.pod.changed()
        self.pod.event("Normal", "Started", f"Started container {self.name}", self.name)
        if view.started:
            self.started_event.set()
        probing = asyncio.create_task(self._probe(launch, began))
        try:
            returncode = await proc.wait()
        finally:
            probing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probing
            if self._kill_task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await self._kill_task
                self._kill_task = None
            pid_file.unlink(missing_ok=True)
        code, sig = exit_code_of(returncode)
        view.state = "terminated"
        view.exit_code = code
        view.signal = sig
        view.reason = "Completed" if code == 0 else "Error"
        view.message = termination_message(launch.termination_file)
        view.finished_at = now_rfc3339()
        view.ready = False
        view.started = False
        self.pod.changed()
        return time.monotonic() - began

    # -- stopping ----------------------------------------------------------------

    async def _terminate(self, grace: float, reason: str | None) -> None:
        if self._kill_task is None or self._kill_task.done():
            self._kill_task = asyncio.create_task(self._kill(grace, reason))
        await asyncio.shield(self._kill_task)

    async def _kill(self, grace: float, reason: str | None) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        message = reason or f"Stopping container {self.name}"
        self.pod.event("Normal", "Killing", message, self.name)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), max(grace, 0.0))
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        # Children that left the group's leader behind are signalled too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    # -- probes ------------------------------------------------------------------

    async def _probe(self, launch: Launch, began: float) -> None:
        target = launch.probe_target
        startup = ProbeSpec.parse(self.container.get("startupProbe"))
        readiness = ProbeSpec.parse(self.container.get("readinessProbe"))
        liveness = ProbeSpec.parse(self.container.get("livenessProbe"))
        if startup is not None:
            if not await self._until_started(startup, target, began):
                return
            self.view.started = True
            self.view.ready = readiness is None
            self.pod.changed()
            self.started_event.set()
        loops: list[Awaitable[None]] = []
        if readiness is not None:
            loops.append(self._readiness(readiness, target, began))
        if liveness is not None:
            loops.append(self._liveness(liveness, target, began))
        if loops:
            await asyncio.gather(*loops)

    async def _after_delay(self, spec: ProbeSpec, began: float) -> None:
        remaining = spec.initial_delay - (time.monotonic() - began)
        if remaining > 0:
            await asyncio.sleep(remaining)

    async def _until_started(self, spec: ProbeSpec, target: ProbeTarget, began: float) -> bool:
        await self._after_delay(spec, began)
        result = ProbeResult(spec, initial=False)
        while True:
            ok, message = await run_probe(spec, target)
            if ok:
                return True
            result.record(False)
            if result.failures == 1 or result.failures >= spec.failure_threshold:
                self._unhealthy("Startup", message)
            if result.failures >= spec.failure_threshold:
                await self._kill_for_probe("startup", spec)
                return False
            await asyncio.sleep(spec.period)

    async def _readiness(self, spec: ProbeSpec, target: ProbeTarget, began: float) -> None:
        await self._after_delay(spec, began)
        result = ProbeResult(spec, initial=False)
        while True:
            ok, message = await run_probe(spec, target)
            if result.record(ok):
                self.view.ready = result.ok
                self.pod.changed()
            if not ok and result.failures == 1:
                self._unhealthy("Readiness", message)
            await asyncio.sleep(spec.period)

    async def _liveness(self, spec: ProbeSpec, target: ProbeTarget, began: float) -> None:
        await self._after_delay(spec, began)
        result = ProbeResult(spec, initial=True)
        while True:
            ok, message = await run_probe(spec, target)
            result.record(ok)
            if not ok:
                self._unhealthy("Liveness", message)
            if not result.ok:
                await self._kill_for_probe("liveness", spec)
                return
            await asyncio.sleep(spec.period)

    def _unhealthy(self, kind: str, message: str) -> None:
        self.pod.event("Warning", "Unhealthy", f"{kind} probe failed: {message}", self.name)

    async def _kill_for_probe(self, kind: str, spec: ProbeSpec) -> None:
        grace = spec.termination_grace if spec.termination_grace is not None else None
        seconds = float(grace) if grace is not None else self.pod.grace_seconds()
        reason = f"Container {self.name} failed {kind} probe, will be restarted"
        await self._terminate(seconds, reason)
