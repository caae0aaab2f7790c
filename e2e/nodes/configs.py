"""Configuration files of one real test node and of the shared parts: pure builders.

Test infrastructure. Each function takes plain values and returns the text (or
object) of one file; `e2e.nodes.harness` writes them and starts the programs.
The settings that make a kubelet and containerd run on this kind of machine
(cgroup v1 in hybrid mode, no permission to lower OOM scores, no registry
beyond a local one) are explained where they are set.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

CLUSTER_DNS_IP = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"
KUBELET_PORT = 10250
REGISTRY_PORT = 5000
COREDNS_PORT = 1053
# The chart's default registry, mirrored by the local one (a real pull, through
# containerd's mirror configuration, of the names users' clusters pull).
MIRRORED_REGISTRIES = ("ghcr.io",)


@dataclass(frozen=True)
class NodeFiles:
    """Where one node keeps its state; everything lives under `root`."""

    root: Path

    @property
    def containerd_root(self) -> Path:
        return self.root / "containerd" / "root"

    @property
    def containerd_state(self) -> Path:
        return self.root / "containerd" / "state"

    @property
    def containerd_socket(self) -> Path:
        return self.root / "containerd" / "containerd.sock"

    @property
    def containerd_config(self) -> Path:
        return self.root / "containerd" / "config.toml"

    @property
    def registry_hosts(self) -> Path:
        return self.root / "containerd" / "certs.d"

    @property
    def cni_conf_dir(self) -> Path:
        return self.root / "cni" / "net.d"

    @property
    def cni_ipam_dir(self) -> Path:
        return self.root / "cni" / "ipam"

    @property
    def kubelet_root(self) -> Path:
        return self.root / "kubelet"

    @property
    def kubelet_config(self) -> Path:
        return self.root / "kubelet.yaml"

    @property
    def pod_logs(self) -> Path:
        return self.root / "pod-logs"

    @property
    def resolv_conf(self) -> Path:
        return self.root / "resolv.conf"

    @property
    def kube_proxy_config(self) -> Path:
        return self.root / "kube-proxy.yaml"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _toml(tables: dict[str, Obj]) -> str:
    """TOML of flat tables (`{"a.b": {"k": v}}`): all containerd's config needs."""
    lines: list[str] = []
    for name, values in tables.items():
        if name:
            lines.append(f"\n[{name}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
    return "\n".join(lines).lstrip() + "\n"


# Snapshotters and tracing that need kernel features or tools this machine lacks
# only add errors to the log.
_DISABLED_PLUGINS = (
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)


def _containerd_base(files: NodeFiles, version: int, disabled: Sequence[str]) -> dict[str, Obj]:
    """What both containerd versions' configurations share: the node's own folders,
    sockets and plugins left out."""
    return {
        "": {
            "version": version,
            "root": str(files.containerd_root),
            "state": str(files.containerd_state),
            "disabled_plugins": list(disabled),
        },
        "grpc": {"address": str(files.containerd_socket)},
        "ttrpc": {"address": f"{files.containerd_socket}.ttrpc"},
        "debug": {"address": ""},
        "metrics": {"address": ""},
        "plugins.'io.containerd.internal.v1.opt'": {"path": str(files.root / "containerd" / "opt")},
    }


def containerd_config(files: NodeFiles, sandbox_image: str, cni_bin_dir: str, runc: str) -> str:
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return _toml(
        {
            **_containerd_base(files, 2, _DISABLED_PLUGINS),
            cri: {
                "sandbox_image": sandbox_image,
                # Lowering a process's OOM score is not permitted on this
                # machine; without this every sandbox fails to start ("can't get
                # final child's PID from pipe: EOF").
                "restrict_oom_score_adj": True,
                "disable_apparmor": True,
                "stream_server_address": "127.0.0.1",
                "stream_server_port": "0",
                "max_container_log_line_size": 16384,
            },
            f"{cri}.containerd": {"snapshotter": "overlayfs", "default_runtime_name": "runc"},
            f"{cri}.containerd.runtimes.runc": {"runtime_type": "io.containerd.runc.v2"},
            f"{cri}.containerd.runtimes.runc.options": {
                "BinaryName": runc,
                "SystemdCgroup": False,
            },
            f"{cri}.cni": {"bin_dir": cni_bin_dir, "conf_dir": str(files.cni_conf_dir)},
            f"{cri}.registry": {"config_path": str(files.registry_hosts)},
        }
    )


def containerd2_config(
    files: NodeFiles, sandbox_image: str, cni_bin_dir: str, runc: str, shim: str
) -> str:
    """containerd 2's configuration (version 3): the settings of `containerd_config`
    under the plugin names containerd 2 gives them, the runc shim named by path (the
    machine's PATH holds Debian's 1.6 shim), network namespaces and NRI kept out
    of the machine-wide folders several nodes would share."""
    images = "plugins.'io.containerd.cri.v1.images'"
    runtime = "plugins.'io.containerd.cri.v1.runtime'"
    disabled = [
        *_DISABLED_PLUGINS,
        "io.containerd.snapshotter.v1.blockfile",
        "io.containerd.snapshotter.v1.erofs",
        "io.containerd.differ.v1.erofs",
        # NRI listens on /var/run/nri/nri.sock: one per machine.
        "io.containerd.nri.v1.nri",
    ]
    return _toml(
        {
            **_containerd_base(files, 3, disabled),
            images: {"snapshotter": "overlayfs"},
            f"{images}.pinned_images": {"sandbox": sandbox_image},
            f"{images}.registry": {"config_path": str(files.registry_hosts)},
            runtime: {
                # As for containerd 1.6: see `containerd_config`.
                "restrict_oom_score_adj": True,
                "disable_apparmor": True,
                "max_container_log_line_size": 16384,
                "netns_mounts_under_state_dir": True,
            },
            f"{runtime}.containerd": {"default_runtime_name": "runc"},
            f"{runtime}.containerd.runtimes.runc": {
                "runtime_type": "io.containerd.runc.v2",
                "runtime_path": shim,
            },
            f"{runtime}.containerd.runtimes.runc.options": {
                "BinaryName": runc,
                "SystemdCgroup": False,
            },
            f"{runtime}.cni": {"bin_dirs": [cni_bin_dir], "conf_dir": str(files.cni_conf_dir)},
            "plugins.'io.containerd.grpc.v1.cri'": {
                "stream_server_address": "127.0.0.1",
                "stream_server_port": "0",
            },
        }
    )


def registry_hosts_toml(server: str, mirror: str) -> str:
    """containerd's hosts.toml: pull the images of `server` (a URL) from the
    plain-HTTP `mirror` (host:port). A `server` alone is not enough for plain
    HTTP: containerd 1.6 still speaks HTTPS to it unless a host entry says http."""
    return _toml(
        {
            "": {"server": server},
            f'host."http://{mirror}"': {"capabilities": ["pull", "resolve"]},
        }
    )


def cni_conflist(pod_subnet: str, ipam_dir: Path) -> str:
    """A bridge network for the node's pods, with hairpin so a pod reaches itself
    through a Service, and the IPAM state in the node's own folder (the default is
    machine-wide, which several nodes would share)."""
    return json.dumps(
        {
            "cniVersion": "1.0.0",
            "name": "mesh-e2e",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": pod_subnet}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(ipam_dir),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        },
        indent=2,
    )


def kubelet_config(files: NodeFiles, node_ip: str, client_ca: Path) -> str:
    config: Obj = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": node_ip,
        "port": KUBELET_PORT,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(client_ca)},
        },
        "authorization": {"mode": "Webhook"},
        # cgroup v1 in hybrid mode with no systemd: the cgroupfs driver, no QoS
        # cgroup tree and no node-allocatable enforcement (the kubelet may not
        # create its top-level cgroups here).
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "cgroupsPerQOS": False,
        "enforceNodeAllocatable": [],
        "containerRuntimeEndpoint": f"unix://{files.containerd_socket}",
        "clusterDNS": [CLUSTER_DNS_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": str(files.resolv_conf),
        # Several kubelets share this machine: each keeps its pod logs apart, or
        # one would collect the others' as orphans.
        "podLogsDir": str(files.pod_logs),
        "failSwapOn": False,
        "protectKernelDefaults": False,
        "serializeImagePulls": False,
        # The nodes share one disk and its memory: evict only on real exhaustion.
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "nodeStatusUpdateFrequency": "10s",
        "nodeStatusReportFrequency": "10s",
        "maxPods": 110,
        "podPidsLimit": -1,
        "volumeStatsAggPeriod": "0s",
        "logging": {"format": "text"},
        # `image` volumes (an OCI image mounted read-only): beta and off in 1.34;
        # the API server's gate is on too (e2e.cluster). They need containerd >= 2.1.
        "featureGates": {"ImageVolume": True},
    }
    return yaml.safe_dump(config, sort_keys=False)


