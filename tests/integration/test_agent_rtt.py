"""Three real `mesh agent` processes on loopback addresses find each other through
their MeshNodes on the real API server, time round trips to each other's /rtt,
and publish the medians; the operator's ledger turns them into each node's round
trip. A stopped agent drops out of its peers' rounds."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from e2e.cluster import LocalCluster
from mesh_operator.api.meshnode import MeshNodeStatus
from mesh_operator.api.meshpool import MeshPoolSpec
from mesh_operator.api.roundtrip import lower_median
from mesh_operator.ledger import NodeInfo, build_pool_view
from tests.integration.agent_support import free_port, get_meshnode, install_meshnode_crd, wait_for

pytestmark = pytest.mark.integration


def start_agent(
    cluster: LocalCluster, tmp_path: Path, node: str, host: str
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "NODE_NAME": node,
        "KUBECONFIG": str(cluster.kubeconfig),
        "MESH_AGENT_INTERVAL": "1",
        "MESH_AGENT_RTT_INTERVAL": "1",
        "MESH_AGENT_LISTEN": f"{host}:{port}",
        "MESH_AGENT_STATE_DIR": str(tmp_path / "state"),
        "MESH_AGENT_BANDWIDTH_MIB": "16",
        "MESH_AGENT_DISCOVER_RPC": "false",
    }
    with (tmp_path / f"{node}.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mesh_operator.cli.main", "agent"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, f"{host}:{port}"


def round_trips(cluster: LocalCluster, node: str) -> dict[str, Any]:
    obj = get_meshnode(cluster, node) or {}
    status = obj.get("status") or {}
    return {t["node"]: t for t in status.get("roundTrips", [])}


def test_agents_measure_each_other_and_the_ledger_uses_it(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    install_meshnode_crd(cluster)
    tag = uuid.uuid4().hex[:6]
    names = [f"rtt-{tag}-{k}" for k in range(3)]
    procs = {}
    endpoints = {}
    try:
        for k, name in enumerate(names):
            procs[name], endpoints[name] = start_agent(cluster, tmp_path, name, f"127.0.0.{k + 1}")

        def measured_by_all() -> bool:
            for name in names:
                others = set(names) - {name}
                trips = round_trips(cluster, name)
                if not others <= set(trips) or any(trips[o]["samples"] < 2 for o in others):
                    return False
            return True

        wait_for("every agent's round trips to the two others", measured_by_all, timeout=90)
        statuses = {}
        for name in names:
            obj = get_meshnode(cluster, name)
            assert obj is not None
            status = obj["status"]
            assert status["probeEndpoint"] == endpoints[name]
            trips = {t["node"]: t for t in status["roundTrips"]}
            for other in set(names) - {name}:
                assert 0 < trips[other]["ms"] < 50  # loopback on a busy machine
            assert status["roundTripMs"] == lower_median(t["ms"] for t in trips.values())
            statuses[name] = MeshNodeStatus.model_validate(status)

        # /metrics says the same, by peer.
        with urllib.request.urlopen(f"http://{endpoints[names[0]]}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        peers = {
            s.labels["peer"]
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "mesh_node_round_trip_seconds" and s.value > 0
        }
        assert set(names[1:]) <= peers

        pool = MeshPoolSpec(node_selector={"pool": tag})
        nodes = [NodeInfo(n, {"pool": tag}) for n in names]
        view = build_pool_view(pool, nodes, statuses, {}, dt.datetime.now(dt.UTC))
        rtts = {n.name: n.rtt_ms for n in view.nodes}
        assert set(rtts) == set(names)
        assert all(r is not None and 0 < r < 50 for r in rtts.values())

        # One agent stops: its peers keep probing each other; it stays in their
        # list until its MeshNode is stale, then is forgotten.
        gone = names[2]
        os.killpg(procs[gone].pid, signal.SIGTERM)
        procs[gone].wait(timeout=30)
        wait_for(
            "the stopped agent to leave its peers' round trips",
            lambda: all(gone not in round_trips(cluster, n) for n in names[:2]),
            timeout=60,
        )
        assert names[1] in round_trips(cluster, names[0])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
    for name, proc in procs.items():
        assert proc.returncode == 0, (tmp_path / f"{name}.log").read_text()[-2000:]
        log = (tmp_path / f"{name}.log").read_text()
        assert "Traceback" not in log, log[-2000:]
