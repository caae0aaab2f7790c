"""Demand: what the operator reads from each gateway to scale models (`GET /demand`).

Pure. Per model the gateway knows, keyed by `namespace/name`:

- `waiting`: requests held at the gateway now (model not Ready, or every slot busy);
- `busy`: requests in flight to the model's hosts;
- `requests`: client requests this gateway process has received for the model
  since it started, counted once each as soon as the request names the model
  (a retry on another host is not counted again; a request that later times out
  or fails still is). Monotonic while the model exists; a change between two
  polls means activity in between, however short.

Read from the router when asked, so it costs a request nothing but the one
counter increment. It carries only counts, so it is served without a key, like
`/metrics`.
"""

from __future__ import annotations

from typing import TypedDict

from mesh_operator.gateway.admission import Router


class ModelDemand(TypedDict):
    waiting: int
    busy: int
    requests: int


class Demand(TypedDict):
    models: dict[str, ModelDemand]


def demand(router: Router | None) -> Demand:
    """The `/demand` answer; every model the router knows, zeros included."""
    models: dict[str, ModelDemand] = {}
    if router is not None:
        for key, gate in sorted(router.gates.items()):
            models[key] = {
                "waiting": len(gate.waiters),
                "busy": gate.in_flight(),
                "requests": gate.requests,
            }
    return {"models": models}
