"""The operator killed (SIGKILL) at drawn points while three models sharing one pool
are applied, changed and deleted, on the real API server: the short, seeded form of
`python -m bench chaos` (e2e/chaos.py says what is checked after every cycle)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from e2e.chaos import Chaos
from e2e.cluster import LocalCluster

pytestmark = pytest.mark.integration

CYCLES = int(os.environ.get("MESH_CHAOS_CYCLES", "4"))
SEED = int(os.environ.get("MESH_CHAOS_SEED", "11"))


def test_operator_survives_its_own_death(crds: LocalCluster, tmp_path: Path) -> None:
    report = Chaos(crds, tmp_path, SEED).run(CYCLES)
    assert report.cycles == CYCLES
    assert report.kills == CYCLES, "one kill per cycle"
    assert report.violations == [], report.summary()
    assert 0 < report.peak_device_mib <= report.limit_mib, "the models shared the GPUs"
    assert len(report.converge_seconds) == CYCLES
