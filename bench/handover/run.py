"""Operator handover: `python -m bench handover [--runs 5]`.

Two `mesh operator` replicas on one Lease against a local control plane; the
active one is killed (SIGKILL) and a model applied at once (`e2e/chaos.py`,
`HandoverRun`). Prints, per run and as medians, the seconds until the standby
holds the Lease and until that model is Ready (goal: under 15 s).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from e2e.chaos import ChaosError, HandoverRun
from e2e.cluster import cluster_with_crds


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench handover", description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cluster-dir", type=Path, help="reuse (and keep) this local cluster")
    args = parser.parse_args(argv)
    leases, reconciles = [], []
    with (
        tempfile.TemporaryDirectory(prefix="mesh-handover-") as tmp,
        cluster_with_crds(args.cluster_dir, Path(tmp)) as cluster,
    ):
        for run in range(args.runs):
            try:
                result = HandoverRun(cluster, Path(tmp), seed=run).run_handover()
            except ChaosError as exc:
                print(f"bench handover: run {run + 1}: {exc}", file=sys.stderr)
                return 1
            leases.append(result.lease_seconds)
            reconciles.append(result.reconcile_seconds)
            print(
                f"run {run + 1}: Lease taken after {result.lease_seconds:.1f} s, "
                f"model Ready after {result.reconcile_seconds:.1f} s",
                flush=True,
            )
    print(
        f"handover over {args.runs} runs: Lease median {statistics.median(leases):.1f} s "
        f"(max {max(leases):.1f}), model Ready median {statistics.median(reconciles):.1f} s "
        f"(max {max(reconciles):.1f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
