"""The contract every mesh process shares: labels, annotations, ports and names.

The operator's builders write these labels, annotations and ports onto the
objects they make; the gateway finds host pods by them, the node agent finds its
RPC servers by them, and the CRD's rule on a MeshModel's name is generated from
the same constants the Python check uses. Pure: no I/O here.

For MeshModel `<name>` in namespace `<ns>` the operator makes one Service named
`host_service_name(<name>)`; that Service, the host pods (and therefore the
EndpointSlices Kubernetes derives from it) carry `host_selector_labels(<name>)`,
with llama-server on the port named `HOST_PORT_NAME` (`HOST_PORT`). The worker
pods carry `build_labels(<name>, RPC_COMPONENT)` and name their port
`RPC_PORT_NAME`.
"""

from __future__ import annotations

import re
from typing import Final

from mesh_operator.api.base import GROUP

# -- labels ---------------------------------------------------------------------

NAME_LABEL: Final = "app.kubernetes.io/name"
INSTANCE_LABEL: Final = "app.kubernetes.io/instance"
COMPONENT_LABEL: Final = "app.kubernetes.io/component"
PART_OF_LABEL: Final = "app.kubernetes.io/part-of"
MANAGED_BY_LABEL: Final = "app.kubernetes.io/managed-by"
MODEL_LABEL: Final = f"{GROUP}/model"
# Each RPC-server DaemonSet of a model selects only its own pods by this index.
RPC_CLASS_LABEL: Final = f"{GROUP}/rpc-class"
# Which replica of its model a worker or host pod serves ("0", "1", ...).
REPLICA_LABEL: Final = f"{GROUP}/replica"
# Set by the user on the Prometheus pods that may scrape a model's host.
SCRAPER_LABEL: Final = f"{GROUP}/metrics-scraper"
# Set by Kubernetes on every EndpointSlice that belongs to a Service.
SERVICE_NAME_LABEL: Final = "kubernetes.io/service-name"
# Set by the API server on every Namespace; nobody can change it.
NAMESPACE_NAME_LABEL: Final = "kubernetes.io/metadata.name"

APP_NAME: Final = "mesh"
MANAGED_BY: Final = "mesh-operator"

# Values of COMPONENT_LABEL.
HOST_COMPONENT: Final = "host"
RPC_COMPONENT: Final = "rpc-server"
POLICY_COMPONENT: Final = "network-policy"
# The short-lived pod that reads the header of a model on a PVC.
HEADER_COMPONENT: Final = "header-reader"
GATEWAY_COMPONENT: Final = "gateway"
AGENT_COMPONENT: Final = "agent"
# The operator's leader-election Lease.
OPERATOR_COMPONENT: Final = "operator"

# -- annotations ----------------------------------------------------------------

# On the pod templates of host and workers: changes on every re-plan, so host
# and workers restart together as a group.
PLAN_ANNOTATION: Final = f"{GROUP}/plan-generation"
ARGS_HASH_ANNOTATION: Final = f"{GROUP}/args-hash"
# On the host's pod template: how many times the host was restarted with its
# group because a worker restarted under it (MeshModel status.groupRestarts).
GROUP_RESTART_ANNOTATION: Final = f"{GROUP}/group-restarts"
# On the host's pod template: a digest of the llama-server image and its workers'
# images, so what a host pod reports is never taken for a newer group's.
IMAGES_ANNOTATION: Final = f"{GROUP}/images"
# On a header-reader pod: the model source it reads (a `cache_key`).
SOURCE_ANNOTATION: Final = f"{GROUP}/source"
# On every child: a digest of the object as built, to skip applying an unchanged one.
SPEC_HASH_ANNOTATION: Final = f"{GROUP}/spec-hash"
# On a Node: its round trip in ms to the pool's other nodes, as the admin knows it
# (a box on a slower link); the planner counts it per remote hop and a pool's
# maxRttMs leaves such nodes out. Unset: a LAN round trip is assumed.
RTT_ANNOTATION: Final = f"{GROUP}/rtt-ms"
# On the CRDs (stamped by the CRD generator) and on the operator's Lease (written
# by the replica holding it): the mesh version that made them, so `mesh doctor`
# can tell CRDs of another release from the running operator's.
VERSION_ANNOTATION: Final = f"{GROUP}/version"
# The largest round trip RTT_ANNOTATION and MeshPool spec.maxRttMs take.
MAX_RTT_MS: Final = 1000

