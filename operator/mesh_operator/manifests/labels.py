"""The one labels function every builder uses.

`app.kubernetes.io/{name,instance,component,part-of,managed-by}` plus the model's
selector label. The gateway finds host pods by a subset of these (see
`mesh_operator.gateway.contract`), so both sides derive from the same constants.
"""

from __future__ import annotations

from typing import Final

from mesh_operator.gateway.contract import (
    APP_NAME,
    COMPONENT_LABEL,
    HOST_COMPONENT,
    MODEL_LABEL,
    NAME_LABEL,
)

INSTANCE_LABEL: Final = "app.kubernetes.io/instance"
PART_OF_LABEL: Final = "app.kubernetes.io/part-of"
MANAGED_BY_LABEL: Final = "app.kubernetes.io/managed-by"
MANAGED_BY: Final = "mesh-operator"

RPC_COMPONENT: Final = "rpc-server"
HOST: Final = HOST_COMPONENT
SERVICE_COMPONENT: Final = "host"
POLICY_COMPONENT: Final = "network-policy"
# The short-lived pod that reads the header of a model on a PVC.
HEADER_COMPONENT: Final = "header-reader"

# Pod template annotation that changes on every re-plan, so host and workers
# restart together as a group.
PLAN_ANNOTATION: Final = "mesh.dev/plan-generation"
ARGS_HASH_ANNOTATION: Final = "mesh.dev/args-hash"
# On the host's pod template: how many times the host was restarted with its
# group because a worker restarted under it (MeshModel status.groupRestarts).
GROUP_RESTART_ANNOTATION: Final = "mesh.dev/group-restarts"
# On the host's pod template: a digest of the llama-server image and its workers'
# images, so what a host pod reports is never taken for a newer group's.
IMAGES_ANNOTATION: Final = "mesh.dev/images"
# On a header-reader pod: the model source it reads (a `cache_key`).
SOURCE_ANNOTATION: Final = "mesh.dev/source"


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


def owned_selector(component: str | None = None) -> str:
    """Label selector (string form) of every object mesh owns, optionally of one component."""
    selector = f"{NAME_LABEL}={APP_NAME},{MANAGED_BY_LABEL}={MANAGED_BY}"
    if component:
        selector += f",{COMPONENT_LABEL}={component}"
    return selector
