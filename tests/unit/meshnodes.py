"""MeshNode statuses as a node's agent writes them, for the ledger and decision tests."""

from __future__ import annotations

import datetime as dt
from typing import Any

from mesh_operator.api.meshnode import MeshNodeStatus


def one_gpu_status(
    now: dt.datetime,
    free: int,
    *,
    total: int,
    others: int = 0,
    age: int = 5,
    bandwidth: float = 936.0,
    **fields: Any,
) -> MeshNodeStatus:
    """One CUDA device, its heartbeat `age` seconds before `now` (10 s interval)."""
    beat = (now - dt.timedelta(seconds=age)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return MeshNodeStatus.model_validate(
        {
            "heartbeatTime": beat,
            "intervalSeconds": 10,
            "devices": [
                {
                    "id": "CUDA0",
                    "index": 0,
                    "backend": "cuda",
                    "memoryTotalMiB": total,
                    "memoryFreeMiB": free,
                    "memoryUsedByOthersMiB": others,
                    "bandwidthGBps": bandwidth,
                }
            ],
            **fields,
        }
    )
