"""Builders of a MeshModel's children: the RPC-server DaemonSet(s), the host
Deployment, the Service and the NetworkPolicy.

Pure: every function takes a `ModelWorkload` (plain data gathered by the
handlers) and returns a JSON-ready dict.

Pod Security: every container runs as the images' user 65532 without
capabilities. The pods meet `restricted` unless a cache is a hostPath volume,
which only `privileged` admits; then one short init container (root, capability
CHOWN only) hands the folder to that user, since the kubelet creates it owned by
root.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from mesh_operator.api.base import API_VERSION
from mesh_operator.api.contract import (
    AGENT_COMPONENT,
    APP_NAME,
    ARGS_HASH_ANNOTATION,
    COMPONENT_LABEL,
    GATEWAY_COMPONENT,
    GROUP_RESTART_ANNOTATION,
    HEADER_COMPONENT,
    HOST_COMPONENT,
    HOST_PORT,
    HOST_PORT_NAME,
    IMAGES_ANNOTATION,
    MODEL_LABEL,
    NAME_LABEL,
    NAMESPACE_NAME_LABEL,
    PLAN_ANNOTATION,
    POLICY_COMPONENT,
    REPLICA_LABEL,
    RPC_CLASS_LABEL,
    RPC_COMPONENT,
    RPC_PORT_NAME,
    SCRAPER_LABEL,
    SOURCE_ANNOTATION,
    build_labels,
    build_selector,
    host_service_name,
)
from mesh_operator.api.meshmodel import MeshModelSpec, ModelSource
from mesh_operator.api.meshpool import CacheVolumeSpec, ImageVariant, MeshPoolSpec, with_variant

Obj = dict[str, Any]

MODELS_MOUNT = "/models"
RPC_CACHE_MOUNT = "/var/cache/llama"
API_KEY_MOUNT = "/etc/mesh/api-key"
TERMINATION_LOG = "/dev/termination-log"
# The non-root user of every image mesh runs (its own and the llama.cpp image).
RUN_AS_USER = 65532
# A big model can take long to download: the startup probe allows an hour.
STARTUP_PROBE_SECONDS = 3600
POD_IP_ENV = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
NODE_NAME_ENV = {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}


@dataclass(frozen=True)
class ModelWorkload:
    """Everything the builders need to know about one MeshModel and its plan."""

    name: str
    namespace: str
    uid: str
    spec: MeshModelSpec
    pool_name: str
    pool: MeshPoolSpec
    plan_generation: int
    rpc_nodes: Sequence[str]
    host_node: str
    # ggml-rpc-server arguments per node (the devices it exposes may differ).
    rpc_args: Mapping[str, Sequence[str]]
    llama_args: Sequence[str]
    model_path: str
    fetch_args: Sequence[str] = ()
    # `mesh fetch` arguments of the draft model, when there is one to download.
    draft_fetch_args: Sequence[str] = ()
    # Exclusive CUDA pools request this many GPUs per node.
    gpus_per_node: Mapping[str, int] = field(default_factory=dict)
    # The llama.cpp image variant per planned node (its devices); a node missing
    # here runs the variant of the pool's backend.
    variants: Mapping[str, ImageVariant] = field(default_factory=dict)
    # Bumped each time the host must restart with its group (a worker restarted
    # under it): a change of the host's pod template, so its Deployment rolls it.
    group_restarts: int = 0
    # MiB the plan keeps in the host's RAM (its RAM tier, a draft model): the host
    # requests that much memory unless hostResources says otherwise.
    host_tier_mib: int = 0
    # A Hugging Face mirror (the operator's HF_ENDPOINT), given to `mesh fetch`.
    hf_endpoint: str | None = None
    # Which replica of the model this plan serves: names its DaemonSets and host
    # Deployment (replica 0 keeps the names of a model without replicas) and
    # labels its pods (REPLICA_LABEL, part of their selectors).
    replica: int = 0


@dataclass(frozen=True)
class PolicyPeers:
    """Where the pods that may reach a model's servers run: the namespaces of the
    release's node agents and gateway, and of the Prometheus pods the user names."""

    agent_namespace: str
    gateway_namespace: str
    scraper_namespaces: Sequence[str] = ()


