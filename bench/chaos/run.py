"""Operator chaos, the long form: `python -m bench chaos [--cycles 50] [--seed N]`.

Fifty cycles of apply, update and delete of three models sharing one pool, with
the operator killed (SIGKILL) at drawn points and restarted (`e2e/chaos.py`), on a
local control plane of its own. Prints cycles, kills and the time to converge
(p50/p99); exits 1 on any violation or a cycle that did not converge.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from e2e.chaos import Chaos, ChaosError
from e2e.cluster import cluster_with_crds


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench chaos", description=__doc__)
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--cluster-dir", type=Path, help="reuse (and keep) this local cluster")
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="mesh-chaos-") as tmp,
        cluster_with_crds(args.cluster_dir, Path(tmp)) as cluster,
    ):
        try:
            report = Chaos(cluster, Path(tmp), args.seed).run(args.cycles)
        except ChaosError as exc:
            print(f"bench chaos: {exc}", file=sys.stderr)
            return 1
    print(report.summary())
    for violation in report.violations:
        print(f"  violation: {violation}")
    if report.violations:
        print("the namespace's Events:")
        for line in report.events:
            print(f"  {line}")
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