def kube_proxy_config(node: str, node_ip: str, kubeconfig: Path, pod_network: str) -> str:
    config: Obj = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": node,
        "bindAddress": node_ip,
        "healthzBindAddress": f"{node_ip}:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        "mode": "iptables",
        "clusterCIDR": pod_network,
        # nf_conntrack_max is machine-wide and not writable from a node's
        # namespace: leave the conntrack sysctls as they are.
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
    }
    return yaml.safe_dump(config, sort_keys=False)


def registry_config(storage: Path, address: str) -> str:
    config: Obj = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
        "http": {"addr": address, "debug": {"addr": ""}},
    }
    return yaml.safe_dump(config, sort_keys=False)


def corefile() -> str:
    return (
        f".:{COREDNS_PORT} {{\n"
        "    errors\n"
        "    health :8080\n"
        "    ready :8181\n"
        f"    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{\n"
        "        pods insecure\n"
        "        fallthrough in-addr.arpa ip6.arpa\n"
        "    }\n"
        "    cache 30\n"
        "    loop\n"
        "}\n"
    )


def coredns_objects(image: str) -> list[Obj]:
    """Cluster DNS: CoreDNS as a Deployment behind the kube-dns Service, as in
    real clusters, running unprivileged on a high port."""
    labels = {"k8s-app": "kube-dns"}
    meta = {"namespace": "kube-system"}
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "coredns", **meta},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "e2e:coredns"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["services", "pods", "namespaces"],
                    "verbs": ["list", "watch"],
                },
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["list", "watch"],
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "e2e:coredns"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "e2e:coredns",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "coredns", **meta}],
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "coredns", **meta},
            "data": {"Corefile": corefile()},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "coredns", "labels": labels, **meta},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": "coredns",
                        "dnsPolicy": "Default",
                        "securityContext": {
                            "runAsNonRoot": True,
                            "runAsUser": 65532,
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        "containers": [
                            {
                                "name": "coredns",
                                "image": image,
                                "args": ["-conf", "/etc/coredns/Corefile"],
                                "ports": [
                                    {
                                        "name": "dns",
                                        "containerPort": COREDNS_PORT,
                                        "protocol": "UDP",
                                    },
                                    {
                                        "name": "dns-tcp",
                                        "containerPort": COREDNS_PORT,
                                        "protocol": "TCP",
                                    },
                                ],
                                "readinessProbe": {
                                    "httpGet": {"path": "/ready", "port": 8181},
                                    "periodSeconds": 2,
                                },
                                "securityContext": {
                                    "allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]},
                                    "readOnlyRootFilesystem": True,
                                },
                                "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns"}],
                            }
                        ],
                        "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kube-dns", "labels": labels, **meta},
            "spec": {
                "clusterIP": CLUSTER_DNS_IP,
                "selector": labels,
                "ports": [
                    {"name": "dns", "port": 53, "targetPort": COREDNS_PORT, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "targetPort": COREDNS_PORT, "protocol": "TCP"},
                ],
            },
        },
    ]


def kube_router_rbac(user: str) -> list[Obj]:
    """What kube-router's NetworkPolicy controller reads, bound to its user."""
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "e2e:kube-router"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["namespaces", "pods", "services", "nodes", "endpoints"],
                    "verbs": ["get", "list", "watch"],
                },
                {
                    "apiGroups": ["networking.k8s.io"],
                    "resources": ["networkpolicies"],
                    "verbs": ["get", "list", "watch"],
                },
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["get", "list", "watch"],
                },
                {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "e2e:kube-router"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "e2e:kube-router",
            },
            "subjects": [{"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}],
        },
    ]


def apiserver_endpoints(address: str, port: int) -> Obj:
    """The `kubernetes` Service's endpoints: the forwarder at the machine's address
    on the node network (the API server itself listens on loopback only, and
    reconciles no endpoints of its own here)."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "kubernetes",
            "namespace": "default",
            "labels": {
                "kubernetes.io/service-name": "kubernetes",
                "endpointslice.kubernetes.io/managed-by": "e2e.mesh.dev",
            },
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [address], "conditions": {"ready": True}}],
        "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
    }
