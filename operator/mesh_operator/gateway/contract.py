"""What the gateway needs of the operator's contract: the host Service name rule,
the labels it selects host pods and EndpointSlices by, and the host port.

Defined in `mesh_operator.api.contract`; named here for the gateway's modules.
"""

from __future__ import annotations

from mesh_operator.api.contract import (
    APP_NAME,
    COMPONENT_LABEL,
    HOST_COMPONENT,
    HOST_PORT,
    HOST_PORT_NAME,
    MODEL_LABEL,
    NAME_LABEL,
    SERVICE_NAME_LABEL,
    host_selector_labels,
    host_service_name,
    host_slice_selector,
)

__all__ = [
    "APP_NAME",
    "COMPONENT_LABEL",
    "HOST_COMPONENT",
    "HOST_PORT",
    "HOST_PORT_NAME",
    "MODEL_LABEL",
    "NAME_LABEL",
    "SERVICE_NAME_LABEL",
    "host_selector_labels",
    "host_service_name",
    "host_slice_selector",
]
