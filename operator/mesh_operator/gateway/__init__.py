"""The gateway: one OpenAI-compatible endpoint for every model of the cluster.

Routes each request by its `model` field to that model's host pods (found by
watching MeshModels and EndpointSlices, or from a static file), holds requests
while a model is not ready, caps in-flight requests per host at its slot count,
retries what failed before any byte reached the client, and exports metrics and
traces. `mesh gateway` (cli/gateway_cmd.py) runs it; docs/gateway.md describes it.

What the package itself exports is the contract the operator builds against:
the host Service name rule, the labels the gateway selects on and the host port.
It imports nothing heavy, so the operator can use it freely; the server lives in
`mesh_operator.gateway.server`.
"""

from mesh_operator.gateway.contract import (
    APP_NAME,
    COMPONENT_LABEL,
    HOST_COMPONENT,
    HOST_PORT,
    HOST_PORT_NAME,
    MODEL_LABEL,
    NAME_LABEL,
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
    "host_selector_labels",
    "host_service_name",
    "host_slice_selector",
]
