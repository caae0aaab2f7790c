"""A real Kubernetes control plane as local processes: etcd, kube-apiserver (TLS,
RBAC, admission), kube-controller-manager, kube-scheduler and kwok.

Test infrastructure, built by `scripts/build-toolchain.sh` from the official Go
modules. Usage:

    python -m e2e.cluster up   [--state-dir DIR]   # starts, waits for /readyz, prints kubeconfig
    python -m e2e.cluster down [--state-dir DIR]   # stops every process it started, by pid
    python -m e2e.cluster status

Ports are picked free at `up` and kept in `<state>/cluster.json`, so several
clusters (one per test session) can run side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from e2e import parts, pki
from e2e.procs import ProcessTable
from e2e.waiting import free_port, wait_for

K8S_VERSION = "v1.34.4"
SERVICE_CIDR = "10.96.0.0/16"
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
STOP_ORDER = ("kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd")


class ClusterError(RuntimeError):
    """The local control plane could not be started or reached."""


@dataclass
class ClusterConfig:
    etcd_port: int
    etcd_peer_port: int
    apiserver_port: int
    controller_manager_port: int
    scheduler_port: int
    kwok_port: int
    node_lease_seconds: int = 40
    node_monitor_grace_seconds: int = 50

    @classmethod
    def pick(cls, **overrides: int) -> ClusterConfig:
        ports = [free_port() for _ in range(6)]
        while len(set(ports)) < 6:
            ports = [free_port() for _ in range(6)]
        return cls(*ports, **overrides)

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"


class LocalCluster:
    """One local control plane, owned by one state folder."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir.resolve()
        self.pki_dir = self.state_dir / "pki"
        self.procs = ProcessTable(self.state_dir)
        self.config_file = self.state_dir / "cluster.json"

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    def config(self) -> ClusterConfig:
        if not self.config_file.exists():
            raise ClusterError(f"no cluster in {self.state_dir}: run `python -m e2e.cluster up`")
        return ClusterConfig(**json.loads(self.config_file.read_text()))

    # -- lifecycle -----------------------------------------------------------

    def up(
        self,
        timeout: float = 180.0,
        node_lease_seconds: int = 40,
        node_monitor_grace_seconds: int = 50,
    ) -> ClusterConfig:
        """Start every component not already running and wait until the cluster works.

        The two node settings apply to a new cluster; a running one keeps its own
        (see `set_node_monitor_grace`).
        """
        bins = {name: parts.binary(name) for name in COMPONENTS}
        running = self.procs.recorded()
        if running and self.config_file.exists():
            cfg = self.config()
        else:
            self.procs.stop_all(STOP_ORDER)
            shutil.rmtree(self.state_dir / "etcd-data", ignore_errors=True)
            cfg = ClusterConfig.pick(
                node_lease_seconds=node_lease_seconds,
                node_monitor_grace_seconds=node_monitor_grace_seconds,
            )
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self.config_file.write_text(json.dumps(asdict(cfg), indent=2))
            running = {}
        files = self._write_pki(cfg)
        deadline = time.monotonic() + timeout

        if "etcd" not in running:
            self.procs.start("etcd", self._etcd_argv(bins["etcd"], cfg))
        self._wait(f"http://127.0.0.1:{cfg.etcd_port}/health", deadline, "etcd")
        if "kube-apiserver" not in running:
            self.procs.start("kube-apiserver", self._apiserver_argv(bins, cfg, files))
        self._wait(f"{cfg.server}/readyz", deadline, "kube-apiserver", authenticated=True)
        if "kube-controller-manager" not in running:
            self.procs.start("kube-controller-manager", self._cm_argv(bins, cfg, files))
        if "kube-scheduler" not in running:
            self.procs.start("kube-scheduler", self._scheduler_argv(bins, cfg, files))
        if "kwok" not in running:
            self.procs.start("kwok", self._kwok_argv(bins, cfg))
        self._wait(
            f"https://127.0.0.1:{cfg.controller_manager_port}/healthz",
            deadline,
            "kube-controller-manager",
        )
        self._wait(f"https://127.0.0.1:{cfg.scheduler_port}/healthz", deadline, "kube-scheduler")
        self._wait(f"http://127.0.0.1:{cfg.kwok_port}/healthz", deadline, "kwok")
        # Pods cannot be created before the controller-manager has made the
        # namespace's default service account: wait for it too.
        self._wait(
            f"{cfg.server}/api/v1/namespaces/default/serviceaccounts/default",
            deadline,
            "default service account",
            authenticated=True,
        )
        return cfg

    def set_node_monitor_grace(self, seconds: int, timeout: float = 60.0) -> int:
        """Restart the controller-manager with another node-monitor-grace-period.

        Node-loss tests use a short grace so the node lifecycle controller marks a
        stopped node NotReady quickly. Returns the previous value.
        """
        cfg = self.config()
        previous = cfg.node_monitor_grace_seconds
        if previous == seconds and self.procs.running("kube-controller-manager"):
            return previous
        cfg.node_monitor_grace_seconds = seconds
        # A fresh port: the old one may have gone to some client's outgoing
        # connection since the cluster started (ports come from the same range).
        cfg.controller_manager_port = free_port()
        self.config_file.write_text(json.dumps(asdict(cfg), indent=2))
        bins = {name: parts.binary(name) for name in COMPONENTS}
        files = self._write_pki(cfg)
        self.procs.stop("kube-controller-manager")
        self.procs.start("kube-controller-manager", self._cm_argv(bins, cfg, files))
        self._wait(
            f"https://127.0.0.1:{cfg.controller_manager_port}/healthz",
            time.monotonic() + timeout,
            "kube-controller-manager",
        )
        return previous

    def node_kubeconfig(self, node: str) -> Path:
        """A kubeconfig with the node's own identity (CN=system:node:<node>,
        O=system:nodes), judged by the Node authorizer and NodeRestriction."""
        cfg = self.config()
        ca = pki.CertificateAuthority(self.pki_dir)
        pair = ca.issue(f"node-{node}", f"system:node:{node}", organization="system:nodes")
        return pki.write_kubeconfig(
            self.pki_dir / f"node-{node}.kubeconfig",
            cfg.server,
            ca.pair.cert,
            pair,
            f"system:node:{node}",
        )

    def down(self) -> list[str]:
        stopped = self.procs.stop_all(STOP_ORDER)
        return stopped

    def status(self) -> dict[str, int]:
        return self.procs.recorded()

    # -- clients ---------------------------------------------------------------

    def kubectl(self, *args: str, check: bool = True, input_text: str | None = None) -> str:
        """Run the built kubectl against this cluster and return its stdout."""
        result = subprocess.run(
            [str(parts.binary("kubectl")), "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True,
            text=True,
            input=input_text,
            timeout=120,
            check=False,
        )
        if check and result.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def wait_established(self, *crds: str, timeout: float = 60.0) -> None:
        """Wait until each CRD (`meshpools.mesh.dev`) serves. Polled rather than
        `kubectl wait`, which fails instead of waiting while a CRD just created
        has no status conditions yet."""
        jsonpath = '{.status.conditions[?(@.type=="Established")].status}'
        for crd in crds:
            wait_for(
                f"CRD {crd} Established",
                lambda crd=crd: (
                    self.kubectl(  # type: ignore[misc]
                        "get", f"crd/{crd}", "-o", f"jsonpath={jsonpath}", check=False
                    ).strip()
                    == "True"
                ),
                timeout=timeout,
            )

    def add_kwok_node(
        self,
        name: str,
        *,
        gpus: int = 0,
        cpu: str = "16",
        memory: str = "64Gi",
        labels: dict[str, str] | None = None,
    ) -> None:
        """Register a simulated node that kwok keeps Ready (and its Lease renewed)."""
        capacity = {"cpu": cpu, "memory": memory, "pods": "110"}
        if gpus:
            capacity["nvidia.com/gpu"] = str(gpus)
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {KWOK_NODE_ANNOTATION: "fake"},
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                    **(labels or {}),
                },
            },
            "spec": {
                "taints": [{"key": KWOK_NODE_ANNOTATION, "value": "fake", "effect": "NoSchedule"}]
            },
            "status": {"capacity": capacity, "allocatable": capacity},
        }
        self.kubectl("apply", "-f", "-", input_text=json.dumps(node))

    # -- internals -------------------------------------------------------------

    def _write_pki(self, cfg: ClusterConfig) -> dict[str, Path]:
        ca = pki.CertificateAuthority(self.pki_dir)
        serving = ca.issue(
            "apiserver",
            "kube-apiserver",
            server_names=(
                "127.0.0.1",
                "localhost",
                "10.96.0.1",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ),
            client=False,
        )
        admin = ca.issue("admin", "mesh-admin", organization="system:masters")
        cm = ca.issue("controller-manager", "system:kube-controller-manager")
        sched = ca.issue("scheduler", "system:kube-scheduler")
        # How the API server authenticates to real kubelets (logs, exec, port-forward).
        kubelet_client = ca.issue(
            "apiserver-kubelet-client",
            "kube-apiserver-kubelet-client",
            organization="system:masters",
        )
        sa = pki.write_service_account_keys(self.pki_dir)
        pki.write_kubeconfig(self.kubeconfig, cfg.server, ca.pair.cert, admin, "mesh-admin")
        cm_kc = pki.write_kubeconfig(
            self.pki_dir / "controller-manager.kubeconfig",
            cfg.server,
            ca.pair.cert,
            cm,
            "system:kube-controller-manager",
        )
        sched_kc = pki.write_kubeconfig(
            self.pki_dir / "scheduler.kubeconfig",
            cfg.server,
            ca.pair.cert,
            sched,
            "system:kube-scheduler",
        )
        return {
            "ca": ca.pair.cert,
            "ca_key": ca.pair.key,
            "serving_cert": serving.cert,
            "serving_key": serving.key,
            "admin_cert": admin.cert,
            "admin_key": admin.key,
            "sa_pub": sa.cert,
            "sa_key": sa.key,
            "cm_kubeconfig": cm_kc,
            "sched_kubeconfig": sched_kc,
            "kubelet_client_cert": kubelet_client.cert,
            "kubelet_client_key": kubelet_client.key,
        }

    def _etcd_argv(self, etcd: Path, cfg: ClusterConfig) -> list[str]:
        client = f"http://127.0.0.1:{cfg.etcd_port}"
        peer = f"http://127.0.0.1:{cfg.etcd_peer_port}"
        return [
            str(etcd),
            "--name=mesh-local",
            f"--data-dir={self.state_dir / 'etcd-data'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=mesh-local={peer}",
            "--log-level=warn",
            # Tests do not need durability across a power cut; they need speed.
            "--unsafe-no-fsync",
        ]

    def _apiserver_argv(
        self, bins: dict[str, Path], cfg: ClusterConfig, files: dict[str, Path]
    ) -> list[str]:
        return [
            str(bins["kube-apiserver"]),
            f"--etcd-servers=http://127.0.0.1:{cfg.etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={cfg.apiserver_port}",
            f"--cert-dir={self.state_dir / 'apiserver-certs'}",
            f"--tls-cert-file={files['serving_cert']}",
            f"--tls-private-key-file={files['serving_key']}",
            f"--client-ca-file={files['ca']}",
            f"--service-account-key-file={files['sa_pub']}",
            f"--service-account-signing-key-file={files['sa_key']}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            # Not on by default; real clusters enable it so a node can only touch
            # its own Node, Lease and pods (simulated nodes use node credentials).
            "--enable-admission-plugins=NodeRestriction",
            "--allow-privileged=true",
            # Pods with `image` volumes (model images): beta and off by default in
            # 1.34; without the gate the API server drops the volume's source.
            "--feature-gates=ImageVolume=true",
            f"--kubelet-client-certificate={files['kubelet_client_cert']}",
            f"--kubelet-client-key={files['kubelet_client_key']}",
            "--kubelet-preferred-address-types=InternalIP",
            # No kubelet registers an endpoint for the `kubernetes` Service here and
            # a loopback address is not a valid endpoint.
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            "--v=1",
        ]

    def _cm_argv(
        self, bins: dict[str, Path], cfg: ClusterConfig, files: dict[str, Path]
    ) -> list[str]:
        kc = str(files["cm_kubeconfig"])
        return [
            str(bins["kube-controller-manager"]),
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1",
            f"--secure-port={cfg.controller_manager_port}",
            f"--cert-dir={self.state_dir / 'controller-manager-certs'}",
            f"--service-account-private-key-file={files['sa_key']}",
            f"--root-ca-file={files['ca']}",
            f"--cluster-signing-cert-file={files['ca']}",
            f"--cluster-signing-key-file={files['ca_key']}",
            "--use-service-account-credentials=true",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--node-monitor-grace-period={cfg.node_monitor_grace_seconds}s",
            "--leader-elect=false",
            "--profiling=false",
            "--v=1",
        ]

    def _scheduler_argv(
        self, bins: dict[str, Path], cfg: ClusterConfig, files: dict[str, Path]
    ) -> list[str]:
        kc = str(files["sched_kubeconfig"])
        return [
            str(bins["kube-scheduler"]),
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1",
            f"--secure-port={cfg.scheduler_port}",
            f"--cert-dir={self.state_dir / 'scheduler-certs'}",
            "--leader-elect=false",
            "--profiling=false",
            "--v=1",
        ]

    def _kwok_argv(self, bins: dict[str, Path], cfg: ClusterConfig) -> list[str]:
        return [
            str(bins["kwok"]),
            f"--kubeconfig={self.kubeconfig}",
            f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
            f"--node-lease-duration-seconds={cfg.node_lease_seconds}",
            f"--server-address=127.0.0.1:{cfg.kwok_port}",
            "--cidr=10.244.0.1/16",
        ]

    def _ssl(self, authenticated: bool) -> ssl.SSLContext:
        if authenticated:
            ctx = ssl.create_default_context(cafile=str(self.pki_dir / "ca.crt"))
            ctx.load_cert_chain(str(self.pki_dir / "admin.crt"), str(self.pki_dir / "admin.key"))
            return ctx
        # The controller-manager and scheduler serve /healthz on a self-signed
        # certificate of their own; only liveness is checked there.
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def _wait(self, url: str, deadline: float, what: str, authenticated: bool = False) -> None:
        ctx = self._ssl(authenticated) if url.startswith("https") else None
        last = "no answer"
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with urllib.request.urlopen(url, timeout=5, context=ctx) as resp:
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}"
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
            except (urllib.error.URLError, OSError) as exc:
                last = str(getattr(exc, "reason", exc))
            time.sleep(0.3)
        raise ClusterError(f"{what} not ready at {url} ({last}); logs in {self.procs.log_dir}")

    def _check_alive(self) -> None:
        if not self.procs.pid_dir.is_dir():
            return
        started = {p.stem for p in self.procs.pid_dir.glob("*.pid")}
        dead = sorted(started - set(self.procs.recorded()))
        if dead:
            log = self.procs.log_dir / f"{dead[0]}.log"
            tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
            raise ClusterError(f"{dead[0]} exited: {' | '.join(tail)}")