def _owner(w: ModelWorkload) -> list[Obj]:
    return _owner_of(w.name, w.uid)


def _owner_of(model: str, uid: str) -> list[Obj]:
    return [
        {
            "apiVersion": API_VERSION,
            "kind": "MeshModel",
            "name": model,
            "uid": uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def _metadata(w: ModelWorkload, name: str, component: str) -> Obj:
    return {
        "name": name,
        "namespace": w.namespace,
        "labels": build_labels(w.name, component),
        "ownerReferences": _owner(w),
    }


def _pin_to_nodes(nodes: Sequence[str]) -> Obj:
    # A matchFields term on metadata.name (one name per term, terms are ORed) is
    # what the DaemonSet controller itself uses to pin pods, and unlike a label
    # it cannot be changed by whoever edits the node.
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}
                    for node in sorted(nodes)
                ]
            }
        }
    }


def _hardened_container() -> Obj:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod_security() -> Obj:
    # An explicit user: the kubelet cannot check runAsNonRoot against an image
    # whose USER is a name, and fsGroup makes emptyDir and PVC caches writable.
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        # A big model cache on a PVC: no recursive chown at every start.
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _cache_volume(name: str, cache: CacheVolumeSpec, host_path: str) -> Obj:
    if cache.volume == "pvc":
        return {"name": name, "persistentVolumeClaim": {"claimName": cache.claim_name}}
    if cache.volume == "emptyDir":
        return {
            "name": name,
            "emptyDir": {"sizeLimit": cache.size_limit} if cache.size_limit else {},
        }
    return {"name": name, "hostPath": {"path": host_path, "type": "DirectoryOrCreate"}}


def _owner_container(image: str, pull_policy: str, mounts: Sequence[tuple[str, str]]) -> Obj:
    """Hands hostPath folders (created by the kubelet owned by root) to RUN_AS_USER.

    Recursive: a cache written by an older release may hold files of another owner.
    """
    owner = f"{RUN_AS_USER}:{RUN_AS_USER}"
    return {
        "name": "cache-owner",
        "image": image,
        "imagePullPolicy": pull_policy,
        "command": ["chown", "-R", owner, *(path for _, path in mounts)],
        "volumeMounts": [{"name": name, "mountPath": path} for name, path in mounts],
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
    }


def _pool_scheduling(pool: MeshPoolSpec) -> Obj:
    """The pool's nodeSelector and tolerations, as a pod spec's fields."""
    spec: Obj = {}
    if pool.node_selector:
        spec["nodeSelector"] = dict(pool.node_selector)
    if pool.tolerations:
        spec["tolerations"] = [t.to_wire() for t in pool.tolerations]
    return spec


def _pod_common(w: ModelWorkload, nodes: Sequence[str]) -> Obj:
    return {
        "affinity": _pin_to_nodes(nodes),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security(),
        **_pool_scheduling(w.pool),
    }


def args_hash(args: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(args)).encode()).hexdigest()[:16]


RPC_TERMINATION_GRACE_SECONDS = 1


def replica_suffix(replica: int) -> str:
    """What the names of a replica's DaemonSets and host Deployment end with:
    nothing for replica 0 (the names of a model without replicas), `-r<n>` for
    the others. A suffix, not an infix: `<model>-r1-host` would be the host of a
    model named `<model>-r1`. With a model's name of at most 45 characters every
    name stays a DNS label."""
    return "" if replica == 0 else f"-r{replica}"


def rpc_daemonset_name(model: str, index: int = 0, replica: int = 0) -> str:
    base = f"{model}-rpc" if index == 0 else f"{model}-rpc-{index}"
    return base + replica_suffix(replica)


def replica_labels(w: ModelWorkload, component: str) -> dict[str, str]:
    return {**build_labels(w.name, component), REPLICA_LABEL: str(w.replica)}


def replica_selector(w: ModelWorkload, component: str) -> dict[str, str]:
    """The pods of one replica's `component`: replicas' selectors never overlap."""
    return {**build_selector(w.name, component), REPLICA_LABEL: str(w.replica)}


def node_variant(w: ModelWorkload, node: str) -> ImageVariant:
    """The llama.cpp image variant a planned node runs."""
    return w.variants.get(node) or ("cuda" if w.pool.backend == "cuda" else "cpu")


