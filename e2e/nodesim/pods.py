"""One pod on a simulated node: sandbox, volumes, init containers then the
containers, status written back, and termination with grace on deletion.

Test infrastructure. A `PodWorker` lives from the moment the node sees a pod
bound to it until the pod is gone: it makes the pod's network sandbox (its own
IP), its volumes and service-account kubeconfig, runs init containers in order
to completion (sidecars, i.e. init containers with restartPolicy Always, are
started and left running), then starts every container. Whenever a container
changes, the pod's status is recomputed and written (coalesced). When the pod
gets a deletionTimestamp, containers get SIGTERM, the grace period, SIGKILL;
then the sandbox is released, emptyDir-like volumes are removed (logs are
kept) and the pod object is deleted with grace 0, as the kubelet does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from e2e.nodesim import images, pidrecords
from e2e.nodesim.containers import Backoff, ContainerRunner, Launch
from e2e.nodesim.environment import ConfigError, Downward, container_env, expand_command
from e2e.nodesim.kubeapi import ApiError, path_of
from e2e.nodesim.network import NetworkError, Sandbox
from e2e.nodesim.probes import ProbeTarget
from e2e.nodesim.status import ContainerView, build_pod_status, now_rfc3339
from e2e.nodesim.volumes import (
    SERVICE_ACCOUNT_MOUNT,
    MountError,
    PodLayout,
    materialize,
    mount_table,
    write_pod_kubeconfig,
)

if TYPE_CHECKING:
    from e2e.nodesim.kubelet import Kubelet

Obj = dict[str, Any]
log = logging.getLogger("nodesim.pods")

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_GRACE_SECONDS = 30
STATUS_COALESCE_SECONDS = 0.1
RETRY_SECONDS = 5.0
# A container's terminationMessagePath when its spec names none.
TERMINATION_LOG = "/dev/termination-log"


def pod_key(pod: Obj) -> str:
    meta = pod["metadata"]
    return f"{meta['namespace']}/{meta['name']}"


def pod_dir_name(pod: Obj) -> str:
    meta = pod["metadata"]
    return f"{meta['namespace']}_{meta['name']}_{meta['uid']}"


class PodWorker:
    """Runs one pod; see the module docstring."""

    def __init__(self, kubelet: Kubelet, pod: Obj) -> None:
        self.kubelet = kubelet
        self.pod = pod
        meta = pod["metadata"]
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        spec = pod.get("spec", {})
        self.host_network = bool(spec.get("hostNetwork"))
        self.restart_policy: str = spec.get("restartPolicy") or "Always"
        cfg = kubelet.config
        self.layout = PodLayout(
            cfg.state_path / "pods" / pod_dir_name(pod),
            cfg.state_path,
            Path(cfg.shared_dir),
        )
        self.sandbox: Sandbox | None = None
        self.volumes: dict[str, Path] = {}
        self.kubeconfigs: dict[str, Path] = {}
        self._has_inits = bool(spec.get("initContainers"))
        self.inits = [self._view(c, init=True) for c in spec.get("initContainers") or []]
        self.mains = [self._view(c, init=False) for c in spec.get("containers") or []]
        self.runners: dict[str, ContainerRunner] = {}
        self._dirty = asyncio.Event()
        self._last_written: str | None = None
        self._start_time = now_rfc3339()
        self._main_task: asyncio.Task[None] | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._terminating: asyncio.Task[None] | None = None
        self._container_tasks: list[asyncio.Task[None]] = []
        self._gone = False
        self._resume(pod.get("status") or {})

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        self._main_task = asyncio.create_task(self._run(), name=f"pod {pod_key(self.pod)}")
        self._writer_task = asyncio.create_task(self._write_status_loop())

    def update(self, pod: Obj) -> None:
        """A newer copy of the pod from the watch."""
        self.pod = pod
        if pod["metadata"].get("deletionTimestamp") and self._terminating is None:
            grace = pod["metadata"].get("deletionGracePeriodSeconds")
            self.terminate(float(grace) if grace is not None else self.grace_seconds(), True)

    def terminate(self, grace: float, delete_object: bool) -> asyncio.Task[None]:
        """Stop everything; delete the pod object afterwards when asked to."""
        if self._terminating is None:
            self._terminating = asyncio.create_task(self._terminate(grace, delete_object))
        return self._terminating

    async def shutdown(self, grace: float) -> None:
        """The node is going down: stop the processes, touch nothing in the API."""
        self._gone = True
        await self._stop_all(grace)
        await self._cancel_tasks()

    # -- the pod's run ----------------------------------------------------------------

    async def _run(self) -> None:
        try:
            leftovers = list(pidrecords.live_records(self.layout.pids_dir).values())
            if leftovers:
                # Left running by a previous run of this node that was killed.
                await asyncio.to_thread(pidrecords.kill_and_wait, leftovers)
            await self._prepare_sandbox()
            await self._prepare_volumes()
            for view, container in zip(self.inits, self._spec_list("initContainers"), strict=True):
                if view.done and not view.sidecar:
                    continue
                runner = self._runner(container, view, init=True)
                task = self._spawn(runner)
                if view.sidecar:
                    await runner.started_event.wait()
                    continue
                await task
                if not (view.done and view.exit_code == 0):
                    # Stopped, or failed with restartPolicy Never: the pod ends here.
                    await self._stop_sidecars(self.grace_seconds())
                    return
            tasks = [
                self._spawn(self._runner(c, v, init=False))
                for v, c in zip(self.mains, self._spec_list("containers"), strict=True)
            ]
            await asyncio.gather(*tasks)
            if all(v.done for v in self.mains):
                await self._stop_sidecars(self.grace_seconds())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug here must show on the pod, not only in the node's log.
            log.exception("pod %s failed", pod_key(self.pod))
            for view in [*self.inits, *self.mains]:
                if view.state == "waiting":
                    view.reason = "RunContainerError"
                    view.message = f"node simulator: {exc!r}"
            self.changed()

    def _spawn(self, runner: ContainerRunner) -> asyncio.Task[None]:
        # The event loop keeps only weak references to tasks: hold them here.
        task = asyncio.create_task(runner.run(), name=f"{pod_key(self.pod)}/{runner.name}")
        self._container_tasks.append(task)
        return task

    def _spec_list(self, key: str) -> list[Obj]:
        return list(self.pod.get("spec", {}).get(key) or [])

    def _view(self, container: Obj, init: bool) -> ContainerView:
        return ContainerView(
            name=container["name"],
            image=container.get("image", ""),
            init=init,
            sidecar=init and container.get("restartPolicy") == "Always",
            reason="PodInitializing" if not init and self._has_inits else "ContainerCreating",
        )

    def _resume(self, status: Obj) -> None:
        """After a node restart: count the lost run as a restart, skip finished inits."""
        previous = {
            s["name"]: s
            for s in [
                *(status.get("initContainerStatuses") or []),
                *(status.get("containerStatuses") or []),
            ]
        }
        for view in [*self.inits, *self.mains]:
            old = previous.get(view.name)
            if not old:
                continue
            state = old.get("state") or {}
            view.restart_count = int(old.get("restartCount") or 0)
            term = state.get("terminated")
            if view.init and not view.sidecar and term and term.get("exitCode") == 0:
                view.state = "terminated"
                view.exit_code = 0
                view.reason = "Completed"
                view.started_at = term.get("startedAt")
                view.finished_at = term.get("finishedAt")
                view.done = True
            elif "running" in state:
                view.restart_count += 1
                view.last_state = {
                    "terminated": {
                        "exitCode": 137,
                        "reason": "Error",
                        "message": "the node restarted",
                        "startedAt": state["running"].get("startedAt"),
                        "finishedAt": now_rfc3339(),
                    }
                }

    def _runner(self, container: Obj, view: ContainerView, init: bool) -> ContainerRunner:
        if view.sidecar:
            policy = "Always"
        elif init:
            policy = "Never" if self.restart_policy == "Never" else "OnFailure"
        else:
            policy = self.restart_policy
        cfg = self.kubelet.config
        runner = ContainerRunner(
            self,
            container,
            view,
            policy,
            Backoff(cfg.backoff_base_seconds, cfg.backoff_cap_seconds),
        )
        self.runners[view.name] = runner
        return runner

    async def _prepare_sandbox(self) -> None:
        while self.sandbox is None:
            try:
                if self.host_network:
                    self.sandbox = self.kubelet.network.node_sandbox
                else:
                    self.sandbox = await self.kubelet.network.sandbox_for(self.uid)
                    await self.kubelet.open_forwards(self.sandbox)
            except (NetworkError, OSError) as exc:
                self.event("Warning", "FailedCreatePodSandBox", str(exc), None)
                await asyncio.sleep(RETRY_SECONDS)
        self.changed()

    async def _prepare_volumes(self) -> None:
        attempt = 0
        while True:
            try:
                self.volumes = await materialize(
                    self.pod, self.layout, self.kubelet.objects, self._downward()
                )
                break
            except (MountError, ConfigError, ApiError, OSError, aiohttp.ClientError) as exc:
                # The Node authorizer learns of a pod's Secrets, ConfigMaps and
                # service account a moment after the binding: the first refusal
                # is expected, so it is retried quickly and not reported.
                if attempt:
                    self.event("Warning", "FailedMount", f"MountVolume.SetUp failed: {exc}", None)
                await asyncio.sleep(min(RETRY_SECONDS, 0.25 * 2**attempt))
                attempt += 1
        for name, folder in self.volumes.items():
            made = write_pod_kubeconfig(
                self.layout.kubeconfig(name),
                self.kubelet.pod_api_server,
                folder,
                self.namespace,
            )
            if made is not None:
                self.kubeconfigs[name] = made

    def _downward(self) -> Downward:
        return Downward(
            self.pod,
            self.sandbox.ip if self.sandbox else "",
            self.kubelet.config.address,
            self.kubelet.allocatable,
        )

    # -- PodHooks for the containers --------------------------------------------------

    async def prepare(self, container: Obj) -> Launch:
        assert self.sandbox is not None
        env = await container_env(container, self._downward(), self.kubelet.objects)
        command, args = expand_command(container, env)
        home = self.layout.container_dir(container["name"])
        termination = home / "termination-log"
        termination.parent.mkdir(parents=True, exist_ok=True)
        termination.write_bytes(b"")
        mounts = mount_table(
            container,
            self.volumes,
            env,
            files={container.get("terminationMessagePath") or TERMINATION_LOG: termination},
        )
        cfg = self.kubelet.config
        image = container.get("image", "")
        resolved = images.resolve(image, command, args, cfg.executables)
        argv = [resolved.argv[0], *(mounts.rewrite(a) for a in resolved.argv[1:])]
        full_env = {
            "PATH": BASE_PATH,
            "HOSTNAME": cfg.name if self.host_network else self.pod_name,
            "HOME": str(home / "home"),
            "LANG": "C.UTF-8",
            # Logs should reach the log file as they are written.
            "PYTHONUNBUFFERED": "1",
        }
        for mount in container.get("volumeMounts") or []:
            if mount.get("mountPath", "").rstrip("/") == SERVICE_ACCOUNT_MOUNT:
                kubeconfig = self.kubeconfigs.get(mount.get("name", ""))
                if kubeconfig is not None:
                    full_env["KUBECONFIG"] = str(kubeconfig)
        full_env.update({k: mounts.rewrite(v) for k, v in env.items()})
        (home / "home").mkdir(parents=True, exist_ok=True)
        working = container.get("workingDir")
        cwd = home / "root"
        if working:
            cwd = mounts.path(working) or home / "root" / working.lstrip("/")
        ports = {
            p["name"]: int(p["containerPort"])
            for p in container.get("ports") or []
            if p.get("name") and p.get("containerPort")
        }
        prefix = self.sandbox.exec_prefix()

        def exec_argv(probe_command: list[str]) -> list[str]:
            found = images.resolve(image, probe_command, [], cfg.executables)
            return [*prefix, found.argv[0], *(mounts.rewrite(a) for a in found.argv[1:])]

        target = ProbeTarget(
            pod_ip=self.sandbox.ip,
            ports=ports,
            env=full_env,
            cwd=cwd,
            exec_argv=exec_argv,
            session=self.kubelet.http,
        )
        return Launch([*prefix, *argv], full_env, cwd, resolved.executable, target, termination)

    def changed(self) -> None:
        self._dirty.set()

    def event(self, kind: str, reason: str, message: str, container: str | None) -> None:
        self.kubelet.events.record(self.pod, kind, reason, message, container)

    def log_file(self, container: str, attempt: int) -> Path:
        return self.layout.log_file(container, attempt)

    def pid_file(self, container: str) -> Path:
        return self.layout.pids_dir / f"{container}.json"

    def grace_seconds(self) -> float:
        grace = self.pod.get("spec", {}).get("terminationGracePeriodSeconds")
        return float(grace if grace is not None else DEFAULT_GRACE_SECONDS)

    # -- status ---------------------------------------------------------------------

    def build_status(self) -> Obj:
        gates = [g["conditionType"] for g in self.pod.get("spec", {}).get("readinessGates") or []]
        return build_pod_status(
            self.pod.get("status") or {},
            self.inits,
            self.mains,
            pod_ip=self.sandbox.ip if self.sandbox else None,
            host_ip=self.kubelet.config.address,
            start_time=self._start_time,
            readiness_gates=gates,
        )

    async def _write_status_loop(self) -> None:
        while not self._gone:
            await self._dirty.wait()
            await asyncio.sleep(STATUS_COALESCE_SECONDS)
            self._dirty.clear()
            try:
                await self._write_status()
            except ApiError as exc:
                if exc.status == 404:
                    return
                log.warning("status of %s: %s", pod_key(self.pod), exc)
                await asyncio.sleep(1)
                self._dirty.set()
            except Exception as exc:
                log.warning("status of %s: %s", pod_key(self.pod), exc)
                await asyncio.sleep(1)
                self._dirty.set()

    async def _write_status(self) -> None:
        path = path_of("pods", self.pod_name, namespace=self.namespace, subresource="status")
        for _ in range(5):
            status = self.build_status()
            fingerprint = json.dumps(
                {k: v for k, v in status.items() if k != "conditions"}, sort_keys=True
            ) + json.dumps([(c["type"], c["status"]) for c in status["conditions"]])
            if fingerprint == self._last_written:
                return
            body = {**self.pod, "status": status}
            try:
                self.pod = await self.kubelet.client.replace(path, body)
                self._last_written = fingerprint
                return
            except ApiError as exc:
                if exc.status != 409:
                    raise
                fresh = await self.kubelet.client.get_or_none(
                    path_of("pods", self.pod_name, namespace=self.namespace)
                )
                if fresh is None or fresh["metadata"]["uid"] != self.uid:
                    raise ApiError(404, "NotFound", "pod is gone") from exc
                self.pod = fresh

    # -- stopping ---------------------------------------------------------------------

    async def _stop_sidecars(self, grace: float) -> None:
        sidecars = [
            self.runners[v.name]
            for v in reversed(self.inits)
            if v.sidecar and v.name in self.runners
        ]
        for runner in sidecars:
            await runner.stop(grace)

    async def _stop_all(self, grace: float) -> None:
        mains = [self.runners[v.name] for v in self.mains if v.name in self.runners]
        inits = [
            self.runners[v.name] for v in self.inits if v.name in self.runners and not v.sidecar
        ]
        await asyncio.gather(*(r.stop(grace) for r in [*mains, *inits]))
        await self._stop_sidecars(grace)
        # Whatever a previous incarnation of this node left behind.
        leftovers = list(pidrecords.live_records(self.layout.pids_dir).values())
        if leftovers:
            await asyncio.to_thread(pidrecords.kill_and_wait, leftovers)

    async def _cancel_tasks(self) -> None:
        for task in (self._main_task, self._writer_task, *self._container_tasks):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _terminate(self, grace: float, delete_object: bool) -> None:
        try:
            await self._teardown(grace, delete_object)
        except Exception:
            log.exception("terminating %s", pod_key(self.pod))
        finally:
            self.kubelet.forget(self.uid)

    async def _teardown(self, grace: float, delete_object: bool) -> None:
        await self._stop_all(grace)
        await self._cancel_tasks()
        self._gone = True
        await self.kubelet.close_forwards(self.sandbox)
        if not self.host_network:
            await self.kubelet.network.release(self.uid)
        # Volumes can be big (a fetched model); logs stay for post-mortems.
        for folder in ("volumes", "containers", "kubeconfigs"):
            await asyncio.to_thread(shutil.rmtree, self.layout.pod_dir / folder, True)
        if delete_object:
            with contextlib.suppress(ApiError):
                await self.kubelet.client.delete(
                    path_of("pods", self.pod_name, namespace=self.namespace),
                    {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}},
                )
