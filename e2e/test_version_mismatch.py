"""A pool whose workers run an older ggml-rpc-server than its host's llama-server,
on a real node: the model ends `Ready=False RpcVersionMismatch` naming both images,
its host stopped instead of crash-looping, and serves once the pool's images agree.

The cluster, chart and helpers are the end-to-end scenario's (`e2e.scenario`), on
one node that is both the system node and the pool's node. The older image is
`scripts/build-images.sh llama-old`. With MESH_HANDSHAKE_RECORD=1 the host's
termination message is written to tests/fixtures/handshake/ as the recorded log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e import parts
from e2e.fileserver import serve_directory
from e2e.nodes.images import chart_images, exists, require_real_nodes
from e2e.scenario import (
    MODEL,
    MODEL_NAMESPACE,
    NODE_GRACE_SECONDS,
    POOL_LABEL,
    REPO,
    SYSTEM_LABEL,
    Scenario,
    log,
)
from e2e.waiting import wait_for
from mesh_operator.api.contract import COMPONENT_LABEL, HOST_COMPONENT, MODEL_LABEL
from mesh_operator.api.meshpool import DEFAULT_RPC_IMAGE, DEFAULT_SERVER_IMAGE, with_variant
from mesh_operator.manifests.workloads import host_deployment_name
from tests.conftest import require_part

pytestmark = pytest.mark.e2e

NODE = "node-a"
POOL = "cpu"
HOST_IMAGE = with_variant(DEFAULT_SERVER_IMAGE, "cpu")
FIXTURE = REPO / "tests" / "fixtures" / "handshake" / "rpc-version-mismatch.log"
# A host refused at its first start is stopped within a resync or two; a few
# restarts may happen meanwhile, never a loop.
MAX_HOST_RESTARTS = 3
QUIET_SECONDS = 20


def old_rpc_image() -> str:
    """The chart's llama.cpp image name at the older pin (scripts/llama-cpp.pin)."""
    pin = (REPO / "scripts" / "llama-cpp.pin").read_text()
    found = re.search(r"^LLAMA_CPP_OLD_PYTHON_VERSION=(\S+)$", pin, flags=re.MULTILINE)
    assert found, "scripts/llama-cpp.pin has no LLAMA_CPP_OLD_PYTHON_VERSION"
    return HOST_IMAGE.rsplit(":", 1)[0] + f":{found[1]}-cpu"


OLD_IMAGE = old_rpc_image()


def require_old_image() -> Path:
    if not exists(OLD_IMAGE):
        raise parts.PartMissingError(
            f"image {OLD_IMAGE} not built: run scripts/build-images.sh llama-old"
        )
    return Path(OLD_IMAGE)


class MismatchScenario(Scenario):
    """The scenario's cluster and chart on one node, with the older image pushed."""

    def start_cluster(self) -> None:
        log("starting the control plane and one real node (system and pool)")
        self.cluster.up(node_monitor_grace_seconds=NODE_GRACE_SECONDS)
        # ghcr.io/mesh-dev/x is pulled through the mirror as mesh-dev/x.
        push = {**chart_images(), OLD_IMAGE: OLD_IMAGE.split("/", 1)[1]}
        self.nodes.up({NODE: {SYSTEM_LABEL: "system", POOL_LABEL: "true"}}, push=push)

    def apply_pool_images(self, rpc_image: str) -> None:
        pool = yaml.safe_load((REPO / "manifests" / "examples" / "cpu-pool.yaml").read_text())
        pool["spec"]["images"] = {"rpcServer": rpc_image}
        pool["spec"]["rpcThreads"] = 1
        self.kubectl("apply", "-f", "-", input_text=json.dumps(pool))

    def submit_model(self, mirror: str, sha256: str) -> float:
        model = yaml.safe_load((REPO / "manifests" / "examples" / "model.yaml").read_text())
        model["metadata"]["namespace"] = MODEL_NAMESPACE
        model["spec"].update(
            {
                "poolRef": POOL,
                "source": {"url": f"{mirror}/{parts.MODEL_FILE}"},
                "sha256": sha256,
                "contextSize": 2048,
                "parallel": 1,
            }
        )
        log(f"kubectl apply MeshModel {MODEL} on pool {POOL} (workers {OLD_IMAGE})")
        self.kubectl("apply", "-f", "-", input_text=json.dumps(model))
        return time.monotonic()

    def condition(self, type_: str) -> dict[str, Any] | None:
        for cond in ((self.model() or {}).get("status") or {}).get("conditions", []):
            if cond["type"] == type_:
                return dict(cond)
        return None

    def host_pods(self) -> list[dict[str, Any]]:
        pods = self.get(
            "pods", "-n", MODEL_NAMESPACE,
            "-l", f"{MODEL_LABEL}={MODEL},{COMPONENT_LABEL}={HOST_COMPONENT}",
        )  # fmt: skip
        return list((pods or {}).get("items", []))

    def host_replicas(self) -> int:
        deployment = self.get("deployment", host_deployment_name(MODEL), "-n", MODEL_NAMESPACE)
        return int(((deployment or {}).get("spec") or {}).get("replicas", -1))

    def mismatch_events(self) -> list[dict[str, Any]]:
        events = self.get(
            "events", "-n", MODEL_NAMESPACE,
            "--field-selector", f"involvedObject.name={MODEL},reason=RpcVersionMismatch",
        )  # fmt: skip
        return list((events or {}).get("items", []))


