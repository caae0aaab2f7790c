"""The simulated node's process: a small kubelet that runs pods as local processes.

Test infrastructure. `python -m e2e.nodesim node --config <node>/node.json` runs
one `Kubelet`: it registers the Node and keeps its Lease (`heartbeat`), lists
and watches the pods bound to it (field selector spec.nodeName, as the Node
authorizer requires), runs one `PodWorker` per pod, reads the Secrets and
ConfigMaps its pods refer to, asks the TokenRequest API for their service
account tokens and records Events. All of it with the node's own credentials
(system:node:<name>), so the Node authorizer and NodeRestriction judge it.

On SIGTERM (the harness's `down`) it stops its containers, with their grace
period capped, and exits without touching the API: a node shut down. SIGKILL
(a lost node) leaves everything as it is, for the harness to kill by pid.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp

from e2e.nodesim import heartbeat, pidrecords
from e2e.nodesim.apiproxy import serve_forward
from e2e.nodesim.config import NodeConfig
from e2e.nodesim.environment import ConfigError
from e2e.nodesim.kubeapi import ApiError, KubeClient, WatchExpiredError, load_kubeconfig, path_of
from e2e.nodesim.network import NetworkError, NodeNetwork, Sandbox, listen_in_netns
from e2e.nodesim.pods import PodWorker, pod_dir_name, pod_key
from e2e.nodesim.status import now_rfc3339

Obj = dict[str, Any]
log = logging.getLogger("nodesim.kubelet")

SHUTDOWN_GRACE_CAP_SECONDS = 10.0
EVENT_REPEAT_SECONDS = 60.0
EVENT_MEMORY = 1000


class NodeObjects:
    """Secrets, ConfigMaps and tokens, read with the node's credentials."""

    def __init__(self, client: KubeClient) -> None:
        self.client = client

    async def _get(self, resource: str, namespace: str, name: str) -> Obj | None:
        try:
            return await self.client.get_or_none(path_of(resource, name, namespace=namespace))
        except ApiError as exc:
            # 403: the Node authorizer has not linked the object to a pod here yet.
            raise ConfigError(f"cannot read {resource} {namespace}/{name}: {exc}") from exc

    async def configmap(self, namespace: str, name: str) -> dict[str, str] | None:
        obj = await self._get("configmaps", namespace, name)
        if obj is None:
            return None
        data = dict(obj.get("data") or {})
        for key, value in (obj.get("binaryData") or {}).items():
            data[key] = base64.b64decode(value).decode(errors="replace")
        return data

    async def secret(self, namespace: str, name: str) -> dict[str, str] | None:
        obj = await self._get("secrets", namespace, name)
        if obj is None:
            return None
        return {
            k: base64.b64decode(v).decode(errors="replace")
            for k, v in (obj.get("data") or {}).items()
        }

    async def token(self, pod: Obj, audience: str | None, expiration_seconds: int) -> str:
        meta = pod["metadata"]
        account = pod.get("spec", {}).get("serviceAccountName") or "default"
        spec: Obj = {
            "expirationSeconds": max(expiration_seconds, 600),
            # Bound to the pod: NodeRestriction requires it, and the token dies with the pod.
            "boundObjectRef": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta["name"],
                "uid": meta["uid"],
            },
        }
        if audience:
            spec["audiences"] = [audience]
        try:
            answer = await self.client.create(
                path_of(
                    "serviceaccounts",
                    account,
                    namespace=meta["namespace"],
                    subresource="token",
                ),
                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
            )
        except ApiError as exc:
            raise ConfigError(f"token for service account {account}: {exc}") from exc
        return str(answer["status"]["token"])


