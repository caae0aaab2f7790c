"""Two operator replicas on one Lease, on the real API server: the active one is
killed (SIGKILL), the standby takes the Lease and reconciles, the plans made before
stay (the claims are rebuilt from what the API holds), and a replica stopped
cleanly gives the Lease up. `python -m bench handover` times it."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e.chaos import HandoverRun
from e2e.cluster import LocalCluster

pytestmark = pytest.mark.integration


def test_the_standby_takes_over_when_the_active_operator_dies(
    crds: LocalCluster, tmp_path: Path
) -> None:
    handover = HandoverRun(crds, tmp_path, seed=3).run_handover()
    assert handover.lease_seconds <= handover.reconcile_seconds
    assert handover.kept_plan, "the model planned before the kill kept its plan"
    assert handover.released, "a replica stopped cleanly gives the Lease up"