def termination_messages(pod: dict[str, Any]) -> list[str]:
    out = []
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        for state in (status.get("state") or {}, status.get("lastState") or {}):
            message = (state.get("terminated") or {}).get("message")
            if message:
                out.append(message)
    return out


def restarts(pod: dict[str, Any]) -> int:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return sum(int(s.get("restartCount", 0)) for s in statuses)


def test_mismatched_rpc_server_stops_the_host() -> None:
    for name in ("kube-apiserver", "etcd", "helm"):
        require_part(lambda name=name: parts.binary(name))  # type: ignore[misc]
    model_file = require_part(parts.model_path)
    require_part(require_real_nodes)
    require_part(require_old_image)
    digest = Path(f"{model_file.resolve()}.sha256").read_text().strip()
    # Short: containerd's sockets live below it, and a unix socket path is at most
    # 104 bytes (pytest's tmp_path with this test's name is too long).
    workdir = Path(tempfile.mkdtemp(prefix="mesh-vm-"))
    scenario = MismatchScenario(workdir)
    seen: dict[str, Any] = {"restarts": 0, "messages": []}

    def refused() -> dict[str, Any] | None:
        for pod in scenario.host_pods():
            seen["restarts"] = max(seen["restarts"], restarts(pod))
            seen["messages"] += [m for m in termination_messages(pod) if m not in seen["messages"]]
        cond = scenario.condition("Ready")
        return cond if cond and cond["reason"] == "RpcVersionMismatch" else None

    try:
        scenario.start_cluster()
        with serve_directory(model_file.parent, scenario.nodes.plan.host_address) as mirror:
            scenario.install()
            scenario.apply_pool_images(OLD_IMAGE)
            applied = scenario.submit_model(mirror, digest)
            cond = wait_for("Ready=False RpcVersionMismatch", refused, timeout=420)
            log(f"after {time.monotonic() - applied:.1f}s: {cond['message']}")
            for message in seen["messages"][:1]:
                log(f"host termination message:\n{message}")
                if os.environ.get("MESH_HANDSHAKE_RECORD") == "1":
                    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
                    FIXTURE.write_text(message if message.endswith("\n") else message + "\n")

            # The condition names both images and the worker's protocol version.
            assert cond["status"] == "False"
            assert HOST_IMAGE in cond["message"] and OLD_IMAGE in cond["message"]
            assert "4.0.0" in cond["message"]
            assert any("RPC server version mismatch" in m for m in seen["messages"])
            status = (scenario.model() or {})["status"]
            assert status["versionMismatch"]["rpcServers"] == [OLD_IMAGE]
            # The host is stopped, not crash-looping, and stays so.
            assert scenario.host_replicas() == 0
            wait_for("no host pod", lambda: not scenario.host_pods(), timeout=90)
            time.sleep(QUIET_SECONDS)
            assert not scenario.host_pods() and scenario.host_replicas() == 0
            assert seen["restarts"] <= MAX_HOST_RESTARTS, seen["restarts"]
            events = scenario.mismatch_events()
            assert len(events) == 1 and events[0]["type"] == "Warning", events
            assert sum(int(e.get("count") or 1) for e in events) == 1, events

            # Images of one build: the pool's change lets the host start again.
            log("pool images agree again (rpcServer back to the default)")
            scenario.apply_pool_images(DEFAULT_RPC_IMAGE)
            wait_for("the model to be Ready", scenario.ready, timeout=420)
            assert "versionMismatch" not in (scenario.model() or {})["status"]
    finally:
        scenario.teardown()
        shutil.rmtree(workdir, ignore_errors=True)
