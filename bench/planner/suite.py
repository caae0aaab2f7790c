"""The simulated comparison: every model of the suite on every pool, three planners.

Owns the suite's numbers and its table. Models are written as header-only GGUFs
and read back through the planner's reader; each pair of model and pool is
planned by mesh, by llama.cpp's default rule and by mesh-llm's rule, and all
three are judged with the same memory estimate and time model.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.planner.baselines import llama_cpp_default, mesh_llm_rule
from bench.planner.scenarios import Pool, build_pools
from bench.planner.shapes import SHAPES, write_header_gguf
from mesh_operator.planner import (
    Inventory,
    PlacementRequest,
    PlacementResult,
    ServingParams,
    parse_inventory,
    plan_placement,
    read_model_profile,
)
from mesh_operator.planner.profile import ModelProfile

Planner = Callable[[ModelProfile, Inventory, PlacementRequest], PlacementResult]
PLANNERS: dict[str, Planner] = {
    "mesh": plan_placement,
    "llama.cpp": llama_cpp_default,
    "mesh-llm": mesh_llm_rule,
}
REQUEST = PlacementRequest(serving=ServingParams(ctx=8192, parallel=1))


@dataclass(frozen=True)
class Row:
    model: str
    pool: str
    mixed: bool
    results: dict[str, PlacementResult]
    mesh_seconds: float
    nodes: int

    def ms(self, planner: str) -> float | None:
        r = self.results[planner]
        return r.predicted_token_ms if r.feasible else None

    def best_baseline(self) -> float | None:
        times = [t for k in ("llama.cpp", "mesh-llm") if (t := self.ms(k)) is not None]
        return min(times) if times else None


def load_models(directory: Path) -> dict[str, ModelProfile]:
    profiles = {}
    for name, shape in SHAPES.items():
        files = write_header_gguf(shape, directory / f"{name}.gguf")
        profiles[name] = read_model_profile(files[0])
    return profiles


def run_suite(pools: Sequence[Pool] | None = None) -> list[Row]:
    pools = pools or build_pools()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmp:
        models = load_models(Path(tmp))
    for pool in pools:
        inventory = parse_inventory(pool.inventory, source=pool.name)
        for name, profile in models.items():
            results = {}
            started = time.perf_counter()
            results["mesh"] = PLANNERS["mesh"](profile, inventory, REQUEST)
            elapsed = time.perf_counter() - started
            for key in ("llama.cpp", "mesh-llm"):
                results[key] = PLANNERS[key](profile, inventory, REQUEST)
            rows.append(Row(name, pool.name, pool.mixed, results, elapsed, pool.nodes))
    return rows


def _median(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.2f}" if values else "-"


def format_suite(rows: Sequence[Row]) -> str:
    lines = []
    pairs = len(rows)
    header = f"{'planner':<10} {'placed':>12} {'median ms/tok':>14} {'median nodes':>13}"
    lines += [f"{pairs} model x pool pairs ({len({r.pool for r in rows})} pools)", header]
    for planner in PLANNERS:
        placed = [r for r in rows if r.results[planner].feasible]
        times = [r.results[planner].predicted_token_ms for r in placed]
        nodes = [float(len(r.results[planner].rpc)) for r in placed]
        share = f"{len(placed)}/{pairs}"
        lines.append(f"{planner:<10} {share:>12} {_median(times):>14} {_median(nodes):>13}")

    only_baseline = [
        r for r in rows if not r.results["mesh"].feasible and r.best_baseline() is not None
    ]
    lines.append(f"pairs a baseline places and mesh does not: {len(only_baseline)}")
    lines.append("")
    lines.append(
        "time per token, mesh / better baseline (pairs a baseline places; "
        "'split': mesh or mesh-llm uses several devices):"
    )
    lines.append(
        f"{'pools':<18} {'pairs':>6} {'median':>7} {'p90':>6} {'max':>6} {'worse':>6} "
        f"{'vs llama.cpp':>13} {'vs mesh-llm':>12}"
    )

    def spread(r: Row) -> bool:
        # Where the choice of devices and split matters: mesh or the rule that
        # picks few nodes (mesh-llm) uses several devices.
        return any(
            r.results[k].feasible and len(r.results[k].devices) > 1 for k in ("mesh", "mesh-llm")
        )

    groups: list[tuple[str, list[Row]]] = [
        ("mixed", [r for r in rows if r.mixed]),
        ("homogeneous", [r for r in rows if not r.mixed]),
        ("all", list(rows)),
        ("mixed, split", [r for r in rows if r.mixed and spread(r)]),
    ]
    for size in sorted({r.nodes for r in rows if r.mixed}):
        groups.append((f"mixed, {size} nodes", [r for r in rows if r.mixed and r.nodes == size]))
    for label, subset in groups:
        ratios = []
        per: dict[str, list[float]] = {"llama.cpp": [], "mesh-llm": []}
        for r in subset:
            ours, best = r.ms("mesh"), r.best_baseline()
            if ours is None or best is None:
                continue
            ratios.append(ours / best)
            for key, values in per.items():
                theirs = r.ms(key)
                if theirs is not None:
                    values.append(ours / theirs)
        if not ratios:
            continue
        ratios.sort()
        p90 = ratios[min(len(ratios) - 1, int(0.9 * len(ratios)))]
        worse = sum(1 for x in ratios if x > 1 + 1e-9)
        lines.append(
            f"{label:<18} {len(ratios):>6} {statistics.median(ratios):>7.2f} {p90:>6.2f} "
            f"{max(ratios):>6.2f} {worse:>6} {_median(per['llama.cpp']):>13} "
            f"{_median(per['mesh-llm']):>12}"
        )
    lines.append("")
    lines.append("per model (mixed pools): placed mesh/llama.cpp/mesh-llm, median ms/token each")
    for model in dict.fromkeys(r.model for r in rows):
        subset = [r for r in rows if r.model == model and r.mixed]
        counts = "/".join(str(sum(1 for r in subset if r.results[k].feasible)) for k in PLANNERS)
        medians = "  ".join(
            _median([t for r in subset if (t := r.ms(k)) is not None]).rjust(7) for k in PLANNERS
        )
        lines.append(f"  {model:<18} {counts:>9}  {medians}")
    seconds = [r.mesh_seconds for r in rows]
    lines.append("")
    lines.append(
        f"mesh planning time: median {statistics.median(seconds) * 1000:.0f} ms, "
        f"max {max(seconds) * 1000:.0f} ms per plan"
    )
    return "\n".join(lines)
