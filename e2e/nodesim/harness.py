"""The test-side API of the node simulator: add, stop and restart simulated nodes
on a `LocalCluster`, read their pods' logs, and take everything down.

Test infrastructure. Each node is one OS process (`python -m e2e.nodesim node`)
started and stopped by pid through `e2e.procs`; its pods' containers are
processes of their own whose pids the node records. `stop_node` is a lost node:
SIGKILL to the node process and to every container it ran, nothing else (the
Lease is left to expire, pods stay bound until the control plane acts).
`down` is an orderly shutdown: SIGTERM to each node (which stops its containers
with grace), a sweep of any container left, the network torn down, and the Node
objects deleted.

Layout of the state folder:

    <state>/network.json              the claimed address block
    <state>/pids/node-<name>.pid      node processes (e2e.procs)
    <state>/logs/node-<name>.log      their output
    <state>/nodes/<name>/node.json    the node's configuration
    <state>/nodes/<name>/host/...     its hostPath volumes
    <state>/nodes/<name>/pods/<ns>_<pod>_<uid>/logs/<container>/<n>.log
    <state>/pvc/<ns>/<claim>/         PersistentVolumeClaims (shared)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from e2e import parts
from e2e.cluster import LocalCluster
from e2e.nodesim import network, pidrecords
from e2e.nodesim.config import BACKOFF_BASE_SECONDS, BACKOFF_CAP_SECONDS, NodeConfig
from e2e.procs import ProcessTable, alive

Obj = dict[str, Any]

NODE_STOP_GRACE_SECONDS = 20.0


class NodeSimError(RuntimeError):
    """A simulated node could not be started, reached or stopped."""


@dataclass(frozen=True)
class SimulatedNode:
    name: str
    index: int
    address: str
    state_dir: Path
    pid: int | None

    @property
    def running(self) -> bool:
        return self.pid is not None


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def default_state_dir() -> Path:
    return Path(os.environ.get("MESH_NODESIM_DIR", str(parts.mesh_dir() / "nodesim")))


class SimulatedCluster:
    """Simulated nodes of one `LocalCluster`, owned by one state folder.

    `network` is "bridge" (a network namespace per pod, needs root), "loopback"
    (127.x addresses, no Services) or "auto" (bridge when possible).
    `loopback_forwards` are extra ports of the machine's 127.0.0.1 that pods
    should reach at their own 127.0.0.1 (the API server's port always is).
    The restart back-off defaults to the kubelet's (10 s doubling to 5 min);
    MESH_NODESIM_BACKOFF_BASE_SECONDS / MESH_NODESIM_BACKOFF_CAP_SECONDS change it.
    """

    def __init__(
        self,
        cluster: LocalCluster,
        state_dir: Path,
        *,
        network_mode: str = "auto",
        loopback_forwards: Sequence[int] = (),
        executables: Mapping[str, Path] | None = None,
        backoff_base_seconds: float | None = None,
        backoff_cap_seconds: float | None = None,
        lease_renew_seconds: float | None = None,
    ) -> None:
        self.cluster = cluster
        self.state_dir = state_dir.resolve()
        self.procs = ProcessTable(self.state_dir)
        if network_mode == "auto":
            usable, _ = network.bridge_mode_available()
            network_mode = "bridge" if usable else "loopback"
        elif network_mode == "bridge":
            usable, why = network.bridge_mode_available()
            if not usable:
                raise NodeSimError(f"network namespaces unavailable: {why}")
        self.network_mode = network_mode
        self.loopback_forwards = list(loopback_forwards)
        self.executables = {k: str(v) for k, v in (executables or {}).items()}
        self.backoff_base = backoff_base_seconds or _env_float(
            "MESH_NODESIM_BACKOFF_BASE_SECONDS", BACKOFF_BASE_SECONDS
        )
        self.backoff_cap = backoff_cap_seconds or _env_float(
            "MESH_NODESIM_BACKOFF_CAP_SECONDS", BACKOFF_CAP_SECONDS
        )
        self.lease_renew_seconds = lease_renew_seconds
        self._net: network.ClusterNetwork | None = None

    # -- network -------------------------------------------------------------------

    @property
    def net(self) -> network.ClusterNetwork:
        if self._net is None:
            self._net = network.claim_network(self.state_dir, self.network_mode)
        return self._net

    @property
    def host_address(self) -> str:
        """The machine's address as pods see it (bind a test service here or on 0.0.0.0)."""
        return self.net.host_address

    # -- nodes -----------------------------------------------------------------------

    def _node_dir(self, name: str) -> Path:
        return self.state_dir / "nodes" / name

    def _config_file(self, name: str) -> Path:
        return self._node_dir(name) / "node.json"

    def _proc_name(self, name: str) -> str:
        return f"node-{name}"

    def _configs(self) -> dict[str, NodeConfig]:
        found: dict[str, NodeConfig] = {}
        folder = self.state_dir / "nodes"
        if folder.is_dir():
            for path in sorted(folder.glob("*/node.json")):
                cfg = NodeConfig.read(path)
                found[cfg.name] = cfg
        return found

    def nodes(self) -> list[SimulatedNode]:
        table = self.procs.recorded()
        return [
            SimulatedNode(
                name,
                int(cfg.address.split(".")[2]),
                cfg.address,
                Path(cfg.state_dir),
                table.get(self._proc_name(name)),
            )
            for name, cfg in self._configs().items()
        ]

    def node(self, name: str) -> SimulatedNode:
        for node in self.nodes():
            if node.name == name:
                return node
        raise NodeSimError(f"no simulated node {name!r} in {self.state_dir}")

    def add_node(
        self,
        name: str,
        *,
        labels: Mapping[str, str] | None = None,
        cpu: str = "4",
        memory: str = "8Gi",
        pods: int = 110,
        taints: Sequence[Mapping[str, str]] = (),
        wait: bool = True,
        timeout: float = 60.0,
    ) -> SimulatedNode:
        """Register a node and start its process; wait until the Node is Ready."""
        configs = self._configs()
        if name in configs:
            return self.start_node(name, wait=wait, timeout=timeout)
        used = {int(c.address.split(".")[2]) for c in configs.values()}
        free = [i for i in range(1, network.MAX_NODES + 1) if i not in used]
        if not free:
            raise NodeSimError("no free node address")
        index = free[0]
        net = self.net
        api_port = self.cluster.config().apiserver_port
        cfg = NodeConfig(
            name=name,
            kubeconfig=str(self.cluster.node_kubeconfig(name)),
            state_dir=str(self._node_dir(name)),
            shared_dir=str(self.state_dir),
            network_mode=net.mode,
            address=net.node_address(index),
            pod_prefix=net.pod_prefix(index),
            netns_prefix=net.netns_prefix(index),
            veth_prefix=net.veth_prefix(index),
            bridge=net.bridge,
            loopback_forwards=sorted({api_port, *self.loopback_forwards}),
            labels=dict(labels or {}),
            taints=[dict(t) for t in taints],
            cpu=cpu,
            memory=memory,
            pods=pods,
            backoff_base_seconds=self.backoff_base,
            backoff_cap_seconds=self.backoff_cap,
            executables=dict(self.executables),
        )
        if self.lease_renew_seconds is not None:
            cfg.lease_renew_seconds = self.lease_renew_seconds
        cfg.write(self._config_file(name))
        return self.start_node(name, wait=wait, timeout=timeout)

    def start_node(self, name: str, *, wait: bool = True, timeout: float = 60.0) -> SimulatedNode:
        """(Re)start a node's process; a restarted node runs its pods again."""
        config_file = self._config_file(name)
        if not config_file.exists():
            raise NodeSimError(f"no simulated node {name!r}: add_node first")
        self.net.setup()
        proc = self._proc_name(name)
        if not self.procs.running(proc):
            self.procs.start(
                proc,
                [sys.executable, "-m", "e2e.nodesim", "node", "--config", str(config_file)],
                env={
                    "PYTHONPATH": os.pathsep.join(
                        filter(None, [str(parts.REPO_ROOT), os.environ.get("PYTHONPATH")])
                    )
                },
                cwd=parts.REPO_ROOT,
            )
        if wait:
            self.wait_ready(name, timeout)
        return self.node(name)

    def stop_node(self, name: str) -> list[int]:
        """Lose the node: SIGKILL its process and every container it ran, by pid.

        Nothing is said to the API server; returns the pids killed."""
        killed: list[int] = []
        pid = self.procs.recorded().get(self._proc_name(name))
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
            killed.append(pid)
        (self.procs.pid_dir / f"{self._proc_name(name)}.pid").unlink(missing_ok=True)
        records = self._container_records(name)
        pidrecords.kill_and_wait(records)
        killed.extend(r.pid for r in records)
        return killed

    def _container_records(self, name: str) -> list[pidrecords.PidRecord]:
        pods = self._node_dir(name) / "pods"
        if not pods.is_dir():
            return []
        return list(pidrecords.live_records(pods, "*/pids/*.json").values())

    def delete_node(self, name: str) -> None:
        """Stop the node and delete its Node object (its pods are then garbage-collected)."""
        self.stop_node(name)
        self.cluster.kubectl("delete", "node", name, "--ignore-not-found", "--wait=false")
        cfg = self._configs().get(name)
        if cfg is not None and cfg.netns_prefix:
            network.delete_namespaces(cfg.netns_prefix)

    def down(self, delete_nodes: bool = True) -> list[str]:
        """Stop every node (its containers with grace), sweep, release the network."""
        names = list(self._configs())
        stopped = []
        for name in names:
            proc = self._proc_name(name)
            if self.procs.running(proc):
                self.procs.stop(proc, grace=NODE_STOP_GRACE_SECONDS)
                stopped.append(name)
        for name in names:
            pidrecords.kill_and_wait(self._container_records(name))
        if delete_nodes and names:
            with contextlib.suppress(Exception):
                self.cluster.kubectl(
                    "delete", "node", *names, "--ignore-not-found", "--wait=false", check=False
                )
        if (self.state_dir / "network.json").exists():
            self.net.release()
            (self.state_dir / "network.json").unlink(missing_ok=True)
            self._net = None
        return stopped

    # -- the API, as the admin ----------------------------------------------------

    def api_get(self, path: str) -> Obj | None:
        cfg = self.cluster.config()
        pki_dir = self.cluster.pki_dir
        ctx = ssl.create_default_context(cafile=str(pki_dir / "ca.crt"))
        ctx.load_cert_chain(str(pki_dir / "admin.crt"), str(pki_dir / "admin.key"))
        try:
            with urllib.request.urlopen(cfg.server + path, timeout=10, context=ctx) as resp:
                result: Obj = json.loads(resp.read())
                return result
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def node_ready(self, name: str) -> str:
        """The Node's Ready condition status: "True", "False", "Unknown" or "" (absent)."""
        node = self.api_get(f"/api/v1/nodes/{quote(name)}")
        for cond in ((node or {}).get("status") or {}).get("conditions") or []:
            if cond.get("type") == "Ready":
                return str(cond.get("status"))
        return ""

    def wait_ready(self, name: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        proc = self._proc_name(name)
        while time.monotonic() < deadline:
            if not self.procs.running(proc):
                raise NodeSimError(f"node {name} exited: {self._tail(name)}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                if self.node_ready(name) == "True":
                    return
            time.sleep(0.3)
        raise NodeSimError(f"node {name} not Ready in {timeout:.0f}s: {self._tail(name)}")

    def _tail(self, name: str) -> str:
        log = self.procs.log_dir / f"{self._proc_name(name)}.log"
        if not log.exists():
            return "no log"
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-5:])

    # -- pods --------------------------------------------------------------------------

    def pod_dirs(self, namespace: str, pod: str) -> list[Path]:
        """State folders of every incarnation of the pod, oldest first."""
        found = list((self.state_dir / "nodes").glob(f"*/pods/{namespace}_{pod}_*"))
        return sorted(found, key=lambda p: p.stat().st_mtime)

    def pod_log(
        self,
        namespace: str,
        pod: str,
        container: str | None = None,
        *,
        previous: bool = False,
    ) -> str:
        """The pod's container output, like `kubectl logs [--previous]`."""
        dirs = self.pod_dirs(namespace, pod)
        if not dirs:
            raise NodeSimError(f"no pod {namespace}/{pod} ran on a simulated node")
        logs = dirs[-1] / "logs"
        if container is None:
            names = sorted(p.name for p in logs.iterdir()) if logs.is_dir() else []
            if len(names) != 1:
                raise NodeSimError(f"pod {namespace}/{pod} has containers {names}: name one")
            container = names[0]
        runs = sorted((logs / container).glob("*.log"), key=lambda p: int(p.stem))
        if previous:
            runs = runs[:-1]
        return runs[-1].read_text(errors="replace") if runs else ""

    def container_pids(self, namespace: str, pod: str) -> dict[str, int]:
        """Pids of the pod's running containers (by container name)."""
        pids: dict[str, int] = {}
        for folder in self.pod_dirs(namespace, pod):
            for path, record in pidrecords.live_records(folder / "pids").items():
                pids[path.stem] = record.pid
        return pids

    def status(self) -> dict[str, int | None]:
        return {node.name: node.pid for node in self.nodes()}
