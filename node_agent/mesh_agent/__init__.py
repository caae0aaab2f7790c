"""mesh node agent: device inventory, health and heartbeat of one node.

Modules: `inventory` (NVML, CPU, model cache), `rpc_liveness`, `health`,
`discovery` (the RPC servers to probe), `report` (the MeshNode status with its
heartbeat), `publisher` (the API writes), `metrics`, `server` (HTTP), `agent`
(the loop) and `transitions` (logging).
"""

__version__ = "0.1.0"
