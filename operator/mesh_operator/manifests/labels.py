"""The labels and annotations of the objects mesh owns, for the builders' callers.

Defined in `mesh_operator.api.contract` (the one labels function, `build_labels`,
lives there too, next to the selectors the gateway and the node agent use);
named here for the modules that read them from the manifests package.
"""

from __future__ import annotations

from typing import Final

from mesh_operator.api.contract import (
    APP_NAME,
    ARGS_HASH_ANNOTATION,
    COMPONENT_LABEL,
    GROUP_RESTART_ANNOTATION,
    HEADER_COMPONENT,
    HOST_COMPONENT,
    IMAGES_ANNOTATION,
    INSTANCE_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    MODEL_LABEL,
    NAME_LABEL,
    PART_OF_LABEL,
    PLAN_ANNOTATION,
    POLICY_COMPONENT,
    RPC_COMPONENT,
    SOURCE_ANNOTATION,
    build_labels,
    build_selector,
)

HOST: Final = HOST_COMPONENT

__all__ = [
    "APP_NAME",
    "ARGS_HASH_ANNOTATION",
    "COMPONENT_LABEL",
    "GROUP_RESTART_ANNOTATION",
    "HEADER_COMPONENT",
    "HOST",
    "HOST_COMPONENT",
    "IMAGES_ANNOTATION",
    "INSTANCE_LABEL",
    "MANAGED_BY",
    "MANAGED_BY_LABEL",
    "MODEL_LABEL",
    "NAME_LABEL",
    "PART_OF_LABEL",
    "PLAN_ANNOTATION",
    "POLICY_COMPONENT",
    "RPC_COMPONENT",
    "SOURCE_ANNOTATION",
    "build_labels",
    "build_selector",
]
