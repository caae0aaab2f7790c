"""Real test nodes for a `LocalCluster`: a kubelet, containerd with runc, CNI
networking, kube-proxy and kube-router's NetworkPolicy controller per node, each
node in a network namespace of its own; cluster DNS (CoreDNS) and a local image
registry that containerd uses as the mirror of the chart's default registry.

Test infrastructure (`python -m e2e.nodes up|down|status|lose|restore`). Every
program is started by `e2e.procs` and stopped by its pid. Node k's programs run
in the namespace `meshnodeN-<node>` (entered with nsenter, which keeps the
machine's mounts, so the kubelet sees the cgroup hierarchy); see
`e2e.nodes.addresses` for the address plan and `e2e.nodes.configs` for the
settings this machine needs.

Losing a node (`lose`) takes its link to the bridge down: its pods keep running
but nobody reaches them and it reaches nobody, as with a cut cable; its Lease
stops being renewed and the control plane acts as on any lost node.

Layout of the state folder:

    <state>/addresses.json         the claimed address block
    <state>/nodes.json             the nodes and their labels
    <state>/pids/*.pid, logs/*.log the programs (e2e.procs)
    <state>/registry.yaml          the registry's configuration (its blobs are
                                   kept in the cache, so pushes are incremental)
    $TMPDIR/mesh-nodes/<hash of state>/<name>/...
                                   each node's containerd, kubelet, CNI, configs
                                   (short paths: the kubelet and containerd make
                                   Unix sockets there)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from e2e import parts, pki
from e2e.cluster import ClusterError, LocalCluster
from e2e.nodes import addresses, configs, images
from e2e.nodes.addresses import AddressPlan
from e2e.nodes.configs import NodeFiles
from e2e.procs import ProcessTable
from e2e.waiting import free_port, wait_for

Obj = dict[str, Any]

FORWARD_PORT = 6443
KUBE_PROXY_USER = "system:kube-proxy"
KUBE_ROUTER_USER = "system:e2e-kube-router"
CNI_BIN_DIR = "/usr/lib/cni"
NODE_PROGRAMS = ("kube-router", "kube-proxy", "kubelet", "containerd")


class NodesError(RuntimeError):
    """A real node or a shared part could not be set up, reached or stopped."""


@dataclass
class NodeRecord:
    name: str
    index: int
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[str] = field(default_factory=list)


def default_state_dir() -> Path:
    return Path(os.environ.get("MESH_NODES_DIR", str(parts.mesh_dir() / "nodes")))


def _run(argv: Sequence[str], *, check: bool = True, input_text: str | None = None) -> str:
    result = subprocess.run(
        list(argv), capture_output=True, text=True, input=input_text, timeout=300, check=False
    )
    if check and result.returncode != 0:
        raise NodesError(f"{' '.join(argv)}: {(result.stderr or result.stdout).strip()[-400:]}")
    return result.stdout


def _write(path: Path, text: str) -> None:
    """Write a configuration file only when it changes: kube-proxy exits when its
    configuration file is rewritten under it."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _ip(*args: str, check: bool = True) -> str:
    return _run(["ip", *args], check=check)


def _in_netns(netns: str, argv: Sequence[str]) -> list[str]:
    # nsenter, not `ip netns exec`: the latter remounts /sys in a new mount
    # namespace, which hides the cgroup hierarchy the kubelet and runc need.
    return ["nsenter", f"--net=/run/netns/{netns}", "--", *argv]