def default_state_dir() -> Path:
    return Path(os.environ.get("MESH_CLUSTER_DIR", str(parts.mesh_dir() / "cluster")))


CRD_FILES = Path(__file__).resolve().parent.parent / "crds"


@contextlib.contextmanager
def cluster_with_crds(cluster_dir: Path | None, work: Path) -> Iterator[LocalCluster]:
    """A local control plane with mesh's CRDs Established, for the benchmarks: the
    one in `cluster_dir` (started if needed, and kept), else a new one in `work`,
    stopped at the end."""
    cluster = LocalCluster(cluster_dir or work / "cluster")
    cluster.up()
    try:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILES))
        cluster.wait_established(
            *(f"{p}.mesh.dev" for p in ("meshpools", "meshmodels", "meshnodes"))
        )
        yield cluster
    finally:
        if cluster_dir is None:
            cluster.down()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.cluster", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--state-dir", type=Path, default=default_state_dir())
    parser.add_argument("--timeout", type=float, default=180.0)
    args = parser.parse_args(argv)
    cluster = LocalCluster(args.state_dir)
    try:
        if args.command == "up":
            started = time.monotonic()
            cfg = cluster.up(timeout=args.timeout)
            print(
                f"cluster ready in {time.monotonic() - started:.1f}s: {cfg.server}\n"
                f"export KUBECONFIG={cluster.kubeconfig}"
            )
        elif args.command == "down":
            stopped = cluster.down()
            print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        else:
            table = cluster.status()
            for name in COMPONENTS:
                state = f"running (pid {table[name]})" if name in table else "stopped"
                print(f"{name:26} {state}")
            return 0 if len(table) == len(COMPONENTS) else 1
    except (ClusterError, parts.PartMissingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