def host_image(w: ModelWorkload) -> str:
    """The llama-server image of the host: the variant of the node it runs on."""
    return with_variant(w.pool.images.llama_server, node_variant(w, w.host_node))


def rpc_images(w: ModelWorkload) -> dict[str, str]:
    """The ggml-rpc-server image of each planned node, in --rpc order."""
    return {n: with_variant(w.pool.images.rpc_server, node_variant(w, n)) for n in w.rpc_nodes}


def images_digest(llama_server: str, rpc_servers: Sequence[str]) -> str:
    """A short digest of the images a host and its workers run together."""
    canonical = json.dumps([llama_server, sorted(set(rpc_servers))])
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _runtime_class(w: ModelWorkload, variant: ImageVariant) -> str | None:
    # In a cuda pool the runtime class is the NVIDIA runtime: a CPU-only node has
    # none configured, and its pods would never start with it.
    if w.pool.backend == "cuda" and variant != "cuda":
        return None
    return w.pool.runtime_class_name


class NodeClass(NamedTuple):
    """Planned nodes that share one RPC pod template, hence one DaemonSet."""

    args: tuple[str, ...]
    gpus: int
    variant: ImageVariant
    nodes: list[str]


def rpc_node_classes(w: ModelWorkload) -> list[NodeClass]:
    """Planned nodes grouped by identical pod templates.

    A DaemonSet has one pod template, so nodes whose RPC server needs other
    arguments (other devices), another GPU count or another image variant get a
    DaemonSet of their own. Most pools have one class. Ordered by each class's
    first node in --rpc order.
    """
    exclusive = w.pool.backend == "cuda" and w.pool.sharing == "exclusive"
    classes: dict[tuple[tuple[str, ...], int, ImageVariant], list[str]] = {}
    for node in w.rpc_nodes:
        variant = node_variant(w, node)
        gpus = w.gpus_per_node.get(node, 1) if exclusive and variant == "cuda" else 0
        classes.setdefault((tuple(w.rpc_args[node]), gpus, variant), []).append(node)
    return [
        NodeClass(args, gpus, variant, nodes) for (args, gpus, variant), nodes in classes.items()
    ]


def build_rpc_daemonsets(w: ModelWorkload) -> list[Obj]:
    """The ggml-rpc-server DaemonSet(s) of a model, pinned to its planned nodes."""
    out = []
    images = w.pool.images
    for index, (args, gpus, variant, nodes) in enumerate(rpc_node_classes(w)):
        # Each DaemonSet selects only its own pods: selectors must not overlap.
        labels = {**replica_labels(w, RPC_COMPONENT), RPC_CLASS_LABEL: str(index)}
        selector = {**replica_selector(w, RPC_COMPONENT), RPC_CLASS_LABEL: str(index)}
        image = with_variant(images.rpc_server, variant)
        container: Obj = {
            "name": "rpc-server",
            "image": image,
            "imagePullPolicy": images.pull_policy,
            "command": list(images.rpc_server_command),
            "args": list(args),
            "env": [POD_IP_ENV, NODE_NAME_ENV],
            "ports": [{"name": RPC_PORT_NAME, "containerPort": w.pool.rpc_port, "protocol": "TCP"}],
            "securityContext": _hardened_container(),
            # The kernel answers a TCP probe on a busy RPC port from its backlog,
            # so liveness of the server is judged by the node agent, not a probe;
            # this only says the port is open after start.
            "startupProbe": {
                "tcpSocket": {"port": RPC_PORT_NAME},
                "periodSeconds": 2,
                "failureThreshold": 60,
            },
        }
        if variant == "cuda":
            # Number GPUs by PCI bus as NVML does, so the agent's CUDA<n> is llama.cpp's.
            container["env"].append({"name": "CUDA_DEVICE_ORDER", "value": "PCI_BUS_ID"})
            if gpus:
                container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
            else:
                # Shared GPUs: no device-plugin request; the memory ledger keeps
                # models apart and the NVIDIA runtime exposes every GPU.
                container["env"].append({"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"})
        pod_spec = _pod_common(w, nodes)
        cache = w.pool.rpc_cache
        if cache.enabled:
            container["env"].append({"name": "LLAMA_CACHE", "value": RPC_CACHE_MOUNT})
            container["volumeMounts"] = [{"name": "rpc-cache", "mountPath": RPC_CACHE_MOUNT}]
            pod_spec["volumes"] = [_cache_volume("rpc-cache", cache, cache.host_path)]
            if cache.volume == "hostPath":
                pod_spec["initContainers"] = [
                    _owner_container(image, images.pull_policy, [("rpc-cache", RPC_CACHE_MOUNT)])
                ]
        pod_spec["containers"] = [container]
        # ggml-rpc-server installs no signal handler and runs as its container's
        # PID 1, which the kernel shields from SIGTERM: only the SIGKILL at the end
        # of the grace period stops it. A longer grace only delays a re-plan (the
        # replacement pod waits for this one); the server holds nothing to flush.
        pod_spec["terminationGracePeriodSeconds"] = RPC_TERMINATION_GRACE_SECONDS
        runtime_class = _runtime_class(w, variant)
        if runtime_class:
            pod_spec["runtimeClassName"] = runtime_class
        out.append(
            {
                "apiVersion": "apps/v1",
                "kind": "DaemonSet",
                "metadata": {
                    **_metadata(w, rpc_daemonset_name(w.name, index, w.replica), RPC_COMPONENT),
                    "labels": replica_labels(w, RPC_COMPONENT),
                },
                "spec": {
                    "selector": {"matchLabels": selector},
                    # Host and workers restart as a group on a re-plan: replace
                    # every worker at once rather than one node at a time.
                    "updateStrategy": {
                        "type": "RollingUpdate",
                        "rollingUpdate": {"maxUnavailable": "100%"},
                    },
                    "template": {
                        "metadata": {
                            "labels": labels,
                            "annotations": {
                                PLAN_ANNOTATION: str(w.plan_generation),
                                ARGS_HASH_ANNOTATION: args_hash(args),
                            },
                        },
                        "spec": pod_spec,
                    },
                },
            }
        )
    return out


