"""The resource models of mesh's API (group `mesh.dev`, version `v1alpha1`).

Pydantic models of MeshPool, MeshModel and MeshNode: the one source of truth the
CRDs in `crds/` are generated from, and what the operator, the node agent and the
gateway read and write. No kopf and no Kubernetes client here.
"""

from mesh_operator.api.base import API_VERSION, GROUP, VERSION
from mesh_operator.api.conditions import Condition, condition_status, set_condition
from mesh_operator.api.meshmodel import MeshModelSpec, MeshModelStatus
from mesh_operator.api.meshnode import MeshNodeSpec, MeshNodeStatus
from mesh_operator.api.meshpool import MeshPoolSpec, MeshPoolStatus

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "Condition",
    "MeshModelSpec",
    "MeshModelStatus",
    "MeshNodeSpec",
    "MeshNodeStatus",
    "MeshPoolSpec",
    "MeshPoolStatus",
    "condition_status",
    "set_condition",
]