# -- ports ----------------------------------------------------------------------

HOST_PORT: Final = 8080
# The reason of a MeshModel's Ready=False while it is scaled to zero: the gateway
# keeps listing such a model and holds its requests while it starts again.
SCALED_TO_ZERO: Final = "ScaledToZero"
HOST_PORT_NAME: Final = "http"
DEFAULT_RPC_PORT: Final = 50052
RPC_PORT_NAME: Final = "rpc"

# -- the name of a MeshModel ----------------------------------------------------

# Children are named after the model (`<model>-rpc-<n>`, `<model>-header`, the
# Service `<model>-host`) and the name is a label value: a short DNS-1035 label.
MODEL_NAME_MAX: Final = 45
MODEL_NAME_PATTERN: Final = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
MODEL_NAME_MESSAGE: Final = (
    f"metadata.name must be a DNS-1035 label of at most {MODEL_NAME_MAX} characters"
)
_MODEL_NAME_RE: Final = re.compile(MODEL_NAME_PATTERN)

HOST_SERVICE_SUFFIX: Final = "-host"

# -- the names a model is served under -------------------------------------------

# spec.servedName and spec.aliases: what clients put in a request's "model", and
# what the gateway routes by.
SERVED_NAME_MAX: Final = 128
SERVED_NAME_PATTERN: Final = (
    rf"^[A-Za-z0-9]([A-Za-z0-9._:/-]{{0,{SERVED_NAME_MAX - 2}}}[A-Za-z0-9])?$"
)


def model_name_rule() -> dict[str, str]:
    """The CRD's CEL rule on a MeshModel's metadata.name (the object's root)."""
    return {
        "rule": f"self.metadata.name.size() <= {MODEL_NAME_MAX} && "
        f"self.metadata.name.matches('{MODEL_NAME_PATTERN}')",
        "message": MODEL_NAME_MESSAGE,
    }


def check_model_name(name: str) -> None:
    """The rule the CRD enforces on a MeshModel's metadata.name; ValueError if broken."""
    if len(name) > MODEL_NAME_MAX or not _MODEL_NAME_RE.match(name):
        raise ValueError(f"{MODEL_NAME_MESSAGE} (got {name!r})")


def host_service_name(model_name: str) -> str:
    """Name of the Service in front of MeshModel `model_name`'s host pods.

    A MeshModel's name passes `check_model_name`, so `<model>-host` is a DNS-1035
    label too.
    """
    return f"{model_name}{HOST_SERVICE_SUFFIX}"


# -- labels and selectors -------------------------------------------------------


def build_labels(model: str, component: str) -> dict[str, str]:
    """All labels of an object mesh owns for MeshModel `model`."""
    return {
        NAME_LABEL: APP_NAME,
        INSTANCE_LABEL: model,
        COMPONENT_LABEL: component,
        PART_OF_LABEL: APP_NAME,
        MANAGED_BY_LABEL: MANAGED_BY,
        MODEL_LABEL: model,
    }


def build_selector(model: str, component: str) -> dict[str, str]:
    """The immutable subset used in selectors (a selector never changes)."""
    return {NAME_LABEL: APP_NAME, COMPONENT_LABEL: component, MODEL_LABEL: model}


def host_selector_labels(model_name: str) -> dict[str, str]:
    """Labels the host Service and pods carry, by which the gateway finds them."""
    return build_selector(model_name, HOST_COMPONENT)


def host_slice_selector() -> str:
    """Label selector (string form) of every host EndpointSlice, all models together."""
    return f"{NAME_LABEL}={APP_NAME},{COMPONENT_LABEL}={HOST_COMPONENT}"


def owned_selector(component: str | None = None) -> str:
    """Label selector (string form) of every object mesh owns, optionally of one component."""
    selector = f"{NAME_LABEL}={APP_NAME},{MANAGED_BY_LABEL}={MANAGED_BY}"
    if component:
        selector += f",{COMPONENT_LABEL}={component}"
    return selector