def _pvc_volume(claim_name: str) -> Obj:
    return {"name": "models", "persistentVolumeClaim": {"claimName": claim_name, "readOnly": True}}


def _model_volume(w: ModelWorkload) -> Obj:
    pvc = w.spec.source.pvc
    if pvc is not None:
        return _pvc_volume(pvc.claim_name)
    image = w.spec.source.oci
    if image is not None:
        # The kubelet has the node's runtime pull the model image and mounts it
        # read-only; the pull policy is the API server's default for the tag.
        return {"name": "models", "image": {"reference": image.reference}}
    cache = w.pool.model_cache
    return _cache_volume("models", cache, cache.host_path)


def _fetch_container(
    w: ModelWorkload, name: str, fetch_args: Sequence[str], source: ModelSource
) -> Obj:
    """`mesh fetch` of `source` (the model's or its draft's) into the models volume."""
    env: list[Obj] = []
    token_ref = w.spec.token_ref(source)
    if token_ref is not None:
        env.append(
            {
                "name": "HF_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": token_ref.name, "key": token_ref.key}},
            }
        )
    container: Obj = {
        "name": name,
        "image": w.pool.images.mesh,
        "imagePullPolicy": w.pool.images.pull_policy,
        "command": list(w.pool.images.mesh_command),
        "args": ["fetch", *fetch_args],
        "volumeMounts": [{"name": "models", "mountPath": MODELS_MOUNT}],
        "securityContext": _hardened_container(),
    }
    if w.hf_endpoint:
        env.append({"name": "HF_ENDPOINT", "value": w.hf_endpoint})
    if env:
        container["env"] = env
    return container


def _probe(path: str, period: int, failures: int) -> Obj:
    return {
        "httpGet": {"path": path, "port": HOST_PORT_NAME},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 5,
    }


