"""The real `mesh agent` process against the real API server, on this CPU-only machine:
it creates its MeshNode, keeps the heartbeat going, serves /metrics, and once
stopped (by pid) the MeshNode turns stale by the operator's rule."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from e2e.cluster import LocalCluster
from mesh_operator.api.heartbeat import STALE_INTERVALS, is_stale, parse_time
from tests.integration.agent_support import (
    free_port,
    get_meshnode,
    install_meshnode_crd,
    wait_for,
)

pytestmark = pytest.mark.integration

INTERVAL = 1


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def test_agent_process_heartbeats_and_goes_stale_when_stopped(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    install_meshnode_crd(cluster)
    node = f"agent-{uuid.uuid4().hex[:8]}"
    port = free_port()
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny.gguf").write_bytes(b"GGUF" + bytes(60))
    env = {
        **os.environ,
        "NODE_NAME": node,
        "KUBECONFIG": str(cluster.kubeconfig),
        "MESH_AGENT_INTERVAL": str(INTERVAL),
        "MESH_AGENT_LISTEN": f"127.0.0.1:{port}",
        "MESH_AGENT_STATE_DIR": str(tmp_path / "state"),
        "MESH_AGENT_MODEL_CACHE": str(models),
        "MESH_AGENT_BANDWIDTH_MIB": "16",
    }
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mesh_operator.cli.main", "agent"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        first = wait_for(
            "the MeshNode with a heartbeat",
            lambda: (obj := get_meshnode(cluster, node)) and obj.get("status") and obj,
            timeout=60,
        )
        status = first["status"]
        assert first["spec"]["nodeName"] == node
        assert not is_stale(status, now())
        assert status["intervalSeconds"] == INTERVAL
        (device,) = status["devices"]
        assert (device["id"], device["backend"]) == ("CPU", "cpu")
        assert device["memoryTotalMiB"] > 0 and device["bandwidthGBps"] > 0
        assert status["cachedModels"] == [{"file": "tiny.gguf", "sizeBytes": 64}]
        assert status["health"]["state"] == "Healthy"
        assert status["system"]["nvml"] is False

        beat = parse_time(status["heartbeatTime"])
        wait_for(
            "the heartbeat to advance",
            lambda: (
                (obj := get_meshnode(cluster, node))
                and parse_time(obj["status"]["heartbeatTime"]) > beat
            ),
            timeout=10 * INTERVAL,
        )

        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{base}/readyz", timeout=5) as resp:
            assert resp.status == 200
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
        assert samples["mesh_node_heartbeat_age_seconds"].value < STALE_INTERVALS * INTERVAL
        assert samples["mesh_gpu_memory_free_bytes"].labels == {
            "node": node,
            "gpu": "0",
            "uuid": "",
            "device": "CPU",
        }
        assert samples["mesh_agent_publish_total"].labels["result"] == "ok"
        assert samples["mesh_node_cached_models"].value == 1
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    stopped = time.monotonic()
    assert proc.returncode == 0

    last = get_meshnode(cluster, node)
    assert last is not None
    wait_for(
        "the MeshNode to turn stale",
        lambda: is_stale(get_meshnode(cluster, node)["status"], now()),  # type: ignore[index]
        timeout=STALE_INTERVALS * INTERVAL + 10,
    )
    # Not earlier than the rule allows: the last heartbeat is > 3 intervals old now.
    age = (now() - parse_time(last["status"]["heartbeatTime"])).total_seconds()
    assert age > STALE_INTERVALS * INTERVAL
    assert time.monotonic() - stopped <= STALE_INTERVALS * INTERVAL + 10
    output = log_path.read_text()
    assert "Traceback" not in output
    assert f"MeshNode {node} written" in output
    assert output.count("MeshNode write failing") == 0
    cluster.kubectl("delete", "meshnode", node, "--wait=false")