class EventRecorder:
    """Events about pods, as the kubelet emits them (best effort, deduplicated)."""

    def __init__(self, client: KubeClient, node: str) -> None:
        self.client = client
        self.node = node
        self._recent: dict[tuple[str, str, str], float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def record(self, pod: Obj, kind: str, reason: str, message: str, container: str | None) -> None:
        meta = pod["metadata"]
        key = (meta["uid"], reason, message)
        loop = asyncio.get_running_loop()
        if loop.time() - self._recent.get(key, -1e9) < EVENT_REPEAT_SECONDS:
            return
        if len(self._recent) > EVENT_MEMORY:
            self._recent = {
                k: t for k, t in self._recent.items() if loop.time() - t < EVENT_REPEAT_SECONDS
            }
        self._recent[key] = loop.time()
        involved: Obj = {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
        }
        if container:
            involved["fieldPath"] = f"spec.containers{{{container}}}"
        now = now_rfc3339()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": involved,
            "reason": reason,
            "message": message[:1024],
            "type": kind,
            "source": {"component": "kubelet", "host": self.node},
            "reportingComponent": "kubelet",
            "reportingInstance": self.node,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        task = asyncio.create_task(self._send(meta["namespace"], event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, namespace: str, event: Obj) -> None:
        try:
            await self.client.create(path_of("events", namespace=namespace), event)
        except Exception as exc:
            log.debug("event not recorded: %s", exc)


class Kubelet:
    """One simulated node; see the module docstring."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        creds = load_kubeconfig(Path(config.kubeconfig))
        self.client = KubeClient(creds, config.state_path / "credentials")
        # Pods reach the API server at the same URL: in its own namespace each
        # pod's 127.0.0.1:<port> is forwarded to the machine's.
        self.pod_api_server = creds.server
        self.network = NodeNetwork(config)
        self.objects = NodeObjects(self.client)
        self.events = EventRecorder(self.client, config.name)
        self.allocatable = {"cpu": config.cpu, "memory": config.memory}
        self.workers: dict[str, PodWorker] = {}
        self._finished: set[str] = set()
        self._forwards: dict[str, list[asyncio.Server]] = {}
        self._http: aiohttp.ClientSession | None = None

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            # A fresh connection per probe, as the kubelet does.
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True, limit=0)
            )
        return self._http

    # -- lifecycle --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        node = await heartbeat.register(self.client, cfg)
        log.info("node %s registered at %s", cfg.name, cfg.address)
        node_sandbox = await self.network.setup_node()
        await self.open_forwards(node_sandbox)
        tasks = [
            asyncio.create_task(heartbeat.keep_alive(self.client, cfg, node["metadata"]["uid"])),
            asyncio.create_task(self._sync_pods()),
        ]
        await stop.wait()
        log.info("node %s shutting down", cfg.name)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(
            *(
                w.shutdown(min(w.grace_seconds(), SHUTDOWN_GRACE_CAP_SECONDS))
                for w in self.workers.values()
            )
        )
        for servers in self._forwards.values():
            for server in servers:
                server.close()
        if self._http is not None:
            await self._http.close()
        await self.client.close()

    # -- forwarding the API server into pod namespaces ------------------------------

    async def open_forwards(self, sandbox: Sandbox) -> None:
        if sandbox.netns is None or sandbox.netns in self._forwards:
            return
        servers = []
        for port in self.config.loopback_forwards:
            sock: socket.socket = await asyncio.to_thread(
                listen_in_netns, sandbox.netns, "127.0.0.1", port
            )
            servers.append(await serve_forward(sock, "127.0.0.1", port))
        self._forwards[sandbox.netns] = servers

    async def close_forwards(self, sandbox: Sandbox | None) -> None:
        if sandbox is None or sandbox.netns is None:
            return
        if sandbox == self.network.node_sandbox:
            return
        for server in self._forwards.pop(sandbox.netns, []):
            server.close()

    # -- pods ---------------------------------------------------------------------------

    async def _sync_pods(self) -> None:
        path = path_of("pods")
        selector = {"fieldSelector": f"spec.nodeName={self.config.name}"}
        first = True
        while True:
            try:
                listing = await self.client.request("GET", path, params=selector, timeout=60)
                items = listing.get("items") or []
                self._reconcile(items, first)
                first = False
                version = listing["metadata"]["resourceVersion"]
                while True:
                    async for kind, obj in self.client.watch(path, version, selector):
                        if kind == "BOOKMARK":
                            version = obj["metadata"]["resourceVersion"]
                            continue
                        version = obj["metadata"].get("resourceVersion", version)
                        self._on_event(kind, obj)
            except WatchExpiredError:
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("pod watch of %s: %r; listing again", self.config.name, exc)
                await asyncio.sleep(1)

    def _reconcile(self, pods: list[Obj], first: bool) -> None:
        seen = {p["metadata"]["uid"] for p in pods}
        for pod in pods:
            self._on_event("MODIFIED", pod)
        for uid, worker in list(self.workers.items()):
            if uid not in seen:
                # Deleted while the watch was down.
                self._on_event("DELETED", worker.pod)
        if first:
            self._forget_stale(seen)

    def _forget_stale(self, live: set[str]) -> None:
        """At start: kill and release what pods deleted while the node was down left."""
        pods_dir = self.config.state_path / "pods"
        if pods_dir.is_dir():
            for pod_dir in pods_dir.iterdir():
                uid = pod_dir.name.rsplit("_", 1)[-1]
                if uid in live:
                    continue
                leftovers = list(pidrecords.live_records(pod_dir / "pids").values())
                if leftovers:
                    pidrecords.kill_and_wait(leftovers)
        for uid in self.network.known():
            if uid not in live:
                task = asyncio.create_task(self.network.release(uid))
                task.add_done_callback(lambda t: t.exception())

    def _on_event(self, kind: str, pod: Obj) -> None:
        uid = pod["metadata"]["uid"]
        if uid in self._finished:
            return
        worker = self.workers.get(uid)
        if kind == "DELETED":
            if worker is not None:
                worker.terminate(worker.grace_seconds(), False)
            return
        if worker is not None:
            worker.update(pod)
            return
        deleting = bool(pod["metadata"].get("deletionTimestamp"))
        phase = (pod.get("status") or {}).get("phase")
        if not deleting and phase in ("Succeeded", "Failed"):
            return
        worker = PodWorker(self, pod)
        self.workers[uid] = worker
        if deleting:
            # Bound here and deleted while the node was down: clean up, then delete.
            worker.terminate(0, True)
            return
        log.info("starting pod %s (%s)", pod_key(pod), pod_dir_name(pod))
        worker.start()

    def forget(self, uid: str) -> None:
        """A worker is done with its pod: events about that uid are ignored from now on."""
        self.workers.pop(uid, None)
        self._finished.add(uid)


async def _main(config: NodeConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    kubelet = Kubelet(config)
    await kubelet.run(stop)


def run_node(config_path: Path) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = NodeConfig.read(config_path)
    try:
        asyncio.run(_main(config))
    except (ApiError, NetworkError) as exc:
        log.error("node %s: %s", config.name, exc)
        return 1
    return 0
