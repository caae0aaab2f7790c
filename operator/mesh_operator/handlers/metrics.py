"""The operator's own Prometheus metrics (reconciles, errors, plan latency).

Served by `mesh operator` on its metrics port; the Operator dashboard reads them.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter(
    "mesh_operator_reconciles_total",
    "Reconciles by kind and outcome (ok, blocked, error).",
    ["kind", "outcome"],
)
RECONCILE_SECONDS = Histogram(
    "mesh_operator_reconcile_duration_seconds",
    "Time one reconcile took, by kind.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PLANS = Counter(
    "mesh_operator_plans_total",
    "Plans computed, by outcome (planned, replanned, infeasible).",
    ["outcome"],
)
PLAN_SECONDS = Histogram(
    "mesh_operator_plan_duration_seconds",
    "Time the planner took for one placement.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
PLANNED_MODELS = Gauge(
    "mesh_operator_planned_models",
    "MeshModels that hold a plan (and so claim pool memory).",
)
POOL_MEMORY = Gauge(
    "mesh_operator_pool_memory_bytes",
    "Memory of a pool's devices as the ledger sees it: total, free (reported by "
    "fresh agents) and claimed by models' plans.",
    ["pool", "state"],
)
MODEL_REPLICAS = Gauge(
    "mesh_operator_model_replicas",
    "A MeshModel's replicas as its status shows them: desired (the autoscaler's "
    "choice, else spec.replicas; 0 while scaled to zero), planned and ready.",
    ["model", "state"],
)
DEMAND_POLLS = Counter(
    "mesh_operator_demand_polls_total",
    "Reads of a gateway's /demand (scale to zero, autoscaling), by outcome (ok, error).",
    ["outcome"],
)
SCALINGS = Counter(
    "mesh_operator_scalings_total",
    "Replica count changes by the autoscaler and scale to zero, by direction "
    "(up, down, to_zero, from_zero).",
    ["direction"],
)
