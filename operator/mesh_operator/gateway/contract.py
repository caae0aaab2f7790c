"""The contract between the operator and the gateway: how a model's host pods are found.

The operator creates, for MeshModel `<name>` in namespace `<ns>`, one Service named
`host_service_name(<name>)` whose Service, pods (and therefore the EndpointSlices the
EndpointSlice controller derives from it) carry `host_selector_labels(<name>)`, with
llama-server listening on the port named `HOST_PORT_NAME` (`HOST_PORT`). The
gateway watches those EndpointSlices and sends traffic to the pod IPs directly, so
it needs neither the Service's ClusterIP nor kube-proxy. Pure: no I/O here.
"""

from __future__ import annotations

from typing import Final

NAME_LABEL: Final = "app.kubernetes.io/name"
COMPONENT_LABEL: Final = "app.kubernetes.io/component"
MODEL_LABEL: Final = "mesh.dev/model"
# Set by Kubernetes on every EndpointSlice that belongs to a Service.
SERVICE_NAME_LABEL: Final = "kubernetes.io/service-name"

APP_NAME: Final = "mesh"
HOST_COMPONENT: Final = "host"
HOST_PORT: Final = 8080
HOST_PORT_NAME: Final = "http"

HOST_SERVICE_SUFFIX: Final = "-host"
# A Service name is a DNS-1035 label: at most 63 characters.
_SERVICE_NAME_MAX: Final = 63


def host_service_name(model_name: str) -> str:
    """Name of the Service in front of MeshModel `model_name`'s host pods.

    `<model>-host`. A MeshModel name is a DNS-1123 subdomain (up to 253 characters,
    dots allowed) but a Service name is a DNS-1035 label, so dots become dashes and
    a name too long is cut and given a short stable hash to stay unique.
    """
    base = model_name.lower().replace(".", "-")
    name = f"{base}{HOST_SERVICE_SUFFIX}"
    if len(name) <= _SERVICE_NAME_MAX:
        return name
    digest = _fnv1a_hex(model_name)
    keep = _SERVICE_NAME_MAX - len(HOST_SERVICE_SUFFIX) - len(digest) - 1
    return f"{base[:keep].rstrip('-')}-{digest}{HOST_SERVICE_SUFFIX}"


def host_selector_labels(model_name: str) -> dict[str, str]:
    """Labels the host Service and pods must carry for the gateway to find them.

    The operator's labels function adds its own (instance, part-of, managed-by);
    these three are the ones the gateway selects on.
    """
    return {
        NAME_LABEL: APP_NAME,
        COMPONENT_LABEL: HOST_COMPONENT,
        MODEL_LABEL: model_name,
    }


def host_slice_selector() -> str:
    """Label selector (string form) of every host EndpointSlice, all models together."""
    return f"{NAME_LABEL}={APP_NAME},{COMPONENT_LABEL}={HOST_COMPONENT}"


def _fnv1a_hex(text: str) -> str:
    # A fixed, dependency-free 32-bit hash: the name must be the same in the
    # operator and the gateway across Python versions (hash() is salted).
    value = 0x811C9DC5
    for byte in text.encode():
        value ^= byte
        value = (value * 0x01000193) & 0xFFFFFFFF
    return f"{value:08x}"