class RealNodes:
    """The real nodes of one `LocalCluster`, owned by one state folder."""

    def __init__(
        self, cluster: LocalCluster, state_dir: Path, *, containerd2: bool = False
    ) -> None:
        """`containerd2`: nodes started by this object run containerd 2 (built by
        scripts/build-containerd.sh), which mounts `image` volumes, instead of
        Debian's 1.6."""
        self.cluster = cluster
        self.state_dir = state_dir.resolve()
        self.containerd2 = containerd2
        self.procs = ProcessTable(self.state_dir)
        self.record_file = self.state_dir / "nodes.json"

    # -- what is there ------------------------------------------------------------

    @property
    def plan(self) -> AddressPlan:
        return addresses.claim(self.state_dir)

    def nodes(self) -> list[NodeRecord]:
        if not self.record_file.exists():
            return []
        return [NodeRecord(**n) for n in json.loads(self.record_file.read_text())]

    def node(self, name: str) -> NodeRecord:
        for n in self.nodes():
            if n.name == name:
                return n
        raise NodesError(f"no node {name!r} in {self.state_dir}")

    @property
    def node_root(self) -> Path:
        """Where the nodes keep their files: a short folder of this state folder's
        own, since the kubelet and containerd make Unix sockets under it and a
        socket path has at most 107 bytes (a test's temporary folder is longer)."""
        digest = hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / "mesh-nodes" / digest

    def files(self, name: str) -> NodeFiles:
        return NodeFiles(self.node_root / name)

    @property
    def registry(self) -> str:
        """host:port of the local registry, as nodes and the machine reach it."""
        return f"{self.plan.host_address}:{configs.REGISTRY_PORT}"

    def infra_image(self, name: str) -> str:
        return f"{self.registry}/e2e/{name}"

    # -- lifecycle ----------------------------------------------------------------

    def up(
        self,
        nodes: Mapping[str, Mapping[str, str]],
        *,
        taints: Mapping[str, Sequence[str]] | None = None,
        push: Mapping[str, str] | None = None,
        timeout: float = 300.0,
    ) -> None:
        """Start the shared parts and every node in `nodes` (name -> labels) not
        already running; push `push` (local image -> path in the registry) first."""
        cfg = self.cluster.config()
        plan = self.plan
        self._save([*self.nodes(), *self._new_records(nodes, taints or {})])
        self._network(plan)
        self._start_shared(plan, cfg.apiserver_port)
        images.ensure_infra_images(self.registry)
        if push:
            images.push(push, self.registry)
        self._apply_cluster_objects(plan)
        for record in self.nodes():
            if record.name in nodes:
                self._start_node(plan, record)
        deadline = time.monotonic() + timeout
        for record in self.nodes():
            if record.name in nodes:
                wait_for(
                    f"node {record.name} Ready",
                    partial(self._node_ready, record.name),
                    timeout=max(1.0, deadline - time.monotonic()),
                )
                self._start_policy(plan, record)
        wait_for(
            "cluster DNS (CoreDNS) ready",
            self._dns_ready,
            timeout=max(1.0, deadline - time.monotonic()),
        )

    def lose(self, name: str) -> None:
        """Cut the node's link: its pods keep running, unreachable."""
        record = self.node(name)
        _ip("link", "set", self.plan.veth_host(record.index), "down")

    def restore(self, name: str) -> None:
        record = self.node(name)
        _ip("link", "set", self.plan.veth_host(record.index), "up")

    def stop_node(self, name: str) -> None:
        """Stop the node's programs and its pods' containers, keep its files."""
        record = self.node(name)
        self.procs.stop(f"kubelet-{name}")
        self._remove_pods(record)
        for program in ("kube-router", "kube-proxy", "containerd"):
            self.procs.stop(f"{program}-{name}")

    def remove(self, name: str) -> None:
        """Take one node out for good, the others running on: its programs and pods
        stopped, its folders unmounted and removed, its network and Node gone."""
        record = self.node(name)
        plan = self.plan
        self.stop_node(name)
        self._unmount_all(self.node_root / name)
        for other in self.nodes():
            if other.name != name:
                _ip(
                    "-n", plan.netns(other.name),
                    "route", "del", plan.pod_subnet(record.index), check=False,
                )  # fmt: skip
        _ip("route", "del", plan.pod_subnet(record.index), check=False)
        _ip("link", "del", plan.veth_host(record.index), check=False)
        _ip("netns", "del", plan.netns(name), check=False)
        self.cluster.kubectl("delete", "node", name, "--ignore-not-found", check=False)
        shutil.rmtree(self.node_root / name, ignore_errors=True)
        self._save([r for r in self.nodes() if r.name != name])

    def down(self) -> list[str]:
        """Stop everything by pid, remove pods, namespaces, the bridge and Nodes."""
        stopped = []
        records = self.nodes()
        for record in records:
            if self.procs.running(f"kubelet-{record.name}"):
                self.procs.stop(f"kubelet-{record.name}")
                stopped.append(f"kubelet-{record.name}")
            self._remove_pods(record)
        stopped += self.procs.stop_all()
        self._unmount_all()
        if self.record_file.exists() or (self.state_dir / "addresses.json").exists():
            plan = self.plan
            for record in records:
                # The host's end first: deleting it takes the pair down at once,
                # while a namespace whose name is gone lives on as long as a
                # process still in it is exiting, with the node's end inside.
                _ip("link", "del", plan.veth_host(record.index), check=False)
                _ip("netns", "del", plan.netns(record.name), check=False)
            _ip("link", "del", plan.bridge, check=False)
            addresses.release(self.state_dir, plan)
        for record in records:
            self.cluster.kubectl("delete", "node", record.name, "--ignore-not-found", check=False)
        shutil.rmtree(self.node_root, ignore_errors=True)
        self.record_file.unlink(missing_ok=True)
        return stopped

    # -- internals: network ---------------------------------------------------------

    def _new_records(
        self, nodes: Mapping[str, Mapping[str, str]], taints: Mapping[str, Sequence[str]]
    ) -> list[NodeRecord]:
        known = {n.name for n in self.nodes()}
        used = {n.index for n in self.nodes()}
        out = []
        for name, labels in nodes.items():
            if name in known:
                continue
            index = next(i for i in range(addresses.MAX_NODES) if i not in used)
            used.add(index)
            out.append(NodeRecord(name, index, dict(labels), list(taints.get(name, ()))))
        return out

    def _save(self, records: list[NodeRecord]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.record_file.write_text(json.dumps([asdict(r) for r in records], indent=2))

    def _network(self, plan: AddressPlan) -> None:
        if _ip("link", "show", plan.bridge, check=False) == "":
            _ip("link", "add", plan.bridge, "type", "bridge")
        _ip("addr", "replace", f"{plan.host_address}/24", "dev", plan.bridge)
        _ip("link", "set", plan.bridge, "up")
        records = self.nodes()
        for record in records:
            self._node_network(plan, record)
        for record in records:
            # The machine and every other node reach a node's pods through it.
            via = plan.node_address(record.index)
            _ip("route", "replace", plan.pod_subnet(record.index), "via", via)
            for other in records:
                if other.name != record.name:
                    _ip(
                        "-n", plan.netns(other.name),
                        "route", "replace", plan.pod_subnet(record.index), "via", via,
                    )  # fmt: skip

    def _node_network(self, plan: AddressPlan, record: NodeRecord) -> None:
        netns = plan.netns(record.name)
        if not Path(f"/run/netns/{netns}").exists():
            _ip("netns", "add", netns)
        host_if, node_if = plan.veth_host(record.index), plan.veth_node(record.index)
        if _ip("-n", netns, "link", "show", node_if, check=False) == "":
            # A host end left by an earlier set of nodes whose namespace was not
            # yet gone has its peer elsewhere: make the pair again.
            _ip("link", "del", host_if, check=False)
            _ip("link", "add", host_if, "type", "veth", "peer", "name", node_if, "netns", netns)
        _ip("link", "set", host_if, "master", plan.bridge, "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "addr", "replace", f"{plan.node_address(record.index)}/24", "dev", node_if)
        _ip("-n", netns, "link", "set", node_if, "up")
        # Pods reach the machine's forwarder and registry directly; nothing else
        # has a route.
        for key, value in (
            ("net.ipv4.ip_forward", "1"),
            ("net.bridge.bridge-nf-call-iptables", "1"),
            ("net.ipv4.conf.all.route_localnet", "1"),
        ):
            _run(_in_netns(netns, ["sysctl", "-q", "-w", f"{key}={value}"]), check=False)

    # -- internals: shared parts ----------------------------------------------------

    def _start_shared(self, plan: AddressPlan, apiserver_port: int) -> None:
        if not self.procs.running("registry"):
            storage = parts.cache_dir() / "registry"
            storage.mkdir(parents=True, exist_ok=True)
            conf = self.state_dir / "registry.yaml"
            conf.write_text(configs.registry_config(storage, self.registry))
            # The registry exports traces to localhost:4318 unless told not to.
            self.procs.start(
                "registry",
                [str(parts.binary("registry")), "serve", str(conf)],
                env={"OTEL_TRACES_EXPORTER": "none"},
            )
        if not self.procs.running("apiserver-forward"):
            self.procs.start(
                "apiserver-forward",
                [
                    sys.executable, "-m", "e2e.nodes.forward",
                    f"{plan.host_address}:{FORWARD_PORT}", f"127.0.0.1:{apiserver_port}",
                ],
                cwd=parts.REPO_ROOT,
            )  # fmt: skip
        wait_for("the local registry", lambda: images.registry_answers(self.registry), timeout=30)

    def _apply_cluster_objects(self, plan: AddressPlan) -> None:
        objects: list[Obj] = [
            configs.apiserver_endpoints(plan.host_address, FORWARD_PORT),
            *configs.kube_router_rbac(KUBE_ROUTER_USER),
            *configs.coredns_objects(self.infra_image(images.COREDNS_IMAGE)),
        ]
        self.cluster.kubectl(
            "apply", "--server-side", "--force-conflicts", "--field-manager=e2e-nodes", "-f", "-",
            input_text=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}),
        )  # fmt: skip

    def _kubeconfig(self, name: str, common_name: str, organization: str | None) -> Path:
        ca = pki.CertificateAuthority(self.cluster.pki_dir)
        pair = ca.issue(f"e2e-{name}", common_name, organization=organization)
        return pki.write_kubeconfig(
            self.state_dir / "kubeconfigs" / f"{name}.kubeconfig",
            f"https://{self.plan.host_address}:{FORWARD_PORT}",
            ca.pair.cert,
            pair,
            common_name,
            tls_server_name="kubernetes",
        )

    # -- internals: one node ------------------------------------------------------

    def _start_node(self, plan: AddressPlan, record: NodeRecord) -> None:
        name = record.name
        netns = plan.netns(name)
        files = self.files(name)
        node_ip = plan.node_address(record.index)
        (self.state_dir / "kubeconfigs").mkdir(parents=True, exist_ok=True)
        for folder in (
            files.containerd_config.parent,
            files.cni_conf_dir,
            files.cni_ipam_dir,
            files.kubelet_root,
            files.pod_logs,
        ):
            folder.mkdir(parents=True, exist_ok=True)
        runc = shutil.which("runc") or "runc"
        containerd = "containerd"
        if self.containerd2:
            folder = parts.containerd2_dir()
            containerd = str(folder / "containerd")
            config = configs.containerd2_config(
                files,
                self.infra_image(images.PAUSE_IMAGE),
                CNI_BIN_DIR,
                runc,
                str(folder / "containerd-shim-runc-v2"),
            )
        else:
            config = configs.containerd_config(
                files, self.infra_image(images.PAUSE_IMAGE), CNI_BIN_DIR, runc
            )
        _write(files.containerd_config, config)
        servers = {u: f"https://{u}" for u in configs.MIRRORED_REGISTRIES}
        servers[self.registry] = f"http://{self.registry}"
        for host, server in servers.items():
            hosts = files.registry_hosts / host / "hosts.toml"
            hosts.parent.mkdir(parents=True, exist_ok=True)
            _write(hosts, configs.registry_hosts_toml(server, self.registry))
        _write(
            (files.cni_conf_dir / "10-mesh-e2e.conflist"),
            configs.cni_conflist(plan.pod_subnet(record.index), files.cni_ipam_dir),
        )
        # Pods with dnsPolicy Default get this; there is no upstream resolver.
        _write(files.resolv_conf, f"nameserver {configs.CLUSTER_DNS_IP}\n")
        _write(
            files.kubelet_config,
            configs.kubelet_config(files, node_ip, self.cluster.pki_dir / "ca.crt"),
        )
        node_kc = self._kubeconfig(f"node-{name}", f"system:node:{name}", "system:nodes")
        proxy_kc = self._kubeconfig(f"kube-proxy-{name}", KUBE_PROXY_USER, None)
        _write(
            files.kube_proxy_config,
            configs.kube_proxy_config(name, node_ip, proxy_kc, plan.pod_network),
        )

        if not self.procs.running(f"containerd-{name}"):
            self.procs.start(
                f"containerd-{name}",
                [containerd, "--config", str(files.containerd_config)],
                netns=netns,
            )
        wait_for(f"containerd of {name}", files.containerd_socket.exists, timeout=30)
        if not self.procs.running(f"kubelet-{name}"):
            argv = [
                str(parts.binary("kubelet")),
                f"--config={files.kubelet_config}",
                f"--kubeconfig={node_kc}",
                f"--root-dir={files.kubelet_root}",
                f"--cert-dir={files.kubelet_root / 'pki'}",
                f"--hostname-override={name}",
                f"--node-ip={node_ip}",
                "--v=1",
            ]
            if record.labels:
                argv.append(
                    "--node-labels=" + ",".join(f"{k}={v}" for k, v in record.labels.items())
                )
            if record.taints:
                argv.append("--register-with-taints=" + ",".join(record.taints))
            self.procs.start(f"kubelet-{name}", argv, netns=netns)
        if not self.procs.running(f"kube-proxy-{name}"):
            self.procs.start(
                f"kube-proxy-{name}",
                [str(parts.binary("kube-proxy")), f"--config={files.kube_proxy_config}"],
                netns=netns,
            )

    def _start_policy(self, plan: AddressPlan, record: NodeRecord) -> None:
        """kube-router's NetworkPolicy controller; it needs the Node to exist."""
        name = record.name
        router_kc = self._kubeconfig(f"kube-router-{name}", KUBE_ROUTER_USER, None)
        if not self.procs.running(f"kube-router-{name}"):
            self.procs.start(
                f"kube-router-{name}",
                [
                    str(parts.binary("kube-router")),
                    f"--kubeconfig={router_kc}",
                    f"--hostname-override={name}",
                    "--run-firewall=true",
                    "--run-router=false",
                    "--run-service-proxy=false",
                    "--enable-ipv4=true",
                    "--enable-ipv6=false",
                    f"--health-port={free_port()}",
                    "--metrics-port=0",
                ],
                netns=plan.netns(name),
            )

    def _remove_pods(self, record: NodeRecord) -> None:
        """Stop and remove every pod of the node through the CRI, so CNI tears
        down their networks; no-op when the node's containerd is not running."""
        files = self.files(record.name)
        if not (
            self.procs.running(f"containerd-{record.name}") and files.containerd_socket.exists()
        ):
            return
        crictl = parts.binary("crictl")
        endpoint = f"unix://{files.containerd_socket}"
        _run(
            _in_netns(
                self.plan.netns(record.name),
                [
                    str(crictl),
                    "--runtime-endpoint",
                    endpoint,
                    "--timeout",
                    "60s",
                    "rmp",
                    "--all",
                    "--force",
                ],
            ),
            check=False,
        )

    def _unmount_all(self, folder: Path | None = None) -> None:
        """Unmount what the kubelet and containerd left under the node folders
        (under `folder` only, if given)."""
        if folder is not None:
            prefixes: tuple[str, ...] = (f"{folder}/",)
        else:
            prefixes = (str(self.state_dir) + "/", str(self.node_root) + "/")
        mounts = []
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/mountinfo").read_text().splitlines():
                point = line.split()[4].replace("\\040", " ")
                if point.startswith(prefixes):
                    mounts.append(point)
        for point in sorted(mounts, key=len, reverse=True):
            _run(["umount", "-l", point], check=False)

    # -- internals: readiness -----------------------------------------------------

    def _node_ready(self, name: str) -> bool:
        self._check_alive()
        out = self.cluster.kubectl("get", "node", name, "-o", "json", check=False)
        if not out.strip():
            return False
        for cond in json.loads(out).get("status", {}).get("conditions", []):
            if cond["type"] == "Ready":
                return bool(cond["status"] == "True")
        return False

    def _dns_ready(self) -> bool:
        self._check_alive()
        out = self.cluster.kubectl(
            "get", "deployment", "coredns", "-n", "kube-system", "-o", "json", check=False
        )
        return bool(out.strip()) and json.loads(out).get("status", {}).get("readyReplicas", 0) >= 1

    def _check_alive(self) -> None:
        started = {p.stem for p in self.procs.pid_dir.glob("*.pid")}
        dead = sorted(started - set(self.procs.recorded()))
        if dead:
            log = self.procs.log_dir / f"{dead[0]}.log"
            tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
            raise NodesError(f"{dead[0]} exited: {' | '.join(tail)}")


def require_root() -> None:
    if os.geteuid() != 0:
        raise NodesError("real nodes need root (network namespaces, containerd, kubelet)")
    for program in ("ip", "nsenter", "containerd", "runc", "iptables", "ipset"):
        if shutil.which(program) is None:
            raise NodesError(
                f"{program} not found: run scripts/build-node-parts.sh (via scripts/setup.sh)"
            )


__all__ = ["ClusterError", "NodesError", "RealNodes", "default_state_dir", "require_root"]