def build_host_deployment(w: ModelWorkload, replicas: int = 1) -> Obj:
    """The llama-server Deployment; `llama_args` carry the workers in device order.

    `replicas` is 0 while the workers of the current plan are not all up.
    """
    args = list(w.llama_args)
    mounts: list[Obj] = [{"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True}]
    volumes: list[Obj] = [_model_volume(w)]
    if w.spec.api_key_secret_ref is not None:
        ref = w.spec.api_key_secret_ref
        mounts.append({"name": "api-key", "mountPath": API_KEY_MOUNT, "readOnly": True})
        volumes.append({"name": "api-key", "secret": {"secretName": ref.name}})
    # The host runs on its node's variant; every layer of the plan sits on the
    # workers' devices (this node's GPUs through its own worker), so a GPU that
    # llama-server saw itself would join the device list after them and take
    # memory the ledger gave to the worker: the NVIDIA runtime lends it the driver
    # libraries of the cuda build and no GPU.
    variant = node_variant(w, w.host_node)
    env: list[Obj] = [POD_IP_ENV]
    if variant == "cuda":
        env.append({"name": "NVIDIA_VISIBLE_DEVICES", "value": "none"})
    server: Obj = {
        "name": "llama-server",
        "image": host_image(w),
        "imagePullPolicy": w.pool.images.pull_policy,
        "command": list(w.pool.images.llama_server_command),
        "args": args,
        "env": env,
        # A host that exits in error leaves its log's tail as the termination
        # message: the operator reads a refused RPC handshake from there.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "ports": [{"name": HOST_PORT_NAME, "containerPort": HOST_PORT, "protocol": "TCP"}],
        "startupProbe": _probe("/health", 5, STARTUP_PROBE_SECONDS // 5),
        "readinessProbe": _probe("/health", 5, 2),
        "livenessProbe": _probe("/health", 15, 4),
        "volumeMounts": mounts,
        "securityContext": _hardened_container(),
    }
    resources = w.spec.host_resources.to_wire() if w.spec.host_resources is not None else {}
    if w.host_tier_mib:
        requests = resources.setdefault("requests", {})
        assert isinstance(requests, dict)
        requests.setdefault("memory", f"{w.host_tier_mib}Mi")
    if resources:
        server["resources"] = resources
    pod_spec = _pod_common(w, [w.host_node])
    pod_spec["containers"] = [server]
    pod_spec["volumes"] = volumes
    pod_spec["terminationGracePeriodSeconds"] = 30
    runtime_class = _runtime_class(w, variant)
    if runtime_class:
        pod_spec["runtimeClassName"] = runtime_class
    init = []
    # A model on a PVC or in an image volume is there already: nothing to fetch.
    fetched = w.spec.source.pvc is None and w.spec.source.oci is None
    if fetched and w.pool.model_cache.volume == "hostPath":
        init.append(
            _owner_container(
                w.pool.images.mesh, w.pool.images.pull_policy, [("models", MODELS_MOUNT)]
            )
        )
    if fetched:
        init.append(_fetch_container(w, "fetch", w.fetch_args, w.spec.source))
    if w.draft_fetch_args and w.spec.draft is not None:
        init.append(_fetch_container(w, "fetch-draft", w.draft_fetch_args, w.spec.draft.source))
    if init:
        pod_spec["initContainers"] = init
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            **_metadata(w, host_deployment_name(w.name, w.replica), HOST_COMPONENT),
            "labels": replica_labels(w, HOST_COMPONENT),
        },
        "spec": {
            "replicas": replicas,
            # An RPC server serves one client at a time: a second host started
            # before the first stops would wait forever on busy workers.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": replica_selector(w, HOST_COMPONENT)},
            "template": {
                "metadata": {
                    "labels": replica_labels(w, HOST_COMPONENT),
                    "annotations": {
                        PLAN_ANNOTATION: str(w.plan_generation),
                        GROUP_RESTART_ANNOTATION: str(w.group_restarts),
                        ARGS_HASH_ANNOTATION: args_hash(args),
                        IMAGES_ANNOTATION: images_digest(
                            host_image(w), list(rpc_images(w).values())
                        ),
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def header_pod_name(model: str) -> str:
    return f"{model}-header"


# A header is read in seconds; a pod still not done after this is stuck.
HEADER_POD_DEADLINE_SECONDS = 600


def build_header_pod(
    model: str,
    namespace: str,
    uid: str,
    *,
    spec: MeshModelSpec,
    pool: MeshPoolSpec,
    source_key: str,
    model_path: str,
) -> Obj:
    """The pod that reads the header of a model on a PVC (`mesh profile`).

    The operator cannot open a file on a PVC, so this pod does, read-only, and
    leaves the profile in its termination message. Once done it stays (Completed,
    using nothing) as the record of that profile, so a restarted operator need not
    read the file again; it goes with its MeshModel.
    """
    pvc = spec.source.pvc
    assert pvc is not None
    reader: Obj = {
        "name": "profile",
        "image": pool.images.mesh,
        "imagePullPolicy": pool.images.pull_policy,
        "command": list(pool.images.mesh_command),
        "args": ["profile", "--model", model_path, "--termination-log", TERMINATION_LOG],
        "terminationMessagePath": TERMINATION_LOG,
        "volumeMounts": [{"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True}],
        "resources": {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            # The vocabulary of a big tokenizer is read whole.
            "limits": {"memory": "1Gi"},
        },
        "securityContext": _hardened_container() | {"readOnlyRootFilesystem": True},
    }
    pod_spec: Obj = {
        "restartPolicy": "Never",
        "activeDeadlineSeconds": HEADER_POD_DEADLINE_SECONDS,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [reader],
        "volumes": [_pvc_volume(pvc.claim_name)],
        # On a pool node: the host will mount the PVC there too.
        **_pool_scheduling(pool),
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": header_pod_name(model),
            "namespace": namespace,
            "labels": build_labels(model, HEADER_COMPONENT),
            "annotations": {SOURCE_ANNOTATION: source_key},
            "ownerReferences": _owner_of(model, uid),
        },
        "spec": pod_spec,
    }


def host_deployment_name(model: str, replica: int = 0) -> str:
    return f"{model}-host{replica_suffix(replica)}"


def build_service(w: ModelWorkload) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(w, host_service_name(w.name), HOST_COMPONENT),
        "spec": {
            "type": "ClusterIP",
            "selector": build_selector(w.name, HOST_COMPONENT),
            "ports": [
                {
                    "name": HOST_PORT_NAME,
                    "port": HOST_PORT,
                    "targetPort": HOST_PORT_NAME,
                    "protocol": "TCP",
                }
            ],
        },
    }


def network_policy_name(model: str) -> str:
    return f"{model}-mesh"


def _in_namespace(namespace: str, labels: Mapping[str, str]) -> Obj:
    return {
        "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: namespace}},
        "podSelector": {"matchLabels": dict(labels)},
    }


def build_network_policy(w: ModelWorkload, peers: PolicyPeers) -> Obj:
    """RPC port only from this model's host pod and the release's node agents;
    host port only from the release's gateway and the scrapers of the namespaces
    the user named.

    Namespaces are matched by `kubernetes.io/metadata.name`, which the API server
    sets and nobody can change: a pod that copies the labels of the agent or the
    gateway in a namespace of its own is not admitted.
    """
    gateway = {NAME_LABEL: APP_NAME, COMPONENT_LABEL: GATEWAY_COMPONENT}
    agent = {NAME_LABEL: APP_NAME, COMPONENT_LABEL: AGENT_COMPONENT}
    http_from = [_in_namespace(peers.gateway_namespace, gateway)]
    if peers.scraper_namespaces:
        http_from.append(
            {
                "namespaceSelector": {
                    "matchExpressions": [
                        {
                            "key": NAMESPACE_NAME_LABEL,
                            "operator": "In",
                            "values": sorted(set(peers.scraper_namespaces)),
                        }
                    ]
                },
                "podSelector": {"matchLabels": {SCRAPER_LABEL: "true"}},
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(w, network_policy_name(w.name), POLICY_COMPONENT),
        "spec": {
            "podSelector": {"matchLabels": {NAME_LABEL: APP_NAME, MODEL_LABEL: w.name}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    # The node agent checks that the servers answer (see DESIGN: a
                    # TCP probe alone is answered by the kernel's backlog).
                    "from": [
                        {"podSelector": {"matchLabels": build_selector(w.name, HOST_COMPONENT)}},
                        _in_namespace(peers.agent_namespace, agent),
                    ],
                    "ports": [{"protocol": "TCP", "port": w.pool.rpc_port}],
                },
                {
                    "from": http_from,
                    "ports": [{"protocol": "TCP", "port": HOST_PORT}],
                },
            ],
        },
    }
