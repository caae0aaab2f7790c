"""The gateway: one OpenAI-compatible endpoint for every model of the cluster.

Routes each request by its `model` field to that model's host pods (found by
watching MeshModels and EndpointSlices, or from a static file), holds requests
while a model is not ready, caps in-flight requests per host at its slot count,
retries what failed before any byte reached the client, and exports metrics and
traces. `mesh gateway` (cli/gateway_cmd.py) runs it; docs/gateway.md describes it.
How the gateway finds a model's host pods (labels, Service name, port) is part
of the contract in `mesh_operator.api.contract`.
"""
